"""The Triton row move at every launch shape of its table and of the bench's sweep.

Two kernels move rows ``src -> tgt`` in every layer in one launch (:mod:`mlakv.kernels.triton.move`):
``direct`` (disjoint sets; one program per (row, layer), the row in blocks of at most ``B`` words) and
``staged`` (any sets; one program per (layer, ``C`` columns) that loops over all rows ``R`` at a time,
through a scratch). Their shapes come from :func:`mlakv.spec.tuning.move_triton_launch` unless the
launcher's overrides force one, so the edges are a shape's: rows wider than a block, a last column
block past the row, a last step with fewer than ``R`` rows, overlapping sets, and pairs whose slots lie
outside the buffers (skipped) next to kept ones. Every layer starts as fresh random bytes and is
compared byte for byte with :func:`mlakv.ops.move.move_kv_cache_torch` on the kept pairs.

On CPU the kernels run under the Triton interpreter (which ignores warps) at a few rows; a CPU test
compiles both for sm_90 at every shape. Also here: the table lookup, the launcher's use of the table and
its overrides, and ``python -m mlakv.bench.move_kv --sweep``'s plumbing (its movers, its bit-exact check,
WRONG shapes left untimed, the report of the fastest shape per n and the table rows they make, from
made-up timings); its timings need a GPU.
"""

from __future__ import annotations

import ast
import json

import pytest
import torch

from conftest import DEVICE, HAS_CUDA, compile_in_subprocess
from mlakv.ops.move import move_kv_cache_torch
from mlakv.spec import tuning
from mlakv.spec.tuning import MOVE_TRITON_STEPS, MOVE_TRITON_SWEEP, move_triton_launch

pytest.importorskip("triton", reason="triton is not installed")

KINDS = ("direct", "staged")
#: every launch shape of the table and of the sweep, per kernel
SHAPES = {k: sorted({tuple(s[1:]) for s in MOVE_TRITON_STEPS[k]} | set(MOVE_TRITON_SWEEP[k])) for k in KINDS}
CASES = [(k, s) for k in KINDS for s in SHAPES[k]]
#: row layouts: (dtype, elements per row): 8-byte words (bf16 576: 144 words; u8 656: 82 words) and
#: 2-byte words (fp16 rows of 3 elements: 6 bytes)
ROWS = {"bf16_576": (torch.bfloat16, 576), "u8_656": (torch.uint8, 656), "fp16_3": (torch.float16, 3)}


def _id(case) -> str:
    from mlakv.bench.move_kv import shape_name

    return shape_name(*case).replace(" ", "-")


def _buffers(layers: int, slots: int, dtype: torch.dtype, width: int, seed: int) -> list[torch.Tensor]:
    """Fresh random bytes in ``layers`` buffers ``[slots, 1, width]`` (every bit pattern, NaNs included)."""
    g = torch.Generator().manual_seed(seed)
    es = torch.empty((), dtype=dtype).element_size()
    raw = [torch.randint(0, 256, (slots, 1, width * es), dtype=torch.uint8, generator=g) for _ in range(layers)]
    return [r.view(dtype).to(DEVICE) for r in raw]


def _overrides(kind: str, shape) -> dict:
    keys = ("num_warps", "block_words") if kind == "direct" else ("num_warps", "rows_per_step", "column_words")
    return dict(zip(keys, shape))


def _move_and_check(kind: str, shape, bufs, tgt, src, keep) -> None:
    """Move with the ``kind`` kernel at ``shape``; every layer must equal the torch move of the pairs ``keep``."""
    from mlakv.kernels.triton.move import launch_move_kv_rows

    want = [b.cpu().clone() for b in bufs]
    move_kv_cache_torch(want, tgt[keep].cpu(), src[keep].cpu())
    launch_move_kv_rows(bufs, tgt, src, disjoint=kind == "direct", **_overrides(kind, shape))
    if HAS_CUDA:
        torch.cuda.synchronize()
    for layer, (got, exp) in enumerate(zip(bufs, want)):
        same = got.cpu().view(torch.uint8) == exp.view(torch.uint8)
        if not bool(same.all()):
            rows = (~same).reshape(same.shape[0], -1).any(dim=1).nonzero().flatten()
            raise AssertionError(f"layer {layer}: {rows.numel()} rows differ, first slots {rows[:8].tolist()}")


# ---- the launch table ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_launch_table_covers_every_n_with_power_of_two_sizes(kind):
    steps = MOVE_TRITON_STEPS[kind]
    assert steps and steps[-1][0] is None
    bounds = [s[0] for s in steps[:-1]]
    assert bounds == sorted(set(bounds)) and all(b >= 1 for b in bounds)
    for i, (max_n, *shape) in enumerate(steps):
        for n in ([max_n, max(1, max_n - 1)] if max_n is not None else [1 << 20, 1 << 26]):
            if i == 0 or n > steps[i - 1][0]:
                assert move_triton_launch(kind, n) == tuple(shape)
    width = 2 if kind == "direct" else 3
    for shape in SHAPES[kind]:
        assert len(shape) == width and shape[0] in (1, 2, 4, 8, 16, 32)
        assert all(v >= 1 and v & (v - 1) == 0 for v in shape[1:])


def test_table_names_are_public_and_the_rows_name_their_measurement():
    assert set(MOVE_TRITON_STEPS) == set(MOVE_TRITON_SWEEP) == set(KINDS)
    # measured rows name the device, the date and the command that produced them
    assert tuning.MOVE_TRITON_MEASURED.startswith("NVIDIA ") and "UTC" in tuning.MOVE_TRITON_MEASURED
    assert "move_kv --sweep" in tuning.MOVE_TRITON_MEASURED
    for kind in KINDS:  # every row's shape is one the sweep times (checked bit-exact and timed)
        assert all(tuple(step[1:]) in MOVE_TRITON_SWEEP[kind] for step in MOVE_TRITON_STEPS[kind])
    for name in ("MOVE_TRITON_STEPS", "MOVE_TRITON_MEASURED", "MOVE_TRITON_SWEEP", "move_triton_launch"):
        assert name in tuning.__all__


def test_sweep_is_every_combination_and_holds_the_table():
    assert list(MOVE_TRITON_SWEEP["direct"]) == [(w, b) for w in (1, 2, 4, 8) for b in (64, 1024)]
    assert list(MOVE_TRITON_SWEEP["staged"]) == [(w, r, c) for w in (1, 2, 4, 8) for r in (16, 64) for c in (16, 32)]
    for kind in KINDS:
        assert len(set(MOVE_TRITON_SWEEP[kind])) == len(MOVE_TRITON_SWEEP[kind])
        assert all(step[1:] in MOVE_TRITON_SWEEP[kind] for step in MOVE_TRITON_STEPS[kind])  # the table's shapes are timed too


def test_lookup_takes_the_first_row_whose_bound_holds(monkeypatch):
    monkeypatch.setattr(tuning, "MOVE_TRITON_STEPS", {"direct": ((64, 1, 64), (None, 8, 1024)),
                                                      "staged": ((8, 1, 16, 16), (512, 2, 16, 32), (None, 4, 64, 32))})  # fmt: skip
    assert [tuning.move_triton_launch("direct", n) for n in (0, 1, 64, 65, 1 << 20)] == [
        (1, 64), (1, 64), (1, 64), (8, 1024), (8, 1024),
    ]  # fmt: skip
    assert [tuning.move_triton_launch("staged", n) for n in (1, 8, 9, 512, 513)] == [
        (1, 16, 16), (1, 16, 16), (2, 16, 32), (2, 16, 32), (4, 64, 32),
    ]  # fmt: skip
    monkeypatch.setattr(tuning, "MOVE_TRITON_STEPS", {"direct": ((64, 1, 64),), "staged": ()})
    with pytest.raises(AssertionError, match="max n None"):
        tuning.move_triton_launch("direct", 65)


class _Recorder:
    """Stands in for a jitted kernel: records the grid and the launch keywords of each launch."""

    def __init__(self):
        self.launches: list[tuple[tuple, dict]] = []

    def __getitem__(self, grid):
        return lambda *args, **kw: self.launches.append((grid, kw))


def _launches(monkeypatch, kind: str, n: int, dtype=torch.bfloat16, width: int = 576, layers: int = 3, **overrides):
    """``(grid, launch keywords)`` of each launch a move of ``n`` rows makes (the kernels recorded, not run)."""
    from mlakv.kernels.triton import move as m

    rec = _Recorder()
    monkeypatch.setattr(m, "_move_rows_kernel" if kind == "direct" else "_move_columns_kernel", rec)
    bufs = [torch.zeros(2 * n + 2, 1, width, dtype=dtype) for _ in range(layers)]
    loc = torch.arange(2 * n)
    m.launch_move_kv_rows(bufs, loc[n:], loc[:n], disjoint=kind == "direct", **overrides)
    keep = {"num_warps", "BLOCK", "ROWS", "ROW"}
    return [(grid, {k: v for k, v in kw.items() if k in keep}) for grid, kw in rec.launches]


def test_launch_before_the_table_is_one_row_of_it(monkeypatch):
    """The launch the kernels had hard-coded before the table (direct: 4 warps, the whole row up to 1024
    words in one power-of-two block; staged: 4 warps, 16 rows a step, 32 words a program) is what one
    row of each kernel gives: the table changed only the shape, not how a shape is launched."""
    monkeypatch.setattr(tuning, "MOVE_TRITON_STEPS", {"direct": ((None, 4, 1024),), "staged": ((None, 4, 16, 32),)})
    # bf16 576 = 144 eight-byte words: one block of 256; u8 656 = 82 words: 128
    assert _launches(monkeypatch, "direct", 5) == [((5, 3), dict(ROW=144, BLOCK=256, num_warps=4))]
    assert _launches(monkeypatch, "direct", 5, torch.uint8, 656) == [((5, 3), dict(ROW=82, BLOCK=128, num_warps=4))]
    assert _launches(monkeypatch, "staged", 5) == [((3, 5), dict(ROW=144, BLOCK=32, ROWS=16, num_warps=4))]
    assert _launches(monkeypatch, "staged", 5, torch.uint8, 656) == [((3, 3), dict(ROW=82, BLOCK=32, ROWS=16, num_warps=4))]
    assert _launches(monkeypatch, "direct", 0) == [] and _launches(monkeypatch, "staged", 0) == []


def test_launcher_takes_the_table_and_the_overrides(monkeypatch):
    monkeypatch.setattr(tuning, "MOVE_TRITON_STEPS", {"direct": ((8, 1, 64), (None, 8, 1024)),
                                                      "staged": ((8, 2, 64, 16), (None, 8, 16, 64))})  # fmt: skip
    assert _launches(monkeypatch, "direct", 8) == [((8, 3), dict(ROW=144, BLOCK=64, num_warps=1))]
    assert _launches(monkeypatch, "direct", 9) == [((9, 3), dict(ROW=144, BLOCK=256, num_warps=8))]
    assert _launches(monkeypatch, "direct", 9, num_warps=2) == [((9, 3), dict(ROW=144, BLOCK=256, num_warps=2))]
    assert _launches(monkeypatch, "direct", 9, block_words=32) == [((9, 3), dict(ROW=144, BLOCK=32, num_warps=8))]
    # a block bound above the row gives the row's own power of two
    assert _launches(monkeypatch, "direct", 8, block_words=4096) == [((8, 3), dict(ROW=144, BLOCK=256, num_warps=1))]
    assert _launches(monkeypatch, "staged", 8) == [((3, 9), dict(ROW=144, BLOCK=16, ROWS=64, num_warps=2))]
    assert _launches(monkeypatch, "staged", 9) == [((3, 3), dict(ROW=144, BLOCK=64, ROWS=16, num_warps=8))]
    assert _launches(monkeypatch, "staged", 9, num_warps=1, rows_per_step=4, column_words=128) == [
        ((3, 2), dict(ROW=144, BLOCK=128, ROWS=4, num_warps=1))
    ]
    assert _launches(monkeypatch, "staged", 9, rows_per_step=32) == [((3, 3), dict(ROW=144, BLOCK=64, ROWS=32, num_warps=8))]


@pytest.mark.parametrize(
    "disjoint,overrides,match",
    [
        (True, dict(rows_per_step=16), "staged kernel"),
        (True, dict(column_words=32), "staged kernel"),
        (False, dict(block_words=64), "direct kernel"),
        (True, dict(block_words=48), "block_words must be a power of two"),
        (False, dict(rows_per_step=12), "rows_per_step must be a power of two"),
        (False, dict(column_words=-8), "column_words must be a power of two"),
    ],
)
def test_overrides_a_kernel_cannot_take_are_refused(disjoint, overrides, match):
    from mlakv.kernels.triton.move import launch_move_kv_rows

    bufs = _buffers(1, 8, torch.bfloat16, 576, 0)
    before = bufs[0].clone()
    loc = torch.arange(4, device=DEVICE)
    with pytest.raises(ValueError, match=match):
        launch_move_kv_rows(bufs, loc[2:], loc[:2], disjoint=disjoint, **overrides)
    assert torch.equal(bufs[0].view(torch.uint8), before.view(torch.uint8))


# ---- bit-exact at every shape ------------------------------------------------------------------------


def _sizes(kind: str, shape) -> list[int]:
    """Row counts: one row, and (the last) a count past one step of the staged kernel, no multiple of it."""
    return [1, 5] if kind == "direct" else [1, shape[1] + 3]


@pytest.mark.parametrize("row", list(ROWS))
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_every_shape_moves_the_reference_rows(case, row):
    """Fresh random buffers of three layers; ``direct``: random disjoint pairs; ``staged``: random pairs
    where half the targets are also sources (the move must read every row before it is overwritten)."""
    kind, shape = case
    dtype, width = ROWS[row]
    for i, n in enumerate(_sizes(kind, shape)):
        slots = 4 * n + 6
        bufs = _buffers(3, slots, dtype, width, seed=97 * n + i + shape[0])
        perm = torch.randperm(slots, generator=torch.Generator().manual_seed(n + i))
        src = perm[:n]
        tgt = perm[n : 2 * n] if kind == "direct" else perm[n // 2 : n // 2 + n].flip(0)
        if kind == "staged" and n > 1:
            assert set(tgt.tolist()) & set(src.tolist())
        _move_and_check(kind, shape, bufs, tgt.to(DEVICE), src.to(DEVICE), torch.ones(n, dtype=torch.bool))


@pytest.mark.parametrize("loc_dtype", [torch.int32, torch.int64], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_pairs_outside_the_buffers_are_skipped_next_to_kept_ones(case, loc_dtype):
    """Negative slots and slots past the buffers, on either side, among kept pairs of one program or step;
    the rows just past the buffers (a view of a longer tensor) stay as they were."""
    kind, shape = case
    n = _sizes(kind, shape)[-1]
    slots = 4 * n + 6
    wide = _buffers(2, slots + 2, torch.bfloat16, 576, seed=shape[0] + n)
    bufs = [w[:slots] for w in wide]
    after = [w[slots:].clone() for w in wide]
    perm = torch.randperm(slots, generator=torch.Generator().manual_seed(3))
    src, tgt = perm[:n].clone(), perm[n : 2 * n].clone()
    src[1::4] = -1
    tgt[2::5] = slots
    src[3::7] = slots + 1  # the first row past the buffer exists in memory: it must not be read
    keep = (src >= 0) & (src < slots) & (tgt >= 0) & (tgt < slots)
    _move_and_check(kind, shape, bufs, tgt.to(loc_dtype).to(DEVICE), src.to(loc_dtype).to(DEVICE), keep)
    assert all(torch.equal(w[slots:].view(torch.uint8), a.view(torch.uint8)) for w, a in zip(wide, after))


# ---- compiled for sm_90 at every shape (CPU: no GPU needed) --------------------------------------

_COMPILE_SCRIPT = r"""
import json, sys
from mlakv.kernels.triton import move as m
from mlakv.testing.sm90 import compile_sm90

loc = dict(tgt_loc_ptr="*i64", src_loc_ptr="*i64")
out = []
for kind, shape in json.loads(sys.argv[1]):
    if kind == "direct":
        warps, block = shape
        ptrs = dict(ptr="*i64", layer_off_ptr="*i64", **loc)
        ints = dict(tgt_loc_stride=1, src_loc_stride=1, row_stride=144, num_slots=65536)
        consts = dict(ROW=144, BLOCK=1 << max(0, (min(144, block) - 1).bit_length()))
        k = compile_sm90(m._move_rows_kernel, ptrs, ints, consts, num_warps=warps)
    else:
        warps, rows, cols = shape
        ptrs = dict(ptr="*i64", scratch_ptr="*i64", layer_off_ptr="*i64", **loc)
        ints = dict(tgt_loc_stride=1, src_loc_stride=1, row_stride=144, num_slots=65536, n=4096, n_layers=61)
        k = compile_sm90(m._move_columns_kernel, ptrs, ints, dict(ROW=144, BLOCK=cols, ROWS=rows), num_warps=warps)
    out.append([kind, shape, len(k.asm.get("cubin", b""))])
print(json.dumps(out))
"""


def test_every_shape_compiles_for_sm90():
    """The sweep's and the table's shapes are ones that build: each assembles to a cubin for sm_90."""
    pytest.importorskip("triton.backends.nvidia", reason="triton's CUDA backend is not installed")
    compiled = compile_in_subprocess(_COMPILE_SCRIPT, [[k, list(s)] for k, s in CASES])
    assert [(k, tuple(s)) for k, s, _ in compiled] == CASES
    assert all(size > 0 for _, _, size in compiled)


# ---- python -m mlakv.bench.move_kv --sweep -----------------------------------------------------------


def test_bench_movers_launch_their_shapes(monkeypatch):
    from mlakv.bench import move_kv as bench
    from mlakv.kernels.triton import move as m

    seen = []
    monkeypatch.setattr(m, "launch_move_kv_rows", lambda b, t, s, **kw: seen.append(kw))
    for kind in KINDS:
        seen.clear()
        movers = bench.sweep_movers(kind)
        assert list(movers) == ["table", *(bench.shape_name(kind, s) for s in MOVE_TRITON_SWEEP[kind])]
        for fn in movers.values():
            fn([], None, None)
        disjoint = kind == "direct"
        assert seen == [dict(disjoint=disjoint)] + [dict(disjoint=disjoint, **_overrides(kind, s)) for s in MOVE_TRITON_SWEEP[kind]]
    for kind in KINDS:
        for shape in MOVE_TRITON_SWEEP[kind]:
            assert bench.shape_of(bench.shape_name(kind, shape)) == (kind, shape)
    assert bench.shape_name("staged", (4, 16, 32)) == "staged w4 r16 c32"
    assert bench.shape_name("direct", (1, 64)) == "direct w1 b64"


@pytest.mark.parametrize("kind", KINDS)
def test_bench_check_passes_the_kernels_and_catches_a_wrong_move(kind):
    from mlakv.bench.move_kv import move_is_exact, sweep_movers

    movers = sweep_movers(kind, [MOVE_TRITON_SWEEP[kind][0]])
    assert all(move_is_exact(fn, kind, 2, 6, DEVICE) for fn in movers.values())
    assert not move_is_exact(lambda b, t, s: None, kind, 2, 6, DEVICE)  # moved nothing

    def one_layer_short(b, t, s):  # every layer but the last
        move_kv_cache_torch(b[:-1], t, s)

    assert not move_is_exact(one_layer_short, kind, 2, 6, DEVICE)


def test_bench_sweep_times_every_shape_it_checked_and_no_wrong_one(monkeypatch):
    """The sweep on CPU (interpreter) with a made-up clock: a shape whose move is wrong is WRONG and not timed."""
    from mlakv.bench import move_kv as bench
    from mlakv.kernels.triton import move as m

    monkeypatch.setattr(tuning, "MOVE_TRITON_STEPS", {"direct": ((None, 4, 1024),), "staged": ((None, 4, 16, 32),)})
    real = m.launch_move_kv_rows

    def broken_at_two_warps(b, t, s, **kw):
        if kw.get("num_warps") != 2:
            real(b, t, s, **kw)

    monkeypatch.setattr(m, "launch_move_kv_rows", broken_at_two_warps)
    timed = []

    def clock(body, calls):
        timed.append(calls)
        return 1.0 + 0.5 * len(timed)

    bufs = _buffers(2, 40, torch.bfloat16, 576, 1)
    shapes = {"direct": [(1, 64), (2, 1024)], "staged": [(2, 16, 16), (1, 16, 32)]}
    rows = bench.run_sweep(bufs, [3], shapes=shapes, time_us=clock)
    assert [(r["kernel"], r["n"]) for r in rows] == [("direct", 3), ("staged", 3)]
    assert rows[0]["table_shape"] == [4, 1024] and rows[1]["table_shape"] == [4, 16, 32]
    assert rows[0]["times"] == {"table": 1.5, "direct w1 b64": 2.0, "direct w2 b1024": "WRONG"}
    assert rows[1]["times"] == {"table": 2.5, "staged w2 r16 c16": "WRONG", "staged w1 r16 c32": 3.0}
    assert timed == [8, 8, 8, 8]  # four shapes timed, each over the rotating index sets


def _sweep_row(kind: str, n: int, table_shape, **times) -> dict:
    return {"kernel": kind, "n": n, "table_shape": list(table_shape),
            "times": {k.replace("_", " "): v for k, v in times.items()}}  # fmt: skip


def test_report_names_the_fastest_shape_per_n_and_the_table_rows(monkeypatch):
    from mlakv.bench.move_kv import format_report

    sweep = [
        _sweep_row("direct", 8, (4, 1024), table=3.0, direct_w1_b64=2.0, direct_w4_b1024=3.0, direct_w8_b1024="WRONG"),
        _sweep_row("staged", 8, (4, 16, 32), table=4.0, staged_w1_r16_c16=3.2, staged_w4_r16_c32=4.0),
        _sweep_row("direct", 4096, (4, 1024), table=50.0, direct_w1_b64=60.0, direct_w4_b1024=50.0, direct_w8_b1024=40.0),
        _sweep_row("staged", 4096, (4, 16, 32), table=90.0, staged_w1_r16_c16=95.0, staged_w4_r16_c32=90.0),
        _sweep_row("direct", 64, (4, 1024), table=4.0, direct_w1_b64=3.0, direct_w4_b1024=4.0, direct_w8_b1024=5.0),
    ]
    res = {"device": "NVIDIA H200", "layers": 61, "slots": 65536,
           "rows": [{"n": 8, "torch": 100.0, "staged": 10.0, "direct": 8.0}], "sweep": sweep}  # fmt: skip
    lines = format_report(res).splitlines()
    assert "| 8 | 100.0 | 10.0 | 8.0 | 10.00x | 12.50x |" in lines
    assert "| direct | n=8 | n=4096 | n=64 |" in lines
    assert "| direct w8 b1024 | WRONG | 40.00 | 5.00 |" in lines  # a wrong shape: in the table, not timed
    assert "| staged | n=8 | n=4096 |" in lines
    assert "- direct n=8: direct w1 b64: 2.00 µs (0.67x the table's direct w4 b1024: 3.00 µs)" in lines
    assert "- direct n=64: direct w1 b64: 3.00 µs (0.75x the table's direct w4 b1024: 4.00 µs)" in lines
    assert "- direct n=4096: direct w8 b1024: 40.00 µs (0.80x the table's direct w4 b1024: 50.00 µs)" in lines
    assert "- staged n=4096: staged w4 r16 c32: 90.00 µs (1.00x the table's staged w4 r16 c32: 90.00 µs)" in lines
    printed = next(ln for ln in lines if ln.startswith("MOVE_TRITON_STEPS = "))
    assert printed == 'MOVE_TRITON_STEPS = {"direct": ((64, 1, 64), (None, 8, 1024)), "staged": ((8, 1, 16, 16), (None, 4, 16, 32))}'
    # the printed rows, pasted into the table, give each measured n its fastest shape
    monkeypatch.setattr(tuning, "MOVE_TRITON_STEPS", ast.literal_eval(printed.split(" = ", 1)[1]))
    assert [tuning.move_triton_launch("direct", n) for n in (8, 64, 4096)] == [(1, 64), (1, 64), (8, 1024)]
    assert [tuning.move_triton_launch("staged", n) for n in (8, 4096)] == [(1, 16, 16), (4, 16, 32)]


def test_report_without_a_sweep_is_the_plain_table():
    from mlakv.bench.move_kv import format_report

    text = format_report({"device": "GPU", "layers": 2, "slots": 64, "rows": [{"n": 8, "torch": 2.0, "staged": 1.0,
                                                                                "direct": 1.0}]})  # fmt: skip
    assert "| 8 | 2.0 | 1.0 | 1.0 | 2.00x | 2.00x |" in text
    assert "sweep" not in text and "MOVE_TRITON_STEPS" not in text


def test_cli_parses_the_sweep_and_refuses_moves_larger_than_the_buffers(capsys, tmp_path):
    from mlakv.bench.move_kv import main
    from mlakv.bench.options import move_kv_parser

    args = move_kv_parser().parse_args(["--sweep", "--n", "8", "4096", "--layers", "4", "--out", str(tmp_path / "o")])
    assert args.sweep and args.n == [8, 4096] and args.layers == 4 and args.out == tmp_path / "o"
    defaults = move_kv_parser().parse_args([])
    assert not defaults.sweep and defaults.out is None and defaults.n == [8, 64, 512, 4096] and defaults.slots == 65536
    with pytest.raises(SystemExit) as e:
        main(["--slots", "100", "--n", "8", "50"])
    assert e.value.code == 2 and "--n 50" in capsys.readouterr().err
    if HAS_CUDA:
        pytest.skip("the CPU behaviour: on a GPU the bench really runs")
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        main(["--sweep", "--n", "8", "--out", str(tmp_path)])


@pytest.mark.parametrize("out", [True, False], ids=["out", "print"])
def test_an_interrupted_bench_keeps_the_rows_measured(capsys, tmp_path, monkeypatch, out):
    """Ctrl-C (or SIGTERM, which the entry point turns into the same) after one eager row and one sweep
    row: both are written (or printed), marked, and the interruption says where."""
    from mlakv.bench import move_kv as bench

    def two_rows_then_ctrl_c(layers, slots, sizes, sweep, res):
        res["rows"].append({"n": 8, "torch": 2.0, "staged": 1.0, "direct": 1.0})
        res["sweep"] = [_sweep_row("direct", 8, (4, 1024), table=3.0, direct_w1_b64=2.0)]
        raise KeyboardInterrupt

    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench.torch.cuda, "get_device_name", lambda *a: "GPU")
    monkeypatch.setattr(bench, "_measure", two_rows_then_ctrl_c)
    argv = ["--sweep", "--n", "8", "64"] + (["--out", str(tmp_path)] if out else [])
    with pytest.raises(KeyboardInterrupt, match="2 rows measured so far, " + ("in " if out else "printed above")):
        bench.main(argv)
    text = (tmp_path / "move_kv.md").read_text() if out else capsys.readouterr().out
    assert "| 8 | 2.0 | 1.0 | 1.0 | 2.00x | 2.00x |" in text and "| direct w1 b64 | 2.00 |" in text
    assert "INTERRUPTED" in text
    if out:
        assert json.loads((tmp_path / "move_kv.json").read_text())["interrupted"] is True


def test_a_bench_interrupted_before_any_row_writes_nothing(tmp_path, monkeypatch):
    from mlakv.bench import move_kv as bench

    def ctrl_c(layers, slots, sizes, sweep, res):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench.torch.cuda, "get_device_name", lambda *a: "GPU")
    monkeypatch.setattr(bench, "_measure", ctrl_c)
    with pytest.raises(KeyboardInterrupt, match="^$"):
        bench.main(["--out", str(tmp_path)])
    assert not (tmp_path / "move_kv.json").exists()
