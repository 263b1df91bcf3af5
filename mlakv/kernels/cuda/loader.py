"""The one place that knows how to JIT-build mlakv's CUDA sources through apache-tvm-ffi.

Modules are compiled on first use with nvcc for the current GPU (``sm_90a`` on Hopper; the
``TVM_FFI_CUDA_ARCH_LIST`` environment variable overrides, e.g. ``"9.0a"`` to build on a machine
with no GPU), cached in this process and on disk. The disk cache lives under ``MLAKV_CACHE_DIR``
if set, else tvm-ffi's own cache (``TVM_FFI_CACHE_DIR`` or ``~/.cache/tvm-ffi``); a module's
directory name hashes its generated source, the ``.cuh`` files it includes, the flags and the
architecture, so an edited kernel never loads a stale binary.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from mlakv import _env

logger = logging.getLogger("mlakv.jit")

CSRC_DIR = Path(__file__).resolve().parent / "csrc"
_MODULES: dict[str, Any] = {}
_LIBRARIES: dict[str, Path] = {}  # the shared library each of _MODULES was loaded from
_LOCK = threading.Lock()
_WARNED: set[tuple[str, str]] = set()


class JitUnavailable(RuntimeError):
    """The JIT path cannot be used here (no tvm-ffi, no nvcc, a failed build, an older GPU)."""


def find_cuda_home() -> Optional[str]:
    """CUDA toolkit root: ``CUDA_HOME``, ``CUDA_PATH``, the nvcc on ``PATH``, then ``/usr/local/cuda``."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if home and _is_cuda_home(Path(home)):
            return home
    return None


def _is_cuda_home(home: Path) -> bool:
    # A toolkit root has nvcc, the runtime headers and libcudart (what the module links against).
    return (
        (home / "bin" / "nvcc").exists()
        and (home / "include" / "cuda_runtime.h").exists()
        and any((home / lib).glob("libcudart.so*") for lib in ("lib64", "lib"))
    )


def cuda_arch_list(device_capability: Optional[tuple[int, int]] = None) -> str:
    """The ``TVM_FFI_CUDA_ARCH_LIST`` value to build for: the environment's, else the device's.

    Hopper and newer get the arch-specific ``a`` target (``9.0a``), which the bulk-copy and
    griddepcontrol instructions are built for.
    """
    env = os.environ.get("TVM_FFI_CUDA_ARCH_LIST")
    if env:
        return env
    if device_capability is None:
        import torch

        if not torch.cuda.is_available():
            raise JitUnavailable("no CUDA device and TVM_FFI_CUDA_ARCH_LIST is not set")
        device_capability = torch.cuda.get_device_capability()
    major, minor = device_capability
    return f"{major}.{minor}{'a' if major >= 9 else ''}"


def _source_digest(source: str, flags: list[str], arch: str, extra_include_paths: Sequence[Path] = ()) -> str:
    h = hashlib.sha256()
    h.update(source.encode())
    for cuh in sorted(CSRC_DIR.glob("*.cuh")):
        h.update(cuh.name.encode())
        h.update(cuh.read_bytes())
    for inc in extra_include_paths:  # headers a caller's source includes from elsewhere
        for f in sorted(p for p in Path(inc).rglob("*") if p.suffix in (".h", ".cuh", ".hpp") and p.is_file()):
            h.update(str(f.relative_to(inc)).encode())
            h.update(f.read_bytes())
    h.update(repr((flags, arch)).encode())
    try:
        import tvm_ffi

        h.update(str(getattr(tvm_ffi, "__version__", "")).encode())
    except ImportError:
        pass
    return h.hexdigest()[:16]


def _cache_root() -> Path:
    root = _env.path("MLAKV_CACHE_DIR") or os.environ.get("TVM_FFI_CACHE_DIR") or "~/.cache/tvm-ffi"
    return Path(root).expanduser()


def load_cuda_module(
    name: str,
    cuda_source: str,
    *,
    device_capability: Optional[tuple[int, int]] = None,
    cxx_std: str = "c++17",
    extra_flags: Sequence[str] = (),
    extra_include_paths: Sequence[Path] = (),
) -> Any:
    """Build (or fetch from cache) and load a tvm-ffi module from ``cuda_source``.

    ``cuda_source`` may ``#include`` any header in ``csrc/`` and in ``extra_include_paths`` (used
    by the benchmark to build a peer's kernel from source the user fetched; their headers join
    the cache key). ``cxx_std`` and ``extra_flags`` (e.g. ``-DNAME=1``) go to nvcc. Raises
    :class:`JitUnavailable` with the reason when tvm-ffi or nvcc is missing or the build fails.
    """
    arch = cuda_arch_list(device_capability)
    flags = ["-O3", f"-std={cxx_std}", "--expt-relaxed-constexpr", "-lineinfo", *extra_flags]
    extra_include_paths = [Path(p) for p in extra_include_paths]
    key = f"{name}:{arch}"
    with _LOCK:
        if key in _MODULES:
            return _MODULES[key]
        try:
            import tvm_ffi
            import tvm_ffi.cpp
        except ImportError as e:
            raise JitUnavailable(f"apache-tvm-ffi is not importable ({e})") from e
        cuda_home = find_cuda_home()
        if cuda_home is None:
            raise JitUnavailable("nvcc not found (looked at CUDA_HOME, CUDA_PATH, PATH, /usr/local/cuda)")
        build_dir = _cache_root() / f"mlakv_{name}_{_source_digest(cuda_source, flags, arch, extra_include_paths)}"
        saved = {k: os.environ.get(k) for k in ("CUDA_HOME", "TVM_FFI_CUDA_ARCH_LIST")}
        os.environ["CUDA_HOME"] = cuda_home
        os.environ["TVM_FFI_CUDA_ARCH_LIST"] = arch
        t0 = time.perf_counter()
        fresh = not (build_dir / f"{name}.so").exists()
        if fresh:  # a first build takes seconds: say so before, not only after
            logger.info("mlakv: compiling %s for %s (first use; cached afterwards)", name, arch)
        build_dir.mkdir(parents=True, exist_ok=True)
        lock = open(build_dir.with_name(build_dir.name + ".lock"), "w")  # noqa: SIM115 - held across the build
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process building the same module: wait, then reuse it
            lib = tvm_ffi.cpp.build_inline(
                name=name,
                cuda_sources=cuda_source,
                extra_cuda_cflags=flags,
                extra_ldflags=[f"-Wl,-rpath,{Path(cuda_home) / 'lib64'}"],
                extra_include_paths=[str(CSRC_DIR), *map(str, extra_include_paths)],
                build_directory=str(build_dir),
                backend="cuda",
            )
            module = tvm_ffi.load_module(lib)
        except Exception as e:  # the compiler's message is the useful part
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            errors = [ln for ln in lines if "error" in ln.lower()] or lines[-6:]
            raise JitUnavailable(f"building {name} for {arch} failed: {' | '.join(errors[:6])}") from e
        finally:
            lock.close()  # releases the lock
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        if fresh:
            logger.info("mlakv: compiled %s for %s in %.1f s (%s)", name, arch, time.perf_counter() - t0, build_dir)
        _MODULES[key] = module
        _LIBRARIES[key] = Path(lib)
        return module


def library_of(module: Any) -> Path:
    """The shared library a module of :func:`load_cuda_module` was loaded from: its machine code, for
    the tests that read it (:func:`mlakv.testing.sm90.sass_functions`). Raises ``KeyError`` for any
    other object."""
    for key, loaded in _MODULES.items():
        if loaded is module:
            return _LIBRARIES[key]
    raise KeyError("not a module loaded by load_cuda_module")


def sm90_module(device_index: int, what: str, build: Callable[[tuple[int, int]], Any]) -> Union[str, Any]:
    """``build(device_capability)`` for an SM90+ device, or the reason (str) it cannot be had: the GPU
    is older than SM90, or the build raised :class:`JitUnavailable` (logged once per family ``what``
    and reason: "JIT <what> unavailable, using Triton"). Callers cache the answer per device and
    layout (``functools.lru_cache``), so each module is built, or refused, once per process."""
    import torch

    major, minor = torch.cuda.get_device_capability(device_index)
    if major < 9:
        return f"GPU sm_{major}{minor} is older than SM90"
    try:
        return build((major, minor))
    except JitUnavailable as e:
        if (what, str(e)) not in _WARNED:
            _WARNED.add((what, str(e)))
            logger.warning("mlakv: JIT %s unavailable, using Triton: %s", what, e)
        return str(e)
