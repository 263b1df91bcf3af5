"""Python entry of the JIT CUDA row-write kernel (``csrc/row_write.cuh``).

``can_use_set_mla_kv_buffer`` says whether the kernel can serve a row layout on a device;
``set_mla_kv_buffer`` is the direct, checked entry; the dispatcher in
:mod:`mlakv.ops.dispatch` takes a bound writer from :func:`jit_writer`.
One module is built per ``(nope_bytes, rope_bytes, use_pdl)``; it holds the int32/int64 loc,
TMA/direct-store and items-per-warp variants, and exports two functions:

* ``set_mla_kv_buffer(kv, loc, nope, rope, num_warps, items, use_tma, skip_index, dcp_world, dcp_rank)
  -> bool``: checks, then launches on the current stream (False: misaligned, nothing launched);
* ``check_set_mla_kv_buffer(kv, loc, nope, rope, dcp_world, dcp_rank) -> bool``: the launcher's
  checks alone, on tensors of any device (the rule-book parity test calls it on CPU tensors).

Validity rules come from :mod:`mlakv.spec.rules` (the one rule book); the C++ launcher keeps
its own copy of the memory-safety checks.
"""

from __future__ import annotations

import bisect
import functools
import logging
from typing import Any, Callable, Optional, Union

import torch

from mlakv.spec import rules

from .loader import JitUnavailable, load_cuda_module
from mlakv.spec.tuning import LaunchTuning, tuning_for

logger = logging.getLogger("mlakv.jit")

__all__ = [
    "can_use_set_mla_kv_buffer",
    "set_mla_kv_buffer",
    "set_mla_kv_buffer_unchecked",
    "jit_accepts_layout",
    "jit_writer",
    "bind_launch_shapes",
    "build_set_mla_kv_buffer_module",
]

_WRAPPER = """\
#include "row_write.cuh"

bool set_mla_kv_buffer(tvm::ffi::TensorView kv, tvm::ffi::TensorView loc, tvm::ffi::TensorView nope,
                       tvm::ffi::TensorView rope, int64_t num_warps, int64_t items, bool use_tma,
                       bool early_trigger, int64_t skip_index, int64_t dcp_world, int64_t dcp_rank) {{
  return mlakv::launch_set_mla_kv_buffer<{nope}, {rope}, {pdl}>(kv, loc, nope, rope, num_warps, items, use_tma,
                                                                 early_trigger, skip_index, dcp_world, dcp_rank);
}}
bool check_set_mla_kv_buffer(tvm::ffi::TensorView kv, tvm::ffi::TensorView loc, tvm::ffi::TensorView nope,
                             tvm::ffi::TensorView rope, int64_t dcp_world, int64_t dcp_rank) {{
  return mlakv::check_set_mla_kv_buffer<{nope}, {rope}>(kv, loc, nope, rope, dcp_world, dcp_rank);
}}
TVM_FFI_DLL_EXPORT_TYPED_FUNC(set_mla_kv_buffer, set_mla_kv_buffer);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(check_set_mla_kv_buffer, check_set_mla_kv_buffer);
"""


def build_set_mla_kv_buffer_module(
    nope_bytes: int, rope_bytes: int, use_pdl: bool, device_capability: Optional[tuple[int, int]] = None
) -> Any:
    """Compile (or load from cache) the module for one row layout; raises ``JitUnavailable``."""
    reason = rules.jit_widths_reason(nope_bytes, rope_bytes)
    if reason:
        raise JitUnavailable(reason)
    src = _WRAPPER.format(nope=nope_bytes, rope=rope_bytes, pdl="true" if use_pdl else "false")
    name = f"set_mla_kv_buffer_{nope_bytes}_{rope_bytes}_{'pdl' if use_pdl else 'nopdl'}"
    return load_cuda_module(name, src, device_capability=device_capability)


_warned: set[str] = set()


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        logger.warning("mlakv: JIT row-write kernel unavailable, using Triton: %s", reason)


@functools.lru_cache(maxsize=None)
def row_write_function(device_index: int, nope_bytes: int, rope_bytes: int) -> Any:
    """The loaded kernel function for a device, or the reason (str) it cannot be had."""
    major, minor = torch.cuda.get_device_capability(device_index)
    if major < 9:
        return f"GPU sm_{major}{minor} is older than SM90"
    try:
        mod = build_set_mla_kv_buffer_module(nope_bytes, rope_bytes, use_pdl=True, device_capability=(major, minor))
    except JitUnavailable as e:
        return str(e)
    return mod.set_mla_kv_buffer


def _device_index(device: Union[torch.device, str, int, None]) -> int:
    if device is None:
        return torch.cuda.current_device()
    d = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    return d.index if d.index is not None else torch.cuda.current_device()


def can_use_set_mla_kv_buffer(
    nope_bytes: int, rope_bytes: int, device: Union[torch.device, str, int, None] = None
) -> bool:
    """Whether the JIT kernel serves rows of ``nope_bytes + rope_bytes`` on ``device``.

    True when nope is a positive and rope a non-negative multiple of 4 bytes (0: rope-less rows),
    their sum a multiple of 16, the GPU is SM90+ and the module builds and loads. Otherwise False,
    with the reason logged once.
    """
    reason = rules.jit_widths_reason(nope_bytes, rope_bytes)
    if reason is None:
        if not torch.cuda.is_available():
            reason = "CUDA is not available"
        else:
            fn = row_write_function(_device_index(device), nope_bytes, rope_bytes)
            reason = fn if isinstance(fn, str) else None
    if reason is not None:
        _warn_once(reason)
        return False
    return True


def jit_accepts_layout(kv_buffer: torch.Tensor, cache_k_nope: torch.Tensor, cache_k_rope: torch.Tensor) -> bool:
    """Whether these (valid) tensors' addresses and row strides suit the kernel (see
    :func:`mlakv.spec.rules.jit_layout_reason`)."""
    return rules.jit_layout_reason(kv_buffer, cache_k_nope, cache_k_rope) is None


def jit_writer(device: torch.device, nope_bytes: int, rope_bytes: int) -> Optional[tuple[Callable[..., bool], int]]:
    """For the dispatcher: ``(write, min_n_loc)`` for this device and row layout, or None.

    ``write(kv_buffer, loc, cache_k_nope, cache_k_rope, skip_index, dcp_world_size, dcp_rank) -> bool``
    launches with the tuning table's shape for the call's n_loc (``skip_index``: a loc value to
    skip, -1 for none), and returns False (nothing launched) when the tensors' alignment does not
    suit the kernel. It raises ``TypeError``/``ValueError`` for arguments the launcher refuses.
    ``min_n_loc`` is the table's threshold.
    """
    if not can_use_set_mla_kv_buffer(nope_bytes, rope_bytes, device):
        return None
    fn = row_write_function(_device_index(device), nope_bytes, rope_bytes)
    tune = tuning_for(device)
    return bind_launch_shapes(fn, tune), tune.min_n_loc


def bind_launch_shapes(fn: Callable[..., bool], tune: LaunchTuning) -> Callable[..., bool]:
    """``write(kv_buffer, loc, cache_k_nope, cache_k_rope, skip_index, dcp_world_size, dcp_rank)``
    calling the module function ``fn`` with ``tune``'s launch shape for ``loc.shape[0]`` rows.

    This is the hot path of every eager write: the shapes are bound as constants (one step: no
    branch; two steps: one comparison; more: one bisect), and the closure takes positional
    arguments only. The benchmark (:mod:`mlakv.bench.host_cost`) binds a stub ``fn`` to time it.
    """
    launch = tune.launch
    if len(tune.steps) == 1:  # one launch shape for every n_loc
        w, i, t, e = launch(0)

        def write(kv_buffer, loc, cache_k_nope, cache_k_rope, skip_index=-1, dcp_world_size=1, dcp_rank=0) -> bool:
            return fn(kv_buffer, loc, cache_k_nope, cache_k_rope, w, i, t, e, skip_index, dcp_world_size, dcp_rank)

    elif len(tune.steps) == 2:  # two shapes: one comparison on n_loc
        b0 = tune.steps[0].max_n_loc
        w0, i0, t0, e0 = launch(b0)
        w1, i1, t1, e1 = launch(1 << 62)

        def write(kv_buffer, loc, cache_k_nope, cache_k_rope, skip_index=-1, dcp_world_size=1, dcp_rank=0) -> bool:
            if loc.shape[0] <= b0:
                return fn(kv_buffer, loc, cache_k_nope, cache_k_rope, w0, i0, t0, e0, skip_index, dcp_world_size, dcp_rank)
            return fn(kv_buffer, loc, cache_k_nope, cache_k_rope, w1, i1, t1, e1, skip_index, dcp_world_size, dcp_rank)

    else:  # a few steps by n_loc: one bisect per call
        bounds = [s.max_n_loc for s in tune.steps[:-1]]
        shapes = [launch(b) for b in bounds] + [launch(1 << 62)]

        def write(kv_buffer, loc, cache_k_nope, cache_k_rope, skip_index=-1, dcp_world_size=1, dcp_rank=0) -> bool:
            w, i, t, e = shapes[bisect.bisect_left(bounds, loc.shape[0])]
            return fn(kv_buffer, loc, cache_k_nope, cache_k_rope, w, i, t, e, skip_index, dcp_world_size, dcp_rank)

    return write


def set_mla_kv_buffer_unchecked(
    kv_buffer: torch.Tensor,
    loc: torch.Tensor,
    cache_k_nope: torch.Tensor,
    cache_k_rope: torch.Tensor,
    num_warps: int = 0,
    items_per_warp: int = 0,
    use_tma: Optional[bool] = None,
    *,
    early_trigger: Optional[bool] = None,
    reserved_skip_index: Optional[int] = None,
    dcp_world_size: int = 1,
    dcp_rank: int = 0,
) -> bool:
    """Launch with optional launch-shape overrides (0/None: the tuning table's choice). Used by
    :func:`set_mla_kv_buffer` and the benchmark's variant sweep; the dispatcher uses :func:`jit_writer`.

    No Python validation (the module's launcher still checks memory safety and raises). Returns
    False, launching nothing, when the module is unavailable or the tensors' alignment does not
    suit the kernel, so the caller can fall back.
    """
    es = kv_buffer.element_size()
    fn = row_write_function(_device_index(kv_buffer.device), cache_k_nope.shape[-1] * es, cache_k_rope.shape[-1] * es)
    if isinstance(fn, str):
        return False
    warps, items, tma, early = tuning_for(kv_buffer.device).launch(loc.shape[0])
    skip = -1 if reserved_skip_index is None else reserved_skip_index
    return bool(
        fn(
            kv_buffer,
            loc,
            cache_k_nope,
            cache_k_rope,
            num_warps or warps,
            items_per_warp or items,
            tma if use_tma is None else use_tma,
            early if early_trigger is None else early_trigger,
            skip,
            dcp_world_size,
            dcp_rank,
        )
    )


def set_mla_kv_buffer(
    kv_buffer: torch.Tensor,
    loc: torch.Tensor,
    cache_k_nope: torch.Tensor,
    cache_k_rope: Optional[torch.Tensor],
    num_warps: int = 0,
    *,
    items_per_warp: int = 0,
    use_tma: Optional[bool] = None,
    reserved_skip_index: Optional[int] = None,
    dcp_world_size: int = 1,
    dcp_rank: int = 0,
) -> None:
    """Write ``[k_nope | k_rope]`` rows at ``loc`` with the JIT CUDA kernel (the direct, checked entry).

    Args:
        kv_buffer: ``[num_slots, total]`` or ``[num_slots, 1, total]`` on an SM90+ GPU; the row
            stride and base address must be multiples of 16 bytes.
        loc: ``[n_loc]`` int32/int64, any stride (read as ``loc[i * stride]``); ``loc[i] < 0`` and
            ``loc[i] == reserved_skip_index`` rows are skipped, as are rows landing past
            ``num_slots`` (unchecked).
        cache_k_nope: ``[n_loc, (1,) nope_dim]``; cache_k_rope: ``[n_loc, (1,) rope_dim]``,
            ``[n_loc, 0]`` or None (rope-less rows).
        num_warps: warps per CTA; 0 picks from the tuning table.
        items_per_warp: rows per warp (1, 2, 4); 0 picks from the tuning table.
        use_tma: bulk-store (True) or direct-store (False) variant; None picks from the table.
        dcp_world_size, dcp_rank: decode context parallelism: only rows with
            ``loc % dcp_world_size == dcp_rank`` are written, at row ``loc // dcp_world_size``.

    Raises ``ValueError``/``TypeError`` for bad arguments and ``RuntimeError`` if the kernel
    cannot be used here (see :func:`can_use_set_mla_kv_buffer`).
    """
    if cache_k_rope is None and isinstance(cache_k_nope, torch.Tensor):
        cache_k_rope = cache_k_nope[..., :0]
    if not rules.kv_write_ok(kv_buffer, loc, cache_k_nope, cache_k_rope):
        rules.explain_kv_write(kv_buffer, loc, cache_k_nope, cache_k_rope)
    rules.check_dcp(dcp_world_size, dcp_rank)
    if not kv_buffer.is_cuda:
        raise ValueError(f"kv_buffer must be a CUDA tensor for the JIT kernel, got {kv_buffer.device}")
    reason = rules.jit_layout_reason(kv_buffer, cache_k_nope, cache_k_rope)
    if reason is not None:
        raise ValueError(reason)
    if loc.shape[0] == 0:
        return
    es = kv_buffer.element_size()
    if not can_use_set_mla_kv_buffer(cache_k_nope.shape[-1] * es, cache_k_rope.shape[-1] * es, kv_buffer.device):
        raise RuntimeError("the JIT row-write kernel cannot be used on this device/layout (reason logged)")
    if not set_mla_kv_buffer_unchecked(
        kv_buffer,
        loc,
        cache_k_nope,
        cache_k_rope,
        num_warps,
        items_per_warp,
        use_tma,
        reserved_skip_index=reserved_skip_index,
        dcp_world_size=dcp_world_size,
        dcp_rank=dcp_rank,
    ):
        raise RuntimeError("the JIT row-write kernel refused the call (alignment); nothing was written")
