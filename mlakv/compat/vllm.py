"""vLLM's MLA KV-cache ops, served by mlakv's kernels: one library behind both engines.

vLLM writes and reads DeepSeek-style MLA caches through a small set of ops (``vllm/_custom_ops.py``
over ``csrc/cache_kernels.cu``). This module offers them with vLLM's names, argument order, shapes,
``kv_cache_dtype`` strings and semantics (vLLM 0.33.0, the version docs/vllm.md was written against),
each a thin adapter over mlakv's own ops — no write or gather is implemented twice:

* vLLM's paged cache ``[num_blocks, block_size, entry]`` is a view of rows ``[rows, entry]``
  (:func:`paged_rows`); ``slot_mapping`` is the row write's ``loc`` (:func:`slot_rows`);
* ``concat_and_cache_mla`` -> :func:`mlakv.ops.dispatch.set_mla_kv_buffer_triton` (``"auto"``),
  :func:`mlakv.ops.fp8.set_mla_kv_buffer_quant` (``"fp8"``/``"fp8_e4m3"``: ``per_tensor``;
  ``"fp8_ds_mla"``: ``ds_mla`` with vLLM 0.33's power-of-two tile scales, ``ds_mla_scale_rule="ue8m0"``);
* the gathers map ``block_table`` + start offsets to one source slot per output token
  (:func:`gather_plan`; on the GPU inside the kernel, no sync): the byte gathers (``"auto"``,
  ``cp_gather_cache``, the indexer gather) are ONE Triton launch that locates each row's slot and
  copies its bytes (:func:`mlakv.kernels.triton.paged_plan.launch_paged_gather`); the converting
  ones (``"fp8"``, the 656-byte upconvert) are the plan's launch and
  :func:`mlakv.ops.fp8.get_mla_kv_buffer_dequant` on its rows;
* ``swap_blocks`` -> :func:`mlakv.ops.custom_ops.copy_rows` with whole blocks as units.

Each op is also registered as a torch library op (``torch.ops.mlakv_vllm.<name>``, vLLM's schema,
a fake implementation that runs the same argument checks) so ``torch.compile`` traces it as one
node, as vLLM's ``torch.ops._C_cache_ops.*`` are; :func:`register_ops` registers the same ops under
another namespace (the test shim uses ``_C_cache_ops``). The module-level functions call the
registered op, as vLLM's ``_custom_ops`` functions do.

Unlike vLLM's kernels, every call is validated (``TypeError``/``ValueError`` naming the argument,
the dim and what was expected), and no input makes a kernel touch memory outside its tensors:
slots, block ids and logical blocks outside the tensors are skipped on the GPU (unchecked, no sync)
and raise ``IndexError`` before anything is written on the CPU. Where vLLM's results differ from
what mlakv computes (NaN payloads, fp16 ``fp8_ds_mla``, inputs vLLM reads out of bounds), the
difference is stated in docs/vllm.md.
"""

from __future__ import annotations

import functools
import operator
from typing import Optional, Sequence

import torch

from mlakv.ops import fp8
from mlakv.ops.custom_ops import copy_rows
from mlakv.ops.dispatch import set_mla_kv_buffer_triton
from mlakv.spec import rules
from mlakv.spec.calls import TokenSlotPlan

__all__ = [
    "KV_CACHE_DTYPES",
    "DS_MLA_ENTRY_BYTES",
    "concat_and_cache_mla",
    "gather_and_maybe_dequant_cache",
    "cp_gather_cache",
    "cp_gather_and_upconvert_fp8_kv_cache",
    "swap_blocks",
    "indexer_k_quant_and_cache",
    "cp_gather_indexer_k_quant_cache",
    "convert_fp8",
    "paged_rows",
    "slot_rows",
    "gather_plan",
    "register_ops",
    "NAMESPACE",
]

#: The ``kv_cache_dtype`` strings taken (vLLM's ``CacheDType`` names that map to these formats).
KV_CACHE_DTYPES = ("auto", "float16", "bfloat16", "fp8", "fp8_e4m3", "fp8_ds_mla")
_KIND = {"auto": "auto", "float16": "auto", "bfloat16": "auto", "fp8": "fp8", "fp8_e4m3": "fp8", "fp8_ds_mla": "ds_mla"}
#: One ``fp8_ds_mla`` entry: 512 e4m3 nope bytes, 4 fp32 tile scales, 64 bf16 rope values.
DS_MLA_ENTRY_BYTES = 656
_DS_NOPE, _DS_ROPE = 512, 64
_DS_MLA_SCALE_RULE = "ue8m0"  # vLLM 0.33's fp8_ds_mla tile scales: 2^ceil(log2(max(amax / 448, 1e-4f)))
_BYTE_DTYPES = (torch.uint8, torch.float8_e4m3fn)
_IDX_DTYPES = (torch.int32, torch.int64)
_AUTO_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what vLLM's "auto" dispatch takes
NAMESPACE = "mlakv_vllm"


# ---- argument checks (metadata only: they also run in the fake implementations) ----------------


def _tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _kind(kv_cache_dtype: object, allowed: Sequence[str]) -> str:
    if not isinstance(kv_cache_dtype, str) or kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {kv_cache_dtype!r}")
    kind = _KIND[kv_cache_dtype]
    if kind not in allowed:
        raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} is not supported by this op (takes {tuple(allowed)})")
    return kind


def _same_device(ref_name: str, ref: torch.Tensor, **others: Optional[torch.Tensor]) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def _index_vector(name: str, t: object, dims: int = 1) -> torch.Tensor:
    _tensor(name, t)
    if t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got {t.dim()}-D shape {tuple(t.shape)}")
    if t.dtype not in _IDX_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
    return t


def _entry_shape(name: str, cache: object) -> tuple[int, int, int]:
    """``(num_blocks, block_size, entry)`` of a paged cache ``[num_blocks, block_size, *entry_dims]``
    whose entry dims are contiguous (one row of ``entry`` elements per slot)."""
    _tensor(name, cache)
    if cache.dim() < 3:
        raise ValueError(f"{name} must be [num_blocks, block_size, entry...] (3-D or more), got shape {tuple(cache.shape)}")
    entry, expect = 1, 1
    for size, stride in zip(reversed(cache.shape[2:]), reversed(cache.stride()[2:])):
        if size > 1 and stride != expect:
            raise ValueError(f"{name}: the entry dims (dim 2 on) must be contiguous, got strides {tuple(cache.stride())}")
        entry *= size
        expect *= size
    nb, bs = cache.shape[0], cache.shape[1]
    if nb and bs and entry:
        s0, s1 = cache.stride(0), cache.stride(1)
        if bs > 1 and s1 < entry:
            raise ValueError(f"{name}: slots overlap (dim 1 stride {s1} < entry size {entry})")
        if nb > 1 and (s0 < (bs - 1) * s1 + entry or (bs > 1 and s0 % s1)):
            raise ValueError(
                f"{name}: dim 0 (block) stride {s0} must be a multiple of the slot stride {s1} and hold "
                f"block_size={bs} slots"
            )
    return nb, bs, entry


def paged_rows(cache: torch.Tensor, name: str = "kv_cache") -> tuple[torch.Tensor, int]:
    """vLLM's paged cache as mlakv rows: ``(rows [R, entry], rows_per_block)``.

    ``cache``: ``[num_blocks, block_size, entry...]`` with contiguous entry dims and a block stride
    that is a multiple of the slot stride (vLLM pads blocks that way, if at all). Row ``r`` of the
    result is slot ``r % rows_per_block`` of block ``r // rows_per_block`` (``rows_per_block =
    block stride / slot stride``; padded blocks leave rows no slot maps to). A view: no copy.
    """
    nb, bs, entry = _entry_shape(name, cache)
    if bs > 1:
        s1 = cache.stride(1)
        rpb = cache.stride(0) // s1 if nb > 1 else bs
    else:  # one slot per block: a row is a block
        s1 = cache.stride(0) if nb > 1 else entry
        rpb = 1
    n_rows = (nb - 1) * rpb + bs if nb and bs else 0
    return torch.as_strided(cache, (n_rows, entry), (s1, 1), cache.storage_offset()), rpb


def slot_rows(slot: torch.Tensor, block_size: int, rows_per_block: int) -> torch.Tensor:
    """vLLM slots (``block * block_size + offset``) as :func:`paged_rows` rows; negatives stay negative.

    Unpadded blocks (``rows_per_block == block_size``): ``slot`` itself, no kernel launched.
    """
    if rows_per_block == block_size:
        return slot
    s = slot.to(torch.int64)
    return torch.where(s >= 0, (s // block_size) * rows_per_block + s % block_size, -1)


def _check_scale(scale: object, device: torch.device) -> torch.Tensor:
    _tensor("scale", scale)
    if scale.dtype != torch.float32 or scale.numel() != 1:
        raise TypeError(f"scale must be a 1-element float32 tensor, got {scale.dtype} shape {tuple(scale.shape)}")
    if scale.device != device:
        raise ValueError(f"scale is on {scale.device} but kv_cache is on {device}")
    return scale.reshape(1)


def _check_concat(kv_c, k_pe, kv_cache, slot_mapping, kv_cache_dtype, scale, skip_scale) -> tuple[str, int]:
    """The write's rules; returns ``(kind, num_tokens)``."""
    kind = _kind(kv_cache_dtype, ("auto", "fp8", "ds_mla"))
    for name, t in (("kv_c", kv_c), ("k_pe", k_pe)):
        _tensor(name, t)
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D [num_tokens, D], got shape {tuple(t.shape)}")
        rules.check_rows_tensor(name, t, "num_tokens")  # the last dim contiguous; rows may be strided
    _index_vector("slot_mapping", slot_mapping)
    _tensor("scale", scale)
    if not isinstance(skip_scale, bool):
        raise TypeError(f"skip_scale must be a bool, got {type(skip_scale).__name__}")
    nb, bs, entry = _entry_shape("kv_cache", kv_cache)
    _same_device("kv_cache", kv_cache, kv_c=kv_c, k_pe=k_pe, slot_mapping=slot_mapping)
    n = slot_mapping.shape[0]  # vLLM: kv_c/k_pe may carry more rows (CUDA-graph padding); these are written
    for name, t in (("kv_c", kv_c), ("k_pe", k_pe)):
        if t.shape[0] < n:
            raise ValueError(f"{name}: dim 0 has {t.shape[0]} rows but slot_mapping has num_tokens={n}")
    if k_pe.dtype != kv_c.dtype:
        raise TypeError(f"k_pe dtype {k_pe.dtype} must match kv_c dtype {kv_c.dtype}")
    r, p = kv_c.shape[1], k_pe.shape[1]
    if kind == "ds_mla":
        if r != _DS_NOPE or p not in (_DS_ROPE, 0):
            raise ValueError(f"fp8_ds_mla needs kv_c [num_tokens, 512] and k_pe [num_tokens, 64 or 0], got {r} and {p}")
        if kv_c.dtype != torch.bfloat16:
            raise TypeError(
                f"fp8_ds_mla takes bfloat16 kv_c/k_pe, got {kv_c.dtype} (vLLM's kernel reads a float16 tile's "
                "amax from the raw bits; mlakv does not reproduce that)"
            )
        if kv_cache.dtype not in _BYTE_DTYPES or entry != DS_MLA_ENTRY_BYTES:
            raise ValueError(
                f"kv_cache for fp8_ds_mla must be uint8/float8_e4m3fn with {DS_MLA_ENTRY_BYTES}-byte entries, "
                f"got {kv_cache.dtype} entry {entry}"
            )
        return kind, n
    if entry != r + p:
        raise ValueError(f"kv_cache: entry size (dim 2) is {entry} but kv_lora_rank + pe_dim = {r} + {p} = {r + p}")
    if kind == "auto":
        if kv_cache.dtype != kv_c.dtype:
            raise TypeError(
                f"kv_cache_dtype={kv_cache_dtype!r} copies bytes: kv_cache dtype {kv_cache.dtype} must equal kv_c dtype "
                f"{kv_c.dtype}"
            )
        if kv_c.dtype not in _AUTO_DTYPES:
            raise TypeError(f"kv_c dtype must be one of {_AUTO_DTYPES} for {kv_cache_dtype!r}, got {kv_c.dtype}")
        return kind, n
    if kv_cache.dtype not in _BYTE_DTYPES:
        raise TypeError(f"kv_cache for {kv_cache_dtype!r} must be uint8 or float8_e4m3fn (e4m3 bytes), got {kv_cache.dtype}")
    if kv_c.dtype not in fp8.PER_TENSOR_SOURCE_DTYPES:
        raise TypeError(f"kv_c dtype must be one of {fp8.PER_TENSOR_SOURCE_DTYPES} for {kv_cache_dtype!r}, got {kv_c.dtype}")
    if not skip_scale:
        _check_scale(scale, kv_cache.device)
    return kind, n


# ---- concat_and_cache_mla ------------------------------------------------------------------


def _concat_impl(kv_c, k_pe, kv_cache, slot_mapping, kv_cache_dtype, scale, skip_scale=False) -> None:
    kind, n = _check_concat(kv_c, k_pe, kv_cache, slot_mapping, kv_cache_dtype, scale, skip_scale)
    if n == 0:
        return
    rows, rpb = paged_rows(kv_cache)
    loc = slot_rows(slot_mapping, kv_cache.shape[1], rpb)
    nope, rope = kv_c[:n], k_pe[:n]
    if kind == "auto":
        set_mla_kv_buffer_triton(rows, loc, nope, rope)
    elif kind == "fp8":
        k_scale = 1.0 if skip_scale else _check_scale(scale, kv_cache.device)
        fp8.set_mla_kv_buffer_quant(rows, loc, nope, rope, "per_tensor", k_scale)
    else:
        if rope.shape[1] == 0:  # vLLM's NoPE rows: the rope tail is written as zeros
            rope = nope.new_zeros((1, _DS_ROPE)).expand(n, _DS_ROPE)
        fp8.set_mla_kv_buffer_quant(
            rows.view(torch.uint8), loc, nope, rope, "ds_mla", None, ds_mla_scale_rule=_DS_MLA_SCALE_RULE
        )


def _concat_fake(kv_c, k_pe, kv_cache, slot_mapping, kv_cache_dtype, scale, skip_scale=False) -> None:
    _check_concat(kv_c, k_pe, kv_cache, slot_mapping, kv_cache_dtype, scale, skip_scale)


# ---- the gathers ----------------------------------------------------------------------------


def gather_plan(
    block_table: torch.Tensor,
    starts: torch.Tensor,
    num_reqs: int,
    total: int,
    block_size: int,
    num_blocks: int,
    seq_starts: Optional[torch.Tensor] = None,
    terminal: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which cache slot each output token reads: ``(slot [total] int64, valid [total] bool)``.

    vLLM's request layout: request ``r`` owns output rows ``[min(starts[r], total), min(end_r,
    total))`` with ``end_r = starts[r + 1]`` (``terminal``: ``starts`` has ``num_reqs + 1`` entries,
    a ``cu_seq_lens``) or, without a terminal entry (``workspace_starts``), the next request's start
    and ``total`` for the last one. Its ``j``-th row reads logical position ``p = seq_starts[r] + j``
    (``seq_starts`` None: ``j``): block ``block_table[r, p // block_size]``, offset ``p %
    block_size``, i.e. slot ``block * block_size + offset``. A row no request owns, or whose logical
    block is past ``block_table``'s columns or whose block id is outside ``[0, num_blocks)``, is not
    valid (``slot = -1``): the ops leave it untouched. Requests must start in non-decreasing order
    (the gathers check it on the CPU). Runs on ``block_table``'s device without a sync: one Triton
    launch on the GPU (:func:`mlakv.kernels.triton.paged_plan.launch_token_slots`), plain torch on
    the CPU (the reference it is tested against).
    """
    dev = block_table.device
    if block_table.is_cuda and num_reqs and total and block_table.shape[1]:
        from mlakv.kernels.triton.paged_plan import launch_token_slots

        slot = launch_token_slots(
            TokenSlotPlan(block_table, starts, num_reqs, total, block_size, num_blocks, seq_starts, terminal)
        )
        return slot, slot >= 0
    t = torch.arange(total, device=dev)
    if num_reqs == 0 or total == 0 or block_table.shape[1] == 0:
        return torch.full((total,), -1, dtype=torch.int64, device=dev), torch.zeros(total, dtype=torch.bool, device=dev)
    st = starts.to(torch.int64)
    begin = st[:num_reqs].clamp(max=total)
    if terminal:
        end = st[1 : num_reqs + 1]
    else:
        end = torch.cat([st[1:num_reqs], torch.full((1,), total, dtype=torch.int64, device=dev)])
    end = end.clamp(max=total)
    req = torch.searchsorted(begin, t, right=True) - 1  # the last request starting at or before t
    r = req.clamp(0, num_reqs - 1)
    pos = t - begin[r]
    if seq_starts is not None:
        pos = pos + seq_starts.to(torch.int64)[r]
    logical = torch.div(pos, block_size, rounding_mode="floor")
    valid = (req >= 0) & (t < end[r]) & (pos >= 0) & (logical < block_table.shape[1])
    block = block_table[r, logical.clamp(0, block_table.shape[1] - 1)].to(torch.int64)
    valid &= (block >= 0) & (block < num_blocks)
    slot = torch.where(valid, block * block_size + pos % block_size, -1)
    return slot, valid


def _check_plan_values(
    block_table: torch.Tensor, starts: torch.Tensor, starts_name: str, num_reqs: int, total: int, block_size: int,
    num_blocks: int, seq_starts: Optional[torch.Tensor], terminal: bool,
) -> None:
    """CPU value checks (free there): ordered starts, non-negative seq_starts, every owned row's
    logical block inside ``block_table`` and its block id inside the cache; ``IndexError``/``ValueError``."""
    st = starts[: num_reqs + (1 if terminal else 0)].to(torch.int64)
    if st.numel() > 1 and bool((st[1:] < st[:-1]).any()):
        raise ValueError(f"{starts_name} must be non-decreasing, got {st.tolist()[:16]}")
    if st.numel() and int(st[0]) < 0:
        raise ValueError(f"{starts_name}[0] must be >= 0, got {int(st[0])}")
    if seq_starts is not None and num_reqs and bool((seq_starts[:num_reqs] < 0).any()):
        raise ValueError(f"seq_starts must be >= 0, got {seq_starts[:num_reqs].tolist()[:16]}")
    for r in range(num_reqs):
        b = min(int(st[r]), total)
        e = min(int(st[r + 1]) if r + 1 < st.numel() else total, total)
        if e <= b:
            continue
        first = int(seq_starts[r]) if seq_starts is not None else 0
        last_block = (first + e - b - 1) // block_size
        if last_block >= block_table.shape[1]:
            raise IndexError(
                f"request {r} reads logical block {last_block} but block_table has {block_table.shape[1]} columns"
            )
        ids = block_table[r, first // block_size : last_block + 1]
        bad = (ids < 0) | (ids >= num_blocks)
        if bool(bad.any()):
            j = first // block_size + int(bad.nonzero()[0, 0])
            raise IndexError(f"block_table[{r}, {j}] = {int(block_table[r, j])} is out of range for num_blocks={num_blocks}")


def _check_gather_common(src_cache, dst, block_table, starts, starts_name: str, seq_starts) -> tuple[int, int, int]:
    nb, bs, entry = _entry_shape("src_cache", src_cache)
    _tensor("dst", dst)
    if dst.dim() < 2:
        raise ValueError(f"dst must be [num_tokens, entry...] (2-D or more), got shape {tuple(dst.shape)}")
    d_entry, expect = 1, 1
    for size, stride in zip(reversed(dst.shape[1:]), reversed(dst.stride()[1:])):
        if size > 1 and stride != expect:
            raise ValueError(f"dst: the entry dims (dim 1 on) must be contiguous, got strides {tuple(dst.stride())}")
        d_entry *= size
        expect *= size
    if dst.shape[0] > 1 and dst.stride(0) < d_entry:
        raise ValueError(f"dst: rows overlap (dim 0 stride {dst.stride(0)} < entry size {d_entry})")
    _index_vector("block_table", block_table, 2)
    _index_vector(starts_name, starts)
    if seq_starts is not None:
        _index_vector("seq_starts", seq_starts)
    _same_device("src_cache", src_cache, dst=dst, block_table=block_table, **{starts_name: starts}, seq_starts=seq_starts)
    return nb, bs, entry


def _prod(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _dst_rows(dst: torch.Tensor) -> torch.Tensor:
    """``dst [T, entry...]`` as ``[T, entry]`` rows (a view)."""
    return dst if dst.dim() == 2 else dst.view(dst.shape[0], _prod(dst.shape[1:]))  # a view: entry dims are contiguous


def _span(t: torch.Tensor) -> torch.Tensor:
    """The bytes ``t`` spans (first to last element, at its strides) as one contiguous uint8 vector
    over the same storage (a view; the row copy addresses it by bytes)."""
    lo, hi = rules.byte_span(t)
    out = torch.empty(0, dtype=torch.uint8, device=t.device)
    return out.set_(t.untyped_storage(), t.storage_offset() * t.element_size(), (hi - lo,), (1,))


_PROGRAMS_PER_SM = 4


def _grid(t: torch.Tensor) -> Optional[int]:
    """The row copy's grid bound for a device-local copy: every SM (None on the CPU)."""
    return _sm_programs(t.device.index or 0) if t.is_cuda else None


@functools.lru_cache(maxsize=None)
def _sm_programs(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count * _PROGRAMS_PER_SM


def _part(src: torch.Tensor, dst: torch.Tensor, base: int, block_stride: int, slot_stride: int, unit: int):
    """A :class:`~mlakv.kernels.triton.paged_plan.GatherPart` (byte sizes) from the cache ``src``
    ``[num_blocks, block_size, ...]`` and the output rows ``dst [T, ...]``; strides of size-1 dims
    count as 0 (they address nothing, and must not narrow the copy's word)."""
    from mlakv.kernels.triton.paged_plan import GatherPart

    nb, bs = src.shape[0], src.shape[1]
    return GatherPart(
        _span(src), _span(dst), base, block_stride if nb > 1 else 0, slot_stride if bs > 1 else 0, unit,
        dst.stride(0) * dst.element_size() if dst.shape[0] > 1 else 0,
    )  # fmt: skip


def _gather_bytes(plan: TokenSlotPlan, *parts) -> None:
    """For each output row a request owns: the parts of its slot into the row (bytes); other rows
    untouched. The GPU: one fused launch (plan and copy,
    :func:`~mlakv.kernels.triton.paged_plan.launch_paged_gather`); the CPU: the torch plan and an
    index copy per part."""
    if plan.block_table.is_cuda:
        from mlakv.kernels.triton.paged_plan import launch_paged_gather

        launch_paged_gather(plan, *parts)
        return
    slot, valid = gather_plan(*plan)
    rows = valid.nonzero().flatten()
    block, off = slot[rows] // plan.block_size, slot[rows] % plan.block_size
    nb, bs = plan.num_blocks, plan.block_size
    for p in parts:  # strided byte views: the gathered rows are the only copy made
        src = torch.as_strided(p.src, (nb, bs, p.unit), (p.block_stride, p.slot_stride, 1), p.src.storage_offset() + p.base)
        dst = torch.as_strided(p.dst, (plan.total, p.unit), (p.row_stride, 1))
        dst[rows] = src[block, off]


def _source_rows(plan: TokenSlotPlan, rows_per_block: int) -> torch.Tensor:
    """Each output row's source row of the cache's :func:`paged_rows` view, ``-1`` where no request
    owns it (one launch on the GPU)."""
    if plan.block_table.is_cuda:
        from mlakv.kernels.triton.paged_plan import launch_token_slots

        return launch_token_slots(plan, rows_per_block)
    slot, _ = gather_plan(*plan)
    return slot_rows(slot, plan.block_size, rows_per_block)


def _check_gmd(src_cache, dst, block_table, cu_seq_lens, token_to_seq, num_tokens, kv_cache_dtype, scale, seq_starts):
    kind = _kind(kv_cache_dtype, ("auto", "fp8"))
    nb, bs, entry = _check_gather_common(src_cache, dst, block_table, cu_seq_lens, "cu_seq_lens", seq_starts)
    _tensor("token_to_seq", token_to_seq)
    n = rules.check_int_arg(num_tokens, "num_tokens", 0)
    if n > dst.shape[0]:
        raise ValueError(f"num_tokens={n} exceeds dst's {dst.shape[0]} rows (dim 0)")
    d_entry = _prod(dst.shape[1:])
    if d_entry > entry:
        raise ValueError(f"dst: entry size {d_entry} exceeds src_cache's entry size {entry} (dim 2)")
    if kind == "auto":
        if src_cache.dtype != dst.dtype:
            raise TypeError(f"kv_cache_dtype={kv_cache_dtype!r} copies bytes: src_cache dtype {src_cache.dtype} must equal dst dtype {dst.dtype}")
    else:
        if src_cache.dtype not in _BYTE_DTYPES:
            raise TypeError(f"src_cache for {kv_cache_dtype!r} must be uint8 or float8_e4m3fn, got {src_cache.dtype}")
        if dst.dtype not in fp8.DEQUANT_DTYPES:
            raise TypeError(f"dst dtype must be one of {fp8.DEQUANT_DTYPES} to dequantize into, got {dst.dtype}")
        _check_scale(scale, src_cache.device)
    return kind, n, nb, bs, d_entry


def _gmd_impl(src_cache, dst, block_table, cu_seq_lens, token_to_seq, num_tokens, kv_cache_dtype, scale, seq_starts=None) -> None:
    kind, n, nb, bs, entry = _check_gmd(
        src_cache, dst, block_table, cu_seq_lens, token_to_seq, num_tokens, kv_cache_dtype, scale, seq_starts
    )
    num_reqs = max(cu_seq_lens.shape[0] - 1, 0)
    if n == 0 or num_reqs == 0:
        return
    if not src_cache.is_cuda:
        _check_plan_values(block_table, cu_seq_lens, "cu_seq_lens", num_reqs, n, bs, nb, seq_starts, True)
    plan = TokenSlotPlan(block_table, cu_seq_lens, num_reqs, n, bs, nb, seq_starts, True)
    rows = _dst_rows(dst)
    if kind == "auto":
        es = src_cache.element_size()
        _gather_bytes(plan, _part(src_cache, rows, 0, src_cache.stride(0) * es, src_cache.stride(1) * es, entry * es))
        return
    cache_rows, rpb = paged_rows(src_cache, "src_cache")
    head = 1 << (entry.bit_length() - 1)  # elementwise: any split; two power-of-two-ish blocks waste no lanes
    fp8.get_mla_kv_buffer_dequant(
        cache_rows, _source_rows(plan, rpb), "per_tensor", head, entry - head, _check_scale(scale, src_cache.device),
        dst.dtype, out=(rows[:n, :head], rows[:n, head:entry]), skip_invalid=True,
    )  # fmt: skip


def _gmd_fake(src_cache, dst, block_table, cu_seq_lens, token_to_seq, num_tokens, kv_cache_dtype, scale, seq_starts=None) -> None:
    _check_gmd(src_cache, dst, block_table, cu_seq_lens, token_to_seq, num_tokens, kv_cache_dtype, scale, seq_starts)


def _check_cp_gather(src_cache, dst, block_table, cu_seq_lens, batch_size, seq_starts):
    nb, bs, entry = _check_gather_common(src_cache, dst, block_table, cu_seq_lens, "cu_seq_lens", seq_starts)
    b = rules.check_int_arg(batch_size, "batch_size", 0)
    if b != cu_seq_lens.shape[0] - 1:
        raise ValueError(f"batch_size={b} must match cu_seq_lens ({cu_seq_lens.shape[0]} entries = batch_size + 1)")
    if src_cache.dtype != dst.dtype:
        raise TypeError(f"src_cache dtype {src_cache.dtype} must equal dst dtype {dst.dtype} (a byte copy)")
    d_entry = _prod(dst.shape[1:])
    if d_entry != entry:
        raise ValueError(f"dst: entry size {d_entry} (dims 1 on) must equal src_cache's entry size {entry}")
    return b, nb, bs, entry


def _cp_gather_impl(src_cache, dst, block_table, cu_seq_lens, batch_size, seq_starts=None) -> None:
    b, nb, bs, entry = _check_cp_gather(src_cache, dst, block_table, cu_seq_lens, batch_size, seq_starts)
    total = dst.shape[0]
    if total == 0 or b == 0 or entry == 0:
        return
    if not src_cache.is_cuda:
        _check_plan_values(block_table, cu_seq_lens, "cu_seq_lens", b, total, bs, nb, seq_starts, True)
    es = src_cache.element_size()
    _gather_bytes(
        TokenSlotPlan(block_table, cu_seq_lens, b, total, bs, nb, seq_starts, True),
        _part(src_cache, _dst_rows(dst), 0, src_cache.stride(0) * es, src_cache.stride(1) * es, entry * es),
    )  # fmt: skip


def _cp_gather_fake(src_cache, dst, block_table, cu_seq_lens, batch_size, seq_starts=None) -> None:
    _check_cp_gather(src_cache, dst, block_table, cu_seq_lens, batch_size, seq_starts)


_UPCONVERT_SRC = (torch.uint8, torch.float8_e4m3fn, torch.float8_e5m2)


def _check_upconvert(src_cache, dst, block_table, workspace_starts, batch_size, seq_starts, host_cache, host_row_ids, device_row_ids):
    nb, bs, entry = _check_gather_common(src_cache, dst, block_table, workspace_starts, "workspace_starts", seq_starts)
    b = rules.check_int_arg(batch_size, "batch_size", 0)
    if b > workspace_starts.shape[0] or b > block_table.shape[0]:
        raise ValueError(
            f"batch_size={b} exceeds workspace_starts ({workspace_starts.shape[0]}) or block_table rows ({block_table.shape[0]})"
        )
    if seq_starts is not None and b > seq_starts.shape[0]:
        raise ValueError(f"batch_size={b} exceeds seq_starts ({seq_starts.shape[0]} entries)")
    if src_cache.dtype not in _UPCONVERT_SRC or entry != DS_MLA_ENTRY_BYTES:
        raise ValueError(
            f"src_cache must be uint8/float8 [num_blocks, block_size, {DS_MLA_ENTRY_BYTES}], got {src_cache.dtype} entry {entry}"
        )
    if dst.dtype != torch.bfloat16 or dst.dim() != 2 or dst.shape[1] != _DS_NOPE + _DS_ROPE:
        raise ValueError(f"dst must be bfloat16 [total_tokens, 576], got {dst.dtype} shape {tuple(dst.shape)}")
    given = [t is not None for t in (host_cache, host_row_ids, device_row_ids)]
    if any(given) and not all(given):
        raise ValueError("host_cache, host_row_ids and device_row_ids must be given together")
    if all(given):
        _tensor("host_cache", host_cache)
        if (
            host_cache.device.type != "cpu" or host_cache.dtype != torch.uint8 or host_cache.dim() != 2
            or not host_cache.is_contiguous() or host_cache.shape[1] != DS_MLA_ENTRY_BYTES
        ):  # fmt: skip
            raise ValueError(
                f"host_cache must be a contiguous uint8 CPU [rows, {DS_MLA_ENTRY_BYTES}] tensor, got {host_cache.dtype} "
                f"shape {tuple(host_cache.shape)} on {host_cache.device}"
            )
        for name, t in (("host_row_ids", host_row_ids), ("device_row_ids", device_row_ids)):
            _tensor(name, t)
            if t.dtype != torch.int32 or t.dim() > 2 or not t.is_contiguous():
                raise ValueError(f"{name} must be a contiguous int32 tensor (1-D or 2-D), got {t.dtype} shape {tuple(t.shape)}")
            if t.numel() < nb * bs:
                raise ValueError(f"{name} has {t.numel()} entries but src_cache has {nb * bs} slots (one per slot)")
        if host_row_ids.numel() != device_row_ids.numel():
            raise ValueError(f"host_row_ids ({host_row_ids.numel()}) and device_row_ids ({device_row_ids.numel()}) differ in size")
        _same_device("src_cache", src_cache, host_row_ids=host_row_ids, device_row_ids=device_row_ids)
    return b, nb, bs


def _upconvert_impl(src_cache, dst, block_table, workspace_starts, batch_size, seq_starts=None,
                    host_cache=None, host_row_ids=None, device_row_ids=None) -> None:  # fmt: skip
    b, nb, bs = _check_upconvert(
        src_cache, dst, block_table, workspace_starts, batch_size, seq_starts, host_cache, host_row_ids, device_row_ids
    )
    total = dst.shape[0]
    if total == 0 or b == 0:
        return
    if not src_cache.is_cuda:
        _check_plan_values(block_table, workspace_starts, "workspace_starts", b, total, bs, nb, seq_starts, False)
    plan = TokenSlotPlan(block_table, workspace_starts, b, total, bs, nb, seq_starts, False)
    if host_cache is not None:
        slot, valid = gather_plan(*plan)
        cache_rows, loc, valid = _resident_and_host_rows(src_cache, slot, valid, host_cache, host_row_ids, device_row_ids)
    else:
        cache_rows, rpb = paged_rows(src_cache.view(torch.uint8), "src_cache")
        loc = _source_rows(plan, rpb)
    fp8.get_mla_kv_buffer_dequant(
        cache_rows, loc, "ds_mla", _DS_NOPE, _DS_ROPE, None, torch.bfloat16,
        out=(dst[:, :_DS_NOPE], dst[:, _DS_NOPE:]), skip_invalid=True,
    )  # fmt: skip


def _copy_units(src, dst, src_idx, dst_idx, unit: int, src_layout, dst_layout, skip_dst: bool = False) -> None:
    """:func:`~mlakv.ops.custom_ops.copy_rows` where a negative ``src_idx`` (``skip_dst``: ``dst_idx``)
    means "no copy": skipped by the GPU kernel; left out first on the CPU (whose copy refuses it)."""
    if not (src.is_cuda or dst.is_cuda):
        keep = ((dst_idx if skip_dst else src_idx) >= 0).nonzero().flatten()
        src_idx, dst_idx = src_idx[keep], dst_idx[keep]
    copy_rows(src, dst, src_idx, dst_idx, unit, src_layout, dst_layout, max_programs=_grid(dst))


def _resident_and_host_rows(src_cache, slot, valid, host_cache, host_row_ids, device_row_ids):
    """vLLM's remapped rows: slot ``s`` reads cache slot ``device_row_ids[s]`` when that is ``>= 0``,
    else row ``host_row_ids[s]`` of the pinned ``host_cache``. Both kinds are first copied (the HiCache
    row copy; host rows read in place) into a device scratch of ``[total, 656]`` stored rows; returns
    ``(scratch, loc into it, valid)``. A remapped row outside its buffer is not valid (CPU: ``IndexError``)."""
    total, nb, bs = slot.shape[0], src_cache.shape[0], src_cache.shape[1]
    dev = slot.device
    if src_cache.is_cuda and not host_cache.is_pinned():
        raise ValueError("host_cache is CPU memory that is not pinned: the GPU copy reads host memory in place (pin_memory())")
    s = slot.clamp(min=0)
    drow = torch.where(valid, device_row_ids.reshape(-1)[s].to(torch.int64), -1)
    hrow = torch.where(valid & (drow < 0), host_row_ids.reshape(-1)[s].to(torch.int64), -1)
    d_ok = (drow >= 0) & (drow < nb * bs)
    h_ok = (hrow >= 0) & (hrow < host_cache.shape[0])
    if not src_cache.is_cuda:
        bad = valid & ~(d_ok | h_ok)
        if bool(bad.any()):
            t = int(bad.nonzero()[0, 0])
            raise IndexError(f"output row {t}: its remapped row (device {int(drow[t])}, host {int(hrow[t])}) is out of range")
    scratch = torch.empty(total, DS_MLA_ENTRY_BYTES, dtype=torch.uint8, device=dev)
    out = torch.arange(total, device=dev)
    es = src_cache.element_size()
    row_layout = (1, DS_MLA_ENTRY_BYTES, 0)
    _copy_units(
        _span(src_cache), scratch, torch.where(d_ok, drow, -1), out, DS_MLA_ENTRY_BYTES,
        (bs, src_cache.stride(0) * es, src_cache.stride(1) * es), row_layout,
    )  # fmt: skip
    _copy_units(host_cache, scratch, torch.where(h_ok, hrow, -1), out, DS_MLA_ENTRY_BYTES, row_layout, row_layout)
    ok = valid & (d_ok | h_ok)
    return scratch, torch.where(ok, out, -1), ok


def _upconvert_fake(src_cache, dst, block_table, workspace_starts, batch_size, seq_starts=None,
                    host_cache=None, host_row_ids=None, device_row_ids=None) -> None:  # fmt: skip
    _check_upconvert(src_cache, dst, block_table, workspace_starts, batch_size, seq_starts, host_cache, host_row_ids, device_row_ids)


# ---- swap_blocks ----------------------------------------------------------------------------


def _check_swap(src, dst, block_size_in_bytes, block_mapping) -> int:
    _tensor("src", src)
    _tensor("dst", dst)
    bsb = rules.check_int_arg(block_size_in_bytes, "block_size_in_bytes", 1)
    _tensor("block_mapping", block_mapping)
    if block_mapping.dim() != 2 or block_mapping.shape[1] != 2:
        raise ValueError(f"block_mapping must be [num_pairs, 2], got shape {tuple(block_mapping.shape)}")
    if block_mapping.dtype != torch.int64:
        raise TypeError(f"block_mapping must be int64, got {block_mapping.dtype}")
    if block_mapping.device.type != "cpu":
        raise ValueError(f"block_mapping must be on the CPU (read on the host), got {block_mapping.device}")
    if src.is_cuda and dst.is_cuda and src.device != dst.device:
        raise ValueError(f"src and dst must be on the same GPU, got {src.device} and {dst.device}")
    for name, t in (("src", src), ("dst", dst)):
        if t.device.type not in ("cpu", "cuda"):
            raise ValueError(f"{name} must be a CPU or CUDA tensor, got {t.device}")
        if t.numel() and t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"{name}: the last dim must be contiguous (stride 1), got strides {tuple(t.stride())}")
    return bsb


def _swap_impl(src, dst, block_size_in_bytes, block_mapping) -> None:
    bsb = _check_swap(src, dst, block_size_in_bytes, block_mapping)
    m = block_mapping.shape[0]
    if m == 0:
        return
    gpu = src.device if src.is_cuda else dst.device
    for name, t in (("src", src), ("dst", dst)):
        if gpu.type == "cuda" and not t.is_cuda and not t.is_pinned():
            raise ValueError(f"{name} is CPU memory that is not pinned: the GPU copy reads host memory in place (pin_memory())")
    s_span, d_span = _span(src), _span(dst)
    for col, name, span in ((0, "src", s_span), (1, "dst", d_span)):
        blocks = block_mapping[:, col]
        bad = (blocks < 0) | ((blocks + 1) * bsb > span.numel())
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise IndexError(
                f"block_mapping[{i}, {col}] = {int(blocks[i])}: a {bsb}-byte block outside {name} ({span.numel()} bytes)"
            )
    if torch.unique(block_mapping[:, 1]).numel() != m:
        raise ValueError("block_mapping: a destination block appears twice (the copies run concurrently)")
    idx = block_mapping.to(gpu) if gpu.type == "cuda" else block_mapping
    layout = (1, bsb, 0)
    # GPU <-> GPU: every SM; a host side: the transfer's own SM budget (it overlaps compute, as vLLM's copy engine does)
    grid = _grid(src) if src.is_cuda and dst.is_cuda else None
    copy_rows(s_span, d_span, idx[:, 0], idx[:, 1], bsb, layout, layout, max_programs=grid)


def _swap_fake(src, dst, block_size_in_bytes, block_mapping) -> None:
    _check_swap(src, dst, block_size_in_bytes, block_mapping)


# ---- the DSA indexer K cache ----------------------------------------------------------------

_IDX_DIM, _IDX_PAGE = rules.INDEX_HEAD_DIM, rules.INDEX_PAGE_TOKENS
_IDX_ENTRY = _IDX_DIM + 4  # vLLM's cache_stride for quant_block_size 128: 128 key bytes + one fp32 scale
_SCALE_FMT = {"ue8m0": "ue8m0", "mxfp8": "ue8m0"}  # any other string: vLLM's fp32 scale


def _check_index_cache(kv_cache: object) -> int:
    """vLLM's indexer cache ``[num_blocks, block_size, 132]`` uint8, each block contiguous (``block_size``
    keys of 128 e4m3 bytes, then ``block_size`` fp32 scales); returns ``block_size``."""
    _tensor("kv_cache", kv_cache)
    if kv_cache.dim() != 3 or kv_cache.shape[2] != _IDX_ENTRY or kv_cache.dtype != torch.uint8 or kv_cache.shape[1] < 1:
        raise ValueError(
            f"kv_cache must be uint8 [num_blocks, block_size, {_IDX_ENTRY}] (head_dim 128, quant_block_size 128), "
            f"got {kv_cache.dtype} shape {tuple(kv_cache.shape)}"
        )
    bs = kv_cache.shape[1]
    if kv_cache.stride(2) != 1 or (bs > 1 and kv_cache.stride(1) != _IDX_ENTRY) or (
        kv_cache.shape[0] > 1 and kv_cache.stride(0) < bs * _IDX_ENTRY
    ):
        raise ValueError(f"kv_cache: each block must be contiguous bytes, got strides {tuple(kv_cache.stride())}")
    return bs


def _block_stride(kv_cache: torch.Tensor) -> int:
    return kv_cache.stride(0) if kv_cache.shape[0] > 1 else kv_cache.shape[1] * _IDX_ENTRY


def _as_index_pages(kv_cache: torch.Tensor) -> Optional[torch.Tensor]:
    """mlakv's ``[num_pages, 8448]`` page view of a ``block_size == 64`` cache whose blocks start on
    16 bytes (the fused store's rule), else None."""
    s0 = _block_stride(kv_cache)
    if kv_cache.shape[1] != _IDX_PAGE or (kv_cache.data_ptr() | s0) % 16:
        return None
    return torch.as_strided(kv_cache, (kv_cache.shape[0], rules.INDEX_PAGE_BYTES), (s0, 1), kv_cache.storage_offset())


def _check_index_store(k, kv_cache, slot_mapping, quant_block_size, kv_cache_dtype) -> str:
    _tensor("k", k)
    if k.dim() != 2 or k.shape[1] != _IDX_DIM:
        raise ValueError(f"k must be [num_tokens, {_IDX_DIM}], got shape {tuple(k.shape)}")
    _check_index_cache(kv_cache)
    _index_vector("slot_mapping", slot_mapping)
    if slot_mapping.shape[0] != k.shape[0]:
        raise ValueError(f"slot_mapping has {slot_mapping.shape[0]} entries but k has num_tokens={k.shape[0]} rows")
    if rules.check_int_arg(quant_block_size, "quant_block_size", 1) != _IDX_DIM:
        raise ValueError(f"quant_block_size must be {_IDX_DIM} (one scale per key), got {quant_block_size}")
    if not isinstance(kv_cache_dtype, str):
        raise TypeError(f"kv_cache_dtype (the scale format) must be a str, got {type(kv_cache_dtype).__name__}")
    _same_device("kv_cache", kv_cache, k=k, slot_mapping=slot_mapping)
    return _SCALE_FMT.get(kv_cache_dtype, "fp32")


def _copy_to_slots(src: torch.Tensor, kv_cache: torch.Tensor, slot: torch.Tensor, unit: int, offset: int) -> None:
    """Row ``i`` of ``src [n, unit]`` (bytes) to slot ``slot[i]`` of the cache's per-block array that
    starts ``offset`` bytes into each block (``unit`` bytes a slot); negative slots skipped."""
    bs = kv_cache.shape[1]
    span = _span(kv_cache)[offset:]
    idx = torch.arange(src.shape[0], device=src.device)
    _copy_units(src, span, idx, slot, unit, (1, unit, 0), (bs, _block_stride(kv_cache), unit), skip_dst=True)


def _index_store_impl(k, kv_cache, slot_mapping, quant_block_size, kv_cache_dtype) -> None:
    from mlakv.ops.indexer import set_index_k_buffer
    from mlakv.ops.indexer_reference import quantize_index_k

    rule = _check_index_store(k, kv_cache, slot_mapping, quant_block_size, kv_cache_dtype)
    n = k.shape[0]
    if n == 0:
        return
    bs = kv_cache.shape[1]
    pages = _as_index_pages(kv_cache)
    if pages is not None:  # mlakv's page: the fused store (one launch)
        set_index_k_buffer(pages, slot_mapping, k, scale_rule=rule)
        if kv_cache_dtype == "mxfp8":
            _copy_to_slots(_mx_bytes(k), kv_cache, slot_mapping.to(torch.int64), 4, bs * _IDX_DIM)
        return
    # another block size: the reference quantizer on the device, then the row copy of keys and scales
    if not kv_cache.is_cuda:
        rules.check_loc_bounds(slot_mapping, kv_cache.shape[0] * bs)
    q, scale = quantize_index_k(k, rule)
    sb = _mx_bytes(k) if kv_cache_dtype == "mxfp8" else scale.view(torch.uint8).reshape(n, 4)
    slot = slot_mapping.to(torch.int64)
    _copy_to_slots(q.contiguous(), kv_cache, slot, _IDX_DIM, 0)
    _copy_to_slots(sb.contiguous(), kv_cache, slot, 4, bs * _IDX_DIM)


def _mx_bytes(k: torch.Tensor) -> torch.Tensor:
    """vLLM's ``mxfp8`` scale word of each key: its UE8M0 exponent byte four times, ``[n, 4]`` uint8."""
    from mlakv.ops.indexer_reference import index_k_scales

    e = (index_k_scales(k, "ue8m0").view(torch.int32) >> 23) & 0xFF
    return e.to(torch.uint8)[:, None].expand(-1, 4).contiguous()


def _index_store_fake(k, kv_cache, slot_mapping, quant_block_size, kv_cache_dtype) -> None:
    _check_index_store(k, kv_cache, slot_mapping, quant_block_size, kv_cache_dtype)


def _check_index_gather(kv_cache, dst_k, dst_scale, block_table, cu_seq_lens) -> None:
    _check_index_cache(kv_cache)
    for name, t, width in (("dst_k", dst_k, _IDX_DIM), ("dst_scale", dst_scale, 4)):
        _tensor(name, t)
        if t.dim() != 2 or t.shape[1] != width or t.element_size() != 1 or (t.shape[1] > 1 and t.stride(1) != 1):
            raise ValueError(
                f"{name} must be a 1-byte dtype [num_tokens, {width}] with a contiguous last dim, got {t.dtype} "
                f"shape {tuple(t.shape)} strides {tuple(t.stride())}"
            )
        if t.shape[0] > 1 and t.stride(0) < width:
            raise ValueError(f"{name}: rows overlap (dim 0 stride {t.stride(0)} < {width})")
    if dst_scale.shape[0] != dst_k.shape[0]:
        raise ValueError(f"dst_scale has {dst_scale.shape[0]} rows but dst_k has {dst_k.shape[0]}")
    _index_vector("block_table", block_table, 2)
    _index_vector("cu_seq_lens", cu_seq_lens)
    if cu_seq_lens.shape[0] != block_table.shape[0] + 1:
        raise ValueError(f"cu_seq_lens has {cu_seq_lens.shape[0]} entries but block_table has {block_table.shape[0]} rows (+1)")
    _same_device("kv_cache", kv_cache, dst_k=dst_k, dst_scale=dst_scale, block_table=block_table, cu_seq_lens=cu_seq_lens)


def _index_gather_impl(kv_cache, dst_k, dst_scale, block_table, cu_seq_lens) -> None:
    _check_index_gather(kv_cache, dst_k, dst_scale, block_table, cu_seq_lens)
    total, b = dst_k.shape[0], block_table.shape[0]
    if total == 0 or b == 0:
        return
    nb, bs = kv_cache.shape[0], kv_cache.shape[1]
    if not kv_cache.is_cuda:
        _check_plan_values(block_table, cu_seq_lens, "cu_seq_lens", b, total, bs, nb, None, True)
    s0 = _block_stride(kv_cache)
    _gather_bytes(
        TokenSlotPlan(block_table, cu_seq_lens, b, total, bs, nb, None, True),
        _part(kv_cache, dst_k, 0, s0, _IDX_DIM, _IDX_DIM),
        _part(kv_cache, dst_scale, bs * _IDX_DIM, s0, 4, 4),
    )  # fmt: skip


def _index_gather_fake(kv_cache, dst_k, dst_scale, block_table, cu_seq_lens) -> None:
    _check_index_gather(kv_cache, dst_k, dst_scale, block_table, cu_seq_lens)


# ---- convert_fp8 (vLLM's test-only conversion) ------------------------------------------------


def convert_fp8(output: torch.Tensor, input: torch.Tensor, scale: float = 1.0, kv_dtype: str = "fp8") -> None:
    """vLLM's ``convert_fp8`` (a testing helper there): e4m3 bytes <-> 16/32-bit floats, elementwise.

    ``output``/``input``: the same shape; one side uint8/float8_e4m3fn, the other bf16/fp16/fp32.
    Into bytes: ``e4m3(float(x) / scale)`` (IEEE division, RNE, saturating; mlakv's per_tensor
    quantizer); out of bytes: ``float(e4m3) * scale`` rounded to ``output``'s dtype. Plain torch,
    through :func:`mlakv.ops.fp8.quantize_mla_rows` / :func:`~mlakv.ops.fp8.dequantize_mla_rows`.
    Only ``kv_dtype`` ``"fp8"``/``"fp8_e4m3"``.
    """
    if kv_dtype not in ("fp8", "fp8_e4m3"):
        raise ValueError(f"kv_dtype must be 'fp8' or 'fp8_e4m3', got {kv_dtype!r}")
    _tensor("output", output)
    _tensor("input", input)
    if output.shape != input.shape:
        raise ValueError(f"output shape {tuple(output.shape)} must equal input shape {tuple(input.shape)}")
    k = float(torch.tensor(float(scale), dtype=torch.float32))
    d = input.shape[-1] if input.dim() else 1
    if input.dtype in _BYTE_DTYPES:
        rows = input.reshape(-1, d).view(torch.uint8)
        vals, _ = fp8.dequantize_mla_rows(rows, "per_tensor", d, 0, k, output.dtype)
        output.copy_(vals.reshape(output.shape))
        return
    if output.dtype not in _BYTE_DTYPES:
        raise TypeError(f"one of output/input must hold e4m3 bytes (uint8/float8_e4m3fn), got {output.dtype} and {input.dtype}")
    x = input.reshape(-1, d)
    q = fp8.quantize_mla_rows(x, x[:, :0], "per_tensor", k)
    output.copy_(q.view(torch.uint8).view(output.dtype).reshape(output.shape))


# ---- registration as torch library ops ------------------------------------------------------

_SCHEMAS = {
    "concat_and_cache_mla": (
        "concat_and_cache_mla(Tensor kv_c, Tensor k_pe, Tensor(a!) kv_cache, Tensor slot_mapping, str kv_cache_dtype, "
        "Tensor scale, bool skip_scale=False) -> ()",
        _concat_impl, _concat_fake, ("kv_cache",),
    ),
    "gather_and_maybe_dequant_cache": (
        "gather_and_maybe_dequant_cache(Tensor src_cache, Tensor(a!) dst, Tensor block_table, Tensor cu_seq_lens, "
        "Tensor token_to_seq, int num_tokens, str kv_cache_dtype, Tensor scale, Tensor? seq_starts) -> ()",
        _gmd_impl, _gmd_fake, ("dst",),
    ),
    "cp_gather_cache": (
        "cp_gather_cache(Tensor src_cache, Tensor(a!) dst, Tensor block_table, Tensor cu_seq_lens, int batch_size, "
        "Tensor? seq_starts) -> ()",
        _cp_gather_impl, _cp_gather_fake, ("dst",),
    ),
    "cp_gather_and_upconvert_fp8_kv_cache": (
        "cp_gather_and_upconvert_fp8_kv_cache(Tensor src_cache, Tensor(a!) dst, Tensor block_table, "
        "Tensor workspace_starts, int batch_size, Tensor? seq_starts, Tensor? host_cache=None, "
        "Tensor? host_row_ids=None, Tensor? device_row_ids=None) -> ()",
        _upconvert_impl, _upconvert_fake, ("dst",),
    ),
    "swap_blocks": (
        "swap_blocks(Tensor src, Tensor(a!) dst, int block_size_in_bytes, Tensor block_mapping) -> ()",
        _swap_impl, _swap_fake, ("dst",),
    ),
    "indexer_k_quant_and_cache": (
        "indexer_k_quant_and_cache(Tensor k, Tensor(a!) kv_cache, Tensor slot_mapping, int quant_block_size, "
        "str kv_cache_dtype) -> ()",
        _index_store_impl, _index_store_fake, ("kv_cache",),
    ),
    "cp_gather_indexer_k_quant_cache": (
        "cp_gather_indexer_k_quant_cache(Tensor kv_cache, Tensor(a!) dst_k, Tensor(b!) dst_scale, Tensor block_table, "
        "Tensor cu_seq_lens) -> ()",
        _index_gather_impl, _index_gather_fake, ("dst_k", "dst_scale"),
    ),
    "convert_fp8": (
        "convert_fp8(Tensor(a!) dst_cache, Tensor src_cache, float scale, str kv_cache_dtype) -> ()",
        lambda dst_cache, src_cache, scale, kv_cache_dtype: convert_fp8(dst_cache, src_cache, scale, kv_cache_dtype),
        lambda dst_cache, src_cache, scale, kv_cache_dtype: None, ("dst_cache",),
    ),
}

_LIBS: dict[str, torch.library.Library] = {}


def _kernel(impl, written: tuple[str, ...], names: list[str]):
    positions = [names.index(w) for w in written]

    def run(*args, **kwargs):
        impl(*args, **kwargs)
        touched = [args[i] if i < len(args) else kwargs[names[i]] for i in positions]
        torch._C._increment_version(touched)  # what the op wrote (as mlakv's other ops do)

    return run


def register_ops(namespace: str = NAMESPACE) -> object:
    """Register the ops as ``torch.ops.<namespace>.<name>`` (vLLM's schemas, fake implementations);
    returns ``torch.ops.<namespace>``. Registering a namespace twice is a no-op."""
    if namespace not in _LIBS:
        lib = torch.library.Library(namespace, "FRAGMENT")
        for name, (schema, impl, fake, written) in _SCHEMAS.items():
            arg_names = [a.strip().split(" ")[-1].split("=")[0] for a in schema.split("(", 1)[1].rsplit(") ->", 1)[0].split(",")]
            lib.define(schema)
            lib.impl(name, _kernel(impl, written, arg_names), "CompositeExplicitAutograd")
            torch.library.register_fake(f"{namespace}::{name}", fake, lib=lib)
        _LIBS[namespace] = lib
    return getattr(torch.ops, namespace)


_OPS = register_ops()


# ---- vLLM's _custom_ops functions (each calls its op, as vLLM's do) ---------------------------


def concat_and_cache_mla(
    kv_c: torch.Tensor,
    k_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_cache_dtype: str,
    scale: torch.Tensor,
    skip_scale: bool = False,
) -> None:
    """Write ``[kv_c | k_pe]`` of token ``i`` into ``kv_cache`` at slot ``slot_mapping[i]`` (vLLM's op).

    Args:
        kv_c: ``[num_tokens_or_more, kv_lora_rank]``; k_pe: ``[num_tokens_or_more, pe_dim]`` (same
            dtype); only the first ``num_tokens = slot_mapping.shape[0]`` rows are written.
        kv_cache: ``[num_blocks, block_size, entry]``; slot ``s`` is block ``s // block_size``,
            offset ``s % block_size``. ``"auto"``: kv_c's dtype, ``entry = kv_lora_rank + pe_dim``
            (bytes copied). ``"fp8"``/``"fp8_e4m3"``: uint8/float8_e4m3fn, the same entry,
            ``e4m3(x / scale)`` (sources bf16/fp16/fp32). ``"fp8_ds_mla"``: 656-byte entries
            (kv_lora_rank 512, pe_dim 64 or 0, bf16 sources): 4 tiles of 128 e4m3 values with
            power-of-two fp32 scales, then the rope as bf16 (zeros for pe_dim 0).
        slot_mapping: ``[num_tokens]`` int64 (or int32); ``< 0`` is padding (skipped).
        kv_cache_dtype: one of :data:`KV_CACHE_DTYPES` ("float16"/"bfloat16" mean "auto").
        scale: 1-element fp32 tensor on the cache's device (fp8 only; ``skip_scale``: 1.0 is used).
    """
    _OPS.concat_and_cache_mla(kv_c, k_pe, kv_cache, slot_mapping, kv_cache_dtype, scale, skip_scale)


def gather_and_maybe_dequant_cache(
    src_cache: torch.Tensor,
    dst: torch.Tensor,
    block_table: torch.Tensor,
    cu_seq_lens: torch.Tensor,
    token_to_seq: torch.Tensor,
    num_tokens: int,
    kv_cache_dtype: str,
    scale: torch.Tensor,
    seq_starts: Optional[torch.Tensor] = None,
) -> None:
    """Gather requests' cache entries into rows of ``dst``, dequantizing fp8 (vLLM's op).

    Args:
        src_cache: ``[num_blocks, block_size, entry]``; dst: ``[rows >= num_tokens, head_dim]``,
            ``head_dim <= entry`` (the first ``head_dim`` values of each entry are read).
        block_table: ``[num_reqs, max_blocks]`` int32; cu_seq_lens: ``[num_reqs + 1]`` int32.
        token_to_seq: accepted and unused (vLLM 0.33's kernel ignores it too).
        num_tokens: rows ``[0, num_tokens)`` of dst are the output (rows no request owns keep their bytes).
        kv_cache_dtype: ``"auto"`` (dst dtype == src_cache dtype; bytes copied) or ``"fp8"``/
            ``"fp8_e4m3"`` (uint8 cache; dst bf16/fp16/fp32 = ``float(e4m3) * scale``, rounded).
        scale: 1-element fp32 tensor (fp8). seq_starts: ``[num_reqs]`` int32, request ``r``'s first
            logical position (None: 0). See :func:`gather_plan` for the row mapping.
    """
    _OPS.gather_and_maybe_dequant_cache(
        src_cache, dst, block_table, cu_seq_lens, token_to_seq, operator.index(num_tokens), kv_cache_dtype, scale, seq_starts
    )


def cp_gather_cache(
    src_cache: torch.Tensor,
    dst: torch.Tensor,
    block_table: torch.Tensor,
    cu_seq_lens: torch.Tensor,
    batch_size: int,
    seq_starts: Optional[torch.Tensor] = None,
) -> None:
    """Copy requests' cache entries (bytes, any dtype) into rows of ``dst`` (vLLM's op).

    ``src_cache [num_blocks, block_size, entry...]``, ``dst [total_tokens, entry...]`` of the same
    dtype and entry size; ``cu_seq_lens [batch_size + 1]``, ``block_table [batch_size, max_blocks]``,
    ``seq_starts [batch_size]`` (a start offset that need not be block aligned), all int32.
    """
    _OPS.cp_gather_cache(src_cache, dst, block_table, cu_seq_lens, operator.index(batch_size), seq_starts)


def cp_gather_and_upconvert_fp8_kv_cache(
    src_cache: torch.Tensor,
    dst: torch.Tensor,
    block_table: torch.Tensor,
    workspace_starts: torch.Tensor,
    batch_size: int,
    seq_starts: Optional[torch.Tensor] = None,
    host_cache: Optional[torch.Tensor] = None,
    host_row_ids: Optional[torch.Tensor] = None,
    device_row_ids: Optional[torch.Tensor] = None,
) -> None:
    """Gather ``fp8_ds_mla`` entries and upconvert them to bf16 rows ``[total_tokens, 576]`` (vLLM's op).

    ``src_cache [num_blocks, block_size, 656]`` uint8/float8; ``dst [total_tokens, 576]`` bf16:
    nope = ``bf16(e4m3 * tile_scale)``, rope = the stored bf16. Request ``r`` fills rows
    ``[workspace_starts[r], workspace_starts[r + 1])`` (the last up to ``total_tokens``) from logical
    position ``seq_starts[r]`` on. With ``host_cache [rows, 656]`` (pinned CPU uint8), ``host_row_ids`` and
    ``device_row_ids`` (int32, one entry per cache slot ``block * block_size + offset``, on the
    cache's device), slot ``s`` is read from cache slot ``device_row_ids[s]`` when that is ``>= 0``
    and from ``host_cache[host_row_ids[s]]`` otherwise.
    """
    _OPS.cp_gather_and_upconvert_fp8_kv_cache(
        src_cache, dst, block_table, workspace_starts, operator.index(batch_size), seq_starts,
        host_cache, host_row_ids, device_row_ids,
    )  # fmt: skip


def swap_blocks(src: torch.Tensor, dst: torch.Tensor, block_size_in_bytes: int, block_mapping: torch.Tensor) -> None:
    """Copy block ``block_mapping[i, 0]`` of ``src`` to block ``block_mapping[i, 1]`` of ``dst`` (vLLM's op).

    Block ``b`` is bytes ``[b * block_size_in_bytes, (b + 1) * block_size_in_bytes)`` from each
    tensor's first byte. ``block_mapping [num_pairs, 2]`` int64 on the CPU. GPU <-> GPU (one device)
    and GPU <-> pinned CPU memory run as one kernel (mlakv's HiCache row copy); CPU <-> CPU is a torch
    copy (vLLM refuses it).
    """
    _OPS.swap_blocks(src, dst, operator.index(block_size_in_bytes), block_mapping)


def indexer_k_quant_and_cache(
    k: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor, quant_block_size: int, kv_cache_dtype: str
) -> None:
    """Quantize DSA indexer keys and store them with their scales at ``slot_mapping`` (vLLM's op).

    ``k [num_tokens, 128]`` bf16/fp16; ``kv_cache [num_blocks, block_size, 132]`` uint8 (per block:
    ``block_size`` keys of 128 e4m3 bytes, then their fp32 scales; with ``block_size`` 64 that is
    mlakv's ``[num_pages, 8448]`` indexer page and the store is one fused launch, otherwise the
    reference quantizer on the device and two row copies);
    ``slot_mapping [num_tokens]`` (``< 0`` skipped); ``quant_block_size`` 128; ``kv_cache_dtype``
    is the scale format: ``"ue8m0"`` (power-of-two scales, bit-exact with vLLM), ``"mxfp8"`` (the
    same keys; each scale stored as its UE8M0 exponent byte four times) or anything else for the
    fp32 scale ``max(amax, 1e-4) / 448`` (mlakv quantizes ``x * (1 / scale)`` where vLLM divides:
    see docs/vllm.md).
    """
    _OPS.indexer_k_quant_and_cache(k, kv_cache, slot_mapping, operator.index(quant_block_size), kv_cache_dtype)


def cp_gather_indexer_k_quant_cache(
    kv_cache: torch.Tensor, dst_k: torch.Tensor, dst_scale: torch.Tensor, block_table: torch.Tensor, cu_seq_lens: torch.Tensor
) -> None:
    """Gather requests' indexer keys and scales into ``dst_k [T, 128]`` / ``dst_scale [T, 4]`` (bytes; vLLM's op).

    Request ``b`` fills rows ``[cu_seq_lens[b], cu_seq_lens[b + 1])``; token ``j`` of it is slot
    ``j % block_size`` of block ``block_table[b, j // block_size]``. Rows no request owns (at or past
    ``cu_seq_lens[-1]``) keep their bytes. Two row copies (keys, scales), no temporary.
    """
    _OPS.cp_gather_indexer_k_quant_cache(kv_cache, dst_k, dst_scale, block_table, cu_seq_lens)
