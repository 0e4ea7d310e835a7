"""What :class:`SparsifyAttention` did, as plain data (no TVM objects), for callers and logs."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Tuple


@dataclass(frozen=True)
class SiteReport:
    """One attention site.

    ``name``: ``attn<i>`` (i = index of its softmax among the function's softmax/attention
    ops) or the name given through ``names``; ``form``: ``"softmax"`` or ``"nn.attention"``;
    shapes are those of q/k/v ``[batch, heads, seq_len, head_dim]`` (0 where unknown: a
    softmax that is not a recognised attention site, which is reported with its reason
    all the same); ``mask``: what the graph
    applied (``"none"``, ``"causal"``, ``"boolean"``, ``"additive"``, joined by ``+``);
    ``pattern``: the user pattern for this site (text), or None when the mask alone decided;
    ``density``: fraction of (query, key) pairs kept (over mask heads), when known;
    ``rewritten`` and, when not, ``reason``; for a rewritten site, ``kernels``: the kernel
    family its plan chose and the kernels it launches, in order (e.g. ``"separate: sddmm,
    softmax, spmm"``).
    """

    name: str
    function: str
    form: str
    batch: int
    heads: int
    seq_len: int
    head_dim: int
    dtype: str
    mask: str
    pattern: Optional[str]
    density: Optional[float]
    rewritten: bool
    reason: str = ""
    kernels: str = ""

    @property
    def launches(self) -> int:
        """How many kernel launches replace the site (0 when it was skipped)."""
        return len(self.kernels.split(":", 1)[1].split(",")) if self.kernels else 0

    def line(self) -> str:
        dims = (self.batch, self.heads, self.seq_len, self.head_dim)
        shape = "[" + ",".join(str(d) if d else "?" for d in dims) + f"] {self.dtype}"
        density = "-" if self.density is None else f"{self.density:.3f}"
        what = f"rewritten ({self.kernels})" if self.rewritten else f"skipped: {self.reason}"
        return (f"{self.function}/{self.name} ({self.form}, {shape}, mask={self.mask}, "
                f"pattern={self.pattern or '-'}, density={density}): {what}")


@dataclass(frozen=True)
class SparsifyReport:
    """All sites of one run of the pass, in the order they appear."""

    sites: Tuple[SiteReport, ...] = ()

    @property
    def rewritten(self) -> Tuple[SiteReport, ...]:
        return tuple(s for s in self.sites if s.rewritten)

    @property
    def skipped(self) -> Tuple[SiteReport, ...]:
        return tuple(s for s in self.sites if not s.rewritten)

    def site(self, name: str) -> SiteReport:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(f"no attention site named {name!r}; sites: "
                       f"{[s.name for s in self.sites]}")

    def as_dicts(self) -> list:
        """JSON-ready list of dicts."""
        return [asdict(s) for s in self.sites]

    def __str__(self) -> str:
        head = (f"SparsifyAttention: {len(self.rewritten)} of {len(self.sites)} attention "
                f"site(s) rewritten")
        return "\n".join([head] + ["  " + s.line() for s in self.sites])
