"""The device pool's constructor and ``get_cpu_copy`` refuse what is not a size, and its memory check
sees every limit the process lives under.

Spec: ``size``, ``page_size``, ``layer_num``, ``kv_lora_rank``, ``qk_rope_head_dim``, ``start_layer``
and ``end_layer`` are ints (numpy integers too); a bool, a float or a string is a ``TypeError``
naming the argument (never truncated, never ``True`` taken as 1); ``get_cpu_copy(chunk_size)`` takes
an int >= 1. The memory check reads the least of ``MemAvailable``, the memory cgroup's room (v2
``memory.max - memory.current``, v1 ``memory.limit_in_bytes - memory.usage_in_bytes``, over the
cgroup's ancestors) and ``RLIMIT_AS``: a pool too large for any of them raises the documented
``MemoryError`` naming the sizes, before allocating.
"""

from __future__ import annotations

import os
import resource

import numpy as np
import pytest
import torch

import mlakv.mem_cache.memory_pool as mp
from mlakv.mem_cache import MLATokenToKVPool

ARGS = dict(size=64, page_size=1, dtype=torch.bfloat16, kv_lora_rank=16, qk_rope_head_dim=8, layer_num=2, device="cpu")


def _pool(**over):
    return MLATokenToKVPool(**{**ARGS, **over})


@pytest.mark.parametrize("name", ["size", "page_size", "layer_num", "kv_lora_rank", "qk_rope_head_dim", "start_layer", "end_layer"])
@pytest.mark.parametrize("value", [True, 64.0, 1.5, "64", np.bool_(True), torch.tensor(4)], ids=["bool", "float", "fraction", "str", "np-bool", "tensor"])
def test_non_int_sizes_are_refused_naming_the_argument(name, value):
    with pytest.raises(TypeError, match=rf"^{name} must be an int, got"):
        _pool(**{name: value})


def test_numpy_integers_are_sizes():
    pool = _pool(size=np.int64(64), page_size=np.int32(4), layer_num=np.int16(2), start_layer=np.int64(3))
    assert (pool.size, pool.page_size, pool.layer_num, pool.start_layer, pool.end_layer) == (64, 4, 2, 3, 5)
    assert type(pool.size) is int and type(pool.start_layer) is int


def test_negative_start_layer_is_refused():
    with pytest.raises(ValueError, match="start_layer must be >= 0"):
        _pool(start_layer=-1)


@pytest.mark.parametrize("chunk,exc", [(0, ValueError), (-1, ValueError), (True, TypeError), (2.0, TypeError)])
def test_get_cpu_copy_refuses_a_bad_chunk_size(chunk, exc):
    with pytest.raises(exc, match="chunk_size"):
        _pool().get_cpu_copy(torch.arange(1, 5), chunk_size=chunk)


def test_get_cpu_copy_chunks():
    out = _pool().get_cpu_copy(torch.arange(1, 6), chunk_size=2)
    assert [[c.shape[0] for c in layer] for layer in out] == [[2, 2, 1], [2, 2, 1]]


# ---- the memory check --------------------------------------------------------------------------
def _fake_cgroup(tmp_path, monkeypatch, lines: str, files: dict[str, str]):
    root = tmp_path / "cg"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    proc = tmp_path / "proc-cgroup"
    proc.write_text(lines)
    monkeypatch.setattr(mp, "_CGROUP_ROOT", str(root))
    monkeypatch.setattr(mp, "_PROC_CGROUP", str(proc))


@pytest.mark.parametrize(
    "lines,files,room",
    [
        ("0::/job\n", {"job/memory.max": "1073741824\n", "job/memory.current": "73741824\n"}, 1_000_000_000),
        ("0::/a/b\n", {"a/memory.max": "300000000\n", "a/memory.current": "0\n", "a/b/memory.max": "max\n"}, 300_000_000),
        ("0::/\n", {"memory.max": "500000000\n", "memory.current": "100000000\n"}, 400_000_000),
        ("4:memory:/job\n0::/\n", {"memory/job/memory.limit_in_bytes": "200000000\n",
                                    "memory/job/memory.usage_in_bytes": "50000000\n"}, 150_000_000),
        ("0::/free\n", {"free/memory.max": "max\n"}, None),
    ],
    ids=["v2", "v2-ancestor", "v2-container-root", "v1", "v2-unlimited"],
)
def test_cgroup_room_is_read(tmp_path, monkeypatch, lines, files, room):
    _fake_cgroup(tmp_path, monkeypatch, lines, files)
    assert mp._cgroup_headroom() == room


def test_pool_over_the_cgroup_limit_raises_memory_error(tmp_path, monkeypatch):
    _fake_cgroup(tmp_path, monkeypatch, "0::/job\n", {"job/memory.max": str(64 << 20), "job/memory.current": "0"})
    with pytest.raises(MemoryError, match=r"MLATokenToKVPool needs .* GiB \(2 layers x"):
        _pool(size=1 << 20, kv_lora_rank=512, qk_rope_head_dim=64)  # 2 x 1 Mi x 1152 B = 2.25 GiB


def test_pool_over_rlimit_as_raises_memory_error_in_a_child():
    """Under ``ulimit -v`` (RLIMIT_AS set in a forked child), a pool larger than the address space
    left raises MemoryError naming the sizes, not a RuntimeError from the allocator."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            with open("/proc/self/status") as f:
                vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
            resource.setrlimit(resource.RLIMIT_AS, (vm + (256 << 20), resource.RLIM_INFINITY))
            try:
                _pool(size=1 << 20, kv_lora_rank=512, qk_rope_head_dim=64)  # 2.25 GiB
                code = 2
            except MemoryError as e:
                code = 0 if "MLATokenToKVPool needs" in str(e) else 3
            except BaseException:  # noqa: BLE001 - the allocator's RuntimeError: the bug
                code = 4
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
