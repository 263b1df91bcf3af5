"""The KV-row write dispatcher: the one function that decides how a row write runs.

``set_mla_kv_buffer_triton(kv_buffer, loc, cache_k_nope, cache_k_rope)`` keeps the name existing
callers know. What is valid is decided by the rule book, :mod:`mlakv.spec.rules`; this module
only routes each call:

* CUDA, bounds not checked, JIT kernel usable for this (device, dtype, widths) and ``n_loc`` at or
  above the GPU family's threshold -> the compiled CUDA kernel (:func:`mlakv.kernels.cuda.row_write.jit_writer`).
  This is the hot path: it does no Python validation; the kernel module's launcher checks every
  rule (it must, for memory safety) for a fraction of the Python cost. A call it refuses is
  re-checked by the rule book, which raises the error naming the argument, the dim and what was
  expected. A call whose addresses do not suit the kernel's vectors falls through to Triton.
  The pool binds this route once (:func:`jit_route`) and calls it without coming here.
* CUDA otherwise -> the rule book's check, the optional bounds check, then the JIT kernel (when
  bounds were checked) or the Triton row kernel (``BLOCK = next_pow2(nope + rope)``).
* A source of another dtype than ``kv_buffer`` (a converting write) never takes the JIT kernel (a
  byte copy): on CUDA it runs on the Triton row kernel, which converts in registers.
* CPU -> the rule book's check, the bounds check (always: it costs nothing there, and it makes a
  bad ``loc`` raise before anything is written), then
  :func:`mlakv.ops.reference.set_mla_kv_buffer_torch`.

Row selection is one rule on every path: ``loc`` is read at its own stride; rows with ``loc < 0``
(padding), ``loc == reserved_skip_index`` or, under decode context parallelism, another rank's
``loc`` are skipped; a kept row lands at ``loc // dcp_world_size``. No path writes outside
``kv_buffer``: unchecked GPU calls skip rows landing past it.

The threshold and launch shape come from the per-GPU-family table in :mod:`mlakv.spec.tuning`;
nothing else in the library makes the routing decision.

The fused RoPE write (:mod:`mlakv.ops.rope_write`) is routed here too (:func:`rope_write_path`,
:func:`run_rope_write`): torch on CPU (run by that module: its reference), the JIT CUDA kernel where it
builds and the call's alignment suits it, else Triton.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from mlakv import _env
from mlakv.spec import rules
from mlakv.spec.calls import RopeWriteCall, V4StoreCall
from mlakv.spec.rules import SUPPORTED_DTYPES, check_loc_bounds
from .reference import set_mla_kv_buffer_torch

__all__ = [
    "SUPPORTED_DTYPES",
    "set_mla_kv_buffer_triton",
    "validate_kv_write",
    "check_loc_bounds",
    "kv_write_path",
    "jit_route",
    "rope_write_path",
    "run_rope_write",
    "write_rows",
    "NO_JIT",
]

_SUPPORTED_SET = frozenset(SUPPORTED_DTYPES)


def validate_kv_write(
    kv_buffer: torch.Tensor,
    loc: torch.Tensor,
    cache_k_nope: torch.Tensor,
    cache_k_rope: torch.Tensor,
) -> int:
    """Check a row write's arguments against the rule book and return ``n_loc``.

    Shapes: ``kv_buffer [num_slots, (1,) total]``, ``loc [n_loc]`` (int32/int64, any stride),
    ``cache_k_nope [n_loc, (1,) nope_dim]``, ``cache_k_rope [n_loc, (1,) rope_dim]`` (``rope_dim``
    may be 0). Raises ``TypeError``/``ValueError`` naming the argument and dim (see
    :mod:`mlakv.spec.rules`). Does not look at the values of ``loc`` (see :func:`check_loc_bounds`).
    The valid case is one boolean expression; only a failure walks the rules one by one.
    """
    if not rules.kv_write_ok(kv_buffer, loc, cache_k_nope, cache_k_rope):
        rules.explain_kv_write(kv_buffer, loc, cache_k_nope, cache_k_rope)
    return loc.shape[0]


# (device index, dtype, nope_dim, rope_dim) -> (jit writer or None, min n_loc for it)
_JIT_ROUTES: dict[tuple, tuple[Optional[Callable[..., bool]], int]] = {}
NO_JIT: tuple[None, int] = (None, 1 << 62)  # the route table's entry where the JIT kernel does not serve


def _jit_route(kv_buffer: torch.Tensor, nope_dim: int, rope_dim: int) -> tuple[Optional[Callable[..., bool]], int]:
    key = (kv_buffer.get_device(), kv_buffer.dtype, nope_dim, rope_dim)
    return _JIT_ROUTES.get(key) or _new_jit_route(key, kv_buffer)


def _new_jit_route(key: tuple, kv_buffer: torch.Tensor) -> tuple[Optional[Callable[..., bool]], int]:
    """Decide and remember the route of ``key = (device index, dtype, nope_dim, rope_dim)``."""
    nope_dim, rope_dim = key[2], key[3]
    route = NO_JIT
    if not _env.DISABLE_JIT and kv_buffer.is_cuda and kv_buffer.dtype in _SUPPORTED_SET:
        from mlakv.kernels.cuda import row_write  # lazy: tvm-ffi and nvcc are only needed here

        es = kv_buffer.element_size()
        route = row_write.jit_writer(kv_buffer.device, nope_dim * es, rope_dim * es) or NO_JIT
    _JIT_ROUTES[key] = route
    return route


def jit_route(kv_buffer: torch.Tensor, nope_dim: int, rope_dim: int) -> tuple[Optional[Callable[..., bool]], int]:
    """The route table's entry for unchecked CUDA writes into ``kv_buffer`` of ``[n_loc, (1,) nope_dim]``
    + ``[n_loc, (1,) rope_dim]`` rows: ``(write, min_n_loc)``, ``write`` None when the JIT kernel
    does not serve them.

    For a caller that binds this decision once per buffer layout (the pool's hot path): for a call
    with bounds unchecked, ``n_loc >= min_n_loc`` and sources of ``kv_buffer``'s dtype,
    ``write(kv_buffer, loc, cache_k_nope, cache_k_rope, skip_index, dcp_world_size, dcp_rank)`` is
    what :func:`set_mla_kv_buffer_triton` runs (``skip_index`` -1 for none). When it returns False or
    raises, nothing was written: the caller then calls :func:`set_mla_kv_buffer_triton`, which
    falls back or names the broken rule.
    """
    return _jit_route(kv_buffer, nope_dim, rope_dim)


def kv_write_path(
    kv_buffer: torch.Tensor,
    loc: torch.Tensor,
    cache_k_nope: torch.Tensor,
    cache_k_rope: Optional[torch.Tensor],
) -> str:
    """Name the path the dispatcher takes for these (valid) arguments: ``torch``, ``jit`` or ``triton``."""
    if not kv_buffer.is_cuda:
        return "torch"
    rope_dim = 0 if cache_k_rope is None else cache_k_rope.shape[-1]
    write, min_n = _jit_route(kv_buffer, cache_k_nope.shape[-1], rope_dim)
    if write is not None and loc.shape[0] >= min_n:
        rope = cache_k_nope[..., :0] if cache_k_rope is None else cache_k_rope
        if rules.jit_layout_reason(kv_buffer, cache_k_nope, rope) is None:
            return "jit"
    return "triton"


def set_mla_kv_buffer_triton(
    kv_buffer: torch.Tensor,
    loc: torch.Tensor,
    cache_k_nope: torch.Tensor,
    cache_k_rope: Optional[torch.Tensor] = None,
    *,
    check_bounds: Optional[bool] = None,
    reserved_skip_index: Optional[int] = None,
    dcp_world_size: int = 1,
    dcp_rank: int = 0,
) -> None:
    """Write ``[k_nope | k_rope]`` rows into ``kv_buffer`` at slots ``loc``, on the fastest correct path.

    Args:
        kv_buffer: ``[num_slots, total]`` or ``[num_slots, 1, total]``, any row stride (rows may not
            overlap), last dim contiguous, ``total >= nope_dim + rope_dim`` (columns past the row are
            untouched). Only rows of this view are ever written.
        loc: ``[n_loc]`` int32 or int64 slot indices, any stride (strided, expanded and offset
            views are honoured: entry ``i`` is ``loc[i]`` as torch reads it). Logical slots: with
            ``dcp_world_size > 1`` the row lands at ``loc // dcp_world_size``.
        cache_k_nope: ``[n_loc, nope_dim]`` or ``[n_loc, 1, nope_dim]``, rows may be strided.
        cache_k_rope: ``[n_loc, rope_dim]`` or ``[n_loc, 1, rope_dim]``, rows may be strided;
            ``[n_loc, 0]`` or None for rope-less rows.
        check_bounds: raise ``IndexError`` before writing anything if a kept row lands at
            ``>= num_slots`` (syncs on GPU); defaults to ``MLAKV_CHECK_BOUNDS``. Always on for CPU
            tensors. Unchecked GPU calls skip such rows (never a write outside ``kv_buffer``).
        reserved_skip_index: a slot value whose rows are skipped like padding (sglang's reserved
            padding slot, 0 by default there); None: only ``loc < 0`` is padding.
        dcp_world_size, dcp_rank: decode context parallelism: this rank writes only rows with
            ``loc % dcp_world_size == dcp_rank``, at row ``loc // dcp_world_size``.

    ``kv_buffer`` is float16, bfloat16, float32, float8 e4m3fn/e5m2, uint8 or int8. A source of the
    same dtype is copied bit-exactly; a 16/32-bit float source into a 16/32-bit float buffer of another
    dtype is converted inside the write (round to nearest even, bit-identical to ``src.to(dtype)`` for
    every non-NaN value; a NaN stays a NaN), one launch and no temporary on the GPU (Triton; the
    JIT kernel is a byte copy and takes same-dtype calls only). Other dtype pairs raise ``TypeError``.
    ``n_loc == 0`` returns without launching anything. A slot that several kept rows target holds
    unspecified contents afterwards: on the GPU the rows are written concurrently, so it may mix
    pieces (16-byte vectors) of those rows.

    A source may be a view of ``kv_buffer`` itself (moving rows within the cache): the write stores
    the source *as it was before the call* on every path. Such a source is detected by its address
    (:func:`mlakv.spec.rules.source_aliases`) and copied first; other calls pay one address compare.
    """
    if cache_k_rope is None and isinstance(cache_k_nope, torch.Tensor):
        cache_k_rope = cache_k_nope[..., :0]
    cache_k_nope, cache_k_rope = unaliased_sources(kv_buffer, cache_k_nope, cache_k_rope)
    if (
        (reserved_skip_index is not None and type(reserved_skip_index) is not int)
        or type(dcp_world_size) is not int
        or type(dcp_rank) is not int
        or not 0 <= dcp_rank < dcp_world_size
    ):  # a few type checks on the hot path; the slow path names the bad option
        rules.check_row_selection(reserved_skip_index, dcp_world_size, dcp_rank)
    skip = -1 if reserved_skip_index is None or reserved_skip_index < 0 else reserved_skip_index
    bounds = check_bounds if check_bounds is not None else _env.CHECK_BOUNDS
    write_rows(kv_buffer, loc, cache_k_nope, cache_k_rope, bounds, skip, dcp_world_size, dcp_rank)


def unaliased_sources(kv_buffer, cache_k_nope, cache_k_rope, span: Optional[tuple[int, int]] = None):
    """``(cache_k_nope, cache_k_rope)``, each replaced by a copy if it may alias ``kv_buffer``'s bytes
    (:func:`mlakv.spec.rules.source_aliases`; ``span`` the buffer's storage span if known). Non-tensors
    pass through (the rule book names them later)."""
    if not isinstance(kv_buffer, torch.Tensor):
        return cache_k_nope, cache_k_rope
    if span is None:
        span = rules.storage_span(kv_buffer)
    if isinstance(cache_k_nope, torch.Tensor) and rules.source_aliases(kv_buffer, cache_k_nope, span):
        cache_k_nope = cache_k_nope.clone()
    if isinstance(cache_k_rope, torch.Tensor) and rules.source_aliases(kv_buffer, cache_k_rope, span):
        cache_k_rope = cache_k_rope.clone()
    return cache_k_nope, cache_k_rope


def write_rows(
    kv_buffer: torch.Tensor,
    loc: torch.Tensor,
    cache_k_nope: torch.Tensor,
    cache_k_rope: torch.Tensor,
    bounds: bool,
    skip: int,
    dcp_world_size: int,
    dcp_rank: int,
    jit: Optional[tuple[Optional[Callable[..., bool]], int]] = None,
) -> None:
    """The row write with its options already checked: what :func:`set_mla_kv_buffer_triton` and every
    bound route (:mod:`mlakv.ops.route`) run. ``skip`` is -1 for none; ``jit`` the route table's
    entry when the caller bound it (None: looked up here, on CUDA only). The callers have replaced a
    source that aliases ``kv_buffer`` by a copy (:func:`unaliased_sources`): no kernel reads a row
    it may already have written.
    """
    if not bounds and (jit is not None or getattr(kv_buffer, "is_cuda", False)) and try_jit(
        kv_buffer, loc, cache_k_nope, cache_k_rope, skip, dcp_world_size, dcp_rank, jit
    ):
        return
    n_loc = validate_kv_write(kv_buffer, loc, cache_k_nope, cache_k_rope)
    if n_loc == 0:
        return
    on_gpu = kv_buffer.is_cuda
    if bounds or not on_gpu:
        check_loc_bounds(
            loc, kv_buffer.shape[0], reserved_skip_index=None if skip < 0 else skip,
            dcp_world_size=dcp_world_size, dcp_rank=dcp_rank,
        )
    if not on_gpu:
        set_mla_kv_buffer_torch(
            kv_buffer, loc, cache_k_nope, cache_k_rope,
            reserved_skip_index=None if skip < 0 else skip, dcp_world_size=dcp_world_size, dcp_rank=dcp_rank,
        )
        return
    if bounds and try_jit(kv_buffer, loc, cache_k_nope, cache_k_rope, skip, dcp_world_size, dcp_rank, jit):
        return
    from mlakv.kernels.triton.row_write import launch_set_kv_rows

    launch_set_kv_rows(kv_buffer, loc, cache_k_nope, cache_k_rope, skip_index=skip, dcp_world_size=dcp_world_size, dcp_rank=dcp_rank)


def try_jit(kv_buffer, loc, cache_k_nope, cache_k_rope, skip, dcp_world_size, dcp_rank, jit=None) -> bool:
    """Write through the JIT kernel if the route table (or the caller's bound entry ``jit``) allows it;
    False if it did not launch.

    This is the hot path, so it does no Python validation: the JIT module's launcher enforces
    every rule of the rule book (it must, for memory safety) at a fraction of the cost. If the
    launcher refuses the call, the rule book runs to name the broken rule.
    """
    try:
        dt = kv_buffer.dtype  # each tensor attribute read costs ~0.1 us: read once, route table inline
        if jit is None:
            key = (kv_buffer.get_device(), dt, cache_k_nope.shape[-1], cache_k_rope.shape[-1])
            jit = _JIT_ROUTES.get(key) or _new_jit_route(key, kv_buffer)
        write, min_n = jit
        return (
            write is not None
            and cache_k_nope.dtype is dt  # the kernel copies bytes: a converting write is Triton's
            and cache_k_rope.dtype is dt
            and (min_n == 0 or loc.shape[0] >= min_n)
            and write(kv_buffer, loc, cache_k_nope, cache_k_rope, skip, dcp_world_size, dcp_rank)
        )
    except (AttributeError, IndexError, TypeError, ValueError, RuntimeError):
        validate_kv_write(kv_buffer, loc, cache_k_nope, cache_k_rope)
        raise


# ---- the DSA indexer K cache (mlakv.ops.indexer) ------------------------------------------------
def indexer_backend(device: torch.device) -> str:
    """The backend of the indexer K cache's store and gather on ``device``: ``torch`` (CPU), ``jit``
    (a CUDA device of SM90+ whose module builds, ``MLAKV_DISABLE_JIT`` off) or ``triton``. A call
    the JIT kernel declines (source rows not on 16 bytes) runs on Triton (:mod:`mlakv.ops.indexer`)."""
    if device.type != "cuda":
        return "torch"
    if not _env.DISABLE_JIT:
        from mlakv.kernels.cuda.indexer import indexer_jit_available  # lazy: tvm-ffi and nvcc only here

        if indexer_jit_available(device):
            return "jit"
    return "triton"


# ---- the fused RoPE write (mlakv.ops.rope_write): the one place that picks its path ----------------
def rope_write_path(kv_buffer: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor, kv_cache_format: Optional[str]) -> str:
    """The path the fused RoPE write takes for these (valid) arguments: ``torch`` (CPU), ``jit`` (the
    CUDA kernel builds for this device and layout; a call whose alignment does not suit its vectors
    still runs on Triton) or ``triton``."""
    if not kv_buffer.is_cuda:
        return "torch"
    if not _env.DISABLE_JIT:
        from mlakv.kernels.cuda.rope_write import rope_write_module

        mod = rope_write_module(kv_buffer.get_device(), kv_cache_format, k_nope.dtype, k_nope.shape[-1], k_pe.shape[-1])
        if not isinstance(mod, str):
            return "jit"
    return "triton"


def run_rope_write(call: RopeWriteCall) -> str:
    """Run a validated (and, where asked, bounds-checked) fused RoPE write of CUDA tensors on its path;
    returns the path taken: the JIT CUDA kernel where it serves the call, else Triton. (CPU tensors
    take the reference, in :mod:`mlakv.ops.rope_write`.) ``call`` holds the arguments of
    :func:`mlakv.ops.rope_write.set_mla_kv_buffer_rope` after its checks (scales as 1-element fp32
    tensors or None, ``skip_index`` -1 for none)."""
    if not call.kv_buffer.is_cuda:
        raise ValueError("kv_buffer is on the CPU: the fused RoPE write's CPU path is the reference (mlakv.ops.rope_write)")
    if not _env.DISABLE_JIT:
        from mlakv.kernels.cuda.rope_write import rope_write_cuda

        if rope_write_cuda(call):
            return "jit"
    from mlakv.kernels.triton.rope_write import launch_rope_write

    launch_rope_write(call)
    return "triton"


# ---- the DeepSeek-V4 family's paged caches (mlakv.ops.v4): the one place that picks their path ------
def v4_store_path(kv_pages: torch.Tensor, layout: str) -> str:
    """The path the V4-family store takes for pages on this device: ``torch`` (CPU), ``jit`` (the CUDA
    module of ``layout``'s encoding builds for this SM90+ device, ``MLAKV_DISABLE_JIT`` off; a call
    whose alignment does not suit its 16-byte vectors still runs on Triton) or ``triton``."""
    if not kv_pages.is_cuda:
        return "torch"
    if not _env.DISABLE_JIT:
        from mlakv.kernels.cuda.v4_store import v4_store_module  # lazy: tvm-ffi and nvcc only here

        if not isinstance(v4_store_module(kv_pages.device, layout), str):
            return "jit"
    return "triton"


def run_v4_store(call: V4StoreCall, layout: str, page_size: int, geometry: dict, encoding: int) -> str:
    """Run a validated (and, where asked, bounds-checked) V4-family store on its path; returns the path
    taken: ``torch`` on CPU (the reference), else the JIT CUDA kernel where it serves the call, else
    Triton. ``call`` holds the arguments of :func:`mlakv.ops.v4.set_v4_kv_buffer` after its checks
    (``skip_index`` -1 for none); beside it the layout's kernel ``geometry`` and token ``encoding``
    (0 v4, 1 v41, 2 v41_fp4)."""
    if not call.kv_pages.is_cuda:
        from . import v4_reference as ref

        kv_pages, loc, kv, freqs_cis, positions, cos_sin_cache, skip, dcp_world_size, dcp_rank = call
        cos = sin = None
        if freqs_cis is not None or positions is not None:
            cos, sin = ref.rope_cos_sin(loc.shape[0], freqs_cis=freqs_cis, positions=positions, cos_sin_cache=cos_sin_cache)
        ref.set_v4_kv_buffer_torch(
            kv_pages, loc, kv, layout, page_size, cos=cos, sin=sin, reserved_skip_index=None if skip < 0 else skip,
            dcp_world_size=dcp_world_size, dcp_rank=dcp_rank,
        )  # fmt: skip
        return "torch"
    if not _env.DISABLE_JIT and rules.v4_jit_layout_reason(call.kv_pages, call.kv, call.freqs_cis, call.cos_sin_cache) is None:
        from mlakv.kernels.cuda.v4_store import v4_jit_store

        if v4_jit_store(call, layout, page_size):
            return "jit"
    from mlakv.kernels.triton.v4_store import launch_v4_store

    launch_v4_store(call, encoding=encoding, **geometry)
    return "triton"


def run_v4_gather(kv_pages: torch.Tensor, loc: torch.Tensor, layout: str, page_size: int, geometry: dict, encoding: int) -> torch.Tensor:
    """Run a validated V4-family gather: the reference on CPU, the Triton kernel on CUDA (a gather is
    not on the hot path; it has no CUDA kernel of its own). Returns ``[n, 512]`` bf16."""
    if not kv_pages.is_cuda:
        from .v4_reference import get_v4_kv_buffer_torch

        return get_v4_kv_buffer_torch(kv_pages, loc, layout, page_size)
    from mlakv.kernels.triton.v4_store import launch_v4_gather

    return launch_v4_gather(kv_pages, loc, encoding=encoding, **geometry)
