"""The command line: ``mlakv`` / ``python -m mlakv`` with ``bench``, ``bench hicache`` and ``demo``.

Usage errors are one line and exit 2 (never a traceback); the installed entry point works from any
directory; on a CPU the bench and the demo say what their numbers are.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import mlakv
from mlakv.bench.hicache import HOST_LAYOUTS
from mlakv.cli import main

CUDA = torch.cuda.is_available()


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """``main(argv)`` in-process: (exit code, stdout, stderr); argparse's SystemExit becomes the code."""
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_version(capsys):
    rc, out, _ = run_cli(["--version"], capsys)
    assert rc == 0 and out.strip() == f"mlakv {mlakv.__version__}"


def test_python_dash_m_runs_from_another_directory(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mlakv", "--version"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"mlakv {mlakv.__version__}"


@pytest.mark.parametrize(
    "argv, names",
    [
        ([], "<command>"),
        (["frobnicate"], "invalid choice"),
        (["bench", "--layouts", "bf8"], "--layouts"),
        (["bench", "--layouts", ""], "--layouts"),
        (["bench", "--sizes", "abc"], "--sizes"),
        (["bench", "--sizes", "0"], "--sizes"),
        (["bench", "--sizes", "-5"], "--sizes"),
        (["bench", "--providers", "cublas"], "--providers"),
        (["bench", "--bogus"], "unrecognized"),
        (["bench", "hicache", "--pages", "0"], "--pages"),
        (["bench", "hicache", "--layers", "x"], "--layers"),
        (["bench", "hicache", "--layouts", "rows"], "--layouts"),
        (["demo", "--layers", "0"], "--layers"),
        (["demo", "--decode-steps", "two"], "--decode-steps"),
    ],
)
def test_usage_error_is_one_line_and_exit_2(argv, names, capsys):
    rc, out, err = run_cli(argv, capsys)
    assert rc == 2
    assert "Traceback" not in err + out
    errors = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(errors) == 1 and names in errors[0], err


@pytest.mark.parametrize("cmd", [["bench"], ["bench", "hicache"], ["demo"]])
def test_every_option_has_help(cmd, capsys):
    rc, out, _ = run_cli([*cmd, "--help"], capsys)
    assert rc == 0
    section = out.split("options:", 1)[1]
    options = [ln.split()[0] for ln in section.splitlines() if ln.strip().startswith("--")]
    assert options
    text = " ".join(section.split())
    for opt in options:  # after the option (and its metavar) comes its help text, before the next option
        words = text.split(opt + " ", 1)[1].split(" --", 1)[0].split()
        metavar = opt.lstrip("-").upper().replace("-", "_")
        help_words = [w for w in words if w.strip(",") != metavar]
        assert len(help_words) >= 2, f"{cmd} {opt} has no help text: {words}"


@pytest.mark.skipif(CUDA, reason="checks the CPU behaviour; a GPU runs every provider")
def test_bench_names_a_provider_that_cannot_run_and_refuses_when_none_can(capsys, tmp_path):
    rc, out, err = run_cli(["bench", "--providers", "jit,triton", "--sizes", "1", "--out", str(tmp_path)], capsys)
    assert rc == 2
    assert "provider jit not run here: needs a CUDA GPU" in err
    assert "provider triton not run here: needs a CUDA GPU" in err
    assert "Traceback" not in err


def test_bench_quick_writes_table_json_and_plot(capsys, tmp_path):
    out_dir = tmp_path / "out"
    args = ["bench", "--quick", "--layouts", "bf16", "--sizes", "1,16", "--out", str(out_dir)]
    if CUDA:
        args += ["--providers", "auto,torch", "--no-cold"]
    rc, out, err = run_cli(args, capsys)
    assert rc == 0, err
    result = json.loads((out_dir / "results.json").read_text())
    assert [r["n_loc"] for r in result["rows"]] == [1, 16]
    assert (out_dir / "report.md").read_text().strip() == out.strip().split("\nmatplotlib")[0].strip()
    try:
        import matplotlib  # noqa: F401

        assert (out_dir / "kv_write_bench.png").stat().st_size > 0
    except ImportError:
        assert "matplotlib not installed" in out
    if not CUDA:
        assert result["cpu_only"] is True
        assert "CPU (torch path; GPU numbers need a GPU)" in out
        assert "best" not in out  # identical-kind CPU paths are not ranked
        assert all(set(r["spread_us"]) == {"auto", "torch"} for r in result["rows"])
        assert "jit: needs a CUDA GPU" in out  # the providers not run are listed with the reason


def test_bench_hicache_runs_on_this_device(capsys):
    rc, out, err = run_cli(["bench", "hicache", "--pages", "2", "--layers", "1", "--page-size", "4"], capsys)
    assert rc == 0, out + err
    rows = [ln for ln in out.splitlines() if ln.startswith("| 2 |")]
    assert len(rows) == len(HOST_LAYOUTS) and not any("WRONG" in ln for ln in rows)
    if not CUDA:
        assert "GPU numbers need a GPU" in out


def test_demo_small_run_passes_reference_and_marks_cpu_shares(capsys):
    rc, out, err = run_cli(
        ["demo", "--layers", "1", "--prompts", "1", "--prompt-len", "8", "--decode-batch", "2", "--decode-steps", "2"], capsys
    )
    assert rc == 0, out + err
    assert "reference check (pool vs dict-of-tensors cache: tokens, logits, cached rows): PASSED" in out
    table = [ln for ln in out.splitlines() if ln.startswith("| mlakv dispatcher") or ln.startswith("| two index_put_")]
    assert len(table) == 2
    if not CUDA:
        assert all(ln.count("(n/m)") == 2 for ln in table)
        assert "not meaningful" in out
    assert "prefill: timing 3 variants round-robin" in err and "decode:" in err and "round-robin" in err


def test_version_and_help_do_not_import_torch():
    """`mlakv --version` / `--help` answer without loading torch (the package's names load on use)."""
    code = (
        "import sys, mlakv.cli as c\n"
        "try:\n    c.main(['--version'])\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip().endswith("False"), (done.stdout, done.stderr)
    done = subprocess.run([sys.executable, "-c", "import mlakv, sys; mlakv.MLATokenToKVPool; print('torch' in sys.modules)"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr
