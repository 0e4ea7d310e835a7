"""benchmarks/precompile_cases.py: the plan it builds is the one the GPU machine makes (the
persistent form over the SMs where the default is warp-specialized), and it writes the library
into ``$TVM_SPLAT_CACHE_DIR`` (a temporary folder here), reporting the case as built."""
SCRIPT = "benchmarks/precompile_cases.py"


def test_device_plan_is_the_gpu_machines(repo_script):
    script = repo_script(SCRIPT)
    window = script.device_plan(7, "bfloat16", 132)  # window +-1024, d=128: warp-specialized
    assert window.knobs.warp_specialized and window.knobs.persistent == 132
    assert "sm_90a" in str(window.target)
    dilated = script.device_plan(12, "float16", 132)  # dilated +-128 step 4, d=64: not persistent
    assert dilated.knobs.persistent == 0


def test_a_case_is_built_into_the_cache(repo_script, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TVM_SPLAT_CACHE_DIR", str(tmp_path))
    script = repo_script(SCRIPT)
    assert script.main(["12", "--dtype", "float16"]) == 0
    assert "case 12 float16" in capsys.readouterr().out
    assert list(tmp_path.rglob("*.so"))


def test_variants_override_the_knobs_as_the_ab_script_does(repo_script, tmp_path, monkeypatch, capsys):
    """``--variants``: each case once per variant, its knobs overridden (the persistent default
    kept); a variant the knobs refuse (a warp-specialized loop variant on the d=64 TMA form) is
    reported and skipped, not counted as a failure."""
    script = repo_script(SCRIPT)
    plain = script.device_plan(7, "bfloat16", 132, {"early_rescale": False})
    assert plain.knobs.persistent == 132 and not plain.knobs.early_rescale
    assert script.device_plan(7, "bfloat16", 132, {}).knobs.early_rescale
    monkeypatch.setenv("TVM_SPLAT_CACHE_DIR", str(tmp_path))
    assert script.main(["12", "--dtype", "float16", "--variants", '[{}, {"softmax_overlap": true}]']) == 0
    out = capsys.readouterr().out
    assert "refused" in out and "softmax_overlap" in out and ": built" in out
