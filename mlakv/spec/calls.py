"""Argument bundles of the kernel families whose calls pass many tensors through every layer.

The fused RoPE write takes sixteen arguments; the op validates them, the dispatcher picks a path,
and a kernel launcher or the reference consumes them. Spelling the sixteen out at every layer
repeated one long signature four times and made a reordering at one layer a silent bug at the
next. :class:`RopeWriteCall` names them once; each layer passes the bundle on (``call._replace``
where a layer normalises a field). :class:`V4StoreCall` does the same for the DeepSeek-V4 family's
paged store, and :class:`IndexStoreCall` for the DSA indexer's key store, whose two kernels (JIT
CUDA, Triton) take the same tensors and row selection; :class:`TokenSlotPlan` is the request layout
of vLLM's paged gathers, planned in torch or by a Triton kernel. Plain data: this module imports
nothing of mlakv.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

__all__ = ["RopeWriteCall", "V4StoreCall", "IndexStoreCall", "TokenSlotPlan"]


class RopeWriteCall(NamedTuple):
    """One fused RoPE write (see :func:`mlakv.ops.rope_write.set_mla_kv_buffer_rope` for the rules).

    Fields (tensors are ``torch.Tensor``; shapes as the op's docstring):
        kv_buffer: ``[num_slots, (1,) row]``, written in place.
        loc: ``[n]`` int32/int64 slots, any stride (``< 0``: padding).
        k_nope: ``[n, (1,) nope_dim]``; k_pe: ``[n, (1,) rope_dim]`` before rotation, bf16/fp16.
        positions: ``[n]`` int32/int64; cos_sin_cache: ``[max_pos, rope_dim]`` float32.
        is_neox_style: rotate halves (True) or interleaved pairs (False).
        kv_cache_format: None (16-bit rows), ``"per_tensor"`` or ``"ds_mla"``.
        k_scale: the per-tensor scale: a ``[1]`` float32 tensor after validation (a float too, for
            the reference), or None.
        q_nope: ``[n, H, nope_dim]``; q_pe: ``[n, H, rope_dim]``; q_out: ``[n, H, nope_dim +
            rope_dim]`` of q's dtype or 8-bit (then ``q_scale``); all three or none.
        q_scale: as ``k_scale``, for an 8-bit ``q_out``.
        skip_index: a slot skipped like padding (negative: none).
        dcp_world_size, dcp_rank: the owner rule (``loc % W == rank`` written at ``loc // W``).
        ds_mla_scale_rule: ds_mla's tile-scale rule, ``"fp32_floor"``, ``"fp32"`` or ``"ue8m0"``
            (:mod:`mlakv.ops.fp8`; other formats ignore it).
    """

    kv_buffer: Any
    loc: Any
    k_nope: Any
    k_pe: Any
    positions: Any
    cos_sin_cache: Any
    is_neox_style: bool
    kv_cache_format: Optional[str] = None
    k_scale: Any = None
    q_nope: Any = None
    q_pe: Any = None
    q_out: Any = None
    q_scale: Any = None
    skip_index: int = -1
    dcp_world_size: int = 1
    dcp_rank: int = 0
    ds_mla_scale_rule: str = "fp32_floor"


class V4StoreCall(NamedTuple):
    """One V4-family paged store (see :func:`mlakv.ops.v4.set_v4_kv_buffer` for the rules); the
    layout and page geometry travel beside it, in the form each kernel takes them.

    Fields (tensors are ``torch.Tensor``):
        kv_pages: ``[num_pages, page_bytes]`` uint8, one layer's pages, written in place.
        loc: ``[n]`` int32/int64 slots, any stride (``< 0``: padding).
        kv: ``[n, 512]`` bf16/fp16 tokens, last dim contiguous, any row stride.
        freqs_cis: ``[n, 64]`` fp32 ``(cos, sin)`` pairs; or
        positions, cos_sin_cache: ``[n]`` int32/int64 positions into a ``[max_pos, 64]`` fp32 table
            (``cos | sin`` halves): the RoPE tail is rotated first. None: no rotation.
        skip_index: a slot skipped like padding (negative: none).
        dcp_world_size, dcp_rank: the owner rule (``loc % W == rank`` stored at ``loc // W``).
    """

    kv_pages: Any
    loc: Any
    kv: Any
    freqs_cis: Any = None
    positions: Any = None
    cos_sin_cache: Any = None
    skip_index: int = -1
    dcp_world_size: int = 1
    dcp_rank: int = 0


class IndexStoreCall(NamedTuple):
    """One indexer key store (see :func:`mlakv.ops.indexer.set_index_k_buffer` for the rules).

    Fields: ``index_pages [num_pages, 8448]`` uint8 (written in place), ``loc [n]`` int32/int64
    slots (any stride; ``< 0``: padding), ``index_k [n, (1,) 128]`` bf16/fp16; ``skip_slot`` a slot
    skipped like padding (negative: none); ``dcp_world_size``/``dcp_rank`` the owner rule;
    ``scale_rule`` ``"fp32"`` or ``"ue8m0"``.
    """

    index_pages: Any
    loc: Any
    index_k: Any
    skip_slot: int = -1
    dcp_world_size: int = 1
    dcp_rank: int = 0
    scale_rule: str = "fp32"


class TokenSlotPlan(NamedTuple):
    """A request-ordered paged gather's layout (see :func:`mlakv.compat.vllm.gather_plan`): request
    ``r`` owns output rows from ``starts[r]`` (``block_table [num_reqs, max_blocks]``, ``starts``
    ``[num_reqs (+ 1 when terminal)]`` and ``seq_starts [num_reqs]`` int32/int64 tensors) up to
    ``total`` rows in all; slots are ``block * block_size + offset`` with block ids in
    ``[0, num_blocks)``."""

    block_table: Any
    starts: Any
    num_reqs: int
    total: int
    block_size: int
    num_blocks: int
    seq_starts: Any = None
    terminal: bool = True
