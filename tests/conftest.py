"""Shared test helpers: the loop reference, input makers, and the GPU/JIT availability gates.

Without a CUDA device the Triton kernels run under the interpreter (``TRITON_INTERPRET=1`` on CPU
tensors); it must be set before the first ``@triton.jit`` decoration, hence here.
"""

from __future__ import annotations

import contextlib
import math
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


def compile_in_subprocess(script: str, payload) -> list:
    """Run ``script`` (it reads ``json.dumps(payload)`` as ``sys.argv[1]`` and prints a JSON list as its
    last line) in a fresh Python without ``TRITON_INTERPRET``, so Triton compiles for the GPU
    instead of interpreting; skips where Triton cannot assemble (no ptxas). Returns the list."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(payload)], env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    if proc.returncode and "ptxas" in proc.stderr.lower():  # pragma: no cover - a triton without ptxas
        pytest.skip(f"triton cannot assemble for sm_90 here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def e4m3_pair_repacks(ptx: str) -> list[str]:
    """``mov.b32 %r, {%rsA, %rsB}`` where one half is the result of a ``cvt.rn.satfinite.e4m3x2.f32``
    and the other is computed from it (``{pair, pair >> 8}``): ptxas 12.8/12.9 folds such a pack into
    the conversion (``F2FP ... MERGE_C`` with the other half as the merged operand) and computes
    that half before the conversion, from whatever register it finds (Triton 3.6 on the H200 stored
    bits of a source value as the second byte)."""
    import re

    cvt = set(re.findall(r"cvt\.rn\.satfinite\.e4m3x2\.f32\s+(%rs\d+)", ptx))
    deps: dict[str, set[str]] = {}
    for line in ptx.splitlines():
        m = re.match(r"\s*(?:@!?%p\d+\s+)?[a-z][\w.]*\s+(%r[sd]?\d+)\s*,(.*);", line)
        if m:  # a register and the registers it is computed from, through any width
            deps.setdefault(m.group(1), set()).update(re.findall(r"%r[sd]?\d+", m.group(2)))

    def reaches(reg: str, target: str, seen: set) -> bool:
        if reg == target:
            return True
        seen.add(reg)
        return any(reaches(d, target, seen) for d in deps.get(reg, ()) if d not in seen)

    return [f"{{{a}, {b}}}" for a, b in re.findall(r"mov\.b32\s+%r\d+,\s*\{(%rs\d+),\s*(%rs\d+)\}", ptx)
            if (a in cvt and reaches(b, a, set())) or (b in cvt and reaches(a, b, set()))]  # fmt: skip


def stale_e4m3_merges(sass: str) -> list[str]:
    """``F2FP ... MERGE_C`` instructions whose merged operand was last written (since the last label)
    by a right shift: the pack of :func:`e4m3_pair_repacks` miscompiled (the shift of the pair's
    own result cannot come before the conversion that makes it)."""
    import re

    last, bad = {}, []
    for raw in sass.splitlines():
        line = raw.split("*/")[-1].strip()
        if line.startswith("."):
            last = {}
            continue
        m = re.match(r"(?:@!?U?P\w+\s+)?([A-Z][\w.]*)\s+(.*);", line)
        if not m:
            continue
        op, args = m.groups()
        regs = [a.strip().split(".")[0] for a in args.split(",")]
        if op.startswith("F2FP") and "MERGE_C" in op and len(regs) >= 4 and regs[3] != "RZ":
            if last.get(regs[3], "").startswith("SHF.R"):
                bad.append(line)
        if regs and re.fullmatch(r"R\d+", regs[0]) and not op.startswith(("ST", "BRA", "CALL", "RET", "EXIT")):
            last[regs[0]] = op
    return bad


class FakeCudaTensor:
    """A DLPack description (shape, strides, dtype) of a CUDA tensor at a made-up address, so the
    built module's host launcher can be called without a GPU: only for calls that must return
    before any launch (its checks, the alignment refusal, zero rows). Nothing reads the address."""

    _DTYPES = {torch.uint8: (1, 8), torch.int32: (0, 32), torch.int64: (0, 64), torch.bfloat16: (4, 16),
               torch.float16: (2, 16), torch.float32: (2, 32)}  # fmt: skip

    def __init__(self, shape, dtype, strides=None, addr=1 << 20):
        import ctypes

        class Device(ctypes.Structure):
            _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]

        class DType(ctypes.Structure):
            _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]

        class Managed(ctypes.Structure):  # DLManagedTensor = DLTensor + manager_ctx + deleter
            _fields_ = [("data", ctypes.c_void_p), ("device", Device), ("ndim", ctypes.c_int32), ("dtype", DType),
                        ("shape", ctypes.POINTER(ctypes.c_int64)), ("strides", ctypes.POINTER(ctypes.c_int64)),
                        ("byte_offset", ctypes.c_uint64), ("manager_ctx", ctypes.c_void_p),
                        ("deleter", ctypes.c_void_p)]  # fmt: skip

        strides = strides or [math.prod(shape[i + 1 :]) for i in range(len(shape))]
        self._shape = (ctypes.c_int64 * len(shape))(*shape)
        self._strides = (ctypes.c_int64 * len(shape))(*strides)
        self._m = Managed(addr, Device(2, 0), len(shape), DType(*self._DTYPES[dtype], 1), self._shape, self._strides)
        self._new_capsule = ctypes.pythonapi.PyCapsule_New
        self._new_capsule.restype = ctypes.py_object
        self._new_capsule.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
        self._ctypes = ctypes

    def __dlpack_device__(self):
        return (2, 0)  # kDLCUDA, device 0

    def __dlpack__(self, *args, **kwargs):
        return self._new_capsule(self._ctypes.addressof(self._m), b"dltensor", None)


def write_tar_gz(path, files: dict) -> None:
    """A gzip tarball at ``path`` holding ``{name: text}`` (e.g. a fake source distribution)."""
    import io
    import tarfile

    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


# ---- --shard K/N: one part of the suite per run ------------------------------------------------------
def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--shard", default=None, metavar="K/N",
        help="run only shard K of N (1-based): whole test files, split into N parts of about equal test counts "
             "(the same split on every machine and worker, so N runs together run every test once)",
    )  # fmt: skip


def shard_files(counts: dict[str, int], n: int) -> list[list[str]]:
    """Split test files (``counts``: file -> number of tests) into ``n`` shards of about equal test counts:
    the largest file first, each to the shard holding the fewest tests so far (ties: the lower shard;
    files of equal count by name), so the split depends only on the collection."""
    shards: list[list[str]] = [[] for _ in range(n)]
    load = [0] * n
    for f in sorted(counts, key=lambda f: (-counts[f], f)):
        i = min(range(n), key=lambda s: (load[s], s))
        shards[i].append(f)
        load[i] += counts[f]
    return shards


def _parse_shard(spec: str) -> tuple[int, int]:
    try:
        k, n = (int(v) for v in spec.split("/"))
    except ValueError:
        raise pytest.UsageError(f"--shard: expected K/N with whole numbers (e.g. 1/2), got {spec!r}") from None
    if not 1 <= k <= n:
        raise pytest.UsageError(f"--shard: K must be in 1..N, got {spec!r}")
    return k, n


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    spec = config.getoption("--shard")
    if not spec:
        return
    k, n = _parse_shard(spec)
    counts: dict[str, int] = {}
    for item in items:
        f = item.nodeid.split("::", 1)[0]
        counts[f] = counts.get(f, 0) + 1
    keep = set(shard_files(counts, n)[k - 1])
    selected = [it for it in items if it.nodeid.split("::", 1)[0] in keep]
    deselected = [it for it in items if it.nodeid.split("::", 1)[0] not in keep]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
    items[:] = selected
