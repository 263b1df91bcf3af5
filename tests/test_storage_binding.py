"""HiCache L3: a stored page is bound to its key and to the pool that wrote it, on every backend.

Spec (the storage matrix): a page written by a host pool of one {shape, layout, dtype, format,
scale} and read by a pool that differs in one of them is either the same page — the bytes equal the
writer's page in the canonical ``[layer][token][row]`` order (only where the difference is the
byte order inside a page and the backend converts it: LocalFileStorage reorders, Mooncake keys the
two orders apart) — or a counted miss; never a hit with other bytes. Backends: LocalFileStorage
and MooncakeStorage against a real ``mooncake_master`` (skipped only where Mooncake cannot be
installed).

Also: the same bytes under another key are a miss (Mooncake: an object copied with the raw client;
``page_format`` differs for different ``k_scale``); a FIFO or other special file at a page's path
is a counted miss at once, never a hang; temporary-file names tell hosts and pid namespaces apart,
so one writer never deletes another's in-flight file.
"""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch

from mlakv.mem_cache import LocalFileStorage, MLATokenToKVPool, MLATokenToKVPoolHost
import mlakv.mem_cache.storage.local as local_mod

# name -> pool settings: (layers, tokens per page, layout, dtype, kv_cache_format, k_scale, start_layer).
# All pages are 2 x 4 x 576 or 2 x 4 x 1152 bytes; each entry differs from BASE (or FP8) in one thing.
F8 = torch.float8_e4m3fn
CONFIGS = {
    "base": (2, 4, "page_first_direct", torch.bfloat16, None, None, 0),
    "layout-page_first": (2, 4, "page_first", torch.bfloat16, None, None, 0),
    "layout-layer_first": (2, 4, "layer_first", torch.bfloat16, None, None, 0),
    "shape-4x2": (4, 2, "page_first_direct", torch.bfloat16, None, None, 0),
    "shape-layers-2-4": (2, 4, "page_first_direct", torch.bfloat16, None, None, 2),
    "dtype-fp16": (2, 4, "page_first_direct", torch.float16, None, None, 0),
    "fp8-raw": (2, 4, "page_first_direct", F8, None, None, 0),
    "fp8-per_tensor-1": (2, 4, "page_first_direct", F8, "per_tensor", 1.0, 0),
    "fp8-per_tensor-0.01": (2, 4, "page_first_direct", F8, "per_tensor", 0.01, 0),
}
# (writer, reader): the reader differs from the writer in the named dimension
PAIRS = [
    ("base", "base"),  # control: a hit
    ("base", "layout-page_first"),
    ("layout-page_first", "base"),
    ("layout-layer_first", "base"),
    ("layout-page_first", "shape-4x2"),  # the issue's case: same page bytes, other shape and layout
    ("base", "shape-4x2"),
    ("base", "shape-layers-2-4"),
    ("base", "dtype-fp16"),
    ("fp8-raw", "fp8-per_tensor-1"),  # format
    ("fp8-per_tensor-1", "fp8-per_tensor-0.01"),  # scale
    ("fp8-per_tensor-1", "fp8-per_tensor-1"),  # control
]


def make_host(name: str, pages: int = 4) -> MLATokenToKVPoolHost:
    layers, tokens, layout, dtype, fmt, scale, start = CONFIGS[name]
    dev = MLATokenToKVPool(pages * tokens, tokens, dtype, 512, 64, layers, "cpu", start_layer=start,
                           end_layer=start + layers, kv_cache_format=fmt, k_scale=scale)  # fmt: skip
    host = MLATokenToKVPoolHost(dev, host_size=pages * tokens, layout=layout)
    host.kv_buffer.view(-1).view(torch.uint8).random_(0, 256)
    return host


def _check_pair(writer, reader, w_store, r_store, key: str) -> str:
    """Write page 1 of ``writer`` under ``key``, read it into page 2 of ``reader`` (batch and single
    page); return "hit" or "miss" after asserting the invariant."""
    wp, rp = writer.page_size, reader.page_size
    w_store.batch_set_from([key], torch.tensor([1 * wp]))
    want = writer.get_page_bytes(1 * wp)
    before = dict(r_store.stats())
    got = r_store.batch_get_into([key], torch.tensor([2 * rp]))
    single = r_store.get(key)
    after = r_store.stats()
    if got == 1:
        assert reader.get_page_bytes(2 * rp) == want, "a hit with other bytes"
        assert single == want
        return "hit"
    assert got == 0 and single is None
    counted = sum(after[k] - before.get(k, 0) for k in ("misses", "corrupt"))
    assert counted >= 2, f"misses not counted: {before} -> {after}"
    return "miss"


def _expected(writer: str, reader: str, backend: str) -> str:
    if writer == reader:
        return "hit"
    orders = {n: ("TLR" if CONFIGS[n][2] == "page_first" else "LTR") for n in (writer, reader)}
    same_but_layout = CONFIGS[writer][:2] + CONFIGS[writer][3:] == CONFIGS[reader][:2] + CONFIGS[reader][3:]
    if same_but_layout and (backend == "local" or orders[writer] == orders[reader]):
        return "hit"
    return "miss"


# ---- local files ------------------------------------------------------------------------------
@pytest.mark.parametrize("writer,reader", PAIRS, ids=[f"{w}->{r}" for w, r in PAIRS])
def test_matrix_local_files(tmp_path, writer, reader):
    w, r = make_host(writer), make_host(reader)
    ws, rs = LocalFileStorage(tmp_path, w.page_bytes, fsync=False), LocalFileStorage(tmp_path, r.page_bytes, fsync=False)
    ws.register_mem_pool_host(w)
    rs.register_mem_pool_host(r)
    assert _check_pair(w, r, ws, rs, "k") == _expected(writer, reader, "local")


def test_issue_case_page_of_another_shape_is_a_counted_corrupt_miss(tmp_path):
    """A 2-layer x 4-token page_first page read by a 4-layer x 2-token page_first_direct pool of the
    same page bytes: a miss counted as ``corrupt``, never a hit; ``get`` agrees."""
    w, r = make_host("layout-page_first"), make_host("shape-4x2")
    assert w.page_bytes == r.page_bytes
    ws, rs = LocalFileStorage(tmp_path, w.page_bytes), LocalFileStorage(tmp_path, r.page_bytes)
    ws.register_mem_pool_host(w)
    rs.register_mem_pool_host(r)
    ws.batch_set_from(["p"], torch.tensor([0]))
    assert rs.batch_get_into(["p"], torch.tensor([0])) == 0
    assert rs.get("p") is None
    assert rs.stats()["corrupt"] == 2 and rs.stats()["hits"] == 0


def test_scale_change_of_one_pool_makes_its_old_pages_misses(tmp_path):
    """A per_tensor pool whose ``k_scale`` tensor is changed in place: pages written under the old
    scale no longer read (the format is read at each call, not at registration)."""
    scale = torch.tensor([1.0])  # this pool's own scale tensor, kept by reference
    dev = MLATokenToKVPool(16, 4, F8, 512, 64, 2, "cpu", kv_cache_format="per_tensor", k_scale=scale)
    host = MLATokenToKVPoolHost(dev, host_size=16, layout="page_first_direct")
    store = LocalFileStorage(tmp_path, host.page_bytes)
    store.register_mem_pool_host(host)
    store.batch_set_from(["a"], torch.tensor([0]))
    assert store.batch_get_into(["a"], torch.tensor([4])) == 1
    scale.fill_(0.5)
    assert store.batch_get_into(["a"], torch.tensor([4])) == 0


# ---- special files (issue 22 case 7) ----------------------------------------------------------------
def _in_child(fn, timeout: float = 20.0) -> int:
    """Run ``fn`` in a forked child; its exit status, or -9 if it did not end within ``timeout``."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = 0 if fn() is not False else 4
        except BaseException:  # noqa: BLE001 - reported through the exit code
            code = 3
        finally:
            os._exit(code)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return -9


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_special_file_at_a_page_path_is_a_counted_miss_not_a_hang(tmp_path, kind):
    store = LocalFileStorage(tmp_path, 4096)
    path = store.path_of("k")
    os.mkfifo(path) if kind == "fifo" else os.mkdir(path)
    host = make_host("base")
    reader = LocalFileStorage(tmp_path, host.page_bytes)
    reader.register_mem_pool_host(host)
    rpath = reader.path_of("k2")
    os.mkfifo(rpath) if kind == "fifo" else os.mkdir(rpath)

    def probe():
        return (store.get("k") is None and not store.exists("k") and store.stats()["corrupt"] == 1
                and reader.batch_get_into(["k2"], torch.tensor([0])) == 0 and reader.stats()["corrupt"] == 1)

    assert _in_child(probe, timeout=20) == 0


# ---- temporary files of other writers (issue 22 case 10) --------------------------------------------
def _paused_writer(tmp_path, hostname: str, fake_pid: int, ns: str, started, go) -> bool:
    """A writer (in a child) whose pids mean nothing to the parent (``os.getpid`` says ``fake_pid``,
    a pid dead in the parent): it starts a ``set``, pauses after its temporary file exists, then
    finishes. True if its page then reads back."""
    socket.gethostname = lambda: hostname
    local_mod.os.getpid = lambda: fake_pid
    real_identity = getattr(local_mod, "_writer_identity", None)
    if real_identity is not None:
        local_mod._writer_identity = lambda: (real_identity()[0] + ns, True)
    store = LocalFileStorage(tmp_path, 4096)
    real_write_all = local_mod._write_all

    def pausing(fd, data):
        real_write_all(fd, data)
        if not started.exists():
            started.write_bytes(b"")
            end = time.monotonic() + 15
            while not go.exists() and time.monotonic() < end:
                time.sleep(0.01)

    local_mod._write_all = pausing
    page = bytes(range(256)) * 16
    store.set("k", page)
    return store.get("k") == page


def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


@pytest.mark.parametrize(
    "other_host,other_ns",
    [("a" * 32 + "-writer-one", ""), (None, "|another-pid-namespace")],
    ids=["hosts-sharing-32-chars", "same-host-other-pid-namespace"],
)
def test_a_store_opening_never_deletes_another_writers_in_flight_temp_file(tmp_path, monkeypatch, other_host, other_ns):
    """While a writer of another host (whose name shares 32 characters with ours) or of another pid
    namespace on this host (its pid dead here) is between creating its temporary file and renaming
    it, this process opens a store on the directory (which removes stale temporary files): the
    writer's file survives and its ``set`` succeeds."""
    ours = "a" * 32 + "-reader-two" if other_host else socket.gethostname()
    monkeypatch.setattr(socket, "gethostname", lambda: ours)
    started, go = tmp_path / "started", tmp_path / "go"
    root = tmp_path / "pages"
    root.mkdir()
    pid = os.fork()
    if pid == 0:
        ok = False
        try:
            ok = _paused_writer(root, other_host or ours, _dead_pid(), other_ns, started, go)
        finally:
            os._exit(0 if ok else 5)
    try:
        end = time.monotonic() + 15
        while not started.exists() and time.monotonic() < end:
            time.sleep(0.01)
        assert started.exists(), "the writer did not start"
        LocalFileStorage(root, 4096)  # opening removes temporary files of dead writers of ours
        assert [p for p in os.listdir(root) if p.startswith(".tmp-")], "the in-flight file was deleted"
    finally:
        go.write_bytes(b"")
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_temp_names_carry_a_writer_id_of_host_boot_and_pid_namespace(tmp_path, monkeypatch):
    a = LocalFileStorage(tmp_path, 4096)
    monkeypatch.setattr(socket, "gethostname", lambda: "another-host")
    b = LocalFileStorage(tmp_path, 4096)
    assert a._writer != b._writer and len(a._writer) == 16


# ---- Mooncake ------------------------------------------------------------------------------------
try:
    from mlakv.mem_cache.storage.mooncake import MooncakeStorage, _require_xxhash, page_format
    from mlakv.testing.mooncake_master import MooncakeMaster, MooncakeUnavailable, check_mooncake

    check_mooncake()
    _require_xxhash()
    MOONCAKE_SKIP = None
except Exception as e:  # noqa: BLE001 - only where the wheel or libibverbs cannot be installed
    MOONCAKE_SKIP = str(e)
requires_mooncake = pytest.mark.skipif(MOONCAKE_SKIP is not None, reason=f"Mooncake unavailable: {MOONCAKE_SKIP}")


@pytest.fixture(scope="module")
def mooncake():
    """A master and one client per pool config (a client takes ~1-2 s to close), shared by the module."""
    clients: dict[str, tuple] = {}
    with MooncakeMaster() as m:

        def client(name: str):
            if name not in clients:
                host = make_host(name)
                clients[name] = (host, MooncakeStorage(host, m.master_addr, m.metadata_url, global_segment_bytes=32 << 20,
                                                       checksum_threads=1))  # fmt: skip
            host, store = clients[name]
            host.kv_buffer.view(-1).view(torch.uint8).random_(0, 256)
            return host, store

        yield client
        for _, store in clients.values():
            store.close()


@requires_mooncake
@pytest.mark.parametrize("writer,reader", PAIRS, ids=[f"{w}->{r}" for w, r in PAIRS])
def test_matrix_mooncake(mooncake, writer, reader, request):
    w, ws = mooncake(writer)
    r, rs = mooncake(reader)
    key = f"{request.node.name}-{time.monotonic_ns()}"
    assert _check_pair(w, r, ws, rs, key) == _expected(writer, reader, "mooncake")


@requires_mooncake
def test_mooncake_object_copied_under_another_key_is_a_counted_miss(mooncake):
    """The issue's case: page A's object put under key B with the raw client reads as a miss
    (``corrupt``), by ``get`` and by the batch."""
    host, store = mooncake("base")
    store.batch_set_from(["copy-a"], torch.tensor([0]))
    raw = store.raw_client
    assert raw.put(store.store_key("copy-b"), raw.get(store.store_key("copy-a"))) == 0
    before = store.stats()["corrupt"]
    assert store.get("copy-b") is None
    assert store.batch_get_into(["copy-b"], torch.tensor([8])) == 0
    assert store.stats()["corrupt"] == before + 2
    assert store.get("copy-a") == host.get_page_bytes(0)


@requires_mooncake
def test_mooncake_page_format_differs_for_different_scales():
    a, b, c = make_host("fp8-per_tensor-1"), make_host("fp8-per_tensor-0.01"), make_host("fp8-per_tensor-1")
    assert page_format(a) != page_format(b) and page_format(a) == page_format(c)
    assert "s1.0" in page_format(a)
    assert page_format(make_host("base")) == "bfloat16-raw-512+64-1152B-bfloat16:nope512:rope64:bfloat16:none0:rows:page4:4608B-LTR"
