"""The CUDA source compiles and its module loads for every row layout the tests use.

This runs without a GPU (``TVM_FFI_CUDA_ARCH_LIST=9.0a`` and nvcc), so a broken ``.cuh`` turns CI
red. Where nvcc or tvm-ffi is missing the tests skip, unless ``MLAKV_REQUIRE_JIT_BUILD=1`` (set
by ``.ci/run``) makes that a failure.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import require_jit_toolchain, sm90a_build_env
from mlakv.jit_kernel import JitUnavailable, build_set_mla_kv_buffer_module, can_use_set_mla_kv_buffer

# (nope bytes, rope bytes) of every layout in the test matrix.
LAYOUTS = [
    (1024, 128),  # bf16/fp16 512+64
    (1024, 64),  # 512+32
    (512, 128),  # 256+64
    (256, 128),  # 128+64
    (1056, 128),  # 528+64
    (528, 128),  # uint8 FP8 NSA row
    (528, 64),  # uint8 528+64
    (2048, 256),  # fp32 512+64
    (512, 64),  # fp8 512+64
    (1024, 0),  # bf16 rope-less 512+0
    (528, 0),  # uint8 rope-less 528+0 (16-byte row, 16-byte nope vectors)
]


@pytest.fixture(scope="module")
def built_modules():
    def build(layout):
        try:
            return layout, build_set_mla_kv_buffer_module(*layout, use_pdl=True, device_capability=(9, 0))
        except JitUnavailable as e:
            return layout, e

    with sm90a_build_env(), ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as ex:
        return dict(ex.map(build, LAYOUTS))


@pytest.mark.jit_build
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"{l[0]}+{l[1]}")
def test_module_builds_and_loads(built_modules, layout):
    mod = built_modules[layout]
    assert not isinstance(mod, Exception), f"build failed: {mod}"
    assert callable(mod.set_mla_kv_buffer)


@pytest.mark.parametrize(
    "nope_bytes,rope_bytes",
    [(1026, 128), (1024, 130), (1024, 120), (0, 64), (1024, -4), (1028, 0)],
    ids=["nope-not-4", "rope-not-4", "sum-not-16", "zero-nope", "negative-rope", "ropeless-not-16"],
)
def test_can_use_rejects_unsupported_widths(nope_bytes, rope_bytes):
    assert can_use_set_mla_kv_buffer(nope_bytes, rope_bytes) is False


def test_unsupported_widths_do_not_build():
    with pytest.raises(JitUnavailable, match="multiple of 16"):
        build_set_mla_kv_buffer_module(1024, 120, use_pdl=True, device_capability=(9, 0))


def test_missing_nvcc_is_reported_not_raised_through(monkeypatch):
    """No toolkit: the loader raises JitUnavailable with the reason (the dispatcher then uses Triton)."""
    import mlakv.kernels.cuda.loader as loader

    monkeypatch.setattr(loader, "find_cuda_home", lambda: None)
    monkeypatch.setattr(loader, "_MODULES", {})
    pytest.importorskip("tvm_ffi", reason="apache-tvm-ffi is not installed")
    with pytest.raises(JitUnavailable, match="nvcc not found"):
        loader.load_cuda_module("mlakv_probe_missing_nvcc", "// nothing", device_capability=(9, 0))


@pytest.mark.jit_build
def test_broken_source_fails_with_the_compiler_error(tmp_path, monkeypatch):
    require_jit_toolchain()
    from mlakv.kernels.cuda.loader import load_cuda_module

    monkeypatch.setenv("MLAKV_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TVM_FFI_CUDA_ARCH_LIST", "9.0a")
    with pytest.raises(JitUnavailable, match=r"error.*this_is_not_declared"):
        load_cuda_module("mlakv_probe_broken", "__global__ void k() { this_is_not_declared = 1; }")
    assert any(p.name.startswith("mlakv_mlakv_probe_broken_") for p in tmp_path.iterdir()), "MLAKV_CACHE_DIR ignored"


def test_arch_follows_device_capability_and_env(monkeypatch):
    from mlakv.kernels.cuda.loader import cuda_arch_list

    monkeypatch.delenv("TVM_FFI_CUDA_ARCH_LIST", raising=False)
    assert cuda_arch_list((9, 0)) == "9.0a" and cuda_arch_list((8, 9)) == "8.9" and cuda_arch_list((10, 0)) == "10.0a"
    monkeypatch.setenv("TVM_FFI_CUDA_ARCH_LIST", "9.0")
    assert cuda_arch_list((9, 0)) == "9.0"


@pytest.mark.parametrize(
    "capability,name,key",
    [
        ((9, 0), "NVIDIA H100 80GB HBM3", "hopper"),
        ((9, 0), "NVIDIA H200", "hopper-h200"),
        ((10, 0), "NVIDIA B200", "blackwell"),
        ((8, 0), "NVIDIA A100-SXM4-80GB", "hopper"),  # no row of its own (the JIT path is SM90+ anyway)
    ],
)
def test_tuning_key_picks_a_measured_row(capability, name, key):
    from mlakv.spec.tuning import TUNING, tuning_key

    assert tuning_key(capability, name) == key and key in TUNING


def test_tuning_table_rows_are_well_formed():
    from mlakv.jit_kernel import TUNING, gpu_family

    assert gpu_family((9, 0)) == "hopper" and gpu_family((10, 3)) == "blackwell" and gpu_family((8, 0)) == "pre-hopper"
    for family, row in TUNING.items():
        assert row.steps and row.steps[-1].max_n_loc is None, family
        bounds = [s.max_n_loc for s in row.steps[:-1]]
        assert bounds == sorted(bounds), family
        for n in (0, 1, 767, 768, 769, 10**6):
            warps, items, *_ = row.launch(n)
            assert warps in (1, 2, 4, 8, 16, 32) and items in (1, 2, 4)
        assert row.measured
