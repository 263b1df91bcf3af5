"""A small run of every GPU kernel variant and layout, for compute-sanitizer (memcheck, racecheck, synccheck).

Not collected by pytest (no ``test_`` prefix). On the GPU machine, from the repository root:

    compute-sanitizer --tool memcheck  --error-exitcode 1 python tests/sanitizer_smoke.py
    compute-sanitizer --tool racecheck --error-exitcode 1 --racecheck-report all python tests/sanitizer_smoke.py
    compute-sanitizer --tool synccheck --error-exitcode 1 python tests/sanitizer_smoke.py

Part names as arguments run only those parts (``python tests/sanitizer_smoke.py rope_write fp8``);
``rope_write_none``, ``rope_write_bf16`` and ``rope_write_e4m3`` split ``rope_write`` by query kind.
Run a part once without the sanitizer first: its Triton kernels are then compiled and cached, and
the sanitizer run only executes them.

Covered: the JIT row write (every TMA/direct-store x warps x items-per-warp variant), the Triton row
kernel and the dispatcher, for bf16 512+64, fp16 512+64, uint8 528+128 and rope-less bf16 512+0,
and the converting write (each pair of fp16/bf16/fp32 source and buffer, through the dispatcher),
with ``loc`` contiguous with padding, strided, with a storage offset, expanded (stride 0), holding
the reserved slot and slots past the buffer (unchecked: skipped); refused calls (a float ``loc``, a
buffer with overlapping rows, a misaligned source at the JIT's checked entry) that must write
nothing; the gather with padding and out-of-range slots; the move kernels (staged and direct, with
out-of-range pairs; at the table's and every sweep shape); the HiCache copy device <-> pinned host (rows
and pages; at the table's and every sweep shape); the FP8 quantizing write and
dequantizing gather (JIT and Triton, per_tensor and ds_mla under each tile-scale rule, the ds_mla Triton
write's general tile path beside its common case; the JIT kernels at
every threads per row with one and several rows per CTA; part ``fp8_parts``: the ds_mla Triton write split over
several programs per row, at the table's and every parts shape of its sweep); the DSA indexer K cache's store (JIT at
every launch shape, Triton at every shape of its sweep, the public op; every loc kind, DCP) and page-table gather (JIT, Triton;
invalid page ids, a short table, an output shorter than the requests); the fused RoPE write (JIT,
Triton at its table's and every sweep shape, the public op; every cache format, no / bf16 / e4m3 query, both RoPE styles, every loc kind,
positions outside the table); a hostile caller (issue 22): rows moved within the cache (a source
aliasing the buffer, through the pool and the dispatcher, JIT and Triton), the registered ops with
bad arguments (refused, or out-of-range slots skipped by the kernel), and the host pool raced by
threads (alloc / backup / load / free) with a device index vector rewritten between layers; the
DeepSeek-V4 family's paged store (part ``v4``: JIT at every launch shape, Triton, the public op; every
layout and loc kind, in-kernel RoPE from freqs_cis and from positions, some outside the table, DCP) and
its gather with invalid slots; vLLM's face (part ``vllm``: every ``mlakv.compat.vllm`` op on the GPU
against the same call on the CPU, with padding and out-of-range slots, unowned output rows, an
unaligned cache view, a padded-block cache, swap_blocks device <-> device and <-> pinned host).

The caching allocator is turned off (``PYTORCH_NO_CUDA_MEMORY_CACHING=1``) so that every tensor
is its own allocation and memcheck sees an access past any of them. Every result is also checked
bit for bit, so a sanitizer run is a correctness run too; the exit status is 1 on any mismatch.
"""

from __future__ import annotations

import os

os.environ.setdefault("PYTORCH_NO_CUDA_MEMORY_CACHING", "1")  # before torch initialises CUDA

import sys  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402

from mlakv import jit_kernel  # noqa: E402
from mlakv.mem_cache import set_mla_kv_buffer_triton  # noqa: E402
from mlakv.kernels.triton.move import launch_move_kv_rows  # noqa: E402
from mlakv.ops.move import move_kv_cache_torch  # noqa: E402
from mlakv.kernels.triton.row_write import launch_get_kv_rows, launch_set_kv_rows  # noqa: E402

LAYOUTS = [(torch.bfloat16, 512, 64), (torch.float16, 512, 64), (torch.uint8, 528, 128), (torch.bfloat16, 512, 0)]
LOC_KINDS = ["contiguous", "strided", "offset", "expanded", "reserved_and_past_end"]
RESERVED = 0


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _rand(n: int, d: int, dtype: torch.dtype) -> torch.Tensor:
    es = torch.empty((), dtype=dtype).element_size()
    return torch.randint(0, 256, (n * d * es,), dtype=torch.uint8, device="cuda").view(dtype).view(n, d)


def _loc(kind: str, n: int, num_slots: int) -> torch.Tensor:
    slots = torch.randperm(num_slots - 1, device="cuda")[:n] + 1
    slots[::5] = -1  # padding rows
    if kind == "strided":
        wide = torch.full((2 * n,), num_slots + 7, dtype=torch.int64, device="cuda")  # the gaps lie past the end
        wide[::2] = slots
        return wide[::2]
    if kind == "offset":
        wide = torch.full((n + 3,), num_slots + 7, dtype=torch.int32, device="cuda")
        wide[3:] = slots.int()
        return wide[3:]
    if kind == "expanded":
        return slots[:1].clamp_min(1).expand(n)
    if kind == "reserved_and_past_end":
        slots[1::5] = RESERVED
        slots[2::7] = num_slots + 1000
        return slots
    return slots


def _fp8_expected(nope, rope, loc, fmt: str, scale, rule: str, num_slots: int, rb: int):
    """``(base [num_slots, 1, rb] random bytes, the rows [num_slots, rb] a quantizing write of
    nope/rope at loc must leave)``: the torch quantizer's rows at the kept slots."""
    from mlakv.ops.fp8 import quantize_mla_rows

    base = torch.randint(0, 256, (num_slots, 1, rb), dtype=torch.uint8, device="cuda")
    rows = quantize_mla_rows(nope, rope, fmt, scale, ds_mla_scale_rule=rule).view(torch.uint8)
    expected = base.clone().view(num_slots, rb)
    idx = loc.to(torch.long)
    keep = (idx >= 0) & (idx < num_slots) & (idx != RESERVED)
    expected[idx[keep]] = rows[keep]
    return base, expected


def _expected(base: torch.Tensor, loc: torch.Tensor, nope: torch.Tensor, rope: torch.Tensor, skip) -> torch.Tensor:
    """The write's spec on integer views: rows with a slot in [0, num_slots) other than ``skip`` get [nope | rope].
    A slot that several kept rows target is unspecified: see _written_as_expected."""
    out = _bits(base).reshape(base.shape[0], -1).clone()
    idx = loc.to(torch.long)
    keep = (idx >= 0) & (idx < base.shape[0])
    if skip is not None:
        keep &= idx != skip
    rows = torch.cat([_bits(nope), _bits(rope)], dim=1)
    out[idx[keep], : rows.shape[1]] = rows[keep]
    return out


def _written_as_expected(kv: torch.Tensor, base: torch.Tensor, loc: torch.Tensor, nope, rope, skip) -> bool:
    """kv holds _expected(...), except that a slot several kept rows target may mix those rows (they
    are written concurrently, vector by vector): each of its bytes comes from one of them."""
    got = _bits(kv).reshape(kv.shape[0], -1)
    want = _expected(base, loc, nope, rope, skip)
    idx = loc.to(torch.long)
    keep = (idx >= 0) & (idx < base.shape[0]) & ((idx != skip) if skip is not None else True)
    slots, counts = torch.unique(idx[keep], return_counts=True)
    shared = slots[counts > 1]
    single = torch.ones(got.shape[0], dtype=torch.bool, device=got.device)
    single[shared] = False
    if not torch.equal(got[single], want[single]):
        return False
    rows = torch.cat([_bits(nope), _bits(rope)], dim=1)
    width = rows.shape[1]
    for slot in shared.tolist():
        candidates = rows[keep & (idx == slot)]
        if not (candidates == got[slot, :width]).any(dim=0).all() or not torch.equal(got[slot, width:], want[slot, width:]):
            return False
    return True



class Smoke:
    def __init__(self) -> None:
        self.cases = 0
        self.failures = 0

    def check(self, name: str, ok: bool) -> None:
        self.cases += 1
        if not ok:
            self.failures += 1
            print(f"MISMATCH {name}")

    def writes(self) -> None:
        for dtype, nd, rd in LAYOUTS:
            es = torch.empty((), dtype=dtype).element_size()
            jit_ok = jit_kernel.can_use_set_mla_kv_buffer(nd * es, rd * es, "cuda")
            for kind in LOC_KINDS:
                for n in (1, 37, 300):
                    num_slots = n + 50
                    loc = _loc(kind, n, num_slots)
                    nope, rope = _rand(n, nd, dtype), _rand(n, rd, dtype)
                    if kind == "expanded":  # one slot written n times: with one row, any order gives it
                        nope, rope = nope[:1].expand(n, nd), rope[:1].expand(n, rd)
                    base = torch.empty((num_slots, 1, nd + rd), dtype=dtype, device="cuda")
                    base.view(torch.uint8).random_(0, 256)
                    runs: dict[str, tuple[Callable[[torch.Tensor], None], object]] = {
                        "triton": (lambda kv: launch_set_kv_rows(kv, loc, nope, rope), None),
                        "dispatch": (lambda kv: set_mla_kv_buffer_triton(kv, loc, nope, rope), None),
                        "dispatch skip=0": (
                            lambda kv: set_mla_kv_buffer_triton(kv, loc, nope, rope, reserved_skip_index=RESERVED),
                            RESERVED,
                        ),
                    }
                    if jit_ok:
                        sweep = [(t, w, i) for t in (True, False) for w in (1, 4, 8) for i in (1, 2, 4)]
                        for tma, warps, items in sweep if kind == "contiguous" else [(None, 0, 0)]:
                            runs[f"jit tma={tma} w{warps} i{items}"] = (
                                lambda kv, t=tma, w=warps, i=items: jit_kernel.set_mla_kv_buffer(
                                    kv, loc, nope, rope, w, items_per_warp=i, use_tma=t
                                ),
                                None,
                            )
                    for name, (run, skip) in runs.items():
                        kv = base.clone()
                        run(kv)
                        torch.cuda.synchronize()
                        self.check(f"{dtype} {nd}+{rd} loc={kind} n={n} {name}",
                                   _written_as_expected(kv, base, loc, nope, rope, skip))

    def converting_writes(self) -> None:
        """A float source of another dtype than the buffer: the Triton row kernel converts in registers.
        Into bf16 one row holds a NaN (written 0x7FC0)."""
        floats = (torch.float16, torch.bfloat16, torch.float32)
        for src, dst in [(s, d) for s in floats for d in floats if s != d]:
            for kind in ("strided", "reserved_and_past_end"):
                for n, rd in ((37, 64), (300, 0)):
                    num_slots = n + 50
                    loc = _loc(kind, n, num_slots)
                    nope = (torch.randn(n, 512, device="cuda") * 300).to(src)
                    rope = (torch.randn(n, rd, device="cuda") * 300).to(src)
                    nan_row = dst == torch.bfloat16 and src != torch.bfloat16
                    if nan_row:  # one row's NaN: its program converts by the integer rule, 0x7FC0
                        nope[5, 7] = float("nan")
                    base = torch.empty((num_slots, 1, 512 + rd), dtype=dst, device="cuda")
                    base.view(torch.uint8).random_(0, 256)
                    kv = base.clone()
                    set_mla_kv_buffer_triton(kv, loc, nope, rope, reserved_skip_index=RESERVED)
                    torch.cuda.synchronize()
                    nope_want = nope.to(dst)
                    if nan_row:  # torch's GPU cast gives 0x7FFF; the kernel writes 0x7FC0
                        nope_want.view(torch.int16)[5, 7] = 0x7FC0
                    want = _expected(base, loc, nope_want, rope.to(dst), RESERVED)
                    self.check(f"convert {src}->{dst} 512+{rd} loc={kind} n={n}",
                               torch.equal(_bits(kv).reshape(num_slots, -1), want))

    def refused(self) -> None:
        """Calls that must be refused before anything is written."""
        kv = torch.empty((64, 1, 576), dtype=torch.bfloat16, device="cuda")
        kv.view(torch.uint8).random_(0, 256)
        before = kv.clone()
        loc = torch.arange(1, 9, device="cuda")
        nope, rope = _rand(8, 512, torch.bfloat16), _rand(8, 64, torch.bfloat16)
        wide = _rand(8, 513, torch.bfloat16)
        calls = {
            "float loc": lambda: set_mla_kv_buffer_triton(kv, loc.float(), nope, rope),
            "overlapping kv rows": lambda: set_mla_kv_buffer_triton(kv[:1].expand(64, 1, 576), loc, nope, rope),
            "jit misaligned source": lambda: jit_kernel.set_mla_kv_buffer(kv, loc, wide[:, 1:], rope),
        }
        for name, call in calls.items():
            try:
                call()
                torch.cuda.synchronize()
                refused = False
            except (TypeError, ValueError, RuntimeError):
                refused = True
            self.check(f"refused: {name}", refused and torch.equal(_bits(kv), _bits(before)))

    def gather(self) -> None:
        """The gather at the table's launch and at every shape of its sweep (5 rows: a partial last
        program at 2, 4 and 8 rows per program), with slots outside the buffer and a strided loc."""
        from mlakv.bench.kv_write import triton_sweep_shapes

        shapes = [{}] + [dict(num_warps=w, rows_per_program=r, early_trigger=e) for w, r, e in triton_sweep_shapes()]
        for dtype, nd, rd in LAYOUTS:
            kv = torch.empty((64, 1, nd + rd), dtype=dtype, device="cuda")
            kv.view(torch.uint8).random_(0, 256)
            bad = torch.tensor([3, 64, -1, 10**9, 63], device="cuda")
            for loc in (bad, torch.tensor([3, 0, 64, 0, -1, 0, 10**9, 0, 63], device="cuda")[::2]):
                for launch in shapes:
                    nope, rope = launch_get_kv_rows(kv, loc, nd, rd, **launch)
                    torch.cuda.synchronize()
                    rows = _bits(kv).reshape(64, -1)
                    ok = (torch.equal(_bits(nope[0]), rows[3, :nd]) and torch.equal(_bits(rope[4]), rows[63, nd:])
                          and not _bits(nope[1:4]).any() and not _bits(rope[1:4]).any())
                    self.check(f"gather {dtype} {nd}+{rd} invalid slots, loc stride {loc.stride(0)}, launch {launch or 'table'}", ok)

    def move(self) -> None:
        """Both move kernels at the table's launch and at every shape of their sweep (``MOVE_TRITON_SWEEP``):
        overlapping sets longer than a staged step, disjoint sets, strided and expanded slot vectors, and
        out-of-range pairs (skipped); fresh random rows before every launch."""
        from mlakv.spec.tuning import MOVE_TRITON_SWEEP

        layers = [torch.empty((80, 1, 576), dtype=torch.bfloat16, device="cuda") for _ in range(3)]
        cases = {
            "staged overlap": (torch.tensor([5, 6, 7, 9], device="cuda"), torch.tensor([6, 7, 8, 80], device="cuda"), False),
            "staged 70 rows, overlap": (torch.arange(5, 75, device="cuda"), torch.arange(6, 76, device="cuda").flip(0), False),
            "direct disjoint": (torch.tensor([20, 21, -1], device="cuda"), torch.tensor([30, 31, 32], device="cuda"), True),
            "strided": (torch.arange(40, 50, device="cuda")[::2], torch.tensor([60], device="cuda").expand(5), False),
        }
        keys = {"direct": ("num_warps", "block_words"), "staged": ("num_warps", "rows_per_step", "column_words")}
        for name, (tgt, src, disjoint) in cases.items():
            kind = "direct" if disjoint else "staged"
            keep = (tgt >= 0) & (tgt < 80) & (src >= 0) & (src < 80)
            for shape in [(), *MOVE_TRITON_SWEEP[kind]]:
                for b in layers:
                    b.view(torch.uint8).random_(0, 256)
                want = [b.clone() for b in layers]
                move_kv_cache_torch(want, tgt[keep], src[keep])
                launch_move_kv_rows(layers, tgt, src, disjoint=disjoint, **dict(zip(keys[kind], shape)))
                torch.cuda.synchronize()
                ok = all(torch.equal(_bits(a), _bits(b)) for a, b in zip(layers, want))
                self.check(f"move {name}" + (f" at {kind} {shape}" if shape else ""), ok)

    def host_copy(self) -> None:
        """The HiCache copy device <-> pinned host at the table's launch and at every shape of its sweep
        (``HICACHE_COPY_SWEEP``), rows and whole pages (8 rows, and 64: longer than a tile)."""
        from mlakv.kernels.triton.transfer import launch_copy_rows
        from mlakv.spec.tuning import HICACHE_COPY_SWEEP

        row = 1152
        for shape in [(0, 0), *HICACHE_COPY_SWEEP]:
            kw = dict(num_warps=shape[0], tile_words=shape[1])
            at = f" at {shape}" if shape[0] else ""
            dev = torch.randint(0, 256, (64, row), dtype=torch.uint8, device="cuda")
            host = torch.zeros((4, 8, row), dtype=torch.uint8).pin_memory()  # 4 pages of 8 tokens
            d_idx, h_idx = torch.tensor([5, 9, 63, 1], device="cuda"), torch.tensor([8, 9, 10, 11], device="cuda")
            launch_copy_rows(dev, host, d_idx, h_idx, row, (1, row, row), (8, 8 * row, row), **kw)
            torch.cuda.synchronize()
            self.check("hicache copy device -> pinned host" + at, torch.equal(host.view(-1, row)[8:12], dev[d_idx].cpu()))
            back = torch.zeros_like(dev)
            launch_copy_rows(host, back, h_idx, d_idx, row, (8, 8 * row, row), (1, row, row), **kw)
            torch.cuda.synchronize()
            self.check("hicache copy pinned host -> device" + at, torch.equal(back[d_idx], dev[d_idx]))
            pages = torch.tensor([16, 0], device="cuda")  # whole pages of 8 rows: one unit each
            launch_copy_rows(dev, host, pages, torch.tensor([8, 24], device="cuda"), 8 * row, (8, 8 * row, row),
                             (8, 8 * row, row), src_align=8, dst_align=8, **kw)  # fmt: skip
            torch.cuda.synchronize()
            ok = torch.equal(host[1], dev[16:24].cpu()) and torch.equal(host[3], dev[0:8].cpu())
            self.check("hicache copy pages device -> pinned host" + at, ok)
            # one 64-row page (9216 words): longer than every tile up to 8192 words, so it moves a tile
            # at a time, its remainder loaded with the tile before it
            whole = torch.zeros((64, row), dtype=torch.uint8).pin_memory()
            first = torch.zeros(1, dtype=torch.int64, device="cuda")
            launch_copy_rows(dev, whole, first, first, 64 * row, (64, 64 * row, row), (64, 64 * row, row),
                             src_align=64, dst_align=64, **kw)  # fmt: skip
            torch.cuda.synchronize()
            self.check("hicache copy a 64-row page device -> pinned host" + at, torch.equal(whole, dev.cpu()))

    def fp8_parts(self) -> None:
        """The Triton ds_mla write split over 2 and 4 programs per block of rows (``parts_per_row``): every
        loc kind, 1 / 2 / 8 rows per program, 4 tiles and 3 (one tile per part), rope 64, 24 and none,
        aligned rows and an odd row stride (byte-wise scales and rope), one row's last part on the general
        tile path (inf), at the table's launch and at every parts shape of the sweep."""
        from mlakv.bench.fp8_bench import _part_shapes
        from mlakv.kernels.triton.fp8 import launch_quant_write
        from mlakv.ops.fp8 import fp8_row_bytes, quantize_mla_rows

        shapes = [{}] + [dict(num_warps=w, rows_per_program=r, parts_per_row=p) for w, r, p in _part_shapes(300)]
        for nd, rd, spare in ((512, 64, 0), (512, 64, 1), (384, 24, 0), (512, 0, 1)):
            rb = fp8_row_bytes("ds_mla", nd, rd)
            for kind in LOC_KINDS:
                n = 300 if kind == "strided" else 37
                num_slots = n + 50
                nope = torch.randn(n, nd, device="cuda").to(torch.bfloat16)
                rope = torch.randn(n, rd, device="cuda").to(torch.bfloat16)
                nope[n // 2, nd - 3] = float("inf")
                if kind == "expanded":  # one slot written n times: with one row, any order gives it
                    nope, rope = nope[:1].expand(n, nd), rope[:1].expand(n, rd)
                loc = _loc(kind, n, num_slots)
                base = torch.randint(0, 256, (num_slots, rb + spare), dtype=torch.uint8, device="cuda")
                rows = quantize_mla_rows(nope.cpu(), rope.cpu(), "ds_mla").view(torch.uint8)
                expected = base.cpu().clone()
                for i, slot in enumerate(loc.cpu().tolist()):
                    if 0 <= slot < num_slots and slot != RESERVED:
                        expected[slot, :rb] = rows[i]
                for shape in shapes if kind == "strided" else shapes[:1] + shapes[1::4]:
                    kv = base.clone()
                    launch_quant_write(kv, loc, nope, rope, "ds_mla", None, RESERVED, **shape)
                    torch.cuda.synchronize()
                    self.check(f"fp8 ds_mla parts {nd}+{rd} spare={spare} loc={kind} n={n} {shape or 'table'}",
                               torch.equal(kv.cpu(), expected))  # fmt: skip

    def fp8(self) -> None:
        """The FP8 quantizing write (JIT, Triton; both formats, ds_mla under each tile-scale rule, bf16/fp16
        sources, every loc kind) and the dequantizing gather (JIT, Triton) with padding and out-of-range slots."""
        from mlakv.kernels.cuda.fp8 import fp8_jit_gather, fp8_jit_write
        from mlakv.ops.fp8 import dequantize_mla_rows, fp8_row_bytes, scale_tensor
        from mlakv.kernels.triton.fp8 import launch_dequant_gather, launch_quant_write

        # per_tensor under a scale that is not a power of two (the division) and one that is (the product
        # by the exact reciprocal)
        cases = (("per_tensor", "fp32_floor", 0.1875), ("per_tensor", "fp32_floor", 0.5), ("ds_mla", "fp32_floor", None),
                 ("ds_mla", "fp32", None), ("ds_mla", "ue8m0", None))  # fmt: skip
        for fmt, rule, k in cases:
            scale = scale_tensor(k, torch.device("cuda")) if fmt == "per_tensor" else None
            rb = fp8_row_bytes(fmt, 512, 64)
            for dtype in (torch.bfloat16, torch.float16):
                for kind in LOC_KINDS:
                    for n in (1, 37, 300):
                        num_slots = n + 50
                        nope = torch.randn(n, 512, device="cuda").to(dtype)
                        rope = torch.randn(n, 64, device="cuda").to(dtype)
                        loc = _loc(kind, n, num_slots)
                        base, expected = _fp8_expected(nope, rope, loc, fmt, scale, rule, num_slots, rb)
                        runs = {
                            "triton": lambda kv: launch_quant_write(kv, loc, nope, rope, fmt, scale, RESERVED,
                                                                    scale_rule=rule),
                            "jit": lambda kv: fp8_jit_write(kv, loc, nope, rope, fmt, scale, RESERVED, scale_rule=rule),
                        }
                        for name, run in runs.items():
                            kv = base.clone()
                            launched = run(kv) is not False
                            torch.cuda.synchronize()
                            ok = launched and torch.equal(kv.view(num_slots, rb), expected)
                            if kind == "expanded":  # every row targets one slot: any one row may win
                                ok = launched
                            self.check(f"fp8 write {fmt} {rule} k={k} {dtype} {kind} n={n} {name}", ok)
            if fmt == "ds_mla" and rule == "fp32_floor":
                # programs mixing the Triton write's common case with the general rule's tile-at-a-time path
                # (inf, NaN, an all-zero tile, a tiny amax), at 1 and 4 rows per program
                for n, rows in ((37, 1), (300, 4)):
                    num_slots = n + 50
                    nope = torch.randn(n, 512, device="cuda").to(torch.bfloat16)
                    rope = torch.randn(n, 64, device="cuda").to(torch.bfloat16)
                    nope[3, 7], nope[9, 300], nope[14, 128:256], nope[21, :128] = float("inf"), float("nan"), 0.0, 2.0**-120
                    for kind in ("strided", "offset"):
                        loc = _loc(kind, n, num_slots)
                        base, expected = _fp8_expected(nope, rope, loc, fmt, scale, rule, num_slots, rb)
                        kv = base.clone()
                        launch_quant_write(kv, loc, nope, rope, fmt, scale, RESERVED, rows_per_program=rows)
                        torch.cuda.synchronize()
                        self.check(f"fp8 write ds_mla general tiles {kind} n={n} rows={rows} triton",
                                   torch.equal(kv.view(num_slots, rb), expected))  # fmt: skip
            kv = torch.randint(0, 256, (64, 1, rb), dtype=torch.uint8, device="cuda")
            bad = torch.tensor([3, 64, -1, 10**9, 63], device="cuda")
            ref = dequantize_mla_rows(kv[[3, 63], 0], fmt, 512, 64, scale)
            gathers = {
                "triton": lambda: launch_dequant_gather(kv, bad, fmt, 512, 64, scale, torch.bfloat16),
                "jit": lambda: fp8_jit_gather(kv, bad, fmt, 512, 64, scale, torch.bfloat16),
            }
            for name, gather in gathers.items():
                out = gather()
                torch.cuda.synchronize()
                ok = out is not None
                if ok:
                    nope, rope = (_bits(t) for t in out)
                    ok = (torch.equal(nope[0], _bits(ref[0][0])) and torch.equal(rope[4], _bits(ref[1][1]))
                          and not nope[1:4].any() and not rope[1:4].any())  # fmt: skip
                self.check(f"fp8 gather {fmt} {name} with invalid slots", ok)
        self.fp8_jit_shapes()
        self.fp8_triton_triggers()

    def fp8_triton_triggers(self) -> None:
        """The Triton FP8 write and gather with the PDL trigger at each place (entry, after the wait,
        after the stores); a strided loc with padding, reserved and out-of-range slots."""
        from mlakv.kernels.triton.fp8 import launch_dequant_gather, launch_quant_write
        from mlakv.ops.fp8 import dequantize_mla_rows, fp8_row_bytes, scale_tensor
        from mlakv.spec.tuning import TRIGGER_PLACES

        n, num_slots = 300, 350
        for fmt in ("per_tensor", "ds_mla"):
            scale = scale_tensor(0.1875, torch.device("cuda")) if fmt == "per_tensor" else None
            rb = fp8_row_bytes(fmt, 512, 64)
            nope = torch.randn(n, 512, device="cuda").to(torch.bfloat16)
            rope = torch.randn(n, 64, device="cuda").to(torch.bfloat16)
            loc = _loc("strided", n, num_slots)
            base, expected = _fp8_expected(nope, rope, loc, fmt, scale, "fp32_floor", num_slots, rb)
            bad = torch.tensor([3, num_slots, -1, 10**9, num_slots - 1], device="cuda")
            for place in TRIGGER_PLACES:
                kv = base.clone()
                launch_quant_write(kv, loc, nope, rope, fmt, scale, RESERVED, trigger=place)
                torch.cuda.synchronize()
                self.check(f"fp8 write {fmt} triton trigger={place}", torch.equal(kv.view(num_slots, rb), expected))
                ref = dequantize_mla_rows(kv[[3, num_slots - 1], 0], fmt, 512, 64, scale)
                got = launch_dequant_gather(kv, bad, fmt, 512, 64, scale, torch.bfloat16, trigger=place)
                torch.cuda.synchronize()
                nope_out, rope_out = (_bits(t) for t in got)
                ok = (torch.equal(nope_out[0], _bits(ref[0][0])) and torch.equal(rope_out[4], _bits(ref[1][1]))
                      and not nope_out[1:4].any() and not rope_out[1:4].any())  # fmt: skip
                self.check(f"fp8 gather {fmt} triton trigger={place}", ok)

    def fp8_jit_shapes(self) -> None:
        """The JIT FP8 write and gather at every threads per row (32, 64, 128; the per_tensor write also
        packed, in CTAs that end inside a row) with one and several rows per CTA (a partial last CTA),
        both trigger places; strided and out-of-range / reserved loc."""
        from mlakv.kernels.cuda.fp8 import fp8_jit_gather, fp8_jit_write
        from mlakv.ops.fp8 import dequantize_mla_rows, fp8_row_bytes, scale_tensor
        from mlakv.spec.tuning import FP8_JIT_PACKED, FP8_JIT_THREADS_PER_ROW

        n, num_slots = 37, 90
        # per_tensor under a scale that is not a power of two (the division) and one that is (the product
        # by the exact reciprocal)
        cases = (("per_tensor", "fp32_floor", 0.1875), ("per_tensor", "fp32_floor", 0.5), ("ds_mla", "fp32_floor", None),
                 ("ds_mla", "fp32", None), ("ds_mla", "ue8m0", None))  # fmt: skip
        for fmt, rule, k in cases:
            scale = scale_tensor(k, torch.device("cuda")) if fmt == "per_tensor" else None
            rb = fp8_row_bytes(fmt, 512, 64)
            packed = (FP8_JIT_PACKED,) if fmt == "per_tensor" else ()
            for threads in FP8_JIT_THREADS_PER_ROW + packed:
                for rows in (1, 4):
                    # packed rows: CTAs of 3 and 12 warps, which end inside a row
                    warps = 3 * rows if threads == FP8_JIT_PACKED else rows * threads // 32
                    for kind, early in (("strided", True), ("reserved_and_past_end", False)):
                        nope = torch.randn(n, 512, device="cuda").to(torch.bfloat16)
                        rope = torch.randn(n, 64, device="cuda").to(torch.bfloat16)
                        loc = _loc(kind, n, num_slots)
                        base, expected = _fp8_expected(nope, rope, loc, fmt, scale, rule, num_slots, rb)
                        kv = base.clone()
                        launched = fp8_jit_write(kv, loc, nope, rope, fmt, scale, RESERVED, num_warps=warps,
                                                 early_trigger=early, threads_per_row=threads, scale_rule=rule)  # fmt: skip
                        torch.cuda.synchronize()
                        ok = launched and torch.equal(kv.view(num_slots, rb), expected)
                        self.check(f"fp8 jit write {fmt} {rule} t{threads}w{warps} {kind}", ok)
                    if rule != "fp32_floor" or threads == FP8_JIT_PACKED:  # the gathers keep aligned rows
                        continue
                    kv = torch.randint(0, 256, (64, 1, rb), dtype=torch.uint8, device="cuda")
                    bad = torch.tensor([3, 64, -1, 10**9, 63, 5, -7], device="cuda")
                    ref = dequantize_mla_rows(kv[[3, 63, 5], 0], fmt, 512, 64, scale)
                    for early in (True, False):
                        out = fp8_jit_gather(kv, bad, fmt, 512, 64, scale, torch.bfloat16, num_warps=warps,
                                             early_trigger=early, threads_per_row=threads)  # fmt: skip
                        torch.cuda.synchronize()
                        ok = out is not None
                        if ok:
                            g_nope, g_rope = (_bits(t) for t in out)
                            ok = (torch.equal(g_nope[[0, 4, 5]], _bits(ref[0])) and torch.equal(g_rope[[0, 4, 5]], _bits(ref[1]))
                                  and not g_nope[[1, 2, 3, 6]].any() and not g_rope[[1, 2, 3, 6]].any())  # fmt: skip
                        self.check(f"fp8 jit gather {fmt} t{threads}w{warps}{'e' if early else 'l'} with invalid slots", ok)

    def indexer(self) -> None:
        """The DSA indexer K cache: stores (JIT at every launch shape, Triton, the public op) for every
        loc kind and both source dtypes, a DCP store, and the gathers with invalid pages and short output."""
        from mlakv.kernels.cuda.indexer import indexer_jit_gather, indexer_jit_store
        from mlakv.kernels.triton.indexer import launch_gather_index_k, launch_store_index_k
        from mlakv.ops.indexer import set_index_k_buffer
        from mlakv.ops.indexer_reference import gather_index_k_reference, store_index_k_reference
        from mlakv.spec.calls import IndexStoreCall
        from mlakv.spec.tuning import INDEXER_TRITON_SWEEP

        for dtype in (torch.bfloat16, torch.float16):
            for kind in LOC_KINDS:
                for n in (1, 37, 300):
                    num_pages = n // 64 + 2
                    loc = _loc(kind, n, num_pages * 64)
                    keys = (torch.randn(n, 128, device="cuda") * 4).to(dtype)
                    if kind == "expanded":  # one slot written n times: with one key, any order gives it
                        keys = keys[:1].expand(n, 128)
                    base = torch.randint(0, 256, (num_pages, 8448), dtype=torch.uint8, device="cuda")
                    want = base.cpu().clone()
                    store_index_k_reference(IndexStoreCall(want, loc.cpu(), keys.cpu(), skip_slot=RESERVED))
                    runs: dict[str, Callable[[torch.Tensor], object]] = {
                        "triton": lambda p: launch_store_index_k(IndexStoreCall(p, loc, keys, skip_slot=RESERVED)),
                        "op": lambda p: set_index_k_buffer(p, loc, keys, reserved_skip_index=RESERVED),
                    }
                    if kind == "contiguous" and n > 1:  # the Triton store at every launch shape of its sweep
                        for w, k in INDEXER_TRITON_SWEEP:
                            runs[f"triton w{w} k{k}"] = lambda p, w=w, k=k: launch_store_index_k(
                                IndexStoreCall(p, loc, keys, skip_slot=RESERVED), num_warps=w, rows_per_program=k)
                    shapes = [(s, w) for s in (1, 2, 4) for w in (1, 8)] if kind == "contiguous" else [(None, 8)]
                    for steps, warps in shapes:
                        runs[f"jit s{steps} w{warps}"] = lambda p, s=steps, w=warps: indexer_jit_store(
                            IndexStoreCall(p, loc, keys, skip_slot=RESERVED), steps=s, num_warps=w
                        )
                    for name, run in runs.items():
                        pages = base.clone()
                        launched = run(pages) is not False
                        torch.cuda.synchronize()
                        self.check(f"indexer store {dtype} loc={kind} n={n} {name}", launched and torch.equal(pages.cpu(), want))
        loc = _loc("strided", 300, 7 * 64 * 2)
        keys = (torch.randn(300, 128, device="cuda") * 4).to(torch.bfloat16)
        base = torch.randint(0, 256, (7, 8448), dtype=torch.uint8, device="cuda")
        want = base.cpu().clone()
        store_index_k_reference(IndexStoreCall(want, loc.cpu(), keys.cpu(), dcp_world_size=2, dcp_rank=1))
        for name, run in {
            "triton": lambda p: launch_store_index_k(IndexStoreCall(p, loc, keys, dcp_world_size=2, dcp_rank=1)),
            "jit": lambda p: indexer_jit_store(IndexStoreCall(p, loc, keys, dcp_world_size=2, dcp_rank=1)),
        }.items():
            pages = base.clone()
            launched = run(pages) is not False
            torch.cuda.synchronize()
            self.check(f"indexer store dcp 2/1 {name}", launched and torch.equal(pages.cpu(), want))
        pages = torch.randint(0, 256, (6, 8448), dtype=torch.uint8, device="cuda")
        table = torch.tensor([[4, 1, -1, 3], [2, 70, 0, 8], [5, 5, 5, 5]], device="cuda")[:, :3]  # strided rows
        lens = torch.tensor([70, 250, 0], device="cuda")  # request 1 runs past its 3 columns
        want_k, want_s = gather_index_k_reference(pages.cpu(), table.cpu(), lens.cpu())
        for total in (320, 300):  # 300: the output ends inside request 1, nothing is written past it
            for name, gather in {
                "triton": lambda t=total: launch_gather_index_k(pages, table, lens, t, 250),
                "jit": lambda t=total: indexer_jit_gather(pages, table, lens, t, 250),
            }.items():
                out = gather()
                torch.cuda.synchronize()
                ok = out is not None and torch.equal(out[0].cpu().view(torch.uint8), want_k.view(torch.uint8)[:total])
                ok = ok and torch.equal(out[1].cpu().view(torch.int32), want_s.view(torch.int32)[:total])
                self.check(f"indexer gather {name} total={total}", ok)

    def rope_write(self, q_modes: tuple[str, ...] = ("none", "bf16", "fp8")) -> None:
        """The fused RoPE write: JIT, Triton and the public op, every cache format and query kind
        (``q_modes``), every loc kind (slots past the end skipped), a DCP call, and tokens whose position
        lies outside the table (they write nothing). An e4m3 query of several tokens holds inf and NaN in
        two rows, so the Triton kernel's general conversion runs beside its common case."""
        from mlakv.kernels.cuda.rope_write import rope_write_cuda
        from mlakv.kernels.triton.rope_write import launch_rope_write
        from mlakv.ops.fp8 import fp8_row_bytes
        from mlakv.ops.rope_write import set_mla_kv_buffer_rope
        from mlakv.ops.rope_write_reference import set_mla_kv_buffer_rope_torch
        from mlakv.spec.calls import RopeWriteCall
        from mlakv.spec.tuning import ROPE_TRITON_SWEEP, TRIGGER_PLACES

        max_pos, heads = 1000, 3
        cs = torch.randn(max_pos, 64, device="cuda")
        # each scale alternates between one that is not a power of two (the division) and one that is
        # (the product by the exact reciprocal), by pairs of loc kinds (so each meets both RoPE styles)
        k_scales = (torch.tensor([0.1875], device="cuda"), torch.tensor([0.5], device="cuda"))
        q_scales = (torch.tensor([0.0625], device="cuda"), torch.tensor([0.1171875], device="cuda"))
        for fmt in (None, "per_tensor", "ds_mla"):
            row = 576 * 2 if fmt is None else fp8_row_bytes(fmt, 512, 64)
            kv_dtype = torch.bfloat16 if fmt is None else torch.uint8
            for q_mode in q_modes:
                for i, kind in enumerate(LOC_KINDS):
                    for n in (1, 300):
                        neox = i % 2 == 0
                        num_slots = n + 50
                        loc = _loc(kind, n, num_slots)
                        pos = torch.randint(0, max_pos, (n,), device="cuda")
                        if kind == "reserved_and_past_end" and n > 4:
                            pos[3], pos[4] = max_pos, -2
                        k_nope = torch.randn(n, 512, device="cuda").to(torch.bfloat16)
                        k_pe = torch.randn(n, 64, device="cuda").to(torch.bfloat16)
                        if kind == "expanded":  # every row targets one slot: one source row and position define it
                            k_nope, k_pe = k_nope[:1].expand(n, 512), k_pe[:1].expand(n, 64)
                            pos = pos[:1].expand(n)
                        q_nope = torch.randn(n, heads, 512, device="cuda").to(torch.bfloat16)
                        q_pe = torch.randn(n, heads, 64, device="cuda").to(torch.bfloat16)
                        if q_mode == "fp8" and n > 8:  # programs that take the general e4m3 conversion
                            q_nope[5, 1, 7], q_pe[7, 2, 3] = float("inf"), float("nan")
                        q_dt = torch.float8_e4m3fn if q_mode == "fp8" else torch.bfloat16
                        q_w = 576 * (1 if q_mode == "fp8" else 2)
                        q_base = torch.randint(0, 256, (n, heads, q_w), dtype=torch.uint8, device="cuda").view(q_dt)
                        base = torch.randint(0, 256, (num_slots, row), dtype=torch.uint8, device="cuda").view(kv_dtype)
                        has_q = q_mode != "none"
                        qs = q_scales[i // 2 % 2] if q_mode == "fp8" else None
                        ks = k_scales[i // 2 % 2] if fmt == "per_tensor" else None
                        # expected: the reference on CPU copies, with what an unchecked call skips made explicit
                        loc_r, pos_r = loc.cpu().clone(), pos.cpu().clone()
                        bad_pos = (pos_r < 0) | (pos_r >= max_pos)
                        loc_r[(loc_r >= num_slots) | bad_pos] = -1
                        pos_r[bad_pos] = 0
                        kv_want, q_want = base.cpu().clone(), q_base.cpu().clone()
                        set_mla_kv_buffer_rope_torch(RopeWriteCall(
                            kv_want, loc_r, k_nope.cpu(), k_pe.cpu(), pos_r, cs.cpu(), neox,
                            q_nope=q_nope.cpu() if has_q else None, q_pe=q_pe.cpu() if has_q else None,
                            q_out=q_want if has_q else None, kv_cache_format=fmt, k_scale=None if ks is None else ks.cpu(),
                            q_scale=None if qs is None else qs.cpu(), skip_index=RESERVED,
                        ))  # fmt: skip
                        q_want[bad_pos] = q_base.cpu()[bad_pos]
                        runs = {
                            "jit": lambda kv, qo: rope_write_cuda(RopeWriteCall(kv, loc, k_nope, k_pe, pos, cs, neox, fmt,
                                                                                ks, q_nope, q_pe, qo, qs, RESERVED)),
                            "triton": lambda kv, qo: launch_rope_write(RopeWriteCall(kv, loc, k_nope, k_pe, pos, cs, neox,
                                                                                     fmt, ks, q_nope, q_pe, qo, qs, RESERVED)),
                        }  # fmt: skip
                        if kind == "contiguous" and n > 1:  # the Triton kernel at every launch shape of its sweep
                            for w, q in ROPE_TRITON_SWEEP:
                                runs[f"triton w{w} q{q}"] = lambda kv, qo, w=w, q=q: launch_rope_write(RopeWriteCall(
                                    kv, loc, k_nope, k_pe, pos, cs, neox, fmt, ks, q_nope, q_pe, qo, qs, RESERVED),
                                    num_warps=w, q_rows=q)  # fmt: skip
                        if kind == "strided":  # the Triton kernel with its PDL trigger at each place
                            for place in TRIGGER_PLACES:
                                runs[f"triton trigger={place}"] = lambda kv, qo, place=place: launch_rope_write(
                                    RopeWriteCall(kv, loc, k_nope, k_pe, pos, cs, neox, fmt, ks, q_nope, q_pe, qo, qs,
                                                  RESERVED), trigger=place)  # fmt: skip
                        if kind == "contiguous":
                            runs["op"] = lambda kv, qo: set_mla_kv_buffer_rope(
                                kv, loc, k_nope, k_pe, pos, cs, neox, q_nope=q_nope if has_q else None,
                                q_pe=q_pe if has_q else None, q_out=qo, kv_cache_format=fmt, k_scale=ks, q_scale=qs,
                                reserved_skip_index=RESERVED,
                            )  # fmt: skip
                        for name, run in runs.items():
                            kv, qo = base.clone(), q_base.clone() if has_q else None
                            launched = run(kv, qo) is not False
                            torch.cuda.synchronize()
                            ok = launched and torch.equal(_bits(kv).cpu(), _bits(kv_want))
                            if has_q:
                                ok = ok and torch.equal(_bits(qo).cpu(), _bits(q_want))
                            self.check(f"rope write {fmt} q={q_mode} {'neox' if neox else 'interleaved'} {kind} n={n} {name}", ok)
        # DCP: this rank writes only its rows
        n, num_slots = 300, 350
        loc = _loc("strided", n, 2 * num_slots)
        pos = torch.randint(0, max_pos, (n,), device="cuda")
        k_nope = torch.randn(n, 512, device="cuda").to(torch.bfloat16)
        k_pe = torch.randn(n, 64, device="cuda").to(torch.bfloat16)
        base = torch.randint(0, 256, (num_slots, 656), dtype=torch.uint8, device="cuda")
        loc_r = loc.cpu().clone()
        loc_r[loc_r >= 2 * num_slots] = -1
        for rule in ("fp32_floor", "fp32", "ue8m0"):  # ds_mla's tile-scale rules
            want = base.cpu().clone()
            set_mla_kv_buffer_rope_torch(RopeWriteCall(want, loc_r, k_nope.cpu(), k_pe.cpu(), pos.cpu(), cs.cpu(), False,
                                                       kv_cache_format="ds_mla", dcp_world_size=2, dcp_rank=1,
                                                       ds_mla_scale_rule=rule))  # fmt: skip
            call = RopeWriteCall(base, loc, k_nope, k_pe, pos, cs, False, "ds_mla", dcp_world_size=2, dcp_rank=1,
                                 ds_mla_scale_rule=rule)  # fmt: skip
            for name, run in {
                "jit": lambda kv: rope_write_cuda(call._replace(kv_buffer=kv)),
                "triton": lambda kv: launch_rope_write(call._replace(kv_buffer=kv)),
            }.items():
                kv = base.clone()
                launched = run(kv) is not False
                torch.cuda.synchronize()
                self.check(f"rope write ds_mla {rule} dcp 2/1 {name}", launched and torch.equal(kv.cpu(), want))


def hostile(smoke: "Smoke") -> None:
    """Issue 22's kernel cases on the GPU: the aliasing write, the ops with bad arguments, the host-pool race."""
    import threading

    from mlakv.mem_cache import MLATokenToKVPool, MLATokenToKVPoolHost

    for n in (4, 300, 3000):  # small: Triton; large unchecked: the JIT kernel
        for check in (False, True):
            pool = MLATokenToKVPool(n + 64, 1, torch.bfloat16, 512, 64, 1, "cuda", check_bounds=check)
            buf = pool.get_key_buffer(0)
            buf.view(torch.uint8).random_(0, 256)
            before = buf.clone()
            pool.set_kv_buffer(0, torch.arange(9, 9 + n, device="cuda"), buf[8 : 8 + n])
            torch.cuda.synchronize()
            want = _bits(before).clone()
            want[9 : 9 + n] = _bits(before)[8 : 8 + n]
            smoke.check(f"aliasing write n={n} check_bounds={check}", torch.equal(_bits(buf), want))
    kv = _rand(600, 576, torch.bfloat16)
    before = kv.clone()
    set_mla_kv_buffer_triton(kv, torch.arange(0, 512, device="cuda"), kv[1:513, :512], kv[1:513, 512:])
    torch.cuda.synchronize()
    want = _bits(before).clone()
    want[:512] = _bits(before)[1:513]
    smoke.check("aliasing write, dispatcher, shifted down", torch.equal(_bits(kv), want))
    # the ops with bad arguments: refused before any launch, or slots skipped inside the buffers
    kv3 = _rand(3, 12, torch.bfloat16).view(3, 1, 12)
    try:
        torch.ops.mlakv.get_mla_kv_buffer(kv3, torch.tensor([2], device="cuda"), 20, 4, False)
        refused = False
    except ValueError:
        refused = True
    smoke.check("op get_mla_kv_buffer wider than the row: refused", refused)
    src = torch.randint(0, 256, (4 * 64,), dtype=torch.uint8, device="cuda")
    dst = torch.zeros(4 * 64, dtype=torch.uint8, device="cuda")
    for bad in (-1, 4, 10**12, -(10**12)):
        torch.ops.mlakv.copy_rows(src, dst, torch.tensor([1, 2], device="cuda"), torch.tensor([0, bad], device="cuda"),
                                  64, [1, 64, 64], [1, 64, 64])  # fmt: skip
        torch.cuda.synchronize()
        smoke.check(f"op copy_rows dst slot {bad}: skipped", torch.equal(dst[:64], src[64:128]) and not dst[64:].any())
    # the host pool raced by threads, a device vector rewritten (no version bump) between layers
    P = 4
    pool = MLATokenToKVPool(256, P, torch.bfloat16, 512, 64, 2, "cuda")
    host = MLATokenToKVPoolHost(pool, host_size=512, layout="page_first_direct")
    errors: list[str] = []

    def worker(k: int) -> None:
        dev = torch.arange((1 + 4 * k) * P, (3 + 4 * k) * P, device="cuda")
        try:
            for _ in range(20):
                slots = host.alloc(2 * P)
                if slots is None:
                    continue
                host.backup_from_device_all_layer(pool, slots, dev)
                host.synchronize()
                new = dev.clone()
                host.load_to_device_per_layer(pool, slots, new, 0)
                new.data.copy_(dev + 2 * P)  # other valid slots of this thread, no version bump
                host.load_to_device_per_layer(pool, slots, new, 1)
                host.synchronize()
                host.free(slots)
        except Exception as e:  # noqa: BLE001 - reported by the check below
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    smoke.check("host pool race: every page back, no error", not errors and host.available_size() == host.size)
    slots = host.alloc(2 * P)
    vec = torch.arange(P, 3 * P, device="cuda")
    host.load_to_device_per_layer(pool, slots, vec, 0)
    vec.data.fill_(10**9)  # out of range after validation: the kernel reads it live and skips every unit
    layer1 = pool.kv_buffer[1].clone()
    host.load_to_device_per_layer(pool, slots, vec, 1)
    host.synchronize()
    smoke.check("host pool: a vector rewritten out of range is skipped", torch.equal(_bits(pool.kv_buffer[1]), _bits(layer1)))
    host.free(slots)


def v4_pages(smoke: "Smoke") -> None:
    """The DeepSeek-V4 family's paged store and gather (every layout; page size 64)."""
    from mlakv.kernels.cuda.v4_store import v4_jit_store
    from mlakv.kernels.triton.v4_store import ENCODINGS, launch_v4_gather, launch_v4_store
    from mlakv.ops import v4_reference as ref
    from mlakv.ops.v4 import set_v4_kv_buffer
    from mlakv.spec.calls import V4StoreCall

    P = 64
    for layout in ref.V4_LAYOUTS:
        g = ref.v4_geometry(layout)
        geo, enc = g.kernel_geometry(P), ENCODINGS[g.encoding]
        for kind in LOC_KINDS:
            for n in (1, 37, 300):
                num_pages = n // P + 2
                loc = _loc(kind, n, num_pages * P)
                kv = (torch.randn(n, 512, device="cuda") * 4).to(torch.bfloat16)
                if kind == "expanded":  # one slot written n times: with one token, any order gives it
                    kv = kv[:1].expand(n, 512)
                base = torch.randint(0, 256, (num_pages, g.page_bytes(P)), dtype=torch.uint8, device="cuda")
                for rope in ("none", "freqs", "table"):
                    extra: dict = {}
                    cos = sin = None
                    want_loc = loc.cpu()
                    if rope == "freqs":
                        extra["freqs_cis"] = torch.rand(n, 64, device="cuda") * 2 - 1
                        if kind == "expanded":  # the one token's rotation too, or the n writes of the slot differ
                            extra["freqs_cis"] = extra["freqs_cis"][:1].expand(n, 64)
                        cos, sin = ref.rope_cos_sin(n, freqs_cis=extra["freqs_cis"].cpu())
                    elif rope == "table":
                        extra["positions"] = torch.randint(-2, 40, (n,), device="cuda")  # some outside the 33-row table
                        if kind == "expanded":
                            extra["positions"] = extra["positions"][:1].expand(n)
                        extra["cos_sin_cache"] = torch.rand(33, 64, device="cuda") * 2 - 1
                        pos = extra["positions"].cpu()
                        bad = (pos < 0) | (pos >= 33)
                        want_loc = torch.where(bad, -1, want_loc)
                        cos, sin = ref.rope_cos_sin(n, positions=torch.where(bad, 0, pos), cos_sin_cache=extra["cos_sin_cache"].cpu())
                    want = base.cpu().clone()
                    ref.set_v4_kv_buffer_torch(want, want_loc, kv.cpu(), layout, P, cos=cos, sin=sin, reserved_skip_index=RESERVED)
                    runs: dict[str, Callable[[torch.Tensor], object]] = {
                        "triton": lambda p: launch_v4_store(V4StoreCall(p, loc, kv, skip_index=RESERVED, **extra), encoding=enc, **geo),
                        "jit": lambda p: v4_jit_store(V4StoreCall(p, loc, kv, skip_index=RESERVED, **extra), layout, P),
                    }
                    if rope != "table":  # the op checks positions on a checked call; unchecked, as the kernels
                        runs["op"] = lambda p: set_v4_kv_buffer(p, loc, kv, layout, P, reserved_skip_index=RESERVED, **extra)
                    if kind == "contiguous" and rope == "none":
                        for w in (1, 2, 4, 8):
                            for items in (1, 2):
                                for early in (True, False):
                                    runs[f"jit w{w} t{items} {early}"] = lambda p, w=w, i=items, e=early: v4_jit_store(
                                        V4StoreCall(p, loc, kv, skip_index=RESERVED), layout, P, num_warps=w, items=i, early_trigger=e
                                    )
                    for name, run in runs.items():
                        pages = base.clone()
                        launched = run(pages) is not False
                        torch.cuda.synchronize()
                        smoke.check(f"v4 store {layout} loc={kind} n={n} rope={rope} {name}", launched and torch.equal(pages.cpu(), want))
        # DCP, and the gather with padding and slots past the pages
        loc = _loc("strided", 300, 6 * P * 2)
        kv = (torch.randn(300, 512, device="cuda") * 4).to(torch.float16)
        base = torch.randint(0, 256, (6, g.page_bytes(P)), dtype=torch.uint8, device="cuda")
        want = base.cpu().clone()
        ref.set_v4_kv_buffer_torch(want, loc.cpu(), kv.cpu(), layout, P, dcp_world_size=2, dcp_rank=1)
        for name, run in {
            "triton": lambda p: launch_v4_store(V4StoreCall(p, loc, kv, dcp_world_size=2, dcp_rank=1), encoding=enc, **geo),
            "jit": lambda p: v4_jit_store(V4StoreCall(p, loc, kv, dcp_world_size=2, dcp_rank=1), layout, P),
        }.items():
            pages = base.clone()
            launched = run(pages) is not False
            torch.cuda.synchronize()
            smoke.check(f"v4 store {layout} dcp 2/1 {name}", launched and torch.equal(pages.cpu(), want))
        gl = torch.tensor([3, -1, 6 * P, 1 << 40, 6 * P - 1, -9, 0], device="cuda")[::2]
        out = launch_v4_gather(pages, gl, encoding=enc, **geo)
        torch.cuda.synchronize()
        exp = ref.get_v4_kv_buffer_torch(pages.cpu(), gl.cpu(), layout, P)
        smoke.check(f"v4 gather {layout} with invalid slots", torch.equal(out.cpu().view(torch.int16), exp.view(torch.int16)))


def vllm_face(smoke: "Smoke") -> None:
    """Each vLLM face op on the GPU, byte-equal to the same call on the CPU (the torch paths)."""
    from mlakv.compat import vllm as V

    def both(name: str, fn: Callable[[str], torch.Tensor]) -> None:
        smoke.check(f"vllm {name}", torch.equal(_bits(fn("cuda").cpu()), _bits(fn("cpu"))))

    g = torch.Generator().manual_seed(7)
    n, bs, nb = 37, 16, 8
    kv_c = torch.randn(n + 3, 512, generator=g).to(torch.bfloat16)
    k_pe = torch.randn(n + 3, 64, generator=g).to(torch.bfloat16)
    slot = torch.randperm(nb * bs, generator=g)[:n]
    slot[::7] = -1
    gpu_slot = slot.clone()
    gpu_slot[3] = nb * bs + 5  # past the cache: skipped unchecked on the GPU (the CPU run gets -1)
    cpu_slot = slot.clone()
    cpu_slot[3] = -1
    base = {"auto": torch.randn(nb, bs + 2, 576, generator=g).to(torch.bfloat16),  # blocks padded by 2 slots
            "fp8": torch.randint(0, 256, (nb, bs, 576), dtype=torch.uint8, generator=g),
            "fp8_ds_mla": torch.randint(0, 256, (nb, bs, 656), dtype=torch.uint8, generator=g)}  # fmt: skip

    def cache_on(fmt: str, dev: str) -> torch.Tensor:
        full = base[fmt].clone().to(dev)
        return full[:, :bs] if fmt == "auto" else full  # the padded-block view

    for fmt in base:
        for rope in (k_pe, k_pe[:, :0]) if fmt == "fp8_ds_mla" else (k_pe,):

            def run(dev: str, fmt=fmt, rope=rope) -> torch.Tensor:
                c = cache_on(fmt, dev)
                s = (cpu_slot if dev == "cpu" else gpu_slot).to(dev)
                V.concat_and_cache_mla(kv_c.to(dev), rope.to(dev), c, s, fmt, torch.tensor([0.05], device=dev))
                return c

            both(f"concat {fmt} rope={rope.shape[1]}", run)
    cu = torch.tensor([0, 5, 5, 30, n], dtype=torch.int32)
    table = torch.stack([torch.randperm(nb, generator=g) for _ in range(4)]).to(torch.int32)
    ss = torch.tensor([3, 0, 17, 1], dtype=torch.int32)
    dst0 = torch.randn(n + 4, 576, generator=g).to(torch.bfloat16)  # rows past cu[-1] stay

    def gmd(dev: str) -> torch.Tensor:
        d = dst0.clone().to(dev)
        V.gather_and_maybe_dequant_cache(cache_on("auto", dev), d, table.to(dev), cu.to(dev), cu.to(dev), n,
                                         "auto", torch.ones(1, device=dev), ss.to(dev))  # fmt: skip
        return d

    def gmd8(dev: str) -> torch.Tensor:
        d = dst0.clone().to(dev)
        fp8c = (base["fp8"] & 0x77).to(dev)  # finite e4m3 bytes (NaN payloads differ by design)
        V.gather_and_maybe_dequant_cache(fp8c, d, table.to(dev), cu.to(dev), cu.to(dev), n, "fp8",
                                         torch.tensor([0.3], device=dev), ss.to(dev))  # fmt: skip
        return d

    def cpg(dev: str) -> torch.Tensor:
        store = base["fp8"].to(dev)
        d = torch.zeros(n, 577, dtype=torch.uint8, device=dev)[:, 1:]
        V.cp_gather_cache(torch.cat([store, store[..., :1]], -1)[..., 1:], d, table.to(dev), cu.to(dev), 4, ss.to(dev))
        return d

    def upc(dev: str) -> torch.Tensor:
        ds = base["fp8_ds_mla"].clone().to(dev)
        V.concat_and_cache_mla(torch.randn(nb * bs, 512, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).to(dev),
                               k_pe[:1].expand(nb * bs, 64).contiguous().to(dev), ds, torch.arange(nb * bs, device=dev),
                               "fp8_ds_mla", torch.ones(1, device=dev))  # fmt: skip
        d = dst0.clone().to(dev)
        V.cp_gather_and_upconvert_fp8_kv_cache(ds, d, table.to(dev), cu[:4].to(dev), 4, ss.to(dev))
        return d

    for name, fn in (("gather auto", gmd), ("gather fp8", gmd8), ("cp_gather_cache unaligned", cpg), ("upconvert", upc)):
        both(name, fn)

    def idx(block: int, fmt: str) -> Callable[[str], torch.Tensor]:
        def run(dev: str) -> torch.Tensor:
            cache = torch.zeros(4, block, 132, dtype=torch.uint8, device=dev)
            keys = kv_c[:n, :128].to(dev)
            islot = torch.randperm(4 * block, generator=torch.Generator().manual_seed(block))[:n]
            islot[::5] = -1
            V.indexer_k_quant_and_cache(keys, cache, islot.to(dev), 128, fmt)
            dk = torch.full((n + 2, 128), 7, dtype=torch.uint8, device=dev)
            dsc = torch.full((n + 2, 4), 7, dtype=torch.uint8, device=dev)
            t = torch.stack([torch.arange(4)] * 2).to(torch.int32).to(dev)
            V.cp_gather_indexer_k_quant_cache(cache, dk, dsc, t, torch.tensor([0, 2 * block, 2 * block + 3], dtype=torch.int32, device=dev))
            return torch.cat([cache.reshape(-1), dk.reshape(-1), dsc.reshape(-1)])

        return run

    for block in (64, 16):
        for fmt in ("ue8m0", "mxfp8"):
            both(f"indexer block={block} {fmt}", idx(block, fmt))
    src = torch.randint(0, 256, (6, 2048), dtype=torch.uint8, generator=g)
    mapping = torch.tensor([[5, 0], [1, 3], [2, 1]])
    for where in ("cuda->cuda", "cuda->pinned", "pinned->cuda"):
        s_dev, d_dev = where.split("->")

        def swap(dev: str, s_dev=s_dev, d_dev=d_dev) -> torch.Tensor:
            def place(t: torch.Tensor, kind: str) -> torch.Tensor:
                if dev == "cpu":
                    return t.clone()
                return t.clone().pin_memory() if kind == "pinned" else t.to("cuda")

            a, b = place(src, s_dev), place(torch.zeros(4, 2048, dtype=torch.uint8), d_dev)
            V.swap_blocks(a, b, 2048, mapping)
            torch.cuda.synchronize()
            return b

        both(f"swap_blocks {where}", swap)


def main() -> int:
    if not torch.cuda.is_available():
        print("sanitizer smoke: needs a CUDA GPU (none present)")
        return 2
    torch.manual_seed(0)
    smoke = Smoke()
    parts = {f.__name__: f for f in (smoke.writes, smoke.converting_writes, smoke.refused, smoke.gather, smoke.move,
                                     smoke.host_copy, smoke.fp8, smoke.fp8_parts, smoke.indexer, smoke.rope_write)}  # fmt: skip
    # the rope_write part by query kind: three shorter runs (each fits a sanitizer run once its kernels
    # are compiled; the whole part's plain run alone takes over a minute)
    parts["rope_write_none"] = lambda: smoke.rope_write(("none",))
    parts["rope_write_bf16"] = lambda: smoke.rope_write(("bf16",))
    parts["rope_write_e4m3"] = lambda: smoke.rope_write(("fp8",))
    parts["hostile"] = lambda: hostile(smoke)
    parts["v4"] = lambda: v4_pages(smoke)
    parts["vllm"] = lambda: vllm_face(smoke)
    only = sys.argv[1:]  # part names to run (e.g. `rope_write`); none: every part
    unknown = [p for p in only if p not in parts]
    if unknown:
        print(f"sanitizer smoke: unknown part(s) {unknown}; parts: {list(parts)}")
        return 2
    for name, part in parts.items():
        if not only or name in only:
            part()
    print(f"sanitizer smoke: {smoke.cases - smoke.failures}/{smoke.cases} variant runs bit-exact")
    return 1 if smoke.failures else 0


if __name__ == "__main__":
    sys.exit(main())
