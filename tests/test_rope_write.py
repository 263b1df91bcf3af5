"""The fused cache step of an MLA layer: RoPE on k_pe/q_pe, the cache-row write, the absorbed query.

Spec: :mod:`mlakv.ops.rope_write_reference`. The reference is checked against an independent
composition (this file's own rotation, then the plain writers and a concatenation); every kernel
path is then checked bit for bit against the reference, on fresh random inputs, with the cache and
``q_out`` poisoned first (random bytes) so unwritten or misplaced rows show.
"""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import DEVICE, HAS_CUDA, IS_SM90, compile_in_subprocess, requires_sm90, sm90a_build_env

from mlakv.ops.fp8 import E4M3_MAX, fp8_row_bytes, set_mla_kv_buffer_quant
from mlakv.ops.dispatch import set_mla_kv_buffer_triton
from mlakv.ops.rope_write_reference import rope_rotate_torch, set_mla_kv_buffer_rope_torch
from mlakv.spec.calls import RopeWriteCall

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

NOPE, ROPE = 512, 64
FORMATS = [None, "per_tensor", "ds_mla"]
STYLES = [True, False]  # is_neox_style
SRC_DTYPES = [torch.bfloat16, torch.float16]
Q_MODES = ["none", "16bit", "fp8"]
K_SCALE = 0.0625 * 3  # not a power of two: the division really rounds
Q_SCALE = 0.0234375 * 5
MAX_POS = 4096
# Kernel paths run here: Triton (interpreted on CPU, small sizes), the JIT CUDA kernel on SM90+.
KERNEL_PATHS = ["triton"] + (["cuda"] if IS_SM90 else [])
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def fmt_id(f):
    return "bf16rows" if f is None else f


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().view(_BITS[t.element_size()])


# ---- inputs ----------------------------------------------------------------------------------
def yarn_like_cache(max_pos: int, rope_dim: int, gen: torch.Generator, device=DEVICE) -> torch.Tensor:
    """A DeepSeek-YaRN-shaped table ``[max_pos, rope_dim]`` fp32: ``cos | sin`` of ``pos * inv_freq``
    times an ``mscale`` != 1 (as YaRN's), with random frequencies so no value is special."""
    inv = torch.rand(rope_dim // 2, generator=gen, dtype=torch.float64) * 0.9 + 0.05
    ang = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv[None, :]
    mscale = 1.0 + 0.1 * torch.rand(1, generator=gen, dtype=torch.float64)
    return torch.cat([ang.cos() * mscale, ang.sin() * mscale], dim=1).float().to(device)


def kv_dtype_of(fmt, src_dtype):
    return src_dtype if fmt is None else torch.float8_e4m3fn


def row_width(fmt) -> int:
    return NOPE + ROPE if fmt is None else fp8_row_bytes(fmt, NOPE, ROPE)


def make_case(n, heads, src_dtype, fmt, q_mode, *, num_slots=48, seed=0, extra_cols=16, device=DEVICE):
    """Fresh random inputs and poisoned destinations. Two of the rows are padding (loc -1), one
    targets the reserved slot 3 (skipped when the call passes ``reserved_skip_index=3``)."""
    g = torch.Generator().manual_seed(seed)
    c = dict(
        k_nope=torch.randn(n, NOPE, generator=g).to(src_dtype).to(device),
        k_pe=torch.randn(n, ROPE, generator=g).to(src_dtype).to(device),
        positions=torch.randint(0, MAX_POS, (n,), generator=g).to(device),
        cos_sin_cache=yarn_like_cache(MAX_POS, ROPE, g, device),
    )
    loc = torch.randperm(num_slots - 4, generator=g)[:n] + 4  # slots 0..3 stay free
    if n >= 4:
        loc[1], loc[n - 1], loc[2] = -1, -1, 3
    c["loc"] = loc.to(device)
    width = row_width(fmt) + extra_cols
    raw = torch.randint(0, 256, (num_slots, width * (2 if fmt is None else 1)), dtype=torch.uint8, generator=g)
    c["kv_buffer"] = raw.view(kv_dtype_of(fmt, src_dtype)).to(device)
    if q_mode != "none":
        # the query is the bulk (GBs at the largest sizes): drawn where it lives
        gq = g if torch.device(device).type == "cpu" else torch.Generator(device=device).manual_seed(seed)
        c["q_nope"] = torch.randn(n, heads, NOPE, generator=gq, device=device).to(src_dtype)
        c["q_pe"] = torch.randn(n, heads, ROPE, generator=gq, device=device).to(src_dtype)
        qd = src_dtype if q_mode == "16bit" else torch.float8_e4m3fn
        q_w = (NOPE + ROPE) * (2 if q_mode == "16bit" else 1)
        c["q_out"] = torch.randint(0, 256, (n, heads, q_w), dtype=torch.uint8, generator=gq, device=device).view(qd)
    return c


def call_kwargs(c, fmt, q_mode, **extra):
    kw = dict(kv_cache_format=fmt, **extra)
    if fmt == "per_tensor":
        kw.setdefault("k_scale", K_SCALE)
    if q_mode != "none":
        kw.update(q_nope=c["q_nope"], q_pe=c["q_pe"], q_out=c["q_out"])
        if q_mode == "fp8":
            kw.setdefault("q_scale", Q_SCALE)
    return kw


def run_reference(c, fmt, q_mode, is_neox, *, reserved_skip_index=None, **extra):
    set_mla_kv_buffer_rope_torch(
        RopeWriteCall(
            c["kv_buffer"], c["loc"], c["k_nope"], c["k_pe"], c["positions"], c["cos_sin_cache"], is_neox,
            skip_index=-1 if reserved_skip_index is None else reserved_skip_index, **call_kwargs(c, fmt, q_mode, **extra),
        )
    )  # fmt: skip


# ---- the independent composition: this file's rotation, then the plain writers ---------------
def rotate_pairs(x: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor, is_neox: bool) -> torch.Tensor:
    """RoPE by explicit pair indices: pair j is (a[j], b[j]) = (j, j + d/2) or (2j, 2j + 1); the
    rotated pair is (x_a c - x_b s, x_a s + x_b c) in fp32, then one rounding to ``x``'s dtype."""
    d = x.shape[-1]
    j = torch.arange(d // 2)
    a, b = (j, j + d // 2) if is_neox else (2 * j, 2 * j + 1)
    xf = x.detach().cpu().float()
    rows = cache.detach().cpu()[positions.detach().cpu().long()]
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (d // 2,)
    cos, sin = rows[:, : d // 2].reshape(shape), rows[:, d // 2 :].reshape(shape)
    xa, xb = xf.index_select(-1, a), xf.index_select(-1, b)
    out = torch.empty_like(xf)
    out[..., a] = xa * cos - xb * sin
    out[..., b] = xa * sin + xb * cos
    return out.to(x.dtype)


def compose(c, fmt, q_mode, is_neox, *, reserved_skip_index=None, dcp_world_size=1, dcp_rank=0):
    """Expected (kv_buffer, q_out) bits from the rotate-then-write composition, on CPU copies."""
    kv = c["kv_buffer"].detach().cpu().clone()
    loc = c["loc"].detach().cpu()
    k_rot = rotate_pairs(c["k_pe"], c["positions"], c["cos_sin_cache"], is_neox)
    k_nope = c["k_nope"].detach().cpu()
    if fmt is None:
        set_mla_kv_buffer_triton(
            kv, loc, k_nope, k_rot, reserved_skip_index=reserved_skip_index,
            dcp_world_size=dcp_world_size, dcp_rank=dcp_rank,
        )  # fmt: skip
    else:
        owned = (loc >= 0) & (loc % dcp_world_size == dcp_rank)
        if reserved_skip_index is not None:
            owned &= loc != reserved_skip_index
        phys = torch.where(owned, loc // dcp_world_size, torch.full_like(loc, -1))
        set_mla_kv_buffer_quant(kv, phys, k_nope, k_rot, fmt, K_SCALE if fmt == "per_tensor" else None)
    q_out = None
    if q_mode != "none":
        q_rot = rotate_pairs(c["q_pe"], c["positions"], c["cos_sin_cache"], is_neox)
        q = torch.cat([c["q_nope"].detach().cpu(), q_rot], dim=-1)
        if q_mode == "16bit":
            q_out = q
        else:
            scale = torch.tensor(Q_SCALE, dtype=torch.float32)
            q_out = (q.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return bits(kv), None if q_out is None else bits(q_out)


def assert_same(actual: torch.Tensor, expected_bits: torch.Tensor, what: str) -> None:
    a = bits(actual)
    if not torch.equal(a, expected_bits):
        rows = (a != expected_bits).reshape(a.shape[0], -1).any(dim=1).nonzero().flatten()
        raise AssertionError(f"{what}: {rows.numel()} rows differ, first: {rows[:8].tolist()}")


# ---- the reference against the composition ----------------------------------------------------
@pytest.mark.parametrize("is_neox", STYLES, ids=["neox", "interleaved"])
@pytest.mark.parametrize("dtype", SRC_DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", [(9, ROPE), (9, 1, ROPE), (9, 5, ROPE)], ids=["2d", "n1d", "heads"])
def test_rotation_matches_pairwise_definition(is_neox, dtype, shape):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g).to(dtype)
    pos = torch.randint(0, MAX_POS, (shape[0],), generator=g)
    cache = yarn_like_cache(MAX_POS, ROPE, g, "cpu")
    got = rope_rotate_torch(x, pos, cache, is_neox)
    assert got.dtype == dtype and got.shape == x.shape
    assert torch.equal(bits(got), bits(rotate_pairs(x, pos, cache, is_neox)))


@pytest.mark.parametrize("is_neox", STYLES, ids=["neox", "interleaved"])
def test_rotation_pairs_the_style_says(is_neox):
    """A quarter turn (cos 0, sin 1) maps each pair (x, y) to (-y, x): which elements pair up is the style."""
    d = 8
    x = torch.arange(1, d + 1, dtype=torch.float32).to(torch.bfloat16)[None]
    cache = torch.cat([torch.zeros(1, d // 2), torch.ones(1, d // 2)], dim=1)
    got = rope_rotate_torch(x, torch.zeros(1, dtype=torch.long), cache, is_neox)[0].float().tolist()
    if is_neox:  # pairs (0,4) (1,5) (2,6) (3,7)
        assert got == [-5, -6, -7, -8, 1, 2, 3, 4]
    else:  # pairs (0,1) (2,3) (4,5) (6,7)
        assert got == [-2, 1, -4, 3, -6, 5, -8, 7]


def test_rotation_rounds_once_from_fp32_products():
    """fp32 products and sum, one rounding: x c - y s with values whose fp32 product pair would
    round differently through a fused multiply-add or a bf16 intermediate."""
    x = torch.tensor([[1.0 + 2**-7, 1.0 - 2**-8]], dtype=torch.bfloat16)
    c, s = 1.0 + 2**-20, 1.0 - 2**-21
    cache = torch.tensor([[c, s]], dtype=torch.float32)
    got = rope_rotate_torch(x, torch.zeros(1, dtype=torch.long), cache, False)
    xf = x.float()[0]
    cf, sf = torch.tensor(c, dtype=torch.float32), torch.tensor(s, dtype=torch.float32)
    want = torch.stack([xf[0] * cf - xf[1] * sf, xf[0] * sf + xf[1] * cf]).to(torch.bfloat16)
    assert torch.equal(bits(got[0]), bits(want))


@pytest.mark.parametrize("dtype,nan_bits,inf_bits", [(torch.bfloat16, 0x7FC0, 0x7F80), (torch.float16, 0x7E00, 0x7C00)])
def test_rotated_nan_is_the_canonical_nan(dtype, nan_bits, inf_bits):
    """Pairs (NaN, 1) -> (NaN, NaN); (inf, inf) with cos == sin -> (inf - inf, inf + inf) = (NaN, inf)."""
    x = torch.tensor([[float("nan"), 1.0, float("inf"), float("inf")]], dtype=dtype)
    cache = torch.tensor([[0.5, 0.5, 0.5, 0.5]], dtype=torch.float32)
    got = [v & 0xFFFF for v in bits(rope_rotate_torch(x, torch.zeros(1, dtype=torch.long), cache, False)[0]).tolist()]
    assert got == [nan_bits, nan_bits, nan_bits, inf_bits]


@pytest.mark.parametrize("q_mode", Q_MODES)
@pytest.mark.parametrize("fmt", FORMATS, ids=fmt_id)
@pytest.mark.parametrize("dtype", SRC_DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("is_neox", STYLES, ids=["neox", "interleaved"])
def test_reference_is_rotate_then_write(is_neox, dtype, fmt, q_mode):
    c = make_case(9, 3, dtype, fmt, q_mode, device="cpu")
    want_kv, want_q = compose(c, fmt, q_mode, is_neox, reserved_skip_index=3)
    run_reference(c, fmt, q_mode, is_neox, reserved_skip_index=3)
    assert_same(c["kv_buffer"], want_kv, "kv_buffer")
    if q_mode != "none":
        assert_same(c["q_out"], want_q, "q_out")


@pytest.mark.parametrize("fmt", FORMATS, ids=fmt_id)
@pytest.mark.parametrize("rank", [0, 1, 2])
def test_reference_dcp_writes_owner_rows_only(fmt, rank):
    c = make_case(16, 2, torch.bfloat16, fmt, "16bit", num_slots=64, device="cpu")
    c["kv_buffer"] = c["kv_buffer"][:22]  # 64 logical slots over 3 ranks: 22 rows each
    want_kv, want_q = compose(c, fmt, "16bit", False, dcp_world_size=3, dcp_rank=rank)
    run_reference(c, fmt, "16bit", False, dcp_world_size=3, dcp_rank=rank)
    assert_same(c["kv_buffer"], want_kv, "kv_buffer")
    assert_same(c["q_out"], want_q, "q_out")  # the query is built for every token, owned or not


@pytest.mark.parametrize("fmt", FORMATS, ids=fmt_id)
def test_reference_slot_past_the_buffer_raises_before_writing(fmt):
    c = make_case(6, 2, torch.bfloat16, fmt, "16bit", device="cpu")
    c["loc"][4] = c["kv_buffer"].shape[0]
    before_kv, before_q = bits(c["kv_buffer"]).clone(), bits(c["q_out"]).clone()
    with pytest.raises(IndexError, match=r"loc\[4\]"):
        run_reference(c, fmt, "16bit", True)
    assert torch.equal(bits(c["kv_buffer"]), before_kv) and torch.equal(bits(c["q_out"]), before_q)


@pytest.mark.parametrize("bad", [-1, MAX_POS])
def test_reference_position_out_of_range_raises_before_writing(bad):
    c = make_case(6, 2, torch.bfloat16, None, "16bit", device="cpu")
    c["positions"][3] = bad
    before_kv, before_q = bits(c["kv_buffer"]).clone(), bits(c["q_out"]).clone()
    with pytest.raises(IndexError, match=r"positions\[3\]"):
        run_reference(c, None, "16bit", True)
    assert torch.equal(bits(c["kv_buffer"]), before_kv) and torch.equal(bits(c["q_out"]), before_q)


@pytest.mark.parametrize("fmt", FORMATS, ids=fmt_id)
def test_reference_leaves_its_inputs_alone(fmt):
    c = make_case(7, 2, torch.float16, fmt, "fp8", device="cpu")
    inputs = {k: bits(c[k]).clone() for k in ("k_nope", "k_pe", "q_nope", "q_pe", "positions", "loc", "cos_sin_cache")}
    run_reference(c, fmt, "fp8", True)
    for k, v in inputs.items():
        assert torch.equal(bits(c[k]), v), k


def test_reference_honours_strided_views():
    """loc expanded/strided, positions strided, source rows strided, the query a view of a wider tensor."""
    c = make_case(6, 3, torch.bfloat16, None, "16bit", device="cpu")
    want_kv, want_q = compose(c, None, "16bit", True)
    g = torch.Generator().manual_seed(5)
    wide_loc = torch.full((12,), -7, dtype=torch.int32)
    wide_loc[::2] = c["loc"].int()
    wide_pos = torch.zeros(6, 3, dtype=torch.long)
    wide_pos[:, 1] = c["positions"]
    k_nope = torch.randn(6, NOPE + 40, generator=g).to(torch.bfloat16)
    k_nope[:, 8 : 8 + NOPE] = c["k_nope"]
    q_wide = torch.randn(6, 3, NOPE + ROPE + 16, generator=g).to(torch.bfloat16)
    q_wide[..., :NOPE] = c["q_nope"]
    q_wide[..., NOPE + 16 :] = c["q_pe"]
    c.update(loc=wide_loc[::2], positions=wide_pos[:, 1], k_nope=k_nope[:, 8 : 8 + NOPE],
             q_nope=q_wide[..., :NOPE], q_pe=q_wide[..., NOPE + 16 :])  # fmt: skip
    run_reference(c, None, "16bit", True)
    assert_same(c["kv_buffer"], want_kv, "kv_buffer")
    assert_same(c["q_out"], want_q, "q_out")


# ---- the kernels against the reference ----------------------------------------------------------
def as_scale(v):
    return None if v is None else torch.tensor([v], dtype=torch.float32, device=DEVICE)


def run_kernel(path, c, fmt, q_mode, is_neox, *, reserved_skip_index=None, dcp_world_size=1, dcp_rank=0):
    """One launch on ``path`` with the call's arguments (validated here by construction)."""
    q = q_mode != "none"
    call = RopeWriteCall(
        c["kv_buffer"], c["loc"], c["k_nope"], c["k_pe"], c["positions"], c["cos_sin_cache"], is_neox, fmt,
        as_scale(K_SCALE if fmt == "per_tensor" else None),
        c["q_nope"] if q else None, c["q_pe"] if q else None, c["q_out"] if q else None,
        as_scale(Q_SCALE if q_mode == "fp8" else None),
        -1 if reserved_skip_index is None else reserved_skip_index, dcp_world_size, dcp_rank,
    )  # fmt: skip
    if path == "triton":
        from mlakv.kernels.triton.rope_write import launch_rope_write

        launch_rope_write(call)
    else:
        from mlakv.kernels.cuda.rope_write import rope_write_cuda

        assert rope_write_cuda(call), "the CUDA kernel refused an aligned call"


def expected(c, fmt, q_mode, is_neox, **sel):
    """The reference's result on CPU copies: (kv bits, q_out bits or None)."""
    cpu = {k: v.detach().cpu().clone() for k, v in c.items()}
    run_reference(cpu, fmt, q_mode, is_neox, **sel)
    return bits(cpu["kv_buffer"]), bits(cpu["q_out"]) if q_mode != "none" else None


def check_kernel(path, c, fmt, q_mode, is_neox, **sel):
    want_kv, want_q = expected(c, fmt, q_mode, is_neox, **sel)
    run_kernel(path, c, fmt, q_mode, is_neox, **sel)
    assert_same(c["kv_buffer"], want_kv, f"{path} kv_buffer")
    if q_mode != "none":
        assert_same(c["q_out"], want_q, f"{path} q_out")


def small(n_gpu: int, n_cpu: int) -> int:
    return n_gpu if HAS_CUDA else n_cpu


@pytest.mark.parametrize("q_mode", Q_MODES)
@pytest.mark.parametrize("fmt", FORMATS, ids=fmt_id)
@pytest.mark.parametrize("dtype", SRC_DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("is_neox", STYLES, ids=["neox", "interleaved"])
@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_kernel_matches_reference(path, is_neox, dtype, fmt, q_mode):
    c = make_case(small(67, 5), small(16, 2), dtype, fmt, q_mode, num_slots=small(256, 48))
    check_kernel(path, c, fmt, q_mode, is_neox, reserved_skip_index=3)


@pytest.mark.parametrize("fmt", FORMATS, ids=fmt_id)
@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_kernel_padding_rows_are_skipped_without_skip_index(path, fmt):
    """Without reserved_skip_index only loc < 0 is padding: the row aimed at slot 3 is written."""
    c = make_case(small(33, 5), 2, torch.bfloat16, fmt, "16bit")
    check_kernel(path, c, fmt, "16bit", False)


@pytest.mark.parametrize("fmt", FORMATS, ids=fmt_id)
@pytest.mark.parametrize("rank", [0, 2])
@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_kernel_dcp_writes_owner_rows_only(path, fmt, rank):
    c = make_case(small(40, 8), 2, torch.bfloat16, fmt, "fp8", num_slots=64)
    c["kv_buffer"] = c["kv_buffer"][:22]
    check_kernel(path, c, fmt, "fp8", True, dcp_world_size=3, dcp_rank=rank)


@pytest.mark.parametrize("fmt", FORMATS, ids=fmt_id)
@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_kernel_skips_slots_past_the_buffer_unchecked(path, fmt):
    """Unchecked, a slot >= num_slots is skipped (the reference would raise): nothing outside the
    buffer is touched; the buffer's other rows and every query row are as the reference has them."""
    c = make_case(small(24, 5), 2, torch.bfloat16, fmt, "16bit", num_slots=40)
    storage = torch.randint(0, 256, (41 * c["kv_buffer"].shape[1] * c["kv_buffer"].element_size(),), dtype=torch.uint8)
    whole = storage.view(c["kv_buffer"].dtype).view(41, -1).to(DEVICE)
    whole[:40] = c["kv_buffer"]
    c["kv_buffer"] = whole[:40]
    c["loc"][0] = 40
    c["loc"][3] = 1 << 40 if c["loc"].dtype == torch.int64 else 40
    tail = bits(whole[40]).clone()
    ref = {k: v.detach().cpu().clone() for k, v in c.items()}
    ref["loc"][0] = ref["loc"][3] = -1  # what the kernel must do with them: nothing
    want_kv, want_q = expected(ref, fmt, "16bit", True)
    run_kernel(path, c, fmt, "16bit", True)
    assert_same(c["kv_buffer"], want_kv, "kv_buffer")
    assert_same(c["q_out"], want_q, "q_out")
    assert torch.equal(bits(whole[40]), tail), "a row past the view was written"


@pytest.mark.parametrize("fmt", FORMATS, ids=fmt_id)
@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_kernel_position_out_of_range_writes_nothing_for_that_token(path, fmt):
    """Unchecked, a token whose position is outside the table reads no table row and writes neither
    its cache row nor its query rows (the public function raises for it when bounds are checked)."""
    c = make_case(small(20, 5), 3, torch.bfloat16, fmt, "16bit")
    c["positions"][0] = MAX_POS
    c["positions"][4] = -5
    ref = {k: v.detach().cpu().clone() for k, v in c.items()}
    ref["loc"][0] = ref["loc"][4] = -1
    ref["positions"][0] = ref["positions"][4] = 0
    want_kv, want_q = expected(ref, fmt, "16bit", False)
    for t in (0, 4):  # the query rows of those tokens stay poisoned
        want_q[t] = bits(c["q_out"][t])
    run_kernel(path, c, fmt, "16bit", False)
    assert_same(c["kv_buffer"], want_kv, "kv_buffer")
    assert_same(c["q_out"], want_q, "q_out")


@pytest.mark.parametrize("loc_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("fmt", FORMATS, ids=fmt_id)
@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_kernel_honours_strides_and_offsets(path, fmt, loc_dtype):
    """loc strided (and offset), positions strided, k rows strided, q views of a wider tensor,
    q_out a strided view, the cache a 3-D [S, 1, row] view with a wider row stride."""
    n, h = small(37, 4), 3
    c = make_case(n, h, torch.bfloat16, fmt, "16bit", num_slots=64)
    g = torch.Generator().manual_seed(11)
    wide_loc = torch.full((2 * n + 1,), -9, dtype=loc_dtype)
    wide_loc[1::2] = c["loc"].cpu().to(loc_dtype)
    wide_pos = torch.zeros(n, 3, dtype=torch.int32)
    wide_pos[:, 2] = c["positions"].cpu().int()
    k_nope = torch.randn(n, NOPE + 64, generator=g).to(torch.bfloat16)
    k_nope[:, 16 : 16 + NOPE] = c["k_nope"].cpu()
    k_pe = torch.randn(n, 3 * ROPE, generator=g).to(torch.bfloat16)
    k_pe[:, ROPE : 2 * ROPE] = c["k_pe"].cpu()
    q_wide = torch.randn(n, h, NOPE + ROPE + 32, generator=g).to(torch.bfloat16)
    q_wide[..., :NOPE] = c["q_nope"].cpu()
    q_wide[..., NOPE + 32 :] = c["q_pe"].cpu()
    out_wide = torch.randint(0, 256, (n, h + 1, (NOPE + ROPE) * 2), dtype=torch.uint8, generator=g).view(torch.bfloat16)
    out_wide[:, :h] = c["q_out"].cpu()
    kv = c["kv_buffer"].cpu()
    kv_wide = torch.randint(0, 256, (kv.shape[0], 1, (kv.shape[1] + 16) * kv.element_size()), dtype=torch.uint8, generator=g)
    kv_wide = kv_wide.view(kv.dtype)
    kv_wide[:, 0, : kv.shape[1]] = kv
    dev = {k: v.to(DEVICE) for k, v in dict(wl=wide_loc, wp=wide_pos, kn=k_nope, kp=k_pe, qw=q_wide, ow=out_wide, kw=kv_wide).items()}
    view = dict(c, loc=dev["wl"][1::2], positions=dev["wp"][:, 2], k_nope=dev["kn"][:, 16 : 16 + NOPE],
                k_pe=dev["kp"][:, ROPE : 2 * ROPE], q_nope=dev["qw"][..., :NOPE], q_pe=dev["qw"][..., NOPE + 32 :],
                q_out=dev["ow"][:, :h], kv_buffer=dev["kw"][..., : kv.shape[1]])  # fmt: skip
    want_kv, want_q = expected(view, fmt, "16bit", False, reserved_skip_index=3)
    before_out, before_kv = bits(dev["ow"]).clone(), bits(dev["kw"]).clone()
    run_kernel(path, view, fmt, "16bit", False, reserved_skip_index=3)
    assert_same(view["kv_buffer"], want_kv, "kv_buffer")
    assert_same(view["q_out"], want_q, "q_out")
    assert torch.equal(bits(dev["ow"][:, h]), before_out[:, h]), "q_out's neighbour head was written"
    assert torch.equal(bits(dev["kw"])[..., kv.shape[1] :], before_kv[..., kv.shape[1] :]), "bytes past the row"


def _triton_sweep_shapes():
    from mlakv.spec.tuning import ROPE_TRITON_SWEEP

    return ROPE_TRITON_SWEEP


@pytest.mark.parametrize("q_format", ["bf16", "ds_mla", "e4m3"])
def test_triton_launch_table_rows_per_call_kind(q_format):
    """Each call kind (FP8 query, ds_mla rows, other) has its own launch rows: n * H bounds increasing, the last unbounded, every
    shape one the sweep times (so each was checked bit-exact and timed on a GPU)."""
    from mlakv.spec.tuning import ROPE_TRITON_STEPS, ROPE_TRITON_SWEEP, TRIGGER_PLACES, rope_triton_launch

    steps = ROPE_TRITON_STEPS[q_format]
    bounds = [s[0] for s in steps[:-1]]
    assert steps[-1][0] is None and bounds == sorted(bounds) and None not in bounds
    assert all(s[1:3] in ROPE_TRITON_SWEEP and s[3] in TRIGGER_PLACES for s in steps)
    for max_n, warps, rows, place in steps:
        assert rope_triton_launch(max_n if max_n is not None else 1 << 30, q_format) == (warps, rows, place)


@pytest.mark.parametrize("q_mode", ["16bit", "fp8", "fp8_power_of_two"])
@pytest.mark.parametrize("warps, q_rows", _triton_sweep_shapes())
@pytest.mark.parametrize("values", ["finite", "one_inf"])
def test_triton_every_launch_shape_with_query_views(warps, q_rows, q_mode, values):
    """The Triton kernel at every shape its sweep times (query rows per program 1..16 over n * H = 15
    rows, so the last program is partial): q_nope and q_pe views of one wider tensor, q_out a view
    with a neighbour head, a token whose position lies outside the table (its rows stay as they were).
    ``one_inf``: one query value is inf, so under Q_SCALE that program takes the e4m3 query's general
    path (rows reloaded through the same views); ``fp8_power_of_two``: q_scale 0.5, every program the
    product path, through the same views."""
    from mlakv.kernels.triton.rope_write import launch_rope_write

    q_scale = 0.5 if q_mode == "fp8_power_of_two" else Q_SCALE
    q_mode = "fp8" if q_mode == "fp8_power_of_two" else q_mode
    n, h = 5, 3
    c = make_case(n, h, torch.bfloat16, "ds_mla", q_mode, num_slots=32)
    g = torch.Generator().manual_seed(5)
    q_wide = torch.randn(n, h, NOPE + ROPE + 8, generator=g).to(torch.bfloat16).to(DEVICE)
    q_wide[..., :NOPE], q_wide[..., NOPE + 8 :] = c["q_nope"], c["q_pe"]
    out = c["q_out"]
    out_wide = torch.randint(0, 256, (n, h + 1, out.shape[-1] * out.element_size()), dtype=torch.uint8, generator=g)
    out_wide = out_wide.view(out.dtype).to(DEVICE)
    out_wide[:, :h] = out
    c.update(q_nope=q_wide[..., :NOPE], q_pe=q_wide[..., NOPE + 8 :], q_out=out_wide[:, :h])
    if values == "one_inf":
        c["q_nope"][1, 2, 9] = float("inf")
    neighbour = bits(out_wide[:, h]).clone()
    # token 3's position lies outside the table: the reference writes neither its row nor its queries
    ref = dict(c, loc=c["loc"].clone(), positions=c["positions"].clone())
    ref["loc"][3] = -1
    want_kv, want_q = expected(ref, "ds_mla", q_mode, False, **({"q_scale": q_scale} if q_mode == "fp8" else {}))
    want_q[3] = bits(c["q_out"][3]).cpu()
    c["positions"][3] = MAX_POS
    call = RopeWriteCall(c["kv_buffer"], c["loc"], c["k_nope"], c["k_pe"], c["positions"], c["cos_sin_cache"], False,
                         "ds_mla", None, c["q_nope"], c["q_pe"], c["q_out"], as_scale(q_scale if q_mode == "fp8" else None))
    launch_rope_write(call, num_warps=warps, q_rows=q_rows)
    assert_same(c["kv_buffer"], want_kv, "kv_buffer")
    assert_same(c["q_out"], want_q, "q_out")
    assert torch.equal(bits(out_wide[:, h]), neighbour), "q_out's neighbour head was written"


@pytest.mark.parametrize("q_scale", [Q_SCALE, 0.5], ids=["divided", "power_of_two"])
@pytest.mark.parametrize("special", [float("nan"), float("inf"), 2.0**127, 65504.0], ids=["nan", "inf", "2^127", "65504"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("warps, q_rows", _triton_sweep_shapes())
def test_triton_e4m3_query_program_with_a_special_value(warps, q_rows, dtype, special, q_scale):
    """An e4m3 query with one (token, head) row holding NaN, inf, a value past the fast division's
    range (bf16; inf in fp16) or fp16's largest finite value (in its nope part, and in a rotated pair of
    another row), beside finite rows of the same program, at every launch shape: every row comes out
    as the reference's. Under a scale that is not a power of two the kernel takes a shorter path in a
    program whose values are all finite and in range and runs the general one otherwise, so one row's
    values must not change another's bytes; under a power of two every program takes the product
    path, which must saturate inf and encode NaN itself."""
    from mlakv.kernels.triton.rope_write import launch_rope_write

    n, h = 5, 3
    c = make_case(n, h, dtype, "per_tensor", "fp8", num_slots=32, seed=9)
    c["q_nope"][2, 1, 7] = special
    c["q_pe"][3, 0, 4] = special
    c["q_nope"][1, 0, 3] = -special
    want_kv, want_q = expected(c, "per_tensor", "fp8", False, q_scale=q_scale)
    call = RopeWriteCall(c["kv_buffer"], c["loc"], c["k_nope"], c["k_pe"], c["positions"], c["cos_sin_cache"], False,
                         "per_tensor", as_scale(K_SCALE), c["q_nope"], c["q_pe"], c["q_out"], as_scale(q_scale))
    launch_rope_write(call, num_warps=warps, q_rows=q_rows)
    assert_same(c["kv_buffer"], want_kv, "kv_buffer")
    assert_same(c["q_out"], want_q, "q_out")


@pytest.mark.parametrize("trigger", ["entry", "wait", "end"])
@pytest.mark.parametrize("q_mode", ["16bit", "fp8"])
def test_triton_every_trigger_place(trigger, q_mode):
    """The PDL trigger at each place the launcher takes (entry, right after the wait, after the stores):
    the same bytes as the reference (the place moves timing only; on a GPU the launch uses PDL)."""
    from mlakv.kernels.triton.rope_write import launch_rope_write

    c = make_case(6, 4, torch.bfloat16, "per_tensor", q_mode, num_slots=32, seed=3)
    want_kv, want_q = expected(c, "per_tensor", q_mode, False)
    call = RopeWriteCall(c["kv_buffer"], c["loc"], c["k_nope"], c["k_pe"], c["positions"], c["cos_sin_cache"], False,
                         "per_tensor", as_scale(K_SCALE), c["q_nope"], c["q_pe"], c["q_out"],
                         as_scale(Q_SCALE if q_mode == "fp8" else None))  # fmt: skip
    launch_rope_write(call, trigger=trigger)
    assert_same(c["kv_buffer"], want_kv, "kv_buffer")
    assert_same(c["q_out"], want_q, "q_out")


def test_triton_trigger_place_outside_the_three_is_refused():
    from mlakv.kernels.triton.rope_write import launch_rope_write

    c = make_case(2, 1, torch.bfloat16, None, "16bit", num_slots=8)
    call = RopeWriteCall(c["kv_buffer"], c["loc"], c["k_nope"], c["k_pe"], c["positions"], c["cos_sin_cache"], False,
                         None, None, c["q_nope"], c["q_pe"], c["q_out"], None)
    before = bits(c["kv_buffer"]).clone()
    with pytest.raises(ValueError, match="trigger: expected one of"):
        launch_rope_write(call, trigger="late")
    assert torch.equal(bits(c["kv_buffer"]), before)


@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_kernel_expanded_loc_and_positions(path):
    """Stride-0 (expanded) loc and positions: every token targets one slot with one position."""
    n = small(9, 3)
    c = make_case(n, 2, torch.bfloat16, None, "16bit")
    c["loc"] = torch.tensor([7], device=DEVICE).expand(n)
    c["positions"] = torch.tensor([123], device=DEVICE).expand(n)
    c["k_nope"] = c["k_nope"][:1].expand(n, NOPE)  # one source row: the slot's contents are defined
    c["k_pe"] = c["k_pe"][:1].expand(n, ROPE)
    check_kernel(path, c, None, "16bit", True)


@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_kernel_tiny_and_huge_values_round_as_the_reference(path):
    """Rope values near the bottom of fp32 (subnormal products) and near the top (overflow to inf)."""
    n = small(16, 4)
    for scale in (2.0**-120, 2.0**100):
        for fmt in FORMATS:
            c = make_case(n, 2, torch.bfloat16, fmt, "fp8", seed=int(scale > 1))
            c["k_pe"] = (c["k_pe"].float() * scale).to(torch.bfloat16)
            c["q_pe"] = (c["q_pe"].float() * scale).to(torch.bfloat16)
            check_kernel(path, c, fmt, "fp8", False)


@pytest.mark.parametrize("scales", [(K_SCALE, Q_SCALE), (0.5, 2.0**-3)], ids=["not_powers_of_two", "powers_of_two"])
@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_kernel_nope_quotients_on_e4m3_rounding_boundaries(path, scales, monkeypatch):
    """per_tensor cache rows and the e4m3 query whose nope quotients all lie on an e4m3 value or on a
    tie between two (RNE: the even code), both signs (fp16 sources hold these values exactly): an
    approximate quotient would fall on the wrong side of a tie. Powers of two are the kernels' product
    path (the exact reciprocal)."""
    monkeypatch.setattr(sys.modules[__name__], "K_SCALE", scales[0])
    monkeypatch.setattr(sys.modules[__name__], "Q_SCALE", scales[1])
    codes = torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    mids = (codes[:-1] + codes[1:]) / 2
    quotients = torch.cat([mids, codes, -mids, -codes]).repeat(2)[:NOPE]
    c = make_case(small(8, 2), 2, torch.float16, "per_tensor", "fp8")
    for name, scale in (("k_nope", K_SCALE), ("q_nope", Q_SCALE)):
        t = c[name]
        rows = t.reshape(-1, NOPE).shape[0]
        vals = torch.stack([quotients.roll(17 * r) for r in range(rows)]) * scale
        assert torch.equal(vals.to(torch.float16).float(), vals), "the test's values must be exact in fp16"
        t.copy_(vals.to(torch.float16).reshape(t.shape))
    check_kernel(path, c, "per_tensor", "fp8", False)


@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_kernel_no_rows_launches_nothing(path):
    c = make_case(0, 2, torch.bfloat16, "ds_mla", "16bit")
    before = bits(c["kv_buffer"]).clone()
    run_kernel(path, c, "ds_mla", "16bit", True)
    assert torch.equal(bits(c["kv_buffer"]), before)


# ---- the CUDA source: builds for sm_90a without a GPU; its launcher refuses what the rules refuse ----
BUILD_LAYOUTS = [(None, torch.bfloat16), ("per_tensor", torch.bfloat16), ("ds_mla", torch.float16)]


@pytest.fixture(scope="module")
def built_rope_modules():
    from mlakv.kernels.cuda.loader import JitUnavailable
    from mlakv.kernels.cuda.rope_write import build_rope_write_module, prebuild_rope_write_modules

    def build(layout):
        try:
            return build_rope_write_module(layout[0], layout[1], NOPE, ROPE, True, (9, 0))
        except JitUnavailable as e:
            return e

    with sm90a_build_env():
        prebuild_rope_write_modules(BUILD_LAYOUTS, (9, 0), NOPE, ROPE, processes=2)  # in parallel, into the disk cache
        return {layout: build(layout) for layout in BUILD_LAYOUTS}


@pytest.fixture(scope="module", autouse=True)
def _cuda_modules_built_in_parallel():
    """On an SM90 GPU, build the six CUDA modules the tests load at once (one process each) before
    the first test needs one: built one by one on first use they would take minutes."""
    if IS_SM90:
        from mlakv.kernels.cuda.rope_write import prebuild_rope_write_modules

        cap = torch.cuda.get_device_capability()
        layouts = [(f, d) for f in FORMATS for d in SRC_DTYPES]
        failed = {k: v for k, v in prebuild_rope_write_modules(layouts, cap, NOPE, ROPE).items() if v}
        assert not failed, f"CUDA module builds failed: {failed}"
    yield


@pytest.mark.jit_build
@pytest.mark.parametrize("layout", BUILD_LAYOUTS, ids=lambda l: f"{fmt_id(l[0])}-{str(l[1])[6:]}")
def test_cuda_module_builds_for_sm90a(built_rope_modules, layout):
    mod = built_rope_modules[layout]
    assert not isinstance(mod, Exception), f"build failed: {mod}"
    assert callable(mod.rope_write) and callable(mod.check_rope_write)


def _check_args(fmt, dtype, q_mode, **over):
    c = make_case(4, 2, dtype, fmt, q_mode, device="cpu")
    scale = torch.ones(1, dtype=torch.float32)
    kv = c["kv_buffer"] if fmt is None else c["kv_buffer"].view(torch.uint8)
    q = q_mode != "none"
    a = dict(kv=kv, loc=c["loc"], k_nope=c["k_nope"], k_pe=c["k_pe"], positions=c["positions"], cos_sin=c["cos_sin_cache"],
             k_scale=scale, has_q=q, q_nope=c.get("q_nope", scale), q_pe=c.get("q_pe", scale),
             q_out=c["q_out"].view(torch.uint8) if q_mode == "fp8" else c.get("q_out", scale), q_scale=scale,
             dcp_world=1, dcp_rank=0)  # fmt: skip
    a.update(over)
    return list(a.values())


REFUSED = {
    "k_nope-dtype": (dict(k_nope=torch.zeros(4, NOPE, dtype=torch.float32)), TypeError),
    "k_pe-width": (dict(k_pe=torch.zeros(4, 32, dtype=torch.bfloat16)), ValueError),
    "k_pe-rows": (dict(k_pe=torch.zeros(3, ROPE, dtype=torch.bfloat16)), ValueError),
    "positions-dtype": (dict(positions=torch.zeros(4, dtype=torch.int16)), TypeError),
    "positions-rows": (dict(positions=torch.zeros(5, dtype=torch.long)), ValueError),
    "loc-2d": (dict(loc=torch.zeros(4, 1, dtype=torch.long)), ValueError),
    "cos_sin-dtype": (dict(cos_sin=torch.zeros(8, ROPE, dtype=torch.bfloat16)), ValueError),
    "cos_sin-width": (dict(cos_sin=torch.zeros(8, 2 * ROPE)), ValueError),
    "kv-too-narrow": (dict(kv=torch.zeros(8, NOPE, dtype=torch.bfloat16)), ValueError),
    "kv-dtype": (dict(kv=torch.zeros(8, 600, dtype=torch.float16)), TypeError),
    "q_out-width": (dict(q_out=torch.zeros(4, 2, NOPE, dtype=torch.bfloat16)), ValueError),
    "q_pe-heads": (dict(q_pe=torch.zeros(4, 3, ROPE, dtype=torch.bfloat16)), ValueError),
    "q_out-dtype": (dict(q_out=torch.zeros(4, 2, NOPE + ROPE, dtype=torch.float32)), TypeError),
    "dcp-rank": (dict(dcp_world=2, dcp_rank=2), ValueError),
}


@pytest.mark.jit_build
@pytest.mark.parametrize("case", list(REFUSED), ids=list(REFUSED))
def test_cuda_launcher_refuses_invalid_calls(built_rope_modules, case):
    """The C++ launcher's own checks (on CPU tensors): a broken rule raises, naming what is wrong."""
    mod = built_rope_modules[(None, torch.bfloat16)]
    assert not isinstance(mod, Exception), f"build failed: {mod}"
    over, exc = REFUSED[case]
    with pytest.raises(exc):
        mod.check_rope_write(*_check_args(None, torch.bfloat16, "16bit", **over))


@pytest.mark.jit_build
@pytest.mark.parametrize("q_mode", Q_MODES)
def test_cuda_launcher_accepts_valid_calls_and_reports_alignment(built_rope_modules, q_mode):
    mod = built_rope_modules[("per_tensor", torch.bfloat16)]
    assert not isinstance(mod, Exception), f"build failed: {mod}"
    assert mod.check_rope_write(*_check_args("per_tensor", torch.bfloat16, q_mode)) is True
    odd = torch.zeros(8, 600, dtype=torch.uint8)[:, 8:600]  # rows at an 8-byte offset: valid, not for its vectors
    assert mod.check_rope_write(*_check_args("per_tensor", torch.bfloat16, q_mode, kv=odd)) is False


# ---- GPU: every n, 64-bit offsets, no access outside the tensors ---------------------------------------
def run_reference_on_device(c, fmt, q_mode, is_neox):
    """The reference run on the GPU copies (large sizes; the small cases compare against the CPU)."""
    ref = {k: v.clone() for k, v in c.items()}
    run_reference(ref, fmt, q_mode, is_neox)
    return bits(ref["kv_buffer"]), bits(ref["q_out"]) if q_mode != "none" else None


@requires_sm90
@pytest.mark.parametrize(
    "n,heads,fmt,q_mode",
    [
        (16384 + 17, 16, None, "16bit"),
        (16384 + 17, 16, "per_tensor", "fp8"),
        (16384 + 17, 16, "ds_mla", "16bit"),
        (16384, 128, None, "16bit"),  # q_out is 2.4 GB: offsets past 2^31 bytes
        (65536 + 3, 1, "ds_mla", "fp8"),
        (1, 128, "ds_mla", "fp8"),
    ],
)
def test_cuda_large_calls_match_reference(n, heads, fmt, q_mode):
    c = make_case(n, heads, torch.bfloat16, fmt, q_mode, num_slots=n + 4096)
    want_kv, want_q = run_reference_on_device(c, fmt, q_mode, False)
    run_kernel("cuda", c, fmt, q_mode, False)
    torch.cuda.synchronize()
    assert_same(c["kv_buffer"], want_kv, "kv_buffer")
    if q_mode != "none":
        assert_same(c["q_out"], want_q, "q_out")


# ---- the public function: validation, bounds, routing -------------------------------------------------
def public_call(c, fmt, q_mode, is_neox, **extra):
    from mlakv.ops.rope_write import set_mla_kv_buffer_rope

    kw = call_kwargs(c, fmt, q_mode)
    kw.update(extra)
    return set_mla_kv_buffer_rope(
        c["kv_buffer"], c["loc"], c["k_nope"], c["k_pe"], c["positions"], c["cos_sin_cache"], is_neox, **kw
    )


@pytest.mark.parametrize("q_mode", Q_MODES)
@pytest.mark.parametrize("fmt", FORMATS, ids=fmt_id)
@pytest.mark.parametrize("is_neox", STYLES, ids=["neox", "interleaved"])
def test_public_function_matches_reference(is_neox, fmt, q_mode):
    c = make_case(small(70, 6), small(16, 2), torch.bfloat16, fmt, q_mode, num_slots=small(256, 48))
    want_kv, want_q = expected(c, fmt, q_mode, is_neox, reserved_skip_index=3)
    out = public_call(c, fmt, q_mode, is_neox, reserved_skip_index=3)
    assert_same(c["kv_buffer"], want_kv, "kv_buffer")
    if q_mode == "none":
        assert out is None
    else:
        assert out is c["q_out"]
        assert_same(c["q_out"], want_q, "q_out")


def test_public_function_path_is_named_by_the_dispatcher():
    from mlakv.ops.dispatch import rope_write_path

    c = make_case(2, 1, torch.bfloat16, None, "none")
    want = "torch" if not HAS_CUDA else ("jit" if IS_SM90 else "triton")
    assert rope_write_path(c["kv_buffer"], c["k_nope"], c["k_pe"], None) == want


@pytest.mark.parametrize("q_mode", ["16bit", "fp8"])
def test_public_function_allocates_q_out(q_mode):
    c = make_case(small(20, 5), 3, torch.bfloat16, "ds_mla", q_mode)
    want_kv, want_q = expected(c, "ds_mla", q_mode, False)
    kw = dict(q_nope=c["q_nope"], q_pe=c["q_pe"], q_scale=Q_SCALE if q_mode == "fp8" else None)
    from mlakv.ops.rope_write import set_mla_kv_buffer_rope

    out = set_mla_kv_buffer_rope(
        c["kv_buffer"], c["loc"], c["k_nope"], c["k_pe"], c["positions"], c["cos_sin_cache"], False,
        kv_cache_format="ds_mla", **kw,
    )  # fmt: skip
    assert out.shape == (c["q_nope"].shape[0], 3, NOPE + ROPE)
    assert out.dtype == (torch.float8_e4m3fn if q_mode == "fp8" else torch.bfloat16)
    assert_same(out, want_q, "q_out")
    assert_same(c["kv_buffer"], want_kv, "kv_buffer")


def _bad(c, **over):
    """(args, kwargs) of a valid per_tensor call with a query, with ``over`` replacing arguments."""
    a = dict(kv_buffer=c["kv_buffer"], loc=c["loc"], k_nope=c["k_nope"], k_pe=c["k_pe"], positions=c["positions"],
             cos_sin_cache=c["cos_sin_cache"], is_neox_style=True, q_nope=c["q_nope"], q_pe=c["q_pe"], q_out=c["q_out"],
             kv_cache_format="per_tensor", k_scale=K_SCALE, q_scale=None)  # fmt: skip
    a.update(over)
    return a


def _cpu(shape, dtype):
    return torch.zeros(shape, dtype=dtype, device=DEVICE)


BAD_CALLS = {
    "is_neox_style": (dict(is_neox_style=1), TypeError),
    "kv_cache_format": (dict(kv_cache_format="fp4"), ValueError),
    "k_nope dtype": (dict(k_nope=_cpu((4, NOPE), torch.float32)), TypeError),
    "k_pe dtype": (dict(k_pe=_cpu((4, ROPE), torch.float16)), TypeError),
    "k_pe": (dict(k_pe=_cpu((4, 2, ROPE), torch.bfloat16)), ValueError),
    "positions dtype": (dict(positions=_cpu((4,), torch.float32)), TypeError),
    "positions": (dict(positions=_cpu((3,), torch.int64)), ValueError),
    "cos_sin_cache dtype": (dict(cos_sin_cache=_cpu((16, ROPE), torch.bfloat16)), TypeError),
    "cos_sin_cache": (dict(cos_sin_cache=_cpu((16, ROPE // 2), torch.float32)), ValueError),
    "kv_buffer dtype": (dict(kv_buffer=_cpu((16, 600), torch.bfloat16)), TypeError),
    "kv_buffer": (dict(kv_buffer=_cpu((16, 500), torch.uint8)), ValueError),
    "k_scale": (dict(k_scale=None), ValueError),
    "q_scale": (dict(q_scale=1.0), ValueError),
    "q_nope": (dict(q_out=None, q_nope=None), ValueError),
    "q_pe alone missing": (dict(q_pe=None), ValueError),
    "q_out width": (dict(q_out=_cpu((4, 2, NOPE), torch.bfloat16)), ValueError),
    "q_pe": (dict(q_pe=_cpu((4, 3, ROPE), torch.bfloat16)), ValueError),
    "q_nope dtype": (dict(q_nope=_cpu((4, 2, NOPE), torch.float16)), TypeError),
    "dcp_rank": (dict(dcp_world_size=2, dcp_rank=2), ValueError),
    "reserved_skip_index": (dict(reserved_skip_index=1.5), TypeError),
}


@pytest.mark.parametrize("name", list(BAD_CALLS), ids=list(BAD_CALLS))
def test_public_function_names_the_bad_argument(name):
    from mlakv.ops.rope_write import set_mla_kv_buffer_rope

    c = make_case(4, 2, torch.bfloat16, "per_tensor", "16bit")
    over, exc = BAD_CALLS[name]
    before = bits(c["kv_buffer"]).clone()
    with pytest.raises(exc, match=name.split()[0]):
        set_mla_kv_buffer_rope(**_bad(c, **over))
    assert torch.equal(bits(c["kv_buffer"]), before)


@pytest.mark.parametrize("what", ["loc", "positions"])
def test_public_function_checked_bounds_raise_before_writing(what):
    c = make_case(small(30, 6), 2, torch.bfloat16, "ds_mla", "fp8")
    if what == "loc":
        c["loc"][5] = c["kv_buffer"].shape[0] + 2
    else:
        c["positions"][5] = MAX_POS
    before_kv, before_q = bits(c["kv_buffer"]).clone(), bits(c["q_out"]).clone()
    with pytest.raises(IndexError, match=rf"{what}\[5\]"):
        public_call(c, "ds_mla", "fp8", True, check_bounds=True)
    assert torch.equal(bits(c["kv_buffer"]), before_kv) and torch.equal(bits(c["q_out"]), before_q)


def test_public_function_no_tokens_writes_nothing():
    c = make_case(0, 2, torch.bfloat16, None, "16bit")
    before = bits(c["kv_buffer"]).clone()
    assert public_call(c, None, "16bit", True) is c["q_out"]
    assert torch.equal(bits(c["kv_buffer"]), before)


@requires_sm90
@pytest.mark.parametrize("fmt", FORMATS, ids=fmt_id)
def test_misaligned_call_falls_back_to_triton_bit_exact(fmt):
    """A cache whose rows start 8 bytes off 16 cannot take the CUDA kernel's vectors: the dispatcher
    runs Triton instead, with the same result."""
    from mlakv.kernels.cuda.rope_write import rope_write_cuda
    from mlakv.ops import dispatch

    c = make_case(40, 4, torch.bfloat16, fmt, "fp8")
    es = c["kv_buffer"].element_size()
    wide = torch.randint(0, 256, (c["kv_buffer"].shape[0], c["kv_buffer"].shape[1] * es + 8), dtype=torch.uint8,
                         device=DEVICE)  # fmt: skip
    c["kv_buffer"] = wide[:, 8:].view(c["kv_buffer"].dtype)
    want_kv, want_q = expected(c, fmt, "fp8", True)
    q_scale = as_scale(Q_SCALE)
    call = RopeWriteCall(c["kv_buffer"], c["loc"], c["k_nope"], c["k_pe"], c["positions"], c["cos_sin_cache"], True,
                         fmt, as_scale(K_SCALE if fmt == "per_tensor" else None), c["q_nope"], c["q_pe"], c["q_out"],
                         q_scale, -1, 1, 0)  # fmt: skip
    assert rope_write_cuda(call) is False  # refused, nothing launched
    assert dispatch.run_rope_write(call) == "triton"
    assert_same(c["kv_buffer"], want_kv, "kv_buffer")
    assert_same(c["q_out"], want_q, "q_out")


# ---- the benchmark's own logic (CPU: the torch path; no timing claims) ----------------------------------
def test_bench_providers_pass_their_check_and_a_wrong_one_is_caught():
    from mlakv.bench.rope_write import check_provider, expected_of, make_set, providers_for, rope_table

    cs = rope_table(device=DEVICE)
    for variant in ("bf16", "fp8", "ds_mla"):
        d = make_set(3, 2, variant, cs, DEVICE)
        want = expected_of(d, False)
        fns, _, _ = providers_for(variant, False, ["fused", "unfused"])
        for name, fn in fns.items():
            assert check_provider(fn, d, want) is None, (variant, name)

        def wrong(c, fn=fns["fused"]):
            fn(c)
            c["q_out"].view(torch.uint8)[1, 0, -1] ^= 1

        assert "q_out: 1 rows differ" in check_provider(wrong, d, want)


def test_bench_bytes_count_sources_writes_and_the_query():
    from mlakv.bench.rope_write import call_bytes

    per_token_bf16 = 1152 + 16 + 256 + 1152 + 16 * (1152 + 1152)
    assert call_bytes(10, 16, "bf16") == 10 * per_token_bf16
    assert call_bytes(1, 1, "ds_mla") == 1152 + 16 + 256 + 656 + 1152 + 1152
    assert call_bytes(1, 1, "fp8") == 1152 + 16 + 256 + 576 + 1152 + 576


def test_bench_runs_on_cpu_and_reports():
    from mlakv.bench.rope_write import main

    assert main(["--variants", "ds_mla", "--heads", "2", "--sizes", "2"]) == 0


def test_bench_triton_sweep_gives_the_table_rows(monkeypatch):
    """``--triton-sweep``'s rows: per query-row count n * H the shape with the least summed time over the
    points of that count (n = 8, H = 16 and n = 1, H = 128 share 128), then folded into the current table,
    whose rows outside the swept counts stay."""
    from mlakv.bench import rope_write as bench
    from mlakv.spec import tuning

    monkeypatch.setitem(tuning.ROPE_TRITON_STEPS, "e4m3", ((64, 1, 1, "wait"), (None, 4, 8, "wait")))

    def point(n, heads, **times):
        names = {"a": "triton w2 q2 entry", "b": "triton w4 q4", "c": "triton w1 q1"}
        return {"variant": "fp8", "heads": heads, "n": n, "times_us": {names[k]: v for k, v in times.items()}}

    report = {"results": [
        point(8, 16, a=1.0, b=1.5, c=1.2),  # 128 query rows: a fastest here ...
        point(1, 128, a=2.0, b=1.2, c=1.1),  # ... b and c here; summed: a 3.0, b 2.7, c 2.3
        point(512, 16, a=9.0, b=5.0),  # 8192: b (c not timed at this count: it does not compete)
    ]}  # fmt: skip
    text = "\n".join(bench.fastest_triton(report))
    assert "ROPE_TRITON_STEPS['e4m3'] = ((128, 1, 1, 'wait'), (None, 4, 4, 'wait'))" in text
    assert ("ROPE_TRITON_STEPS['e4m3'] = ((128, 1, 1, 'wait'), (8192, 4, 4, 'wait'), (None, 4, 8, 'wait'))"
            in text.partition("# folded into the current table")[2])  # fmt: skip
    assert bench.triton_rows({"results": [dict(point(8, 16), times_us={"fused": 1.0})]}) == []


# ---- the pool method -------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS, ids=fmt_id)
@pytest.mark.parametrize("q_mode", ["none", "16bit", "fp8"])
def test_pool_method_is_rotate_then_set_kv_buffer(fmt, q_mode):
    """The pool's fused step writes what a RoPE kernel followed by the pool's own set_kv_buffer writes."""
    from mlakv.mem_cache import MLATokenToKVPool

    def pool():
        dtype = torch.bfloat16 if fmt is None else torch.float8_e4m3fn
        return MLATokenToKVPool(64, 1, dtype, NOPE, ROPE, 2, DEVICE, kv_cache_format=fmt,
                                k_scale=K_SCALE if fmt == "per_tensor" else None)  # fmt: skip

    fused, plain = pool(), pool()
    c = make_case(small(40, 6), 2, torch.bfloat16, fmt, q_mode, num_slots=60)
    c["loc"][0] = 0  # the pool's reserved slot: skipped by both
    q = q_mode != "none"
    out = fused.set_kv_buffer_rope(
        1, c["loc"], c["k_nope"], c["k_pe"], c["positions"], c["cos_sin_cache"], False,
        c.get("q_nope"), c.get("q_pe"), c.get("q_out"), q_scale=Q_SCALE if q_mode == "fp8" else None,
    )  # fmt: skip
    k_rot = rope_rotate_torch(c["k_pe"], c["positions"], c["cos_sin_cache"], False)
    plain.set_kv_buffer(1, c["loc"], c["k_nope"], k_rot)
    assert torch.equal(bits(fused.kv_buffer[1]), bits(plain.kv_buffer[1]))
    assert torch.equal(bits(fused.kv_buffer[0]), bits(plain.kv_buffer[0]))  # the other layer untouched by both
    if q:
        assert out is c["q_out"]
    else:
        assert out is None


def test_pool_method_refuses_formats_it_does_not_write():
    from mlakv.mem_cache import MLATokenToKVPool

    p = MLATokenToKVPool(16, 1, torch.float32, NOPE, ROPE, 1, DEVICE)
    c = make_case(2, 1, torch.bfloat16, None, "none")
    with pytest.raises(ValueError, match="set_kv_buffer_rope takes"):
        p.set_kv_buffer_rope(0, c["loc"], c["k_nope"], c["k_pe"], c["positions"], c["cos_sin_cache"], True)


# ---- the demo model's fused cache step ---------------------------------------------------------------------
@pytest.mark.parametrize("fmt", [None], ids=fmt_id)  # the model's PoolKVCache gathers raw rows: 16-bit pools
def test_demo_model_fused_step_matches_separate_kernels(fmt):
    """The small MLA model over a pool with the fused step (one launch per layer) gives the same logits
    and the same cache bits as over a pool written by torch RoPE + set_kv_buffer."""
    from mlakv.demo.model import MLAConfig, PoolKVCache, PrefillSegment, make_model
    from mlakv.mem_cache import MLATokenToKVPool

    cfg = MLAConfig(vocab_size=64, hidden=64, n_heads=2, n_layers=2, max_position=256)
    model = make_model(cfg, DEVICE, torch.bfloat16)
    pool_dtype = torch.bfloat16 if fmt is None else torch.float8_e4m3fn

    def run(fused):
        pool = MLATokenToKVPool(64, 1, pool_dtype, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.n_layers, DEVICE,
                                kv_cache_format=fmt)  # fmt: skip
        cache = PoolKVCache(pool, fused=fused)
        assert cache.fused is fused
        ids = torch.arange(5, device=DEVICE) % 64
        pos = torch.arange(5, device=DEVICE)
        slots = torch.arange(1, 6, device=DEVICE)
        out = model.prefill(cache, ids, pos, slots, [PrefillSegment(0, 5, slots)])
        table = torch.zeros(2, 8, dtype=torch.long, device=DEVICE)
        table[0, :6] = torch.arange(1, 7)
        table[1, :6] = torch.tensor([1, 2, 3, 4, 5, 7])
        dec = model.decode(cache, ids[:2], torch.tensor([5, 5], device=DEVICE), torch.tensor([6, 7], device=DEVICE),
                           table, torch.tensor([6, 6], device=DEVICE))  # fmt: skip
        return out, dec, pool

    a, b = run(True), run(False)
    assert torch.equal(bits(a[0]), bits(b[0])) and torch.equal(bits(a[1]), bits(b[1]))
    for layer in range(cfg.n_layers):
        assert torch.equal(bits(a[2].kv_buffer[layer]), bits(b[2].kv_buffer[layer]))


# ---- the Triton kernel compiles for sm_90 (no GPU needed) with no contracted FMA -----------------------------
_COMPILE_SCRIPT = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mlakv.kernels.triton.rope_write import _rope_write_kernel as k

for fmt, q8, src, neox, rule in [(0, 0, 0, 0, 0), (0, 1, 1, 1, 0), (1, 0, 0, 1, 0), (1, 1, 1, 0, 0), (2, 0, 1, 0, 0),
                                  (2, 1, 0, 1, 0), (2, 0, 0, 0, 1), (2, 1, 1, 1, 2)]:
    ptr = dict(kv_ptr="*u8" if fmt else "*i16", loc_ptr="*i64", pos_ptr="*i32", cs_ptr="*fp32", k_nope_ptr="*i16",
               k_pe_ptr="*i16", k_scale_ptr="*fp32", q_nope_ptr="*i16", q_pe_ptr="*i16",
               q_out_ptr="*u8" if q8 else "*i16", q_scale_ptr="*fp32")
    const = dict(NOPE=512, NOPE_P2=512, HALF=32, HALF_P2=32, TILES_P2=4, FORMAT=fmt, SRC=src, NEOX=bool(neox),
                 Q_FP8=bool(q8), USE_PDL=True, RULE=rule, Q_ROWS=4, NATIVE=True, Q_JOIN=True)
    sig = {n: "constexpr" if n in const else ptr.get(n, "i64") for n in k.arg_names}
    src_ = ASTSource(k, sig, constexprs={(k.arg_names.index(n),): v for n, v in const.items()})
    ptx = [triton.compile(src_, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": fuse, "num_warps": 4}).asm["ptx"]
           for fuse in (False, True)]
    print(fmt, q8, rule, ptx[0].count("fma.rn"), ptx[1].count("fma.rn"), ptx[0].count(".ftz"))
"""


def test_triton_kernel_compiles_for_sm90_without_fma():
    """Compiled for a real GPU (not the interpreter): every format and query kind (and ds_mla's
    tile-scale rules) builds, no op is flushed to zero, and no multiply-add of the rotation is
    contracted into an FMA: a build with no fast division (an e4m3 scale's quotient) has no FMA at all; one with it has only the division's own (written as FMAs,
    the correctly rounded quotient), fewer than a build that lets the compiler contract (the rotation's bits are checked against the reference on a GPU)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia", reason="triton's CUDA backend is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 8, r.stdout
    for ln in lines:
        fmt, q8, rule, fma_kept, fma_contracted, ftz = map(int, ln.split())
        assert ftz == 0, ln
        divides = fmt == 1 or q8 == 1  # per_tensor rows or an e4m3 query: x / scale
        assert (0 < fma_kept < fma_contracted) if divides else fma_kept == 0, ln


# ---- a query row's (token, head) is a division by a build constant ----------------------------------------
_DIVISION_SCRIPT = r"""
import json, re, sys
from mlakv.kernels.triton.rope_write import _rope_write_kernel as k
from mlakv.testing.sm90 import compile_sm90, sass_of

out = []
for heads, q8, rows, warps in json.loads(sys.argv[1]):
    ptrs = dict(kv_ptr="*u8", loc_ptr="*i64", pos_ptr="*i64", cs_ptr="*fp32", k_nope_ptr="*i16", k_pe_ptr="*i16",
                k_scale_ptr="*fp32", q_nope_ptr="*i16", q_pe_ptr="*i16", q_out_ptr="*u8" if q8 else "*i16",
                q_scale_ptr="*fp32")
    ints = dict(n=64, kv_stride=576, loc_stride=1, pos_stride=1, cs_stride=64, kn_stride=512, kp_stride=64,
                qn_s0=512 * heads, qn_s1=512, qp_s0=64 * heads, qp_s1=64, qo_s0=576 * heads, qo_s1=576,
                num_slots=5000, max_pos=8192, skip_index=-1, dcp_world=1, dcp_rank=0)
    consts = dict(NOPE=512, NOPE_P2=512, HALF=32, HALF_P2=32, TILES_P2=4, FORMAT=1, SRC=0, NEOX=False,
                  Q_FP8=bool(q8), USE_PDL=True, Q_ROWS=rows, NATIVE=True, Q_JOIN=rows >= warps, HEADS=heads)
    sass = sass_of(compile_sm90(k, ptrs, ints, consts, num_warps=warps, int_type="i64", enable_fp_fusion=False))
    out.append(None if sass is None else sorted(set(re.findall(r"__cuda_(sm\w*_(?:div|rem)_[su]64)", sass))))
print(json.dumps(out))
"""


@pytest.mark.parametrize("heads", [16, 3], ids=["H16", "H3"])
def test_triton_query_head_division_is_by_a_build_constant(heads):
    """The sm_90 machine code of the Triton kernel, with an e4m3 and a bf16 query at table shapes, calls no
    64-bit integer division: the head count is a constant of the build (a 64-bit division by a runtime
    head count left its out-of-line slow path in the kernel; H200, e4m3 query at 65536 tokens, H=16:
    713 us with it, 633 without)."""
    shapes = [[heads, 1, 2, 2], [heads, 0, 1, 1]]  # [H, e4m3 query, query rows per program, warps]
    calls = compile_in_subprocess(_DIVISION_SCRIPT, shapes)
    if calls[0] is None:
        pytest.skip("this Triton ships no nvdisasm")
    assert calls == [[]] * len(shapes)
