"""``python -m mlakv demo --l3 mooncake``: a shared prefix found in Mooncake Store by a second node.

Node A prefills prompts that share a prefix with the demo MLA model, backs the prefix pages up
device -> host (L2) -> Mooncake Store (L3), and clears its host pool. Node B (a new device pool, a
new host pool and its own Mooncake client, as another machine would have) hashes its prompts'
pages, finds the prefix in the store, loads it store -> host -> device layer by layer, prefills only
the suffixes and decodes. A third pool recomputes everything from scratch: the prefix rows node B
loaded must equal the recomputed rows bit for bit, and the decoded tokens and logits must match.
The time saved is recompute (prefill of the whole prompts) minus the L3 path (lookup, load, suffix
prefill).

It starts its own ``mooncake_master`` on loopback unless given one.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

from mlakv.mem_cache import MLATokenToKVPool, MLATokenToKVPoolHost, prefix_page_key
from mlakv.testing.mooncake_master import MooncakeMaster
from mlakv.mem_cache.storage.mooncake import MooncakeStorage
from mlakv.demo.model import MLAConfig, PoolKVCache
from mlakv.mem_cache.allocator import TokenSlotAllocator
from mlakv.demo.model import PrefillSegment, default_dtype, make_model

__all__ = ["L3DemoResult", "page_keys", "run_l3_demo", "main"]


@dataclass
class L3DemoResult:
    """What the demo measured and checked (times in seconds)."""

    prefix_pages: int
    pages_found: int
    rows_bit_exact: bool
    tokens_equal: bool
    max_logit_diff: float
    t_recompute: float
    t_l3: float
    t_lookup_load: float
    t_backup: float

    @property
    def passed(self) -> bool:
        return self.pages_found == self.prefix_pages and self.rows_bit_exact and self.tokens_equal


def page_keys(tokens: list[int], page_size: int) -> list[str]:
    """Chained prefix-hash keys of the whole pages of ``tokens`` (a partial last page has none)."""
    keys, prior = [], None
    for i in range(len(tokens) // page_size):
        prior = prefix_page_key(tokens[i * page_size : (i + 1) * page_size], prior)
        keys.append(prior)
    return keys


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _decode(model, cache, slots: list[torch.Tensor], first: list[int], pos0: list[int], alloc, owners, steps, device):
    """Greedy decode ``steps`` tokens for each request; returns (tokens, logits) per request."""
    toks = [[t] for t in first]
    logits = [[] for _ in first]
    for step in range(steps):
        loc = torch.cat([alloc.alloc(o, 1) for o in owners]).to(device)
        for i in range(len(slots)):
            slots[i] = torch.cat([slots[i], loc[i : i + 1]])
        t = max(s.numel() for s in slots)
        table = torch.zeros(len(slots), t, dtype=torch.int64, device=device)
        for i, s in enumerate(slots):
            table[i, : s.numel()] = s
        lengths = torch.tensor([s.numel() for s in slots], device=device)
        ids = torch.tensor([tk[-1] for tk in toks], device=device)
        pos = torch.tensor([p + step for p in pos0], device=device)
        out = model.decode(cache, ids, pos, loc, table, lengths)
        for i in range(len(slots)):
            logits[i].append(out[i].float().cpu())
            toks[i].append(int(out[i].argmax()))
    return toks, logits


def run_l3_demo(
    master: Optional[MooncakeMaster] = None,
    *,
    n_layers: int = 4,
    hidden: int = 256,
    page_size: int = 64,
    prefix_pages: int = 8,
    n_prompts: int = 4,
    suffix_len: int = 16,
    decode_steps: int = 8,
    device: Optional[str] = None,
    verbose: bool = True,
) -> L3DemoResult:
    """Run the two-node L3 round trip; see the module docstring. Starts a master if none is given."""
    if master is None:
        with MooncakeMaster() as m:
            return run_l3_demo(m, n_layers=n_layers, hidden=hidden, page_size=page_size, prefix_pages=prefix_pages,
                               n_prompts=n_prompts, suffix_len=suffix_len, decode_steps=decode_steps, device=device,
                               verbose=verbose)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = default_dtype(dev)
    cfg = MLAConfig(vocab_size=1024, hidden=hidden, n_heads=4, n_layers=n_layers)
    model = make_model(cfg, dev, dtype)
    P, plen = page_size, prefix_pages * page_size
    g = torch.Generator().manual_seed(7)
    prefix = torch.randint(0, cfg.vocab_size, (plen,), generator=g).tolist()
    prompts = [prefix + torch.randint(0, cfg.vocab_size, (suffix_len,), generator=g).tolist() for _ in range(n_prompts)]
    keys = page_keys(prefix, P)
    ctx = plen + suffix_len + decode_steps
    pool_size = n_prompts * (-(-ctx // P) + 1) * P

    def new_pool():
        return MLATokenToKVPool(pool_size, P, dtype, cfg.kv_lora_rank, cfg.qk_rope_head_dim, n_layers, dev)

    def prefill_full(pool, alloc):
        """Prefill whole prompts (recompute); returns per-request slots and first tokens."""
        owners = [object() for _ in prompts]
        slots = [alloc.alloc(o, len(p)).to(dev) for o, p in zip(owners, prompts)]
        ids = torch.tensor([t for p in prompts for t in p], device=dev)
        pos = torch.cat([torch.arange(len(p)) for p in prompts]).to(dev)
        segs, start = [], 0
        for p, s in zip(prompts, slots):
            segs.append(PrefillSegment(start, len(p), s))
            start += len(p)
        out = model.prefill(PoolKVCache(pool), ids, pos, torch.cat(slots), segs)
        first = [int(out[s.start + s.length - 1].argmax()) for s in segs]
        return owners, slots, first

    kw = dict(model_id=f"mla-demo-{n_layers}x{hidden}", global_segment_bytes=256 << 20)

    # ---- recompute (the reference, and the time L3 saves) --------------------------------------
    pool_c = new_pool()
    alloc_c = TokenSlotAllocator(pool_c.num_slots, P)
    _sync(dev)
    t0 = time.perf_counter()
    owners_c, slots_c, first_c = prefill_full(pool_c, alloc_c)
    _sync(dev)
    t_recompute = time.perf_counter() - t0
    toks_c, logits_c = _decode(model, PoolKVCache(pool_c), list(slots_c), first_c, [len(p) for p in prompts], alloc_c,
                               owners_c, decode_steps, dev)

    # ---- node A: prefill, back the prefix up device -> host -> Mooncake, clear the host pool ----
    pool_a = new_pool()
    host_a = MLATokenToKVPoolHost(pool_a, host_to_device_ratio=1.0, layout="page_first_direct")
    alloc_a = TokenSlotAllocator(pool_a.num_slots, P)
    _, slots_a, _ = prefill_full(pool_a, alloc_a)
    store_a = MooncakeStorage(host_a, master.master_addr, master.metadata_url, **kw)
    try:
        _sync(dev)
        t0 = time.perf_counter()
        h_a = host_a.alloc(plen)
        host_a.backup_from_device_all_layer(pool_a, h_a, slots_a[0][:plen].cpu())
        host_a.synchronize()
        store_a.batch_set_from(keys, h_a)
        t_backup = time.perf_counter() - t0
        host_a.free(h_a)
        host_a.kv_buffer.zero_()  # the host tier forgets; only Mooncake has the prefix now

        # ---- node B: a new pool finds the prefix in Mooncake and loads it layer by layer ----------
        pool_b = new_pool()
        host_b = MLATokenToKVPoolHost(pool_b, host_to_device_ratio=1.0, layout="page_first_direct")
        alloc_b = TokenSlotAllocator(pool_b.num_slots, P)
        store_b = MooncakeStorage(host_b, master.master_addr, master.metadata_url, **kw)
        try:
            _sync(dev)
            t0 = time.perf_counter()
            b_keys = page_keys(prompts[0], P)[:prefix_pages]
            found = store_b.batch_exists(b_keys)
            h_b = host_b.alloc(found * P)
            loaded = store_b.batch_get_into(b_keys[:found], h_b)
            prefix_owner = object()
            d_prefix = alloc_b.alloc(prefix_owner, loaded * P)
            for layer in range(n_layers):  # host -> device, one layer at a time
                host_b.load_to_device_per_layer(pool_b, h_b[: loaded * P], d_prefix, layer)
            host_b.synchronize()
            t_lookup_load = time.perf_counter() - t0
            # every prompt reuses the loaded prefix pages; only the suffixes are prefilled
            owners_b = [object() for _ in prompts]
            cached = loaded * P
            suf_slots = [alloc_b.alloc(o, len(p) - cached).to(dev) for o, p in zip(owners_b, prompts)]
            slots_b = [torch.cat([d_prefix.to(dev), s]) for s in suf_slots]
            ids = torch.tensor([t for p in prompts for t in p[cached:]], device=dev)
            pos = torch.cat([torch.arange(cached, len(p)) for p in prompts]).to(dev)
            segs, start = [], 0
            for p, s in zip(prompts, slots_b):
                segs.append(PrefillSegment(start, len(p) - cached, s))
                start += len(p) - cached
            out = model.prefill(PoolKVCache(pool_b), ids, pos, torch.cat(suf_slots), segs)
            _sync(dev)
            t_l3 = time.perf_counter() - t0
            first_b = [int(out[s.start + s.length - 1].argmax()) for s in segs]
            rows_same = all(
                torch.equal(pool_b.kv_buffer[layer][d_prefix.to(dev)], pool_c.kv_buffer[layer][slots_c[0][:cached]])
                for layer in range(n_layers)
            ) and cached == plen
            toks_b, logits_b = _decode(model, PoolKVCache(pool_b), slots_b, first_b, [len(p) for p in prompts], alloc_b,
                                       owners_b, decode_steps, dev)
        finally:
            store_b.close()
    finally:
        store_a.close()
    diff = max(float((x - y).abs().max()) for a, b in zip(logits_b, logits_c) for x, y in zip(a, b))
    res = L3DemoResult(prefix_pages, found, rows_same, toks_b == toks_c, diff, t_recompute, t_l3, t_lookup_load, t_backup)
    if verbose:
        mb = prefix_pages * host_a.page_bytes / 2**20
        print(f"mlakv L3 demo on {torch.cuda.get_device_name() if dev.type == 'cuda' else 'CPU'}: {n_layers}-layer MLA "
              f"model ({dtype}), {n_prompts} prompts = shared prefix of {plen} tokens ({prefix_pages} pages of {P}, "
              f"{mb:.1f} MiB) + {suffix_len} own tokens, {decode_steps} decode steps; Mooncake master {master.master_addr}")
        print(f"node A backed the prefix up device -> host -> Mooncake in {t_backup * 1e3:.1f} ms, then cleared its host pool")
        print(f"node B found {found}/{prefix_pages} prefix pages in Mooncake and loaded them into a new pool "
              f"(store -> host -> device, layer by layer) in {t_lookup_load * 1e3:.1f} ms")
        print(f"prefix rows loaded == rows recomputed (bit-exact): {rows_same}; decoded tokens equal: {res.tokens_equal}; "
              f"max |logit difference|: {diff:.3g}")
        print(f"| path | time to first token (ms) |\n|---|---|\n| recompute the whole prompts | {t_recompute * 1e3:.1f} |\n"
              f"| L3: lookup + load prefix + prefill suffixes | {t_l3 * 1e3:.1f} |")
        print(f"time saved: {(t_recompute - t_l3) * 1e3:.1f} ms ({t_recompute / t_l3:.2f}x)")
        print("L3 demo: " + ("PASSED" if res.passed else "FAILED"))
    return res


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mlakv demo --l3 mooncake", description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prefix-pages", type=int, default=8)
    ap.add_argument("--page-size", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--decode-steps", type=int, default=8)
    args = ap.parse_args(argv)
    res = run_l3_demo(n_layers=args.layers, prefix_pages=args.prefix_pages, page_size=args.page_size,
                      n_prompts=args.prompts, decode_steps=args.decode_steps)
    return 0 if res.passed else 1


if __name__ == "__main__":
    sys.exit(main())
