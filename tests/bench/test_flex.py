"""FlexAttention in the bench: the analytic mask_mod runs compiled and right, and an eager
fallback of dynamo is detected (and, with the bench's settings, prevented). On the CPU, tiny
shapes: each compile of flex_attention costs seconds, so the tests share as few as they can."""
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch.nn.attention.flex_attention")

from tvm_splat.bench import flex as F  # noqa: E402
from tvm_splat.bench import run as R  # noqa: E402
from tvm_splat.bench.inputs import make_inputs, reference_output  # noqa: E402
from tvm_splat.bench.suite import BenchCase  # noqa: E402

CPU = R.RunOptions(device="cpu", max_repeats=3, impl_seconds=0.05)


@pytest.fixture
def fresh_dynamo(monkeypatch):
    """An empty dynamo cache and no fallbacks remembered, before and after."""
    torch._dynamo.reset()
    monkeypatch.setattr(F, "_FALLBACKS", [])
    yield
    torch._dynamo.reset()


def _run_flex(case, name="flex"):
    inputs = make_inputs(case, "cpu")
    return R.run_impl(name, inputs, reference_output(inputs), CPU, flop=1.0, nbytes=1.0)


def test_flex_with_analytic_mask_mod_matches_the_reference(fresh_dynamo):
    """GQA (4 query heads on 2 KV heads through enable_gqa), a union with global tokens, a
    length that is no multiple of Flex's 128-wide blocks."""
    res = _run_flex(BenchCase("global:3+window:9", 200, 4, 16, 1, "float32", kv_heads=2))
    assert "refused" not in res and "error" not in res, res
    assert res["correct"] is True and res["max_abs_err"] < 1e-5
    assert res["throughput_ms"] > 0 and res["first_call_s"] > 0


def test_forced_eager_fallback_is_detected_and_refused(fresh_dynamo):
    """recompile_limit=1 and prevention off: the second shape runs eagerly, as the broken bench
    did after 8 shapes. The bench must refuse that figure (and report the first one)."""
    F.compiled_flex()  # configures dynamo; then undo the prevention for this test
    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=False):
        first = _run_flex(BenchCase("window:8", 128, 2, 16, 1, "float32"))
        second = _run_flex(BenchCase("window:8", 256, 2, 16, 1, "float32"))
        third = _run_flex(BenchCase("window:8", 384, 2, 16, 1, "float32"))
    assert "throughput_ms" in first and "refused" not in first, first
    for res in (second, third):
        assert "throughput_ms" not in res and "ms" not in res, res
        assert "eager" in res["refused"]
        assert res["correct"] is True  # eager Flex computes the right thing, only slowly
    assert "dynamo did not compile 1 frame" in second["refused"]
    # the counters stop moving after the first hit: the third is caught by the eager probe
    assert "Python body ran" in third["refused"]


def test_recompile_limit_hit_is_prevented(fresh_dynamo):
    """With the bench's settings a limit hit raises instead of running eagerly: refused too."""
    F.compiled_flex()
    with torch._dynamo.config.patch(recompile_limit=1):
        assert torch._dynamo.config.fail_on_recompile_limit_hit is True
        first = _run_flex(BenchCase("window:8", 128, 2, 16, 1, "float32"))
        second = _run_flex(BenchCase("window:8", 256, 2, 16, 1, "float32"))
    assert "throughput_ms" in first
    assert "ms" not in second and "recompile limit was hit" in second["refused"], second


def test_configure_dynamo_raises_the_limits():
    settings = F.configure_dynamo()
    assert settings["recompile_limit"] == torch._dynamo.config.recompile_limit == F.RECOMPILE_LIMIT
    assert settings["fail_on_recompile_limit_hit"] is True


def test_flex_refuses_a_mask_without_pattern():
    from tvm_splat.bench.baselines import Skip, flex_attention
    from tvm_splat.formats import ACSR

    inputs = make_inputs(BenchCase("window:2", 16, 1, 8, 1, "float32"), "cpu")
    inputs.pattern, inputs.acsr = None, ACSR.from_mask(inputs.acsr.to_dense()[0])
    with pytest.raises(Skip, match="flex_gather"):
        flex_attention(inputs)


def test_gather_mask_mod_reads_the_mask():
    from torch.nn.attention.flex_attention import create_mask

    mask = torch.rand(3, 20, 20) > 0.5
    built = create_mask(F.gather_mask_mod(mask), 1, 3, 20, 20, device="cpu")
    assert torch.equal(built[0], mask)
    built = create_mask(F.gather_mask_mod(mask[1]), 1, 1, 20, 20, device="cpu")
    assert torch.equal(built[0, 0], mask[1])


def test_eager_probe():
    def body(x):
        return x * 2

    assert F.ran_python_code(body.__code__, lambda: body(1))
    assert not F.ran_python_code(body.__code__, lambda: (lambda x: x)(1))
    assert F.eager_probe_works()
