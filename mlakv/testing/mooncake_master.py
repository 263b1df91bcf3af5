"""Start and stop a real Mooncake master on free loopback ports, for tests, the demo and the bench.

A Mooncake Store (the distributed KV store that sglang's and vLLM's HiCache L3 use) needs one
``mooncake_master`` process (the object directory) and an HTTP metadata server (the transfer
engine's segment descriptors). Starting them is the library's job in tests and the demo, not the
user's shell, so :class:`MooncakeMaster` finds the binary shipped with the ``mooncake-transfer-engine*``
wheel, binds every port to ``127.0.0.1`` on free ports (master RPC, metrics/admin, metadata), waits
until they all listen, and stops them (SIGTERM, then SIGKILL).

The metadata server is the wheel's own ``mooncake.http_metadata_server`` run as a second process,
not the master's embedded one (``--enable_http_metadata_server``): in 0.3.13.post1 the embedded
server listens on ``0.0.0.0`` even with ``--http_metadata_server_host=127.0.0.1`` (its log says
127.0.0.1; ``ss -ltn`` shows 0.0.0.0), and a test binding to loopback must not open a port to the
network.

Missing pieces are reported as :class:`MooncakeUnavailable` with the command that fixes them:
the wheel not installed, or Debian's ``libibverbs1`` missing (the wheel's binaries and its Python
extension link ``libibverbs.so.1`` even when they only speak TCP).

What is installed is checked by :mod:`mlakv.mem_cache.storage.mooncake_install` (re-exported here).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from mlakv import _env
from mlakv.mem_cache.storage.mooncake_install import (
    APT_HINT, PIP_HINT, MooncakeUnavailable, check_mooncake, libibverbs_present,
)

__all__ = ["MooncakeMaster", "MooncakeUnavailable", "check_mooncake", "find_master_binary"]


def find_master_binary() -> str:
    """Path of ``mooncake_master``: ``$MLAKV_MOONCAKE_MASTER``, the binary inside the installed
    ``mooncake`` package, or the one on ``PATH``. Raises :class:`MooncakeUnavailable`."""
    env = _env.path("MLAKV_MOONCAKE_MASTER")
    if env:
        if not os.access(env, os.X_OK):
            raise MooncakeUnavailable(f"MLAKV_MOONCAKE_MASTER={env!r} is not an executable file")
        return env
    spec = importlib.util.find_spec("mooncake")
    if spec is not None and spec.submodule_search_locations:
        for d in spec.submodule_search_locations:
            p = Path(d) / "mooncake_master"
            if p.is_file() and os.access(p, os.X_OK):
                return str(p)
    found = shutil.which("mooncake_master")
    if found:
        return found
    raise MooncakeUnavailable(f"mooncake_master not found (package or PATH): {PIP_HINT}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class MooncakeMaster:
    """A ``mooncake_master`` on loopback, as a context manager.

    Args:
        rpc_port, metadata_port, metrics_port: ports to bind (``None``: a free one each).
        startup_timeout: seconds to wait for all three ports to listen.
        extra_args: more ``--flag=value`` arguments for the master.

    Attributes (after :meth:`start`): ``master_addr`` (``"127.0.0.1:P"``, the client's
    ``master_server_addr``), ``metadata_url`` (``"http://127.0.0.1:Q/metadata"``), ``proc`` (the
    master), ``meta_proc`` (the metadata server), ``log_path`` (both processes' output).

    ``with MooncakeMaster() as m: ...`` starts them and always stops them. :meth:`kill` SIGKILLs both
    (a crashed master node; the fault tests use it); :meth:`stop` is safe to call again.
    """

    def __init__(
        self,
        rpc_port: Optional[int] = None,
        metadata_port: Optional[int] = None,
        metrics_port: Optional[int] = None,
        startup_timeout: float = 30.0,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.binary = find_master_binary()
        if not libibverbs_present():
            raise MooncakeUnavailable(f"mooncake_master needs libibverbs.so.1, which is missing: {APT_HINT}")
        self.rpc_port = rpc_port or _free_port()
        self.metadata_port = metadata_port or _free_port()
        self.metrics_port = metrics_port or _free_port()
        if len({self.rpc_port, self.metadata_port, self.metrics_port}) != 3:
            raise ValueError("rpc_port, metadata_port and metrics_port must differ")
        self.startup_timeout = startup_timeout
        self.extra_args = tuple(extra_args)
        self.proc: Optional[subprocess.Popen] = None
        self.meta_proc: Optional[subprocess.Popen] = None
        self.log_path: Optional[str] = None
        self._log = None

    @property
    def master_addr(self) -> str:
        return f"127.0.0.1:{self.rpc_port}"

    @property
    def metadata_url(self) -> str:
        return f"http://127.0.0.1:{self.metadata_port}/metadata"

    def command(self) -> list[str]:
        """The master's command line (every listener on 127.0.0.1; metadata served separately)."""
        return [
            self.binary,
            "--rpc_address=127.0.0.1",
            f"--rpc_port={self.rpc_port}",
            "--enable_http_metadata_server=false",
            "--metrics_host=127.0.0.1",
            f"--metrics_port={self.metrics_port}",
            "--enable_metric_reporting=false",
            *self.extra_args,
        ]

    def metadata_command(self) -> list[str]:
        """The metadata server's command line (the wheel's aiohttp server on 127.0.0.1)."""
        return [sys.executable, "-m", "mooncake.http_metadata_server", "--host", "127.0.0.1",
                "--port", str(self.metadata_port), "--log-level", "WARNING"]

    def start(self) -> "MooncakeMaster":
        """Launch the master and wait until its ports listen. Raises ``RuntimeError`` with the tail
        of its log if it exits or does not come up within ``startup_timeout``."""
        if self.proc is not None:
            raise RuntimeError("this MooncakeMaster is already started")
        fd, self.log_path = tempfile.mkstemp(prefix="mooncake_master.", suffix=".log")
        self._log = os.fdopen(fd, "wb")
        popen = dict(stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.meta_proc = subprocess.Popen(self.metadata_command(), **popen)
        self.proc = subprocess.Popen(self.command(), **popen)
        deadline = time.monotonic() + self.startup_timeout
        ports = (self.rpc_port, self.metadata_port, self.metrics_port)
        while True:
            dead = [(n, p) for n, p in (("mooncake_master", self.proc), ("metadata server", self.meta_proc)) if p.poll() is not None]
            if dead:
                tail = self.log_tail()
                self.stop()
                name, p = dead[0]
                raise RuntimeError(f"{name} exited with code {p.returncode} at startup:\n{tail}")
            if all(_listening(p) for p in ports):
                return self
            if time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                raise RuntimeError(f"mooncake_master did not listen on {ports} within {self.startup_timeout}s:\n{tail}")
            time.sleep(0.05)

    def log_tail(self, n: int = 20) -> str:
        """The last ``n`` lines of the master's log."""
        if not self.log_path or not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, "rb") as f:
            return b"\n".join(f.read().splitlines()[-n:]).decode(errors="replace")

    def alive(self) -> bool:
        """Whether the master process runs."""
        return self.proc is not None and self.proc.poll() is None

    def _procs(self) -> list[subprocess.Popen]:
        return [p for p in (self.proc, self.meta_proc) if p is not None and p.poll() is None]

    def kill(self) -> None:
        """SIGKILL the master and its metadata server (a crashed node, for fault tests) and reap them."""
        for p in self._procs():
            p.send_signal(signal.SIGKILL)
            p.wait()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM both processes, wait up to ``timeout`` seconds, then SIGKILL; remove the log."""
        procs = self._procs()
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGKILL)
                p.wait()
        self._cleanup()

    def _cleanup(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.log_path and os.path.exists(self.log_path):
            os.unlink(self.log_path)

    def __enter__(self) -> "MooncakeMaster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
