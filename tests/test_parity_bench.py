"""`mlakv bench parity`: Triton against CUDA per kernel family, read out of the family benches' results.

Without a GPU: the verdict rule, the table, and that each family's reader takes the keys its bench
really writes (the benches' run functions replaced by fakes of their result shapes). On an SM90 GPU:
a short real run of the row-write family.
"""

from __future__ import annotations

import pytest
import torch
from conftest import requires_sm90

from mlakv.bench import SUBCOMMANDS, parity
from mlakv.bench.options import PARITY_LIMIT


def _points(ratios: dict[int, object]) -> list[dict]:
    return [parity.entry("fp8 write", "ds_mla", n, 1.0, r) for n, r in ratios.items()]


@pytest.mark.parametrize(
    "ratios, want",
    [
        ({1: 0.9, 64: 1.1, 65536: PARITY_LIMIT}, "met"),
        ({1: 0.9, 64: 1.3, 65536: 1.2}, "MISSED (worst 1.30x at n=64)"),
        ({1: 0.9, 64: "WRONG"}, "no ratio at n=64"),
    ],
)
def test_verdict_takes_the_worst_point_and_refuses_a_point_without_a_time(ratios, want):
    assert parity.verdict(_points(ratios)) == want


def test_no_points_is_no_verdict():
    assert parity.verdict([]) == "no points"


def _result() -> dict:
    pts = _points({1: 0.95, 65536: 1.4})
    pts.append(parity.entry("indexer", "store", 1, "absent", 2.0))
    conv = parity.entry("converting write", "fp32 -> bf16", 65536, 40.0, 60.0)
    conv["bound"] = 50.0
    return {"device": "NVIDIA H200", "sizes": [1, 65536], "date": "2026-12-02 23:00 UTC", "versions": {}, "points": [*pts, conv]}


def test_table_marks_ratios_above_the_limit_and_names_the_verdict():
    lines = parity.format_tables(_result()).splitlines()
    row = next(ln for ln in lines if ln.startswith("| fp8 write | ds_mla |"))
    assert "| 0.95 |" in row and "**1.40**" in row and "MISSED (worst 1.40x at n=65536)" in row
    idx = next(ln for ln in lines if ln.startswith("| indexer | store |"))
    assert "absent" in idx and "no ratio at n=1" in idx
    times = [ln for ln in lines if ln.startswith("| fp8 write | ds_mla |")][1]
    assert "1.00 / 0.95" in times


def test_converting_write_is_read_against_its_bytes_not_in_the_ratio_table():
    text = parity.format_tables(_result())
    assert "| converting write |" not in text  # no CUDA twin: not a triton / jit row
    assert "| 65536 | 60.00 | 40.00 | 50.00 | 1.20x |" in text


def test_fp8_reader_takes_the_fp8_bench_keys(monkeypatch):
    from mlakv.bench import fp8_bench

    def fake(sizes, into=None, rules=True):
        assert rules is False  # the rule rows are not Triton-vs-CUDA points of their own
        return {"write": [{"fmt": "ds_mla", "n_loc": 8, "path": "jit", "jit": 1.0, "triton": 1.2, "plain": 0.8}],
                "gather": [{"fmt": "per_tensor", "n_loc": 8, "jit": 2.0, "triton": "WRONG"}]}  # fmt: skip

    monkeypatch.setattr(fp8_bench, "run_fp8_bench", fake)
    got = parity._fp8([8])
    assert got == [parity.entry("fp8 write", "ds_mla", 8, 1.0, 1.2), parity.entry("fp8 gather", "per_tensor -> bf16", 8, 2.0, "WRONG")]


def test_rope_reader_takes_the_forced_jit_and_names_a_wrong_provider(monkeypatch):
    from mlakv.bench import rope_write

    def fake(variants, heads, sizes, names, is_neox, sglang_max_n):
        assert names == ["jit", "fused-triton"]
        return {"results": [{"variant": "ds_mla", "heads": 16, "n": 1, "times_us": {"jit": 1.5}, "wrong": {"fused-triton": "3 rows"}, "absent": {}}]}

    monkeypatch.setattr(rope_write, "run", fake)
    assert parity._rope([1]) == [parity.entry("rope write", "ds_mla H=16", 1, 1.5, "WRONG")]


def test_v4_and_indexer_readers_take_their_bench_keys(monkeypatch):
    from mlakv.bench import indexer, v4_store

    monkeypatch.setattr(v4_store, "run_v4_bench", lambda layouts, sizes, providers: {
        "rows": [{"layout": "v41", "n": 64, "mlakv-jit": 1.0, "mlakv-triton": 0.9}]})  # fmt: skip
    monkeypatch.setattr(indexer, "run_indexer_bench", lambda sizes: {
        "store": [{"n": 64, "mlakv-jit": 1.0, "mlakv-triton": 1.1}], "gather": [{"n": 64, "mlakv": 2.0, "mlakv-triton": 1.8}]})  # fmt: skip
    assert parity._v4([64]) == [parity.entry("v4 store", "v41", 64, 1.0, 0.9)]
    assert parity._indexer([64]) == [parity.entry("indexer", "store", 64, 1.0, 1.1), parity.entry("indexer", "gather", 64, 2.0, 1.8)]


def test_subcommand_is_registered_and_runs_without_a_gpu(capsys, tmp_path):
    assert "parity" in SUBCOMMANDS
    if torch.cuda.is_available():
        pytest.skip("on a GPU the bench really runs (test_row_family_runs_on_the_gpu)")
    assert parity.main(["--families", "row", "--sizes", "1", "--out", str(tmp_path)]) == 0
    assert "no CUDA GPU" in capsys.readouterr().out


@requires_sm90
def test_row_family_runs_on_the_gpu():
    res = parity.run_parity(["row"], [1, 1024])
    pts = res["points"]
    assert {(p["case"], p["n"]) for p in pts} == {(c, n) for c in ("bf16 512+64", "u8 656 (FP8 rows as bytes)") for n in (1, 1024)}
    assert all(parity.ratio_of(p) is not None for p in pts), pts  # both providers passed their check and were timed


@requires_sm90
def test_two_passes_time_every_point_twice_on_the_gpu():
    res = parity.run_parity(["row"], [8], passes=2)
    assert len(res["points"]) == 2 and len(res["pass_points"]) == 2
    for p in res["points"]:
        assert all(len(v) == 2 and all(isinstance(t, float) for t in v) for v in p["passes"].values()), p
        assert p["jit"] == pytest.approx(sum(p["passes"]["jit"]) / 2)  # the median of two


# ---- the converting write's launch sweep (--convert-sweep) -------------------------------------------
def _conv_point(n: int, table: str, sweep: dict) -> dict:
    e = parity.entry("converting write", "fp32 -> bf16", n, 1.0, sweep.get(table, 9.0))
    e.update(bound=0.5, table=table, sweep=sweep)
    return e


def test_convert_sweep_report_names_the_fastest_shape_and_the_rows_it_makes():
    res = _result()
    res["points"] = [
        _conv_point(8, "w1r2e", {"w1r1e": 1.2, "w1r2e": 1.0, "w2r2e": 1.1}),
        _conv_point(512, "w1r2e", {"w1r1e": 3.0, "w1r2e": 3.1, "w2r2e": 2.0, "w8r8l": "WRONG"}),
        _conv_point(65536, "w1r4e", {"w1r4e": 56.0, "w2r2e": 54.0}),
    ]
    lines = parity.format_tables(res).splitlines()
    assert "| 8 | w1r2e | 1.00 | w1r2e | 1.00 | 1.00x | - |" in lines
    assert "| 512 | w2r2e | 2.00 | w1r2e | 3.10 | 1.55x | w8r8l |" in lines  # a wrong shape: named, not ranked
    assert "    ((8, 1, 2, True), (None, 2, 2, True))" in lines  # equal neighbours merged, the last row open


def test_convert_sweep_section_is_absent_without_a_sweep():
    assert "launch sweep" not in parity.format_tables(_result())


@pytest.mark.parametrize(
    "argv, swept",
    [(["--convert-sweep"], {"convert"}), (["--sweep", "gather"], {"gather"}), (["--sweep", "convert,gather"], {"convert", "gather"}), ([], set())],
)
def test_sweep_option_reaches_the_named_families_only(monkeypatch, argv, swept):
    seen: dict = {}

    def runner(fam):
        def run(sizes, sweep=False):
            seen[fam] = sweep
            return []

        return run

    for fam in parity.SWEEPS:
        monkeypatch.setitem(parity.SWEEPS, fam, runner(fam))
        monkeypatch.setitem(parity.FAMILIES, fam, runner(fam))
    monkeypatch.setitem(parity.FAMILIES, "row", runner("row"))
    monkeypatch.setattr(parity.torch.cuda, "get_device_name", lambda *a: "GPU")
    args = parity.build_parser().parse_args(argv)
    parity.run_parity(["row", "convert", "gather"], [8], convert_sweep=args.convert_sweep, sweep=args.sweep)
    assert seen == {"row": False, **{fam: fam in swept for fam in parity.SWEEPS}}


def test_an_unknown_sweep_family_is_a_usage_error():
    with pytest.raises(SystemExit):
        parity.build_parser().parse_args(["--sweep", "row"])


def test_gather_is_a_ratio_row_against_torch_and_has_its_own_sweep_section():
    res = _result()
    g = parity.entry("gather", parity.GATHER_CASE, 65536, 30.0, 33.0)
    g.update(table="w1r1e", sweep={"w1r1e": 33.0, "w4r4e": 30.0})
    res["points"].append(g)
    text = parity.format_tables(res)
    assert f"| gather | {parity.GATHER_CASE} | - | 1.10 | met |" in text
    assert "gather, launch sweep (`--sweep`)" in text and "(TRITON_GATHER_STEPS)" in text
    assert "| 65536 | w4r4e | 30.00 | w1r1e | 33.00 | 1.10x | - |" in text


@requires_sm90
def test_convert_sweep_runs_on_the_gpu_and_checks_every_shape():
    from mlakv.bench.kv_write import triton_sweep_shapes

    (p,) = parity._convert([8], sweep=True)
    assert set(p["sweep"]) == {parity._sweep_key(*s) for s in triton_sweep_shapes()}
    assert all(isinstance(v, float) for v in p["sweep"].values()), p["sweep"]  # every shape bit-exact, timed
    assert p["table"] in p["sweep"]


@requires_sm90
def test_gather_sweep_runs_on_the_gpu_and_checks_every_shape():
    from mlakv.bench.kv_write import triton_sweep_shapes

    (p,) = parity._gather([100], sweep=True)
    assert parity.ratio_of(p) is not None, p  # the Triton gather and torch's both matched the rule
    assert set(p["sweep"]) == {parity._sweep_key(*s) for s in triton_sweep_shapes()}
    assert all(isinstance(v, float) for v in p["sweep"].values()), p["sweep"]
    assert p["table"] in p["sweep"]


# ---- --passes: each side the median over passes, the points that moved between passes listed --------
def test_passes_merge_to_the_median_per_side_and_keep_each_pass():
    passes = [
        [parity.entry("fp8 write", "ds_mla", 512, 1.0, 1.5), parity.entry("fp8 write", "ds_mla", 8, 1.0, 0.9)],
        [parity.entry("fp8 write", "ds_mla", 512, 1.2, 2.5), parity.entry("fp8 write", "ds_mla", 8, 1.0, 0.9)],
        [parity.entry("fp8 write", "ds_mla", 512, 1.1, 1.6), parity.entry("fp8 write", "ds_mla", 8, 1.0, 0.9)],
    ]
    merged = parity.merge_passes(passes)
    assert [(p["n"], p["jit"], p["triton"]) for p in merged] == [(512, 1.1, 1.6), (8, 1.0, 0.9)]
    assert merged[0]["passes"] == {"jit": [1.0, 1.2, 1.1], "triton": [1.5, 2.5, 1.6]}
    assert parity.spread(merged[0]) == pytest.approx(2.5 / 1.5)
    assert parity.spread(merged[1]) == 1.0


def test_a_pass_without_a_time_keeps_its_reason():
    passes = [[parity.entry("v4 store", "v4", 1, 1.0, 2.0)], [parity.entry("v4 store", "v4", 1, 1.0, "WRONG")]]
    (p,) = parity.merge_passes(passes)
    assert p["triton"] == "WRONG" and p["jit"] == 1.0 and parity.ratio_of(p) is None


def test_the_report_lists_the_points_that_moved_between_passes():
    res = _result()
    res["passes"] = 2
    res["points"] = parity.merge_passes([
        [parity.entry("fp8 write", "ds_mla", 1, 1.0, 1.0), parity.entry("fp8 write", "ds_mla", 65536, 40.0, 50.0)],
        [parity.entry("fp8 write", "ds_mla", 1, 1.05, 1.0), parity.entry("fp8 write", "ds_mla", 65536, 40.0, 70.0)],
    ])  # fmt: skip
    text = parity.format_tables(res)
    assert "median of 2 passes" in text
    assert "1 of 2 points have a side whose 2 times differ by more than 1.10x" in text
    assert "| fp8 write | ds_mla | 65536 | 40.00, 40.00 | 50.00, 70.00 | 1.40x |" in text.splitlines()
    assert "between passes" not in parity.format_tables(_result())  # one pass: no such section


def test_passes_run_every_family_each_pass_in_alternating_order(monkeypatch):
    order: list[str] = []

    def runner(fam):
        def run(sizes, sweep=False):
            order.append(fam)
            return [parity.entry(fam, "c", n, 1.0, float(len(order))) for n in sizes]

        return run

    for fam in ("row", "fp8"):
        monkeypatch.setitem(parity.FAMILIES, fam, runner(fam))
    monkeypatch.setattr(parity.torch.cuda, "get_device_name", lambda *a: "GPU")
    res = parity.run_parity(["row", "fp8"], [8], passes=3)
    assert order == ["row", "fp8", "fp8", "row", "row", "fp8"]
    assert res["passes"] == 3 and len(res["pass_points"]) == 3
    assert {p["family"]: p["passes"]["triton"] for p in res["points"]} == {"row": [1.0, 4.0, 5.0], "fp8": [2.0, 3.0, 6.0]}
    assert parity.build_parser().parse_args(["--passes", "2"]).passes == 2
    with pytest.raises(SystemExit):
        parity.build_parser().parse_args(["--passes", "0"])
