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


def poison_rows(pool: DSATokenToKVPool, seed: int) -> None:
    """Random bytes in every layer's MLA rows and indexer pages."""
    g = torch.Generator().manual_seed(seed)
    for b in pool.kv_buffer:
        b.view(torch.uint8).copy_(torch.randint(0, 256, b.view(torch.uint8).shape, dtype=torch.uint8, generator=g))
    poison(pool, seed + 1)


def u8(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t`` on the CPU (compare with ``torch.equal``: NaN-safe)."""
    return t.detach().cpu().contiguous().view(torch.uint8)


def index_slot_bytes(pages: torch.Tensor, slot: int) -> torch.Tensor:
    """A slot's 128 key bytes then its 4 scale bytes, read from ``[num_pages, 8448]`` pages by the page layout."""
    page, pos = divmod(slot, 64)
    return torch.cat([pages[page, pos * 128 : pos * 128 + 128], pages[page, 64 * 128 + pos * 4 : 64 * 128 + pos * 4 + 4]])


def test_cpu_copy_holds_the_indexer_keys_and_scales_with_the_mla_rows():
    pool = make_pool(size=250, layers=2)
    poison_rows(pool, 10)
    idx = torch.tensor([5, 64, 200, 130, 7, 63, 255], device=DEVICE)  # any slots, across pages
    snap = pool.get_cpu_copy(idx, chunk_size=3)
    assert set(snap) == {"kv", "index_k"}
    for layer in range(2):
        assert [c.shape for c in snap["index_k"][layer]] == [(3, 132), (3, 132), (1, 132)]
        got = torch.cat(snap["index_k"][layer])
        assert got.device.type == "cpu" and got.dtype == torch.uint8
        pages = pool.index_k_buffer[layer].cpu()
        assert torch.equal(got, torch.stack([index_slot_bytes(pages, s) for s in idx.tolist()]))
        assert torch.equal(u8(torch.cat(snap["kv"][layer])), u8(pool.kv_buffer[layer].cpu()[idx.cpu()]))


def test_load_cpu_copy_restores_both_halves_of_the_slots_only():
    pool = make_pool(size=250, layers=2)
    poison_rows(pool, 11)
    idx = torch.tensor([5, 64, 200, 130, 7, 63, 255], device=DEVICE)
    saved_kv = [b.cpu().clone() for b in pool.kv_buffer]
    saved_index = [b.cpu().clone() for b in pool.index_k_buffer]
    snap = pool.get_cpu_copy(idx, chunk_size=4)
    poison_rows(pool, 12)  # the slots are reused while the request is offloaded
    reused_kv = [b.cpu().clone() for b in pool.kv_buffer]
    reused_index = [b.cpu().clone() for b in pool.index_k_buffer]
    pool.load_cpu_copy(snap, idx)
    for layer in range(2):
        want_kv = reused_kv[layer].clone()
        want_kv[idx.cpu()] = saved_kv[layer][idx.cpu()]
        assert torch.equal(u8(pool.kv_buffer[layer]), u8(want_kv))
        want_index = reused_index[layer].clone()
        for s in idx.tolist():
            page, pos = divmod(s, 64)
            want_index[page, pos * 128 : pos * 128 + 128] = saved_index[layer][page, pos * 128 : pos * 128 + 128]
            want_index[page, 8192 + pos * 4 : 8192 + pos * 4 + 4] = saved_index[layer][page, 8192 + pos * 4 : 8192 + pos * 4 + 4]
        assert torch.equal(pool.index_k_buffer[layer].cpu(), want_index)


def test_load_cpu_copy_can_restore_at_other_slots():
    pool = make_pool(size=250, layers=1)
    poison_rows(pool, 13)
    src, dst = torch.tensor([3, 70, 71], device=DEVICE), torch.tensor([128, 10, 250], device=DEVICE)
    snap = pool.get_cpu_copy(src)
    pool.load_cpu_copy(snap, dst)
    pages = pool.index_k_buffer[0].cpu()
    for s, d in zip(src.tolist(), dst.tolist()):
        assert torch.equal(index_slot_bytes(pages, d), torch.cat(snap["index_k"][0])[src.tolist().index(s)])
    assert torch.equal(u8(pool.kv_buffer[0].cpu()[dst.cpu()]), u8(torch.cat(snap["kv"][0])))


@pytest.mark.parametrize(
    "breakage,error,match",
    [
        (lambda snap: snap["kv"], TypeError, "the dict a DSATokenToKVPool's get_cpu_copy returns"),
        (lambda snap: {"kv": snap["kv"]}, TypeError, "with keys"),
        (lambda snap: {"kv": snap["kv"], "index_k": snap["index_k"][:1]}, ValueError, "must hold 2 layers"),
        (lambda snap: {"kv": snap["kv"], "index_k": [snap["index_k"][0], [snap["index_k"][1][0][:2]]]}, ValueError,
         r"\['index_k'\]\[1\] holds 2 slots but indices has 3"),
        (lambda snap: {"kv": snap["kv"], "index_k": [[c[:, :128] for c in layer] for layer in snap["index_k"]]},
         ValueError, r"chunks must be \[rows, 132\] uint8"),
        (lambda snap: {"kv": [snap["kv"][0], [snap["kv"][1][0][:2]]], "index_k": snap["index_k"]}, ValueError,
         "holds 2 rows but indices has 3"),
    ],
    ids=["mla-list", "no-index-half", "index-layers", "index-count", "index-width", "mla-count"],
)
def test_load_cpu_copy_checks_both_halves_before_writing(breakage, error, match):
    pool = make_pool(size=250, layers=2)
    poison_rows(pool, 14)
    idx = torch.tensor([1, 100, 200], device=DEVICE)
    snap = pool.get_cpu_copy(idx)
    poison_rows(pool, 15)
    before = [u8(b).clone() for b in pool.kv_buffer + pool.index_k_buffer]
    with pytest.raises(error, match=match):
        pool.load_cpu_copy(breakage(snap), idx)
    assert all(torch.equal(u8(b), want) for b, want in zip(pool.kv_buffer + pool.index_k_buffer, before))


def test_cpu_copy_refuses_slots_past_the_pool():
    pool = make_pool(size=60, layers=1)  # 128 slots
    with pytest.raises(IndexError):
        pool.get_cpu_copy(torch.tensor([3, 128], device=DEVICE))


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
