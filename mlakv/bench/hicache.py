"""HiCache transfer bandwidth (``mlakv bench hicache``): backup (device -> host, all layers) and
per-layer load (host -> device) of scattered whole pages, against ``copy_`` of one contiguous block
of the same bytes (the ceiling).

On a GPU the host pool is pinned and the copies are mlakv's zero-copy page kernels on a side
stream. Without a GPU the "device" pool lives on the CPU too, the copies are the torch indexing
path, and the output says so: those numbers are host memory bandwidth, not PCIe.

With ``--sweep`` (GPU) the transfer kernel also runs at every launch shape of
:data:`mlakv.spec.tuning.HICACHE_COPY_SWEEP` (``wW tT``: W warps, tiles of T words) beside the launch
table's (``table``), through the host pool's own calls, at every page count, layout and SM budget
(one host pool each). Before a shape is timed, its round trip (fresh random device rows backed up,
the device poisoned, loaded back) must reproduce the rows bit-exactly; a shape that does not is
reported ``WRONG`` and not timed. The report gives per page count the fastest shape (the least time
for a backup and a load over every layout and SM budget timed) against the table's, and the
``HICACHE_COPY_STEPS`` rows those shapes make (keyed by the bytes one launch moves: one layer of the
transfer). ``--out DIR`` writes ``hicache.json`` and ``hicache.md``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch

from mlakv.mem_cache import MLATokenToKVPool, MLATokenToKVPoolHost
from mlakv.spec import tuning

from .options import CPU_PAGES, GPU_PAGES, HOST_LAYOUTS, wants_l3
from .options import hicache_parser as build_parser
from .report import table_steps, write_results
from .timing import progress, sync, wall_median_s

CPU_LABEL = "CPU copies (torch path; the 'device' pool is on the CPU; GPU numbers need a GPU)"
SWEEP_CPU_NOTE = (
    "--sweep: the transfer kernel's launch shapes are timed on a GPU only (here the copies are the torch "
    "path, which has none); nothing swept"
)
TABLE = "table"  # the sweep's name for the launch table's own shape

Transfer = Callable[[], None]


def copy_ceilings_gbs(nbytes: int, device: torch.device) -> tuple[float, float]:
    """(to-host, to-device) GB/s of one contiguous ``copy_`` of ``nbytes`` (pinned host on GPU)."""
    dev_block = torch.empty(nbytes, dtype=torch.uint8, device=device)
    host_block = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    d2h = nbytes / wall_median_s(lambda: host_block.copy_(dev_block, non_blocking=True), device) / 1e9
    h2d = nbytes / wall_median_s(lambda: dev_block.copy_(host_block, non_blocking=True), device) / 1e9
    return d2h, h2d


def shape_name(shape: Sequence[int]) -> str:
    """A sweep shape's name: ``(16, 8192)`` -> ``w16 t8192`` (warps, tile words)."""
    return f"w{shape[0]} t{shape[1]}"


def shape_of(name: str) -> tuple[int, int]:
    """The shape a sweep name stands for: ``w16 t8192`` -> ``(16, 8192)``."""
    w, t = name.split()
    return int(w[1:]), int(t[1:])


@contextlib.contextmanager
def forced_copy_launch(num_warps: int, tile_words: int) -> Iterator[None]:
    """Every HiCache copy launched inside takes ``(num_warps, tile_words)`` instead of the launch
    table's (the sweep reaches the kernel through the host pool's own calls)."""
    saved = tuning.hicache_copy_launch
    tuning.hicache_copy_launch = lambda nbytes: (num_warps, tile_words)
    try:
        yield
    finally:
        tuning.hicache_copy_launch = saved


def host_transfers(
    pool: MLATokenToKVPool, n_pages: int, layout: str, device: torch.device, sms: int = 8
) -> tuple[Transfer, Transfer, Callable[[], bool]]:
    """``(backup, load, round_trip_ok)`` of ``n_pages`` scattered pages through a new host pool of
    ``layout`` (``sms``: the transfer kernel's persistent grid, the most SMs it occupies). ``backup``
    copies every layer to the host, ``load`` every layer back with per-layer calls, each synchronized;
    ``round_trip_ok()`` fills the pages' device rows with fresh random bytes, backs them up, poisons
    the device buffers, loads the rows back and says whether they are the same bytes."""
    P, L = pool.page_size, pool.layer_num
    host = MLATokenToKVPoolHost(pool, host_size=n_pages * P, layout=layout, transfer_sms=sms)
    perm = torch.randperm(n_pages)  # scattered pages on both sides
    dev_slots = ((perm[:, None] + 1) % n_pages * P + torch.arange(P)).flatten()
    host_slots = host.alloc(n_pages * P)
    host_slots = host_slots.view(n_pages, P)[torch.randperm(n_pages)].flatten()
    d = dev_slots.to(device)

    def backup() -> None:
        host.backup_from_device_all_layer(pool, host_slots, dev_slots)
        host.synchronize()

    def load() -> None:
        for layer in range(L):
            host.load_to_device_per_layer(pool, host_slots, dev_slots, layer)
        host.synchronize()

    def round_trip_ok() -> bool:
        for b in pool.kv_buffer:
            b.view(torch.uint8).random_(0, 256)
        ref = [b[d].clone() for b in pool.kv_buffer]
        backup()
        for b in pool.kv_buffer:
            b.view(torch.uint8).random_(0, 256)
        load()
        sync(device)
        return all(torch.equal(a.view(torch.uint8), b[d].view(torch.uint8)) for a, b in zip(ref, pool.kv_buffer))

    return backup, load, round_trip_ok


def bench_host_layout(
    pool: MLATokenToKVPool, n_pages: int, layout: str, device: torch.device, sms: int = 8
) -> Optional[tuple[float, float]]:
    """(backup GB/s, load GB/s) of ``n_pages`` scattered pages through a host pool of ``layout``;
    None if the round trip does not reproduce the device rows bit-exactly (then nothing is timed).
    ``sms``: the transfer kernel's persistent grid (the most SMs it occupies)."""
    backup, load, round_trip_ok = host_transfers(pool, n_pages, layout, device, sms)
    if not round_trip_ok():
        return None
    nbytes = n_pages * pool.page_size * pool.row_bytes() * pool.layer_num
    return nbytes / wall_median_s(backup, device) / 1e9, nbytes / wall_median_s(load, device) / 1e9


def sweep_host_layout(
    pool: MLATokenToKVPool,
    n_pages: int,
    layout: str,
    device: torch.device,
    sms: int = 8,
    shapes: Sequence[tuple[int, int]] = tuning.HICACHE_COPY_SWEEP,
    time_s: Callable[[Transfer, torch.device], float] = lambda fn, device: wall_median_s(fn, device, warmup=0),
) -> Iterator[tuple[str, Union[tuple[float, float], str]]]:
    """``(name, (backup GB/s, load GB/s) or "WRONG")`` for the launch table's shape (``table``), then
    each of ``shapes`` (``(num_warps, tile_words)``, named by :func:`shape_name`), each as soon as it
    is measured, all through one host pool of ``layout``. Each shape's round trip is checked first
    (fresh random rows; a shape that fails is ``WRONG`` and not timed); ``time_s(transfer, device)``
    times a transfer in seconds (default: the synchronized wall median; the check has just run both
    directions)."""
    backup, load, round_trip_ok = host_transfers(pool, n_pages, layout, device, sms)
    nbytes = n_pages * pool.page_size * pool.row_bytes() * pool.layer_num
    runs: list[tuple[str, Callable[[], Any]]] = [(TABLE, contextlib.nullcontext)]
    runs += [(shape_name(s), lambda s=s: forced_copy_launch(*s)) for s in shapes]
    for name, launch in runs:
        with launch():
            if not round_trip_ok():
                result: Union[tuple[float, float], str] = "WRONG"
            else:
                result = (nbytes / time_s(backup, device) / 1e9, nbytes / time_s(load, device) / 1e9)
        yield name, result


def fastest_shapes(sweep: list[dict]) -> list[str]:
    """Per page count of a sweep's rows (``pages``, ``launch_bytes``, ``bytes``, ``shape``, ``backup_gbs``,
    ``load_gbs``; ``WRONG`` rows have no rates), the shape with the least time for one backup and one
    load summed over every layout and SM budget timed (a shape wrong anywhere at that count is left
    out), against the launch table's; then the ``HICACHE_COPY_STEPS`` rows those shapes make. Nothing
    without sweep rows."""
    by_pages: dict[int, dict[str, list[dict]]] = {}
    for r in sweep:
        by_pages.setdefault(r["pages"], {}).setdefault(r["shape"], []).append(r)
    lines: list[str] = []
    best: list[tuple[int, tuple[int, int]]] = []
    for pages in sorted(by_pages):
        shapes = by_pages[pages]
        runs = max(len(rs) for rs in shapes.values())
        total: dict[str, tuple[float, float]] = {}  # shape -> (bytes, seconds) over its runs
        for name, rs in shapes.items():
            if len(rs) == runs and all(isinstance(r.get("backup_gbs"), float) for r in rs):
                b = sum(2 * r["bytes"] for r in rs)
                s = sum(r["bytes"] / (r["backup_gbs"] * 1e9) + r["bytes"] / (r["load_gbs"] * 1e9) for r in rs)
                total[name] = (b, s)
        swept = {k: v for k, v in total.items() if k != TABLE}
        if not swept:
            continue
        name = min(swept, key=lambda k: swept[k][1])
        launch_bytes = shapes[name][0]["launch_bytes"]
        gbs = swept[name][0] / swept[name][1] / 1e9
        table = shape_name(tuning.hicache_copy_launch(launch_bytes))
        vs = f" (the table's {table}: {total[TABLE][0] / total[TABLE][1] / 1e9:.1f} GB/s)" if TABLE in total else ""
        lines.append(f"- {pages} pages ({launch_bytes / 2**20:.1f} MiB a launch): {name}: {gbs:.1f} GB/s over "
                     f"{runs} backup{'s' if runs > 1 else ''} and load{'s' if runs > 1 else ''}{vs}")  # fmt: skip
        best.append((launch_bytes, shape_of(name)))
    if not lines:
        return []
    steps = tuple(table_steps(best))
    return ["", "Fastest launch shape per page count (`--sweep`; bytes over the time of a backup and a load):", "",
            *lines, "", f"HICACHE_COPY_STEPS = {steps!r}"]  # fmt: skip


def main(argv: Optional[list[str]] = None) -> int:
    """``mlakv bench hicache``: returns 0, or 1 when a round trip was wrong.

    Rows are printed as they are measured; Ctrl-C raises ``KeyboardInterrupt`` saying how many were
    (with ``--out`` the files then hold those rows, marked interrupted).
    With ``--l3`` it runs the L3 store bench (``mlakv bench hicache --l3 mooncake``).
    """
    argv = list(argv or [])
    if wants_l3(argv):
        from . import main as bench_main

        return bench_main(["hicache", *argv])
    args = build_parser().parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    P, L = args.page_size, args.layers
    pages = args.pages or (GPU_PAGES if cuda else CPU_PAGES)
    layouts = HOST_LAYOUTS if args.layouts == "both" else [args.layouts]
    where = torch.cuda.get_device_name() if cuda else CPU_LABEL
    sweep = args.sweep and cuda
    text: list[str] = []
    res: dict[str, Any] = {"device": where, "page_size": P, "layers": L, "rows": [], "sweep": []}

    def emit(line: str) -> None:
        text.append(line)
        print(line, flush=True)

    emit(f"# HiCache transfers on {where}: bf16 512+64 (1152 B rows), page {P}, {L} layers")
    if sweep:
        emit("Launch sweep of the transfer kernel (`wW tT`: W warps, tiles of T words; `table`: the launch table's "
             "shape); every shape's round trip checked bit-exact first (WRONG: not timed)")  # fmt: skip
        emit("")
        emit("| pages | layout | SMs | shape | bytes | backup GB/s | load GB/s | to-host copy_ GB/s | to-device copy_ GB/s "
             "| backup/ceiling | load/ceiling |")  # fmt: skip
        emit("|---|---|---|---|---|---|---|---|---|---|---|")
    else:
        emit("| pages | layout | SMs | bytes | backup GB/s | load GB/s (all layers, per-layer calls) | to-host copy_ GB/s | "
             "to-device copy_ GB/s | backup/ceiling | load/ceiling |")  # fmt: skip
        emit("|---|---|---|---|---|---|---|---|---|---|")
    wrong = False
    done = 0
    try:
        for n_pages in pages:
            progress(f"{n_pages} pages: allocating and measuring the copy ceiling")
            pool = MLATokenToKVPool(n_pages * P, P, torch.bfloat16, 512, 64, L, device)
            for b in pool.kv_buffer:
                b.view(torch.uint8).random_(0, 256)
            nbytes = n_pages * P * pool.row_bytes() * L
            d2h, h2d = copy_ceilings_gbs(nbytes, device)
            size = f"{nbytes / 2**20:.0f} MiB"
            for layout, sms in [(lay, k) for lay in layouts for k in args.sms]:
                progress(f"{n_pages} pages, {layout}, {sms} SMs" + (": every launch shape" if sweep else ""))
                if sweep:  # (shape name, (backup, load) GB/s or "WRONG") per launch shape
                    measured = sweep_host_layout(pool, n_pages, layout, device, sms)
                else:
                    got = bench_host_layout(pool, n_pages, layout, device, sms)
                    measured = iter([(None, "WRONG" if got is None else got)])
                for name, got in measured:
                    done += 1
                    row: dict[str, Any] = {"pages": n_pages, "layout": layout, "sms": sms, "bytes": nbytes,
                                           "d2h_copy_gbs": d2h, "h2d_copy_gbs": h2d}  # fmt: skip
                    cells = [str(n_pages), layout, str(sms)]
                    if name is not None:
                        row.update(shape=name, launch_bytes=nbytes // L)
                        cells.append(name)
                    into = res["sweep" if name is not None else "rows"]
                    if got == "WRONG":
                        wrong = True
                        into.append(dict(row, status="WRONG"))
                        emit(f"| {' | '.join(cells)} | WRONG: round trip differs, not timed |")
                        continue
                    bk, ld = got
                    into.append(dict(row, backup_gbs=bk, load_gbs=ld))
                    emit(f"| {' | '.join(cells)} | {size} | {bk:.1f} | {ld:.1f} | {d2h:.1f} | {h2d:.1f} | "
                         f"{bk / d2h:.0%} | {ld / h2d:.0%} |")  # fmt: skip
            del pool
            if cuda:
                torch.cuda.empty_cache()
    except KeyboardInterrupt:
        if args.out is not None:
            write_results(args.out, "hicache", dict(res, interrupted=True), "\n".join([*text, "", "INTERRUPTED"]), echo=False)
        raise KeyboardInterrupt(f"the {done} row{'s were' if done != 1 else ' was'} measured so far, printed above") from None
    for line in fastest_shapes(res["sweep"]):
        emit(line)
    if args.sweep and not cuda:
        emit("")
        emit(SWEEP_CPU_NOTE)
    if not cuda:
        emit("")
        emit(f"{CPU_LABEL}: these are host-memory copies, not PCIe transfers.")
    if args.out is not None:
        write_results(args.out, "hicache", res, "\n".join(text), echo=False)
    return 1 if wrong else 0
