"""docs/api.md is generated from the docstrings (``python tools/api_doc.py``, pdoc): it must be current.

A docstring or signature of a public name that changed without the page being regenerated fails
here, with the command that fixes it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_api_reference_is_current():
    pytest.importorskip("pdoc", reason="pdoc is in the test extra: pip install -e '.[test]'")
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "api_doc.py"), "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.stdout


def test_api_reference_names_every_public_name_of_the_package():
    import mlakv

    text = (ROOT / "docs" / "api.md").read_text()
    for name in mlakv.__all__:
        assert name in text, f"docs/api.md does not name mlakv.{name}"
