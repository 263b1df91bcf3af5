"""``python -m mlakv.bench.host_cost``: every step of the eager write's hot path is timed."""

from __future__ import annotations

import math

from mlakv.bench.host_cost import main, step_costs

STEPS = [
    "write closure (bound launch shapes)",
    "dispatcher set_mla_kv_buffer_triton",
    "pool.set_kv_buffer (split: k_nope, k_rope)",
    "pool.set_kv_buffer (split, sglang's layer object)",
    "pool.set_kv_buffer (full row, cache_v=None)",
]


def test_step_costs_time_each_step_of_the_hot_path():
    # bf16: the tvm-ffi row uses the module test_rules builds too (no extra nvcc build in CI)
    rows = {name: py for name, py, _ in step_costs("bf16", calls=5, rounds=1)}
    for step in STEPS:
        assert math.isfinite(rows[step]) and rows[step] > 0, step


def test_main_prints_one_table_row_per_layout_and_step(capsys):
    assert main(["--calls", "3", "--rounds", "1", "--layouts", "bf16"]) == 0
    out = capsys.readouterr().out
    for step in STEPS:
        assert f"| bf16 | {step} |" in out
