"""The JIT CUDA kernels wait for memory as few times as their data allows, read from their sm_90a machine code.

Spec (:func:`mlakv.testing.sm90.loads_after_exit`, :func:`~mlakv.testing.sm90.memory_order`):

* a write kernel (the FP8 quantizing writes, the row write's kernels, the V4 stores, the indexer store)
  reads loc, its sources and any scale independently of each other, so it issues every global load
  before any thread may leave on a test: one memory round trip, then the stores. A load the compiler
  sinks below the test of loc into the store path waits a second round trip (nvcc 13 did this to the
  per_tensor write's scale at 128 threads per row, measured 0.90 against Triton's 0.74 us at one row);
* a gather reads loc, then the row it names: every load of the row before any store (a load laid out
  after a store waits for memory again; nvcc 13 did this to the FP8 gather's last chunk per thread);
* the DCP variant of the row write reads a row's sources only when this rank keeps the row, after the
  test of loc by design: the check sees that second round trip (it can fail);
* every kernel launched with programmatic dependent launch issues its first global load after the wait
  for the kernel before it (:func:`~mlakv.testing.sm90.loads_before_wait`): its inputs may be that
  kernel's output. The modules here are built with PDL, so every write and gather has the wait.

The modules are built for sm_90a without a GPU (nvcc, tvm-ffi) and disassembled with the ``cuobjdump``
Triton ships; every kernel variant a module holds is read.
"""

from __future__ import annotations

import importlib
import re

import pytest

from conftest import JIT_BUILD_REQUIRED, sm90a_build_env
from mlakv.testing.sm90 import loads_after_exit, loads_before_wait, memory_order, sass_functions


def test_loads_after_the_first_conditional_exit_are_counted():
    sass = """
        /*0090*/               @P0 EXIT ;
        /*0110*/                   ACQBULK ;
        /*0220*/                   LDG.E.64 R10, desc[UR4][R10.64] ;
        /*02c0*/                   LDG.E.128 R4, desc[UR4][R4.64] ;
        /*0350*/               @P0 EXIT ;
        /*0360*/               @P2 EXIT ;
        /*03e0*/                   LDG.E.CONSTANT R15, desc[UR4][R2.64] ;
        /*09d0*/                   STG.E.64 desc[UR4][R2.64], R4 ;
        /*09e0*/                   EXIT ;
    """
    assert loads_after_exit(sass) == 1  # the exit at entry (before any load) does not count
    assert loads_after_exit(sass.replace("LDG.E.CONSTANT", "FMUL")) == 0
    assert loads_after_exit("") == 0


def test_loads_before_the_pdl_wait_are_counted():
    sass = """
        /*0090*/               @P0 EXIT ;
        /*0110*/                   ACQBULK ;
        /*0220*/                   LDG.E.64 R10, desc[UR4][R10.64] ;
        /*09d0*/                   STG.E.64 desc[UR4][R2.64], R4 ;
    """
    assert loads_before_wait(sass) == 0
    hoisted = sass.replace("ACQBULK ;", "LDG.E.CONSTANT R15, desc[UR4][R2.64] ;\n /*0120*/ ACQBULK ;")
    assert loads_before_wait(hoisted) == 1
    assert loads_before_wait(sass.replace("ACQBULK", "NOP")) is None


# module name -> (module of mlakv.kernels.cuda, its build function, the arguments: sm_90a)
BUILDS = {
    "fp8 per_tensor": ("fp8", "build_mla_fp8_module", ("per_tensor", 512, 64, True, (9, 0))),
    "fp8 ds_mla": ("fp8", "build_mla_fp8_module", ("ds_mla", 512, 64, True, (9, 0))),
    "row bf16 512+64": ("row_write", "build_set_mla_kv_buffer_module", (1024, 128, True, (9, 0))),
    "row u8 528+128": ("row_write", "build_set_mla_kv_buffer_module", (528, 128, True, (9, 0))),
    "v4 store, v4": ("v4_store", "build_v4_store_module", (0, (9, 0))),
    "v4 store, v41": ("v4_store", "build_v4_store_module", (1, (9, 0))),
    "v4 store, v41_fp4": ("v4_store", "build_v4_store_module", (2, (9, 0))),
    "indexer": ("indexer", "build_indexer_module", (True, (9, 0))),
}
MODULES = list(BUILDS)

# The write kernels (mangled-name prefixes) and the gathers of each module.
WRITES = ("_ZN5mlakv3fp818quant_write_kernel", "_ZN5mlakv21set_mla_kv_row_kernel", "_ZN5mlakv24set_mla_kv_buffer_kernel",
          "_ZN5mlakv2v415v4_store_kernel", "_ZN5mlakv7indexer20store_index_k_kernel")  # fmt: skip
GATHERS = ("_ZN5mlakv3fp821dequant_gather_kernel",)
# set_mla_kv_row_kernel<nope bytes, rope bytes, PDL, early trigger, DCP, loc type>: the DCP flag
_ROW_DCP = re.compile(r"set_mla_kv_row_kernelILi\d+ELi\d+ELb[01]ELb[01]ELb([01])E")


@pytest.fixture(scope="module")
def machine_code() -> dict:
    from mlakv.kernels.cuda.loader import JitUnavailable, library_of

    out = {}
    with sm90a_build_env():
        for name, (module, function, args) in BUILDS.items():
            build = getattr(importlib.import_module(f"mlakv.kernels.cuda.{module}"), function)
            try:
                out[name] = sass_functions(library_of(build(*args)))
            except JitUnavailable as e:
                if JIT_BUILD_REQUIRED:
                    pytest.fail(f"{name}: {e}")
                pytest.skip(f"{name}: {e}")
    if any(v is None for v in out.values()):
        pytest.skip("this Triton ships no cuobjdump")
    return out


def _dcp(name: str) -> bool:
    m = _ROW_DCP.search(name)
    return bool(m and m.group(1) == "1")


@pytest.mark.jit_build
@pytest.mark.parametrize("module", MODULES)
def test_a_write_kernel_issues_every_load_before_any_test(machine_code, module):
    kernels = {n: s for n, s in machine_code[module].items() if n.startswith(WRITES) and not _dcp(n)}
    assert kernels, f"no write kernel found in {module}"
    late = {n: loads_after_exit(s) for n, s in kernels.items() if loads_after_exit(s)}
    assert not late, f"loads after a test of loc (name: loads): {late}"


@pytest.mark.jit_build
@pytest.mark.parametrize("module", ["fp8 per_tensor", "fp8 ds_mla"])
def test_a_gather_issues_every_load_of_the_row_before_any_store(machine_code, module):
    kernels = {n: s for n, s in machine_code[module].items() if n.startswith(GATHERS)}
    # 3 output dtypes x 3 threads per row x 2 PDL trigger places x 2 loc types
    assert len(kernels) == 36, sorted(kernels)
    for name, sass in kernels.items():
        assert [op for op, _ in memory_order(sass)] == ["LDG", "STG"], (name, memory_order(sass))


@pytest.mark.jit_build
@pytest.mark.parametrize("module", ["row bf16 512+64", "row u8 528+128"])
def test_the_dcp_row_write_reads_sources_after_the_test_by_design(machine_code, module):
    dcp = {n: s for n, s in machine_code[module].items() if _dcp(n)}
    assert dcp and all(loads_after_exit(s) > 0 for s in dcp.values())


@pytest.mark.jit_build
@pytest.mark.parametrize("module", MODULES)
def test_a_pdl_kernel_reads_nothing_before_its_wait(machine_code, module):
    kernels = {n: s for n, s in machine_code[module].items() if n.startswith(WRITES + GATHERS)}
    assert kernels, f"no write or gather kernel found in {module}"
    order = {n: loads_before_wait(s) for n, s in kernels.items()}
    assert all(v is not None for v in order.values()), f"kernels without a PDL wait: {order}"
    early = {n: v for n, v in order.items() if v}
    assert not early, f"global loads before the PDL wait (name: loads): {early}"
