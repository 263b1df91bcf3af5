"""The KV-row write dispatcher: the one function that decides how a row write runs.

``set_mla_kv_buffer_triton(kv_buffer, loc, cache_k_nope, cache_k_rope)`` keeps the name existing
callers know. It routes each call:

* CUDA, JIT kernel usable for this (device, dtype, widths) and ``n_loc`` at or above the GPU
  family's threshold -> the compiled CUDA kernel (:func:`mlakv.jit_kernel.jit_writer`). This is
  the hot path: the kernel module's launcher checks every rule below (it must, for memory safety)
  for a fraction of the Python cost; a call it rejects is re-checked by :func:`validate_kv_write`,
  which raises the error naming the argument, the dim and what was expected. A call whose
  addresses do not suit the kernel's vectors falls through to Triton.
* CUDA otherwise -> :func:`validate_kv_write`, then the Triton row kernel
  (``BLOCK = next_pow2(nope + rope)``).
* CPU -> :func:`validate_kv_write`, then :func:`mlakv.mem_cache.torch_ref.set_mla_kv_buffer_torch`.

The threshold and launch shape come from the per-GPU-family table in :mod:`mlakv.jit_kernel.tuning`;
nothing else in the library makes the routing decision.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch

from .torch_ref import set_mla_kv_buffer_torch

__all__ = [
    "SUPPORTED_DTYPES",
    "set_mla_kv_buffer_triton",
    "validate_kv_write",
    "check_loc_bounds",
    "kv_write_path",
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
_LOC_DTYPES = (torch.int32, torch.int64)
_SUPPORTED_SET = frozenset(SUPPORTED_DTYPES)
_LOC_SET = frozenset(_LOC_DTYPES)
_CHECK_BOUNDS_DEFAULT = os.environ.get("MLAKV_CHECK_BOUNDS", "0") not in ("", "0")


def _check_rows_tensor(name: str, t: object, n_what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() == 3:
        if t.shape[1] != 1:
            raise ValueError(f"{name}: dim 1 of a 3-D tensor must be 1 ([{n_what}, 1, D]), got shape {tuple(t.shape)}")
    elif t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [{n_what}, D] or 3-D [{n_what}, 1, D], got {t.dim()}-D shape {tuple(t.shape)}")
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        raise ValueError(f"{name}: the last dim must be contiguous (stride 1), got strides {tuple(t.stride())}")


def _explain_invalid(
    kv_buffer: torch.Tensor, loc: torch.Tensor, cache_k_nope: torch.Tensor, cache_k_rope: torch.Tensor
) -> None:
    """Find the first broken rule and raise its error (the slow path of :func:`validate_kv_write`)."""
    _check_rows_tensor("kv_buffer", kv_buffer, "num_slots")
    _check_rows_tensor("cache_k_nope", cache_k_nope, "n_loc")
    _check_rows_tensor("cache_k_rope", cache_k_rope, "n_loc")
    if not isinstance(loc, torch.Tensor):
        raise TypeError(f"loc must be a torch.Tensor, got {type(loc).__name__}")
    if loc.dim() != 1:
        raise ValueError(f"loc must be 1-D [n_loc], got {loc.dim()}-D shape {tuple(loc.shape)}")
    if loc.dtype not in _LOC_DTYPES:
        raise TypeError(f"loc must be int32 or int64, got {loc.dtype}")
    dtype = kv_buffer.dtype
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"kv_buffer dtype {dtype} is not supported; expected one of {SUPPORTED_DTYPES}")
    for name, t in (("cache_k_nope", cache_k_nope), ("cache_k_rope", cache_k_rope)):
        if t.dtype != dtype:
            raise TypeError(f"{name} dtype {t.dtype} does not match kv_buffer dtype {dtype} (no implicit cast)")
    device = kv_buffer.device
    for name, t in (("loc", loc), ("cache_k_nope", cache_k_nope), ("cache_k_rope", cache_k_rope)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but kv_buffer is on {device}")
    n_loc = loc.shape[0]
    for name, t in (("cache_k_nope", cache_k_nope), ("cache_k_rope", cache_k_rope)):
        if t.shape[0] != n_loc:
            raise ValueError(f"{name}: dim 0 is {t.shape[0]} but loc has n_loc={n_loc} entries")
    width = cache_k_nope.shape[-1] + cache_k_rope.shape[-1]
    if width > kv_buffer.shape[-1]:
        raise ValueError(
            f"kv_buffer: last dim is {kv_buffer.shape[-1]} but nope_dim + rope_dim = "
            f"{cache_k_nope.shape[-1]} + {cache_k_rope.shape[-1]} = {width} does not fit"
        )
    raise AssertionError("validate_kv_write: fast check failed but no rule is broken")  # pragma: no cover


def _rows_ok(t: torch.Tensor) -> bool:
    nd = t.ndim
    return (nd == 2 or (nd == 3 and t.shape[1] == 1)) and (t.stride(-1) == 1 or t.shape[-1] == 1)


def validate_kv_write(
    kv_buffer: torch.Tensor,
    loc: torch.Tensor,
    cache_k_nope: torch.Tensor,
    cache_k_rope: torch.Tensor,
) -> int:
    """Check a row write's arguments and return ``n_loc``; raise ``TypeError``/``ValueError`` naming what is wrong.

    Shapes: ``kv_buffer [num_slots, (1,) total]``, ``loc [n_loc]`` (int32/int64),
    ``cache_k_nope [n_loc, (1,) nope_dim]``, ``cache_k_rope [n_loc, (1,) rope_dim]``, one dtype
    for the three data tensors, one device for all four, ``nope_dim + rope_dim <= total``, last
    dims contiguous. Does not look at the values of ``loc`` (see :func:`check_loc_bounds`).

    The common (valid) case is one short boolean expression, since this runs on every layer's
    write; only a failure walks the rules one by one to name the broken one.
    """
    try:
        dtype = kv_buffer.dtype
        device = kv_buffer.device
        n_loc = loc.shape[0]
        ok = (
            cache_k_nope.dtype is dtype
            and cache_k_rope.dtype is dtype
            and dtype in _SUPPORTED_SET
            and loc.dtype in _LOC_SET
            and loc.ndim == 1
            and cache_k_nope.shape[0] == n_loc
            and cache_k_rope.shape[0] == n_loc
            and cache_k_nope.shape[-1] + cache_k_rope.shape[-1] <= kv_buffer.shape[-1]
            and _rows_ok(kv_buffer)
            and _rows_ok(cache_k_nope)
            and _rows_ok(cache_k_rope)
            and loc.device == device
            and cache_k_nope.device == device
            and cache_k_rope.device == device
        )
    except (AttributeError, IndexError, TypeError):
        ok = False
    if not ok:
        _explain_invalid(kv_buffer, loc, cache_k_nope, cache_k_rope)
    return n_loc


def check_loc_bounds(loc: torch.Tensor, num_slots: int) -> None:
    """Raise ``IndexError`` if any ``loc[i] >= num_slots`` (negative entries are padding). Syncs on GPU."""
    if loc.numel() == 0:
        return
    top = int(loc.max())
    if top >= num_slots:
        bad = int((loc >= num_slots).nonzero()[0, 0])
        raise IndexError(f"loc[{bad}] = {int(loc[bad])} is out of range for kv_buffer with num_slots={num_slots}")


# (device index, dtype, nope_dim, rope_dim) -> (jit writer or None, min n_loc for it)
_JIT_ROUTES: dict[tuple, tuple[Optional[Callable[..., bool]], int]] = {}
_NO_ROUTE: tuple[None, int] = (None, 1 << 62)


def _jit_route(kv_buffer: torch.Tensor, nope_dim: int, rope_dim: int) -> tuple[Optional[Callable[..., bool]], int]:
    key = (kv_buffer.get_device(), kv_buffer.dtype, nope_dim, rope_dim)
    route = _JIT_ROUTES.get(key)
    if route is None:
        route = _NO_ROUTE
        jit_enabled = os.environ.get("MLAKV_DISABLE_JIT", "0") in ("", "0")
        if jit_enabled and kv_buffer.is_cuda and kv_buffer.dtype in _SUPPORTED_SET:
            from mlakv import jit_kernel  # lazy: tvm-ffi and nvcc are only needed here

            es = kv_buffer.element_size()
            route = jit_kernel.jit_writer(kv_buffer.device, nope_dim * es, rope_dim * es) or _NO_ROUTE
        _JIT_ROUTES[key] = route
    return route


def kv_write_path(
    kv_buffer: torch.Tensor, loc: torch.Tensor, cache_k_nope: torch.Tensor, cache_k_rope: torch.Tensor
) -> str:
    """Name the path the dispatcher takes for these (valid) arguments: ``torch``, ``jit`` or ``triton``."""
    if not kv_buffer.is_cuda:
        return "torch"
    write, min_n = _jit_route(kv_buffer, cache_k_nope.shape[-1], cache_k_rope.shape[-1])
    if write is not None and loc.shape[0] >= min_n:
        from mlakv import jit_kernel

        if jit_kernel.jit_accepts_layout(kv_buffer, cache_k_nope, cache_k_rope):
            return "jit"
    return "triton"


def set_mla_kv_buffer_triton(
    kv_buffer: torch.Tensor,
    loc: torch.Tensor,
    cache_k_nope: torch.Tensor,
    cache_k_rope: torch.Tensor,
    *,
    check_bounds: Optional[bool] = None,
) -> None:
    """Write ``[k_nope | k_rope]`` rows into ``kv_buffer`` at slots ``loc``, on the fastest correct path.

    Args:
        kv_buffer: ``[num_slots, total]`` or ``[num_slots, 1, total]``, any row stride, last dim
            contiguous, ``total >= nope_dim + rope_dim`` (columns past the row are untouched).
        loc: ``[n_loc]`` int32 or int64 slot indices; ``loc[i] < 0`` marks a padding row (skipped).
        cache_k_nope: ``[n_loc, nope_dim]`` or ``[n_loc, 1, nope_dim]``, rows may be strided.
        cache_k_rope: ``[n_loc, rope_dim]`` or ``[n_loc, 1, rope_dim]``, rows may be strided.
        check_bounds: raise ``IndexError`` for ``loc >= num_slots`` before launching (syncs);
            defaults to the ``MLAKV_CHECK_BOUNDS`` environment variable.

    One dtype for the three data tensors (float16, bfloat16, float32, float8 e4m3fn/e5m2, uint8,
    int8); the copy is bit-exact. ``n_loc == 0`` returns without launching anything.
    """
    bounds = check_bounds if check_bounds is not None else _CHECK_BOUNDS_DEFAULT
    if not bounds and getattr(kv_buffer, "is_cuda", False) and _try_jit(kv_buffer, loc, cache_k_nope, cache_k_rope):
        return
    n_loc = validate_kv_write(kv_buffer, loc, cache_k_nope, cache_k_rope)
    if n_loc == 0:
        return
    if bounds:
        check_loc_bounds(loc, kv_buffer.shape[0])
    if not kv_buffer.is_cuda:
        set_mla_kv_buffer_torch(kv_buffer, loc, cache_k_nope, cache_k_rope)
        return
    if bounds and _try_jit(kv_buffer, loc, cache_k_nope, cache_k_rope):
        return
    _launch_triton(kv_buffer, loc, cache_k_nope, cache_k_rope)


def _try_jit(kv_buffer, loc, cache_k_nope, cache_k_rope) -> bool:
    """Write through the JIT kernel if the route table allows it; False if it did not launch.

    This is the hot path, so it does no Python validation: the JIT module's launcher enforces
    every rule :func:`validate_kv_write` does (it must, for memory safety) at a fraction of the
    cost. If the launcher rejects the call, the Python validator runs to name the broken rule.
    """
    try:
        write, min_n = _jit_route(kv_buffer, cache_k_nope.shape[-1], cache_k_rope.shape[-1])
        return write is not None and loc.shape[0] >= min_n and write(kv_buffer, loc, cache_k_nope, cache_k_rope)
    except (AttributeError, IndexError, TypeError, ValueError, RuntimeError):
        validate_kv_write(kv_buffer, loc, cache_k_nope, cache_k_rope)
        raise


def _launch_triton(kv_buffer, loc, cache_k_nope, cache_k_rope) -> None:
    from .triton_kernels import launch_set_kv_rows

    launch_set_kv_rows(kv_buffer, loc, cache_k_nope, cache_k_rope)
