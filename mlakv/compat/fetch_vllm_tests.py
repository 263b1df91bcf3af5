"""Fetch vLLM's own MLA cache kernel tests and a module shim that runs them against ``mlakv.compat.vllm``.

``python -m mlakv.compat.fetch_vllm_tests [--version 0.33.0] [--dest .peers/vllm] [--sdist FILE]``

vLLM's tests (``tests/kernels/attention/test_cache.py``, ``tests/kernels/test_cp_gather_fp8.py``,
``tests/kernels/test_compressor_kv_cache.py``) are the peer evidence that the face behaves like
vLLM. They live outside the repository, like sglang's source: this script takes them from vLLM's
source distribution on the package index (``pip download --no-binary :all:``, which unpacks the
sdist to prepare its metadata; that step fails without vLLM's build requirements, so the script runs
it with ``--no-clean`` in a private temporary directory and picks the files from the unpacked tree,
or from the archive when pip saved it) and writes, under ``DEST``:

* ``tests/...``: the copied test files (vLLM's, unchanged);
* ``csrc/...``: ``csrc/cache_kernels.cu`` and every header it includes, transitively (vLLM's,
  unchanged, at their paths under ``csrc/``; :func:`include_closure`), which
  :mod:`mlakv.bench.vllm_peer` builds into a torch extension so the benchmark can time vLLM's own
  kernels beside mlakv's;
* ``shim/vllm/``: a ``vllm`` package whose ``_custom_ops`` is ``mlakv.compat.vllm`` (its ops also
  registered as ``torch.ops._C_cache_ops.*``, the names the tests' ``opcheck`` calls use) and the few
  ``vllm`` helpers the test modules import (``current_platform``, ``set_random_seed``);
* ``tests/kernels/utils.py``: ``opcheck`` and ``DEFAULT_OPCHECK_TEST_UTILS`` as vLLM's test utils
  define them (``torch.library.opcheck`` with an fp8-tolerant ``allclose``);
* ``conftest.py``/``pytest.ini``: marker registration; ``RUN.txt``: the command to run them.

The tests need a CUDA GPU. Run (from the repository root, after this script):
``cd .peers/vllm && PYTHONPATH=shim:.:../.. python -m pytest -q -p no:cacheprovider <selection>``
with the selection in ``RUN.txt``.
"""

from __future__ import annotations

import argparse
import ast
import glob
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

__all__ = ["TEST_FILES", "KERNEL_SOURCE", "SELECTION", "fetch", "include_closure", "write_shim", "main"]

DEFAULT_VERSION = "0.33.0"
#: vLLM test files copied (paths inside the sdist) and the kernel source (with its headers: KERNEL_SOURCE).
TEST_FILES = (
    "tests/kernels/attention/test_cache.py",
    "tests/kernels/test_cp_gather_fp8.py",
    "tests/kernels/test_compressor_kv_cache.py",
    "csrc/cache_kernels.cu",
)
#: vLLM's cache kernels (a path inside the sdist); its ``#include "..."`` closure is kept under ``csrc/``.
KERNEL_SOURCE = "csrc/cache_kernels.cu"
#: File name endings of the ``csrc/`` members taken out of the archive to resolve that closure.
_HEADER_SUFFIXES = (".h", ".hpp", ".cuh", ".inc", ".inl")
_INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.M)

#: The indexer tests of test_compressor_kv_cache.py, copied out into their own module (that file
#: imports DeepSeek-V4 model code at module level, which the shim does not provide).
INDEXER_TESTS = ("test_indexer_quant_cache_roundtrip", "test_indexer_gather_accepts_upper_bound_output")
INDEXER_MODULE = "tests/kernels/test_indexer_cache_from_compressor.py"
#: The tests that exercise the ops mlakv.compat.vllm offers (the others use ops it does not offer).
SELECTION = (
    f"tests/kernels/attention/test_cache.py tests/kernels/test_cp_gather_fp8.py {INDEXER_MODULE} "
    '-k "(mla and not nvfp4 and not grouped and not cpu) or cp_gather_fp8 or indexer"'
)

_SHIM = {
    "shim/vllm/__init__.py": '''"""A stand-in ``vllm`` package: just enough of vLLM for its cache kernel tests, backed by mlakv."""
''',
    "shim/vllm/_custom_ops.py": '''"""vLLM's ``_custom_ops`` for the cache tests: mlakv.compat.vllm, also as ``torch.ops._C_cache_ops.*``."""
from mlakv.compat.vllm import *  # noqa: F401,F403
from mlakv.compat.vllm import register_ops

register_ops("_C_cache_ops")
''',
    "shim/vllm/platforms/__init__.py": '''"""``current_platform`` for the tests: a CUDA GPU (mlakv's face runs there)."""
import torch


class _Cuda:
    device_type = "cuda"

    def is_cuda(self):
        return True

    def is_cuda_alike(self):
        return True

    def is_rocm(self):
        return False

    def is_xpu(self):
        return False

    def is_cpu(self):
        return False

    def fp8_dtype(self):
        return torch.float8_e4m3fn

    def get_device_capability(self, device_id=0):
        return torch.cuda.get_device_capability(device_id)


current_platform = _Cuda()
''',
    "shim/vllm/utils/__init__.py": "",
    "shim/vllm/utils/torch_utils.py": '''"""The two helpers test_cache.py imports from ``vllm.utils.torch_utils``."""
import random

import torch


def set_random_seed(seed):
    random.seed(seed)
    try:
        import numpy

        numpy.random.seed(seed)
    except ImportError:
        pass
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def nvfp4_split_data_scale(*args, **kwargs):
    raise NotImplementedError("nvfp4 caches are not part of mlakv's vLLM face")
''',
    "shim/vllm/model_executor/__init__.py": "",
    "shim/vllm/model_executor/layers/__init__.py": "",
    "shim/vllm/model_executor/layers/quantization/__init__.py": "",
    "shim/vllm/model_executor/layers/quantization/utils/__init__.py": "",
    "shim/vllm/model_executor/layers/quantization/utils/quant_utils.py": '''"""Imported by test_cache.py at module level; used only by tests outside the selection."""


def scaled_dequantize(*args, **kwargs):
    raise NotImplementedError("scaled_dequantize is not part of mlakv's vLLM face")
''',
    "tests/__init__.py": "",
    "tests/kernels/__init__.py": "",
    "tests/kernels/attention/__init__.py": "",
    "tests/kernels/utils.py": '''"""``opcheck`` as vLLM's tests/kernels/utils.py defines it (the rest of that module is not needed here)."""
from unittest.mock import patch

import torch

DEFAULT_OPCHECK_TEST_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")
ALL_OPCHECK_TEST_UTILS = DEFAULT_OPCHECK_TEST_UTILS + ("test_aot_dispatch_dynamic",)
_allclose = torch.allclose
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def fp8_allclose(a, b, rtol=1e-05, atol=1e-08, equal_nan=False):
    if a.dtype in _FP8 or b.dtype in _FP8:
        return _allclose(a.float(), b.float(), rtol=rtol, atol=atol, equal_nan=equal_nan)
    return _allclose(a, b, rtol=rtol, atol=atol, equal_nan=equal_nan)


def opcheck(op, args, kwargs=None, *, test_utils=ALL_OPCHECK_TEST_UTILS, raise_exception=True, cond=True):
    if not cond:
        return {}
    with patch("torch.allclose", new=fp8_allclose):
        return torch.library.opcheck(op, args, kwargs, test_utils=test_utils, raise_exception=raise_exception)
''',
    "conftest.py": '''"""vLLM's test tree without its root conftest: register the markers its cache tests carry."""


def pytest_configure(config):
    for name in ("skip_global_cleanup", "cpu_model", "optional", "core_model"):
        config.addinivalue_line("markers", f"{name}: vLLM test marker")
''',
    "pytest.ini": "[pytest]\naddopts = -p no:cacheprovider\n",
}


def _run_pip(version: str, work: Path) -> None:
    """``pip download`` of the sdist with ``--no-clean``: the unpacked tree stays under ``work``."""
    env = dict(os.environ, TMPDIR=str(work / "build"), VLLM_TARGET_DEVICE="empty", PIP_NO_INPUT="1")
    (work / "build").mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", f"vllm=={version}", "--no-deps", "--no-binary", ":all:",
        "--no-build-isolation", "--no-clean", "-d", str(work / "dist"),
    ]  # fmt: skip
    # Preparing the metadata needs vLLM's build requirements; its failure is expected and harmless.
    subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False, timeout=900)


def _find_tree(work: Path) -> Path | None:
    for hit in glob.glob(str(work / "build" / "**" / "tests" / "kernels" / "attention" / "test_cache.py"), recursive=True):
        return Path(hit).parents[3]
    return None


def _extract(sdist: Path, work: Path) -> Path:
    with tarfile.open(sdist) as tar:
        top = tar.getnames()[0].split("/")[0]

        def wanted(name: str) -> bool:
            rel = name[len(top) + 1 :] if name.startswith(top + "/") else None
            return rel is not None and (rel in TEST_FILES or (rel.startswith("csrc/") and rel.endswith(_HEADER_SUFFIXES)))

        members = [m for m in tar.getmembers() if m.isfile() and wanted(m.name)]
        tar.extractall(work / "x", members=members, filter="data")
    return work / "x" / top


def include_closure(csrc: str | Path, source: str = "cache_kernels.cu") -> tuple[list[str], list[str]]:
    """The files ``source`` needs from vLLM's ``csrc`` tree: itself and every ``#include "..."`` it
    reaches, transitively (under ``#if`` or not), each resolved against the including file's
    directory, then ``csrc`` itself; ``<...>`` includes (CUDA, torch, the C++ library) are not followed.

    Args:
        csrc: the ``csrc`` directory.
        source: the root file, relative to ``csrc``.

    Returns:
        ``(files, unresolved)``: the paths relative to ``csrc`` (posix, ``source`` first, in the order
        found) and, for each quoted include found in neither place, ``"including file: name"``.
    """
    csrc = Path(csrc)
    files: list[str] = []
    unresolved: list[str] = []
    todo = [source]
    while todo:
        rel = todo.pop(0)
        if rel in files:
            continue
        files.append(rel)
        for name in _INCLUDE.findall((csrc / rel).read_text(errors="replace")):
            here = os.path.normpath(os.path.join(os.path.dirname(rel), name)).replace(os.sep, "/")
            top = os.path.normpath(name).replace(os.sep, "/")
            hit = next((c for c in (here, top) if not c.startswith("..") and (csrc / c).is_file()), None)
            if hit is None:
                unresolved.append(f"{rel}: {name}")
            elif hit not in files and hit not in todo:
                todo.append(hit)
    return files, unresolved


def _copy_kernel_sources(tree: Path, dest: Path) -> None:
    """``csrc/cache_kernels.cu`` and its include closure from ``tree`` into ``dest/csrc`` (replacing it)."""
    if not (tree / KERNEL_SOURCE).is_file():
        return
    files, unresolved = include_closure(tree / "csrc", Path(KERNEL_SOURCE).name)
    if (dest / "csrc").exists():
        shutil.rmtree(dest / "csrc")
    for rel in files:
        (dest / "csrc" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tree / "csrc" / rel, dest / "csrc" / rel)
    if unresolved:
        print(f"fetch_vllm_tests: includes not in the sdist's csrc/: {', '.join(unresolved)}", file=sys.stderr)


def fetch(version: str = DEFAULT_VERSION, dest: str | Path = ".peers/vllm", sdist: str | Path | None = None) -> Path:
    """Copy vLLM's test files and its cache kernel sources into ``dest`` and write the shim; returns ``dest``.

    Raises ``RuntimeError`` when the sdist (or its test files) cannot be had.
    """
    dest = Path(dest)
    with tempfile.TemporaryDirectory(prefix="mlakv-vllm-") as tmp:
        work = Path(tmp)
        if sdist is not None:
            tree = _extract(Path(sdist), work)
        else:
            _run_pip(version, work)
            saved = sorted((work / "dist").glob("vllm-*.tar.gz")) if (work / "dist").exists() else []
            tree = _extract(saved[0], work) if saved else _find_tree(work)
            if tree is None:
                raise RuntimeError(
                    f"could not get vllm=={version}'s source distribution from the package index (pip download "
                    "found no sdist with tests/); pass --sdist FILE"
                )
        missing = [f for f in TEST_FILES if not (tree / f).is_file()]
        if "tests/kernels/attention/test_cache.py" in missing:
            raise RuntimeError(f"vllm=={version}'s sdist has no tests/kernels/attention/test_cache.py")
        for f in TEST_FILES:
            if (tree / f).is_file() and f != KERNEL_SOURCE:
                (dest / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(tree / f, dest / f)
        _copy_kernel_sources(tree, dest)
    compressor = dest / "tests/kernels/test_compressor_kv_cache.py"
    if compressor.is_file():
        (dest / INDEXER_MODULE).write_text(_indexer_module(compressor.read_text()))
    write_shim(dest, version)
    return dest


def _indexer_module(source: str) -> str:
    """vLLM's indexer cache tests (decorators included, unchanged) under the imports they use."""
    tree = ast.parse(source)
    lines = source.splitlines()
    parts = [
        '"""The DSA indexer cache tests of vLLM\'s tests/kernels/test_compressor_kv_cache.py, copied unchanged."""',
        "import math",
        "",
        "import pytest",
        "import torch",
        "",
        "from vllm import _custom_ops as ops",
        "from vllm.platforms import current_platform",
        "",
    ]
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in INDEXER_TESTS:
            first = min([d.lineno for d in node.decorator_list] + [node.lineno])
            parts += ["", *lines[first - 1 : node.end_lineno], ""]
    return "\n".join(parts) + "\n"


def write_shim(dest: str | Path, version: str = DEFAULT_VERSION) -> None:
    """Write the ``vllm`` stand-in package, the tests' utils and the run command under ``dest``."""
    dest = Path(dest)
    for rel, text in _SHIM.items():
        p = dest / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    (dest / "RUN.txt").write_text(
        f"# vLLM {version}'s cache kernel tests against mlakv.compat.vllm (needs a CUDA GPU), from the repo root:\n"
        f"cd {dest} && PYTHONPATH=shim:.:{os.path.relpath('.', dest)} python -m pytest -q {SELECTION}\n"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--version", default=DEFAULT_VERSION, help="vLLM version on the package index (default %(default)s)")
    ap.add_argument("--dest", default=".peers/vllm", help="where the tests and the shim go (default %(default)s)")
    ap.add_argument("--sdist", default=None, help="a vllm-*.tar.gz already on disk (skips the download)")
    args = ap.parse_args(argv)
    try:
        dest = fetch(args.version, args.dest, args.sdist)
    except RuntimeError as e:
        print(f"fetch_vllm_tests: {e}", file=sys.stderr)
        return 1
    print((dest / "RUN.txt").read_text(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
