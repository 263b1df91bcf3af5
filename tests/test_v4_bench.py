"""``mlakv bench v4``: its command line and byte counts (CPU), and on an SM90 GPU the peer it times:
sglang's own store kernel, built from ``.peers/sglang``, writes the reference's bytes."""

from __future__ import annotations

import pytest
import torch

from conftest import HAS_CUDA, requires_sm90
from mlakv.bench import v4_store as bench
from mlakv.ops import v4_reference as R


@pytest.mark.parametrize("layout,moved", [("v4", 1032 + 583), ("v41", 1032 + 528), ("v41_fp4", 1032 + 288), ("v41_new", 1032 + 528)])
def test_bytes_per_token(layout, moved):
    assert bench.bytes_per_token(layout) == moved
    assert bench.bytes_per_token(layout, rope=True) == moved + 256


def test_cli_without_a_gpu_measures_nothing(capsys, tmp_path):
    if HAS_CUDA:
        pytest.skip("the CPU behaviour")
    assert bench.main(["--sizes", "1,8", "--out", str(tmp_path)]) == 0
    assert "no CUDA GPU" in capsys.readouterr().out


def test_cli_takes_the_triton_sweep(capsys, tmp_path):
    if HAS_CUDA:
        pytest.skip("the CPU behaviour")
    assert bench.main(["--sizes", "8", "--triton-sweep", "--rope", "--out", str(tmp_path)]) == 0
    assert "no CUDA GPU" in capsys.readouterr().out


def test_tables_name_the_fastest_triton_shape():
    row = {"layout": "v41", "n": 64, "path": "jit", "mlakv": 1.0, "mlakv-jit": 1.0, "mlakv-triton": 1.2,
           "triton w1 t1": 1.3, "triton w1 t1 of copy bw": 0.1, "triton w2 t2": 1.1, "triton w2 t2 +rope": 1.4,
           "triton w1 t1 +rope": 1.6, "mlakv+rope": 1.25}  # fmt: skip
    text = bench.format_tables({"device": "GPU", "copy_gbs": 4000.0, "rows": [row]})
    assert "- n=64: triton w2 t2: 1.10 µs (1.10x mlakv-jit's 1.00)" in text
    assert "- n=64: triton w2 t2 +rope: 1.40 µs (1.12x mlakv+rope's 1.25)" in text
    assert "| 1.20x |" in text  # triton / jit


def test_cli_refuses_an_unknown_layout():
    with pytest.raises(SystemExit):
        bench.main(["--layouts", "v5"])


def _peer_or_skip(layout):
    from mlakv.kernels.cuda.loader import JitUnavailable

    try:
        return bench.build_sglang_v4_store(layout)
    except JitUnavailable as e:
        pytest.skip(f"sglang's store not built: {e}")


@requires_sm90
@pytest.mark.parametrize("n", [1, 300, 4100])
@pytest.mark.parametrize("layout", list(R.V4_LAYOUTS))
def test_sglang_store_writes_the_reference_bytes(layout, n):
    """The peer and mlakv's reference agree byte for byte on random finite tokens (so the bench's
    comparison is of two stores of the same bytes)."""
    mod = _peer_or_skip(layout)
    pages = -(-n // 64) + 1
    g = R.v4_geometry(layout)
    base = torch.randint(0, 256, (pages, g.page_bytes(64)), dtype=torch.uint8, device="cuda")
    kv = (torch.randn(n, 512, device="cuda") * torch.exp2(torch.randint(-8, 8, (n, 1), device="cuda").float())).to(torch.bfloat16)
    loc = torch.randperm(pages * 64, device="cuda")[:n]
    got = base.clone()
    mod.store(kv, got, loc)
    torch.cuda.synchronize()
    want = base.cpu().clone()
    R.set_v4_kv_buffer_torch(want, loc.cpu(), kv.cpu(), layout, 64)
    assert torch.equal(got.cpu(), want)


@requires_sm90
def test_bench_runs_and_checks_every_provider(tmp_path):
    res = bench.run_v4_bench(["v41"], [8], ["mlakv", "mlakv-jit", "mlakv-triton", "sglang"], rope=True)
    row = res["rows"][0]
    for name in ("mlakv", "mlakv-jit", "mlakv-triton", "mlakv+rope", "mlakv+pos", "mlakv-triton+rope"):
        assert isinstance(row[name], float) and row[name] > 0, (name, row.get(name))
    assert "v41" in bench.format_tables(res)


@requires_sm90
def test_triton_sweep_checks_and_times_every_shape():
    from mlakv.spec.tuning import V4_TRITON_SWEEP

    res = bench.run_v4_bench(["v41_fp4"], [300], ["mlakv-jit", "mlakv-triton"], rope=True, triton_sweep=True)
    row = res["rows"][0]
    for warps, tokens in V4_TRITON_SWEEP:
        for name in (f"triton w{warps} t{tokens}", f"triton w{warps} t{tokens} +rope"):
            assert isinstance(row[name], float) and row[name] > 0, (name, row.get(name))
    assert "Fastest Triton launch shape" in bench.format_tables(res)
