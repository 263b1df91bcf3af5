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
        (lambda a: (a[0], a[1], a[2].half(), a[3]), TypeError, r"cache_k_nope dtype torch.float16 does not match"),
        (lambda a: (a[0], a[1], a[2], a[3].float()), TypeError, r"cache_k_rope dtype torch.float32 does not match"),
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
        import mlakv.mem_cache.kv_write as kw

        monkeypatch.setattr(kw, "_CHECK_BOUNDS_DEFAULT", True)
        ctx = pytest.raises(IndexError, match=r"loc\[2\] = 16 is out of range .* num_slots=16")
        with ctx:
            _call(kv, loc, nope, rope)
    else:
        with pytest.raises(IndexError, match=r"loc\[2\] = 16 is out of range .* num_slots=16"):
            _call(kv, loc, nope, rope, check_bounds=True)
    assert torch.equal(kv.view(torch.int16), before.view(torch.int16))


def test_bounds_check_env_variable_is_read(monkeypatch):
    """``MLAKV_CHECK_BOUNDS=1`` in a fresh interpreter turns the check on."""
    import subprocess
    import sys

    code = (
        "import torch; from mlakv.mem_cache import set_mla_kv_buffer_triton as f\n"
        "kv = torch.randn(4, 8); f(kv, torch.tensor([9]), torch.randn(1, 4), torch.randn(1, 4))"
    )
    r = subprocess.run([sys.executable, "-c", code], env={**__import__("os").environ, "MLAKV_CHECK_BOUNDS": "1"},
                       capture_output=True, text=True)
    assert r.returncode != 0 and "IndexError" in r.stderr and "num_slots=4" in r.stderr


def test_padding_rows_pass_the_bounds_check():
    kv, loc, nope, rope = _args(num_slots=16)
    loc[0] = -1
    _call(kv, loc, nope, rope, check_bounds=True)
