"""The ``mlakv demo`` command line, apart from the demo so it parses before torch loads.

``mlakv demo --help`` and every usage error answer from here in a fraction of a second: this module
imports neither torch nor the model (only :mod:`mlakv.argtypes`). :mod:`mlakv.demo.serve` takes its
parser from here, so the option the demo reads and the help a user reads are one definition.
"""

from __future__ import annotations

import argparse

from mlakv.argtypes import positive_int

__all__ = ["build_parser", "KV_CACHE_FORMATS", "FP8_FORMATS", "V4_FORMATS"]

FP8_FORMATS = ["ds_mla", "per_tensor"]  # 576-value rows quantized to FP8 (mlakv.ops.fp8)
V4_FORMATS = ["v4", "v41", "v41_fp4", "v41_new", "v41_fp4_new"]  # the DeepSeek-V4 family's pages (mlakv.ops.v4)
KV_CACHE_FORMATS = FP8_FORMATS + V4_FORMATS


def _fraction(text: str) -> float:
    """A number in (0, 1], or ``argparse.ArgumentTypeError`` naming the value."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}") from None
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    """The ``mlakv demo`` parser (defaults: GPU sizes / CPU sizes)."""
    ap = argparse.ArgumentParser(
        prog="mlakv demo",
        description="Serve a small DeepSeek-style MLA model through the pool: a reference check against a "
        "dict-of-tensors cache, then prefill and decode timed with three KV-write variants (the write's share "
        "of a step is reported on a GPU only).",
    )
    ap.add_argument("--layers", type=positive_int, default=4, help="transformer layers of the model (default 4)")
    ap.add_argument("--prompts", type=positive_int, default=None, help="prefill batch: number of prompts (default GPU 16, CPU 4)")
    ap.add_argument("--prompt-len", type=positive_int, default=None, help="tokens per prompt (default GPU 1024, CPU 64)")
    ap.add_argument("--decode-batch", type=positive_int, default=None, help="requests decoded together (default GPU 32, CPU 8)")
    ap.add_argument("--decode-steps", type=positive_int, default=None, help="decode steps timed per variant (default GPU 32, CPU 8)")
    ap.add_argument("--kv-cache-format", choices=KV_CACHE_FORMATS, default=None,
                    help="also run the model on a quantized cache of this format (quantized in the write, dequantized "
                    "in the gather) against the plain cache. ds_mla, per_tensor: FP8 rows, reports how far the logits "
                    "move. v4, v41, v41_fp4, v41_new, v41_fp4_new (DeepSeek-V4 family pages, page size 64): the model "
                    "at the V4 widths (kv_lora_rank 448 + rope 64), prefill and decode in lockstep with a plain-cache "
                    "run whose tokens both are fed; reports the share of decode steps with the same greedy token and "
                    "the logit error, and exits 1 below --min-agreement")  # fmt: skip
    ap.add_argument("--min-agreement", type=_fraction, default=0.95,
                    help="a V4-family --kv-cache-format run fails (exit 1) when fewer decode steps than this share "
                    "give the plain cache's greedy token (default 0.95)")  # fmt: skip
    ap.add_argument("--agreement-tokens", type=positive_int, default=32,
                    help="tokens generated per prompt (4 prompts) in the V4-family comparison (default 32)")  # fmt: skip
    ap.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the fused cache step (RoPE on k_pe/q_pe, the row write and the absorbed query in "
                    "one launch per layer) where the pool takes it (bf16/fp16 rows: the GPU run), and use it in the "
                    "reference check (default on; --no-fused: only the separate kernels)")  # fmt: skip
    ap.add_argument("--l3", choices=["mooncake"], default=None,
                    help="run the HiCache L3 demo instead: a shared prefix backed up to Mooncake Store by one node "
                    "and loaded by another (starts its own mooncake_master; mlakv.demo.l3)")  # fmt: skip
    return ap
