"""The serving path: the MLA model writing through the pool in prefill and decode, against the same
model over a plain dict-of-tensors cache; the slot allocator; CUDA-graph decode (GPU)."""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, bits, requires_cuda
from mlakv.mem_cache import MLATokenToKVPool
from mlakv.demo.engine import DecodeGraphRunner, Engine, Request
from mlakv.demo.model import DictKVCache, MLAConfig, PoolKVCache
from mlakv.mem_cache.allocator import PoolFullError, TokenSlotAllocator
from mlakv.demo.model import default_dtype, make_model

CFG = MLAConfig(vocab_size=256, hidden=128, n_heads=2, n_layers=2)
DTYPE = default_dtype(DEVICE)


def _pool(size=1024, page_size=1):
    return MLATokenToKVPool(size, page_size, DTYPE, CFG.kv_lora_rank, CFG.qk_rope_head_dim, CFG.n_layers, DEVICE)


def _prompts(n, lo=3, hi=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, CFG.vocab_size, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]


# ---- allocator ------------------------------------------------------------------------------
@pytest.mark.parametrize("page_size", [1, 64])
def test_allocator_never_hands_out_a_slot_twice(page_size):
    a = TokenSlotAllocator(64 * 20, page_size)
    reqs = [object() for _ in range(6)]
    seen = set()
    for step in range(30):
        for r in reqs:
            try:
                new = a.alloc(r, 1 + (step % 3)).tolist()
            except PoolFullError:
                continue
            assert not (set(new) & seen), "slot handed out twice"
            assert all(s >= page_size for s in new), "the reserved first page was handed out"
            seen |= set(new)
        if step == 10:
            seen -= set(a.slots_of(reqs[0]))
            a.free(reqs[0])


@pytest.mark.parametrize("page_size", [1, 64])
def test_allocator_full_is_clear_and_allocates_nothing(page_size):
    a = TokenSlotAllocator(page_size * 4, page_size)  # 3 usable pages
    r1, r2 = object(), object()
    a.alloc(r1, 2 * page_size)
    before = a.free_slots()
    with pytest.raises(PoolFullError, match="KV pool full"):
        a.alloc(r2, 2 * page_size)
    assert a.free_slots() == before and a.slots_of(r2) == []


def test_allocator_pages_fill_in_order():
    a = TokenSlotAllocator(64 * 8, 64)
    r = object()
    s1 = a.alloc(r, 10).tolist()
    s2 = a.alloc(r, 60).tolist()
    assert s1 + s2 == list(range(s1[0], s1[0] + 64)) + list(range(s2[54], s2[54] + 6))
    assert s1[0] % 64 == 0 and s2[54] % 64 == 0


# ---- end to end -----------------------------------------------------------------------------
def _engines(pool_size=2048, page_size=1):
    model = make_model(CFG, DEVICE)
    pool = _pool(pool_size, page_size)
    for b in pool.kv_buffer:
        b.view(torch.uint8).random_(0, 256)  # poison: unwritten rows must never be read
    e_pool = Engine(model, PoolKVCache(pool), TokenSlotAllocator(pool.num_slots, page_size), DEVICE)
    ref_cache = DictKVCache(CFG.kv_lora_rank, CFG.qk_rope_head_dim, DTYPE, DEVICE)
    e_ref = Engine(model, ref_cache, TokenSlotAllocator(pool.num_slots, page_size), DEVICE)
    return e_pool, e_ref, pool, ref_cache


def _assert_same(ra: Request, rb: Request):
    assert ra.output == rb.output
    for la, lb in zip(ra.logits, rb.logits):
        torch.testing.assert_close(la, lb, rtol=1e-2 if DTYPE != torch.float32 else 1e-5, atol=1e-2 if DTYPE != torch.float32 else 1e-5)


def _assert_rows_equal(engine_pool, pool, ref_cache, reqs):
    for r in reqs:
        slots = engine_pool.alloc.slots_of(r)
        for layer in range(CFG.n_layers):
            row = pool.get_key_buffer(layer)[torch.tensor(slots, device=DEVICE), 0]
            ref = torch.stack([ref_cache.rows[(layer, s)] for s in slots])
            assert torch.equal(bits(row), bits(ref)), f"layer {layer} rows differ"


@pytest.mark.parametrize("page_size", [1, 64])
def test_pool_model_matches_dict_cache_model(page_size):
    """Interleaved requests, freed and reused slots: logits and cached rows match the reference."""
    e_pool, e_ref, pool, ref_cache = _engines(page_size=page_size)
    prompts = _prompts(5)
    mk = lambda i, n: (Request(prompts[i], n), Request(prompts[i], n))  # noqa: E731
    a, b, c, d, e = (mk(i, n) for i, n in enumerate([3, 6, 5, 4, 2]))
    for eng, k in ((e_pool, 0), (e_ref, 1)):
        eng.prefill([a[k], b[k]])
        eng.decode_step(use_graph=False)
        eng.prefill([c[k]])  # admitted while a and b decode
        eng.decode_step(use_graph=False)
        eng.decode_step(use_graph=False)  # a finishes and its slots are freed
        eng.prefill([d[k], e[k]])  # may reuse a's slots
        for _ in range(6):
            eng.decode_step(use_graph=False)
    for pair in (a, b, c, d, e):
        assert pair[0].done and pair[1].done
        _assert_same(*pair)
    # rows of the last-admitted requests before they were freed: run one more live check
    live = (Request(prompts[0], 50), Request(prompts[0], 50))
    e_pool.prefill([live[0]]), e_ref.prefill([live[1]])
    for _ in range(3):
        e_pool.decode_step(use_graph=False), e_ref.decode_step(use_graph=False)
    _assert_same(*live)
    _assert_rows_equal(e_pool, pool, ref_cache, [live[0]])


def test_full_pool_is_a_clear_error_and_admitted_requests_survive():
    e_pool, e_ref, pool, ref_cache = _engines(pool_size=96, page_size=1)
    prompts = _prompts(3, lo=30, hi=31)
    a, b = Request(prompts[0], 20), Request(prompts[1], 20)
    ra, rb = Request(prompts[0], 20), Request(prompts[1], 20)
    e_pool.prefill([a, b]), e_ref.prefill([ra, rb])
    snapshot = [x.clone() for x in pool.kv_buffer]
    with pytest.raises(PoolFullError, match="KV pool full"):
        e_pool.prefill([Request(prompts[2] * 2, 5)])
    assert all(torch.equal(bits(x), bits(y)) for x, y in zip(snapshot, pool.kv_buffer)), "a refused admission wrote rows"
    for _ in range(10):
        e_pool.decode_step(use_graph=False), e_ref.decode_step(use_graph=False)
    _assert_same(a, ra), _assert_same(b, rb)
    _assert_rows_equal(e_pool, pool, ref_cache, [a, b])
    for eng in (e_pool, e_ref):  # both run until the pool is full; the failing step allocates nothing
        with pytest.raises(PoolFullError):
            for _ in range(20):
                eng.decode_step(use_graph=False)
    _assert_same(a, ra), _assert_same(b, rb)
    _assert_rows_equal(e_pool, pool, ref_cache, [a, b])


def test_padded_decode_rows_do_not_touch_the_cache():
    """Decode padded to 8 with 3 real rows: only the 3 new slots change."""
    e_pool, _, pool, _ = _engines()
    runner = DecodeGraphRunner(e_pool.model, e_pool.cache, [8], max_ctx=128, device=DEVICE)
    e_pool.padded_runner = runner
    reqs = [Request(p, 10) for p in _prompts(3)]
    e_pool.prefill(reqs)
    before = [x.clone() for x in pool.kv_buffer]
    e_pool.decode_step(use_graph=False)
    new = torch.tensor([e_pool.alloc.slots_of(r)[-1] for r in reqs], device=DEVICE)
    for x, y in zip(before, pool.kv_buffer):
        changed = (bits(x) != bits(y)).reshape(x.shape[0], -1).any(dim=1).nonzero().flatten()
        assert set(changed.tolist()) <= set(new.tolist())


@requires_cuda
def test_cuda_graph_decode_equals_eager_decode_bit_exactly():
    """Decode replayed from graphs (batch sizes 1, 8, 32; varying real counts) equals the same
    padded decode run eagerly: logits and every cache byte."""
    runs = {}
    for mode in ("graph", "eager"):
        torch.manual_seed(0)
        model = make_model(CFG, DEVICE)
        pool = _pool(4096)
        cache = PoolKVCache(pool)
        runner = DecodeGraphRunner(model, cache, [1, 8, 32], max_ctx=160, device=DEVICE)
        if mode == "graph":
            runner.capture()
        eng = Engine(model, cache, TokenSlotAllocator(pool.num_slots, 1), DEVICE, graph_runner=runner if mode == "graph" else None, padded_runner=runner)
        prompts = _prompts(40, seed=3)
        waves = [prompts[:1], prompts[1:6], prompts[6:30], prompts[30:40]]
        reqs = []
        for i, wave in enumerate(waves):
            new = [Request(p, 4 + 3 * i) for p in wave]
            eng.prefill(new)
            reqs += new
            for _ in range(4):
                eng.decode_step(use_graph=(mode == "graph"))
        while eng.running:
            eng.decode_step(use_graph=(mode == "graph"))
        torch.cuda.synchronize()
        runs[mode] = (reqs, [b.clone() for b in pool.kv_buffer])
    (rg, bg), (re_, be) = runs["graph"], runs["eager"]
    for a, b in zip(rg, re_):
        assert a.output == b.output
        assert all(torch.equal(x, y) for x, y in zip(a.logits, b.logits))
    assert all(torch.equal(bits(x), bits(y)) for x, y in zip(bg, be))


def test_decode_splits_batches_larger_than_the_largest_bucket():
    """11 running requests with buckets up to 4: decoded in batches, same result as unpadded eager."""
    e_pool, e_ref, _, _ = _engines()
    e_pool.padded_runner = DecodeGraphRunner(e_pool.model, e_pool.cache, [1, 4], max_ctx=128, device=DEVICE)
    prompts = _prompts(11, seed=5)
    a = [Request(p, 4) for p in prompts]
    b = [Request(p, 4) for p in prompts]
    e_pool.prefill(a), e_ref.prefill(b)
    while e_pool.running or e_ref.running:
        e_pool.decode_step(use_graph=False), e_ref.decode_step(use_graph=False)
    for x, y in zip(a, b):
        _assert_same(x, y)
