"""FlexAttention as its users write it, and proof that it ran compiled.

One ``torch.compile(flex_attention)`` per process (:func:`compiled_flex`). Dynamo caches compiled
code on ``flex_attention``'s code object, so every bench case is one more entry there; past
``torch._dynamo.config.recompile_limit`` (8 by default) dynamo silently runs FlexAttention
*eagerly*: the unfused path that materialises all n x n scores, 5-10x slower. So:

* prevention (:func:`configure_dynamo`): the limits are raised far above any suite, and
  ``fail_on_recompile_limit_hit`` turns a hit into an exception instead of an eager run;
* detection (:class:`FallbackWatch`), without trusting the prevention: dynamo's counters over
  the case (a frame it tried and did not compile, process-wide ``frames.total - frames.ok``) and
  an eager probe: one more call under ``sys.setprofile`` that sees whether the Python body of
  ``flex_attention`` itself ran. When dynamo runs compiled code the original code object never
  executes; when it falls back it does, on every call, whatever the counters say (after the
  first hit they stop moving). The probe is checked once per process on a compiled and an
  uncompiled canary before it is believed.

The bench refuses to report a Flex figure when the watch gives a reason.
"""
from __future__ import annotations

import functools
import sys

# Far above the cases of any suite (the full suite has 108, each one new compiled entry of
# flex_attention's code object, plus create_block_mask's own entries).
RECOMPILE_LIMIT = 4096

_FLEX = None
# Reasons of the fallbacks seen in this process: without a working eager probe, later shapes may
# run eagerly with no counter moving, so one fallback condemns the rest of the run.
_FALLBACKS: list[str] = []


def configure_dynamo() -> dict:
    """Raise dynamo's recompile limits and make a hit raise instead of running eagerly. Names
    differ across torch versions (``cache_size_limit`` became ``recompile_limit`` in 2.6 and is
    an alias since); every name this torch has is set. Returns the settings, for the JSON."""
    import torch._dynamo

    config = torch._dynamo.config
    wanted = {
        "recompile_limit": RECOMPILE_LIMIT,
        "cache_size_limit": RECOMPILE_LIMIT,
        "accumulated_recompile_limit": RECOMPILE_LIMIT,
        "accumulated_cache_size_limit": RECOMPILE_LIMIT,
        "fail_on_recompile_limit_hit": True,
    }
    applied = {}
    for name, value in wanted.items():
        if hasattr(config, name):
            setattr(config, name, value)
            applied[name] = value
    return applied


def compiled_flex():
    """The process's one ``torch.compile(flex_attention, dynamic=False)``: every shape gets a
    kernel specialised to it, as in a process that only ever sees that shape (dynamo's automatic
    dynamic shapes would otherwise recompile the second shape with symbolic sizes)."""
    global _FLEX
    if _FLEX is None:
        import torch
        from torch.nn.attention.flex_attention import flex_attention

        configure_dynamo()
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def flex_call(inputs, mask_mod):
    """``fn() -> out`` running the compiled FlexAttention on ``inputs`` with a block mask built
    from ``mask_mod`` (default BLOCK_SIZE; per head when the mask is); GQA through
    ``enable_gqa``."""
    from torch.nn.attention.flex_attention import create_block_mask

    flex = compiled_flex()
    heads = inputs.mask_heads if inputs.mask_heads > 1 else None
    block_mask = create_block_mask(mask_mod, None, heads, inputs.n, inputs.n, device=inputs.q.device)
    q, k, v, gqa = inputs.q, inputs.k, inputs.v, inputs.gqa
    return lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=gqa)


def gather_mask_mod(mask):
    """A mask_mod that loads from a dense bool mask (``[n, n]`` or ``[heads, n, n]``): the only
    form for masks without a pattern, one global-memory load per score."""
    if mask.dim() == 3:
        return lambda b, h, q_idx, kv_idx: mask[h, q_idx, kv_idx]
    return lambda b, h, q_idx, kv_idx: mask[q_idx, kv_idx]


# ------------------------------------------------------------------------------ detection
def _dynamo_failed_frames() -> int:
    """Frames dynamo tried to compile and did not, in this process (each ran eagerly)."""
    from torch._dynamo.utils import counters

    return int(counters["frames"]["total"] - counters["frames"]["ok"])


def ran_python_code(code, call) -> bool:
    """Whether the Python code object ``code`` started executing during ``call()``."""
    seen = False

    def profiler(frame, event, arg):
        nonlocal seen
        if event == "call" and frame.f_code is code:
            seen = True

    previous = sys.getprofile()
    sys.setprofile(profiler)
    try:
        call()
    finally:
        sys.setprofile(previous)
    return seen


@functools.lru_cache(maxsize=None)
def eager_probe_works() -> bool:
    """Whether :func:`ran_python_code` tells compiled from eager on this interpreter and torch:
    it must miss a compiled canary's body and see an uncompiled one's."""
    import torch

    def canary(x):
        return x + 1

    compiled = torch.compile(canary, backend="eager", dynamic=False)
    x = torch.zeros(2)
    compiled(x)
    return not ran_python_code(canary.__code__, lambda: compiled(x)) \
        and ran_python_code(canary.__code__, lambda: canary(x))


class FallbackWatch:
    """Watches one Flex implementation from before its block mask is built to after it was timed:
    ``watch.reason(call)`` is None when it ran compiled throughout, else why it did not."""

    def __init__(self):
        self._failed_before = _dynamo_failed_frames()

    def reason(self, call) -> str | None:
        from torch.nn.attention.flex_attention import flex_attention

        failed = _dynamo_failed_frames() - self._failed_before
        if failed:
            why = (f"dynamo did not compile {failed} frame(s) during this case and ran them eagerly "
                   "(torch._dynamo.utils.counters['frames'])")
        elif eager_probe_works():
            if not ran_python_code(flex_attention.__code__, call):
                return None
            why = "flex_attention's Python body ran: dynamo executed FlexAttention eagerly"
        elif _FALLBACKS:
            return f"an earlier case fell back to eager ({_FALLBACKS[0]}) and the eager probe " \
                   "does not work on this interpreter, so later cases cannot be cleared"
        else:
            return None
        _FALLBACKS.append(why)
        return why


def recompile_limit_hit(err: BaseException) -> bool:
    """Whether ``err`` is dynamo refusing to recompile (``fail_on_recompile_limit_hit``) rather
    than running eagerly."""
    from torch._dynamo import exc

    hit = getattr(exc, "FailOnRecompileLimitHit", None) or getattr(exc, "FailOnCacheLimitHit", None)
    return hit is not None and isinstance(err, hit)
