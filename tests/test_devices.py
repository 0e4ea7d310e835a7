"""tvm_splat.devices.torch_raw_stream: the current-stream lookup a plan resolves once and calls
before every CUDA launch (the CUDA calls themselves are stood in for here: no GPU)."""
import pytest

torch = pytest.importorskip("torch")


def test_raw_stream_asks_the_dispatcher_for_the_plans_device(monkeypatch):
    from tvm_splat.devices import torch_raw_stream

    asked = []
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda index: asked.append(index) or 1234, raising=False)
    stream = torch_raw_stream(3)
    assert stream() == 1234 and stream() == 1234 and asked == [3, 3]


def test_raw_stream_falls_back_to_the_public_call(monkeypatch):
    from tvm_splat.devices import torch_raw_stream

    class Stream:
        cuda_stream = 99

    monkeypatch.delattr(torch._C, "_cuda_getCurrentRawStream", raising=False)
    asked = []
    monkeypatch.setattr(torch.cuda, "current_stream", lambda index: asked.append(index) or Stream())
    assert torch_raw_stream(1)() == 99 and asked == [1]
