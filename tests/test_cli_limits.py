"""The command line refuses what it cannot do before it starts, in one line, with exit code 2.

Spec:

* ``mlakv bench [fp8|indexer] --out PATH`` (and the DCP bench's ``--out``): an existing file, a
  read-only or unwritable directory is a usage error (exit 2) naming the path and why, found when
  the command line is parsed — before any measurement (the sweep never starts).
* ``mlakv bench fp8 --sizes x`` (and ``indexer``) is a usage error on any machine, GPU or not.
* ``mlakv demo`` checks its sizes against the memory the device and the host can still give (the
  host: ``MemAvailable``, the cgroup limit, ``ulimit -v``) before it builds the model, the pool or
  the prompts: too large is one line on stderr and exit 2 (never an OOM kill or a traceback).
"""

from __future__ import annotations

import argparse
import errno
import os
import resource
import subprocess
import sys

import pytest
import torch

from mlakv import cli
from mlakv.argtypes import out_dir


def _usage_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


# ---- --out ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("cmd", [["bench"], ["bench", "fp8"], ["bench", "indexer"]], ids=["bench", "fp8", "indexer"])
def test_out_that_is_an_existing_file_is_a_usage_error(tmp_path, capsys, cmd):
    f = tmp_path / "results"
    f.write_text("not a directory")
    err = _usage_error(capsys, cmd + ["--out", str(f)])
    assert "exists and is not a directory" in err and str(f) in err
    assert f.read_text() == "not a directory"


def test_out_file_from_the_shell_is_one_line_and_exit_2(tmp_path):
    f = tmp_path / "results"
    f.write_text("x")
    r = subprocess.run([sys.executable, "-m", "mlakv", "bench", "--out", str(f)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert [line for line in r.stderr.splitlines() if "error" in line] == [
        f"mlakv bench: error: argument --out: {str(f)!r} exists and is not a directory"
    ]


def test_read_only_out_is_refused_before_the_sweep(tmp_path, capsys, monkeypatch):
    """A read-only file system under ``--out`` (mkstemp says EROFS): a usage error while parsing; the
    sweep is never called."""
    import mlakv.argtypes as at
    import mlakv.bench.kv_write as kv_write

    def erofs(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(at.tempfile, "mkstemp", erofs)
    monkeypatch.setattr(kv_write, "run_sweep", lambda *a, **k: pytest.fail("the sweep started"))
    err = _usage_error(capsys, ["bench", "--out", str(tmp_path / "new" / "dir")])
    assert "is not writable" in err and "read-only" in err


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another user")
def test_unwritable_out_for_another_user_is_refused():
    """A directory the user may not write (a child running as ``nobody``): refused at parse time."""
    import shutil
    import tempfile

    d = tempfile.mkdtemp(prefix="mlakv-ro-")  # 0o700 root-owned parents of tmp_path would hide it
    os.chmod(d, 0o755)
    try:
        _refused_as_nobody(d)
    finally:
        shutil.rmtree(d)


def _refused_as_nobody(d: str) -> None:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            try:
                out_dir(d)
                code = 3
            except argparse.ArgumentTypeError as e:
                code = 0 if "permission denied" in str(e) else 4
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_out_dir_accepts_new_and_existing_directories(tmp_path):
    assert out_dir(str(tmp_path)) == tmp_path
    assert out_dir(str(tmp_path / "a" / "b")) == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists()  # parsing creates nothing
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".mlakv-write-test")]


def test_dcp_bench_out_is_checked(tmp_path):
    from mlakv.bench import dcp_two_gpu

    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(SystemExit) as e:
        dcp_two_gpu.main(["--out", str(f), "--tiny"])
    assert e.value.code == 2


# ---- --sizes ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("cmd", [["bench", "fp8"], ["bench", "indexer"]], ids=["fp8", "indexer"])
@pytest.mark.parametrize("sizes", ["x", "1,x", "0", "-4", ""])
def test_bad_sizes_are_a_usage_error_on_any_machine(capsys, cmd, sizes):
    err = _usage_error(capsys, cmd + ["--sizes", sizes])
    assert "--sizes" in err


# ---- the demo's sizes (issue 22 case 8) -------------------------------------------------------------
def test_demo_refuses_sizes_beyond_memory_before_building_anything(capsys, monkeypatch):
    from mlakv.demo import serve

    monkeypatch.setattr(serve, "make_model", lambda *a, **k: pytest.fail("the model was built"))
    monkeypatch.setattr(serve, "reference_check", lambda *a, **k: pytest.fail("the reference check ran"))
    assert serve.main(["--prompts", "4", "--prompt-len", "999999999"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mlakv demo: 4 prompts x 999999999 tokens") and "lower --prompts" in err[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU run's host limit (on a GPU the prefill lives in GPU memory, "
                    "and CUDA cannot start under a small ulimit -v)")
def test_demo_under_ulimit_v_refuses_in_one_line():
    """Under ``ulimit -v`` (RLIMIT_AS in a forked child) sizes that fit the host but not the limit:
    exit 2 naming ulimit -v, no traceback."""
    from mlakv.demo import serve

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            sys.stderr = os.fdopen(w, "w", buffering=1)
            with open("/proc/self/status") as f:
                vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
            resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))
            code = serve.main(["--prompt-len", "4000"])  # ~2.6 GiB by the estimate
        except BaseException:  # noqa: BLE001 - reported through the exit code
            code = 9
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        err = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 2, err
    assert "ulimit -v" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_demo_memory_estimate_grows_with_every_size():
    from mlakv.demo.model import MLAConfig
    from mlakv.demo.serve import demo_memory_bytes

    cfg = MLAConfig(vocab_size=4096, hidden=512, n_heads=8, n_layers=4)
    base = sum(demo_memory_bytes(cfg, 4, 64, 8, 8, 4, False).values())
    for args in [(8, 64, 8, 8), (4, 128, 8, 8), (4, 64, 8, 8)]:
        assert sum(demo_memory_bytes(cfg, *args, 4, False).values()) >= base
    bigger = MLAConfig(vocab_size=4096, hidden=512, n_heads=8, n_layers=8)
    assert sum(demo_memory_bytes(bigger, 4, 64, 8, 8, 4, False).values()) > base
