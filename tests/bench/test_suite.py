"""Bench suites: cases are plain data; the models suite pairs fp16 with bf16 and stays small."""
import pytest

from tvm_splat.bench.suite import BenchCase, suite
from tvm_splat.formats import parse_pattern


def test_models_suite():
    cases = suite("models")
    assert 25 <= len(cases) <= 35  # about ten minutes of one GPU (benchmarks/README.md)
    assert len({c.name for c in cases}) == len(cases)
    shapes = {(c.pattern, c.seq_len, c.heads, c.kv_heads, c.head_dim, c.batch) for c in cases}
    for shape in shapes:  # every shape in both dtypes
        assert {c.dtype for c in cases if (c.pattern, c.seq_len, c.heads, c.kv_heads, c.head_dim, c.batch) == shape} \
            == {"float16", "bfloat16"}
    mistral = [c for c in cases if c.pattern == "causal_window:4095"]
    assert {c.seq_len for c in mistral} == {8192, 16384, 32768}
    assert all(c.gqa and (c.heads, c.kv_heads, c.head_dim) == (32, 8, 128) for c in mistral)
    for c in cases:
        parse_pattern(c.pattern)


def test_quick_suite_is_unchanged():
    cases = suite("quick")
    assert len(cases) == 13 and all(c.dtype == "float16" and not c.gqa for c in cases)


def test_case_names_and_defaults():
    c = BenchCase("window:4", 64, 8, 16, 2, "bfloat16", kv_heads=2)
    assert c.name == "window:4 n=64 h=8/2 d=16 b=2 bf16" and c.gqa
    d = BenchCase("window:4", 64, 8, 16, 2)
    assert d.kv_heads == 8 and not d.gqa and d.name.endswith("fp16")
    assert BenchCase(**d.as_dict()) == d


@pytest.mark.parametrize("kwargs, message", [
    (dict(kv_heads=3), "kv_heads must divide heads"),
    (dict(kv_heads=0), "kv_heads must divide heads"),
    (dict(dtype="int8"), "bench dtype must be one of"),
])
def test_case_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BenchCase("window:4", 64, 8, 16, 1, **kwargs)


def test_unknown_suite():
    with pytest.raises(ValueError, match="unknown suite 'huge'"):
        suite("huge")
