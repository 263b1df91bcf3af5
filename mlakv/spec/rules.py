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
