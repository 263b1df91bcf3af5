"""The registered ops (``torch.ops.mlakv.*``) obey the same rules as the Python API.

Spec: for every op and a table of bad calls, the op raises the same exception (type and message)
as its Python function — eagerly on the device, and while tracing (its fake implementation) for
every rule that does not read tensor values; for good calls the fake implementation's output
shapes and dtypes equal the real ones; and no call makes an op write outside its destination
(guard bytes of the same allocation stay as they were: on CPU and the Triton path).
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from conftest import DEVICE, bits, requires_cuda
from mlakv.ops import custom_ops as co
from mlakv.ops.dispatch import set_mla_kv_buffer_triton
from mlakv.ops.move import move_kv_cache

BF16 = torch.bfloat16
D = DEVICE


def _kv(n=8, total=12, device=D):
    return torch.randn(n, 1, total).to(BF16).to(device)


def _u8(n, device=D):
    return torch.randint(0, 256, (n,), dtype=torch.uint8, device=device)


def _i(vals, device=D, dtype=torch.int64):
    return torch.tensor(vals, dtype=dtype, device=device)


# (name, python function, op, args builder, exception, message fragment, checked while tracing)
GATHER = [
    ("too-wide", lambda: (_kv(), _i([2]), 20, 4, False), ValueError, "does not fit kv_buffer's last dim 12", True),
    ("nope-zero", lambda: (_kv(), _i([2]), 0, 4, False), ValueError, "nope_dim must be >= 1", True),
    ("rope-negative", lambda: (_kv(), _i([2]), 8, -1, False), ValueError, "rope_dim must be >= 0", True),
    ("loc-2d", lambda: (_kv(), _i([[2]]), 8, 4, False), ValueError, "loc must be 1-D", True),
    ("loc-float", lambda: (_kv(), torch.tensor([2.0], device=D), 8, 4, False), TypeError, "loc must be int32 or int64", True),
    ("kv-1d", lambda: (_kv().view(-1), _i([2]), 8, 4, False), ValueError, "kv_buffer must be 2-D", True),
    ("kv-overlapping", lambda: (_kv(1).expand(8, 1, 12), _i([2]), 8, 4, False), ValueError, "rows overlap", True),
    ("slot-past-end", lambda: (_kv(), _i([8]), 8, 4, True), IndexError, "out of range", False),
]

COPY = [
    ("dst-negative", lambda: (_u8(32), _u8(32), _i([0]), _i([-1]), 8, [1, 8, 8], [1, 8, 8]), IndexError, r"dst_idx\[0\] = -1", False),
    ("src-past-end", lambda: (_u8(32), _u8(32), _i([4]), _i([0]), 8, [1, 8, 8], [1, 8, 8]), IndexError, r"src_idx\[0\] = 4", False),
    ("page-past-end", lambda: (_u8(32), _u8(32), _i([0]), _i([3]), 16, [1, 8, 8], [2, 16, 8]), IndexError, r"dst_idx\[0\] = 3", False),
    ("lengths", lambda: (_u8(32), _u8(32), _i([0, 1]), _i([0]), 8, [1, 8, 8], [1, 8, 8]), ValueError, "src_idx has 2 entries but dst_idx has 1", True),
    ("idx-2d", lambda: (_u8(32), _u8(32), _i([[0]]), _i([0]), 8, [1, 8, 8], [1, 8, 8]), ValueError, "src_idx must be a 1-D", True),
    ("idx-float", lambda: (_u8(32), _u8(32), _i([0]), torch.tensor([0.0], device=D), 8, [1, 8, 8], [1, 8, 8]), TypeError, "dst_idx must be a 1-D int32/int64", True),
    ("row-bytes-zero", lambda: (_u8(32), _u8(32), _i([0]), _i([0]), 0, [1, 8, 8], [1, 8, 8]), ValueError, "row_bytes must be >= 1", True),
    ("page-zero", lambda: (_u8(32), _u8(32), _i([0]), _i([0]), 8, [0, 8, 8], [1, 8, 8]), ValueError, r"src_layout\[0\] \(page_size\) must be >= 1", True),
    ("layout-short", lambda: (_u8(32), _u8(32), _i([0]), _i([0]), 8, [1, 8], [1, 8, 8]), ValueError, "src_layout must be", True),
    ("dst-strided", lambda: (_u8(32), _u8(64)[::2], _i([0]), _i([0]), 8, [1, 8, 8], [1, 8, 8]), ValueError, "dst must be contiguous", True),
]

SET = [
    ("dcp-rank", lambda: (_kv(), _i([1]), torch.zeros(1, 8, dtype=BF16, device=D), torch.zeros(1, 4, dtype=BF16, device=D), False, None, 2, 5),
     ValueError, r"dcp_rank=5 must lie in \[0, dcp_world_size=2\)", True),
    ("too-wide", lambda: (_kv(), _i([1]), torch.zeros(1, 10, dtype=BF16, device=D), torch.zeros(1, 4, dtype=BF16, device=D), False, None, 1, 0),
     ValueError, "does not fit", True),
    ("loc-float", lambda: (_kv(), torch.tensor([1.0], device=D), torch.zeros(1, 8, dtype=BF16, device=D), torch.zeros(1, 4, dtype=BF16, device=D), False, None, 1, 0),
     TypeError, "loc must be int32 or int64", True),
    ("rows", lambda: (_kv(), _i([1, 2]), torch.zeros(1, 8, dtype=BF16, device=D), torch.zeros(1, 4, dtype=BF16, device=D), False, None, 1, 0),
     ValueError, "n_loc=2", True),
    ("slot-past-end", lambda: (_kv(), _i([8]), torch.zeros(1, 8, dtype=BF16, device=D), torch.zeros(1, 4, dtype=BF16, device=D), True, None, 1, 0),
     IndexError, "out of range", False),
]

MOVE = [
    ("lengths", lambda: ([_kv(), _kv()], _i([1, 2]), _i([3]), False, False), ValueError, "tgt_loc has 2 entries but src_loc has 1", True),
    ("loc-2d", lambda: ([_kv()], _i([[1]]), _i([3]), False, False), ValueError, "tgt_loc must be 1-D", True),
    ("layers-differ", lambda: ([_kv(), _kv(9)], _i([1]), _i([3]), False, False), ValueError, r"kv_buffers\[1\] differs", True),
    ("slot-past-end", lambda: ([_kv()], _i([1]), _i([8]), True, False), IndexError, r"src_loc.*8", False),
]


def _py_set(kv, loc, nope, rope, check, skip, w, r):
    set_mla_kv_buffer_triton(kv, loc, nope, rope, check_bounds=check, reserved_skip_index=skip, dcp_world_size=w, dcp_rank=r)


def _py_move(bufs, tgt, src, check, disjoint):
    move_kv_cache(bufs, tgt, src, check_bounds=check, disjoint=disjoint)


OPS = {
    "get_mla_kv_buffer": (co.gather_rows, co.get_mla_kv_buffer_op, GATHER),
    "copy_rows": (co.copy_rows, co.copy_rows_op, COPY),
    "set_mla_kv_buffer": (_py_set, co.set_mla_kv_buffer_op, SET),
    "move_kv_cache": (_py_move, co.move_kv_cache_op, MOVE),
}
CASES = [(op, *case) for op, (_, _, table) in OPS.items() for case in table]


def _to_fake(mode, x):
    if isinstance(x, torch.Tensor):
        return mode.from_tensor(x)
    if isinstance(x, list) and x and isinstance(x[0], torch.Tensor):
        return [mode.from_tensor(t) for t in x]
    return x


@pytest.mark.parametrize("op,name,args,exc,match,traced", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_op_refuses_like_the_python_api(op, name, args, exc, match, traced):
    """The Python function, the op eagerly and (rules that read no values) the op's fake
    implementation raise the same exception; the destination is untouched."""
    py, registered, _ = OPS[op]
    if op == "copy_rows" and exc is IndexError and D == "cuda":
        _copy_rows_skips_on_cuda(py, registered, args)  # unchecked on the GPU: the kernel skips the unit
        return
    a = args()
    with pytest.raises(exc, match=match) as want:
        py(*a)
    b = args()
    dst = [t for t in b if isinstance(t, torch.Tensor)][1 if op == "copy_rows" else 0] if op != "move_kv_cache" else b[0][0]
    before = dst.clone()
    with pytest.raises(exc, match=match) as got:
        registered(*b)
    assert str(got.value) == str(want.value)
    assert torch.equal(bits(dst), bits(before))
    if traced:
        with FakeTensorMode() as mode:
            fa = [_to_fake(mode, x) for x in args()]
            with pytest.raises(exc, match=match):
                registered(*fa)


def _copy_rows_skips_on_cuda(py, registered, args) -> None:
    for fn in (py, registered):
        a = args()
        dst = a[1]
        before = dst.clone()
        fn(*a)
        torch.cuda.synchronize()
        assert torch.equal(dst, before)


@pytest.mark.parametrize("n_loc,nope,rope", [(1, 8, 4), (5, 12, 0), (3, 6, 2), (0, 8, 4)])
def test_gather_fake_shapes_equal_the_real_ones(n_loc, nope, rope):
    kv, loc = _kv(), torch.randint(0, 8, (n_loc,), device=D)
    real = co.get_mla_kv_buffer_op(kv, loc, nope, rope, False)
    with FakeTensorMode() as mode:
        fake = co.get_mla_kv_buffer_op(mode.from_tensor(kv), mode.from_tensor(loc), nope, rope, False)
    assert [(t.shape, t.dtype) for t in fake] == [(t.shape, t.dtype) for t in real]
    assert [tuple(t.shape) for t in real] == [(n_loc, nope), (n_loc, rope)]


@pytest.mark.parametrize("bad", [-1, 4, 10**12, -(10**12)])
def test_copy_rows_never_writes_outside_dst(bad):
    """A 4-row ``dst`` inside a larger allocation: a bad slot raises on CPU (nothing written) and is
    skipped by the Triton kernel on CUDA (good rows copied); the guard rows never change."""
    row = 8
    src = _u8(4 * row)
    whole = _u8(8 * row)
    dst = whole[2 * row : 6 * row]
    before = whole.clone()
    idx = _i([0, bad])
    lay = [1, row, row]
    if dst.is_cuda:
        co.copy_rows_op(src, dst, _i([1, 2]), idx, row, lay, lay)
        torch.cuda.synchronize()
        expect = before.clone()
        expect.view(8, row)[2] = src.view(4, row)[1]
        assert torch.equal(whole, expect)
    else:
        with pytest.raises(IndexError, match=r"dst_idx\[1\]"):
            co.copy_rows_op(src, dst, _i([1, 2]), idx, row, lay, lay)
        assert torch.equal(whole, before)


def test_copy_rows_kernel_skips_bad_slots():
    """The Triton kernel of ``copy_rows`` (the interpreter on CPU tensors, the compiled kernel on CUDA
    tensors on a GPU): the issue's call writes nothing outside a 4-row ``dst``."""
    pytest.importorskip("triton", reason="triton is not installed")
    from mlakv.kernels.triton.transfer import launch_copy_rows

    row = 8
    src = _u8(4 * row)
    whole = _u8(8 * row)
    dst = whole[2 * row : 6 * row]
    before = whole.clone()
    launch_copy_rows(src, dst, _i([0, 1]), _i([-1, 4]), row, (1, row, row), (1, row, row), max_programs=1)
    assert torch.equal(whole, before)


@requires_cuda
@pytest.mark.parametrize("nope,rope", [(20, 4), (12, 4)])
def test_gpu_gather_op_refuses_a_row_wider_than_the_buffer(nope, rope):
    """The issue's gather on the GPU path: refused before any read outside the row."""
    with pytest.raises(ValueError, match="does not fit"):
        torch.ops.mlakv.get_mla_kv_buffer(_kv(3, 12, "cuda"), _i([2], "cuda"), nope, rope, False)
