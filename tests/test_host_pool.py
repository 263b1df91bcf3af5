"""HiCache: the host pool's page allocator, device<->host transfers, the storage hook, L3 files.

Round trips are bit-exact: rows are written with ``set_kv_buffer``, backed up, the device rows
overwritten with poison, loaded back layer by layer, and compared with what was written.
"""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, HAS_CUDA, bits, random_rows
from mlakv.mem_cache import LocalFileStorage, MLATokenToKVPool, MLATokenToKVPoolHost, prefix_page_key

POOL_LAYOUTS = {
    "bf16": (torch.bfloat16, 512, 64),
    "fp16": (torch.float16, 512, 64),
    "fp8-nsa": (torch.float8_e4m3fn, 528, 128),  # stored as uint8: the 528 + 128 byte row
}


def _pool(kind="bf16", page_size=1, size=512, layer_num=3, start_layer=None):
    dtype, nope, rope = POOL_LAYOUTS[kind]
    return MLATokenToKVPool(size, page_size, dtype, nope, rope, layer_num, DEVICE, start_layer=start_layer)


def _slots(pool_pages: list[int], page_size: int) -> torch.Tensor:
    pages = torch.tensor(pool_pages, dtype=torch.int64)
    return (pages[:, None] * page_size + torch.arange(page_size)).flatten()


def _fill(pool, loc):
    """Write fresh random rows at ``loc`` in every layer; return what was written per layer."""
    written = []
    for layer in range(pool.start_layer, pool.end_layer):
        nope = random_rows(loc.numel(), pool.kv_lora_rank, pool.dtype)
        rope = random_rows(loc.numel(), pool.qk_rope_head_dim, pool.dtype)
        pool.set_kv_buffer(layer, loc.to(DEVICE), nope, rope)
        written.append((nope, rope))
    return written


@pytest.mark.parametrize("layout", ["layer_first", "page_first"])
@pytest.mark.parametrize("page_size", [1, 64])
@pytest.mark.parametrize("kind", list(POOL_LAYOUTS))
def test_round_trip_layer_by_layer(kind, page_size, layout):
    pool = _pool(kind, page_size=page_size, size=512, start_layer=5)
    host = MLATokenToKVPoolHost(pool, host_to_device_ratio=2.0, layout=layout)
    n_pages = 3 if page_size > 1 else 150
    dev_slots = _slots(list(range(1, 1 + n_pages)), page_size)  # page 0 is reserved
    written = _fill(pool, dev_slots)
    host_slots = host.alloc(n_pages)
    host.backup_from_device_all_layer(pool, host_slots, dev_slots)
    for b in pool.kv_buffer:
        b.view(torch.uint8).random_(0, 256)  # poison the device copy
    # load into different device slots than they came from
    new_slots = _slots(list(range(1 + n_pages, 1 + 2 * n_pages)), page_size)
    for layer in range(pool.start_layer, pool.end_layer):
        host.load_to_device_per_layer(pool, host_slots, new_slots, layer)
        if HAS_CUDA:
            host.wait_until_layer_ready(layer)
        nope, rope = pool.get_mla_kv_buffer(layer, new_slots.to(DEVICE))
        w_nope, w_rope = written[layer - pool.start_layer]
        assert torch.equal(bits(nope), bits(w_nope)) and torch.equal(bits(rope), bits(w_rope)), f"layer {layer}"


def test_backup_covers_every_layer_and_nothing_else():
    pool = _pool(page_size=1, layer_num=2)
    host = MLATokenToKVPoolHost(pool, host_size=64, layout="layer_first")
    host.kv_buffer.random_(0, 256)
    before = host.kv_buffer.clone()
    dev = torch.tensor([3, 9, 4])
    _fill(pool, dev)
    hs = torch.tensor([10, 0, 63])
    host.backup_from_device_all_layer(pool, hs, dev)
    host.synchronize()
    changed = (host.kv_buffer != before).any(dim=-1)
    assert set(changed.nonzero()[:, 1].tolist()) <= {0, 10, 63}
    for layer in range(2):
        expect = pool.kv_buffer[layer].view(pool.num_slots, -1).view(torch.uint8)[dev].cpu()
        assert torch.equal(host.kv_buffer[layer][hs], expect)


def test_allocator_pages_and_double_free():
    pool = _pool(page_size=64, size=512)
    host = MLATokenToKVPoolHost(pool, host_size=64 * 4)
    assert host.available_size() == 256
    a = host.alloc(3)
    assert a.numel() == 192 and host.available_size() == 64
    assert host.alloc(2) is None
    host.free(a[:64])
    assert host.available_size() == 128
    with pytest.raises(ValueError, match="already free"):
        host.free(a[:64])
    b = host.alloc(2)
    assert len(set(b.tolist()) & set(a[64:].tolist())) == 0, "a page was handed out twice"


@pytest.mark.parametrize(
    "host_idx,dev_idx,exc,match",
    [
        (torch.arange(0, 64), torch.arange(64, 127), ValueError, "host_indices has 64 slots but device_indices has 63"),
        (torch.arange(1, 65), torch.arange(64, 128), ValueError, "whole, aligned pages of 64"),
        (torch.arange(0, 32), torch.arange(64, 96), ValueError, "not a whole number of pages"),
        (torch.arange(1024, 1088), torch.arange(64, 128), IndexError, r"host_indices: slots must lie in \[0, 1024\)"),
        (torch.arange(0, 64), torch.arange(576, 640), IndexError, r"device_indices: slots must lie in \[0, 576\)"),
        (torch.arange(0, 64).float(), torch.arange(64, 128), ValueError, "1-D int32/int64"),
    ],
    ids=["length", "unaligned", "partial-page", "host-range", "device-range", "dtype"],
)
def test_bad_indices_are_rejected(host_idx, dev_idx, exc, match):
    pool = _pool(page_size=64, size=512)
    host = MLATokenToKVPoolHost(pool, host_size=1024)
    with pytest.raises(exc, match=match):
        host.backup_from_device_all_layer(pool, host_idx, dev_idx)
    with pytest.raises(exc, match=match):
        host.load_to_device_per_layer(pool, host_idx, dev_idx, 0)


def test_host_memory_check_names_the_sizes(monkeypatch):
    import mlakv.mem_cache.host_pool as hp

    monkeypatch.setattr(hp, "host_available_bytes", lambda: 1 << 30)
    pool = _pool(size=64)
    with pytest.raises(MemoryError, match=r"needs .* GiB .* host has 1.00 GiB available"):
        MLATokenToKVPoolHost(pool, host_size=10_000_000)


def test_host_memory_check_reads_meminfo():
    from mlakv.mem_cache.host_pool import host_available_bytes

    avail = host_available_bytes()
    assert avail is None or avail > 0


@pytest.mark.parametrize("row_bytes", [1152, 656, 6])
def test_copy_rows_kernel_paged_addressing(row_bytes):
    """The transfer kernel (under the Triton interpreter on CPU, for real on GPU) against indexing."""
    pytest.importorskip("triton", reason="triton is not installed")
    from mlakv.mem_cache.transfer_kernels import launch_copy_rows

    page, layers, pages = 4, 3, 6
    dev = torch.randint(0, 256, (40, row_bytes), dtype=torch.uint8, device=DEVICE)
    host = torch.randint(0, 256, (pages, layers, page, row_bytes), dtype=torch.uint8, device=DEVICE)
    expected = host.clone()
    src_idx = torch.randperm(40)[:12].to(DEVICE)
    dst_idx = torch.randperm(pages * page)[:12].to(DEVICE)
    layer = 1
    for s_, d_ in zip(src_idx.tolist(), dst_idx.tolist()):
        expected[d_ // page, layer, d_ % page] = dev[s_]
    launch_copy_rows(
        dev, host[0, layer], src_idx, dst_idx, row_bytes,
        (1, row_bytes, row_bytes), (page, layers * page * row_bytes, row_bytes),
    )
    assert torch.equal(host.cpu(), expected.cpu())


@pytest.mark.parametrize("layout", ["layer_first", "page_first"])
def test_page_bytes_and_file_storage_round_trip(layout, tmp_path):
    pool = _pool(page_size=64, size=512)
    host = MLATokenToKVPoolHost(pool, host_size=256, layout=layout)
    host.kv_buffer.random_(0, 256)
    store = LocalFileStorage(tmp_path, host.page_bytes)
    key = prefix_page_key(range(64))
    page = host.get_page_bytes(64)
    assert len(page) == host.page_bytes == 3 * 64 * 1152
    assert not store.exists(key)
    store.set(key, page)
    assert store.exists(key) and store.get(key) == page
    host.kv_buffer.zero_()
    host.set_page_bytes(128, store.get(key))
    assert host.get_page_bytes(128) == page
    assert host.get_page_bytes(0) == bytes(host.page_bytes)


def test_storage_refuses_wrong_sizes_and_leaves_no_partial_page(tmp_path):
    store = LocalFileStorage(tmp_path, 4096)
    with pytest.raises(ValueError, match="a page is 4096 bytes, got 100"):
        store.set("k1", b"x" * 100)
    assert not store.exists("k1") and list(tmp_path.iterdir()) == []
    (tmp_path / "k2.page").write_bytes(b"short")
    with pytest.raises(ValueError, match="is 5 bytes, expected 4096"):
        store.get("k2")
    with pytest.raises(ValueError, match="key must be"):
        store.set("../escape", b"x" * 4096)
    assert store.get("missing") is None


def test_prefix_keys_chain():
    a1 = prefix_page_key([1, 2, 3])
    a2 = prefix_page_key([4, 5, 6], a1)
    b2 = prefix_page_key([4, 5, 6], prefix_page_key([1, 2, 9]))
    assert a1 == prefix_page_key([1, 2, 3]) and a2 != b2


def test_storage_hook_checks_page_alignment():
    pool = _pool(page_size=64, size=512)
    host = MLATokenToKVPoolHost(pool, host_size=256)
    with pytest.raises(IndexError, match="page-aligned"):
        host.get_page_bytes(3)
    with pytest.raises(ValueError, match="a page is"):
        host.set_page_bytes(0, b"123")
