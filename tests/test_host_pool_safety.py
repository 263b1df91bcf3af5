"""HiCache L2 against a hostile caller: threads racing the page allocator, index vectors written
behind the pool's back, transfers under ``torch.inference_mode()``, and the transfer kernel's own
bounds.

Spec:

* ``alloc``/``free``/``available_size`` are atomic: a page is never handed out twice, a double free
  is refused even when two threads race to free the same pages, and the free count never exceeds
  the pool.
* A transfer moves the slots its index vectors hold *when it is called*: a vector written through a
  numpy view or ``.data`` (no version bump), or an inference tensor (no version counter), is never
  served from an earlier validation. Out-of-range values are refused (``IndexError``) on the CPU;
  the kernel skips them (nothing outside its buffers is touched) when it reads a vector live.
* Every transfer works under ``torch.inference_mode()``, as the pool's write does.
"""

from __future__ import annotations

import sys
import threading
import time

import pytest
import torch

from conftest import DEVICE, HAS_CUDA, bits, random_rows, requires_cuda
from mlakv.mem_cache import MLATokenToKVPool, MLATokenToKVPoolHost
from mlakv.mem_cache.host_pool import LAYOUTS


def _pool(page_size=1, size=256, layer_num=2, device=DEVICE):
    return MLATokenToKVPool(size, page_size, torch.bfloat16, 64, 16, layer_num, device)


def _slots(pages, page_size):
    p = torch.tensor(pages, dtype=torch.int64)
    return (p[:, None] * page_size + torch.arange(page_size)).flatten()


def _fill(pool, loc):
    """Fresh random rows at ``loc`` in every layer (written directly: ``loc`` may hold slot 0)."""
    for b in pool.kv_buffer:
        b[loc.to(b.device)] = torch.randint(0, 256, (loc.numel(), 1, b.shape[-1] * 2), dtype=torch.uint8).view(
            b.dtype).to(b.device)  # fmt: skip


def _poison(pool):
    for b in pool.kv_buffer:
        b.view(torch.uint8).random_(0, 256)


def _host_rows(host, layer, slots):
    return host._rows[host._host_rows(layer, slots)]


def _dev_rows(pool, layer, slots):
    return pool.kv_buffer[layer].view(pool.num_slots, -1).view(torch.uint8)[slots.to(pool.device)].cpu()


@pytest.fixture
def fast_switching():
    """Switch threads after every few bytecodes, so a check-then-act race shows within a few rounds."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


@pytest.fixture
def kernel_path_on_cpu(monkeypatch):
    """Route CPU transfers through the Triton kernel (run by the interpreter), as on a GPU."""
    pytest.importorskip("triton", reason="triton is not installed")
    import mlakv.mem_cache.host_pool as hp

    if HAS_CUDA:
        pytest.skip("an interpreter test: on a GPU the kernel path runs for real (test_gpu_*)")
    monkeypatch.setattr(hp, "_kernel_path", lambda device, io_backend, pinned: io_backend == "kernel")


# ---- the allocator under threads (issue 22 case 2) ----------------------------------------------
def test_double_free_from_two_threads_succeeds_exactly_once(fast_switching):
    """Two threads free the same page at the same moment, 300 times: each time exactly one free
    succeeds and the other gets the double-free error; the free count stays exact."""
    host = MLATokenToKVPoolHost(_pool(page_size=4, size=256), host_size=256)
    pages = host.size // host.page_size
    barrier = threading.Barrier(2)
    results: list[list[str]] = [[], []]

    def free_it(k, slots):
        barrier.wait()
        try:
            host.free(slots)
            results[k].append("ok")
        except ValueError as e:
            assert "double free" in str(e)
            results[k].append("refused")

    for _ in range(300):
        slots = host.alloc(4)
        ts = [threading.Thread(target=free_it, args=(k, slots)) for k in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert sorted([results[0][-1], results[1][-1]]) == ["ok", "refused"]
        assert host.available_size() == host.size
    assert len(host._free_pages) == pages and bool(host._page_free.all())
    got = host.alloc(host.size)
    assert got is not None and torch.equal(got.sort().values, torch.arange(host.size))


def test_thread_stress_alloc_backup_free(fast_switching):
    """Four threads alloc host pages, back their own device rows up into them, check the host bytes
    and free them, concurrently, for ~3 s (bounded): no page is ever held by two threads, every
    backup lands whole in the pages its thread holds, the free count never exceeds the pool, and
    at the end every page is free."""
    P, n_threads = 4, 4
    pool = _pool(page_size=P, size=512, layer_num=2)
    host = MLATokenToKVPoolHost(pool, host_size=512, layout="page_first_direct")
    owner: dict[int, int] = {}
    owner_lock = threading.Lock()
    errors: list[str] = []
    deadline = time.monotonic() + 3.0
    rounds = [0] * n_threads

    def worker(k):
        dev = _slots([1 + k * 8 + j for j in range(2)], P)  # this thread's own device pages
        try:
            while time.monotonic() < deadline and not errors:
                slots = host.alloc(2 * P)
                if slots is None:
                    continue
                pages = (slots[::P] // P).tolist()
                with owner_lock:
                    clash = [p for p in pages if p in owner]
                    owner.update({p: k for p in pages})
                if clash:
                    errors.append(f"pages {clash} handed out while held")
                if not 0 <= host.available_size() <= host.size:
                    errors.append(f"available_size {host.available_size()} outside [0, {host.size}]")
                _fill_thread(pool, dev)
                host.backup_from_device_all_layer(pool, slots, dev)
                host.synchronize()
                for layer in range(pool.layer_num):
                    if not torch.equal(_host_rows(host, layer, slots), _dev_rows(pool, layer, dev)):
                        errors.append(f"thread {k}: backup of layer {layer} differs")
                with owner_lock:
                    for p in pages:
                        del owner[p]
                host.free(slots)
                rounds[k] += 1
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"thread {k}: {type(e).__name__}: {e}")

    ts = [threading.Thread(target=worker, args=(k,)) for k in range(n_threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=15)
    assert not any(t.is_alive() for t in ts), "a worker hung"
    assert not errors, errors[:5]
    assert min(rounds) > 0, rounds
    assert host.available_size() == host.size


_fill_lock = threading.Lock()


def _fill_thread(pool, dev):
    # the device rows of one thread (disjoint slots); the lock only keeps torch's RNG calls apart
    with _fill_lock:
        rows = [torch.randint(0, 256, (dev.numel(), b.shape[-1] * 2), dtype=torch.uint8) for b in pool.kv_buffer]
    for b, r in zip(pool.kv_buffer, rows):
        b.view(pool.num_slots, -1).view(torch.uint8)[dev.to(b.device)] = r.to(b.device)


# ---- index vectors are read as they are now (issue 22 case 4) -------------------------------------
def test_vector_written_through_numpy_is_validated_again():
    """The issue's case: a vector validated by a backup, then written through ``.numpy()`` (no
    version bump) to negative slots, is refused by the next backup; nothing was read from the wrap-around."""
    pool = _pool(size=64, device="cpu")
    host = MLATokenToKVPoolHost(pool, host_size=128)
    hs, dev = torch.arange(0, 4), torch.arange(4, 8)
    host.backup_from_device_all_layer(pool, hs, dev)
    version = dev._version
    dev.numpy()[:] = [-4, -3, -2, -1]
    assert dev._version == version  # a numpy write does not move the counter
    with pytest.raises(IndexError, match=r"device_indices.*slots must lie in \[0, 65\)"):
        host.backup_from_device_all_layer(pool, hs, dev)
    with pytest.raises(IndexError, match="device_indices"):
        host.load_to_device_per_layer(pool, hs, dev, 0)


def _backed_up_then_layer0_loaded(pool, host):
    """Slots 1..4 filled and backed up to host slots 10..13, the pool poisoned, then layer 0 loaded
    back at device slots 20..23 (a CPU vector the test may rewrite). Returns (host slots, vector)."""
    hs, src = torch.arange(10, 14), torch.arange(1, 5)
    _fill(pool, src)
    host.backup_from_device_all_layer(pool, hs, src)
    _poison(pool)
    new = torch.arange(20, 24)
    host.load_to_device_per_layer(pool, hs, new, 0)
    return hs, new


@pytest.mark.parametrize("alias", ["numpy", "data"])
def test_load_moves_the_slots_the_vector_holds_now(alias):
    """Per-layer loads: the device vector changes between layers through an alias that does not
    bump its version; the later layers land at the new slots, not the validated old ones."""
    pool = _pool(size=64, device="cpu", layer_num=3)
    host = MLATokenToKVPoolHost(pool, host_size=128)
    hs, new = _backed_up_then_layer0_loaded(pool, host)
    if alias == "numpy":
        new.numpy()[:] = [30, 31, 32, 33]
    else:
        new.data.copy_(torch.tensor([30, 31, 32, 33]))
    for layer in (1, 2):
        host.load_to_device_per_layer(pool, hs, new, layer)
        assert torch.equal(_dev_rows(pool, layer, torch.arange(30, 34)), _host_rows(host, layer, hs))


def test_validated_copy_never_aliases_the_callers_vector():
    from mlakv.spec import rules

    v = torch.arange(4, 8)
    got = rules.check_token_slots(v, "v", 64, 1)
    assert got.data_ptr() != v.data_ptr()
    v.numpy()[:] = 0
    assert got.tolist() == [4, 5, 6, 7]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_kernel_reads_a_changed_vector_live_and_skips_bad_slots(kernel_path_on_cpu, layout):
    """The kernel path (the Triton interpreter on CPU): after layer 0 validated the device vector, it
    is rewritten through numpy; layer 1 lands at the new slots. Then it is rewritten to slots out of
    range and negative: the kernel skips them and writes nothing (the pool's rows are unchanged)."""
    pool = _pool(size=64, layer_num=3, device="cpu")
    host = MLATokenToKVPoolHost(pool, host_size=128, layout=layout, transfer_sms=2)
    hs, new = _backed_up_then_layer0_loaded(pool, host)
    assert torch.equal(_dev_rows(pool, 0, new), _host_rows(host, 0, hs))
    new.numpy()[:] = [30, 31, 32, 33]
    host.load_to_device_per_layer(pool, hs, new, 1)
    assert torch.equal(_dev_rows(pool, 1, torch.arange(30, 34)), _host_rows(host, 1, hs))
    before = pool.kv_buffer[2].clone()
    new.numpy()[:] = [-1, pool.num_slots, 10**12, -(10**12)]
    host.load_to_device_per_layer(pool, hs, new, 2)
    assert torch.equal(bits(pool.kv_buffer[2]), bits(before))


# ---- the transfer kernel's own bounds (interpreter on CPU, CUDA on a GPU) -------------------------
@pytest.mark.parametrize(
    "bad",
    ["negative", "past-limit", "off-page", "past-buffer-end", "huge"],
)
def test_transfer_kernel_skips_units_outside_bounds(bad):
    """``launch_copy_rows`` with one bad unit among good ones: the good units are copied, the bad
    one is skipped, and guard bytes around ``dst`` (the same allocation) are untouched."""
    pytest.importorskip("triton", reason="triton is not installed")
    from mlakv.kernels.triton.transfer import launch_copy_rows

    row, n_rows, page = 16, 8, 2
    src = torch.randint(0, 256, (n_rows * row,), dtype=torch.uint8, device=DEVICE)
    whole = torch.randint(0, 256, (n_rows * row + 2 * 64,), dtype=torch.uint8, device=DEVICE)
    dst = whole[64 : 64 + n_rows * row]
    guard = whole.clone()
    value = {"negative": -2, "past-limit": 6, "off-page": 3, "past-buffer-end": 8, "huge": 1 << 40}[bad]
    src_idx = torch.tensor([0, 2, 4], device=DEVICE)
    dst_idx = torch.tensor([2, value, 4], device=DEVICE)
    lay = (1, row, row)
    launch_copy_rows(src, dst, src_idx, dst_idx, row, lay, lay, max_programs=2,
                     dst_limit=6 if bad == "past-limit" else None, dst_align=page if bad == "off-page" else 1)
    expect = guard.clone()
    exp_dst = expect[64 : 64 + n_rows * row].view(n_rows, row)
    exp_dst[2] = src.view(n_rows, row)[0]
    exp_dst[4] = src.view(n_rows, row)[4]
    assert torch.equal(whole.cpu(), expect.cpu())


def test_transfer_kernel_reads_strided_int32_vectors():
    pytest.importorskip("triton", reason="triton is not installed")
    from mlakv.kernels.triton.transfer import launch_copy_rows

    row = 8
    src = torch.randint(0, 256, (6 * row,), dtype=torch.uint8, device=DEVICE)
    dst = torch.zeros(6 * row, dtype=torch.uint8, device=DEVICE)
    wide = torch.tensor([5, 99, 1, 99, 3, 99], dtype=torch.int32, device=DEVICE)
    launch_copy_rows(src, dst, wide[::2], torch.tensor([0, 1, 2], device=DEVICE).expand(3), row,
                     (1, row, row), (1, row, row), max_programs=1)  # fmt: skip
    s, d = src.view(6, row).cpu(), dst.view(6, row).cpu()
    assert torch.equal(d[:3], s[[5, 1, 3]]) and not d[3:].any()


# ---- inference mode (issue 22 case 9) ---------------------------------------------------------------
@pytest.mark.parametrize("io_backend", ["kernel", "direct"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_transfers_work_under_inference_mode(layout, io_backend):
    """Backup and per-layer loads with index vectors made inside ``torch.inference_mode()`` (inference
    tensors: no version counter), then the same vectors changed in place: the new slots are used."""
    P = 4
    pool = _pool(page_size=P, size=128, layer_num=2)
    host = MLATokenToKVPoolHost(pool, host_size=256, layout=layout)
    with torch.inference_mode():
        hs, src, new = _slots([3, 5], P), _slots([1, 2], P).to(DEVICE), _slots([7, 9], P).to(DEVICE)
        _fill(pool, src)
        host.backup_from_device_all_layer(pool, hs, src, io_backend)
        host.synchronize()
        _poison(pool)
        host.load_to_device_per_layer(pool, hs, new, 0, io_backend)
        new.copy_(_slots([11, 12], P))  # an inference tensor changed in place: no counter moves
        host.load_to_device_per_layer(pool, hs, new, 1, io_backend)
        host.synchronize()
    assert torch.equal(_dev_rows(pool, 0, _slots([7, 9], P)), _host_rows(host, 0, hs))
    assert torch.equal(_dev_rows(pool, 1, _slots([11, 12], P)), _host_rows(host, 1, hs))


def test_kernel_path_under_inference_mode(kernel_path_on_cpu):
    pool = _pool(size=64, layer_num=2, device="cpu")
    host = MLATokenToKVPoolHost(pool, host_size=128, layout="layer_first", transfer_sms=2)
    with torch.inference_mode():
        hs, src = torch.arange(10, 14), torch.arange(1, 5)
        _fill(pool, src)
        host.backup_from_device_all_layer(pool, hs, src)
        _poison(pool)
        for layer in range(2):
            host.load_to_device_per_layer(pool, hs, src, layer)
    for layer in range(2):
        assert torch.equal(_dev_rows(pool, layer, src), _host_rows(host, layer, hs))


# ---- GPU ---------------------------------------------------------------------------------------------
@requires_cuda
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gpu_cuda_vector_changed_behind_the_pool_is_read_live_without_sync(layout):
    """A CUDA device vector validated on layer 0 is rewritten through ``.data`` (no version bump):
    layer 1 lands at the new slots, layer 2 (rewritten out of range) writes nothing, and neither
    makes a host sync."""
    P = 16
    pool = _pool(page_size=P, size=1024, layer_num=3)
    host = MLATokenToKVPoolHost(pool, host_size=2048, layout=layout)
    hs, src = _slots([9, 3], P), _slots([1, 5], P).cuda()
    _fill(pool, src)
    host.backup_from_device_all_layer(pool, hs, src)
    host.synchronize()
    _poison(pool)
    new = _slots([7, 8], P).cuda()
    host.load_to_device_per_layer(pool, hs, new, 0)
    new.data.copy_(_slots([20, 30], P).cuda())
    torch.cuda.set_sync_debug_mode("error")
    try:
        host.load_to_device_per_layer(pool, hs, new, 1)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    host.synchronize()
    before = pool.kv_buffer[2].clone()
    new.data.copy_(torch.tensor([-P] * P + [pool.num_slots] * P, device="cuda"))
    host.load_to_device_per_layer(pool, hs, new, 2)
    host.synchronize()
    assert torch.equal(_dev_rows(pool, 0, _slots([7, 8], P)), _host_rows(host, 0, hs))
    assert torch.equal(_dev_rows(pool, 1, _slots([20, 30], P)), _host_rows(host, 1, hs))
    assert torch.equal(bits(pool.kv_buffer[2]), bits(before))
