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
    loc = random_loc(8, pool.num_slots - 1, torch.int64) + 1  # slot 0 is reserved (skipped)
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
    ints = [torch.randint(-9, 9, (2, d), dtype=torch.int16, device=DEVICE) for d in (512, 64)]
    with pytest.raises(TypeError, match="must be torch.bfloat16"):  # a float source converts (test_kv_write_convert.py)
        pool.set_kv_buffer(0, loc, *ints)


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
    with pytest.raises(IndexError, match=r"loc\[1\] = 257 is out of range for a gather from num_slots=257"):
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


# ---- issue 9: layouts, rope-less pools, inputs refused at the door, one gather rule -----------


def _reference_gather(buf: torch.Tensor, loc: torch.Tensor, nope_dim: int, rope_dim: int):
    """The gather's spec: row ``loc[i]`` split in two, zeros where the slot is outside the buffer."""
    rows = bits(buf.cpu()).reshape(buf.shape[0], -1)
    out = torch.zeros((loc.shape[0], rows.shape[1]), dtype=rows.dtype)
    for i, s in enumerate(loc.cpu().tolist()):
        if 0 <= s < rows.shape[0]:
            out[i] = rows[s]
    return out[:, :nope_dim], out[:, nope_dim : nope_dim + rope_dim]


@pytest.mark.parametrize("layout", ["strided", "expanded", "offset"])
def test_gather_honours_loc_stride(layout):
    pool = _pool()
    _poison(pool)
    base = random_loc(40, pool.num_slots, torch.int64)
    loc = {"strided": base[::3], "expanded": base[:1].expand(9), "offset": base[5:17]}[layout]
    nope, rope = pool.get_mla_kv_buffer(1, loc)
    exp_nope, exp_rope = _reference_gather(pool.kv_buffer[1], loc, 512, 64)
    assert torch.equal(bits(nope.cpu()), exp_nope) and torch.equal(bits(rope.cpu()), exp_rope)


def test_gather_padding_slots_give_zero_rows():
    """One rule on every path: ``loc < 0`` gathers a zero row (CPU and GPU alike)."""
    pool = _pool()
    _poison(pool)
    loc = torch.tensor([3, -1, 7, -5], device=DEVICE)
    nope, rope = pool.get_mla_kv_buffer(0, loc)
    exp_nope, exp_rope = _reference_gather(pool.kv_buffer[0], loc, 512, 64)
    assert torch.equal(bits(nope.cpu()), exp_nope) and torch.equal(bits(rope.cpu()), exp_rope)
    assert not bits(nope[1].cpu()).any() and bits(nope[0].cpu()).any()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU rule (on a GPU the check is opt-in)")
def test_cpu_gather_always_checks_bounds():
    pool = _pool(check_bounds=False)
    with pytest.raises(IndexError, match=r"loc\[2\] = 300 is out of range"):
        pool.get_mla_kv_buffer(0, torch.tensor([1, -1, 300]))


def test_issue_example_through_the_pool():
    """A strided ``loc`` whose storage holds slots past the pool writes only the slots it names."""
    pool = _pool(size=31)  # 32 slots
    _poison(pool)
    before = [bits(b.cpu()).clone() for b in pool.kv_buffer]
    loc = torch.tensor([1, 40, 2, 41, 3, 42], device=DEVICE)[::2]
    nope, rope = random_rows(3, 512, torch.bfloat16), random_rows(3, 64, torch.bfloat16)
    pool.set_kv_buffer(0, loc, nope, rope)
    got_n, got_r = pool.get_mla_kv_buffer(0, loc)
    assert torch.equal(bits(got_n), bits(nope)) and torch.equal(bits(got_r), bits(rope))
    after = bits(pool.kv_buffer[0].cpu())
    untouched = [i for i in range(pool.num_slots) if i not in (1, 2, 3)]
    assert torch.equal(after[untouched], before[0][untouched])
    for b, old in zip(pool.kv_buffer[1:], before[1:]):
        assert torch.equal(bits(b.cpu()), old)


@pytest.mark.parametrize("rope_form", ["none", "n-by-0"])
def test_rope_less_pool(rope_form):
    pool = MLATokenToKVPool(64, 1, torch.bfloat16, 512, 0, layer_num=2, device=DEVICE)
    assert pool.kv_buffer[0].shape == (65, 1, 512)
    _poison(pool)
    loc = random_loc(20, pool.num_slots - 1, torch.int64) + 1
    nope = random_rows(20, 512, torch.bfloat16)
    rope = None if rope_form == "none" else random_rows(20, 0, torch.bfloat16)
    pool.set_kv_buffer(1, loc, nope, rope)
    got_n, got_r = pool.get_mla_kv_buffer(1, loc)
    assert got_r.shape == (20, 0) and torch.equal(bits(got_n), bits(nope))


def test_reserved_slot_is_skipped():
    """Slot 0 is the reserved padding slot: the pool's writes skip it (sglang's convention), as ``-1``."""
    pool = _pool()
    _poison(pool)
    before = bits(pool.kv_buffer[0].cpu()).clone()
    loc = torch.tensor([0, 5, -1, 0, 9], device=DEVICE)
    nope, rope = random_rows(5, 512, torch.bfloat16), random_rows(5, 64, torch.bfloat16)
    pool.set_kv_buffer(0, loc, nope, rope)
    after = bits(pool.kv_buffer[0].cpu())
    assert torch.equal(after[0], before[0])
    assert torch.equal(after[5, 0, :512], bits(nope[1].cpu())) and torch.equal(after[9, 0, 512:], bits(rope[4].cpu()))


@pytest.mark.parametrize("world", [2, 4])
def test_dcp_pools_hold_the_single_rank_rows(world):
    """W DCP ranks given the same logical ``loc``: rank r's row p is the single-rank pool's slot
    p * W + r, bit-exactly; the gather takes physical rows."""
    size, n = 95, 70  # 96 logical slots
    single = _pool(size=size, layer_num=1)
    ranks = [_pool(size=size, layer_num=1, dcp_world_size=world, dcp_rank=r) for r in range(world)]
    for p in [single, *ranks]:
        p.kv_buffer[0].zero_()
    assert all(p.num_slots == -(-96 // world) and p.num_logical_slots == 96 for p in ranks)
    loc = random_loc(n, 96, torch.int64)
    loc[::9] = -1
    nope, rope = random_rows(n, 512, torch.bfloat16), random_rows(n, 64, torch.bfloat16)
    single.set_kv_buffer(0, loc, nope, rope)
    for p in ranks:
        p.set_kv_buffer(0, loc, nope, rope)
    full = bits(single.kv_buffer[0].cpu())
    for r, p in enumerate(ranks):
        rows = torch.arange(p.num_slots) * world + r
        assert torch.equal(bits(p.kv_buffer[0].cpu()), full[rows]), f"rank {r}"
        mine = loc[(loc >= 0) & (loc % world == r) & (loc != 0)]
        got_n, _ = p.get_mla_kv_buffer(0, mine // world)
        assert torch.equal(bits(got_n.cpu()), full[mine.cpu(), 0, :512])


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.bool, torch.complex64, "bfloat16"])
def test_unsupported_pool_dtype_is_refused_at_construction(dtype):
    with pytest.raises(TypeError, match=r"dtype .* is not supported for a KV pool"):
        _pool(dtype=dtype)


def test_pool_that_does_not_fit_is_refused_before_allocating():
    with pytest.raises(MemoryError, match=r"needs [\d.]+ GiB \(64 layers x 1073741825 slots x 1152 bytes\) but .* GiB free"):
        _pool(size=2**30, layer_num=64)


def test_layer_ids_bool_refused_numpy_accepted():
    import numpy as np

    pool = _pool(layer_num=2)
    with pytest.raises(TypeError, match="layer must be an int id .* got bool"):
        pool.get_key_buffer(True)
    assert pool.get_key_buffer(np.int64(1)) is pool.get_key_buffer(1)
    assert pool.get_key_buffer(SimpleNamespace(layer_id=np.int32(0))) is pool.get_key_buffer(0)


@pytest.mark.parametrize(
    "args,match",
    [
        (lambda n, r: ([1, 2], n, r), r"loc must be a torch.Tensor, got list"),
        (lambda n, r: (torch.tensor([1, 2], device=DEVICE), n.tolist(), r), r"cache_k(_nope)? must be a torch.Tensor, got list"),
    ],
    ids=["loc-list", "nope-list"],
)
def test_non_tensor_arguments_raise_type_error(args, match):
    pool = _pool()
    nope, rope = random_rows(2, 512, torch.bfloat16), random_rows(2, 64, torch.bfloat16)
    with pytest.raises(TypeError, match=match):
        pool.set_kv_buffer(0, *args(nope, rope))


def test_gather_loc_list_is_a_type_error():
    with pytest.raises(TypeError, match=r"loc must be a torch.Tensor, got list"):
        _pool().get_mla_kv_buffer(0, [1, 2])


@pytest.mark.parametrize("env,flag,expected", [(True, False, False), (False, True, True), (True, None, True), (False, None, False)])
def test_pool_check_bounds_overrides_the_environment(monkeypatch, env, flag, expected):
    from mlakv import _env

    monkeypatch.setattr(_env, "CHECK_BOUNDS", env)
    assert _pool(check_bounds=flag).check_bounds is expected
