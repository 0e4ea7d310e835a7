"""SparsifyAttention on a transformers model with a padding mask, compiled for and run on the
GPU, against the same model in PyTorch on the GPU (run on the GPU machine; skipped without a
GPU or without transformers)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
N, LENGTHS = 256, [256, 200, 17]
TOL = {"float32": 1e-4, "bfloat16": 5e-2}


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_padded_mistral_on_cuda_matches_pytorch(impl, dtype):
    import tvm
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    from tvm_splat.relay_passes import SparsifyAttention

    torch.manual_seed(0)
    config = transformers.MistralConfig(hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=512, vocab_size=128,
                                        max_position_embeddings=2 * N, sliding_window=64,
                                        attn_implementation=impl)
    model = transformers.MistralForCausalLM(config).eval().to(getattr(torch, dtype))

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]

    ids = torch.randint(0, 128, (len(LENGTHS), N), generator=torch.Generator().manual_seed(1))
    mask = (torch.arange(N)[None, :] < torch.tensor(LENGTHS)[:, None]).long()
    mod = from_exported_program(torch.export.export(Logits(), (ids, mask)))
    sparsify = SparsifyAttention(target="cuda")
    mod = sparsify(mod)
    assert len(sparsify.report.rewritten) == 2, str(sparsify.report)
    ex = tvm.compile(mod, target="cuda")
    dev = tvm.cuda(0)
    vm = relax.VirtualMachine(ex, dev)
    out = vm["main"](tvm.runtime.tensor(ids.numpy(), dev), tvm.runtime.tensor(mask.numpy(), dev))[0]
    got = torch.from_dlpack(out).float().cpu().numpy()
    with torch.no_grad():
        want = Logits().cuda()(ids.cuda(), mask.cuda()).float().cpu().numpy()
    real = mask.numpy().astype(bool)  # padding positions may differ with eager (see the pass docs)
    np.testing.assert_allclose(got[real], want[real], atol=TOL[dtype], rtol=TOL[dtype])
