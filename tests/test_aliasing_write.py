"""A row write whose source is a view of the cache it writes stores the source as it was before the call.

Spec (issue 22 case 1): ``pool.set_kv_buffer(layer, loc, source)`` where ``source`` is rows of
``pool.get_key_buffer(layer)`` (moving rows within the cache, shifted up or down, overlapping the
targets or not, with and without padding rows) leaves ``kv[loc[i]] == source_before[i]`` for every
kept row, on every path: torch (CPU), the Triton kernel (the interpreter on CPU, CUDA on a GPU) and
the JIT kernel (GPU), for the full-row and the split forms, through the pool and through
``set_mla_kv_buffer_triton``. The write detects the overlap by address and copies the source first;
a source that does not alias is passed through untouched (no copy on the hot path).
"""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, HAS_CUDA, bits, requires_cuda
from mlakv.mem_cache import MLATokenToKVPool
from mlakv.ops import dispatch

NOPE, ROPE = 512, 64


def _pool(dtype=torch.bfloat16, size=64, device=DEVICE, **kw):
    pool = MLATokenToKVPool(size, 1, dtype, NOPE, ROPE, 1, device, **kw)
    raw = pool.kv_buffer[0].view(torch.uint8)
    raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8))  # fresh random bytes, never zeros
    if dtype.is_floating_point and dtype.itemsize > 1:  # keep values finite so comparisons read plainly
        pool.kv_buffer[0].copy_(torch.randn(pool.kv_buffer[0].shape).to(dtype))
    return pool


def _expect(buf_before: torch.Tensor, loc: list[int], src_rows: list[int], reserved: int = 0) -> torch.Tensor:
    out = bits(buf_before).clone()
    for slot, row in zip(loc, src_rows):
        if slot >= 0 and slot != reserved:
            out[slot] = bits(buf_before)[row]
    return out


# (loc, source rows): shifted up, down, onto itself, a padding row first, the case
MOVES = {
    "issue-up-by-one": ([2, 3, 4, 5], [1, 2, 3, 4]),
    "down-by-two": ([1, 2, 3, 4], [3, 4, 5, 6]),
    "onto-itself": ([7, 8, 9], [7, 8, 9]),
    "padding-first": ([-1, 3, 4, 5], [1, 2, 3, 4]),
    "reserved-slot": ([0, 11, 12], [10, 11, 12]),
    "far-apart": ([40, 41], [1, 2]),
}


@pytest.mark.parametrize("form", ["full-row", "split"])
@pytest.mark.parametrize("move", list(MOVES), ids=list(MOVES))
def test_pool_write_from_its_own_rows(move, form):
    loc, rows = MOVES[move]
    pool = _pool()
    buf = pool.get_key_buffer(0)
    before = buf.clone()
    src = buf[rows[0] : rows[-1] + 1]
    assert [rows[0] + i for i in range(len(rows))] == rows
    if form == "full-row":
        pool.set_kv_buffer(0, torch.tensor(loc, device=DEVICE), src)
    else:
        pool.set_kv_buffer(0, torch.tensor(loc, device=DEVICE), src[..., :NOPE], src[..., NOPE:])
    assert torch.equal(bits(buf), _expect(before, loc, rows))


def test_pool_write_from_a_strided_gather_of_its_rows():
    """Source rows every other row of the buffer (a strided view), written in reverse order onto rows they cover."""
    pool = _pool()
    buf = pool.get_key_buffer(0)
    before = buf.clone()
    src = buf[2:12:2]  # rows 2, 4, 6, 8, 10
    loc = [10, 8, 6, 4, 2]
    pool.set_kv_buffer(0, torch.tensor(loc, device=DEVICE), src)
    assert torch.equal(bits(buf), _expect(before, loc, [2, 4, 6, 8, 10]))


def test_per_tensor_pool_moving_its_quantized_rows():
    """A per_tensor FP8 pool takes already-quantized e4m3 rows; those of its own buffer move correctly."""
    pool = _pool(dtype=torch.float8_e4m3fn, kv_cache_format="per_tensor", k_scale=0.5)
    buf = pool.get_key_buffer(0)
    before = buf.clone()
    pool.set_kv_buffer(0, torch.tensor([2, 3, 4], device=DEVICE), buf[1:4])
    assert torch.equal(bits(buf), _expect(before, [2, 3, 4], [1, 2, 3]))


@pytest.mark.parametrize("move", ["issue-up-by-one", "down-by-two"])
def test_dispatcher_write_into_a_view_of_a_wider_buffer(move):
    """``set_mla_kv_buffer_triton`` on a ``kv`` view of a wider allocation, the sources views of the
    same allocation (the rows' first 576 columns, and an interleaved view of the spare columns)."""
    loc, rows = MOVES[move]
    wide = torch.randn(32, 700).to(torch.bfloat16).to(DEVICE)
    kv = wide[:, : NOPE + ROPE]
    before_wide = wide.clone()
    src = kv[rows[0] : rows[-1] + 1]
    dispatch.set_mla_kv_buffer_triton(kv, torch.tensor(loc, device=DEVICE), src[:, :NOPE], src[:, NOPE:])
    expect = bits(before_wide).clone()
    for slot, row in zip(loc, rows):
        expect[slot, : NOPE + ROPE] = bits(before_wide)[row, : NOPE + ROPE]
    assert torch.equal(bits(wide), expect)
    # rope from the spare columns (interleaved with kv's rows, never written): the same result as a copy
    spare = wide[:4, 600:664]
    want = spare.clone()
    dispatch.set_mla_kv_buffer_triton(kv, torch.tensor([20, 21, 22, 23], device=DEVICE), kv[:4, :NOPE], spare)
    assert torch.equal(bits(kv[20:24, NOPE:]), bits(want))


def test_sources_that_do_not_alias_are_not_copied():
    kv = torch.zeros(8, NOPE + ROPE, dtype=torch.bfloat16, device=DEVICE)
    nope, rope = torch.ones(2, NOPE, dtype=torch.bfloat16, device=DEVICE), torch.ones(2, ROPE, dtype=torch.bfloat16, device=DEVICE)
    got = dispatch.unaliased_sources(kv, nope, rope)
    assert got[0] is nope and got[1] is rope
    got = dispatch.unaliased_sources(kv, kv[1:3, :NOPE], rope)
    assert got[0].data_ptr() != kv[1:3].data_ptr() and got[1] is rope


@pytest.fixture
def triton_on_cpu(monkeypatch):
    """Route CPU writes through the Triton row kernel (the interpreter) instead of torch."""
    pytest.importorskip("triton", reason="triton is not installed")
    if HAS_CUDA:
        return
    from mlakv.kernels.triton.row_write import launch_set_kv_rows

    def triton_write(kv, loc, nope, rope, reserved_skip_index=None, dcp_world_size=1, dcp_rank=0):
        skip = -1 if reserved_skip_index is None else reserved_skip_index
        launch_set_kv_rows(kv, loc, nope, rope, skip_index=skip, dcp_world_size=dcp_world_size, dcp_rank=dcp_rank)

    monkeypatch.setattr(dispatch, "set_mla_kv_buffer_torch", triton_write)


@pytest.mark.parametrize("move", ["issue-up-by-one", "down-by-two", "padding-first"])
def test_triton_kernel_path_moving_rows(triton_on_cpu, move):
    """The Triton row kernel (interpreted on CPU) gets an unaliased source: no smear."""
    loc, rows = MOVES[move]
    pool = _pool(size=16)
    buf = pool.get_key_buffer(0)
    before = buf.clone()
    pool.set_kv_buffer(0, torch.tensor(loc, device=DEVICE), buf[rows[0] : rows[-1] + 1])
    assert torch.equal(bits(buf), _expect(before, loc, rows))


# ---- GPU: the JIT and Triton paths, checked and unchecked ---------------------------------------------
@requires_cuda
@pytest.mark.parametrize("check_bounds", [False, True])
@pytest.mark.parametrize("n", [4, 300, 5000])
@pytest.mark.parametrize("shift", [1, -3])
def test_gpu_pool_moves_rows_within_its_cache(n, shift, check_bounds):
    """``n`` rows moved by ``shift`` within the pool (a bf16 512+64 pool: the JIT kernel serves large
    unchecked writes, Triton the rest); the result equals the rows before the call."""
    pool = _pool(size=n + 64, check_bounds=check_bounds)
    buf = pool.get_key_buffer(0)
    first = 8
    rows = list(range(first, first + n))
    loc = [r + shift for r in rows]
    before = buf.clone()
    pool.set_kv_buffer(0, torch.tensor(loc, device="cuda"), buf[first : first + n])
    torch.cuda.synchronize()
    assert torch.equal(bits(buf), _expect(before, loc, rows))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_gpu_dispatcher_moves_rows_within_a_buffer(dtype):
    kv = torch.randint(0, 256, (4096, (NOPE + ROPE) * dtype.itemsize), dtype=torch.uint8, device="cuda").view(dtype)
    before = kv.clone()
    n = 2048
    loc = torch.arange(1, n + 1, device="cuda")
    dispatch.set_mla_kv_buffer_triton(kv, loc, kv[:n, :NOPE], kv[:n, NOPE:])
    torch.cuda.synchronize()
    expect = bits(before).clone()
    expect[1 : n + 1] = bits(before)[:n]
    assert torch.equal(bits(kv), expect)
