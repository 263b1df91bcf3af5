"""The Triton indexer K store at every launch shape of its table and of the bench's sweep.

The store quantizes ``K`` keys per program as one ``[K, 128]`` block (``rows_per_program``, from
:func:`mlakv.spec.tuning.indexer_triton_launch` unless overridden), so the edges are a program's: a
call whose ``n`` is not a multiple of ``K`` (the last program's extra rows store nothing), padding
(``loc < 0``), the skip slot and slots past the pages next to kept keys in one program. Every
destination is poisoned first and compared byte for byte with
:func:`mlakv.ops.indexer_reference.store_index_k_reference` on the CPU.

On CPU the kernel runs under the Triton interpreter (which ignores warps, so every shape is run at a
few keys); on a GPU every shape runs compiled at a few thousand keys. A CPU test compiles the store
for sm_90 at every shape of the sweep and the table. Also here: the table lookup, the launcher's use
of the table and its overrides, and the bench's ``--triton-sweep`` (its providers, the report of the
fastest shape per n and the table rows they make, from made-up timings).
"""

from __future__ import annotations

import ast
import math

import pytest
import torch

from conftest import (
    DEVICE, HAS_CUDA, assert_pages_equal, compile_in_subprocess, e4m3_pair_repacks, requires_cuda, stale_e4m3_merges,
)  # fmt: skip
from mlakv.ops.indexer_reference import INDEX_PAGE_BYTES, store_index_k_reference
from mlakv.spec import tuning
from mlakv.spec.calls import IndexStoreCall
from mlakv.spec.tuning import INDEXER_TRITON_STEPS, INDEXER_TRITON_SWEEP, indexer_triton_launch

pytest.importorskip("triton", reason="triton is not installed")

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter multiplies NaN and inf keys

#: every launch shape (num_warps, keys per program) of the table and of the sweep
SHAPES = sorted({(w, k) for _, w, k in INDEXER_TRITON_STEPS} | set(INDEXER_TRITON_SWEEP))


def _ids(shape) -> str:
    return f"w{shape[0]}k{shape[1]}"


def _keys(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random keys, each row its own magnitude in [1e-3, 1e3]; from 8 keys some rows hold a zero
    row, a NaN, an infinity and the largest bf16, next to finite rows of the same program."""
    g = torch.Generator().manual_seed(seed)
    mag = torch.exp(torch.empty(n, 1).uniform_(math.log(1e-3), math.log(1e3), generator=g))
    keys = torch.randn(n, 128, generator=g) * mag
    if n >= 8:
        keys[1] = 0
        keys[2, 3] = float("nan")
        keys[3, 4] = float("inf")
        keys[5, 6] = 3.3895313892515355e38 if dtype == torch.bfloat16 else 65504.0
    return keys.to(dtype).to(DEVICE)


def _pages(num_pages: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (num_pages, INDEX_PAGE_BYTES), dtype=torch.uint8, generator=g).to(DEVICE)


def _store_and_check(pages, loc, keys, shape, **call_kw) -> None:
    from mlakv.kernels.triton.indexer import launch_store_index_k

    want = pages.cpu().clone()
    store_index_k_reference(IndexStoreCall(want, loc.cpu(), keys.cpu(), **call_kw))
    launch_store_index_k(IndexStoreCall(pages, loc, keys, **call_kw), num_warps=shape[0], rows_per_program=shape[1])
    if HAS_CUDA:
        torch.cuda.synchronize()
    assert_pages_equal(pages, want)


def _sizes(per_program: int) -> list[int]:
    """Key counts: one key, one full program, and (the last) a count that is no multiple of ``per_program``."""
    return [1, per_program, 2 * per_program + 3]


# ---- the launch table ------------------------------------------------------------------------------


def test_launch_table_covers_every_n_with_power_of_two_blocks():
    steps = INDEXER_TRITON_STEPS
    assert steps and steps[-1][0] is None
    bounds = [s[0] for s in steps[:-1]]
    assert bounds == sorted(set(bounds)) and all(b >= 1 for b in bounds)
    for i, (max_n, warps, keys) in enumerate(steps):
        for n in ([max_n, max(1, max_n - 1)] if max_n is not None else [1 << 20, 1 << 26]):
            if i == 0 or n > steps[i - 1][0]:
                assert indexer_triton_launch(n) == (warps, keys)
    for warps, keys in SHAPES:
        assert warps in (1, 2, 4, 8) and keys >= 1 and keys & (keys - 1) == 0
    assert isinstance(tuning.INDEXER_TRITON_MEASURED, str) and tuning.INDEXER_TRITON_MEASURED
    for name in ("INDEXER_TRITON_STEPS", "INDEXER_TRITON_MEASURED", "INDEXER_TRITON_SWEEP", "indexer_triton_launch"):
        assert name in tuning.__all__


def test_sweep_is_every_warp_count_by_every_keys_per_program():
    assert sorted(INDEXER_TRITON_SWEEP) == [(w, k) for w in (1, 2, 4, 8) for k in (4, 8, 16, 32, 64)]
    assert len(set(INDEXER_TRITON_SWEEP)) == len(INDEXER_TRITON_SWEEP)


def test_lookup_takes_the_first_row_whose_bound_holds_n(monkeypatch):
    monkeypatch.setattr(tuning, "INDEXER_TRITON_STEPS", ((64, 1, 4), (4096, 2, 16), (None, 8, 64)))
    assert [tuning.indexer_triton_launch(n) for n in (0, 1, 64, 65, 4096, 4097, 1 << 20)] == [
        (1, 4), (1, 4), (1, 4), (2, 16), (2, 16), (8, 64), (8, 64),
    ]  # fmt: skip
    monkeypatch.setattr(tuning, "INDEXER_TRITON_STEPS", ((64, 1, 4),))
    with pytest.raises(AssertionError, match="max n None"):
        tuning.indexer_triton_launch(65)


class _Recorder:
    """Stands in for the jitted store: records the grid and the launch keywords of each launch."""

    def __init__(self):
        self.launches: list[tuple[tuple, dict]] = []

    def __getitem__(self, grid):
        return lambda *args, **kw: self.launches.append((grid, kw))


def _launch_shapes(monkeypatch, n: int, *, interpret: bool, **overrides) -> list[tuple]:
    from mlakv.kernels.triton import indexer as m

    rec = _Recorder()
    monkeypatch.setattr(m, "_store_kernel", rec)
    monkeypatch.setattr(m, "interpreting", lambda: interpret)
    pages = torch.zeros(n // 64 + 1, INDEX_PAGE_BYTES, dtype=torch.uint8)
    m.launch_store_index_k(IndexStoreCall(pages, torch.arange(n), torch.zeros(n, 128, dtype=torch.bfloat16)), **overrides)
    return [(grid, kw["num_warps"], kw["ROWS"]) for grid, kw in rec.launches]


def test_launcher_takes_the_table_and_the_overrides(monkeypatch):
    from mlakv.kernels.triton.indexer import INTERPRETER_STORE_ROWS

    monkeypatch.setattr(tuning, "INDEXER_TRITON_STEPS", ((64, 1, 8), (None, 8, 32)))
    assert _launch_shapes(monkeypatch, 64, interpret=False) == [((8,), 1, 8)]
    assert _launch_shapes(monkeypatch, 100, interpret=False) == [((4,), 8, 32)]
    assert _launch_shapes(monkeypatch, 100, interpret=False, num_warps=2) == [((4,), 2, 32)]
    assert _launch_shapes(monkeypatch, 100, interpret=False, rows_per_program=4) == [((25,), 8, 4)]
    assert _launch_shapes(monkeypatch, 100, interpret=False, num_warps=1, rows_per_program=64) == [((2,), 1, 64)]
    # under the interpreter the table's keys per program give way to a few (small calls span programs)
    assert _launch_shapes(monkeypatch, 100, interpret=True) == [((-(-100 // INTERPRETER_STORE_ROWS),), 8, INTERPRETER_STORE_ROWS)]
    assert _launch_shapes(monkeypatch, 100, interpret=True, rows_per_program=16) == [((7,), 8, 16)]
    assert _launch_shapes(monkeypatch, 0, interpret=False) == []  # n == 0 launches nothing


@pytest.mark.parametrize("rows", [3, 12, -4])
def test_keys_per_program_must_be_a_power_of_two(rows):
    from mlakv.kernels.triton.indexer import launch_store_index_k

    pages = _pages(2, 0)
    with pytest.raises(ValueError, match="power of two"):
        launch_store_index_k(IndexStoreCall(pages, torch.arange(3, device=DEVICE), _keys(3, torch.bfloat16, 0)),
                             rows_per_program=rows)  # fmt: skip


# ---- bit-exact at every shape ------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["fp32", "ue8m0"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_every_shape_stores_the_reference_bytes(shape, dtype, rule):
    """Random slots with padding (``loc < 0``) mixed in; n of one key, one program, and not a multiple."""
    for i, n in enumerate(_sizes(shape[1])):
        num_pages = n // 64 + 2
        pages = _pages(num_pages, seed=n + i)
        loc = torch.randperm(num_pages * 64, generator=torch.Generator().manual_seed(n))[:n]
        loc[2::3] = -1
        keys = _keys(n, dtype, seed=7 * n + shape[1])
        _store_and_check(pages, loc.to(DEVICE), keys, shape, scale_rule=rule)


@pytest.mark.parametrize("loc_dtype", [torch.int32, torch.int64], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_programs_mixing_kept_and_skipped_keys(shape, loc_dtype):
    """Padding, the skip slot and slots past the pages next to kept keys in one program; the page just
    past the buffer stays as it was."""
    n = _sizes(shape[1])[-1]
    wide = _pages(n // 64 + 3, seed=5)
    pages = wide[:-1]  # a view: the last page lies just past it
    after = wide[-1].clone()
    num_slots = pages.shape[0] * 64
    loc = torch.randperm(num_slots - 1, generator=torch.Generator().manual_seed(5))[:n] + 1
    loc[1::3] = -1
    loc[2::5] = 0  # the skip slot
    loc[4::7] = num_slots + 3
    _store_and_check(pages, loc.to(loc_dtype).to(DEVICE), _keys(n, torch.bfloat16, 6), shape, skip_slot=0)
    assert torch.equal(wide[-1], after)


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_dcp_owner_rule_inside_a_program(shape, rank):
    n = _sizes(shape[1])[-1]
    pages = _pages(n // 64 + 2, seed=9)
    loc = torch.randperm(2 * pages.shape[0] * 64, generator=torch.Generator().manual_seed(9))[:n]
    loc[::5] = -1
    _store_and_check(pages, loc.to(DEVICE), _keys(n, torch.bfloat16, 10), shape, dcp_world_size=2, dcp_rank=rank)


@requires_cuda
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_compiled_shapes_at_thousands_of_keys(shape):
    """On a GPU: each shape compiled, at sizes that span many programs and pages (one a partial program)."""
    for n in (4096, 4100 + shape[1] // 2):
        num_pages = n // 64 + 2
        pages = _pages(num_pages, seed=n)
        loc = torch.randperm(num_pages * 64, generator=torch.Generator().manual_seed(n))[:n]
        loc[3::11] = -1
        _store_and_check(pages, loc.to(DEVICE), _keys(n, torch.bfloat16, n + 1), shape)


# ---- compiled for sm_90 at every shape (CPU: no GPU needed) --------------------------------------

_COMPILE_SCRIPT = r"""
import json, sys
from mlakv.kernels.triton import indexer as m
from mlakv.testing.sm90 import compile_sm90, sass_of

ptrs = dict(pages_ptr="*u8", pages_i32_ptr="*i32", loc_ptr="*i64", src_ptr="*i16")
ints = dict(n_rows=65536, page_stride=8448, loc_stride=1, src_stride=128, num_slots=65600, skip_slot=-1,
            dcp_world=1, dcp_rank=0)
out = []
for warps, rows in json.loads(sys.argv[1]):
    consts = dict(IS_BF16=True, UE8M0=False, HAS_DCP=False, ROWS=rows, USE_PDL=True, NATIVE=True)
    k = compile_sm90(m._store_kernel, ptrs, ints, consts, num_warps=warps)
    out.append([warps, rows, len(k.asm.get("cubin", b"")), k.asm["ptx"], sass_of(k)])
print(json.dumps(out))
"""


def test_every_shape_compiles_for_sm90():
    """The sweep's shapes are the ones that compile: each assembles to a cubin for sm_90."""
    pytest.importorskip("triton.backends.nvidia", reason="triton's CUDA backend is not installed")
    compiled = compile_in_subprocess(_COMPILE_SCRIPT, [list(s) for s in SHAPES])
    assert [(w, k) for w, k, *_ in compiled] == SHAPES
    assert all(size > 0 for _, _, size, *_ in compiled)


def test_native_e4m3_bytes_are_not_repacked_for_ptxas():
    """The store with the hardware e4m3 conversion (sm_89+), at every shape: no converted pair is packed
    with a value computed from itself, the PTX pattern ptxas 12.8/12.9 miscompiles (tests/test_fp8.py)."""
    pytest.importorskip("triton.backends.nvidia", reason="triton's CUDA backend is not installed")
    compiled = compile_in_subprocess(_COMPILE_SCRIPT, [list(s) for s in SHAPES])
    bad = []
    for warps, rows, _, ptx, sass in compiled:
        assert "cvt.rn.satfinite.e4m3x2.f32" in ptx, (warps, rows)
        bad += [f"w{warps}k{rows}: PTX {r}" for r in e4m3_pair_repacks(ptx)]
        bad += [f"w{warps}k{rows}: SASS {r}" for r in stale_e4m3_merges(sass or "")]
    assert not bad, bad


# ---- the bench's --triton-sweep ----------------------------------------------------------------------


def test_bench_sweep_providers_launch_their_shapes(monkeypatch):
    from mlakv.bench import indexer as bench
    from mlakv.kernels.triton import indexer as m

    seen = []
    monkeypatch.setattr(m, "launch_store_index_k", lambda call, **kw: seen.append(kw))

    def no_peer():
        raise RuntimeError("not built here")

    monkeypatch.setattr(bench, "build_sglang_indexer_store", no_peer)
    assert not [k for k in bench._store_providers(False) if k.startswith("triton w")]
    providers = bench._store_providers(False, triton_sweep=True)
    sweep = [k for k in providers if k.startswith("triton w")]
    assert sweep == [f"triton w{w} k{k}" for w, k in INDEXER_TRITON_SWEEP]
    d = dict(pages=_pages(1, 0), loc=torch.arange(2, device=DEVICE), keys=_keys(2, torch.bfloat16, 0))
    for name in sweep:
        providers[name](d)
    assert seen == [dict(num_warps=w, rows_per_program=k) for w, k in INDEXER_TRITON_SWEEP]


def _row(n: int, jit, table, **sweep) -> dict:
    row = {"n": n, "path": "jit", "mlakv": jit, "mlakv of copy bw": 0.5, "mlakv-jit": jit, "mlakv-triton": table}
    for name, us in sweep.items():
        row[name.replace("_", " ")] = us
        if isinstance(us, float):
            row[name.replace("_", " ") + " of copy bw"] = 0.4
    return row


def test_report_names_the_fastest_shape_and_the_table_rows(monkeypatch):
    from mlakv.bench.indexer import format_tables

    rows = [
        _row(1, 0.9, 1.0, triton_w1_k4=0.8, triton_w4_k16=0.95, triton_w8_k64="WRONG"),
        _row(64, 1.0, 1.1, triton_w1_k4=0.9, triton_w4_k16=1.2, triton_w8_k64=2.0),
        _row(16384, 3.0, 5.1, triton_w1_k4=6.0, triton_w4_k16=5.1, triton_w8_k64=3.3),
        _row(65536, 9.3, 12.9, triton_w1_k4=20.0, triton_w4_k16=12.9, triton_w8_k64=9.9),
    ]
    res = {"device": "NVIDIA H200", "copy_gbs": 4200.0, "store": rows,
           "gather": [{"n": 1, "mlakv": 1.0, "mlakv-triton": 1.1}]}  # fmt: skip
    text = format_tables(res)
    lines = text.splitlines()
    assert "- n=1: triton w1 k4: 0.80 µs (0.89x mlakv-jit's 0.90; 0.80x mlakv-triton's 1.00)" in lines
    assert "- n=64: triton w1 k4: 0.90 µs (0.90x mlakv-jit's 1.00; 0.82x mlakv-triton's 1.10)" in lines
    assert "- n=16384: triton w8 k64: 3.30 µs (1.10x mlakv-jit's 3.00; 0.65x mlakv-triton's 5.10)" in lines
    assert "- n=65536: triton w8 k64: 9.90 µs (1.06x mlakv-jit's 9.30; 0.77x mlakv-triton's 12.90)" in lines
    assert "INDEXER_TRITON_STEPS = ((64, 1, 4), (None, 8, 64))" in lines
    assert lines.index("Fastest Triton launch shape (`--triton-sweep`):") < lines.index(
        "| n | gather mlakv µs | of copy bw | gather triton µs | of copy bw |"
    )
    assert any(ln.startswith("| 1 | jit |") and "WRONG" in ln for ln in lines)  # the wrong shape: in the table, not timed
    # the printed rows, pasted into the table, give each measured n its fastest shape
    printed = next(ln for ln in lines if ln.startswith("INDEXER_TRITON_STEPS = "))
    monkeypatch.setattr(tuning, "INDEXER_TRITON_STEPS", ast.literal_eval(printed.split(" = ", 1)[1]))
    assert [tuning.indexer_triton_launch(n) for n in (1, 64, 16384, 65536)] == [(1, 4), (1, 4), (8, 64), (8, 64)]


def test_report_merges_equal_neighbours_and_sorts_sizes():
    from mlakv.bench.indexer import format_tables

    rows = [
        _row(4096, 2.0, 2.5, triton_w4_k16=2.4, triton_w2_k32=2.2),
        _row(1, 0.9, 1.0, triton_w4_k16=0.8, triton_w2_k32=0.85),
        _row(64, 1.0, 1.0, triton_w4_k16=0.9, triton_w2_k32=1.0),
        _row(4096, 2.0, 2.5, triton_w4_k16=2.3, triton_w2_k32=2.25),  # a size given twice: its fastest time
    ]
    text = format_tables({"device": "GPU", "copy_gbs": 4000.0, "store": rows, "gather": []})
    assert "INDEXER_TRITON_STEPS = ((64, 4, 16), (None, 2, 32))" in text
    assert "- n=4096: triton w2 k32: 2.20 µs" in text
    assert text.index("- n=1:") < text.index("- n=64:") < text.index("- n=4096:")


def test_report_without_a_sweep_has_no_fastest_section():
    from mlakv.bench.indexer import format_tables

    res = {"device": "GPU", "copy_gbs": 4000.0, "store": [_row(8, 1.0, 1.1)], "gather": []}
    text = format_tables(res)
    assert "Fastest Triton" not in text and "INDEXER_TRITON_STEPS" not in text


def test_cli_takes_the_triton_sweep(capsys, tmp_path):
    from mlakv.bench.indexer import main

    if HAS_CUDA:
        pytest.skip("the CPU behaviour: on a GPU the bench really runs")
    assert main(["--sizes", "8", "--triton-sweep", "--out", str(tmp_path)]) == 0
    assert "no CUDA GPU" in capsys.readouterr().out
