"""DeepSeek-V3.2-style sparse attention on the small MLA model: a lightning indexer per layer picks the
tokens each query attends to, and its keys live in the DSA pool's indexer cache.

Why: :class:`~mlakv.mem_cache.DSATokenToKVPool` keeps the indexer's FP8 keys beside the MLA rows;
this model drives both caches the way a DSA model does, so prefill and decode exercise the indexer
store (quantize in the write) and the page-table gather end to end. Per layer and token the indexer
caches ``k_idx = W_k x`` (128 values, stored as bf16 -> e4m3 + fp32 scale). A query scores every
cached token of its request with ``score[t] = sum_h w_h * relu(q_h . k_idx[t])`` (``q_h = W_q x``,
``w = W_w x``, the keys dequantized from the cache), keeps the ``index_topk`` best among the tokens
it may see (causal), and attends over those only.

Two caches share the model: :class:`DSAPoolKVCache` (the pool; the indexer keys come back through
its page-table gather) and :class:`DictDSACache` (dicts of tensors, the reference; the indexer keys
quantized by :func:`mlakv.ops.indexer_reference.quantize_index_k`). :func:`run_dsa_demo` runs the
same requests through both and compares the generated tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from mlakv.mem_cache import DSATokenToKVPool
from mlakv.ops.indexer_reference import dequantize_index_k, quantize_index_k

from .model import DictKVCache, MLAConfig, MLAModel, PoolKVCache, PrefillSegment, default_dtype

__all__ = ["DSAConfig", "DSAModel", "DSAPoolKVCache", "DictDSACache", "make_dsa_model", "run_dsa_demo"]

INDEX_DIM = 128
PAGE = 64  # slots per indexer page: requests take whole pages, so a page table addresses their tokens


@dataclass(frozen=True)
class DSAConfig(MLAConfig):
    index_n_heads: int = 2
    index_topk: int = 16


class DSAPoolKVCache(PoolKVCache):
    """The model's caches on a :class:`DSATokenToKVPool`. A request's slots must fill whole 64-slot
    pages in token order (``slots[i] = 64 * page + i % 64``): its page table is ``slots[::64] // 64``."""

    def __init__(self, pool: DSATokenToKVPool) -> None:
        super().__init__(pool)

    def write_index(self, layer: int, loc: torch.Tensor, k_idx: torch.Tensor) -> None:
        self.pool.set_index_k_buffer(layer, loc, k_idx)

    def index_keys(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        """The dequantized indexer keys ``[T, 128]`` fp32 of one request's slots ``[T]`` (token order)."""
        t = slots.shape[0]
        table = (slots[::PAGE] // PAGE)[None]
        lens = torch.tensor([t], device=slots.device)
        k, s = self.pool.get_index_k_and_scale(layer, table, lens, t, t)
        return dequantize_index_k(k, s)


class DictDSACache(DictKVCache):
    """Reference caches: the MLA rows and the indexer's quantized keys in dicts keyed ``(layer, slot)``."""

    def __init__(self, kv_lora_rank: int, rope_dim: int, dtype: torch.dtype, device) -> None:
        super().__init__(kv_lora_rank, rope_dim, dtype, device)
        self.index: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def write_index(self, layer: int, loc: torch.Tensor, k_idx: torch.Tensor) -> None:
        q, scale = quantize_index_k(k_idx)
        for i, slot in enumerate(loc.tolist()):
            if slot > 0:  # padding and the reserved slot 0 are skipped, as in the pool
                self.index[(layer, slot)] = (q[i].clone(), scale[i].clone())

    def index_keys(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        pairs = [self.index[(layer, s)] for s in slots.tolist()]
        return dequantize_index_k(torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]))


class Indexer(nn.Module):
    """One layer's lightning indexer: key, per-head queries and head weights from the layer input."""

    def __init__(self, cfg: DSAConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wk = nn.Linear(cfg.hidden, INDEX_DIM, bias=False)
        self.wq = nn.Linear(cfg.hidden, cfg.index_n_heads * INDEX_DIM, bias=False)
        self.ww = nn.Linear(cfg.hidden, cfg.index_n_heads, bias=False)

    def key(self, h: torch.Tensor) -> torch.Tensor:
        """``h [N, hidden]`` -> the key to cache ``[N, 128]`` bf16."""
        return self.wk(h).to(torch.bfloat16)

    def select(self, h_q: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """``h_q [Q, hidden]`` against ``keys [T, 128]`` fp32 -> ``[Q, T]`` bool: the ``index_topk``
        best-scoring tokens among the ``visible [Q, T]`` ones (all of them when fewer)."""
        q = self.wq(h_q).float().view(h_q.shape[0], self.cfg.index_n_heads, INDEX_DIM)
        w = self.ww(h_q).float()
        s = torch.einsum("qh,qht->qt", w, torch.relu(torch.einsum("qhd,td->qht", q, keys)))
        s = s.masked_fill(~visible, float("-inf"))
        k = min(self.cfg.index_topk, keys.shape[0])
        sel = torch.zeros_like(visible)
        sel.scatter_(1, s.topk(k, dim=-1).indices, True)
        return sel & visible


class DSAModel(MLAModel):
    """:class:`MLAModel` with a lightning indexer per layer; attention runs over the selected tokens."""

    def __init__(self, cfg: DSAConfig) -> None:
        super().__init__(cfg)
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(cfg.seed + 1)
        self.indexers = nn.ModuleList(Indexer(cfg) for _ in range(cfg.n_layers))
        torch.random.set_rng_state(gen_state)

    def _prefill_cache_step(self, cache, layer_id: int, h: torch.Tensor, positions, loc):
        """Project and write the layer's rows (unfused) and its indexer keys."""
        q_lat, q_pe, k_nope, k_rope = self.blocks[layer_id].attn.project(h, positions)
        cache.write(layer_id, loc, k_nope, k_rope)
        cache.write_index(layer_id, loc, self.indexers[layer_id].key(h))
        return q_lat, q_pe

    def _prefill_mask(self, cache, layer_id: int, h: torch.Tensor, seg: PrefillSegment, visible: torch.Tensor) -> torch.Tensor:
        """Each query attends over its indexer's top-k visible tokens."""
        keys = cache.index_keys(layer_id, seg.ctx_slots)
        return self.indexers[layer_id].select(h, keys, visible)

    @torch.no_grad()
    def decode(self, cache, input_ids, positions, loc, slot_table, lengths) -> torch.Tensor:
        """As :meth:`MLAModel.decode` (one token per request), over the indexer's top-k tokens."""
        x = self.embed(input_ids)
        b, t = slot_table.shape
        ar = torch.arange(t, device=x.device)
        for layer_id, blk in enumerate(self.blocks):
            h = blk.norm1(x)
            q_lat, q_pe, k_nope, k_rope = blk.attn.project(h, positions)
            cache.write(layer_id, loc, k_nope, k_rope)
            cache.write_index(layer_id, loc, self.indexers[layer_id].key(h))
            mask = torch.zeros((b, 1, t), dtype=torch.bool, device=x.device)
            for i in range(b):
                n = int(lengths[i])
                keys = cache.index_keys(layer_id, slot_table[i, :n])
                mask[i, 0, :n] = self.indexers[layer_id].select(h[i : i + 1], keys, (ar[:n] < n)[None])[0]
            x = x + blk.attn.attend(cache, layer_id, q_lat[:, None], q_pe[:, None], slot_table, mask)[:, 0]
            x = x + blk.mlp(blk.norm2(x))
        return self.lm_head(self.norm(x))


def make_dsa_model(cfg: DSAConfig, device, dtype: Optional[torch.dtype] = None) -> DSAModel:
    return DSAModel(cfg).to(device=device, dtype=dtype or default_dtype(device)).eval()


def _generate(model: DSAModel, cache, prompts: list[torch.Tensor], slots: list[torch.Tensor], steps: int, device) -> list[list[int]]:
    """Prefill every prompt in one batch, then ``steps`` greedy decode steps; the tokens generated per request."""
    ids = torch.cat(prompts).to(device)
    pos = torch.cat([torch.arange(p.shape[0]) for p in prompts]).to(device)
    loc = torch.cat([s[: p.shape[0]] for p, s in zip(prompts, slots)]).to(device)
    segs, start = [], 0
    for p, s in zip(prompts, slots):
        segs.append(PrefillSegment(start, p.shape[0], s[: p.shape[0]].to(device)))
        start += p.shape[0]
    logits = model.prefill(cache, ids, pos, loc, segs)
    ends = torch.cumsum(torch.tensor([p.shape[0] for p in prompts]), 0) - 1
    nxt = logits[ends.to(device)].argmax(-1)
    out = [[int(t)] for t in nxt.tolist()]
    lens = [p.shape[0] for p in prompts]
    for _ in range(steps):
        pos = torch.tensor(lens, device=device)
        loc = torch.stack([s[n] for s, n in zip(slots, lens)]).to(device)
        lens = [n + 1 for n in lens]
        t = max(lens)
        table = torch.zeros((len(prompts), t), dtype=torch.int64, device=device)
        for i, (s, n) in enumerate(zip(slots, lens)):
            table[i, :n] = s[:n].to(device)
        logits = model.decode(cache, nxt, pos, loc, table, torch.tensor(lens, device=device))
        nxt = logits.argmax(-1)
        for o, tok in zip(out, nxt.tolist()):
            o.append(int(tok))
    return out


def run_dsa_demo(
    device: str = "cpu", prompt_lens: Sequence[int] = (100, 37), steps: int = 6, cfg: Optional[DSAConfig] = None
) -> dict:
    """The same requests through the pool and through the dict reference: ``{"pool", "reference",
    "equal", "pool_obj"}`` (tokens generated per request, whether they match, the pool used)."""
    cfg = cfg or DSAConfig(hidden=64, n_heads=2, kv_lora_rank=128, qk_rope_head_dim=32, qk_nope_head_dim=32,
                           v_head_dim=32, n_layers=2, index_topk=16)  # fmt: skip
    model = make_dsa_model(cfg, device)
    dtype = next(model.parameters()).dtype
    g = torch.Generator().manual_seed(cfg.seed + 2)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in prompt_lens]
    # each request takes whole 64-slot pages (page 0 holds the reserved slot 0: never handed out)
    slots, page = [], 1
    for n in prompt_lens:
        pages = -(-(n + steps) // PAGE)
        slots.append(torch.arange(page * PAGE, (page + pages) * PAGE))
        page += pages
    pool = DSATokenToKVPool(page * PAGE, PAGE, dtype, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.n_layers, device)
    got = _generate(model, DSAPoolKVCache(pool), prompts, slots, steps, device)
    ref = _generate(model, DictDSACache(cfg.kv_lora_rank, cfg.qk_rope_head_dim, dtype, device), prompts, slots, steps, device)
    return {"pool": got, "reference": ref, "equal": got == ref, "pool_obj": pool}
