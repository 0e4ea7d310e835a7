"""The bench's picture: throughput speedup of ours over FlexAttention and over dense SDPA, per case."""
from __future__ import annotations

import numpy as np

DTYPE_COLORS = {"float16": "tab:blue", "bfloat16": "tab:orange", "float32": "tab:gray"}
PANELS = (("flex", "FlexAttention (compiled, analytic mask_mod)"),
          ("sdpa_dense", "dense SDPA (is_causal for causal masks)"))


def _why_missing(results, ours, base) -> str:
    """Short reason a case has no ratio, for the label drawn in its place."""
    for name, who in ((ours, "ours"), (base, base)):
        res = results.get(name, {})
        for key in ("unsupported", "refused", "skipped", "error"):
            if key in res:
                return f"{who} {key}"
        if res.get("correct") is False:
            return f"{who} wrong"
    return "not run"


def _ours(rows) -> str:
    """The implementation the picture is about: the default fused path when it ran."""
    for name in ("splat_fused", "splat_fused_untuned"):
        if any(name in r["results"] for r in rows):
            return name
    return "splat_fused"


def _panel(ax, rows, ours, base, title):
    """One baseline: a bar per case in log10 space from parity (0) to the ratio, so slower cases
    point left; the untuned kernel's ratio as a tick; the reason where there is no ratio."""
    y = np.arange(len(rows))[::-1]
    ratios = []
    for yi, r in zip(y, rows):
        res = r["results"]
        ratio = res.get(ours, {}).get("throughput_speedup", {}).get(base)
        if ratio is None:
            ax.text(0.0, yi, "  " + _why_missing(res, ours, base), va="center", fontsize=7, color="0.4")
            continue
        ax.barh(yi, abs(np.log10(ratio)), left=min(0.0, np.log10(ratio)), height=0.7,
                color=DTYPE_COLORS.get(r["case"]["dtype"], "tab:gray"))
        ax.text(np.log10(ratio), yi, f" {ratio:.2f}x ", va="center", ha="left" if ratio >= 1 else "right",
                fontsize=7)
        ratios.append(ratio)
        untuned = res.get("splat_fused_untuned", {}).get("throughput_speedup", {}).get(base)
        if ours == "splat_fused" and untuned:
            ax.plot(np.log10(untuned), yi, marker="|", color="black", markersize=9)
            ratios.append(untuned)
    ax.axvline(0.0, color="black", linewidth=1)
    ax.set_ylim(-0.8, len(rows) - 0.2)
    low, high = min(ratios + [0.5]) / 2, max(ratios + [2.0]) * 2  # room for the labels
    ticks = [t for t in (1 / 64, 1 / 16, 0.25, 0.5, 1, 2, 4, 16, 64, 256, 1024) if low <= t <= high]
    ax.set_xticks(np.log10(ticks), [f"{t:g}x" for t in ticks])
    ax.set_xlim(np.log10(low), np.log10(high))
    ax.set_title(f"{ours} vs {title}", fontsize=9)
    ax.set_xlabel("throughput speedup (back-to-back ms of the baseline / ours; > 1: ours faster)", fontsize=8)
    ax.grid(axis="x", alpha=0.3)


def plot_speedups(rows, path):
    """Two panels, one row per case: ours' back-to-back time over Flex's and over dense SDPA's
    (> 1: ours faster), log scale, bars coloured by dtype; the untuned kernel as a tick when it
    ran; cases without a ratio say why."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    ours = _ours(rows)
    fig, axes = plt.subplots(1, 2, figsize=(14.5, 1.5 + 0.3 * max(1, len(rows))), sharey=True)
    for ax, (base, title) in zip(axes, PANELS):
        _panel(ax, rows, ours, base, title)
    axes[0].set_yticks(np.arange(len(rows))[::-1], [r["name"] for r in rows], fontsize=7)
    handles = [Patch(color=c, label=dt) for dt, c in DTYPE_COLORS.items()
               if any(r["case"]["dtype"] == dt for r in rows)]
    if ours == "splat_fused" and any("splat_fused_untuned" in r["results"] for r in rows):
        handles.append(plt.Line2D([], [], marker="|", color="black", linestyle="", markersize=9,
                                  label="splat_fused_untuned"))
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8, bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=120, bbox_inches="tight")  # "tight": the long case names stay whole
    plt.close(fig)
