"""HiCache over the DeepSeek-V4 family's block-split pages: the host pool mirrors a paged pool page for
page, and the L3 stores bind a page to its cache format.

Spec:
- device -> host -> LocalFileStorage -> host -> device moves every named page bit for bit (all three
  host layouts, every paged format), leaves every other page as it was (destinations poisoned first),
  and a page written by ``set_kv_buffer`` gathers to the same values after the trip;
- a page stored by a pool of one format read by a pool of another is a counted miss, whether the page
  bytes agree (v41 vs v41_new: 33792 B) or not (v41 vs v4), from the file store and the Mooncake key;
- what the host pool cannot do is refused by name: a host page that is not one device page, a page
  that ``page_size`` does not divide, a device pool of another format;
- a DSA pool's host rows carry each slot's indexer key and scale: the round trip restores both halves
  (CPU; CUDA with both io backends), a page stored without its indexer half (or by a DSA pool, read by
  a plain one) is a counted miss, and a damaged indexer byte fails the page's checksum.
"""

from __future__ import annotations

import pytest
import torch
from conftest import requires_cuda

from mlakv.mem_cache.dsa_pool import DSATokenToKVPool
from mlakv.mem_cache.host_pool import LAYOUTS, MLATokenToKVPoolHost, unit_row_bytes
from mlakv.mem_cache.memory_pool import MLATokenToKVPool
from mlakv.mem_cache.storage.local import LocalFileStorage
from mlakv.mem_cache.storage.mooncake import mooncake_page_key, page_format

PAGE = 64  # FlashMLA's page size
LAYERS = 2
DEV_PAGES = 4  # usable device pages (plus the reserved one)
PAGED = ("v4", "v41", "v41_fp4", "v41_new", "v41_fp4_new")


def make_device(fmt: str, page_size: int = PAGE, pages: int = DEV_PAGES, device: str = "cpu") -> MLATokenToKVPool:
    return MLATokenToKVPool(pages * page_size, page_size, torch.bfloat16, 448, 64, LAYERS, device, kv_cache_format=fmt)


def poison(t: torch.Tensor, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    t.view(-1).view(torch.uint8).copy_(torch.randint(0, 256, (t.numel() * t.element_size(),), generator=g, dtype=torch.uint8))


def poison_pool(dev: MLATokenToKVPool, seed: int) -> None:
    for i, b in enumerate(dev.kv_buffer):
        host = torch.empty_like(b, device="cpu")
        poison(host, seed * 100 + i)
        b.copy_(host)


def slots(pages: list[int], page_size: int = PAGE) -> torch.Tensor:
    return torch.cat([torch.arange(p * page_size, (p + 1) * page_size) for p in pages])


def page_bytes_of(dev: MLATokenToKVPool, layer: int, page: int) -> torch.Tensor:
    return dev.kv_buffer[layer][page].clone()


BACKENDS = [("cpu", "direct")] + [pytest.param("cuda", be, marks=requires_cuda) for be in ("kernel", "direct")]


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fmt", PAGED)
def test_round_trip_through_file_store_is_bit_exact(tmp_path, fmt, layout, device, backend):
    src = make_device(fmt, device=device)
    poison_pool(src, 1)
    pin = device == "cuda"
    host = MLATokenToKVPoolHost(src, host_size=4 * PAGE, layout=layout, pin_memory=pin)
    poison(host.kv_buffer, 2)
    store = LocalFileStorage(tmp_path, host.page_bytes, fsync=False)
    store.register_mem_pool_host(host)
    dev_pages, host_pages = [3, 1], [2, 0]  # out of order on both sides
    host.backup_from_device_all_layer(src, slots(host_pages), slots(dev_pages).to(device), backend)
    if pin:
        host.synchronize()
    assert store.batch_set_from(["k0", "k1"], slots(host_pages)) == 2

    host2 = MLATokenToKVPoolHost(make_device(fmt, device=device), host_size=4 * PAGE, layout=layout, pin_memory=pin)
    poison(host2.kv_buffer, 3)
    store2 = LocalFileStorage(tmp_path, host2.page_bytes, fsync=False)
    store2.register_mem_pool_host(host2)
    assert store2.batch_get_into(["k0", "k1"], slots([1, 3])) == 2
    dst = make_device(fmt, device=device)
    poison_pool(dst, 4)
    before = [b.clone() for b in dst.kv_buffer]
    dst_pages = [4, 2]
    for layer in range(LAYERS):
        host2.load_to_device_per_layer(dst, slots([1, 3]), slots(dst_pages).to(device), layer, backend)
    if pin:
        host2.synchronize()
    for layer in range(LAYERS):
        for s, d in zip(dev_pages, dst_pages):
            assert torch.equal(dst.kv_buffer[layer][d], src.kv_buffer[layer][s]), (layer, s, d)
        for p in (0, 1, 3):  # pages not named keep their poison
            assert torch.equal(dst.kv_buffer[layer][p], before[layer][p]), (layer, p)


@pytest.mark.parametrize("fmt", ("v4", "v41"))
def test_written_tokens_gather_the_same_after_the_trip(tmp_path, fmt):
    src = make_device(fmt)
    poison_pool(src, 5)
    g = torch.Generator().manual_seed(6)
    loc = slots([2])
    kv = [torch.randn(PAGE, 512, generator=g).to(torch.bfloat16) for _ in range(LAYERS)]
    for layer in range(LAYERS):
        src.set_kv_buffer(layer, loc, kv[layer])
    host = MLATokenToKVPoolHost(src, host_size=4 * PAGE, layout="page_first_direct", pin_memory=False)
    host.backup_from_device_all_layer(src, slots([1]), loc, "direct")
    store = LocalFileStorage(tmp_path, host.page_bytes, fsync=False)
    store.register_mem_pool_host(host)
    store.batch_set_from(["p"], slots([1]))
    host.kv_buffer.zero_()
    assert store.batch_get_into(["p"], slots([0])) == 1
    dst = make_device(fmt)
    poison_pool(dst, 7)
    for layer in range(LAYERS):
        host.load_to_device_per_layer(dst, slots([0]), slots([3]), layer, "direct")
        want = src.get_mla_kv_buffer(layer, loc)
        got = dst.get_mla_kv_buffer(layer, slots([3]))
        for w, o in zip(want, got):
            assert torch.equal(w.view(torch.int16), o.view(torch.int16))


@pytest.mark.parametrize(("writer", "reader"), [("v41", "v41_new"), ("v41_new", "v41"), ("v41", "v4"), ("v4", "v41")])
def test_page_of_another_format_is_a_counted_miss(tmp_path, writer, reader):
    w_host = MLATokenToKVPoolHost(make_device(writer), host_size=4 * PAGE, layout="page_first_direct", pin_memory=False)
    poison(w_host.kv_buffer, 8)
    w_store = LocalFileStorage(tmp_path, w_host.page_bytes, fsync=False)
    w_store.register_mem_pool_host(w_host)
    w_store.batch_set_from(["shared"], slots([0]))
    r_host = MLATokenToKVPoolHost(make_device(reader), host_size=4 * PAGE, layout="page_first_direct", pin_memory=False)
    same_bytes = r_host.page_bytes == w_host.page_bytes
    assert same_bytes == ({writer, reader} == {"v41", "v41_new"})  # the case the format key alone catches
    r_store = LocalFileStorage(tmp_path, r_host.page_bytes, fsync=False)
    r_store.register_mem_pool_host(r_host)
    before = r_store.stats()
    assert r_store.batch_get_into(["shared"], slots([1])) == 0
    assert r_store.get("shared") is None
    after = r_store.stats()
    assert after["hits"] == before["hits"]
    assert after["corrupt"] + after["misses"] == before["corrupt"] + before["misses"] + 2
    # the Mooncake key names the format: the reader never looks under the writer's key
    wk = mooncake_page_key("h", "m", (0, LAYERS), PAGE, page_format(w_host))
    rk = mooncake_page_key("h", "m", (0, LAYERS), PAGE, page_format(r_host))
    assert wk != rk


def test_same_format_control_is_a_hit(tmp_path):
    a = MLATokenToKVPoolHost(make_device("v41"), host_size=4 * PAGE, layout="page_first_direct", pin_memory=False)
    b = MLATokenToKVPoolHost(make_device("v41"), host_size=4 * PAGE, layout="layer_first", pin_memory=False)
    poison(a.kv_buffer, 9)
    sa, sb = LocalFileStorage(tmp_path, a.page_bytes, fsync=False), LocalFileStorage(tmp_path, b.page_bytes, fsync=False)
    sa.register_mem_pool_host(a)
    sb.register_mem_pool_host(b)
    sa.batch_set_from(["x"], slots([1]))
    assert sb.batch_get_into(["x"], slots([0])) == 1
    assert b.get_page_bytes(0) == a.get_page_bytes(PAGE)
    assert page_format(a).split("-L")[0] == page_format(b).split("-L")[0]


@pytest.mark.parametrize("fmt", PAGED)
def test_host_row_is_a_slot_share_of_the_page(fmt):
    dev = make_device(fmt)
    host = MLATokenToKVPoolHost(dev, host_size=4 * PAGE, pin_memory=False)
    assert unit_row_bytes(dev) * PAGE == dev.format.page_bytes(PAGE) == dev.kv_buffer[0].shape[1]
    assert host.page_bytes == LAYERS * dev.format.page_bytes(PAGE)


def test_host_page_must_be_one_device_page():
    with pytest.raises(ValueError, match="one device page"):
        MLATokenToKVPoolHost(make_device("v41"), host_size=4 * PAGE, page_size=PAGE // 2, pin_memory=False)


def test_page_size_that_does_not_divide_the_page_is_refused():
    dev = make_device("v4", page_size=1024, pages=1)  # 1039 * 576 bytes: not a multiple of 1024
    assert dev.format.page_bytes(1024) % 1024
    with pytest.raises(ValueError, match="not a multiple of page_size=1024"):
        MLATokenToKVPoolHost(dev, host_size=2 * 1024, pin_memory=False)


def test_device_pool_of_another_format_is_refused():
    host = MLATokenToKVPoolHost(make_device("v41"), host_size=4 * PAGE, pin_memory=False)
    other = make_device("v41_new")  # the same 528-byte host rows
    with pytest.raises(ValueError, match="cache format"):
        host.backup_from_device_all_layer(other, slots([0]), slots([1]), "direct")


# ---- DSA: the indexer half travels with the MLA half ------------------------------------------
IDX_KEYS = 64 * 128  # key bytes of an indexer page, then 64 x 4 scale bytes


def make_dsa(device: str = "cpu", page_size: int = PAGE, fmt: str = "ds_mla", pages: int = DEV_PAGES) -> DSATokenToKVPool:
    dtype = torch.float8_e4m3fn if fmt == "ds_mla" else torch.bfloat16
    return DSATokenToKVPool(pages * page_size, page_size, dtype, 512, 64, LAYERS, device, kv_cache_format=fmt)


def index_half(pool: DSATokenToKVPool, layer: int, slot_ids: torch.Tensor) -> torch.Tensor:
    """``[n, 132]``: each slot's indexer key bytes then its scale bytes (the reference addressing)."""
    buf = pool.index_k_buffer[layer].cpu()
    out = []
    for s in slot_ids.tolist():
        p, o = divmod(s, 64)
        out.append(torch.cat([buf[p, o * 128 : (o + 1) * 128], buf[p, IDX_KEYS + o * 4 : IDX_KEYS + (o + 1) * 4]]))
    return torch.stack(out)


def mla_rows(pool: DSATokenToKVPool, layer: int, slot_ids: torch.Tensor) -> torch.Tensor:
    return pool.kv_buffer[layer].cpu().view(pool.num_slots, -1).view(torch.uint8)[slot_ids]


def poison_dsa(pool: DSATokenToKVPool, seed: int) -> None:
    for i, b in enumerate(pool.kv_buffer + pool.index_k_buffer):
        g = torch.Generator().manual_seed(seed * 100 + i)
        b.view(-1).view(torch.uint8).copy_(torch.randint(0, 256, (b.numel() * b.element_size(),), generator=g, dtype=torch.uint8))


DSA_CASES = [("cpu", "direct", 64, "ds_mla"), ("cpu", "direct", 16, None)] + [
    pytest.param("cuda", be, 64, f, marks=requires_cuda) for be in ("kernel", "direct") for f in ("ds_mla", None)
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("device", "backend", "page_size", "fmt"), DSA_CASES)
def test_dsa_round_trip_restores_both_halves(tmp_path, layout, device, backend, page_size, fmt):
    src = make_dsa(device, page_size, fmt)
    poison_dsa(src, 11)
    host = MLATokenToKVPoolHost(src, host_size=src.size, layout=layout, pin_memory=device == "cuda")
    poison(host.kv_buffer, 12)
    store = LocalFileStorage(tmp_path, host.page_bytes, fsync=False)
    store.register_mem_pool_host(host)
    dev_pages, host_pages, dst_pages = [3, 1], [2, 0], [4, 2]
    host.backup_from_device_all_layer(src, slots(host_pages, page_size), slots(dev_pages, page_size).to(device), backend)
    if device == "cuda":
        host.synchronize()
    assert store.batch_set_from(["a", "b"], slots(host_pages, page_size)) == 2

    host2 = MLATokenToKVPoolHost(make_dsa(device, page_size, fmt), host_size=src.size, layout=layout, pin_memory=device == "cuda")
    poison(host2.kv_buffer, 13)
    store2 = LocalFileStorage(tmp_path, host2.page_bytes, fsync=False)
    store2.register_mem_pool_host(host2)
    assert store2.batch_get_into(["a", "b"], slots([1, 3], page_size)) == 2
    dst = make_dsa(device, page_size, fmt)
    poison_dsa(dst, 14)
    all_slots = torch.arange(dst.num_slots)
    before = [(mla_rows(dst, i, all_slots), index_half(dst, i, all_slots)) for i in range(LAYERS)]
    for layer in range(LAYERS):
        host2.load_to_device_per_layer(dst, slots([1, 3], page_size), slots(dst_pages, page_size).to(device), layer, backend)
    if device == "cuda":
        host2.synchronize()
    moved_src, moved_dst = slots(dev_pages, page_size), slots(dst_pages, page_size)
    kept = torch.ones(dst.num_slots, dtype=torch.bool)
    kept[moved_dst] = False
    for layer in range(LAYERS):
        assert torch.equal(mla_rows(dst, layer, moved_dst), mla_rows(src, layer, moved_src))
        assert torch.equal(index_half(dst, layer, moved_dst), index_half(src, layer, moved_src))
        assert torch.equal(mla_rows(dst, layer, all_slots[kept]), before[layer][0][kept])
        assert torch.equal(index_half(dst, layer, all_slots[kept]), before[layer][1][kept])


@pytest.mark.parametrize(("writer", "reader"), [("mla", "dsa"), ("dsa", "mla")])
def test_page_without_its_indexer_half_is_a_counted_miss(tmp_path, writer, reader):
    def host_of(kind):
        dev = make_dsa() if kind == "dsa" else MLATokenToKVPool(
            DEV_PAGES * PAGE, PAGE, torch.float8_e4m3fn, 512, 64, LAYERS, "cpu", kv_cache_format="ds_mla")
        return MLATokenToKVPoolHost(dev, host_size=dev.size, layout="page_first_direct", pin_memory=False)

    w, r = host_of(writer), host_of(reader)
    assert w.page_bytes != r.page_bytes and page_format(w) != page_format(r)
    poison(w.kv_buffer, 15)
    sw, sr = LocalFileStorage(tmp_path, w.page_bytes, fsync=False), LocalFileStorage(tmp_path, r.page_bytes, fsync=False)
    sw.register_mem_pool_host(w)
    sr.register_mem_pool_host(r)
    sw.batch_set_from(["p"], slots([0]))
    assert sr.batch_get_into(["p"], slots([1])) == 0
    assert sr.stats()["hits"] == 0 and sr.stats()["corrupt"] + sr.stats()["misses"] == 1


def test_dsa_page_with_a_damaged_indexer_half_is_a_counted_miss(tmp_path):
    host = MLATokenToKVPoolHost(make_dsa(), host_size=DEV_PAGES * PAGE, layout="page_first_direct", pin_memory=False)
    poison(host.kv_buffer, 16)
    store = LocalFileStorage(tmp_path, host.page_bytes, fsync=False)
    store.register_mem_pool_host(host)
    store.batch_set_from(["p"], slots([0]))
    path = store.path_of("p")
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # a byte of the last slot's indexer scale (the page's last bytes)
    path.write_bytes(bytes(data))
    assert store.batch_get_into(["p"], slots([1])) == 0
    assert store.stats()["corrupt"] == 1


# ---- Mooncake: the same bindings through the key -----------------------------------------------
try:
    from mlakv.mem_cache.storage.mooncake import MooncakeStorage, _require_xxhash
    from mlakv.testing.mooncake_master import MooncakeMaster, check_mooncake

    check_mooncake()
    _require_xxhash()
    MOONCAKE_SKIP = None
except Exception as e:  # noqa: BLE001 - only where the wheel or libibverbs cannot be installed
    MOONCAKE_SKIP = str(e)
requires_mooncake = pytest.mark.skipif(MOONCAKE_SKIP is not None, reason=f"Mooncake unavailable: {MOONCAKE_SKIP}")

MOONCAKE_POOLS = {
    "v41": lambda: make_device("v41"),
    "v41_new": lambda: make_device("v41_new"),
    "v4": lambda: make_device("v4"),
    "dsa": lambda: make_dsa(),
    "ds_mla": lambda: MLATokenToKVPool(DEV_PAGES * PAGE, PAGE, torch.float8_e4m3fn, 512, 64, LAYERS, "cpu",
                                       kv_cache_format="ds_mla"),  # fmt: skip
}


@pytest.fixture(scope="module")
def mooncake():
    """One master; per pool kind a host pool (page_first_direct) and its store, shared by the module."""
    clients: dict[str, tuple] = {}
    with MooncakeMaster() as m:

        def client(name: str):
            if name not in clients:
                dev = MOONCAKE_POOLS[name]()
                host = MLATokenToKVPoolHost(dev, host_size=dev.size, layout="page_first_direct", pin_memory=False)
                clients[name] = (host, MooncakeStorage(host, m.master_addr, m.metadata_url, global_segment_bytes=32 << 20,
                                                       checksum_threads=1))  # fmt: skip
            host, store = clients[name]
            poison(host.kv_buffer, hash(name) % 1000)
            return host, store

        yield client
        for _, store in clients.values():
            store.close()


@requires_mooncake
@pytest.mark.parametrize("kind", ["v41", "v4", "dsa"])
def test_mooncake_round_trip_is_bit_exact(mooncake, kind):
    host, store = mooncake(kind)
    want = host.get_page_bytes(PAGE)
    assert store.batch_set_from([f"rt-{kind}"], slots([1])) == 1
    assert store.batch_get_into([f"rt-{kind}"], slots([3])) == 1
    assert host.get_page_bytes(3 * PAGE) == want


@requires_mooncake
@pytest.mark.parametrize(("writer", "reader"), [("v41", "v41_new"), ("v41", "v4"), ("ds_mla", "dsa"), ("dsa", "ds_mla")])
def test_mooncake_page_of_another_format_is_a_counted_miss(mooncake, writer, reader):
    _, w_store = mooncake(writer)
    _, r_store = mooncake(reader)
    key = f"x-{writer}-{reader}"
    w_store.batch_set_from([key], slots([0]))
    before = r_store.stats()
    assert r_store.batch_exists([key]) == 0
    assert r_store.batch_get_into([key], slots([2])) == 0
    assert r_store.get(key) is None
    after = r_store.stats()
    assert after["hits"] == before["hits"] and after["misses"] + after.get("corrupt", 0) > before["misses"] + before.get("corrupt", 0)
