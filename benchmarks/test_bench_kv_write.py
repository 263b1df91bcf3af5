"""pytest-benchmark entry: the row-write providers side by side as benchmark groups.

    pip install "mlakv[test]" && pytest benchmarks --benchmark-group-by=param:n_loc

Not part of the test run (``testpaths = tests``). On a GPU each round is one synchronized call,
so these numbers include launch overhead; the CUDA-graph medians of ``mlakv bench`` are the ones
to compare kernels by. Each provider is checked bit-exactly before it is timed; a provider that
cannot run here is skipped with the reason.
"""

from __future__ import annotations

import pytest
import torch

from mlakv.bench.kv_write import CPU_PROVIDERS, LAYOUTS, PROVIDERS, check_provider, make_layers, provider_fn, provider_unavailable

CUDA = torch.cuda.is_available()


@pytest.mark.parametrize("n_loc", [1, 128, 4096] if CUDA else [1, 128])
@pytest.mark.parametrize("layout", ["bf16", "u8"])
@pytest.mark.parametrize("provider", PROVIDERS if CUDA else CPU_PROVIDERS)
def test_kv_write(benchmark, provider, layout, n_loc):
    why = provider_unavailable(provider, LAYOUTS[layout])
    if why:
        pytest.skip(why)
    inp = make_layers(LAYOUTS[layout], n_loc, torch.int64, "cuda" if CUDA else "cpu", 1)[0]
    fn = provider_fn(provider)
    err = check_provider(fn, inp)
    assert err is None, err

    def call():
        fn(inp.kv, inp.loc, inp.nope, inp.rope)
        if CUDA:
            torch.cuda.synchronize()

    benchmark(call)
