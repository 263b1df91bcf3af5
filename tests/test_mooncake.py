"""MooncakeStorage (HiCache L3) against a real ``mooncake_master`` on loopback.

Spec: pages round-trip bit-exactly between host pools through the store for every host layout;
keys keep pools of different layouts apart; a corrupted page is a counted miss and never lands in
the host pool; faults (no master, master killed mid-batch, store full) raise clear errors and lose
nothing already stored. Skipped, with the reason, only where Mooncake cannot be installed.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from mlakv.mem_cache import MLATokenToKVPool, MLATokenToKVPoolHost
from mlakv.testing.mooncake_master import MooncakeMaster, MooncakeUnavailable, check_mooncake
from mlakv.mem_cache.storage.mooncake import (
    TRAILER_BYTES,
    MooncakeConnectionError,
    MooncakeStorage,
    MooncakeStoreFull,
    mooncake_page_key,
    _require_xxhash,
    default_checksum_threads,
    page_format,
)

try:
    check_mooncake()
    _require_xxhash()
except MooncakeUnavailable as e:  # only where the wheel or libibverbs cannot be installed
    pytest.skip(str(e), allow_module_level=True)

LAYOUTS = ["layer_first", "page_first", "page_first_direct"]
PAGE = 16
SEG = 32 << 20


def make_host(layout: str = "page_first_direct", dtype=torch.bfloat16, layers: int = 3, page: int = PAGE,
              pages: int = 16, start_layer: int = 0) -> MLATokenToKVPoolHost:
    dev = MLATokenToKVPool(pages * page, page, dtype, 512, 64, layers, "cpu", start_layer=start_layer,
                           end_layer=start_layer + layers)
    host = MLATokenToKVPoolHost(dev, host_size=pages * page, layout=layout)
    host.kv_buffer.view(-1).view(torch.uint8).random_(0, 256)  # fresh random bytes, never zeros
    return host


def first_slots(pages: list[int], page: int = PAGE) -> torch.Tensor:
    return torch.tensor(pages, dtype=torch.int64) * page


def page_bytes(host: MLATokenToKVPoolHost, page: int) -> bytes:
    return host.get_page_bytes(page * host.page_size)


@pytest.fixture(scope="module")
def master():
    with MooncakeMaster() as m:
        yield m


@pytest.fixture(scope="module")
def _clients(master):
    """Writer and reader clients per host layout, shared by the module (a client takes ~1-2 s to close)."""
    made: dict[str, tuple] = {}
    yield made
    for a, sa, b, sb in made.values():
        sa.close()
        sb.close()


@pytest.fixture
def store_pair(master, _clients, request):
    """Two nodes, a writer and a reader, each with its own host pool (fresh random bytes) and
    client; keys live under a model id unique to the test. The param is a host layout, or
    ``(layout, checksum_threads)`` (default: the storage's own thread count)."""
    param = getattr(request, "param", "page_first_direct")
    layout, threads = param if isinstance(param, tuple) else (param, None)
    if param not in _clients:
        a, b = make_host(layout), make_host(layout)
        kw = dict(global_segment_bytes=SEG, checksum_threads=threads)
        sa = MooncakeStorage(a, master.master_addr, master.metadata_url, **kw)
        sb = MooncakeStorage(b, master.master_addr, master.metadata_url, **kw)
        _clients[param] = (a, sa, b, sb)
    a, sa, b, sb = _clients[param]
    for host in (a, b):
        host.kv_buffer.view(-1).view(torch.uint8).random_(0, 256)
    sa.model_id = sb.model_id = f"t{len(request.node.name)}-{abs(hash(request.node.name))}"
    sa._stats = {k: 0 for k in sa._stats}
    sb._stats = {k: 0 for k in sb._stats}
    yield a, sa, b, sb


# ---- the master helper -----------------------------------------------------------------------
def _loopback_listeners() -> dict[int, str]:
    """Listening TCP ports -> local address (hex, as /proc/net/tcp writes it)."""
    out = {}
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A":  # LISTEN
                addr, port = local.split(":")
                out[int(port, 16)] = addr
    return out


def test_master_listens_on_loopback_only_and_stops(master):
    listeners = _loopback_listeners()
    for port in (master.rpc_port, master.metadata_port, master.metrics_port):
        assert listeners.get(port) == "0100007F", f"port {port} is not bound to 127.0.0.1 only"
    m = MooncakeMaster().start()
    m.stop()
    assert not m.alive() and m.proc.returncode is not None and m.meta_proc.returncode is not None


def test_missing_master_binary_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("MLAKV_MOONCAKE_MASTER", str(tmp_path / "nope"))
    with pytest.raises(MooncakeUnavailable, match="MLAKV_MOONCAKE_MASTER"):
        MooncakeMaster()


def test_missing_mooncake_package_names_the_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mooncake" else real(name, *a))
    with pytest.raises(MooncakeUnavailable, match="pip install mooncake-transfer-engine"):
        check_mooncake()


# ---- keys ----------------------------------------------------------------------------------
BASE = dict(prefix_hash="abc", model_id="m", layer_range=(0, 61), page_size=64, fmt="bfloat16-512+64-1152B-LTR")


@pytest.mark.parametrize("change", [dict(prefix_hash="abd"), dict(model_id="m2"), dict(layer_range=(0, 30)),
                                    dict(page_size=32), dict(fmt="float8_e4m3fn-512+64-656B-LTR")])
def test_page_key_changes_with_every_component(change):
    assert mooncake_page_key(**{**BASE, **change}) != mooncake_page_key(**BASE)


@pytest.mark.parametrize("bad, err", [(dict(model_id="a/b"), ValueError), (dict(layer_range=(3, 3)), ValueError),
                                      (dict(page_size=0), ValueError), (dict(prefix_hash=""), TypeError)])
def test_page_key_rejects_bad_components(bad, err):
    with pytest.raises(err):
        mooncake_page_key(**{**BASE, **bad})


def test_page_format_names_dtype_and_byte_order():
    fmt = page_format(make_host("page_first"))
    assert fmt.startswith("bfloat16-raw-512+64-1152B-") and fmt.endswith("-TLR")
    assert ":rows:page16:18432B" in fmt  # the cache format's key at the pool's page size
    assert page_format(make_host("layer_first")) == page_format(make_host("page_first_direct"))
    assert page_format(make_host(dtype=torch.float8_e4m3fn)).startswith("float8_e4m3fn-raw-512+64-")
    dev = MLATokenToKVPool(PAGE, PAGE, torch.float8_e4m3fn, 512, 64, 2, "cpu", kv_cache_format="ds_mla")
    assert page_format(MLATokenToKVPoolHost(dev, host_size=PAGE)).startswith("float8_e4m3fn-ds_mla-512+64-656B-")


# ---- round trips ---------------------------------------------------------------------------
@pytest.mark.parametrize("store_pair", LAYOUTS, indirect=True)
def test_batch_round_trip_between_nodes_is_bit_exact(store_pair):
    a, sa, b, sb = store_pair
    keys = [f"k{i}" for i in range(6)]
    assert sa.batch_set_from(keys, first_slots([0, 3, 5, 7, 9, 15])) == 6
    assert sb.batch_get_into(keys, first_slots([1, 2, 4, 6, 8, 10])) == 6
    for src, dst in zip([0, 3, 5, 7, 9, 15], [1, 2, 4, 6, 8, 10]):
        assert page_bytes(b, dst) == page_bytes(a, src)


def test_batch_accepts_whole_page_slots(store_pair):
    a, sa, b, sb = store_pair
    slots = torch.arange(2 * PAGE, 4 * PAGE)  # pages 2 and 3, every token slot
    assert sa.batch_set_from(["x", "y"], slots) == 2
    assert sb.batch_get_into(["x", "y"], slots) == 2
    assert page_bytes(b, 3) == page_bytes(a, 3)


@pytest.mark.parametrize("store_pair", LAYOUTS, indirect=True)
def test_single_page_api_uses_canonical_order_and_meets_batch_api(store_pair):
    a, sa, b, sb = store_pair
    sa.set("one", page_bytes(a, 4))
    assert sb.get("one") == page_bytes(a, 4)
    assert sb.batch_get_into(["one"], first_slots([9])) == 1
    assert page_bytes(b, 9) == page_bytes(a, 4)
    sa.batch_set_from(["two"], first_slots([6]))
    assert sb.get("two") == page_bytes(a, 6)


def test_batch_exists_is_a_prefix_match(store_pair):
    a, sa, b, sb = store_pair
    sa.batch_set_from(["p0", "p1", "p2"], first_slots([0, 1, 2]))
    assert sb.batch_exists(["p0", "p1", "p2", "absent"]) == 3
    assert sb.batch_exists(["p0", "absent", "p2"]) == 1
    assert sb.batch_exists(["absent", "p0"]) == 0
    assert sb.exists("p1") and not sb.exists("absent")


def test_get_into_stops_at_first_absent_key_and_leaves_later_pages_untouched(store_pair):
    a, sa, b, sb = store_pair
    sa.batch_set_from(["q0", "q1", "q3"], first_slots([0, 1, 3]))
    before = page_bytes(b, 12)
    assert sb.batch_get_into(["q0", "q1", "absent", "q3"], first_slots([10, 11, 12, 13])) == 2
    assert page_bytes(b, 11) == page_bytes(a, 1)
    assert page_bytes(b, 12) == before
    assert sb.stats()["misses"] == 1


@pytest.mark.parametrize("bad_len", [0, 1, 2 * PAGE + 1])
def test_host_indices_must_be_one_per_key_or_whole_pages(store_pair, bad_len):
    a, sa, b, sb = store_pair
    with pytest.raises(ValueError, match="host_indices"):
        sa.batch_set_from(["a", "b"], torch.arange(bad_len))


def test_misaligned_or_out_of_range_host_index_is_refused(store_pair):
    a, sa, b, sb = store_pair
    with pytest.raises(ValueError, match="multiple of page_size"):
        sb.batch_get_into(["a"], torch.tensor([3]))
    with pytest.raises(IndexError, match="host_indices"):
        sb.batch_get_into(["a"], torch.tensor([16 * PAGE]))


def test_pools_of_different_layouts_never_read_each_others_pages(master):
    token_major, layer_major = make_host("page_first"), make_host("layer_first")
    fp8 = make_host(dtype=torch.float8_e4m3fn)
    other_layers = make_host(start_layer=3)
    kw = dict(model_id="sep", global_segment_bytes=SEG)
    with MooncakeStorage(token_major, master.master_addr, master.metadata_url, **kw) as s1:
        s1.batch_set_from(["shared"], first_slots([0]))
        for host in (layer_major, fp8, other_layers):
            with MooncakeStorage(host, master.master_addr, master.metadata_url, **kw) as s2:
                assert s2.batch_exists(["shared"]) == 0
                assert s2.get("shared") is None


# ---- checksums ------------------------------------------------------------------------------
def _tamper(store: MooncakeStorage, key: str, data: bytes) -> None:
    raw, skey = store.raw_client, store.store_key(key)
    raw.remove(skey, True)
    assert raw.put(skey, data) == 0


HASH_THREADS = [("page_first_direct", 1), ("page_first_direct", 2)]  # inline hashing and the hash pool


@pytest.mark.parametrize("store_pair", HASH_THREADS, indirect=True, ids=["1thread", "2threads"])
@pytest.mark.parametrize("how", ["flip_page_byte", "flip_checksum", "truncate", "foreign_magic"])
def test_corrupted_page_is_a_counted_miss_and_never_loaded(store_pair, how):
    a, sa, b, sb = store_pair
    sa.batch_set_from(["c0", "c1", "c2"], first_slots([0, 1, 2]))
    good = sa.raw_client.get(sa.store_key("c1"))
    bad = bytearray(good)
    if how == "flip_page_byte":
        bad[12345] ^= 0x01
    elif how == "flip_checksum":
        bad[-3] ^= 0x80
    elif how == "truncate":
        bad = bad[:-TRAILER_BYTES - 1]
    else:
        bad[-TRAILER_BYTES] ^= 0xFF
    _tamper(sa, "c1", bytes(bad))
    assert sb.get("c1") is None
    assert sb.batch_get_into(["c0", "c1", "c2"], first_slots([5, 6, 7])) == 1
    assert page_bytes(b, 5) == page_bytes(a, 0)
    assert set(page_bytes(b, 6)) == {0} and set(page_bytes(b, 7)) == {0}  # fetched but unverified: zeroed
    assert sb.stats()["corrupt"] == 2


def test_a_short_page_ends_fetching_at_its_chunk(store_pair):
    a, sa, b, sb = store_pair
    sb.pipeline_pages = 1
    try:
        sa.batch_set_from(["s0", "s1", "s2"], first_slots([0, 1, 2]))
        _tamper(sa, "s1", sa.raw_client.get(sa.store_key("s1"))[:-1])
        before = page_bytes(b, 7)
        assert sb.batch_get_into(["s0", "s1", "s2"], first_slots([5, 6, 7])) == 1
        assert page_bytes(b, 5) == page_bytes(a, 0)
        assert set(page_bytes(b, 6)) == {0}
        assert page_bytes(b, 7) == before  # its chunk was never fetched
    finally:
        sb.pipeline_pages = 64


@pytest.mark.parametrize("store_pair", HASH_THREADS, indirect=True, ids=["1thread", "2threads"])
@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_pipelined_batches_round_trip_whatever_the_chunk(store_pair, chunk):
    a, sa, b, sb = store_pair
    sa.pipeline_pages = sb.pipeline_pages = chunk
    try:
        keys = [f"w{i}" for i in range(7)]
        assert sa.batch_set_from(keys, first_slots(list(range(7)))) == 7
        assert sb.batch_get_into(keys, first_slots(list(range(8, 15)))) == 7
        assert all(page_bytes(b, 8 + i) == page_bytes(a, i) for i in range(7))
    finally:
        sa.pipeline_pages = sb.pipeline_pages = 64


@pytest.mark.parametrize("n", [1, 7, 8, 9, 64, 100, 1000])
@pytest.mark.parametrize("hash_threads", [False, True])
def test_chunks_cover_the_batch_and_ramp_only_with_hash_threads(n, hash_threads):
    """A set's chunks grow from pipeline_pages // 8 and a get's shrink to it where hash threads overlap
    the transfer; without them the chunks are equal. Either way they tile [0, n) in order."""
    s = MooncakeStorage.__new__(MooncakeStorage)  # only the chunking state; no client
    s.pipeline_pages, s._hash_pool = 64, (object() if hash_threads else None)
    for small_first in (True, False):
        chunks = s._chunks(n, small_first)
        assert [lo for lo, _ in chunks] == [0] + [hi for _, hi in chunks[:-1]] and chunks[-1][1] == n
        sizes = [hi - lo for lo, hi in chunks]
        assert max(sizes) <= 64
        if not hash_threads:
            assert all(size == 64 for size in sizes[:-1])
        elif n > 8:
            edge = sizes[0] if small_first else sizes[-1]
            assert edge == 8


@pytest.mark.parametrize("cores, threads", [(1, 1), (2, 1), (4, 1), (8, 2), (16, 4), (128, 4)])
def test_default_checksum_threads_leave_cores_to_the_transfer(cores, threads):
    assert default_checksum_threads(cores) == threads


def test_checksum_threads_must_be_positive(master):
    with pytest.raises(ValueError, match="checksum_threads must be >= 1"):
        MooncakeStorage(make_host(), master.master_addr, master.metadata_url, global_segment_bytes=SEG,
                        checksum_threads=0)


# ---- faults --------------------------------------------------------------------------------
def test_no_master_at_setup_fails_fast_and_l2_keeps_working():
    from mlakv.testing.mooncake_master import _free_port

    host = make_host()
    t0 = time.monotonic()
    with pytest.raises(MooncakeConnectionError, match="not reachable"):
        MooncakeStorage(host, f"127.0.0.1:{_free_port()}", f"http://127.0.0.1:{_free_port()}/metadata")
    assert time.monotonic() - t0 < 10
    before = page_bytes(host, 2)
    host.set_page_bytes(3 * PAGE, before)  # the host tier is untouched and usable
    assert page_bytes(host, 3) == before


def test_store_full_refuses_the_set_and_what_stays_stored_reads_back_exactly():
    host = make_host(layers=8, page=64, pages=48)  # 576 KiB pages; one 16 MiB segment holds < 30
    with MooncakeMaster() as m, MooncakeStorage(host, m.master_addr, m.metadata_url, global_segment_bytes=16 << 20) as s:
        keys = [f"f{i}" for i in range(48)]
        with pytest.raises(MooncakeStoreFull, match="store full") as ei:
            s.batch_set_from(keys, first_slots(list(range(48)), 64))
        n = ei.value.stored
        assert 0 < n < 48
        assert not any(s.exists(k) for k in keys[n:])  # refused pages are not there
        # Mooncake evicts at its high watermark (asynchronously), so some earlier pages may be gone;
        # every page still there is exactly what was stored.
        reader = make_host(layers=8, page=64, pages=48)
        with MooncakeStorage(reader, m.master_addr, m.metadata_url, global_segment_bytes=16 << 20) as r:
            present = [i for i in range(n) if r.exists(keys[i])]
            assert present
            for i in present:
                assert r.batch_get_into([keys[i]], first_slots([i], 64)) == 1
                assert page_bytes(reader, i) == page_bytes(host, i)


def test_master_killed_during_batches_fails_clearly_with_no_half_loaded_page():
    src, dst = make_host(pages=64), make_host(pages=80)
    keys = [f"m{i}" for i in range(32)]
    dst_pages = list(range(32, 64))
    sentinel = page_bytes(dst, 79)  # an L2 page no batch touches
    m = MooncakeMaster().start()
    try:
        writer = MooncakeStorage(src, m.master_addr, m.metadata_url, global_segment_bytes=64 << 20)
        reader = MooncakeStorage(dst, m.master_addr, m.metadata_url, global_segment_bytes=64 << 20, retry_interval=60)
        writer.batch_set_from(keys, first_slots(list(range(32))))
        killer = threading.Timer(0.3, m.kill)
        killer.start()
        err = None
        deadline = time.monotonic() + 60
        while err is None and time.monotonic() < deadline:
            try:
                assert reader.batch_get_into(keys, first_slots(dst_pages)) == 32
            except MooncakeConnectionError as e:
                err = e
        killer.join()
        assert err is not None and "unreachable" in str(err)
        for i, page in enumerate(dst_pages):  # every page of the batch: the whole source page or zeros
            got = page_bytes(dst, page)
            assert got == page_bytes(src, i) or set(got) == {0}
        assert page_bytes(dst, 79) == sentinel
        t0 = time.monotonic()
        with pytest.raises(MooncakeConnectionError, match="failing fast"):
            reader.batch_exists(keys)
        with pytest.raises(MooncakeConnectionError, match="failing fast"):
            reader.batch_set_from(keys[:1], first_slots([0]))
        assert time.monotonic() - t0 < 0.5
    finally:
        m.stop()


def test_reconnects_after_the_master_comes_back():
    host = make_host()
    m = MooncakeMaster().start()
    try:
        ports = dict(rpc_port=m.rpc_port, metadata_port=m.metadata_port, metrics_port=m.metrics_port)
        s = MooncakeStorage(host, m.master_addr, m.metadata_url, retry_interval=0.2, global_segment_bytes=SEG)
        s.batch_set_from(["r0"], first_slots([0]))
        m.kill()
        with pytest.raises(MooncakeConnectionError):
            s.batch_set_from(["r1"], first_slots([1]))
        with MooncakeMaster(**ports):
            time.sleep(0.3)
            assert s.batch_set_from(["r2"], first_slots([2])) == 1  # a new client on the new master
            assert s.get("r2") == page_bytes(host, 2)
            s.close()
    finally:
        m.stop()


# ---- end to end ----------------------------------------------------------------------------
def test_second_node_finds_the_prefix_in_mooncake_and_decodes_like_recompute(master):
    from mlakv.demo.l3 import run_l3_demo

    res = run_l3_demo(master, n_layers=2, hidden=64, page_size=16, prefix_pages=3, n_prompts=2, suffix_len=5,
                      decode_steps=3, device="cpu", verbose=False)
    assert res.pages_found == 3
    assert res.rows_bit_exact  # the loaded prefix rows are the recomputed rows, bit for bit
    assert res.tokens_equal
    assert res.max_logit_diff <= 1e-4
    assert res.t_recompute > 0 and res.t_l3 > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pinned host pool, Triton page transfers)")
def test_second_node_on_the_gpu_loads_the_prefix_through_pinned_host_memory(master):
    from mlakv.demo.l3 import run_l3_demo

    res = run_l3_demo(master, n_layers=2, hidden=128, page_size=64, prefix_pages=4, n_prompts=2, suffix_len=8,
                      decode_steps=4, device="cuda", verbose=False)
    assert res.pages_found == 4
    assert res.rows_bit_exact
    assert res.tokens_equal


def test_demo_cli_runs_the_l3_demo(capsys):
    from mlakv.demo.serve import main

    assert main(["--l3", "mooncake", "--layers", "1", "--prompts", "1", "--decode-steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "found 8/8 prefix pages" in out and "L3 demo: PASSED" in out


# ---- the bench ----------------------------------------------------------------------------
def test_l3_bench_compares_mlakv_with_raw_mooncake(capsys):
    from mlakv.bench import main

    assert main(["hicache", "--l3", "mooncake", "--pages", "2", "--layers", "2", "--page-size", "4", "--reps", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| bf16") or line.startswith("| fp8")]
    assert len(rows) == 2 and not any("WRONG" in r for r in rows)


@pytest.mark.parametrize("bad", [["--pages", "0"], ["--layers", "-1"], ["--reps", "x"], ["--checksum-threads", "0"]])
def test_l3_bench_rejects_bad_options(bad):
    from mlakv.bench.hicache_l3 import main

    with pytest.raises(SystemExit) as ei:
        main(["--l3", "mooncake", *bad])
    assert ei.value.code == 2
