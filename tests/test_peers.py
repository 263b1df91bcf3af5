"""``mlakv fetch-peers``: which files of a peer's wheel land where, checked offline on a small fake wheel.

The download itself (``pip download``) needs the package index; here only its command line is
checked. Everything after the download (the member map, the required files, replacing an old copy,
the command's exit codes) runs on a zip written by the test.
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import pytest

from mlakv.bench import peers
from mlakv.bench.peers import PEERS, PeerFetchError, extract_wheel, fetch, member_targets, pip_download_command

SGLANG = PEERS["sglang"]
JIT = "sglang/kernels/jit/"

# member -> where it must land under .peers/sglang (None: left out)
FAKE_WHEEL = {
    JIT + "include/sgl_kernel/utils.cuh": "include/sgl_kernel/utils.cuh",
    JIT + "include/sgl_kernel/deepseek_v4/kv_layout.cuh": "include/sgl_kernel/deepseek_v4/kv_layout.cuh",
    JIT + "csrc/elementwise/set_mla_kv_buffer.cuh": "csrc/elementwise/set_mla_kv_buffer.cuh",
    JIT + "csrc/elementwise/rope.cuh": "csrc/elementwise/rope.cuh",
    JIT + "csrc/deepseek_v4/store.cuh": "csrc/deepseek_v4/store.cuh",
    JIT + "csrc/deepseek_v32/indexer_k.cuh": "csrc/deepseek_v32/indexer_k.cuh",
    "sglang/kernels/ops/kvcache/set_mla_kv_buffer.py": "ops/set_mla_kv_buffer.py",
    "sglang/kernels/ops/attention/dsv4/kv_layout.py": "ops/dsv4_kv_layout.py",
    "sglang/srt/mem_cache/index_key_cache.py": "srt/index_key_cache.py",
    "sglang/test/kernels/deepseek_v4/dsv41_kv_quant_reference.py": "test/dsv41_kv_quant_reference.py",
    JIT + "csrc/elementwise/other_kernel.cuh": None,  # a sibling of a named file
    JIT + "csrc/gemm/gemm.cuh": None,  # a directory the map does not name
    "sglang/srt/mem_cache/memory_pool.py": None,
    "sglang-0.5.23.dist-info/METADATA": None,
}


def make_wheel(path: Path, members: dict[str, object]) -> Path:
    """A zip with one small file per member (its content names it) plus directory entries."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(JIT + "include/", b"")  # a directory entry: never a file
        for name in members:
            z.writestr(name, f"content of {name}\n")
    return path


def test_member_map_names_each_wanted_file_and_leaves_out_the_rest():
    got = member_targets([JIT + "include/", *FAKE_WHEEL], SGLANG.files)
    assert got == {m: t for m, t in FAKE_WHEEL.items() if t is not None}


def test_a_directory_entry_maps_to_nothing():
    assert member_targets([JIT + "include/", JIT + "csrc/deepseek_v4/"], SGLANG.files) == {}


@pytest.mark.parametrize("member", [JIT + "include/../../../escape.h", JIT + "include/a/../../../../b.h"])
def test_a_member_that_would_leave_the_peer_directory_is_refused(member):
    with pytest.raises(PeerFetchError, match="outside the peer directory"):
        member_targets([member], SGLANG.files)


def test_extract_writes_exactly_the_mapped_files_with_their_content(tmp_path):
    wheel = make_wheel(tmp_path / "sglang-0.5.23-py3-none-any.zip", FAKE_WHEEL)
    dest = tmp_path / ".peers" / "sglang"
    written = extract_wheel(wheel, dest, SGLANG)
    expected = {t: m for m, t in FAKE_WHEEL.items() if t is not None}
    on_disk = {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()}
    assert on_disk == set(expected)
    assert sorted(written) == sorted(dest / t for t in expected)
    for target, member in expected.items():
        assert (dest / target).read_text() == f"content of {member}\n"
    assert [p.name for p in dest.parent.iterdir()] == ["sglang"]  # no staging directory left behind


def test_extract_replaces_an_older_copy(tmp_path):
    dest = tmp_path / "sglang"
    (dest / "csrc").mkdir(parents=True)
    (dest / "csrc" / "stale.cuh").write_text("old")
    extract_wheel(make_wheel(tmp_path / "w.zip", FAKE_WHEEL), dest, SGLANG)
    assert not (dest / "csrc" / "stale.cuh").exists()
    assert (dest / "csrc" / "elementwise" / "set_mla_kv_buffer.cuh").is_file()


def test_a_wheel_without_the_kernel_is_refused_and_the_old_copy_kept(tmp_path):
    dest = tmp_path / "sglang"
    dest.mkdir()
    (dest / "keep.txt").write_text("old")
    members = {m: t for m, t in FAKE_WHEEL.items() if "set_mla_kv_buffer.cuh" not in m}
    with pytest.raises(PeerFetchError, match="lacks csrc/elementwise/set_mla_kv_buffer.cuh"):
        extract_wheel(make_wheel(tmp_path / "w.zip", members), dest, SGLANG)
    assert (dest / "keep.txt").read_text() == "old"


def test_a_file_that_is_not_a_zip_is_named(tmp_path):
    bad = tmp_path / "sglang.zip"
    bad.write_text("not a zip")
    with pytest.raises(PeerFetchError, match="not a readable wheel"):
        extract_wheel(bad, tmp_path / "sglang", SGLANG)


def test_pip_downloads_the_measured_version_alone(tmp_path):
    cmd = pip_download_command(SGLANG, SGLANG.version, tmp_path)
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in cmd and "--only-binary=:all:" in cmd
    assert cmd[-1] == "sglang==0.5.23" and cmd[cmd.index("--dest") + 1] == str(tmp_path)


def test_download_returns_the_one_file_pip_left(tmp_path, monkeypatch):
    import subprocess

    def fake_pip(cmd, **kw):
        (tmp_path / "sglang-0.5.23-py3-none-any.zip").write_bytes(b"zip")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(peers.subprocess, "run", fake_pip)
    assert peers.download_wheel(SGLANG, "0.5.23", tmp_path) == tmp_path / "sglang-0.5.23-py3-none-any.zip"


def test_a_failed_pip_is_reported_with_its_last_lines(tmp_path, monkeypatch):
    import subprocess

    monkeypatch.setattr(peers.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution\n"))  # fmt: skip
    with pytest.raises(PeerFetchError, match="(?s)exit 1.*No matching distribution"):
        peers.download_wheel(SGLANG, "9.9.9", tmp_path)


def test_fetch_downloads_then_extracts(tmp_path, monkeypatch):
    """``fetch`` hands the wheel pip left to the extraction (pip replaced by a copy of the fake wheel)."""
    fake = make_wheel(tmp_path / "fake.zip", FAKE_WHEEL)
    seen = {}

    def fake_download(peer, version, into):
        seen["version"] = version
        target = into / f"sglang-{version}-py3-none-any.zip"
        target.write_bytes(fake.read_bytes())
        return target

    monkeypatch.setattr(peers, "download_wheel", fake_download)
    dest = fetch("sglang", tmp_path / "peers", version="0.5.99")
    assert seen["version"] == "0.5.99" and dest == tmp_path / "peers" / "sglang"
    assert (dest / "include" / "sgl_kernel" / "utils.cuh").is_file()


def test_command_extracts_a_given_wheel(tmp_path, capsys):
    wheel = make_wheel(tmp_path / "w.zip", FAKE_WHEEL)
    assert peers.main(["sglang", "--wheel", str(wheel), "--dest", str(tmp_path / "p")]) == 0
    assert f"{sum(t is not None for t in FAKE_WHEEL.values())} files in {tmp_path / 'p' / 'sglang'}" in capsys.readouterr().out


def test_command_reports_a_failed_fetch_in_one_line(tmp_path, capsys):
    wheel = make_wheel(tmp_path / "w.zip", {"sglang/other.py": None})
    assert peers.main(["sglang", "--wheel", str(wheel), "--dest", str(tmp_path / "p")]) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("mlakv fetch-peers:")]
    assert len(err) == 1 and "lacks" in err[0]


def test_an_unknown_peer_is_a_usage_error_naming_the_known_ones(capsys):
    with pytest.raises(SystemExit) as e:
        peers.main(["vllm2"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "unknown peer 'vllm2'" in err and "sglang" in err


def test_vllm_is_fetched_by_its_own_module(capsys):
    """`mlakv fetch-peers vllm ...` hands the rest of the command line to mlakv.compat.fetch_vllm_tests."""
    with pytest.raises(SystemExit) as e:
        peers.main(["vllm", "--help"])
    assert e.value.code == 0 and "vLLM" in capsys.readouterr().out
