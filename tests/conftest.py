"""Shared test helpers: the loop reference, input makers, and the GPU/JIT availability gates.

Without a CUDA device the Triton kernels run under the interpreter (``TRITON_INTERPRET=1`` on CPU
tensors); it must be set before the first ``@triton.jit`` decoration, hence here.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

IS_SM90 = HAS_CUDA and torch.cuda.get_device_capability()[0] >= 9
DEVICE = "cuda" if HAS_CUDA else "cpu"

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (none present)")
requires_sm90 = pytest.mark.skipif(not IS_SM90, reason="needs an SM90+ GPU (none present)")

try:  # triton is optional on CPU-only platforms; its tests skip without it
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False
requires_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

_BIT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """Same-width integer view: compare with ``torch.equal`` for a bit-exact check (NaN-safe)."""
    return t.view(_BIT[t.element_size()])


def random_rows(n: int, d: int, dtype: torch.dtype, device=DEVICE, gen: torch.Generator | None = None) -> torch.Tensor:
    """Fresh random ``[n, d]`` data: normal values for 2/4-byte floats, random bytes otherwise."""
    if dtype in (torch.float16, torch.bfloat16, torch.float32):
        return torch.randn(n, d, generator=gen).to(dtype).to(device)
    raw = torch.randint(0, 256, (n, d), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).to(device) if dtype != torch.int8 else raw.view(torch.int8).to(device)


def poisoned_buffer(num_slots: int, total: int, dtype: torch.dtype, device=DEVICE, three_d: bool = False) -> torch.Tensor:
    """A destination filled with random bytes (never zeros), so unwritten or misplaced rows show."""
    width = total * torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (num_slots, width), dtype=torch.uint8, device=device)
    buf = raw.view(dtype)
    return buf.view(num_slots, 1, total) if three_d else buf


def random_loc(n: int, num_slots: int, dtype: torch.dtype, device=DEVICE) -> torch.Tensor:
    """``n`` distinct slots in random order."""
    return torch.randperm(num_slots)[:n].to(dtype).to(device)


def reference_write(kv: torch.Tensor, loc: torch.Tensor, nope: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """The spec, row by row on the CPU: returns the expected buffer (a new tensor)."""
    out = bits(kv.detach().cpu()).clone()
    out2 = out.view(out.shape[0], -1) if out.dim() == 3 else out
    n_src = bits(nope.detach().cpu()).reshape(nope.shape[0], -1)
    r_src = bits(rope.detach().cpu()).reshape(rope.shape[0], -1)
    dn, dr = n_src.shape[1], r_src.shape[1]
    for i, slot in enumerate(loc.cpu().tolist()):
        if slot >= 0:
            out2[slot, :dn] = n_src[i]
            out2[slot, dn : dn + dr] = r_src[i]
    return out


def assert_bits_equal(actual: torch.Tensor, expected_bits: torch.Tensor) -> None:
    a = bits(actual.detach().cpu())
    if not torch.equal(a, expected_bits):
        diff = (a != expected_bits).reshape(a.shape[0], -1).any(dim=1).nonzero().flatten()
        raise AssertionError(f"{diff.numel()} rows differ, first rows: {diff[:8].tolist()}")


def assert_pages_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Byte pages (``[num_pages, page_bytes]`` uint8) equal ``expected`` (CPU), else the differing bytes."""
    a = actual.detach().cpu()
    if not torch.equal(a, expected):
        bad = (a != expected).nonzero()
        raise AssertionError(f"{bad.shape[0]} bytes differ, first (page, byte): {bad[:8].tolist()}")


JIT_BUILD_REQUIRED = os.environ.get("MLAKV_REQUIRE_JIT_BUILD", "0") not in ("", "0")


def jit_toolchain_missing() -> str | None:
    """Why the CUDA sources cannot be built here (no tvm-ffi, no nvcc), or None."""
    try:
        import tvm_ffi  # noqa: F401
    except ImportError:
        return "apache-tvm-ffi is not installed"
    from mlakv.jit_kernel import find_cuda_home

    return None if find_cuda_home() is not None else "nvcc is not available"


def require_jit_toolchain() -> None:
    """Skip without tvm-ffi/nvcc, or fail where ``MLAKV_REQUIRE_JIT_BUILD=1`` (CI) says they must be there."""
    missing = jit_toolchain_missing()
    if missing:
        if JIT_BUILD_REQUIRED:
            pytest.fail(f"MLAKV_REQUIRE_JIT_BUILD=1 but {missing}")
        pytest.skip(missing)


@contextlib.contextmanager
def sm90a_build_env():
    """:func:`require_jit_toolchain`, then builds target sm_90a (unless ``TVM_FFI_CUDA_ARCH_LIST`` says
    otherwise) inside the block: the CUDA sources compile and load without a GPU."""
    require_jit_toolchain()
    old = os.environ.get("TVM_FFI_CUDA_ARCH_LIST")
    os.environ.setdefault("TVM_FFI_CUDA_ARCH_LIST", "9.0a")
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TVM_FFI_CUDA_ARCH_LIST", None)


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """``mlakv.cli.main(argv)`` in-process: (exit code, stdout, stderr); argparse's SystemExit becomes the code."""
    from mlakv.cli import main

    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err
