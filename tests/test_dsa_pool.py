"""DSATokenToKVPool: the MLA cache and the DSA indexer's key cache per layer, in one pool.

Spec: :mod:`mlakv.mem_cache.dsa_pool` (the page format and quantization:
:mod:`mlakv.ops.indexer_reference`). Every check compares bytes with the reference run on the CPU.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, HAS_CUDA, requires_cuda

from mlakv.mem_cache import DSATokenToKVPool, MLATokenToKVPool
from mlakv.ops.indexer_reference import (
    INDEX_PAGE_BYTES,
    gather_index_k_reference,
    quantize_index_k,
    store_index_k_reference,
)
from mlakv.spec.calls import IndexStoreCall

NOPE, ROPE = 512, 64


def make_pool(size=250, page_size=64, layers=2, start_layer=None, **kw) -> DSATokenToKVPool:
    return DSATokenToKVPool(size, page_size, torch.bfloat16, NOPE, ROPE, layers, DEVICE, start_layer=start_layer, **kw)


def keys(n: int, seed: int = 0, dtype=torch.bfloat16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 128, generator=g) * 3).to(dtype).to(DEVICE)


def poison(pool: DSATokenToKVPool, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for b in pool.index_k_buffer:
        b.copy_(torch.randint(0, 256, b.shape, dtype=torch.uint8, generator=g))


def test_is_an_mla_pool_with_indexer_pages_per_layer():
    pool = make_pool(size=250, page_size=64, layers=3)
    assert isinstance(pool, MLATokenToKVPool)
    assert pool.num_slots == 320 and pool.num_index_pages == 5  # (250 + 64) slots -> 5 pages of 64
    assert len(pool.index_k_buffer) == 3
    for b in pool.index_k_buffer:
        assert b.shape == (5, INDEX_PAGE_BYTES) and b.dtype == torch.uint8 and not b.any()
    assert pool.index_head_dim == 128 and pool.index_page_size == 64 and pool.index_page_bytes() == 8448


def test_sizes_and_buffer_infos_include_the_indexer_pages():
    pool = make_pool(layers=2)
    mla = MLATokenToKVPool(250, 64, torch.bfloat16, NOPE, ROPE, 2, DEVICE)
    index_bytes = 2 * pool.num_index_pages * INDEX_PAGE_BYTES
    assert pool.get_index_k_size_bytes() == index_bytes
    assert pool.get_kv_size_bytes() == mla.get_kv_size_bytes() + index_bytes
    ptrs, lens, items = pool.get_state_buf_infos()
    assert ptrs == [b.data_ptr() for b in pool.index_k_buffer]
    assert lens == [pool.num_index_pages * INDEX_PAGE_BYTES] * 2 and items == [INDEX_PAGE_BYTES] * 2
    assert pool.get_contiguous_buf_infos()[2] == mla.get_contiguous_buf_infos()[2]  # the MLA rows' infos unchanged


@pytest.mark.parametrize("rule", ["fp32", "ue8m0"])
def test_set_index_k_buffer_writes_the_reference_bytes(rule):
    pool = make_pool(start_layer=4, index_scale_rule=rule)
    poison(pool)
    before = [b.cpu().clone() for b in pool.index_k_buffer]
    x = keys(40, seed=2)
    loc = torch.randperm(300, generator=torch.Generator().manual_seed(3))[:40].to(DEVICE)
    loc[::7] = -1
    loc[3] = 0  # the reserved slot: skipped like padding
    pool.set_index_k_buffer(5, loc, x)
    want = before[1].clone()
    store_index_k_reference(IndexStoreCall(want, loc.cpu(), x.cpu(), skip_slot=0, scale_rule=rule))
    assert torch.equal(pool.index_k_buffer[1].cpu(), want)
    assert torch.equal(pool.index_k_buffer[0].cpu(), before[0])  # the other layer untouched


def test_layer_objects_and_bad_layers():
    pool = make_pool(start_layer=2)

    class Layer:
        layer_id = 3

    pool.set_index_k_buffer(Layer(), torch.tensor([1], device=DEVICE), keys(1))
    assert pool.get_index_k_buffer(Layer()) is pool.index_k_buffer[1]
    assert pool.get_index_k_with_scale_buffer(2) is pool.index_k_buffer[0]
    with pytest.raises(IndexError, match="outside this pool's layers"):
        pool.get_index_k_buffer(4)
    with pytest.raises(TypeError):
        pool.get_index_k_buffer(True)


def test_gather_returns_what_was_stored():
    pool = make_pool(size=400, layers=1)
    x = keys(150, seed=4)
    slots = torch.cat([torch.arange(256, 320), torch.arange(64, 128), torch.arange(384, 406)]).to(DEVICE)
    pool.set_index_k_buffer(0, slots, x)
    table = torch.tensor([[4, 1, 6], [6, 0, 0]], device=DEVICE)
    lens = torch.tensor([150, 10], device=DEVICE)
    k, s = pool.get_index_k_and_scale(0, table, lens)
    q, scale = quantize_index_k(x.cpu())
    assert torch.equal(k[:150].cpu().view(torch.uint8), q) and torch.equal(s[:150].cpu(), scale)
    assert torch.equal(k[150:].cpu().view(torch.uint8), q[128:138])
    k2, s2 = pool.get_k_and_scale(0, lens, table, 160, 150)  # sglang's argument order
    assert torch.equal(k2.cpu().view(torch.uint8), k.cpu().view(torch.uint8)) and torch.equal(s2.cpu(), s.cpu())


def test_cpu_pool_raises_for_slots_past_the_buffer_before_writing():
    pool = make_pool(size=60, layers=1)  # 124 slots -> 2 pages (128 slots)
    poison(pool)
    before = pool.index_k_buffer[0].clone()
    if HAS_CUDA:
        pool.check_bounds = True
    with pytest.raises(IndexError):
        pool.set_index_k_buffer(0, torch.tensor([5, 128], device=DEVICE), keys(2))
    assert torch.equal(pool.index_k_buffer[0], before)


@pytest.mark.parametrize("world,rank", [(2, 0), (2, 1)])
def test_dcp_pool_keeps_its_own_slots(world, rank):
    pool = make_pool(size=250, layers=1, dcp_world_size=world, dcp_rank=rank)
    poison(pool)
    before = pool.index_k_buffer[0].cpu().clone()
    x = keys(30, seed=5)
    loc = torch.randperm(300, generator=torch.Generator().manual_seed(6))[:30].to(DEVICE)
    pool.set_index_k_buffer(0, loc, x)
    want = before.clone()
    store_index_k_reference(IndexStoreCall(want, loc.cpu(), x.cpu(), skip_slot=0, dcp_world_size=world, dcp_rank=rank))
    assert torch.equal(pool.index_k_buffer[0].cpu(), want)


def test_move_kv_cache_moves_the_indexer_keys_and_scales_too():
    pool = make_pool(size=250, layers=2)
    poison(pool)
    x = keys(8, seed=7)
    for layer in (0, 1):
        pool.set_index_k_buffer(layer, torch.arange(10, 18, device=DEVICE), x)
    before = [b.cpu().clone() for b in pool.index_k_buffer]
    tgt = torch.tensor([100, 11, 12, 200], device=DEVICE)
    src = torch.tensor([10, 10, 11, 17], device=DEVICE)  # overlapping: 11 is read before it is written
    pool.move_kv_cache(tgt, src)
    for layer in (0, 1):
        k, s = gather_index_k_reference(pool.index_k_buffer[layer].cpu(), torch.tensor([[0, 1, 2, 3]]), torch.tensor([256]))
        k0, s0 = gather_index_k_reference(before[layer], torch.tensor([[0, 1, 2, 3]]), torch.tensor([256]))
        want_k, want_s = k0.view(torch.uint8).clone(), s0.clone()
        for t, f in zip(tgt.tolist(), src.tolist()):
            want_k[t], want_s[t] = k0.view(torch.uint8)[f], s0[f]
        assert torch.equal(k.view(torch.uint8), want_k) and torch.equal(s.view(torch.int32), want_s.view(torch.int32))


@pytest.mark.parametrize(
    "kw,error",
    [({"index_head_dim": 64}, ValueError), ({"index_scale_rule": "e8m0"}, ValueError), ({"index_head_dim": True}, ValueError)],
)
def test_bad_indexer_options_are_refused(kw, error):
    with pytest.raises(error):
        make_pool(**kw)


@requires_cuda
def test_gpu_pool_store_and_gather_are_bit_exact():
    pool = make_pool(size=5000, layers=2)
    poison(pool)
    before = pool.index_k_buffer[1].cpu().clone()
    x = keys(3000, seed=8)
    loc = torch.randperm(5000, device=DEVICE)[:3000]
    pool.set_index_k_buffer(1, loc, x)
    want = before.clone()
    store_index_k_reference(IndexStoreCall(want, loc.cpu(), x.cpu(), skip_slot=0))
    assert torch.equal(pool.index_k_buffer[1].cpu(), want)
    table = torch.randperm(pool.num_index_pages, device=DEVICE)[:60].view(3, 20)
    lens = torch.tensor([1280, 7, 1000], device=DEVICE)
    k, s = pool.get_index_k_and_scale(1, table, lens, 2287, 1280)
    want_k, want_s = gather_index_k_reference(want, table.cpu(), lens.cpu())
    assert torch.equal(k.cpu().view(torch.uint8), want_k.view(torch.uint8))
    assert torch.equal(s.cpu().view(torch.int32), want_s.view(torch.int32))
