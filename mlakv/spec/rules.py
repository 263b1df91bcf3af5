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
    "check_loc",
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


def check_loc(loc: object) -> None:
    """Raise naming ``loc`` unless it is a 1-D int32/int64 tensor (any stride)."""
    if not isinstance(loc, torch.Tensor):
        raise TypeError(f"loc must be a torch.Tensor, got {type(loc).__name__}")
    if loc.dim() != 1:
        raise ValueError(f"loc must be 1-D [n_loc], got {loc.dim()}-D shape {tuple(loc.shape)}")
    if loc.dtype not in _LOC_SET:
        raise TypeError(f"loc must be int32 or int64, got {loc.dtype}")


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
        raise IndexError(f"{name}: slots must lie in [0, {limit}), got [{lo}, {hi}]")
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
