"""The demo on a DeepSeek-V4 family cache: the small MLA model, at the V4 widths (kv_lora_rank 448 +
rope 64), served end to end through an ``MLATokenToKVPool`` of each V4-family format.

Spec (issue 23's demo goal): prefill and greedy decode run over the format's pages (quantized in the
write, dequantized in the gather) in lockstep with a run over a plain cache of the model's dtype, both
fed the plain run's tokens; the demo prints the share of decode steps whose greedy token is the plain
run's and the logit error, and fails (exit 1) below ``--min-agreement`` (default 95 %).

What the small random-weight model gives (its logits are nearly flat, so a small error can swap the
top two): the e4m3 layouts (``v4``, ``v41``, ``v41_new``; ~2.6 % relative error per value) keep the
plain run's token at >= 95 % of the steps here. The e2m1 layouts (``v41_fp4``, ``v41_fp4_new``; ~9.5 %
relative error per value, one mantissa bit) keep it at ~89-95 % on this model (CPU, fp32 model: 89 % over
64 steps and 93.8 % / 95.3 % over 256 steps of the demo's 4-layer model, two prompt seeds): at or below the
95 % goal, which the demo then reports as FAILED. Their test pins that they still follow the plain run
closely (>= 85 %) and that their logit error is the larger one.
"""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, run_cli
from mlakv.demo import options, serve
from mlakv.demo.model import MLAConfig, QuantizedPoolKVCache, default_dtype
from mlakv.mem_cache import MLATokenToKVPool
from mlakv.ops.v4 import V4_LAYOUTS

E4M3_LAYOUTS = ["v4", "v41", "v41_new"]
E2M1_LAYOUTS = ["v41_fp4", "v41_fp4_new"]
SMALL = MLAConfig(vocab_size=512, hidden=128, n_heads=2, n_layers=2)
PROMPTS, PROMPT_LEN, NEW_TOKENS = 4, 24, 17  # 4 x 16 = 64 decode steps compared


def _prompts(seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, SMALL.vocab_size, (PROMPT_LEN,), generator=g).tolist() for _ in range(PROMPTS)]


_RESULTS: dict[str, dict] = {}


def agreement_of(fmt: str) -> dict:
    """The demo's comparison for ``fmt`` on the small model (computed once per format per run)."""
    if fmt not in _RESULTS:
        device = torch.device(DEVICE)
        _RESULTS[fmt] = serve.v4_greedy_agreement(SMALL, device, default_dtype(device), fmt, _prompts(), NEW_TOKENS)
    return _RESULTS[fmt]




# ---- the command line offers every format the pool has ------------------------------------------
def test_demo_offers_every_v4_layout_of_the_pool():
    assert options.V4_FORMATS == list(V4_LAYOUTS) == list(serve.V4_FORMATS)
    assert options.KV_CACHE_FORMATS == ["ds_mla", "per_tensor", *V4_LAYOUTS]


@pytest.mark.parametrize("bad", ["0", "1.5", "-0.1", "most"])
def test_min_agreement_outside_0_1_is_a_usage_error(bad, capsys):
    rc, _, err = run_cli(["demo", "--kv-cache-format", "v41", "--min-agreement", bad], capsys)
    assert rc == 2 and "--min-agreement" in err and "fraction" in err


# ---- the cache the model runs on ------------------------------------------------------------------
def test_quantized_cache_refuses_a_pool_of_plain_rows():
    pool = MLATokenToKVPool(64, 1, torch.float32, 448, 64, 1, "cpu")
    with pytest.raises(ValueError, match="kv_cache_format"):
        QuantizedPoolKVCache(pool, torch.float32)


@pytest.mark.parametrize("fmt", list(V4_LAYOUTS))
def test_quantized_cache_writes_the_pages_and_gathers_them_dequantized_in_the_model_dtype(fmt):
    pool = MLATokenToKVPool(192, 64, torch.bfloat16, 448, 64, 1, DEVICE, kv_cache_format=fmt)
    cache = QuantizedPoolKVCache(pool, torch.float32)
    g = torch.Generator().manual_seed(5)
    nope, rope = torch.randn(6, 448, generator=g).to(DEVICE), torch.randn(6, 64, generator=g).to(DEVICE)
    loc = torch.tensor([3, 64, 65, 100, 130, 191], device=DEVICE)
    cache.write(0, loc, nope, rope)  # fp32 sources: rounded to the pool's bf16, then quantized
    slots = loc.view(2, 3)
    c_nope, c_rope = cache.gather(0, slots)
    assert c_nope.shape == (2, 3, 448) and c_rope.shape == (2, 3, 64) and c_nope.dtype == torch.float32
    ref_nope, ref_rope = pool.get_mla_kv_buffer(0, loc, dst_dtype=torch.float32)
    assert torch.equal(c_nope.reshape(6, 448), ref_nope) and torch.equal(c_rope.reshape(6, 64), ref_rope)
    rel = (torch.cat([ref_nope, ref_rope], -1) - torch.cat([nope, rope], -1)).norm() / torch.cat([nope, rope], -1).norm()
    assert 0 < float(rel) < (0.12 if fmt in E2M1_LAYOUTS else 0.04)


# ---- the end-to-end comparison --------------------------------------------------------------------
@pytest.mark.parametrize("fmt", list(V4_LAYOUTS))
def test_every_decode_step_is_compared_on_the_same_inputs(fmt):
    res = agreement_of(fmt)
    assert res["format"] == fmt and res["steps"] == PROMPTS * (NEW_TOKENS - 1)
    assert 0 < res["mean_abs"] <= res["max_abs"] < 0.5  # the quantized pages are really read, and stay close
    assert res["first_agreement"] >= 0.75


@pytest.mark.parametrize("fmt", E4M3_LAYOUTS)
def test_e4m3_layouts_keep_the_plain_runs_greedy_token_at_95_percent_of_decode_steps(fmt):
    res = agreement_of(fmt)
    assert res["agreement"] >= serve.MIN_AGREEMENT == 0.95, res


@pytest.mark.parametrize("fmt", E2M1_LAYOUTS)
def test_e2m1_layouts_follow_the_plain_run_with_the_larger_error_of_one_mantissa_bit(fmt):
    res, e4m3 = agreement_of(fmt), agreement_of("v41")
    assert res["agreement"] >= 0.85, res
    assert res["mean_abs"] > 2 * e4m3["mean_abs"]


@pytest.mark.parametrize("pair", [("v41", "v41_new"), ("v41_fp4", "v41_fp4_new")])
def test_interleaved_pages_give_the_same_run_as_the_block_split_ones(pair):
    a, b = (agreement_of(f) for f in pair)
    assert {k: v for k, v in a.items() if k != "format"} == {k: v for k, v in b.items() if k != "format"}


# ---- the demo command -----------------------------------------------------------------------------
def test_demo_with_a_v4_format_prints_the_agreement_and_the_logit_error(capsys):
    rc, out, err = run_cli(
        ["demo", "--layers", "1", "--prompts", "1", "--prompt-len", "8", "--decode-batch", "2", "--decode-steps", "2",
         "--kv-cache-format", "v41", "--agreement-tokens", "5"], capsys,
    )  # fmt: skip
    line = [ln for ln in out.splitlines() if ln.startswith("V4-family KV cache (v41:")]
    assert len(line) == 1, out + err
    assert "decode steps" in line[0] and "logits max abs diff" in line[0] and "mean abs diff" in line[0]
    assert rc == (0 if "PASSED (needs >= 95%)" in line[0] else 1), out + err
    assert "FP8 KV cache" not in out


def test_demo_fails_when_agreement_is_below_min_agreement(capsys, monkeypatch):
    def low(cfg, device, dtype, fmt, prompts, new_tokens):
        return {"format": fmt, "agreement": 0.9, "steps": 10, "first_agreement": 1.0, "max_abs": 0.1, "mean_abs": 0.01}

    monkeypatch.setattr(serve, "v4_greedy_agreement", low)
    argv = ["demo", "--layers", "1", "--prompts", "1", "--prompt-len", "8", "--decode-batch", "2", "--decode-steps", "2",
            "--kv-cache-format", "v4"]  # fmt: skip
    rc, out, _ = run_cli(argv, capsys)
    assert rc == 1 and "9/10 decode steps (90.0%" in out and "FAILED (needs >= 95%)" in out
    rc, out, _ = run_cli(argv + ["--min-agreement", "0.9"], capsys)
    assert rc == 0 and "PASSED (needs >= 90%)" in out
