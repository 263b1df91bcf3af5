"""vLLM face benchmark: each of vLLM's MLA cache ops on mlakv (``mlakv.compat.vllm``) beside vLLM's own
kernel, against copy bandwidth.

Why: issue 26 asks each op to reach >= 85 % of its bytes at copy bandwidth at 65536 tokens, and to be
at or below vLLM's own kernel at every n in {1, 64, 1024, 16384, 65536}, where vLLM's
``cache_kernels.cu`` builds from a fetched copy (:mod:`mlakv.bench.vllm_peer`: vLLM's unchanged
source under ``.peers/vllm/csrc``, fetched by ``python -m mlakv.compat.fetch_vllm_tests``).

Providers, side by side in one run: ``mlakv`` (the face) and ``vllm`` (vLLM's kernels, called with
the same arguments). When vLLM's kernels cannot be built (source absent, no nvcc, a failed build),
the report says why and mlakv is timed alone.

Per n (GPU; DeepSeek widths: kv_lora_rank 512, rope 64, block_size 64, indexer keys 128 + one fp32
scale; slots a random permutation of twice n; 4 requests for the gathers), each op is timed as the
median CUDA-graph replay over 8 rotating input sets (:mod:`mlakv.bench.timing`; ``swap_blocks`` reads
its CPU block mapping on the host, so it is timed eagerly with CUDA events for both providers).
Bytes are read + written:

==========================  ===================================  ======================
op                          what moves per token                 bytes
==========================  ===================================  ======================
concat auto (bf16)          576 bf16 in, 576 bf16 out            2304
concat fp8                  576 bf16 in, 576 e4m3 out            1728
concat fp8_ds_mla           576 bf16 in, 656-byte entry out      1808
gather auto (bf16)          576 bf16 in and out                  2304
gather fp8 -> bf16          576 e4m3 in, 576 bf16 out            1728
cp_gather_cache (bf16)      576 bf16 in and out                  2304
upconvert ds_mla -> bf16    656-byte entry in, 576 bf16 out      1808
swap_blocks (GPU -> GPU)    one 64-slot bf16 block per 64 tokens 2304
indexer store (ue8m0)       128 bf16 in, 128 e4m3 + 4 out        388
indexer gather              132 bytes in and out                 264
==========================  ===================================  ======================

Before timing, each provider's result on the GPU is compared byte for byte with the reference: the
same call on the CPU (the face's torch path, which follows vLLM 0.33's rules: ``fp8_ds_mla`` tile
scales ``2^ceil(log2(max(amax / 448, 1e-4)))``, the indexer's ``ue8m0`` scales — the formats in which
mlakv and vLLM agree bit for bit, docs/vllm.md). Destinations start as random bytes; the inputs hold
no NaN (the one payload the two write differently). A mismatch is reported ``WRONG`` (with how many
bytes and rows differ) and that provider is not timed for the op.

Run: ``mlakv bench vllm`` or ``python -m mlakv.bench.vllm_ops [--sizes 1,64,1024,16384,65536] [--ops concat,gather]
[--providers mlakv,vllm] [--sweep] [--out DIR]`` (writes ``vllm_ops.json`` and ``vllm_ops.md`` there).
``--sweep`` also times the byte gathers (``gather auto``, ``cp_gather_cache``, ``indexer gather``: one
fused Triton launch each) at every launch shape of :data:`mlakv.spec.tuning.PAGED_GATHER_SWEEP`, each
checked first, so ``PAGED_GATHER_STEPS`` can be read off the table.
``MLAKV_DISABLE_JIT=1`` times mlakv's Triton paths only (no nvcc builds of mlakv's JIT modules;
vLLM's kernels are still built).
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, Callable, Optional, Sequence

import torch

from mlakv.compat import vllm as V
from mlakv.kernels.cuda.loader import JitUnavailable
from mlakv.spec import tuning

from . import timing
from .options import VLLM_PROVIDERS, VLLM_SIZES, vllm_parser

__all__ = [
    "DEFAULT_SIZES",
    "PROVIDERS",
    "OPS",
    "OP_FUNCTIONS",
    "make_case",
    "calls",
    "select_providers",
    "mismatch_summary",
    "check_provider",
    "summarize",
    "run",
    "format_table",
    "main",
]

DEFAULT_SIZES = VLLM_SIZES
PROVIDERS = VLLM_PROVIDERS
R, P, BS = 512, 64, 64
IDX_DIM, IDX_ENTRY = 128, 132
OPS = {  # name -> bytes per token (read + written)
    "concat auto": 2304,
    "concat fp8": 1728,
    "concat fp8_ds_mla": 1808,
    "gather auto": 2304,
    "gather fp8": 1728,
    "cp_gather_cache": 2304,
    "upconvert ds_mla": 1808,
    "swap_blocks": 2304,
    "indexer store": 388,
    "indexer gather": 264,
}
#: The vLLM function each op calls (a peer built from another vLLM version may lack one).
OP_FUNCTIONS = {
    "concat auto": "concat_and_cache_mla",
    "concat fp8": "concat_and_cache_mla",
    "concat fp8_ds_mla": "concat_and_cache_mla",
    "gather auto": "gather_and_maybe_dequant_cache",
    "gather fp8": "gather_and_maybe_dequant_cache",
    "cp_gather_cache": "cp_gather_cache",
    "upconvert ds_mla": "cp_gather_and_upconvert_fp8_kv_cache",
    "swap_blocks": "swap_blocks",
    "indexer store": "indexer_k_quant_and_cache",
    "indexer gather": "cp_gather_indexer_k_quant_cache",
}
#: Ops whose mlakv path the issue's bandwidth goal reads at its largest n.
GOAL_N = 65536
GOAL_PCT = 85.0
#: The ops ``--sweep`` times at every launch shape of the fused paged gather.
SWEPT_OPS = ("gather auto", "cp_gather_cache", "indexer gather")


def _poison(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Random bytes viewed as ``dtype`` (a destination's starting contents), on ``gen``'s device."""
    width = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (*shape[:-1], shape[-1] * width), dtype=torch.uint8, generator=gen, device=gen.device)
    return raw.view(dtype)


def make_case(n: int, device: str, gen: torch.Generator) -> dict:
    """One input set on ``device``: sources, caches (bf16, e4m3, ds_mla, indexer), slots, a 4-request
    block table, destinations of random bytes. ``gen`` (a CPU generator) decides the CPU tensors
    and the block mapping; on another device the values come from a generator of that device seeded
    from ``gen`` (no host-side generation of the large tensors)."""
    nb = -(-2 * n // BS) + 1
    swaps = max(1, n // BS)
    mapping = torch.stack([torch.randperm(nb, generator=gen)[:swaps], torch.arange(swaps)], 1)  # CPU, as vLLM's
    g = gen if torch.device(device).type == "cpu" else torch.Generator(device).manual_seed(
        int(torch.randint(0, 2**62, (1,), generator=gen)))  # fmt: skip
    kw = dict(generator=g, device=device)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, **kw).to(torch.bfloat16)

    def bytes_(*shape: int) -> torch.Tensor:
        return torch.randint(0, 256, shape, dtype=torch.uint8, **kw)

    lens = [n // 4] * 3 + [n - 3 * (n // 4)]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=device)
    d = dict(
        kv_c=randn(n, R), k_pe=randn(n, P), slot=torch.randperm(nb * BS, **kw)[:n], cu=cu, ws=cu[:4].clone(),
        table=torch.stack([torch.randperm(nb, **kw) for _ in range(4)]).to(torch.int32),
        auto=randn(nb, BS, R + P), fp8=bytes_(nb, BS, R + P) & 0x77,  # finite e4m3
        ds=torch.zeros(nb, BS, 656, dtype=torch.uint8, device=device),
        scale=torch.tensor([0.05], device=device), out=_poison((n, R + P), torch.bfloat16, g),
        swap_dst=_poison((swaps + 1, BS, R + P), torch.bfloat16, g), mapping=mapping,
        idx_k=randn(n, IDX_DIM), idx_cache=bytes_(nb, BS, IDX_ENTRY), dst_k=bytes_(n, IDX_DIM), dst_scale=bytes_(n, 4),
    )  # fmt: skip
    # every ds_mla entry valid (the face's write, on the set's device)
    V.concat_and_cache_mla(randn(nb * BS, R), randn(nb * BS, P), d["ds"], torch.arange(nb * BS, device=device),
                           "fp8_ds_mla", d["scale"])  # fmt: skip
    return d


def calls(api: Any) -> dict[str, tuple[Callable[[dict], None], tuple[str, ...]]]:
    """name -> (the op on an input set through ``api``, the tensors it writes).

    ``api`` is anything with vLLM's op functions taking vLLM's arguments in vLLM's order:
    :mod:`mlakv.compat.vllm` or the peer's ``torch.ops.mlakv_vllm_peer``. Every optional argument is
    passed (vLLM's schemas give some no default).
    """
    return {
        "concat auto": (lambda d: api.concat_and_cache_mla(
            d["kv_c"], d["k_pe"], d["auto"], d["slot"], "auto", d["scale"], False), ("auto",)),
        "concat fp8": (lambda d: api.concat_and_cache_mla(
            d["kv_c"], d["k_pe"], d["fp8"], d["slot"], "fp8", d["scale"], False), ("fp8",)),
        "concat fp8_ds_mla": (lambda d: api.concat_and_cache_mla(
            d["kv_c"], d["k_pe"], d["ds"], d["slot"], "fp8_ds_mla", d["scale"], False), ("ds",)),
        "gather auto": (lambda d: api.gather_and_maybe_dequant_cache(
            d["auto"], d["out"], d["table"], d["cu"], d["cu"], d["out"].shape[0], "auto", d["scale"], None), ("out",)),
        "gather fp8": (lambda d: api.gather_and_maybe_dequant_cache(
            d["fp8"], d["out"], d["table"], d["cu"], d["cu"], d["out"].shape[0], "fp8", d["scale"], None), ("out",)),
        "cp_gather_cache": (lambda d: api.cp_gather_cache(d["auto"], d["out"], d["table"], d["cu"], 4, None), ("out",)),
        "upconvert ds_mla": (lambda d: api.cp_gather_and_upconvert_fp8_kv_cache(
            d["ds"], d["out"], d["table"], d["ws"], 4, None), ("out",)),
        "swap_blocks": (lambda d: api.swap_blocks(
            d["auto"], d["swap_dst"], d["auto"].stride(0) * d["auto"].element_size(), d["mapping"]), ("swap_dst",)),
        "indexer store": (lambda d: api.indexer_k_quant_and_cache(
            d["idx_k"], d["idx_cache"], d["slot"], IDX_DIM, "ue8m0"), ("idx_cache",)),
        "indexer gather": (lambda d: api.cp_gather_indexer_k_quant_cache(
            d["idx_cache"], d["dst_k"], d["dst_scale"], d["table"], d["cu"]), ("dst_k", "dst_scale")),
    }  # fmt: skip


def select_providers(requested: Sequence[str], peer_error: Optional[str]) -> tuple[list[str], str]:
    """The providers to time and what the report says about vLLM's kernels.

    Args:
        requested: provider names (:data:`PROVIDERS`), in the table's order.
        peer_error: None when vLLM's kernels were built, else why not (ignored unless ``vllm`` is
            requested).

    Returns:
        ``(providers, note)``: ``vllm`` is dropped when it could not be built (the note says why).

    Raises:
        ValueError: an unknown or repeated provider, or none.
    """
    unknown = [p for p in requested if p not in PROVIDERS]
    if unknown or not requested or len(set(requested)) != len(requested):
        raise ValueError(f"providers: {list(requested)}; expected a non-empty list without repeats of {', '.join(PROVIDERS)}")
    if "vllm" not in requested:
        return list(requested), "not requested"
    if peer_error is not None:
        return [p for p in requested if p != "vllm"], f"not built: {peer_error}"
    return list(requested), "built"


def mismatch_summary(got: torch.Tensor, want: torch.Tensor) -> Optional[str]:
    """None when ``got`` and ``want`` hold the same bytes, else how many bytes and rows (first dim) differ
    and the first differing one. Both CPU tensors of one shape and dtype."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"shape/dtype {tuple(got.shape)} {got.dtype} != {tuple(want.shape)} {want.dtype}"
    g = got.contiguous().view(torch.uint8).reshape(max(1, got.shape[0]) if got.dim() else 1, -1)
    w = want.contiguous().view(torch.uint8).reshape(g.shape)
    diff = g != w
    if not bool(diff.any()):
        return None
    rows = diff.any(1).nonzero().flatten()
    first_row = int(rows[0])
    first_byte = int(diff[first_row].nonzero()[0])
    return (f"{int(diff.sum())} of {diff.numel()} bytes differ in {rows.numel()} of {g.shape[0]} rows; "
            f"first at row {first_row}, byte {first_byte} (got {int(g[first_row, first_byte])}, "
            f"want {int(w[first_row, first_byte])})")  # fmt: skip


def _clone(s: dict) -> dict:
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in s.items()}


def check_provider(fn: Callable[[dict], None], written: tuple[str, ...], inputs: dict, ref: dict) -> Optional[str]:
    """None when ``fn`` on a copy of ``inputs`` (a GPU input set) writes the bytes ``ref`` (the CPU
    set after the reference call) holds in every tensor named in ``written``, else what differs
    (or what the call raised)."""
    g = _clone(inputs)
    try:
        fn(g)
        timing.sync()
    except Exception as e:  # noqa: BLE001 (a provider refusing the bench's input is reported, not fatal)
        return f"raised {type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
    for w in written:
        bad = mismatch_summary(g[w].cpu(), ref[w])
        if bad is not None:
            return f"{w}: {bad}"
    return None


def _on_device(cpu_set: dict, device: str) -> dict:
    """A copy of a CPU input set on ``device`` (the block mapping stays on the host, as vLLM takes it)."""
    return {k: (v.to(device, copy=True) if isinstance(v, torch.Tensor) and k != "mapping" else v) for k, v in cpu_set.items()}


def _time(name: str, fn: Callable[[dict], None], sets: list[dict]) -> float:
    if name == "swap_blocks":
        return timing.event_median_us(lambda: fn(sets[0]))
    return timing.graph_median_us(timing.rotating(fn, [(s,) for s in sets]), calls=len(sets))


@contextlib.contextmanager
def forced_gather_launch(rows: int, warps: int):
    """Every fused paged gather launched inside takes ``(rows per program, num_warps)``."""
    saved = tuning.paged_gather_launch
    tuning.paged_gather_launch = lambda n, row_bytes: (rows, warps)
    try:
        yield
    finally:
        tuning.paged_gather_launch = saved


def _sweep(fn: Callable[[dict], None], written: tuple[str, ...], name: str, check_set: dict, ref: dict,
           sets: list[dict]) -> dict:  # fmt: skip
    """``{"r<rows>w<warps>": µs or "WRONG: ..."}`` over :data:`~mlakv.spec.tuning.PAGED_GATHER_SWEEP`."""
    out: dict = {}
    for rows, warps in tuning.PAGED_GATHER_SWEEP:
        with forced_gather_launch(rows, warps):
            bad = check_provider(fn, written, check_set, ref)
            out[f"r{rows}w{warps}"] = f"WRONG: {bad}" if bad is not None else _time(name, fn, sets)
    return out


def _load_peer(requested: Sequence[str], load_peer: Optional[Callable[[], Any]]) -> tuple[Any, Optional[str], str]:
    """``(peer ops or None, why not, where from)`` for the run."""
    if "vllm" not in requested:
        return None, None, ""
    from . import vllm_peer

    timing.progress("vllm_ops: building vLLM's cache kernels (nvcc, about a minute when not cached)")
    try:
        ops = (load_peer or vllm_peer.load_vllm_peer)()
    except JitUnavailable as e:
        return None, str(e), ""
    return ops, None, vllm_peer.build_note() or f"from {vllm_peer.peer_dir()}"


def run(sizes: list[int], only: Optional[list[str]] = None, providers: Sequence[str] = PROVIDERS,
        device: str = "cuda", load_peer: Optional[Callable[[], Any]] = None,
        checkpoint: Optional[Callable[[dict], None]] = None, sweep: bool = False) -> dict:  # fmt: skip
    """Time every op (or those whose name contains one of ``only``) at every size with each provider;
    returns the report (also what ``vllm_ops.json`` holds).

    Each row: ``n``, ``op``, ``bytes``, one entry per provider (``status`` ``ok`` with ``us``, ``gbs``,
    ``pct_copy_bw``; ``WRONG`` with ``mismatch``; ``absent``), and ``vllm_over_mlakv`` (vLLM's time over
    mlakv's) where both were timed. ``device`` and ``load_peer`` (what builds vLLM's ops; default
    :func:`mlakv.bench.vllm_peer.load_vllm_peer`) let the bookkeeping run elsewhere (tests);
    ``checkpoint`` is called with the report so far after each size (a run cut short keeps its rows);
    ``sweep``: rows of :data:`SWEPT_OPS` also get ``sweep`` (mlakv at every fused-gather launch shape).
    """
    peer, peer_error, peer_src = _load_peer(providers, load_peer)
    if peer_error is not None:
        timing.progress(f"vllm_ops: vLLM's kernels not built, timing mlakv alone: {peer_error}")
    chosen, note = select_providers(list(providers), peer_error)
    if note == "built":
        note = f"built (vLLM's source, unchanged, as torch.ops.mlakv_vllm_peer): {peer_src}"
    apis = {"mlakv": V, "vllm": peer}
    bw = timing.copy_bandwidth_gbs()
    device_name = torch.cuda.get_device_name() if torch.device(device).type == "cuda" else device
    report: dict = {"device": device_name, "copy_bandwidth_gbs": bw, "providers": chosen,
                    "vllm_kernels": note, "rows": []}  # fmt: skip
    for n in sizes:
        gen = torch.Generator().manual_seed(n)
        cpu_set = make_case(n, "cpu", gen)  # the reference's inputs; the GPU's first set is a copy
        sets = [_on_device(cpu_set, device)]
        sets += [make_case(n, device, gen) for _ in range(timing.INPUT_SETS - 1)]
        ref_calls = calls(V)
        per_provider = {p: calls(apis[p]) for p in chosen}
        for name in OPS:
            if only and not any(o in name for o in only):
                continue
            timing.progress(f"vllm_ops: n={n} {name}")
            fn_ref, written = ref_calls[name]
            ref = _clone(cpu_set)
            fn_ref(ref)  # the reference: the face's CPU path
            row: dict = {"n": n, "op": name, "bytes": OPS[name] * n}
            if name == "swap_blocks":
                row["bytes"] = OPS[name] * BS * sets[0]["mapping"].shape[0]
            for p in chosen:
                if p == "vllm" and not hasattr(peer, OP_FUNCTIONS[name]):
                    row[p] = {"status": "absent"}
                    continue
                fn = per_provider[p][name][0]
                # checked on a fresh copy of the reference's inputs: the sets' caches hold what earlier
                # ops' timing wrote into them
                bad = check_provider(fn, written, _on_device(cpu_set, device), ref)
                if bad is not None:
                    row[p] = {"status": "WRONG", "mismatch": bad}
                    continue
                us = _time(name, fn, sets)
                gbs = row["bytes"] / (us * 1e-6) / 1e9
                row[p] = {"status": "ok", "us": us, "gbs": gbs, "pct_copy_bw": 100.0 * gbs / bw}
            if sweep and name in SWEPT_OPS and "mlakv" in chosen:
                row["sweep"] = _sweep(per_provider["mlakv"][name][0], written, name, _on_device(cpu_set, device), ref, sets)
            if row.get("mlakv", {}).get("status") == "ok" and row.get("vllm", {}).get("status") == "ok":
                row["vllm_over_mlakv"] = row["vllm"]["us"] / row["mlakv"]["us"]
            report["rows"].append(row)
        report["summary"] = summarize(report)
        if checkpoint is not None:
            checkpoint(report)
    report["summary"] = summarize(report)
    return report


def summarize(report: dict) -> dict:
    """Per op, the issue's two goals as measured: ``mlakv_at_or_below_vllm`` (mlakv's time <= vLLM's at
    every n where both were timed; None where never both), ``ns_compared``, and mlakv's
    ``pct_copy_bw_at_65536`` / ``meets_85pct`` (None without a timed n = 65536)."""
    out: dict = {}
    for r in report["rows"]:
        s = out.setdefault(r["op"], {"mlakv_at_or_below_vllm": None, "ns_compared": [], "slower_at": [],
                                     "pct_copy_bw_at_65536": None, "meets_85pct": None})  # fmt: skip
        if "vllm_over_mlakv" in r:
            s["ns_compared"].append(r["n"])
            if r["vllm_over_mlakv"] < 1.0:
                s["slower_at"].append(r["n"])
            s["mlakv_at_or_below_vllm"] = not s["slower_at"]
        m = r.get("mlakv", {})
        if r["n"] == GOAL_N and m.get("status") == "ok":
            s["pct_copy_bw_at_65536"] = m["pct_copy_bw"]
            s["meets_85pct"] = m["pct_copy_bw"] >= GOAL_PCT
    return out


_NAMES = {"mlakv": "mlakv", "vllm": "vLLM"}


def _cell(entry: Optional[dict], key: str, fmt: str) -> str:
    if entry is None:
        return ""
    if entry.get("status") != "ok":
        return str(entry.get("status", ""))
    return format(entry[key], fmt)


def format_table(report: dict) -> str:
    """The report as markdown: the conditions, one row per (op, n), then the goals per op."""
    provs = report.get("providers", ["mlakv"])
    both = "vllm" in provs and "mlakv" in provs
    lines = [
        f"device: {report['device']}; copy bandwidth {report['copy_bandwidth_gbs']:.0f} GB/s (read + write)",
        "",
        f"vLLM's kernels: {report['vllm_kernels']}",
        "",
        "Each provider's bytes were compared with the face's CPU path (vLLM 0.33's rules) before timing; "
        "WRONG: not equal (not timed)." + (" vLLM / mlakv > 1: mlakv faster." if both else ""),
        "",
    ]
    head = ["op", "n"] + [f"{_NAMES[p]} µs" for p in provs]
    if both:
        head.append("vLLM / mlakv")
    head += [f"{_NAMES[p]} % copy bw" for p in provs]
    lines += ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    wrong = []
    for r in report["rows"]:
        cells = [r["op"], str(r["n"])] + [_cell(r.get(p), "us", ".2f") for p in provs]
        if both:
            cells.append(f"{r['vllm_over_mlakv']:.2f}" if "vllm_over_mlakv" in r else "")
        cells += [_cell(r.get(p), "pct_copy_bw", ".1f") for p in provs]
        lines.append("| " + " | ".join(cells) + " |")
        wrong += [f"- {p} {r['op']} n={r['n']}: {r[p]['mismatch']}" for p in provs if r.get(p, {}).get("status") == "WRONG"]
    if wrong:
        lines += ["", "Mismatches:", *wrong]
    swept = [r for r in report["rows"] if "sweep" in r]
    if swept:
        shapes = list(swept[0]["sweep"])
        lines += ["", "Fused paged gather launch shapes (r: rows per program, w: warps), mlakv µs:", "",
                  "| op | n | " + " | ".join(shapes) + " | fastest |", "|---|---:|" + "---:|" * (len(shapes) + 1)]
        for r in swept:
            timed = {k: v for k, v in r["sweep"].items() if isinstance(v, float)}
            cells = [f"{v:.2f}" if isinstance(v, float) else "WRONG" for v in r["sweep"].values()]
            best = min(timed, key=timed.get) if timed else ""
            lines.append(f"| {r['op']} | {r['n']} | " + " | ".join(cells) + f" | {best} |")
        lines += [f"- {r['op']} n={r['n']} {k}: {v}" for r in swept for k, v in r["sweep"].items() if isinstance(v, str)]
    summary = report.get("summary") or summarize(report)
    lines += ["", f"| op | mlakv <= vLLM at every n | mlakv % copy bw at {GOAL_N} (goal >= {GOAL_PCT:.0f}) |",
              "|---|---|---:|"]  # fmt: skip
    for op, s in summary.items():
        if s["mlakv_at_or_below_vllm"] is None:
            le = "not compared"
        elif s["mlakv_at_or_below_vllm"]:
            le = f"yes (n = {', '.join(map(str, s['ns_compared']))})"
        else:
            le = f"no (slower at n = {', '.join(map(str, s['slower_at']))})"
        pct = "" if s["pct_copy_bw_at_65536"] is None else f"{s['pct_copy_bw_at_65536']:.1f}" + (
            "" if s["meets_85pct"] else " (below)")
        lines.append(f"| {op} | {le} | {pct} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``mlakv bench vllm [options]`` (:func:`mlakv.bench.options.vllm_parser`); returns the exit code."""
    args = vllm_parser().parse_args(argv)
    if not torch.cuda.is_available():
        print("vllm_ops: needs a CUDA GPU")
        return 1

    def save(report: dict) -> None:
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "vllm_ops.json").write_text(json.dumps(report, indent=1))
            (args.out / "vllm_ops.md").write_text(format_table(report))

    report = run(args.sizes, [o for o in args.ops.split(",") if o], args.providers, checkpoint=save, sweep=args.sweep)
    save(report)
    print(format_table(report), end="")
    return 0


if __name__ == "__main__":
    from mlakv._interrupt import run_module

    raise SystemExit(run_module("mlakv.bench.vllm_ops", main))
