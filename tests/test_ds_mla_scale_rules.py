"""ds_mla's tile-scale rules: ``fp32_floor`` (the default), ``fp32`` (sglang), ``ue8m0`` (vLLM 0.33, FlashMLA).

Spec: the module docstring of :mod:`mlakv.ops.fp8` (the arithmetic: ``ds_mla_tile_scales`` and
``ds_mla_quotients``; which reader expects which rule: docs/formats.md). The reference quantizer is
checked, rule by rule, against this file's own scalar reference (Python floats with every fp32
operation rounded once, and a nearest-value table of e4m3). Every path is then checked bit for bit
against the reference: torch on the CPU, Triton (interpreted on the CPU; compiled on a GPU with and
without the hardware conversions), the JIT CUDA kernel on SM90+, the fused RoPE write on each of its
paths, and the pool; on fresh random rows and on edge tiles (all zeros, signed zeros, one huge
value, subnormals, tiny values, inf, NaN), with destinations poisoned first so unwritten or
misplaced rows show.
"""

from __future__ import annotations

import bisect
import math
import struct

import numpy as np
import pytest
import torch
from conftest import DEVICE, FakeCudaTensor, HAS_CUDA, IS_SM90, requires_cuda, requires_sm90, sm90a_build_env

from mlakv.ops.fp8 import (
    FLT_MIN,
    dequantize_mla_rows,
    ds_mla_quotients,
    ds_mla_tile_scales,
    fp8_write_path,
    quantize_mla_rows,
    set_mla_kv_buffer_quant,
)
from mlakv.ops.rope_write import set_mla_kv_buffer_rope
from mlakv.ops.rope_write_reference import rope_rotate_torch, set_mla_kv_buffer_rope_torch
from mlakv.spec.calls import RopeWriteCall
from mlakv.spec.rules import DS_MLA_SCALE_RULES, DS_MLA_UE8M0_FLOOR, check_ds_mla_scale_rule

# The interpreter computes in numpy, which warns on what the edge tiles are chosen to do (1 / 0,
# inf * 0, overflow); the results are checked bit for bit instead.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

RULES = list(DS_MLA_SCALE_RULES)
NOPE, ROPE = 512, 64
ROW = 656
WIDTH = ROW + 16  # a spare 16 bytes per row: never written; rows stay 16-byte aligned for the JIT kernel
SRC_DTYPES = [torch.bfloat16, torch.float16]
SKIP = 5  # the reserved slot of the write tests: skipped like padding
# Kernel paths of the quantizing write here: Triton (interpreted on the CPU), on a GPU also Triton's
# integer conversions ("triton-portable"), the JIT CUDA kernel (SM90+) and the dispatcher's choice.
PATHS = ["torch", "triton"] + (["triton-portable", "dispatch"] if HAS_CUDA else []) + (["jit"] if IS_SM90 else [])
ROPE_PATHS = ["triton"] + (["jit"] if IS_SM90 else [])


# ---- this file's scalar reference --------------------------------------------------------------
def f32(x: float) -> float:
    """``x`` rounded to fp32 (RNE; inf past the range). Each fp32 operation below is computed in
    double and rounded once: exact for a product of two fp32 values (48 bits), correctly rounded for
    a quotient (53 >= 2 * 24 + 2 bits)."""
    with np.errstate(over="ignore"):
        return float(np.float32(x))


_E4M3_MAGS = torch.arange(0, 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).double().tolist()


def e4m3_code(y: float) -> int:
    """The e4m3 byte of ``y``: the nearest of the 127 finite magnitudes (ties to the even code),
    saturating at 448, the sign kept (-0 included); NaN -> 0x7F."""
    if math.isnan(y):
        return 0x7F
    a = min(abs(y), 448.0)
    hi = min(bisect.bisect_left(_E4M3_MAGS, a), 0x7E)
    lo = max(hi - 1, 0)
    d_lo, d_hi = a - _E4M3_MAGS[lo], _E4M3_MAGS[hi] - a
    code = hi if (d_hi < d_lo or (d_hi == d_lo and hi % 2 == 0)) else lo
    return code | (0x80 if math.copysign(1.0, y) < 0 else 0)


def tile_scale(vals: list[float], rule: str) -> float:
    """The rule's fp32 scale of one tile of 128 values (the docstring of :mod:`mlakv.ops.fp8`, by hand)."""
    if rule == "fp32_floor":
        amax = max((abs(v) for v in vals if math.isfinite(v)), default=0.0)
        return max(f32(amax / 448.0), FLT_MIN)
    amax = max((abs(v) for v in vals if not math.isnan(v)), default=0.0)  # fmax: NaN ignored, inf kept
    s = f32(amax / 448.0)
    if rule == "fp32":
        return s
    s = max(s, f32(1e-4))
    if math.isinf(s):
        return s
    m, e = math.frexp(s)  # s = m * 2^e, m in [0.5, 1)
    return s if m == 0.5 else f32(math.ldexp(1.0, e))


def quotient(x: float, s: float, rule: str) -> float:
    """``x`` brought to the e4m3 range by the rule (before the e4m3 rounding)."""
    if rule == "fp32":
        inv = math.inf if s == 0.0 else f32(1.0 / s)
        return x if x == 0.0 else f32(x * inv)
    return f32(x / s)  # s > 0; x / inf is +-0, inf / inf NaN


def scalar_rows(nope: torch.Tensor, rope: torch.Tensor, rule: str) -> torch.Tensor:
    """Expected stored rows ``[n, 656]`` uint8 of bf16/fp16 sources ``nope [n, 512]``, ``rope [n, 64]``."""
    out = []
    for i in range(nope.shape[0]):
        vals = nope[i].double().tolist()
        codes, scales = [], b""
        for t in range(NOPE // 128):
            tile = vals[128 * t : 128 * (t + 1)]
            s = tile_scale(tile, rule)
            codes += [e4m3_code(quotient(x, s, rule)) for x in tile]
            scales += struct.pack("<f", s)
        r = rope[i] if rope.dtype == torch.bfloat16 else rope[i].float().to(torch.bfloat16)
        out.append(torch.tensor(codes + list(scales), dtype=torch.uint8))
        out[-1] = torch.cat([out[-1], r.contiguous().view(torch.uint8)])
    return torch.stack(out)


# ---- inputs ------------------------------------------------------------------------------------
def edge_nope(dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """``[8, 512]`` rows (on the CPU) whose tiles are the edge cases of the rules: every tile kind of
    the rules' docstrings, with random values around them."""
    g = torch.Generator().manual_seed(seed)
    big = 3e38 if dtype == torch.bfloat16 else 60000.0
    sub = 2.0**-133 if dtype == torch.bfloat16 else 2.0**-24  # the smallest positive subnormal of the dtype
    tiny = 1e-37 if dtype == torch.bfloat16 else 1e-5
    x = torch.randn(8, 4, 128, generator=g, dtype=torch.float64)
    x[0, 0] = 0.0  # an all-zero tile
    x[0, 1] = -0.0  # all negative zeros
    x[0, 2, 17] = big  # one huge value among ordinary ones
    x[1, 0] = torch.randint(-40, 41, (128,), generator=g).double() * sub  # subnormals (and zeros)
    x[1, 1] *= tiny  # tiny normals: fp32's scale is subnormal (bf16)
    x[1, 2, 3] = math.inf
    x[1, 3, 90] = math.nan
    x[2, 0] = 0.0
    x[2, 0, 5] = -math.inf  # inf among zeros
    x[2, 1] = math.nan  # all NaN
    x[2, 2] *= 1e-4  # amax / 448 below ue8m0's floor
    x[2, 2, 0] = 448.0 * 2.0**-20  # ... and exactly a power of two times 448 in the next tile:
    x[2, 3] = x[2, 3].clamp(-1.0, 1.0)
    x[2, 3, 9] = 448.0 * 2.0**-3  # amax / 448 = 2^-3 exactly: ue8m0 keeps it
    x[3] *= 1e3
    x[3, 1, :64] = 0.0  # half a tile of zeros, signed
    x[3, 1, 64:96] = -0.0
    x[4:] *= torch.exp(torch.empty(4, 1, 1, dtype=torch.float64).uniform_(-7.0, 7.0, generator=g))
    return x.reshape(8, NOPE).to(dtype)


def make_rope(n: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, ROPE, generator=torch.Generator().manual_seed(seed)).to(dtype)


def poisoned(num_slots: int, width: int = WIDTH, device=DEVICE) -> torch.Tensor:
    return torch.randint(0, 256, (num_slots, width), dtype=torch.uint8).to(device)


def expected_buffer(kv: torch.Tensor, loc: torch.Tensor, rows: torch.Tensor, skip: int = -1) -> torch.Tensor:
    """The buffer after writing ``rows`` at ``loc``: padding, ``skip`` and slots past the buffer left alone."""
    out = kv.detach().cpu().clone()
    for i, slot in enumerate(loc.cpu().tolist()):
        if 0 <= slot < out.shape[0] and slot != skip:
            out[slot, : rows.shape[1]] = rows[i]
    return out


def assert_bytes_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    a = actual.detach().cpu().view(torch.uint8).reshape(expected.shape)
    if not torch.equal(a, expected):
        bad = (a != expected).nonzero()
        raise AssertionError(f"{bad.shape[0]} bytes differ, first (row, byte): {bad[:8].tolist()}")


def write_via(path: str, kv, loc, nope, rope, rule: str, skip: int = -1) -> None:
    """One quantizing write on ``path`` (the public op for torch/dispatch; the launchers directly)."""
    if path in ("torch", "dispatch"):
        set_mla_kv_buffer_quant(kv, loc, nope, rope, "ds_mla", reserved_skip_index=None if skip < 0 else skip,
                                ds_mla_scale_rule=rule)  # fmt: skip
    elif path.startswith("triton"):
        from mlakv.kernels.triton.fp8 import launch_quant_write

        native = False if path == "triton-portable" else None
        launch_quant_write(kv, loc, nope, rope, "ds_mla", None, skip, native=native, scale_rule=rule)
    else:
        from mlakv.kernels.cuda.fp8 import fp8_jit_write

        assert fp8_jit_write(kv, loc, nope, rope, "ds_mla", None, skip, scale_rule=rule), "the JIT kernel refused"


# ---- the rules as data ---------------------------------------------------------------------------
def test_the_three_rules_and_their_kernel_codes():
    assert DS_MLA_SCALE_RULES == ("fp32_floor", "fp32", "ue8m0")
    assert [check_ds_mla_scale_rule(r) for r in RULES] == [0, 1, 2]
    assert DS_MLA_UE8M0_FLOOR == f32(1e-4)


@pytest.mark.parametrize("bad", ["amax", "pow2", "FP32", None, 1])
def test_an_unknown_rule_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="ds_mla_scale_rule must be one of"):
        check_ds_mla_scale_rule(bad)


# ---- the reference against this file's scalar reference -----------------------------------------
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("dtype", SRC_DTYPES)
def test_reference_equals_the_scalar_reference_on_edge_tiles(rule, dtype):
    nope, rope = edge_nope(dtype), make_rope(8, dtype)
    assert torch.equal(quantize_mla_rows(nope, rope, "ds_mla", ds_mla_scale_rule=rule), scalar_rows(nope, rope, rule))


@pytest.mark.parametrize("rule", RULES)
def test_reference_equals_the_scalar_reference_on_random_rows(rule):
    g = torch.Generator().manual_seed(7)
    mags = torch.exp(torch.empty(6, 1).uniform_(-9.0, 9.0, generator=g))
    nope = (torch.randn(6, NOPE, generator=g) * mags).bfloat16()
    rope = make_rope(6, torch.bfloat16)
    assert torch.equal(quantize_mla_rows(nope, rope, "ds_mla", ds_mla_scale_rule=rule), scalar_rows(nope, rope, rule))


def test_the_default_rule_is_fp32_floor():
    nope, rope = edge_nope(torch.bfloat16), make_rope(8, torch.bfloat16)
    assert torch.equal(quantize_mla_rows(nope, rope, "ds_mla"), quantize_mla_rows(nope, rope, "ds_mla", ds_mla_scale_rule="fp32_floor"))


# ---- each rule's behaviour, spelled out ---------------------------------------------------------
def _tile_rows(tile: list[float], dtype=torch.bfloat16) -> torch.Tensor:
    """One row whose first tile is ``tile`` (128 values; the other tiles ones)."""
    x = torch.ones(1, NOPE, dtype=torch.float64)
    x[0, :128] = torch.tensor(tile, dtype=torch.float64)
    return x.to(dtype)


def _scale_and_codes(nope: torch.Tensor, rule: str) -> tuple[float, list[int]]:
    rows = quantize_mla_rows(nope, make_rope(1, nope.dtype), "ds_mla", ds_mla_scale_rule=rule)
    return rows[0, NOPE : NOPE + 4].view(torch.float32).item(), rows[0, :128].tolist()


@pytest.mark.parametrize("rule,scale", [("fp32_floor", FLT_MIN), ("fp32", 0.0), ("ue8m0", 2.0**-13)])
def test_an_all_zero_tile_stores_zeros_of_its_signs_and_reads_back_zeros(rule, scale):
    tile = [0.0] * 64 + [-0.0] * 64
    nope = _tile_rows(tile)
    s, codes = _scale_and_codes(nope, rule)
    assert s == scale and codes == [0x00] * 64 + [0x80] * 64
    back, _ = dequantize_mla_rows(quantize_mla_rows(nope, make_rope(1, nope.dtype), "ds_mla", ds_mla_scale_rule=rule),
                                  "ds_mla", NOPE, ROPE, dst_dtype=torch.float32)  # fmt: skip
    assert (back[0, :128] == 0).all()


def test_fp32_scale_is_amax_over_448_without_a_floor_and_values_times_its_reciprocal():
    tile = [3.0, -1.25, 0.5, 1e-3] * 32
    s, codes = _scale_and_codes(_tile_rows(tile), "fp32")
    assert s == f32(3.0 / 448.0)
    inv = f32(1.0 / s)
    assert codes == [e4m3_code(f32(x * inv)) for x in tile]


def test_fp32_keeps_a_subnormal_scale_and_saturates_where_its_reciprocal_overflows():
    sub = 2.0**-133  # the smallest bf16 subnormal
    tile = [5 * sub, -3 * sub, 0.0, sub] * 32
    s, codes = _scale_and_codes(_tile_rows(tile), "fp32")
    assert s == f32(5 * sub / 448.0) and 0.0 < s < FLT_MIN
    assert codes == [0x7E, 0xFE, 0x00, 0x7E] * 32  # 1 / s is inf: +-448 for every non-zero value


def test_fp32_floor_ignores_inf_and_nan_in_the_amax():
    tile = [1.0] * 126 + [math.inf, math.nan]
    s, codes = _scale_and_codes(_tile_rows(tile), "fp32_floor")
    assert s == f32(1.0 / 448.0) and codes[126] == 0x7E and codes[127] == 0x7F and codes[0] == 0x7E


@pytest.mark.parametrize("rule", ["fp32", "ue8m0"])
def test_an_inf_makes_an_inf_scale_zeros_and_nan_under_fmax_rules(rule):
    tile = [1.0, -2.0] * 63 + [-math.inf, math.nan]
    s, codes = _scale_and_codes(_tile_rows(tile), rule)
    assert math.isinf(s) and codes[:126] == [0x00, 0x80] * 63 and codes[126:] == [0x7F, 0x7F]


@pytest.mark.parametrize("rule", RULES)
def test_nan_is_ignored_by_the_amax_and_stored_as_0x7f(rule):
    tile = [0.5] * 127 + [math.nan]
    s, codes = _scale_and_codes(_tile_rows(tile), rule)
    assert s == tile_scale(tile[:127], rule) and codes[127] == 0x7F


def test_ue8m0_scales_are_powers_of_two_at_or_above_amax_over_448():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 4, 128, generator=g) * torch.exp(torch.empty(64, 4, 1).uniform_(-20, 20, generator=g))
    s = ds_mla_tile_scales(x.bfloat16().float(), "ue8m0")
    bits = s.view(torch.int32)
    assert ((bits & 0x7FFFFF) == 0).all()  # mantissa zero: a power of two
    amax = x.bfloat16().float().abs().amax(dim=2, keepdim=True)
    assert (s >= amax / 448.0).all() and (s < 2 * torch.clamp_min(amax / 448.0, DS_MLA_UE8M0_FLOOR)).all()


def test_ue8m0_keeps_an_exact_power_of_two_and_floors_at_1e_4():
    s, _ = _scale_and_codes(_tile_rows([448.0 * 2.0**-3] + [0.01] * 127), "ue8m0")
    assert s == 2.0**-3
    s, _ = _scale_and_codes(_tile_rows([1e-3] * 128), "ue8m0")
    assert s == 2.0**-13  # max(1e-3 / 448, 1e-4) = 1e-4 -> 2^-13


def test_quotients_divide_except_fp32_which_multiplies_by_the_reciprocal():
    x = torch.tensor([[[3.0, 0.0, -0.0, 7.0]]])
    s = torch.tensor([[[0.0]]])
    assert ds_mla_quotients(x, s, "fp32").tolist() == [[[math.inf, 0.0, -0.0, math.inf]]]
    assert torch.signbit(ds_mla_quotients(x, s, "fp32")[0, 0, 2])
    s = torch.tensor([[[3.0]]])
    assert torch.equal(ds_mla_quotients(x, s, "fp32_floor"), x / s)
    assert torch.equal(ds_mla_quotients(x, s, "fp32"), torch.where(x == 0, x, x * (1 / s)))


# ---- every path against the reference ------------------------------------------------------------
def _path_available(path: str) -> None:
    if path == "torch" and HAS_CUDA:
        pytest.skip("the torch path is the CPU path")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("dtype", SRC_DTYPES)
def test_write_of_edge_tiles_is_bit_exact(path, rule, dtype):
    _path_available(path)
    nope, rope = edge_nope(dtype), make_rope(8, dtype)
    kv = poisoned(20)
    loc = torch.tensor([7, -1, 3, SKIP, 19, 0, 12, 9], device=DEVICE)
    expected = expected_buffer(kv, loc, quantize_mla_rows(nope, rope, "ds_mla", ds_mla_scale_rule=rule), SKIP)
    write_via(path, kv, loc, nope.to(DEVICE), rope.to(DEVICE), rule, SKIP)
    assert_bytes_equal(kv, expected)


def amax_sweep_nope(dtype: torch.dtype) -> torch.Tensor:
    """``[n, 512]`` rows (CPU) whose tiles' amax takes every binary exponent of ``dtype`` from its
    smallest subnormal to its largest finite value, at a random mantissa (the GPU kernels compute
    ``amax / 448`` by exact scaling around a fast quotient; each scaling range and its edges are here)."""
    lo, hi = (-133, 127) if dtype == torch.bfloat16 else (-24, 15)
    g = torch.Generator().manual_seed(7)
    tiles = []
    for e in range(lo, hi + 1):
        t = (torch.rand(128, generator=g, dtype=torch.float64) * 2 - 1) * 2.0**e
        t[int(torch.randint(0, 128, (1,), generator=g))] = (1 + torch.rand(1, generator=g, dtype=torch.float64).item() * 0.99) * 2.0**e
        tiles.append(t.to(dtype))
    tiles += [tiles[-1]] * (-len(tiles) % 4)
    return torch.stack(tiles).reshape(-1, NOPE)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("dtype", SRC_DTYPES)
def test_write_of_tiles_at_every_amax_exponent_is_bit_exact(path, rule, dtype):
    _path_available(path)
    nope = amax_sweep_nope(dtype)
    n = nope.shape[0]
    rope = make_rope(n, dtype)
    kv = poisoned(n + 5)
    loc = torch.randperm(n + 5, generator=torch.Generator().manual_seed(1))[:n].to(DEVICE)
    expected = expected_buffer(kv, loc, quantize_mla_rows(nope, rope, "ds_mla", ds_mla_scale_rule=rule))
    write_via(path, kv, loc, nope.to(DEVICE), rope.to(DEVICE), rule)
    assert_bytes_equal(kv, expected)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rule", RULES)
def test_write_with_strided_loc_and_sources_is_bit_exact(path, rule):
    _path_available(path)
    g = torch.Generator().manual_seed(11)
    wide = (torch.randn(6, NOPE + 64, generator=g) * 10).bfloat16()
    wide[2, 128:256] = 0.0
    nope = wide[:, :NOPE].to(DEVICE)  # rows strided by 576 values
    rope = torch.randn(6, 2 * ROPE, generator=g).bfloat16()[:, ::2].contiguous()[:, :ROPE].to(DEVICE)
    loc = torch.tensor([4, 0, 11, 2, 8, 6, -1, 1, 3, 5, 10, 7], device=DEVICE)[::2]  # stride 2
    kv = poisoned(12)
    rows = quantize_mla_rows(nope.cpu(), rope.cpu(), "ds_mla", ds_mla_scale_rule=rule)
    expected = expected_buffer(kv, loc, rows)
    write_via(path, kv, loc, nope, rope, rule)
    assert_bytes_equal(kv, expected)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rule", RULES)
def test_write_of_no_rows_writes_nothing(path, rule):
    _path_available(path)
    kv = poisoned(4)
    before = kv.cpu().clone()
    empty = torch.empty(0, NOPE, dtype=torch.bfloat16, device=DEVICE)
    write_via(path, kv, torch.empty(0, dtype=torch.int64, device=DEVICE), empty, empty[:, :ROPE], rule)
    assert torch.equal(kv.cpu(), before)


@pytest.mark.parametrize("rule", RULES)
def test_cpu_write_refuses_a_slot_past_the_buffer_before_writing(rule):
    kv = poisoned(4, device="cpu")
    before = kv.clone()
    nope, rope = edge_nope(torch.bfloat16)[:2], make_rope(2, torch.bfloat16)
    with pytest.raises(IndexError):
        set_mla_kv_buffer_quant(kv, torch.tensor([0, 4]), nope, rope, "ds_mla", ds_mla_scale_rule=rule)
    assert torch.equal(kv, before)


def test_write_refuses_an_unknown_rule_before_writing():
    kv = poisoned(4)
    before = kv.cpu().clone()
    nope, rope = edge_nope(torch.bfloat16)[:1].to(DEVICE), make_rope(1, torch.bfloat16).to(DEVICE)
    with pytest.raises(ValueError, match="ds_mla_scale_rule"):
        set_mla_kv_buffer_quant(kv, torch.tensor([1], device=DEVICE), nope, rope, "ds_mla", ds_mla_scale_rule="pow2")
    assert torch.equal(kv.cpu(), before)


# ---- the fused RoPE write ------------------------------------------------------------------------
def _rope_case(n: int, dtype: torch.dtype, seed: int = 0, device=DEVICE) -> dict:
    g = torch.Generator().manual_seed(seed)
    nope = torch.cat([edge_nope(dtype, seed), (torch.randn(max(0, n - 8), NOPE, generator=g) * 5).to(dtype)])[:n]
    ang = torch.arange(64, dtype=torch.float64)[:, None] * (torch.rand(ROPE // 2, generator=g, dtype=torch.float64) + 0.1)
    return dict(
        kv_buffer=poisoned(3 * n + 8, device=device),
        loc=(torch.randperm(3 * n, generator=g)[:n] + 8).to(device),
        k_nope=nope.to(device),
        k_pe=make_rope(n, dtype, seed + 1).to(device),
        positions=torch.randint(0, 64, (n,), generator=g).to(device),
        cos_sin_cache=torch.cat([ang.cos(), ang.sin()], dim=1).float().to(device),
    )


def _rope_call(c: dict, rule: str, is_neox: bool, kv=None) -> RopeWriteCall:
    return RopeWriteCall(kv if kv is not None else c["kv_buffer"], c["loc"], c["k_nope"], c["k_pe"], c["positions"],
                         c["cos_sin_cache"], is_neox, "ds_mla", ds_mla_scale_rule=rule)  # fmt: skip


@pytest.mark.parametrize("rule", RULES)
def test_rope_reference_is_rotate_then_the_rules_quantizer(rule):
    c = _rope_case(8, torch.bfloat16, device="cpu")
    c["loc"][1] = -1
    kv = c["kv_buffer"].clone()
    set_mla_kv_buffer_rope_torch(_rope_call(c, rule, False, kv))
    k_rot = rope_rotate_torch(c["k_pe"], c["positions"], c["cos_sin_cache"], False)
    rows = quantize_mla_rows(c["k_nope"], k_rot, "ds_mla", ds_mla_scale_rule=rule)
    assert_bytes_equal(kv, expected_buffer(c["kv_buffer"], c["loc"], rows))


@pytest.mark.parametrize("path", ROPE_PATHS)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("dtype", SRC_DTYPES)
@pytest.mark.parametrize("is_neox", [False, True], ids=["interleaved", "neox"])
def test_rope_write_kernels_are_bit_exact(path, rule, dtype, is_neox):
    if path == "triton" and not HAS_CUDA and (dtype, is_neox) != (torch.bfloat16, False):
        pytest.skip("the interpreter runs one source dtype and style per rule (the GPU runs all)")
    c = _rope_case(8 if not HAS_CUDA else 256, dtype)
    c["loc"][2] = -1
    want = c["kv_buffer"].cpu().clone()
    cpu = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in c.items()}
    set_mla_kv_buffer_rope_torch(_rope_call(cpu, rule, is_neox, want))
    if path == "triton":
        from mlakv.kernels.triton.rope_write import launch_rope_write

        launch_rope_write(_rope_call(c, rule, is_neox))
    else:
        from mlakv.kernels.cuda.rope_write import rope_write_cuda

        assert rope_write_cuda(_rope_call(c, rule, is_neox)), "the JIT kernel refused an aligned call"
    assert_bytes_equal(c["kv_buffer"], want)


@pytest.mark.parametrize("rule", RULES)
def test_rope_op_takes_the_rule(rule):
    c = _rope_case(8, torch.bfloat16)
    want = c["kv_buffer"].cpu().clone()
    cpu = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in c.items()}
    set_mla_kv_buffer_rope_torch(_rope_call(cpu, rule, False, want))
    set_mla_kv_buffer_rope(c["kv_buffer"], c["loc"], c["k_nope"], c["k_pe"], c["positions"], c["cos_sin_cache"], False,
                           kv_cache_format="ds_mla", ds_mla_scale_rule=rule)  # fmt: skip
    assert_bytes_equal(c["kv_buffer"], want)


def test_rope_op_refuses_an_unknown_rule():
    c = _rope_case(2, torch.bfloat16)
    with pytest.raises(ValueError, match="ds_mla_scale_rule"):
        set_mla_kv_buffer_rope(c["kv_buffer"], c["loc"], c["k_nope"], c["k_pe"], c["positions"], c["cos_sin_cache"],
                               False, kv_cache_format="ds_mla", ds_mla_scale_rule="amax")  # fmt: skip


# ---- the pool ------------------------------------------------------------------------------------
def _pool(rule: str = "fp32_floor"):
    from mlakv.mem_cache import MLATokenToKVPool

    return MLATokenToKVPool(60, 4, torch.float8_e4m3fn, NOPE, ROPE, 2, DEVICE, kv_cache_format="ds_mla",
                            ds_mla_scale_rule=rule)  # fmt: skip


@pytest.mark.parametrize("rule", RULES)
def test_pool_writes_its_rule(rule):
    pool = _pool(rule)
    assert pool.ds_mla_scale_rule == rule
    buf = pool.kv_buffer[1]
    buf.copy_(torch.randint(0, 256, buf.shape, dtype=torch.uint8))
    before = buf.cpu().reshape(buf.shape[0], -1).clone()
    nope, rope = edge_nope(torch.bfloat16), make_rope(8, torch.bfloat16)
    loc = torch.tensor([9, 0, 33, -1, 12, 40, 61, 5], device=DEVICE)  # 0: the reserved slot, skipped
    pool.set_kv_buffer(1, loc, nope.to(DEVICE), rope.to(DEVICE))
    rows = quantize_mla_rows(nope, rope, "ds_mla", ds_mla_scale_rule=rule)
    assert_bytes_equal(buf.reshape(buf.shape[0], -1), expected_buffer(before, loc, rows, skip=0))
    got_n, got_r = pool.get_mla_kv_buffer(1, loc.clamp(min=1), torch.float32)
    ref_n, ref_r = dequantize_mla_rows(buf.cpu()[loc.cpu().clamp(min=1)], "ds_mla", NOPE, ROPE, dst_dtype=torch.float32)
    assert torch.equal(got_n.cpu().view(torch.int32), ref_n.view(torch.int32))
    assert torch.equal(got_r.cpu().view(torch.int32), ref_r.view(torch.int32))


@pytest.mark.parametrize("rule", RULES)
def test_pool_rope_write_takes_its_rule(rule):
    pool = _pool(rule)
    c = _rope_case(8, torch.bfloat16)
    buf = pool.kv_buffer[0]
    want = buf.cpu().reshape(buf.shape[0], -1).clone()
    loc = torch.tensor([3, 8, 0, 20, 7, 31, 1, 50], device=DEVICE)
    cpu = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in c.items()}
    call = RopeWriteCall(want, loc.cpu(), cpu["k_nope"], cpu["k_pe"], cpu["positions"], cpu["cos_sin_cache"], True,
                         "ds_mla", skip_index=0, ds_mla_scale_rule=rule)  # fmt: skip
    set_mla_kv_buffer_rope_torch(call)
    pool.set_kv_buffer_rope(0, loc, c["k_nope"], c["k_pe"], c["positions"], c["cos_sin_cache"], True)
    assert_bytes_equal(buf.reshape(buf.shape[0], -1), want)


def test_pool_default_is_fp32_floor():
    from mlakv.mem_cache import MLATokenToKVPool

    pool = MLATokenToKVPool(60, 4, torch.float8_e4m3fn, NOPE, ROPE, 1, DEVICE, kv_cache_format="ds_mla")
    assert pool.ds_mla_scale_rule == "fp32_floor"


def test_pool_refuses_an_unknown_rule():
    with pytest.raises(ValueError, match="ds_mla_scale_rule must be one of"):
        _pool("pow2")


@pytest.mark.parametrize("fmt,dtype", [(None, torch.bfloat16), ("per_tensor", torch.float8_e4m3fn)])
def test_pool_refuses_a_rule_for_another_format(fmt, dtype):
    from mlakv.mem_cache import MLATokenToKVPool

    kw = {"k_scale": 1.0} if fmt == "per_tensor" else {}
    with pytest.raises(ValueError, match="applies to kv_cache_format='ds_mla' only"):
        MLATokenToKVPool(60, 4, dtype, NOPE, ROPE, 1, DEVICE, kv_cache_format=fmt, ds_mla_scale_rule="ue8m0", **kw)


def test_dsa_pool_passes_the_rule_to_its_mla_rows():
    from mlakv.mem_cache import DSATokenToKVPool

    pool = DSATokenToKVPool(60, 64, torch.float8_e4m3fn, NOPE, ROPE, 1, DEVICE, kv_cache_format="ds_mla",
                            ds_mla_scale_rule="fp32")  # fmt: skip
    nope, rope = edge_nope(torch.bfloat16)[:2], make_rope(2, torch.bfloat16)
    loc = torch.tensor([70, 3], device=DEVICE)
    pool.set_kv_buffer(0, loc, nope.to(DEVICE), rope.to(DEVICE))
    rows = quantize_mla_rows(nope, rope, "ds_mla", ds_mla_scale_rule="fp32")
    assert torch.equal(pool.kv_buffer[0].cpu()[loc.cpu(), 0, :ROW], rows)


# ---- the vLLM face keeps vLLM's rule --------------------------------------------------------------
def test_vllm_face_writes_fp8_ds_mla_with_ue8m0():
    from mlakv.compat import vllm as V

    nope, rope = edge_nope(torch.bfloat16)[:4], make_rope(4, torch.bfloat16)
    cache = torch.randint(0, 256, (2, 4, ROW), dtype=torch.uint8).to(DEVICE)
    slots = torch.tensor([6, 0, 3, 5], device=DEVICE)
    V.concat_and_cache_mla(nope.to(DEVICE), rope.to(DEVICE), cache, slots, "fp8_ds_mla", torch.tensor(1.0, device=DEVICE))
    want = quantize_mla_rows(nope, rope, "ds_mla", ds_mla_scale_rule="ue8m0")
    assert torch.equal(cache.cpu().reshape(-1, ROW)[slots.cpu()], want)


# ---- the benchmark's table of the rules -----------------------------------------------------------
def test_fp8_bench_prints_the_write_of_each_rule():
    from mlakv.bench.fp8_bench import format_tables

    res = {"device": "test", "copy_gbs": 4000.0, "write": [], "gather": [],
           "rules": [{"rule": r, "n_loc": 64, "jit": 2.0, "triton": 3.0, "bound": 1.0} for r in RULES]}  # fmt: skip
    text = format_tables(res)
    assert "write ds_mla by tile-scale rule" in text
    for r in RULES:
        assert f"| {r} | 64 | 2.00 | 3.00 | 1.00 | 1.50x | 2.00x |" in text


# ---- the CUDA sources build, with every rule (no GPU needed) ------------------------------------
@pytest.fixture(scope="module")
def built_modules():
    """The ds_mla modules of the FP8 write and of the fused RoPE write for sm_90a (the names test_fp8 and
    test_rope_write build, so the disk cache serves a run of all three), or why they cannot be built."""
    from mlakv.jit_kernel import JitUnavailable
    from mlakv.kernels.cuda.fp8 import build_mla_fp8_module
    from mlakv.kernels.cuda.rope_write import build_rope_write_module

    out = {}
    with sm90a_build_env():
        for name, build in (("fp8", lambda: build_mla_fp8_module("ds_mla", NOPE, ROPE, True, (9, 0))),
                            ("rope", lambda: build_rope_write_module("ds_mla", torch.bfloat16, NOPE, ROPE, True, (9, 0)))):  # fmt: skip
            try:
                out[name] = build()
            except JitUnavailable as e:
                out[name] = e
    return out


def _module(built_modules, name):
    mod = built_modules[name]
    if isinstance(mod, Exception):
        pytest.fail(str(mod))
    return mod


@pytest.mark.jit_build
@pytest.mark.parametrize("rule", [0, 1, 2])
def test_fp8_module_serves_every_rule_code(built_modules, rule):

    mod = _module(built_modules, "fp8")
    kv, loc = FakeCudaTensor((12, WIDTH), torch.uint8), FakeCudaTensor((0,), torch.int64)
    srcs = FakeCudaTensor((0, NOPE), torch.bfloat16), FakeCudaTensor((0, ROPE), torch.bfloat16)
    assert mod.mla_fp8_quant(kv, loc, *srcs, FakeCudaTensor((1,), torch.float32), -1, 8, False, rule, 32) is True


@pytest.mark.jit_build
@pytest.mark.parametrize("rule", [-1, 3])
def test_fp8_module_refuses_an_unknown_rule_code(built_modules, rule):

    mod = _module(built_modules, "fp8")
    kv, loc = FakeCudaTensor((12, WIDTH), torch.uint8), FakeCudaTensor((0,), torch.int64)
    srcs = FakeCudaTensor((0, NOPE), torch.bfloat16), FakeCudaTensor((0, ROPE), torch.bfloat16)
    with pytest.raises(ValueError, match="scale_rule must be 0"):
        mod.mla_fp8_quant(kv, loc, *srcs, FakeCudaTensor((1,), torch.float32), -1, 8, False, rule, 32)


def _fake_rope_args():

    cs = FakeCudaTensor((16, ROPE), torch.float32)
    return [FakeCudaTensor((12, WIDTH), torch.uint8), FakeCudaTensor((0,), torch.int64),
            FakeCudaTensor((0, NOPE), torch.bfloat16), FakeCudaTensor((0, ROPE), torch.bfloat16),
            FakeCudaTensor((0,), torch.int64), cs, cs, False, cs, cs, cs, cs, False, -1, 1, 0, 4, False]  # fmt: skip


@pytest.mark.jit_build
@pytest.mark.parametrize("rule", [0, 1, 2])
def test_rope_module_serves_every_rule_code(built_modules, rule):
    assert _module(built_modules, "rope").rope_write(*_fake_rope_args(), rule) is True


@pytest.mark.jit_build
def test_rope_module_refuses_an_unknown_rule_code(built_modules):
    with pytest.raises(ValueError, match="scale_rule must be 0"):
        _module(built_modules, "rope").rope_write(*_fake_rope_args(), 7)


# ---- GPU only ------------------------------------------------------------------------------------
@requires_sm90
@pytest.mark.parametrize("rule", RULES)
def test_gpu_dispatcher_serves_every_rule_with_the_jit_kernel(rule, monkeypatch):
    import mlakv.kernels.triton.fp8 as triton_fp8

    def triton_ran(*args, **kwargs):
        raise AssertionError("the dispatcher fell back to Triton")

    monkeypatch.setattr(triton_fp8, "launch_quant_write", triton_ran)
    nope, rope = edge_nope(torch.bfloat16), make_rope(8, torch.bfloat16)
    kv = poisoned(12)
    loc = torch.arange(8, device=DEVICE) + 2
    assert fp8_write_path(kv, nope.to(DEVICE), rope.to(DEVICE), "ds_mla") == "jit"
    expected = expected_buffer(kv, loc, quantize_mla_rows(nope, rope, "ds_mla", ds_mla_scale_rule=rule))
    set_mla_kv_buffer_quant(kv, loc, nope.to(DEVICE), rope.to(DEVICE), "ds_mla", ds_mla_scale_rule=rule)
    assert_bytes_equal(kv, expected)


@requires_cuda
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("dtype", SRC_DTYPES)
def test_gpu_every_path_agrees_on_many_rows(rule, dtype):
    """4096 rows (random magnitudes from 1e-30 to 1e30 where the dtype holds them, the edge rows
    every 512 rows): every GPU path against the CPU reference."""
    g = torch.Generator().manual_seed(21)
    lo, hi = (-69.0, 69.0) if dtype == torch.bfloat16 else (-9.0, 9.0)
    nope = (torch.randn(4096, NOPE, generator=g) * torch.exp(torch.empty(4096, 1).uniform_(lo, hi, generator=g))).to(dtype)
    for k in range(0, 4096, 512):
        nope[k : k + 8] = edge_nope(dtype, seed=k)
    rope = make_rope(4096, dtype)
    loc = torch.randperm(5000, generator=g)[:4096]
    loc[::97] = -1
    rows = quantize_mla_rows(nope, rope, "ds_mla", ds_mla_scale_rule=rule)
    for path in [p for p in PATHS if p != "torch"]:
        kv = poisoned(5000)
        expected = expected_buffer(kv, loc, rows)
        write_via(path, kv, loc.to(DEVICE), nope.to(DEVICE), rope.to(DEVICE), rule)
        torch.cuda.synchronize()
        try:
            assert_bytes_equal(kv, expected)
        except AssertionError as e:
            raise AssertionError(f"path {path}: {e}") from None
