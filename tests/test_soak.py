"""Seeded randomized soak of the write and gather paths: many mixed calls in one process, each checked.

Every call draws, from a seeded generator: an entry (the dispatcher, the pool's ``set_kv_buffer``,
the JIT kernel's direct entry, the Triton row kernel, the gather, a CUDA-graph replay of the
dispatcher), a row layout (bf16 512+64, fp16 512+64, uint8 528+128, rope-less bf16 512+0), how
many rows (0 up to 70 000 on the GPU, small on the CPU), ``loc`` as int32 or int64 with padding
(``-1``), the reserved slot, and, unchecked on the GPU, slots past the buffer, laid out contiguous,
strided, with a storage offset or expanded (stride 0), and sources contiguous, strided (cut out
of wider rows), 3-D or expanded; sources are allocated for the call and freed after it. Now and
then a call that must be refused (a float ``loc``) checks that nothing was written.

After every call the whole buffer is compared bit for bit with a mirror kept by this file's own
reference (an indexed copy of integer views), so a misplaced, missing or stray row anywhere shows
at the call that made it, with the seed and the call's description.

GPU (part of the GPU suite): 2 000 warm-up calls (checked, untimed: they compile the Triton
specializations and load the JIT modules), then 20 000 calls, every entry among them; the count and
the time are printed (run with ``-s``) and recorded as test properties, not asserted (the time depends
on what else the GPU and the host run; speed is the benchmarks' to show).
CPU (CI): 200 calls; the Triton kernels run under the interpreter, so row counts stay small.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Optional

import pytest
import torch

from conftest import HAS_CUDA, HAS_TRITON, IS_SM90, bits
from mlakv.mem_cache import MLATokenToKVPool, set_mla_kv_buffer_triton

# (name, pool dtype, kv_lora_rank, rope_dim)
LAYOUTS = [
    ("bf16_512_64", torch.bfloat16, 512, 64),
    ("fp16_512_64", torch.float16, 512, 64),
    ("u8_528_128", torch.uint8, 528, 128),
    ("bf16_512_0", torch.bfloat16, 512, 0),
]
RESERVED = 0  # the pool's reserved slot: pool writes skip it, as sglang's padding convention needs


@dataclasses.dataclass
class Config:
    calls: int
    max_n: int  # the largest n_loc drawn
    big_n_every: int  # draw a large n_loc (up to max_n) once in this many calls
    small_n: int  # typical n_loc upper bound
    size: int  # pool token slots
    entries: tuple[str, ...]
    out_of_range: bool  # unchecked slots past the buffer (GPU: skipped by every kernel)
    graph_sizes: tuple[int, ...] = ()


def _random_source(g: torch.Generator, n: int, d: int, dtype: torch.dtype, device, layout: str) -> torch.Tensor:
    """Fresh ``[n, d]`` (or ``[n, 1, d]``) rows of random bits in one of several memory layouts."""
    def raw(rows: int, cols: int) -> torch.Tensor:
        es = torch.empty((), dtype=dtype).element_size()
        b = torch.randint(0, 256, (rows * cols * es,), generator=g, dtype=torch.uint8, device=device)
        return b.view(dtype).view(rows, cols)

    if layout == "contiguous":
        return raw(n, d)
    if layout == "strided":  # a column slice of wider rows: row stride > d, offset start
        return raw(n, d + 24)[:, 8 : 8 + d]
    if layout == "3d":
        return raw(n, d).unsqueeze(1)
    if layout == "expanded":  # one row repeated, row stride 0
        return raw(1, d).expand(n, d)
    raise AssertionError(layout)


def _random_loc(g: torch.Generator, n: int, num_slots: int, dtype: torch.dtype, device, layout: str,
                pad_frac: float, oor: bool) -> torch.Tensor:
    """``n`` slot indices (distinct where not padding), in a random layout (contiguous/strided/offset/expanded)."""
    if layout == "expanded":
        value = torch.randint(-num_slots // 2, num_slots, (1,), generator=g, device=device).clamp_min(-1)
        return value.to(dtype).expand(n)
    slots = torch.randperm(num_slots, generator=g, device=device)[:n]
    if n and pad_frac:
        slots[torch.rand(n, generator=g, device=device) < pad_frac] = -1
    if oor and n:
        slots[torch.rand(n, generator=g, device=device) < 0.05] = num_slots + 12345
    slots = slots.to(dtype)
    if layout == "strided":
        wide = torch.full((2 * n,), -7, dtype=dtype, device=device)
        wide[::2] = slots
        return wide[::2]
    if layout == "offset":
        wide = torch.full((n + 3,), -7, dtype=dtype, device=device)
        wide[3:] = slots
        return wide[3:]
    return slots


def _rows2d(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], t.shape[-1]) if t.dim() == 3 else t


def reference_write(mirror: torch.Tensor, loc: torch.Tensor, nope: torch.Tensor, rope: Optional[torch.Tensor],
                    skip: Optional[int]) -> None:
    """This test's own spec of the write, on integer views: rows whose slot is in ``[0, num_slots)``
    and not ``skip`` get ``[nope | rope]``; nothing else changes."""
    num_slots = mirror.shape[0]
    loc = loc.to(torch.long)
    keep = (loc >= 0) & (loc < num_slots)
    if skip is not None:
        keep &= loc != skip
    parts = [bits(_rows2d(nope))] + ([bits(_rows2d(rope))] if rope is not None and rope.shape[-1] else [])
    rows = torch.cat(parts, dim=1)
    mirror[loc[keep], : rows.shape[1]] = rows[keep]


class Soak:
    """One seeded soak run: pools per layout, a mirror per pool, the entries, the checks."""

    def __init__(self, cfg: Config, seed: int, device: str) -> None:
        self.cfg, self.device = cfg, torch.device(device)
        self.g = torch.Generator().manual_seed(seed)  # the draws (CPU)
        self.gd = torch.Generator(device=self.device).manual_seed(seed)  # the data (on the device)
        self.seed = seed
        self.pools, self.mirrors = {}, {}
        for name, dtype, nope, rope in LAYOUTS:
            pool = MLATokenToKVPool(cfg.size, 1, dtype, nope, rope, 1, self.device)
            raw = pool.kv_buffer[0].view(torch.uint8)
            raw.copy_(torch.randint(0, 256, raw.shape, generator=self.gd, dtype=torch.uint8, device=self.device))
            self.pools[name] = pool
            self.mirrors[name] = bits(pool.kv_buffer[0]).reshape(pool.num_slots, -1).clone()
        self.counts: dict[str, int] = {}
        self.graphs: dict[tuple, tuple] = {}

    # ---- draws ------------------------------------------------------------------------------
    def _pick(self, options):
        return options[int(torch.randint(0, len(options), (), generator=self.g))]

    def _n(self) -> int:
        cfg = self.cfg
        if int(torch.randint(0, cfg.big_n_every, (), generator=self.g)) == 0:
            return int(torch.randint(0, cfg.max_n + 1, (), generator=self.g))
        return int(torch.randint(0, cfg.small_n + 1, (), generator=self.g))

    # ---- one call -----------------------------------------------------------------------------
    def step(self, i: int) -> None:
        entry = self._pick(self.cfg.entries)
        name, dtype, nope_dim, rope_dim = self._pick(LAYOUTS)
        pool, mirror = self.pools[name], self.mirrors[name]
        kv = pool.kv_buffer[0]
        if entry == "graph":
            return self._graph_step(i, name)
        n = self._n()
        loc_layout = self._pick(("contiguous", "contiguous", "strided", "offset", "expanded"))
        loc_dtype = self._pick((torch.int32, torch.int64))
        oor = self.cfg.out_of_range and entry not in ("pool",)
        loc = _random_loc(self.gd, n, pool.num_slots, loc_dtype, self.device, loc_layout,
                          float(torch.rand((), generator=self.g)) * 0.3, oor)
        what = f"call {i} seed {self.seed}: {entry} {name} n={n} loc {loc_layout} {loc_dtype}"
        if entry == "gather":
            return self._gather_step(what, pool, mirror, loc, nope_dim, rope_dim)
        src_layout = "expanded" if loc_layout == "expanded" else self._pick(("contiguous", "strided", "3d"))
        what += f" src {src_layout}"
        k_nope = _random_source(self.gd, n, nope_dim, dtype, self.device, src_layout)
        k_rope = _random_source(self.gd, n, rope_dim, dtype, self.device, src_layout)
        if entry == "refused":
            before = mirror.clone()
            with pytest.raises(TypeError, match="loc"):
                set_mla_kv_buffer_triton(kv, loc.float(), k_nope, k_rope)
            self.counts["refused"] = self.counts.get("refused", 0) + 1
            return self._check(what, kv, before)
        skip = None
        if entry == "pool":
            pool.set_kv_buffer(0, loc, k_nope, k_rope)
            skip = RESERVED
        elif entry == "dispatch":
            skip = RESERVED if torch.rand((), generator=self.g) < 0.3 else None
            view = kv if torch.rand((), generator=self.g) < 0.5 else kv.select(1, 0)  # 3-D or 2-D buffer
            set_mla_kv_buffer_triton(view, loc, k_nope, k_rope, reserved_skip_index=skip)
        elif entry == "jit":
            from mlakv import jit_kernel

            es = kv.element_size()
            ok = jit_kernel.can_use_set_mla_kv_buffer(nope_dim * es, rope_dim * es, self.device)
            if ok and jit_kernel.jit_accepts_layout(kv, k_nope, k_rope):
                jit_kernel.set_mla_kv_buffer(kv, loc, k_nope, k_rope)
            else:  # a layout the kernel does not take: the dispatcher serves it
                what += " (jit refused layout -> dispatch)"
                set_mla_kv_buffer_triton(kv, loc, k_nope, k_rope)
        elif entry == "triton":
            from mlakv.kernels.triton.row_write import launch_set_kv_rows

            if n:
                launch_set_kv_rows(kv, loc, k_nope, k_rope)
        else:
            raise AssertionError(entry)
        reference_write(mirror, loc, k_nope, k_rope, skip)
        self.counts[entry] = self.counts.get(entry, 0) + 1
        self._check(what, kv, mirror)

    def _gather_step(self, what, pool, mirror, loc, nope_dim, rope_dim) -> None:
        got_nope, got_rope = pool.get_mla_kv_buffer(0, loc)
        idx = loc.to(torch.long)
        valid = (idx >= 0) & (idx < pool.num_slots)
        want = torch.where(valid[:, None], mirror[torch.where(valid, idx, 0)], torch.zeros((), dtype=mirror.dtype))
        assert torch.equal(bits(got_nope), want[:, :nope_dim]), what
        assert torch.equal(bits(got_rope), want[:, nope_dim : nope_dim + rope_dim]), what
        self.counts["gather"] = self.counts.get("gather", 0) + 1

    def _graph_step(self, i: int, name: str) -> None:
        """Replay a captured dispatcher write (PDL on SM90+) with new data in its static inputs."""
        n = self._pick(self.cfg.graph_sizes)
        pool, mirror = self.pools[name], self.mirrors[name]
        kv = pool.kv_buffer[0]
        key = (name, n)
        if key not in self.graphs:
            loc = torch.full((n,), -1, dtype=torch.int64, device=self.device)
            nope = torch.zeros((n, pool.kv_lora_rank), dtype=kv.dtype, device=self.device)
            rope = torch.zeros((n, pool.qk_rope_head_dim), dtype=kv.dtype, device=self.device)
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):  # warm-up outside the capture (builds JIT modules, Triton caches)
                set_mla_kv_buffer_triton(kv, loc, nope, rope)
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                set_mla_kv_buffer_triton(kv, loc, nope, rope)
            self.graphs[key] = (graph, loc, nope, rope)
        graph, loc, nope, rope = self.graphs[key]
        _, dtype, nope_dim, rope_dim = next(lay for lay in LAYOUTS if lay[0] == name)
        loc.copy_(_random_loc(self.gd, n, pool.num_slots, torch.int64, self.device, "contiguous", 0.2, False))
        nope.copy_(_random_source(self.gd, n, nope_dim, dtype, self.device, "contiguous"))
        rope.copy_(_random_source(self.gd, n, rope_dim, dtype, self.device, "contiguous"))
        graph.replay()
        reference_write(mirror, loc, nope, rope, None)
        self.counts["graph"] = self.counts.get("graph", 0) + 1
        self._check(f"call {i} seed {self.seed}: graph {name} n={n}", kv, mirror)

    def _check(self, what: str, kv: torch.Tensor, mirror: torch.Tensor) -> None:
        got = bits(kv).reshape(mirror.shape)
        if not torch.equal(got, mirror):
            rows = (got != mirror).any(dim=1).nonzero().flatten()
            raise AssertionError(f"{what}: {rows.numel()} rows differ from the reference, first {rows[:8].tolist()}")


def _run(cfg: Config, seed: int, device: str, record_property, warmup_calls: int = 0) -> tuple[dict[str, int], float]:
    """``warmup_calls`` checked but untimed calls first (they compile the Triton variants and load
    the JIT modules the draws need), then ``cfg.calls`` timed ones: ``(calls per entry, seconds)``."""
    soak = Soak(cfg, seed, device)
    t_warm = time.perf_counter()
    for i in range(warmup_calls):
        soak.step(i)
    if warmup_calls:
        print(f"\nsoak warm-up: {warmup_calls} calls in {time.perf_counter() - t_warm:.1f} s (compiles included)")
    soak.counts.clear()
    t0 = time.perf_counter()
    for i in range(warmup_calls, warmup_calls + cfg.calls):
        soak.step(i)
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    summary = ", ".join(f"{k}={v}" for k, v in sorted(soak.counts.items()))
    print(f"\nsoak: {cfg.calls} calls on {device} in {elapsed:.1f} s (seed {seed}; {summary})")
    record_property("soak_calls", cfg.calls)
    record_property("soak_seconds", round(elapsed, 2))
    record_property("soak_entries", summary)
    return soak.counts, elapsed


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(HAS_CUDA, reason="the CPU soak (Triton interpreter); the GPU runs test_soak_gpu")
def test_soak_cpu_200_calls(record_property):
    cfg = Config(calls=200, max_n=200, big_n_every=25, small_n=24, size=256,
                 entries=("dispatch", "dispatch", "pool", "triton", "gather", "refused"), out_of_range=False)
    counts, _ = _run(cfg, seed=1234, device="cpu", record_property=record_property)
    assert sum(counts.values()) == 200
    assert set(counts) == set(cfg.entries)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (none present)")
def test_soak_gpu_20000_calls(record_property):
    entries = ("dispatch", "dispatch", "pool", "triton", "gather", "graph", "refused") + (("jit", "jit") if IS_SM90 else ())
    cfg = Config(calls=20000, max_n=70000, big_n_every=200, small_n=300, size=80000, entries=entries,
                 out_of_range=True, graph_sizes=(1, 8, 64, 512))
    counts, _ = _run(cfg, seed=20261124, device="cuda", record_property=record_property, warmup_calls=2000)
    assert sum(counts.values()) == 20000
    assert set(counts) == set(entries)
