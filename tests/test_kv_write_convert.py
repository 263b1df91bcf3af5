"""The row write converts a 16/32-bit float source of another dtype than the buffer, inside the write.

Spec: writing ``src`` (float16, bfloat16 or float32) into a float16/bfloat16/float32 buffer of another
dtype stores exactly ``src.to(buffer dtype)`` (round to nearest even: halfway cases, subnormals,
overflow to inf), on every path: the torch path (CPU), the Triton row kernel (under the interpreter
here, compiled on a GPU) and the dispatcher, which sends such a call to Triton on CUDA (the JIT kernel
copies bytes). Row selection is unchanged (padding, the reserved slot). Byte/fp8 buffers and integer or
float64 sources are still refused with the error naming the argument. The pool's ``set_kv_buffer``
follows (full-row and split forms); fp8 pools keep their own formats.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from conftest import DEVICE, assert_bits_equal, bits, poisoned_buffer, requires_cuda, requires_triton
from mlakv.mem_cache import MLATokenToKVPool, kv_write_path, set_mla_kv_buffer_triton
from mlakv.spec import rules

# fp32 -> fp16 overflows to inf on purpose (an edge case); numpy, under the Triton interpreter, warns.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")

FLOATS = (torch.float16, torch.bfloat16, torch.float32)
PAIRS = [(s, d) for s, d in itertools.product(FLOATS, FLOATS) if s != d]
PAIR_IDS = [f"{str(s)[6:]}-to-{str(d)[6:]}" for s, d in PAIRS]


def converting_values(n: int, d: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """``[n, d]`` random values over many binades (so every rounding shows), plus a row of edge cases:
    subnormals of fp16/bf16/fp32, the fp16 overflow boundary, exact halfway cases of bf16 and fp16, inf."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * torch.exp2(torch.randint(-30, 20, (n, d), generator=g).float())
    edges = torch.tensor([1e-40, -1e-40, 2.0**-149, 6e-8, 3e-8, 65519.0, 65520.0, 1e38, float("inf"), -0.0,
                          1 + 2.0**-8, 1 + 3 * 2.0**-8, 1 + 2.0**-11, 1 + 3 * 2.0**-11, 2.0**-126, -(2.0**-133)])
    k = min(d, edges.numel())
    x[0, :k] = edges[:k]
    return x.to(dtype)


def reference(kv: torch.Tensor, loc: torch.Tensor, nope: torch.Tensor, rope: torch.Tensor, skip=None) -> torch.Tensor:
    """The spec: the expected buffer's bits, writing ``nope.to(kv.dtype)`` / ``rope.to(kv.dtype)`` row by row."""
    keep = loc.cpu() >= 0
    if skip is not None:
        keep &= loc.cpu() != skip
    keep = keep.to(loc.device)
    return _ref_rows(kv, loc[keep], nope[keep].to(kv.dtype), rope[keep].to(kv.dtype))


def _ref_rows(kv, loc, nope, rope):
    out = bits(kv.detach().cpu()).clone()
    rows = out.view(out.shape[0], -1)
    nope, rope = nope.reshape(nope.shape[0], -1), rope.reshape(rope.shape[0], -1)
    for i, slot in enumerate(loc.cpu().tolist()):
        rows[slot, : nope.shape[-1]] = bits(nope[i].cpu())
        rows[slot, nope.shape[-1] : nope.shape[-1] + rope.shape[-1]] = bits(rope[i].cpu())
    return out


def _triton_write(kv, loc, nope, rope, skip=None):
    from mlakv.kernels.triton.row_write import launch_set_kv_rows

    launch_set_kv_rows(kv, loc, nope, rope, skip_index=-1 if skip is None else skip)


def _torch_write(kv, loc, nope, rope, skip=None):
    from mlakv.ops.reference import set_mla_kv_buffer_torch

    set_mla_kv_buffer_torch(kv, loc, nope, rope, reserved_skip_index=skip)


def _dispatch_write(kv, loc, nope, rope, skip=None):
    set_mla_kv_buffer_triton(kv, loc, nope, rope, reserved_skip_index=skip)


PATHS = {
    "torch": pytest.param(_torch_write, id="torch"),
    "triton": pytest.param(_triton_write, id="triton", marks=requires_triton),
    "dispatch": pytest.param(_dispatch_write, id="dispatch"),
}
# Small rows: the Triton kernel runs under the interpreter on the CPU.
N, NOPE, ROPE, SLOTS = 6, 40, 8, 16


@pytest.mark.parametrize("write", list(PATHS.values()))
@pytest.mark.parametrize("src,dst", PAIRS, ids=PAIR_IDS)
def test_converting_write_equals_to(write, src, dst):
    kv = poisoned_buffer(SLOTS, NOPE + ROPE + 3, dst)  # a wider row: the columns past it stay untouched
    loc = torch.tensor([3, -1, 9, 0, 15, 7], device=DEVICE)  # padding and the reserved slot 0 are skipped
    nope = converting_values(N, NOPE, src, seed=1).to(DEVICE)
    rope = converting_values(N, ROPE, src, seed=2).to(DEVICE)
    expected = reference(kv, loc, nope, rope, skip=0)
    write(kv, loc, nope, rope, skip=0)
    assert_bits_equal(kv, expected)


BF16_QUIET_NAN = 0x7FC0  # c10's scalar rule; torch's vectorised CPU cast gives 0xFFFF and sm_80+ GPUs' 0x7FFF


def _nan_rows_reference(kv, loc, nope, rope) -> torch.Tensor:
    """The expected bf16 bits: ``Tensor.to`` for every value that is not NaN, 0x7FC0 for a NaN."""
    quiet = torch.tensor(BF16_QUIET_NAN, dtype=torch.int16).view(torch.bfloat16)
    nope_b = torch.where(nope.isnan(), quiet, nope.to(torch.bfloat16))
    rope_b = torch.where(rope.isnan(), quiet, rope.to(torch.bfloat16))
    return _ref_rows(kv, loc, nope_b, rope_b)


@requires_triton
@pytest.mark.parametrize("src", [torch.float16, torch.float32], ids=["float16", "float32"])
@pytest.mark.parametrize("where", ["nope", "rope", "none"])
def test_a_nan_into_bf16_is_the_quiet_nan_and_leaves_its_neighbours_exact(src, where):
    """The Triton kernel writes a NaN into a bf16 buffer as 0x7FC0 whatever its payload (torch's own
    casts differ by device: 0xFFFF on the CPU, 0x7FFF on sm_80+ GPUs, so the CPU's torch path writes
    0xFFFF); the rows beside it, in the same launch, convert as without it."""
    kv = poisoned_buffer(SLOTS, NOPE + ROPE, torch.bfloat16)
    loc = torch.tensor([3, 12, 9, 1, 15, 7], device=DEVICE)
    nope = converting_values(N, NOPE, src, seed=11)
    rope = converting_values(N, ROPE, src, seed=12)
    if where != "none":
        (nope if where == "nope" else rope)[2, 5] = float("nan")
    expected = _nan_rows_reference(kv, loc, nope, rope)
    _triton_write(kv, loc, nope.to(DEVICE), rope.to(DEVICE))
    assert_bits_equal(kv, expected)


@requires_cuda
@pytest.mark.parametrize("src", [torch.float16, torch.float32], ids=["float16", "float32"])
@pytest.mark.parametrize("n_loc", [1, 7, 64, 4096])
def test_gpu_converting_write_into_bf16_with_nan_rows_at_every_size(src, n_loc):
    """GPU, real row widths: a few rows hold a NaN (in k_nope or k_rope), the rest none, so a launch
    has programs of both kinds; every value is ``Tensor.to``'s, every NaN 0x7FC0."""
    kv = poisoned_buffer(8192, 576, torch.bfloat16, three_d=True)
    loc = torch.randperm(8191, device="cuda")[:n_loc] + 1
    nope = converting_values(n_loc, 512, src, seed=13)
    rope = converting_values(n_loc, 64, src, seed=14)
    nope[n_loc // 2, 100] = float("nan")
    rope[n_loc - 1, 3] = float("nan")
    expected = _nan_rows_reference(kv, loc, nope, rope)
    set_mla_kv_buffer_triton(kv, loc, nope.cuda(), rope.cuda())
    torch.cuda.synchronize()
    assert_bits_equal(kv, expected)


@pytest.mark.parametrize("write", list(PATHS.values()))
def test_each_source_converts_from_its_own_dtype(write):
    """k_nope and k_rope may differ in dtype; a same-dtype source next to a converting one is copied as is."""
    kv = poisoned_buffer(SLOTS, NOPE + ROPE, torch.float16, three_d=True)
    loc = torch.tensor([2, 5, 11], device=DEVICE)
    nope = converting_values(3, NOPE, torch.float32, seed=3).to(DEVICE).unsqueeze(1)
    rope = converting_values(3, ROPE, torch.float16, seed=4).to(DEVICE).unsqueeze(1)
    expected = reference(kv, loc, nope, rope)
    write(kv, loc, nope, rope)
    assert_bits_equal(kv, expected)


@pytest.mark.parametrize("write", list(PATHS.values()))
def test_ropeless_converting_write(write):
    kv = poisoned_buffer(SLOTS, NOPE, torch.bfloat16)
    loc = torch.tensor([6, 2, -1], device=DEVICE)
    nope = converting_values(3, NOPE, torch.float16, seed=10).to(DEVICE)
    rope = nope[:, :0]
    expected = reference(kv, loc, nope, rope)
    write(kv, loc, nope, rope)
    assert_bits_equal(kv, expected)


@pytest.mark.parametrize("write", list(PATHS.values()))
def test_converting_write_reads_strided_full_row_views(write):
    """sglang's full row ``[n, 1, nope + rope]`` in fp32, cut into two strided views, into a bf16 buffer."""
    kv = poisoned_buffer(SLOTS, NOPE + ROPE, torch.bfloat16, three_d=True)
    row = converting_values(4, NOPE + ROPE + 5, torch.float32, seed=5).to(DEVICE)[:, None, 2 : 2 + NOPE + ROPE]
    loc = torch.tensor([1, 14, 4, 8], device=DEVICE, dtype=torch.int32)
    expected = reference(kv, loc, row[..., :NOPE], row[..., NOPE:])
    write(kv, loc, row[..., :NOPE], row[..., NOPE:])
    assert_bits_equal(kv, expected)


def _loc_view(kind: str) -> torch.Tensor:
    """``[4]`` slots as the view ``kind``: strided with a storage offset, or one slot expanded (stride 0)."""
    if kind == "strided-offset":
        return torch.tensor([0, 9, 0, 3, 0, 12, 0, 5, 0], device=DEVICE)[1::2]
    return torch.tensor([7], device=DEVICE).expand(4)


@pytest.mark.parametrize("loc_kind", ["strided-offset", "expanded"])
@pytest.mark.parametrize("write", list(PATHS.values()))
def test_converting_write_reads_loc_views_and_expanded_sources(write, loc_kind):
    """fp32 into bf16 with ``loc`` a strided, offset or expanded view and the sources one row expanded: every
    write of a slot is the same converted row, so the result is defined."""
    kv = poisoned_buffer(SLOTS, NOPE + ROPE, torch.bfloat16)
    row = converting_values(1, NOPE + ROPE, torch.float32, seed=11).to(DEVICE)
    nope, rope = row[:, :NOPE].expand(4, NOPE), row[:, NOPE:].expand(4, ROPE)
    loc = _loc_view(loc_kind)
    expected = reference(kv, loc, nope, rope)
    write(kv, loc, nope, rope)
    assert_bits_equal(kv, expected)


@pytest.mark.parametrize(
    "kv_dtype,src_dtype",
    [
        (torch.float8_e4m3fn, torch.bfloat16),  # an fp8 pool's rows are bytes: quantizing is the FP8 write's job
        (torch.uint8, torch.float16),
        (torch.bfloat16, torch.float8_e5m2),
        (torch.bfloat16, torch.int16),
        (torch.float32, torch.float64),
        (torch.int8, torch.uint8),
    ],
    ids=["fp8-buffer", "uint8-buffer", "fp8-source", "int16-source", "float64-source", "int8-buffer-uint8-source"],
)
def test_other_dtype_pairs_are_refused_naming_the_source(kv_dtype, src_dtype):
    kv = poisoned_buffer(SLOTS, NOPE + ROPE, kv_dtype, device="cpu")
    before = bits(kv).clone()
    nope = torch.randint(0, 100, (2, NOPE)).to(src_dtype)
    rope = torch.zeros(2, ROPE, dtype=kv_dtype)
    with pytest.raises(TypeError, match=rf"cache_k_nope dtype {src_dtype} does not match kv_buffer dtype {kv_dtype}"):
        set_mla_kv_buffer_triton(kv, torch.tensor([1, 2]), nope, rope)
    assert torch.equal(bits(kv), before)


@pytest.mark.parametrize("src,dst", PAIRS, ids=PAIR_IDS)
def test_rule_book_accepts_a_converting_write_but_not_for_the_jit_kernel(src, dst):
    kv, loc = torch.zeros(SLOTS, 576, dtype=dst), torch.tensor([1, 2])
    nope, rope = torch.randn(2, 512).to(src), torch.randn(2, 64).to(src)
    assert rules.kv_write_ok(kv, loc, nope, rope)
    assert "copies bytes" in rules.jit_layout_reason(kv, nope, rope)


@requires_cuda
@pytest.mark.parametrize("n_loc", [1, 64, 4096])
@pytest.mark.parametrize("src,dst", PAIRS, ids=PAIR_IDS)
def test_gpu_dispatch_routes_a_converting_write_to_triton(src, dst, n_loc):
    """GPU: at every size (JIT-sized ones included) a converting write takes Triton and equals ``.to``."""
    kv = poisoned_buffer(8192, 576, dst, three_d=True)
    loc = torch.randperm(8191, device="cuda")[:n_loc] + 1
    nope = converting_values(n_loc, 512, src, seed=6).cuda()
    rope = converting_values(n_loc, 64, src, seed=7).cuda()
    assert kv_write_path(kv, loc, nope, rope) == "triton"
    expected = reference(kv, loc, nope, rope)
    set_mla_kv_buffer_triton(kv, loc, nope, rope)
    torch.cuda.synchronize()
    assert_bits_equal(kv, expected)


def _pool(dtype, **kw) -> MLATokenToKVPool:
    pool = MLATokenToKVPool(
        size=32, page_size=1, dtype=dtype, kv_lora_rank=NOPE, qk_rope_head_dim=ROPE, layer_num=2, device=DEVICE, **kw
    )
    for b in pool.kv_buffer:  # poison
        b.copy_(torch.randint(0, 256, b.shape, dtype=torch.uint8) if b.dtype == torch.uint8 else torch.randn(b.shape).to(b.dtype))
    return pool


@pytest.mark.parametrize("full_row", [False, True], ids=["split", "full_row"])
@pytest.mark.parametrize("src,dst", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16)], ids=["f32-bf16", "bf16-f16"])
def test_pool_set_kv_buffer_converts_like_sglang(src, dst, full_row):
    pool = _pool(dst)
    loc = torch.tensor([4, 0, 17, -1, 30], device=DEVICE)  # 0: the pool's reserved slot, skipped
    row = converting_values(5, NOPE + ROPE, src, seed=8).to(DEVICE)
    buf = pool.get_key_buffer(1)[:, 0]
    expected = reference(buf, loc, row[:, :NOPE], row[:, NOPE:], skip=0)
    if full_row:
        pool.set_kv_buffer(1, loc, row.unsqueeze(1), row[:, None, :NOPE])
    else:
        pool.set_kv_buffer(1, loc, row[:, :NOPE], row[:, NOPE:])
    assert_bits_equal(buf, expected)


def test_fp8_pool_refuses_a_float_source_naming_the_pool_dtype():
    pool = _pool(torch.float8_e4m3fn)  # no kv_cache_format: rows are raw e4m3 bytes
    before = bits(pool.kv_buffer[1]).clone()
    with pytest.raises(TypeError, match=r"float8_e4m3fn \(the pool dtype\)"):
        pool.set_kv_buffer(1, torch.tensor([3], device=DEVICE), torch.randn(1, NOPE, device=DEVICE).bfloat16(),
                           torch.randn(1, ROPE, device=DEVICE).bfloat16())
    assert torch.equal(bits(pool.kv_buffer[1]), before)



def test_compiled_converting_write_matches_eager():
    """``torch.compile(fullgraph=True)`` of a converting pool write (the custom op) stores the same bits as eager."""
    pools = [_pool(torch.bfloat16), _pool(torch.bfloat16)]
    pools[1].kv_buffer[1].copy_(pools[0].kv_buffer[1])
    loc = torch.tensor([4, 9, 0, 21], device=DEVICE)
    row = converting_values(4, NOPE + ROPE, torch.float32, seed=9).to(DEVICE)
    pools[0].set_kv_buffer(1, loc, row.unsqueeze(1), None)
    torch.compile(lambda r, l: pools[1].set_kv_buffer(1, l, r.unsqueeze(1), None), fullgraph=True)(row, loc)
    assert torch.equal(bits(pools[1].kv_buffer[1]), bits(pools[0].kv_buffer[1]))
