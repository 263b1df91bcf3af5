"""The DSA indexer K cache: its page format, the quantizing store and the gather.

Spec: :mod:`mlakv.ops.indexer_reference` (sglang's ``FusedStoreCacheIndexerKernel`` arithmetic,
``x * (1 / scale)``). The reference is checked against an independent oracle written with Python
floats (fp32 rounding through numpy, e4m3 by a nearest-value table) on hand-made edge rows and on
random rows; every kernel path is checked bit for bit against the reference on fresh random inputs,
with poisoned (random-byte) pages so that unwritten or misplaced bytes show.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import (  # noqa: F401
    DEVICE, HAS_CUDA, IS_SM90, assert_pages_equal, requires_cuda, requires_sm90, sm90a_build_env,
)  # fmt: skip

from mlakv.ops.indexer_reference import (
    INDEX_AMAX_FLOOR,
    INDEX_PAGE_BYTES,
    INDEX_SCALE_OFFSET,
    dequantize_index_k,
    gather_index_k_reference,
    index_k_scales,
    quantize_index_k,
    slot_byte_offsets,
    store_index_k_reference,
)
from mlakv.spec.calls import IndexStoreCall

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

SRC_DTYPES = [torch.bfloat16, torch.float16]
RULES = ["fp32", "ue8m0"]


# ---- the independent oracle ---------------------------------------------------------------------
def _e4m3_magnitudes() -> list[float]:
    return torch.arange(0, 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).double().tolist()


_MAGS = _e4m3_magnitudes()


def e4m3_encode(y: float) -> int:
    """Nearest of the 127 finite e4m3 magnitudes, ties to the even code; |y| >= 448 -> 0x7E; sign kept."""
    assert not math.isnan(y)
    a = min(abs(y), 448.0)
    best = min(range(len(_MAGS)), key=lambda c: (abs(_MAGS[c] - a), c % 2))
    return best | (0x80 if math.copysign(1.0, y) < 0 else 0)


def f32(v: float) -> float:
    """Round a Python float to fp32 (RNE; overflow to inf)."""
    with np.errstate(over="ignore"):
        return float(np.float32(v))


def ue8m0_up(s: float) -> float:
    if math.isinf(s) or s == 0:
        return s
    m, e = math.frexp(s)  # s = m * 2^e, 0.5 <= m < 1
    return f32(2.0 ** (e - 1)) if m == 0.5 else f32(2.0**e)


def oracle_row(values: list[float], scale_rule: str = "fp32") -> tuple[list[int], float]:
    """sglang's quantization of one key, in Python floats: (e4m3 bytes, fp32 scale)."""
    finite_or_inf = [abs(v) for v in values if not math.isnan(v)]
    amax = max(finite_or_inf, default=0.0)
    scale = f32(max(INDEX_AMAX_FLOOR, amax) / 448.0)  # a double quotient, rounded once to fp32
    if scale_rule == "ue8m0":
        scale = ue8m0_up(scale)
    inv = f32(1.0 / scale) if scale != 0 else math.inf
    out = []
    for v in values:
        y = f32(v * inv) if not (math.isinf(v) and inv == 0) else math.nan  # fp32 product (exact in double)
        y = 448.0 if math.isnan(y) else max(min(y, 448.0), -448.0)  # fminf then fmaxf: NaN -> +448
        out.append(e4m3_encode(y))
    return out, scale


def random_keys(n: int, dtype: torch.dtype, seed: int = 0, device=DEVICE) -> torch.Tensor:
    """Fresh random keys; each row its own magnitude in [1e-3, 1e3]."""
    g = torch.Generator().manual_seed(seed)
    mag = torch.exp(torch.empty(n, 1).uniform_(math.log(1e-3), math.log(1e3), generator=g))
    return (torch.randn(n, 128, generator=g) * mag).to(dtype).to(device)


def poisoned_pages(num_pages: int, device=DEVICE, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (num_pages, INDEX_PAGE_BYTES), dtype=torch.uint8, generator=g).to(device)


def expected_pages(pages: torch.Tensor, loc: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, keep) -> torch.Tensor:
    """Row by row: the poisoned pages with each kept row's key and scale bytes put at its slot."""
    out = pages.detach().cpu().clone()
    sbytes = scale.cpu().contiguous().view(torch.uint8).view(-1, 4)
    for i, slot in enumerate(loc.cpu().tolist()):
        if keep(slot):
            page, k_off, s_off = slot_byte_offsets(slot)
            out[page, k_off : k_off + 128] = q[i].cpu()
            out[page, s_off : s_off + 4] = sbytes[i]
    return out


def row_values(x: torch.Tensor) -> list[float]:
    return x.float().cpu().tolist()


# ---- the reference against the oracle --------------------------------------------------------------
def test_page_constants():
    assert INDEX_PAGE_BYTES == 8448 and INDEX_SCALE_OFFSET == 8192
    assert slot_byte_offsets(0) == (0, 0, 8192)
    assert slot_byte_offsets(63) == (0, 63 * 128, 8192 + 63 * 4)
    assert slot_byte_offsets(64 * 5 + 7) == (5, 7 * 128, 8192 + 28)
    assert torch.tensor(INDEX_AMAX_FLOOR, dtype=torch.float32).view(torch.int32).item() == 0x38D1B717  # 1e-4f


@pytest.mark.parametrize("dtype", SRC_DTYPES)
@pytest.mark.parametrize("rule", RULES)
def test_random_rows_match_the_oracle(dtype, rule):
    x = random_keys(24, dtype, seed=3, device="cpu")
    q, scale = quantize_index_k(x, rule)
    for i in range(x.shape[0]):
        want_q, want_s = oracle_row(row_values(x[i]), rule)
        assert q[i].tolist() == want_q, f"row {i}"
        assert scale[i].item() == want_s, f"row {i}"


def test_all_zero_key_gets_the_floor_scale_and_zero_bytes():
    x = torch.zeros(2, 128, dtype=torch.bfloat16)
    x[1, ::2] = -0.0
    q, scale = quantize_index_k(x)
    assert scale.tolist() == [f32(INDEX_AMAX_FLOOR / 448.0)] * 2
    assert not q[0].any()
    assert q[1, ::2].eq(0x80).all() and not q[1, 1::2].any()  # -0.0 keeps its sign


def test_largest_value_quantizes_to_448_and_scale_is_amax_over_448():
    x = random_keys(1, torch.bfloat16, seed=5, device="cpu")
    x[0, 17] = 3.0
    x[0, 18] = -3.0
    x = x.clamp(-3, 3)
    q, scale = quantize_index_k(x)
    assert scale.item() == f32(3.0 / 448.0)
    assert q[0, 17].item() == 0x7E and q[0, 18].item() == 0xFE


@pytest.mark.parametrize("dtype,big", [(torch.bfloat16, 3.3895313892515355e38), (torch.float16, 65504.0)])
def test_huge_values(dtype, big):
    """The largest finite source values: the scale stays finite and the products saturate to 448 at most."""
    x = random_keys(1, dtype, seed=6, device="cpu")
    x[0, 0], x[0, 1], x[0, 2] = big, -big, big / 3
    q, scale = quantize_index_k(x)
    want_q, want_s = oracle_row(row_values(x[0]))
    assert math.isfinite(scale.item()) and scale.item() == want_s
    assert q[0].tolist() == want_q
    assert q[0, 0].item() == 0x7E and q[0, 1].item() == 0xFE


def test_product_rounding_up_past_448_saturates():
    """amax * (1 / scale) may round above 448: clip first, so it is 448, never NaN."""
    found = 0
    for a in np.linspace(1.0, 2.0, 4001, dtype=np.float32)[1:]:
        s = f32(float(a) / 448.0)
        if f32(float(a) * f32(1.0 / s)) > 448.0:
            x = torch.zeros(1, 128, dtype=torch.float32)
            x[0, 0] = float(a)
            if x.to(torch.bfloat16).float()[0, 0].item() != float(a):
                continue
            q, _ = quantize_index_k(x.to(torch.bfloat16))
            assert q[0, 0].item() == 0x7E
            found += 1
    assert found, "no bf16 amax whose product rounds above 448 in [1, 2]"


def test_subnormal_inputs_quantize_to_signed_zero():
    x = torch.zeros(1, 128, dtype=torch.bfloat16)
    tiny = torch.tensor([1e-39, -1e-39, 9.2e-41, -9.2e-41], dtype=torch.float32).to(torch.bfloat16)
    assert (tiny.float().abs() < 2.0**-126).all() and (tiny != 0).all()  # bf16 subnormals
    x[0, :4] = tiny
    q, scale = quantize_index_k(x)
    assert q[0, :4].tolist() == [0x00, 0x80, 0x00, 0x80]
    assert scale.item() == f32(INDEX_AMAX_FLOOR / 448.0)
    assert q[0].tolist() == oracle_row(row_values(x[0]))[0]


def test_inf_in_a_key_follows_sglang():
    """amax = inf -> scale inf, 1/scale = 0: finite values become +-0, +-inf becomes NaN -> +448 (0x7E)."""
    x = random_keys(1, torch.bfloat16, seed=7, device="cpu")
    x[0, 10], x[0, 11] = float("inf"), -float("inf")
    q, scale = quantize_index_k(x)
    assert math.isinf(scale.item()) and scale.item() > 0
    assert q[0, 10].item() == 0x7E and q[0, 11].item() == 0x7E
    finite = torch.ones(128, dtype=torch.bool)
    finite[10:12] = False
    signs = torch.where(x[0].float() < 0, 0x80, 0)[finite]
    assert torch.equal(q[0, finite].to(torch.int64), signs)
    assert q[0].tolist() == oracle_row(row_values(x[0]))[0]


def test_nan_is_ignored_by_amax_and_stored_as_448():
    x = random_keys(1, torch.bfloat16, seed=8, device="cpu")
    clean_q, clean_s = quantize_index_k(x)
    x[0, 3] = float("nan")
    x[0, 4] = -float("nan")
    q, scale = quantize_index_k(x)
    amax_rest = torch.cat([x[0, :3], x[0, 5:]]).float().abs().max().item()
    assert scale.item() == f32(max(INDEX_AMAX_FLOOR, amax_rest) / 448.0)
    assert q[0, 3].item() == 0x7E and q[0, 4].item() == 0x7E  # +448 whatever the NaN's sign
    assert q[0].tolist() == oracle_row(row_values(x[0]))[0]


def test_all_nan_key_gets_the_floor_scale():
    x = torch.full((1, 128), float("nan"), dtype=torch.float16)
    q, scale = quantize_index_k(x)
    assert scale.item() == f32(INDEX_AMAX_FLOOR / 448.0) and q.eq(0x7E).all()


def test_multiply_by_reciprocal_is_not_division():
    """x * (1 / scale) and x / scale give other e4m3 bytes for some values: the reference takes the product."""
    x = random_keys(256, torch.bfloat16, seed=9, device="cpu")
    q, scale = quantize_index_k(x)
    xs = x.float()
    by_div = (xs / scale[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
    differ = (by_div != q).nonzero()
    assert differ.shape[0] > 0, "the data does not tell the two roundings apart"
    i, j = differ[0].tolist()
    want_q, _ = oracle_row(row_values(x[i]))
    assert q[i, j].item() == want_q[j] != by_div[i, j].item()


def test_ue8m0_scales_are_powers_of_two_not_below_the_fp32_scale():
    x = random_keys(32, torch.float16, seed=10, device="cpu")
    s32 = index_k_scales(x, "fp32")
    s8 = index_k_scales(x, "ue8m0")
    mant = s8.view(torch.int32) & 0x7FFFFF
    assert not mant.any() and (s8 >= s32).all() and (s8 < 2 * s32).all()


@pytest.mark.parametrize("rule", RULES)
def test_dequantized_error_is_within_half_an_e4m3_step(rule):
    x = random_keys(16, torch.bfloat16, seed=11, device="cpu")
    q, scale = quantize_index_k(x, rule)
    deq = dequantize_index_k(q, scale)
    y = x.float() / scale[:, None]
    ulp = torch.exp2(torch.floor(torch.log2(y.abs().clamp(min=2.0**-6))) - 3)
    assert ((deq - x.float()).abs() <= scale[:, None] * ulp / 2 + x.float().abs() * 2.0**-20).all()


# ---- the reference store and gather -----------------------------------------------------------------
@pytest.mark.parametrize("loc_dtype", [torch.int32, torch.int64])
def test_store_writes_only_the_kept_slots_bytes(loc_dtype):
    pages = poisoned_pages(4, "cpu")
    x = random_keys(9, torch.bfloat16, seed=12, device="cpu")
    loc = torch.tensor([5, -1, 64, 130, 0, 255, -7, 200, 63], dtype=loc_dtype)
    before = pages.clone()
    store_index_k_reference(IndexStoreCall(pages, loc, x, skip_slot=0))
    q, scale = quantize_index_k(x)
    assert torch.equal(pages, expected_pages(before, loc, q, scale, lambda s: s > 0))


def test_store_honours_a_strided_loc_and_strided_keys():
    pages = poisoned_pages(2, "cpu")
    wide = random_keys(6, torch.float16, seed=13, device="cpu")
    keys = torch.zeros(6, 256, dtype=torch.float16)
    keys[:, 64:192] = wide
    x = keys[:, 64:192]
    loc_wide = torch.tensor([3, 99, 70, 99, 1, 99, 127, 99, 40, 99, 2, 99])
    loc = loc_wide[::2]
    before = pages.clone()
    store_index_k_reference(IndexStoreCall(pages, loc, x))
    q, scale = quantize_index_k(wide)
    assert torch.equal(pages, expected_pages(before, loc, q, scale, lambda s: s >= 0))


def test_store_skips_slots_past_the_buffer():
    pages = poisoned_pages(1, "cpu")
    before = pages.clone()
    store_index_k_reference(IndexStoreCall(pages, torch.tensor([64, 1000]), random_keys(2, torch.bfloat16, device="cpu")))
    assert torch.equal(pages, before)


@pytest.mark.parametrize("world,rank", [(2, 0), (2, 1), (3, 2)])
def test_store_dcp_owner_rule(world, rank):
    pages = poisoned_pages(2, "cpu")
    x = random_keys(12, torch.bfloat16, seed=14, device="cpu")
    loc = torch.tensor([0, 1, 2, 3, 4, 5, 190, 191, 127, 128, -1, 66])
    before = pages.clone()
    store_index_k_reference(IndexStoreCall(pages, loc, x, dcp_world_size=world, dcp_rank=rank))
    q, scale = quantize_index_k(x)
    want = before.clone()
    for i, s in enumerate(loc.tolist()):
        if s >= 0 and s % world == rank and s // world < 128:
            page, k_off, s_off = slot_byte_offsets(s // world)
            want[page, k_off : k_off + 128] = q[i]
            want[page, s_off : s_off + 4] = scale[i : i + 1].view(torch.uint8)
    assert torch.equal(pages, want)


def test_gather_reads_keys_and_scales_by_page_table():
    pages = poisoned_pages(6, "cpu")
    table = torch.tensor([[4, 1, -1], [2, 7, 0], [5, 5, 5]])
    lens = torch.tensor([70, 130, 0])
    k, s = gather_index_k_reference(pages, table, lens)
    assert k.dtype == torch.float8_e4m3fn and k.shape == (200, 128) and s.shape == (200,)
    kb = k.view(torch.uint8)
    sb = s.view(torch.uint8).view(200, 4)
    assert torch.equal(kb[0], pages[4, :128]) and torch.equal(sb[0], pages[4, 8192:8196])
    assert torch.equal(kb[69], pages[1, 5 * 128 : 6 * 128]) and torch.equal(sb[69], pages[1, 8192 + 20 : 8192 + 24])
    assert torch.equal(kb[70 + 63], pages[2, 63 * 128 : 64 * 128])
    assert not kb[70 + 64 : 70 + 128].any() and not sb[70 + 64 : 70 + 128].any()  # page 7 is past the buffer
    assert torch.equal(kb[70 + 128], pages[0, :128])


def test_store_then_gather_round_trip():
    pages = poisoned_pages(3, "cpu")
    x = random_keys(100, torch.bfloat16, seed=15, device="cpu")
    slots = torch.cat([torch.arange(128, 192), torch.arange(0, 36)])
    store_index_k_reference(IndexStoreCall(pages, slots, x))
    k, s = gather_index_k_reference(pages, torch.tensor([[2, 0]]), torch.tensor([100]))
    q, scale = quantize_index_k(x)
    assert torch.equal(k.view(torch.uint8), q) and torch.equal(s, scale)


# ---- the kernels against the reference ---------------------------------------------------------------
# Triton runs on CPU tensors under the interpreter (conftest sets TRITON_INTERPRET=1 without a GPU):
# sizes stay small there.
CPU_MAX_N = 7
N_ROWS = [1, 5, 257, 4096] if HAS_CUDA else [1, 5]
LOC_KINDS = ["contiguous", "strided", "offset", "expanded", "reserved_and_past_end"]


def make_loc(kind: str, n: int, num_slots: int, dtype=torch.int64, seed: int = 0) -> torch.Tensor:
    """``n`` slots of one of the layouts a caller may pass, with padding rows (-1) mixed in."""
    g = torch.Generator().manual_seed(seed)
    slots = (torch.randperm(num_slots - 1, generator=g)[:n] + 1).to(dtype)
    slots[::4] = -1
    if kind == "strided":
        wide = torch.full((2 * n,), num_slots + 7, dtype=dtype)  # the gaps lie past the end: must not be read
        wide[::2] = slots
        return wide.to(DEVICE)[::2]
    if kind == "offset":
        wide = torch.full((n + 3,), num_slots + 7, dtype=dtype)
        wide[3:] = slots
        return wide.to(DEVICE)[3:]
    if kind == "expanded":
        return slots[1:2].clamp_min(1).to(DEVICE).expand(n) if n > 1 else slots[:1].clamp_min(1).to(DEVICE)
    if kind == "reserved_and_past_end":
        slots[1::4] = 0
        slots[2::4] = num_slots + 1000
    return slots.to(DEVICE)


def store_via(path: str, pages, loc, keys, *, skip=-1, world=1, rank=0, rule="fp32") -> None:
    """Run one kernel path directly, on arguments the public op would accept."""
    call = IndexStoreCall(pages, loc, keys, skip_slot=skip, dcp_world_size=world, dcp_rank=rank, scale_rule=rule)
    if path == "triton":
        from mlakv.kernels.triton.indexer import launch_store_index_k

        launch_store_index_k(call)
    else:
        from mlakv.kernels.cuda.indexer import indexer_jit_store

        assert indexer_jit_store(call)


KERNEL_PATHS = ["triton"] + (["jit"] if IS_SM90 else [])


def expected_store(pages, loc, keys, *, skip=None, world=1, rank=0, rule="fp32") -> torch.Tensor:
    want = pages.detach().cpu().clone()
    store_index_k_reference(
        IndexStoreCall(want, loc.cpu(), keys.cpu(), -1 if skip is None else skip, world, rank, rule)
    )
    return want


@pytest.mark.parametrize("path", KERNEL_PATHS)
@pytest.mark.parametrize("dtype", SRC_DTYPES)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("n", N_ROWS)
def test_store_is_bit_exact(path, dtype, rule, n):
    num_pages = n // 64 + 2
    pages = poisoned_pages(num_pages, seed=n)
    keys = random_keys(n, dtype, seed=n + 1)
    loc = make_loc("contiguous", n, num_pages * 64, seed=n)
    want = expected_store(pages, loc, keys, rule=rule)
    store_via(path, pages, loc, keys, rule=rule)
    assert_pages_equal(pages, want)


@pytest.mark.parametrize("path", KERNEL_PATHS)
@pytest.mark.parametrize("kind", LOC_KINDS)
@pytest.mark.parametrize("loc_dtype", [torch.int32, torch.int64])
def test_store_loc_layouts_padding_and_skip(path, kind, loc_dtype):
    n = 6 if not HAS_CUDA else 300
    num_pages = n // 64 + 2
    pages = poisoned_pages(num_pages, seed=3)
    keys = random_keys(n, torch.bfloat16, seed=4)
    if kind == "expanded":
        keys = keys[:1].expand(n, 128)  # one slot written n times: every row is the same key
    loc = make_loc(kind, n, num_pages * 64, loc_dtype, seed=5)
    want = expected_store(pages, loc, keys, skip=0)
    store_via(path, pages, loc, keys, skip=0)
    assert_pages_equal(pages, want)


@pytest.mark.parametrize("path", KERNEL_PATHS)
@pytest.mark.parametrize("world,rank", [(2, 1), (4, 3)])
def test_store_dcp_owner_rule_on_kernels(path, world, rank):
    n = 7 if not HAS_CUDA else 500
    pages = poisoned_pages(n // 64 + 2, seed=6)
    keys = random_keys(n, torch.float16, seed=7)
    loc = make_loc("contiguous", n, pages.shape[0] * 64 * world, seed=8)
    want = expected_store(pages, loc, keys, world=world, rank=rank, skip=0)
    store_via(path, pages, loc, keys, world=world, rank=rank, skip=0)
    assert_pages_equal(pages, want)


@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_store_strided_3d_and_offset_sources(path):
    n = 5
    pages = poisoned_pages(2, seed=9)
    wide = random_keys(n, torch.bfloat16, seed=10)
    holder = torch.zeros(n, 1, 384, dtype=torch.bfloat16, device=DEVICE)
    holder[:, 0, 128:256] = wide
    keys = holder[:, :, 128:256]  # [n, 1, 128], row stride 384, storage offset 128
    loc = torch.tensor([3, 70, 1, 127, 64], device=DEVICE)
    want = expected_store(pages, loc, wide)
    store_via(path, pages, loc, keys)
    assert_pages_equal(pages, want)


@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_store_edge_rows(path):
    """Zeros, -0, huge, subnormal, +-inf and NaN keys through the kernel, against the reference."""
    keys = random_keys(6, torch.bfloat16, seed=11)
    keys[0] = 0
    keys[1, ::3] = -0.0
    keys[1, 1::3] = 3.3895313892515355e38
    keys[2, :4] = torch.tensor([1e-39, -1e-39, 9.2e-41, -9.2e-41]).to(torch.bfloat16).to(DEVICE)
    keys[3, 5], keys[3, 6] = float("inf"), -float("inf")
    keys[4, 7], keys[4, 8] = float("nan"), -float("nan")
    keys[5] = float("nan")
    pages = poisoned_pages(1, seed=12)
    loc = torch.tensor([10, 11, 12, 13, 14, 15], device=DEVICE)
    for rule in RULES:
        want = expected_store(pages, loc, keys, rule=rule)
        store_via(path, pages, loc, keys, rule=rule)
        assert_pages_equal(pages, want)


@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_store_skips_slots_past_the_buffer_unchecked(path):
    pages = poisoned_pages(2, seed=13)
    before = pages.clone().cpu()
    loc = torch.tensor([128, 129, 10**9, -5, 2**40], device=DEVICE)
    store_via(path, pages, loc, random_keys(5, torch.bfloat16, seed=14))
    assert_pages_equal(pages, before)


@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_store_page_view_with_a_stride(path):
    """A pages view whose page stride is larger than 8448 bytes (every other page of a buffer)."""
    backing = poisoned_pages(6, seed=15)
    pages = backing.view(3, 2 * INDEX_PAGE_BYTES)[:, :INDEX_PAGE_BYTES]
    before = backing.cpu().clone()
    keys = random_keys(4, torch.float16, seed=16)
    loc = torch.tensor([0, 65, 130, 191], device=DEVICE)
    store_via(path, pages, loc, keys)
    want = before.view(3, 2 * INDEX_PAGE_BYTES).clone()
    store_index_k_reference(IndexStoreCall(want[:, :INDEX_PAGE_BYTES], loc.cpu(), keys.cpu()))
    assert_pages_equal(backing.view(3, -1), want)


def gather_via(path, pages, table, lens, total, max_len):
    if path == "triton":
        from mlakv.kernels.triton.indexer import launch_gather_index_k

        return launch_gather_index_k(pages, table, lens, total, max_len)
    from mlakv.kernels.cuda.indexer import indexer_jit_gather

    out = indexer_jit_gather(pages, table, lens, total, max_len)
    assert out is not None
    return out


@pytest.mark.parametrize("path", KERNEL_PATHS)
@pytest.mark.parametrize("table_dtype", [torch.int32, torch.int64])
def test_gather_is_bit_exact(path, table_dtype):
    pages = poisoned_pages(9, seed=17)
    table = torch.tensor([[4, 1, -1, 3], [2, 70, 0, 8], [5, 5, 5, 5], [6, 7, 8, 0]], dtype=table_dtype)
    lens = torch.tensor([70, 150, 0, 250 if HAS_CUDA else 3], dtype=torch.int32)
    want_k, want_s = gather_index_k_reference(pages.cpu(), table, lens)
    total = int(lens.sum())
    k, s = gather_via(path, pages, table.to(DEVICE), lens.to(DEVICE), total, int(lens.max()))
    assert k.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and k.shape == (total, 128)
    assert torch.equal(k.cpu().view(torch.uint8), want_k.view(torch.uint8))
    assert torch.equal(s.cpu().view(torch.int32), want_s.view(torch.int32))  # poisoned bits, NaNs included


@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_gather_strided_table_and_lens_past_the_table(path):
    pages = poisoned_pages(4, seed=18)
    wide = torch.tensor([[9, 3, 9, 1], [9, 2, 9, 0]], device=DEVICE)
    table = wide[:, 1::2]  # [[3, 1], [2, 0]], column stride 2
    lens_wide = torch.tensor([130, -1, 5, -1], dtype=torch.int64, device=DEVICE)
    lens = lens_wide[::2]  # 130 > 2 pages * 64: tokens 128, 129 have no page -> zeros
    want_k, want_s = gather_index_k_reference(pages.cpu(), table.cpu(), lens.cpu())
    k, s = gather_via(path, pages, table, lens, 135, 130)
    assert torch.equal(k.cpu().view(torch.uint8), want_k.view(torch.uint8))
    assert torch.equal(s.cpu().view(torch.int32), want_s.view(torch.int32))
    assert not k.cpu().view(torch.uint8)[128:130].any()


@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_store_then_gather_round_trip_on_kernels(path):
    pages = poisoned_pages(3, seed=19)
    keys = random_keys(6, torch.bfloat16, seed=20)
    slots = torch.tensor([128, 129, 130, 0, 1, 2], device=DEVICE)
    store_via(path, pages, slots, keys)
    k, s = gather_via(path, pages, torch.tensor([[2, 0]], device=DEVICE), torch.tensor([3], device=DEVICE), 3, 3)
    q, scale = quantize_index_k(keys.cpu())
    assert torch.equal(k.cpu().view(torch.uint8), q[:3]) and torch.equal(s.cpu(), scale[:3])


def rows_where_quotient_differs(count: int) -> torch.Tensor:
    """Random bf16 keys for which e4m3(x / scale) differs from e4m3(x * (1 / scale)) somewhere."""
    x = random_keys(512, torch.bfloat16, seed=21, device="cpu")
    q, scale = quantize_index_k(x)
    by_div = (x.float() / scale[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
    rows = (by_div != q).any(dim=1).nonzero().flatten()[:count]
    assert rows.numel() == count
    return x[rows]


@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_store_takes_the_product_not_the_quotient(path):
    keys = rows_where_quotient_differs(4).to(DEVICE)
    pages = poisoned_pages(1, seed=22)
    loc = torch.tensor([7, 8, 9, 10], device=DEVICE)
    want = expected_store(pages, loc, keys)
    store_via(path, pages, loc, keys)
    assert_pages_equal(pages, want)


# ---- the JIT CUDA module ------------------------------------------------------------------------------
@pytest.mark.jit_build
def test_cuda_module_builds_for_sm90a_without_a_gpu():
    """The .cuh compiles (nvcc, sm_90a) and its module loads with both entry points, here on the CPU."""
    with sm90a_build_env():
        from mlakv.kernels.cuda.indexer import build_indexer_module

        mod = build_indexer_module(True, (9, 0))
    assert callable(mod.store_index_k) and callable(mod.gather_index_k)


def test_store_steps_table_covers_every_size():
    from mlakv.kernels.cuda.indexer import STORE_STEPS, store_steps_for

    assert STORE_STEPS[-1][0] is None
    want = {n: next(steps for bound, steps in STORE_STEPS if bound is None or n <= bound) for n in (1, 4096, 4097, 10**7)}
    assert {n: store_steps_for(n) for n in want} == want
    assert all(store_steps_for(n) in (1, 2, 4) for n in want)


@requires_sm90
@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("num_warps", [1, 8])
@pytest.mark.parametrize("n", [1, 3, 33, 1000])
def test_jit_store_every_launch_shape_is_bit_exact(steps, num_warps, n):
    from mlakv.kernels.cuda.indexer import indexer_jit_store

    pages = poisoned_pages(n // 64 + 2, seed=30)
    keys = random_keys(n, torch.bfloat16, seed=31)
    loc = make_loc("reserved_and_past_end", n, pages.shape[0] * 64, seed=32)
    want = expected_store(pages, loc, keys, skip=0)
    for early in (True, False):
        got = pages.clone()
        assert indexer_jit_store(IndexStoreCall(got, loc, keys, skip_slot=0), steps=steps, num_warps=num_warps, early_trigger=early)
        assert_pages_equal(got, want)


@requires_sm90
def test_jit_store_refuses_misaligned_sources_and_writes_nothing():
    from mlakv.kernels.cuda.indexer import indexer_jit_store

    pages = poisoned_pages(1, seed=33)
    before = pages.clone()
    holder = random_keys(3, torch.bfloat16, seed=34).reshape(-1)[: 2 * 129].view(2, 129)
    assert indexer_jit_store(IndexStoreCall(pages, torch.tensor([1, 2], device=DEVICE), holder[:, 1:])) is False
    assert torch.equal(pages, before)


@requires_sm90
@pytest.mark.parametrize(
    "what",
    ["float loc", "2-D loc", "wrong width", "fp32 keys", "rows differ", "bad page bytes", "misaligned pages", "bad dcp"],
)
def test_jit_launcher_checks_memory_safety_itself(what):
    """The C++ launcher does not trust its caller: each broken fact raises, nothing is written."""
    from mlakv.kernels.cuda.indexer import build_indexer_module

    mod = build_indexer_module(True)
    pages = poisoned_pages(2, seed=35)
    before = pages.clone()
    loc = torch.tensor([1, 2], device=DEVICE)
    keys = random_keys(2, torch.bfloat16, seed=36)
    args = dict(pages=pages, loc=loc, keys=keys, world=1, rank=0)
    if what == "float loc":
        args["loc"] = loc.float()
    elif what == "2-D loc":
        args["loc"] = loc[:, None]
    elif what == "wrong width":
        args["keys"] = torch.zeros(2, 64, dtype=torch.bfloat16, device=DEVICE)
    elif what == "fp32 keys":
        args["keys"] = keys.float()
    elif what == "rows differ":
        args["keys"] = keys[:1]
    elif what == "bad page bytes":
        args["pages"] = pages[:, :8192]
    elif what == "misaligned pages":
        args["pages"] = pages.view(-1)[4 : 4 + INDEX_PAGE_BYTES].view(1, INDEX_PAGE_BYTES)
    else:
        args["world"], args["rank"] = 2, 2
    with pytest.raises((TypeError, ValueError)):
        mod.store_index_k(args["pages"], args["loc"], args["keys"], -1, args["world"], args["rank"], False, 1, 8, True)
    torch.cuda.synchronize()
    assert torch.equal(pages, before)


# ---- the public ops -------------------------------------------------------------------------------------
from mlakv.ops.indexer import get_index_k_buffer, index_k_path, set_index_k_buffer  # noqa: E402


def loop_gather(pages: torch.Tensor, table: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token by token on the CPU (independent of the vectorized reference): bytes ``[total, 128]``, ``[total, 4]``."""
    pages, table = pages.cpu(), table.cpu()
    ks, ss = [], []
    for b, n in enumerate(lens.cpu().tolist()):
        for j in range(max(n, 0)):
            col = j // 64
            page = int(table[b, col]) if col < table.shape[1] else -1
            if 0 <= page < pages.shape[0]:
                page_, k_off, s_off = page, (j % 64) * 128, 8192 + (j % 64) * 4
                ks.append(pages[page_, k_off : k_off + 128])
                ss.append(pages[page_, s_off : s_off + 4])
            else:
                ks.append(torch.zeros(128, dtype=torch.uint8))
                ss.append(torch.zeros(4, dtype=torch.uint8))
    if not ks:
        return torch.zeros(0, 128, dtype=torch.uint8), torch.zeros(0, 4, dtype=torch.uint8)
    return torch.stack(ks), torch.stack(ss)


def test_vectorized_reference_gather_equals_the_token_loop():
    g = torch.Generator().manual_seed(40)
    pages = poisoned_pages(12, "cpu", seed=41)
    table = torch.randint(-2, 14, (5, 4), generator=g)
    lens = torch.tensor([0, 1, 64, 255, -3])
    k, s = gather_index_k_reference(pages, table, lens)
    want_k, want_s = loop_gather(pages, table, lens)
    assert torch.equal(k.view(torch.uint8), want_k) and torch.equal(s.view(torch.uint8).view(-1, 4), want_s)


def test_cpu_path_is_torch_and_equals_the_reference():
    pages = poisoned_pages(3, "cpu", seed=42)
    keys = random_keys(20, torch.bfloat16, seed=43, device="cpu")
    loc = make_loc("reserved_and_past_end", 20, 3 * 64, seed=44).cpu()
    loc = torch.where(loc >= 3 * 64, torch.full_like(loc, -1), loc)  # CPU checks bounds: keep them inside
    assert index_k_path(pages) == "torch"
    want = expected_store(pages, loc, keys, skip=0)
    set_index_k_buffer(pages, loc, keys, reserved_skip_index=0)
    assert_pages_equal(pages, want)


@pytest.mark.parametrize(
    "what,error",
    [
        ("pages not a tensor", TypeError),
        ("pages wrong width", ValueError),
        ("pages int8", TypeError),
        ("pages overlap", ValueError),
        ("pages misaligned", ValueError),
        ("float loc", TypeError),
        ("2-D loc", ValueError),
        ("keys fp32", TypeError),
        ("keys width 64", ValueError),
        ("keys rows differ", ValueError),
        ("keys [n, 2, 128]", ValueError),
        ("keys last dim strided", ValueError),
        ("bad scale rule", ValueError),
        ("bool skip index", TypeError),
        ("dcp rank out of range", ValueError),
    ],
)
def test_store_refuses_bad_arguments_and_writes_nothing(what, error):
    pages = poisoned_pages(2, seed=45)
    before = pages.clone()
    loc = torch.tensor([1, 2], device=DEVICE)
    keys = random_keys(2, torch.bfloat16, seed=46)
    kw: dict = {}
    args = [pages, loc, keys]
    if what == "pages not a tensor":
        args[0] = [1, 2]
    elif what == "pages wrong width":
        args[0] = pages[:, :8000]
    elif what == "pages int8":
        args[0] = pages.view(torch.int8)
    elif what == "pages overlap":
        args[0] = pages[:1].expand(2, INDEX_PAGE_BYTES)
    elif what == "pages misaligned":
        args[0] = pages.view(-1)[4 : 4 + INDEX_PAGE_BYTES].view(1, INDEX_PAGE_BYTES)
    elif what == "float loc":
        args[1] = loc.float()
    elif what == "2-D loc":
        args[1] = loc[:, None]
    elif what == "keys fp32":
        args[2] = keys.float()
    elif what == "keys width 64":
        args[2] = keys[:, :64]
    elif what == "keys rows differ":
        args[2] = keys[:1]
    elif what == "keys [n, 2, 128]":
        args[2] = keys[:, None].expand(2, 2, 128)
    elif what == "keys last dim strided":
        args[2] = torch.zeros(2, 256, dtype=torch.bfloat16, device=DEVICE)[:, ::2]
    elif what == "bad scale rule":
        kw["scale_rule"] = "e8m0"
    elif what == "bool skip index":
        kw["reserved_skip_index"] = True
    else:
        kw.update(dcp_world_size=2, dcp_rank=2)
    with pytest.raises(error):
        set_index_k_buffer(*args, **kw)
    assert torch.equal(pages, before)


def test_store_raises_index_error_before_writing_on_cpu():
    pages = poisoned_pages(1, "cpu", seed=47)
    before = pages.clone()
    with pytest.raises(IndexError, match="loc\\[2\\] = 64"):
        set_index_k_buffer(pages, torch.tensor([1, 2, 64]), random_keys(3, torch.bfloat16, device="cpu"))
    assert torch.equal(pages, before)
    # skipped rows are not checked: padding, the reserved slot, another DCP rank's slot
    set_index_k_buffer(pages, torch.tensor([-1, 65, 3]), random_keys(3, torch.bfloat16, device="cpu"), dcp_world_size=2)


def test_empty_store_does_nothing():
    pages = poisoned_pages(1, seed=48)
    before = pages.clone()
    set_index_k_buffer(pages, torch.zeros(0, dtype=torch.int64, device=DEVICE), torch.zeros(0, 128, dtype=torch.float16, device=DEVICE))
    assert torch.equal(pages, before)


@pytest.mark.parametrize(
    "what,error,match",
    [
        ("negative len", ValueError, "seq_lens\\[1\\] = -1"),
        ("wrong total", ValueError, "total_tokens=5"),
        ("short max len", ValueError, "max_seq_len=3"),
        ("page past buffer", IndexError, "page_table\\[0, 1\\] = 4"),
        ("negative page", IndexError, "page_table\\[0, 0\\] = -1"),
        ("table too narrow", IndexError, "needs 3 pages"),
        ("lens batch differs", ValueError, "batch=1"),
        ("float table", TypeError, "page_table must be int32"),
    ],
)
def test_gather_refuses_bad_values_when_checked(what, error, match):
    pages = poisoned_pages(4, seed=49)
    table = torch.tensor([[0, 1], [2, 3]], device=DEVICE)
    lens = torch.tensor([70, 2], device=DEVICE)
    kw: dict = {"check_bounds": True}
    if what == "negative len":
        lens = torch.tensor([70, -1], device=DEVICE)
    elif what == "wrong total":
        kw.update(total_tokens=5, max_seq_len=70)
    elif what == "short max len":
        kw.update(total_tokens=72, max_seq_len=3)
    elif what == "page past buffer":
        table = torch.tensor([[0, 4], [2, 3]], device=DEVICE)
    elif what == "negative page":
        table = torch.tensor([[-1, 1], [2, 3]], device=DEVICE)
    elif what == "table too narrow":
        lens = torch.tensor([130, 2], device=DEVICE)
    elif what == "lens batch differs":
        lens = lens[:1]
    else:
        table = table.float()
    with pytest.raises(error, match=match):
        get_index_k_buffer(pages, table, lens, **kw)


def test_gather_on_cpu_equals_the_token_loop():
    pages = poisoned_pages(5, "cpu", seed=50)
    table = torch.tensor([[4, 1, 0], [2, 3, 0]], dtype=torch.int32)
    lens = torch.tensor([150, 64], dtype=torch.int32)
    k, s = get_index_k_buffer(pages, table, lens)
    want_k, want_s = loop_gather(pages, table, lens)
    assert torch.equal(k.view(torch.uint8), want_k) and torch.equal(s.view(torch.uint8).view(-1, 4), want_s)


@requires_cuda
def test_gpu_ops_pick_the_dispatched_path_and_are_bit_exact():
    pages = poisoned_pages(40, seed=51)
    keys = random_keys(2000, torch.bfloat16, seed=52)
    loc = make_loc("strided", 2000, 40 * 64, seed=53)
    assert index_k_path(pages) == ("jit" if IS_SM90 else "triton")
    want = expected_store(pages, loc, keys, skip=0)
    set_index_k_buffer(pages, loc, keys, reserved_skip_index=0)
    assert_pages_equal(pages, want)
    table = torch.randperm(40, device=DEVICE)[:36].view(3, 12)
    lens = torch.tensor([700, 1, 768], device=DEVICE)
    k, s = get_index_k_buffer(pages, table, lens, total_tokens=1469, max_seq_len=768)
    want_k, want_s = loop_gather(pages, table, lens)
    assert torch.equal(k.cpu().view(torch.uint8), want_k) and torch.equal(s.cpu().view(torch.uint8).view(-1, 4), want_s)


@requires_cuda
def test_gpu_store_of_misaligned_sources_falls_back_and_is_bit_exact():
    pages = poisoned_pages(2, seed=54)
    holder = random_keys(6, torch.float16, seed=55).reshape(-1)[: 5 * 129].view(5, 129)
    keys = holder[:, 1:]  # rows on 2-byte boundaries: the JIT kernel declines, Triton writes
    loc = torch.tensor([1, 66, 3, 127, 0], device=DEVICE)
    want = expected_store(pages, loc, keys)
    set_index_k_buffer(pages, loc, keys)
    assert_pages_equal(pages, want)


@requires_cuda
def test_gpu_checked_store_raises_before_writing_and_unchecked_skips():
    pages = poisoned_pages(1, seed=56)
    before = pages.clone()
    loc = torch.tensor([5, 64, 7], device=DEVICE)
    keys = random_keys(3, torch.bfloat16, seed=57)
    with pytest.raises(IndexError):
        set_index_k_buffer(pages, loc, keys, check_bounds=True)
    assert torch.equal(pages, before)
    set_index_k_buffer(pages, loc, keys, check_bounds=False)
    assert_pages_equal(pages, expected_store(before, loc, keys))


def test_the_rule_book_the_reference_and_the_format_entry_agree():
    """One format, three readers: spec.formats' ``indexer`` entry, the rule book's constants, the reference's addressing."""
    from mlakv.ops.indexer_reference import INDEX_FORMAT
    from mlakv.spec import formats, rules

    fmt = formats.paged_format("indexer")
    assert fmt is INDEX_FORMAT and fmt.paged and fmt.nope_dim == rules.INDEX_HEAD_DIM
    assert fmt.page_bytes(rules.INDEX_PAGE_TOKENS) == rules.INDEX_PAGE_BYTES == INDEX_PAGE_BYTES
    assert fmt.token_bytes == 132 and fmt.scale_kind == "fp32" and fmt.value_dtype == torch.float8_e4m3fn
    assert fmt.buffer_shape(5 * 64, 64) == (5, INDEX_PAGE_BYTES)
    for slot in (0, 1, 63, 64, 1000, 2**33 + 5):
        page, key, scale = slot_byte_offsets(slot)
        assert (page, key, scale) == (slot // 64, (slot % 64) * 128, 8192 + (slot % 64) * 4)
        assert fmt.slot_offsets(slot, 64) == (page * 8448 + key, page * 8448 + scale)
