"""Every Python code block of README.md runs as written, so the README cannot rot.

Each ```python block runs in a fresh namespace, in a temporary working directory with ``TMPDIR``
pointing into it (the blocks choose their device with ``torch.cuda.is_available()`` and put storage
under ``tempfile``), on whatever device this machine has.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks() -> list[tuple[str, str]]:
    """``(id, source)`` of each python block, the id naming the section it is in."""
    text = README.read_text()
    out = []
    for m in BLOCK.finditer(text):
        heads = re.findall(r"^## (.+)$", text[: m.start()], re.M)
        section = re.sub(r"\W+", "-", heads[-1] if heads else "top").strip("-").lower()
        line = text[: m.start(1)].count("\n")
        # padded with blank lines so a traceback points at the README's own line numbers
        out.append((f"{section}-line{line}", "\n" * line + m.group(1)))
    return out


BLOCKS = python_blocks()


def test_readme_has_the_documented_examples():
    sections = " ".join(i for i, _ in BLOCKS)
    assert len(BLOCKS) >= 3, "README lost its python examples"
    for name in ("using-the-pool", "using-the-allocator", "hicache"):
        assert name in sections, f"no python block under a section named like {name!r}"


@pytest.mark.parametrize("source", [s for _, s in BLOCKS], ids=[i for i, _ in BLOCKS])
def test_readme_block_runs(source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    exec(compile(source, str(README), "exec"), {"__name__": "__readme__"})
