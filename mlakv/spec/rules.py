"""The rule book of the KV-row write: which arguments are valid, and which layouts the JIT kernel takes.

Every path that decides validity reads it from here: the dispatcher
(:mod:`mlakv.ops.dispatch`), the JIT entry (:mod:`mlakv.kernels.cuda.row_write`), the pool, the
host pool, the storages, the move and the FP8 write. The CUDA launcher keeps its own copy of the
memory-safety checks (it must not trust its caller); ``tests/test_rules.py`` walks a table of layouts
through both and asserts they accept and refuse the same ones. This module imports nothing of
mlakv, so it can be imported from either package without a cycle.

The rules (shapes: ``kv_buffer [num_slots, (1,) total]``, ``loc [n_loc]``,
``cache_k_nope [n_loc, (1,) nope_dim]``, ``cache_k_rope [n_loc, (1,) rope_dim]``):

* all four are tensors; the three data tensors are 2-D, or 3-D with a middle dim of 1;
* their last dim is contiguous (stride 1) unless it holds at most one element;
* ``kv_buffer`` rows do not overlap: ``num_slots <= 1`` or ``stride(0) >= total``;
* ``kv_buffer``'s dtype is one of :data:`SUPPORTED_DTYPES`; each source has that dtype, or both it and
  ``kv_buffer`` are 16/32-bit floats (:data:`FLOAT_DTYPES`): that source is converted inside the write
  (round to nearest even, as ``Tensor.to``). Nothing else is cast: byte/fp8 buffers and integer
  sources take only their own dtype; ``loc`` int32/int64;
* one device for all four; ``cache_k_nope``/``cache_k_rope`` have ``n_loc`` rows;
* ``nope_dim + rope_dim <= total``; ``rope_dim`` may be 0.

Any strides otherwise are honoured on every path: ``loc`` is read as ``loc[i * loc.stride(0)]``
(strided, expanded stride-0 and storage-offset vectors included), source rows at their row stride,
``kv_buffer`` rows at theirs. Kernels never write outside ``kv_buffer``: a slot ``>= num_slots`` is
refused with ``IndexError`` when bounds are checked (always on CPU) and skipped otherwise.

The fused RoPE write (:mod:`mlakv.ops.rope_write`) has its section at the end: the same row rules
for the cache and its sources, plus ``positions`` and ``cos_sin_cache`` and the optional query.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch

__all__ = [
    "SUPPORTED_DTYPES",
    "LOC_DTYPES",
    "FLOAT_DTYPES",
    "source_dtype_ok",
    "rows_ok",
    "kv_write_ok",
    "explain_kv_write",
    "check_rows_tensor",
    "check_index_tensor",
    "check_loc",
    "check_row_selection",
    "check_dcp",
    "check_loc_bounds",
    "vec_width",
    "jit_widths_reason",
    "jit_layout_reason",
    "check_int_arg",
    "check_token_slots",
    "check_gather",
    "check_copy_rows",
    "copy_rows_bad_unit",
    "byte_span",
    "tensors_overlap",
    "storage_span",
    "source_aliases",
    "DS_MLA_SCALE_RULES",
    "DS_MLA_UE8M0_FLOOR",
    "check_ds_mla_scale_rule",
    "INDEX_HEAD_DIM",
    "INDEX_PAGE_TOKENS",
    "INDEX_PAGE_BYTES",
    "INDEX_SOURCE_DTYPES",
    "INDEX_SCALE_RULES",
    "INDEX_E4M3_MAX",
    "INDEX_AMAX_FLOOR",
    "check_index_pages",
    "index_store_ok",
    "explain_index_store",
    "check_index_scale_rule",
    "check_index_gather",
    "check_index_gather_values",
    "V4_DIM",
    "V4_ROPE_DIM",
    "V4_SOURCE_DTYPES",
    "MAX_PAGE_SIZE",
    "check_page_size",
    "check_v4_pages",
    "v4_store_ok",
    "explain_v4_store",
    "check_v4_gather",
    "v4_jit_layout_reason",
]

SUPPORTED_DTYPES = (
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.uint8,
    torch.int8,
)
LOC_DTYPES = (torch.int32, torch.int64)
# A source of one of these dtypes written into a buffer of another of them is converted in the write.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FLOAT_SET = frozenset(FLOAT_DTYPES)
_SUPPORTED_SET = frozenset(SUPPORTED_DTYPES)
_LOC_SET = frozenset(LOC_DTYPES)

# ---- the write's argument rules --------------------------------------------------------------


def source_dtype_ok(src_dtype: torch.dtype, dst_dtype: torch.dtype) -> bool:
    """Whether a source of ``src_dtype`` may be written into a ``dst_dtype`` buffer: the same dtype
    (copied bit-exactly), or two 16/32-bit floats (converted in the write, as ``src.to(dst_dtype)``)."""
    return src_dtype is dst_dtype or (src_dtype in _FLOAT_SET and dst_dtype in _FLOAT_SET)


def rows_ok(t: torch.Tensor) -> bool:
    """2-D, or 3-D with a middle dim of 1, with a contiguous last dim (or one of <= 1 element)."""
    nd = t.ndim
    return (nd == 2 or (nd == 3 and t.shape[1] == 1)) and (t.stride(-1) == 1 or t.shape[-1] <= 1)


def kv_write_ok(kv_buffer, loc, cache_k_nope, cache_k_rope) -> bool:
    """All the write's rules as one boolean expression (the fast path; no error naming)."""
    try:
        dtype = kv_buffer.dtype
        device = kv_buffer.device
        n_loc = loc.shape[0]
        total = kv_buffer.shape[-1]
        return (
            (cache_k_nope.dtype is dtype or (cache_k_nope.dtype in _FLOAT_SET and dtype in _FLOAT_SET))
            and (cache_k_rope.dtype is dtype or (cache_k_rope.dtype in _FLOAT_SET and dtype in _FLOAT_SET))
            and dtype in _SUPPORTED_SET
            and loc.dtype in _LOC_SET
            and loc.ndim == 1
            and cache_k_nope.shape[0] == n_loc
            and cache_k_rope.shape[0] == n_loc
            and cache_k_nope.shape[-1] + cache_k_rope.shape[-1] <= total
            and rows_ok(kv_buffer)
            and rows_ok(cache_k_nope)
            and rows_ok(cache_k_rope)
            and (kv_buffer.shape[0] <= 1 or kv_buffer.stride(0) >= total)
            and loc.device == device
            and cache_k_nope.device == device
            and cache_k_rope.device == device
        )
    except (AttributeError, IndexError, TypeError, RuntimeError):
        return False


def check_rows_tensor(name: str, t: object, n_what: str) -> None:
    """Raise naming ``name`` unless ``t`` is a ``[n, D]`` / ``[n, 1, D]`` tensor with a contiguous last dim."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() == 3:
        if t.shape[1] != 1:
            raise ValueError(f"{name}: dim 1 of a 3-D tensor must be 1 ([{n_what}, 1, D]), got shape {tuple(t.shape)}")
    elif t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [{n_what}, D] or 3-D [{n_what}, 1, D], got {t.dim()}-D shape {tuple(t.shape)}")
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        raise ValueError(f"{name}: the last dim must be contiguous (stride 1), got strides {tuple(t.stride())}")


def check_index_tensor(name: str, t: object, shape: str) -> None:
    """Raise naming ``name`` unless ``t`` is an int32/int64 tensor (any strides) of ``shape``'s rank
    (``shape``: how the message spells it, e.g. ``"[batch, max_pages]"``)."""
    nd = shape.count(",") + 1
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != nd:
        raise ValueError(f"{name} must be {nd}-D {shape}, got {t.dim()}-D shape {tuple(t.shape)}")
    if t.dtype not in _LOC_SET:
        raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")


def check_loc(loc: object) -> None:
    """Raise naming ``loc`` unless it is a 1-D int32/int64 tensor (any stride)."""
    check_index_tensor("loc", loc, "[n_loc]")


def explain_kv_write(kv_buffer, loc, cache_k_nope, cache_k_rope) -> None:
    """Find the first broken rule and raise its ``TypeError``/``ValueError`` (the slow path)."""
    check_rows_tensor("kv_buffer", kv_buffer, "num_slots")
    check_rows_tensor("cache_k_nope", cache_k_nope, "n_loc")
    check_rows_tensor("cache_k_rope", cache_k_rope, "n_loc")
    check_loc(loc)
    dtype = kv_buffer.dtype
    if dtype not in _SUPPORTED_SET:
        raise TypeError(f"kv_buffer dtype {dtype} is not supported; expected one of {SUPPORTED_DTYPES}")
    for name, t in (("cache_k_nope", cache_k_nope), ("cache_k_rope", cache_k_rope)):
        if not source_dtype_ok(t.dtype, dtype):
            raise TypeError(
                f"{name} dtype {t.dtype} does not match kv_buffer dtype {dtype}: only a 16/32-bit float source "
                f"{FLOAT_DTYPES} is converted, into a 16/32-bit float buffer (no other implicit cast)"
            )
    device = kv_buffer.device
    for name, t in (("loc", loc), ("cache_k_nope", cache_k_nope), ("cache_k_rope", cache_k_rope)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but kv_buffer is on {device}")
    n_loc = loc.shape[0]
    for name, t in (("cache_k_nope", cache_k_nope), ("cache_k_rope", cache_k_rope)):
        if t.shape[0] != n_loc:
            raise ValueError(f"{name}: dim 0 is {t.shape[0]} but loc has n_loc={n_loc} entries")
    total = kv_buffer.shape[-1]
    width = cache_k_nope.shape[-1] + cache_k_rope.shape[-1]
    if width > total:
        raise ValueError(
            f"kv_buffer: last dim is {total} but nope_dim + rope_dim = "
            f"{cache_k_nope.shape[-1]} + {cache_k_rope.shape[-1]} = {width} does not fit"
        )
    if kv_buffer.shape[0] > 1 and kv_buffer.stride(0) < total:
        raise ValueError(
            f"kv_buffer: rows overlap (dim 0 stride {kv_buffer.stride(0)} < last dim {total}); "
            "an expanded or overlapping buffer cannot be written"
        )
    raise AssertionError("explain_kv_write: the fast check failed but no rule is broken")  # pragma: no cover


def check_row_selection(reserved_skip_index: object, dcp_world_size: object, dcp_rank: object) -> int:
    """The writes' row-selection options: ``reserved_skip_index`` an int or None (``TypeError``), the
    DCP pair as :func:`check_dcp`. Returns the slot to skip, -1 for none (None or negative)."""
    if reserved_skip_index is not None and (isinstance(reserved_skip_index, bool) or not isinstance(reserved_skip_index, int)):
        raise TypeError(f"reserved_skip_index must be an int or None, got {type(reserved_skip_index).__name__}")
    check_dcp(dcp_world_size, dcp_rank)
    return -1 if reserved_skip_index is None or reserved_skip_index < 0 else reserved_skip_index


def check_dcp(dcp_world_size: object, dcp_rank: object) -> None:
    """Raise unless ``dcp_world_size >= 1`` and ``0 <= dcp_rank < dcp_world_size`` (plain ints)."""
    for name, v in (("dcp_world_size", dcp_world_size), ("dcp_rank", dcp_rank)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if dcp_world_size < 1 or not 0 <= dcp_rank < dcp_world_size:
        raise ValueError(f"dcp_rank={dcp_rank} must lie in [0, dcp_world_size={dcp_world_size}) and dcp_world_size >= 1")


def check_loc_bounds(
    loc: torch.Tensor, num_slots: int, *, reserved_skip_index: Optional[int] = None, dcp_world_size: int = 1, dcp_rank: int = 0
) -> None:
    """Raise ``IndexError`` if a row that would be written lands at a row ``>= num_slots``. Syncs on GPU.

    Rows skipped by the write (``loc < 0``, ``loc == reserved_skip_index``, another DCP rank's
    ``loc``) are not checked; a row kept lands at ``loc // dcp_world_size``.
    """
    if loc.numel() == 0 or int(loc.max()) // dcp_world_size < num_slots:
        return
    live = loc >= 0
    if reserved_skip_index is not None:
        live &= loc != reserved_skip_index
    if dcp_world_size > 1:
        live &= (loc % dcp_world_size) == dcp_rank
    bad = live & (loc // dcp_world_size >= num_slots)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        where = f" (row {int(loc[i]) // dcp_world_size} of dcp rank {dcp_rank})" if dcp_world_size > 1 else ""
        raise IndexError(f"loc[{i}] = {int(loc[i])}{where} is out of range for kv_buffer with num_slots={num_slots}")


# ---- the JIT kernel's layout rules (mirrored, for memory safety, in its C++ launcher) --------


def vec_width(a: int, b: int = 0) -> int:
    """The widest vector (16, 8 or 4 bytes) dividing both byte counts (``vec_width`` in the .cuh)."""
    for v in (16, 8, 4):
        if a % v == 0 and b % v == 0:
            return v
    return 4


def jit_widths_reason(nope_bytes: int, rope_bytes: int) -> Optional[str]:
    """Why the JIT kernel cannot be built for these row widths, or None if it can.

    nope must be a positive multiple of 4 bytes, rope a non-negative one (0: a rope-less row),
    and the row a multiple of 16 bytes.
    """
    if nope_bytes <= 0 or rope_bytes < 0:
        return f"nope_bytes={nope_bytes} must be positive and rope_bytes={rope_bytes} non-negative"
    if nope_bytes % 4 or rope_bytes % 4:
        return f"nope_bytes={nope_bytes} and rope_bytes={rope_bytes} must be multiples of 4"
    if (nope_bytes + rope_bytes) % 16:
        return f"row bytes {nope_bytes + rope_bytes} must be a multiple of 16 for a bulk store"
    return None


def _addr_stride_misaligned(t: torch.Tensor, vec: int) -> bool:
    return ((t.data_ptr() | (t.stride(0) * t.element_size())) % vec) != 0


def jit_layout_reason(kv_buffer: torch.Tensor, cache_k_nope: torch.Tensor, cache_k_rope: torch.Tensor) -> Optional[str]:
    """Why these (valid) tensors' dtypes, addresses and row strides do not suit the JIT kernel, or None.

    The kernel copies bytes: sources of another dtype than ``kv_buffer`` (a converting write) go to Triton.
    ``kv_buffer`` rows must start on 16 bytes; ``cache_k_nope`` rows on ``vec_width(nope_bytes)``;
    ``cache_k_rope`` rows (when ``rope_dim > 0``) on ``vec_width(rope_bytes, nope_bytes)``.
    """
    if cache_k_nope.dtype != kv_buffer.dtype or cache_k_rope.dtype != kv_buffer.dtype:
        return "cache_k_nope/cache_k_rope: the JIT kernel copies bytes; a source of another dtype is converted by Triton"
    es = kv_buffer.element_size()
    nope_bytes, rope_bytes = cache_k_nope.shape[-1] * es, cache_k_rope.shape[-1] * es
    if _addr_stride_misaligned(kv_buffer, 16):
        return (
            f"kv_buffer: the row stride ({kv_buffer.stride(0) * es} bytes) and base address must be multiples of 16 bytes"
        )
    vn = vec_width(nope_bytes)
    if _addr_stride_misaligned(cache_k_nope, vn):
        return f"cache_k_nope: the row stride and base address must be multiples of {vn} bytes"
    vr = vec_width(rope_bytes, nope_bytes)
    if rope_bytes and _addr_stride_misaligned(cache_k_rope, vr):
        return f"cache_k_rope: the row stride and base address must be multiples of {vr} bytes"
    return None



# ---- plain integer arguments (sizes, counts, layer ids) --------------------------------------


def check_int_arg(value: object, name: str, minimum: Optional[int] = None) -> int:
    """``value`` as a Python int: ints and integer scalars of numpy (anything with ``__index__``
    that is not a bool or a tensor). ``TypeError`` naming ``name`` for a bool, a float, a string or a
    tensor (never truncated); ``ValueError`` when below ``minimum``."""
    if isinstance(value, (bool, torch.Tensor)) or type(value).__name__ in ("bool_", "bool"):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None
    if minimum is not None and v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


# ---- token-slot vectors of the host pool and the storages ------------------------------------


def check_token_slots(indices: object, name: str, limit: int, page_size: int) -> torch.Tensor:
    """Validate a token-slot vector and return a PRIVATE contiguous CPU int64 copy of its values.

    Rules: a 1-D int32/int64 tensor (any stride, any device); every slot in ``[0, limit)``
    (``IndexError``); with ``page_size > 1``, whole aligned pages: ``t, t+1, ..., t+page_size-1``
    with ``t % page_size == 0`` (``ValueError``). The copy never aliases ``indices``, so a later
    write to ``indices`` (through any alias) cannot change what was validated. One host sync for a
    device vector.
    """
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"{name} must be a 1-D int32/int64 tensor of token slots, got {type(indices).__name__}")
    if indices.dim() != 1:
        raise ValueError(f"{name} must be a 1-D int32/int64 tensor of token slots, got {indices.dim()}-D {indices.dtype}")
    if indices.dtype not in _LOC_SET:
        raise TypeError(f"{name} must be a 1-D int32/int64 tensor of token slots, got {indices.dim()}-D {indices.dtype}")
    idx = torch.empty(indices.shape[0], dtype=torch.int64)
    idx.copy_(indices)  # a private copy: honours strides, expansion and offsets; converts the dtype
    n = idx.numel()
    if n == 0:
        return idx
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= limit:
        i = int(((idx < 0) | (idx >= limit)).nonzero()[0, 0])
        raise IndexError(f"{name}: slots must lie in [0, {limit}), got {name}[{i}] = {int(idx[i])} (values in [{lo}, {hi}])")
    if page_size > 1:
        p = page_size
        if n % p:
            raise ValueError(f"{name}: {n} slots is not a whole number of pages of {p}")
        runs = idx.view(-1, p)
        if bool((runs[:, 0] % p != 0).any()) or bool((runs - runs[:, :1] != torch.arange(p)).any()):
            raise ValueError(
                f"{name}: slots must come in whole, aligned pages of {p} (t, t+1, ..., t+{p - 1} with t % {p} == 0)"
            )
    return idx


# ---- the gather (``get_mla_kv_buffer``) ---------------------------------------------------------


def check_gather(kv_buffer: object, loc: object, nope_dim: object, rope_dim: object) -> None:
    """The gather's argument rules (``kv_buffer [num_slots, (1,) total]``, ``loc [n_loc]``): a rows
    tensor of a supported dtype, a 1-D int32/int64 ``loc`` on its device, ``nope_dim >= 1`` and
    ``rope_dim >= 0`` ints with ``nope_dim + rope_dim <= total``. Raises naming the argument."""
    check_rows_tensor("kv_buffer", kv_buffer, "num_slots")
    if kv_buffer.dtype not in _SUPPORTED_SET:
        raise TypeError(f"kv_buffer dtype {kv_buffer.dtype} is not supported; expected one of {SUPPORTED_DTYPES}")
    check_loc(loc)
    if loc.device != kv_buffer.device:
        raise ValueError(f"loc is on {loc.device} but kv_buffer is on {kv_buffer.device}")
    nope = check_int_arg(nope_dim, "nope_dim", 1)
    rope = check_int_arg(rope_dim, "rope_dim", 0)
    total = kv_buffer.shape[-1]
    if nope + rope > total:
        raise ValueError(
            f"nope_dim + rope_dim = {nope} + {rope} = {nope + rope} does not fit kv_buffer's last dim {total}"
        )
    if kv_buffer.shape[0] > 1 and kv_buffer.stride(0) < total:
        raise ValueError(f"kv_buffer: rows overlap (dim 0 stride {kv_buffer.stride(0)} < last dim {total})")


# ---- HiCache's row copy (``copy_rows``) ---------------------------------------------------------


def check_copy_rows(
    src: object, dst: object, src_idx: object, dst_idx: object, unit_bytes: object, src_layout: object, dst_layout: object
) -> None:
    """The row copy's argument rules: ``src``/``dst`` contiguous tensors; ``src_idx``/``dst_idx``
    1-D int32/int64 of one length ``[n]``, on the device of the buffer that is not pinned host
    memory (CPU for two CPU buffers); ``unit_bytes >= 1``; each layout three ints ``(page_size >= 1,
    page_stride_bytes >= 0, row_stride_bytes >= 0)``. Slot values are checked by
    :func:`copy_rows_bad_unit`. Raises ``TypeError``/``ValueError`` naming the argument."""
    for name, t in (("src", src), ("dst", dst), ("src_idx", src_idx), ("dst_idx", dst_idx)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("src", src), ("dst", dst)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (the row copy addresses it by bytes)")
    for name, t in (("src_idx", src_idx), ("dst_idx", dst_idx)):
        if t.dim() != 1:
            raise ValueError(f"{name} must be a 1-D int32/int64 tensor of slots, got {t.dim()}-D {t.dtype}")
        if t.dtype not in _LOC_SET:
            raise TypeError(f"{name} must be a 1-D int32/int64 tensor of slots, got {t.dim()}-D {t.dtype}")
    if src_idx.shape[0] != dst_idx.shape[0]:
        raise ValueError(f"src_idx has {src_idx.shape[0]} entries but dst_idx has {dst_idx.shape[0]}")
    if src_idx.device != dst_idx.device:
        raise ValueError(f"src_idx is on {src_idx.device} but dst_idx is on {dst_idx.device}")
    gpu = src.device if src.is_cuda else dst.device
    if src_idx.device != gpu:
        raise ValueError(f"src_idx/dst_idx must be on {gpu} (where the copy runs), got {src_idx.device}")
    check_int_arg(unit_bytes, "row_bytes", 1)
    for name, lay in (("src_layout", src_layout), ("dst_layout", dst_layout)):
        if not isinstance(lay, (list, tuple)) or len(lay) != 3:
            raise ValueError(f"{name} must be (page_size, page_stride_bytes, row_stride_bytes), got {lay!r}")
        check_int_arg(lay[0], f"{name}[0] (page_size)", 1)
        check_int_arg(lay[1], f"{name}[1] (page_stride_bytes)", 0)
        check_int_arg(lay[2], f"{name}[2] (row_stride_bytes)", 0)


def copy_rows_bad_unit(idx: torch.Tensor, layout, unit_bytes: int, nbytes: int) -> Optional[int]:
    """The first ``i`` whose unit ``[off(idx[i]), off(idx[i]) + unit_bytes)`` is not inside a buffer of
    ``nbytes`` bytes (a negative slot included), or None. ``off(t) = (t // page) * page_stride + (t %
    page) * row_stride``. Syncs on GPU."""
    if idx.numel() == 0:
        return None
    page, page_stride, row_stride = (int(x) for x in layout)
    t = idx.to(torch.int64)
    off = torch.div(t, page, rounding_mode="floor") * page_stride + torch.remainder(t, page) * row_stride
    bad = (t < 0) | (off + unit_bytes > nbytes)
    if not bool(bad.any()):
        return None
    return int(bad.nonzero()[0, 0])


# ---- aliasing: do two tensors share bytes? ------------------------------------------------------


def byte_span(t: torch.Tensor) -> tuple[int, int]:
    """``[lo, hi)`` addresses of the bytes ``t`` may touch (its elements at any stride); empty if numel 0."""
    if t.numel() == 0:
        return (0, 0)
    lo = hi = t.data_ptr()
    es = t.element_size()
    for size, stride in zip(t.shape, t.stride()):
        if stride >= 0:
            hi += (size - 1) * stride * es
        else:  # pragma: no cover - torch has no negative strides
            lo += (size - 1) * stride * es
    return lo, hi + es


def tensors_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` (on one device) may share bytes: their address spans intersect
    (conservative: interleaved strided views count as overlapping)."""
    if a.device != b.device:
        return False
    alo, ahi = byte_span(a)
    blo, bhi = byte_span(b)
    return alo < bhi and blo < ahi


def storage_span(t: torch.Tensor) -> tuple[int, int]:
    """``[lo, hi)`` addresses of the whole storage under ``t`` (every view of it lies inside)."""
    s = t.untyped_storage()
    lo = s.data_ptr()
    return lo, lo + s.nbytes()


def source_aliases(buffer: torch.Tensor, source: torch.Tensor, span: Optional[tuple[int, int]] = None) -> bool:
    """Whether a write's ``source`` may read bytes the write changes in ``buffer``: it starts inside
    ``buffer``'s storage (``span``, default :func:`storage_span`; the cheap test, a view of the
    buffer's storage always does) and its byte span meets ``buffer``'s (conservative: a strided
    view interleaved with the buffer's rows counts). A write whose source aliases copies it first
    (:func:`mlakv.ops.dispatch.set_mla_kv_buffer_triton`, the pool's route)."""
    lo, hi = storage_span(buffer) if span is None else span
    return lo <= source.data_ptr() < hi and source.numel() > 0 and tensors_overlap(buffer, source)


# ---- the ds_mla row's tile-scale rules (``mlakv.ops.fp8``) ---------------------------------------
# How a ds_mla tile's fp32 scale is chosen and its values brought to e4m3; the arithmetic of each is
# in the reference (mlakv.ops.fp8.ds_mla_tile_scales / ds_mla_quotients). A rule's index in the tuple
# is its code in the kernels (``kRule`` of csrc/fp8.cuh and csrc/rope_write.cuh, ``RULE`` of the
# Triton kernels). "fp32_floor": mlakv's default (vLLM's before 0.33); "fp32": sglang's DSA
# quantizer; "ue8m0": vLLM 0.33's fp8_ds_mla and FlashMLA's reference (power-of-two scales).

DS_MLA_SCALE_RULES = ("fp32_floor", "fp32", "ue8m0")
DS_MLA_UE8M0_FLOOR = float(torch.tensor(1e-4, dtype=torch.float32))  # 1e-4f: ue8m0's least scale before rounding up


def check_ds_mla_scale_rule(rule: object, name: str = "ds_mla_scale_rule") -> int:
    """Raise ``ValueError`` naming ``name`` unless ``rule`` is one of :data:`DS_MLA_SCALE_RULES`;
    return its code (the kernels' compile-time switch)."""
    if not isinstance(rule, str) or rule not in DS_MLA_SCALE_RULES:
        raise ValueError(f"{name} must be one of {DS_MLA_SCALE_RULES}, got {rule!r}")
    return DS_MLA_SCALE_RULES.index(rule)


# ---- the DSA indexer K cache (``mlakv.ops.indexer``) --------------------------------------------
# One layer's cache is ``index_pages [num_pages, 8448]`` uint8: pages of 64 slots, 64 keys of 128
# e4m3 bytes then 64 fp32 scales (the format: mlakv.ops.indexer_reference). The store takes
# ``loc [n]`` and ``index_k [n, (1,) 128]`` bf16/fp16; the gather ``page_table [batch, max_pages]``
# and ``seq_lens [batch]`` (int32/int64, any strides). Pages start on 16 bytes (base address and page
# stride): every path addresses a page's keys as 16-byte vectors and its scales as fp32.

INDEX_HEAD_DIM = 128
INDEX_PAGE_TOKENS = 64
INDEX_PAGE_BYTES = INDEX_PAGE_TOKENS * (INDEX_HEAD_DIM + 4)  # 8448
INDEX_SOURCE_DTYPES = (torch.bfloat16, torch.float16)
INDEX_SCALE_RULES = ("fp32", "ue8m0")
INDEX_E4M3_MAX = 448.0  # the largest finite e4m3 magnitude: the quantized keys' range
INDEX_AMAX_FLOOR = float(torch.tensor(1e-4, dtype=torch.float32))  # 1e-4f (bits 0x38D1B717): the smallest amax a scale uses
_INDEX_SRC_SET = frozenset(INDEX_SOURCE_DTYPES)


def _pages_ok(t: torch.Tensor, page_bytes: int) -> bool:
    """``t`` is ``[num_pages, page_bytes]`` uint8 with contiguous bytes and non-overlapping pages."""
    return (
        t.dim() == 2
        and t.dtype is torch.uint8
        and t.shape[1] == page_bytes
        and t.stride(1) == 1
        and (t.shape[0] <= 1 or t.stride(0) >= page_bytes)
    )


def _check_2d(
    name: str, t: object, cols: int, shape: str, dtype: torch.dtype, dtype_text: str, contiguous_text: str
) -> None:
    """Raise naming ``name`` unless ``t`` is a 2-D ``dtype`` tensor of ``cols`` contiguous columns
    (the texts: how the messages spell the expected shape, dtype and contiguity)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2 or t.shape[1] != cols:
        raise ValueError(f"{name} must be {shape}, got shape {tuple(t.shape)}")
    if t.dtype is not dtype:
        raise TypeError(f"{name} must be {dtype_text}, got {t.dtype}")
    if t.stride(1) != 1:
        raise ValueError(f"{name}: {contiguous_text}, got strides {tuple(t.stride())}")


def _check_pages(name: str, pages: object, page_bytes: int, what: str = "") -> None:
    """Raise naming ``name`` unless :func:`_pages_ok` (``what``: a note after the expected shape)."""
    _check_2d(
        name, pages, page_bytes, f"[num_pages, {page_bytes}]{what}", torch.uint8, "uint8 (the stored bytes)",
        "dim 1 must be contiguous (stride 1)",
    )  # fmt: skip
    if pages.shape[0] > 1 and pages.stride(0) < page_bytes:
        raise ValueError(f"{name}: pages overlap (dim 0 stride {pages.stride(0)} < {page_bytes})")


def _check_store_source(name: str, src: object, width: int, what: str, dtypes: tuple) -> None:
    """Raise naming ``name`` unless ``src`` is ``[n, (1,) width]`` rows (last dim contiguous) of one of
    ``dtypes``, the tokens a quantizing paged store takes (``what``: the width's meaning)."""
    check_rows_tensor(name, src, "n")
    if src.shape[-1] != width:
        raise ValueError(f"{name}: the last dim must be {width} ({what}), got {src.shape[-1]}")
    if src.dtype not in dtypes:
        raise TypeError(f"{name} dtype must be one of {dtypes} (quantized in the store), got {src.dtype}")


def _index_pages_ok(t: torch.Tensor) -> bool:
    return _pages_ok(t, INDEX_PAGE_BYTES) and (t.data_ptr() | t.stride(0)) % 16 == 0


def check_index_pages(index_pages: object) -> None:
    """Raise naming ``index_pages`` unless it is a ``[num_pages, 8448]`` uint8 tensor with contiguous,
    non-overlapping pages whose base address and page stride are multiples of 16 bytes."""
    _check_pages("index_pages", index_pages, INDEX_PAGE_BYTES)
    if (index_pages.data_ptr() | index_pages.stride(0)) % 16:
        raise ValueError(
            f"index_pages: the base address and the page stride ({index_pages.stride(0)} bytes) must be multiples of 16"
        )


def index_store_ok(index_pages, loc, index_k) -> bool:
    """All the indexer store's rules as one boolean expression (the fast path; no error naming)."""
    try:
        device = index_pages.device
        return (
            _index_pages_ok(index_pages)
            and loc.dtype in _LOC_SET
            and loc.ndim == 1
            and index_k.dtype in _INDEX_SRC_SET
            and rows_ok(index_k)
            and index_k.shape[-1] == INDEX_HEAD_DIM
            and index_k.shape[0] == loc.shape[0]
            and loc.device == device
            and index_k.device == device
        )
    except (AttributeError, IndexError, TypeError, RuntimeError):
        return False


def explain_index_store(index_pages, loc, index_k) -> None:
    """Find the first broken rule of the indexer store and raise its ``TypeError``/``ValueError``."""
    check_index_pages(index_pages)
    check_loc(loc)
    _check_store_source("index_k", index_k, INDEX_HEAD_DIM, "one indexer key", INDEX_SOURCE_DTYPES)
    for name, t in (("loc", loc), ("index_k", index_k)):
        if t.device != index_pages.device:
            raise ValueError(f"{name} is on {t.device} but index_pages is on {index_pages.device}")
    if index_k.shape[0] != loc.shape[0]:
        raise ValueError(f"index_k: dim 0 is {index_k.shape[0]} but loc has n={loc.shape[0]} entries")
    raise AssertionError("explain_index_store: the fast check failed but no rule is broken")  # pragma: no cover


def check_index_scale_rule(scale_rule: object) -> None:
    """Raise ``ValueError`` unless ``scale_rule`` is one of :data:`INDEX_SCALE_RULES`."""
    if scale_rule not in INDEX_SCALE_RULES:
        raise ValueError(f"scale_rule must be one of {INDEX_SCALE_RULES}, got {scale_rule!r}")


def check_index_gather(index_pages: object, page_table: object, seq_lens: object) -> None:
    """The gather's argument rules: ``index_pages`` as :func:`check_index_pages`; ``page_table`` a 2-D
    and ``seq_lens`` a 1-D int32/int64 tensor (any strides) with ``batch`` rows each, all on one
    device. Raises naming the argument."""
    check_index_pages(index_pages)
    for name, t, shape in (("page_table", page_table, "[batch, max_pages]"), ("seq_lens", seq_lens, "[batch]")):
        check_index_tensor(name, t, shape)
        if t.device != index_pages.device:
            raise ValueError(f"{name} is on {t.device} but index_pages is on {index_pages.device}")
    if page_table.shape[0] != seq_lens.shape[0]:
        raise ValueError(f"page_table: dim 0 is {page_table.shape[0]} but seq_lens has batch={seq_lens.shape[0]}")


def check_index_gather_values(
    index_pages: torch.Tensor, page_table: torch.Tensor, seq_lens: torch.Tensor, total: int, max_seq_len: int
) -> None:
    """The gather's value rules (syncs on GPU): every ``seq_lens[b] >= 0`` (``ValueError``);
    ``total == sum(seq_lens)`` and ``max_seq_len >= max(seq_lens)`` (``ValueError``); every token's
    page column ``j // 64`` inside the table and its page id in ``[0, num_pages)`` (``IndexError``)."""
    lens = seq_lens.to(torch.int64)
    if lens.numel() and int(lens.min()) < 0:
        b = int((lens < 0).nonzero()[0, 0])
        raise ValueError(f"seq_lens[{b}] = {int(lens[b])} is negative")
    s = int(lens.sum()) if lens.numel() else 0
    if total != s:
        raise ValueError(f"total_tokens={total} but sum(seq_lens) = {s}")
    m = int(lens.max()) if lens.numel() else 0
    if max_seq_len < m:
        raise ValueError(f"max_seq_len={max_seq_len} but max(seq_lens) = {m}")
    pages_needed = (lens + INDEX_PAGE_TOKENS - 1) // INDEX_PAGE_TOKENS
    width = page_table.shape[1]
    if lens.numel() and int(pages_needed.max()) > width:
        b = int((pages_needed > width).nonzero()[0, 0])
        raise IndexError(f"seq_lens[{b}] = {int(lens[b])} needs {int(pages_needed[b])} pages but page_table has {width} columns")
    if width == 0 or lens.numel() == 0:
        return
    used = torch.arange(width, device=lens.device)[None, :] < pages_needed[:, None]
    ids = page_table.to(torch.int64)
    bad = used & ((ids < 0) | (ids >= index_pages.shape[0]))
    if bool(bad.any()):
        b, c = (int(v) for v in bad.nonzero()[0])
        raise IndexError(f"page_table[{b}, {c}] = {int(ids[b, c])} is not a page of index_pages (num_pages={index_pages.shape[0]})")


# ---- the fused RoPE write's rules (mlakv.ops.rope_write) ------------------------------------------
# Shapes: kv_buffer [num_slots, (1,) row], loc [n], k_nope [n, (1,) nope_dim], k_pe [n, (1,) rope_dim],
# positions [n], cos_sin_cache [max_pos, rope_dim]; a query is q_nope [n, H, nope_dim],
# q_pe [n, H, rope_dim] and q_out [n, H, nope_dim + rope_dim], all three or none.
ROPE_SOURCE_DTYPES = (torch.bfloat16, torch.float16)
_ROPE_SRC_SET = frozenset(ROPE_SOURCE_DTYPES)
_BYTE_SET = frozenset((torch.uint8, torch.float8_e4m3fn))


def _last_contiguous(t: torch.Tensor) -> bool:
    return t.stride(-1) == 1 or t.shape[-1] <= 1


def _positions_table_ok(positions: torch.Tensor, cos_sin_cache: torch.Tensor, n: int, rope: int) -> bool:
    """``positions [n]`` int32/int64 and a ``[max_pos, rope]`` float32 ``cos_sin_cache`` (shapes and dtypes only)."""
    return (
        positions.ndim == 1
        and positions.dtype in _LOC_SET
        and positions.shape[0] == n
        and cos_sin_cache.ndim == 2
        and cos_sin_cache.dtype is torch.float32
        and cos_sin_cache.shape[1] == rope
    )


def rope_write_ok(kv_buffer, loc, k_nope, k_pe, positions, cos_sin_cache, q_nope, q_pe, q_out, quantized, row_bytes) -> bool:
    """All the fused RoPE write's tensor rules as one boolean expression (no error naming).

    ``quantized``: the cache holds FP8 rows (``kv_buffer`` uint8/float8_e4m3fn), else 16-bit rows of
    the sources' dtype; ``row_bytes``: the bytes of one stored row (the format's).
    """
    try:
        dt = k_nope.dtype
        device = kv_buffer.device
        n = loc.shape[0]
        rope = k_pe.shape[-1]
        ok = (
            dt in _ROPE_SRC_SET
            and k_pe.dtype is dt
            and rows_ok(k_nope)
            and rows_ok(k_pe)
            and rows_ok(kv_buffer)
            and k_nope.shape[0] == n
            and k_pe.shape[0] == n
            and rope > 0
            and rope % 2 == 0
            and loc.ndim == 1
            and loc.dtype in _LOC_SET
            and _positions_table_ok(positions, cos_sin_cache, n, rope)
            and _last_contiguous(cos_sin_cache)
            and (kv_buffer.dtype in _BYTE_SET if quantized else kv_buffer.dtype is dt)
            and kv_buffer.shape[-1] * kv_buffer.element_size() >= row_bytes
            and (kv_buffer.shape[0] <= 1 or kv_buffer.stride(0) >= kv_buffer.shape[-1])
            and loc.device == device
            and k_nope.device == device
            and k_pe.device == device
            and positions.device == device
            and cos_sin_cache.device == device
        )
        if not ok or (q_nope is None and q_pe is None and q_out is None):
            return ok
        nope = k_nope.shape[-1]
        return (
            q_nope.ndim == 3
            and q_pe.ndim == 3
            and q_out.ndim == 3
            and q_nope.shape[0] == n
            and q_pe.shape[0] == n
            and q_out.shape[0] == n
            and q_nope.shape[1] >= 1
            and q_pe.shape[1] == q_nope.shape[1]
            and q_out.shape[1] == q_nope.shape[1]
            and q_nope.shape[2] == nope
            and q_pe.shape[2] == rope
            and q_out.shape[2] == nope + rope
            and _last_contiguous(q_nope)
            and _last_contiguous(q_pe)
            and _last_contiguous(q_out)
            and q_nope.dtype is dt
            and q_pe.dtype is dt
            and (q_out.dtype is dt or q_out.dtype in _BYTE_SET)
            and q_nope.device == device
            and q_pe.device == device
            and q_out.device == device
        )
    except (AttributeError, IndexError, TypeError, RuntimeError):
        return False


def _check_tensor(name: str, t: object) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def explain_rope_write(kv_buffer, loc, k_nope, k_pe, positions, cos_sin_cache, q_nope, q_pe, q_out, quantized, row_bytes) -> None:
    """Find the first broken rule of the fused RoPE write and raise its ``TypeError``/``ValueError``."""
    check_rows_tensor("k_nope", k_nope, "n")
    check_rows_tensor("k_pe", k_pe, "n")
    check_rows_tensor("kv_buffer", kv_buffer, "num_slots")
    check_loc(loc)
    _check_tensor("positions", positions)
    _check_tensor("cos_sin_cache", cos_sin_cache)
    dt = k_nope.dtype
    if dt not in _ROPE_SRC_SET:
        raise TypeError(f"k_nope dtype must be one of {ROPE_SOURCE_DTYPES}, got {dt}")
    if k_pe.dtype is not dt:
        raise TypeError(f"k_pe dtype {k_pe.dtype} must match k_nope dtype {dt}")
    rope = k_pe.shape[-1]
    if rope <= 0 or rope % 2:
        raise ValueError(f"k_pe: last dim (rope_dim) must be positive and even, got {rope}")
    if positions.dim() != 1:
        raise ValueError(f"positions must be 1-D [n], got {positions.dim()}-D shape {tuple(positions.shape)}")
    if positions.dtype not in _LOC_SET:
        raise TypeError(f"positions must be int32 or int64, got {positions.dtype}")
    if cos_sin_cache.dim() != 2:
        raise ValueError(f"cos_sin_cache must be 2-D [max_pos, rope_dim], got shape {tuple(cos_sin_cache.shape)}")
    if cos_sin_cache.dtype is not torch.float32:
        raise TypeError(f"cos_sin_cache must be float32, got {cos_sin_cache.dtype}")
    if cos_sin_cache.shape[1] != rope:
        raise ValueError(f"cos_sin_cache: dim 1 is {cos_sin_cache.shape[1]} but k_pe's rope_dim is {rope}")
    if not _last_contiguous(cos_sin_cache):
        raise ValueError(f"cos_sin_cache: the last dim must be contiguous, got strides {tuple(cos_sin_cache.stride())}")
    if quantized and kv_buffer.dtype not in _BYTE_SET:
        raise TypeError(f"kv_buffer must be uint8 or float8_e4m3fn for an FP8 format, got {kv_buffer.dtype}")
    if not quantized and kv_buffer.dtype is not dt:
        raise TypeError(f"kv_buffer dtype {kv_buffer.dtype} must be the sources' dtype {dt} (16-bit rows; no implicit cast)")
    have = kv_buffer.shape[-1] * kv_buffer.element_size()
    if have < row_bytes:
        raise ValueError(f"kv_buffer: last dim holds {have} bytes but a row needs {row_bytes}")
    if kv_buffer.shape[0] > 1 and kv_buffer.stride(0) < kv_buffer.shape[-1]:
        raise ValueError(f"kv_buffer: rows overlap (dim 0 stride {kv_buffer.stride(0)} < last dim {kv_buffer.shape[-1]})")
    device = kv_buffer.device
    n = loc.shape[0]
    for name, t in (("k_nope", k_nope), ("k_pe", k_pe), ("positions", positions)):
        if t.shape[0] != n:
            raise ValueError(f"{name}: dim 0 is {t.shape[0]} but loc has n={n} entries")
    for name, t in (("loc", loc), ("k_nope", k_nope), ("k_pe", k_pe), ("positions", positions), ("cos_sin_cache", cos_sin_cache)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but kv_buffer is on {device}")
    given = [name for name, t in (("q_nope", q_nope), ("q_pe", q_pe), ("q_out", q_out)) if t is not None]
    if given and len(given) != 3:
        raise ValueError(f"q_nope, q_pe and q_out come together; got only {', '.join(given)}")
    if given:
        nope = k_nope.shape[-1]
        for name, t, d in (("q_nope", q_nope, nope), ("q_pe", q_pe, rope), ("q_out", q_out, nope + rope)):
            _check_tensor(name, t)
            if t.dim() != 3:
                raise ValueError(f"{name} must be 3-D [n, H, {d}], got shape {tuple(t.shape)}")
            if t.shape[0] != n:
                raise ValueError(f"{name}: dim 0 is {t.shape[0]} but loc has n={n} entries")
            if t.shape[1] != q_nope.shape[1] or t.shape[1] < 1:
                raise ValueError(f"{name}: dim 1 (heads) is {t.shape[1]}, expected q_nope's {q_nope.shape[1]} (>= 1)")
            if t.shape[2] != d:
                raise ValueError(f"{name}: dim 2 is {t.shape[2]}, expected {d}")
            if not _last_contiguous(t):
                raise ValueError(f"{name}: the last dim must be contiguous, got strides {tuple(t.stride())}")
            if t.device != device:
                raise ValueError(f"{name} is on {t.device} but kv_buffer is on {device}")
        for name, t in (("q_nope", q_nope), ("q_pe", q_pe)):
            if t.dtype is not dt:
                raise TypeError(f"{name} dtype {t.dtype} must match k_nope dtype {dt}")
        if q_out.dtype is not dt and q_out.dtype not in _BYTE_SET:
            raise TypeError(f"q_out dtype must be q_nope's {dt} or float8_e4m3fn/uint8 (then q_scale), got {q_out.dtype}")
    raise AssertionError("explain_rope_write: the fast check failed but no rule is broken")  # pragma: no cover


def check_positions_bounds(positions: torch.Tensor, max_pos: int) -> None:
    """Raise ``IndexError`` naming the first ``positions[i]`` outside ``[0, max_pos)``. Syncs on GPU."""
    if positions.numel() == 0:
        return
    bad = (positions < 0) | (positions >= max_pos)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise IndexError(f"positions[{i}] = {int(positions[i])} is out of range for cos_sin_cache with max_pos={max_pos}")


# ---- the DeepSeek-V4 family's paged caches (``mlakv.ops.v4``) -------------------------------------
# One layer's cache is ``kv_pages [num_pages, page_bytes]`` uint8 (``page_bytes``: the format's, see
# mlakv.spec.formats), bytes contiguous, pages not overlapping; ``page_size`` tokens per page, a power
# of two. The store takes ``loc [n]`` and ``kv [n, (1,) 512]`` bf16/fp16 (nope | rope), and optionally
# the RoPE angles: ``freqs_cis [n, 64]`` fp32 ``(cos, sin)`` pairs, or ``positions [n]`` int32/int64
# into ``cos_sin_cache [max_pos, 64]`` fp32 (``cos | sin``), last dims contiguous. The JIT kernel moves
# 16-byte vectors: it serves pages, ``kv`` rows and angle rows whose base address and row stride are
# multiples of 16 bytes (the others run on Triton).

V4_DIM = 512
V4_ROPE_DIM = 64
V4_SOURCE_DTYPES = (torch.bfloat16, torch.float16)
MAX_PAGE_SIZE = 1 << 20
_V4_SRC_SET = frozenset(V4_SOURCE_DTYPES)


def check_page_size(page_size: object) -> int:
    """``page_size`` as an int: a power of two in ``[1, 2^20]`` (``TypeError``/``ValueError`` otherwise)."""
    p = check_int_arg(page_size, "page_size", 1)
    if p > MAX_PAGE_SIZE or p & (p - 1):
        raise ValueError(f"page_size must be a power of two in [1, {MAX_PAGE_SIZE}], got {p}")
    return p


def check_v4_pages(kv_pages: object, page_bytes: int) -> None:
    """Raise naming ``kv_pages`` unless it is a ``[num_pages, page_bytes]`` uint8 tensor with contiguous
    bytes and non-overlapping pages."""
    _check_pages("kv_pages", kv_pages, page_bytes, " (the format's page bytes)")


def v4_store_ok(kv_pages, loc, kv, page_bytes, freqs_cis, positions, cos_sin_cache) -> bool:
    """All the V4-family store's tensor rules as one boolean expression (the fast path; no error naming)."""
    try:
        device = kv_pages.device
        n = loc.shape[0]
        ok = (
            _pages_ok(kv_pages, page_bytes)
            and loc.dtype in _LOC_SET
            and loc.ndim == 1
            and kv.dtype in _V4_SRC_SET
            and rows_ok(kv)
            and kv.shape[-1] == V4_DIM
            and kv.shape[0] == n
            and loc.device == device
            and kv.device == device
        )
        if not ok:
            return False
        if freqs_cis is not None:
            return (
                positions is None
                and cos_sin_cache is None
                and freqs_cis.ndim == 2
                and freqs_cis.dtype is torch.float32
                and freqs_cis.shape[0] == n
                and freqs_cis.shape[1] == V4_ROPE_DIM
                and freqs_cis.stride(1) == 1
                and freqs_cis.device == device
            )
        if positions is None and cos_sin_cache is None:
            return True
        return (
            positions is not None
            and cos_sin_cache is not None
            and _positions_table_ok(positions, cos_sin_cache, n, V4_ROPE_DIM)
            and cos_sin_cache.stride(1) == 1
            and positions.device == device
            and cos_sin_cache.device == device
        )
    except (AttributeError, IndexError, TypeError, RuntimeError):
        return False


def explain_v4_store(kv_pages, loc, kv, page_bytes, freqs_cis, positions, cos_sin_cache) -> None:
    """Find the first broken rule of the V4-family store and raise its ``TypeError``/``ValueError``."""
    check_v4_pages(kv_pages, page_bytes)
    check_loc(loc)
    _check_store_source("kv", kv, V4_DIM, "nope 448 | rope 64", V4_SOURCE_DTYPES)
    n = loc.shape[0]
    if kv.shape[0] != n:
        raise ValueError(f"kv: dim 0 is {kv.shape[0]} but loc has n={n} entries")
    device = kv_pages.device
    for name, t in (("loc", loc), ("kv", kv)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but kv_pages is on {device}")
    if freqs_cis is not None and (positions is not None or cos_sin_cache is not None):
        raise ValueError("give the RoPE angles one way: freqs_cis, or positions with cos_sin_cache")
    if (positions is None) != (cos_sin_cache is None):
        raise ValueError("positions and cos_sin_cache come together")
    named = (("freqs_cis", freqs_cis, "[n, 64]"),) if freqs_cis is not None else (
        ("cos_sin_cache", cos_sin_cache, "[max_pos, 64]"),) if cos_sin_cache is not None else ()
    for name, t, shape in named:
        _check_2d(
            name, t, V4_ROPE_DIM, f"2-D {shape} (cos, sin of the 32 RoPE pairs)", torch.float32, "float32",
            "the last dim must be contiguous",
        )  # fmt: skip
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but kv_pages is on {device}")
    if freqs_cis is not None and freqs_cis.shape[0] != n:
        raise ValueError(f"freqs_cis: dim 0 is {freqs_cis.shape[0]} but loc has n={n} entries")
    if positions is not None:
        check_index_tensor("positions", positions, "[n]")
        if positions.shape[0] != n:
            raise ValueError(f"positions: dim 0 is {positions.shape[0]} but loc has n={n} entries")
        if positions.device != device:
            raise ValueError(f"positions is on {positions.device} but kv_pages is on {device}")
    raise AssertionError("explain_v4_store: the fast check failed but no rule is broken")  # pragma: no cover


def check_v4_gather(kv_pages: object, loc: object, page_bytes: int) -> None:
    """The V4-family gather's argument rules: ``kv_pages`` as :func:`check_v4_pages`, ``loc`` a 1-D
    int32/int64 tensor on its device. Raises naming the argument."""
    check_v4_pages(kv_pages, page_bytes)
    check_loc(loc)
    if loc.device != kv_pages.device:
        raise ValueError(f"loc is on {loc.device} but kv_pages is on {kv_pages.device}")


def v4_jit_layout_reason(kv_pages, kv, freqs_cis, cos_sin_cache) -> Optional[str]:
    """Why these (valid) tensors' addresses and row strides do not suit the JIT store's 16-byte
    vectors, or None: ``kv_pages``, ``kv`` rows and the angle rows must start on 16 bytes."""
    for name, t in (("kv_pages", kv_pages), ("kv", kv), ("freqs_cis", freqs_cis), ("cos_sin_cache", cos_sin_cache)):
        if t is not None and _addr_stride_misaligned(t, 16):
            return f"{name}: the base address and row stride must be multiples of 16 bytes for the JIT store"
    return None
