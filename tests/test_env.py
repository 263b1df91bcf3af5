"""Environment flags: one parser, one truth table for every flag (``mlakv._env``)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mlakv import _env

TRUE = ["1", "true", "TRUE", "yes", " on "]
FALSE = ["0", "false", "False", "no", "off", ""]


@pytest.mark.parametrize("value", TRUE)
def test_true_values(value):
    assert _env.parse_flag("MLAKV_X", value) is True


@pytest.mark.parametrize("value", [*FALSE, None])
def test_false_values_and_unset(value):
    assert _env.parse_flag("MLAKV_X", value) is False


@pytest.mark.parametrize("value", ["2", "maybe", "enabled"])
def test_unknown_values_raise_naming_the_variable(value):
    with pytest.raises(ValueError, match=r"MLAKV_X="):
        _env.parse_flag("MLAKV_X", value)


def _flags_in_fresh_process(**env: str) -> tuple[str, str]:
    code = "import mlakv.ops.dispatch, mlakv._env as e; print(e.DISABLE_JIT, e.CHECK_BOUNDS)"
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    disable, check = r.stdout.split()
    return disable, check


@pytest.mark.parametrize("value,expected", [("false", "False"), ("0", "False"), ("", "False"), ("1", "True"), ("on", "True")])
def test_disable_jit_follows_the_truth_table(value, expected):
    """``MLAKV_DISABLE_JIT=false`` leaves the JIT on (it used to switch it off: any value but "" and "0")."""
    assert _flags_in_fresh_process(MLAKV_DISABLE_JIT=value)[0] == expected


def test_the_write_route_reads_the_parsed_flag(monkeypatch):
    """The dispatcher learns no JIT entry when the parsed flag says disabled, whatever the device."""
    from mlakv.ops import dispatch

    monkeypatch.setattr(_env, "DISABLE_JIT", True)
    monkeypatch.setattr(dispatch, "_JIT_ROUTES", {})

    class CudaLooking:
        is_cuda = True
        dtype = __import__("torch").bfloat16

        def get_device(self):
            return 0

        def element_size(self):
            return 2

    assert dispatch.jit_route(CudaLooking(), 512, 64) == dispatch.NO_JIT
