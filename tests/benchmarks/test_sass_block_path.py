"""benchmarks/sass_block_path.py on a hand-written SASS listing (building and disassembling a
kernel needs nvcc and cuobjdump): the block loop found, the fast path through both GEMMs, the
``--require`` filter, and the errors for a listing it cannot read."""
import argparse
import json
import shutil

import pytest

SCRIPT = "benchmarks/sass_block_path.py"

#: a loop at 0x10-0xf0: a wait whose retry sits past the end (0x200, back by an unconditional
#: jump: not a loop), S (HGMMA), a FULL flag skipping the mask (two FSEL), a vote skipping O's
#: rescale (one FMUL), P V either by HGMMA or by an exact path without it, then the loop's test
LISTING = """
\tFunction : merge_kernel
        /*0000*/                   HGMMA.64x64x16.F32 R24, gdesc[UR8], RZ, !UPT ;   /* 0x0 */
        /*0010*/               @!P0 BRA 0x0 ;   /* 0x0 */
\tFunction : tiled_kernel
        /*0000*/                   MOV R1, R2 ;   /* 0x0 */
        /*0010*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [R3+URZ], R4 ;   /* 0x0 */
        /*0020*/               @!P0 BRA 0x200 ;   /* 0x0 */
        /*0030*/                   HGMMA.64x128x16.F32 R24, gdesc[UR8], RZ, !UPT ;   /* 0x0 */
        /*0040*/                   LDG.E.CONSTANT R4, desc[UR14][R4.64] ;   /* 0x0 */
        /*0050*/                   ISETP.NE.AND P0, PT, R4, RZ, PT ;   /* 0x0 */
        /*0060*/                @P0 BRA 0x90 ;   /* 0x0 */
        /*0070*/                   FSEL R5, R5, -INF , P1 ;   /* 0x0 */
        /*0080*/                   FSEL R6, R6, -INF , P2 ;   /* 0x0 */
        /*0090*/                   MUFU.EX2 R5, R5 ;   /* 0x0 */
        /*00a0*/                @P1 BRA 0xc0 ;   /* 0x0 */
        /*00b0*/                   FMUL.FTZ R88, R88, R5 ;   /* 0x0 */
        /*00c0*/                   F2FP.F16.F32.PACK_AB R152, R6, R5 ;   /* 0x0 */
        /*00d0*/                @P2 BRA 0xf0 ;   /* 0x0 */
        /*00e0*/                   HGMMA.64x128x16.F32 R88, R152, gdesc[UR8].tnspB, R88 ;   /* 0x0 */
        /*00f0*/               @!P3 BRA 0x10 ;   /* 0x0 */
        /*0100*/                   EXIT ;   /* 0x0 */
        /*0200*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [R3+URZ], R4 ;   /* 0x0 */
        /*0210*/               @!P0 BRA 0x200 ;   /* 0x0 */
        /*0220*/                   BRA 0x30 ;   /* 0x0 */
"""


def _addresses(instructions, path):
    return [instructions[i][0] for i in path]


def test_the_fast_path_and_the_required_counts(repo_script):
    sbp = repo_script(SCRIPT)
    instructions = sbp.parse_sass(LISTING)
    assert instructions[0] == (0, False, "MOV", "R1, R2") and instructions[2][1:3] == (True, "BRA")
    head, back = sbp.block_loop(instructions)
    assert (instructions[head][0], instructions[back][0]) == (0x10, 0xF0)
    path, decisions, branches = sbp.fast_path(instructions)
    assert _addresses(instructions, path) == [0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x90, 0xA0, 0xC0, 0xD0, 0xE0, 0xF0]
    assert decisions == {0x60: True, 0xA0: True, 0xD0: False} and branches == 3
    assert sbp.opcode_counts(instructions, path)["HGMMA"] == 2
    rescaled, decisions, _ = sbp.fast_path(instructions, [("FMUL", 1)])
    assert 0xB0 in _addresses(instructions, rescaled) and decisions[0xA0] is False
    assert len(rescaled) == len(path) + 1
    masked, decisions, _ = sbp.fast_path(instructions, [("FSEL", 2), ("FMUL", 1)])
    assert len(masked) == len(path) + 3 and decisions == {0x60: False, 0xA0: False, 0xD0: False}
    with pytest.raises(ValueError, match=r"no path through the loop's 2 matrix instructions has \{'FSEL': 3\}"):
        sbp.fast_path(instructions, [("FSEL", 3)])


def test_the_command_line_reads_a_listing_and_refuses_what_it_cannot_read(repo_script, tmp_path):
    sbp = repo_script(SCRIPT)
    listing, out = tmp_path / "k.sass", tmp_path / "k.json"
    listing.write_text(LISTING)
    result = sbp.main(["--sass", str(listing), "--require", "FMUL>=1", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["instructions"] == 13 and result["opcodes"]["HGMMA"] == 2 and result["opcodes"]["FMUL"] == 1
    assert result["branches"] == {"0x60": "taken", "0xa0": "not taken", "0xd0": "not taken"}
    for bad in ("FMUL>1", "fmul>=1", "FMUL>=x"):
        with pytest.raises(argparse.ArgumentTypeError, match="OP>=N"):
            sbp._requirement(bad)
    with pytest.raises(ValueError, match="no function 'tiled_kernel'"):
        sbp.parse_sass(LISTING.replace("tiled_kernel", "other_kernel"))
    no_loop = "\n".join(line for line in LISTING.splitlines() if "/*00f0*/" not in line)
    with pytest.raises(ValueError, match="no loop holds a matrix instruction"):
        sbp.block_loop(sbp.parse_sass(no_loop))


def test_exponentials_beside_the_previous_p_v(repo_script):
    """The exponentials between the wait for S (all but the last wgmma group done) and the wait
    for everything: those that may issue while the previous block's P V runs."""
    sbp = repo_script(SCRIPT)

    def path(*ops):
        return [(16 * i, False, op, args) for i, (op, args) in enumerate(ops)]

    hgmma, mufu = ("HGMMA.64x128x16.F32", "R24, gdesc[UR8], R24, gsb0"), ("MUFU.EX2", "R5, R5")
    wait_s, wait_all = ("WARPGROUP.DEPBAR.LE", "gsb0, 0x1"), ("WARPGROUP.DEPBAR.LE", "gsb0, 0x0")
    hoisted = path(hgmma, hgmma, wait_s, ("FMNMX.FTZ", "R4, R24, R25, !PT"), wait_all, mufu, mufu)
    overlapped = path(hgmma, hgmma, wait_s, mufu, mufu, mufu, ("VOTE.ANY", "P1, P1"), wait_all, mufu)
    assert sbp.exponentials_beside_pv(hoisted, range(len(hoisted))) == 0
    assert sbp.exponentials_beside_pv(overlapped, range(len(overlapped))) == 3
    assert sbp.exponentials_beside_pv(overlapped, [0, 1, 3, 4]) is None  # no wait for S on the path
    no_end = path(wait_s, mufu, mufu)
    assert sbp.exponentials_beside_pv(no_end, range(3)) == 2


@pytest.mark.skipif(not all(shutil.which(t) for t in ("nvcc", "cuobjdump", "nvdisasm")),
                    reason="needs nvcc, cuobjdump and nvdisasm on PATH (the nvidia-cuda-cuobjdump and -nvdisasm wheels)")
def test_softmax_overlap_keeps_the_exponentials_beside_p_v(repo_script, tmp_path):
    """Built and disassembled (where the tools are): the warp-specialized form of a small window
    issues none of its exponentials while the previous block's P V may run (ptxas hoists the
    wait), and all of them with ``softmax_overlap``; both paths hold the block's 16 HGMMA."""
    sbp = repo_script(SCRIPT)
    args = ["--pattern", "window:300", "--shape", "1", "4", "2048", "128"]
    knobs = ['{"br": 128, "bc": 128, "warps": 8, "wgmma": true, "tma": true, "warp_specialized": true}',
             '{"br": 128, "bc": 128, "warps": 8, "wgmma": true, "tma": true, "warp_specialized": true, '
             '"softmax_overlap": true}']
    hoisted, overlapped = (sbp.main([*args, "--knobs", k, "--out", str(tmp_path / f"{i}.json")])
                           for i, k in enumerate(knobs))
    assert hoisted["opcodes"]["HGMMA"] == overlapped["opcodes"]["HGMMA"] == 16
    assert hoisted["exponentials_beside_pv"] == 0
    assert overlapped["exponentials_beside_pv"] == overlapped["opcodes"]["MUFU"] > 0


def test_the_runtime_compiler_needs_cuda_bindings(repo_script, monkeypatch):
    """``--compiler runtime`` compiles as TVM's loader does (NVRTC); without the
    ``cuda-bindings`` package it fails naming it, before anything is disassembled."""
    import importlib.util

    if importlib.util.find_spec("cuda") is not None and importlib.util.find_spec("cuda.bindings") is not None:
        pytest.skip("cuda-bindings is installed: NVRTC would compile")
    sbp = repo_script(SCRIPT)
    monkeypatch.setattr(sbp.shutil, "which", lambda tool: f"/bin/{tool}")  # cuobjdump is not what fails
    with pytest.raises(RuntimeError, match="cuda-bindings"):
        sbp.main(["--compiler", "runtime", "--pattern", "window:300", "--shape", "1", "4", "2048", "128"])
