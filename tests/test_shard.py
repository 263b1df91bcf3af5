"""``pytest --shard K/N`` (tests/conftest.py): N runs of the suite's shards run every test exactly once.

Why: a GPU run of the whole suite may not fit one command's time; shards let it run in parts.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import shard_files

FILES = {
    "test_a.py": "import pytest\n\n@pytest.mark.parametrize('i', range(7))\ndef test_a(i):\n    pass\n",
    "test_b.py": "def test_b1():\n    pass\n\ndef test_b2():\n    pass\n",
    "test_c.py": "import pytest\n\n@pytest.mark.parametrize('i', range(4))\ndef test_c(i):\n    pass\n",
    "test_d.py": "def test_d():\n    pass\n",
}


def _collected(tmp_path, *args: str) -> tuple[int, list[str], str]:
    for name, text in FILES.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "conftest.py").write_text((__import__("pathlib").Path(__file__).parent / "conftest.py").read_text())
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", "-o", "addopts=",
                        "--collect-only", "-q", *args], cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip
    ids = [ln for ln in r.stdout.splitlines() if "::" in ln]
    return r.returncode, ids, r.stdout + r.stderr


def test_split_balances_test_counts_by_whole_files():
    counts = {"a": 7, "b": 2, "c": 4, "d": 1}
    assert shard_files(counts, 2) == [["a"], ["c", "b", "d"]]
    assert shard_files(counts, 1) == [["a", "c", "b", "d"]]
    assert shard_files(counts, 5) == [["a"], ["c"], ["b"], ["d"], []]


@pytest.mark.parametrize("n", [1, 2, 3])
def test_shards_partition_the_suite(tmp_path, n):
    rc, every, _ = _collected(tmp_path)
    assert rc == 0 and len(every) == 14
    parts = [_collected(tmp_path, "--shard", f"{k}/{n}")[1] for k in range(1, n + 1)]
    assert sorted(sum(parts, [])) == sorted(every)  # each test in exactly one shard
    for part in parts:  # whole files only
        files = {i.split("::")[0] for i in part}
        assert all(sum(i.startswith(f + "::") for i in every) == sum(i.startswith(f + "::") for i in part) for f in files)


@pytest.mark.parametrize("spec", ["0/2", "3/2", "x/2", "1"])
def test_a_bad_shard_is_a_usage_error_naming_the_option(tmp_path, spec):
    rc, _, out = _collected(tmp_path, "--shard", spec)
    assert rc != 0 and "--shard" in out
