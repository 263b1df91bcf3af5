"""MLATokenToKVPool: per-layer buffers, layer ids, writes through the dispatcher, reads, sizes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from conftest import DEVICE, bits, random_loc, random_rows
from mlakv.mem_cache import MLATokenToKVPool


def _pool(dtype=torch.bfloat16, layer_num=4, start_layer=None, page_size=1, size=256, **kw):
    return MLATokenToKVPool(
        size=size, page_size=page_size, dtype=dtype, kv_lora_rank=512, qk_rope_head_dim=64,
        layer_num=layer_num, device=DEVICE, start_layer=start_layer, **kw,
    )


def _poison(pool):
    for b in pool.kv_buffer:
        b.view(torch.uint8).random_(0, 256)


def test_buffer_shapes_and_reserved_slot():
    pool = _pool(page_size=16, size=256)
    assert len(pool.kv_buffer) == 4
    for b in pool.kv_buffer:
        assert b.shape == (256 + 16, 1, 576) and b.dtype == torch.bfloat16
    assert pool.num_slots == 272


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float8_e4m3fn])
@pytest.mark.parametrize("n_loc", [1, 100])
def test_write_then_gather_round_trip(dtype, n_loc):
    pool = _pool(dtype=dtype)
    _poison(pool)
    loc = random_loc(n_loc, pool.num_slots - 1, torch.int64) + 1
    nope, rope = random_rows(n_loc, 512, dtype), random_rows(n_loc, 64, dtype)
    pool.set_kv_buffer(2, loc, nope, rope)
    got_nope, got_rope = pool.get_mla_kv_buffer(2, loc)
    assert got_nope.dtype == dtype and got_nope.shape == (n_loc, 512) and got_rope.shape == (n_loc, 64)
    assert torch.equal(bits(got_nope), bits(nope)) and torch.equal(bits(got_rope), bits(rope))
    key = pool.get_key_buffer(2)
    assert key.dtype == dtype
    assert torch.equal(bits(key[loc.long(), 0, :512]), bits(nope))


def test_fp8_pool_stores_uint8():
    pool = _pool(dtype=torch.float8_e4m3fn)
    assert pool.store_dtype == torch.uint8 and pool.kv_buffer[0].dtype == torch.uint8
    assert pool.get_key_buffer(0).dtype == torch.float8_e4m3fn


def test_writing_one_layer_leaves_the_others_untouched():
    pool = _pool()
    _poison(pool)
    before = [b.clone() for b in pool.kv_buffer]
    loc = random_loc(64, pool.num_slots, torch.int32)
    pool.set_kv_buffer(3, loc, random_rows(64, 512, torch.bfloat16), random_rows(64, 64, torch.bfloat16))
    for i, (b, old) in enumerate(zip(pool.kv_buffer, before)):
        assert torch.equal(bits(b), bits(old)) == (i != 3), f"layer {i}"


def test_start_layer_offsets_ids():
    pool = _pool(layer_num=2, start_layer=10)
    _poison(pool)
    before = [b.clone() for b in pool.kv_buffer]
    loc = random_loc(8, pool.num_slots, torch.int64)
    nope, rope = random_rows(8, 512, torch.bfloat16), random_rows(8, 64, torch.bfloat16)
    pool.set_kv_buffer(SimpleNamespace(layer_id=11), loc, nope, rope)
    assert torch.equal(bits(pool.kv_buffer[0]), bits(before[0]))
    assert torch.equal(bits(pool.kv_buffer[1][loc.long(), 0, :512]), bits(nope))
    assert pool.get_value_buffer(11).shape == (pool.num_slots, 1, 512)


@pytest.mark.parametrize("bad", [9, 12, -1])
def test_layer_outside_range_is_a_clear_error(bad):
    pool = _pool(layer_num=2, start_layer=10)
    with pytest.raises(IndexError, match=rf"layer id {bad} is outside this pool's layers \[10, 12\)"):
        pool.get_key_buffer(bad)


def test_source_dtype_must_match_pool():
    pool = _pool(dtype=torch.bfloat16)
    loc = torch.arange(1, 3, device=DEVICE)
    with pytest.raises(TypeError, match="must be torch.bfloat16"):
        pool.set_kv_buffer(0, loc, random_rows(2, 512, torch.float16), random_rows(2, 64, torch.float16))


def test_source_width_must_match_pool():
    pool = _pool()
    loc = torch.arange(1, 3, device=DEVICE)
    with pytest.raises(ValueError, match="kv_lora_rank=512"):
        pool.set_kv_buffer(0, loc, random_rows(2, 256, torch.bfloat16), random_rows(2, 64, torch.bfloat16))


def test_pool_bounds_flag():
    pool = _pool(check_bounds=True)
    loc = torch.tensor([1, pool.num_slots], device=DEVICE)
    with pytest.raises(IndexError, match="out of range"):
        pool.set_kv_buffer(0, loc, random_rows(2, 512, torch.bfloat16), random_rows(2, 64, torch.bfloat16))


def test_gather_rejects_invalid_slots_when_checking():
    pool = _pool(check_bounds=True)
    with pytest.raises(IndexError, match=r"\[0, 257\) for a gather, got \[1, 257\]"):
        pool.get_mla_kv_buffer(0, torch.tensor([1, 257], device=DEVICE))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none present)")
def test_unchecked_gpu_gather_of_invalid_slots_reads_nothing():
    """Without the (syncing) check, an invalid slot gives a zero row instead of an illegal access."""
    pool = _pool()
    _poison(pool)
    nope, rope = pool.get_mla_kv_buffer(0, torch.tensor([3, 257, -4, 5], device=DEVICE))
    torch.cuda.synchronize()
    assert torch.equal(bits(nope[1]), torch.zeros_like(bits(nope[1]))) and torch.equal(bits(rope[2]), torch.zeros_like(bits(rope[2])))
    assert torch.equal(bits(nope[0]), bits(pool.get_key_buffer(0)[3, 0, :512]))


def test_gather_casts_to_dst_dtype():
    pool = _pool()
    loc = torch.arange(1, 5, device=DEVICE)
    nope, rope = random_rows(4, 512, torch.bfloat16), random_rows(4, 64, torch.bfloat16)
    pool.set_kv_buffer(0, loc, nope, rope)
    n32, r32 = pool.get_mla_kv_buffer(0, loc, dst_dtype=torch.float32)
    assert n32.dtype == torch.float32 and torch.equal(n32, nope.float()) and torch.equal(r32, rope.float())


def test_sizes_and_buf_infos():
    pool = _pool(dtype=torch.float8_e4m3fn, layer_num=3, size=100, page_size=4)
    ptrs, lens, items = pool.get_contiguous_buf_infos()
    assert ptrs == [b.data_ptr() for b in pool.kv_buffer]
    assert lens == [104 * 576] * 3 and items == [576] * 3
    assert pool.get_kv_size_bytes() == 3 * 104 * 576
    assert pool.row_bytes() == 576


def test_constructor_rejects_inconsistent_layers():
    with pytest.raises(ValueError, match="end_layer - start_layer"):
        MLATokenToKVPool(16, 1, torch.bfloat16, 512, 64, layer_num=2, device="cpu", start_layer=0, end_layer=3)
