"""The DeepSeek-V4 family's pages, spec by example: the plain-torch reference (:mod:`mlakv.ops.v4_reference`)
against sglang's oracle of the V4.1 pages, against an exact-rational scalar encoder written here, and
against bytes computed by hand.

sglang's oracle (``.peers/sglang/test/dsv41_kv_quant_reference.py``) is only present where the peer
sources were fetched (not in CI): those tests skip with the reason otherwise. The oracle imports one
helper from sglang's package (``ceil_pow2``: ``2 ** ceil(log2(x))`` on the bits of a positive finite
fp32); where sglang is not installed, the fixture supplies that function (written here) before
loading it. The scalar encoder and the hand-computed bytes need nothing, so CI proves the rules too.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import types
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from mlakv.ops import v4_reference as R

ORACLE = Path(__file__).resolve().parent.parent / ".peers" / "sglang" / "test" / "dsv41_kv_quant_reference.py"
NAN, INF = float("nan"), float("inf")
LAYOUTS = list(R.V4_LAYOUTS)


# ---- sglang's oracle ---------------------------------------------------------------------------


def _ceil_pow2(x: torch.Tensor) -> torch.Tensor:
    """``2 ** ceil(log2(x))`` for positive finite fp32 ``x``, on its bits (what the oracle imports)."""
    u = x.float().view(torch.int32)
    e = ((u >> 23) & 0xFF) + ((u & 0x7FFFFF) != 0).to(torch.int32)
    return (e << 23).view(torch.float32)


@pytest.fixture(scope="module")
def oracle():
    if not ORACLE.exists():
        pytest.skip(f"sglang's oracle is not here ({ORACLE}; fetch the peer sources with `mlakv fetch-peers`)")
    name = "sglang.kernels.ops.quantization.fp4_fake_quant"
    try:
        importlib.import_module(name)
    except ImportError:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
        sys.modules[name].ceil_pow2 = _ceil_pow2
    spec = importlib.util.spec_from_file_location("mlakv_test_dsv41_oracle", ORACLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---- inputs ------------------------------------------------------------------------------------


def _bits16(v: int, dtype: torch.dtype) -> float:
    return float(torch.tensor([v], dtype=torch.int32).to(torch.int16).view(dtype).float())


def make_tokens(case: str, n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """``[n, 512]`` tokens of one kind: every tile of every layout sees the case."""
    g = torch.Generator().manual_seed(seed)
    spread = torch.exp2(torch.randint(-12, 12, (n, 1), generator=g).float())
    x = torch.randn(n, 512, generator=g) * spread
    if case == "random":
        pass
    elif case == "zeros":
        x[::2] = 0.0
        x[1::2, :256] = -0.0
    elif case == "one_huge":  # one huge value per 16-value tile, the rest ordinary
        big = 60000.0 if dtype == torch.float16 else 3.0e38
        x[:, 5::16] = big * torch.sign(torch.randn(n, 32, generator=g))
    elif case == "subnormal":  # the dtype's subnormals, their negatives and zeros
        raw = torch.randint(0, 0x7F if dtype == torch.bfloat16 else 0x3FF, (n, 512), generator=g)
        sign = torch.randint(0, 2, (n, 512), generator=g) << 15
        x = (raw | sign).to(torch.int16).view(dtype).float()
        x[:, 0::7] = 0.0
    elif case == "inf":
        x[:, 3::23] = INF
        x[:, 11::37] = -INF
    elif case == "nan":
        x[:, 2::29] = NAN
        x[:, 9::41] = INF
    elif case == "mixed":  # NaN of both signs, infinities, zeros, subnormals and huge values together
        x[:, 1::31] = _bits16(0xFFC0 if dtype == torch.bfloat16 else 0xFE00, dtype)  # a negative NaN
        x[:, 7::53] = NAN
        x[:, 13::47] = -INF
        x[:, 17::19] = 0.0
        x[:, 4::61] = _bits16(0x0001, dtype)
    else:
        raise AssertionError(case)
    t = x.to(dtype)
    # torch's float -> 16-bit cast may give a NaN either sign: set NaN bits explicitly (positive quiet
    # NaN, and in "mixed" also a negative one)
    pos_nan = 0x7FC0 if dtype == torch.bfloat16 else 0x7E00
    t.view(torch.int16)[torch.isnan(x)] = pos_nan
    if case == "mixed":
        t.view(torch.int16)[:, 1::31] = pos_nan - 0x10000 + 0x8000  # 0xFFC0 / 0xFE00 as int16
    return t


CASES = ["random", "zeros", "one_huge", "subnormal", "inf", "nan", "mixed"]
DTYPES = [torch.bfloat16, torch.float16]


def poisoned_pages(num_pages: int, layout: str, page_size: int, extra: int = 0) -> torch.Tensor:
    g = R.v4_geometry(layout)
    return torch.randint(0, 256, (num_pages, g.page_bytes(page_size) + extra), dtype=torch.uint8)


def store_all(tokens: torch.Tensor, layout: str, page_size: int) -> torch.Tensor:
    """Pages (poisoned first) holding ``tokens`` at slots 0, 1, ... in order."""
    n = tokens.shape[0]
    pages = poisoned_pages(n // page_size, layout, page_size)
    R.set_v4_kv_buffer_torch(pages, torch.arange(n), tokens, layout, page_size)
    return pages


def split_region(pages: torch.Tensor, layout: str, page_size: int) -> torch.Tensor:
    """The token bytes of block-split or interleaved pages (page padding cut off)."""
    g = R.v4_geometry(layout)
    return pages[:, : page_size * g.token_bytes]


# ---- against sglang's oracle ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("layout", ["v41", "v41_fp4", "v41_new", "v41_fp4_new"])
def test_pages_equal_the_oracle(oracle, layout, case, dtype):
    page_size = 8
    tokens = make_tokens(case, 4 * page_size, dtype)
    pages = store_all(tokens, layout, page_size)
    k = tokens.view(-1, page_size, 512)
    fp4 = "fp4" in layout
    expected = oracle.quantize_k_cache_v41_fp4(k) if fp4 else oracle.quantize_k_cache_v41(k)
    if layout.endswith("_new"):
        expected = oracle.interleave_pages(expected, page_size, 256 if fp4 else 512, 32 if fp4 else 16)
    g = R.v4_geometry(layout)
    assert expected.shape[1] >= page_size * g.token_bytes
    got, want = split_region(pages, layout, page_size), expected[:, : page_size * g.token_bytes]
    bad = (got != want).nonzero()
    assert bad.numel() == 0, f"{bad.shape[0]} bytes differ, first (page, byte): {bad[:6].tolist()}"


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal as values, NaN matching NaN of any payload, +0 and -0 told apart."""
    a, b = a.float(), b.float()
    nan = torch.isnan(a)
    return bool(torch.equal(nan, torch.isnan(b))) and bool(
        torch.equal(torch.where(nan, 0, a.view(torch.int32)), torch.where(nan, 0, b.view(torch.int32)))
    )


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("layout", ["v41", "v41_fp4", "v41_new", "v41_fp4_new"])
def test_gather_equals_the_oracle_dequantization(oracle, layout, case):
    page_size = 8
    tokens = make_tokens(case, 2 * page_size, torch.bfloat16, seed=3)
    pages = store_all(tokens, layout, page_size)
    fp4 = "fp4" in layout
    split = pages
    if layout.endswith("_new"):
        split = oracle.deinterleave_pages(pages, page_size, 256 if fp4 else 512, 32 if fp4 else 16)
    deq = oracle.dequantize_k_cache_v41_fp4 if fp4 else oracle.dequantize_k_cache_v41
    expected = deq(split, page_size).reshape(-1, 512)
    got = R.get_v4_kv_buffer_torch(pages, torch.arange(tokens.shape[0]), layout, page_size)
    assert got.dtype == torch.bfloat16 and _same_values(got, expected)


@pytest.mark.parametrize("layout", ["v41", "v41_fp4"])
def test_in_kernel_rope_is_rotate_then_the_oracle(oracle, layout):
    """Rotating inside the store equals rotating first (fp32, rounded to bf16) and quantizing the result."""
    page_size = 8
    tokens = make_tokens("random", 2 * page_size, torch.bfloat16, seed=5)
    theta = torch.rand(tokens.shape[0], 32) * 6.3
    cos, sin = torch.cos(theta), torch.sin(theta)
    pages = poisoned_pages(2, layout, page_size)
    R.set_v4_kv_buffer_torch(pages, torch.arange(tokens.shape[0]), tokens, layout, page_size, cos=cos, sin=sin)
    k = R.rotate_rope_tail(tokens, cos, sin).view(-1, page_size, 512)
    expected = oracle.quantize_k_cache_v41_fp4(k) if "fp4" in layout else oracle.quantize_k_cache_v41(k)
    g = R.v4_geometry(layout)
    assert torch.equal(split_region(pages, layout, page_size), expected[:, : page_size * g.token_bytes])


# ---- an exact-rational scalar encoder (needs nothing; CI runs it) ---------------------------------

_E4M3 = [(b, Fraction(b & 7, 8) * Fraction(2) ** -6 if b >> 3 == 0 else (1 + Fraction(b & 7, 8)) * Fraction(2) ** ((b >> 3) - 7)) for b in range(0x7F)]
_E2M1 = [Fraction(v) for v in ("0", "1/2", "1", "3/2", "2", "3", "4", "6")]


def _nearest_even(value: Fraction, grid: list[Fraction]) -> int:
    """Index of the grid value nearest ``value >= 0`` (ties: the even index); past the end: the last."""
    best = min(range(len(grid)), key=lambda i: (abs(grid[i] - value), i & 1))
    return best


def _ceil_log2(q: Fraction) -> int:
    e = math.floor(math.log2(q))
    while Fraction(2) ** e < q:
        e += 1
    while Fraction(2) ** (e - 1) >= q:
        e -= 1
    return e


def scalar_encode(token: list[float], layout: str) -> tuple[list[int], list[int]]:
    """One finite token's (value bytes, scale bytes), from exact rational arithmetic."""
    enc = R.v4_geometry(layout).encoding
    xs = [Fraction(v) for v in token]
    sign = [int(math.copysign(1.0, v) < 0) for v in token]
    if enc == "v41_fp4":
        codes, scales = [], []
        for t in range(32):
            tile = xs[16 * t : 16 * t + 16]
            raw = min(max(max(abs(v) for v in tile) / 6, Fraction(2) ** -9), Fraction(448))
            si = _nearest_even(raw, [v for _, v in _E4M3])
            s = _E4M3[si][1]
            scales.append(_E4M3[si][0])
            for j, v in enumerate(tile):
                codes.append(_nearest_even(min(abs(v) / s, Fraction(6)), _E2M1) | (sign[16 * t + j] << 3))
        return [codes[2 * i] | (codes[2 * i + 1] << 4) for i in range(256)], scales
    tile_n, quantized, floor = (64, 448, -22) if enc == "v4" else (32, 512, -13)
    values, scales = [], []
    for t in range(quantized // tile_n):
        tile = xs[tile_n * t : tile_n * (t + 1)]
        amax = max(abs(v) for v in tile)
        q = max(amax, Fraction(1, 10**4)) / 448 if enc == "v4" else max(amax / 448, Fraction(1, 10**4))
        e = max(_ceil_log2(q), floor)
        scales.append(e + 127)
        for j, v in enumerate(tile):
            b = _E4M3[_nearest_even(abs(v) / Fraction(2) ** e, [v for _, v in _E4M3])][0]
            values.append(b | (sign[tile_n * t + j] << 7))
    if enc == "v4":
        bits = torch.tensor(token[448:], dtype=torch.float32).to(torch.bfloat16).view(torch.int16).tolist()
        for b in bits:
            values += [b & 0xFF, (b >> 8) & 0xFF]
    return values, scales


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", ["random", "zeros", "one_huge", "subnormal"])
@pytest.mark.parametrize("layout", ["v4", "v41", "v41_fp4"])
def test_encoding_equals_exact_arithmetic(layout, case, dtype):
    tokens = make_tokens(case, 2, dtype, seed=11)
    values, scales = R.quantize_v4_tokens(tokens, layout)
    for i in range(tokens.shape[0]):
        want_v, want_s = scalar_encode(tokens[i].float().tolist(), layout)
        assert values[i].tolist() == want_v, f"token {i}: value bytes differ"
        assert scales[i].tolist() == want_s, f"token {i}: scale bytes differ"


# ---- bytes computed by hand -----------------------------------------------------------------------


def _token(*fill) -> torch.Tensor:
    """One bf16 token, zero but for ``(index or (start, stop), value)`` pairs."""
    t = torch.zeros(1, 512)
    for sl, v in fill:
        sl = slice(*sl) if isinstance(sl, tuple) else sl
        t[0, sl] = v
    out = t.to(torch.bfloat16)
    out.view(torch.int16)[torch.isnan(t)] = 0x7FC0  # a positive quiet NaN, whatever the cast gave
    return out


def test_hand_computed_v41():
    # tile 0: all 1.0 -> amax/448 = 0.00223 -> scale 2^-8 (byte 119 = 0x77); 1.0 * 2^8 = 256 -> e4m3 0x78
    # tile 1: 448 and -1.5 -> scale 2^0 (0x7F); 448 -> 0x7E, -1.5 -> 0xBC
    # tile 2: zeros -> scale max(0, 1e-4) -> 2^-13 (0x72); 0 -> 0x00
    tok = _token(((0, 32), 1.0), (32, 448.0), ((33, 64), -1.5))
    values, scales = R.quantize_v4_tokens(tok, "v41")
    assert values[0, :32].tolist() == [0x78] * 32
    assert values[0, 32:64].tolist() == [0x7E] + [0xBC] * 31
    assert values[0, 64:].tolist() == [0] * 448
    assert scales[0].tolist() == [0x77, 0x7F] + [0x72] * 14


def test_hand_computed_v41_fp4():
    # tile 0: all 3.0 -> scale e4m3(0.5) = 0x30; 3.0 / 0.5 = 6 -> code 7: bytes 0x77
    # tile 1: 1.0 and -0.25 -> amax/6 = 0.1667 -> e4m3 0.171875 (0x1B... computed: 0.1667 = 1.333 * 2^-3 ->
    #         mantissa 3/8 -> 1.375 * 2^-3 = 0.171875, byte (4 << 3) | 3 = 0x23); 1.0 / 0.171875 = 5.82 -> 6
    #         (code 7); -0.25 / 0.171875 = -1.45 -> 1.5 (code 3, sign 8: 0xB)
    # tile 2: zeros -> scale clamps to 2^-9 (byte 0x01), codes 0
    tok = _token(((0, 16), 3.0), (16, 1.0), ((17, 32), -0.25))
    values, scales = R.quantize_v4_tokens(tok, "v41_fp4")
    assert values[0, :8].tolist() == [0x77] * 8
    assert values[0, 8:16].tolist() == [0xB7] + [0xBB] * 7
    assert values[0, 16:].tolist() == [0] * 240
    assert scales[0].tolist() == [0x30, 0x23] + [0x01] * 30


def test_hand_computed_v4():
    # nope tile 0: all 2.0 -> max(2, 1e-4) / 448 = 0.00446 -> 2^-7 (byte 120); 2 * 2^7 = 256 -> 0x78
    # nope tiles 1..6: zeros -> 1e-4 / 448 = 2.23e-7 -> 2^-22 (byte 105)
    # rope: stored as bf16 bits (1.0 = 0x3F80, little-endian 0x80 0x3F)
    tok = _token(((0, 64), 2.0), ((448, 512), 1.0))
    values, scales = R.quantize_v4_tokens(tok, "v4")
    assert values.shape == (1, 576) and scales.shape == (1, 7)
    assert values[0, :64].tolist() == [0x78] * 64 and values[0, 64:448].tolist() == [0] * 384
    assert values[0, 448:].tolist() == [0x80, 0x3F] * 64
    assert scales[0].tolist() == [120] + [105] * 6


def test_hand_computed_non_finite_tiles():
    neg_nan = torch.tensor([-64], dtype=torch.int16).view(torch.bfloat16)  # 0xFFC0
    tok = _token((0, NAN), (1, -2.0), (32, INF), (33, -3.0), (34, -INF), (64, INF))
    tok[0, 2] = neg_nan
    values, scales = R.quantize_v4_tokens(tok, "v41")
    assert values[0, :4].tolist() == [0x7F, 0x7F, 0xFF, 0x7F]  # NaN tile: NaN, its negative NaN keeps the sign
    assert values[0, 32:36].tolist() == [0xFF, 0x80, 0xFF, 0x00]  # inf tile: inf -> 0xFF, finite -> +-0
    assert values[0, 64:66].tolist() == [0xFF, 0x00]
    assert scales[0, :4].tolist() == [0xFF, 0xFF, 0xFF, 0x72]
    values, scales = R.quantize_v4_tokens(tok, "v41_fp4")
    assert values[0, :2].tolist() == [0x00, 0x08]  # NaN tile: codes 0, the negative NaN's 0x8
    assert scales[0, :3].tolist() == [0x7F, 0x01, 0x7E]  # inf is a huge value: scale 448
    assert values[0, 16:18].tolist() == [0x07 | 0x80, 0x0F]  # inf -> 6, -3/448 -> -0; -inf -> -6, 0 -> 0
    assert values[0, 32].tolist() == 0x07


# ---- page geometry and the store's row rules --------------------------------------------------------


@pytest.mark.parametrize(
    "layout,per_token,page_bytes_64,scale_base_64",
    [
        ("v4", 584, 37440, 64 * 576),  # ceil(64 * 584 / 576) * 576
        ("v41", 528, 33792, 64 * 512),
        ("v41_fp4", 288, 18432, 64 * 256),
        ("v41_new", 528, 33792, 512),
        ("v41_fp4_new", 288, 18432, 256),
    ],
)
def test_page_geometry(layout, per_token, page_bytes_64, scale_base_64):
    g = R.v4_geometry(layout)
    assert g.token_bytes == per_token and g.page_bytes(64) == page_bytes_64
    assert g.scale_offset(0, 64) == scale_base_64
    assert g.data_offset(3, 64) == 3 * (per_token if layout.endswith("_new") else g.value_bytes)
    assert g.page_bytes(1) >= per_token and g.page_bytes(1) % (per_token if layout.endswith("_new") else g.fmt.page_align) == 0


def test_v4_pad_byte_and_page_padding_keep_their_contents():
    page_size = 4
    pages = poisoned_pages(2, "v4", page_size)
    before = pages.clone()
    R.set_v4_kv_buffer_torch(pages, torch.arange(8), make_tokens("random", 8, torch.bfloat16), "v4", page_size)
    g = R.v4_geometry("v4")
    for row in range(page_size):
        pad = g.scale_offset(row, page_size) + 7
        assert torch.equal(pages[:, pad], before[:, pad])
    tail = page_size * g.token_bytes
    assert torch.equal(pages[:, tail:], before[:, tail:])


def _expected_pages(pages, loc, tokens, layout, page_size, keep_rows):
    """Write the kept tokens one by one at their slots (the per-token spec of the store)."""
    out = pages.clone()
    g = R.v4_geometry(layout)
    for i, slot in keep_rows:
        values, scales = R.quantize_v4_tokens(tokens[i : i + 1], layout)
        p, r = divmod(slot, page_size)
        d, s = g.data_offset(r, page_size), g.scale_offset(r, page_size)
        out[p, d : d + g.value_bytes] = values[0]
        out[p, s : s + g.scales] = scales[0]
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_store_skips_padding_reserved_and_other_ranks(layout):
    page_size, num_pages = 4, 3
    pages = poisoned_pages(num_pages, layout, page_size)
    loc = torch.tensor([5, -1, 0, 7, 9, 3, -7, 1])  # 0: reserved
    tokens = make_tokens("random", loc.shape[0], torch.bfloat16, seed=2)
    expected = _expected_pages(pages, loc, tokens, layout, page_size, [(0, 5), (3, 7), (4, 9), (5, 3), (7, 1)])
    R.set_v4_kv_buffer_torch(pages, loc, tokens, layout, page_size, reserved_skip_index=0)
    assert torch.equal(pages, expected)
    # DCP: world 2, rank 1 keeps the odd slots at slot // 2
    pages = poisoned_pages(num_pages, layout, page_size)
    expected = _expected_pages(pages, loc, tokens, layout, page_size, [(0, 2), (3, 3), (4, 4), (5, 1), (7, 0)])
    R.set_v4_kv_buffer_torch(pages, loc, tokens, layout, page_size, dcp_world_size=2, dcp_rank=1)
    assert torch.equal(pages, expected)


@pytest.mark.parametrize("layout", ["v4", "v41_fp4_new"])
def test_store_honours_strided_tokens_loc_and_pages(layout):
    page_size, num_pages = 4, 3
    g = R.v4_geometry(layout)
    wide = poisoned_pages(num_pages, layout, page_size, extra=48)
    pages = wide[:, : g.page_bytes(page_size)]  # rows strided past their width
    base = make_tokens("random", 10, torch.bfloat16, seed=4)
    tokens = torch.cat((base, base), dim=1)[:, :512]  # row stride 1024
    loc = torch.tensor([11, -5, 0, -5, 4, -5, 2, -5, 6, -5, 8, -5, 9, -5, 1, -5, 3, -5, 10, -5])[::2]  # stride 2
    expected = _expected_pages(wide[:, : g.page_bytes(page_size)], loc, base, layout, page_size, list(enumerate(loc.tolist())))
    tail_before = wide[:, g.page_bytes(page_size) :].clone()
    R.set_v4_kv_buffer_torch(pages, loc, tokens, layout, page_size)
    assert torch.equal(pages, expected) and torch.equal(wide[:, g.page_bytes(page_size) :], tail_before)


def test_gather_gives_zero_rows_outside_the_pages():
    pages = store_all(make_tokens("random", 8, torch.bfloat16), "v41", 4)
    out = R.get_v4_kv_buffer_torch(pages, torch.tensor([-1, 8, 3]), "v41", 4)
    assert torch.equal(out[:2].float(), torch.zeros(2, 512)) and not torch.equal(out[2].float(), torch.zeros(512))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_round_trip_error_is_within_half_a_step(layout):
    """Finite tokens come back within the format's rounding: half an e4m3 / e2m1 step at the tile's scale."""
    tokens = make_tokens("random", 16, torch.bfloat16, seed=8)
    pages = store_all(tokens, layout, 16)
    back = R.get_v4_kv_buffer_torch(pages, torch.arange(16), layout, 16).float()
    x = tokens.float()
    g = R.v4_geometry(layout)
    tile_max = x[:, : g.quantized].reshape(16, g.scales, g.tile).abs().amax(-1, keepdim=True)
    rel = (2.0 ** -4) if not g.fp4 else 0.5  # e4m3: 3 mantissa bits; e2m1: steps of up to 2 on a grid to 6
    bound = (tile_max * rel * (2 if not g.fp4 else 1) + 1e-30).expand(-1, -1, g.tile).reshape(16, g.quantized)
    err = (back[:, : g.quantized] - x[:, : g.quantized]).abs()
    assert bool((err <= bound).all())
    if layout == "v4":
        assert torch.equal(back[:, 448:], x[:, 448:])


# ---- the kernels' e2m1 method: thresholds instead of a division ---------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_e2m1_threshold_search_equals_the_ieee_quotient_for_every_16_bit_value(dtype):
    """The CUDA and Triton stores find an e2m1 code by comparing ``|x|`` with ``m_j * scale`` (exact)
    instead of rounding ``x / scale``; for every finite 16-bit ``x`` and every e4m3 scale they can meet
    (``[2^-9, 448]``), the code is the one the IEEE fp32 quotient rounds to (ties to even included)."""
    x = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype).float()
    x = x[torch.isfinite(x)]
    a = x.abs()
    scales = torch.arange(1, 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    s = scales[scales >= 2.0**-9][:, None]  # every scale at once: [126, 1] against [1, 65k] values
    t = [m * s for m in (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)]  # exact: <= 7 significant bits
    hi = a >= t[3]  # the kernel's three-level search (odd midpoints tie upward to the even code)
    mid = a >= torch.where(hi, t[5], t[1])
    lo = a > torch.where(hi, torch.where(mid, t[6], t[4]), torch.where(mid, t[2], t[0]))
    code = (hi.int() * 4 + mid.int() * 2 + lo.int()) | (torch.signbit(x).int() << 3)
    want = R.e2m1_codes(x / s)
    assert int((code != want.int()).sum()) == 0
