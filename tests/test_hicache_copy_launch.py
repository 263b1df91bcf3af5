"""HiCache's copy kernel at every launch shape of its table and of the bench's sweep.

The copy (:mod:`mlakv.kernels.triton.transfer`) moves units (a token row, or a whole page) between two
paged layouts with a persistent grid of at most ``max_programs`` programs, each moving a tile of
``tile_words`` words per loop iteration with ``num_warps`` warps; both come from
:func:`mlakv.spec.tuning.hicache_copy_launch` (by the bytes a launch moves) unless the launcher's
overrides force them. The edges are a shape's: units longer than the tile (a unit loops over
blocks), many units per tile with a partial last tile, fewer programs than tiles, and units the kernel
must skip (a negative slot, a slot at its limit, a page start off its page) next to kept ones. Every
destination is poisoned first and compared with indexing.

On CPU the kernel runs under the Triton interpreter (which ignores warps) on CPU tensors; a CPU test
compiles it for sm_90 at every shape. Also here: the table lookup, the launcher's use of the table and
its overrides, and ``mlakv bench hicache --sweep``: its shapes reach the kernel through the host
pool's own calls, every shape's round trip is checked first (on CPU the host pool is put on the
kernel path, so the interpreter runs the real sweep at a few pages), WRONG shapes are not timed, and
the report of the fastest shape per page count and the table rows they make (made-up rates).
"""

from __future__ import annotations

import ast
import json

import pytest
import torch

from conftest import DEVICE, HAS_CUDA, compile_in_subprocess
from mlakv.spec import tuning
from mlakv.spec.tuning import HICACHE_COPY_STEPS, HICACHE_COPY_SWEEP, hicache_copy_launch

pytest.importorskip("triton", reason="triton is not installed")

#: every launch shape (num_warps, tile words) of the table and of the sweep
SHAPES = sorted({s[1:] for s in HICACHE_COPY_STEPS} | set(HICACHE_COPY_SWEEP))


def _id(shape) -> str:
    return f"w{shape[0]}t{shape[1]}"


# ---- the launch table ------------------------------------------------------------------------------


def test_launch_table_covers_every_size_with_power_of_two_tiles():
    steps = HICACHE_COPY_STEPS
    assert steps and steps[-1][0] is None
    bounds = [s[0] for s in steps[:-1]]
    assert bounds == sorted(set(bounds)) and all(b >= 1 for b in bounds)
    for i, (max_bytes, warps, tile) in enumerate(steps):
        for nbytes in ([max_bytes, max(1, max_bytes - 1)] if max_bytes is not None else [1 << 30, 1 << 40]):
            if i == 0 or nbytes > steps[i - 1][0]:
                assert hicache_copy_launch(nbytes) == (warps, tile)
    for warps, tile in SHAPES:
        assert warps in (1, 2, 4, 8, 16, 32) and tile >= 1 and tile & (tile - 1) == 0


def test_table_names_are_public_and_the_rows_name_their_measurement():
    # measured rows name the device, the date and the command that produced them
    assert tuning.HICACHE_COPY_MEASURED.startswith("NVIDIA ") and "UTC" in tuning.HICACHE_COPY_MEASURED
    assert "hicache" in tuning.HICACHE_COPY_MEASURED and "--sweep" in tuning.HICACHE_COPY_MEASURED
    assert all(step[1:] in HICACHE_COPY_SWEEP for step in HICACHE_COPY_STEPS)
    for name in ("HICACHE_COPY_STEPS", "HICACHE_COPY_MEASURED", "HICACHE_COPY_SWEEP", "hicache_copy_launch"):
        assert name in tuning.__all__


def test_sweep_shapes_are_distinct_hold_the_old_launch_and_keep_8_to_32_words_a_thread():
    assert len(set(HICACHE_COPY_SWEEP)) == len(HICACHE_COPY_SWEEP) >= 8
    assert (16, 8192) in HICACHE_COPY_SWEEP
    assert all(8 <= tile // (32 * warps) <= 32 for warps, tile in HICACHE_COPY_SWEEP)


def test_lookup_takes_the_first_row_whose_bound_holds(monkeypatch):
    monkeypatch.setattr(tuning, "HICACHE_COPY_STEPS", ((1 << 20, 4, 2048), (1 << 26, 8, 8192), (None, 32, 16384)))
    assert [tuning.hicache_copy_launch(b) for b in (0, 1, 1 << 20, (1 << 20) + 1, 1 << 26, (1 << 26) + 1)] == [
        (4, 2048), (4, 2048), (4, 2048), (8, 8192), (8, 8192), (32, 16384),
    ]  # fmt: skip
    monkeypatch.setattr(tuning, "HICACHE_COPY_STEPS", ((64, 1, 64),))
    with pytest.raises(AssertionError, match="max bytes None"):
        tuning.hicache_copy_launch(65)


class _Recorder:
    """Stands in for the jitted copy: records the grid and the launch keywords of each launch."""

    def __init__(self):
        self.launches: list[tuple[tuple, dict]] = []

    def __getitem__(self, grid):
        return lambda *args, **kw: self.launches.append((grid, kw))


def _launches(monkeypatch, n: int, unit_bytes: int, **kw) -> list[tuple]:
    """``(grid, num_warps, ROWS, BLOCK, UNIT)`` of each launch copying ``n`` units (recorded, not run)."""
    from mlakv.kernels.triton import transfer as m

    rec = _Recorder()
    monkeypatch.setattr(m, "_copy_units_kernel", rec)
    buf = torch.zeros(max(n, 1) * unit_bytes, dtype=torch.uint8)
    idx = torch.arange(n)
    layout = (1, unit_bytes, unit_bytes)
    m.launch_copy_rows(buf, buf.clone(), idx, idx, unit_bytes, layout, layout, **kw)
    return [(grid, k["num_warps"], k["ROWS"], k["BLOCK"], k["UNIT"]) for grid, k in rec.launches]


def test_launch_before_the_table_is_one_row_of_it(monkeypatch):
    """The launch the kernel had hard-coded before the table (16 warps, tiles of 8192 words, grid
    min(8, tiles)) is what a row of that shape gives: the table changed only the shape."""
    monkeypatch.setattr(tuning, "HICACHE_COPY_STEPS", ((None, 16, 8192),))
    # 1152-byte rows: 144 words, blocks of 256, 32 rows a tile; 64-row pages: 9216 words, one 8192-word block
    assert _launches(monkeypatch, 100, 1152) == [((4,), 16, 32, 256, 144)]
    assert _launches(monkeypatch, 4096, 1152) == [((8,), 16, 32, 256, 144)]
    assert _launches(monkeypatch, 5, 64 * 1152) == [((5,), 16, 1, 8192, 9216)]
    assert _launches(monkeypatch, 100, 1152, max_programs=2) == [((2,), 16, 32, 256, 144)]
    assert _launches(monkeypatch, 0, 1152) == []


def test_launcher_takes_the_table_by_bytes_and_the_overrides(monkeypatch):
    monkeypatch.setattr(tuning, "HICACHE_COPY_STEPS", ((100 * 1152, 4, 2048), (None, 32, 32768)))
    assert _launches(monkeypatch, 40, 1152) == [((5,), 4, 8, 256, 144)]  # 5 tiles of 8 rows
    assert _launches(monkeypatch, 100, 1152) == [((8,), 4, 8, 256, 144)]  # 115200 bytes: still the first row
    assert _launches(monkeypatch, 101, 1152) == [((1,), 32, 128, 256, 144)]
    assert _launches(monkeypatch, 101, 1152, num_warps=8) == [((1,), 8, 128, 256, 144)]
    assert _launches(monkeypatch, 101, 1152, tile_words=1024) == [((8,), 32, 4, 256, 144)]
    assert _launches(monkeypatch, 5, 64 * 1152, num_warps=2, tile_words=4096) == [((5,), 2, 1, 4096, 9216)]
    assert _launches(monkeypatch, 5, 64 * 1152, tile_words=32768) == [((3,), 32, 2, 16384, 9216)]


@pytest.mark.parametrize("tile", [3, 6144, -2048])
def test_tile_words_must_be_a_power_of_two(tile):
    from mlakv.kernels.triton.transfer import launch_copy_rows

    src = torch.zeros(8 * 64, dtype=torch.uint8, device=DEVICE)
    idx = torch.arange(4, device=DEVICE)
    with pytest.raises(ValueError, match="tile_words must be a power of two"):
        launch_copy_rows(src, src.clone(), idx, idx, 64, (1, 64, 64), (1, 64, 64), tile_words=tile)


# ---- bit-exact at every shape ------------------------------------------------------------------------


def _copy_and_check(shape, unit_rows: int, row_bytes: int, n: int, max_programs: int, seed: int) -> None:
    """``n`` units of ``unit_rows`` rows from a device-like ``[slots, row]`` buffer into a host-like paged
    ``[pages, layers, page, row]`` buffer's layer 1 (both fresh random bytes, so the destination is
    poisoned); some units are invalid (negative, at the limit, off their page) and must be skipped."""
    from mlakv.kernels.triton.transfer import launch_copy_rows

    g = torch.Generator().manual_seed(seed)
    page, layers, layer = 4 * unit_rows, 3, 1
    src_slots, pages = n * unit_rows + 2 * page, n + 2
    src = torch.randint(0, 256, (src_slots, row_bytes), dtype=torch.uint8, generator=g)
    dst = torch.randint(0, 256, (pages, layers, page, row_bytes), dtype=torch.uint8, generator=g)
    expected = dst.clone()
    src_idx = torch.randperm(src_slots // unit_rows, generator=g)[:n] * unit_rows
    dst_idx = torch.randperm(pages * page // unit_rows, generator=g)[:n] * unit_rows
    src_idx[1::5] = -unit_rows  # negative
    dst_idx[2::7] = pages * page  # at the destination's limit
    if unit_rows > 1:
        src_idx[3::6] += 1  # a page unit off its page start
    for s, d in zip(src_idx.tolist(), dst_idx.tolist()):
        if 0 <= s < src_slots and s % unit_rows == 0 and 0 <= d < pages * page:
            for j in range(unit_rows):
                expected[(d + j) // page, layer, (d + j) % page] = src[s + j]
    dst_dev = dst.to(DEVICE)
    launch_copy_rows(
        src.to(DEVICE).view(-1), dst_dev.view(-1)[layer * page * row_bytes :], src_idx.to(DEVICE), dst_idx.to(DEVICE),
        unit_rows * row_bytes, (1, row_bytes, row_bytes), (page, layers * page * row_bytes, row_bytes),
        max_programs=max_programs, src_limit=src_slots, src_align=unit_rows, dst_limit=pages * page,
        dst_align=unit_rows, num_warps=shape[0], tile_words=shape[1],
    )  # fmt: skip
    if HAS_CUDA:
        torch.cuda.synchronize()
    got = dst_dev.cpu()
    if not torch.equal(got, expected):
        bad = (got != expected).reshape(-1, row_bytes).any(dim=1).nonzero().flatten()
        raise AssertionError(f"{bad.numel()} rows differ, first (flat) rows {bad[:8].tolist()}")


@pytest.mark.parametrize(
    "unit_rows,row_bytes,n",
    [(1, 1152, 70), (1, 6, 40), (16, 1152, 5), (2, 656, 9), (40, 1152, 3), (48, 1152, 3), (32, 1024, 3)],
    ids=["rows1152", "rows6", "pages16x1152", "pages2x656", "pages40x1152", "pages48x1152", "pages32x1024"],
)
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_every_shape_copies_the_reference_bytes(shape, unit_rows, row_bytes, n):
    """Row units (8-byte and 2-byte words; many a tile) and page units longer than a tile, so a unit
    moves a tile at a time, its last whole tile loaded together with the remainder after it. In
    2048-word tiles: 18 KiB (one tile and a remainder), 45 KiB (two and a remainder), 54 KiB (three and
    a remainder; one and a remainder in 4096-word tiles), 32 KiB (two whole tiles, no remainder).
    Three programs for more tiles than that, and the grid's default bound."""
    for i, max_programs in enumerate((3, 8)):
        _copy_and_check(shape, unit_rows, row_bytes, n, max_programs, seed=shape[1] + 7 * n + i)


# ---- compiled for sm_90 at every shape (CPU: no GPU needed) --------------------------------------

_COMPILE_SCRIPT = r"""
import json, sys
from mlakv.kernels.triton import transfer as m
from mlakv.testing.sm90 import compile_sm90

ptrs = dict(src_ptr="*i64", dst_ptr="*i64", src_idx_ptr="*i64", dst_idx_ptr="*i64", smid_ptr="*i32")
ints = dict(n_units=16384, src_idx_stride=64, dst_idx_stride=64, src_limit=1 << 20, dst_limit=1 << 20,
            src_align=64, dst_align=64, src_words=1 << 28, dst_words=1 << 28, src_page=64, src_page_stride=9216,
            src_row_stride=9216, dst_page=64, dst_page_stride=18432, dst_row_stride=9216)
out = []
for warps, tile in json.loads(sys.argv[1]):
    sizes = []
    for unit in (144, 9216):  # a 1152-byte row and a 64-row page of them, in 8-byte words
        rows, block = m.tile_shape(unit, tile)
        consts = dict(UNIT=unit, BLOCK=block, ROWS=rows, RECORD_SMID=False, ALIGN=2)
        sizes.append(len(compile_sm90(m._copy_units_kernel, ptrs, ints, consts, num_warps=warps).asm.get("cubin", b"")))
    out.append([warps, tile, min(sizes)])
print(json.dumps(out))
"""


def test_every_shape_compiles_for_sm90():
    """The sweep's and the table's shapes build, for row units and page units: each assembles to a cubin for sm_90."""
    pytest.importorskip("triton.backends.nvidia", reason="triton's CUDA backend is not installed")
    compiled = compile_in_subprocess(_COMPILE_SCRIPT, [list(s) for s in SHAPES])
    assert [(w, t) for w, t, _ in compiled] == SHAPES
    assert all(size > 0 for _, _, size in compiled)


# ---- mlakv bench hicache --sweep ----------------------------------------------------------------------


def _pool(pages: int = 2, page_size: int = 4, layers: int = 2):
    from mlakv.mem_cache import MLATokenToKVPool

    return MLATokenToKVPool(pages * page_size, page_size, torch.bfloat16, 512, 64, layers, torch.device(DEVICE))


@pytest.fixture
def kernel_path(monkeypatch):
    """On CPU, put the host pool on the kernel path (the Triton copy under the interpreter), as on a GPU;
    record the launch shape of every copy it launches."""
    from mlakv.kernels.triton import transfer
    from mlakv.mem_cache import host_pool

    if not HAS_CUDA:
        monkeypatch.setattr(host_pool, "_kernel_path", lambda device, io_backend, pinned: True)
    shapes: list[tuple[int, int]] = []
    real = transfer.launch_copy_rows

    def spy(*args, **kw):
        unit_bytes = args[4]
        shapes.append(tuning.hicache_copy_launch(args[2].shape[0] * unit_bytes))
        real(*args, **kw)

    monkeypatch.setattr(transfer, "launch_copy_rows", spy)
    return shapes


def test_forced_launch_reaches_the_kernel_and_is_undone(kernel_path):
    from mlakv.bench.hicache import forced_copy_launch

    seed = tuning.hicache_copy_launch(1 << 20)
    with forced_copy_launch(4, 2048):
        assert tuning.hicache_copy_launch(1 << 20) == (4, 2048)
    assert tuning.hicache_copy_launch(1 << 20) == seed
    with pytest.raises(RuntimeError), forced_copy_launch(8, 4096):
        raise RuntimeError("a failing shape")
    assert tuning.hicache_copy_launch(1 << 20) == seed


@pytest.mark.parametrize("layout", ["layer_first", "page_first", "page_first_direct"])
def test_sweep_checks_and_times_every_shape_through_the_host_pool(kernel_path, layout):
    """Every shape (and the table's) goes through the host pool's own backup and per-layer loads, round
    trip checked bit-exact; the made-up clock is read twice per shape (backup, load)."""
    from mlakv.bench.hicache import shape_name, sweep_host_layout

    pool = _pool()
    clock = []

    def time_s(fn, device):
        clock.append(fn)
        return 0.5

    got = dict(sweep_host_layout(pool, 2, layout, torch.device(DEVICE), 2, time_s=time_s))
    assert list(got) == ["table", *(shape_name(s) for s in HICACHE_COPY_SWEEP)]
    nbytes = 2 * 4 * pool.row_bytes() * 2
    assert all(v == (nbytes / 0.5 / 1e9, nbytes / 0.5 / 1e9) for v in got.values())
    assert len(clock) == 2 * len(got)
    # each shape's copies ran at that shape: the table's, then the sweep's in order
    launched = list(dict.fromkeys(kernel_path))
    assert launched == [HICACHE_COPY_STEPS[0][1:], *(s for s in HICACHE_COPY_SWEEP if s != HICACHE_COPY_STEPS[0][1:])]


def test_sweep_reports_a_wrong_shape_and_does_not_time_it(kernel_path, monkeypatch):
    from mlakv.bench.hicache import sweep_host_layout
    from mlakv.kernels.triton import transfer

    spy = transfer.launch_copy_rows

    def copies_nothing_at_4_warps(*args, **kw):
        if tuning.hicache_copy_launch(1)[0] != 4:
            spy(*args, **kw)

    pool = _pool()
    monkeypatch.setattr(transfer, "launch_copy_rows", copies_nothing_at_4_warps)
    timed = []
    got = dict(sweep_host_layout(pool, 2, "layer_first", torch.device(DEVICE), 8, shapes=[(4, 2048), (8, 4096)],
                                 time_s=lambda fn, device: timed.append(fn) or 1.0))  # fmt: skip
    assert got["w4 t2048"] == "WRONG"
    assert got["table"] != "WRONG" and got["w8 t4096"] != "WRONG"
    assert len(timed) == 4  # the table's shape and w8 t4096, a backup and a load each


def _sweep_rows(pages: int, launch_bytes: int, layouts: int, **rates) -> list[dict]:
    """Made-up sweep rows: ``name=(backup GB/s, load GB/s)`` or ``"WRONG"`` for each of ``layouts`` layouts."""
    rows = []
    for i in range(layouts):
        for name, r in rates.items():
            row = {"pages": pages, "layout": f"lay{i}", "sms": 8, "shape": name.replace("_", " "),
                   "bytes": 2 * launch_bytes, "launch_bytes": launch_bytes}  # fmt: skip
            rows.append(dict(row, status="WRONG") if r == "WRONG" else dict(row, backup_gbs=r[0], load_gbs=r[1]))
    return rows


def test_report_names_the_fastest_shape_per_page_count_and_the_table_rows(monkeypatch):
    from mlakv.bench.hicache import fastest_shapes

    monkeypatch.setattr(tuning, "HICACHE_COPY_STEPS", ((None, 16, 8192),))
    rows = _sweep_rows(16384, 16384 * 73728, 2, table=(40.0, 40.0), w16_t8192=(40.0, 40.0), w8_t4096=(50.0, 30.0),
                       w32_t16384=(45.0, 45.0))  # fmt: skip
    rows += _sweep_rows(1024, 1024 * 73728, 2, table=(30.0, 30.0), w16_t8192=(30.0, 30.0), w8_t4096=(40.0, 40.0),
                        w32_t16384="WRONG")  # fmt: skip
    lines = fastest_shapes(rows)
    assert lines[1] == "Fastest launch shape per page count (`--sweep`; bytes over the time of a backup and a load):"
    # 1024 pages: w8 t4096; 16384 pages: w32 t16384 (45 both ways beats 50 / 30: 37.5 GB/s over the pair)
    assert "- 1024 pages (72.0 MiB a launch): w8 t4096: 40.0 GB/s over 2 backups and loads (the table's w16 t8192: 30.0 GB/s)" in lines
    assert "- 16384 pages (1152.0 MiB a launch): w32 t16384: 45.0 GB/s over 2 backups and loads (the table's w16 t8192: 40.0 GB/s)" in lines
    printed = lines[-1]
    assert printed == f"HICACHE_COPY_STEPS = (({1024 * 73728}, 8, 4096), (None, 32, 16384))"
    monkeypatch.setattr(tuning, "HICACHE_COPY_STEPS", ast.literal_eval(printed.split(" = ", 1)[1]))
    assert tuning.hicache_copy_launch(1024 * 73728) == (8, 4096)
    assert tuning.hicache_copy_launch(16384 * 73728) == (32, 16384)
    assert fastest_shapes([]) == []
    assert fastest_shapes(_sweep_rows(64, 4096, 1, table=(1.0, 1.0))) == []  # nothing swept beside the table


def test_cli_sweep_on_this_device(capsys, tmp_path):
    """``mlakv bench hicache --sweep --out``: on CPU the copies are torch's, so nothing is swept and the
    output says so; the usual table is printed and written (hicache.md, hicache.json)."""
    from conftest import run_cli

    rc, out, err = run_cli(["bench", "hicache", "--pages", "2", "--layers", "1", "--page-size", "4", "--sweep",
                            "--layouts", "layer_first", "--out", str(tmp_path)], capsys)  # fmt: skip
    assert rc == 0, out + err
    res = json.loads((tmp_path / "hicache.json").read_text())
    md = (tmp_path / "hicache.md").read_text()
    assert md.strip() == out.strip()
    if HAS_CUDA:
        assert "| 2 | layer_first | 8 | table |" in out and "HICACHE_COPY_STEPS = " in out
        assert len(res["sweep"]) == 1 + len(HICACHE_COPY_SWEEP)
    else:
        assert "nothing swept" in out and res["sweep"] == []
        assert [r["layout"] for r in res["rows"]] == ["layer_first"] and "backup_gbs" in res["rows"][0]
