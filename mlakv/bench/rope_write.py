"""Fused RoPE write benchmark (``mlakv bench rope``): one launch vs the kernels it replaces, and sglang's.

Why: issue 25's goals compare :func:`mlakv.ops.rope_write.set_mla_kv_buffer_rope` (RoPE on k_pe and
q_pe, the cache-row write, the absorbed query ``[q_nope | q_pe]``, one launch) with what an engine
runs without it, and with sglang 0.5.23's ``set_mla_kv_concat_q`` (row write + query concat, no RoPE).
Per variant (cache format + query dtype), head count ``H`` and token count ``n`` (GPU, bf16 sources,
512 + 64, DeepSeek's interleaved RoPE unless ``--style neox``), the providers are:

* ``fused``: the public function (the dispatcher: the JIT CUDA kernel on SM90+);
* ``fused-triton``: the Triton kernel of the same step (``--triton-sweep`` adds it at every launch
  shape of :data:`mlakv.spec.tuning.ROPE_TRITON_SWEEP`, ``triton w<warps> q<query rows per program>``,
  and prints the fastest per point);
* ``jit``: the JIT CUDA kernel called directly at its table's launch (``--sweep`` adds it and its
  launch variants);
* ``unfused``: a RoPE kernel in place on ``q_pe`` and ``k_pe`` (sglang's own JIT RoPE, built from
  ``.peers/sglang`` with ``-fmad=false`` so its products round as the reference's do — memory-bound,
  it times the same; without the peer, mlakv's torch rotation), then mlakv's write
  (:func:`~mlakv.ops.dispatch.set_mla_kv_buffer_triton` / :func:`~mlakv.ops.fp8.set_mla_kv_buffer_quant`),
  then the query concatenation (``torch.cat`` into ``q_out``; for an e4m3 query, ``cat`` then a cast);
* ``sglang``: ``set_mla_kv_concat_q`` (bf16) / ``set_mla_kv_concat_q_fp8`` (per_tensor with scales
  1), fed the already-rotated ``k_pe``/``q_pe`` (it does not rotate); no ds_mla variant. sglang's
  kernel writes every ``loc`` (no padding rows), so the bench's slots are all valid.

Method: every provider is first checked byte for byte against the torch reference (run on the GPU's
copies) on fresh inputs with poisoned destinations; a wrong provider is reported and not timed.
Timing is the median CUDA-graph replay (``triton.testing.do_bench_cudagraph``) of one call on each of
several input sets (8, fewer when a set passes 128 MB), divided by their number, taken in forward
then reverse provider order and averaged. The bytes a call must move (sources, loc, positions, the
cos/sin row per token, the cache row and ``q_out``) at the measured device-to-device copy bandwidth
give the roofline each fused time is read against.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

from mlakv.ops.dispatch import set_mla_kv_buffer_triton
from mlakv.ops.fp8 import fp8_row_bytes, set_mla_kv_buffer_quant
from mlakv.ops.rope_write import set_mla_kv_buffer_rope
from mlakv.ops.rope_write_reference import rope_rotate_torch
from mlakv.spec.calls import RopeWriteCall

from .options import ROPE_CPU_SIZES as CPU_SIZES
from .options import ROPE_PROVIDERS as PROVIDERS
from .options import ROPE_QUICK_SIZES as QUICK_SIZES
from .options import ROPE_SIZES as DEFAULT_SIZES
from .options import ROPE_SWEEP as SWEEP
from .options import rope_parser as build_parser
from .report import merged_steps, rows_kept_on_interrupt, table_steps
from .timing import INPUT_SETS, copy_bandwidth_gbs, graph_median_us, one_element_graph_us, progress, rotating, wall_median_s

__all__ = ["VARIANTS", "build_parser", "make_sets", "providers_for", "check_provider", "call_bytes", "run", "format_report", "main"]

NOPE, ROPE = 512, 64
MAX_POS = 8192
#: variant -> (kv_cache_format, query kind)
VARIANTS = {"bf16": (None, "16bit"), "fp8": ("per_tensor", "fp8"), "ds_mla": ("ds_mla", "16bit")}
SET_BYTES_CAP = 128 << 20


# ---- inputs ----------------------------------------------------------------------------------------
def rope_table(max_pos: int = MAX_POS, rope_dim: int = ROPE, theta: float = 10000.0, device="cuda") -> torch.Tensor:
    """A plain RoPE table ``[max_pos, rope_dim]`` fp32 (cos half | sin half), norm-preserving, so an
    in-place RoPE applied on every graph replay keeps the values' size."""
    inv = theta ** (-torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim)
    ang = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv[None, :]
    return torch.cat([ang.cos(), ang.sin()], dim=1).float().to(device)


def kv_dtype(fmt: Optional[str]) -> torch.dtype:
    return torch.bfloat16 if fmt is None else torch.uint8


def row_width(fmt: Optional[str]) -> int:
    return NOPE + ROPE if fmt is None else fp8_row_bytes(fmt, NOPE, ROPE)


def make_set(n: int, heads: int, variant: str, cs: torch.Tensor, device="cuda", seed: int = 0) -> dict:
    """One layer's inputs: sources, slots (distinct, all valid), positions, a poisoned cache and
    ``q_out``, the scales (1.0: sglang's fp8 variant has none), and pre-rotated copies for sglang."""
    fmt, q_kind = VARIANTS[variant]
    g = torch.Generator(device=device).manual_seed(seed)  # drawn where they live: the large sets are GBs
    num_slots = n + 64
    d = dict(
        k_nope=torch.randn(n, NOPE, generator=g, device=device).to(torch.bfloat16),
        k_pe=torch.randn(n, ROPE, generator=g, device=device).to(torch.bfloat16),
        q_nope=torch.randn(n, heads, NOPE, generator=g, device=device).to(torch.bfloat16),
        q_pe=torch.randn(n, heads, ROPE, generator=g, device=device).to(torch.bfloat16),
        loc=torch.randperm(num_slots, generator=g, device=device)[:n],
        positions=torch.randint(0, cs.shape[0], (n,), generator=g, device=device),
        cs=cs,
        k_scale=torch.ones(1, dtype=torch.float32, device=device) if fmt == "per_tensor" else None,
        q_scale=torch.ones(1, dtype=torch.float32, device=device) if q_kind == "fp8" else None,
    )
    width = row_width(fmt) * (2 if fmt is None else 1)
    d["kv"] = torch.randint(0, 256, (num_slots, width), dtype=torch.uint8, generator=g, device=device).view(kv_dtype(fmt))
    q_dt = torch.bfloat16 if q_kind == "16bit" else torch.float8_e4m3fn
    q_w = (NOPE + ROPE) * (2 if q_kind == "16bit" else 1)
    d["q_out"] = torch.randint(0, 256, (n, heads, q_w), dtype=torch.uint8, generator=g, device=device).view(q_dt)
    d["fmt"], d["q_kind"] = fmt, q_kind
    return d


def set_bytes(n: int, heads: int) -> int:
    """About the memory one input set takes (sources, q_out, the rotated copies)."""
    return n * (heads * (NOPE + ROPE) * 2 * 3 + (NOPE + ROPE) * 4)


def make_sets(n: int, heads: int, variant: str, cs: torch.Tensor, device="cuda") -> list[dict]:
    """``INPUT_SETS`` layers' inputs, fewer (down to 2) when they would pass ``SET_BYTES_CAP`` each."""
    count = INPUT_SETS if set_bytes(n, heads) <= SET_BYTES_CAP else 2
    return [make_set(n, heads, variant, cs, device, seed=i) for i in range(count)]


def call_bytes(n: int, heads: int, variant: str) -> int:
    """Bytes one call must move: k sources, loc and position (8 bytes each), the cos/sin row, the
    query sources, and the writes: the cache row and ``q_out``."""
    fmt, q_kind = VARIANTS[variant]
    cache_row = row_width(fmt) * (2 if fmt is None else 1)
    q_row_out = (NOPE + ROPE) * (2 if q_kind == "16bit" else 1)
    per_token = (NOPE + ROPE) * 2 + 16 + ROPE * 4 + cache_row + heads * ((NOPE + ROPE) * 2 + q_row_out)
    return n * per_token


# ---- sglang peers -------------------------------------------------------------------------------------
_CONCAT_WRAPPER = """\
#include "elementwise/set_mla_kv_concat_q.cuh"

namespace sglang {
TVM_FFI_DLL_EXPORT_TYPED_FUNC(set_mla_kv_concat_q, (sglang::SetMlaKVConcatQKernel<1024, 128, true>::run));
TVM_FFI_DLL_EXPORT_TYPED_FUNC(set_mla_kv_concat_q_fp8, (sglang::SetMlaKVConcatQFp8Kernel<true>::run));
}  // namespace sglang
"""

_ROPE_WRAPPER = """\
#include "elementwise/rope.cuh"

namespace sglang {
TVM_FFI_DLL_EXPORT_TYPED_FUNC(rope_neox, (sglang::FusedRopeKernel<true, 64, true, bf16_t>::run));
TVM_FFI_DLL_EXPORT_TYPED_FUNC(rope_interleaved, (sglang::FusedRopeKernel<false, 64, true, bf16_t>::run));
}  // namespace sglang
"""


_PEER_BUILDS = (
    ("sglang_set_mla_kv_concat_q_1024_128_pdl", _CONCAT_WRAPPER, ()),
    # -fmad=false: the peer's x c - y s rounds each product as the reference does (bit-equal output)
    ("sglang_rope_64_bf16_pdl_nofma", _ROPE_WRAPPER, ("-fmad=false",)),
)


def _prebuild_job(job: tuple) -> Optional[str]:
    """One module build in a worker process (mlakv's kernel for a format, or a peer's): None or the error."""
    from mlakv.kernels.cuda.loader import JitUnavailable

    try:
        if job[0] == "mlakv":
            from mlakv.kernels.cuda.rope_write import build_rope_write_module

            build_rope_write_module(job[1], torch.bfloat16, NOPE, ROPE, True, job[2])
        else:
            from .sglang_peer import build_sglang_source

            build_sglang_source(job[1], job[2], job[4], extra_flags=job[3])
    except JitUnavailable as e:
        return str(e)
    return None


def prebuild(variants: list[str], with_peers: bool) -> None:
    """Build every module the run loads at once, one spawned process each, into the disk cache (built
    one by one on first use, mlakv's three and the two peers' would take minutes on a fresh machine)."""
    import multiprocessing

    from .sglang_peer import peer_absent_reason

    cap = torch.cuda.get_device_capability()
    jobs: list[tuple] = [("mlakv", VARIANTS[v][0], cap) for v in variants]
    if with_peers and peer_absent_reason() is None:
        jobs += [("peer", name, src, flags, cap) for name, src, flags in _PEER_BUILDS]
    with multiprocessing.get_context("spawn").Pool(len(jobs)) as pool:
        for job, err in zip(jobs, pool.map(_prebuild_job, jobs)):
            if err:
                progress(f"prebuild {job[1]}: {err}")


def sglang_modules() -> tuple[object, object, Optional[str]]:
    """``(concat module, rope module, reason)``: the peer kernels, or None with the reason they are absent."""
    from mlakv.kernels.cuda.loader import JitUnavailable

    from .sglang_peer import build_sglang_source, peer_absent_reason

    absent = peer_absent_reason()
    if absent:
        return None, None, absent
    try:
        (cn, cs, cf), (rn, rs, rf) = _PEER_BUILDS
        concat = build_sglang_source(cn, cs, extra_flags=cf)
        rope = build_sglang_source(rn, rs, extra_flags=rf)
    except JitUnavailable as e:
        return None, None, str(e)
    return concat, rope, None


# ---- providers ------------------------------------------------------------------------------------------
def _launch_triton(call: RopeWriteCall, **launch) -> None:
    from mlakv.kernels.triton.rope_write import launch_rope_write

    launch_rope_write(call, **launch)


def triton_sweep_names() -> list[str]:
    """The provider names of ``--triton-sweep``: each shape of :data:`mlakv.spec.tuning.ROPE_TRITON_SWEEP`
    with the PDL trigger right after the wait (``triton w<warps> q<rows>``), then at entry and after the
    stores (``... entry``, ``... end``)."""
    from mlakv.spec.tuning import ROPE_TRITON_SWEEP

    names = [f"triton w{w} q{q}" for w, q in ROPE_TRITON_SWEEP]
    return names + [f"{name} {place}" for place in ("entry", "end") for name in names]


def fastest_triton(report: dict) -> list[str]:
    """Per (variant, H, n): the fastest ``--triton-sweep`` shape, its time and the table's own
    (``fused-triton``); empty when the sweep did not run."""
    out = []
    for r in report["results"]:
        shapes = {k: v for k, v in r["times_us"].items() if k.startswith("triton w")}
        if shapes:
            best = min(shapes, key=shapes.get)
            own = r["times_us"].get("fused-triton")
            out.append(f"| {r['variant']} | {r['heads']} | {r['n']} | {best} | {_fmt(shapes[best])} | {_fmt(own)} |")
    if not out:
        return []
    return ["", "Fastest Triton shape (`--triton-sweep`)", "", "| variant | H | n | fastest | µs | table's shape µs |",
            "|---|---|---|---|---|---|", *out, *triton_rows(report)]  # fmt: skip


# the launch table's kind of each variant (what the launcher looks up: an FP8 query, else the cache format)
TABLE_KIND = {"bf16": "bf16", "fp8": "e4m3", "ds_mla": "ds_mla"}


def _sweep_shape(name: str) -> tuple[int, int, str]:
    """``"triton w<warps> q<rows>[ entry| end]"`` -> ``(warps, rows, place)`` (no place: right after the wait)."""
    parts = name.split()
    return int(parts[1][1:]), int(parts[2][1:]), parts[3] if len(parts) > 3 else "wait"


def triton_rows(report: dict) -> list[str]:
    """The ``ROPE_TRITON_STEPS`` rows a ``--triton-sweep`` makes, per table kind: at each swept query-row
    count ``n * H`` the shape with the least time summed over the points of that count (``n = 8, H = 16``
    and ``n = 1, H = 128`` share 128; ties go to the earlier shape of :func:`triton_sweep_names`), as
    rows of the swept counts alone and folded into the current table (the counts the sweep did not time
    keep their rows)."""
    from mlakv.spec.tuning import ROPE_TRITON_STEPS

    order = {name: i for i, name in enumerate(triton_sweep_names())}
    sums: dict[str, dict[int, dict[str, float]]] = {}
    for r in report["results"]:
        shapes = {k: v for k, v in r["times_us"].items() if k in order and isinstance(v, (int, float))}
        if not shapes:
            continue
        at = sums.setdefault(TABLE_KIND[r["variant"]], {}).setdefault(r["n"] * r["heads"], {})
        for k, v in shapes.items():
            at[k] = at.get(k, 0.0) + v
    out = []
    for kind, by_items in sums.items():
        best = []
        for items in sorted(by_items):
            # a shape missing at one of the count's points (not timed, or wrong there) does not compete
            full = {k: v for k, v in by_items[items].items() if all(
                k in r["times_us"] for r in report["results"]
                if TABLE_KIND[r["variant"]] == kind and r["n"] * r["heads"] == items)}  # fmt: skip
            if full:
                best.append((items, _sweep_shape(min(full, key=lambda k: (full[k], order[k])))))
        if best:
            out += ["", f"# {kind}: the swept query-row counts alone (the last row open to every larger count):",
                    f"ROPE_TRITON_STEPS[{kind!r}] = {tuple(table_steps(best))!r}",
                    "# folded into the current table (counts the sweep did not time keep their rows):",
                    f"ROPE_TRITON_STEPS[{kind!r}] = {tuple(merged_steps(ROPE_TRITON_STEPS[kind], best))!r}"]  # fmt: skip
    return out


def providers_for(variant: str, is_neox: bool, names: list[str]) -> tuple[dict, dict, str]:
    """``({name: fn(d)}, {name: why absent}, the unfused RoPE kernel: "sglang" or "torch")`` for the
    requested providers of ``variant``."""
    fmt, q_kind = VARIANTS[variant]
    fns: dict[str, Callable[[dict], None]] = {}
    absent: dict[str, str] = {}
    on_gpu = torch.cuda.is_available()
    concat_mod = rope_mod = None
    peer_reason = None
    if on_gpu and ("unfused" in names or "sglang" in names):
        concat_mod, rope_mod, peer_reason = sglang_modules()

    def fused(d):
        set_mla_kv_buffer_rope(
            d["kv"], d["loc"], d["k_nope"], d["k_pe"], d["positions"], d["cs"], is_neox, q_nope=d["q_nope"],
            q_pe=d["q_pe"], q_out=d["q_out"], kv_cache_format=fmt, k_scale=d["k_scale"], q_scale=d["q_scale"],
        )  # fmt: skip

    def args(d):
        return RopeWriteCall(d["kv"], d["loc"], d["k_nope"], d["k_pe"], d["positions"], d["cs"], is_neox, fmt,
                             d["k_scale"], d["q_nope"], d["q_pe"], d["q_out"], d["q_scale"])  # fmt: skip

    def fused_triton(d):
        _launch_triton(args(d))

    if rope_mod is not None:
        rope_fn = rope_mod.rope_neox if is_neox else rope_mod.rope_interleaved

        def rope_in_place(d):
            rope_fn(d["q_pe"], d["k_pe"].view(-1, 1, ROPE), d["cs"], d["positions"])

    else:

        def rope_in_place(d):
            d["k_pe"].copy_(rope_rotate_torch(d["k_pe"], d["positions"], d["cs"], is_neox))
            d["q_pe"].copy_(rope_rotate_torch(d["q_pe"], d["positions"], d["cs"], is_neox))

    def unfused(d):
        rope_in_place(d)
        if fmt is None:
            set_mla_kv_buffer_triton(d["kv"], d["loc"], d["k_nope"], d["k_pe"])
        else:
            set_mla_kv_buffer_quant(d["kv"], d["loc"], d["k_nope"], d["k_pe"], fmt, d["k_scale"])
        if q_kind == "16bit":
            torch.cat([d["q_nope"], d["q_pe"]], dim=-1, out=d["q_out"])
        else:  # q_scale is 1: the e4m3 query is the cast of the concatenation
            d["q_out"].copy_(torch.cat([d["q_nope"], d["q_pe"]], dim=-1))

    def sglang(d):
        kv, loc, q_out = d["kv"], d["loc"], d["q_out"]
        total = loc.shape[0] * (1 + d["q_nope"].shape[1])
        warps = 4 if total <= 768 else 8  # sglang's own pick
        if fmt is None:
            concat_mod.set_mla_kv_concat_q(kv, loc, d["k_nope"], d["k_rot"], d["q_nope"], d["q_rot"], q_out, warps)
        else:
            concat_mod.set_mla_kv_concat_q_fp8(
                kv.view(torch.uint8), loc, d["k_nope"], d["k_rot"], d["q_nope"], d["q_rot"], q_out.view(torch.uint8),
                warps, 1, 0,
            )  # fmt: skip

    def jit_variant(**kw):
        def fn(d):
            from mlakv.kernels.cuda.rope_write import rope_write_cuda

            if not rope_write_cuda(args(d), **kw):
                raise RuntimeError("the JIT kernel refused the call")

        return fn

    table = {
        "fused": fused,
        "fused-triton": fused_triton,
        "unfused": unfused,
        "sglang": sglang,
        "jit": jit_variant(),
        "jit-early": jit_variant(early_trigger=True),
        "jit-late": jit_variant(early_trigger=False),
        "jit-w4": jit_variant(num_warps=4),
    }
    for name in names:
        if name.startswith("triton w") and name not in table:  # a --triton-sweep shape: "triton w<warps> q<rows> [place]"
            parts = name.split()
            w, q = (int(part[1:]) for part in parts[1:3])
            place = parts[3] if len(parts) > 3 else "wait"
            table[name] = lambda d, w=w, q=q, place=place: _launch_triton(args(d), num_warps=w, q_rows=q, trigger=place)
        if name not in table:
            raise ValueError(f"unknown provider {name!r}; expected one of {PROVIDERS + SWEEP}")
        if not on_gpu and name not in ("fused", "unfused"):
            absent[name] = "needs a CUDA GPU"
        elif name == "sglang" and fmt == "ds_mla":
            absent[name] = "sglang has no ds_mla variant of set_mla_kv_concat_q"
        elif name == "sglang" and concat_mod is None:
            absent[name] = peer_reason or "sglang peer unavailable"
        elif name.startswith("jit") and not on_gpu:
            absent[name] = "needs a CUDA GPU"
        else:
            fns[name] = table[name]
    return fns, absent, "sglang" if rope_mod is not None else "torch"


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.uint8)


def expected_of(d: dict, is_neox: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's (cache, q_out) for set ``d`` (run on copies, on d's device), and ``d``'s
    rotated ``k_rot``/``q_rot`` (sglang's inputs) as a side effect."""
    from mlakv.ops.rope_write_reference import set_mla_kv_buffer_rope_torch

    kv, q_out = d["kv"].clone(), d["q_out"].clone()
    set_mla_kv_buffer_rope_torch(
        RopeWriteCall(
            kv, d["loc"], d["k_nope"], d["k_pe"], d["positions"], d["cs"], is_neox, d["fmt"], d["k_scale"],
            d["q_nope"], d["q_pe"], q_out, d["q_scale"],
        )
    )  # fmt: skip
    d["k_rot"] = rope_rotate_torch(d["k_pe"], d["positions"], d["cs"], is_neox)
    d["q_rot"] = rope_rotate_torch(d["q_pe"], d["positions"], d["cs"], is_neox)
    return kv, q_out


def check_provider(fn: Callable[[dict], None], d: dict, want: tuple[torch.Tensor, torch.Tensor]) -> Optional[str]:
    """Run ``fn`` once on copies of ``d`` (its in-place RoPE must not touch the timed sets); None
    when cache and ``q_out`` equal the reference's bytes, else what differs."""
    c = {k: (v.clone() if isinstance(v, torch.Tensor) and k not in ("cs",) else v) for k, v in d.items()}
    try:
        fn(c)
    except Exception as e:  # a provider that cannot run this call is reported, not timed
        return f"raised {type(e).__name__}: {str(e)[:160]}"
    for name, got, exp in (("cache", c["kv"], want[0]), ("q_out", c["q_out"], want[1])):
        if not torch.equal(_bits(got), _bits(exp)):
            rows = (_bits(got) != _bits(exp)).reshape(got.shape[0], -1).any(dim=1).sum().item()
            return f"{name}: {rows} rows differ from the reference"
    return None


# ---- the run -------------------------------------------------------------------------------------------
def run(variants: list[str], heads_list: list[int], sizes: list[int], names: list[str], is_neox: bool,
        sglang_max_n: int, into: Optional[dict] = None) -> dict:  # fmt: skip
    """Check and time every provider; returns the report (JSON-able). Its rows go into ``into`` (the
    report returned) as each is measured, so an interrupted run keeps them."""
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    cs = rope_table(device=device)
    report: dict = {} if into is None else into
    report.update(device=torch.cuda.get_device_name() if on_gpu else "CPU (torch path; GPU numbers need a GPU)",
                  style="neox" if is_neox else "interleaved", results=[])  # fmt: skip
    if on_gpu:
        prebuild(variants, with_peers="unfused" in names or "sglang" in names)
        report["copy_gbs"] = copy_bandwidth_gbs()
        report["one_element_us"] = one_element_graph_us()
        progress(f"copy bandwidth {report['copy_gbs']:.0f} GB/s, one-element graph {report['one_element_us']:.2f} us")
    for variant in variants:
        fns, absent, rope_kernel = providers_for(variant, is_neox, names)
        report.setdefault("rope_kernel", rope_kernel)
        for heads in heads_list:
            for n in sizes:
                progress(f"rope bench: {variant} H={heads} n={n}")
                sets = make_sets(n, heads, variant, cs, device) if on_gpu else [make_set(n, heads, variant, cs, device)]
                wants = [expected_of(d, is_neox) for d in sets]
                row = {"variant": variant, "heads": heads, "n": n, "bytes": call_bytes(n, heads, variant),
                       "times_us": {}, "wrong": {}, "absent": dict(absent)}  # fmt: skip
                live = {}
                for name, fn in fns.items():
                    if name == "sglang" and n > sglang_max_n:
                        row["absent"][name] = f"n > --sglang-max-n={sglang_max_n}"
                        continue
                    bad = check_provider(fn, sets[0], wants[0])
                    if bad:
                        row["wrong"][name] = bad
                        progress(f"  {name}: WRONG ({bad}); not timed")
                    else:
                        live[name] = fn
                order = list(live)
                for names_in_order in (order, order[::-1]):
                    for name in names_in_order:
                        fn = live[name]
                        if on_gpu:
                            t = graph_median_us(rotating(fn, [(d,) for d in sets]), calls=len(sets), rep=20)
                        else:
                            t = wall_median_s(lambda fn=fn: fn(sets[0]), reps=5) * 1e6
                        row["times_us"].setdefault(name, []).append(t)
                row["times_us"] = {k: sum(v) / len(v) for k, v in row["times_us"].items()}
                report["results"].append(row)
                del sets, wants
                if on_gpu:
                    torch.cuda.empty_cache()
    return report


def _fmt(v: Optional[float]) -> str:
    return "-" if v is None else (f"{v:.2f}" if v < 100 else f"{v:.0f}")


def format_report(report: dict, names: list[str]) -> str:
    """Markdown tables per (variant, H): µs per call, the goals' ratios, the copy-bandwidth roofline."""
    bw = report.get("copy_gbs")
    out = [f"Device: {report['device']}; RoPE style: {report['style']}; unfused RoPE kernel: "
           f"{report.get('rope_kernel', '-')}" + (f"; copy bandwidth {bw:.0f} GB/s" if bw else "")]  # fmt: skip
    groups: dict[tuple, list[dict]] = {}
    for r in report["results"]:
        groups.setdefault((r["variant"], r["heads"]), []).append(r)
    for (variant, heads), rows in groups.items():
        fmt, q_kind = VARIANTS[variant]
        out.append(f"\n### {variant} (cache {fmt or 'bf16 rows'}, q_out {'bf16' if q_kind == '16bit' else 'e4m3'}), H = {heads}\n")
        cols = [p for p in names if any(p in r["times_us"] for r in rows)]
        head = ["n"] + [f"{p} µs" for p in cols]
        if bw:  # ratios only where the times are GPU graph medians (CPU wall times rank nothing)
            head += ["unfused / fused", "fused / sglang", "bytes at copy BW µs", "fused / bytes"]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for r in rows:
            t = r["times_us"]
            f = t.get("fused")
            cells = [str(r["n"])] + [_fmt(t.get(p)) for p in cols]
            if bw:
                roof = r["bytes"] / (bw * 1e9) * 1e6
                cells.append(_fmt(t["unfused"] / f) if f and "unfused" in t else "-")
                cells.append(_fmt(f / t["sglang"]) if f and "sglang" in t else "-")
                cells += [_fmt(roof), _fmt(f / roof) if f else "-"]
            out.append("| " + " | ".join(cells) + " |")
        notes = {}
        for r in rows:
            for k, v in {**r["absent"], **{p: "WRONG: " + w for p, w in r["wrong"].items()}}.items():
                notes.setdefault(f"{k}: {v}", []).append(r["n"])
        for text, ns in notes.items():
            out.append(f"\n- {text} (n = {', '.join(map(str, ns))})")
    return "\n".join(out) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    on_gpu = torch.cuda.is_available()
    sizes = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES if on_gpu else CPU_SIZES)
    names = list(args.providers) + ([s for s in SWEEP if s not in args.providers] if args.sweep else [])
    names += triton_sweep_names() if args.triton_sweep else []
    report: dict = {}
    save = lambda note="": _emit(report, names, args.json, note)  # noqa: E731
    with rows_kept_on_interrupt(report, save, f"in {args.json}" if args.json else "printed above"):
        run(args.variants, args.heads, sizes, names, args.style == "neox", args.sglang_max_n, into=report)
    save()
    wrong = [r for r in report["results"] if r["wrong"]]
    return 1 if wrong else 0


def _emit(report: dict, names: list[str], json_path: Optional[Path], note: str = "") -> None:
    """Print the report's tables (and ``note``); with ``--json``, write the report there."""
    print(format_report(report, names) + "\n".join(fastest_triton(report)) + note)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    from mlakv._interrupt import run_module

    sys.exit(run_module("mlakv.bench.rope_write", main))
