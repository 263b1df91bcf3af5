"""The ``mlakv demo`` command line, apart from the demo so it parses before torch loads.

``mlakv demo --help`` and every usage error answer from here in a fraction of a second: this module
imports neither torch nor the model (only :mod:`mlakv.argtypes`). :mod:`mlakv.demo.serve` takes its
parser from here, so the option the demo reads and the help a user reads are one definition.
"""

from __future__ import annotations

import argparse

from mlakv.argtypes import positive_int

__all__ = ["build_parser"]


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
    ap.add_argument("--kv-cache-format", choices=["ds_mla", "per_tensor"], default=None,
                    help="also run the model on an FP8 cache of this format (quantized in the write, dequantized in "
                    "the gather) and report how far its logits move from the plain cache's")  # fmt: skip
    ap.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the fused cache step (RoPE on k_pe/q_pe, the row write and the absorbed query in "
                    "one launch per layer) where the pool takes it (bf16/fp16 rows: the GPU run), and use it in the "
                    "reference check (default on; --no-fused: only the separate kernels)")  # fmt: skip
    ap.add_argument("--l3", choices=["mooncake"], default=None,
                    help="run the HiCache L3 demo instead: a shared prefix backed up to Mooncake Store by one node "
                    "and loaded by another (starts its own mooncake_master; mlakv.demo.l3)")  # fmt: skip
    return ap
