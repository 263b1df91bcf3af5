"""HiCache L2: the host pool's page allocator, device<->host transfers, sglang's page calls.

Round trips are bit-exact: rows are written with ``set_kv_buffer``, backed up, the device rows
overwritten with poison, loaded back layer by layer into other slots, and compared with what was
written. Refused calls leave the pool as it was.
"""

from __future__ import annotations

import ctypes
import random

import numpy as np
import pytest
import torch

from conftest import DEVICE, HAS_CUDA, bits, random_rows, requires_cuda
from mlakv.mem_cache import MLATokenToKVPool, MLATokenToKVPoolHost
from mlakv.mem_cache.host_pool import LAYOUTS

POOL_LAYOUTS = {
    "bf16": (torch.bfloat16, 512, 64),
    "fp16": (torch.float16, 512, 64),
    "fp8-nsa": (torch.float8_e4m3fn, 528, 128),  # stored as uint8: the 528 + 128 byte row
}


def _pool(kind="bf16", page_size=1, size=512, layer_num=3, start_layer=None):
    dtype, nope, rope = POOL_LAYOUTS[kind]
    return MLATokenToKVPool(size, page_size, dtype, nope, rope, layer_num, DEVICE, start_layer=start_layer)


def _slots(pages: list[int], page_size: int) -> torch.Tensor:
    p = torch.tensor(pages, dtype=torch.int64)
    return (p[:, None] * page_size + torch.arange(page_size)).flatten()


def _fill(pool, loc):
    """Write fresh random rows at ``loc`` in every layer; return what was written per layer."""
    written = []
    for layer in range(pool.start_layer, pool.end_layer):
        nope = random_rows(loc.numel(), pool.kv_lora_rank, pool.dtype)
        rope = random_rows(loc.numel(), pool.qk_rope_head_dim, pool.dtype)
        pool.set_kv_buffer(layer, loc.to(DEVICE), nope, rope)
        written.append((nope, rope))
    return written


def _poison(pool):
    for b in pool.kv_buffer:
        b.view(torch.uint8).random_(0, 256)


def _round_trip(pool, host, host_slots, dev_slots, new_slots, io_backend="kernel"):
    written = _fill(pool, dev_slots)
    host.backup_from_device_all_layer(pool, host_slots, dev_slots, io_backend)
    host.synchronize()
    _poison(pool)
    for layer in range(pool.start_layer, pool.end_layer):
        host.load_to_device_per_layer(pool, host_slots, new_slots, layer, io_backend)
        if HAS_CUDA:
            host.wait_until_layer_ready(layer)
        nope, rope = pool.get_mla_kv_buffer(layer, new_slots.contiguous().to(DEVICE))
        w_nope, w_rope = written[layer - pool.start_layer]
        assert torch.equal(bits(nope), bits(w_nope)) and torch.equal(bits(rope), bits(w_rope)), f"layer {layer}"


# ---- transfers ---------------------------------------------------------------------------
@pytest.mark.parametrize("io_backend", ["kernel", "direct"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("page_size", [1, 64])
@pytest.mark.parametrize("kind", list(POOL_LAYOUTS))
def test_round_trip_layer_by_layer(kind, page_size, layout, io_backend):
    pool = _pool(kind, page_size=page_size, size=512, start_layer=5)
    host = MLATokenToKVPoolHost(pool, host_to_device_ratio=2.0, layout=layout)
    n_pages = 3 if page_size > 1 else 150
    dev_slots = _slots(list(range(1, 1 + n_pages)), page_size)  # page 0 is reserved
    host_slots = host.alloc(n_pages * page_size)[torch.randperm(n_pages * page_size)] if page_size == 1 else \
        _slots([7, 2, 5], page_size)
    new_slots = _slots(list(range(1 + n_pages, 1 + 2 * n_pages)), page_size)
    _round_trip(pool, host, host_slots, dev_slots, new_slots, io_backend)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("page_size", [1, 16])
def test_kernel_path_round_trip_under_the_interpreter(layout, page_size, monkeypatch):
    """The host pool's kernel path (its layouts' byte addressing, row and page units, a grid smaller
    than the work) run by the Triton interpreter on CPU tensors, against the written rows."""
    pytest.importorskip("triton", reason="triton is not installed")
    import mlakv.mem_cache.host_pool as hp

    if not HAS_CUDA:
        monkeypatch.setattr(hp, "_kernel_path", lambda device, io_backend, pinned: io_backend == "kernel")
    pool = _pool(page_size=page_size, size=256, layer_num=2)
    host = MLATokenToKVPoolHost(pool, host_size=512, layout=layout, transfer_sms=2)
    n = 3 if page_size > 1 else 40
    dev = _slots([1, 4, 2][:n] if page_size > 1 else list(range(1, 1 + n)), page_size)
    hs = _slots([9, 3, 20], page_size) if page_size > 1 else torch.randperm(512)[:n]
    new = _slots([7, 8, 11], page_size) if page_size > 1 else torch.arange(100, 100 + n)
    _round_trip(pool, host, hs, dev, new)


def _odd_vector(kind: str, base: torch.Tensor) -> torch.Tensor:
    """``base``'s values in a vector of the given odd layout (values equal, memory layout not)."""
    if kind == "strided":
        wide = torch.full((2 * base.numel(),), 10**9, dtype=base.dtype)
        wide[::2] = base
        return wide[::2]
    if kind == "offset":
        return torch.cat([torch.tensor([10**9], dtype=base.dtype), base])[1:]
    raise AssertionError(kind)


@pytest.mark.parametrize("vector", ["strided", "offset"])
@pytest.mark.parametrize("page_size", [1, 64])
def test_strided_and_offset_index_vectors_are_honoured(vector, page_size):
    """Strided and storage-offset index vectors are read by their values (issue 9 §1: honoured)."""
    pool = _pool(page_size=page_size, size=512)
    host = MLATokenToKVPoolHost(pool, host_size=1024, layout="page_first_direct")
    dev = _slots([1, 2], page_size)
    hs = _slots([5, 3], page_size)
    new = _slots([4, 6], page_size)
    _round_trip(pool, host, _odd_vector(vector, hs), _odd_vector(vector, dev), _odd_vector(vector, new))


def test_expanded_index_vector_is_honoured():
    """A stride-0 host vector (one slot repeated) loads that one row into every named device slot."""
    pool = _pool(page_size=1, size=512)
    host = MLATokenToKVPoolHost(pool, host_size=1024, layout="page_first_direct")
    _fill(pool, torch.tensor([9]))
    host.backup_from_device_all_layer(pool, torch.tensor([17]), torch.tensor([9]))
    host.synchronize()
    _poison(pool)
    want = host._page_layer_major(17)[0, 0].clone()  # layer 0, token 0 of host page 17
    host.load_to_device_per_layer(pool, torch.tensor([17]).expand(4), torch.tensor([3, 4, 5, 6]), 0)
    host.synchronize()
    got = pool.kv_buffer[0].view(pool.num_slots, -1).view(torch.uint8)[3:7].cpu()
    assert all(torch.equal(row, want) for row in got)


def test_backup_covers_every_layer_and_nothing_else():
    pool = _pool(page_size=1, layer_num=2, size=64)
    host = MLATokenToKVPoolHost(pool, host_size=64, layout="layer_first")
    host._bytes.random_(0, 256)
    before = host._rows.clone()
    dev = torch.tensor([3, 9, 4])
    _fill(pool, dev)
    hs = torch.tensor([10, 0, 63])
    host.backup_from_device_all_layer(pool, hs, dev)
    host.synchronize()
    changed = (host._rows != before).any(dim=-1)
    assert set(changed.nonzero()[:, 1].tolist()) <= {0, 10, 63}
    for layer in range(2):
        expect = pool.kv_buffer[layer].view(pool.num_slots, -1).view(torch.uint8)[dev].cpu()
        assert torch.equal(host._rows[layer][hs], expect)


@pytest.mark.parametrize(
    "host_idx,dev_idx,exc,match",
    [
        (torch.arange(0, 64), torch.arange(64, 127), ValueError, "host_indices has 64 slots but device_indices has 63"),
        (torch.arange(1, 65), torch.arange(64, 128), ValueError, "whole, aligned pages of 64"),
        (torch.arange(0, 32), torch.arange(64, 96), ValueError, "not a whole number of pages"),
        (torch.arange(1024, 1088), torch.arange(64, 128), IndexError, r"host_indices: slots must lie in \[0, 1024\)"),
        (torch.arange(0, 64), torch.arange(576, 640), IndexError, r"device_indices: slots must lie in \[0, 576\)"),
        (torch.arange(0, 64).float(), torch.arange(64, 128), TypeError, "host_indices must be a 1-D int32/int64"),
        (list(range(64)), torch.arange(64, 128), TypeError, "host_indices must be a 1-D int32/int64 tensor .* got list"),
        (torch.arange(0, 64).view(8, 8), torch.arange(64, 128), ValueError, "got 2-D"),
    ],
    ids=["length", "unaligned", "partial-page", "host-range", "device-range", "dtype", "list", "2-D"],
)
def test_bad_indices_are_rejected(host_idx, dev_idx, exc, match):
    pool = _pool(page_size=64, size=512)
    host = MLATokenToKVPoolHost(pool, host_size=1024)
    with pytest.raises(exc, match=match):
        host.backup_from_device_all_layer(pool, host_idx, dev_idx)
    with pytest.raises(exc, match=match):
        host.load_to_device_per_layer(pool, host_idx, dev_idx, 0)


def test_unknown_io_backend_is_refused():
    pool = _pool(page_size=1, size=64)
    host = MLATokenToKVPoolHost(pool, host_size=64)
    with pytest.raises(ValueError, match="io_backend must be one of"):
        host.backup_from_device_all_layer(pool, torch.tensor([1]), torch.tensor([1]), "dma")
    with pytest.raises(ValueError, match="io_backend must be one of"):
        host.load_to_device_per_layer(pool, torch.tensor([1]), torch.tensor([1]), 0, "dma")


def test_indices_are_validated_once_per_batch(monkeypatch):
    """Per-layer loads of one batch validate (and upload) the vectors once; an in-place change
    of a vector is noticed and validated again."""
    import mlakv.mem_cache.host_pool as hp

    calls = []
    real = hp._check_slots
    monkeypatch.setattr(hp, "_check_slots", lambda t, name, *a: calls.append(name) or real(t, name, *a))
    pool = _pool(page_size=1, size=64, layer_num=3)
    host = MLATokenToKVPoolHost(pool, host_size=64)
    hs, ds = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    for layer in range(3):
        host.load_to_device_per_layer(pool, hs, ds, layer)
    assert calls == ["host_indices", "device_indices"]
    hs[0] = 10**6  # now out of range: the next call must see it
    with pytest.raises(IndexError, match="host_indices"):
        host.load_to_device_per_layer(pool, hs, ds, 0)


# ---- construction ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(memory_headroom=-0.5), ValueError, "memory_headroom must be a finite number in"),
        (dict(memory_headroom=float("nan")), ValueError, "memory_headroom"),
        (dict(host_to_device_ratio=float("inf")), ValueError, "host_to_device_ratio must be a finite number"),
        (dict(host_to_device_ratio=float("nan")), ValueError, "host_to_device_ratio"),
        (dict(host_to_device_ratio=0.1), ValueError, r"host_to_device_ratio must be a finite number in \[1.0"),
        (dict(host_to_device_ratio="2"), TypeError, "host_to_device_ratio must be a number"),
        (dict(host_size=100), ValueError, "host_size=100 is smaller than the device pool"),
        (dict(host_size=1024.0), TypeError, "host_size must be an int"),
        (dict(host_size=True), TypeError, "host_size must be an int"),
        (dict(layout="token_first"), ValueError, "layout must be one of"),
        (dict(page_size=0), ValueError, "page_size must be positive"),
        (dict(transfer_sms=0), ValueError, "transfer_sms must be >= 1"),
    ],
)
def test_bad_construction_is_refused(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        MLATokenToKVPoolHost(_pool(size=512), **kwargs)


def test_numpy_ints_are_accepted():
    host = MLATokenToKVPoolHost(_pool(page_size=64, size=512), host_size=np.int64(1024))
    assert host.size == 1024 and host.alloc(np.int32(128)).numel() == 128


def test_host_memory_check_names_the_sizes(monkeypatch):
    import mlakv.mem_cache.host_pool as hp

    monkeypatch.setattr(hp, "host_available_bytes", lambda: 1 << 30)
    with pytest.raises(MemoryError, match=r"needs .* GiB .* host has 1.00 GiB available"):
        MLATokenToKVPoolHost(_pool(size=64), host_size=10_000_000)


def test_host_memory_check_reads_meminfo():
    from mlakv.mem_cache.host_pool import host_available_bytes

    avail = host_available_bytes()
    assert avail is None or avail > 0


@pytest.mark.parametrize("layout", LAYOUTS)
def test_buffer_shapes_follow_sglang(layout):
    pool = _pool("fp8-nsa", page_size=64, size=512)
    host = MLATokenToKVPoolHost(pool, host_size=1024, layout=layout)
    L, P, D = 3, 64, 656
    want = {"layer_first": (L, 1024, 1, D), "page_first": (1024, L, 1, D), "page_first_direct": (16, L, P, 1, D)}[layout]
    assert tuple(host.kv_buffer.shape) == want and host.kv_buffer.dtype == torch.uint8


# ---- page allocator ----------------------------------------------------------------------
def test_alloc_takes_tokens_and_free_returns_the_count():
    pool = _pool(page_size=64, size=256)
    host = MLATokenToKVPoolHost(pool, host_size=256)
    assert host.available_size() == 256
    a = host.alloc(192)
    assert a.numel() == 192 and host.available_size() == 64
    assert sorted(set((a // 64).tolist())) == sorted((a // 64).unique().tolist()) and a.numel() == 3 * 64
    assert host.alloc(128) is None and host.available_size() == 64
    assert host.free(a[:64]) == 64 and host.available_size() == 128
    b = host.alloc(128)
    assert not set(b.tolist()) & set(a[64:].tolist()), "a page was handed out twice"


@pytest.mark.parametrize(
    "need,exc,match",
    [(100, ValueError, "multiple of page_size=64"), (-64, ValueError, "non-negative"),
     (64.0, TypeError, "need_size must be an int"), (True, TypeError, "need_size must be an int")],
)
def test_alloc_refuses_bad_sizes(need, exc, match):
    host = MLATokenToKVPoolHost(_pool(page_size=64, size=256), host_size=256)
    with pytest.raises(exc, match=match):
        host.alloc(need)
    assert host.available_size() == 256


def test_a_page_named_twice_in_one_free_is_refused_and_nothing_is_freed():
    """Issue 13 case 1: ``free(cat([s, s]))`` used to free one page twice."""
    host = MLATokenToKVPoolHost(_pool(page_size=1, size=64), host_size=64)
    s = host.alloc(1)
    before = host.available_size()
    with pytest.raises(ValueError, match="named more than once"):
        host.free(torch.cat([s, s]))
    assert host.available_size() == before
    assert host.free(s) == 1
    with pytest.raises(ValueError, match="already free"):
        host.free(s)
    x, y = host.alloc(1), host.alloc(1)
    assert int(x) != int(y)


@pytest.mark.parametrize("page_size", [1, 4])
def test_allocator_property_random_sequences(page_size):
    """Thousands of seeded alloc / free / double free / duplicate free steps against a model:
    no page is handed out twice, refused calls change nothing, free counts stay exact."""
    host = MLATokenToKVPoolHost(_pool(page_size=page_size, size=64 * page_size, layer_num=1), host_size=64 * page_size)
    rng = random.Random(1234 + page_size)
    owned: list[torch.Tensor] = []  # live allocations
    freed: list[torch.Tensor] = []  # previously freed allocations (double-free candidates)
    held = set()
    for _ in range(3000):
        op = rng.random()
        if op < 0.45:
            n = rng.randint(0, 8) * page_size
            got = host.alloc(n)
            if got is None:
                assert n // page_size > 64 - len(held)
                continue
            pages = set((got // page_size).tolist())
            assert len(pages) * page_size == n and not pages & held, "page handed out twice"
            held |= pages
            owned.append(got)
        elif op < 0.75 and owned:
            a = owned.pop(rng.randrange(len(owned)))
            assert host.free(a) == a.numel()
            held -= set((a // page_size).tolist())
            freed.append(a)
        elif op < 0.87 and freed:
            a = freed[rng.randrange(len(freed))]
            if a.numel() == 0 or set((a // page_size).tolist()) & held:
                continue  # empty, or pages re-allocated since: not a double free any more
            with pytest.raises(ValueError, match="already free"):
                host.free(a)
        elif owned:
            a = owned[rng.randrange(len(owned))]
            if a.numel() == 0:
                continue
            with pytest.raises(ValueError, match="named more than once"):
                host.free(torch.cat([a, a[:page_size]]))
        assert host.available_size() == (64 - len(held)) * page_size


# ---- pages for storage ---------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
def test_data_page_calls_round_trip_with_sglang_shapes(layout):
    pool = _pool(page_size=64, size=512)
    host = MLATokenToKVPoolHost(pool, host_size=1024, layout=layout)
    host._bytes.random_(0, 256)
    L, P, D = 3, 64, 576
    page = host.get_data_page(128, flat=False)
    assert tuple(page.shape) == {"layer_first": (L, P, 1, D), "page_first": (P, L, 1, D),
                                 "page_first_direct": (1, L, P, 1, D)}[layout]
    flat = host.get_data_page(128)
    assert flat.shape == (L * P * D,) and flat.dtype == torch.bfloat16
    canonical = host.get_page_bytes(128)
    dummy = host.get_dummy_flat_data_page()
    assert dummy.shape == flat.shape and dummy.dtype == flat.dtype and not bits(dummy).any()
    host.set_from_flat_data_page(640, flat.clone())
    assert host.get_page_bytes(640) == canonical
    with pytest.raises(ValueError, match="data_page must be"):
        host.set_from_flat_data_page(0, flat[:-1])
    with pytest.raises(ValueError, match="data_page must be"):
        host.set_from_flat_data_page(0, flat.float())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_page_buffer_meta_points_at_the_page_bytes(layout):
    pool = _pool(page_size=4, size=64, layer_num=2)
    host = MLATokenToKVPoolHost(pool, host_size=64, layout=layout)
    host._bytes.random_(0, 256)
    idx = _slots([3, 9], 4)
    ptrs, sizes = host.get_page_buffer_meta(idx)
    got = b"".join(ctypes.string_at(p, n) for p, n in zip(ptrs, sizes))
    if layout == "page_first":  # the layout's own order: token-major
        want = b"".join(host._rows[p * 4 : p * 4 + 4].numpy().tobytes() for p in (3, 9))
    else:  # layer-major per page
        want = b"".join(host.get_page_bytes(p * 4) for p in (3, 9))
    assert got == want
    assert len(ptrs) == (4 if layout == "layer_first" else 2) and sum(sizes) == 2 * host.page_bytes


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda h: h.get_page_bytes(3), IndexError, "page-aligned"),
        (lambda h: h.get_page_bytes(64.0), TypeError, "host_index must be an int"),
        (lambda h: h.get_page_bytes(10**6), IndexError, "page-aligned"),
        (lambda h: h.set_page_bytes(0, b"123"), ValueError, "a page is"),
        (lambda h: h.set_page_bytes(0, np.zeros(3 * 64 * 1152 // 4, np.int32)), TypeError, "must be uint8"),
        (lambda h: h.set_page_bytes(0, [0] * 10), TypeError, "bytes-like"),
        (lambda h: h.get_data_page(1.0), TypeError, "index must be an int"),
    ],
    ids=["unaligned", "float-index", "range", "short", "int32-array", "list", "float-data-page"],
)
def test_page_calls_refuse_bad_input(call, exc, match):
    host = MLATokenToKVPoolHost(_pool(page_size=64, size=256), host_size=256)
    host._bytes.random_(0, 256)
    before = host._bytes.clone()
    with pytest.raises(exc, match=match):
        call(host)
    assert torch.equal(host._bytes, before)


# ---- the copy kernel ----------------------------------------------------------------------
@pytest.mark.parametrize("max_programs", [1, 3])
@pytest.mark.parametrize("unit_rows,row_bytes", [(1, 1152), (1, 6), (4, 656)])
def test_copy_kernel_paged_addressing(unit_rows, row_bytes, max_programs):
    """The transfer kernel (Triton interpreter on CPU, the GPU otherwise) against indexing, into a
    poisoned destination: rows or whole pages, a persistent grid smaller than the tile count."""
    pytest.importorskip("triton", reason="triton is not installed")
    from mlakv.kernels.triton.transfer import launch_copy_rows

    page, layers, pages = 4, 3, 12
    dev = torch.randint(0, 256, (48, row_bytes), dtype=torch.uint8, device=DEVICE)
    host = torch.randint(0, 256, (pages, layers, page, row_bytes), dtype=torch.uint8, device=DEVICE)
    expected = host.clone()
    layer = 1
    if unit_rows == 1:
        src_idx = torch.randperm(48)[:40].to(DEVICE)
        dst_idx = torch.randperm(pages * page)[:40].to(DEVICE)
        pairs = zip(src_idx.tolist(), dst_idx.tolist())
    else:  # page units: page starts on both sides
        src_idx = (torch.randperm(12)[:10] * 4).to(DEVICE)
        dst_idx = (torch.randperm(pages)[:10] * 4).to(DEVICE)
        pairs = [(s + j, d + j) for s, d in zip(src_idx.tolist(), dst_idx.tolist()) for j in range(4)]
    for s_, d_ in pairs:
        expected[d_ // page, layer, d_ % page] = dev[s_]
    host_flat = host.view(-1)
    off = layer * page * row_bytes
    launch_copy_rows(
        dev.view(-1), host_flat[off:], src_idx, dst_idx, unit_rows * row_bytes,
        (1, row_bytes, row_bytes), (page, layers * page * row_bytes, row_bytes), max_programs=max_programs,
    )
    assert torch.equal(host.cpu(), expected.cpu())


def test_transfer_kernel_takes_buffers_whose_last_dim_is_no_word_multiple():
    """A page pool's buffer may be shaped ``[pages, 64, 585]`` (V4 pages): the kernel copies 8-byte words
    of a contiguous buffer whatever its last dim, and refuses a non-contiguous one by name."""
    pytest.importorskip("triton", reason="triton is not installed")
    from mlakv.kernels.triton.transfer import launch_copy_rows

    page_bytes = 8 * 585  # a multiple of 8 bytes, in rows of 585
    src = torch.randint(0, 256, (6, 8, 585), dtype=torch.uint8, device=DEVICE)
    dst = torch.randint(0, 256, (6, 8, 585), dtype=torch.uint8, device=DEVICE)
    expected = dst.clone()
    src_idx, dst_idx = torch.tensor([0, 2, 5], device=DEVICE), torch.tensor([4, 1, 3], device=DEVICE)
    for s_, d_ in zip(src_idx.tolist(), dst_idx.tolist()):
        expected[d_] = src[s_]
    layout = (1, page_bytes, page_bytes)
    launch_copy_rows(src, dst, src_idx, dst_idx, page_bytes, layout, layout)
    assert torch.equal(dst.cpu(), expected.cpu())
    with pytest.raises(ValueError, match="dst must be a contiguous buffer"):
        launch_copy_rows(src, dst.transpose(0, 1), src_idx, dst_idx, page_bytes, layout, layout)


# ---- GPU -----------------------------------------------------------------------------------
@requires_cuda
@pytest.mark.parametrize("layout", LAYOUTS)
def test_per_layer_load_makes_no_host_sync(layout):
    """After the batch's first layer (which validates), every per-layer load runs under
    ``set_sync_debug_mode("error")``: a sync would raise."""
    pool = _pool(page_size=64, size=1024, layer_num=4)
    host = MLATokenToKVPoolHost(pool, host_size=2048, layout=layout)
    dev = _slots([1, 5, 2], 64)
    hs = _slots([9, 3, 20], 64)
    new = _slots([7, 8, 11], 64).cuda()
    written = _fill(pool, dev)
    host.backup_from_device_all_layer(pool, hs, dev.cuda())
    _poison(pool)
    host.load_to_device_per_layer(pool, hs, new, 0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for layer in range(1, 4):
            host.load_to_device_per_layer(pool, hs, new, layer)
            host.wait_until_layer_ready(layer)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    for layer in range(4):
        nope, rope = pool.get_mla_kv_buffer(layer, new)
        assert torch.equal(bits(nope), bits(written[layer][0])) and torch.equal(bits(rope), bits(written[layer][1]))


@requires_cuda
@pytest.mark.parametrize("sms", [1, 4, 8])
def test_transfer_occupies_at_most_transfer_sms(sms):
    """The kernel records the SM each program ran on: a transfer uses at most ``max_programs`` SMs."""
    from mlakv.kernels.triton.transfer import launch_copy_rows

    n = 4096
    src = torch.randint(0, 256, (n, 1152), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src).random_(0, 256)
    idx = torch.randperm(n, device="cuda")
    smid = torch.full((sms,), -1, dtype=torch.int32, device="cuda")
    launch_copy_rows(src.view(-1), dst.view(-1), idx, idx, 1152, (1, 1152, 1152), (1, 1152, 1152), max_programs=sms, smid_out=smid)
    used = set(smid.tolist())
    assert -1 not in used and len(used) <= sms
    assert torch.equal(dst, src)
