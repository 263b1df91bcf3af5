"""The V4-family public ops (:mod:`mlakv.ops.v4`): what they refuse, naming the argument, what they
check before writing, and which path they take. The bytes themselves are tested in test_v4_store.py.
"""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, HAS_CUDA
from mlakv.ops import v4_reference as R
from mlakv.ops.v4 import get_v4_kv_buffer, set_v4_kv_buffer, v4_page_bytes, v4_store_path
from test_v4_formats import make_tokens

P = 4
PB = v4_page_bytes("v41", P)  # 2560: 4 * 528 padded to 512


def pages_for(layout="v41", num_pages=2, page_size=P):
    return torch.randint(0, 256, (num_pages, v4_page_bytes(layout, page_size)), dtype=torch.uint8, device=DEVICE)


def kv_for(n, dtype=torch.bfloat16):
    return make_tokens("random", n, dtype, seed=n).to(DEVICE)


def _loc(*v):
    return torch.tensor(v, device=DEVICE)


@pytest.mark.parametrize(
    "layout,page_size,expected",
    [("v4", 64, 37440), ("v41", 64, 33792), ("v41_fp4", 64, 18432), ("v41_new", 64, 33792), ("v41_fp4_new", 64, 18432), ("v4", 1, 1152)],
)
def test_page_bytes(layout, page_size, expected):
    assert v4_page_bytes(layout, page_size) == expected


# ---- refusals ------------------------------------------------------------------------------------


def _call(**over):
    args = dict(kv_pages=pages_for(), loc=_loc(0, 1, 2), kv=kv_for(3), layout="v41", page_size=P)
    args.update(over)
    kw = {k: args.pop(k) for k in list(args) if k not in ("kv_pages", "loc", "kv", "layout", "page_size")}
    return set_v4_kv_buffer(args["kv_pages"], args["loc"], args["kv"], args["layout"], args["page_size"], **kw)


@pytest.mark.parametrize(
    "over,exc,match",
    [
        (dict(layout="v5"), ValueError, "layout"),
        (dict(page_size=3), ValueError, "page_size"),
        (dict(page_size=4.0), TypeError, "page_size"),
        (dict(page_size=True), TypeError, "page_size"),
        (dict(kv_pages=torch.zeros(2, PB, dtype=torch.int8, device=DEVICE)), TypeError, "kv_pages"),
        (dict(kv_pages=torch.zeros(2, PB + 1, dtype=torch.uint8, device=DEVICE)), ValueError, f"kv_pages.*{PB}"),
        (dict(kv_pages=torch.zeros(PB, dtype=torch.uint8, device=DEVICE)), ValueError, "kv_pages"),
        (dict(kv_pages=torch.zeros(PB, 2, dtype=torch.uint8, device=DEVICE).t()), ValueError, "kv_pages.*contiguous"),
        (dict(loc=torch.zeros(3, dtype=torch.float32, device=DEVICE)), TypeError, "loc"),
        (dict(loc=torch.zeros(3, 1, dtype=torch.int64, device=DEVICE)), ValueError, "loc"),
        (dict(kv=torch.zeros(3, 576, dtype=torch.bfloat16, device=DEVICE)), ValueError, "kv.*512"),
        (dict(kv=torch.zeros(3, 512, dtype=torch.float32, device=DEVICE)), TypeError, "kv dtype"),
        (dict(kv=torch.zeros(4, 512, dtype=torch.bfloat16, device=DEVICE)), ValueError, "kv: dim 0"),
        (dict(kv=torch.zeros(3, 1024, dtype=torch.bfloat16, device=DEVICE)[:, ::2]), ValueError, "kv.*contiguous"),
        (dict(freqs_cis=torch.zeros(3, 32, device=DEVICE)), ValueError, "freqs_cis"),
        (dict(freqs_cis=torch.zeros(2, 64, device=DEVICE)), ValueError, "freqs_cis: dim 0"),
        (dict(freqs_cis=torch.zeros(3, 64, dtype=torch.float64, device=DEVICE)), TypeError, "freqs_cis"),
        (dict(positions=_loc(0, 1, 2)), ValueError, "together"),
        (dict(positions=_loc(0, 1, 2), cos_sin_cache=torch.zeros(4, 64, device=DEVICE), freqs_cis=torch.zeros(3, 64, device=DEVICE)), ValueError, "one way"),
        (dict(positions=_loc(0.0, 1.0, 2.0), cos_sin_cache=torch.zeros(4, 64, device=DEVICE)), TypeError, "positions"),
        (dict(positions=_loc(0, 1), cos_sin_cache=torch.zeros(4, 64, device=DEVICE)), ValueError, "positions: dim 0"),
        (dict(positions=_loc(0, 1, 2), cos_sin_cache=torch.zeros(4, 60, device=DEVICE)), ValueError, "cos_sin_cache"),
        (dict(reserved_skip_index=1.0), TypeError, "reserved_skip_index"),
        (dict(dcp_world_size=2, dcp_rank=2), ValueError, "dcp_rank"),
        (dict(dcp_world_size=2.0), TypeError, "dcp_world_size"),
    ],
)
def test_store_refuses_bad_arguments_naming_them(over, exc, match):
    with pytest.raises(exc, match=match):
        _call(**over)


def test_store_refuses_tensors_on_another_device():
    if not HAS_CUDA:
        pytest.skip("needs a CUDA device for a second device")
    with pytest.raises(ValueError, match="loc is on"):
        _call(loc=torch.tensor([0, 1, 2]))


# ---- bounds: checked before anything is written ------------------------------------------------------


@pytest.mark.parametrize("layout", ["v4", "v41_fp4_new"])
def test_checked_store_raises_before_writing(layout):
    pages = pages_for(layout)
    before = pages.clone()
    with pytest.raises(IndexError, match=r"loc\[2\] = 8"):
        set_v4_kv_buffer(pages, _loc(0, 5, 2 * P, 1), kv_for(4), layout, P, check_bounds=True)
    assert torch.equal(pages, before)


def test_checked_store_ignores_skipped_rows_when_bounding():
    pages = pages_for()
    # padding, the reserved slot and another rank's slot may be anything
    set_v4_kv_buffer(pages, _loc(-5, 1 << 40, 3), kv_for(3), "v41", P, reserved_skip_index=1 << 40, check_bounds=True)
    set_v4_kv_buffer(pages, _loc(2 * (2 * P) + 1, 2), kv_for(2), "v41", P, dcp_world_size=2, dcp_rank=0, check_bounds=True)


def test_checked_store_raises_for_positions_outside_the_table():
    pages = pages_for()
    before = pages.clone()
    table = torch.zeros(4, 64, device=DEVICE)
    with pytest.raises(IndexError, match=r"positions\[1\] = 4"):
        set_v4_kv_buffer(pages, _loc(0, 1, 2), kv_for(3), "v41", P, positions=_loc(0, 4, 1), cos_sin_cache=table, check_bounds=True)
    assert torch.equal(pages, before)


def test_cpu_store_always_checks_bounds():
    if HAS_CUDA:
        pytest.skip("the CPU rule")
    pages = pages_for()
    with pytest.raises(IndexError):
        set_v4_kv_buffer(pages, _loc(2 * P), kv_for(1), "v41", P, check_bounds=False)


def test_empty_store_launches_nothing():
    pages = pages_for()
    before = pages.clone()
    set_v4_kv_buffer(pages, _loc().long(), torch.zeros(0, 512, dtype=torch.bfloat16, device=DEVICE), "v41", P)
    assert torch.equal(pages, before)


# ---- the path and the inputs accepted ---------------------------------------------------------------


def test_path_names_the_backend():
    pages = pages_for()
    path = v4_store_path(pages, "v41")
    assert path == "torch" if not HAS_CUDA else path in ("jit", "triton")
    assert set_v4_kv_buffer(pages, _loc(1), kv_for(1), "v41", P) == path


def test_complex_freqs_cis_equals_its_real_view():
    n = 3
    theta = torch.rand(n, 32) * 6.3
    cplx = torch.polar(torch.ones(n, 32), theta).to(DEVICE)
    a = pages_for("v41_fp4")
    b = a.clone()
    kv = kv_for(n)
    set_v4_kv_buffer(a, _loc(0, 1, 2), kv, "v41_fp4", P, freqs_cis=cplx)
    set_v4_kv_buffer(b, _loc(0, 1, 2), kv, "v41_fp4", P, freqs_cis=torch.view_as_real(cplx).flatten(1).contiguous())
    assert torch.equal(a, b)


def test_three_d_kv_equals_two_d():
    a = pages_for("v4")
    b = a.clone()
    kv = kv_for(3)
    set_v4_kv_buffer(a, _loc(0, 4, 7), kv, "v4", P)
    set_v4_kv_buffer(b, _loc(0, 4, 7), kv.unsqueeze(1), "v4", P)
    assert torch.equal(a, b)


# ---- the gather ------------------------------------------------------------------------------------


def test_gather_round_trip_and_bounds():
    pages = pages_for("v41")
    kv = kv_for(3)
    set_v4_kv_buffer(pages, _loc(1, 5, 6), kv, "v41", P)
    out = get_v4_kv_buffer(pages, _loc(1, 5, 6, -1), "v41", P)
    want = R.get_v4_kv_buffer_torch(pages.cpu(), torch.tensor([1, 5, 6, -1]), "v41", P)
    assert torch.equal(out.cpu().view(torch.int16), want.view(torch.int16))
    with pytest.raises(IndexError, match=r"loc\[1\] = 8"):
        get_v4_kv_buffer(pages, _loc(1, 2 * P), "v41", P, check_bounds=True)
    with pytest.raises(ValueError, match="kv_pages"):
        get_v4_kv_buffer(pages, _loc(1), "v41_fp4", P)
