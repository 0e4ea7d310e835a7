"""benchmarks/ncu_regions.py: an ncu source page split into runs of one execution count, with
their share of the warp samples, stall reasons and opcodes."""
import gzip

SCRIPT = "benchmarks/ncu_regions.py"

HEADER = ('"Address","Source","Warp Stall Sampling (All Samples)","Instructions Executed",'
          '"stall_wait","stall_long_sb","stall_long_sb (Not Issued)"')


def _page(rows):
    body = "\n".join(f'"0x{i:04x}","{src}","{samples}","{executed}","{wait}","{long_sb}","0"'
                     for i, (src, samples, executed, wait, long_sb) in enumerate(rows))
    return '"Kernel Name","tiled_kernel",\n' + HEADER + "\n" + body + "\n"


ROWS = [("S2R R0, SR_TID.X", "0", "132", "0", "0"),  # once a block
        ("LDG.E R2, [R4.64]", "1,000", "4,096", "0", "1,000"),  # once a tile
        ("@!P0 BRA 0x0040", "500", "4,096", "100", "400"),
        ("HGMMA.64x128x16.F32 R8, gdesc[UR4], RZ", "2,000", "65,536", "2,000", "0"),  # the loop
        ("MUFU.EX2 R9, R9", "6,500", "65,536", "5,000", "1,500")]


def test_regions_are_runs_of_one_execution_count(repo_script):
    nr = repo_script(SCRIPT)
    rows = nr.read_source(_page(ROWS))
    assert [r["Source"] for r in rows] == [r[0] for r in ROWS]
    found = nr.regions(rows)
    assert [(r["first"], r["last"], r["executed"], r["samples"]) for r in found] == \
        [(0, 0, 132.0, 0.0), (1, 2, 4096.0, 1500.0), (3, 4, 65536.0, 8500.0)]
    assert found[1]["stalls"] == {"wait": 100.0, "long_sb": 1400.0}  # the Not Issued column is not a reason
    assert found[2]["opcodes"] == {"HGMMA": 1, "MUFU": 1} and found[1]["opcodes"]["BRA"] == 1
    assert nr.by_execution_count(found) == [(65536.0, 2, 8500.0), (4096.0, 2, 1500.0), (132.0, 1, 0.0)]


def test_report_prints_shares_of_all_samples(repo_script, tmp_path):
    nr = repo_script(SCRIPT)
    text = nr.report(nr.read_source(_page(ROWS)), min_share=1.0)
    lines = text.splitlines()
    assert lines[0] == "5 instructions, 10000 warp samples"
    assert any(line.startswith("[    3-    4]") and "85.00%" in line and "wait 82%" in line for line in lines)
    assert any(line.startswith("[    1-    2]") and "15.00%" in line for line in lines)
    assert not any(line.startswith("[    0-    0]") for line in lines)  # under min_share and short
    assert lines[-1].startswith("by execution count: 65536 x 2 instr 85.0%; 4096 x 2 instr 15.0%")
    packed = tmp_path / "page.csv.gz"
    packed.write_bytes(gzip.compress(_page(ROWS).encode()))
    assert nr.load(str(packed)) == _page(ROWS)


def test_opcode_skips_predicates_and_modifiers(repo_script):
    nr = repo_script(SCRIPT)
    assert nr.opcode("@!P0 FFMA.FTZ R1, R2, R3, R4") == "FFMA" and nr.opcode("") == ""
    assert nr.number("1,234") == 1234.0 and nr.number("") == 0.0
