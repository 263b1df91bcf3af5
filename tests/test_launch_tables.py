"""Every launch table in :mod:`mlakv.spec.tuning` names the run that measured it: the device, the date and a
command that the benches still accept (so the rows can be measured again as they were).

Why: a table row that names no run, or a command whose options have since changed, cannot be checked or
re-measured; the goal is that each kernel family has its own rows, measured, naming the run.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from mlakv.bench import SUBCOMMANDS
from mlakv.bench.options import move_kv_parser, parser_for, vllm_parser
from mlakv.spec import tuning

ROOT = Path(__file__).resolve().parents[1]
TABLES = sorted(n for n in tuning.__all__ if n.endswith(("_STEPS", "_PARTS")))


def _measured(table: str) -> str:
    """``X_STEPS`` -> ``X_MEASURED``; ``X_PARTS`` -> ``X_PARTS_MEASURED``."""
    return getattr(tuning, (table.removesuffix("_STEPS") if table.endswith("_STEPS") else table) + "_MEASURED")


def _parse(command: str) -> None:
    """Parse ``command`` with the parser of the bench it runs (argparse exits on an unknown option)."""
    argv = shlex.split(command)
    if argv[:2] == ["mlakv", "bench"]:
        rest = argv[2:]
        parser_for(rest).parse_args(rest[1:] if rest and rest[0] in SUBCOMMANDS else rest)
    elif argv[:3] == ["python", "-m", "mlakv.bench.move_kv"]:
        move_kv_parser().parse_args(argv[3:])
    elif argv[:3] == ["python", "-m", "mlakv.bench.vllm_ops"]:
        vllm_parser().parse_args(argv[3:])
    else:
        raise AssertionError(f"not a bench command: {command!r}")


def test_there_are_tables():
    assert {"TRITON_ROW_STEPS", "FP8_TRITON_STEPS", "ROPE_TRITON_STEPS", "MOVE_TRITON_STEPS", "HICACHE_COPY_STEPS"} <= set(TABLES)


@pytest.mark.parametrize("table", TABLES)
def test_table_names_device_date_and_a_command_that_parses(table):
    text = _measured(table)
    assert text.startswith("NVIDIA "), f"{table}: the measuring device first, got {text!r}"
    assert re.search(r"\b20\d\d-\d\d-\d\d\b", text), f"{table}: no date in {text!r}"
    commands = re.findall(r"`([^`]+)`", text)
    assert commands, f"{table}: no command in {text!r}"
    for command in commands:
        try:
            _parse(command)
        except SystemExit as e:  # argparse's usage error
            raise AssertionError(f"{table}: the benches no longer accept `{command}`") from e


@pytest.mark.parametrize("table", TABLES)
def test_raw_results_a_table_names_are_in_the_repository(table):
    for folder in re.findall(r"docs/h\d+-[\w./-]+", _measured(table)):
        assert (ROOT / folder.rstrip(".")).is_dir(), f"{table} names {folder}, which is not in the repository"
