"""A pool's write and gather, bound once for its layout: the pool's hot path is one call into here.

:func:`bind` takes what a pool knows at construction — its cache format (:mod:`mlakv.spec.formats`),
its buffers, the row-selection options (reserved slot, DCP rank) and its bounds policy — and returns a
:class:`Route` whose :meth:`Route.write` and :meth:`Route.gather` are what ``set_kv_buffer`` and
``get_mla_kv_buffer`` call. Which kernel runs is still decided by the one dispatcher
(:mod:`mlakv.ops.dispatch` for the row copy, :mod:`mlakv.ops.fp8` for the quantized rows); the route
only remembers the decisions that cannot change for the pool (the JIT writer of its row layout is
learnt on the first eager CUDA write, since building it may take seconds) and takes the op path while
``torch.compile`` traces.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from mlakv.spec import formats as _formats
from mlakv.spec import rules

from . import custom_ops as _ops
from . import dispatch, fp8

__all__ = ["Route", "bind"]


class Route:
    """The write and gather of one pool layout. Built by :func:`bind`; see the module docstring.

    Attributes:
        fmt: the cache format.
        jit: the dispatcher's JIT entry ``(write, min_n_loc)`` for the raw-row format, learnt on the
            first eager write (None until then; :data:`mlakv.ops.dispatch.NO_JIT` where it does not serve).
        ds_mla_scale_rule: the tile-scale rule of a ``ds_mla`` route (:mod:`mlakv.ops.fp8`).
    """

    __slots__ = (
        "fmt", "dtype", "buffers", "views", "nope_dim", "rope_dim", "check_bounds", "skip", "dcp_world_size",
        "dcp_rank", "k_scale", "jit", "spans", "ds_mla_scale_rule",
    )  # fmt: skip

    def __init__(
        self,
        fmt: _formats.CacheFormat,
        dtype: torch.dtype,
        buffers: list[torch.Tensor],
        views: list[torch.Tensor],
        *,
        check_bounds: bool,
        reserved_skip_index: Optional[int],
        dcp_world_size: int,
        dcp_rank: int,
        k_scale: Optional[torch.Tensor],
        ds_mla_scale_rule: str = "fp32_floor",
    ) -> None:
        self.fmt = fmt
        self.dtype = dtype
        self.buffers = buffers
        self.views = views
        self.nope_dim = fmt.nope_dim
        self.rope_dim = fmt.rope_dim
        self.check_bounds = check_bounds
        self.skip = -1 if reserved_skip_index is None or reserved_skip_index < 0 else reserved_skip_index
        self.dcp_world_size = dcp_world_size
        self.dcp_rank = dcp_rank
        self.k_scale = k_scale
        self.ds_mla_scale_rule = ds_mla_scale_rule
        self.jit: Optional[tuple] = None
        # each layer's storage span: a source starting inside it is a view of the cache (see write)
        self.spans = [rules.storage_span(b) for b in buffers]

    # ---- write ---------------------------------------------------------------------------------
    def write(self, layer: int, loc: torch.Tensor, k_nope: torch.Tensor, k_rope: torch.Tensor) -> None:
        """Write ``[k_nope | k_rope]`` rows (``[n_loc, (1,) nope_dim]``, ``[n_loc, (1,) rope_dim]``) of
        local layer ``layer`` at slots ``loc`` (``[n_loc]``), in the pool's format.

        A source that is a view of the layer's buffer (rows moved within the cache) is copied first,
        so the rows written are the source as it was before the call on every path; the test is two
        address compares against the span kept at bind time (none while compiling: the op's kernel
        does the same test when it runs)."""
        jit = self.jit
        lo, hi = self.spans[layer]
        hot = (  # an eager, unchecked write of unaliased rows, with the JIT kernel learnt for this layout
            jit is not None
            and jit[0] is not None
            and not self.check_bounds
            and not (lo <= k_nope.data_ptr() < hi or lo <= k_rope.data_ptr() < hi)
            and not torch.compiler.is_compiling()
        )
        if hot and dispatch.try_jit(
            self.views[layer], loc, k_nope, k_rope, self.skip, self.dcp_world_size, self.dcp_rank, jit
        ):  # fmt: skip
            return
        fmt = self.fmt
        if not torch.compiler.is_compiling():
            if lo <= k_nope.data_ptr() < hi or lo <= k_rope.data_ptr() < hi:
                k_nope, k_rope = dispatch.unaliased_sources(self.buffers[layer], k_nope, k_rope, (lo, hi))
        if fmt.scale_kind != "none" and (k_nope.dtype in fp8.SOURCE_DTYPES or fmt.name == "ds_mla"):
            fp8.set_mla_kv_buffer_quant(
                self.buffers[layer], loc, k_nope, k_rope, fmt.name, self.k_scale,
                check_bounds=self.check_bounds, reserved_skip_index=None if self.skip < 0 else self.skip,
                ds_mla_scale_rule=self.ds_mla_scale_rule,
            )  # fmt: skip
            return
        if not (rules.source_dtype_ok(k_nope.dtype, self.dtype) and rules.source_dtype_ok(k_rope.dtype, self.dtype)):
            raise TypeError(
                f"cache_k_nope/cache_k_rope must be {self.dtype} (the pool dtype), or a 16/32-bit float into a "
                f"16/32-bit float pool (converted in the write), got {k_nope.dtype}/{k_rope.dtype}; "
                "quantize before writing"
            )
        kv = self.views[layer]
        if torch.compiler.is_compiling():  # one opaque op node: no graph break
            _ops.set_mla_kv_buffer_op(
                kv, loc, k_nope, k_rope, self.check_bounds, None if self.skip < 0 else self.skip,
                self.dcp_world_size, self.dcp_rank,
            )  # fmt: skip
            return
        if jit is None:  # the first eager write learns the JIT entry of this layout (may build the kernel)
            jit = self.jit = dispatch.jit_route(kv, self.nope_dim, self.rope_dim) if kv.is_cuda else dispatch.NO_JIT
        # a call the JIT kernel declined above (misaligned, converting, short) is not offered to it again
        dispatch.write_rows(
            kv, loc, k_nope, k_rope, self.check_bounds, self.skip, self.dcp_world_size, self.dcp_rank,
            dispatch.NO_JIT if hot else jit,
        )  # fmt: skip

    # ---- gather --------------------------------------------------------------------------------
    def gather(
        self, layer: int, loc: torch.Tensor, dst_dtype: Optional[torch.dtype] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``loc`` (``[n_loc]`` physical rows) of local layer ``layer`` as ``(k_nope [n_loc,
        nope_dim], k_rope [n_loc, rope_dim])`` in the pool dtype (or ``dst_dtype``); a quantized
        format dequantizes in the gather (default bf16)."""
        fmt = self.fmt
        if fmt.scale_kind != "none":
            return fp8.get_mla_kv_buffer_dequant(
                self.buffers[layer], loc, fmt.name, self.nope_dim, self.rope_dim, self.k_scale,
                dst_dtype or torch.bfloat16, check_bounds=self.check_bounds,
            )  # fmt: skip
        buf = self.buffers[layer]
        gather = _ops.get_mla_kv_buffer_op if torch.compiler.is_compiling() else _ops.gather_rows
        nope, rope = gather(buf, loc, self.nope_dim, self.rope_dim, self.check_bounds)
        if buf.dtype != self.dtype:
            nope, rope = nope.view(self.dtype), rope.view(self.dtype)
        if dst_dtype is not None and dst_dtype != nope.dtype:
            nope, rope = nope.to(dst_dtype), rope.to(dst_dtype)
        return nope, rope


def bind(
    fmt: _formats.CacheFormat,
    dtype: torch.dtype,
    buffers: list[torch.Tensor],
    *,
    check_bounds: bool,
    reserved_skip_index: Optional[int] = None,
    dcp_world_size: int = 1,
    dcp_rank: int = 0,
    k_scale: Union[torch.Tensor, None] = None,
    ds_mla_scale_rule: str = "fp32_floor",
) -> Route:
    """Bind the write and gather of a pool whose layers are ``buffers`` (each ``fmt.buffer_shape``, in
    ``fmt.store_dtype``) and whose values are ``dtype``; ``ds_mla_scale_rule``: the tile-scale rule of
    a ``ds_mla`` format (``"fp32_floor"``, ``"fp32"``, ``"ue8m0"``; :mod:`mlakv.ops.fp8`), which
    other formats take only as the default.

    The options are checked here, once (``TypeError``/``ValueError`` naming the option): the route's
    calls do not check them again.
    """
    if not isinstance(fmt, _formats.CacheFormat):
        raise TypeError(f"fmt must be a CacheFormat, got {type(fmt).__name__}")
    if fmt.paged:
        raise ValueError(f"format {fmt.name!r} is block-split into pages; its pool binds its own family's ops")
    if not isinstance(check_bounds, bool):
        raise TypeError(f"check_bounds must be a bool, got {type(check_bounds).__name__}")
    rules.check_row_selection(reserved_skip_index, dcp_world_size, dcp_rank)
    rules.check_ds_mla_scale_rule(ds_mla_scale_rule)
    if fmt.name != "ds_mla" and ds_mla_scale_rule != "fp32_floor":
        raise ValueError(f"ds_mla_scale_rule={ds_mla_scale_rule!r} applies to the 'ds_mla' format only, not {fmt.name!r}")
    # A quantized row is mixed bytes (attention reads uint8); raw rows are written in the pool dtype.
    views = list(buffers) if fmt.name == "ds_mla" else [b.view(dtype) if b.dtype != dtype else b for b in buffers]
    return Route(
        fmt, dtype, list(buffers), views, check_bounds=check_bounds, reserved_skip_index=reserved_skip_index,
        dcp_world_size=dcp_world_size, dcp_rank=dcp_rank, k_scale=k_scale, ds_mla_scale_rule=ds_mla_scale_rule,
    )  # fmt: skip
