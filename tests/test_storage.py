"""HiCache L3: LocalFileStorage keeps every page it stored, or misses — never returns a wrong one.

Faults are real: writer processes SIGKILLed at every step of ``set`` and at random times, readers
racing writers, a full disk (``os.write`` raising ENOSPC in-process, and the kernel's own EFBIG under
``RLIMIT_FSIZE`` in a child), a read-only directory (a child without write permission).
"""

from __future__ import annotations

import errno
import logging
import os
import random
import resource
import signal
import time

import numpy as np
import pytest
import torch

from mlakv.mem_cache import LocalFileStorage, MLATokenToKVPool, MLATokenToKVPoolHost, prefix_page_key
from mlakv.mem_cache.host_pool import LAYOUTS
from mlakv.mem_cache.storage.base import HiCacheStorage

PAGE = 4096


def _page(seed: int, n: int = PAGE) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _temp_files(root) -> list[str]:
    return [p for p in os.listdir(root) if p.startswith(".tmp-")]


def _run_child(fn) -> int:
    """Run ``fn`` in a forked child; return its exit status (0 = ``fn`` returned normally)."""
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            fn()
            code = 0
        except BaseException:  # noqa: BLE001 - report through the exit code
            code = 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return status


# ---- the basics ----------------------------------------------------------------------------
def test_is_a_hicache_storage_and_round_trips(tmp_path):
    store = LocalFileStorage(tmp_path, PAGE)
    assert isinstance(store, HiCacheStorage)
    a = _page(1)
    assert store.get("a") is None and not store.exists("a")
    store.set("a", a)
    assert store.exists("a") and store.get("a") == a
    assert store.stats()["hits"] == 1 and store.stats()["misses"] == 1 and store.stats()["sets"] == 1
    assert _temp_files(tmp_path) == []


@pytest.mark.parametrize(
    "data",
    [bytearray(_page(2)), memoryview(_page(2)), np.frombuffer(_page(2), np.uint8), torch.frombuffer(bytearray(_page(2)), dtype=torch.uint8)],
    ids=["bytearray", "memoryview", "numpy-uint8", "tensor-uint8"],
)
def test_set_accepts_bytes_like_and_uint8_arrays(tmp_path, data):
    store = LocalFileStorage(tmp_path, PAGE)
    store.set("k", data)
    assert store.get("k") == _page(2)


@pytest.mark.parametrize(
    "data,exc,match",
    [
        (np.zeros(PAGE, np.int32), TypeError, "must be uint8"),  # issue 13 case 2: counted elements, not bytes
        (np.zeros(PAGE // 4, np.int32), TypeError, "must be uint8"),
        (torch.zeros(PAGE, dtype=torch.int16), TypeError, "must be uint8"),
        (b"x" * 100, ValueError, f"a page is {PAGE} bytes, got 100"),
        ("text", TypeError, "bytes-like"),
    ],
    ids=["int32-elements", "int32-bytes", "int16-tensor", "short", "str"],
)
def test_set_refuses_wrong_pages_and_writes_nothing(tmp_path, data, exc, match):
    store = LocalFileStorage(tmp_path, PAGE)
    with pytest.raises(exc, match=match):
        store.set("k", data)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("length", [1, 100, 244, 245, 250, 251, 300, 10_000])
def test_keys_of_any_length_map_to_bounded_names(tmp_path, length):
    """Issue 13 case 5: 245-250 char keys failed in set, 251+ raised OSError in exists/get."""
    store = LocalFileStorage(tmp_path, PAGE)
    key = "k" * length
    assert not store.exists(key) and store.get(key) is None
    store.set(key, _page(length))
    assert store.exists(key) and store.get(key) == _page(length)
    assert all(len(name) <= 45 for name in os.listdir(tmp_path))


def test_str_and_bytes_keys_name_the_same_page(tmp_path):
    store = LocalFileStorage(tmp_path, PAGE)
    store.set(b"abc", _page(3))
    assert store.get("abc") == _page(3)
    store.set("../../escape/\x00", _page(4))  # any characters: the file name is a hash
    assert store.get(b"../../escape/\x00") == _page(4)
    assert len(os.listdir(tmp_path)) == 2 and not (tmp_path.parent / "escape").exists()


@pytest.mark.parametrize("key,exc", [(["a"], TypeError), (7, TypeError), (None, TypeError), ("", ValueError), (b"", ValueError)])
def test_bad_keys_are_refused(tmp_path, key, exc):
    store = LocalFileStorage(tmp_path, PAGE)
    for call in (lambda: store.set(key, _page(0)), lambda: store.get(key), lambda: store.exists(key)):
        with pytest.raises(exc, match="key must"):
            call()
    assert os.listdir(tmp_path) == []


# ---- corruption ------------------------------------------------------------------------------
def _flip(path, offset_from_end: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) - offset_from_end] ^= 0x01
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "damage",
    ["flip-payload", "flip-header", "truncate", "extend", "zero-length", "foreign"],
)
def test_damaged_pages_are_misses_counted_and_logged_once(tmp_path, caplog, damage):
    store = LocalFileStorage(tmp_path, PAGE)
    store.set("a", _page(1))
    store.set("b", _page(2))
    path = store.path_of("a")
    if damage == "flip-payload":
        _flip(path, 17)
    elif damage == "flip-header":
        _flip(path, PAGE + 40)  # inside the key digest / checksum fields
    elif damage == "truncate":
        os.truncate(path, path.stat().st_size - 1)
    elif damage == "extend":
        with open(path, "ab") as f:
            f.write(b"\0")
    elif damage == "zero-length":
        os.truncate(path, 0)
    else:  # b's file planted under a's name
        path.write_bytes(store.path_of("b").read_bytes())
    with caplog.at_level(logging.WARNING, logger="mlakv.mem_cache.storage"):
        assert store.get("a") is None
        assert store.get("a") is None
    assert store.stats()["corrupt"] == 2
    assert len([r for r in caplog.records if "refusing page" in r.getMessage()]) == 1
    assert store.get("b") == _page(2), "other pages are unaffected"


def test_size_is_checked_before_reading(tmp_path):
    """Issue 13 case 4: a 6 GiB file under a key used to be read whole (MemoryError)."""
    store = LocalFileStorage(tmp_path, PAGE)
    store.set("a", _page(1))
    os.truncate(store.path_of("a"), 6 << 30)  # sparse: costs no disk
    t0 = time.perf_counter()
    assert store.get("a") is None and not store.exists("a")
    assert time.perf_counter() - t0 < 1.0
    assert store.stats()["corrupt"] == 1


# ---- temporary files ---------------------------------------------------------------------------
def test_stale_temp_files_of_dead_writers_are_removed(tmp_path):
    store = LocalFileStorage(tmp_path, PAGE)
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)  # a pid that is certainly dead now
    dead = tmp_path / f".tmp-{store._writer}-{pid}-deadbeefdeadbeef"
    live = tmp_path / f".tmp-{store._writer}-{os.getppid()}-0123456789abcdef"  # our parent: alive
    old = tmp_path / ".tmp-otherhost-1-0123456789abcdef"
    for p in (dead, live, old):
        p.write_bytes(b"partial")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    reopened = LocalFileStorage(tmp_path, PAGE)
    assert sorted(_temp_files(tmp_path)) == [live.name]
    assert reopened.stats()["stale_removed"] == 2


def _instrumented_set(store, key, data, die_at: int, chunk: int = 1024) -> None:
    """``store.set`` with every write (in ``chunk``-byte pieces), fsync and rename counted as a
    step; SIGKILL this process just before step ``die_at``."""
    count = [0]
    real_write, real_fsync, real_replace = os.write, os.fsync, os.replace

    def step():
        count[0] += 1
        if count[0] == die_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def write(fd, b):
        step()
        return real_write(fd, memoryview(b)[:chunk])

    def fsync(fd):
        step()
        return real_fsync(fd)

    def replace(a, b):
        step()
        return real_replace(a, b)

    os.write, os.fsync, os.replace = write, fsync, replace
    try:
        store.set(key, data)
    finally:
        os.write, os.fsync, os.replace = real_write, real_fsync, real_replace
    return count[0]


def test_writer_killed_at_every_step_of_set_leaves_old_or_new(tmp_path):
    store = LocalFileStorage(tmp_path, PAGE)
    old, new = _page(10), _page(11)
    store.set("k", old)
    steps = _instrumented_set(LocalFileStorage(tmp_path / "dry", PAGE), "k", new, die_at=-1)
    assert steps > 6  # header, payload pieces, fsync, rename, directory fsync
    seen = set()
    for die_at in range(1, steps + 2):
        status = _run_child(lambda: _instrumented_set(store, "k", new, die_at))
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        assert killed == (die_at <= steps), f"die_at={die_at}: status {status}"
        got = store.get("k")
        assert got in (old, new), f"torn page after a kill at step {die_at}"
        seen.add(got)
        if got == new:
            store.set("k", old)  # back to the old page for the next kill point
    assert seen == {old, new}
    assert LocalFileStorage(tmp_path, PAGE).stats()["stale_removed"] >= 1
    assert _temp_files(tmp_path) == [], "stale temp files of killed writers were removed on open"


def test_writers_sigkilled_at_random_times_never_tear_a_page(tmp_path):
    """A writer looping ``set`` over two 1 MiB pages, SIGKILLed at a random moment: at least 60 times,
    and on until 10 kills have landed inside a ``set`` (a fast disk needs more tries; 600 at most)."""
    big = 1 << 20
    pages = [_page(20, big), _page(21, big)]
    store = LocalFileStorage(tmp_path, big)
    store.set("k", pages[0])
    rng = random.Random(7)

    def writer():
        i = 1
        while True:
            store.set("k", pages[i % 2])
            i += 1

    kills = 0
    while kills < 60 or (len(_temp_files(tmp_path)) < 10 and kills < 600):
        kills += 1
        pid = os.fork()
        if pid == 0:
            try:
                writer()
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.0, 0.01))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        assert store.get("k") in pages
    assert store.stats()["corrupt"] == 0
    assert len(_temp_files(tmp_path)) >= 10, "too few kills landed inside a set to test anything"
    LocalFileStorage(tmp_path, big)
    assert _temp_files(tmp_path) == []


def test_readers_racing_writers_see_whole_pages(tmp_path):
    big = 256 << 10
    pages = [_page(30, big), _page(31, big)]
    store = LocalFileStorage(tmp_path, big, fsync=False)
    store.set("k", pages[0])
    kids = []
    for which in (0, 1):
        pid = os.fork()
        if pid == 0:
            try:
                end = time.time() + 1.0
                while time.time() < end:
                    store.set("k", pages[which])
            finally:
                os._exit(0)
        kids.append(pid)
    reads = 0
    end = time.time() + 1.0
    while time.time() < end:
        assert store.get("k") in pages
        reads += 1
    for pid in kids:
        os.waitpid(pid, 0)
    assert reads > 20 and store.stats()["corrupt"] == 0


# ---- a full disk, a read-only directory -----------------------------------------------------
def test_disk_full_raises_clearly_and_keeps_earlier_pages(tmp_path, monkeypatch):
    """ENOSPC simulated by ``os.write`` failing after part of the page was written."""
    store = LocalFileStorage(tmp_path, PAGE)
    store.set("a", _page(1))
    store.set("b", _page(2))
    real_write = os.write

    def full(fd, data):
        real_write(fd, memoryview(data)[:100])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError, match=r"storing key 'a' .* the disk is full .* keeps its previous page") as ei:
        store.set("a", _page(9))
    assert ei.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert store.get("a") == _page(1) and store.get("b") == _page(2)
    assert _temp_files(tmp_path) == [] and store.stats()["set_errors"] == 1


def test_file_size_limit_from_the_kernel_raises_clearly(tmp_path):
    """A real kernel refusal: ``RLIMIT_FSIZE`` below a page file makes ``write`` fail with EFBIG."""
    store = LocalFileStorage(tmp_path, PAGE)
    store.set("a", _page(1))
    r, w = os.pipe()

    def child():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (PAGE // 2, PAGE // 2))
        try:
            store.set("a", _page(9))
        except OSError as e:
            os.write(w, f"{e.errno}|{e}".encode())

    assert _run_child(child) == 0
    os.close(w)
    report = os.read(r, 4096).decode()
    os.close(r)
    assert report.startswith(f"{errno.EFBIG}|") and "file size limit" in report
    assert store.get("a") == _page(1) and _temp_files(tmp_path) == []


def test_read_only_directory():
    """Set raises naming the key; reads keep working. Run in a child without write permission
    (an unprivileged uid when the tests run as root, who ignores directory modes; the directory
    lives directly under /tmp so that uid can reach it)."""
    import shutil
    import tempfile
    from pathlib import Path

    tmp_path = Path(tempfile.mkdtemp(prefix="mlakv-ro-", dir="/tmp"))
    store = LocalFileStorage(tmp_path, PAGE)
    store.set("a", _page(1))
    os.chmod(tmp_path, 0o555)
    r, w = os.pipe()

    def child():
        if os.geteuid() == 0:
            os.setgid(65534)
            os.setuid(65534)
        ro = LocalFileStorage(tmp_path, PAGE)
        ok = ro.get("a") == _page(1)
        try:
            ro.set("b", _page(2))
            msg = "no error"
        except OSError as e:
            msg = f"{e.errno}|{e}"
        os.write(w, f"{ok}|{msg}".encode())

    try:
        assert _run_child(child) == 0
        os.close(w)
        report = os.read(r, 4096).decode()
        os.close(r)
        assert report.startswith(f"True|{errno.EACCES}|") and "storing key 'b'" in report and "not writable" in report
        assert store.get("a") == _page(1) and not store.exists("b")
    finally:
        os.chmod(tmp_path, 0o755)
        shutil.rmtree(tmp_path)


# ---- batches over a host pool --------------------------------------------------------------------
def _host(layout, page_size=4, layers=2):
    pool = MLATokenToKVPool(64, page_size, torch.bfloat16, 512, 64, layers, "cpu")
    host = MLATokenToKVPoolHost(pool, host_size=128, layout=layout)
    host._bytes.random_(0, 256)
    return host


@pytest.mark.parametrize("load_layout", LAYOUTS)
@pytest.mark.parametrize("store_layout", LAYOUTS)
def test_batch_set_and_get_between_any_layouts(tmp_path, store_layout, load_layout):
    src, dst = _host(store_layout), _host(load_layout)
    store = LocalFileStorage(tmp_path, src.page_bytes)
    store.register_mem_pool_host(src)
    keys = ["p0", "p1", "p2"]
    src_slots = torch.tensor([8, 20, 4])  # page starts
    assert store.batch_set_from(keys, src_slots) == 3
    store.register_mem_pool_host(dst)
    dst_tokens = torch.cat([torch.arange(s, s + 4) for s in (40, 0, 100)])  # token-slot form
    untouched = dst.get_page_bytes(60)
    assert store.batch_exists(keys + ["nope"]) == 3
    assert store.batch_get_into(keys, dst_tokens) == 3
    for s, d in zip((8, 20, 4), (40, 0, 100)):
        assert dst.get_page_bytes(d) == src.get_page_bytes(s)
        assert store.get(keys[(8, 20, 4).index(s)]) == src.get_page_bytes(s)
    assert dst.get_page_bytes(60) == untouched


def test_batch_get_stops_at_the_first_miss(tmp_path):
    host = _host("page_first_direct")
    store = LocalFileStorage(tmp_path, host.page_bytes)
    store.register_mem_pool_host(host)
    store.batch_set_from(["a", "c"], torch.tensor([0, 8]))
    after = host.get_page_bytes(48)
    assert store.batch_exists(["a", "b", "c"]) == 1
    assert store.batch_get_into(["a", "b", "c"], torch.tensor([40, 44, 48])) == 1
    assert host.get_page_bytes(40) == host.get_page_bytes(0) and host.get_page_bytes(48) == after


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda s, h: s.batch_get_into(["a"], torch.tensor([0])), RuntimeError, "register_mem_pool_host"),
        (lambda s, h: s.register_mem_pool_host(_host("page_first", layers=3)), ValueError, "pages are"),
    ],
    ids=["unregistered", "page-size-mismatch"],
)
def test_batch_setup_errors(tmp_path, call, exc, match):
    host = _host("page_first")
    store = LocalFileStorage(tmp_path, host.page_bytes)
    with pytest.raises(exc, match=match):
        call(store, host)


@pytest.mark.parametrize(
    "keys,idx,exc,match",
    [
        (["a", "b"], torch.tensor([0]), ValueError, "1 entries for 2 keys"),
        (["a"], torch.tensor([3]), IndexError, "page-aligned"),
        (["a"], torch.tensor([4.0]), TypeError, "int32/int64"),
        ("ab", torch.tensor([0, 4]), TypeError, "keys must be a list or tuple"),
    ],
)
def test_batch_index_errors(tmp_path, keys, idx, exc, match):
    host = _host("page_first")
    store = LocalFileStorage(tmp_path, host.page_bytes)
    store.register_mem_pool_host(host)
    with pytest.raises(exc, match=match):
        store.batch_set_from(keys, idx)
    assert os.listdir(tmp_path) == []


# ---- prefix keys -------------------------------------------------------------------------------
def test_prefix_keys_chain():
    a1 = prefix_page_key([1, 2, 3])
    a2 = prefix_page_key([4, 5, 6], a1)
    b2 = prefix_page_key([4, 5, 6], prefix_page_key([1, 2, 9]))
    assert a1 == prefix_page_key([1, 2, 3]) == prefix_page_key(torch.tensor([1, 2, 3])) == prefix_page_key(np.array([1, 2, 3]))
    assert a2 != b2


@pytest.mark.parametrize("tokens", [[1.9, 2.2], [True, 2], torch.tensor([1.0, 2.0]), ["1", "2"]])
def test_prefix_key_refuses_non_integer_tokens(tokens):
    """Issue 13 case 5: float tokens were truncated, so [1.9, 2.2] collided with [1, 2]."""
    with pytest.raises(TypeError, match="token_ids must hold integers"):
        prefix_page_key(tokens)
