"""The command line: ``mlakv`` / ``python -m mlakv`` with ``bench``, ``bench hicache`` and ``demo``.

Usage errors are one line and exit 2 (never a traceback); the installed entry point works from any
directory; on a CPU the bench and the demo say what their numbers are.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

import mlakv
from mlakv.bench import SUBCOMMANDS
from mlakv.bench.options import HOST_LAYOUTS
from conftest import run_cli

CUDA = torch.cuda.is_available()
BENCH_SUBCOMMANDS = sorted(SUBCOMMANDS)




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
        (["--bogus"], "--bogus"),
        (["--bogus", "bench"], "--bogus"),
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
        (["bench", "hicache", "--sms", "0"], "--sms: SM budgets"),
        (["bench", "hicache", "--sms", "x"], "--sms"),
        (["bench", "hicache", "--l3", "redis"], "--l3"),
        (["bench", "hicache", "--l3", "mooncake", "--reps", "0"], "--reps"),
        (["bench", "hicache", "--l3", "mooncake", "--pages", "4,0"], "--pages"),
        (["bench", "fp8", "--sizes", "x"], "--sizes"),
        (["bench", "fp8", "--sizes", "0"], "--sizes"),
        (["fetch-peers", "vllm2"], "PEER"),
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


# every command and bench subcommand (a new bench is covered by being in SUBCOMMANDS)
HELP_COMMANDS = [["bench"], *(["bench", name] for name in BENCH_SUBCOMMANDS), ["bench", "hicache", "--l3", "mooncake"],
                 ["demo"], ["fetch-peers"]]  # fmt: skip


@pytest.mark.parametrize("name", BENCH_SUBCOMMANDS)
def test_every_bench_subcommand_has_its_own_torch_free_parser(name):
    from mlakv.bench.options import parser_for

    assert parser_for([name]).prog == f"mlakv bench {name}"


@pytest.mark.parametrize("cmd", HELP_COMMANDS, ids=" ".join)
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


def test_demo_small_run_passes_reference_and_prints_shares_only_on_a_gpu(capsys):
    rc, out, err = run_cli(
        ["demo", "--layers", "1", "--prompts", "1", "--prompt-len", "8", "--decode-batch", "2", "--decode-steps", "2"], capsys
    )
    assert rc == 0, out + err
    assert "reference check (pool vs dict-of-tensors cache: tokens, logits, cached rows): PASSED" in out
    table = [ln for ln in out.splitlines() if ln.startswith("| mlakv dispatcher") or ln.startswith("| two index_put_")]
    assert len(table) == 2
    if CUDA:
        assert all(ln.count("%") == 2 for ln in table) and "KV-write share" in out
    else:
        assert not any("%" in ln for ln in table) and "share of" not in out
        assert "CPU run: no KV-write shares" in out and "(n/m)" not in out and "not meaningful" not in out
    # 3 variants, and a 4th (the fused cache step) where its kernels run
    assert re.search(r"prefill: timing [34] variants round-robin", err) and "decode:" in err, err


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


def test_hicache_help_names_the_l3_bench(capsys):
    rc, out, _ = run_cli(["bench", "hicache", "--help"], capsys)
    assert rc == 0 and "--l3 {mooncake}" in out and "--l3 mooncake --help" in " ".join(out.split())


@pytest.mark.parametrize("cmd", HELP_COMMANDS, ids=" ".join)
def test_subcommand_help_answers_without_torch_in_under_half_a_second(cmd):
    """The parsers load before torch: `--help` costs the interpreter's start and argparse, no more.

    Measured as the child's CPU time (user + system), which other jobs on the machine do not inflate.
    """
    code = (
        "import resource, sys, mlakv.cli as c\n"
        f"try:\n    c.main({cmd + ['--help']!r})\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "r = resource.getrusage(resource.RUSAGE_SELF)\n"
        "print('torch' in sys.modules, r.ru_utime + r.ru_stime)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    torch_loaded, cpu_s = done.stdout.split()[-2:]
    assert torch_loaded == "False", f"{' '.join(cmd)} --help imported torch"
    assert float(cpu_s) < 0.5, f"{' '.join(cmd)} --help took {float(cpu_s):.2f} s of CPU"


def test_dir_lists_only_the_public_names():
    assert dir(mlakv) == sorted(mlakv.__all__)
    assert not {"Any", "annotations", "importlib"} & set(dir(mlakv))


# ---- Ctrl-C: one line, exit 130, what was measured kept ------------------------------------------
def interrupt_after(n: int, fn):
    """``fn`` that raises KeyboardInterrupt (as Ctrl-C does) on its call number ``n + 1``."""
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > n:
            raise KeyboardInterrupt
        return fn(*args, **kwargs)

    return wrapped


def assert_one_interrupt_line(rc: int, err: str, command: str) -> str:
    assert rc == 130
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    lines = [ln for ln in err.splitlines() if "interrupted" in ln]
    assert len(lines) == 1 and lines[0].startswith(f"mlakv {command}: interrupted (Ctrl-C)"), err
    assert err.rstrip().splitlines()[-1] == lines[0]  # the last thing said
    return lines[0]


def test_ctrl_c_in_bench_keeps_the_rows_measured(capsys, tmp_path, monkeypatch):
    from mlakv.bench import kv_write

    monkeypatch.setattr(kv_write, "make_layers", interrupt_after(2, kv_write.make_layers))
    args = ["bench", "--layouts", "bf16", "--sizes", "1,16,64", "--out", str(tmp_path)]
    rc, out, err = run_cli(args + (["--providers", "auto,torch", "--no-cold"] if CUDA else []), capsys)
    line = assert_one_interrupt_line(rc, err, "bench")
    assert "2 rows measured so far, in" in line and str(tmp_path) in line
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["interrupted"] is True and [r["n_loc"] for r in result["rows"]] == [1, 16]
    assert "INTERRUPTED" in (tmp_path / "report.md").read_text()
    assert out == ""  # the table is in report.md, not repeated after the interruption


def test_ctrl_c_in_bench_hicache_keeps_the_printed_rows(capsys, monkeypatch):
    from mlakv.bench import hicache

    monkeypatch.setattr(hicache, "bench_host_layout", interrupt_after(1, hicache.bench_host_layout))
    rc, out, err = run_cli(["bench", "hicache", "--pages", "2", "--layers", "1", "--page-size", "4"], capsys)
    assert "the 1 row was measured so far, printed above" in assert_one_interrupt_line(rc, err, "bench")
    assert len([ln for ln in out.splitlines() if ln.startswith("| 2 |")]) == 1


def test_ctrl_c_in_bench_fp8_writes_the_rows_measured(capsys, tmp_path, monkeypatch):
    from mlakv.bench import fp8_bench

    row = {"fmt": "ds_mla", "n_loc": 1, "path": "jit", "fused": 1.0, "fused-triton": 1.1, "plain-u8-656": 0.9,
           "quant-then-write": 2.0}  # fmt: skip

    def measured_one_row_then_ctrl_c(sizes, into):
        into.update(device="test", copy_gbs=4000.0, write=[row], gather=[])
        raise KeyboardInterrupt

    monkeypatch.setattr(fp8_bench.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(fp8_bench, "run_fp8_bench", measured_one_row_then_ctrl_c)
    rc, _, err = run_cli(["bench", "fp8", "--sizes", "1,64", "--out", str(tmp_path)], capsys)
    assert "1 write rows and 0 gather rows" in assert_one_interrupt_line(rc, err, "bench")
    assert json.loads((tmp_path / "fp8.json").read_text())["write"] == [row]
    assert "| 1 | jit |" in (tmp_path / "fp8.md").read_text()


def test_ctrl_c_in_demo_is_one_line(capsys, monkeypatch):
    from mlakv.demo import serve

    monkeypatch.setattr(serve, "time_decode", interrupt_after(0, serve.time_decode))
    rc, out, err = run_cli(["demo", "--layers", "1", "--prompts", "1", "--prompt-len", "8", "--decode-batch", "2",
                            "--decode-steps", "2"], capsys)  # fmt: skip
    assert_one_interrupt_line(rc, err, "demo")
    assert "reference check" in out  # what was printed before stays


def signal_after(argv: list[str], trigger: str, signum: int) -> tuple[int, str]:
    """Run ``python *argv``; send ``signum`` once a stderr line holds ``trigger``; ``(exit code, stderr)``.

    The child starts with SIGINT at its default, whatever the test runner inherited: a runner started in
    the background of a non-interactive shell ignores SIGINT, and a Python started so never sees Ctrl-C."""
    import signal

    proc = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if trigger in line:
                proc.send_signal(signum)
                break
        rest_err = proc.stderr.read()
        proc.wait(timeout=120)
    finally:
        proc.kill()
    return proc.returncode, "".join(seen) + rest_err


@pytest.mark.skipif(CUDA, reason="times the CPU sweep's progress lines")
def test_a_real_sigint_ends_the_bench_with_one_line_and_its_rows(tmp_path):
    """SIGINT to a running `python -m mlakv bench` after its first row: exit 130, one line, the row kept."""
    import signal

    sizes = ",".join(map(str, range(1, 61)))  # rows enough that the signal lands while the bench still runs
    argv = ["-m", "mlakv", "bench", "--layouts", "bf16", "--sizes", sizes, "--out", str(tmp_path)]
    rc, err = signal_after(argv, "n_loc=1:", signal.SIGINT)
    assert_one_interrupt_line(rc, err, "bench")
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert 1 <= len(rows) < 60 and rows[0]["n_loc"] == 1


# ---- SIGTERM (timeout, kill, a batch scheduler): as Ctrl-C, but said so and exit 143 -------------------
def assert_one_termination_line(rc: int, err: str, label: str) -> str:
    assert rc == 143
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    lines = [ln for ln in err.splitlines() if "terminated" in ln]
    assert len(lines) == 1 and lines[0].startswith(f"{label}: terminated (SIGTERM)"), err
    assert err.rstrip().splitlines()[-1] == lines[0]
    return lines[0]


def test_sigterm_during_a_command_ends_it_as_one_line_and_exit_143(capsys):
    import os
    import signal
    import time

    from mlakv._interrupt import run_command

    def stopped_by_sigterm(argv: list[str]) -> int:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the handler raises before this returns
        return 0

    rc = run_command("mlakv bench", stopped_by_sigterm, [])
    assert_one_termination_line(rc, capsys.readouterr().err, "mlakv bench")


def test_the_sigterm_handler_is_the_callers_again_after_the_command():
    import signal

    from mlakv._interrupt import run_command

    before = signal.getsignal(signal.SIGTERM)
    assert run_command("mlakv x", lambda argv: 0, []) == 0
    assert signal.getsignal(signal.SIGTERM) is before


def test_ctrl_c_after_a_sigterm_command_is_reported_as_ctrl_c(capsys):
    from mlakv._interrupt import run_command

    def interrupted(argv: list[str]) -> int:
        raise KeyboardInterrupt("kept nothing")

    assert run_command("mlakv x", interrupted, []) == 130
    assert capsys.readouterr().err.strip() == "mlakv x: interrupted (Ctrl-C): kept nothing"


SIZES_1_TO_60 = ",".join(map(str, range(1, 61)))  # rows enough that the signal lands while the bench still runs
SIGTERM_CASES = {
    # (command after python, progress line after which to signal, the label, the rows kept: (file, key, n key))
    "mlakv bench": (["-m", "mlakv", "bench", "--layouts", "bf16", "--sizes", SIZES_1_TO_60, "--out", "{tmp}"],
                    "n_loc=1:", "mlakv bench", ("results.json", "rows", "n_loc")),
    "python -m mlakv.bench.rope_write": (["-m", "mlakv.bench.rope_write", "--variants", "bf16", "--heads", "16",
                                          "--providers", "fused", "--sizes", SIZES_1_TO_60, "--json", "{tmp}/rope.json"],
                                         "n=2", "mlakv.bench.rope_write", ("rope.json", "results", "n")),
}  # fmt: skip


@pytest.mark.skipif(CUDA, reason="times the CPU sweep's progress lines")
@pytest.mark.parametrize("case", sorted(SIGTERM_CASES))
def test_a_real_sigterm_ends_the_bench_with_one_line_and_its_rows(tmp_path, case):
    """SIGTERM (what `timeout` sends) to a running bench after its first row: exit 143, one line, the row kept."""
    import signal

    argv, trigger, label, (name, key, n_key) = SIGTERM_CASES[case]
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    rc, err = signal_after(argv, trigger, signal.SIGTERM)
    assert_one_termination_line(rc, err, label)
    rows = json.loads((tmp_path / name).read_text())[key]
    assert 1 <= len(rows) < 60 and rows[0][n_key] == 1


@pytest.mark.skipif(CUDA, reason="times the CPU sweep's progress lines")
def test_a_bench_killed_outright_keeps_the_rows_measured_before(tmp_path):
    """SIGKILL (no handler runs: an OOM kill, a lost machine) after the second row: results.json and report.md
    hold the rows measured before it, marked partial."""
    import signal

    argv = ["-m", "mlakv", "bench", "--layouts", "bf16", "--sizes", SIZES_1_TO_60, "--out", str(tmp_path)]
    rc, _ = signal_after(argv, "n_loc=2:", signal.SIGKILL)
    assert rc == -signal.SIGKILL
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["partial"] is True and res["interrupted"] is False
    assert 1 <= len(res["rows"]) < 60 and res["rows"][0]["n_loc"] == 1
    assert "PARTIAL" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("bench, runner, rows_key", [
    ("parity", "run_parity", "points"), ("indexer", "run_indexer_bench", "store"), ("v4", "run_v4_bench", "rows"),
    ("fp8", "run_fp8_bench", "write"),
])  # fmt: skip
def test_a_family_bench_keeps_its_files_current_while_it_runs(capsys, tmp_path, monkeypatch, bench, runner, rows_key):
    """At each progress line after new rows the files hold them, marked partial (a run killed outright keeps
    them); the finished run's files are not marked."""
    import importlib

    from mlakv.bench.timing import progress

    module = importlib.import_module({"parity": "mlakv.bench.parity", "indexer": "mlakv.bench.indexer",
                                      "v4": "mlakv.bench.v4_store", "fp8": "mlakv.bench.fp8_bench"}[bench])  # fmt: skip
    seen = []

    def two_rows(*args, into, **kwargs):
        into.update({rows_key: [], "sizes": [1, 2]})
        for n in (1, 2):
            into[rows_key].append({"n": n})
            progress(f"row {n} done")
            seen.append(json.loads((tmp_path / f"{bench}.json").read_text()))
        return into

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(module, runner, two_rows)
    monkeypatch.setattr(module, "format_tables", lambda res: f"tables of {len(res[rows_key])} rows")
    rc, _, _ = run_cli(["bench", bench, "--out", str(tmp_path)], capsys)
    assert rc == 0
    assert [len(r[rows_key]) for r in seen] == [1, 2] and all(r["partial"] is True for r in seen)
    final = json.loads((tmp_path / f"{bench}.json").read_text())
    assert "partial" not in final and len(final[rows_key]) == 2
    assert (tmp_path / f"{bench}.md").read_text() == "tables of 2 rows\n"


def test_a_failing_progress_hook_is_reported_once_and_the_run_goes_on(capsys):
    from mlakv.bench.timing import on_progress, progress

    calls = []

    def broken() -> None:
        calls.append(1)
        raise OSError("disk full")

    with on_progress(broken):
        progress("one")
        progress("two")
    progress("three")
    err = capsys.readouterr().err
    assert calls == [1] and err.count("progress hook failed, not run again: OSError: disk full") == 1
    assert "three" in err


def test_ctrl_c_in_bench_rope_keeps_the_rows_measured(capsys, tmp_path, monkeypatch):
    from mlakv.bench import rope_write

    monkeypatch.setattr(rope_write, "make_set", interrupt_after(2, rope_write.make_set))
    out_json = tmp_path / "rope.json"
    rc, out, err = run_cli(["bench", "rope", "--variants", "bf16", "--heads", "16", "--sizes", "1,8,64",
                            "--providers", "fused", "--json", str(out_json)], capsys)  # fmt: skip
    if CUDA:
        pytest.skip("on a GPU the bench makes its inputs with make_sets")
    line = assert_one_interrupt_line(rc, err, "bench")
    assert f"2 rows measured so far, in {out_json}" in line
    report = json.loads(out_json.read_text())
    assert report["interrupted"] is True and [r["n"] for r in report["results"]] == [1, 8]
    assert "INTERRUPTED" in out and "| 8 |" in out and "| 64 |" not in out


@pytest.mark.parametrize("bench, runner, rows_key", [
    ("parity", "run_parity", "points"), ("indexer", "run_indexer_bench", "store"), ("v4", "run_v4_bench", "rows"),
])  # fmt: skip
def test_ctrl_c_in_a_family_bench_writes_the_rows_measured(capsys, tmp_path, monkeypatch, bench, runner, rows_key):
    """The family benches (`run_on_gpu`): rows measured before the interruption are written, marked."""
    import importlib

    module = importlib.import_module({"parity": "mlakv.bench.parity", "indexer": "mlakv.bench.indexer",
                                      "v4": "mlakv.bench.v4_store"}[bench])  # fmt: skip
    row = {"n": 1, "marker": "measured before the stop"}

    def one_row_then_ctrl_c(*args, into, **kwargs):
        into.update({rows_key: [row], "sizes": [1, 64]})
        raise KeyboardInterrupt

    def tables(res: dict) -> str:
        return f"tables of {len(res[rows_key])} row"

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(module, runner, one_row_then_ctrl_c)
    monkeypatch.setattr(module, "format_tables", tables)
    rc, out, err = run_cli(["bench", bench, "--out", str(tmp_path)], capsys)
    line = assert_one_interrupt_line(rc, err, "bench")
    stem = {"parity": "parity", "indexer": "indexer", "v4": "v4"}[bench]
    assert f"{tmp_path / stem}.json" in line
    res = json.loads((tmp_path / f"{stem}.json").read_text())
    assert res["interrupted"] is True and res[rows_key] == [row]
    assert (tmp_path / f"{stem}.md").read_text().startswith("tables of 1 row") and "INTERRUPTED" in out


def test_ctrl_c_in_a_family_bench_before_any_row_writes_nothing(capsys, tmp_path, monkeypatch):
    from mlakv.bench import parity

    def nothing_then_ctrl_c(families, sizes, into, **options):
        into.update(sizes=list(sizes), points=[])
        raise KeyboardInterrupt

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(parity, "run_parity", nothing_then_ctrl_c)
    rc, _, err = run_cli(["bench", "parity", "--out", str(tmp_path)], capsys)
    assert assert_one_interrupt_line(rc, err, "bench") == "mlakv bench: interrupted (Ctrl-C)"
    assert not (tmp_path / "parity.json").exists()
