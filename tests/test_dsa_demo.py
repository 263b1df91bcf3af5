"""The demo model's lightning indexer: prefill and decode through DSATokenToKVPool give the tokens of
the dict-cache reference of the same model; the indexer's selection is what it says.

Spec: :mod:`mlakv.demo.dsa`.
"""

from __future__ import annotations

import torch
from conftest import DEVICE

from mlakv.demo.dsa import DictDSACache, DSAConfig, Indexer, make_dsa_model, run_dsa_demo
from mlakv.demo.model import DictKVCache, PrefillSegment, make_model

SMALL = dict(hidden=64, n_heads=2, kv_lora_rank=128, qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=32, n_layers=2)


def test_pool_tokens_equal_the_dict_reference():
    res = run_dsa_demo(DEVICE, prompt_lens=(100, 37), steps=5)
    assert res["equal"], (res["pool"], res["reference"])
    pool = res["pool_obj"]
    used = [int(b[:, :8192].reshape(-1, 64, 128).any(dim=2).sum()) for b in pool.index_k_buffer]
    assert used == [100 + 5 + 37 + 5] * 2  # every prompt and decode token's key went through the indexer store


def test_selection_keeps_topk_of_the_visible_tokens():
    cfg = DSAConfig(**SMALL, index_topk=5)
    idx = Indexer(cfg)
    h = torch.randn(7, cfg.hidden)
    keys = torch.randn(12, 128)
    visible = torch.arange(12)[None, :] <= torch.tensor([0, 2, 4, 6, 8, 10, 11])[:, None]
    sel = idx.select(h, keys, visible)
    assert torch.equal(sel.sum(1), torch.tensor([1, 3, 5, 5, 5, 5, 5]))
    assert not (sel & ~visible).any()


def _prefill_logits(model, cache, n: int = 80):
    ids = torch.randint(0, model.cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(9)).to(DEVICE)
    pos = torch.arange(n, device=DEVICE)
    slots = torch.arange(64, 64 + n, device=DEVICE)
    return model.prefill(cache, ids, pos, slots, [PrefillSegment(0, n, slots)])


def test_topk_covering_the_context_is_dense_attention_and_a_small_topk_is_not():
    dense = make_model(DSAConfig(**SMALL), DEVICE)
    dt = next(dense.parameters()).dtype
    full = make_dsa_model(DSAConfig(**SMALL, index_topk=10_000), DEVICE)
    sparse = make_dsa_model(DSAConfig(**SMALL, index_topk=8), DEVICE)
    want = _prefill_logits(dense, DictKVCache(128, 32, dt, DEVICE))
    assert torch.equal(_prefill_logits(full, DictDSACache(128, 32, dt, DEVICE)), want)
    assert not torch.equal(_prefill_logits(sparse, DictDSACache(128, 32, dt, DEVICE)), want)
