"""The pool's hot write path (``MLATokenToKVPool.set_kv_buffer`` with the JIT route bound once).

On a GPU the pool calls the bound JIT writer without Python validation and leaves every call it
does not take, or the launcher refuses, to the checked path. Here that contract is checked on CPU:
the bound writer is the compiled module's own launcher checks (``check_set_mla_kv_buffer``, built
for sm_90a, as in ``test_rules.py``) followed by the torch reference write, so refusals are the
real launcher's. Spec: a pool with the hot route writes the same bytes and raises the same errors
as one without, and the hot route is only used for the calls it may take.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import bits, random_loc, random_rows, sm90a_build_env
from mlakv.mem_cache import MLATokenToKVPool
from mlakv.mem_cache.memory_pool import RESERVED_SLOT
from mlakv.ops.reference import set_mla_kv_buffer_torch

R, P = 512, 64  # kv_lora_rank, qk_rope_head_dim (bf16: the 1024 + 128 byte module)


@pytest.fixture(scope="module")
def launcher_check():
    """The compiled module's ``check_set_mla_kv_buffer`` for bf16 512 + 64 rows."""
    from mlakv.jit_kernel import JitUnavailable, build_set_mla_kv_buffer_module

    with sm90a_build_env():
        try:
            return build_set_mla_kv_buffer_module(
                2 * R, 2 * P, use_pdl=True, device_capability=(9, 0)
            ).check_set_mla_kv_buffer
        except JitUnavailable as e:
            pytest.fail(f"the module does not build: {e}")


class RecordingWriter:
    """Stands in for the bound JIT writer: the launcher's checks, then the reference write."""

    def __init__(self, check):
        self.check = check
        self.calls: list[tuple] = []

    def __call__(self, kv, loc, nope, rope, skip_index, dcp_world_size, dcp_rank) -> bool:
        self.calls.append((kv, skip_index, dcp_world_size, dcp_rank))
        if not self.check(kv, loc, nope, rope, dcp_world_size, dcp_rank):
            return False  # misaligned: nothing written, the caller falls back
        skip = None if skip_index < 0 else skip_index
        set_mla_kv_buffer_torch(kv, loc, nope, rope, reserved_skip_index=skip, dcp_world_size=dcp_world_size, dcp_rank=dcp_rank)
        return True


def _pools(check, **kw):
    """(pool with the hot route bound, the same pool without it), both poisoned identically."""
    make = lambda: MLATokenToKVPool(64, 1, torch.bfloat16, R, P, 2, "cpu", start_layer=3, **kw)  # noqa: E731
    hot, ref = make(), make()
    for a, b in zip(hot.kv_buffer, ref.kv_buffer):
        a.view(torch.uint8).random_(0, 256)
        b.copy_(a)
    writer = RecordingWriter(check)
    hot._route.jit = (writer, 0)
    return hot, ref, writer


def _same_state(hot, ref) -> bool:
    return all(torch.equal(bits(a), bits(b)) for a, b in zip(hot.kv_buffer, ref.kv_buffer))


def _rows(n, form):
    """(cache_k, cache_v) for a write of n rows in one of the pool's forms."""
    if form == "split-2d":
        return random_rows(n, R, torch.bfloat16, "cpu"), random_rows(n, P, torch.bfloat16, "cpu")
    if form == "split-3d":
        return random_rows(n, R, torch.bfloat16, "cpu").unsqueeze(1), random_rows(n, P, torch.bfloat16, "cpu").unsqueeze(1)
    full = random_rows(n, R + P, torch.bfloat16, "cpu").unsqueeze(1)
    return full, (None if form == "full-none" else full[..., :R])  # sglang passes None or the latent part


@pytest.mark.parametrize("layer", ["int", "numpy", "object"])  # sglang passes the layer object (.layer_id)
@pytest.mark.parametrize("dcp", [(1, 0), (2, 1)])
@pytest.mark.parametrize("form", ["split-2d", "split-3d", "full-none", "full-latent"])
def test_valid_write_takes_the_hot_route_and_writes_the_same_rows(launcher_check, form, dcp, layer):
    hot, ref, writer = _pools(launcher_check, dcp_world_size=dcp[0], dcp_rank=dcp[1])
    hot.check_bounds = ref.check_bounds = False  # the hot route is for unchecked writes (as on a GPU)
    loc = random_loc(9, 64, torch.int64, "cpu")
    loc[0] = RESERVED_SLOT
    k, v = _rows(9, form)
    lid = {"int": 4, "numpy": np.int64(4), "object": SimpleNamespace(layer_id=4)}[layer]
    hot.set_kv_buffer(lid, loc, k, v)
    ref.set_kv_buffer(lid, loc, k, v)
    assert len(writer.calls) == 1
    kv, skip, dw, dr = writer.calls[0]
    assert kv is hot._dtype_views[1] and (skip, dw, dr) == (RESERVED_SLOT, *dcp)
    assert _same_state(hot, ref)


@pytest.mark.parametrize(
    "case",
    [
        "bounds checked",  # check_bounds=True: the checked path
        "converting source",  # fp16 rows into the bf16 pool: the converting write
        "rope of another dtype",
    ],
)
def test_calls_the_hot_route_does_not_take_go_the_checked_path(launcher_check, case):
    hot, ref, writer = _pools(launcher_check)
    hot.check_bounds = ref.check_bounds = case == "bounds checked"
    loc = random_loc(5, 64, torch.int32, "cpu")
    k, v = _rows(5, "split-2d")
    layer = 3
    if case == "converting source":
        k, v = k.half(), v.half()
    if case == "rope of another dtype":
        v = v.float()
    hot.set_kv_buffer(layer, loc, k, v)
    ref.set_kv_buffer(layer, loc, k, v)
    assert writer.calls == []
    assert _same_state(hot, ref)


def test_misaligned_sources_fall_back_after_the_launcher_declines(launcher_check):
    hot, ref, writer = _pools(launcher_check)
    hot.check_bounds = ref.check_bounds = False
    loc = random_loc(4, 64, torch.int64, "cpu")
    nope = random_rows(4, R + 1, torch.bfloat16, "cpu")[:, 1:]  # rows start 2 bytes off the vector width
    rope = random_rows(4, P, torch.bfloat16, "cpu")
    hot.set_kv_buffer(3, loc, nope, rope)
    ref.set_kv_buffer(3, loc, nope, rope)
    assert len(writer.calls) == 1  # tried, declined (nothing written), then the checked path wrote
    assert _same_state(hot, ref)


def _bad_calls():
    loc = random_loc(4, 64, torch.int64, "cpu")
    nope, rope = random_rows(4, R, torch.bfloat16, "cpu"), random_rows(4, P, torch.bfloat16, "cpu")
    return {
        "float loc": (3, loc.float(), nope, rope),
        "2-D loc": (3, loc[:, None], nope, rope),
        "loc shorter than rows": (3, loc[:3], nope, rope),
        "rope too narrow": (3, loc, nope, rope[:, :32]),
        "rope int8": (3, loc, nope, rope.view(torch.int8)[:, :P]),
        "rope not a tensor": (3, loc, nope, [0.0] * P),
        "1-D full row": (3, loc[:1], random_rows(1, R + P, torch.bfloat16, "cpu")[0], None),
        "rows not contiguous": (3, loc, random_rows(4, 2 * R, torch.bfloat16, "cpu")[:, ::2], rope),
        "layer out of range": (5, loc, nope, rope),
        "layer is a bool": (True, loc, nope, rope),
        "layer object with a bool id": (SimpleNamespace(layer_id=True), loc, nope, rope),
        "layer object out of range": (SimpleNamespace(layer_id=9), loc, nope, rope),
        "neither form": (3, loc, random_rows(4, 100, torch.bfloat16, "cpu"), rope),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_refused_calls_raise_the_checked_paths_error_and_write_nothing(launcher_check, case):
    hot, ref, _ = _pools(launcher_check)
    hot.check_bounds = ref.check_bounds = False
    args = _bad_calls()[case]
    with pytest.raises(Exception) as expected:
        ref.set_kv_buffer(*args)
    with pytest.raises(expected.type) as got:
        hot.set_kv_buffer(*args)
    assert str(got.value) == str(expected.value)
    assert _same_state(hot, ref)


def test_a_cpu_pool_learns_no_route():
    from mlakv.ops.dispatch import NO_JIT

    pool = MLATokenToKVPool(16, 1, torch.bfloat16, R, P, 1, "cpu")
    pool.set_kv_buffer(0, torch.tensor([1]), *_rows(1, "split-2d"))
    assert pool._route.jit is NO_JIT
