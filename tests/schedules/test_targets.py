"""Target normalisation shared by schedules, caches and tuning logs."""
import pytest
import tvm

from tvm_splat.schedules.targets import as_target, target_name


def test_tuning_log_name_is_the_same_for_tag_and_device_target():
    tag = as_target("nvidia/nvidia-h100")
    from_device = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    assert str(tag.attrs["arch"]) == "sm_90a"
    assert target_name(tag) == target_name(from_device) == "cuda-sm_90"
    assert target_name(as_target("llvm")) == "llvm"


def test_unsupported_target_kind_is_rejected():
    with pytest.raises(ValueError, match="unsupported target kind"):
        as_target({"kind": "vulkan"})
