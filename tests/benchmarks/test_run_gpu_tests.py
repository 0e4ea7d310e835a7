"""benchmarks/run_gpu_tests.py on a throwaway test file: ids collected or read from a file, split
over shards, each shard's JUnit totals summed, a failure or a shard past the limit reported in the
exit code."""
SCRIPT = "benchmarks/run_gpu_tests.py"


def _test_file(tmp_path, body):
    path = tmp_path / "cases" / "test_cases.py"
    path.parent.mkdir()
    path.write_text(body)
    return path


def test_shards_run_every_collected_id_and_a_failure_sets_the_exit_code(tmp_path, capsys, monkeypatch, repo_script):
    cases = _test_file(tmp_path, "import pytest\n\n"
                                 "@pytest.mark.parametrize('i', range(5))\n"
                                 "def test_ok(i):\n    assert i >= 0\n\n"
                                 "def test_skipped():\n    pytest.skip('no GPU')\n\n"
                                 "def test_bad():\n    assert 1 == 2\n")
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)  # ids are relative to the working directory (the repository root in use)
    assert repo_script(SCRIPT).main([str(out), "3", str(cases.relative_to(tmp_path))]) == 1
    printed = capsys.readouterr().out
    assert "7 ids, 3 shards" in printed and "7 ran, 1 failed, 1 skipped" in printed
    assert printed.count("FAILED ") == 1 and "FAILED test_bad: assert 1 == 2" in printed  # named in the output
    ids = sorted(line for s in range(3) for line in (out / f"shard{s}.ids").read_text().splitlines())
    assert len(ids) == 7 and len(set(ids)) == 7 and all((out / f"shard{s}.xml").exists() for s in range(3))


def test_ids_from_a_file_and_a_shard_past_the_limit_is_killed(tmp_path, capsys, monkeypatch, repo_script):
    cases = _test_file(tmp_path, "import time\n\n"
                                 "def test_quick():\n    pass\n\n"
                                 "def test_slow():\n    time.sleep(60)\n")
    ids = tmp_path / "ids.txt"
    monkeypatch.chdir(tmp_path)
    relative = cases.relative_to(tmp_path)
    ids.write_text(f"{relative}::test_quick\n{relative}::test_slow\n")
    assert repo_script(SCRIPT).main([str(tmp_path / "out"), "2", "--ids", str(ids), "--limit", "15"]) == 1
    printed = capsys.readouterr().out
    assert "shard 1: killed at the limit" in printed and "shards killed: [1]" in printed
    assert "shard 0: (1, 0, 0)" in printed
