"""How every mlakv bench measures time: one module, so all benches read their clocks the same way.

* :func:`graph_median_us`: the device time of a call — the median replay of a CUDA graph holding
  ``calls`` of them (``triton.testing.do_bench_cudagraph``), divided by ``calls``; no host cost.
* :func:`rotating`: a body that calls ``fn`` once on each of several independent input sets
  (:data:`INPUT_SETS` by default), so a timed call's sources are not still in L2 from the last one.
* :func:`graph_length_us`: the same, in a graph of a given number of runs of the body (is a call's time
  the graph's or its own?).
* :func:`cold_median_us`: eager median with the L2 flushed between calls (``do_bench``).
* :func:`event_median_us`: eager median of CUDA-event pairs around each call (host launch included).
* :func:`copy_bandwidth_gbs` / :func:`one_element_graph_us`: the two floors a call is read against —
  device-to-device copy bandwidth (bytes read + written) and the graph time of a one-element kernel.
* :func:`wall_median_s`: synchronized wall time, the fallback where there is no GPU (and for
  host <-> device transfers, which a graph does not time as the engine runs them).
* :func:`host_rounds_us` / :func:`interleaved_us`: the host cost of eager calls, in rounds of many
  calls with no sync inside a round; several callables interleaved round-robin so drift hits all alike.

Progress lines (:func:`progress`) go to stderr; :func:`on_progress` lets a bench's main run a hook after
each (a bench writes what it has measured so far there, so a run killed outright keeps it).

Benches import these and nothing of each other. ``triton`` is imported on use (GPU paths only).
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch

__all__ = [
    "INPUT_SETS",
    "progress",
    "on_progress",
    "sync",
    "rotating",
    "graph_median_us",
    "graph_length_us",
    "cold_median_us",
    "event_median_us",
    "copy_bandwidth_gbs",
    "one_element_graph_us",
    "wall_median_s",
    "host_rounds_us",
    "interleaved_us",
]

#: Input sets a timed body cycles through (8 layers' worth): together larger than L2 at the sizes
#: where L2 would matter, so each call reads its sources from memory as a model's layers do.
INPUT_SETS = 8


_PROGRESS_HOOKS: list[Callable[[], None]] = []


def progress(msg: str) -> None:
    """A progress line on stderr (a bench's report goes to stdout), then the :func:`on_progress` hooks."""
    print(msg, file=sys.stderr, flush=True)
    for hook in list(_PROGRESS_HOOKS):
        hook()


@contextlib.contextmanager
def on_progress(hook: Callable[[], None]) -> Iterator[None]:
    """While active, ``hook()`` runs after every :func:`progress` line (in the measuring thread, between
    measurements). A hook that raises ``Exception`` is reported once on stderr and not run again: it
    must not stop the measuring."""
    def guarded() -> None:
        try:
            hook()
        except Exception as e:  # noqa: BLE001 - a checkpoint's failure is reported, the run goes on
            _PROGRESS_HOOKS.remove(guarded)
            print(f"progress hook failed, not run again: {type(e).__name__}: {e}", file=sys.stderr, flush=True)

    _PROGRESS_HOOKS.append(guarded)
    try:
        yield
    finally:
        if guarded in _PROGRESS_HOOKS:
            _PROGRESS_HOOKS.remove(guarded)


def sync(device: Optional[torch.device | str] = None) -> None:
    """Wait for ``device``'s work when it is a CUDA device (or, with None, when CUDA is present); else nothing."""
    if device is None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    elif torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def rotating(fn: Callable[..., object], input_sets: Iterable[Sequence[object]]) -> Callable[[], None]:
    """A body that calls ``fn(*args)`` once for each ``args`` of ``input_sets``, in order.

    Time it with :func:`graph_median_us` and ``calls=len(input_sets)`` for the time of one call.
    """
    sets = [tuple(s) for s in input_sets]

    def body() -> None:
        for args in sets:
            fn(*args)

    return body


def graph_median_us(body: Callable[[], object], calls: int = 1, rep: int = 40) -> float:
    """Median CUDA-graph replay time of ``body`` in µs, divided by the ``calls`` it makes.

    ``body`` runs once eagerly first (outside the capture: builds modules, compiles kernels).
    """
    import triton.testing as tt

    body()
    torch.cuda.synchronize()
    return tt.do_bench_cudagraph(body, rep=rep, return_mode="median") * 1e3 / calls


def graph_length_us(body: Callable[[], object], calls: int, length: int, replays: int = 7) -> float:
    """Median time in µs per call of a CUDA graph holding ``length`` runs of ``body`` (each making
    ``calls`` calls), over ``replays`` replays timed with CUDA events.

    ``body`` runs once eagerly first (outside the capture: builds modules, compiles kernels).
    """
    body()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(length):
            body()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / (length * calls))
    del graph
    return statistics.median(times)


def cold_median_us(fn: Callable[[], object], warmup: int = 5, rep: int = 20) -> float:
    """Eager median time (µs) of ``fn`` with the L2 cache flushed before each call (``do_bench``)."""
    import triton.testing as tt

    return tt.do_bench(fn, warmup=warmup, rep=rep, return_mode="median") * 1e3


def event_median_us(fn: Callable[[], object], reps: int = 50, warmup: int = 5) -> float:
    """Median time (µs) between CUDA events recorded around each eager call of ``fn``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s of one ``copy_`` of ``nbytes``, counting bytes read plus written."""
    import triton.testing as tt

    def copy_ms() -> float:  # the buffers are freed on return, before the cache is emptied
        src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_(0, 256)
        dst = torch.empty_like(src)
        return tt.do_bench(lambda: dst.copy_(src), warmup=10, rep=100, return_mode="median")

    ms = copy_ms()
    torch.cuda.empty_cache()
    return 2 * nbytes / (ms * 1e-3) / 1e9


def one_element_graph_us(calls: int = INPUT_SETS) -> float:
    """Graph time per call of a one-element kernel, ``calls`` per graph (a launch floor)."""
    import triton.testing as tt

    xs = [torch.zeros(1, device="cuda") for _ in range(calls)]

    def body() -> None:
        for x in xs:
            x.add_(1)

    body()
    return tt.do_bench_cudagraph(body, rep=100, return_mode="median") * 1e3 / calls


def wall_median_s(fn: Callable[[], object], device: Optional[torch.device | str] = None, reps: int = 5,
                  warmup: int = 1) -> float:  # fmt: skip
    """Median wall time (s) of ``fn`` over ``reps`` runs, each synchronized with ``device`` before and after."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def host_rounds_us(call: Callable[[], object], n: int = 2000, rounds: int = 5) -> list[float]:
    """Host time per eager call (µs) in each of ``rounds`` rounds of ``n`` calls (no sync inside a round)."""
    for _ in range(min(n, 50)):
        call()
    sync()
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            call()
        out.append((time.perf_counter() - t0) / n * 1e6)
        sync()
    return out


def interleaved_us(steps: dict[str, Callable[[], object]], calls: int, rounds: int,
                   sync_fn: Callable[[], object] = sync, warmup: int = 50) -> dict[str, float]:  # fmt: skip
    """Median host µs per call of each step over ``rounds`` batches of ``calls``, the steps round-robin.

    Each step is called ``warmup`` times first; ``sync_fn`` runs after each batch, outside its time.
    """
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    sync_fn()
    samples: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            samples[name].append((time.perf_counter() - t0) / calls * 1e6)
            sync_fn()
    return {k: statistics.median(v) for k, v in samples.items()}
