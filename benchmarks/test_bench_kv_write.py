"""pytest-benchmark entry: the providers side by side as benchmark groups.

    pytest benchmarks --benchmark-group-by=param:n_loc

Not part of the test run (``testpaths = tests``). On a GPU each round is one synchronized call,
so these numbers include launch overhead; the CUDA-graph medians of ``python -m mlakv bench``
are the ones to compare kernels by. Each provider is checked bit-exactly before it is timed.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.kv_write_bench import LAYOUTS, _check, _make_layers, _provider_available, _provider_fn

CUDA = torch.cuda.is_available()
PROVIDERS = ["auto", "jit", "triton", "legacy", "torch"] if CUDA else ["auto", "torch"]


@pytest.mark.parametrize("n_loc", [1, 128, 4096] if CUDA else [1, 128])
@pytest.mark.parametrize("layout", ["bf16", "u8"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_kv_write(benchmark, provider, layout, n_loc):
    why = _provider_available(provider, LAYOUTS[layout])
    if why:
        pytest.skip(why)
    inp = _make_layers(LAYOUTS[layout], n_loc, torch.int64, "cuda" if CUDA else "cpu", 1)[0]
    fn = _provider_fn(provider)
    err = _check(fn, inp)
    assert err is None, err

    def call():
        fn(inp.kv, inp.loc, inp.nope, inp.rope)
        if CUDA:
            torch.cuda.synchronize()

    benchmark(call)
