"""CUDA code generation and compilation for the H100 on this CPU-only machine (nvcc is here)."""
import pytest
import tvm

from tvm_splat.compile import (check_shared_declarations, compile_attention, cuda_source, nvcc_compile, row_module,
                               serialized_kernels)
from tvm_splat.formats import ACSR, GlobalTokens, Window
from tvm_splat.kernels import AttentionSpec

H100 = "nvidia/nvidia-h100"


@pytest.mark.parametrize("variant", ["row", "separate"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_cuda_source_generated_and_compiled(variant, dtype, tmp_path):
    acsr = ACSR.from_pattern(GlobalTokens(2) | Window(8), 100)
    spec = AttentionSpec.from_acsr(acsr, 2, 4, 64, dtype, kv_heads=2)
    lib = tvm.tirx.build(row_module(spec, H100, variant), target=H100)
    src = cuda_source(lib)
    assert src, "no CUDA device module produced"
    names = ["row"] if variant == "row" else ["sddmm", "softmax", "spmm"]
    for name in names:
        assert f"{name}_kernel" in src
    assert "threadIdx.x" in src and "blockIdx.x" in src
    if dtype == "float16":
        assert "half" in src
    assert len(nvcc_compile(src, H100)) > 1000  # nvcc accepts it for the H100
    # a cross-compiled library can be exported here and loaded on the GPU machine
    path = tmp_path / "k.so"
    lib.export_library(str(path))
    assert path.stat().st_size > 0


def test_disk_cache_reuses_library(tmp_path, monkeypatch):
    import tvm_splat.compile as c

    monkeypatch.setenv("TVM_SPLAT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(c, "_LIBRARIES", {})
    acsr = ACSR.from_pattern(Window(2), 10)
    spec = AttentionSpec.from_acsr(acsr, 1, 1, 4, "float32")
    compile_attention(spec, "llvm")
    files = list(tmp_path.glob("*.so"))
    assert len(files) == 1
    monkeypatch.setattr(c, "_LIBRARIES", {})
    mtime = files[0].stat().st_mtime_ns
    compile_attention(spec, "llvm")
    assert files[0].stat().st_mtime_ns == mtime  # loaded, not rebuilt


def test_unsupported_target_is_rejected():
    acsr = ACSR.from_pattern(Window(2), 10)
    spec = AttentionSpec.from_acsr(acsr, 1, 1, 4, "float32")
    with pytest.raises(ValueError, match="unsupported target kind 'opencl'"):
        compile_attention(spec, "opencl")
    with pytest.raises(ValueError, match="invalid target"):
        compile_attention(spec, "not-a-target")


def test_one_dynamic_shared_array_with_two_alignments_is_refused():
    """Function-scope ``extern __shared__`` arrays of one name are one symbol of the module, with
    one alignment (nvcc keeps the first): a kernel asking for more than another kernel's
    declaration of the same name would get less. Distinct names are accepted."""
    kernel = 'extern "C" __global__ void {0}_kernel() {{ extern __shared__ __align__({1}) half {2}[]; }}\n'
    check_shared_declarations(kernel.format("a", 1024, "qkv_smem_ptr") + kernel.format("b", 64, "smem_ptr"))
    check_shared_declarations(kernel.format("a", 64, "smem_ptr") + kernel.format("b", 64, "smem_ptr"))
    with pytest.raises(ValueError, match="'smem_ptr' is declared with alignments 1024 and 64"):
        check_shared_declarations(kernel.format("a", 1024, "smem_ptr") + kernel.format("b", 64, "smem_ptr"))


def test_serialized_kernels_reads_every_remark_that_says_so():
    """ptxas's remarks that serialize the wgmma of a kernel, as its report prints them (C7514 and
    C7520 as ptxas 13 wrote them for drafts of the persistent form; C7515 as for an accumulator
    defined in flight): each names its kernel; the fence it injects (C7519) alone does not."""
    report = "\n".join([
        "ptxas info    : (C7519) warpgroup.arrive is injected in around line 11359 by compiler to allow use of "
        "registers in GMMA in function 'tiled_kernel'",
        "ptxas info    : (C7520) Potential Performance Loss: wgmma.mma_async instructions are serialized due to "
        "program dependence on compiler-inserted WG.AR in divergent path in the function 'tiled_kernel'",
        "ptxas info    : (C7514) Potential Performance Loss: wgmma.mma_async instructions are serialized due to "
        "non wgmma instructions reading accumulator registers of  a wgmma between start and end of the pipeline "
        "stage in the function 'bwd_dkdv_kernel'",
        "ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to "
        "the presence of Extern calls in the function 'fallback_kernel'",
        "ptxas info    : Used 168 registers, used 16 barriers, 1024 bytes smem",
    ])
    assert serialized_kernels(report) == ["bwd_dkdv_kernel", "fallback_kernel", "tiled_kernel"]
    assert serialized_kernels(report.splitlines()[0]) == []
    assert serialized_kernels("ptxas info    : Used 168 registers") == []
