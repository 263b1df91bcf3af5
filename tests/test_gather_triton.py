"""The Triton gather ``launch_get_kv_rows``: ``([n, nope], [n, rope]) = kv[loc]`` split in two, at every
launch shape of its sweep.

Reference: plain indexing on the CPU. Inputs are random bytes (never zeros); the outputs are poisoned
first, so a row that is not written, or written to the wrong place, shows. A slot outside
``[0, num_slots)`` gives a zero row and reads nothing. On CPU the kernel runs under the Triton
interpreter; on a GPU it is the compiled kernel (with its dependent-launch wait and trigger).
"""

from __future__ import annotations

import re

import pytest
import torch

from conftest import DEVICE, bits, poisoned_buffer, random_loc, requires_triton
from mlakv.bench.kv_write import triton_sweep_shapes
from mlakv.spec import tuning

pytestmark = requires_triton

LAYOUTS = {  # name: (dtype, nope, rope)
    "bf16 512+64": (torch.bfloat16, 512, 64),
    "u8 528+128": (torch.uint8, 528, 128),
    "fp32 48+16": (torch.float32, 48, 16),
    "bf16 40+0": (torch.bfloat16, 40, 0),
}
SHAPES = triton_sweep_shapes()


def _gather(*args, **kw):
    from mlakv.kernels.triton.row_write import launch_get_kv_rows

    return launch_get_kv_rows(*args, **kw)


def reference_gather(kv: torch.Tensor, loc: torch.Tensor, nope: int, rope: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rule: row i is ``kv[loc[i], :nope+rope]`` split at ``nope``; zeros where ``loc[i]`` is not a slot."""
    rows = bits(kv.cpu()).reshape(kv.shape[0], -1)
    out = torch.zeros((loc.shape[0], nope + rope), dtype=rows.dtype)
    for i, slot in enumerate(loc.cpu().tolist()):
        if 0 <= slot < kv.shape[0]:
            out[i] = rows[slot, : nope + rope]
    return out[:, :nope], out[:, nope:]


def _poisoned_out(n: int, nope: int, rope: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    rope_out = poisoned_buffer(n, rope, dtype) if rope else torch.empty((n, 0), dtype=dtype, device=DEVICE)
    return poisoned_buffer(n, nope, dtype), rope_out


def _check(kv, loc, nope, rope, **launch) -> None:
    out = _poisoned_out(loc.shape[0], nope, rope, kv.dtype)
    got = _gather(kv, loc, nope, rope, out=out, **launch)
    assert got[0] is out[0] and got[1] is out[1]
    want_n, want_r = reference_gather(kv, loc, nope, rope)
    assert torch.equal(bits(got[0].cpu()), want_n), "nope rows differ"
    assert torch.equal(bits(got[1].cpu()), want_r), "rope rows differ"


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("n", [1, 7, 64])
def test_gather_at_the_table_launch(layout, n):
    dtype, nope, rope = LAYOUTS[layout]
    kv = poisoned_buffer(96, nope + rope + 8, dtype, three_d=True)  # rows wider than nope + rope
    _check(kv, random_loc(n, 96, torch.int64), nope, rope)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"w{s[0]}r{s[1]}{'e' if s[2] else 'l'}")
def test_gather_every_launch_shape_with_a_tail(shape):
    """11 rows: every rows-per-program leaves a partial last program, whose extra rows store nothing."""
    warps, rows, early = shape
    kv = poisoned_buffer(40, 576, torch.bfloat16)
    _check(kv, random_loc(11, 40, torch.int32), 512, 64, num_warps=warps, rows_per_program=rows, early_trigger=early)


@pytest.mark.parametrize("rows", [1, 4])
def test_slots_outside_the_buffer_give_zero_rows(rows):
    kv = poisoned_buffer(32, 576, torch.bfloat16)
    loc = torch.tensor([5, -1, 32, 10**12, 31, -(2**40), 0], device=DEVICE)
    _check(kv, loc, 512, 64, rows_per_program=rows)


@pytest.mark.parametrize("form", ["strided", "offset", "expanded"])
def test_loc_read_at_its_stride(form):
    kv = poisoned_buffer(48, 576, torch.bfloat16)
    base = random_loc(24, 48, torch.int64)
    loc = {"strided": base[::3], "offset": base[5:13], "expanded": base[7:8].expand(6)}[form]
    _check(kv, loc, 512, 64, rows_per_program=4)


def test_kv_rows_read_at_their_stride():
    """A layer view of a wider buffer: rows strided past their width."""
    wide = poisoned_buffer(40, 3 * 576, torch.bfloat16)
    kv = wide[:, 576 : 2 * 576]
    assert kv.stride(0) == 3 * 576
    _check(kv, random_loc(9, 40, torch.int64), 512, 64, rows_per_program=2)


def test_no_rows_launches_nothing():
    kv = poisoned_buffer(8, 576, torch.bfloat16)
    nope, rope = _gather(kv, torch.empty(0, dtype=torch.int64, device=DEVICE), 512, 64)
    assert nope.shape == (0, 512) and rope.shape == (0, 64)


def _empty(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device=DEVICE)  # made where the kernel runs: .to() could densify a view


@pytest.mark.parametrize(
    "bad, what",
    [  # a row too narrow, the wrong dtype, a strided view
        (lambda n: (_empty(n, 511), _empty(n, 64)), "out[0]"),
        (lambda n: (_empty(n, 512), _empty(n, 64, dtype=torch.float16)), "out[1]"),
        (lambda n: (_empty(n, 1024)[:, :512], _empty(n, 64)), "out[0]"),
    ],
)
def test_an_out_tensor_that_does_not_fit_is_refused_before_launch(bad, what):
    kv = poisoned_buffer(8, 576, torch.bfloat16)
    nope, rope = bad(3)
    before = bits(nope).clone(), bits(rope).clone()
    with pytest.raises(ValueError, match=re.escape(f"{what}: expected a contiguous")):
        _gather(kv, random_loc(3, 8, torch.int64), 512, 64, out=(nope, rope))
    assert torch.equal(bits(nope), before[0]) and torch.equal(bits(rope), before[1])


def test_the_table_rows_are_swept_shapes():
    """Every row of the gather's table is a shape its sweep times, and the last row is open."""
    for max_n, warps, rows, early in tuning.TRITON_GATHER_STEPS:
        assert (warps, rows, early) in SHAPES
    assert tuning.TRITON_GATHER_STEPS[-1][0] is None
    for n in (1, 64, 1024, 1025, 65536):
        assert tuning.triton_gather_launch(n) in SHAPES
