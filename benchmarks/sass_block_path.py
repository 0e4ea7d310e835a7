"""Instructions a thread of the forward kernel issues for one column block, read from its SASS on
a machine without a GPU: the count behind "N instructions a thread a FULL block" in the kernels'
docstrings and commit messages, reproducible before a GPU measures what the change is worth.

    python benchmarks/sass_block_path.py [--pattern P] [--shape B H N D] [--kv-heads KVH] [--dtype D]
        [--knobs JSON] [--require OP>=N ...] [--out OUT.json]

Default: window ±1024, 16 heads, n=32768, d=128, fp16 (the issue's 550 TFLOP/s case) with the
knobs the planner picks for an H100/H200 (the tuning record or the default; ``--knobs``: a JSON
object of :class:`~tvm_splat.schedules.tiled.TiledKnobs` overrides, e.g. ``'{"lazy_rescale":
true}'``). Steps:

1. the plan's ``tiled`` kernel is built for ``nvidia/nvidia-h100`` (sm_90a) as the planner builds
   it, its CUDA source compiled to a cubin by the local ``nvcc`` with the options TVM's own
   builds use (:func:`tvm_splat.compile.compile_cubin`), or with ``--compiler runtime`` by
   the compiler TVM's loader calls on a GPU machine (:func:`runtime_cubin`:
   NVRTC, the ``cuda-bindings`` package; what a user's process runs, where its ptxas may be
   another version than the local ``nvcc``'s);
2. ``cuobjdump -sass`` disassembles it (``cuobjdump`` and ``nvdisasm`` on ``PATH``: the
   ``nvidia-cuda-cuobjdump`` and ``nvidia-cuda-nvdisasm`` wheels hold them, under
   ``nvidia/cu13/bin``);
3. :func:`block_loop` finds the loop over column blocks: the backward branch whose body holds
   the most ``HGMMA`` (wgmma) or ``HMMA`` (mma.sync) instructions;
4. the paths from the loop's head to its backward branch take each conditional branch inside
   the body both ways; a branch out of the body (an mbarrier's retry, a cold path at the
   function's end) is taken as not taken, and a path reaching an ``EXIT`` or an unconditional
   jump out of the body ends there;
5. :func:`fast_path` reports the shortest of those through all of the body's matrix
   instructions (the block's two GEMMs): a FULL block (no mask test), nothing non-finite, every
   wait ready at its first try and, with ``lazy_rescale``, the warp keeping its maxima.
   ``--require OP>=N`` (repeatable) keeps only paths with at least ``N`` instructions of opcode
   ``OP``, e.g. ``--require FMUL>=64`` for a block that rescales O.

Printed and written (``--out``): the path's instruction count, its opcodes by count, the
conditional branches it takes (address: taken or not), how many conditional branches the
loop's paths meet, and for the warp-specialized form how many of its exponentials issue while
the previous block's P V may still run (:func:`exponentials_beside_pv`: the overlap the loop is
written for; ptxas can undo it, ``TiledKnobs.softmax_overlap``). ``--sass FILE`` reads a saved ``cuobjdump -sass`` text instead of building.
"""
import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

TARGET = "nvidia/nvidia-h100"
#: a line of ``cuobjdump -sass``: address, optional predicate guard, opcode and operands
SASS_LINE = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)(.*?)\s*;")
BRANCH_TARGET = re.compile(r"0x([0-9a-f]+)\s*$")
MATRIX_OPS = ("HGMMA", "HMMA")


def parse_sass(text: str, function: str = "tiled_kernel") -> list[tuple[int, bool, str, str]]:
    """``(address, guarded, opcode, operands)`` of each instruction of ``function`` in the text
    ``cuobjdump -sass`` prints (its functions one after the other, each after ``Function :``)."""
    sections = re.split(r"\n\s*Function : ", "\n" + text)
    body = next((s for s in sections[1:] if s.split(None, 1)[0] == function), None)
    if body is None:
        raise ValueError(f"no function {function!r} in the SASS ({len(sections) - 1} functions)")
    out = []
    for line in body.splitlines():
        m = SASS_LINE.match(line)
        if m:
            out.append((int(m.group(1), 16), m.group(2) is not None, m.group(3), m.group(4).strip()))
    return out


def _branch(ins):
    """The target address of a branch instruction, else None."""
    address, guarded, opcode, operands = ins
    if opcode.split(".")[0] != "BRA":
        return None
    m = BRANCH_TARGET.search(operands)
    return int(m.group(1), 16) if m else None


def block_loop(instructions) -> tuple[int, int]:
    """``(head, back)``: indices of the first instruction and of the backward branch of the
    innermost loop that holds matrix instructions: of the conditional backward branches (a
    loop's test; the unconditional ones at a function's end return from its retry paths), the
    one of the shortest body holding an ``HGMMA`` or ``HMMA`` (the persistent form's loop over
    tiles holds the block loop and more)."""
    index = {ins[0]: i for i, ins in enumerate(instructions)}
    best = None
    for i, ins in enumerate(instructions):
        target = _branch(ins)
        if target is None or target >= ins[0] or target not in index or not ins[1]:
            continue
        head = index[target]
        if any(op.split(".")[0] in MATRIX_OPS for _, _, op, _ in instructions[head:i + 1]) \
                and (best is None or i - head < best[1] - best[0]):
            best = (head, i)
    if best is None:
        raise ValueError("no loop holds a matrix instruction (HGMMA or HMMA)")
    return best


def _edges(instructions, i: int, lo: int, hi: int, index: dict):
    """Where a path at instruction ``i`` of the loop body ``[lo, hi]`` (addresses) goes next:
    ``(next index, decision)`` pairs, the decision ``(address, taken)`` for a conditional branch
    inside the body and None otherwise (module docstring, step 4)."""
    address, guarded, opcode, _ = instructions[i]
    if opcode.split(".")[0] == "EXIT" and not guarded:
        return []
    target = _branch(instructions[i])
    if target is None:
        return [(i + 1, None)]
    inside = lo < target <= hi and target > address and target in index
    if not guarded and "DIV" not in opcode and not opcode.endswith(".ANY"):
        return [(index[target], None)] if inside else []  # an unconditional jump
    if not inside:
        return [(i + 1, None)]  # out of the body: taken as not taken
    return [(i + 1, (address, False)), (index[target], (address, True))]


def fast_path(instructions, require=()):
    """The shortest path of the block loop (:func:`block_loop`) from its head to its backward
    branch through all of its matrix instructions, with at least the ``require`` counts
    (``(opcode, n)`` pairs): ``(indices, decisions, conditional branches in the body)``,
    ``decisions`` by address, True where taken. The body's edges all run forward (a branch back
    inside it, an inner loop, is not taken), so one pass in address order finds it: per
    instruction, per state (matrix instructions so far, each required count capped at its
    ``n``), the shortest way there."""
    head, back = block_loop(instructions)
    index = {ins[0]: i for i, ins in enumerate(instructions)}
    lo, hi = instructions[head][0], instructions[back][0]

    def step(state, i):
        op = instructions[i][2].split(".")[0]
        return (state[0] + (op in MATRIX_OPS),) + tuple(min(c + (op == want), n)
                                                        for c, (want, n) in zip(state[1:], require))

    start = step((0,) + (0,) * len(require), head)
    best = {head: {start: (1, None)}}  # index -> state -> (length, (previous index, state, decision))
    branches = 0
    for i in range(head, back + 1):
        states = best.pop(i, None) if i != back else None
        if not states:
            continue
        edges = _edges(instructions, i, lo, hi, index)
        branches += sum(d is not None for _, d in edges) // 2
        for j, decision in edges:
            if not head <= j <= back:
                continue
            for state, (length, _) in states.items():
                after = step(state, j)
                old = best.setdefault(j, {}).get(after)
                if old is None or length + 1 < old[0]:
                    best[j][after] = (length + 1, (i, state, decision))
        best[i] = states  # kept for the way back
    ends = best.get(back, {})
    if not ends:
        raise ValueError("no path reaches the loop's backward branch")
    full = max(state[0] for state in ends)
    done = [(length, state) for state, (length, _) in ends.items()
            if state[0] == full and all(c >= n for c, (_, n) in zip(state[1:], require))]
    if not done:
        raise ValueError(f"no path through the loop's {full} matrix instructions has {dict(require)}")
    _, state = min(done)
    path, decisions, i = [], {}, back
    while True:
        path.append(i)
        _, came = best[i][state]
        if came is None:
            break
        i, state, decision = came
        if decision is not None:
            decisions[decision[0]] = decision[1]
    return path[::-1], decisions, branches


def opcode_counts(instructions, indices) -> Counter:
    return Counter(instructions[i][2].split(".")[0] for i in indices)


def exponentials_beside_pv(instructions, indices) -> int | None:
    """How many exponentials (``MUFU.EX2``) of the path issue while the previous block's P V may
    still run: between the wait for S (``WARPGROUP.DEPBAR.LE gsb0, 0x1``: all but the last
    group done) and the next wait for everything (``gsb0, 0x0``). None on a path without the
    first wait (a loop that does not overlap its GEMMs)."""
    ops = [(instructions[i][2], instructions[i][3]) for i in indices]
    start = next((k for k, (op, args) in enumerate(ops) if op.startswith("WARPGROUP.DEPBAR")
                  and args.replace(" ", "").endswith("gsb0,0x1")), None)
    if start is None:
        return None
    end = next((k for k, (op, args) in enumerate(ops) if k > start and op.startswith("WARPGROUP.DEPBAR")
                and args.replace(" ", "").endswith("gsb0,0x0")), len(ops))
    return sum(op.startswith("MUFU.EX2") for op, _ in ops[start:end])


def _requirement(text):
    m = re.fullmatch(r"([A-Z][A-Z0-9_]*)>=(\d+)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"--require takes OP>=N (an opcode and a count), got {text!r}")
    return m.group(1), int(m.group(2))


def runtime_cubin(source: str, target) -> bytes:
    """CUDA ``source`` compiled as TVM's loader compiles it on a GPU machine: TVM's own
    ``tvm_callback_cuda_compile`` (NVRTC through the ``cuda-bindings`` package by default, or
    ``nvcc`` with ``TVM_CUDA_COMPILE_MODE=nvcc``; TVM's ptxas options either way), for the
    target's architecture. Raises RuntimeError when NVRTC is asked for without
    ``cuda-bindings``."""
    from tvm.support.nvcc import tvm_callback_cuda_compile

    with target:  # the callback reads the architecture off the current target
        return bytes(tvm_callback_cuda_compile(source))


def kernel_sass(pattern: str, shape, kv_heads, dtype: str, overrides: dict, compiler: str = "nvcc") -> tuple[str, str]:
    """``(knobs repr, SASS text)`` of the plan's ``tiled`` kernel (module docstring, steps 1-2)."""
    import dataclasses

    import tvm

    from tvm_splat.compile import compile_cubin
    from tvm_splat.formats import parse_pattern
    from tvm_splat.planner import plan
    from tvm_splat.schedules.targets import arch_specific

    for tool in ("cuobjdump", "nvdisasm") + (("nvcc",) if compiler == "nvcc" else ()):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not on PATH (cuobjdump and nvdisasm: pip download --no-deps "
                             f"nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm, unzip, nvidia/cu13/bin)")
    batch, heads, n, d = shape
    workload = (parse_pattern(pattern), (batch, heads, n, d), (batch, kv_heads or heads, n, d), dtype, None)
    made = plan(*workload, target=TARGET)
    if overrides:
        made = plan(*workload, target=TARGET, knobs=dataclasses.replace(made.knobs, **overrides))
    if made.variant != "tiled" or not made.knobs.use_tensor_cores:
        raise SystemExit(f"the plan is not the warp-level tiled kernel: {made!r}")
    target = arch_specific(made.target) if made.knobs.wgmma else made.target
    source = tvm.tirx.build(made.module(), target=target).imports[0].inspect_source()
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp, "k.cubin")
        cubin.write_bytes(runtime_cubin(source, target) if compiler == "runtime" else compile_cubin(source, target)[0])
        sass = subprocess.run(["cuobjdump", "-sass", str(cubin)], check=True, capture_output=True, text=True).stdout
    return repr(made.knobs), sass


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pattern", default="window:1024")
    parser.add_argument("--shape", type=int, nargs=4, default=(1, 16, 32768, 128), metavar=("B", "H", "N", "D"))
    parser.add_argument("--kv-heads", type=int, default=None)
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    parser.add_argument("--knobs", type=json.loads, default={}, help="TiledKnobs overrides (a JSON object)")
    parser.add_argument("--require", type=_requirement, action="append", default=[])
    parser.add_argument("--compiler", choices=("nvcc", "runtime"), default="nvcc",
                        help="the local nvcc with TVM's options, or TVM's loader's own (NVRTC)")
    parser.add_argument("--sass", type=Path, help="read this cuobjdump -sass text instead of building")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.sass is not None:
        knobs, sass = None, args.sass.read_text()
    else:
        knobs, sass = kernel_sass(args.pattern, args.shape, args.kv_heads, args.dtype, args.knobs, args.compiler)
    instructions = parse_sass(sass)
    path, decisions, branches = fast_path(instructions, args.require)
    counts = opcode_counts(instructions, path)
    beside = exponentials_beside_pv(instructions, path)
    result = {"compiler": None if args.sass else args.compiler, "pattern": args.pattern, "shape": list(args.shape),
              "kv_heads": args.kv_heads, "dtype": args.dtype,
              "knobs": knobs, "require": [f"{op}>={n}" for op, n in args.require], "instructions": len(path),
              "opcodes": dict(counts.most_common()), "branches_in_loop": branches,
              "exponentials_beside_pv": beside,
              "branches": {f"{a:#x}": ("taken" if t else "not taken") for a, t in sorted(decisions.items())}}
    print(f"{len(path)} instructions a thread a block ({branches} conditional branches in the loop): "
          + ", ".join(f"{op} {c}" for op, c in counts.most_common()))
    if beside is not None:
        print(f"{beside} of {counts['MUFU']} MUFU between the wait for S and the wait for the previous P V")
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
