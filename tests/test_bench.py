"""The benchmark's own logic: the roofline, the report on each kind of machine, the plot, and the
sglang peer provider (built from source the user fetched into ``.peers/sglang``, never committed).

The table and plot tests feed synthetic rows (no timing), so they run the GPU report path on a CPU.
The sglang build test compiles and loads sglang's kernel for sm_90a without a GPU, as CI does for
mlakv's own kernel; it skips with the reason where the peer source or the toolchain is absent.
"""

from __future__ import annotations

import os

import pytest
import torch

from mlakv.bench.kv_write import (
    CPU_LABEL,
    LAYOUTS,
    Row,
    check_provider,
    format_table,
    launch_floor_us,
    make_layers,
    plot,
    provider_fn,
)
from mlakv.bench.sglang_peer import _sgl_cuda_arch, peer_absent_reason
from mlakv.jit_kernel import JitUnavailable, find_cuda_home

COPY_GBS, TINY_US = 3000.0, 0.7


def synthetic_rows(providers: dict[str, float]) -> list[Row]:
    """bf16 rows at three sizes; provider time = factor x roofline."""
    rows = []
    for n in (1, 1024, 65536):
        r = Row("bf16", n, "int64", "jit")
        roof = r.roofline_us(COPY_GBS, TINY_US)
        for p, factor in providers.items():
            r.times_us[p] = roof * factor
            r.spread_us[p] = [roof * factor * 0.9, roof * factor, roof * factor * 1.1]
        rows.append(r)
    return rows


@pytest.mark.parametrize("n_loc, expected_us", [(1, TINY_US), (65536, 2 * 65536 * 1152 / (COPY_GBS * 1e9) * 1e6)])
def test_roofline_is_the_larger_of_launch_floor_and_copy_time(n_loc, expected_us):
    assert Row("bf16", n_loc, "int64", "jit").roofline_us(COPY_GBS, TINY_US) == pytest.approx(expected_us)


@pytest.mark.parametrize("fastest, expected", [(0.69, 0.69), (2.0, TINY_US)], ids=["pdl-call-below-kernel", "kernel"])
def test_launch_floor_is_the_faster_of_the_one_element_kernel_and_any_call(fastest, expected):
    rows = synthetic_rows({"auto": 3.0})
    rows[0].times_us["triton"] = fastest
    assert launch_floor_us(rows, TINY_US) == pytest.approx(expected)


def test_gpu_table_ranks_and_reports_percent_of_roofline():
    table = format_table(synthetic_rows({"auto": 1.25, "sglang": 1.5}), ["auto", "sglang"], COPY_GBS, TINY_US)
    header, *body = [ln for ln in table.splitlines() if ln.startswith("| ")]
    cols = [c.strip() for c in header.strip("|").split("|")]
    for line in body:
        cells = dict(zip(cols, (c.strip() for c in line.strip("|").split("|"))))
        assert cells["best"] == "auto"
        assert cells["auto %roofline"] == "80%"
        assert cells["sglang/auto"] == "1.20"


def test_gpu_table_does_not_rank_auto_against_the_kernel_it_dispatched_to():
    rows = synthetic_rows({"auto": 1.30, "jit": 1.29, "triton": 1.5})  # path "jit": jit is auto's own kernel
    table = format_table(rows, ["auto", "jit", "triton"], COPY_GBS, TINY_US)
    header, *body = [ln for ln in table.splitlines() if ln.startswith("| ")]
    cols = [c.strip() for c in header.strip("|").split("|")]
    for line in body:
        assert dict(zip(cols, (c.strip() for c in line.strip("|").split("|"))))["best"] == "auto"


def test_cpu_table_shows_spread_and_ranks_nothing():
    table = format_table(synthetic_rows({"auto": 2.0, "torch": 1.0}), ["auto", "torch"], None, None)
    assert table.startswith(CPU_LABEL)
    assert "best" not in table and "auto/best" not in table
    assert "median [min-max]" in table and "[" in table.splitlines()[-1]


@pytest.mark.parametrize("gpu", [True, False], ids=["gpu-two-panels", "cpu-band"])
def test_plot_is_written(gpu, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "p.png"
    rows = synthetic_rows({"auto": 1.2, "torch": 3.0})
    note = plot(rows, ["auto", "torch"], COPY_GBS if gpu else None, TINY_US if gpu else None, path, "test")
    assert note is None and path.stat().st_size > 0


def test_plot_with_nothing_timed_says_so(tmp_path):
    assert plot([Row("bf16", 1, "int64", "torch")], ["auto"], None, None, tmp_path / "p.png", "test") is not None


@pytest.mark.parametrize("layout", ["bf16", "u8"])
def test_cpu_providers_pass_their_own_check(layout):
    inp = make_layers(LAYOUTS[layout], 33, torch.int64, "cpu", 1)[0]
    for p in ("auto", "torch"):
        assert check_provider(provider_fn(p), inp) is None


def test_check_catches_a_wrong_provider():
    inp = make_layers(LAYOUTS["bf16"], 8, torch.int64, "cpu", 1)[0]

    def drops_last_row(kv, loc, nope, rope):
        provider_fn("torch")(kv, loc[:-1], nope[:-1], rope[:-1])

    assert check_provider(drops_last_row, inp) == "WRONG: 1 rows differ from the reference"


@pytest.mark.parametrize("arch, value", [("9.0a", 900), ("10.0a", 1000), ("8.9", 890), ("9.0a;10.0a", 900)])
def test_sgl_cuda_arch(arch, value):
    assert _sgl_cuda_arch(arch) == value


@pytest.mark.jit_build
@pytest.mark.parametrize("nope_bytes, rope_bytes", [(1024, 128), (528, 128)], ids=["bf16-512+64", "u8-528+128"])
def test_sglang_peer_compiles_and_loads_for_sm90a(nope_bytes, rope_bytes, monkeypatch):
    absent = peer_absent_reason()
    if absent:
        pytest.skip(absent)
    try:
        import tvm_ffi  # noqa: F401
    except ImportError:
        pytest.skip("apache-tvm-ffi is not installed")
    if find_cuda_home() is None:
        pytest.skip("nvcc is not available")
    from mlakv.bench.sglang_peer import build_sglang_module

    monkeypatch.setenv("TVM_FFI_CUDA_ARCH_LIST", os.environ.get("TVM_FFI_CUDA_ARCH_LIST", "9.0a"))
    try:
        module = build_sglang_module(nope_bytes, rope_bytes, use_pdl=True, device_capability=(9, 0))
    except JitUnavailable as e:
        pytest.fail(f"sglang's kernel did not build from .peers/sglang: {e}")
    assert callable(module.set_mla_kv_buffer)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9, reason="needs an SM90+ GPU (none present)")
@pytest.mark.parametrize("layout", ["bf16", "u8"])
@pytest.mark.parametrize("n_loc", [1, 37, 4096])
def test_sglang_provider_is_bit_exact_on_gpu(layout, n_loc):
    absent = peer_absent_reason()
    if absent:
        pytest.skip(absent)
    inp = make_layers(LAYOUTS[layout], n_loc, torch.int64, "cuda", 1)[0]
    assert check_provider(provider_fn("sglang"), inp) is None


def test_absent_peer_is_named_with_where_it_was_looked_for(tmp_path, monkeypatch):
    from mlakv.bench import kv_write, sglang_peer

    monkeypatch.setattr(sglang_peer, "_candidates", lambda: [tmp_path / "nowhere"])
    why = kv_write.provider_unavailable("sglang", LAYOUTS["bf16"])
    assert why is not None and str(tmp_path / "nowhere") in why and "mlakv fetch-peers sglang" in why
    with pytest.raises(JitUnavailable, match="sglang source absent"):
        sglang_peer.build_sglang_module(1024, 128, device_capability=(9, 0))


@pytest.mark.parametrize("name", ["sglang", "vllm"])
def test_a_peer_is_looked_for_in_each_place_once(name, tmp_path, monkeypatch):
    """Run from the source checkout, ./.peers/<name> is the checkout's own: listed once, after the variable."""
    from pathlib import Path

    from mlakv.bench import peers
    from mlakv.bench.peers import peer_search_dirs

    checkout = Path(peers.__file__).resolve().parents[2]  # the checkout the package runs from
    monkeypatch.chdir(checkout)
    assert peer_search_dirs(name, None) == [Path.cwd() / ".peers" / name]
    assert peer_search_dirs(name, str(tmp_path)) == [tmp_path, Path.cwd() / ".peers" / name]
    monkeypatch.chdir(tmp_path)
    assert peer_search_dirs(name, None) == [tmp_path / ".peers" / name, checkout / ".peers" / name]


# ---- the benches' layering -------------------------------------------------------------------
# Modules of mlakv.bench that are not benches: the shared timing module, the command lines, the peer
# fetcher and the comparison providers (built only to be timed beside mlakv's own kernels).
BENCH_SUPPORT = {"timing", "report", "options", "peers", "sglang_peer", "vllm_peer", "legacy_kernel", "__init__"}


def _bench_imports(path) -> set[str]:
    """The mlakv.bench submodules a module imports (absolute or relative, at any depth in the file)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 1:
                found |= {mod.split(".")[0]} if mod else {a.name for a in node.names}
            elif mod.startswith("mlakv.bench."):
                found.add(mod.split(".")[2])
            elif mod == "mlakv.bench":
                found |= {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[2] for a in node.names if a.name.startswith("mlakv.bench.")}
    return found


def test_no_bench_imports_another_bench():
    """Every bench reads its clocks from mlakv.bench.timing; none reaches into another bench, but the
    parity bench, whose one job is to run the family benches and read their results."""
    from pathlib import Path

    import mlakv.bench

    root = Path(mlakv.bench.__file__).parent
    benches = {p.stem for p in root.glob("*.py")} - BENCH_SUPPORT
    assert {"kv_write", "fp8_bench", "hicache"} <= benches
    offenders = {b: sorted(_bench_imports(root / f"{b}.py") & (benches - {b})) for b in benches - {"parity"}}
    assert "parity" not in set().union(*(_bench_imports(root / f"{b}.py") for b in benches))
    assert not {b: v for b, v in offenders.items() if v}, offenders
    users = {b for b in benches if "timing" in _bench_imports(root / f"{b}.py")}
    assert users == benches, f"benches timing on their own: {sorted(benches - users)}"


# ---- the L3 bench's estimate and log filter (no Mooncake needed) ------------------------------
def test_l3_estimate_brackets_the_measured_default_run():
    """The default CPU run (64,128,256 pages x 61 layers, 9 rounds) took 129-213 s on the 2-core machine."""
    pytest.importorskip("xxhash")
    from mlakv.bench.hicache_l3 import estimate_s
    from mlakv.bench.options import L3_CPU_PAGES

    lo, hi = estimate_s(L3_CPU_PAGES, 64, 61, 9)
    assert lo <= 129 and 213 <= hi <= 2 * 213
    assert estimate_s([64], 64, 61, 9)[0] < lo  # fewer pages, less time


def test_l3_log_filter_drops_only_the_expected_lines_written_to_fd_2(capfd):
    """Mooncake logs from C++ straight to file descriptor 2: the filter works below Python's sys.stderr."""
    import os

    pytest.importorskip("xxhash")
    from mlakv.bench.hicache_l3 import EXPECTED_CLIENT_LOG, native_log_filtered

    with native_log_filtered(EXPECTED_CLIENT_LOG):
        os.write(2, b"E1202 transfer_metadata_plugin.cpp:292] GET http://x http=404 body: metadata not found\n")
        os.write(2, b"W1202 transfer_metadata.cpp:1115] Failed to retrieve segment descriptor, name 127.0.0.1:1\n")
        os.write(2, b"E1202 real_client.cpp:1] something else went wrong\n")
    err = capfd.readouterr().err
    assert err == "E1202 real_client.cpp:1] something else went wrong\n"


def test_l3_log_filter_passes_everything_when_verbose(capfd):
    import os

    pytest.importorskip("xxhash")
    from mlakv.bench.hicache_l3 import EXPECTED_CLIENT_LOG, native_log_filtered

    with native_log_filtered(EXPECTED_CLIENT_LOG, enabled=False):
        os.write(2, b"E http=404 body: metadata not found\n")
    assert "metadata not found" in capfd.readouterr().err


# ---- bench fp8 --tune's report ----------------------------------------------------------------------
def test_fp8_tune_report_gives_the_table_rows_and_says_when_the_jit_was_not_timed():
    from mlakv.bench.fp8_bench import format_tune

    res = {
        "device": "GPU",
        "triton": {"quant_ds_mla": {"1": {"w4r1e": 0.9, "w2r1e": 1.0}, "65536": {"w2r4e": 45.0, "w4r8e": 46.0}}},
        "jit": {},
        "jit_not_timed": "the JIT FP8 kernels do not serve these inputs here",
    }
    text = format_tune(res)
    assert "JIT: the JIT FP8 kernels do not serve these inputs here" in text
    assert "FP8_TRITON_STEPS['quant_ds_mla'] = ((1, 4, 1, 'entry'), (None, 2, 4, 'entry'))" in text
    assert "JIT:" not in format_tune({k: v for k, v in res.items() if k != "jit_not_timed"})


def test_fp8_tune_report_gives_the_ds_mla_parts_rows():
    from mlakv.bench.fp8_bench import format_tune

    res = {
        "device": "GPU",
        "triton": {"quant_ds_mla": {"1": {"w1r1p4e": 0.7, "w4r1e": 0.9}, "512": {"w1r1p2l": 1.3, "w1r1e": 1.8},
                                    "1024": {"w2r2w": 1.4, "w2r2e": 1.6},
                                    "65536": {"w2r4e": 45.0, "w1r4p2e": 46.0}}},
        "jit": {},
    }  # fmt: skip
    text = format_tune(res)
    assert ("FP8_TRITON_STEPS['quant_ds_mla'] = ((1, 1, 1, 'entry'), (512, 1, 1, 'end'), (1024, 2, 2, 'wait'), "
            "(None, 2, 4, 'entry'))") in text
    assert "FP8_TRITON_PARTS['quant_ds_mla'] = ((1, 4), (512, 2), (None, 1))" in text
    unsplit = format_tune({"device": "GPU", "triton": {"quant_ds_mla": {"1": {"w4r1e": 0.9}}}, "jit": {}})
    alone, _, folded = unsplit.partition("# folded into the current table")
    assert "FP8_TRITON_PARTS" not in alone  # no sweep point split its rows
    assert "FP8_TRITON_PARTS" not in format_tune({"device": "GPU", "triton": {"quant_per_tensor": {"1": {"w4r1e": 0.9}}},
                                                  "jit": {}})  # fmt: skip


def test_fp8_tune_report_folds_the_sweep_into_the_current_table(monkeypatch):
    """A sweep of some sizes also gives the table with its rows folded in: sizes it did not time keep
    the current rows (above its largest size, and at a boundary of the table no swept size shares)."""
    from mlakv.bench import fp8_bench

    monkeypatch.setitem(fp8_bench.FP8_JIT_STEPS, "quant_per_tensor",
                        ((64, 4, False, 128), (1024, 8, False, 64), (None, 4, True, 32)))  # fmt: skip
    res = {"device": "GPU", "triton": {},
           "jit": {"quant_per_tensor": {"512": {"t128w8l": 0.98, "t64w8l": 1.1}, "1024": {"t128w8l": 1.12}}}}  # fmt: skip
    text = fp8_bench.format_tune(res)
    assert "FP8_JIT_STEPS['quant_per_tensor'] = ((None, 8, False, 128),)" in text  # the swept sizes alone
    assert ("FP8_JIT_STEPS['quant_per_tensor'] = ((64, 4, False, 128), (1024, 8, False, 128), "
            "(None, 4, True, 32))") in text.partition("# folded into the current table")[2]


@pytest.mark.parametrize(
    "current, best, want",
    [
        # sizes above the largest swept one keep the table's open row
        (((None, "a"),), [(8, ("b",))], [(8, "b"), (None, "a")]),
        # a table boundary no swept size shares keeps its shape; equal neighbours merge
        (((64, "a"), (None, "c")), [(1, ("b",)), (512, ("c",))], [(1, "b"), (64, "a"), (None, "c")]),
        # a swept size inside a row splits it; the sizes between it and the lower boundary take its shape
        (((1024, "a"), (None, "c")), [(512, ("b",))], [(512, "b"), (1024, "a"), (None, "c")]),
        # a sweep that finds the table's own shapes gives the table back
        (((8, "a"), (512, "b"), (None, "c")), [(8, ("a",)), (512, ("b",))], [(8, "a"), (512, "b"), (None, "c")]),
        # no sweep: the table as it is
        (((8, "a"), (None, "c")), [], [(8, "a"), (None, "c")]),
    ],
)
def test_merged_steps_keeps_the_rows_the_sweep_did_not_time(current, best, want):
    from mlakv.bench.report import merged_steps

    assert merged_steps(current, best) == want


@pytest.mark.parametrize("n", [1, 8, 512, 65536])
def test_fp8_tune_splits_ds_mla_rows_into_two_and_four_parts(n):
    from mlakv.bench.fp8_bench import _part_shapes, _shape_key

    shapes = _part_shapes(n)
    assert {p for *_, p in shapes} == {2, 4} and all(r <= n for _, r, _ in shapes)
    assert _shape_key(1, 2, "entry", 4) == "w1r2p4e" and _shape_key(1, 2, "end") == "w1r2l"
    assert _shape_key(2, 4, "wait") == "w2r4w"


def test_fp8_tune_report_gives_the_jit_rows_with_threads_per_row_and_the_plain_floor():
    from mlakv.bench.fp8_bench import format_tune

    res = {
        "device": "GPU",
        "triton": {},
        "jit": {"quant_ds_mla": {"1": {"t128w4e": 1.6, "t32w2e": 2.4, "t64w2l": "WRONG"}, "64": {"t128w4e": 1.7, "t64w4e": 1.8},
                          "4096": {"t32w8l": 9.0, "t64w16l": 9.5}}},
        "plain": {"quant_ds_mla": {"1": 1.3, "64": 1.4, "4096": 8.0}},
    }  # fmt: skip
    text = format_tune(res)
    assert "FP8_JIT_STEPS['quant_ds_mla'] = ((64, 4, True, 128), (None, 8, False, 32))" in text
    assert "| 1 | t128w4e | 1.60 | t32w2e | 2.40 | 1.30 | 1.23x |" in text and "WRONG: t64w2l" in text


def test_fp8_tune_report_gives_a_packed_jit_row():
    """A sweep whose fastest per_tensor shape is the packed one (``tp``) gives a table row of
    FP8_JIT_PACKED (-1) threads per row."""
    from mlakv.bench.fp8_bench import format_tune

    res = {"device": "H200", "triton": {},
           "jit": {"quant_per_tensor": {"512": {"t128w8l": 1.0, "tpw16e": 0.9}, "4096": {"t64w16e": 2.8, "tpw8l": 3.0}}},
           "plain": {"quant_per_tensor": {"512": 0.8, "4096": 1.7}}}  # fmt: skip
    text = format_tune(res)
    assert "FP8_JIT_STEPS['quant_per_tensor'] = ((512, 16, True, -1), (None, 16, True, 64))" in text
    assert "| 512 | tpw16e | 0.90 | t128w8l | 1.00 | 0.80 | 1.12x |" in text


def test_fp8_tune_keys_name_the_packed_rows():
    from mlakv.bench.fp8_bench import _jit_key, _parse_jit_shape
    from mlakv.spec.tuning import FP8_JIT_PACKED

    assert _jit_key(FP8_JIT_PACKED, 8, False) == "tpw8l"
    assert _parse_jit_shape(_jit_key(FP8_JIT_PACKED, 16, True)) == (16, True, FP8_JIT_PACKED)


def test_fp8_tune_times_every_threads_per_row_at_whole_rows_per_cta():
    from mlakv.bench.fp8_bench import _jit_shapes
    from mlakv.spec.tuning import FP8_JIT_THREADS_PER_ROW

    shapes = _jit_shapes()
    assert {t for t, _ in shapes} == set(FP8_JIT_THREADS_PER_ROW) and len(set(shapes)) == len(shapes)
    assert all(1 <= w <= 32 and (32 * w) % t == 0 for t, w in shapes)


@pytest.mark.parametrize("key,shape", [("t128w4e", (4, True, 128)), ("t64w16l", (16, False, 64)), ("w2e", (2, True, 32)),
                                       ("tpw8l", (8, False, -1))])  # fmt: skip
def test_fp8_tune_reads_jit_keys_old_and_new(key, shape):
    """A JIT key names threads per row, warps per CTA and the trigger (``tp``: the per_tensor write's
    packed rows, FP8_JIT_PACKED); keys of earlier reports (no threads per row) were one warp per row."""
    from mlakv.bench.fp8_bench import _parse_jit_shape

    assert _parse_jit_shape(key) == shape


def test_fp8_bench_tune_families_option():
    from mlakv.bench.options import fp8_parser

    assert fp8_parser().parse_args(["--tune"]).tune_families == ["jit", "triton"]
    assert fp8_parser().parse_args(["--tune", "--tune-families", "jit"]).tune_families == ["jit"]
    with pytest.raises(SystemExit):
        fp8_parser().parse_args(["--tune-families", "cuda"])


def test_fp8_bench_profile_option():
    from mlakv.bench.options import fp8_parser

    assert fp8_parser().parse_args(["--profile", "--sizes", "1"]).profile is True
    assert fp8_parser().parse_args([]).profile is False


def test_fp8_bench_graph_lengths_option():
    from mlakv.bench.options import fp8_parser

    assert fp8_parser().parse_args(["--graph-lengths", "16,2048"]).graph_lengths == [16, 2048]
    assert fp8_parser().parse_args([]).graph_lengths is None
    for bad in ("0", "16,x", "70000"):
        with pytest.raises(SystemExit):
            fp8_parser().parse_args(["--graph-lengths", bad])


def test_fp8_graph_lengths_report_gives_a_column_per_length_and_the_repeats():
    from mlakv.bench.fp8_bench import format_graph_lengths

    res = {"device": "GPU-X", "lengths": [16, 2048], "repeats": 2, "rows": [
        {"call": "512 write ds_mla jit", "by_length": [1.111, 1.06], "repeated": [1.05, 1.24]},
        {"call": "512 gather ds_mla triton", "by_length": [1.11, "WRONG"], "repeated": [1.09, 1.1]},
    ]}  # fmt: skip
    lines = format_graph_lengths(res).splitlines()
    assert lines[0].startswith("device: GPU-X;") and "graph_median_us 2 times" in lines[0]
    assert lines[2] == "| call | L=16 | L=2048 | graph_median_us x 2 |"
    assert lines[4] == "| 512 write ds_mla jit | 1.11 | 1.06 | 1.05, 1.24 |"
    assert lines[5] == "| 512 gather ds_mla triton | 1.11 | WRONG | 1.09, 1.10 |"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU answer; a GPU runs the bench")
def test_fp8_graph_lengths_without_a_gpu_measures_nothing(tmp_path, capsys):
    from mlakv.bench.fp8_bench import main

    assert main(["--graph-lengths", "16", "--out", str(tmp_path / "o")]) == 0
    assert "no CUDA GPU" in capsys.readouterr().out
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9, reason="needs an SM90+ GPU (none present)")
def test_fp8_graph_lengths_times_each_checked_call_at_every_length():
    from mlakv.bench.fp8_bench import GRAPH_REPEATS, run_fp8_graph_lengths

    res = run_fp8_graph_lengths([8], [2, 16])
    assert [r["call"].split(" ", 1)[0] for r in res["rows"]] == ["8"] * len(res["rows"]) and len(res["rows"]) >= 7
    for r in res["rows"]:
        assert len(r["by_length"]) == 2 and len(r["repeated"]) == GRAPH_REPEATS
        assert all(isinstance(v, float) and v > 0 for v in r["by_length"] + r["repeated"])


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9, reason="needs an SM90+ GPU (none present)")
def test_fp8_profile_calls_each_checked_provider_once_per_size_in_order():
    from mlakv.bench.fp8_bench import run_fp8_profile

    labels = run_fp8_profile([1, 8], warmup=1)
    per_size = [f"write {f} {p}" for f in ("ds_mla", "per_tensor") for p in ("jit", "triton", "plain")]
    per_size += [f"gather {f} {p}" for f in ("ds_mla", "per_tensor") for p in ("jit", "triton")]
    assert labels == [f"{n} {x}" for n in (1, 8) for x in per_size]
