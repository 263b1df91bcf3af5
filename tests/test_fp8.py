"""FP8 KV cache: the formats (per_tensor, ds_mla), the fused quantizing write and the dequantizing gather.

Spec: :mod:`mlakv.ops.fp8`. The reference quantizer is checked against an independent
nearest-value table of e4m3; every path (torch on CPU, Triton under the interpreter on CPU and on
the GPU, the JIT CUDA kernel on SM90+) is checked bit-exactly against the reference, on fresh
random inputs, with a poisoned destination so unwritten or misplaced rows show.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import (
    compile_in_subprocess,
    DEVICE,
    e4m3_pair_repacks,
    FakeCudaTensor,
    HAS_CUDA,
    IS_SM90,
    requires_cuda,
    requires_sm90,
    sm90a_build_env,
    stale_e4m3_merges,
)

from mlakv.spec.rules import DS_MLA_SCALE_RULES
from mlakv.spec.tuning import FP8_JIT_PACKED
from mlakv.ops.fp8 import (
    E4M3_MAX,
    FLT_MIN,
    dequantize_mla_rows,
    fp8_row_bytes,
    fp8_write_path,
    get_mla_kv_buffer_dequant,
    quantize_mla_rows,
    scale_tensor,
    set_mla_kv_buffer_quant,
    validate_quant_write,
)

# The interpreter computes in numpy, which warns on what the inputs are chosen to do (inf / inf,
# overflow to inf, NaN casts); the results are checked bit for bit instead.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

FORMATS = ["per_tensor", "ds_mla"]
SRC_DTYPES = [torch.bfloat16, torch.float16]
DST_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
NOPE, ROPE = 512, 64
K_SCALE = 0.0625 * 3  # not a power of two: the division really rounds
# Triton-interpreter runs are slow on CPU: keep their sizes small there.
# "triton-portable": the Triton kernels with their integer-arithmetic conversions (the interpreter's
# and pre-sm_89 GPUs' code), forced on a GPU that has the hardware ones; on the CPU "triton" is that code.
PATHS = ["torch", "triton"] + (["triton-portable"] if HAS_CUDA else []) + (["jit"] if IS_SM90 else [])
N_LOCS = [0, 1, 7, 257, 4096]
CPU_TRITON_MAX_N = 7


# ---- references -------------------------------------------------------------------------------
def e4m3_table_encode(y: torch.Tensor) -> torch.Tensor:
    """Independent e4m3 spec: the nearest of the 127 finite magnitudes, ties to the even code,
    saturating at 448; NaN -> 0x7F. ``y`` fp32 (any device; computed on the CPU) -> uint8 (CPU)."""
    y = y.detach().cpu()
    codes = torch.arange(0, 0x7F, dtype=torch.uint8)
    mags = codes.view(torch.float8_e4m3fn).double()  # increasing in the code
    a = y.double().abs().clamp(max=E4M3_MAX)
    hi = torch.searchsorted(mags, a).clamp(max=0x7E)
    lo = (hi - 1).clamp(min=0)
    d_lo, d_hi = a - mags[lo], mags[hi] - a
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
    code = torch.where(pick_hi, hi, lo).to(torch.uint8)
    code = torch.where(y < 0, code | 0x80, code)
    code = torch.where(torch.signbit(y) & (y == 0), torch.full_like(code, 0x80), code)
    return torch.where(torch.isnan(y), torch.full_like(code, 0x7F), code)


def ieee_div_fp32(a: torch.Tensor, b: float) -> torch.Tensor:
    """``a / b`` correctly rounded to fp32, on the CPU: Python's double quotient of each value, then
    one RNE rounding to fp32 (exact for division: 53 >= 2 * 24 + 2 bits). Independent of torch's
    CUDA ``tensor / scalar``, which multiplies by the reciprocal and is off by one ulp at times."""
    q = [x / b for x in a.detach().cpu().double().flatten().tolist()]
    return torch.tensor(q, dtype=torch.float64).float().reshape(a.shape)


def expected_buffer(kv: torch.Tensor, loc: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Row-by-row scatter of reference rows: padding and out-of-range slots are skipped."""
    out = kv.detach().cpu().view(torch.uint8).clone().reshape(kv.shape[0], -1)
    rows = rows.cpu().view(torch.uint8)
    for i, slot in enumerate(loc.cpu().tolist()):
        if 0 <= slot < out.shape[0]:
            out[slot, : rows.shape[1]] = rows[i]
    return out


def make_sources(n: int, dtype: torch.dtype, magnitude: float = 1.0, device=DEVICE, seed: int = 0):
    """Fresh random rows; each row gets its own magnitude in [magnitude/10, magnitude*10]."""
    g = torch.Generator().manual_seed(seed)
    row_mag = magnitude * torch.exp(torch.empty(n, 1).uniform_(-math.log(10), math.log(10), generator=g))
    nope = (torch.randn(n, NOPE, generator=g) * row_mag).to(dtype)
    rope = (torch.randn(n, ROPE, generator=g) * row_mag).to(dtype)
    return nope.to(device), rope.to(device)


def poisoned(num_slots: int, width: int, device=DEVICE, three_d: bool = False) -> torch.Tensor:
    buf = torch.randint(0, 256, (num_slots, width), dtype=torch.uint8).to(device)
    return buf.view(num_slots, 1, width) if three_d else buf


def k_scale_for(fmt: str, device=DEVICE):
    return scale_tensor(K_SCALE, torch.device(device)) if fmt == "per_tensor" else None


def write_via(path: str, kv, loc, nope, rope, fmt, k_scale) -> None:
    """Run one path directly (the dispatcher picks torch on CPU; the others are forced here)."""
    if path == "torch":
        set_mla_kv_buffer_quant(kv, loc, nope, rope, fmt, k_scale)
        return
    n_loc, scale = validate_quant_write(kv, loc, nope, rope, fmt, k_scale)
    if path.startswith("triton"):
        from mlakv.kernels.triton.fp8 import launch_quant_write

        launch_quant_write(kv, loc, nope, rope, fmt, scale, native=False if path == "triton-portable" else None)
    else:
        from mlakv.kernels.cuda.fp8 import fp8_jit_write

        assert fp8_jit_write(kv, loc, nope, rope, fmt, scale), "the JIT kernel refused an aligned call"


def path_available(path: str, n: int) -> None:
    if path == "torch" and HAS_CUDA:
        pytest.skip("the torch path is the CPU path")
    if path == "triton" and not HAS_CUDA and n > CPU_TRITON_MAX_N:
        pytest.skip(f"Triton interpreter on CPU: n_loc > {CPU_TRITON_MAX_N} only on the GPU")


def assert_rows_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    a = actual.detach().cpu().view(torch.uint8).reshape(expected.shape)
    if not torch.equal(a, expected):
        bad = (a != expected).any(dim=1).nonzero().flatten()
        raise AssertionError(f"{bad.numel()} rows differ, first: {bad[:8].tolist()}")


def bits_of(t: torch.Tensor) -> torch.Tensor:
    return t.cpu().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


# ---- the formats --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fmt,nope,rope,expected",
    [("ds_mla", 512, 64, 656), ("per_tensor", 512, 64, 576), ("ds_mla", 128, 64, 260), ("ds_mla", 256, 32, 328)],
)
def test_row_bytes(fmt, nope, rope, expected):
    assert fp8_row_bytes(fmt, nope, rope) == expected


@pytest.mark.parametrize("scale", [1.0, K_SCALE, 2.0**-4, 7.3])
def test_e4m3_rounding_matches_the_nearest_value_table_for_every_fp16(scale):
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    n = every.numel() // (NOPE + ROPE)
    x = every[: n * (NOPE + ROPE)].reshape(n, NOPE + ROPE)
    rows = quantize_mla_rows(x[:, :NOPE], x[:, NOPE:], "per_tensor", scale)
    y = x.float() / torch.tensor(scale, dtype=torch.float32)
    assert torch.equal(rows.view(torch.uint8), e4m3_table_encode(y))


@pytest.mark.parametrize("dtype", SRC_DTYPES)
def test_ds_mla_row_layout(dtype):
    """The reference runs on DEVICE (on the GPU too); the expected bytes are computed on the CPU."""
    nope, rope = make_sources(64, dtype, seed=1)
    nope[2, 128:256] = 0  # one all-zero tile
    rows = quantize_mla_rows(nope, rope, "ds_mla").cpu()
    nope, rope = nope.cpu(), rope.cpu()
    assert rows.dtype == torch.uint8 and rows.shape == (64, 656)
    scales = rows[:, 512:528].contiguous().view(torch.float32)
    amax = nope.float().reshape(64, 4, 128).abs().amax(dim=2)
    assert torch.equal(scales, torch.clamp_min(ieee_div_fp32(amax, E4M3_MAX), FLT_MIN))  # IEEE, not x * (1/448)
    assert scales[2, 1].item() == FLT_MIN
    y = nope.float().reshape(64, 4, 128) / scales[:, :, None]
    assert torch.equal(rows[:, :512], e4m3_table_encode(y).reshape(64, 512))
    assert torch.equal(rows[:, 528:].contiguous().view(torch.bfloat16), rope.to(torch.bfloat16))
    deq, _ = dequantize_mla_rows(rows, "ds_mla", NOPE, ROPE)
    assert torch.equal(bits_of(deq[2, 128:256]), torch.zeros(128, dtype=torch.int16))  # exact +0.0


@requires_cuda
@pytest.mark.parametrize("fmt", FORMATS)
def test_gpu_reference_gives_the_cpu_bytes(fmt):
    """quantize_mla_rows is the spec on any device: on CUDA it must not pick up torch's
    ``tensor / scalar`` reciprocal shortcut. 64 rows hold amax values where the shortcut is off."""
    nope, rope = make_sources(64, torch.bfloat16, seed=1)
    amax = nope.cpu().float().reshape(64, 4, 128).abs().amax(dim=2)
    assert not torch.equal(ieee_div_fp32(amax, E4M3_MAX), amax * (1 / E4M3_MAX))  # the data shows the difference
    on_device = quantize_mla_rows(nope, rope, fmt, k_scale_for(fmt)).view(torch.uint8).cpu()
    on_cpu = quantize_mla_rows(nope.cpu(), rope.cpu(), fmt, k_scale_for(fmt, "cpu")).view(torch.uint8)
    assert torch.equal(on_device, on_cpu)


@pytest.mark.parametrize("fmt", FORMATS)
def test_all_zero_rows_store_zeros_and_dequantize_to_zeros(fmt):
    z = torch.zeros(3, NOPE, dtype=torch.bfloat16), torch.zeros(3, ROPE, dtype=torch.bfloat16)
    rows = quantize_mla_rows(*z, fmt, k_scale_for(fmt, "cpu")).view(torch.uint8)
    assert not rows[:, :NOPE].any()
    nope, rope = dequantize_mla_rows(rows, fmt, NOPE, ROPE, k_scale_for(fmt, "cpu"))
    assert not bits_of(nope).any() and not bits_of(rope).any()


def test_nonfinite_values_do_not_set_the_tile_scale():
    """ds_mla policy: amax over finite values only; NaN -> 0x7F, +-inf -> +-448 (0x7E/0xFE)."""
    nope, rope = make_sources(1, torch.bfloat16, seed=2)
    nope[0, 3:6] = 0.01  # not the tile's largest value
    clean = quantize_mla_rows(nope, rope, "ds_mla")
    nope[0, 3], nope[0, 4], nope[0, 5] = float("nan"), float("inf"), -float("inf")
    rows = quantize_mla_rows(nope, rope, "ds_mla")
    finite = torch.isfinite(nope[0, :128].float())
    amax = nope[0, :128].float()[finite].abs().max()
    assert rows[0, 512:516].view(torch.float32).item() == max(ieee_div_fp32(amax, E4M3_MAX).item(), FLT_MIN)
    assert rows[0, 3] == 0x7F and rows[0, 4] == 0x7E and rows[0, 5] == 0xFE
    others = torch.ones(656, dtype=torch.bool)
    others[3:6] = False
    assert torch.equal(rows[0, others], clean[0, others])  # the scale and every other byte unchanged
    deq, _ = dequantize_mla_rows(rows, "ds_mla", NOPE, ROPE, dst_dtype=torch.float32)
    s = rows[0, 512:516].view(torch.float32).item()
    top = (torch.tensor(448.0) * torch.tensor(s)).item()  # the fp32 product, as dequantized
    assert math.isnan(deq[0, 3].item()) and deq[0, 4].item() == top and deq[0, 5].item() == -top


def test_nonfinite_only_tile_gets_flt_min():
    nope = torch.zeros(1, NOPE, dtype=torch.bfloat16)
    rope = torch.zeros(1, ROPE, dtype=torch.bfloat16)
    nope[0, :128] = float("inf")
    nope[0, 7] = float("nan")
    rows = quantize_mla_rows(nope, rope, "ds_mla")
    assert rows[0, 512:516].view(torch.float32).item() == FLT_MIN
    assert rows[0, 7] == 0x7F and (rows[0, :7] == 0x7E).all()


def test_per_tensor_nonfinite():
    x = torch.tensor([[float("nan"), -float("nan"), float("inf"), -float("inf"), 1e30, -1e30, -0.0, 0.0]])
    nope = torch.cat([x, torch.ones(1, NOPE - 8)], 1).to(torch.bfloat16)
    rows = quantize_mla_rows(nope, torch.ones(1, ROPE, dtype=torch.bfloat16), "per_tensor", 1.0).view(torch.uint8)
    assert rows[0, :8].tolist() == [0x7F, 0x7F, 0x7E, 0xFE, 0x7E, 0xFE, 0x80, 0x00]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("magnitude", [1e-3, 1.0, 1e3])
def test_dequant_error_within_the_e4m3_bound(fmt, magnitude):
    """|deq - x| <= scale * ulp_e4m3(x / scale) / 2 where |x / scale| <= 448, plus the fp32 rounding
    of the division and of the product (a few fp32 ulps of |x|)."""
    nope, rope = make_sources(16, torch.bfloat16, magnitude, device="cpu", seed=3)
    k_scale = magnitude / 100 if fmt == "per_tensor" else None
    rows = quantize_mla_rows(nope, rope, fmt, k_scale)
    deq, deq_rope = dequantize_mla_rows(rows, fmt, NOPE, ROPE, k_scale, dst_dtype=torch.float32)
    x = nope.float()
    if fmt == "ds_mla":
        scale = rows.view(torch.uint8)[:, 512:528].contiguous().view(torch.float32).repeat_interleave(128, dim=1)
        assert torch.equal(deq_rope, rope.float())  # rope is stored as bf16: exact
    else:
        scale = torch.full_like(x, torch.tensor(k_scale, dtype=torch.float32).item())
    y = x / scale
    in_range = y.abs() <= E4M3_MAX
    # ulp of e4m3 at |y|: 2^(floor(log2|y|) - 3) for normals, 2^-9 below 2^-6
    e = torch.floor(torch.log2(y.abs().clamp(min=2.0**-6)))
    ulp = torch.exp2(e - 3)
    err = (deq - x).abs()
    bound = scale * ulp / 2 + x.abs() * 2.0**-21
    assert (err[in_range] <= bound[in_range]).all()
    assert in_range.float().mean() > 0.5


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dst", DST_DTYPES)
def test_dequantize_rounds_fp32_to_the_destination(fmt, dst):
    nope, rope = make_sources(4, torch.float16, device="cpu", seed=4)
    k = k_scale_for(fmt, "cpu")
    rows = quantize_mla_rows(nope, rope, fmt, k)
    f32 = dequantize_mla_rows(rows, fmt, NOPE, ROPE, k, dst_dtype=torch.float32)
    out = dequantize_mla_rows(rows, fmt, NOPE, ROPE, k, dst_dtype=dst)
    assert out[0].dtype == dst and torch.equal(out[0], f32[0].to(dst)) and torch.equal(out[1], f32[1].to(dst))


@pytest.mark.parametrize("n", [3, 0])
@pytest.mark.parametrize("spare", [1, 3], ids=["odd-row-stride-1", "odd-row-stride-3"])
@pytest.mark.parametrize("fmt,nope_dim,rope_dim", [("ds_mla", 128, 0), ("ds_mla", 256, 24), ("per_tensor", 512, 0),
                                                   ("per_tensor", 320, 40)])  # fmt: skip
def test_dequantize_reads_rows_at_any_row_stride(fmt, nope_dim, rope_dim, spare, n):
    """Rows inside a buffer with spare bytes (an odd row stride, as in a cache view) decode to the
    bits of the same rows stored compactly: ds_mla's fp32 scales and bf16 rope are read from the
    bytes whatever the stride, an empty rope (no rope, or no rows) included."""
    g = torch.Generator().manual_seed(41)
    nope = (torch.randn(n, nope_dim, generator=g) * 3).to(torch.bfloat16)
    rope = (torch.randn(n, rope_dim, generator=g) * 3).to(torch.bfloat16)
    k = k_scale_for(fmt, "cpu")
    rows = quantize_mla_rows(nope, rope, fmt, k).view(torch.uint8)
    rb = fp8_row_bytes(fmt, nope_dim, rope_dim)
    buf = poisoned(n, rb + spare, device="cpu")
    buf[:, :rb] = rows
    for dst in DST_DTYPES:
        got = dequantize_mla_rows(buf, fmt, nope_dim, rope_dim, k, dst)
        ref = dequantize_mla_rows(rows.clone(), fmt, nope_dim, rope_dim, k, dst)
        assert got[0].shape == (n, nope_dim) and got[1].shape == (n, rope_dim) and got[1].dtype == dst
        assert torch.equal(bits_of(got[0]), bits_of(ref[0])) and torch.equal(bits_of(got[1]), bits_of(ref[1])), dst


# ---- the write, every path ------------------------------------------------------------------------
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("n_loc", N_LOCS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("src_dtype", SRC_DTYPES)
@pytest.mark.parametrize("loc_dtype", [torch.int32, torch.int64])
def test_quant_write_bit_exact(path, n_loc, fmt, src_dtype, loc_dtype):
    path_available(path, n_loc)
    nope, rope = make_sources(n_loc, src_dtype, seed=n_loc)
    num_slots = n_loc + 9
    loc = torch.randperm(num_slots)[:n_loc].to(loc_dtype)
    loc[::3] = -1  # padding rows
    loc = loc.to(DEVICE)
    kv = poisoned(num_slots, fp8_row_bytes(fmt, NOPE, ROPE) + 16, three_d=True)  # 16 spare bytes: untouched
    k = k_scale_for(fmt)
    expected = expected_buffer(kv, loc, quantize_mla_rows(nope.cpu(), rope.cpu(), fmt, k_scale_for(fmt, "cpu")))
    write_via(path, kv, loc, nope, rope, fmt, k)
    assert_rows_equal(kv, expected)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "scale,src_dtype",
    [(1.0, torch.float16), (K_SCALE, torch.float16), (K_SCALE, torch.bfloat16)]
    # the ends of the kernel's branch-free division (2^-80 and below: the exact __fdiv_rn); powers of
    # two in [2^-126, 2^125] take the product by the exact reciprocal, 2^126 and above divide
    + [(s, torch.bfloat16) for s in (2.0**-80, 2.0**-81, 1e-30, 1e-38, 1e-42, 2.0**100, 3e38)]
    + [(s, torch.bfloat16) for s in (2.0**-126, 0.5, 2.0**125, 2.0**126)],
)
def test_quant_write_every_16bit_value(path, scale, src_dtype):
    """Every fp16/bf16 bit pattern (zeros, subnormals, +-inf, NaNs, both signs) through each path's e4m3 rounding."""
    if path == "torch" and HAS_CUDA:
        pytest.skip("the torch path is the CPU path")
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(src_dtype)
    n = every.numel() // (NOPE + ROPE)
    x = every[: n * (NOPE + ROPE)].reshape(n, NOPE + ROPE)
    k = torch.tensor([scale], device=DEVICE)
    kv = poisoned(n, NOPE + ROPE)
    loc = torch.arange(n, device=DEVICE)
    write_via(path, kv, loc, x[:, :NOPE].to(DEVICE), x[:, NOPE:].to(DEVICE), "per_tensor", k)
    expected = e4m3_table_encode(x.float() / torch.tensor(scale, dtype=torch.float32))
    assert_rows_equal(kv, expected)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("magnitude", [1e-30, 1e-26, 1e-25, 1e-24, 1e-3, 1.0, 1e3, 1e30])
def test_quant_write_magnitudes_and_special_values(path, fmt, magnitude):
    path_available(path, 6)
    nope, rope = make_sources(6, torch.bfloat16, magnitude, seed=5)
    nope[0] = 0
    rope[0] = 0
    nope[1, 200] = magnitude * 1e4  # one huge value in a tile
    nope[2, 3], nope[2, 300], nope[3, 5], rope[3, 7] = float("nan"), float("inf"), -float("inf"), float("nan")
    nope[4, :128] = float("inf")
    loc = torch.tensor([5, 0, 3, 1, 7, -1], device=DEVICE)
    kv = poisoned(8, fp8_row_bytes(fmt, NOPE, ROPE))
    expected = expected_buffer(kv, loc, quantize_mla_rows(nope.cpu(), rope.cpu(), fmt, k_scale_for(fmt, "cpu")))
    write_via(path, kv, loc, nope, rope, fmt, k_scale_for(fmt))
    assert_rows_equal(kv, expected)


def quotients_on_e4m3_boundaries() -> torch.Tensor:
    """Every e4m3 value and every midpoint between neighbours (where RNE ties to the even code), both
    signs: 506 fp32 quotients, each exact with at most 5 significant bits."""
    codes = torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    mids = (codes[:-1] + codes[1:]) / 2
    return torch.cat([mids, codes, -mids, -codes])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("src_dtype", SRC_DTYPES)
@pytest.mark.parametrize("scale", [K_SCALE, 0.5], ids=["scale_not_power_of_two", "scale_power_of_two"])
def test_quant_write_quotients_on_e4m3_rounding_boundaries(path, fmt, src_dtype, scale):
    """Values whose quotient by the scale lies exactly on an e4m3 value or on a tie between two (ds_mla:
    each tile holds +-448 * scale, so its scale is ``scale``): a kernel that rounds an approximate
    quotient would land on the wrong side of a tie. A power-of-two per_tensor scale is the kernels'
    product path (the exact reciprocal)."""
    path_available(path, 2)
    q = quotients_on_e4m3_boundaries()
    width = NOPE + ROPE
    rows = torch.stack([q.repeat(2)[:width], q.flip(0).repeat(2)[:width]])
    if fmt == "ds_mla":
        rows[:, 0:NOPE:128] = torch.tensor([448.0, -448.0, 448.0, -448.0])
    x = (rows * scale).to(src_dtype)
    assert torch.equal(x.float(), rows * scale), "the test's values must be exact in the source dtype"
    nope, rope = x[:, :NOPE].contiguous().to(DEVICE), x[:, NOPE:].contiguous().to(DEVICE)
    loc = torch.tensor([2, 0], device=DEVICE)
    kv = poisoned(3, fp8_row_bytes(fmt, NOPE, ROPE))
    k_cpu, k_dev = (scale_tensor(scale, torch.device(d)) if fmt == "per_tensor" else None for d in ("cpu", DEVICE))
    expected = expected_buffer(kv, loc, quantize_mla_rows(nope.cpu(), rope.cpu(), fmt, k_cpu))
    write_via(path, kv, loc, nope, rope, fmt, k_dev)
    assert_rows_equal(kv, expected)


@pytest.mark.parametrize("path", PATHS)
def test_ds_mla_tile_of_subnormals_keeps_its_values(path):
    """A tile of bf16 values that are fp32 subnormals (amax / 448 < FLT_MIN): its scale is FLT_MIN
    and x / FLT_MIN is a normal e4m3 value, so a path that flushes subnormals to zero (FTZ division)
    writes zeros and fails here; the reference keeps them."""
    path_available(path, 2)
    nope, rope = make_sources(2, torch.bfloat16, seed=15, device="cpu")
    nope[0, 128:256] = (torch.randn(128) * 2.0**-131).to(torch.bfloat16)  # about 2^-131: fp32 subnormals
    nope[1, :128] = -(2.0**-133)
    rows = quantize_mla_rows(nope, rope, "ds_mla")
    assert rows[0, 516:520].view(torch.float32).item() == FLT_MIN and rows[0, 128:256].any()
    assert (rows[1, :128] == 0x84).all()  # -2^-133 / 2^-126 = -2^-7 = -4 * 2^-9: sign, e4m3 subnormal m = 4
    kv = poisoned(4, 656)
    loc = torch.tensor([2, 0], device=DEVICE)
    write_via(path, kv, loc, nope.to(DEVICE), rope.to(DEVICE), "ds_mla", None)
    assert_rows_equal(kv, expected_buffer(kv, loc, rows))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_quant_write_strided_sources_and_strided_loc(path, fmt):
    path_available(path, 5)
    wide_n, wide_r = make_sources(10, torch.float16, seed=6)
    nope = torch.cat([wide_n, wide_n], dim=1)[::2, 8 : 8 + NOPE]  # row stride 2048, offset 8 values
    rope = wide_r[::2]
    loc_store = torch.tensor([4, 99, 0, 99, -1, 99, 6, 99, 2, 99], device=DEVICE)
    loc = loc_store[::2]
    kv = poisoned(8, fp8_row_bytes(fmt, NOPE, ROPE))
    expected = expected_buffer(kv, loc, quantize_mla_rows(nope.cpu(), rope.cpu(), fmt, k_scale_for(fmt, "cpu")))
    write_via(path, kv, loc, nope, rope, fmt, k_scale_for(fmt))
    assert_rows_equal(kv, expected)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_quant_write_expanded_loc_and_sources(path, fmt):
    """Stride-0 loc (all padding) writes nothing; stride-0 sources write the same row everywhere."""
    path_available(path, 4)
    one_n, one_r = make_sources(1, torch.bfloat16, seed=7)
    kv = poisoned(6, fp8_row_bytes(fmt, NOPE, ROPE))
    before = kv.cpu().clone()
    pad = torch.tensor([-1], device=DEVICE).expand(4)
    write_via(path, kv, pad, one_n.expand(4, NOPE), one_r.expand(4, ROPE), fmt, k_scale_for(fmt))
    assert torch.equal(kv.cpu(), before)
    loc = torch.tensor([1, 4, 5, 2], device=DEVICE)
    write_via(path, kv, loc, one_n.expand(4, NOPE), one_r.expand(4, ROPE), fmt, k_scale_for(fmt))
    rows = quantize_mla_rows(one_n.cpu(), one_r.cpu(), fmt, k_scale_for(fmt, "cpu")).view(torch.uint8).expand(4, -1)
    assert_rows_equal(kv, expected_buffer(before, loc, rows))


@pytest.mark.parametrize("fmt", FORMATS)
def test_triton_skips_slots_past_the_buffer(fmt):
    path_available("triton", 3)
    from mlakv.kernels.triton.fp8 import launch_quant_write

    nope, rope = make_sources(3, torch.bfloat16, seed=8)
    kv_all = poisoned(8, fp8_row_bytes(fmt, NOPE, ROPE))
    kv = kv_all[:4]
    before = kv_all.cpu().clone()
    loc = torch.tensor([1, 4, 7], device=DEVICE)
    launch_quant_write(kv, loc, nope, rope, fmt, k_scale_for(fmt))
    rows = quantize_mla_rows(nope.cpu(), rope.cpu(), fmt, k_scale_for(fmt, "cpu"))
    assert_rows_equal(kv_all, expected_buffer(before, loc[:1], rows[:1]))


# Launch shapes of the Triton kernels: (num_warps, rows per program, PDL trigger at entry). 7 rows
# leave a partial last program for 2 and 4 rows per program and fewer rows than one program for 8.
TRITON_SHAPES = [(1, 1, "end"), (2, 2, "entry"), (4, 4, "wait"), (4, 8, "entry"), (2, 4, "end")]


@pytest.mark.parametrize("warps,rows,trigger", TRITON_SHAPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_triton_write_every_launch_shape(fmt, warps, rows, trigger):
    from mlakv.kernels.triton.fp8 import launch_quant_write

    n = 7 if not HAS_CUDA else 1000
    nope, rope = make_sources(n, torch.bfloat16, seed=30)
    loc = torch.randperm(n + 5)[:n]
    loc[1::4] = -1
    loc = loc.to(DEVICE)
    kv = poisoned(n + 5, fp8_row_bytes(fmt, NOPE, ROPE))
    expected = expected_buffer(kv, loc, quantize_mla_rows(nope.cpu(), rope.cpu(), fmt, k_scale_for(fmt, "cpu")))
    launch_quant_write(kv, loc, nope, rope, fmt, k_scale_for(fmt), num_warps=warps, rows_per_program=rows,
                       trigger=trigger)  # fmt: skip
    assert_rows_equal(kv, expected)


@pytest.mark.parametrize("warps,rows,trigger", TRITON_SHAPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_triton_gather_every_launch_shape(fmt, warps, rows, trigger):
    from mlakv.kernels.triton.fp8 import launch_dequant_gather

    n = 7 if not HAS_CUDA else 1000
    kv = poisoned(n + 5, fp8_row_bytes(fmt, NOPE, ROPE))
    loc = torch.randint(-1, n + 5, (n,)).to(DEVICE)
    got = launch_dequant_gather(kv, loc, fmt, NOPE, ROPE, k_scale_for(fmt), torch.bfloat16, num_warps=warps,
                                rows_per_program=rows, trigger=trigger)  # fmt: skip
    rows_c = kv.cpu()[loc.cpu().clamp(min=0)]
    rows_c[loc.cpu() < 0] = 0
    ref = dequantize_mla_rows(rows_c, fmt, NOPE, ROPE, k_scale_for(fmt, "cpu"))
    assert torch.equal(bits_of(got[0]), bits_of(ref[0])) and torch.equal(bits_of(got[1]), bits_of(ref[1]))


# The ds_mla Triton write's fp32_floor path is chosen per program: the common case (every tile's amax in
# [2^-79, 2^109)) or the general rule. Rows whose amax sits on and beside those bounds, or that hold
# inf, NaN or an all-zero tile, share programs with common rows; each row must come out as the reference's.
_COMMON_BOUNDS = [2.0**-79, 2.0**-79 * (1 - 2.0**-8), 2.0**-90, 2.0**-120, 2.0**109 * (1 - 2.0**-8), 2.0**109, 2.0**120,
                  1.5 * 2.0**127, float("inf"), float("nan"), 0.0]  # fmt: skip


@pytest.mark.parametrize("rows", [1, 2, 4, 8])
@pytest.mark.parametrize("special", _COMMON_BOUNDS, ids=["2^-79", "below 2^-79", "2^-90", "2^-120", "below 2^109", "2^109", "2^120", "1.5 * 2^127", "inf", "nan", "zero tile"])
def test_triton_ds_mla_common_case_bounds(special, rows):
    from mlakv.kernels.triton.fp8 import launch_quant_write

    n = 7 if not HAS_CUDA else 301
    nope, rope = make_sources(n, torch.bfloat16, seed=31)
    tile = 1 + (n // 2) % 3  # one tile of one row in the middle of a program
    if special == 0.0:
        nope[n // 2, 128 * tile : 128 * (tile + 1)] = 0.0
    else:
        nope[n // 2, 128 * tile : 128 * (tile + 1)] *= 2.0**-20  # |x| < 2^-14 everywhere but the amax
        nope[n // 2, 128 * tile + 5] = -special
    loc = torch.randperm(n + 3)[:n].to(DEVICE)
    kv = poisoned(n + 3, fp8_row_bytes("ds_mla", NOPE, ROPE))
    expected = expected_buffer(kv, loc, quantize_mla_rows(nope.cpu(), rope.cpu(), "ds_mla"))
    launch_quant_write(kv, loc, nope.to(DEVICE), rope.to(DEVICE), "ds_mla", None, num_warps=2, rows_per_program=rows)
    assert_rows_equal(kv, expected)


# The ds_mla write split over several programs per block of rows (``parts_per_row``): each part
# stores its own tiles, scales and rope columns. Widths: 4 tiles (parts 2, 4), 3 tiles (a request of 2
# or 4 becomes 3 parts of one tile), 2 tiles (4 becomes 2), rope wider than, equal to and narrower
# than the parts (rope 1 over 4 parts: three parts store no rope), no rope.
PART_WIDTHS = [(512, 64), (384, 32), (256, 24), (512, 1), (512, 0), (128, 8)]


@pytest.mark.parametrize("parts", [2, 4])
@pytest.mark.parametrize("nope_dim,rope_dim", PART_WIDTHS)
@pytest.mark.parametrize("spare", [0, 1], ids=["aligned", "odd-row-stride"])
def test_triton_ds_mla_parts_per_row(nope_dim, rope_dim, parts, spare):
    from mlakv.kernels.triton.fp8 import launch_quant_write

    g = torch.Generator().manual_seed(32)
    n = 6 if not HAS_CUDA else 333
    nope = (torch.randn(n, nope_dim, generator=g) * 3).to(torch.bfloat16).to(DEVICE)
    rope = (torch.randn(n, rope_dim, generator=g) * 3).to(torch.bfloat16).to(DEVICE)
    nope[n // 2, nope_dim - 5] = float("inf")  # the last part of one row takes the general rule
    loc = torch.randperm(n + 4)[:n]
    loc[2] = -1
    loc = loc.to(DEVICE)
    kv = poisoned(n + 4, fp8_row_bytes("ds_mla", nope_dim, rope_dim) + spare)
    expected = expected_buffer(kv, loc, quantize_mla_rows(nope.cpu(), rope.cpu(), "ds_mla"))
    launch_quant_write(kv, loc, nope, rope, "ds_mla", None, num_warps=1, rows_per_program=2, parts_per_row=parts)
    assert_rows_equal(kv, expected)


@pytest.mark.parametrize("parts", [2, 4])
@pytest.mark.parametrize("view", ["strided", "expanded"])
def test_triton_ds_mla_parts_read_views_at_their_strides(view, parts):
    """Split rows from views: nope and rope as column slices of one wider tensor (row stride 600, the rope
    at a storage offset) or one row expanded over the call (stride 0), loc read at stride 3."""
    from mlakv.kernels.triton.fp8 import launch_quant_write

    n = 5 if not HAS_CUDA else 150
    g = torch.Generator().manual_seed(34)
    wide = (torch.randn(n, 600, generator=g) * 3).to(torch.bfloat16).to(DEVICE)  # the views are made on the device
    nope, rope = wide[:, 8 : 8 + NOPE], wide[:, 8 + NOPE : 8 + NOPE + ROPE]
    if view == "expanded":
        nope, rope = nope[:1].expand(n, NOPE), rope[:1].expand(n, ROPE)
    slots = torch.randperm(n + 4)[:n]
    loc = torch.full((3 * n,), 10**9, dtype=torch.int64)
    loc[::3] = slots
    loc = loc.to(DEVICE)[::3]
    kv = poisoned(n + 4, fp8_row_bytes("ds_mla", NOPE, ROPE))
    assert nope.stride(0) in (600, 0) and rope.storage_offset() > 0
    expected = expected_buffer(kv, loc, quantize_mla_rows(nope.cpu(), rope.cpu(), "ds_mla"))
    launch_quant_write(kv, loc, nope, rope, "ds_mla", None, num_warps=1, rows_per_program=2, parts_per_row=parts)
    assert_rows_equal(kv, expected)


@pytest.mark.parametrize("rule", list(DS_MLA_SCALE_RULES))
@pytest.mark.parametrize("parts", [2, 4])
def test_triton_ds_mla_parts_under_every_scale_rule(rule, parts):
    from mlakv.kernels.triton.fp8 import launch_quant_write

    n = 5 if not HAS_CUDA else 200
    nope, rope = make_sources(n, torch.bfloat16, seed=33)
    nope[1, 128:256] *= 2.0**-100  # a tiny tile
    loc = torch.randperm(n + 2)[:n].to(DEVICE)
    kv = poisoned(n + 2, fp8_row_bytes("ds_mla", NOPE, ROPE))
    expected = expected_buffer(kv, loc, quantize_mla_rows(nope.cpu(), rope.cpu(), "ds_mla", ds_mla_scale_rule=rule))
    launch_quant_write(kv, loc, nope.to(DEVICE), rope.to(DEVICE), "ds_mla", None, scale_rule=rule, parts_per_row=parts)
    assert_rows_equal(kv, expected)


def test_ds_mla_parts_rows_are_ordered_and_read_back():
    from mlakv.spec.tuning import FP8_TRITON_PARTS, fp8_triton_parts

    steps = FP8_TRITON_PARTS["quant_ds_mla"]
    bounds = [s[0] for s in steps]
    assert bounds[-1] is None and bounds[:-1] == sorted(set(bounds[:-1]))
    low = 1
    for max_n, parts in steps:
        assert parts in (1, 2, 4)
        for n in {low, max_n or low + 10**6}:
            assert fp8_triton_parts("quant_ds_mla", n) == parts
        low = (max_n or 0) + 1
    assert fp8_triton_parts("quant_per_tensor", 512) == fp8_triton_parts("dequant", 512) == 1


def _table_sizes(steps) -> list[int]:
    """Each launch-table row's largest size and the next one (the open row: one past the row before)."""
    out = set()
    for max_n, *_ in steps:
        if max_n is not None:
            out |= {max_n, max_n + 1}
    return sorted(out)


def test_triton_ds_mla_write_through_its_table_at_every_row():
    """No overrides: each row of FP8_TRITON_STEPS / FP8_TRITON_PARTS at the sizes it starts and ends
    (on CPU the rows up to 65 rows), hostile slots, bit-exact."""
    from mlakv.kernels.triton.fp8 import launch_quant_write
    from mlakv.spec.tuning import FP8_TRITON_PARTS, FP8_TRITON_STEPS

    sizes = sorted(set(_table_sizes(FP8_TRITON_STEPS["quant_ds_mla"]) + _table_sizes(FP8_TRITON_PARTS["quant_ds_mla"])))
    for n in sizes if HAS_CUDA else [n for n in sizes if n <= 65]:
        num_slots = n + 40
        loc = hostile_loc(n, num_slots, torch.int64)
        kv = poisoned(num_slots, fp8_row_bytes("ds_mla", NOPE, ROPE))
        nope, rope = make_sources(n, torch.bfloat16, seed=n)
        rows = quantize_mla_rows(nope.cpu(), rope.cpu(), "ds_mla").view(torch.uint8)
        keep = loc.cpu() != SKIP_SLOT
        expected = expected_buffer(kv, loc.cpu()[keep], rows[keep])
        launch_quant_write(kv, loc, nope, rope, "ds_mla", None, SKIP_SLOT)
        assert_rows_equal(kv, expected)


@pytest.mark.parametrize(
    "tiles,wanted,parts", [(4, 1, 1), (4, 2, 2), (4, 4, 4), (4, 8, 4), (4, 3, 2), (3, 2, 1), (3, 4, 3), (2, 4, 2), (6, 4, 3),
                           (6, 2, 1), (1, 4, 1)])  # fmt: skip
def test_ds_mla_parts_give_each_part_a_power_of_two_of_tiles(tiles, wanted, parts):
    from mlakv.kernels.triton.fp8 import ds_mla_parts

    assert ds_mla_parts(tiles, wanted) == parts


# Widths off the fast layout: per_tensor rows that are not powers of two (masked blocks) or have no
# rope; ds_mla with 3 tiles (a masked tile block), 1 tile, no rope.
ODD_WIDTHS = [("per_tensor", 320, 40), ("per_tensor", 512, 0), ("per_tensor", 136, 8), ("ds_mla", 384, 32),
              ("ds_mla", 128, 0), ("ds_mla", 256, 24)]  # fmt: skip


@pytest.mark.parametrize("triton_path", ["triton"] + (["triton-portable"] if HAS_CUDA else []))
@pytest.mark.parametrize("spare", [0, 1], ids=["aligned", "odd-row-stride"])
@pytest.mark.parametrize("fmt,nope_dim,rope_dim", ODD_WIDTHS)
def test_triton_odd_widths_and_row_strides(fmt, nope_dim, rope_dim, spare, triton_path):
    """Masked blocks, and (odd row stride) ds_mla's byte-wise scale and rope stores and loads."""
    from mlakv.kernels.triton.fp8 import launch_dequant_gather, launch_quant_write

    native = False if triton_path == "triton-portable" else None
    g = torch.Generator().manual_seed(31)
    n = 5
    nope = (torch.randn(n, nope_dim, generator=g) * 3).to(torch.float16).to(DEVICE)
    rope = (torch.randn(n, rope_dim, generator=g) * 3).to(torch.float16).to(DEVICE)
    nope[1, 5] = float("nan")
    rb = fp8_row_bytes(fmt, nope_dim, rope_dim)
    kv = poisoned(n + 3, rb + spare)
    loc = torch.tensor([6, 0, -1, 3, 7], device=DEVICE)
    k = k_scale_for(fmt)
    rows = quantize_mla_rows(nope.cpu(), rope.cpu(), fmt, k_scale_for(fmt, "cpu"))
    expected = expected_buffer(kv, loc, rows)
    launch_quant_write(kv, loc, nope, rope, fmt, k, native=native)
    assert_rows_equal(kv, expected)
    for dst in DST_DTYPES:
        got = launch_dequant_gather(kv, loc, fmt, nope_dim, rope_dim, k, dst, native=native)
        stored = torch.where(loc.cpu()[:, None] >= 0, expected[loc.cpu().clamp(min=0), :rb], 0)
        ref = dequantize_mla_rows(stored, fmt, nope_dim, rope_dim, k_scale_for(fmt, "cpu"), dst)
        assert torch.equal(bits_of(got[0]), bits_of(ref[0])) and torch.equal(bits_of(got[1]), bits_of(ref[1])), dst


def test_cpu_write_refuses_slots_past_the_buffer_before_writing():
    nope, rope = make_sources(2, torch.bfloat16, device="cpu")
    kv = poisoned(4, 656, device="cpu")
    before = kv.clone()
    with pytest.raises(IndexError, match=r"loc\[1\] = 4"):
        set_mla_kv_buffer_quant(kv, torch.tensor([0, 4]), nope, rope, "ds_mla")
    assert torch.equal(kv, before)


@pytest.mark.parametrize("path", PATHS)
def test_k_scale_tensor_is_read_at_run_time(path):
    path_available(path, 2)
    nope, rope = make_sources(2, torch.bfloat16, seed=9)
    scale = torch.tensor([0.5], device=DEVICE)
    kv = poisoned(4, 576)
    loc = torch.tensor([0, 2], device=DEVICE)
    write_via(path, kv, loc, nope, rope, "per_tensor", scale)
    first = kv.cpu().clone()
    scale.fill_(0.25)
    write_via(path, kv, loc, nope, rope, "per_tensor", scale)
    assert_rows_equal(kv, expected_buffer(first, loc, quantize_mla_rows(nope.cpu(), rope.cpu(), "per_tensor", 0.25)))


def test_k_scale_float_and_tensor_agree():
    nope, rope = make_sources(3, torch.bfloat16, device="cpu")
    a = quantize_mla_rows(nope, rope, "per_tensor", 0.3)
    b = quantize_mla_rows(nope, rope, "per_tensor", torch.tensor([0.3]))
    assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


# ---- the gather ---------------------------------------------------------------------------------
GATHER_PATHS = ["torch", "triton"] + (["triton-portable"] if HAS_CUDA else []) + (["jit"] if IS_SM90 else [])


def gather_via(path, kv, loc, fmt, dst):
    if path == "torch":
        return get_mla_kv_buffer_dequant(kv, loc, fmt, NOPE, ROPE, k_scale_for(fmt), dst)
    if path.startswith("triton"):
        from mlakv.kernels.triton.fp8 import launch_dequant_gather

        native = False if path == "triton-portable" else None
        return launch_dequant_gather(kv, loc, fmt, NOPE, ROPE, k_scale_for(fmt), dst, native=native)
    from mlakv.kernels.cuda.fp8 import fp8_jit_gather

    out = fp8_jit_gather(kv, loc, fmt, NOPE, ROPE, k_scale_for(fmt), dst)
    assert out is not None, "the JIT gather refused an aligned call"
    return out


@pytest.mark.parametrize("path", GATHER_PATHS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dst", DST_DTYPES)
@pytest.mark.parametrize("n_loc", [0, 1, 7])
def test_dequant_gather_bit_exact(path, fmt, dst, n_loc):
    path_available(path, n_loc)
    nope, rope = make_sources(9, torch.bfloat16, seed=10)
    nope[1, 0], nope[2, 9], rope[3, 1] = float("nan"), float("inf"), float("nan")
    kv = poisoned(12, fp8_row_bytes(fmt, NOPE, ROPE) + 16)  # spare bytes; rows stay 16-byte aligned
    set_mla_kv_buffer_quant(kv, torch.arange(9, device=DEVICE), nope, rope, fmt, k_scale_for(fmt))
    loc = torch.randint(0, 12, (n_loc,)).to(DEVICE)
    expect = dequantize_mla_rows(kv.cpu()[loc.cpu()], fmt, NOPE, ROPE, k_scale_for(fmt, "cpu"), dst)
    got = gather_via(path, kv, loc, fmt, dst)
    for g, e in zip(got, expect):
        assert g.dtype == dst and g.shape == e.shape and torch.equal(bits_of(g), bits_of(e))


@pytest.mark.parametrize("path", GATHER_PATHS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("loc_dtype", [torch.int32, torch.int64])
def test_dequant_gather_strided_and_expanded_loc(path, fmt, loc_dtype):
    path_available(path, 5)
    kv = poisoned(10, fp8_row_bytes(fmt, NOPE, ROPE))
    for loc in (torch.tensor([7, 99, 2, 99, 9, 99, 0, 99, 4, 99], dtype=loc_dtype, device=DEVICE)[::2],
                torch.tensor([6], dtype=loc_dtype, device=DEVICE).expand(3)):  # fmt: skip
        got = gather_via(path, kv, loc, fmt, torch.bfloat16)
        ref = dequantize_mla_rows(kv.cpu()[loc.cpu().long()], fmt, NOPE, ROPE, k_scale_for(fmt, "cpu"))
        assert torch.equal(bits_of(got[0]), bits_of(ref[0])) and torch.equal(bits_of(got[1]), bits_of(ref[1]))


@pytest.mark.parametrize("path", [p for p in GATHER_PATHS if p != "torch"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dst", DST_DTYPES)
def test_kernel_gather_gives_zero_rows_for_invalid_slots(path, fmt, dst):
    path_available(path, 3)
    kv = poisoned(4, fp8_row_bytes(fmt, NOPE, ROPE))
    nope, rope = gather_via(path, kv, torch.tensor([-1, 4, 1 << 40], device=DEVICE), fmt, dst)
    assert not bits_of(nope).any() and not bits_of(rope).any()


def test_cpu_gather_refuses_slots_past_the_buffer():
    kv = poisoned(4, 656, device="cpu")
    with pytest.raises(IndexError, match=r"loc\[1\] = 4"):
        get_mla_kv_buffer_dequant(kv, torch.tensor([0, 4]), "ds_mla", NOPE, ROPE)


@pytest.mark.parametrize("fmt", FORMATS)
def test_gather_gives_zero_rows_for_padding_slots(fmt):
    kv = poisoned(4, fp8_row_bytes(fmt, NOPE, ROPE), device=DEVICE)
    nope, rope = get_mla_kv_buffer_dequant(kv, torch.tensor([-1, 2], device=DEVICE), fmt, NOPE, ROPE, k_scale_for(fmt))
    assert not bits_of(nope[0]).any() and not bits_of(rope[0]).any()
    ref = dequantize_mla_rows(kv.cpu()[2:3], fmt, NOPE, ROPE, k_scale_for(fmt, "cpu"))
    assert torch.equal(bits_of(nope[1:]), bits_of(ref[0])) and torch.equal(bits_of(rope[1:]), bits_of(ref[1]))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_reserved_slot_is_skipped_like_padding(path, fmt):
    path_available(path, 3)
    nope, rope = make_sources(3, torch.bfloat16, seed=15)
    kv = poisoned(5, fp8_row_bytes(fmt, NOPE, ROPE))
    before = kv.cpu().clone()
    loc = torch.tensor([0, 3, 0], device=DEVICE)
    if path == "torch":
        set_mla_kv_buffer_quant(kv, loc, nope, rope, fmt, k_scale_for(fmt), reserved_skip_index=0)
    elif path.startswith("triton"):
        from mlakv.kernels.triton.fp8 import launch_quant_write

        native = False if path == "triton-portable" else None
        launch_quant_write(kv, loc, nope, rope, fmt, k_scale_for(fmt), 0, native=native)
    else:
        from mlakv.kernels.cuda.fp8 import fp8_jit_write

        assert fp8_jit_write(kv, loc, nope, rope, fmt, k_scale_for(fmt), 0)
    rows = quantize_mla_rows(nope.cpu(), rope.cpu(), fmt, k_scale_for(fmt, "cpu"))
    assert_rows_equal(kv, expected_buffer(before, loc[1:2], rows[1:2]))


# ---- validation: every error names the argument ------------------------------------------------
def _ok():
    nope, rope = make_sources(2, torch.bfloat16, device="cpu")
    return dict(kv=poisoned(4, 656, device="cpu"), loc=torch.tensor([0, 1]), nope=nope, rope=rope, fmt="ds_mla", k=None)


BAD = [
    ("fmt", "fp8", ValueError, "kv_cache_format must be one of"),
    ("nope", lambda a: a["nope"][:, :320].contiguous(), ValueError, "kv_lora_rank % 128"),
    ("nope", lambda a: a["nope"].float(), TypeError, "k_nope dtype"),
    ("rope", lambda a: a["rope"].half(), TypeError, "k_rope dtype"),
    ("rope", lambda a: a["rope"][:1], ValueError, "k_rope: dim 0"),
    ("nope", lambda a: a["nope"].t(), ValueError, "k_nope: the last dim must be contiguous"),
    ("nope", lambda a: a["nope"][None], ValueError, "k_nope: dim 1 of a 3-D tensor must be 1"),
    ("kv", lambda a: a["kv"][:, :600], ValueError, "kv_buffer: last dim holds 600 bytes"),
    ("kv", lambda a: a["kv"].view(torch.int8), TypeError, "kv_buffer must be uint8 or float8_e4m3fn"),
    ("loc", lambda a: a["loc"].float(), TypeError, "loc must be int32 or int64"),
    ("loc", lambda a: a["loc"][None], ValueError, "loc must be 1-D"),
    ("loc", lambda a: a["loc"][:1], ValueError, "loc has n_loc=1"),
    ("k", 0.5, ValueError, "k_scale must be None for kv_cache_format='ds_mla'"),
]


@pytest.mark.parametrize("field,bad,exc,match", BAD)
def test_bad_arguments_are_named(field, bad, exc, match):
    a = _ok()
    a[field] = bad(a) if callable(bad) else bad
    before = a["kv"].clone() if isinstance(a["kv"], torch.Tensor) else None
    with pytest.raises(exc, match=match):
        set_mla_kv_buffer_quant(a["kv"], a["loc"], a["nope"], a["rope"], a["fmt"], a["k"])
    if before is not None and field != "kv":
        assert torch.equal(a["kv"], before)


@pytest.mark.parametrize(
    "k_scale,exc,match",
    [
        (None, ValueError, "k_scale is required"),
        (0.0, ValueError, "positive and finite"),
        (float("inf"), ValueError, "positive and finite"),
        ("1", TypeError, "k_scale must be a float"),
        (torch.tensor([1.0, 2.0]), TypeError, "1-element float32"),
        (torch.tensor([1.0], dtype=torch.float64), TypeError, "1-element float32"),
    ],
)
def test_bad_k_scale_is_named(k_scale, exc, match):
    nope, rope = make_sources(2, torch.bfloat16, device="cpu")
    with pytest.raises(exc, match=match):
        set_mla_kv_buffer_quant(poisoned(4, 576, device="cpu"), torch.tensor([0, 1]), nope, rope, "per_tensor", k_scale)


def test_cpu_path_is_torch():
    nope, rope = make_sources(1, torch.bfloat16, device="cpu")
    assert fp8_write_path(poisoned(2, 656, device="cpu"), nope, rope, "ds_mla") == "torch"


# ---- the CUDA source builds (no GPU needed) -----------------------------------------------------
@pytest.fixture(scope="module")
def built_fp8_modules():
    """Both formats' modules built for sm_90a in parallel (no GPU needed), or the reason they cannot be."""
    from concurrent.futures import ThreadPoolExecutor

    from mlakv.jit_kernel import JitUnavailable
    from mlakv.kernels.cuda.fp8 import build_mla_fp8_module

    def build(fmt):
        try:
            return fmt, build_mla_fp8_module(fmt, NOPE, ROPE, True, (9, 0))
        except JitUnavailable as e:
            return fmt, e

    with sm90a_build_env(), ThreadPoolExecutor(max_workers=2) as ex:
        return dict(ex.map(build, FORMATS))


@pytest.mark.parametrize("fmt", FORMATS)
def test_cuda_source_compiles_and_loads(fmt, built_fp8_modules):
    mod = built_fp8_modules[fmt]
    if isinstance(mod, Exception):
        pytest.fail(str(mod))
    assert callable(mod.mla_fp8_quant) and callable(mod.mla_fp8_gather)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("spare", [0, 8], ids=["aligned", "misaligned"])
def test_jit_launchers_serve_zero_rows_at_any_alignment(fmt, spare, built_fp8_modules):
    """A 0-row call passes the host launcher's checks and is served (True, nothing launched) even
    where rows are not 16-byte aligned (the GPU run saw the gather refuse it); a 1-row call on the
    misaligned rows is refused (False) so the caller falls back. No GPU needed: nothing launches."""
    mod = built_fp8_modules[fmt]
    if isinstance(mod, Exception):
        pytest.fail(str(mod))
    width = fp8_row_bytes(fmt, NOPE, ROPE) + spare
    kv = FakeCudaTensor((12, width), torch.uint8)
    scale = FakeCudaTensor((1,), torch.float32)
    for loc_dtype in (torch.int32, torch.int64):
        loc = FakeCudaTensor((0,), loc_dtype)
        for dst in DST_DTYPES:
            outs = FakeCudaTensor((0, NOPE), dst), FakeCudaTensor((0, ROPE), dst)
            assert mod.mla_fp8_gather(kv, loc, scale, *outs, 8, False, 32) is True
        srcs = FakeCudaTensor((0, NOPE), torch.bfloat16), FakeCudaTensor((0, ROPE), torch.bfloat16)
        assert mod.mla_fp8_quant(kv, loc, *srcs, scale, -1, 8, False, 0, 32) is True
    one = FakeCudaTensor((1,), torch.int64)
    outs = FakeCudaTensor((1, NOPE), torch.bfloat16), FakeCudaTensor((1, ROPE), torch.bfloat16)
    if spare:
        assert mod.mla_fp8_gather(kv, one, scale, *outs, 8, False, 32) is False
        assert mod.mla_fp8_quant(kv, one, *outs, scale, -1, 8, False, 0, 32) is False


@pytest.mark.parametrize("fmt", FORMATS)
def test_jit_launchers_check_zero_row_calls_too(fmt, built_fp8_modules):
    mod, kv, scale, loc, outs = _zero_row_call(built_fp8_modules, fmt, torch.int64)
    with pytest.raises(ValueError, match="loc must be 1-D"):
        mod.mla_fp8_gather(kv, FakeCudaTensor((0, 1), torch.int64), scale, *outs, 8, False, 32)
    with pytest.raises(TypeError, match="loc must be int32 or int64"):
        mod.mla_fp8_gather(kv, FakeCudaTensor((0,), torch.float32), scale, *outs, 8, False, 32)
    with pytest.raises(ValueError, match=r"nope_out/rope_out must be contiguous \[n_loc, 512\]"):
        mod.mla_fp8_gather(kv, loc, scale, FakeCudaTensor((0, 256), torch.bfloat16), outs[1], 8, False, 32)
    with pytest.raises(ValueError, match="the row needs"):
        mod.mla_fp8_quant(FakeCudaTensor((12, 100), torch.uint8), loc, *outs, scale, -1, 8, False, 0, 32)
    with pytest.raises(TypeError, match="k_nope and k_rope must both be bfloat16 or both float16"):
        mod.mla_fp8_quant(kv, loc, outs[0], FakeCudaTensor((0, ROPE), torch.float16), scale, -1, 8, False, 0, 32)


# The JIT kernels' launch shapes: (threads per row, warps per CTA, PDL trigger at entry): each threads
# per row at one row per CTA and at 8 rows per CTA (a partial last CTA for most n), both trigger places.
JIT_SHAPES = [(32, 1, True), (32, 8, False), (64, 2, False), (64, 16, True), (128, 4, True), (128, 32, False)]
# per_tensor's packed rows: a CTA smaller than a row, one that ends inside a row, and 32 warps
JIT_PACKED_SHAPES = [(FP8_JIT_PACKED, 1, True), (FP8_JIT_PACKED, 3, False), (FP8_JIT_PACKED, 32, True)]


def _zero_row_call(built_fp8_modules, fmt: str, loc_dtype: torch.dtype):
    """``(module, kv, scale, loc, (nope_out, rope_out))``: a call of 0 rows on fake CUDA tensors (the
    launchers' checks run; nothing launches)."""
    mod = built_fp8_modules[fmt]
    if isinstance(mod, Exception):
        pytest.fail(str(mod))
    kv = FakeCudaTensor((12, fp8_row_bytes(fmt, NOPE, ROPE)), torch.uint8)
    outs = FakeCudaTensor((0, NOPE), torch.bfloat16), FakeCudaTensor((0, ROPE), torch.bfloat16)
    return mod, kv, FakeCudaTensor((1,), torch.float32), FakeCudaTensor((0,), loc_dtype), outs


@pytest.mark.parametrize(
    "warps,threads,match",
    [(0, 32, "num_warps must be in"), (33, 32, "num_warps must be in"), (4, 16, "threads_per_row must be 32, 64 or 128"),
     (4, 96, "threads_per_row must be 32, 64 or 128"), (4, 256, "threads_per_row must be 32, 64 or 128"),
     (1, 64, "not a whole number of rows"), (2, 128, "not a whole number of rows"), (6, 128, "not a whole number")],
)  # fmt: skip
@pytest.mark.parametrize("fmt", FORMATS)
def test_jit_launchers_refuse_a_launch_shape_of_no_whole_rows(fmt, warps, threads, match, built_fp8_modules):
    """Threads per row 32, 64 or 128 and a CTA of whole rows, checked before anything launches (also for 0 rows)."""
    mod, kv, scale, loc, outs = _zero_row_call(built_fp8_modules, fmt, torch.int64)
    with pytest.raises(ValueError, match=match):
        mod.mla_fp8_quant(kv, loc, *outs, scale, -1, warps, False, 0, threads)
    with pytest.raises(ValueError, match=match):
        mod.mla_fp8_gather(kv, loc, scale, *outs, warps, False, threads)


@pytest.mark.parametrize("warps", [1, 3, 8, 32])
def test_jit_per_tensor_write_takes_packed_rows_at_any_warps(warps, built_fp8_modules):
    """per_tensor's write takes one thread per 16-byte chunk, 72 threads a 512 + 64 row laid end to
    end over the CTA, at any CTA size (0 rows: checked, nothing launched)."""
    mod, kv, scale, loc, outs = _zero_row_call(built_fp8_modules, "per_tensor", torch.int32)
    assert mod.mla_fp8_quant(kv, loc, *outs, scale, -1, warps, False, 0, (NOPE + ROPE) // 8) is True


@pytest.mark.parametrize("fmt,kernel", [("ds_mla", "quant"), ("per_tensor", "gather"), ("ds_mla", "gather")])
def test_jit_packed_rows_are_per_tensor_writes_only(fmt, kernel, built_fp8_modules):
    """ds_mla's tiles need rows of whole half-warps and the gathers keep aligned rows: 72 threads per
    row is refused there, naming the argument."""
    mod, kv, scale, loc, outs = _zero_row_call(built_fp8_modules, fmt, torch.int64)
    with pytest.raises(ValueError, match="threads_per_row must be 32, 64 or 128, got 72"):
        if kernel == "quant":
            mod.mla_fp8_quant(kv, loc, *outs, scale, -1, 4, False, 0, 72)
        else:
            mod.mla_fp8_gather(kv, loc, scale, *outs, 4, False, 72)


def test_jit_per_tensor_write_refuses_other_row_counts(built_fp8_modules):
    """Only the row's own chunk count packs: 71 or 73 threads per row is refused."""
    mod, kv, scale, loc, outs = _zero_row_call(built_fp8_modules, "per_tensor", torch.int64)
    for threads in (71, 73):
        with pytest.raises(ValueError, match=r"threads_per_row must be 32, 64 or 128, or 72 \(one thread per 16-byte chunk\)"):
            mod.mla_fp8_quant(kv, loc, *outs, scale, -1, 4, False, 0, threads)


def test_jit_per_tensor_packed_rows_refuse_a_grid_past_32_bit_thread_numbers(built_fp8_modules):
    """Packed rows number their threads in 32 bits: 30M rows x 72 threads is refused before launching."""
    mod = built_fp8_modules["per_tensor"]
    if isinstance(mod, Exception):
        pytest.fail(str(mod))
    n = 30_000_000
    kv, scale = FakeCudaTensor((12, fp8_row_bytes("per_tensor", NOPE, ROPE)), torch.uint8), FakeCudaTensor((1,), torch.float32)
    args = (FakeCudaTensor((n,), torch.int64), FakeCudaTensor((n, NOPE), torch.bfloat16), FakeCudaTensor((n, ROPE), torch.bfloat16))
    with pytest.raises(ValueError, match="n_loc=30000000 is too many rows for threads_per_row=72"):
        mod.mla_fp8_quant(kv, *args, scale, -1, 4, False, 0, 72)


@pytest.mark.parametrize("threads,warps,nope,rope,expected", [
    (FP8_JIT_PACKED, 8, 512, 64, (8, 72)), (FP8_JIT_PACKED, 3, 256, 64, (3, 40)), (FP8_JIT_PACKED, 3, 448, 64, (4, 128)),
    (FP8_JIT_PACKED, 30, 960, 64, (32, 128)), (64, 2, 512, 64, (2, 64)), (128, 4, 960, 64, (4, 128))])  # fmt: skip
def test_packed_launch_rows_resolve_to_a_shape_the_launcher_takes(threads, warps, nope, rope, expected):
    """FP8_JIT_PACKED becomes the row's chunk count; a count that is a multiple of 32 (the packed
    layout is then an aligned one) becomes 128 threads per row on whole rows; other values pass."""
    from mlakv.spec.tuning import fp8_jit_threads

    assert fp8_jit_threads(threads, warps, nope, rope) == expected


@pytest.mark.parametrize("threads,warps,early", JIT_SHAPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_jit_launchers_take_every_threads_per_row(fmt, threads, warps, early, built_fp8_modules):
    """Each launch shape of the sweep passes the launchers' checks (0 rows: served, nothing launched)."""
    mod, kv, scale, loc, outs = _zero_row_call(built_fp8_modules, fmt, torch.int32)
    assert mod.mla_fp8_quant(kv, loc, *outs, scale, -1, warps, early, 0, threads) is True
    assert mod.mla_fp8_gather(kv, loc, scale, *outs, warps, early, threads) is True


@pytest.mark.parametrize("kind", ["quant_per_tensor", "quant_ds_mla", "dequant"])
def test_jit_launch_rows_are_launch_shapes_the_kernels_take(kind):
    """FP8_JIT_STEPS: increasing max n_loc, the last open; each row's threads per row one the
    kernels take and its warps a CTA of whole rows (or, for per_tensor's write, packed rows at any CTA
    size); fp8_jit_launch returns the row of each n."""
    from mlakv.spec.tuning import FP8_JIT_STEPS, FP8_JIT_THREADS_PER_ROW, fp8_jit_launch

    steps = FP8_JIT_STEPS[kind]
    bounds = [s[0] for s in steps]
    assert bounds[-1] is None and bounds[:-1] == sorted(set(bounds[:-1]))
    low = 1
    for max_n, warps, early, threads in steps:
        if kind == "quant_per_tensor" and threads == FP8_JIT_PACKED:  # rows packed: any CTA size, few rows
            assert 1 <= warps <= 32 and max_n is not None and max_n * (NOPE + ROPE) // 8 < 2**31 - 1024
        else:
            assert threads in FP8_JIT_THREADS_PER_ROW and 1 <= warps <= 32 and (32 * warps) % threads == 0
        assert isinstance(early, bool)
        for n in {low, max_n or low + 10**6}:
            assert fp8_jit_launch(kind, n) == (warps, early, threads)
        low = (max_n or 0) + 1
    assert fp8_jit_launch(kind, 0) == steps[0][1:]


_QUANT_INTS = ("kv_row_stride", "loc_stride", "nope_row_stride", "rope_row_stride", "num_slots", "skip_slot", "n_loc")
_GATHER_INTS = ("kv_row_stride", "loc_stride", "num_slots", "n_loc", "nope_out_stride", "rope_out_stride")
_PT = dict(NOPE=512, NOPE_P2=512, ROPE=64, ROPE_P2=64)
_DS = dict(TILES=4, TILES_P2=4, ROPE=64, ROPE_P2=64)
# (kernel, sm, pointer types, int args, constexprs): every kernel of fp8_triton, each constexpr branch
# (source dtypes, hardware or integer conversions, PDL and its trigger place, aligned or byte-wise
# ds_mla scales and rope, masked widths, rows per program, every destination dtype) and both loc
# dtypes, as the launchers call them. The integer-conversion kernels are built for sm_80 (an A100,
# where Triton has no e4m3 casts), the others for sm_90.
_TRITON_SIGS = [
    ("_quant_per_tensor_kernel", 90,
     dict(kv_ptr="*u8", loc_ptr="*i64", nope_ptr="*i16", rope_ptr="*i16", scale_ptr="*fp32"), _QUANT_INTS,
     dict(**_PT, ROWS=4, SRC_IS_BF16=True, NATIVE=True, USE_PDL=True, TRIGGER=0)),
    ("_quant_per_tensor_kernel", 80,
     dict(kv_ptr="*u8", loc_ptr="*i32", nope_ptr="*fp16", rope_ptr="*fp16", scale_ptr="*fp32"), _QUANT_INTS,
     dict(NOPE=320, NOPE_P2=512, ROPE=40, ROPE_P2=64, ROWS=1, SRC_IS_BF16=False, NATIVE=False, USE_PDL=False,
          TRIGGER=2)),
    ("_quant_per_tensor_kernel", 80,
     dict(kv_ptr="*u8", loc_ptr="*i64", nope_ptr="*i16", rope_ptr="*i16", scale_ptr="*fp32"), _QUANT_INTS,
     dict(NOPE=512, NOPE_P2=512, ROPE=0, ROPE_P2=1, ROWS=2, SRC_IS_BF16=True, NATIVE=False, USE_PDL=False,
          TRIGGER=0)),
    ("_quant_ds_mla_kernel", 90,
     dict(kv_ptr="*u8", loc_ptr="*i32", nope_ptr="*fp16", rope_ptr="*fp16"), _QUANT_INTS,
     dict(**_DS, ROWS=2, SRC_IS_BF16=False, NATIVE=True, ALIGN4=True, USE_PDL=True, TRIGGER=2, RULE=0)),
    ("_quant_ds_mla_kernel", 90,
     dict(kv_ptr="*u8", loc_ptr="*i64", nope_ptr="*i16", rope_ptr="*i16"), _QUANT_INTS,
     dict(**_DS, ROWS=8, SRC_IS_BF16=True, NATIVE=True, ALIGN4=True, USE_PDL=True, TRIGGER=0, RULE=0)),
    ("_quant_ds_mla_kernel", 90,  # sglang's fp32 tile scales (no floor, values times the reciprocal)
     dict(kv_ptr="*u8", loc_ptr="*i32", nope_ptr="*fp16", rope_ptr="*fp16"), _QUANT_INTS,
     dict(**_DS, ROWS=4, SRC_IS_BF16=False, NATIVE=True, ALIGN4=True, USE_PDL=True, TRIGGER=2, RULE=1)),
    ("_quant_ds_mla_kernel", 90,  # ue8m0: power-of-two tile scales (the vLLM face's fp8_ds_mla)
     dict(kv_ptr="*u8", loc_ptr="*i64", nope_ptr="*i16", rope_ptr="*i16"), _QUANT_INTS,
     dict(**_DS, ROWS=8, SRC_IS_BF16=True, NATIVE=True, ALIGN4=True, USE_PDL=True, TRIGGER=0, RULE=2)),
    ("_quant_ds_mla_kernel", 80,
     dict(kv_ptr="*u8", loc_ptr="*i64", nope_ptr="*i16", rope_ptr="*i16"), _QUANT_INTS,
     dict(TILES=3, TILES_P2=4, ROPE=32, ROPE_P2=32, ROWS=1, SRC_IS_BF16=True, NATIVE=False, ALIGN4=False,
          USE_PDL=False, TRIGGER=2, RULE=0)),
    ("_quant_ds_mla_kernel", 80,
     dict(kv_ptr="*u8", loc_ptr="*i64", nope_ptr="*fp16", rope_ptr="*fp16"), _QUANT_INTS,
     dict(TILES=1, TILES_P2=1, ROPE=0, ROPE_P2=1, ROWS=2, SRC_IS_BF16=False, NATIVE=False, ALIGN4=True,
          USE_PDL=False, TRIGGER=2, RULE=1)),
    ("_quant_ds_mla_kernel", 90,  # a row over 2 programs: 2 tiles and 32 rope columns each
     dict(kv_ptr="*u8", loc_ptr="*i64", nope_ptr="*i16", rope_ptr="*i16"), _QUANT_INTS,
     dict(TILES=4, TILES_P2=2, ROPE=64, ROPE_P2=64, ROWS=1, SRC_IS_BF16=True, NATIVE=True, ALIGN4=True,
          USE_PDL=True, TRIGGER=2, RULE=0, PARTS=2, ROPE_PART=32)),
    ("_quant_ds_mla_kernel", 80,  # over 4 programs, byte-wise scales and rope, rope 24 in parts of 8
     dict(kv_ptr="*u8", loc_ptr="*i64", nope_ptr="*fp16", rope_ptr="*fp16"), _QUANT_INTS,
     dict(TILES=4, TILES_P2=1, ROPE=24, ROPE_P2=32, ROWS=2, SRC_IS_BF16=False, NATIVE=False, ALIGN4=False,
          USE_PDL=False, TRIGGER=0, RULE=2, PARTS=4, ROPE_PART=8)),
] + [
    ("_dequant_per_tensor_kernel", 90 if native else 80,
     dict(kv_ptr="*u8", loc_ptr=loc, nope_out_ptr=out, rope_out_ptr=out, scale_ptr="*fp32"), _GATHER_INTS,
     dict(**_PT, ROWS=rows, DST=dst, NATIVE=native, USE_PDL=native, TRIGGER=0, SKIP_INVALID=skip))
    for dst, out, loc, native, rows, skip in ((0, "*i16", "*i64", True, 4, False), (1, "*i16", "*i32", False, 1, True),
                                              (2, "*i32", "*i64", True, 2, False))
] + [
    ("_dequant_ds_mla_kernel", 90 if native else 80,
     dict(kv_ptr="*u8", loc_ptr=loc, nope_out_ptr=out, rope_out_ptr=out), _GATHER_INTS,
     dict(**_DS, ROWS=rows, DST=dst, NATIVE=native, ALIGN4=native, USE_PDL=native, TRIGGER=2,
          SKIP_INVALID=skip))
    for dst, out, loc, native, rows, skip in ((0, "*i16", "*i32", True, 8, True), (1, "*i16", "*i64", False, 2, False),
                                              (2, "*i32", "*i32", True, 1, False))
] + [
    ("_div_probe_kernel", 90, dict(a_ptr="*fp32", b_ptr="*fp32", q_ptr="*fp32"), ("n",), dict(BLOCK=256)),
    ("_pow2_probe_kernel", 90, dict(s_ptr="*fp32", p_ptr="*fp32"), ("n",), dict(BLOCK=256)),
]  # fmt: skip


_COMPILE_SCRIPT = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mlakv.kernels.triton import fp8 as fp8_triton
from mlakv.testing.sm90 import with_defaults
out = []
for name, sm, ptrs, ints, consts in json.loads(sys.argv[1]):
    fn = getattr(fp8_triton, name)
    consts = with_defaults(fn, consts)
    sig = {**ptrs, **{k: "i64" for k in ints}, **{k: "constexpr" for k in consts}}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                       target=GPUTarget("cuda", sm, 32))
    out.append([name, sm, consts, k.asm["ttir"], k.asm["ptx"]])
print(json.dumps(out))
"""


def _triton_jit_functions() -> list:
    """The ``@triton.jit`` functions of fp8_triton, as AST nodes (the interpreter replaces the
    decorated objects, so they are found in the source)."""
    import ast
    import inspect

    from mlakv.kernels.triton import fp8 as fp8_triton

    tree = ast.parse(inspect.getsource(fp8_triton))
    return [f for f in tree.body if isinstance(f, ast.FunctionDef)
            and any(ast.unparse(d) == "triton.jit" for d in f.decorator_list)]  # fmt: skip


def test_triton_compile_check_covers_every_kernel():
    kernels = {f.name for f in _triton_jit_functions() if f.name.endswith("_kernel")}
    assert len(kernels) == 6 and {name for name, *_ in _TRITON_SIGS} == kernels


def test_triton_kernel_float_literals_are_fp32_in_every_triton():
    """Triton types a bare Python float as fp32 only when it is 0, inf, NaN or a normal fp32 value;
    otherwise as fp64, and (depending on the Triton version's scalar promotion) that fp64 spreads
    into the arithmetic and ``div_rn`` (fp32 only) refuses to compile. The H100's Triton did exactly
    that with FLT_MIN written as ``1.17549435e-38`` (a hair below 2^-126), while this machine's
    Triton compiled it. So every float literal in the kernels must be exactly an fp32 value in the
    normal range (or 0 / inf); a value that needs rounding would also differ from the spec."""
    import ast
    import struct

    jitted = _triton_jit_functions()
    assert len(jitted) >= 8  # the 4 kernels and their helpers
    bad = []
    for f in jitted:
        for c in ast.walk(f):
            if isinstance(c, ast.Constant) and isinstance(c.value, float):
                v = c.value
                as_fp32 = struct.unpack("f", struct.pack("f", v))[0]
                normal = v == 0.0 or math.isinf(v) or 2.0**-126 <= abs(v) <= torch.finfo(torch.float32).max
                if not normal or as_fp32 != v:
                    bad.append(f"{f.name} line {c.lineno}: {v!r}")
    assert not bad, bad


def test_triton_kernels_compile_for_sm90_with_ieee_division():
    """The interpreter runs the kernels' Python; this compiles them for sm_90 / sm_80 (no GPU needed,
    in a process without ``TRITON_INTERPRET``), so a construct only the compiler rejects fails here,
    and checks that no kernel computes in fp64, every division is IEEE (``div.rn`` for the divisors,
    the FMA sequence per value), the hardware e4m3 conversion is there exactly when asked for, and
    the kernels carry the PDL instructions exactly when built with them."""

    compiled = compile_in_subprocess(_COMPILE_SCRIPT, _TRITON_SIGS)
    assert len(compiled) == len(_TRITON_SIGS)
    for name, sm, consts, ttir, ptx in compiled:
        where = f"{name} sm_{sm} {consts}"
        assert "f64" not in ttir and ".f64" not in ptx, where
        assert "div.full" not in ptx and "div.approx" not in ptx, where
        if name.startswith("_quant") or name == "_div_probe_kernel":  # RULE 1, 2 multiply by an IEEE reciprocal
            assert "div.rn.f32" in ptx and ("fma.rn.f32" in ptx or consts.get("RULE")), where
            assert ".ftz" not in ptx, where  # fp32 subnormals kept (the fp32 rule's scales and products)
        if name.startswith("_quant"):
            assert ("cvt.rn.satfinite.e4m3x2.f32" in ptx) == consts["NATIVE"], where
        if name.startswith("_dequant"):
            assert ("e4m3x2" in ptx) == consts["NATIVE"], where
        if "USE_PDL" in consts:
            assert ("griddepcontrol" in ptx) == consts["USE_PDL"], where


# The quantizing kernels with the hardware e4m3 conversion, compiled for sm_90 as a launch specializes
# them (16-byte aligned pointers, 16-divisible ints, a stride of 1 as a constant), at every launch shape
# of the table and of the tests, for the widths whose blocks give a thread 2, 4 or 8 bytes of a row.
_NATIVE_WIDTHS = {"per_tensor": [(512, 64), (512, 0), (320, 40)], "ds_mla": [(512, 64), (128, 0)]}

_NATIVE_SCRIPT = """
import json, sys
from mlakv.kernels.triton import fp8 as fp8_triton
from mlakv.testing.sm90 import compile_sm90, sass_of
out = []
for name, warps, ptrs, ints, consts in json.loads(sys.argv[1]):
    k = compile_sm90(getattr(fp8_triton, name), ptrs, ints, consts, num_warps=warps)
    out.append([name, warps, consts, k.asm["ptx"], sass_of(k)])
print(json.dumps(out))
"""


def _native_quant_sigs(fmt: str, rule: int = 0) -> list:
    from mlakv.spec.tuning import FP8_TRITON_STEPS

    from mlakv.kernels.triton.fp8 import ds_mla_parts
    from mlakv.spec.tuning import fp8_triton_parts

    kind = "quant_" + fmt
    table = {(w, r, fp8_triton_parts(kind, max_n or 1 << 20)) for max_n, w, r, _ in FP8_TRITON_STEPS[kind]}
    shapes = sorted(table | {(w, r, 1) for w, r, _ in TRITON_SHAPES})
    sigs = []
    for (warps, rows, want), (nope, rope) in [(sh, wd) for sh in shapes for wd in _NATIVE_WIDTHS[fmt]]:
        p2 = lambda v: 1 << max(0, (v - 1).bit_length())  # noqa: E731
        ptrs = dict(kv_ptr="*u8", loc_ptr="*i64", nope_ptr="*i16", rope_ptr="*i16")
        ints = dict(kv_row_stride=fp8_row_bytes(fmt, nope, rope), loc_stride=1, nope_row_stride=nope,
                    rope_row_stride=rope or nope, num_slots=1005, skip_slot=-1, n_loc=1000)  # fmt: skip
        common = dict(ROPE=rope, ROPE_P2=p2(rope), ROWS=rows, SRC_IS_BF16=True, NATIVE=True, USE_PDL=True,
                      TRIGGER=0)  # fmt: skip
        if fmt == "per_tensor":
            ptrs["scale_ptr"] = "*fp32"
            consts = dict(NOPE=nope, NOPE_P2=p2(nope), **common)
        else:
            parts = ds_mla_parts(nope // 128, want)
            split = dict(PARTS=parts, ROPE_PART=p2(-(-rope // parts))) if parts > 1 else {}
            consts = dict(TILES=nope // 128, TILES_P2=p2(nope // 128) if parts == 1 else nope // 128 // parts,
                          ALIGN4=True, RULE=rule, **split, **common)  # fmt: skip
        sigs.append(("_quant_" + fmt + "_kernel", warps, ptrs, ints, consts))
    return sigs


@pytest.mark.parametrize("fmt,rule", [("per_tensor", 0), ("ds_mla", 0), ("ds_mla", 1), ("ds_mla", 2)],
                         ids=["per_tensor", "ds_mla-fp32_floor", "ds_mla-fp32", "ds_mla-ue8m0"])
def test_triton_native_e4m3_bytes_are_not_repacked_for_ptxas(fmt, rule):
    """The hardware-conversion kernels for sm_90 at every launch shape: no e4m3 pair is packed with a
    value computed from itself (the PTX that ptxas 12.8/12.9 miscompiles), and where Triton ships
    nvdisasm, no conversion in the machine code merges a shift computed before it."""

    sigs = _native_quant_sigs(fmt, rule)
    compiled = compile_in_subprocess(_NATIVE_SCRIPT, sigs)
    assert len(compiled) == len(sigs) >= 12
    bad = []
    for name, warps, consts, ptx, sass in compiled:
        where = f"{name} warps={warps} rows={consts['ROWS']} rope={consts['ROPE']}"
        assert "cvt.rn.satfinite.e4m3x2.f32" in ptx, where
        bad += [f"{where}: PTX {r}" for r in e4m3_pair_repacks(ptx)]
        bad += [f"{where}: SASS {r}" for r in stale_e4m3_merges(sass or "")]
    assert not bad, bad


# ---- GPU only --------------------------------------------------------------------------------------
@requires_sm90
@pytest.mark.parametrize("fmt", FORMATS)
def test_gpu_dispatcher_takes_the_jit_path(fmt):
    nope, rope = make_sources(4, torch.bfloat16)
    assert fp8_write_path(poisoned(8, 656), nope, rope, fmt) == "jit"


@requires_cuda
@pytest.mark.parametrize("fmt", FORMATS)
def test_gpu_misaligned_sources_fall_back_and_stay_exact(fmt):
    wide_n, wide_r = make_sources(6, torch.bfloat16, seed=11)
    nope = torch.cat([wide_n, wide_n[:, :8]], dim=1)[:, 1 : 1 + NOPE]  # 2-byte offset: not 16-aligned
    kv = poisoned(8, fp8_row_bytes(fmt, NOPE, ROPE))
    loc = torch.tensor([0, 3, -1, 5, 6, 7], device="cuda")
    expected = expected_buffer(kv, loc, quantize_mla_rows(nope.cpu(), wide_r.cpu(), fmt, k_scale_for(fmt, "cpu")))
    assert fp8_write_path(kv, nope, wide_r, fmt) == "triton"
    set_mla_kv_buffer_quant(kv, loc, nope, wide_r, fmt, k_scale_for(fmt))
    assert_rows_equal(kv, expected)


@requires_cuda
@pytest.mark.parametrize("fmt", FORMATS)
def test_gpu_gather_of_misaligned_rows_falls_back_and_stays_exact(fmt):
    kv = poisoned(9, fp8_row_bytes(fmt, NOPE, ROPE) + 8)  # rows not on 16 bytes: not the JIT's
    loc = torch.tensor([8, 0, 3, -1], device="cuda")
    nope, rope = get_mla_kv_buffer_dequant(kv, loc, fmt, NOPE, ROPE, k_scale_for(fmt))
    rows = kv.cpu()[loc.cpu().clamp(min=0)]
    rows[3] = 0
    ref = dequantize_mla_rows(rows, fmt, NOPE, ROPE, k_scale_for(fmt, "cpu"))
    assert torch.equal(bits_of(nope), bits_of(ref[0])) and torch.equal(bits_of(rope), bits_of(ref[1]))


@requires_sm90
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("spare", [0, 8], ids=["aligned", "misaligned"])
def test_gpu_jit_gather_serves_zero_rows(fmt, spare):
    from mlakv.kernels.cuda.fp8 import fp8_jit_gather

    kv = poisoned(12, fp8_row_bytes(fmt, NOPE, ROPE) + spare)
    for loc in (torch.zeros(0, dtype=torch.int32, device="cuda"), torch.zeros(0, dtype=torch.int64, device="cuda")):
        out = fp8_jit_gather(kv, loc, fmt, NOPE, ROPE, k_scale_for(fmt), torch.bfloat16)
        assert out is not None and out[0].shape == (0, NOPE) and out[1].shape == (0, ROPE)


FMT_RULES = [("per_tensor", "fp32_floor"), ("ds_mla", "fp32_floor"), ("ds_mla", "fp32"), ("ds_mla", "ue8m0")]
SKIP_SLOT = 0


def hostile_loc(n: int, num_slots: int, loc_dtype: torch.dtype) -> torch.Tensor:
    """``loc [n]`` on DEVICE read at stride 2 (the odd entries past the buffer), its slots distinct,
    with padding (-1), other negative slots, the reserved slot SKIP_SLOT and slots past the buffer."""
    far = (1 << 40) if loc_dtype == torch.int64 else (1 << 31) - 1
    slots = torch.randperm(num_slots - 1)[:n] + 1
    slots[4::5] = -1
    slots[3::11] = -7
    slots[1::9] = SKIP_SLOT
    slots[2::7] = num_slots
    slots[6::13] = far
    wide = torch.full((2 * n,), far, dtype=torch.int64)
    wide[::2] = slots
    return wide.to(loc_dtype).to(DEVICE)[::2]


@requires_sm90
@pytest.mark.parametrize("n", [1, 7, 64, 1000])
@pytest.mark.parametrize("threads,warps,early", JIT_SHAPES)
@pytest.mark.parametrize("src_dtype", SRC_DTYPES)
@pytest.mark.parametrize("fmt,rule", FMT_RULES)
def test_gpu_jit_write_every_threads_per_row(fmt, rule, src_dtype, threads, warps, early, n):
    """The JIT write forced through each launch shape: bit-exact against the reference on a poisoned
    buffer of spare row bytes, from strided sources (a 16-byte offset into wider rows, every other
    rope row) with a strided loc holding padding, negative, reserved and out-of-range slots; rows
    with NaN, inf and a tile of fp32-subnormal values (the IEEE division's slow path)."""
    _check_jit_write(fmt, rule, src_dtype, threads, warps, early, n)


@requires_sm90
@pytest.mark.parametrize("n", [1, 7, 64, 1000])
@pytest.mark.parametrize("threads,warps,early", JIT_PACKED_SHAPES)
@pytest.mark.parametrize("src_dtype", SRC_DTYPES)
@pytest.mark.parametrize("k", [K_SCALE, 0.5])
def test_gpu_jit_per_tensor_write_packed_rows(k, src_dtype, threads, warps, early, n):
    """The per_tensor write with its rows packed over the CTA's threads (rows that straddle warps and
    CTAs), on the same hostile inputs as above, under a scale that takes the division and one that
    takes the product: bit-exact."""
    _check_jit_write("per_tensor", "fp32_floor", src_dtype, threads, warps, early, n, k)


def _check_jit_write(fmt: str, rule: str, src_dtype, threads: int, warps: int, early: bool, n: int,
                     k_value: float = K_SCALE) -> None:
    """One JIT write through a forced launch shape, checked as test_gpu_jit_write_every_threads_per_row says."""
    from mlakv.kernels.cuda.fp8 import fp8_jit_write

    g = torch.Generator().manual_seed(1000 * abs(threads) + n)
    wide_n = torch.randn(n, NOPE + 16, generator=g).to(src_dtype)
    wide_r = torch.randn(2 * n, ROPE, generator=g).to(src_dtype)
    if n > 2:
        wide_n[1, 8 + 5], wide_n[2, 8 + 300], wide_r[2 * (n - 1), 7] = float("nan"), float("inf"), -float("inf")
        wide_n[n - 2, 8 + 128 : 8 + 256] = (torch.randn(128, generator=g) * 2.0**-131).to(src_dtype)
    nope, rope = wide_n.cuda()[:, 8 : 8 + NOPE], wide_r.cuda()[::2]
    num_slots = n + 40
    loc = hostile_loc(n, num_slots, torch.int32 if n % 2 else torch.int64)
    kv = poisoned(num_slots, fp8_row_bytes(fmt, NOPE, ROPE) + 16, three_d=True)
    k = scale_tensor(k_value, torch.device(DEVICE)) if fmt == "per_tensor" else None
    rows = quantize_mla_rows(nope.cpu(), rope.cpu(), fmt, None if k is None else k.cpu(), ds_mla_scale_rule=rule)
    rows = rows.view(torch.uint8)
    keep = loc.cpu() != SKIP_SLOT
    expected = expected_buffer(kv, loc.cpu()[keep], rows[keep])
    assert fp8_jit_write(kv, loc, nope, rope, fmt, k, SKIP_SLOT, num_warps=warps, early_trigger=early,
                         threads_per_row=threads, scale_rule=rule), "the JIT kernel refused an aligned call"  # fmt: skip
    assert_rows_equal(kv, expected)


@requires_sm90
@pytest.mark.parametrize("n", [1, 7, 64, 1000])
@pytest.mark.parametrize("threads,warps,early", JIT_SHAPES)
@pytest.mark.parametrize("dst", DST_DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_gpu_jit_gather_every_threads_per_row(fmt, dst, threads, warps, early, n):
    """The JIT gather forced through each launch shape (and both PDL trigger places) into poisoned
    outputs: quantized and poisoned cache rows (spare row bytes), a strided loc whose negative and
    out-of-range slots give zero rows; bit-exact against the reference dequantizer."""
    from mlakv.kernels.cuda.fp8 import build_mla_fp8_module

    mod = build_mla_fp8_module(fmt, NOPE, ROPE)
    num_slots = n + 40
    kv = poisoned(num_slots, fp8_row_bytes(fmt, NOPE, ROPE) + 16)
    real = torch.arange(0, num_slots, 2, device="cuda")
    src_n, src_r = make_sources(real.numel(), torch.bfloat16, seed=n)
    set_mla_kv_buffer_quant(kv, real, src_n, src_r, fmt, k_scale_for(fmt))
    loc = hostile_loc(n, num_slots, torch.int64 if n % 2 else torch.int32)
    outs = [torch.randint(-(2**15), 2**15, (n, w * dst.itemsize // 2), dtype=torch.int16).view(dst).cuda()
            for w in (NOPE, ROPE)]  # fmt: skip
    scale = k_scale_for(fmt) if fmt == "per_tensor" else torch.ones(1, device="cuda")
    assert mod.mla_fp8_gather(kv, loc, scale, *outs, warps, early, threads) is True
    idx = loc.cpu().long()
    valid = (idx >= 0) & (idx < num_slots)
    rows = kv.cpu()[idx.clamp(0, num_slots - 1)]
    rows[~valid] = 0
    ref = dequantize_mla_rows(rows, fmt, NOPE, ROPE, k_scale_for(fmt, "cpu"), dst)
    for got, want in zip(outs, ref):
        assert torch.equal(bits_of(got), bits_of(want))


@requires_sm90
@pytest.mark.parametrize("early", [True, False], ids=["trigger_at_entry", "trigger_after_wait"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_gpu_jit_gather_reads_the_rows_the_write_before_it_stored(fmt, early):
    """A JIT write that lets the next kernel launch at its entry (PDL), then at once a JIT gather of
    the same slots: the gather waits for the write, so it returns the new rows, never the poison they
    replaced (65536 rows keep the write busy while the gather's CTAs start)."""
    from mlakv.kernels.cuda.fp8 import fp8_jit_gather, fp8_jit_write

    n = 65536
    nope, rope = make_sources(n, torch.bfloat16, seed=7)
    kv = poisoned(n + 8, fp8_row_bytes(fmt, NOPE, ROPE))
    loc = torch.randperm(n + 8, device="cuda")[:n]
    rows = quantize_mla_rows(nope.cpu(), rope.cpu(), fmt, k_scale_for(fmt, "cpu")).view(torch.uint8)
    ref = dequantize_mla_rows(rows, fmt, NOPE, ROPE, k_scale_for(fmt, "cpu"))
    for _ in range(3):
        kv.copy_(poisoned(n + 8, fp8_row_bytes(fmt, NOPE, ROPE)))
        assert fp8_jit_write(kv, loc, nope, rope, fmt, k_scale_for(fmt), -1, early_trigger=True, threads_per_row=32)
        got = fp8_jit_gather(kv, loc, fmt, NOPE, ROPE, k_scale_for(fmt), torch.bfloat16, early_trigger=early)
        assert got is not None
        assert torch.equal(bits_of(got[0]), bits_of(ref[0])) and torch.equal(bits_of(got[1]), bits_of(ref[1]))


@requires_sm90
@pytest.mark.parametrize("kind", ["quant_per_tensor", "quant_ds_mla", "dequant"])
def test_gpu_jit_table_rows_serve_their_sizes(kind):
    """Each FP8_JIT_STEPS row, through the table (no override), at the largest n it serves (the
    open row: one more than the row before): bit-exact, both formats."""
    from mlakv.kernels.cuda.fp8 import fp8_jit_gather, fp8_jit_write
    from mlakv.spec.tuning import FP8_JIT_STEPS

    steps = FP8_JIT_STEPS[kind]
    sizes = [s[0] if s[0] is not None else (steps[-2][0] if len(steps) > 1 else 64) + 1 for s in steps]
    for fmt in FORMATS if kind == "dequant" else [kind.removeprefix("quant_")]:
        for n in sizes:
            num_slots = n + 40
            loc = hostile_loc(n, num_slots, torch.int64)
            kv = poisoned(num_slots, fp8_row_bytes(fmt, NOPE, ROPE))
            if kind != "dequant":
                nope, rope = make_sources(n, torch.bfloat16, seed=n)
                rows = quantize_mla_rows(nope.cpu(), rope.cpu(), fmt, k_scale_for(fmt, "cpu")).view(torch.uint8)
                keep = loc.cpu() != SKIP_SLOT
                expected = expected_buffer(kv, loc.cpu()[keep], rows[keep])
                assert fp8_jit_write(kv, loc, nope, rope, fmt, k_scale_for(fmt), SKIP_SLOT)
                assert_rows_equal(kv, expected)
            else:
                got = fp8_jit_gather(kv, loc, fmt, NOPE, ROPE, k_scale_for(fmt), torch.bfloat16)
                idx = loc.cpu().long()
                rows = kv.cpu()[idx.clamp(0, num_slots - 1)]
                rows[(idx < 0) | (idx >= num_slots)] = 0
                ref = dequantize_mla_rows(rows, fmt, NOPE, ROPE, k_scale_for(fmt, "cpu"))
                assert got is not None and all(torch.equal(bits_of(a), bits_of(b)) for a, b in zip(got, ref)), (fmt, n)


@requires_cuda
@pytest.mark.parametrize("path", [p for p in PATHS if p != "torch"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_gpu_64bit_offsets(path, fmt):
    """Slots whose byte offset passes 2^31 land where the reference puts them."""
    rb = fp8_row_bytes(fmt, NOPE, ROPE)
    num_slots = (1 << 31) // rb + 64
    try:
        kv = torch.empty((num_slots, rb), dtype=torch.uint8, device="cuda")
    except torch.cuda.OutOfMemoryError:  # pragma: no cover
        pytest.skip("not enough GPU memory for a > 2 GiB buffer")
    kv[-64:].random_(0, 256)
    nope, rope = make_sources(3, torch.bfloat16, seed=12)
    loc = torch.tensor([num_slots - 1, num_slots - 40, -1], device="cuda")
    write_via(path, kv, loc, nope, rope, fmt, k_scale_for(fmt))
    rows = quantize_mla_rows(nope.cpu(), rope.cpu(), fmt, k_scale_for(fmt, "cpu")).view(torch.uint8)
    assert torch.equal(kv[num_slots - 1].cpu(), rows[0]) and torch.equal(kv[num_slots - 40].cpu(), rows[1])


@requires_cuda
@pytest.mark.parametrize("fmt", FORMATS)
def test_gpu_write_under_cuda_graph_reads_k_scale_each_replay(fmt):
    nope, rope = make_sources(64, torch.bfloat16, seed=13)
    loc = torch.randperm(128, device="cuda")[:64]
    kv = poisoned(128, fp8_row_bytes(fmt, NOPE, ROPE))
    scale = torch.tensor([0.5], device="cuda") if fmt == "per_tensor" else None
    set_mla_kv_buffer_quant(kv, loc, nope, rope, fmt, scale)  # warm up (JIT build, Triton compile)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        set_mla_kv_buffer_quant(kv, loc, nope, rope, fmt, scale)
    if scale is not None:
        scale.fill_(0.125)
    nope.copy_(make_sources(64, torch.bfloat16, seed=14)[0])
    before = kv.cpu().clone()
    g.replay()
    torch.cuda.synchronize()
    k = 0.125 if fmt == "per_tensor" else None
    assert_rows_equal(kv, expected_buffer(before, loc, quantize_mla_rows(nope.cpu(), rope.cpu(), fmt, k)))


# ---- the pool -------------------------------------------------------------------------------------
def fp8_pool(fmt, size=62, page_size=2, layer_num=2, k_scale=None):
    from mlakv.mem_cache import MLATokenToKVPool

    if fmt == "per_tensor" and k_scale is None:
        k_scale = K_SCALE
    return MLATokenToKVPool(size, page_size, torch.float8_e4m3fn, NOPE, ROPE, layer_num, DEVICE,
                            kv_cache_format=fmt, k_scale=k_scale)  # fmt: skip


@pytest.mark.parametrize("fmt,dtype,width", [("per_tensor", torch.float8_e4m3fn, 576), ("ds_mla", torch.uint8, 656)])
def test_pool_key_buffer_is_the_stored_rows(fmt, dtype, width):
    pool = fp8_pool(fmt)
    kv = pool.get_key_buffer(1)
    assert kv.dtype == dtype and tuple(kv.shape) == (pool.num_slots, 1, width)
    assert pool.row_bytes() == width


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("src_dtype", SRC_DTYPES)
@pytest.mark.parametrize("full_row", [False, True])
def test_pool_write_quantizes_and_gather_dequantizes(fmt, src_dtype, full_row):
    pool = fp8_pool(fmt)
    for b in pool.kv_buffer:
        b.random_(0, 256)
    nope, rope = make_sources(5, src_dtype, seed=16)
    loc = torch.tensor([3, 0, 9, -1, 40], device=DEVICE)  # slot 0 is the reserved dummy: skipped
    before = pool.kv_buffer[1].cpu().clone()
    if full_row:
        pool.set_kv_buffer(1, loc, torch.cat([nope, rope], dim=1), None)
    else:
        pool.set_kv_buffer(1, loc, nope, rope)
    rows = quantize_mla_rows(nope.cpu(), rope.cpu(), fmt, k_scale_for(fmt, "cpu"))
    keep = torch.tensor([0, 2, 4])
    assert_rows_equal(pool.kv_buffer[1], expected_buffer(before, loc.cpu()[keep], rows[keep]))
    got = pool.get_mla_kv_buffer(1, loc[keep])
    ref = dequantize_mla_rows(rows[keep], fmt, NOPE, ROPE, k_scale_for(fmt, "cpu"))
    assert got[0].dtype == torch.bfloat16
    assert torch.equal(bits_of(got[0]), bits_of(ref[0])) and torch.equal(bits_of(got[1]), bits_of(ref[1]))


def test_pool_per_tensor_k_scale_tensor_is_kept_by_reference():
    scale = torch.tensor([0.5], device=DEVICE)
    pool = fp8_pool("per_tensor", k_scale=scale)
    nope, rope = make_sources(2, torch.bfloat16, seed=17)
    loc = torch.tensor([4, 5], device=DEVICE)
    scale.fill_(0.25)
    pool.set_kv_buffer(0, loc, nope, rope)
    rows = quantize_mla_rows(nope.cpu(), rope.cpu(), "per_tensor", 0.25)
    assert torch.equal(pool.kv_buffer[0][4:6, 0].cpu(), rows.view(torch.uint8))


def test_pool_per_tensor_takes_already_quantized_rows_as_bytes():
    pool = fp8_pool("per_tensor")
    raw = torch.randint(0, 256, (2, NOPE + ROPE), dtype=torch.uint8).view(torch.float8_e4m3fn).to(DEVICE)
    pool.set_kv_buffer(0, torch.tensor([4, 5], device=DEVICE), raw[:, :NOPE], raw[:, NOPE:])
    assert torch.equal(pool.kv_buffer[0][4:6, 0].cpu(), raw.cpu().view(torch.uint8))


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(dtype=torch.bfloat16, kv_cache_format="ds_mla"), TypeError, "needs dtype=torch.float8_e4m3fn"),
        (dict(kv_cache_format="per_tensor"), ValueError, "k_scale is required"),
        (dict(kv_cache_format="ds_mla", k_scale=1.0), ValueError, "k_scale must be None"),
        (dict(kv_cache_format=None, k_scale=1.0), ValueError, "k_scale is only used"),
        (dict(kv_cache_format="fp4"), ValueError, "kv_cache_format must be one of"),
        (dict(kv_cache_format="ds_mla", kv_lora_rank=320), ValueError, "kv_lora_rank % 128"),
        (dict(kv_cache_format="ds_mla", dcp_world_size=2, dcp_rank=0), ValueError, "dcp_world_size=2"),
    ],
)
def test_pool_refuses_bad_fp8_settings(kwargs, exc, match):
    from mlakv.mem_cache import MLATokenToKVPool

    args = dict(size=62, page_size=2, dtype=torch.float8_e4m3fn, kv_lora_rank=NOPE, qk_rope_head_dim=ROPE,
                layer_num=1, device=DEVICE)  # fmt: skip
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        MLATokenToKVPool(**args)


def test_pool_ds_mla_refuses_fp8_sources():
    pool = fp8_pool("ds_mla")
    raw = torch.zeros(1, NOPE + ROPE, dtype=torch.float8_e4m3fn, device=DEVICE)
    with pytest.raises(TypeError, match="k_nope dtype must be one of"):
        pool.set_kv_buffer(0, torch.tensor([3], device=DEVICE), raw[:, :NOPE], raw[:, NOPE:])


# ---- HiCache: host pool (L2) and file storage (L3) carry quantized rows unchanged -------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_hicache_and_storage_round_trip_quantized_rows(fmt, tmp_path):
    from mlakv.mem_cache import LocalFileStorage, MLATokenToKVPoolHost

    page = 4
    pool = fp8_pool(fmt, size=60, page_size=page)
    host = MLATokenToKVPoolHost(pool, host_to_device_ratio=2.0, layout="page_first")
    dev_slots = torch.arange(page, 3 * page)  # pages 1 and 2 (page 0 holds the reserved slot)
    written = {}
    for layer in range(pool.layer_num):
        nope, rope = make_sources(dev_slots.numel(), torch.bfloat16, seed=20 + layer)
        pool.set_kv_buffer(layer, dev_slots.to(DEVICE), nope, rope)
        written[layer] = pool.kv_buffer[layer][dev_slots.to(DEVICE)].cpu().clone()
    hslots = host.alloc(dev_slots.numel())
    host.backup_from_device_all_layer(pool, hslots, dev_slots)  # index tensors as the host pool tests pass them
    host.synchronize()
    store = LocalFileStorage(tmp_path, host.page_bytes, fsync=False)
    first = [int(hslots[i]) for i in range(0, hslots.numel(), page)]
    for i, h in enumerate(first):
        store.set(f"page{i}", host.get_page_bytes(h))
    host.clear()
    hslots2 = host.alloc(dev_slots.numel())
    for i in range(len(first)):
        host.set_page_bytes(int(hslots2[i * page]), store.get(f"page{i}"))
    for b in pool.kv_buffer:
        b.random_(0, 256)
    new_slots = torch.arange(5 * page, 7 * page)
    for layer in range(pool.layer_num):
        host.load_to_device_per_layer(pool, hslots2, new_slots, layer)
        if HAS_CUDA:
            host.wait_until_layer_ready(layer)
        assert torch.equal(pool.kv_buffer[layer][new_slots.to(DEVICE)].cpu(), written[layer]), f"layer {layer}"
        nope, rope = pool.get_mla_kv_buffer(layer, new_slots.to(DEVICE))
        ref = dequantize_mla_rows(written[layer], fmt, NOPE, ROPE, k_scale_for(fmt, "cpu"))
        assert torch.equal(bits_of(nope), bits_of(ref[0])) and torch.equal(bits_of(rope), bits_of(ref[1]))


# ---- the demo's FP8 comparison ---------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_demo_runs_the_model_on_the_quantized_cache(fmt):
    from mlakv.demo.serve import fp8_logit_drift
    from mlakv.demo.model import MLAConfig
    from mlakv.demo.model import default_dtype, make_model

    cfg = MLAConfig(vocab_size=512, hidden=128, n_heads=2, n_layers=2)
    device = torch.device(DEVICE)
    model = make_model(cfg, device)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (9, 14)]
    drift = fp8_logit_drift(cfg, model, device, default_dtype(device), fmt, prompts, 4)
    assert drift["compared"] >= 2
    assert 0 < drift["max_abs"] < 1.0  # the quantized cache is really read, and stays close
    assert drift["mean_abs"] <= drift["max_abs"] and 0.5 <= drift["top1"] <= 1.0


@requires_cuda
def test_gpu_fp8_bench_checks_every_provider():
    """The benchmark's own bit-exact check passes for every provider (no timing is asserted)."""
    from mlakv.bench.fp8_bench import format_tables, run_fp8_bench

    res = run_fp8_bench([1, 64])
    cells = [v for r in res["write"] + res["gather"] + res["rules"] + res["scales"] for v in r.values()]
    assert "WRONG" not in cells
    assert len(res["scales"]) == 2
    assert "| 64 |" in format_tables(res) and "| ue8m0 | 64 |" in format_tables(res)


def test_fp8_bench_tables_show_the_divided_scale_apart():
    """The per_tensor rows under a scale that is not a power of two get their own table, named so."""
    from mlakv.bench.fp8_bench import K_SCALE, K_SCALE_DIVIDED, format_tables

    assert math.frexp(K_SCALE)[0] == 0.5 and math.frexp(K_SCALE_DIVIDED)[0] != 0.5  # power of two / not
    row = {"k_scale": K_SCALE_DIVIDED, "n_loc": 1024, "jit": 1.6, "triton": 1.7, "bound": 0.42}
    text = format_tables({"device": "GPU", "copy_gbs": 4000.0, "write": [], "gather": [], "rules": [], "scales": [row]})
    assert "k_scale not a power of two" in text
    assert "| 0.0178571 | 1024 | 1.60 | 1.70 | 0.42 | 1.06x | 3.81x |" in text


# ---- the kernel's division: IEEE round-to-nearest without a per-value branch --------------------
_DIV_PROBE_SRC = """\
#include "fp8.cuh"

__global__ void div_probe_kernel(const float* a, const float* b, float* q, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float f[8];
  for (int j = 0; j < 8; ++j) f[j] = a[i * 8 + j];
  const mlakv::fp8::Divisor d = mlakv::fp8::make_divisor(b[i]);
  for (int j = 0; j < 8; ++j) f[j] = mlakv::fp8::div1(f[j], d);
  for (int j = 0; j < 8; ++j) q[i * 8 + j] = f[j];
}

// a [n, 8], b [n], q [n, 8]: contiguous fp32 on one GPU; q[i, j] = a[i, j] / b[i] as the kernels divide.
void div_probe(tvm::ffi::TensorView a, tvm::ffi::TensorView b, tvm::ffi::TensorView q) {
  const int64_t n = b.size(0);
  cudaStream_t stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, a.device().device_id));
  div_probe_kernel<<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(
      static_cast<const float*>(a.data_ptr()), static_cast<const float*>(b.data_ptr()),
      static_cast<float*>(q.data_ptr()), n);
  TVM_FFI_CHECK_CUDA_ERROR(cudaGetLastError());
}
TVM_FFI_DLL_EXPORT_TYPED_FUNC(div_probe, div_probe);
"""


def _floats(sign: torch.Tensor, exponent: torch.Tensor, mantissa: torch.Tensor) -> torch.Tensor:
    return ((sign << 31) | (exponent << 23) | mantissa).to(torch.int32).view(torch.float32)


def _div_cases(kind: str, g: torch.Generator, reduced: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a [n, 8], b [n])`` fp32 on the CPU; ``reduced``: fewer cases (for the Triton interpreter)."""
    def rand_bits(shape, bits):
        return torch.randint(0, 1 << bits, shape, generator=g, dtype=torch.int64)

    if kind == "every_exponent_pair":  # 16 rows for each (exponent of a, exponent of b), signs mixed
        per_pair = 4 if reduced else 16
        ea, eb = torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij")
        ea, eb = ea.reshape(-1).repeat_interleave(per_pair), eb.reshape(-1).repeat_interleave(per_pair)
        n = ea.shape[0]
        a = _floats(rand_bits((n, 8), 1), ea[:, None].expand(n, 8), rand_bits((n, 8), 23))
        b = _floats((rand_bits((n,), 4) == 0).long(), eb, rand_bits((n,), 23))  # 1 in 16 negative
    elif kind == "every_divisor_mantissa":  # each of the 2**23 mantissas of b, a within 2**+-30
        m = torch.arange(0, 1 << 23, 64 if reduced else 1, dtype=torch.int64)
        n = m.shape[0]
        b = _floats(torch.zeros_like(m), torch.full_like(m, 127), m)
        a = _floats(rand_bits((n, 8), 1), 97 + rand_bits((n, 8), 6) % 61, rand_bits((n, 8), 23))
    else:  # random bit patterns: NaN, inf, zeros, subnormals in one chunk with normal values
        n = 1 << (16 if reduced else 20)
        a = rand_bits((n, 8), 32).to(torch.int32).view(torch.float32)
        b = rand_bits((n,), 32).to(torch.int32).view(torch.float32)
    return a.contiguous(), b.contiguous()


def test_division_probe_compiles():
    """The probe below builds on any machine with the toolchain (the GPU test runs it)."""
    from mlakv.kernels.cuda.loader import load_cuda_module

    with sm90a_build_env():
        assert callable(load_cuda_module("mla_fp8_div_probe", _DIV_PROBE_SRC, device_capability=(9, 0)).div_probe)


@pytest.mark.parametrize("kind", ["every_exponent_pair", "every_divisor_mantissa", "random_bits"])
def test_triton_division_is_ieee_round_to_nearest(kind):
    """The Triton kernels' division (the reciprocal and FMA sequence inside its exact range,
    ``div_rn`` outside) equals the correctly rounded quotient bit for bit, as the CUDA kernel's does.
    On the CPU (interpreter) with fewer cases per kind: 4 per exponent pair, every 64th divisor
    mantissa, 2^16 random pairs."""
    from mlakv.kernels.triton.fp8 import launch_div_probe

    a, b = _div_cases(kind, torch.Generator().manual_seed(12), reduced=not HAS_CUDA)
    got = launch_div_probe(a.to(DEVICE), b.to(DEVICE)).cpu()
    want = (a.double() / b.double()[:, None]).float()
    same = (got.view(torch.int32) == want.view(torch.int32)) | (torch.isnan(got) & torch.isnan(want))
    bad = (~same).nonzero()
    assert bad.numel() == 0, (
        f"{bad.shape[0]} of {a.numel()} quotients differ; first: a={a[tuple(bad[0])].item()!r} "
        f"b={b[bad[0, 0]].item()!r} got={got[tuple(bad[0])].item()!r} want={want[tuple(bad[0])].item()!r}"
    )


def test_triton_pow2_reciprocal_is_exact_on_powers_of_two_and_zero_elsewhere():
    """The Triton product path's one test: ``1 / s`` (exact) for every power of two in [2^-126, 2^125],
    0 for every other scale: each exponent with mantissa 0, 1 and all ones, both signs, zeros, the
    subnormals, 2^126, 2^127, inf and NaN."""
    from mlakv.kernels.triton.fp8 import launch_pow2_probe

    bits = torch.tensor(
        [(sign << 31) | (e << 23) | m for sign in (0, 1) for e in range(256) for m in (0, 1, 0x400000, 0x7FFFFF)],
        dtype=torch.int64,
    ).to(torch.int32)  # fmt: skip
    s = bits.view(torch.float32)
    got = launch_pow2_probe(s.to(DEVICE)).cpu()
    e = (bits.long() >> 23) & 0xFF
    power = (bits.long() & 0x807FFFFF == 0) & (e >= 1) & (e <= 252)
    want = torch.where(power, (1.0 / s.double()).float(), torch.zeros_like(s))
    assert int(power.sum()) == 252
    assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (
        f"first differing scale: {s[(got.view(torch.int32) != want.view(torch.int32)).nonzero()[0]].item()!r}"
    )


@requires_sm90
@pytest.mark.parametrize("kind", ["every_exponent_pair", "every_divisor_mantissa", "random_bits"])
def test_kernel_division_is_ieee_round_to_nearest(kind):
    """div1 (div_fast inside its exact range, the quantizing kernels' x / scale) equals the correctly rounded quotient bit for bit:
    the fp64 quotient rounded once to fp32 (exact: 53 >= 2 * 24 + 2 bits)."""
    from mlakv.kernels.cuda.loader import load_cuda_module

    mod = load_cuda_module("mla_fp8_div_probe", _DIV_PROBE_SRC)
    a, b = _div_cases(kind, torch.Generator().manual_seed(11))
    q = torch.empty(a.shape, dtype=torch.float32, device="cuda")
    mod.div_probe(a.cuda(), b.cuda(), q)
    got = q.cpu()
    want = (a.double() / b.double()[:, None]).float()
    same = (got.view(torch.int32) == want.view(torch.int32)) | (torch.isnan(got) & torch.isnan(want))
    bad = (~same).nonzero()
    assert bad.numel() == 0, (
        f"{bad.shape[0]} of {a.numel()} quotients differ; first: a={a[tuple(bad[0])].item()!r} "
        f"b={b[bad[0, 0]].item()!r} got={got[tuple(bad[0])].item()!r} want={want[tuple(bad[0])].item()!r}"
    )
