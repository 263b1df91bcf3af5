"""Reading a Triton kernel's global loads and stores in program order, compiled for sm_90 without a GPU.

Spec (:func:`mlakv.testing.sm90.memory_order`): the runs of loads and stores as the machine code lays
them out. Through a destination that may alias a source, the compiler keeps a load written after a
store after it (a second memory round trip per program); written first, every load comes first.
"""

from __future__ import annotations

import pytest
from conftest import compile_in_subprocess

from mlakv.testing.sm90 import memory_order

_KERNEL = """
import triton
import triton.language as tl


@triton.jit
def store_between(dst, a_src, b_src, LOADS_FIRST: tl.constexpr):
    offs = tl.arange(0, 128)
    a = tl.load(a_src + offs)
    if LOADS_FIRST:
        b = tl.load(b_src + offs)
        tl.store(dst + offs, a)
        tl.store(dst + 128 + offs, b)
    else:
        tl.store(dst + offs, a)
        b = tl.load(b_src + offs)
        tl.store(dst + 128 + offs, b)
"""

# Triton reads a kernel's source from its file: the kernel is written to one, then imported.
_SCRIPT = r"""
import importlib.util, json, os, sys, tempfile
from mlakv.testing.sm90 import compile_sm90, memory_order, sass_of

kernel_src, shapes = json.loads(sys.argv[1])
with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "store_between_kernel.py")
    with open(path, "w") as f:
        f.write(kernel_src)
    spec = importlib.util.spec_from_file_location("store_between_kernel", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = []
    for loads_first in shapes:
        k = compile_sm90(mod.store_between, dict(dst="*fp32", a_src="*fp32", b_src="*fp32"), {},
                         dict(LOADS_FIRST=loads_first), num_warps=1)
        sass = sass_of(k)
        out.append(None if sass is None else memory_order(sass))
print(json.dumps(out))
"""


def test_runs_are_counted_in_program_order():
    sass = """
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/              @!P0 LDG.E.64 R8, desc[UR4][R2.64+0x10] ;
        /*0030*/                   STG.E.128 desc[UR4][R6.64], R4 ;
        /*0040*/                   LDGSTS.E [R1], desc[UR4][R2.64] ;
        /*0050*/                   LDG.E R9, desc[UR4][R2.64+0x20] ;
        /*0060*/                   STG.E desc[UR4][R6.64+0x10], R9 ;
    """
    assert memory_order(sass) == [("LDG", 2), ("STG", 1), ("LDG", 1), ("STG", 1)]
    assert memory_order("") == []


def test_a_load_written_after_a_store_stays_after_it_and_loads_first_come_first():
    after_store, first = compile_in_subprocess(_SCRIPT, [_KERNEL, [False, True]])
    if after_store is None:
        pytest.skip("this Triton ships no nvdisasm")
    assert after_store == [["LDG", 1], ["STG", 1], ["LDG", 1], ["STG", 1]]
    assert first == [["LDG", 2], ["STG", 2]]
