"""Reading a Triton kernel's global loads and stores in program order, compiled for sm_90 without a GPU.

Spec (:func:`mlakv.testing.sm90.memory_order`): the runs of loads and stores as the machine code lays
them out. Through a destination that may alias a source, the compiler keeps a load written after a
store after it (a second memory round trip per program); written first, every load comes first.
mlakv's write kernels with one straight path (the row write, plain and converting; the FP8 per_tensor
write; the indexer store; the V4 stores), the plain gather, the FP8 dequantizing gathers, the vLLM
face's paged byte gather (one byte range per slot, or the indexer's key and scale) and HiCache's copy
(rows, and 64 x 1152-byte pages longer than its tile) issue every load before any store at their
tables' launch shapes. The ds_mla write has a general path that loads from memory after stores by
design, so it is not listed.
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


# ---- mlakv's straight-path write kernels: every load before any store ------------------------------
# Each case: a kernel compiled at the launch shapes of its table (num_warps, rows or tokens per program).
# A load written after a store waits for memory a second time per program; these kernels load first.
_WRITES_SCRIPT = r"""
import json, sys
import torch
from mlakv.kernels.triton import fp8, indexer, paged_plan, row_write, transfer, v4_store
from mlakv.spec import tuning
from mlakv.testing.sm90 import compile_sm90, memory_order, sass_of


def row(ty, nope, rope, convert):
    ptrs = dict(kv_ptr="*i16" if convert else ty, loc_ptr="*i64", nope_ptr="*fp32" if convert else ty,
                rope_ptr="*fp32" if convert else ty)
    ints = dict(kv_row_stride=nope + rope, nope_row_stride=nope, rope_row_stride=rope, loc_stride=1, num_slots=5000,
                skip_index=-1, dcp_world=1, dcp_rank=0, n_loc=4096)
    codes = dict(SRC_NOPE=2, SRC_ROPE=2, DST=0, NATIVE_BF16=convert == "native") if convert else dict(
        SRC_NOPE=-1, SRC_ROPE=-1, DST=-1, NATIVE_BF16=False)  # every constexpr
    size = 1 if ty == "*u8" else 2
    for n in (1, 1024, 4096):
        if convert:
            warps, rows, early = tuning.triton_convert_launch(n)
        else:
            warps, rows, early = tuning.triton_row_launch(n, row_write.row_kernel_block(nope, rope) * size)
        consts = dict(NOPE=nope, ROPE=rope, NOPE_P2=1 << (nope - 1).bit_length(), ROPE_P2=1 << (rope - 1).bit_length(),
                      ROWS=rows, USE_PDL=True, EARLY_TRIGGER=early, **codes)
        yield compile_sm90(row_write._set_kv_rows_kernel, ptrs, ints, consts, num_warps=warps)


def per_tensor():
    ptrs = dict(kv_ptr="*u8", loc_ptr="*i64", nope_ptr="*i16", rope_ptr="*i16", scale_ptr="*fp32")
    ints = dict(kv_row_stride=576, loc_stride=1, nope_row_stride=512, rope_row_stride=64, num_slots=5000, skip_slot=-1,
                n_loc=4096)
    for _, warps, rows, place in tuning.FP8_TRITON_STEPS["quant_per_tensor"]:
        consts = dict(NOPE=512, NOPE_P2=512, ROPE=64, ROPE_P2=64, ROWS=rows, SRC_IS_BF16=True, NATIVE=True,
                      USE_PDL=True, TRIGGER=tuning.TRIGGER_PLACES.index(place))
        yield compile_sm90(fp8._quant_per_tensor_kernel, ptrs, ints, consts, num_warps=warps)


def index_store():
    ptrs = dict(pages_ptr="*u8", pages_i32_ptr="*i32", loc_ptr="*i64", src_ptr="*i16")
    ints = dict(n_rows=65536, page_stride=8448, loc_stride=1, src_stride=128, num_slots=65600, skip_slot=-1,
                dcp_world=1, dcp_rank=0)
    for _, warps, rows in tuning.INDEXER_TRITON_STEPS:
        consts = dict(IS_BF16=True, UE8M0=False, HAS_DCP=False, ROWS=rows, USE_PDL=True, NATIVE=True)
        yield compile_sm90(indexer._store_kernel, ptrs, ints, consts, num_warps=warps)


def v4(enc):
    ptrs = dict(pages_ptr="*u8", loc_ptr="*i64", kv_ptr="*i16", cs_ptr="*fp32", pos_ptr="*i64")
    ints = dict(page_stride=33792, num_slots=65600, loc_stride=1, kv_stride=512, cs_stride=64, pos_stride=1,
                max_pos=4096, skip_index=-1, dcp_world=1, dcp_rank=0, n=65536)
    geometry = {0: dict(DATA_STRIDE=576, SCALE_BASE=64 * 576, SCALE_STRIDE=8),
                1: dict(DATA_STRIDE=512, SCALE_BASE=64 * 512, SCALE_STRIDE=16),
                2: dict(DATA_STRIDE=256, SCALE_BASE=64 * 256, SCALE_STRIDE=32)}
    for _, warps, tokens, early in tuning.V4_TRITON_STEPS[enc]:
        consts = dict(ENC=enc, PAGE_SIZE=64, IS_BF16=True, ROPE=0, TOKENS=tokens, NATIVE=True, PACKED=True, PAIRS=True,
                      DCP=False, USE_PDL=True, EARLY_TRIGGER=early, **geometry[enc])
        yield compile_sm90(v4_store._v4_store_kernel, ptrs, ints, consts, int_type="i64", num_warps=warps,
                           enable_fp_fusion=False)


def gather():
    ptrs = dict(kv_ptr="*i16", loc_ptr="*i64", nope_out_ptr="*i16", rope_out_ptr="*i16")
    ints = dict(kv_row_stride=576, loc_stride=1, num_slots=5000, n_loc=4096)
    for _, warps, rows, early in tuning.TRITON_GATHER_STEPS:
        consts = dict(NOPE=512, ROPE=64, NOPE_P2=512, ROPE_P2=64, ROWS=rows, USE_PDL=True, EARLY_TRIGGER=early)
        yield compile_sm90(row_write._get_kv_rows_kernel, ptrs, ints, consts, num_warps=warps)


def fp8_gather(fmt):
    ptrs = dict(kv_ptr="*u8", loc_ptr="*i64", nope_out_ptr="*i16", rope_out_ptr="*i16")
    ints = dict(kv_row_stride=656 if fmt == "ds_mla" else 576, loc_stride=1, num_slots=5000, n_loc=4096,
                nope_out_stride=512, rope_out_stride=64)
    widths = dict(TILES=4, TILES_P2=4, ALIGN4=True) if fmt == "ds_mla" else dict(NOPE=512, NOPE_P2=512)
    if fmt == "per_tensor":
        ptrs["scale_ptr"] = "*fp32"
    kernel = fp8._dequant_ds_mla_kernel if fmt == "ds_mla" else fp8._dequant_per_tensor_kernel
    for _, warps, rows, place in tuning.FP8_TRITON_STEPS[f"dequant_{fmt}"]:
        consts = dict(ROPE=64, ROPE_P2=64, ROWS=rows, DST=0, NATIVE=True, USE_PDL=True,
                      TRIGGER=tuning.TRIGGER_PLACES.index(place), **widths)
        yield compile_sm90(kernel, ptrs, ints, consts, num_warps=warps)


_TRITON_TYPES = {torch.int64: "*i64", torch.int32: "*i32", torch.int16: "*i16", torch.uint8: "*u8"}


def paged_gather(parts):
    # parts: (base, block_stride, slot_stride, unit) in bytes per byte range of a slot, blocks of 64 slots,
    # output rows of the range's unit; the launcher's own word split (_words) gives the constexprs.
    gathered = []
    for base, block_stride, slot_stride, unit in parts:
        src, dst = torch.empty(2 * block_stride, dtype=torch.uint8), torch.empty(64 * unit, dtype=torch.uint8)
        p = paged_plan.GatherPart(src, dst, base, block_stride, slot_stride, unit, unit)
        gathered.append(paged_plan._words(p))
    if len(gathered) == 1:
        gathered.append((gathered[0][0], [0, 0, 0, 0], dict(UNIT=0, HEAD=1, TAIL_P2=0, ALIGN=1)))  # no part B
    (a_views, a_strides, a_consts), (b_views, b_strides, b_consts) = gathered
    ptrs = dict(starts_ptr="*i32", seq_starts_ptr="*i32", table_ptr="*i32", a_src=_TRITON_TYPES[a_views[0].dtype],
                a_dst=_TRITON_TYPES[a_views[1].dtype], b_src=_TRITON_TYPES[b_views[0].dtype],
                b_dst=_TRITON_TYPES[b_views[1].dtype])
    ints = dict(num_reqs=32, total=65536, starts_stride=1, seq_starts_stride=1, table_stride0=1024, table_stride1=1,
                table_cols=1024, block_size=64, num_blocks=4096,
                **dict(zip(("a_base", "a_block_stride", "a_slot_stride", "a_row_stride"), a_strides)),
                **dict(zip(("b_base", "b_block_stride", "b_slot_stride", "b_row_stride"), b_strides)))
    consts = dict(TERMINAL=True, HAS_SEQ_STARTS=False, REQ_CHUNK=paged_plan._req_chunk(32), USE_PDL=True,
                  **{f"A_{k}": v for k, v in a_consts.items()}, **{f"B_{k}": v for k, v in b_consts.items()})
    row_bytes = sum(unit for *_, unit in parts)
    for max_n, _, _ in tuning.PAGED_GATHER_STEPS:
        rows, warps = tuning.paged_gather_launch(max_n or 65536, row_bytes)
        yield compile_sm90(paged_plan._paged_gather_kernel, ptrs, ints, dict(consts, ROWS=rows), num_warps=warps)


def hicache_copy(page):
    # 1152-byte rows (page 1: row units) or 64-row pages of them, device to host, in 8-byte words.
    unit = 144 * page
    ptrs = dict(src_ptr="*i64", dst_ptr="*i64", src_idx_ptr="*i64", dst_idx_ptr="*i64", smid_ptr="*i32")
    ints = dict(n_units=16384, src_idx_stride=1, dst_idx_stride=1, src_limit=1 << 20, dst_limit=1 << 20,
                src_align=page, dst_align=page, src_words=1 << 28, dst_words=1 << 28, src_page=page,
                src_page_stride=unit, src_row_stride=unit if page > 1 else 144, dst_page=page, dst_page_stride=unit,
                dst_row_stride=unit if page > 1 else 144)
    for _, warps, tile in tuning.HICACHE_COPY_STEPS:
        rows, block = transfer.tile_shape(unit, tile)
        consts = dict(UNIT=unit, BLOCK=block, ROWS=rows, RECORD_SMID=False, ALIGN=2)
        yield compile_sm90(transfer._copy_units_kernel, ptrs, ints, consts, num_warps=warps)


CASES = {
    "row bf16 512+64": lambda: row("*i16", 512, 64, False),
    "row u8 656": lambda: row("*u8", 640, 16, False),
    "row converting fp32 -> bf16": lambda: row("*i16", 512, 64, "integer"),
    "row converting fp32 -> bf16, hardware cvt": lambda: row("*i16", 512, 64, "native"),
    "fp8 per_tensor write": per_tensor,
    "indexer store": index_store,
    "v4 store, v4": lambda: v4(0),
    "v4 store, v41": lambda: v4(1),
    "v4 store, v41_fp4": lambda: v4(2),
    "gather bf16 512+64": gather,
    "fp8 per_tensor gather": lambda: fp8_gather("per_tensor"),
    "fp8 ds_mla gather": lambda: fp8_gather("ds_mla"),
    "paged gather 1152-byte rows": lambda: paged_gather([(0, 64 * 1152, 1152, 1152)]),
    "paged gather 656-byte rows": lambda: paged_gather([(0, 64 * 656, 656, 656)]),
    "paged gather 576-byte rows": lambda: paged_gather([(0, 64 * 576, 576, 576)]),
    "paged gather indexer key + scale": lambda: paged_gather([(0, 64 * 132, 128, 128), (64 * 128, 64 * 132, 4, 4)]),
    "hicache copy 1152-byte rows": lambda: hicache_copy(1),
    "hicache copy 64 x 1152-byte pages": lambda: hicache_copy(64),
}
out = {}
for name in json.loads(sys.argv[1]):
    orders = [memory_order(sass_of(k) or "") for k in CASES[name]()]
    out[name] = orders
print(json.dumps([out]))
"""

WRITE_KERNELS = [
    "row bf16 512+64", "row u8 656", "row converting fp32 -> bf16", "row converting fp32 -> bf16, hardware cvt",
    "fp8 per_tensor write", "indexer store",
    "v4 store, v4", "v4 store, v41", "v4 store, v41_fp4", "gather bf16 512+64",
    "fp8 per_tensor gather", "fp8 ds_mla gather",
    "paged gather 1152-byte rows", "paged gather 656-byte rows", "paged gather 576-byte rows",
    "paged gather indexer key + scale", "hicache copy 1152-byte rows", "hicache copy 64 x 1152-byte pages",
]  # fmt: skip


@pytest.fixture(scope="module")
def write_orders() -> dict:
    (orders,) = compile_in_subprocess(_WRITES_SCRIPT, WRITE_KERNELS)
    if any(o == [] for shapes in orders.values() for o in shapes):
        pytest.skip("this Triton ships no nvdisasm")
    return orders


@pytest.mark.parametrize("kernel", WRITE_KERNELS)
def test_a_write_kernel_issues_every_load_before_any_store(write_orders, kernel):
    for order in write_orders[kernel]:
        assert [op for op, _ in order] == ["LDG", "STG"], order
