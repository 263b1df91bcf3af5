"""The engine's admission rules: bad requests are refused before anything is allocated, and a
failed admission or decode step gives back every slot it took (nothing leaks, nothing changes)."""

from __future__ import annotations

import pytest

from conftest import DEVICE
from mlakv.mem_cache import MLATokenToKVPool
from mlakv.demo.engine import Engine, Request
from mlakv.demo.model import MLAConfig, PoolKVCache
from mlakv.mem_cache.allocator import PoolFullError, TokenSlotAllocator
from mlakv.demo.model import default_dtype, make_model

CFG = MLAConfig(vocab_size=64, hidden=64, n_heads=2, n_layers=1)


def _engine(pool_size=256, page_size=1) -> Engine:
    pool = MLATokenToKVPool(pool_size, page_size, default_dtype(DEVICE), CFG.kv_lora_rank, CFG.qk_rope_head_dim,
                            CFG.n_layers, DEVICE)
    return Engine(make_model(CFG, DEVICE), PoolKVCache(pool), TokenSlotAllocator(pool.num_slots, page_size), DEVICE)


def _state(eng: Engine, reqs) -> tuple:
    return eng.alloc.free_slots(), [eng.alloc.slots_of(r) for r in reqs], [list(r.output) for r in reqs], list(eng.running)


@pytest.mark.parametrize(
    "bad,match",
    [
        (Request([], 3), "prompt must be a non-empty list"),
        (Request([1, 64, 2], 3), r"token ids must be ints in \[0, 64\)"),
        (Request([1, -1], 3), r"token ids must be ints in \[0, 64\)"),
        (Request([1, 2.0], 3), "token ids must be ints"),
        (Request([1, True], 3), "token ids must be ints"),
        (Request([1, 2], 0), "max_new_tokens must be an int >= 1"),
    ],
    ids=["empty", "past-vocab", "negative", "float", "bool", "no-new-tokens"],
)
def test_bad_prompts_are_refused_before_allocation(bad, match):
    eng = _engine()
    good = Request([1, 2, 3], 2)
    before = _state(eng, [good, bad])
    for _ in range(20):  # issue 13 case 6: each try used to leak the batch's slots
        with pytest.raises(ValueError, match=match):
            eng.prefill([good, bad])
    assert _state(eng, [good, bad]) == before
    eng.prefill([good])  # the pool is still whole
    assert len(good.output) == 1


def test_the_same_request_twice_is_refused():
    eng = _engine()
    r = Request([1, 2, 3], 4)
    with pytest.raises(ValueError, match="same Request as an earlier entry"):
        eng.prefill([r, r])
    assert eng.alloc.free_slots() == 256 and eng.alloc.slots_of(r) == []
    eng.prefill([r])
    with pytest.raises(ValueError, match="already admitted"):
        eng.prefill([r])
    assert len(eng.alloc.slots_of(r)) == 3


@pytest.mark.parametrize("reqs,exc,match", [("abc", TypeError, "list or tuple"), ([[1, 2]], TypeError, "must be a Request")])
def test_non_requests_are_refused(reqs, exc, match):
    eng = _engine()
    with pytest.raises(exc, match=match):
        eng.prefill(reqs)
    assert eng.alloc.free_slots() == 256


def test_a_failing_prefill_gives_back_every_slot(monkeypatch):
    eng = _engine()
    reqs = [Request([1, 2, 3], 3), Request([4, 5], 3)]
    before = _state(eng, reqs)

    def boom(*a, **k):
        raise RuntimeError("forward failed")

    monkeypatch.setattr(eng.model, "prefill", boom)
    with pytest.raises(RuntimeError, match="forward failed"):
        eng.prefill(reqs)
    assert _state(eng, reqs) == before
    monkeypatch.undo()
    eng.prefill(reqs)  # the same requests are admissible afterwards
    assert all(len(r.output) == 1 for r in reqs)


@pytest.mark.parametrize("page_size", [1, 16])
def test_a_full_pool_mid_batch_gives_back_the_earlier_requests_slots(page_size):
    eng = _engine(pool_size=64, page_size=page_size)
    reqs = [Request([1] * 40, 2), Request([2] * 40, 2)]  # the second does not fit
    before = _state(eng, reqs)
    with pytest.raises(PoolFullError):
        eng.prefill(reqs)
    assert _state(eng, reqs) == before


def test_a_failing_decode_step_gives_back_its_slots(monkeypatch):
    eng = _engine()
    reqs = [Request([1, 2, 3], 5), Request([4, 5], 5)]
    eng.prefill(reqs)
    before = _state(eng, reqs)

    def boom(*a, **k):
        raise RuntimeError("decode failed")

    monkeypatch.setattr(eng.model, "decode", boom)
    with pytest.raises(RuntimeError, match="decode failed"):
        eng.decode_step(use_graph=False)
    assert _state(eng, reqs) == before
    monkeypatch.undo()
    eng.decode_step(use_graph=False)
    assert all(len(r.output) == 2 for r in reqs)
