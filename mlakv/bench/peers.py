"""Fetch the source of the projects mlakv is measured against (its "peers") into ``.peers/<name>/``.

The benches build a peer's own kernel beside mlakv's (:mod:`mlakv.bench.sglang_peer`), and the
format tests read a peer's sources as the specification of a cache layout. The repository never
contains that code: this module downloads the peer's published package with ``pip download``
(no install, no dependencies) and extracts only the files the benches and specs read, renamed to a
short fixed layout, into a git-ignored directory.

    mlakv fetch-peers                      # sglang 0.5.23 -> ./.peers/sglang
    mlakv fetch-peers sglang --dest DIR    # elsewhere (then MLAKV_SGLANG_SRC=DIR/sglang for the bench)
    mlakv fetch-peers sglang --wheel FILE  # from a wheel already downloaded (no network)
    mlakv fetch-peers vllm [--help]        # vLLM's cache kernel tests + a shim (mlakv.compat.fetch_vllm_tests)

Each peer is data (:data:`PEERS`): the package, the version the benches were measured with, and
the map from paths inside the wheel to paths under ``.peers/<name>/``. vLLM's peer evidence is its
test files from the source distribution, fetched by :mod:`mlakv.compat.fetch_vllm_tests`, which
``mlakv fetch-peers vllm ...`` runs with the rest of the command line. ``python -m
mlakv.bench.peers`` is the same command. This module imports neither torch nor (but for ``vllm``)
anything of mlakv.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable, Optional, Sequence

__all__ = [
    "Peer", "PEERS", "PeerFetchError", "member_targets", "extract_wheel", "download_wheel", "fetch", "peer_search_dirs",
    "main",
]  # fmt: skip


class PeerFetchError(RuntimeError):
    """The peer's wheel could not be downloaded, or lacks a file the benches need."""


@dataclass(frozen=True)
class Peer:
    """One project mlakv is measured against.

    Attributes:
        name: the directory under ``.peers/`` (and the command's argument).
        package: the package-index name passed to ``pip download``.
        version: the version the benches and docs were measured with (the default).
        files: ``(member, target)`` pairs: a wheel member path and where it goes under
            ``.peers/<name>/``. A member ending in ``/`` is a directory: everything below it keeps
            its relative path under ``target`` (which then also ends in ``/``).
        required: targets that must exist after extraction (what the bench checks for).
    """

    name: str
    package: str
    version: str
    files: tuple[tuple[str, str], ...]
    required: tuple[str, ...]


_JIT = "sglang/kernels/jit/"
_OPS = "sglang/kernels/ops/"

#: The peers the repository knows. sglang: its JIT row-write kernel (built by ``mlakv bench``), its
#: header library, and the sources read as the spec of the DeepSeek-V3.2 indexer cache, the
#: DeepSeek-V4 family pages and the fused RoPE + q-concat write.
PEERS: dict[str, Peer] = {
    "sglang": Peer(
        name="sglang",
        package="sglang",
        version="0.5.23",
        files=(
            (_JIT + "include/", "include/"),
            (_JIT + "csrc/elementwise/set_mla_kv_buffer.cuh", "csrc/elementwise/set_mla_kv_buffer.cuh"),
            (_JIT + "csrc/elementwise/set_mla_kv_concat_q.cuh", "csrc/elementwise/set_mla_kv_concat_q.cuh"),
            (_JIT + "csrc/elementwise/rope.cuh", "csrc/elementwise/rope.cuh"),
            (_JIT + "csrc/deepseek_v4/", "csrc/deepseek_v4/"),
            (_JIT + "csrc/deepseek_v32/", "csrc/deepseek_v32/"),
            (_OPS + "kvcache/set_mla_kv_buffer.py", "ops/set_mla_kv_buffer.py"),
            (_OPS + "kvcache/mla_buffer.py", "ops/mla_buffer.py"),
            (_OPS + "kvcache/dsv4_main_kv_store.py", "ops/dsv4_main_kv_store.py"),
            (_OPS + "kvcache/dsa_index_k_cache.py", "ops/dsa_index_k_cache.py"),
            (_OPS + "attention/set_mla_kv_concat_q.py", "ops/set_mla_kv_concat_q.py"),
            (_OPS + "attention/dsv4/kv_layout.py", "ops/dsv4_kv_layout.py"),
            (_OPS + "attention/dsa/indexer_k.py", "ops/dsa_indexer_k.py"),
            ("sglang/srt/mem_cache/index_key_cache.py", "srt/index_key_cache.py"),
            ("sglang/srt/mem_cache/deepseek_v4_memory_pool.py", "srt/deepseek_v4_memory_pool.py"),
            ("sglang/test/kernels/deepseek_v4/dsv41_kv_quant_reference.py", "test/dsv41_kv_quant_reference.py"),
        ),
        required=("csrc/elementwise/set_mla_kv_buffer.cuh", "include/sgl_kernel/utils.cuh"),
    ),
}


def peer_search_dirs(name: str, env_dir: Optional[str]) -> list[Path]:
    """Where a peer's fetched source is looked for, in order, each once: ``env_dir`` (its ``MLAKV_*_SRC``
    variable, if set), ``./.peers/<name>``, then the ``.peers/<name>`` beside the package's source checkout
    (the same directory as the second when run from the checkout, then listed once)."""
    out: list[Path] = [Path(env_dir)] if env_dir else []
    for d in (Path.cwd() / ".peers" / name, Path(__file__).resolve().parents[2] / ".peers" / name):
        if all(d.resolve() != seen.resolve() for seen in out):
            out.append(d)
    return out


def _target_of(member: str, files: Sequence[tuple[str, str]]) -> Optional[str]:
    for src, dst in files:
        if src.endswith("/"):
            if member.startswith(src) and len(member) > len(src):
                return dst + member[len(src) :]
        elif member == src:
            return dst
    return None


def member_targets(names: Iterable[str], files: Sequence[tuple[str, str]]) -> dict[str, str]:
    """Map wheel member names to their relative target paths; members the map does not name are left out.

    Args:
        names: member names as ``zipfile.ZipFile.namelist()`` gives them (directory entries end in ``/``).
        files: a :class:`Peer`'s ``files`` pairs.

    Returns:
        ``{member: target}`` in the order of ``names``.

    Raises:
        PeerFetchError: a target that would leave the peer's directory (an absolute path or ``..``).
    """
    out: dict[str, str] = {}
    for name in names:
        if name.endswith("/"):
            continue
        target = _target_of(name, files)
        if target is None:
            continue
        parts = PurePosixPath(target).parts
        if PurePosixPath(target).is_absolute() or ".." in parts:
            raise PeerFetchError(f"wheel member {name!r} would be written outside the peer directory ({target!r})")
        out[name] = target
    return out


def extract_wheel(wheel: Path, dest: Path, peer: Peer) -> list[Path]:
    """Replace ``dest`` with the peer's files from ``wheel`` (a zip); returns the files written.

    Raises:
        PeerFetchError: the wheel is not a zip, or lacks a file of ``peer.required`` (then ``dest``
            is left as it was).
    """
    try:
        z = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as e:
        raise PeerFetchError(f"{wheel} is not a readable wheel: {e}") from e
    with z:
        targets = member_targets(z.namelist(), peer.files)
        missing = [r for r in peer.required if r not in targets.values()]
        if missing:
            raise PeerFetchError(
                f"{wheel.name} lacks {', '.join(missing)}: not the {peer.package} layout this fetcher knows "
                f"(measured with {peer.package}=={peer.version})"
            )
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{peer.name}-", dir=dest.parent))  # same file system: a rename
        try:
            written = []
            for member, target in targets.items():
                out = staging / target
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(z.read(member))
                written.append(dest / target)
            if dest.exists():
                shutil.rmtree(dest)
            staging.rename(dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return written


def pip_download_command(peer: Peer, version: str, into: Path) -> list[str]:
    """The ``pip download`` command line that fetches the peer's wheel alone (no dependencies)."""
    return [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
            "--dest", str(into), f"{peer.package}=={version}"]  # fmt: skip


def download_wheel(peer: Peer, version: str, into: Path) -> Path:
    """Download the peer's wheel into ``into`` with pip; returns its path.

    Raises:
        PeerFetchError: pip failed (its last lines are in the message) or left no wheel.
    """
    cmd = pip_download_command(peer, version, into)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise PeerFetchError(f"`{' '.join(cmd[2:])}` failed (exit {done.returncode}):\n{tail}")
    got = [p for p in into.iterdir() if p.is_file()]  # --no-deps into an empty directory: the one wheel
    if len(got) != 1:
        raise PeerFetchError(f"pip left {len(got)} files in {into}, expected the one {peer.package} {version} wheel")
    return got[0]


def fetch(name: str, dest_root: Path = Path(".peers"), version: Optional[str] = None,
          wheel: Optional[Path] = None) -> Path:  # fmt: skip
    """Put peer ``name``'s files into ``dest_root/name`` (replacing what was there); returns that directory.

    Args:
        name: a key of :data:`PEERS`.
        dest_root: the directory holding the peers (default ``./.peers``).
        version: the package version (default: the one the benches were measured with).
        wheel: a wheel file to extract instead of downloading one.

    Raises:
        KeyError: an unknown peer. PeerFetchError: the download or the extraction failed.
    """
    peer = PEERS[name]
    dest = Path(dest_root) / peer.name
    if wheel is not None:
        extract_wheel(Path(wheel), dest, peer)
        return dest
    with tempfile.TemporaryDirectory(prefix="mlakv-peer-") as tmp:
        got = download_wheel(peer, version or peer.version, Path(tmp))
        extract_wheel(got, dest, peer)
    return dest


#: Peers fetched by their own module (not a wheel's files): ``mlakv fetch-peers vllm ...`` runs it.
SOURCE_PEERS = ("vllm",)


def build_parser() -> argparse.ArgumentParser:
    """The ``mlakv fetch-peers`` parser."""
    ap = argparse.ArgumentParser(
        prog="mlakv fetch-peers",
        description="Download a peer's published package with pip and extract the kernel sources the benches "
        "build and the tests read as specs into DEST/<peer>/ (never committed; .peers/ is git-ignored).",
    )
    ap.add_argument("peers", nargs="*", metavar="PEER",
                    help=f"which peers to fetch: {', '.join(PEERS)} (default: all of them); `mlakv fetch-peers vllm --help`: "
                    "vLLM's cache kernel tests and a shim to run them against mlakv.compat.vllm")  # fmt: skip
    ap.add_argument("--dest", type=Path, default=Path(".peers"), help="directory that holds the peers (default ./.peers)")
    ap.add_argument("--version", default=None,
                    help="package version (default: the one measured: "
                    + ", ".join(f"{p.name} {p.version}" for p in PEERS.values()) + ")")  # fmt: skip
    ap.add_argument("--wheel", type=Path, default=None, help="extract this wheel file instead of downloading (one peer)")
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    """``mlakv fetch-peers [PEER ...] [--dest DIR] [--version V] [--wheel FILE]``: 0, 1 on a failed fetch, 2 on usage.

    ``mlakv fetch-peers vllm [options]`` hands its options to :mod:`mlakv.compat.fetch_vllm_tests`.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [SOURCE_PEERS[0]]:
        from mlakv.compat.fetch_vllm_tests import main as fetch_vllm

        return fetch_vllm(argv[1:])
    ap = build_parser()
    args = ap.parse_args(argv)
    names = list(dict.fromkeys(args.peers)) or list(PEERS)
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        ap.error(f"argument PEER: unknown peer {', '.join(map(repr, unknown))}; choose from {', '.join(PEERS)}")
    if args.wheel is not None and len(names) != 1:
        ap.error("argument --wheel: name exactly one peer to extract it for")
    for name in names:
        peer = PEERS[name]
        what = f"{peer.package}=={args.version or peer.version}" if args.wheel is None else str(args.wheel)
        print(f"fetching {what} -> {args.dest / name}", file=sys.stderr, flush=True)
        try:
            dest = fetch(name, args.dest, args.version, args.wheel)
        except PeerFetchError as e:
            print(f"mlakv fetch-peers: {e}", file=sys.stderr)
            return 1
        n = sum(1 for p in dest.rglob("*") if p.is_file())
        print(f"{n} files in {dest}")
    return 0


if __name__ == "__main__":
    from mlakv._interrupt import run_module

    sys.exit(run_module("mlakv.bench.peers", main))
