"""The original (pre-mlakv) Triton row-write kernel, kept only as the benchmark baseline.

BLOCK = 128 elements per program and a 2-D grid ``(n_loc, cdiv(nope + rope, 128))``: each program
copies one 128-element chunk of one row. It is deliberately not part of the library.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LEGACY_BLOCK = 128


@triton.jit
def _legacy_set_mla_kv_buffer_kernel(
    kv_ptr,
    nope_ptr,
    rope_ptr,
    loc_ptr,
    kv_stride,
    nope_stride,
    rope_stride,
    NOPE: tl.constexpr,
    ROPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid_row = tl.program_id(0)
    pid_blk = tl.program_id(1)
    slot = tl.load(loc_ptr + pid_row).to(tl.int64)
    offs = pid_blk * BLOCK + tl.arange(0, BLOCK)
    in_nope = offs < NOPE
    in_rope = (offs >= NOPE) & (offs < NOPE + ROPE)
    a = tl.load(nope_ptr + pid_row * nope_stride + offs, mask=in_nope)
    b = tl.load(rope_ptr + pid_row * rope_stride + (offs - NOPE), mask=in_rope)
    tl.store(kv_ptr + slot * kv_stride + offs, tl.where(in_nope, a, b), mask=offs < NOPE + ROPE)


def legacy_set_mla_kv_buffer(kv: torch.Tensor, loc: torch.Tensor, nope: torch.Tensor, rope: torch.Tensor) -> None:
    """``kv [S, (1,) total]``, ``loc [n]`` (all valid), ``nope [n, nope_dim]``, ``rope [n, rope_dim]``.

    Padding rows (``loc < 0``) are not supported, as in the original.
    """
    if nope.element_size() == 1 and nope.dtype != torch.uint8:
        kv, nope, rope = kv.view(torch.uint8), nope.view(torch.uint8), rope.view(torch.uint8)
    nope_dim, rope_dim = nope.shape[-1], rope.shape[-1]
    grid = (loc.shape[0], triton.cdiv(nope_dim + rope_dim, LEGACY_BLOCK))
    _legacy_set_mla_kv_buffer_kernel[grid](
        kv, nope, rope, loc, kv.stride(0), nope.stride(0), rope.stride(0),
        NOPE=nope_dim, ROPE=rope_dim, BLOCK=LEGACY_BLOCK,
    )
