"""FP8 KV-cache benchmark: the fused quantizing write and the dequantizing gather, JIT and Triton side by side.

Why: issue 27's goals read the FP8 kernels against each other and against two floors — the Triton
kernels (every non-Hopper GPU's path) within 1.15x of the JIT CUDA kernels at every n_loc; the JIT
write within 1.25x of the plain row write of the same output bytes at 1-1024 rows and within 1.1x
of its bytes at copy bandwidth at 65536 rows. Per n_loc (GPU, bf16 sources, 512 + 64) it times the
median CUDA-graph replay per call over 8 rotating input sets (:mod:`mlakv.bench.timing`):

* write, per format (ds_mla 656-byte rows, per_tensor 576): ``jit`` (the JIT CUDA kernel, the
  dispatcher's path on SM90+), ``triton`` (the Triton kernel called directly: what
  ``MLAKV_DISABLE_JIT=1`` runs), ``plain`` (the plain row write of the already-quantized rows: the
  same output bytes), ``bound`` (bytes read + written — 1152 source bytes, the loc entry, the row —
  at the measured copy bandwidth); ds_mla also ``quant-then-write`` (quantize into a temporary, then
  the byte write: two launches);
* gather, per format, to bf16: ``jit``, ``triton``, ``plain`` (the plain row gather of a bf16 cache,
  the same output bytes) and ``bound``;
* the ds_mla write under each tile-scale rule (``fp32_floor``, ``fp32``, ``ue8m0``:
  ``ds_mla_scale_rule`` of :mod:`mlakv.ops.fp8`): ``jit`` and ``triton``, each checked against its
  rule's reference rows, and ``bound``;
* the per_tensor write under a scale that is not a power of two (``K_SCALE_DIVIDED``: the kernels
  divide; ``K_SCALE`` is one, which they multiply by its exact reciprocal): ``jit``, ``triton``,
  ``bound``.

Every provider is checked bit-exactly against the torch reference (run on the CPU) before it is
timed; a wrong one shows ``WRONG`` instead of a time. Ratios are printed beside the times.

``--tune`` times the launch alternatives instead (Triton: warps x rows per program with the PDL
trigger before the wait and right after it, then the fastest shape with the trigger after the stores; JIT: threads per row
(32, 64, 128) x rows per CTA (1, 2, 4, 8) x trigger place, beside the plain row write and gather of
the same bytes), and prints, per kernel, the fastest shape at each size and the table rows of
:mod:`mlakv.spec.tuning` (``FP8_TRITON_STEPS``, ``FP8_JIT_STEPS``) they make.
``--profile`` times nothing: it runs each write and gather provider once per size (after warm-up calls,
each checked as above), each call inside the NVTX range :data:`PROFILE_RANGE`, for a profiler to read the
kernels alone: ``ncu --nvtx --nvtx-include "mlakv-profile/" --set full python -m mlakv bench fp8 --profile
--sizes 1``. The kernel names tell the providers apart; the order is per size, format, then provider.
``--graph-lengths 16,256,2048,8192`` times each of those calls in CUDA graphs of those many runs of the
8-set body, then with the bench's own timer four times in a row (fp8_graph_lengths.json/md): whether a
call's time depends on the graph it is timed in, or moves between calls on the same inputs.
Run: ``python -m mlakv bench fp8 [--sizes 1,128,4096,65536] [--tune [--tune-families jit]] [--profile]
[--graph-lengths 16,2048] [--out bench-out]``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from mlakv.mem_cache import (
    dequantize_mla_rows,
    fp8_row_bytes,
    quantize_mla_rows,
    set_mla_kv_buffer_quant,
    set_mla_kv_buffer_triton,
)
from mlakv.ops.fp8 import fp8_write_path, scale_tensor
from mlakv.spec.rules import DS_MLA_SCALE_RULES
from mlakv.spec.tuning import FP8_JIT_PACKED, FP8_JIT_STEPS, FP8_JIT_THREADS_PER_ROW, FP8_TRITON_PARTS, FP8_TRITON_STEPS

from .options import fp8_parser as build_parser
from .report import checkpoint, merged_steps, table_steps, write_results
from .timing import INPUT_SETS, copy_bandwidth_gbs, graph_length_us, graph_median_us, on_progress, progress, rotating

__all__ = [
    "PROFILE_RANGE", "GRAPH_REPEATS", "run_fp8_bench", "run_fp8_profile", "run_fp8_tune", "run_fp8_graph_lengths",
    "format_tables", "format_tune", "format_graph_lengths", "main",
]  # fmt: skip

NOPE, ROPE = 512, 64
LAYERS = INPUT_SETS  # input sets (layers) per timed graph
K_SCALE = 0.0625
# The per_tensor write's second scale: not a power of two (a calibrated model's), so the kernels divide;
# K_SCALE, a power of two, takes their product by the exact reciprocal.
K_SCALE_DIVIDED = 8.0 / 448.0
FORMATS = ("ds_mla", "per_tensor")
_KV = {"ds_mla": "kv656", "per_tensor": "kv576"}
_Q = {"ds_mla": "q656", "per_tensor": "q576"}
# --tune: the Triton shapes tried (warps, rows per program) give each thread 8, 16 or 32 values of
# the 512-wide nope block (1, 2 or 4 16-byte source vectors), plus one row on 4 warps at up to 64
# rows; each is compiled once per kernel, so the sweep's time is mostly Triton's compiles.
TUNE_WARPS = (1, 2, 4, 8)
TUNE_ROWS = (1, 2, 4, 8, 16)
TUNE_PARTS = (2, 4)  # the ds_mla write's programs per block of rows, besides 1
TUNE_PART_WARPS = (1, 2, 4, 8, 16)
TUNE_PART_ROWS = (1, 2, 4, 8, 16)
TUNE_REP_MS = 20
# --tune, JIT: rows per CTA tried at each threads per row the kernels take (FP8_JIT_THREADS_PER_ROW);
# warps per CTA = rows * threads / 32 (1..32).
TUNE_JIT_ROWS = (1, 2, 4, 8)
# --tune, JIT: the CTA warps tried for the per_tensor write's packed rows (FP8_JIT_PACKED, key ``tp``)
TUNE_JIT_PACKED_WARPS = (1, 2, 4, 8, 16, 32)
TUNE_FAMILIES = ("jit", "triton")
TUNE_KINDS = ("quant_per_tensor", "quant_ds_mla", "dequant_per_tensor", "dequant_ds_mla")


def _graph_us(fn: Callable[[dict], object], layers: list[dict], rep: int = 40) -> float:
    """CUDA-graph median per call of ``fn``, once per layer's inputs in each replay."""
    return graph_median_us(rotating(fn, [(d,) for d in layers]), calls=len(layers), rep=rep)


def _layers(n: int, device: str = "cuda") -> list[dict]:
    out = []
    num_slots = n + 64
    for _ in range(LAYERS):
        d = dict(
            nope=torch.randn(n, NOPE, device=device).to(torch.bfloat16),
            rope=torch.randn(n, ROPE, device=device).to(torch.bfloat16),
            loc=torch.randperm(num_slots, device=device)[:n],
            kv656=torch.randint(0, 256, (num_slots, 1, 656), dtype=torch.uint8, device=device),
            kv576=torch.randint(0, 256, (num_slots, 1, 576), dtype=torch.uint8, device=device),
            kvbf16=torch.randn(num_slots, 1, 576, device=device).to(torch.bfloat16),
            tmp656=torch.empty(n, 656, dtype=torch.uint8, device=device),
            iota=torch.arange(n, device=device),
        )
        # the expected rows: the reference on the CPU (the spec), moved to the device
        nope_c, rope_c = d["nope"].cpu(), d["rope"].cpu()
        d["q656"] = quantize_mla_rows(nope_c, rope_c, "ds_mla").to(device)
        d["q576"] = quantize_mla_rows(nope_c, rope_c, "per_tensor", K_SCALE).view(torch.uint8).to(device)
        out.append(d)
    return out


def _bound_us(n: int, nbytes_per_row: int, copy_gbs: float) -> float:
    """Time of ``n`` rows' bytes (read + written) at the copy bandwidth."""
    return n * nbytes_per_row / (copy_gbs * 1e3)


def _write_bytes(fmt: str) -> int:
    return 2 * (NOPE + ROPE) + 8 + fp8_row_bytes(fmt, NOPE, ROPE)  # sources, the int64 loc entry, the row


def _gather_bytes(fmt: str) -> int:
    return fp8_row_bytes(fmt, NOPE, ROPE) + 8 + 2 * (NOPE + ROPE)  # the row, the loc entry, bf16 out


# ---- the write ----------------------------------------------------------------------------------
def _jit_write(fmt: str, scale, **kw) -> Callable[[dict], None]:
    from mlakv.kernels.cuda.fp8 import fp8_jit_write

    k = scale if fmt == "per_tensor" else None

    def run(d):
        if not fp8_jit_write(d[_KV[fmt]], d["loc"], d["nope"], d["rope"], fmt, k, **kw):
            raise RuntimeError("the JIT fp8 write refused the call")

    return run


def _triton_write(fmt: str, scale, **kw) -> Callable[[dict], None]:
    from mlakv.kernels.triton.fp8 import launch_quant_write

    k = scale if fmt == "per_tensor" else None
    return lambda d: launch_quant_write(d[_KV[fmt]], d["loc"], d["nope"], d["rope"], fmt, k, **kw)


def _write_providers(fmt: str, scale: torch.Tensor, jit: bool) -> dict[str, Callable[[dict], None]]:
    split = 528 if fmt == "ds_mla" else 512
    out = {}
    if jit:
        out["jit"] = _jit_write(fmt, scale)
    out["triton"] = _triton_write(fmt, scale)
    out["plain"] = lambda d: set_mla_kv_buffer_triton(d[_KV[fmt]], d["loc"], d[_Q[fmt]][:, :split], d[_Q[fmt]][:, split:])
    if fmt == "ds_mla":

        def quant_then_write(d):
            set_mla_kv_buffer_quant(d["tmp656"], d["iota"], d["nope"], d["rope"], "ds_mla")  # quantize kernel
            set_mla_kv_buffer_triton(d["kv656"], d["loc"], d["tmp656"][:, :528], d["tmp656"][:, 528:])

        out["quant-then-write"] = quant_then_write
    return out


def _check_write(fmt: str, fn: Callable[[dict], None], d: dict, rows: Optional[torch.Tensor] = None) -> Optional[str]:
    """None when ``fn(d)`` writes ``rows`` (default: the format's reference rows of ``d``) at ``d["loc"]``."""
    kv = d[_KV[fmt]]
    expected = kv.clone()
    expected[d["loc"], 0] = d[_Q[fmt]] if rows is None else rows
    fn(d)
    torch.cuda.synchronize()
    return None if torch.equal(kv, expected) else "WRONG"


# ---- the gather ---------------------------------------------------------------------------------
def _jit_gather(fmt: str, scale, **kw) -> Callable[[dict], object]:
    from mlakv.kernels.cuda.fp8 import fp8_jit_gather

    k = scale if fmt == "per_tensor" else None

    def run(d):
        out = fp8_jit_gather(d[_KV[fmt]], d["loc"], fmt, NOPE, ROPE, k, torch.bfloat16, **kw)
        if out is None:
            raise RuntimeError("the JIT fp8 gather refused the call")
        return out

    return run


def _triton_gather(fmt: str, scale, **kw) -> Callable[[dict], object]:
    from mlakv.kernels.triton.fp8 import launch_dequant_gather

    k = scale if fmt == "per_tensor" else None
    return lambda d: launch_dequant_gather(d[_KV[fmt]], d["loc"], fmt, NOPE, ROPE, k, torch.bfloat16, **kw)


def _gather_ref(fmt: str, d: dict) -> tuple[torch.Tensor, torch.Tensor]:
    rows = d[_KV[fmt]][d["loc"]].cpu()
    return dequantize_mla_rows(rows, fmt, NOPE, ROPE, K_SCALE if fmt == "per_tensor" else None)  # on the CPU


def _check_gather(fn: Callable[[dict], object], d: dict, ref) -> Optional[str]:
    got = fn(d)
    ok = all(torch.equal(a.cpu().view(torch.int16), b.view(torch.int16)) for a, b in zip(got, ref))
    return None if ok else "WRONG"


def _jit_available(layers: list[dict]) -> bool:
    from mlakv.kernels.cuda.fp8 import fp8_jit_accepts

    d = layers[0]
    return all(fp8_jit_accepts(d[_KV[f]], d["nope"], d["rope"], f) for f in FORMATS)


# ---- the side-by-side run -----------------------------------------------------------------------
def run_fp8_bench(sizes: list[int], into: Optional[dict] = None, rules: bool = True) -> dict:
    """Time every provider at each n_loc; return ``{"device", "copy_gbs", "write": [...], "gather": [...]}`` (GPU only).

    The rows go into ``into`` (a new dict by default) as they are measured, so a caller that is
    interrupted keeps the rows done so far. A write row: ``{"fmt", "n_loc", "path", <provider>: us
    or "WRONG", "bound": us}``; a gather row: ``{"fmt", "n_loc", <provider>: ..., "bound"}``; a
    ``"rules"`` row (the ds_mla write by tile-scale rule): ``{"rule", "n_loc", "jit", "triton", "bound"}``;
    a ``"scales"`` row (the per_tensor write under :data:`K_SCALE_DIVIDED`, a scale that is not a power of
    two): ``{"k_scale", "n_loc", "jit", "triton", "bound"}``; ``rules=False`` leaves both kinds out (the
    default rule's write is the ``ds_mla`` write row).
    """
    res = {} if into is None else into
    res.update(device=torch.cuda.get_device_name(), copy_gbs=None, write=[], gather=[], rules=[], scales=[])
    scale = scale_tensor(K_SCALE, torch.device("cuda"))
    res["copy_gbs"] = copy_gbs = copy_bandwidth_gbs()
    from mlakv.kernels.triton.row_write import launch_get_kv_rows

    for n in sizes:
        progress(f"fp8 bench: n_loc={n}")
        layers = _layers(n)
        jit = _jit_available(layers)
        d0 = layers[0]
        for fmt in FORMATS:
            row = {"fmt": fmt, "n_loc": n, "path": fp8_write_path(d0[_KV[fmt]], d0["nope"], d0["rope"], fmt)}
            for name, fn in _write_providers(fmt, scale, jit).items():
                row[name] = _check_write(fmt, fn, d0) or _graph_us(fn, layers)
            row["bound"] = _bound_us(n, _write_bytes(fmt), copy_gbs)
            res["write"].append(row)
        for fmt in FORMATS:
            ref = _gather_ref(fmt, d0)
            g = {"fmt": fmt, "n_loc": n}
            providers = {"triton": _triton_gather(fmt, scale)}
            if jit:
                providers = {"jit": _jit_gather(fmt, scale), **providers}
            for name, fn in providers.items():
                g[name] = _check_gather(fn, d0, ref) or _graph_us(fn, layers)
            g["plain"] = _graph_us(lambda d: launch_get_kv_rows(d["kvbf16"], d["loc"], NOPE, ROPE), layers)
            g["bound"] = _bound_us(n, _gather_bytes(fmt), copy_gbs)
            res["gather"].append(g)
        for rule in DS_MLA_SCALE_RULES if rules else ():
            rows = quantize_mla_rows(d0["nope"].cpu(), d0["rope"].cpu(), "ds_mla", ds_mla_scale_rule=rule).cuda()
            r = {"rule": rule, "n_loc": n}
            providers = {"triton": _triton_write("ds_mla", scale, scale_rule=rule)}
            if jit:
                providers = {"jit": _jit_write("ds_mla", scale, scale_rule=rule), **providers}
            for name, fn in providers.items():
                r[name] = _check_write("ds_mla", fn, d0, rows) or _graph_us(fn, layers)
            r["bound"] = _bound_us(n, _write_bytes("ds_mla"), copy_gbs)
            res["rules"].append(r)
        if rules:
            divided = scale_tensor(K_SCALE_DIVIDED, torch.device("cuda"))
            rows = quantize_mla_rows(d0["nope"].cpu(), d0["rope"].cpu(), "per_tensor", K_SCALE_DIVIDED).view(torch.uint8).cuda()
            r = {"k_scale": K_SCALE_DIVIDED, "n_loc": n}
            providers = {"triton": _triton_write("per_tensor", divided)}
            if jit:
                providers = {"jit": _jit_write("per_tensor", divided), **providers}
            for name, fn in providers.items():
                r[name] = _check_write("per_tensor", fn, d0, rows) or _graph_us(fn, layers)
            r["bound"] = _bound_us(n, _write_bytes("per_tensor"), copy_gbs)
            res["scales"].append(r)
        del layers
        torch.cuda.empty_cache()
    return res


#: the NVTX range (``ncu --nvtx --nvtx-include "mlakv-profile/"``) around each call ``--profile`` makes
PROFILE_RANGE = "mlakv-profile"


def _checked_calls(n: int, d0: dict, scale: torch.Tensor, jit: bool) -> dict[str, Callable[[dict], object]]:
    """Every write provider (jit where the kernel serves, triton, plain) and gather provider (jit, triton)
    of both formats at ``n`` rows, keyed ``"<n> <write|gather> <fmt> <provider>"``, each checked
    bit-exact on the input set ``d0`` first (a wrong one raises ``RuntimeError``)."""
    calls: dict[str, Callable[[dict], object]] = {}
    for fmt in FORMATS:
        for name, fn in _write_providers(fmt, scale, jit).items():
            if name != "quant-then-write":
                if _check_write(fmt, fn, d0):
                    raise RuntimeError(f"the {name} {fmt} write is wrong at n_loc={n}")
                calls[f"{n} write {fmt} {name}"] = fn
    for fmt in FORMATS:
        ref = _gather_ref(fmt, d0)
        gathers = {"jit": _jit_gather(fmt, scale)} if jit else {}
        for name, fn in {**gathers, "triton": _triton_gather(fmt, scale)}.items():
            if _check_gather(fn, d0, ref):
                raise RuntimeError(f"the {name} {fmt} gather is wrong at n_loc={n}")
            calls[f"{n} gather {fmt} {name}"] = fn
    return calls


def run_fp8_profile(sizes: list[int], warmup: int = 3) -> list[str]:
    """For a profiler: at each n_loc, the calls of :func:`_checked_calls`, each called ``warmup`` times,
    then once inside the NVTX range :data:`PROFILE_RANGE`; returns their labels in call order (GPU
    only). A wrong provider raises ``RuntimeError``."""
    scale = scale_tensor(K_SCALE, torch.device("cuda"))
    labels = []
    for n in sizes:
        layers = _layers(n)[:1]
        d0 = layers[0]
        calls = _checked_calls(n, d0, scale, _jit_available(layers))
        for _ in range(warmup):
            for fn in calls.values():
                fn(d0)
        torch.cuda.synchronize()
        for label, fn in calls.items():
            torch.cuda.nvtx.range_push(PROFILE_RANGE)
            fn(d0)
            torch.cuda.synchronize()
            torch.cuda.nvtx.range_pop()
            labels.append(label)
            progress(f"fp8 profile: {label}")
    return labels


#: ``--graph-lengths``: how many times in a row each call is timed by :func:`graph_median_us`
GRAPH_REPEATS = 4


def run_fp8_graph_lengths(sizes: list[int], lengths: list[int], into: Optional[dict] = None) -> dict:
    """Whether a call's time depends on the CUDA graph it is timed in (GPU only). At each n_loc, for each
    call of :func:`_checked_calls` (8 rotating input sets a run of the body): the median time per call
    in graphs holding each of ``lengths`` runs of the body (:func:`graph_length_us`), then
    :func:`graph_median_us` :data:`GRAPH_REPEATS` times in a row on the same inputs. Returns
    ``{"device", "lengths", "repeats", "rows": [{"call", "by_length": [us, ...], "repeated": [us, ...]}]}``;
    rows go into ``into`` as they are measured."""
    res = {} if into is None else into
    res.update(device=torch.cuda.get_device_name(), lengths=list(lengths), repeats=GRAPH_REPEATS, rows=[])
    scale = scale_tensor(K_SCALE, torch.device("cuda"))
    for n in sizes:
        layers = _layers(n)
        for label, fn in _checked_calls(n, layers[0], scale, _jit_available(layers)).items():
            body = rotating(fn, [(d,) for d in layers])
            by_length = [graph_length_us(body, len(layers), length) for length in lengths]
            repeated = [graph_median_us(body, calls=len(layers)) for _ in range(GRAPH_REPEATS)]
            res["rows"].append({"call": label, "by_length": by_length, "repeated": repeated})
            progress(f"fp8 graph lengths: {label}")
        del layers
        torch.cuda.empty_cache()
    return res


def format_graph_lengths(res: dict) -> str:
    """The ``--graph-lengths`` report: one row per call, its time per graph length, then the repeats."""
    lengths, repeats = res["lengths"], res["repeats"]
    out = [
        f"device: {res['device']}; us per call: the median replay of a CUDA graph holding L runs of the body "
        f"({LAYERS} input sets a run), then graph_median_us {repeats} times in a row on the same inputs",
        "",
        "| call | " + " | ".join(f"L={length}" for length in lengths) + f" | graph_median_us x {repeats} |",
        "|---|" + "---|" * (len(lengths) + 1),
    ]
    for r in res["rows"]:
        cells = [_cell(v) for v in r["by_length"]] + [", ".join(_cell(v) for v in r["repeated"])]
        out.append(f"| {r['call']} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def _cell(v) -> str:
    if v is None:
        return "-"
    return v if isinstance(v, str) else (f"{v:.2f}" if v >= 0.1 else f"{v:.3f}")


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else "-"


def _variant_table(title: str, key: str, rows: Optional[list], show: Callable[[object], str]) -> list[str]:
    """The lines of one table of write rows that differ from the main ones by ``key`` (a tile-scale
    rule, a k_scale), ``show`` printing its value; none without rows."""
    if not rows:
        return []
    out = ["", title, "", f"| {key} | n_loc | jit | triton | bound | triton / jit | jit / bound |",
           "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        out.append(
            f"| {show(r[key])} | {r['n_loc']} | {_cell(r.get('jit'))} | {_cell(r.get('triton'))} | "
            f"{_cell(r.get('bound'))} | {_ratio(r.get('triton'), r.get('jit'))} | {_ratio(r.get('jit'), r.get('bound'))} |"
        )
    return out


def format_tables(res: dict) -> str:
    """Markdown tables (write, then gather; one per format) with the ratios the goals name."""
    out = [f"device: {res['device']}; copy bandwidth {res['copy_gbs']:.0f} GB/s (read + write); times: us per call, "
           "median CUDA-graph replay over 8 input sets; bound: the call's bytes at copy bandwidth"]  # fmt: skip
    for fmt in FORMATS:
        extra = " quant-then-write |" if fmt == "ds_mla" else ""
        out += ["", f"write {fmt}", "",
                f"| n_loc | path | jit | triton | plain | bound |{extra} triton / jit | jit / plain | jit / bound |",
                "|---|---|---|---|---|---|" + ("---|" if extra else "") + "---|---|---|"]  # fmt: skip
        for r in (r for r in res["write"] if r.get("fmt") == fmt):
            qtw = f" {_cell(r.get('quant-then-write'))} |" if extra else ""
            out.append(
                f"| {r['n_loc']} | {r.get('path', '-')} | {_cell(r.get('jit'))} | {_cell(r.get('triton'))} | "
                f"{_cell(r.get('plain'))} | {_cell(r.get('bound'))} |{qtw} {_ratio(r.get('triton'), r.get('jit'))} | "
                f"{_ratio(r.get('jit'), r.get('plain'))} | {_ratio(r.get('jit'), r.get('bound'))} |"
            )
    for fmt in FORMATS:
        out += ["", f"gather {fmt} (to bf16)", "",
                "| n_loc | jit | triton | plain gather bf16 | bound | triton / jit | jit / bound | triton / bound |",
                "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for g in (g for g in res["gather"] if g.get("fmt") == fmt):
            out.append(
                f"| {g['n_loc']} | {_cell(g.get('jit'))} | {_cell(g.get('triton'))} | {_cell(g.get('plain'))} | "
                f"{_cell(g.get('bound'))} | {_ratio(g.get('triton'), g.get('jit'))} | {_ratio(g.get('jit'), g.get('bound'))} | "
                f"{_ratio(g.get('triton'), g.get('bound'))} |"
            )
    out += _variant_table("write ds_mla by tile-scale rule (ds_mla_scale_rule)", "rule", res.get("rules"), str)
    out += _variant_table(
        "write per_tensor, k_scale not a power of two (the division; the per_tensor rows above: the product)",
        "k_scale", res.get("scales"), lambda v: f"{v:.6g}",
    )  # fmt: skip
    return "\n".join(out)


# ---- the launch sweep ---------------------------------------------------------------------------
def _triton_shapes(n: int) -> list[tuple[int, int]]:
    """(warps, rows per program) tried at ``n`` rows: rows <= n; 8, 16 or 32 nope values per thread,
    or one row per program on 4 warps at up to 64 rows."""
    out = []
    for w in TUNE_WARPS:
        for r in TUNE_ROWS:
            per_thread = r * NOPE // (32 * w)
            if r <= max(1, n) and (per_thread in (8, 16, 32) or (r == 1 and w == 4 and n <= 64)):
                out.append((w, r))
    return out


def _part_shapes(n: int) -> list[tuple[int, int, int]]:
    """(warps, rows per program, parts per row) tried for the ds_mla write split over several programs
    per block of rows (``parts_per_row`` 2 and 4): rows <= n; 4, 8 or 16 nope values per thread. Up to
    16 warps: a call's programs are started at a bounded rate (on an H200 about 1.3 ns each: 2048
    one-warp programs of a 512-row call took 2.9 us, 1024 of them 1.5), so many rows per program on
    many warps is the other way to spread a row's work."""
    out = []
    for p in TUNE_PARTS:
        for w in TUNE_PART_WARPS:
            for r in TUNE_PART_ROWS:
                if r <= max(1, n) and r * NOPE // (p * 32 * w) in (4, 8, 16):
                    out.append((w, r, p))
    return out


#: a Triton shape key's last letter per trigger place (``l``: late, after the stores)
_PLACE_LETTER = {"entry": "e", "wait": "w", "end": "l"}


def _shape_key(w: int, r: int, place: str, parts: int = 1) -> str:
    return f"w{w}r{r}{f'p{parts}' if parts > 1 else ''}{_PLACE_LETTER[place]}"


def _jit_shapes() -> list[tuple[int, int]]:
    """(threads per row, warps per CTA) the JIT sweep times: 1, 2, 4 and 8 rows per CTA at each
    threads per row the kernels take."""
    return [(t, r * t // 32) for t in FP8_JIT_THREADS_PER_ROW for r in TUNE_JIT_ROWS]


def _jit_key(threads: int, w: int, early: bool) -> str:
    return f"t{'p' if threads == FP8_JIT_PACKED else threads}w{w}{'e' if early else 'l'}"


def run_fp8_tune(
    sizes: list[int],
    into: Optional[dict] = None,
    rep: int = TUNE_REP_MS,
    families: Sequence[str] = TUNE_FAMILIES,
    kinds: Sequence[str] = TUNE_KINDS,
) -> dict:
    """Time the launch alternatives of each FP8 kernel at each n_loc (GPU only).

    Returns ``{"device", "triton": {kind: {n: {shape: us}}}, "jit": {kind: {n: {shape: us}}},
    "plain": {kind: {n: us}}}``; a Triton shape is ``w<warps>r<rows><e|w|l>`` (trigger at entry,
    right after the wait, after the stores), a JIT one ``t<threads per row>w<warps per CTA><e|l>`` (``tp``: the per_tensor write's packed rows). The Triton kinds are the table's
    (``quant_per_tensor``, ``quant_ds_mla``, ``dequant_per_tensor``, ``dequant_ds_mla``); the JIT ones
    are the writes' and ``dequant`` (the sum of both formats' gathers: the JIT gathers share one row
    set); ``plain`` holds, per JIT kind, the plain row write of the same rows and the plain bf16 row
    gather (twice: one per format), the floors issue 27's goals read the JIT kernels against.
    ``families``: ``jit`` and/or ``triton``; ``kinds``: the kernels timed (the JIT gather with either
    ``dequant_*`` kind). Every variant is checked bit-exactly before it is timed (``WRONG`` otherwise).
    """
    res = {} if into is None else into
    res.update(device=torch.cuda.get_device_name(), triton={}, jit={}, plain={})
    scale = scale_tensor(K_SCALE, torch.device("cuda"))
    from mlakv.kernels.triton.row_write import launch_get_kv_rows

    def add(table: dict, kind: str, n: int, key: str, us) -> None:
        table.setdefault(kind, {}).setdefault(str(n), {})[key] = us

    def both(fns: dict[str, Callable[[dict], object]], checks: dict[str, Callable], layers) -> object:
        total = 0.0
        for fmt, fn in fns.items():
            bad = checks[fmt](fn)
            if bad:
                return bad
            total += _graph_us(fn, layers, rep)
        return total

    for n in sizes:
        progress(f"fp8 tune: n_loc={n}")
        layers = _layers(n)
        d0 = layers[0]
        refs: dict = {}  # the gathers' expected rows, taken from the buffers as the writes left them
        wcheck = {fmt: (lambda fn, fmt=fmt: _check_write(fmt, fn, d0)) for fmt in FORMATS}
        gcheck = {fmt: (lambda fn, fmt=fmt: _check_gather(fn, d0, refs.get(fmt) or refs.setdefault(fmt, _gather_ref(fmt, d0))))
                  for fmt in FORMATS}  # fmt: skip
        triton_kinds = {
            "quant_per_tensor": lambda **kw: both({"per_tensor": _triton_write("per_tensor", scale, **kw)}, wcheck, layers),
            "quant_ds_mla": lambda **kw: both({"ds_mla": _triton_write("ds_mla", scale, **kw)}, wcheck, layers),
            "dequant_per_tensor": lambda **kw: both({"per_tensor": _triton_gather("per_tensor", scale, **kw)}, gcheck, layers),
            "dequant_ds_mla": lambda **kw: both({"ds_mla": _triton_gather("ds_mla", scale, **kw)}, gcheck, layers),
        }
        for kind, time_it in (triton_kinds if "triton" in families else {}).items():
            if kind not in kinds:
                continue
            refs.clear()
            times = {}
            shapes = [(w, r, 1) for w, r in _triton_shapes(n)] + (_part_shapes(n) if kind == "quant_ds_mla" else [])
            for place in ("entry", "wait"):
                for w, r, p in shapes:
                    kw = {"parts_per_row": p} if p > 1 else {}
                    times[(w, r, p, place)] = us = time_it(num_warps=w, rows_per_program=r, trigger=place, **kw)
                    add(res["triton"], kind, n, _shape_key(w, r, place, p), us)
            timed = {k: v for k, v in times.items() if not isinstance(v, str)}
            if timed:
                w, r, p, _ = min(timed, key=timed.get)
                kw = {"parts_per_row": p} if p > 1 else {}
                us = time_it(num_warps=w, rows_per_program=r, trigger="end", **kw)
                add(res["triton"], kind, n, _shape_key(w, r, "end", p), us)
        if "jit" in families and not _jit_available(layers):  # said in the report, not dropped silently
            res["jit_not_timed"] = (
                "the JIT FP8 kernels do not serve these inputs here (no module for this device, "
                "MLAKV_DISABLE_JIT, or the launcher refused them): no JIT rows"
            )
        elif "jit" in families:
            writes = [f for f in FORMATS if f"quant_{f}" in kinds]
            gathers = any(k.startswith("dequant") for k in kinds)
            for threads, w in _jit_shapes():
                for early in (True, False):
                    for f in writes:
                        fn = _jit_write(f, scale, num_warps=w, early_trigger=early, threads_per_row=threads)
                        add(res["jit"], f"quant_{f}", n, _jit_key(threads, w, early), both({f: fn}, wcheck, layers))
                    if gathers:
                        refs.clear()
                        fns = {f: _jit_gather(f, scale, num_warps=w, early_trigger=early, threads_per_row=threads)
                               for f in FORMATS}  # fmt: skip
                        add(res["jit"], "dequant", n, _jit_key(threads, w, early), both(fns, gcheck, layers))
            for w in TUNE_JIT_PACKED_WARPS if "per_tensor" in writes else ():
                for early in (True, False):
                    fn = _jit_write("per_tensor", scale, num_warps=w, early_trigger=early, threads_per_row=FP8_JIT_PACKED)
                    key = _jit_key(FP8_JIT_PACKED, w, early)
                    add(res["jit"], "quant_per_tensor", n, key, both({"per_tensor": fn}, wcheck, layers))
            for f in writes:
                plain = {f: _write_providers(f, scale, False)["plain"]}
                res["plain"].setdefault(f"quant_{f}", {})[str(n)] = both(plain, wcheck, layers)
            if gathers:
                gather_us = _graph_us(lambda d: launch_get_kv_rows(d["kvbf16"], d["loc"], NOPE, ROPE), layers, rep)
                res["plain"].setdefault("dequant", {})[str(n)] = 2 * gather_us
        del layers
        torch.cuda.empty_cache()
    return res


def _parse_shape(key: str) -> tuple[int, int, str]:
    """A Triton key: ``w4r2e`` -> (warps 4, rows per program 2, trigger ``"entry"``; ``w``: ``"wait"``,
    ``l``: ``"end"``); a part count (``w1r1p2e``) is left out (:func:`_parse_parts`)."""
    body = key[1:-1].partition("p")[0]
    place = {letter: place for place, letter in _PLACE_LETTER.items()}[key[-1]]
    w, _, r = body.partition("r")
    return int(w), int(r or 1), place


def _parse_parts(key: str) -> int:
    """A Triton key's parts per row: ``w1r1p2e`` -> 2, ``w4r2e`` -> 1."""
    _, _, p = key[1:-1].partition("p")
    return int(p or 1)


def _parse_jit_shape(key: str) -> tuple[int, bool, int]:
    """A JIT key: ``t128w4e`` -> (warps per CTA 4, trigger at entry True, threads per row 128); ``tpw8l``
    -> (8, False, FP8_JIT_PACKED); a key without ``t`` (``w4e``, one warp per row) -> threads per row 32."""
    body, early = key[:-1], key[-1] == "e"
    t, _, w = body.lstrip("t").partition("w") if body.startswith("t") else ("32", "", body[1:])
    return int(w), early, FP8_JIT_PACKED if t == "p" else int(t)



def format_tune(res: dict) -> str:
    """Per kernel: the fastest shape at each size (with the runner-up's margin; for the JIT kernels
    also the plain row write or gather of the same bytes and the ratio to it) and the table rows they make."""
    out = [f"device: {res['device']}; us per call (quant: per format; dequant: both formats summed)"]
    if res.get("jit_not_timed"):
        out.append(f"JIT: {res['jit_not_timed']}")
    for family, table in (("triton", res.get("triton", {})), ("jit", res.get("jit", {}))):
        for kind, by_n in table.items():
            plain = res.get("plain", {}).get(kind, {}) if family == "jit" else {}
            extra = " plain | fastest / plain |" if plain else ""
            out += ["", f"{family} {kind}", "", f"| n_loc | fastest | us | next | us |{extra} all |",
                    "|---|---|---|---|---|" + ("---|---|" if plain else "") + "---|"]  # fmt: skip
            best, parts = [], []
            for n in sorted(by_n, key=int):
                timed = sorted((v, k) for k, v in by_n[n].items() if not isinstance(v, str))
                wrong = [k for k, v in by_n[n].items() if isinstance(v, str)]
                if not timed:
                    out.append(f"| {n} | WRONG: {', '.join(wrong)} | | | |" + (" | |" if plain else "") + " |")
                    continue
                (t0, k0), nxt = timed[0], (timed[1] if len(timed) > 1 else (None, "-"))
                allc = ", ".join(f"{k} {v:.2f}" for v, k in timed) + (f"; WRONG: {', '.join(wrong)}" if wrong else "")
                pc = f" {_cell(plain.get(n))} | {_ratio(t0, plain.get(n))} |" if plain else ""
                out.append(f"| {n} | {k0} | {t0:.2f} | {nxt[1]} | {_cell(nxt[0])} |{pc} {allc} |")
                best.append((int(n), _parse_shape(k0) if family == "triton" else _parse_jit_shape(k0)))
                if family == "triton":  # a JIT key's ``p`` is the packed rows (``tpw8l``), no part count
                    parts.append((int(n), (_parse_parts(k0),)))
            out.append("")
            name, table = ("FP8_TRITON_STEPS", FP8_TRITON_STEPS) if family == "triton" else ("FP8_JIT_STEPS", FP8_JIT_STEPS)
            split = family == "triton" and any(p != (1,) for _, p in parts)
            rows = [(name, table, best, True)]
            if family == "triton" and (split or kind in FP8_TRITON_PARTS):
                rows.append(("FP8_TRITON_PARTS", FP8_TRITON_PARTS, parts, split))
            out += _step_lines(kind, rows)
    return "\n".join(out)


def _step_lines(kind: str, rows: list[tuple[str, dict, list, bool]]) -> list[str]:
    """The launch-table rows a sweep's fastest shapes make, ``(name, current table, [(n, shape)], alone)``
    each: the swept sizes alone (the largest size's shape opened to every larger n; for the rows with
    ``alone``), then folded into the current table where it has the kind
    (:func:`mlakv.bench.report.merged_steps`: sizes outside the sweep keep their rows)."""
    out = ["# the swept sizes alone (the last row open to every larger n):"]
    out += [f"{name}[{kind!r}] = {tuple(table_steps(best))!r}" for name, _, best, alone in rows if alone]
    merged = [(name, table[kind], best) for name, table, best, _ in rows if kind in table]
    if merged:
        out.append("# folded into the current table (sizes the sweep did not time keep their rows):")
        out += [f"{name}[{kind!r}] = {tuple(merged_steps(current, best))!r}" for name, current, best in merged]
    return out


def _tuned_points(res: dict) -> int:
    """How many (family, kind, n) points a launch sweep's partial result holds."""
    return sum(len(by_n) for fam in ("triton", "jit") for by_n in res.get(fam, {}).values())


def main(argv: Optional[list[str]] = None) -> int:
    """``mlakv bench fp8``: returns 0 (also without a GPU: nothing to measure), 2 on a usage error.

    Writes fp8.json and fp8.md (``--tune``: fp8_tune.json and fp8_tune.md), also while it runs (marked
    partial: a killed run keeps its rows). Ctrl-C writes the rows measured so far, then raises
    ``KeyboardInterrupt``.
    """
    args = build_parser().parse_args(argv)
    if not torch.cuda.is_available():
        print("fp8 bench: no CUDA GPU here; the fused kernels' timings need one (nothing measured)")
        return 0
    if args.profile:
        labels = run_fp8_profile(args.sizes)
        print(f"fp8 profile: {len(labels)} calls, each inside the NVTX range {PROFILE_RANGE!r}, in this order:")
        print("\n".join(labels))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {}
    if args.graph_lengths:
        with on_progress(checkpoint(res, out, "fp8_graph_lengths", format_graph_lengths, count=lambda r: len(r.get("rows", [])))):
            run_fp8_graph_lengths(args.sizes, args.graph_lengths, into=res)
        write_results(out, "fp8_graph_lengths", res, format_graph_lengths(res))
        return 0
    if getattr(args, "tune", False):
        try:
            with on_progress(checkpoint(res, out, "fp8_tune", format_tune, count=_tuned_points)):
                run_fp8_tune(args.sizes, into=res, families=args.tune_families, kinds=args.tune_kinds)
        except KeyboardInterrupt:
            if res.get("device"):
                res["interrupted"] = True
                text = "INTERRUPTED (Ctrl-C): the sizes measured before it\n\n" + format_tune(res)
                write_results(out, "fp8_tune", res, text, echo=False)
            raise KeyboardInterrupt(f"the launch sweep measured so far is in {out}/fp8_tune.json and fp8_tune.md") from None
        write_results(out, "fp8_tune", res, format_tune(res))
        return 0
    try:
        with on_progress(checkpoint(res, out, "fp8", format_tables)):
            run_fp8_bench(args.sizes, into=res)
    except KeyboardInterrupt:
        if res.get("copy_gbs") is not None:
            res["interrupted"] = True
            text = "INTERRUPTED (Ctrl-C): the rows measured before it\n\n" + format_tables(res)
            write_results(out, "fp8", res, text, echo=False)
        raise KeyboardInterrupt(f"{len(res.get('write', []))} write rows and {len(res.get('gather', []))} gather rows "
                                f"measured so far are in {out}/fp8.json and fp8.md") from None  # fmt: skip
    write_results(out, "fp8", res, format_tables(res))
    return 0


if __name__ == "__main__":
    from mlakv._interrupt import run_module

    sys.exit(run_module("mlakv.bench.fp8_bench", main))
