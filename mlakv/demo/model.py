"""A small DeepSeek-style MLA model whose attention caches through a KV backend.

Per token and layer the model caches one latent row: ``k_nope = RMSNorm(W_dkv x)`` (width
``kv_lora_rank``) and ``k_rope = RoPE(W_kr x)`` (width ``qk_rope_head_dim``). Attention runs in the
latent space with the up-projections absorbed (``q_nope W_UK`` against ``k_nope``, then ``W_UV``
after the softmax), so the cache never holds per-head K or V. The attention itself is plain torch
over gathered rows: the point of this model is the cache path, not attention speed.

Two cache backends share the same model code: :class:`PoolKVCache` (an ``MLATokenToKVPool``; writes
go through the dispatcher) and :class:`DictKVCache` (a dict of tensors, the reference);
:class:`QuantizedPoolKVCache` is the pool cache for a quantized ``kv_cache_format`` (FP8 rows, the
DeepSeek-V4 family's pages), whose rows the model reads dequantized. A third,
:class:`mlakv.demo.dcp.DCPPoolKVCache`, shards the cache over decode-context-parallel ranks: the
model asks every cache for the rows *this rank* attends over (:meth:`KVCache.shard`) and hands the
partial result ``(o_lat, lse)`` back to it (:meth:`KVCache.merge`); a single-rank cache returns all
rows and merges nothing, so one model code serves both.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from mlakv.mem_cache import MLATokenToKVPool
from mlakv.ops.rope_write_reference import rope_rotate_torch

__all__ = [
    "MLAConfig", "MLAModel", "KVCache", "PoolKVCache", "QuantizedPoolKVCache", "DictKVCache", "PrefillSegment",
    "fused_step_available", "rope_table",
]  # fmt: skip


@dataclass(frozen=True)
class MLAConfig:
    vocab_size: int = 512
    hidden: int = 256
    n_heads: int = 4
    kv_lora_rank: int = 512
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 64
    v_head_dim: int = 64
    n_layers: int = 3
    rope_theta: float = 10000.0
    max_position: int = 32768  # rows of the RoPE table (cos | sin per position)
    seed: int = 0


@dataclass
class PrefillSegment:
    """One request's part of a prefill batch: its new tokens are rows ``[start, start + length)``
    of the batch, and ``ctx_slots`` are all its slots in token order (cached prefix + new)."""

    start: int
    length: int
    ctx_slots: torch.Tensor


class KVCache:
    """What the model needs of a cache: ``write`` and ``gather`` (per backend), and the two
    decode-context-parallel hooks, which on a single rank are the identity."""

    def write(self, layer: int, loc: torch.Tensor, k_nope: torch.Tensor, k_rope: torch.Tensor) -> None:
        raise NotImplementedError

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def shard(
        self, layer: int, slots: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The rows this rank attends over for ``slots [B, T]`` (token order) under ``mask [B, Q, T]``:
        ``(c_nope [B, T, R], c_pe [B, T, P], mask [B, Q, T])``. Single rank: every row, ``mask`` as is."""
        c_nope, c_pe = self.gather(layer, slots)
        return c_nope, c_pe, mask

    def merge(self, o_lat: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
        """Combine this rank's partial attention ``o_lat [B, Q, H, R]`` (normalised over its rows)
        with log-sum-exp ``lse [B, Q, H]`` (float32) across ranks. Single rank: ``o_lat``."""
        return o_lat


class PoolKVCache(KVCache):
    """The model's cache on an :class:`MLATokenToKVPool` (what an engine does).

    ``fused=True`` (where the pool takes it: 16-bit rows, ``per_tensor`` or ``ds_mla``) makes each
    layer's cache step one launch, :meth:`write_rope` (RoPE on ``k_pe`` and ``q_pe``, the row write,
    the absorbed query); the model then hands it the unrotated values. Off, the model rotates with
    torch and calls :meth:`write`. Both give the same bits.
    """

    def __init__(self, pool: MLATokenToKVPool, fused: bool = False) -> None:
        self.pool = pool
        self.fused = bool(fused) and fused_step_available(pool)

    def write(self, layer: int, loc: torch.Tensor, k_nope: torch.Tensor, k_rope: torch.Tensor) -> None:
        self.pool.set_kv_buffer(layer, loc, k_nope, k_rope)

    def write_rope(self, layer: int, loc, k_nope, k_pe, positions, cos_sin_cache, q_lat, q_pe):
        """The fused step: returns ``(q_lat, rotated q_pe)`` as views of the one ``q_out`` it builds."""
        q_out = self.pool.set_kv_buffer_rope(layer, loc, k_nope, k_pe, positions, cos_sin_cache, True, q_lat, q_pe)
        r = q_lat.shape[-1]
        return q_out[..., :r], q_out[..., r:]

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows at ``slots`` (any shape ``S``) as ``([*S, kv_lora_rank], [*S, rope_dim])``."""
        rows = self.pool.get_key_buffer(layer)[slots, 0]
        r = self.pool.kv_lora_rank
        return rows[..., :r], rows[..., r : r + self.pool.qk_rope_head_dim]


class QuantizedPoolKVCache(PoolKVCache):
    """The model's cache on a pool of a quantized ``kv_cache_format`` (``per_tensor``, ``ds_mla``, or the
    DeepSeek-V4 family's pages ``v4``, ``v41``, ``v41_fp4``, ``v41_new``, ``v41_fp4_new``).

    Sources go in as 16-bit values (:attr:`src_dtype`: a V4-family pool's own dtype, else the model's
    dtype when it is bf16/fp16, else bf16), quantized inside the pool's write; rows come back
    dequantized by the pool's gather, in ``model_dtype``. ``fused=True`` (``per_tensor``/``ds_mla``)
    runs RoPE, the quantizing write and the absorbed query in one launch per layer
    (:meth:`write_rope`); the V4 family takes the separate steps.
    """

    def __init__(self, pool: MLATokenToKVPool, model_dtype: torch.dtype, fused: bool = False) -> None:
        if pool.kv_cache_format is None:
            raise ValueError("QuantizedPoolKVCache takes a pool with a kv_cache_format; use PoolKVCache for plain rows")
        super().__init__(pool, fused=fused)
        self.model_dtype = model_dtype
        sixteen = (torch.bfloat16, torch.float16)
        self.src_dtype = (
            pool.dtype if pool.dtype in sixteen else model_dtype if model_dtype in sixteen else torch.bfloat16
        )

    def write(self, layer: int, loc: torch.Tensor, k_nope: torch.Tensor, k_rope: torch.Tensor) -> None:
        self.pool.set_kv_buffer(layer, loc, k_nope.to(self.src_dtype), k_rope.to(self.src_dtype))

    def write_rope(self, layer: int, loc, k_nope, k_pe, positions, cos_sin_cache, q_lat, q_pe):
        """The fused step on 16-bit sources; returns ``(q_lat, rotated q_pe)`` in ``q_lat``'s dtype."""
        s = self.src_dtype
        q_out = self.pool.set_kv_buffer_rope(
            layer, loc, k_nope.to(s), k_pe.to(s), positions, cos_sin_cache, True, q_lat.to(s), q_pe.to(s)
        ).to(q_lat.dtype)
        r = q_lat.shape[-1]
        return q_out[..., :r], q_out[..., r:]

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows at ``slots`` (any shape ``S``) dequantized: ``([*S, kv_lora_rank], [*S, rope_dim])`` in ``model_dtype``."""
        nope, rope = self.pool.get_mla_kv_buffer(layer, slots.reshape(-1), dst_dtype=self.model_dtype)
        return nope.reshape(*slots.shape, -1), rope.reshape(*slots.shape, -1)


class DictKVCache(KVCache):
    """Reference cache: a dict ``(layer, slot) -> row`` of plain tensors, no kernels involved."""

    def __init__(self, kv_lora_rank: int, rope_dim: int, dtype: torch.dtype, device) -> None:
        self.rows: dict[tuple[int, int], torch.Tensor] = {}
        self.r, self.p, self.dtype, self.device = kv_lora_rank, rope_dim, dtype, device

    def write(self, layer: int, loc: torch.Tensor, k_nope: torch.Tensor, k_rope: torch.Tensor) -> None:
        for i, slot in enumerate(loc.tolist()):
            if slot >= 0:
                self.rows[(layer, slot)] = torch.cat([k_nope[i].reshape(-1), k_rope[i].reshape(-1)]).clone()

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        zero = torch.zeros(self.r + self.p, dtype=self.dtype, device=self.device)
        flat = [self.rows.get((layer, s), zero) for s in slots.flatten().tolist()]
        rows = torch.stack(flat).view(*slots.shape, self.r + self.p) if flat else zero.new_empty(*slots.shape, self.r + self.p)
        return rows[..., : self.r], rows[..., self.r :]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).to(x.dtype)


def fused_step_available(pool: MLATokenToKVPool) -> bool:
    """Whether the pool takes the fused RoPE step: bf16/fp16 rows, or the ``per_tensor``/``ds_mla`` formats."""
    fmt = pool.kv_cache_format
    return fmt in ("per_tensor", "ds_mla") or (fmt is None and pool.dtype in (torch.bfloat16, torch.float16))


@functools.lru_cache(maxsize=8)
def rope_table(theta: float, rope_dim: int, max_position: int, device: torch.device) -> torch.Tensor:
    """The model's RoPE table ``[max_position, rope_dim]`` fp32: ``cos`` half, then ``sin`` half, of
    ``position * theta^(-2j / rope_dim)`` (sglang's / vLLM's ``cos_sin_cache`` layout; shared by layers)."""
    inv = theta ** (-torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim)
    ang = torch.arange(max_position, dtype=torch.float32)[:, None] * inv[None, :]
    return torch.cat([ang.cos(), ang.sin()], dim=1).to(device)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding (rotate-half) of ``x [N, ..., d]`` at ``positions [N]``."""
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    ang = positions.float()[:, None] * inv[None, :]  # [N, d/2]
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (d // 2,)
    cos, sin = ang.cos().view(shape), ang.sin().view(shape)
    x1, x2 = x.float()[..., : d // 2], x.float()[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class MLAAttention(nn.Module):
    def __init__(self, cfg: MLAConfig, layer_id: int) -> None:
        super().__init__()
        self.cfg, self.layer_id = cfg, layer_id
        h, r, p = cfg.n_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        self.q_proj = nn.Linear(cfg.hidden, h * (cfg.qk_nope_head_dim + p), bias=False)
        self.kv_a_proj = nn.Linear(cfg.hidden, r + p, bias=False)
        self.kv_a_norm = RMSNorm(r)
        self.w_uk = nn.Parameter(torch.randn(h, cfg.qk_nope_head_dim, r) / math.sqrt(cfg.qk_nope_head_dim))
        self.w_uv = nn.Parameter(torch.randn(h, r, cfg.v_head_dim) / math.sqrt(r))
        self.o_proj = nn.Linear(h * cfg.v_head_dim, cfg.hidden, bias=False)
        self.scale = 1.0 / math.sqrt(cfg.qk_nope_head_dim + p)

    def rope_table(self, device) -> torch.Tensor:
        cfg = self.cfg
        return rope_table(cfg.rope_theta, cfg.qk_rope_head_dim, cfg.max_position, torch.device(device))

    def project_unrotated(self, x: torch.Tensor):
        """``x [N, hidden]`` -> ``q_lat [N, H, R]``, ``q_pe [N, H, P]``, ``k_nope [N, R]``, ``k_pe [N, P]``
        with ``q_pe``/``k_pe`` before RoPE (what the fused cache step takes)."""
        cfg = self.cfg
        q = self.q_proj(x).view(x.shape[0], cfg.n_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
        q_nope, q_pe = q[..., : cfg.qk_nope_head_dim], q[..., cfg.qk_nope_head_dim :]
        q_lat = torch.einsum("nhd,hdr->nhr", q_nope, self.w_uk)
        kv = self.kv_a_proj(x)
        k_nope = self.kv_a_norm(kv[:, : cfg.kv_lora_rank])
        return q_lat, q_pe, k_nope, kv[:, cfg.kv_lora_rank :]

    def project(self, x: torch.Tensor, positions: torch.Tensor):
        """``x [N, hidden]`` -> ``q_lat [N, H, R]``, ``q_pe [N, H, P]``, ``k_nope [N, R]``, ``k_rope [N, P]``
        (RoPE applied: rotate-half pairs from the model's table, fp32, rounded once)."""
        q_lat, q_pe, k_nope, k_pe = self.project_unrotated(x)
        cs = self.rope_table(x.device)
        return q_lat, rope_rotate_torch(q_pe, positions, cs, True), k_nope, rope_rotate_torch(k_pe, positions, cs, True)

    def cache_step(self, cache: KVCache, layer_id: int, x: torch.Tensor, positions: torch.Tensor, loc: torch.Tensor):
        """Project, rotate and write this layer's rows; returns ``(q_lat [N, H, R], q_pe [N, H, P])``.
        A cache with ``fused`` set does RoPE, the write and the query in one launch (``write_rope``)."""
        if getattr(cache, "fused", False):
            q_lat, q_pe, k_nope, k_pe = self.project_unrotated(x)
            return cache.write_rope(layer_id, loc, k_nope, k_pe, positions, self.rope_table(x.device), q_lat, q_pe)
        q_lat, q_pe, k_nope, k_rope = self.project(x, positions)
        cache.write(layer_id, loc, k_nope, k_rope)
        return q_lat, q_pe

    def attend_partial(self, q_lat, q_pe, c_nope, c_pe, mask) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent attention over the rows given (all of them, or one rank's shard).

        ``q_lat [B, Q, H, R]``, ``q_pe [B, Q, H, P]`` over ``c_nope [B, T, R]``, ``c_pe [B, T, P]``
        with ``mask [B, Q, T]`` (True = attend) -> ``(o_lat [B, Q, H, R]`` in the cache dtype,
        ``lse [B, Q, H]`` float32``)``: the softmax-weighted rows and the log-sum-exp of the scores.
        A query that sees no row here (possible on a shard) gets ``o_lat = 0`` and ``lse = -inf``.
        """
        keep = mask.any(dim=1)[..., None]  # rows no query sees are zeroed (padding slots hold anything)
        c_nope = torch.where(keep, c_nope, torch.zeros((), dtype=c_nope.dtype, device=c_nope.device))
        c_pe = torch.where(keep, c_pe, torch.zeros((), dtype=c_pe.dtype, device=c_pe.device))
        s = torch.einsum("bqhr,btr->bhqt", q_lat, c_nope).float() + torch.einsum("bqhp,btp->bhqt", q_pe, c_pe).float()
        s = (s * self.scale).masked_fill(~mask[:, None], float("-inf"))
        lse = torch.logsumexp(s, dim=-1)  # [B, H, Q]
        w = torch.softmax(s, dim=-1).masked_fill(torch.isinf(lse)[..., None], 0.0).to(c_nope.dtype)
        o_lat = torch.einsum("bhqt,btr->bqhr", w, c_nope)
        return o_lat, lse.transpose(1, 2)

    def output(self, o_lat: torch.Tensor) -> torch.Tensor:
        """``o_lat [B, Q, H, R]`` -> ``[B, Q, hidden]`` (the value up-projection, then ``o_proj``)."""
        o = torch.einsum("bqhr,hrv->bqhv", o_lat, self.w_uv)
        return self.o_proj(o.reshape(*o.shape[:2], -1))

    def attend(self, cache: KVCache, layer_id: int, q_lat, q_pe, slots, mask) -> torch.Tensor:
        """``q_lat [B, Q, H, R]``, ``q_pe [B, Q, H, P]`` over the cached rows at ``slots [B, T]``
        under ``mask [B, Q, T]`` -> ``[B, Q, hidden]``; on a sharded cache each rank attends over its
        rows and the cache merges the partial results."""
        c_nope, c_pe, mask = cache.shard(layer_id, slots, mask)
        o_lat, lse = self.attend_partial(q_lat, q_pe, c_nope, c_pe, mask)
        return self.output(cache.merge(o_lat, lse))


class MLABlock(nn.Module):
    def __init__(self, cfg: MLAConfig, layer_id: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(cfg.hidden), RMSNorm(cfg.hidden)
        self.attn = MLAAttention(cfg, layer_id)
        self.mlp = nn.Sequential(nn.Linear(cfg.hidden, 4 * cfg.hidden, bias=False), nn.SiLU(), nn.Linear(4 * cfg.hidden, cfg.hidden, bias=False))


class MLAModel(nn.Module):
    """Embedding, ``n_layers`` MLA blocks, final norm, LM head; seeded random weights."""

    def __init__(self, cfg: MLAConfig) -> None:
        super().__init__()
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(cfg.seed)
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.blocks = nn.ModuleList(MLABlock(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.hidden)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        torch.random.set_rng_state(gen_state)

    @torch.no_grad()
    def prefill(self, cache, input_ids, positions, loc, segments: Sequence[PrefillSegment]) -> torch.Tensor:
        """New tokens of several requests, ``[N]`` each; returns logits ``[N, vocab]``.

        Every layer writes its new rows (``loc``) before attending, so a request's queries see its
        cached prefix and, causally, its own new tokens.
        """
        x = self.embed(input_ids)
        for layer_id, blk in enumerate(self.blocks):
            h = blk.norm1(x)
            q_lat, q_pe = self._prefill_cache_step(cache, layer_id, h, positions, loc)
            out = torch.empty_like(h)
            for seg in segments:
                sl = slice(seg.start, seg.start + seg.length)
                t = seg.ctx_slots.shape[0]
                visible = torch.arange(t, device=x.device)[None, :] <= positions[sl][:, None]
                mask = self._prefill_mask(cache, layer_id, h[sl], seg, visible)[None]
                out[sl] = blk.attn.attend(cache, layer_id, q_lat[sl][None], q_pe[sl][None], seg.ctx_slots[None], mask)[0]
            x = x + out
            x = x + blk.mlp(blk.norm2(x))
        return self.lm_head(self.norm(x))

    def _prefill_cache_step(self, cache, layer_id: int, h: torch.Tensor, positions, loc):
        """Layer ``layer_id``'s cache step in :meth:`prefill`: ``(q_lat, q_pe)`` (a subclass adds its own rows)."""
        return self.blocks[layer_id].attn.cache_step(cache, layer_id, h, positions, loc)

    def _prefill_mask(self, cache, layer_id: int, h: torch.Tensor, seg: PrefillSegment, visible: torch.Tensor) -> torch.Tensor:
        """The ``[q, t]`` tokens a segment's queries attend over in :meth:`prefill`: the causally visible ones."""
        return visible

    @torch.no_grad()
    def decode(self, cache, input_ids, positions, loc, slot_table, lengths) -> torch.Tensor:
        """One new token for each of ``B`` requests (static shapes: CUDA-graph capturable).

        ``input_ids``/``positions``/``loc [B]`` (``loc < 0``: padding row, writes nothing);
        ``slot_table [B, T]`` each request's slots in token order, padded with 0 (the dummy
        slot); ``lengths [B]`` how many of them are real (including this step's token).
        Returns logits ``[B, vocab]``.
        """
        x = self.embed(input_ids)
        t = slot_table.shape[1]
        mask = (torch.arange(t, device=x.device)[None, :] < lengths[:, None])[:, None, :]  # [B, 1, T]
        for layer_id, blk in enumerate(self.blocks):
            h = blk.norm1(x)
            q_lat, q_pe = blk.attn.cache_step(cache, layer_id, h, positions, loc)
            x = x + blk.attn.attend(cache, layer_id, q_lat[:, None], q_pe[:, None], slot_table, mask)[:, 0]
            x = x + blk.mlp(blk.norm2(x))
        return self.lm_head(self.norm(x))


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on CUDA, float32 on CPU (CPU bf16 matmuls are slow and the point is the cache path)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def make_model(cfg: MLAConfig, device, dtype: Optional[torch.dtype] = None) -> MLAModel:
    return MLAModel(cfg).to(device=device, dtype=dtype or default_dtype(device)).eval()
