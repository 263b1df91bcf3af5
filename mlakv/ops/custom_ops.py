"""torch custom ops for the pool's kernels, so ``torch.compile(fullgraph=True)`` sees them as one node each.

The dispatcher, the gather, ``move_kv_cache`` and the HiCache row copy are Python that reads
environment flags, caches, ``data_ptr``s and launches Triton or JIT kernels: Dynamo cannot trace
them and would break the graph at every layer's KV write. Registered here as torch library ops
(a schema whose ``Tensor(a!)`` marks the buffers written, a ``CompositeExplicitAutograd`` kernel,
a fake implementation giving shapes without running anything), a compiled model calls them as
opaque ops: one node per call, auto-functionalized, capturable in a CUDA graph.

Why ``torch.library.Library.define``/``impl`` and not the ``@torch.library.custom_op`` decorator:
the decorator wraps every call in Python autograd, ADInplaceOrView and default-filling layers,
about 30 us of host time per call on this machine's CPU; a plain library kernel costs the C++
dispatcher's trip into Python. ``python -m mlakv.bench.custom_op_cost`` measures it: on the 2-core
CI CPU the write's op adds ~3.4 us per call over the direct call, of which ~2.7 us is torch's floor
for any Python-implemented op (an empty kernel of the same schema: argument parsing against the
schema, the boxed dispatch, the call back into Python); the rest is the kernel's Python frame and
the version bump. Below that floor only a C++ kernel would go; under a CUDA graph replay the
op costs nothing. Aten ops called inside a Python kernel also run slower than outside it (~1 us
each here), which is why the CPU (torch-path) write costs more through the op; the GPU paths call
no aten op inside. The kernels bump the version counter of what they write themselves, as the
decorator would.

The pool (:class:`~mlakv.mem_cache.memory_pool.MLATokenToKVPool`) goes through these ops only
while ``torch.compiler.is_compiling()``; eager callers keep the direct call.

Ops (namespace ``mlakv``):

* ``set_mla_kv_buffer(kv_buffer!, loc, cache_k_nope, cache_k_rope, check_bounds, reserved_skip_index,
  dcp_world_size, dcp_rank)``
* ``get_mla_kv_buffer(kv_buffer, loc, nope_dim, rope_dim, check_bounds) -> (nope, rope)``
* ``move_kv_cache(kv_buffers![], tgt_loc, src_loc, check_bounds, disjoint)``
* ``copy_rows(src, dst!, src_idx, dst_idx, row_bytes, src_layout, dst_layout)`` (HiCache transfers)

Every op validates its arguments with the same rules (:mod:`mlakv.spec.rules`) and raises the same
exceptions as its Python function (:func:`~mlakv.ops.dispatch.set_mla_kv_buffer_triton`,
:func:`gather_rows`, :func:`~mlakv.ops.move.move_kv_cache`, :func:`copy_rows`); every fake
implementation checks the same argument rules (those that do not read values) and gives the real
output shapes. No argument makes an op read or write outside its tensors.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .dispatch import set_mla_kv_buffer_triton, validate_kv_write
from mlakv.spec import rules
from .reference import get_mla_kv_buffer_torch

__all__ = ["set_mla_kv_buffer_op", "get_mla_kv_buffer_op", "move_kv_cache_op", "copy_rows_op", "gather_rows", "copy_rows"]


# ---- the row write ---------------------------------------------------------------------------


_LIB = torch.library.Library("mlakv", "DEF")  # kept alive for the process: it owns the registrations


def _bump(*written: torch.Tensor) -> None:
    """Bump the version counter of tensors an op wrote (autograd's check for in-place changes).

    ``torch._C._increment_version`` (a sequence of tensors; inference tensors, which have no
    counter, are left alone) is what ``torch.autograd.graph.increment_version`` calls after its
    Python-side argument handling: called directly, ~0.27 us instead of ~0.42 us per tensor here.
    """
    torch._C._increment_version(written)


def _register(schema: str, kernel, fake) -> torch._ops.OpOverload:
    """Define ``mlakv::<schema>``, give it ``kernel`` for every backend and ``fake`` for tracing; return the op.

    Returned is the ``.default`` overload: a call skips the overload packet's Python layer.
    """
    name = schema.split("(", 1)[0]
    _LIB.define(schema)
    _LIB.impl(name, kernel, "CompositeExplicitAutograd")
    torch.library.register_fake(f"mlakv::{name}", fake, lib=_LIB)
    return getattr(torch.ops.mlakv, name).default


def _set_kernel(
    kv_buffer: torch.Tensor,
    loc: torch.Tensor,
    cache_k_nope: torch.Tensor,
    cache_k_rope: torch.Tensor,
    check_bounds: bool = False,
    reserved_skip_index: Optional[int] = None,
    dcp_world_size: int = 1,
    dcp_rank: int = 0,
) -> None:
    """The dispatcher as an op: ``kv_buffer[loc[i]] = [cache_k_nope[i] | cache_k_rope[i]]``.

    Shapes as :func:`~mlakv.ops.dispatch.set_mla_kv_buffer_triton`: ``kv_buffer
    [num_slots, (1,) total]``, ``loc [n_loc]``, ``cache_k_nope [n_loc, (1,) nope_dim]``,
    ``cache_k_rope [n_loc, (1,) rope_dim]``; the keywords mean what they mean there.
    """
    set_mla_kv_buffer_triton(
        kv_buffer, loc, cache_k_nope, cache_k_rope, check_bounds=check_bounds,
        reserved_skip_index=reserved_skip_index, dcp_world_size=dcp_world_size, dcp_rank=dcp_rank,
    )
    _bump(kv_buffer)


def _set_fake(
    kv_buffer, loc, cache_k_nope, cache_k_rope, check_bounds=False, reserved_skip_index=None, dcp_world_size=1, dcp_rank=0
) -> None:
    # The argument rules look at dtypes, shapes, strides and devices only: they hold on fake tensors,
    # so a bad call fails while tracing, naming the argument, not at run time inside the graph.
    validate_kv_write(kv_buffer, loc, cache_k_nope, cache_k_rope)
    rules.check_dcp(dcp_world_size, dcp_rank)


set_mla_kv_buffer_op = _register(
    "set_mla_kv_buffer(Tensor(a!) kv_buffer, Tensor loc, Tensor cache_k_nope, Tensor cache_k_rope, "
    "bool check_bounds=False, int? reserved_skip_index=None, int dcp_world_size=1, int dcp_rank=0) -> ()",
    _set_kernel,
    _set_fake,
)


# ---- the gather ------------------------------------------------------------------------------


def gather_rows(
    kv_buffer: torch.Tensor, loc: torch.Tensor, nope_dim: int, rope_dim: int, check_bounds: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``kv_buffer[loc]`` as ``([n_loc, nope_dim], [n_loc, rope_dim])`` in ``kv_buffer``'s dtype.

    The gather rule: a padding slot (``< 0``) gives a zero row; a slot ``>= num_slots`` raises
    ``IndexError`` when checked (``check_bounds``, always on CPU) and gives a zero row unchecked on
    the GPU. Nothing outside ``kv_buffer`` is ever read. The pool's gather is this function
    (eagerly) or its op (while compiling). ``loc``: ``[n_loc]`` int32/int64, any stride.
    ``kv_buffer``: ``[num_slots, (1,) total]``; ``nope_dim >= 1``, ``rope_dim >= 0`` with
    ``nope_dim + rope_dim <= total`` (:func:`mlakv.spec.rules.check_gather`).
    """
    rules.check_gather(kv_buffer, loc, nope_dim, rope_dim)
    num_slots = kv_buffer.shape[0]
    if (check_bounds or not kv_buffer.is_cuda) and loc.numel():
        top = int(loc.max())
        if top >= num_slots:
            i = int((loc >= num_slots).nonzero()[0, 0])
            raise IndexError(f"loc[{i}] = {int(loc[i])} is out of range for a gather from num_slots={num_slots}")
    if kv_buffer.is_cuda:
        from mlakv.kernels.triton.row_write import launch_get_kv_rows

        return launch_get_kv_rows(kv_buffer, loc, nope_dim, rope_dim)
    return get_mla_kv_buffer_torch(kv_buffer, loc, nope_dim, rope_dim)


def _gather_kernel(
    kv_buffer: torch.Tensor, loc: torch.Tensor, nope_dim: int, rope_dim: int, check_bounds: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`gather_rows` as an op (new tensors ``[n_loc, nope_dim]``, ``[n_loc, rope_dim]``)."""
    return gather_rows(kv_buffer, loc, nope_dim, rope_dim, check_bounds)


def _gather_fake(kv_buffer, loc, nope_dim, rope_dim, check_bounds=False):
    rules.check_gather(kv_buffer, loc, nope_dim, rope_dim)
    n = loc.shape[0]
    return kv_buffer.new_empty((n, nope_dim)), kv_buffer.new_empty((n, rope_dim))


get_mla_kv_buffer_op = _register(
    "get_mla_kv_buffer(Tensor kv_buffer, Tensor loc, int nope_dim, int rope_dim, bool check_bounds=False) "
    "-> (Tensor, Tensor)",
    _gather_kernel,
    _gather_fake,
)


# ---- move_kv_cache ---------------------------------------------------------------------------


def _move_kernel(
    kv_buffers: list[torch.Tensor],
    tgt_loc: torch.Tensor,
    src_loc: torch.Tensor,
    check_bounds: bool = False,
    disjoint: bool = False,
) -> None:
    """:func:`mlakv.ops.move.move_kv_cache` as an op (every layer, pre-move semantics)."""
    from .move import move_kv_cache

    move_kv_cache(kv_buffers, tgt_loc, src_loc, check_bounds=check_bounds, disjoint=disjoint)
    _bump(*kv_buffers)


def _move_fake(kv_buffers, tgt_loc, src_loc, check_bounds=False, disjoint=False) -> None:
    from .move import check_move_args

    check_move_args(kv_buffers, tgt_loc, src_loc)


move_kv_cache_op = _register(
    "move_kv_cache(Tensor(a!)[] kv_buffers, Tensor tgt_loc, Tensor src_loc, bool check_bounds=False, "
    "bool disjoint=False) -> ()",
    _move_kernel,
    _move_fake,
)


# ---- HiCache row copy ------------------------------------------------------------------------


def _copy_rows_torch(
    src: torch.Tensor, dst: torch.Tensor, src_idx: torch.Tensor, dst_idx: torch.Tensor, row_bytes: int,
    src_layout: Sequence[int], dst_layout: Sequence[int],
) -> None:
    """CPU path of ``copy_rows``: the same byte addressing as the Triton kernel, in torch (slots checked)."""
    def offsets(idx: torch.Tensor, layout: Sequence[int]) -> torch.Tensor:
        page, page_stride, row_stride = layout
        idx = idx.to(torch.long)
        start = (idx // page) * page_stride + (idx % page) * row_stride
        return start[:, None] + torch.arange(row_bytes)

    s = src.view(torch.uint8).reshape(-1)  # contiguous buffers (as the kernel requires)
    d = dst.view(torch.uint8).reshape(-1)
    d[offsets(dst_idx, dst_layout)] = s[offsets(src_idx, src_layout)]


def copy_rows(
    src: torch.Tensor,
    dst: torch.Tensor,
    src_idx: torch.Tensor,
    dst_idx: torch.Tensor,
    row_bytes: int,
    src_layout: Sequence[int],
    dst_layout: Sequence[int],
    *,
    max_programs: Optional[int] = None,
) -> None:
    """HiCache's row copy ``dst[dst_idx[i]] = src[src_idx[i]]`` (``row_bytes`` each).

    ``src``/``dst``: contiguous buffers (device or pinned host); ``src_idx``/``dst_idx``: ``[n]``
    int32/int64 token slots, any stride, on the device the copy runs on; layouts ``(page_size,
    page_stride_bytes, row_stride_bytes)``: slot ``t`` starts at byte ``(t // page_size) *
    page_stride + (t % page_size) * row_stride`` (:func:`mlakv.spec.rules.check_copy_rows`). A slot
    whose ``row_bytes`` are not all inside its buffer (a negative one included) raises
    ``IndexError`` before anything is written on the CPU (both buffers there); on CUDA the Triton
    kernel (:func:`mlakv.kernels.triton.transfer.launch_copy_rows`) skips it unchecked.
    ``max_programs`` bounds the kernel's persistent grid (None: the transfer's SM budget,
    :data:`~mlakv.kernels.triton.transfer.DEFAULT_MAX_PROGRAMS`; a device-local gather passes more).
    """
    rules.check_copy_rows(src, dst, src_idx, dst_idx, row_bytes, src_layout, dst_layout)
    if src.is_cuda or dst.is_cuda:
        from mlakv.kernels.triton.transfer import launch_copy_rows

        extra = {} if max_programs is None else {"max_programs": rules.check_int_arg(max_programs, "max_programs", 1)}
        launch_copy_rows(src, dst, src_idx, dst_idx, row_bytes, tuple(src_layout), tuple(dst_layout), **extra)
        return
    for name, idx, buf, lay in (("src_idx", src_idx, src, src_layout), ("dst_idx", dst_idx, dst, dst_layout)):
        i = rules.copy_rows_bad_unit(idx, lay, row_bytes, buf.numel() * buf.element_size())
        if i is not None:
            raise IndexError(
                f"{name}[{i}] = {int(idx[i])}: its {row_bytes} bytes at layout {tuple(lay)} are not inside "
                f"{name[:3]} ({buf.numel() * buf.element_size()} bytes)"
            )
    _copy_rows_torch(src, dst, src_idx, dst_idx, row_bytes, src_layout, dst_layout)


def _copy_rows_kernel(
    src: torch.Tensor,
    dst: torch.Tensor,
    src_idx: torch.Tensor,
    dst_idx: torch.Tensor,
    row_bytes: int,
    src_layout: list[int],
    dst_layout: list[int],
) -> None:
    """:func:`copy_rows` as an op."""
    copy_rows(src, dst, src_idx, dst_idx, row_bytes, src_layout, dst_layout)
    _bump(dst)


def _copy_rows_fake(src, dst, src_idx, dst_idx, row_bytes, src_layout, dst_layout) -> None:
    rules.check_copy_rows(src, dst, src_idx, dst_idx, row_bytes, src_layout, dst_layout)


copy_rows_op = _register(
    "copy_rows(Tensor src, Tensor(a!) dst, Tensor src_idx, Tensor dst_idx, int row_bytes, int[] src_layout, "
    "int[] dst_layout) -> ()",
    _copy_rows_kernel,
    _copy_rows_fake,
)
