"""``mlakv bench demo-step``: the demo model's decode step with the fused cache step vs the separate kernels.

Spec: for each cache format (bf16 rows, per_tensor, ds_mla) and decode batch size, both variants of the
step run on pools with the same context rows; the bench first checks that they give the same logits
and the same pool bytes (the fused step is bit-identical to RoPE, then the write, then the query
concat) and that the step wrote its rows, then times them side by side (CUDA-graph medians on a GPU,
eager wall clock on a CPU) and writes ``demo_step.json`` / ``demo_step.md`` under ``--out``. A variant
pair that differs is reported as ``DIFF`` and the command exits 1. No timing is asserted here.
"""

from __future__ import annotations

import json

import pytest
import torch

from mlakv.bench import SUBCOMMANDS, demo_step
from mlakv.bench.options import DEMO_STEP_FORMATS, parser_for
from conftest import run_cli
from mlakv.demo.model import MLAConfig, make_model

TINY = ["--batch-sizes", "1,3", "--context", "4", "--layers", "1", "--rounds", "1"]




def test_bench_demo_step_is_a_bench_subcommand_with_its_own_parser():
    assert "demo-step" in SUBCOMMANDS
    assert parser_for(["demo-step"]).prog == "mlakv bench demo-step"
    assert DEMO_STEP_FORMATS == list(demo_step.POOL_OF) == list(demo_step.FORMATS)


@pytest.mark.parametrize("argv, names", [(["--formats", "fp4"], "--formats"), (["--batch-sizes", "0"], "--batch-sizes"),
                                         (["--context", "0"], "--context"), (["--rounds", "x"], "--rounds")])  # fmt: skip
def test_bad_options_are_usage_errors(argv, names, capsys):
    rc, _, err = run_cli(["bench", "demo-step", *argv], capsys)
    assert rc == 2 and names in err


def test_every_format_and_batch_is_checked_timed_and_written(tmp_path, capsys):
    rc, out, err = run_cli(["bench", "demo-step", *TINY, "--out", str(tmp_path)], capsys)
    assert rc == 0, out + err
    res = json.loads((tmp_path / "demo_step.json").read_text())
    rows = res["rows"]
    assert [(r["format"], r["batch"]) for r in rows] == [(f, b) for f in DEMO_STEP_FORMATS for b in (1, 3)]
    assert all(r["same"] for r in rows)
    assert all(r["fused_us"] > 0 and r["separate_us"] > 0 for r in rows)
    assert res["layers"] == 1 and res["context"] == 4
    md = (tmp_path / "demo_step.md").read_text()
    table = [ln for ln in md.splitlines() if ln.startswith("| ") and ln.endswith("| yes |")]
    assert len(table) == len(rows) and md.strip() in out
    if not torch.cuda.is_available():
        assert "eager wall clock (CPU: not a performance number)" in md


@pytest.mark.parametrize("fmt", DEMO_STEP_FORMATS)
def test_the_separate_step_gives_the_fused_steps_logits_and_rows(fmt):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = make_model(MLAConfig(vocab_size=256, hidden=64, n_heads=2, n_layers=2), device, torch.bfloat16)
    inputs, pools, caches = demo_step.make_step(model, fmt, batch=3, context=5, device=device, seed=2)
    logits = {v: model.decode(caches[v], **inputs) for v in demo_step.VARIANTS}
    assert torch.equal(logits["fused"], logits["separate"])
    for layer in range(2):
        a, b = (pools[v].kv_buffer[layer].view(torch.uint8) for v in demo_step.VARIANTS)
        assert torch.equal(a, b)
        assert bool(a[inputs["loc"]].flatten(1).any(dim=1).all())  # the step's rows were written


def test_a_separate_step_that_differs_is_reported_and_fails(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(demo_step, "rope_rotate_torch", lambda x, positions, cs, neox: x.clone())  # no RoPE
    rc, out, _ = run_cli(["bench", "demo-step", *TINY, "--formats", "bf16", "--out", str(tmp_path)], capsys)
    assert rc == 1 and out.count("| DIFF |") == 2
    assert not any(r["same"] for r in json.loads((tmp_path / "demo_step.json").read_text())["rows"])
