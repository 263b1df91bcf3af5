"""The repository speaks about the software only: no path outside the checkout, no word about how the
machines that produced its evidence were obtained. Evidence names the device, driver, versions, date,
command and numbers instead (docs/gpu-report.md, docs/benchmarks.md)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILES = sorted(
    [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "pyproject.toml", ROOT / ".gitignore"]
    + list((ROOT / "docs").rglob("*.md"))
    + list((ROOT / "mlakv").rglob("*.py"))
    + list((ROOT / "tools").rglob("*.py"))
)
FORBIDDEN = {
    "a path outside the repository": re.compile(r"\.\./shared"),
    "a work session": re.compile(r"\bsessions? ?[0-9]", re.I),
    # (the letters in brackets keep this file itself from matching a plain search for the words)
    "a loaned machine": re.compile(r"\bl[e]nt\b", re.I),
    "files brought to a machine": re.compile(r"\bcarr[i]ed\b", re.I),
    "a local wheel directory": re.compile(r"\.wh[l]\b"),
    "a machine kind's name": re.compile(r"nvidia-h[0-9]+-x[0-9]", re.I),
}


def test_files_speak_about_the_software_only():
    assert len(FILES) > 50
    bad = [
        f"{path.relative_to(ROOT)}:{i}: {what}: {line.strip()[:100]}"
        for path in FILES
        if path.is_file()
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        for what, rx in FORBIDDEN.items()
        if rx.search(line)
    ]
    assert not bad, "\n".join(bad)
