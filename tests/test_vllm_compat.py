"""vLLM's MLA cache ops on mlakv (``mlakv.compat.vllm``): each op against a plain-torch reference of
vLLM's semantics (written here from vLLM 0.33's ``csrc/cache_kernels.cu``, slot by slot), bit-exact,
on poisoned destinations; padding slots skipped; rows no request owns untouched; bad input refused
with the argument named; the registered ops trace under ``torch.compile`` and pass ``opcheck``.

CPU runs the torch paths; the Triton kernels the adapters route to on the GPU (the row write and the
row copy) run under the interpreter on the adapters' own row views and plans.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from conftest import DEVICE, HAS_TRITON, requires_cuda, write_tar_gz
from mlakv.compat import vllm as V
from mlakv.ops import fp8
from mlakv.spec.calls import TokenSlotPlan

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32


# ---- the reference: vLLM's semantics, written out -------------------------------------------


def u8(t: torch.Tensor) -> torch.Tensor:
    """Bytes of ``t`` (any dtype), on the CPU: compare with ``torch.equal`` for bit-exactness."""
    t = t.detach().cpu().contiguous()
    return t.view(torch.uint8) if t.dim() else t.reshape(1).view(torch.uint8)


def poisoned(shape, dtype, device=DEVICE) -> torch.Tensor:
    """Random bytes (never zeros) in a tensor of ``shape``/``dtype``."""
    n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return torch.randint(1, 256, (n,), dtype=torch.uint8).view(dtype).reshape(shape).to(device)


def e4m3(x: float) -> int:
    """``__nv_cvt_float_to_fp8(x, SATFINITE, E4M3)`` of an fp32 value: RNE, saturate, NaN -> 0x7F."""
    if math.isnan(x):
        return 0x7F
    t = torch.tensor([min(max(x, -448.0), 448.0)], dtype=F32)
    return int(t.to(torch.float8_e4m3fn).view(torch.uint8))


def f32(x: float) -> float:
    return float(torch.tensor(x, dtype=F32))


def div32(a: float, b: float) -> float:
    return float(torch.tensor([a], dtype=F32) / torch.tensor([b], dtype=F32))


def ref_tile_scale(vals: list[float]) -> float:
    """vLLM's fp8_ds_mla tile scale: fmaxf-reduced |x| (NaN dropped), / 448, floor 1e-4f, up to 2^k."""
    amax = 0.0
    for v in vals:
        if not math.isnan(v):
            amax = max(amax, abs(v))
    s = max(div32(amax, 448.0), f32(1e-4))
    if math.isinf(s):
        return s
    m, e = math.frexp(s)  # s = m * 2^e, m in [0.5, 1)
    return s if m == 0.5 else math.ldexp(1.0, e)


def ref_concat(kind: str, kv_c, k_pe, cache, slot_mapping, scale: float) -> torch.Tensor:
    """Expected bytes of ``cache`` ([num_blocks, block_size, entry]) after vLLM's concat_and_cache_mla."""
    out = u8(cache).clone().reshape(cache.shape[0], cache.shape[1], -1)
    bs = cache.shape[1]
    for i, s in enumerate(slot_mapping.tolist()):
        if s < 0:
            continue
        b, o = divmod(s, bs)
        nope, rope = kv_c[i].cpu(), k_pe[i].cpu()
        if kind == "auto":
            row = u8(torch.cat([nope, rope]))
        elif kind == "fp8":
            vals = torch.cat([nope.float(), rope.float()]).tolist()
            row = torch.tensor([e4m3(div32(v, scale)) for v in vals], dtype=torch.uint8)
        else:
            x = nope.float().tolist()
            parts = []
            scales = []
            for t in range(4):
                tile = x[128 * t : 128 * (t + 1)]
                sc = ref_tile_scale(tile)
                scales.append(sc)
                parts.append(torch.tensor([e4m3(div32(v, sc)) for v in tile], dtype=torch.uint8))
            parts.append(u8(torch.tensor(scales, dtype=F32)))
            parts.append(u8(rope) if rope.numel() else torch.zeros(128, dtype=torch.uint8))
            row = torch.cat(parts)
        out[b, o, : row.numel()] = row
    return out


def ref_rows(block_table, starts, num_reqs, total, block_size, seq_starts=None, terminal=True) -> list[tuple[int, int, int]]:
    """``(output row, block, offset)`` of every row a request owns, in vLLM's request layout."""
    st = starts.tolist()
    out = []
    for r in range(num_reqs):
        b = min(st[r], total)
        e = min(st[r + 1] if (terminal or r + 1 < num_reqs) else total, total)
        first = 0 if seq_starts is None else int(seq_starts[r])
        for j in range(max(e - b, 0)):
            p = first + j
            out.append((b + j, int(block_table[r, p // block_size]), p % block_size))
    return out


def e4m3_to_f32(byte: int) -> float:
    return float(torch.tensor([byte], dtype=torch.uint8).view(torch.float8_e4m3fn).float())


def ref_dequant(byte: int, scale: float, dtype) -> torch.Tensor:
    """``scaled_convert<dst, uint8>``: e4m3 -> fp32, times the fp32 scale (one rounding), to ``dtype``."""
    prod = torch.tensor([e4m3_to_f32(byte)], dtype=F32) * torch.tensor([scale], dtype=F32)
    return prod.to(dtype)


# ---- inputs -------------------------------------------------------------------------------------


def sources(n: int, r: int, p: int, dtype, extra: int = 0, device=DEVICE):
    kv_c = torch.randn(n + extra, r, dtype=F32).to(dtype).to(device)
    k_pe = torch.randn(n + extra, p, dtype=F32).to(dtype).to(device)
    return kv_c, k_pe


def slots(n: int, num_slots: int, pad: int = 2) -> torch.Tensor:
    s = random.sample(range(num_slots), n)
    for i in random.sample(range(n), min(pad, n)):
        s[i] = -1
    return torch.tensor(s, dtype=torch.int64, device=DEVICE)


def padded_cache(nb: int, bs: int, entry: int, dtype, pad_slots: int) -> torch.Tensor:
    """A poisoned ``[nb, bs, entry]`` cache whose blocks are ``pad_slots`` slots longer (vLLM's padding)."""
    base = poisoned((nb, bs + pad_slots, entry), dtype)
    return base[:, :bs]


# ---- concat_and_cache_mla -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [BF16, F16, F32])
@pytest.mark.parametrize("pad_slots", [0, 3])
def test_concat_auto_is_a_byte_copy_at_each_slot(dtype, pad_slots):
    random.seed(0)
    torch.manual_seed(0)
    nb, bs, r, p, n = 4, 8, 48, 16, 11
    kv_c, k_pe = sources(n, r, p, dtype, extra=3)  # CUDA-graph padding: only num_tokens rows are written
    cache = padded_cache(nb, bs, r + p, dtype, pad_slots)
    slot = slots(n, nb * bs)
    expected = ref_concat("auto", kv_c, k_pe, cache, slot, 1.0)
    V.concat_and_cache_mla(kv_c, k_pe, cache, slot, "auto", torch.tensor(1.0, device=DEVICE))
    assert torch.equal(u8(cache), expected.reshape(u8(cache).shape))


@pytest.mark.parametrize("dtype", [BF16, F16, F32])
@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "fp8_e4m3"])
def test_concat_fp8_is_value_over_scale_in_e4m3(dtype, kv_cache_dtype):
    random.seed(1)
    torch.manual_seed(1)
    nb, bs, r, p, n = 4, 8, 32, 16, 9
    kv_c, k_pe = sources(n, r, p, dtype)
    kv_c[0, :4] = torch.tensor([1e6, -1e6, 0.0, -0.0], dtype=dtype)  # saturation and signed zero
    cache = poisoned((nb, bs, r + p), torch.uint8)
    slot = slots(n, nb * bs)
    scale = torch.tensor(0.1, dtype=F32, device=DEVICE)
    expected = ref_concat("fp8", kv_c, k_pe, cache, slot, f32(0.1))
    V.concat_and_cache_mla(kv_c, k_pe, cache, slot, kv_cache_dtype, scale)
    assert torch.equal(u8(cache), expected.reshape(u8(cache).shape))


def test_concat_fp8_skip_scale_divides_by_one():
    random.seed(2)
    nb, bs, r, p, n = 2, 8, 32, 8, 5
    kv_c, k_pe = sources(n, r, p, BF16)
    cache = poisoned((nb, bs, r + p), torch.float8_e4m3fn)
    slot = slots(n, nb * bs, pad=1)
    expected = ref_concat("fp8", kv_c, k_pe, cache, slot, 1.0)
    V.concat_and_cache_mla(kv_c, k_pe, cache, slot, "fp8", torch.tensor(7.0, device=DEVICE), skip_scale=True)
    assert torch.equal(u8(cache), expected.reshape(u8(cache).shape))


def _ds_sources(n: int, p: int = 64):
    kv_c, k_pe = sources(n, 512, p, BF16)
    kv_c[0, :128] = torch.zeros(128, dtype=BF16)  # all-zero tile: the 1e-4 floor (2^-13)
    kv_c[0, 128] = 448.0 * 2.0**-5  # a tile whose amax / 448 is a power of two exactly
    kv_c[0, 129:256] = kv_c[0, 129:256].clamp(-1, 1) * 2.0**-9
    kv_c[1, 300] = float("nan")  # NaN is ignored by the amax
    kv_c[2, 400] = float("inf")  # inf sets an infinite scale (vLLM's fmaxf keeps it)
    return kv_c, k_pe


@pytest.mark.parametrize("pe_dim", [64, 0])
def test_concat_ds_mla_matches_vllm_power_of_two_tiles(pe_dim):
    random.seed(3)
    torch.manual_seed(3)
    nb, bs, n = 3, 4, 7
    kv_c, k_pe = _ds_sources(n, pe_dim)
    cache = poisoned((nb, bs, 656), torch.uint8)
    slot = torch.tensor([0, 5, 9, 2, -1, 11, 7], device=DEVICE)  # the special rows (0-2) are written
    expected = ref_concat("ds_mla", kv_c, k_pe, cache, slot, 1.0)
    V.concat_and_cache_mla(kv_c, k_pe, cache, slot, "fp8_ds_mla", torch.tensor(1.0, device=DEVICE))
    got = u8(cache)
    assert torch.equal(got, expected.reshape(got.shape))
    scales = got.reshape(-1, 656)[0, 512:528].view(F32)
    assert scales[0].item() == 2.0**-13 and scales[1].item() == 2.0**-5


def test_pow2_ceil_and_reference_option():
    s = torch.tensor([1e-4, 2.0**-13, 0.75, 1.0, 3.0, 2.0**127 * 1.5, float("inf")], dtype=F32)
    assert fp8.pow2_ceil(s).tolist() == [2.0**-13, 2.0**-13, 1.0, 1.0, 4.0, float("inf"), float("inf")]
    kv_c, k_pe = _ds_sources(3)
    rows = fp8.quantize_mla_rows(kv_c.cpu(), k_pe.cpu(), "ds_mla", ds_mla_scale_rule="ue8m0")
    for i in range(3):
        want = [ref_tile_scale(kv_c[i, 128 * t : 128 * (t + 1)].float().tolist()) for t in range(4)]
        assert rows[i, 512:528].contiguous().view(F32).tolist() == want
    with pytest.raises(ValueError, match="ds_mla_scale_rule"):
        fp8.quantize_mla_rows(kv_c.cpu(), k_pe.cpu(), "ds_mla", ds_mla_scale_rule="pow2")


# ---- the gathers ----------------------------------------------------------------------------


def _requests(seq_lens, nb, max_blocks, seq_starts=None, device=DEVICE):
    b = len(seq_lens)
    cu = torch.zeros(b + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(seq_lens, dtype=torch.int32).cumsum(0)
    table = torch.stack([torch.randperm(nb)[:max_blocks] for _ in range(b)]).to(torch.int32)
    ss = None if seq_starts is None else torch.tensor(seq_starts, dtype=torch.int32, device=device)
    return cu.to(device), table.to(device), ss


@pytest.mark.parametrize("seq_starts", [None, [3, 17, 0]])
@pytest.mark.parametrize("dtype", [BF16, F32])
def test_gather_auto_copies_each_owned_row_and_leaves_the_rest(seq_starts, dtype):
    torch.manual_seed(4)
    nb, bs, entry = 16, 8, 40
    cache = poisoned((nb, bs, entry), dtype)
    cu, table, ss = _requests([5, 0, 13], nb, 5, seq_starts)
    total = int(cu[-1])
    dst = poisoned((total + 4, entry - 8), dtype)  # rows past num_tokens and columns past head_dim exist
    expected = u8(dst).clone().reshape(dst.shape[0], -1)
    es = dtype.itemsize
    for o, b, s in ref_rows(table.cpu(), cu.cpu(), 3, total, bs, ss):
        expected[o] = u8(cache[b, s, : entry - 8])
    V.gather_and_maybe_dequant_cache(cache, dst, table, cu, torch.zeros(1), total, "auto", torch.ones(1), ss)
    assert torch.equal(u8(dst).reshape(dst.shape[0], -1), expected)
    assert es in (2, 4)


@pytest.mark.parametrize("dst_dtype", [BF16, F16, F32])
def test_gather_fp8_dequantizes_times_scale(dst_dtype):
    torch.manual_seed(5)
    nb, bs, entry = 8, 4, 24
    cache = torch.randint(0, 256, (nb, bs, entry), dtype=torch.uint8)
    cache[cache & 0x7F == 0x7F] = 0  # NaN payloads differ (docs/vllm.md); finite bytes here
    cache = cache.to(DEVICE)
    cu, table, ss = _requests([3, 6], nb, 3, [2, 1])
    total = int(cu[-1])
    dst = poisoned((total, entry), dst_dtype)
    scale = torch.tensor([0.37], dtype=F32, device=DEVICE)
    expected = torch.empty(total, entry, dtype=dst_dtype)
    for o, b, s in ref_rows(table.cpu(), cu.cpu(), 2, total, bs, ss):
        for j in range(entry):
            expected[o, j] = ref_dequant(int(cache[b, s, j]), f32(0.37), dst_dtype)
    V.gather_and_maybe_dequant_cache(cache, dst, table, cu, torch.zeros(1), torch.tensor(total), "fp8", scale, ss)
    assert torch.equal(u8(dst), u8(expected))


@pytest.mark.parametrize("seq_starts", [None, [5, 0, 9, 1]])
@pytest.mark.parametrize("dtype,unaligned", [(BF16, False), (BF16, True), (torch.uint8, False), (torch.int32, False)])
def test_cp_gather_cache_copies_bytes(seq_starts, dtype, unaligned):
    torch.manual_seed(6)
    nb, bs, entry = 16, 8, 20
    storage = poisoned((nb, bs, entry + int(unaligned)), dtype)
    cache = storage[..., 1:] if unaligned else storage
    cu, table, ss = _requests([0, 1, 11, 4], nb, 4, seq_starts)
    total = int(cu[-1])
    dst_storage = poisoned((total, entry + int(unaligned)), dtype)
    dst = dst_storage[:, 1:] if unaligned else dst_storage
    expected = u8(dst).clone()
    for o, b, s in ref_rows(table.cpu(), cu.cpu(), 4, total, bs, ss):
        expected[o] = u8(cache[b, s])
    V.cp_gather_cache(cache, dst, table, cu, 4, ss)
    assert torch.equal(u8(dst), expected)


def test_cp_gather_cache_multi_dim_entries():
    torch.manual_seed(7)
    cache = poisoned((6, 4, 2, 8), F16)
    cu, table, _ = _requests([7], 6, 2)
    dst = poisoned((7, 2, 8), F16)
    expected = u8(dst).clone()
    for o, b, s in ref_rows(table.cpu(), cu.cpu(), 1, 7, 4):
        expected[o] = u8(cache[b, s])
    V.cp_gather_cache(cache, dst, table, cu, 1)
    assert torch.equal(u8(dst), expected)


@pytest.mark.parametrize("seq_starts", [None, [2, 0, 6]])
def test_upconvert_ds_mla_rows_to_bf16(seq_starts):
    torch.manual_seed(8)
    random.seed(8)
    nb, bs = 6, 4
    cache = poisoned((nb, bs, 656), torch.uint8)
    kv_c, k_pe = sources(nb * bs, 512, 64, BF16)
    V.concat_and_cache_mla(kv_c, k_pe, cache, torch.arange(nb * bs, device=DEVICE), "fp8_ds_mla", torch.ones(1, device=DEVICE))
    ws = torch.tensor([0, 3, 3], dtype=torch.int32, device=DEVICE)  # request 1 is empty; the last runs to total
    table = torch.stack([torch.randperm(nb)[:4] for _ in range(3)]).to(torch.int32).to(DEVICE)
    ss = None if seq_starts is None else torch.tensor(seq_starts, dtype=torch.int32, device=DEVICE)
    total = 9
    dst = poisoned((total, 576), BF16)
    expected = u8(dst).clone().reshape(total, -1)
    flat = cache.cpu()
    for o, b, s in ref_rows(table.cpu(), ws.cpu(), 3, total, bs, ss, terminal=False):
        row = flat[b, s]
        scales = row[512:528].view(F32).tolist()
        nope = torch.cat([ref_dequant(int(row[j]), scales[j // 128], BF16) for j in range(512)])
        expected[o] = torch.cat([u8(nope), row[528:656]])
    V.cp_gather_and_upconvert_fp8_kv_cache(cache, dst, table, ws, 3, ss)
    assert torch.equal(u8(dst).reshape(total, -1), expected)


# ---- swap_blocks --------------------------------------------------------------------------------


def test_swap_blocks_copies_whole_blocks():
    torch.manual_seed(9)
    src = poisoned((8, 4, 24), BF16, "cpu")
    dst = poisoned((6, 4, 24), BF16, "cpu")
    bsb = src.element_size() * src.stride(0)
    mapping = torch.tensor([[0, 5], [7, 1], [3, 0]], dtype=torch.int64)
    expected = u8(dst).clone().reshape(6, -1)
    for s, d in mapping.tolist():
        expected[d] = u8(src[s]).reshape(-1)
    V.swap_blocks(src, dst, bsb, mapping)
    assert torch.equal(u8(dst).reshape(6, -1), expected)


@requires_cuda
@pytest.mark.parametrize("direction", [("cuda", "cuda"), ("cuda", "cpu"), ("cpu", "cuda")])
def test_swap_blocks_gpu_directions(direction):
    torch.manual_seed(10)

    def make(dev, nb):
        t = poisoned((nb, 16, 656), torch.uint8, dev)
        return t.pin_memory() if dev == "cpu" else t

    src, dst = make(direction[0], 12), make(direction[1], 10)
    mapping = torch.tensor([[11, 0], [2, 9], [5, 4]], dtype=torch.int64)
    expected = dst.cpu().clone()
    for s, d in mapping.tolist():
        expected[d] = src[s].cpu()
    V.swap_blocks(src, dst, src.stride(0), mapping)
    torch.cuda.synchronize()
    assert torch.equal(dst.cpu(), expected)


# ---- the Triton kernels the GPU paths take, on the adapters' own row views (interpreter on CPU) ----


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_row_write_on_the_paged_rows_view():
    from mlakv.kernels.triton.row_write import launch_set_kv_rows

    random.seed(11)
    nb, bs, r, p, n = 3, 4, 16, 8, 6
    kv_c, k_pe = sources(n, r, p, BF16)
    cache = padded_cache(nb, bs, r + p, BF16, 2)
    slot = slots(n, nb * bs)
    expected = ref_concat("auto", kv_c, k_pe, cache, slot, 1.0)
    rows, rpb = V.paged_rows(cache)
    launch_set_kv_rows(rows, V.slot_rows(slot, bs, rpb), kv_c, k_pe)
    assert torch.equal(u8(cache), expected.reshape(u8(cache).shape))


def _fused_case(layout: str, n_reqs: int):
    """A cache, its requests and the parts the fused gather copies, for one ``layout``: ``bf16``
    (80-byte entries in blocks padded by 3 slots), ``u8_unaligned`` (20-byte entries one byte off),
    ``indexer`` (two byte ranges per slot: a 128-byte key and its 4-byte scale, bs 16)."""
    nb, bs = 12, {"indexer": 16}.get(layout, 4)
    seq_lens = [random.choice([0, 1, 3, 7, 12]) for _ in range(n_reqs)]
    cu, table, ss = _requests(seq_lens, nb, 4, [random.randrange(4) for _ in seq_lens])
    total = int(cu[-1]) + 3  # three rows no request owns
    if layout == "indexer":
        cache = poisoned((nb, bs, 132), torch.uint8)
        dsts = [poisoned((total, 128), torch.uint8), poisoned((total, 4), torch.uint8)]
        parts = [V._part(cache, dsts[0], 0, bs * 132, 128, 128), V._part(cache, dsts[1], bs * 128, bs * 132, 4, 4)]
        ranges = [(0, 128, 128), (bs * 128, 4, 4)]  # (base, slot stride, unit) in bytes
    else:
        dtype, entry, off = (BF16, 40, 0) if layout == "bf16" else (torch.uint8, 20, 1)
        storage = poisoned((nb, bs + 3, entry + off), dtype)
        cache = storage[:, :bs, off:]
        dsts = [poisoned((total, entry + off), dtype)[:, off:]]
        es = dtype.itemsize
        parts = [V._part(cache, dsts[0], 0, cache.stride(0) * es, cache.stride(1) * es, entry * es)]
        ranges = [(0, cache.stride(1) * es, entry * es)]
    flat = V._span(cache)
    expected = [u8(d).clone().reshape(total, -1) for d in dsts]
    for o, blk, slot in ref_rows(table.cpu(), cu.cpu(), n_reqs, total, bs, ss.cpu()):
        for want, (base, stride, unit) in zip(expected, ranges):
            at = base + blk * parts[0].block_stride + slot * stride
            want[o] = flat[at : at + unit].cpu()
    plan = TokenSlotPlan(table, cu, n_reqs, total, bs, nb, ss, True)
    return plan, parts, dsts, expected


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("n_reqs", [3, 70])  # 70: more requests than one vector of starts
@pytest.mark.parametrize("layout", ["bf16", "u8_unaligned", "indexer"])
def test_triton_fused_gather_copies_owned_rows_and_leaves_the_rest(layout, n_reqs):
    """The GPU gathers' one launch (plan and byte copy) on the adapters' own parts: every owned row
    byte-equal to the reference, unowned rows (and the padding rows past the requests) untouched."""
    from mlakv.kernels.triton.paged_plan import launch_paged_gather

    random.seed(12)
    torch.manual_seed(12)
    plan, parts, dsts, expected = _fused_case(layout, n_reqs)
    launch_paged_gather(plan, *parts)
    for d, want in zip(dsts, expected):
        assert torch.equal(u8(d).reshape(want.shape), want)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("rows,warps", [(1, 1), (4, 2), (16, 4)])
def test_triton_fused_gather_every_launch_shape(rows, warps):
    """A forced launch shape (the bench's sweep) copies the same bytes as the table's."""
    from mlakv.kernels.triton.paged_plan import launch_paged_gather

    random.seed(21)
    torch.manual_seed(21)
    plan, parts, dsts, expected = _fused_case("bf16", 9)
    launch_paged_gather(plan, *parts, rows_per_program=rows, num_warps=warps)
    assert torch.equal(u8(dsts[0]).reshape(expected[0].shape), expected[0])


def _strided_copy(t: torch.Tensor, *, transposed: bool = False) -> torch.Tensor:
    """The values of ``t`` in a view that is not contiguous: every other element of a wider buffer
    (from its second element: an offset view), or a transposed copy's ``.t()`` for a 2-D table."""
    if transposed:
        return t.t().contiguous().t()
    wide = torch.full((*t.shape[:-1], 2 * t.shape[-1] + 1), -7, dtype=t.dtype, device=t.device)
    wide[..., 1::2] = t
    return wide[..., 1::2]


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("layout", ["bf16", "indexer"])
def test_triton_fused_gather_reads_strided_and_offset_plan_tensors(layout, transposed):
    """The plan's block table (every other column of a wider one, or transposed), request starts and
    sequence starts (every other element, from an offset) read as their values, whatever the strides."""
    from mlakv.kernels.triton.paged_plan import launch_paged_gather

    random.seed(33)
    torch.manual_seed(33)
    plan, parts, dsts, expected = _fused_case(layout, 9)
    plan = plan._replace(
        block_table=_strided_copy(plan.block_table, transposed=transposed),
        starts=_strided_copy(plan.starts),
        seq_starts=None if plan.seq_starts is None else _strided_copy(plan.seq_starts),
    )
    assert not plan.block_table.is_contiguous() and plan.starts.stride(0) == 2
    launch_paged_gather(plan, *parts)
    for d, want in zip(dsts, expected):
        assert torch.equal(u8(d).reshape(want.shape), want)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_plan_rows_of_a_padded_block_layout():
    """``launch_token_slots`` with ``rows_per_block``: the source row of the cache's row view
    (``block * rows_per_block + offset``), -1 where no request owns the row."""
    from mlakv.kernels.triton.paged_plan import launch_token_slots

    torch.manual_seed(22)
    cu, table, ss = _requests([3, 5], 8, 3, [1, 2])
    plan = TokenSlotPlan(table, cu, 2, 10, 4, 8, ss, True)
    want, _ = V.gather_plan(*(t.cpu() if isinstance(t, torch.Tensor) else t for t in plan))
    got = launch_token_slots(plan, rows_per_block=7)
    assert torch.equal(got.cpu(), V.slot_rows(want, 4, 7))


# ---- refusals (on the CPU, where every check runs; unchecked GPU calls skip what is out of range) ----


def _concat_args(**over):
    kv_c, k_pe = sources(4, 32, 16, BF16, device="cpu")
    a = dict(kv_c=kv_c, k_pe=k_pe, kv_cache=torch.zeros(2, 4, 48, dtype=BF16),
             slot_mapping=torch.arange(4), kv_cache_dtype="auto", scale=torch.ones(1))  # fmt: skip
    a.update(over)
    return a


@pytest.mark.parametrize(
    "over,exc,match",
    [
        (dict(kv_cache_dtype="fp8_e5m2"), ValueError, "kv_cache_dtype must be one of"),
        (dict(kv_cache=torch.zeros(2, 4, 50, dtype=BF16)), ValueError, "entry size"),
        (dict(kv_cache=torch.zeros(2, 4, 48, dtype=F16)), TypeError, "kv_cache dtype"),
        (dict(kv_cache=torch.zeros(8, 48, dtype=BF16)), ValueError, "kv_cache must be"),
        (dict(slot_mapping=torch.arange(4.0)), TypeError, "slot_mapping must be int32 or int64"),
        (dict(slot_mapping=torch.arange(5)), ValueError, "kv_c: dim 0 has 4 rows"),
        (dict(slot_mapping=torch.tensor([0, 1, 2, 8])), IndexError, "out of range"),
        (dict(kv_cache=torch.zeros(2, 4, 48, dtype=torch.uint8), kv_cache_dtype="fp8", scale=torch.ones(1, dtype=torch.float64)),
         TypeError, "scale must be a 1-element float32"),
        (dict(kv_cache=torch.zeros(2, 4, 48, dtype=torch.uint8), kv_cache_dtype="fp8_ds_mla"), ValueError, "fp8_ds_mla needs"),
        (dict(kv_c=torch.zeros(4, 64, dtype=BF16)[:, ::2]), ValueError, "kv_c: the last dim must be contiguous"),
    ],
)  # fmt: skip
def test_concat_refuses_bad_input_before_writing(over, exc, match):
    a = _concat_args(**over)
    before = a["kv_cache"].clone()
    with pytest.raises(exc, match=match):
        V.concat_and_cache_mla(**a)
    assert torch.equal(u8(a["kv_cache"]), u8(before))


def test_ds_mla_refuses_fp16_sources():
    kv_c, k_pe = sources(2, 512, 64, F16, device="cpu")
    with pytest.raises(TypeError, match="fp8_ds_mla takes bfloat16"):
        V.concat_and_cache_mla(kv_c, k_pe, torch.zeros(1, 4, 656, dtype=torch.uint8), torch.arange(2), "fp8_ds_mla", torch.ones(1))


def _gather_args(**over):
    cu, table, _ = _requests([3, 2], 4, 2, device="cpu")
    a = dict(src_cache=torch.zeros(4, 4, 8, dtype=BF16), dst=torch.zeros(5, 8, dtype=BF16), block_table=table,
             cu_seq_lens=cu, batch_size=2, seq_starts=None)  # fmt: skip
    a.update(over)
    return a


@pytest.mark.parametrize(
    "over,exc,match",
    [
        (dict(batch_size=3), ValueError, "batch_size=3 must match"),
        (dict(dst=torch.zeros(5, 8, dtype=F16)), TypeError, "must equal dst dtype"),
        (dict(dst=torch.zeros(5, 7, dtype=BF16)), ValueError, "entry size 7"),
        (dict(block_table=torch.zeros(2, 2, dtype=torch.float32)), TypeError, "block_table must be int32"),
        (dict(block_table=torch.tensor([[9, 0], [1, 2]], dtype=torch.int32)), IndexError, r"block_table\[0, 0\] = 9"),
        (dict(block_table=torch.tensor([[0, 9], [1, 2]], dtype=torch.int32), dst=torch.zeros(5, 8, dtype=BF16)), None, None),
        (dict(cu_seq_lens=torch.tensor([0, 3, 2], dtype=torch.int32)), ValueError, "non-decreasing"),
        (dict(seq_starts=torch.tensor([7, 0], dtype=torch.int32)), IndexError, "logical block"),
        (dict(src_cache=torch.zeros(4, 4, 8, dtype=BF16)[:, :, ::2], dst=torch.zeros(5, 4, dtype=BF16)), ValueError, "contiguous"),
    ],
)  # fmt: skip
def test_cp_gather_refuses_bad_input_before_writing(over, exc, match):
    a = _gather_args(**over)
    if exc is None:  # an out-of-range id in a block no request reads is not an error
        V.cp_gather_cache(**a)
        return
    before = a["dst"].clone()
    with pytest.raises(exc, match=match):
        V.cp_gather_cache(**a)
    assert torch.equal(u8(a["dst"]), u8(before))


def test_gather_and_upconvert_refusals():
    cache = torch.zeros(4, 4, 8, dtype=torch.uint8)
    cu, table, _ = _requests([3], 4, 1, device="cpu")
    with pytest.raises(ValueError, match="num_tokens=9 exceeds"):
        V.gather_and_maybe_dequant_cache(cache, torch.zeros(3, 8, dtype=BF16), table, cu, cu, 9, "fp8", torch.ones(1))
    with pytest.raises(ValueError, match="not supported by this op"):
        V.gather_and_maybe_dequant_cache(cache, torch.zeros(3, 8, dtype=BF16), table, cu, cu, 3, "fp8_ds_mla", torch.ones(1))
    with pytest.raises(TypeError, match="must equal dst dtype"):
        V.gather_and_maybe_dequant_cache(cache, torch.zeros(3, 8, dtype=BF16), table, cu, cu, 3, "auto", torch.ones(1))
    with pytest.raises(ValueError, match="656"):
        V.cp_gather_and_upconvert_fp8_kv_cache(cache, torch.zeros(3, 576, dtype=BF16), table, cu[:1], 1)
    ds = torch.zeros(4, 4, 656, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"bfloat16 \[total_tokens, 576\]"):
        V.cp_gather_and_upconvert_fp8_kv_cache(ds, torch.zeros(3, 576, dtype=F16), table, cu[:1], 1)
    with pytest.raises(ValueError, match="must be given together"):
        V.cp_gather_and_upconvert_fp8_kv_cache(ds, torch.zeros(3, 576, dtype=BF16), table, cu[:1], 1, host_cache=ds)


@pytest.mark.parametrize(
    "mapping,bsb,exc,match",
    [
        (torch.tensor([[0, 4]]), 64, IndexError, r"block_mapping\[0, 1\] = 4"),
        (torch.tensor([[-1, 0]]), 64, IndexError, r"block_mapping\[0, 0\] = -1"),
        (torch.tensor([[0, 1], [2, 1]]), 64, ValueError, "appears twice"),
        (torch.tensor([[0, 1]], dtype=torch.int32), 64, TypeError, "int64"),
        (torch.tensor([0, 1]), 64, ValueError, r"\[num_pairs, 2\]"),
        (torch.tensor([[0, 1]]), 0, ValueError, "block_size_in_bytes must be >= 1"),
    ],
)
def test_swap_blocks_refusals(mapping, bsb, exc, match):
    src, dst = torch.zeros(4, 64, dtype=torch.uint8), torch.full((4, 64), 7, dtype=torch.uint8)
    with pytest.raises(exc, match=match):
        V.swap_blocks(src, dst, bsb, mapping)
    assert bool((dst == 7).all())


@requires_cuda
def test_gpu_calls_skip_out_of_range_slots_and_blocks_unchecked():
    random.seed(15)
    nb, bs = 2, 4
    kv_c, k_pe = sources(3, 32, 16, BF16)
    cache = poisoned((nb, bs, 48), BF16)
    before = u8(cache).clone().reshape(nb * bs, -1)
    V.concat_and_cache_mla(kv_c, k_pe, cache, torch.tensor([1, 8, 100], device=DEVICE), "auto", torch.ones(1, device=DEVICE))
    torch.cuda.synchronize()
    after = u8(cache).reshape(nb * bs, -1)
    assert torch.equal(after[1], u8(torch.cat([kv_c[0], k_pe[0]])))
    assert torch.equal(torch.cat([after[:1], after[2:]]), torch.cat([before[:1], before[2:]]))
    table = torch.tensor([[1, 7]], dtype=torch.int32, device=DEVICE)  # block 7 does not exist
    cu = torch.tensor([0, 8], dtype=torch.int32, device=DEVICE)
    dst = poisoned((8, 48), BF16)
    d_before = u8(dst).clone()
    V.cp_gather_cache(cache, dst, table, cu, 1)
    torch.cuda.synchronize()
    got = u8(dst)
    assert torch.equal(got[:4], u8(cache[1])) and torch.equal(got[4:], d_before[4:])


# ---- the registered ops -------------------------------------------------------------------------


def test_ops_pass_opcheck():
    kv_c, k_pe = sources(4, 32, 16, BF16)
    cache = torch.zeros(2, 4, 48, dtype=BF16, device=DEVICE)
    args = (kv_c, k_pe, cache, torch.tensor([0, -1, 5, 2], device=DEVICE), "auto", torch.ones(1, device=DEVICE))
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.mlakv_vllm.concat_and_cache_mla, args, test_utils=utils)
    cu, table, _ = _requests([3, 2], 2, 2)
    torch.library.opcheck(
        torch.ops.mlakv_vllm.cp_gather_cache, (cache, torch.zeros(5, 48, dtype=BF16, device=DEVICE), table, cu, 2, None),
        test_utils=utils,
    )  # fmt: skip


def test_ops_trace_under_torch_compile():
    kv_c, k_pe = sources(4, 32, 16, BF16)
    cache = torch.zeros(2, 4, 48, dtype=BF16, device=DEVICE)
    slot = torch.tensor([0, -1, 5, 2], device=DEVICE)
    cu, table, _ = _requests([4], 2, 2)
    out = torch.zeros(4, 48, dtype=BF16, device=DEVICE)

    def step(kv_c, k_pe, cache, slot, out):
        V.concat_and_cache_mla(kv_c, k_pe, cache, slot, "auto", torch.ones(1, device=DEVICE))
        V.cp_gather_cache(cache, out, table, cu, 1)
        return out * 2

    got = torch.compile(step, backend="aot_eager", fullgraph=True)(kv_c, k_pe, cache, slot, out)
    assert torch.equal(u8(got), u8(out * 2))
    assert torch.equal(u8(cache.reshape(8, 48)[5]), u8(torch.cat([kv_c[2], k_pe[2]])))


def test_register_ops_under_another_namespace():
    ns = V.register_ops("mlakv_vllm_test_ns")
    assert V.register_ops("mlakv_vllm_test_ns") is ns
    src, dst = torch.arange(8, dtype=torch.uint8).reshape(2, 4), torch.zeros(2, 4, dtype=torch.uint8)
    ns.swap_blocks(src, dst, 4, torch.tensor([[1, 0]]))
    assert dst[0].tolist() == [4, 5, 6, 7] and dst[1].tolist() == [0, 0, 0, 0]


def test_convert_fp8_round_trip_matches_the_reference():
    x = torch.randn(3, 5, 16, dtype=F16)
    q = torch.empty(3, 5, 16, dtype=torch.uint8)
    V.convert_fp8(q, x, 0.5)
    assert q.flatten().tolist() == [e4m3(div32(v, 0.5)) for v in x.float().flatten().tolist()]
    back = torch.empty(3, 5, 16, dtype=BF16)
    V.convert_fp8(back, q, 0.5)
    assert torch.equal(u8(back), u8(torch.cat([ref_dequant(b, 0.5, BF16) for b in q.flatten().tolist()]).reshape(3, 5, 16)))


# ---- the DSA indexer K cache --------------------------------------------------------------------


def ref_index_store(k: torch.Tensor, cache: torch.Tensor, slot_mapping, fmt: str) -> torch.Tensor:
    """vLLM's indexer_k_quant_and_cache into ``[num_blocks, B, 132]``: per key ``scale = max(amax, 1e-4)
    / 448`` (ue8m0/mxfp8: up to 2^k), bytes ``e4m3(x / scale)`` at ``block * B * 132 + offset * 128``, the
    scale word at ``block * B * 132 + B * 128 + offset * 4`` (mxfp8: the exponent byte four times)."""
    bs = cache.shape[1]
    out = u8(cache).clone().reshape(cache.shape[0], -1)
    for i, s in enumerate(slot_mapping.tolist()):
        if s < 0:
            continue
        b, o = divmod(s, bs)
        x = k[i].float().cpu().tolist()
        amax = max([abs(v) for v in x if not math.isnan(v)] + [0.0])
        sc = div32(max(amax, f32(1e-4)), 448.0)
        if fmt != "fp32":
            m, e = math.frexp(sc)
            sc = sc if m == 0.5 else math.ldexp(1.0, e)
        out[b, o * 128 : (o + 1) * 128] = torch.tensor([e4m3(div32(v, sc)) for v in x], dtype=torch.uint8)
        word = u8(torch.tensor([sc], dtype=F32))
        if fmt == "mxfp8":
            word = torch.full((4,), (int(word.view(torch.int32)) >> 23) & 0xFF, dtype=torch.uint8)
        out[b, bs * 128 + 4 * o : bs * 128 + 4 * (o + 1)] = word
    return out


@pytest.mark.parametrize("block_size", [64, 16])
@pytest.mark.parametrize("scale_fmt", ["ue8m0", "mxfp8", "fp32"])
def test_indexer_store_and_gather(scale_fmt, block_size):
    torch.manual_seed(13)
    random.seed(13)
    nb, n, bs = 3, 10, block_size
    k = torch.randn(n, 128, dtype=F32).mul(3).to(BF16).to(DEVICE)
    cache = poisoned((nb, bs, 132), torch.uint8)
    slot = slots(n, nb * bs, pad=2)
    expected = ref_index_store(k, cache, slot, scale_fmt)
    V.indexer_k_quant_and_cache(k, cache, slot, 128, scale_fmt)
    got = u8(cache).reshape(nb, -1)
    keys = torch.cat([torch.arange(b * bs * 132, b * bs * 132 + bs * 128) for b in range(nb)])
    words = torch.cat([torch.arange(b * bs * 132 + bs * 128, (b + 1) * bs * 132) for b in range(nb)])
    if scale_fmt != "fp32":  # a power-of-two scale: x * (1 / s) == x / s, so the bytes are vLLM's
        assert torch.equal(got, expected)
    else:  # the fp32 scale: scales exact; a key byte may be one e4m3 step off (docs/vllm.md)
        assert torch.equal(got.reshape(-1)[words], expected.reshape(-1)[words])
        diff = (got.reshape(-1)[keys].to(torch.int16) - expected.reshape(-1)[keys].to(torch.int16)).abs()
        assert int(diff.max()) <= 1
    # gather back: request rows in cu order, rows past cu[-1] untouched
    table = torch.tensor([[2, 0, 1, 2, 0], [1, 2, 0, 1, 2]], dtype=torch.int32, device=DEVICE)
    cu = torch.tensor([0, min(70, 5 * bs), min(75, 5 * bs + 5)], dtype=torch.int32, device=DEVICE)
    dst_k, dst_s = poisoned((78, 128), torch.uint8), poisoned((78, 4), torch.uint8)
    want_k, want_s = u8(dst_k).clone(), u8(dst_s).clone()
    flat = got.reshape(-1)
    for o, b, s in ref_rows(table.cpu(), cu.cpu(), 2, 78, bs):
        base = b * bs * 132
        want_k[o] = flat[base + s * 128 : base + (s + 1) * 128]
        want_s[o] = flat[base + bs * 128 + 4 * s : base + bs * 128 + 4 * (s + 1)]
    V.cp_gather_indexer_k_quant_cache(cache, dst_k, dst_s, table, cu)
    assert torch.equal(u8(dst_k), want_k) and torch.equal(u8(dst_s), want_s)


def test_indexer_refusals():
    k = torch.randn(2, 128, dtype=BF16)
    with pytest.raises(ValueError, match=r"kv_cache must be uint8 \[num_blocks, block_size, 132\]"):
        V.indexer_k_quant_and_cache(k, torch.zeros(2, 16, 136, dtype=torch.uint8), torch.arange(2), 128, "ue8m0")
    with pytest.raises(IndexError, match="out of range"):
        V.indexer_k_quant_and_cache(k, torch.zeros(2, 16, 132, dtype=torch.uint8), torch.tensor([0, 32]), 128, "ue8m0")
    with pytest.raises(ValueError, match="quant_block_size must be 128"):
        V.indexer_k_quant_and_cache(k, torch.zeros(2, 64, 132, dtype=torch.uint8), torch.arange(2), 64, "ue8m0")
    with pytest.raises(ValueError, match="dst_scale must be"):
        V.cp_gather_indexer_k_quant_cache(
            torch.zeros(2, 64, 132, dtype=torch.uint8), torch.zeros(3, 128, dtype=torch.uint8), torch.zeros(3, 1, dtype=F32),
            torch.zeros(1, 1, dtype=torch.int32), torch.tensor([0, 3], dtype=torch.int32),
        )  # fmt: skip


def test_upconvert_reads_remapped_resident_and_host_rows():
    torch.manual_seed(14)
    nb, bs = 4, 4
    cache = poisoned((nb, bs, 656), torch.uint8)
    kv_c, k_pe = sources(2 * nb * bs, 512, 64, BF16)
    rows = fp8.quantize_mla_rows(kv_c.cpu(), k_pe.cpu(), "ds_mla", ds_mla_scale_rule="ue8m0")  # [32, 656] stored rows
    host = rows[nb * bs :].clone()  # host rows 0..15 (pinned: the GPU copy reads them in place)
    host = host.pin_memory() if DEVICE == "cuda" else host
    cache.view(-1, 656)[:] = rows[: nb * bs].to(DEVICE)
    dev_ids = torch.arange(nb * bs, dtype=torch.int32)
    host_ids = torch.arange(nb * bs, dtype=torch.int32).flip(0)
    dev_ids[::3] = -1  # every third slot lives on the host, at row 15 - slot
    table = torch.tensor([[3, 1, 0]], dtype=torch.int32, device=DEVICE)
    ws = torch.tensor([0], dtype=torch.int32, device=DEVICE)
    dst = poisoned((10, 576), BF16)
    expected = torch.empty(10, 576, dtype=BF16)
    for o, b, s in ref_rows(table.cpu(), ws.cpu(), 1, 10, bs, terminal=False):
        slot = b * bs + s
        src = host[int(host_ids[slot])] if dev_ids[slot] < 0 else rows[int(dev_ids[slot])]
        n, r = fp8.dequantize_mla_rows(src[None], "ds_mla", 512, 64)
        expected[o] = torch.cat([n[0], r[0]])
    V.cp_gather_and_upconvert_fp8_kv_cache(
        cache, dst, table, ws, 1, host_cache=host, host_row_ids=host_ids.to(DEVICE), device_row_ids=dev_ids.to(DEVICE)
    )  # fmt: skip
    assert torch.equal(u8(dst), u8(expected))


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_ds_mla_ue8m0_write_equals_the_reference():
    from mlakv.kernels.triton.fp8 import launch_quant_write

    torch.manual_seed(16)
    kv_c, k_pe = _ds_sources(6)
    kv_c[3, 0] = -float("inf")
    kv_c[4, :128] = float("nan")  # an all-NaN tile: the floor
    kv_c[5, 200] = 3e38
    want = fp8.quantize_mla_rows(kv_c.cpu(), k_pe.cpu(), "ds_mla", ds_mla_scale_rule="ue8m0")
    buf = poisoned((10, 656), torch.uint8)
    loc = torch.tensor([3, 0, 7, 1, 9, 5], device=DEVICE)
    launch_quant_write(buf, loc, kv_c, k_pe, "ds_mla", None, scale_rule="ue8m0")
    assert torch.equal(u8(buf)[loc.cpu()], want)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("fmt", ["ds_mla", "per_tensor"])
def test_triton_dequant_gather_into_dst_columns_skips_invalid_rows(fmt):
    """The upconvert's and the fp8 gather's GPU kernel: rows written straight into column slices of
    ``dst`` at its row stride; rows whose slot is invalid keep their bytes."""
    from mlakv.kernels.triton.fp8 import launch_dequant_gather

    torch.manual_seed(17)
    nope_dim, rope_dim = (512, 64) if fmt == "ds_mla" else (40, 0)
    kv_c, k_pe = sources(8, nope_dim, rope_dim, BF16)
    scale = None if fmt == "ds_mla" else torch.tensor([0.25], device=DEVICE)
    stored = fp8.quantize_mla_rows(kv_c, k_pe, fmt, scale, ds_mla_scale_rule="ue8m0" if fmt == "ds_mla" else "fp32_floor")
    rows = stored.view(torch.uint8).to(DEVICE)
    loc = torch.tensor([3, -1, 0, 7, 12, 5], device=DEVICE)  # -1 and 12 (past the 8 rows) are invalid
    dst = poisoned((6, nope_dim + rope_dim + 3), F16)
    before = u8(dst).clone().reshape(6, -1)
    out = (dst[:, :nope_dim], dst[:, nope_dim : nope_dim + rope_dim])
    launch_dequant_gather(rows, loc, fmt, nope_dim, rope_dim, scale, F16, out=out, skip_invalid=True)
    n, r = fp8.dequantize_mla_rows(stored.view(torch.uint8).cpu(), fmt, nope_dim, rope_dim, scale.cpu() if scale is not None else None, F16)
    got = u8(dst).reshape(6, -1)
    for i, s in enumerate(loc.tolist()):
        want = before[i].clone()
        if 0 <= s < 8:
            want[: 2 * (nope_dim + rope_dim)] = u8(torch.cat([n[s], r[s]]))
        assert torch.equal(got[i], want), i


# ---- the peer-test fetch and shim (no network: a synthetic sdist) --------------------------------

_FAKE_COMPRESSOR_TESTS = '''
import numpy as np
from vllm.models.deepseek_v4.common.ops import something  # a module-level import the shim does not provide


@pytest.mark.parametrize("n", [1, 2])
def test_indexer_quant_cache_roundtrip(n):
    k = torch.randn(n, 128, dtype=torch.bfloat16)
    cache = torch.zeros(2, 64, 132, dtype=torch.uint8)
    ops.indexer_k_quant_and_cache(k, cache, torch.arange(n), 128, "ue8m0")
    assert cache.any()


def test_other_compressor_test():
    raise AssertionError("not copied")
'''

_FAKE_CACHE_TESTS = '''
import torch
from tests.kernels.utils import DEFAULT_OPCHECK_TEST_UTILS, opcheck
from vllm import _custom_ops as ops
from vllm.platforms import current_platform
from vllm.utils.torch_utils import set_random_seed


def test_swap_blocks_mla_cpu():
    set_random_seed(0)
    src, dst = torch.arange(32, dtype=torch.uint8).reshape(4, 8), torch.zeros(4, 8, dtype=torch.uint8)
    mapping = torch.tensor([[3, 0]])
    opcheck(torch.ops._C_cache_ops.swap_blocks, (src, dst, 8, mapping), test_utils=DEFAULT_OPCHECK_TEST_UTILS)
    ops.swap_blocks(src, dst, 8, mapping)
    assert dst[0].tolist() == list(range(24, 32)) and not current_platform.is_rocm()
'''


def _fake_sdist(tmp_path):
    files = {
        "vllm-9.9.9/tests/kernels/attention/test_cache.py": _FAKE_CACHE_TESTS,
        "vllm-9.9.9/tests/kernels/test_cp_gather_fp8.py": "def test_nothing():\n    pass\n",
        "vllm-9.9.9/tests/kernels/test_compressor_kv_cache.py": _FAKE_COMPRESSOR_TESTS,
        "vllm-9.9.9/csrc/cache_kernels.cu": "// kernels\n",
        "vllm-9.9.9/setup.py": "",
    }
    path = tmp_path / "vllm-9.9.9.tar.gz"
    write_tar_gz(path, files)
    return path


def test_fetch_from_an_sdist_writes_tests_shim_and_run_command(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from mlakv.compat import fetch_vllm_tests as F

    dest = F.fetch("9.9.9", tmp_path / "peers", sdist=_fake_sdist(tmp_path))
    assert (dest / "tests/kernels/attention/test_cache.py").read_text() == _FAKE_CACHE_TESTS
    extracted = (dest / F.INDEXER_MODULE).read_text()
    assert "def test_indexer_quant_cache_roundtrip" in extracted and "test_other_compressor_test" not in extracted
    assert "deepseek_v4" not in extracted and "@pytest.mark.parametrize" in extracted
    assert "PYTHONPATH=shim" in (dest / "RUN.txt").read_text()
    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTEST_ADDOPTS"}
    env["PYTHONPATH"] = f"shim:.:{repo}"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "tests/kernels/attention/test_cache.py", F.INDEXER_MODULE],
        cwd=dest, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0 and "3 passed" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_fetch_names_what_is_missing(tmp_path):
    import tarfile

    from mlakv.compat import fetch_vllm_tests as F

    empty = tmp_path / "vllm-0.0.1.tar.gz"
    with tarfile.open(empty, "w:gz") as tar:
        (tmp_path / "x").write_text("")
        tar.add(tmp_path / "x", arcname="vllm-0.0.1/setup.py")
    with pytest.raises(RuntimeError, match="no tests/kernels/attention/test_cache.py"):
        F.fetch("0.0.1", tmp_path / "out", sdist=empty)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("terminal", [True, False])
@pytest.mark.parametrize("with_seq_starts", [False, True])
def test_triton_gather_plan_equals_the_torch_plan(terminal, with_seq_starts):
    """The one-launch plan the GPU gathers use, against the torch plan (the CPU path): empty requests,
    rows past the last request, logical blocks past the table and invalid block ids included."""
    from mlakv.kernels.triton.paged_plan import launch_token_slots
    from mlakv.spec.calls import TokenSlotPlan

    torch.manual_seed(18)
    nb, bs, cols = 6, 4, 3
    table = torch.randint(-1, nb + 2, (5, cols), dtype=torch.int32)[:, :cols]  # some ids out of range
    starts = torch.tensor([0, 3, 3, 9, 14, 20], dtype=torch.int32)  # request 1 empty; 4 runs past the table
    ss = torch.tensor([1, 0, 5, 2, 0], dtype=torch.int32) if with_seq_starts else None
    starts_arg = starts if terminal else starts[:5]
    for total in (25, 11):
        want, want_valid = V.gather_plan(table, starts_arg, 5, total, bs, nb, ss, terminal)
        got = launch_token_slots(TokenSlotPlan(table.to(DEVICE), starts_arg.to(DEVICE), 5, total, bs, nb,
                                               None if ss is None else ss.to(DEVICE), terminal))  # fmt: skip
        assert torch.equal(got.cpu(), want.cpu()), (total, got.tolist(), want.tolist())


@pytest.mark.parametrize("n", [1, 64, 65, 1024, 1025, 65536])
@pytest.mark.parametrize("row_bytes", [132, 656, 1152, 1 << 20])
def test_fused_gather_launch_rows_fill_the_bytes_per_program_in_a_power_of_two(n, row_bytes):
    from mlakv.spec import tuning

    rows, warps = tuning.paged_gather_launch(n, row_bytes)
    per_program = next(b for max_n, b, _ in tuning.PAGED_GATHER_STEPS if max_n is None or n <= max_n)
    assert rows & (rows - 1) == 0 and 1 <= rows <= 128 and warps in (1, 2, 4, 8, 16)
    assert rows == 1 or rows * row_bytes <= per_program < 2 * rows * row_bytes or rows == 128


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_fused_gather_redoes_a_shape_triton_cannot_compile_with_one_row_per_program(monkeypatch):
    """A compile failure (Triton 3.6 on sm_90 refuses some small tiles) happens before any launch:
    the call is redone with one row per program, and that shape is remembered."""
    from mlakv.kernels.triton import paged_plan

    real = paged_plan._paged_gather_kernel
    tried = []

    class Refusing:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                tried.append(kw["ROWS"])
                if kw["ROWS"] > 1:
                    raise RuntimeError("PassManager::run failed")
                return real[grid](*args, **kw)

            return launch

    monkeypatch.setattr(paged_plan, "_paged_gather_kernel", Refusing())
    monkeypatch.setattr(paged_plan, "_UNCOMPILABLE", set())
    random.seed(23)
    torch.manual_seed(23)
    for _ in range(2):
        plan, parts, dsts, expected = _fused_case("bf16", 5)
        paged_plan.launch_paged_gather(plan, *parts, rows_per_program=4)
        assert torch.equal(u8(dsts[0]).reshape(expected[0].shape), expected[0])
    assert tried == [4, 1, 1] and len(paged_plan._UNCOMPILABLE) == 1


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_fused_gather_skips_rows_whose_block_ids_or_logical_blocks_are_out_of_range():
    """The GPU gathers are unchecked (no sync): a block id < 0 or >= num_blocks, a logical block past
    the table's columns, starts past the output and a seq_start past the table leave their rows as
    they were; every other row is copied."""
    from mlakv.kernels.triton.paged_plan import launch_paged_gather

    torch.manual_seed(31)
    nb, bs, entry = 6, 4, 10
    cache = poisoned((nb, bs, entry), BF16)
    table = torch.tensor([[0, -1, 3], [nb, 2, 5], [1, nb + 7, -4]], dtype=torch.int32, device=DEVICE)
    cu = torch.tensor([0, 9, 14, 40], dtype=torch.int32, device=DEVICE)  # request 2 runs past the output
    ss = torch.tensor([2, 1, 9], dtype=torch.int32, device=DEVICE)  # request 2 starts in its 3rd block
    total = 20
    dst = poisoned((total, entry), BF16)
    expected = u8(dst).clone()
    es = cache.element_size()
    for r in range(3):
        for t in range(int(cu[r]), min(int(cu[r + 1]), total)):
            p = int(ss[r]) + t - int(cu[r])
            if p // bs >= table.shape[1]:
                continue
            blk = int(table[r, p // bs])
            if 0 <= blk < nb:
                expected[t] = u8(cache[blk, p % bs])
    part = V._part(cache, dst, 0, cache.stride(0) * es, cache.stride(1) * es, entry * es)
    launch_paged_gather(TokenSlotPlan(table, cu, 3, total, bs, nb, ss, True), part)
    assert torch.equal(u8(dst), expected)
