"""vLLM's own MLA cache kernels as a benchmark peer, built from the source the user fetched.

Issue 26 asks each op of mlakv's vLLM face (:mod:`mlakv.compat.vllm`) to be at or below vLLM's own
kernel. The project never contains vLLM's code: ``python -m mlakv.compat.fetch_vllm_tests`` (or
``mlakv fetch-peers vllm``) puts vLLM's ``csrc/cache_kernels.cu`` and every header it includes,
unchanged, under ``.peers/vllm/csrc``. This module writes, into a build directory, only

* a binding file: the declarations of the ops (their C++ signatures as vLLM 0.33.0 defines them) and
  their registration as ``torch.ops.mlakv_vllm_peer.<op>`` through torch's stable ABI (vLLM's own
  registration ABI; the schemas are vLLM's);
* a one-line ``cublas_v2.h`` stand-in when the CUDA toolkit has no cuBLAS headers (vLLM's
  ``torch_utils.h`` includes it for a helper the cache kernels never call);

and builds the two with ``torch.utils.cpp_extension.load`` (a torch extension, not one of mlakv's
tvm-ffi modules: vLLM's kernels take torch tensors through the stable ABI), with vLLM's flags for
these sources: C++20, ``-DENABLE_FP8 -DUSE_CUDA``, ``TORCH_TARGET_VERSION`` 2.11, torch's half
conversions left on, no fast math, the arch-specific target of the GPU (``sm_90a`` on Hopper).

Where the source is looked for, first hit wins: ``$MLAKV_VLLM_SRC``, ``./.peers/vllm`` in the current
directory, ``.peers/vllm`` next to the installed ``mlakv`` package. When it is absent or the build
fails, :func:`load_vllm_peer` says why (``JitUnavailable``) and the benchmark times mlakv alone.
:func:`compile_objects` compiles the same sources with the same flags without linking or loading
(what a machine without a GPU can check).
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from mlakv import _env
from mlakv.compat.fetch_vllm_tests import DEFAULT_VERSION, KERNEL_SOURCE, include_closure
from mlakv.kernels.cuda.loader import JitUnavailable, cuda_arch_list, find_cuda_home

from .peers import peer_search_dirs

__all__ = [
    "NAMESPACE",
    "PeerOp",
    "PEER_OPS",
    "FETCH_HINT",
    "candidate_dirs",
    "peer_dir",
    "peer_absent_reason",
    "defined_ops",
    "binding_source",
    "stub_headers",
    "gencode_flag",
    "nvcc_flags",
    "cxx_flags",
    "BuildPlan",
    "prepare_build",
    "compile_objects",
    "SAVED_HEADERS",
    "save_torch_headers",
    "build_note",
    "load_vllm_peer",
    "main",
]

#: ``torch.ops.<NAMESPACE>.<op>``: vLLM's kernels (mlakv's face is ``torch.ops.mlakv_vllm``).
NAMESPACE = "mlakv_vllm_peer"
FETCH_HINT = "fetch it with `python -m mlakv.compat.fetch_vllm_tests` (into ./.peers/vllm), or set MLAKV_VLLM_SRC"
#: ``TORCH_TARGET_VERSION`` vLLM builds its stable-ABI extension with (torch 2.11).
TORCH_TARGET_VERSION = "0x020B000000000000ULL"


@dataclass(frozen=True)
class PeerOp:
    """One vLLM cache op: how the binding declares it and the schema it is registered with.

    Attributes:
        name: the function's name in ``cache_kernels.cu`` and the op's name.
        params: the C++ parameter list of its definition (vLLM 0.33.0; defaults left out), which
            the declaration must repeat exactly for the linker to find the definition.
        schema: the op's schema (vLLM's ``torch_bindings.cpp``).
    """

    name: str
    params: str
    schema: str


_T = "torch::stable::Tensor"
_OPT = f"std::optional<{_T}>"
PEER_OPS: dict[str, PeerOp] = {
    op.name: op
    for op in (
        PeerOp("concat_and_cache_mla",
               f"{_T}& kv_c, {_T}& k_pe, {_T}& kv_cache, {_T}& slot_mapping, const std::string& kv_cache_dtype, "
               f"{_T}& scale, bool skip_scale",
               "(Tensor kv_c, Tensor k_pe, Tensor! kv_cache, Tensor slot_mapping, str kv_cache_dtype, Tensor scale, "
               "bool skip_scale=False) -> ()"),
        PeerOp("gather_and_maybe_dequant_cache",
               f"const {_T}& src_cache, const {_T}& dst, const {_T}& block_table, const {_T}& cu_seq_lens, "
               f"const {_T}& token_to_seq, int64_t num_tokens, const std::string& kv_cache_dtype, const {_T}& scale, "
               f"{_OPT} seq_starts",
               "(Tensor src_cache, Tensor! dst, Tensor block_table, Tensor cu_seq_lens, Tensor token_to_seq, "
               "int num_tokens, str kv_cache_dtype, Tensor scale, Tensor? seq_starts) -> ()"),
        PeerOp("cp_gather_cache",
               f"const {_T}& src_cache, const {_T}& dst, const {_T}& block_table, const {_T}& cu_seq_lens, "
               f"int64_t batch_size, {_OPT} seq_starts",
               "(Tensor src_cache, Tensor! dst, Tensor block_table, Tensor cu_seq_lens, int batch_size, "
               "Tensor? seq_starts) -> ()"),
        PeerOp("cp_gather_and_upconvert_fp8_kv_cache",
               f"const {_T}& src_cache, const {_T}& dst, const {_T}& block_table, const {_T}& workspace_starts, "
               f"int64_t batch_size, {_OPT} seq_starts, {_OPT} host_cache, {_OPT} host_row_ids, {_OPT} device_row_ids",
               "(Tensor src_cache, Tensor! dst, Tensor block_table, Tensor workspace_starts, int batch_size, "
               "Tensor? seq_starts, Tensor? host_cache=None, Tensor? host_row_ids=None, "
               "Tensor? device_row_ids=None) -> ()"),
        PeerOp("swap_blocks",
               f"{_T}& src, {_T}& dst, int64_t block_size_in_bytes, const {_T}& block_mapping",
               "(Tensor src, Tensor! dst, int block_size_in_bytes, Tensor block_mapping) -> ()"),
        PeerOp("indexer_k_quant_and_cache",
               f"{_T}& k, {_T}& kv_cache, {_T}& slot_mapping, int64_t quant_block_size, const std::string& scale_fmt",
               "(Tensor k, Tensor! kv_cache, Tensor slot_mapping, int quant_block_size, str kv_cache_dtype) -> ()"),
        PeerOp("cp_gather_indexer_k_quant_cache",
               f"const {_T}& kv_cache, {_T}& dst_k, {_T}& dst_scale, const {_T}& block_table, const {_T}& cu_seq_lens",
               "(Tensor kv_cache, Tensor! dst_k, Tensor! dst_scale, Tensor block_table, Tensor cu_seq_lens) -> ()"),
    )
}  # fmt: skip


def candidate_dirs() -> list[Path]:
    """Where the fetched peer is looked for, in order: ``$MLAKV_VLLM_SRC``, ``./.peers/vllm``, the
    ``.peers/vllm`` beside the package's source checkout."""
    return peer_search_dirs("vllm", _env.path("MLAKV_VLLM_SRC"))


def peer_dir() -> Optional[Path]:
    """The directory holding vLLM's ``csrc/cache_kernels.cu`` (the fetched peer), or None."""
    for d in candidate_dirs():
        if (d / KERNEL_SOURCE).is_file():
            return d
    return None


def peer_absent_reason() -> Optional[str]:
    """None when the kernel source and every header it includes are present, else a one-line reason."""
    root = peer_dir()
    if root is None:
        where = ", ".join(str(d) for d in candidate_dirs())
        return f"vLLM's {KERNEL_SOURCE} absent (looked in {where}); {FETCH_HINT}"
    _, unresolved = include_closure(root / "csrc", Path(KERNEL_SOURCE).name)
    if unresolved:
        return f"{root / 'csrc'} lacks headers cache_kernels.cu includes ({', '.join(unresolved[:4])}); {FETCH_HINT}"
    return None


def _peer_root(root: Optional[Union[str, Path]]) -> Path:
    """``root`` as a path, or the fetched peer's directory (``JitUnavailable`` when it is absent)."""
    if root is None:
        reason = peer_absent_reason()
        if reason is not None:
            raise JitUnavailable(reason)
        root = peer_dir()
    return Path(root)


def _defines(source: str, name: str) -> bool:
    for m in re.finditer(rf"^void\s+{name}\s*\(", source, re.M):
        depth, i = 1, m.end()
        while i < len(source) and depth:
            depth += {"(": 1, ")": -1}.get(source[i], 0)
            i += 1
        rest = re.sub(r"//[^\n]*|/\*.*?\*/", "", source[i : i + 400], flags=re.S).lstrip()
        if rest.startswith("{"):
            return True
    return False


def defined_ops(source: str) -> list[str]:
    """The names of :data:`PEER_OPS` that ``source`` (a ``cache_kernels.cu``) defines (a body, not a
    declaration) as a file-scope ``void`` function."""
    return [name for name in PEER_OPS if _defines(source, name)]


def binding_source(ops: Sequence[str], namespace: str = NAMESPACE) -> str:
    """The binding file: declarations of ``ops`` (names of :data:`PEER_OPS`) and their stable-ABI
    registration as ``torch.ops.<namespace>.<op>`` (CUDA kernels)."""
    unknown = [o for o in ops if o not in PEER_OPS]
    if unknown:
        raise ValueError(f"ops: {unknown} are not vLLM cache ops this binding knows ({', '.join(PEER_OPS)})")
    lines = [
        f"// Written by mlakv.bench.vllm_peer: declares vLLM's cache ops (defined in vLLM's {KERNEL_SOURCE},",
        f"// compiled unchanged beside this file) and registers them as torch.ops.{namespace}.*.",
        "#include <optional>",
        "#include <string>",
        "",
        "#include <torch/csrc/stable/library.h>",
        "#include <torch/csrc/stable/tensor.h>",
        "",
    ]
    lines += [f"void {o}({PEER_OPS[o].params});" for o in ops]
    lines += ["", f"STABLE_TORCH_LIBRARY({namespace}, m) {{"]
    lines += [f'  m.def("{o}{PEER_OPS[o].schema}");' for o in ops]
    lines += ["}", "", f"STABLE_TORCH_LIBRARY_IMPL({namespace}, CUDA, m) {{"]
    lines += [f'  m.impl("{o}", TORCH_BOX(&{o}));' for o in ops]
    lines += ["}", ""]
    return "\n".join(lines)


def _toolkit_has(cuda_home: Path, header: str) -> bool:
    dirs = [cuda_home / "include", *sorted((cuda_home / "targets").glob("*/include"))]
    return any((d / header).is_file() for d in dirs)


def stub_headers(cuda_home: Optional[Path]) -> dict[str, str]:
    """Stand-ins for headers vLLM's sources include but the toolkit lacks: ``{name: text}``.

    Only ``cublas_v2.h``: ``torch_utils.h`` includes it for an inline helper returning the cuBLAS
    handle, which no cache kernel calls; the stand-in declares the handle type alone.
    """
    if cuda_home is not None and _toolkit_has(Path(cuda_home), "cublas_v2.h"):
        return {}
    return {
        "cublas_v2.h": "// Written by mlakv.bench.vllm_peer: the toolkit has no cuBLAS headers; the cache kernels\n"
        "// use none of cuBLAS, only torch_utils.h names the handle type.\n"
        "#pragma once\ntypedef struct cublasContext* cublasHandle_t;\n"
    }


def gencode_flag(arch: str) -> str:
    """``"9.0a"`` -> ``-gencode=arch=compute_90a,code=sm_90a`` (one target: the first of an arch list)."""
    first = arch.replace(";", " ").replace(",", " ").split()[0]
    m = re.fullmatch(r"(\d+)\.(\d+)([af]?)", first)
    if m is None:
        raise ValueError(f"arch: {arch!r} is not a CUDA arch like 9.0a")
    sm = f"{m.group(1)}{m.group(2)}{m.group(3)}"
    return f"-gencode=arch=compute_{sm},code=sm_{sm}"


def nvcc_flags(arch: str) -> list[str]:
    """nvcc flags for ``cache_kernels.cu``, as vLLM's build gives them (torch's nvcc flags with the
    half/bfloat16 conversions switched back on, ``-DENABLE_FP8``, ``-DUSE_CUDA``, the stable-ABI
    target version), for one arch (``"9.0a"``)."""
    undo = [f"-U{d}" for d in ("__CUDA_NO_HALF_OPERATORS__", "__CUDA_NO_HALF_CONVERSIONS__",
                               "__CUDA_NO_BFLOAT16_CONVERSIONS__", "__CUDA_NO_HALF2_OPERATORS__")]  # fmt: skip
    return [
        "-O3", "-DNDEBUG", "-std=c++20", "--expt-relaxed-constexpr", *undo, "-DENABLE_FP8", "-DUSE_CUDA",
        f"-DTORCH_TARGET_VERSION={TORCH_TARGET_VERSION}", gencode_flag(arch),
    ]  # fmt: skip


def cxx_flags() -> list[str]:
    """Host compiler flags for the binding file."""
    return ["-O2", "-std=c++20", f"-DTORCH_TARGET_VERSION={TORCH_TARGET_VERSION}"]


@dataclass(frozen=True)
class BuildPlan:
    """What :func:`prepare_build` laid out: the two sources, the include directories and the flags."""

    build_dir: Path
    binding: Path
    kernels: Path
    include_dirs: tuple[Path, ...]
    ops: tuple[str, ...]
    nvcc_flags: tuple[str, ...]
    cxx_flags: tuple[str, ...]
    cuda_home: Optional[Path]


def prepare_build(build_dir: str | Path, root: Optional[Path] = None, arch: str = "9.0a") -> BuildPlan:
    """Write the binding (and any stand-in header) into ``build_dir`` and return the build's plan.

    Args:
        build_dir: a directory for the generated files (created).
        root: the fetched peer (default :func:`peer_dir`).
        arch: the CUDA arch (``"9.0a"``).

    Raises:
        JitUnavailable: the source is absent or incomplete, or defines none of :data:`PEER_OPS`.
    """
    root = _peer_root(root)
    kernels = root / KERNEL_SOURCE
    if not kernels.is_file():
        raise JitUnavailable(f"{kernels} absent; {FETCH_HINT}")
    ops = defined_ops(kernels.read_text(errors="replace"))
    if not ops:
        raise JitUnavailable(f"{kernels} defines none of {', '.join(PEER_OPS)} (not vLLM {DEFAULT_VERSION}'s layout)")
    build = Path(build_dir)
    stubs = build / "stub_include"
    stubs.mkdir(parents=True, exist_ok=True)
    home = find_cuda_home()
    cuda_home = Path(home) if home else None
    for name in os.listdir(stubs):
        (stubs / name).unlink()
    for name, text in stub_headers(cuda_home).items():
        (stubs / name).write_text(text)
    binding = build / "vllm_peer_binding.cpp"
    text = binding_source(ops)
    if not binding.is_file() or binding.read_text() != text:  # unchanged text keeps the extension's cache
        binding.write_text(text)
    return BuildPlan(
        build_dir=build, binding=binding, kernels=kernels, include_dirs=(root / "csrc", stubs), ops=tuple(ops),
        nvcc_flags=tuple(nvcc_flags(arch)), cxx_flags=tuple(cxx_flags()), cuda_home=cuda_home,
    )  # fmt: skip


def _run(cmd: list[str], what: str, timeout: int) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        tail = "\n".join((done.stderr + done.stdout).strip().splitlines()[-30:])
        raise JitUnavailable(f"compiling {what} failed (exit {done.returncode}):\n{tail}")


def compile_objects(build_dir: str | Path, root: Optional[Path] = None, arch: str = "9.0a",
                    timeout: int = 900) -> tuple[Path, Path]:  # fmt: skip
    """Compile the binding (host compiler) and vLLM's ``cache_kernels.cu`` (nvcc) to objects with the
    extension's flags and torch's include directories, without linking or loading (no GPU needed).

    Returns ``(binding object, kernels object)``. Raises :class:`JitUnavailable` (with the
    compiler's last lines) when the source, nvcc or a compile is missing or fails.
    """
    from torch.utils.cpp_extension import include_paths

    plan = prepare_build(build_dir, root, arch)
    if plan.cuda_home is None:
        raise JitUnavailable("nvcc not found (looked at CUDA_HOME, CUDA_PATH, PATH, /usr/local/cuda)")
    incs = [f"-I{d}" for d in plan.include_dirs] + [f"-I{p}" for p in include_paths()]
    cxx = os.environ.get("CXX") or shutil.which("c++") or "g++"
    bo, ko = plan.build_dir / "vllm_peer_binding.o", plan.build_dir / "cache_kernels.o"
    _run([cxx, "-c", "-fPIC", *plan.cxx_flags, *incs, str(plan.binding), "-o", str(bo)], "the binding", timeout)
    nvcc = str(plan.cuda_home / "bin" / "nvcc")
    _run([nvcc, "-c", "-Xcompiler", "-fPIC", *plan.nvcc_flags, *incs, str(plan.kernels), "-o", str(ko)],
         str(plan.kernels), timeout)  # fmt: skip
    return bo, ko


#: Under the peer directory: a copy of the stable-ABI torch headers of the machine that fetched the
#: source (:func:`save_torch_headers`), tried when the installed torch's headers do not compile it.
SAVED_HEADERS = "torch_include"
_TORCH_INCLUDE = re.compile(r'^\s*#\s*include\s*[<"](torch/[^>"]+)[>"]', re.M)


def save_torch_headers(root: Optional[Path] = None) -> Path:
    """Copy the torch headers the build includes (the stable ABI's: ``torch/csrc/stable``,
    ``torch/headeronly``, the C shim), from this machine's torch, to ``<peer>/torch_include``.

    vLLM builds its kernels against a newer torch than the one it targets (``TORCH_TARGET_VERSION``
    2.11); where the installed torch's headers lack something vLLM's source uses, the loader retries
    with these. Only the headers reached from the ``#include <torch/...>`` lines of vLLM's files and of
    the binding are copied, transitively; ``TORCH_VERSION`` records the torch they came from.
    Returns the directory. Raises :class:`JitUnavailable` when the peer is absent.
    """
    import torch
    from torch.utils.cpp_extension import include_paths

    root = _peer_root(root)
    files, _ = include_closure(root / "csrc", Path(KERNEL_SOURCE).name)
    texts = [(root / "csrc" / f).read_text(errors="replace") for f in files] + [binding_source(list(PEER_OPS))]
    base = Path(include_paths()[0])
    todo = sorted({name for t in texts for name in _TORCH_INCLUDE.findall(t)})
    found: list[str] = []
    while todo:
        rel = todo.pop()
        if rel in found or not (base / rel).is_file():
            continue
        found.append(rel)
        todo += [n for n in _TORCH_INCLUDE.findall((base / rel).read_text(errors="replace")) if n not in found]
    dest = root / SAVED_HEADERS
    if dest.exists():
        shutil.rmtree(dest)
    for rel in found:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(base / rel, dest / rel)
    (dest / "TORCH_VERSION").write_text(torch.__version__ + "\n")
    return dest


_LOADED: dict[str, Any] = {}


def build_note() -> Optional[str]:
    """How the loaded peer was built (which torch headers), or None before :func:`load_vllm_peer`."""
    return _LOADED.get("note")


def load_vllm_peer(device_capability: Optional[tuple[int, int]] = None, build_dir: Optional[str | Path] = None,
                   verbose: bool = False) -> Any:  # fmt: skip
    """Build (or reuse) vLLM's cache kernels as a torch extension and return ``torch.ops.mlakv_vllm_peer``.

    The ops take vLLM's arguments in vLLM's order (its ``_custom_ops`` pass them the same way); the
    ones bound are those of :data:`PEER_OPS` the fetched source defines (:func:`defined_ops`). Built
    once per process; the build directory keeps the objects, so a later process only loads. The
    installed torch's headers are tried first, then, where that build fails and
    ``<peer>/torch_include`` exists (:func:`save_torch_headers`), those.

    Args:
        device_capability: the GPU's (default: the current device's, or ``TVM_FFI_CUDA_ARCH_LIST``).
        build_dir: where the generated files and the build go (default:
            ``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``, then
            ``mlakv_vllm_peer_<torch version>_<arch>``).
        verbose: print the compiler commands.

    Raises:
        JitUnavailable: the source is absent, there is no nvcc/driver, or the build or load failed
            (the message says which, with the compiler's last lines).
    """
    import torch

    if NAMESPACE in _LOADED:
        return _LOADED[NAMESPACE]
    arch = cuda_arch_list(device_capability)
    if build_dir is None:
        base = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
        build_dir = Path(base) / re.sub(r"[^A-Za-z0-9_.]", "_", f"{NAMESPACE}_{torch.__version__}_{arch}")
    plan = prepare_build(build_dir, None, arch)
    if plan.cuda_home is None:
        raise JitUnavailable("nvcc not found (looked at CUDA_HOME, CUDA_PATH, PATH, /usr/local/cuda)")
    os.environ.setdefault("CUDA_HOME", str(plan.cuda_home))
    try:  # swap_blocks_batch (in the same file) resolves cuGetProcAddress from the driver
        ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        raise JitUnavailable(f"the CUDA driver library (libcuda.so.1) cannot be loaded: {e}") from e
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        cpp_extension.CUDA_HOME = str(plan.cuda_home)
    saved = plan.kernels.parents[1] / SAVED_HEADERS
    attempts = [(f"torch {torch.__version__}'s headers (installed)", [])]
    if (saved / "TORCH_VERSION").is_file():
        version = (saved / "TORCH_VERSION").read_text().strip()
        attempts.append((f"torch {version}'s stable-ABI headers saved in {saved}", [str(saved)]))
    failures = []
    for what, extra in attempts:
        try:
            cpp_extension.load(
                name=NAMESPACE, sources=[str(plan.binding), str(plan.kernels)],
                extra_cflags=list(plan.cxx_flags), extra_cuda_cflags=list(plan.nvcc_flags),
                extra_include_paths=extra + [str(d) for d in plan.include_dirs], build_directory=str(plan.build_dir),
                verbose=verbose, with_cuda=True, is_python_module=False,
            )  # fmt: skip
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            tail = "\n".join(str(e).strip().splitlines()[-30:])
            failures.append(f"with {what}:\n{tail}")
            continue
        ns = getattr(torch.ops, NAMESPACE)
        _LOADED[NAMESPACE] = ns
        _LOADED["note"] = f"{', '.join(plan.ops)} from {plan.kernels} with {what}, TORCH_TARGET_VERSION 2.11, {arch}"
        return ns
    raise JitUnavailable("building vLLM's cache kernels as a torch extension failed " + "\n".join(failures))


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m mlakv.bench.vllm_peer save-torch-headers | compile [--build-dir DIR]``: 0, 1 on failure."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m mlakv.bench.vllm_peer", description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=["save-torch-headers", "compile"],
                    help="save-torch-headers: copy this torch's stable-ABI headers beside the fetched source; "
                    "compile: compile the binding and cache_kernels.cu without linking (no GPU needed)")  # fmt: skip
    ap.add_argument("--build-dir", type=Path, default=None, help="compile: where the objects go (default: a temporary one)")
    args = ap.parse_args(argv)
    try:
        if args.action == "save-torch-headers":
            dest = save_torch_headers()
            n = sum(1 for p in dest.rglob("*.h"))
            print(f"{n} headers of torch {(dest / 'TORCH_VERSION').read_text().strip()} in {dest}")
        else:
            import tempfile

            build = args.build_dir or Path(tempfile.mkdtemp(prefix="mlakv-vllm-peer-"))
            objs = compile_objects(build, arch=cuda_arch_list((9, 0)))
            print("compiled: " + ", ".join(map(str, objs)))
    except JitUnavailable as e:
        print(f"vllm_peer: {e}")
        return 1
    return 0


if __name__ == "__main__":
    from mlakv._interrupt import run_module

    raise SystemExit(run_module("mlakv.bench.vllm_peer", main))
