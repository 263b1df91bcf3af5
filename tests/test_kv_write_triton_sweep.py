"""``mlakv bench --triton-sweep``: the Triton row kernel timed at every launch shape.

On CPU: the bookkeeping (the ``TRITON_ROW_STEPS`` rows made from fake timings, ties, wrong shapes
left untimed, the report's section, the flag), and every swept shape's write checked bit-exactly
against the loop reference under the Triton interpreter. On a GPU: a small real sweep.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import (
    DEVICE,
    HAS_CUDA,
    assert_bits_equal,
    poisoned_buffer,
    random_loc,
    random_rows,
    reference_write,
    requires_cuda,
    requires_triton,
)
from mlakv.bench import kv_write as K
from mlakv.bench.options import kv_write_parser, parser_for
from mlakv.spec import tuning

SHAPES = K.triton_sweep_shapes()


# ---- the shapes and their keys ----------------------------------------------------------------
def test_the_sweep_covers_warps_rows_and_both_trigger_places():
    assert len(SHAPES) == 32 and len(set(SHAPES)) == 32
    assert {w for w, _, _ in SHAPES} == {1, 2, 4, 8}
    assert {r for _, r, _ in SHAPES} == {1, 2, 4, 8}
    assert {e for _, _, e in SHAPES} == {True, False}
    assert SHAPES[0] == (1, 1, True)  # the tie-break order: fewest warps, fewest rows, entry trigger


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: K._shape_key(*s))
def test_shape_keys_read_back(shape):
    assert K._parse_shape_key(K._shape_key(*shape)) == shape


@pytest.mark.parametrize("layout", list(K.LAYOUTS))
def test_the_table_choice_is_one_of_the_swept_shapes(layout):
    """Every shape the current table names is timed in the grid itself (no extra launch needed)."""
    block = K._block_bytes(K.LAYOUTS[layout])
    for n in (1, 8, 256, 257, 768, 1024, 4096, 4097, 65536):
        assert tuning.triton_row_launch(n, block) in SHAPES


@requires_triton
@pytest.mark.parametrize("layout", list(K.LAYOUTS))
def test_block_bytes_is_the_kernels_block(layout):
    from mlakv.kernels.triton.row_write import row_kernel_block

    dtype, nd, rd = K.LAYOUTS[layout]
    assert K._block_bytes(K.LAYOUTS[layout]) == row_kernel_block(nd, rd) * torch.empty((), dtype=dtype).element_size()


# ---- the fastest shape, ties, the table rows ---------------------------------------------------
def test_fastest_order_is_by_time_with_ties_to_the_previous_winner_then_the_sweep_order():
    times = {"w8r1e": 1.004, "w2r1e": 1.001, "w4r2l": 0.9, "w1r1l": 1.3}
    assert K._fastest_order(times, None) == ["w4r2l", "w2r1e", "w8r1e", "w1r1l"]
    tied = {"w8r1e": 1.004, "w2r1e": 1.001, "w1r1l": 1.3}  # equal at 0.01 us: one result to the reader
    assert K._fastest_order(tied, None)[0] == "w2r1e"
    assert K._fastest_order(tied, "w8r1e")[0] == "w8r1e"
    assert K._fastest_order({"w8r1e": 1.2, "w2r1e": 1.0}, "w8r1e")[0] == "w2r1e"  # no tie: time decides


def test_table_rows_merge_equal_neighbours_and_leave_the_last_open():
    best = [(1, "w8r1e"), (8, "w8r1e"), (64, "w4r1e"), (1024, "w4r2e"), (65536, "w4r2e")]
    assert K._triton_row_steps(best, 2048) == [(8, 256, 2048, True), (64, 512, 2048, True), (None, 512, 4096, True)]
    assert K._triton_row_steps(best, 1024) == [(8, 128, 1024, True), (64, 256, 1024, True), (None, 256, 2048, True)]
    assert K._triton_row_steps([(1, "w1r8l")], 2048) == [(None, 2048, 16384, False)]
    assert K._triton_row_steps([], 2048) == []


@pytest.mark.parametrize("layout", ["bf16", "u8"])
def test_the_rows_read_back_to_the_fastest_shapes(layout, monkeypatch):
    """Put into the table, the rows launch each size's fastest shape (warps via bytes per warp)."""
    block = K._block_bytes(K.LAYOUTS[layout])
    best = [(1, "w1r1e"), (32, "w8r1e"), (1024, "w2r4l"), (4096, "w4r8e"), (65536, "w8r2l")]
    monkeypatch.setattr(tuning, "TRITON_ROW_STEPS", tuple(K._triton_row_steps(best, block)))
    for n, key in best:
        assert tuning.triton_row_launch(n, block) == K._parse_shape_key(key)


# ---- the sweep's bookkeeping with fake writes and fake times -------------------------------------
def _fake_sweep(monkeypatch, times_of: dict, wrong: set):
    """``run_triton_sweep`` on CPU with the reference as every shape's write (``wrong``: shapes that
    write one row short) and ``times_of[key]`` as the times; returns the results and the keys timed."""
    timed = []

    def write(warps, rows, early):
        key = K._shape_key(warps, rows, early)

        def fn(kv, loc, nope, rope):
            n = loc.shape[0] - (1 if key in wrong else 0)
            K.set_mla_kv_buffer_torch(kv, loc[:n], nope[:n], rope[:n])

        fn.key = key
        return fn

    def graph_time(fn, layers):
        timed.append(fn.key)
        return times_of.get(fn.key, 5.0)

    monkeypatch.setattr(K, "_sweep_write", write)
    monkeypatch.setattr(K, "_graph_time_per_call_us", graph_time)
    res = K.run_triton_sweep(["bf16"], [1, 8, 64], device="cpu", layers=1)
    return res, timed


def test_wrong_shapes_are_reported_and_never_timed(monkeypatch):
    res, timed = _fake_sweep(monkeypatch, {"w4r1e": 1.0}, wrong={"w8r8l", "w2r4e"})
    assert res["pdl"] is False
    lay = res["layouts"]["bf16"]
    assert lay["block_bytes"] == 2048
    for n in ("1", "8", "64"):
        point = lay["sizes"][n]
        assert set(point["errors"]) == {"w8r8l", "w2r4e"}
        assert all(e.startswith("WRONG") for e in point["errors"].values())
        assert set(point["times_us"]) == {K._shape_key(*s) for s in SHAPES} - {"w8r8l", "w2r4e"}
        assert point["table"] == K._shape_key(*tuning.triton_row_launch(int(n), 2048))
    assert "w8r8l" not in timed and "w2r4e" not in timed
    assert len(timed) == 3 * 2 * 30  # 3 sizes, two passes (forward, reverse), 30 right shapes
    assert K._triton_sweep_wrong(res)
    json.dumps(res)  # results.json holds it as it is


def test_a_right_sweep_is_not_wrong(monkeypatch):
    res, _ = _fake_sweep(monkeypatch, {}, wrong=set())
    assert not K._triton_sweep_wrong(res)
    assert not K._triton_sweep_wrong(None)


def test_an_interrupted_sweep_keeps_the_points_done(monkeypatch):
    calls = []

    def graph_time(fn, layers):
        calls.append(1)
        if len(calls) > 64:  # the second size's first timing
            raise KeyboardInterrupt
        return 1.0

    monkeypatch.setattr(K, "_sweep_write", lambda w, r, e: K.set_mla_kv_buffer_torch)
    monkeypatch.setattr(K, "_graph_time_per_call_us", graph_time)
    res: dict = {}
    with pytest.raises(KeyboardInterrupt):
        K.run_triton_sweep(["bf16"], [1, 8], into=res, device="cpu", layers=1)
    assert list(res["layouts"]["bf16"]["sizes"]) == ["1"]


# ---- the report's section -----------------------------------------------------------------------
def _point(times: dict, table: str, errors: dict | None = None) -> dict:
    return {"table": table, "times_us": times, "errors": errors or {}}


FAKE = {
    "pdl": True,
    "layouts": {
        "bf16": {
            "block_bytes": 2048,
            "sizes": {
                "1": _point({"w8r1e": 0.70, "w2r1e": 0.75, "w1r1l": 0.9}, "w8r1e"),
                "8": _point({"w8r1e": 0.72, "w2r1e": 0.72, "w1r1l": 0.9}, "w8r1e"),  # a tie: w8r1e stays
                "64": _point({"w4r1e": 0.80, "w8r1e": 0.85}, "w8r1e"),
                "1024": _point(
                    {"w4r2e": 1.50, "w4r1e": 1.60, "w1r1e": 3.0}, "w1r1e", {"w8r8l": "WRONG: 3 rows differ"}
                ),
                "65536": _point({"w4r2e": 30.0, "w2r4e": 30.5}, "w2r4e"),
            },
        },
        "u8": {"block_bytes": 1024, "sizes": {"1": _point({"w2r1l": 0.7}, "w4r1e", {"w4r1e": "WRONG: 1 rows differ"})}},
    },
}


def test_report_section_gives_fastest_runner_up_table_choice_and_rows():
    text = K.format_triton_sweep(FAKE)
    lines = text.splitlines()
    assert "## Triton row kernel launch sweep (`--triton-sweep`)" in lines
    assert "PDL is off" not in text
    assert "### bf16 512+64 (BLOCK 2048 bytes)" in lines
    assert "| 1 | w8r1e | 0.70 | w2r1e | 0.75 | w8r1e | 0.70 | 1.00x | - |" in lines
    assert "| 8 | w8r1e | 0.72 | w2r1e | 0.72 | w8r1e | 0.72 | 1.00x | - |" in lines
    assert "| 64 | w4r1e | 0.80 | w8r1e | 0.85 | w8r1e | 0.85 | 1.06x | - |" in lines
    assert "| 1024 | w4r2e | 1.50 | w4r1e | 1.60 | w1r1e | 3.00 | 2.00x | w8r8l |" in lines
    assert "| 65536 | w4r2e | 30.00 | w2r4e | 30.50 | w2r4e | 30.50 | 1.02x | - |" in lines
    assert "- n_loc=1024 w8r8l: WRONG: 3 rows differ" in lines
    bf16_rows = text.split("for bf16 512+64", 1)[1].split("###", 1)[0]
    assert "bytes per warp = 2048 // warps" in bf16_rows
    assert "((8, 256, 2048, True), (64, 512, 2048, True), (None, 512, 4096, True))" in bf16_rows
    # u8: the table's choice was wrong there, so it shows WRONG instead of a time
    assert "### u8 528+128 (BLOCK 1024 bytes)" in lines
    assert "| 1 | w2r1l | 0.70 | - | - | w4r1e | WRONG | - | w4r1e |" in lines
    assert "((None, 512, 1024, False),)" in text.split("for u8 528+128", 1)[1]


def test_report_section_says_when_pdl_is_off_and_when_every_shape_was_wrong():
    point = _point({}, "w8r1e", {"w8r1e": "WRONG: x"})
    sweep = {"pdl": False, "layouts": {"bf16": {"block_bytes": 2048, "sizes": {"1": point}}}}
    text = K.format_triton_sweep(sweep)
    assert "PDL is off on this device" in text
    assert "| 1 | - | - | - | - | w8r1e | WRONG | - | w8r1e |" in text.splitlines()
    assert "TRITON_ROW_STEPS rows" not in text


def test_report_section_of_a_cpu_run_says_it_did_not_run():
    text = K.format_triton_sweep({"not_run": "needs a CUDA GPU (none here)"})
    assert text.splitlines()[-1] == "not run: needs a CUDA GPU (none here)"


# ---- the command line -------------------------------------------------------------------------
def test_parser_takes_the_flag():
    assert kv_write_parser().parse_args(["--triton-sweep"]).triton_sweep is True
    assert kv_write_parser().parse_args([]).triton_sweep is False
    assert parser_for(["--triton-sweep"]).parse_args(["--triton-sweep", "--layouts", "u8"]).triton_sweep is True


def test_module_docstring_names_the_flag():
    assert "--triton-sweep" in K.__doc__


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU behaviour; a GPU runs the sweep")
def test_cpu_run_reports_the_sweep_as_not_run(tmp_path, capsys):
    rc = K.main(["--triton-sweep", "--sizes", "1", "--providers", "auto,torch", "--out", str(tmp_path)])
    assert rc == 0
    report = (tmp_path / "report.md").read_text()
    assert "## Triton row kernel launch sweep" in report and "not run: needs a CUDA GPU" in report
    assert "needs a CUDA GPU" in json.loads((tmp_path / "results.json").read_text())["triton_sweep"]["not_run"]


# ---- every swept shape writes what the reference writes ----------------------------------------
@requires_triton
@pytest.mark.parametrize("layout,n", [("bf16", 13), ("fp16", 13), ("u8", 13), ("u8", 1)])
def test_every_swept_shape_is_bit_exact(layout, n):
    """Under the interpreter on CPU (or on the GPU): each shape's write into a poisoned buffer from
    random inputs equals the loop reference's; 13 rows leave a part-filled last program at 2, 4 and 8
    rows per program, 1 row a program of one live row."""
    dtype, nd, rd = K.LAYOUTS[layout]
    num_slots = n + 29
    loc = random_loc(n, num_slots, torch.int64)
    nope, rope = random_rows(n, nd, dtype), random_rows(n, rd, dtype)
    for shape in SHAPES:
        kv = poisoned_buffer(num_slots, nd + rd, dtype, three_d=True)
        expected = reference_write(kv, loc, nope, rope)
        K._sweep_write(*shape)(kv, loc, nope, rope)
        if HAS_CUDA:
            torch.cuda.synchronize()
        try:
            assert_bits_equal(kv, expected)
        except AssertionError as e:
            raise AssertionError(f"{K._shape_key(*shape)}: {e}") from None


@requires_triton
def test_the_sweeps_own_check_passes_every_shape():
    inp = K.make_layers(K.LAYOUTS["bf16"], 5, torch.int32, DEVICE, 1)[0]
    fns, errors = K._checked_shapes(inp, SHAPES)
    assert errors == {} and len(fns) == len(SHAPES)


@requires_cuda
def test_gpu_sweep_times_every_shape_and_reports_rows():
    res = K.run_triton_sweep(["bf16", "u8"], [1, 13])
    for lname, lay in res["layouts"].items():
        for n, point in lay["sizes"].items():
            assert point["errors"] == {}, (lname, n)
            assert len(point["times_us"]) == len(SHAPES)
            assert all(t > 0 for t in point["times_us"].values())
            assert point["table"] in point["times_us"]
    text = K.format_triton_sweep(res)
    assert "TRITON_ROW_STEPS rows the fastest shapes make, for bf16" in text
    assert "TRITON_ROW_STEPS rows the fastest shapes make, for u8" in text
