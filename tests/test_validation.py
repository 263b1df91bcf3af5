"""Bad input gets a clear Python error naming the argument, the dim and what was expected."""

from __future__ import annotations

import pytest
import torch

from conftest import poisoned_buffer, random_rows
from mlakv.mem_cache import set_mla_kv_buffer_triton


def _args(n=4, num_slots=16, dtype=torch.bfloat16):
    return (
        poisoned_buffer(num_slots, 576, dtype, device="cpu"),
        torch.randperm(num_slots)[:n],
        random_rows(n, 512, dtype, device="cpu"),
        random_rows(n, 64, dtype, device="cpu"),
    )


def _call(kv, loc, nope, rope, **kw):
    set_mla_kv_buffer_triton(kv, loc, nope, rope, **kw)


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda a: (a[0], a[1], a[2].view(torch.int16), a[3]), TypeError, r"cache_k_nope dtype torch.int16 does not match"),
        (lambda a: (a[0], a[1], a[2], a[3].double()), TypeError, r"cache_k_rope dtype torch.float64 does not match"),
        (lambda a: (a[0].double(), a[1], a[2], a[3]), TypeError, r"kv_buffer dtype torch.float64 is not supported"),
        (lambda a: (a[0], a[1].float(), a[2], a[3]), TypeError, r"loc must be int32 or int64"),
        (lambda a: (a[0], a[1].view(2, 2), a[2], a[3]), ValueError, r"loc must be 1-D"),
        (lambda a: (a[0], a[1][:3], a[2], a[3]), ValueError, r"cache_k_nope: dim 0 is 4 but loc has n_loc=3"),
        (lambda a: (a[0], a[1], a[2], a[3][:2]), ValueError, r"cache_k_rope: dim 0 is 2 but loc has n_loc=4"),
        (lambda a: (a[0][:, :500], a[1], a[2], a[3]), ValueError, r"kv_buffer: last dim is 500 .* = 576 does not fit"),
        (lambda a: (a[0], a[1], a[2].reshape(4, 512, 1), a[3]), ValueError, r"cache_k_nope: dim 1 of a 3-D tensor must be 1"),
        (lambda a: (a[0], a[1], a[2][None], a[3]), ValueError, r"cache_k_nope: dim 1 of a 3-D tensor must be 1"),
        (lambda a: (a[0], a[1], a[2].flatten(), a[3]), ValueError, r"cache_k_nope must be 2-D"),
        (lambda a: (a[0], a[1], a[2], a[3].t().contiguous().t()), ValueError, r"cache_k_rope: the last dim must be contiguous"),
        (lambda a: (a[0].t().contiguous().t(), a[1], a[2], a[3]), ValueError, r"kv_buffer: the last dim must be contiguous"),
        (lambda a: (a[0], a[1].tolist(), a[2], a[3]), TypeError, r"loc must be a torch.Tensor, got list"),
        (lambda a: (a[0].float().numpy(), a[1], a[2], a[3]), TypeError, r"kv_buffer must be a torch.Tensor"),
    ],
    ids=[
        "nope-dtype",
        "rope-dtype",
        "buffer-dtype",
        "loc-float",
        "loc-2d",
        "n-loc-vs-nope",
        "n-loc-vs-rope",
        "too-narrow",
        "nope-3d-middle",
        "nope-4d-ish",
        "nope-1d",
        "rope-noncontig",
        "kv-noncontig",
        "loc-list",
        "kv-numpy",
    ],
)
def test_bad_input_raises_before_any_write(mutate, exc, match):
    args = _args()
    kv_before = args[0].clone()
    bad = mutate(args)
    with pytest.raises(exc, match=match):
        _call(*bad)
    assert torch.equal(args[0].view(torch.int16), kv_before.view(torch.int16)), "a failed call wrote"


def test_device_mismatch_names_the_tensor():
    kv, loc, nope, rope = _args()
    loc = loc.to("meta")
    with pytest.raises(ValueError, match=r"loc is on meta but kv_buffer is on cpu"):
        _call(kv, loc, nope, rope)


@pytest.mark.parametrize("via_env", [False, True])
def test_bounds_check_raises_index_error(via_env, monkeypatch):
    kv, loc, nope, rope = _args(num_slots=16)
    loc[2] = 16
    before = kv.clone()
    if via_env:
        from mlakv import _env

        monkeypatch.setattr(_env, "CHECK_BOUNDS", True)
        ctx = pytest.raises(IndexError, match=r"loc\[2\] = 16 is out of range .* num_slots=16")
        with ctx:
            _call(kv, loc, nope, rope)
    else:
        with pytest.raises(IndexError, match=r"loc\[2\] = 16 is out of range .* num_slots=16"):
            _call(kv, loc, nope, rope, check_bounds=True)
    assert torch.equal(kv.view(torch.int16), before.view(torch.int16))


def _env_default(value: str):
    """``mlakv._env.CHECK_BOUNDS`` in a fresh interpreter with ``MLAKV_CHECK_BOUNDS=value``."""
    import os
    import subprocess
    import sys

    code = "import mlakv.ops.dispatch, mlakv._env as e; print(e.CHECK_BOUNDS)"
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "MLAKV_CHECK_BOUNDS": value},
                       capture_output=True, text=True, timeout=120)
    return r.returncode, r.stdout.strip(), r.stderr


@pytest.mark.parametrize("value,expected", [("1", "True"), ("on", "True"), ("false", "False"), ("no", "False"), ("off", "False")])
def test_bounds_check_env_variable_is_read(value, expected):
    """``MLAKV_CHECK_BOUNDS``: 1/true/yes/on turn the check on, 0/false/no/off/"" leave it off."""
    rc, out, err = _env_default(value)
    assert rc == 0 and out == expected, err


def test_bounds_check_env_variable_rejects_unknown_values():
    rc, _, err = _env_default("maybe")
    assert rc != 0 and "ValueError" in err and "MLAKV_CHECK_BOUNDS='maybe'" in err


def test_cpu_out_of_range_raises_before_any_write():
    """CPU calls always check bounds: a slot past the buffer raises naming loc, and nothing is written
    (no partial write of the earlier rows)."""
    kv, loc, nope, rope = _args(num_slots=16)
    loc[3] = 16
    before = kv.clone()
    with pytest.raises(IndexError, match=r"loc\[3\] = 16 is out of range .* num_slots=16"):
        _call(kv, loc, nope, rope, check_bounds=False)
    assert torch.equal(kv.view(torch.int16), before.view(torch.int16)), "a failed call wrote"


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.zeros(1, 576, dtype=torch.bfloat16).expand(16, 576),
        lambda: torch.zeros(16 * 8 + 576, dtype=torch.bfloat16).as_strided((16, 576), (8, 1)),
    ],
    ids=["expanded", "overlapping"],
)
def test_overlapping_buffer_rows_are_refused(make):
    _, loc, nope, rope = _args()
    with pytest.raises(ValueError, match=r"kv_buffer: rows overlap \(dim 0 stride \d+ < last dim 576\)"):
        _call(make(), loc, nope, rope)


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(reserved_skip_index=True), TypeError, r"reserved_skip_index must be an int or None, got bool"),
        (dict(reserved_skip_index=1.0), TypeError, r"reserved_skip_index must be an int or None, got float"),
        (dict(dcp_world_size=2, dcp_rank=2), ValueError, r"dcp_rank=2 must lie in \[0, dcp_world_size=2\)"),
        (dict(dcp_world_size=0), ValueError, r"dcp_rank=0 must lie in \[0, dcp_world_size=0\)"),
        (dict(dcp_world_size=2.0), TypeError, r"dcp_world_size must be an int, got float"),
        (dict(dcp_world_size=2, dcp_rank=-1), ValueError, r"dcp_rank=-1 must lie"),
    ],
    ids=["skip-bool", "skip-float", "rank-too-big", "world-0", "world-float", "rank-negative"],
)
def test_bad_row_selection_options(kw, exc, match):
    kv, loc, nope, rope = _args()
    before = kv.clone()
    with pytest.raises(exc, match=match):
        _call(kv, loc, nope, rope, **kw)
    assert torch.equal(kv.view(torch.int16), before.view(torch.int16))


def test_padding_rows_pass_the_bounds_check():
    kv, loc, nope, rope = _args(num_slots=16)
    loc[0] = -1
    _call(kv, loc, nope, rope, check_bounds=True)
