"""The row-write spec, checked bit-exactly on every path against the loop reference.

Paths: ``dispatch`` (``set_mla_kv_buffer_triton``: torch on CPU, JIT/Triton on CUDA), ``triton``
(the row kernel launched directly; under the interpreter on CPU) and ``jit`` (the CUDA kernel's
direct entry; SM90+ only).
"""

from __future__ import annotations

import pytest
import torch

from conftest import (
    DEVICE,
    HAS_CUDA,
    IS_SM90,
    assert_bits_equal,
    bits,
    poisoned_buffer,
    random_loc,
    random_rows,
    reference_write,
    requires_cuda,
    requires_triton,
)
from mlakv.mem_cache import kv_write_path, set_mla_kv_buffer_triton, validate_kv_write

DTYPES = [torch.float16, torch.bfloat16]
SHAPES = [(512, 64), (512, 32), (256, 64), (128, 64), (528, 64)]
N_LOCS = [1, 7, 64, 257, 1024]
LOC_DTYPES = [torch.int32, torch.int64]


def _run_triton(kv, loc, nope, rope):
    from mlakv.kernels.triton.row_write import launch_set_kv_rows

    validate_kv_write(kv, loc, nope, rope)
    if loc.shape[0]:
        launch_set_kv_rows(kv, loc, nope, rope)


def _run_jit(kv, loc, nope, rope):
    from mlakv import jit_kernel

    es = kv.element_size()
    if not jit_kernel.can_use_set_mla_kv_buffer(nope.shape[-1] * es, rope.shape[-1] * es, kv.device):
        pytest.skip("JIT kernel not usable for this layout on this device (reason logged)")
    jit_kernel.set_mla_kv_buffer(kv, loc, nope, rope)


def _gate(path: str):
    if path == "triton":
        pytest.importorskip("triton", reason="triton is not installed")
    if path == "jit" and not IS_SM90:
        pytest.skip("the JIT kernel needs an SM90+ GPU (none present)")


RUNNERS = {"dispatch": set_mla_kv_buffer_triton, "triton": _run_triton, "jit": _run_jit}
PATHS = ["dispatch", "triton", "jit"]


def write_matches_reference(path, kv, loc, nope, rope, *, whole=None):
    """Write with ``path`` and compare ``whole`` (default ``kv``; the allocation ``kv`` is a view of)
    bit for bit with the reference's write."""
    target = kv if whole is None else whole
    expected = reference_write(target, loc, nope, rope)
    RUNNERS[path](kv, loc, nope, rope)
    assert_bits_equal(target, expected)


def _check(path, dtype, nope_dim, rope_dim, n_loc, loc_dtype, *, extra_slots=37, total=None, three_d=False):
    _gate(path)
    num_slots = n_loc + extra_slots
    total = total or nope_dim + rope_dim
    kv = poisoned_buffer(num_slots, total, dtype, three_d=three_d)
    loc = random_loc(n_loc, num_slots, loc_dtype)
    nope = random_rows(n_loc, nope_dim, dtype)
    rope = random_rows(n_loc, rope_dim, dtype)
    expected = reference_write(kv, loc, nope, rope)
    RUNNERS[path](kv, loc, nope, rope)
    if HAS_CUDA:
        torch.cuda.synchronize()
    assert_bits_equal(kv, expected)


@pytest.mark.parametrize("loc_dtype", LOC_DTYPES, ids=["i32", "i64"])
@pytest.mark.parametrize("n_loc", N_LOCS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}+{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("path", PATHS)
def test_reference_matrix(path, dtype, shape, n_loc, loc_dtype):
    _check(path, dtype, *shape, n_loc, loc_dtype)


@pytest.mark.parametrize("loc_dtype", LOC_DTYPES, ids=["i32", "i64"])
@pytest.mark.parametrize("n_loc", N_LOCS)
@pytest.mark.parametrize("path", PATHS)
def test_fp8_nsa_byte_layout(path, n_loc, loc_dtype):
    """The FP8 NSA row: 528 + 128 uint8 bytes (the split falls inside a 16-byte vector)."""
    _check(path, torch.uint8, 528, 128, n_loc, loc_dtype)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "dtype,shape",
    [
        (torch.float32, (512, 64)),
        (torch.float8_e4m3fn, (512, 64)),
        (torch.float8_e5m2, (512, 64)),
        (torch.uint8, (528, 64)),
        (torch.int8, (512, 64)),
    ],
    ids=["fp32", "e4m3fn", "e5m2", "u8-528+64", "i8"],
)
def test_other_dtypes(path, dtype, shape):
    _check(path, dtype, *shape, 129, torch.int64)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_three_d_tensors(path, dtype):
    """kv ``[S, 1, total]`` and sources ``[n, 1, d]`` as the pool and attention layers pass them."""
    _gate(path)
    n, num_slots = 65, 100
    kv = poisoned_buffer(num_slots, 576, dtype, three_d=True)
    loc = random_loc(n, num_slots, torch.int64)
    nope = random_rows(n, 512, dtype).unsqueeze(1)
    rope = random_rows(n, 64, dtype).unsqueeze(1)
    write_matches_reference(path, kv, loc, nope, rope)


@pytest.mark.parametrize("path", PATHS)
def test_padding_rows_are_skipped(path):
    """``loc < 0`` rows write nothing, wherever they sit in the batch."""
    _gate(path)
    n, num_slots = 300, 400
    kv = poisoned_buffer(num_slots, 576, torch.bfloat16)
    loc = random_loc(n, num_slots, torch.int64)
    pad = torch.rand(n) < 0.3
    pad[-5:] = True  # a CUDA-graph batch is padded at the end
    loc[pad.to(loc.device)] = -1
    nope = random_rows(n, 512, torch.bfloat16)
    rope = random_rows(n, 64, torch.bfloat16)
    write_matches_reference(path, kv, loc, nope, rope)


@pytest.mark.parametrize("path", PATHS)
def test_all_padding(path):
    _gate(path)
    kv = poisoned_buffer(64, 576, torch.bfloat16)
    before = kv.clone()
    loc = torch.full((32,), -1, dtype=torch.int64, device=DEVICE)
    RUNNERS[path](kv, loc, random_rows(32, 512, torch.bfloat16), random_rows(32, 64, torch.bfloat16))
    assert_bits_equal(kv, before.view(torch.int16).cpu())


@pytest.mark.parametrize("path", PATHS)
def test_strided_sources(path):
    """nope/rope as column slices of one wider tensor (e.g. the kv_a projection's output)."""
    _gate(path)
    n, num_slots = 200, 300
    wide = random_rows(n, 512 + 64 + 64, torch.bfloat16)  # [nope | rope | other]
    nope, rope = wide[:, :512], wide[:, 512:576]
    assert nope.stride(0) == 640 and not nope.is_contiguous()
    kv = poisoned_buffer(num_slots, 576, torch.bfloat16)
    loc = random_loc(n, num_slots, torch.int32)
    write_matches_reference(path, kv, loc, nope, rope)


@pytest.mark.parametrize("path", PATHS)
def test_buffer_wider_than_row(path):
    """Columns past nope + rope are never touched."""
    _check(path, torch.bfloat16, 512, 64, 150, torch.int64, total=576 + 72)


@pytest.mark.parametrize("path", PATHS)
def test_strided_buffer_rows(path):
    """A kv_buffer that is a column slice of a wider allocation (row stride > row width)."""
    _gate(path)
    n, num_slots = 90, 128
    backing = poisoned_buffer(num_slots, 640, torch.bfloat16)
    kv = backing[:, :576]
    loc = random_loc(n, num_slots, torch.int64)
    nope, rope = random_rows(n, 512, torch.bfloat16), random_rows(n, 64, torch.bfloat16)
    write_matches_reference(path, kv, loc, nope, rope, whole=backing)


@pytest.mark.parametrize("path", PATHS)
def test_empty_loc(path):
    _gate(path)
    kv = poisoned_buffer(16, 576, torch.bfloat16)
    before = kv.clone()
    empty = torch.empty(0, dtype=torch.int64, device=DEVICE)
    RUNNERS[path](kv, empty, random_rows(0, 512, torch.bfloat16), random_rows(0, 64, torch.bfloat16))
    assert_bits_equal(kv, before.view(torch.int16).cpu())


def test_cpu_tensors_take_the_torch_path():
    kv = poisoned_buffer(8, 576, torch.bfloat16, device="cpu")
    loc = torch.tensor([3], dtype=torch.int64)
    nope = random_rows(1, 512, torch.bfloat16, device="cpu")
    rope = random_rows(1, 64, torch.bfloat16, device="cpu")
    assert kv_write_path(kv, loc, nope, rope) == "torch"


@requires_cuda
@pytest.mark.parametrize("n_loc", [1, 64, 767, 768, 769, 4096, 16384])
@pytest.mark.parametrize("layout", [(torch.bfloat16, 512, 64), (torch.uint8, 528, 128)], ids=["bf16", "u8"])
def test_dispatch_around_threshold(layout, n_loc):
    """n_loc around 768 (the seed threshold, still the Blackwell row's) through the dispatcher: exact on
    whichever path the tuning table picks on this GPU."""
    dtype, nope_dim, rope_dim = layout
    path = kv_write_path(
        poisoned_buffer(2, nope_dim + rope_dim, dtype),
        torch.zeros(n_loc, dtype=torch.int64, device=DEVICE),
        random_rows(n_loc, nope_dim, dtype),
        random_rows(n_loc, rope_dim, dtype),
    )
    assert path in ("jit", "triton")
    _check("dispatch", dtype, nope_dim, rope_dim, n_loc, torch.int64, extra_slots=1000)


@requires_cuda
@requires_triton
@pytest.mark.parametrize("path", ["dispatch", "triton", "jit"])
@pytest.mark.parametrize("n_loc", [5, 3000])
def test_offsets_past_2_gib(path, n_loc):
    """A uint8 buffer over 2 GiB with loc in its top rows: addresses must be formed in 64 bits."""
    _gate(path)
    row = 656
    num_slots = (2**31) // row + 4096  # 2.2 GB
    kv = torch.empty((num_slots, row), dtype=torch.uint8, device="cuda")
    kv[-8192:].random_(0, 256)
    kv[:8192].random_(0, 256)
    top = num_slots - 1 - torch.randperm(4000)[:n_loc]  # all within the last 4096 rows, past 2 GiB
    assert int(top.min()) * row >= 2**31
    loc = top.to(torch.int64).cuda()
    nope, rope = random_rows(n_loc, 528, torch.uint8), random_rows(n_loc, 128, torch.uint8)
    head_before, tail_before = kv[:8192].clone(), kv[-8192:].clone()
    RUNNERS[path](kv, loc, nope, rope)
    torch.cuda.synchronize()
    expected_tail = reference_write(tail_before, loc - (num_slots - 8192), nope, rope)
    assert_bits_equal(kv[-8192:], expected_tail)
    assert torch.equal(kv[:8192], head_before), "low rows changed: an offset wrapped around 2^31"
    del kv
    torch.cuda.empty_cache()


@requires_cuda
def test_misaligned_sources_fall_back_and_stay_exact():
    """A source whose rows are not 16-byte aligned is refused by the JIT launcher; the dispatcher
    then takes the Triton kernel, and the result is still bit-exact."""
    n, num_slots = 300, 400
    wide = random_rows(n, 1 + 512 + 64, torch.bfloat16)
    nope, rope = wide[:, 1:513], wide[:, 513:577]  # 2-byte offset: misaligned for 16-byte vectors
    kv = poisoned_buffer(num_slots, 576, torch.bfloat16)
    loc = random_loc(n, num_slots, torch.int64)
    assert kv_write_path(kv, loc, nope, rope) == "triton"
    expected = reference_write(kv, loc, nope, rope)
    set_mla_kv_buffer_triton(kv, loc, nope, rope)
    assert_bits_equal(kv, expected)


@requires_cuda
@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda a: (a[0], a[1].cpu(), a[2], a[3]), ValueError, r"loc is on cpu but kv_buffer is on cuda"),
        (lambda a: (a[0], a[1], a[2].double(), a[3]), TypeError, r"cache_k_nope dtype torch.float64 does not match"),
        (lambda a: (a[0], a[1][:3], a[2], a[3]), ValueError, r"cache_k_nope: dim 0 is 4 but loc has n_loc=3"),
        (lambda a: (a[0], a[1].float(), a[2], a[3]), TypeError, r"loc must be int32 or int64"),
        (lambda a: (a[0], a[1], a[2].reshape(2, 2, 512), a[3]), ValueError, r"cache_k_nope: dim 1 of a 3-D tensor must be 1"),
    ],
    ids=["loc-on-cpu", "dtype", "n-loc", "loc-float", "3d-middle"],
)
def test_gpu_hot_path_errors_name_the_argument(mutate, exc, match):
    """On CUDA the kernel's launcher checks first; the error still names the argument and dim."""
    args = (
        poisoned_buffer(16, 576, torch.bfloat16),
        random_loc(4, 16, torch.int64),
        random_rows(4, 512, torch.bfloat16),
        random_rows(4, 64, torch.bfloat16),
    )
    before = args[0].clone()
    with pytest.raises(exc, match=match):
        set_mla_kv_buffer_triton(*mutate(args))
    torch.cuda.synchronize()
    assert torch.equal(args[0].view(torch.int16), before.view(torch.int16))


@requires_cuda
def test_jit_entry_rejects_unaligned_buffer_rows():
    if not IS_SM90:
        pytest.skip("the JIT kernel needs an SM90+ GPU (none present)")
    from mlakv import jit_kernel

    backing = poisoned_buffer(64, 577, torch.bfloat16)  # row stride 1154 bytes: not a multiple of 16
    kv = backing[:, :576]
    with pytest.raises(ValueError, match=r"kv_buffer: the row stride \(1154 bytes\)"):
        jit_kernel.set_mla_kv_buffer(
            kv, random_loc(4, 64, torch.int64), random_rows(4, 512, torch.bfloat16), random_rows(4, 64, torch.bfloat16)
        )


# ---- index vectors of any layout, rope-less rows, row selection (issue 9 §1/§3, 14 §1, 16 §1) ----

SEL_PATHS = ["torch", "dispatch", "triton", "jit"]


def _selected_loc(loc: torch.Tensor, num_slots: int, skip=None, world=1, rank=0) -> torch.Tensor:
    """The reference row selection: the physical row each entry lands in, -1 where it is skipped."""
    out = []
    for v in loc.cpu().tolist():
        keep = v >= 0 and v != skip and v % world == rank and v // world < num_slots
        out.append(v // world if keep else -1)
    return torch.tensor(out, dtype=torch.int64)


def _run_sel(path, kv, loc, nope, rope, skip=None, world=1, rank=0):
    """Write through ``path`` with the row-selection options (rope may be None)."""
    sel = dict(reserved_skip_index=skip, dcp_world_size=world, dcp_rank=rank)
    if path == "torch":
        from mlakv.ops.reference import set_mla_kv_buffer_torch

        set_mla_kv_buffer_torch(kv, loc, nope, rope, **sel)
    elif path == "dispatch":
        set_mla_kv_buffer_triton(kv, loc, nope, rope, **sel)
    elif path == "triton":
        from mlakv.kernels.triton.row_write import launch_set_kv_rows

        rope = nope[..., :0] if rope is None else rope
        validate_kv_write(kv, loc, nope, rope)
        if loc.shape[0]:
            launch_set_kv_rows(kv, loc, nope, rope, skip_index=-1 if skip is None else skip, dcp_world_size=world, dcp_rank=rank)
    else:
        from mlakv import jit_kernel

        es = kv.element_size()
        rope_bytes = 0 if rope is None else rope.shape[-1] * es
        if not jit_kernel.can_use_set_mla_kv_buffer(nope.shape[-1] * es, rope_bytes, kv.device):
            pytest.skip("JIT kernel not usable for this layout on this device (reason logged)")
        jit_kernel.set_mla_kv_buffer(kv, loc, nope, rope, **sel)
    if HAS_CUDA:
        torch.cuda.synchronize()


def _gate_sel(path):
    if path in ("triton", "jit"):
        _gate(path)


def _loc_layouts(n: int, num_slots: int) -> dict:
    base = random_loc(2 * n + 3, num_slots, torch.int64)
    return {
        "strided": base[: 2 * n : 2],
        "expanded": base[:1].expand(n),
        "offset": base[3 : 3 + n],
        "strided-i32": base.int()[1 : 2 * n + 1 : 2],
        "reversed-copy": base[:n].flip(0),
    }


@pytest.mark.parametrize("layout", ["strided", "expanded", "offset", "strided-i32", "reversed-copy"])
@pytest.mark.parametrize("path", SEL_PATHS)
def test_loc_stride_is_honoured(path, layout):
    """Entry i of ``loc`` is ``loc[i]`` as torch reads it, whatever the vector's stride or offset."""
    _gate_sel(path)
    n, num_slots = 24, 80
    kv = poisoned_buffer(num_slots, 576, torch.bfloat16)
    loc = _loc_layouts(n, num_slots)[layout]
    nope, rope = random_rows(n, 512, torch.bfloat16), random_rows(n, 64, torch.bfloat16)
    if layout == "expanded":  # every row targets one slot: any one may win; use one source row
        nope, rope = nope[:1].expand(n, 512), rope[:1].expand(n, 64)
    expected = reference_write(kv, loc, nope, rope)
    _run_sel(path, kv, loc, nope, rope)
    assert_bits_equal(kv, expected)


@pytest.mark.parametrize("loc_kind", ["strided", "expanded", "past-view"])
@pytest.mark.parametrize("path", ["torch", "dispatch", "triton", "jit"])
def test_issue_example_never_writes_past_the_view(path, loc_kind):
    """issue 9 §1: ``kv = big[:32]`` and a strided/expanded ``loc`` whose storage holds rows 40+:
    only the rows ``loc`` names are written, and nothing past the view. A slot past the view is
    refused (CPU, checked) or skipped (unchecked GPU)."""
    _gate_sel(path)
    big = poisoned_buffer(64, 576, torch.bfloat16)
    before = bits(big.cpu()).clone()
    kv = big[:32]
    raw = {"strided": [1, 40, 2, 41, 3, 42], "expanded": [5, 40, 41], "past-view": [1, 40, 2]}[loc_kind]
    loc = torch.tensor(raw, device=DEVICE)
    loc = loc[::2] if loc_kind == "strided" else loc[:1].expand(3) if loc_kind == "expanded" else loc
    nope, rope = random_rows(1, 512, torch.bfloat16).expand(3, 512), random_rows(1, 64, torch.bfloat16).expand(3, 64)
    if loc_kind == "past-view" and path == "dispatch" and not HAS_CUDA:
        with pytest.raises(IndexError, match=r"loc\[1\] = 40 is out of range .* num_slots=32"):
            _run_sel(path, kv, loc, nope, rope)
        assert torch.equal(bits(big.cpu()), before), "a refused call wrote"
        return
    _run_sel(path, kv, loc, nope, rope)
    expected = reference_write(big[:32], _selected_loc(loc, 32), nope, rope)
    assert_bits_equal(big[:32], expected)
    assert torch.equal(bits(big[32:].cpu()), before[32:]), "rows past the kv_buffer view were written"


@pytest.mark.parametrize("rope_form", ["none", "n-by-0"])
@pytest.mark.parametrize("shape", [(512, "bf16"), (528, "u8")], ids=["bf16-512", "u8-528"])
@pytest.mark.parametrize("path", SEL_PATHS)
def test_rope_less_rows(path, shape, rope_form):
    """rope_dim == 0: ``cache_k_rope`` None or ``[n, 0]``; only the nope columns are written."""
    _gate_sel(path)
    nope_dim, dt = shape
    dtype = torch.bfloat16 if dt == "bf16" else torch.uint8
    n, num_slots = 40, 64
    kv = poisoned_buffer(num_slots, nope_dim + 16, dtype)  # wider than the row: the tail stays
    loc = random_loc(n, num_slots, torch.int64)
    loc[::7] = -1
    nope = random_rows(n, nope_dim, dtype)
    rope = None if rope_form == "none" else random_rows(n, 0, dtype)
    expected = reference_write(kv, loc, nope, random_rows(n, 0, dtype))
    _run_sel(path, kv, loc, nope, rope)
    assert_bits_equal(kv, expected)


@pytest.mark.parametrize("skip", [0, 5])
@pytest.mark.parametrize("path", SEL_PATHS)
def test_reserved_skip_index(path, skip):
    """Rows whose loc equals ``reserved_skip_index`` are skipped, as are ``loc < 0`` rows."""
    _gate_sel(path)
    n, num_slots = 48, 64
    kv = poisoned_buffer(num_slots, 576, torch.bfloat16)
    loc = random_loc(n, num_slots, torch.int64)
    loc[::5] = skip
    loc[1::9] = -1
    nope, rope = random_rows(n, 512, torch.bfloat16), random_rows(n, 64, torch.bfloat16)
    expected = reference_write(kv, _selected_loc(loc, num_slots, skip=skip), nope, rope)
    _run_sel(path, kv, loc, nope, rope, skip=skip)
    assert_bits_equal(kv, expected)


@pytest.mark.parametrize("world,rank", [(1, 0), (2, 0), (2, 1), (4, 3)])
@pytest.mark.parametrize("path", SEL_PATHS)
def test_dcp_owner_rule(path, world, rank):
    """DCP: rank r writes only rows with loc % W == r, at row loc // W; padding and the reserved
    slot as in the plain write. Logical slots span W times the rank's rows."""
    _gate_sel(path)
    n, phys = 36, 40
    kv = poisoned_buffer(phys, 576, torch.bfloat16)
    loc = random_loc(n, phys * world, torch.int64)
    loc[::11] = -1
    loc[3] = 0
    nope, rope = random_rows(n, 512, torch.bfloat16), random_rows(n, 64, torch.bfloat16)
    expected = reference_write(kv, _selected_loc(loc, phys, skip=0, world=world, rank=rank), nope, rope)
    _run_sel(path, kv, loc, nope, rope, skip=0, world=world, rank=rank)
    assert_bits_equal(kv, expected)


@pytest.mark.parametrize("path", ["dispatch", "triton", "jit"])
def test_unchecked_slot_past_the_buffer_is_skipped_on_gpu(path):
    """Without the (syncing) bounds check a GPU write skips rows landing past the buffer: it never
    writes outside ``kv_buffer``."""
    if not HAS_CUDA:
        pytest.skip("needs a CUDA GPU (none present); on CPU the bounds are always checked")
    _gate_sel(path)
    big = poisoned_buffer(128, 576, torch.bfloat16)
    before = bits(big.cpu()).clone()
    kv = big[:64]
    loc = torch.tensor([3, 64, 100, 7, 2**40], device=DEVICE)
    nope, rope = random_rows(5, 512, torch.bfloat16), random_rows(5, 64, torch.bfloat16)
    _run_sel(path, kv, loc, nope, rope)
    assert_bits_equal(kv, reference_write(before[:64].view(torch.bfloat16), _selected_loc(loc, 64), nope, rope))
    assert torch.equal(bits(big[64:].cpu()), before[64:])


@requires_cuda
@pytest.mark.parametrize("world,rank,skip", [(1, 0, None), (2, 1, 0), (4, 2, 7)])
def test_checked_gpu_dispatch_applies_the_row_selection(world, rank, skip):
    """``check_bounds=True`` on the GPU: the bounds check, then the kernel, with the same selection."""
    n, phys = 200, 256  # n <= phys: random_loc draws distinct slots
    kv = poisoned_buffer(phys, 576, torch.bfloat16)
    loc = random_loc(n, phys * world, torch.int64)
    loc[::13] = -1
    nope, rope = random_rows(n, 512, torch.bfloat16), random_rows(n, 64, torch.bfloat16)
    expected = reference_write(kv, _selected_loc(loc, phys, skip=skip, world=world, rank=rank), nope, rope)
    set_mla_kv_buffer_triton(
        kv, loc, nope, rope, check_bounds=True, reserved_skip_index=skip, dcp_world_size=world, dcp_rank=rank
    )
    torch.cuda.synchronize()
    assert_bits_equal(kv, expected)


@requires_cuda
def test_checked_gpu_dispatch_refuses_a_slot_past_the_buffer_before_writing():
    kv = poisoned_buffer(64, 576, torch.bfloat16)
    before = bits(kv.cpu()).clone()
    loc = torch.tensor([1, 2, 64 * 2 + 1], device=DEVICE)  # DCP W=2 rank 1: lands at row 64
    nope, rope = random_rows(3, 512, torch.bfloat16), random_rows(3, 64, torch.bfloat16)
    with pytest.raises(IndexError, match=r"loc\[2\] = 129 \(row 64 of dcp rank 1\) is out of range"):
        set_mla_kv_buffer_triton(kv, loc, nope, rope, check_bounds=True, dcp_world_size=2, dcp_rank=1)
    torch.cuda.synchronize()
    assert torch.equal(bits(kv.cpu()), before)


def test_rope_less_rows_take_the_jit_kernel_where_it_serves_them():
    """A rope-less bf16 row (1024 + 0 bytes) is a JIT layout: on SM90+ the dispatcher takes the kernel
    from the tuning table's threshold on; on CPU the torch path."""
    n = 1024
    kv = poisoned_buffer(n + 8, 512, torch.bfloat16)
    loc = random_loc(n, n + 8, torch.int64)
    path = kv_write_path(kv, loc, random_rows(n, 512, torch.bfloat16), None)
    if not HAS_CUDA:
        assert path == "torch"
        return
    from mlakv import jit_kernel

    jit_ok = jit_kernel.can_use_set_mla_kv_buffer(1024, 0, kv.device) and n >= jit_kernel.tuning_for(kv.device).min_n_loc
    assert path == ("jit" if jit_ok else "triton")
