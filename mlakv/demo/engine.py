"""A minimal request scheduler over the MLA model: batched prefill, greedy decode (optionally
replayed from CUDA graphs), slot allocation and release.

Decode batches are padded to a captured batch size; padding rows carry ``loc = -1`` (the pool
skips them), slot 0 in their slot table and a length of 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from mlakv.mem_cache.allocator import TokenSlotAllocator
from .model import MLAModel, PrefillSegment

__all__ = ["Request", "Engine", "DecodeGraphRunner"]


@dataclass(eq=False)
class Request:
    """A generation request; ``output`` grows by one greedy token per step."""

    prompt: list[int]
    max_new_tokens: int
    output: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)  # per generated token (kept for checks)
    done: bool = False

    @property
    def cached_len(self) -> int:
        """Tokens whose rows are in the cache: the prompt plus every generated token fed back."""
        return len(self.prompt) + max(0, len(self.output) - 1)


class DecodeGraphRunner:
    """Captures ``model.decode`` for fixed batch sizes and a fixed context width, and replays it.

    ``run(..., use_graph=False)`` executes the same padded computation eagerly (same shapes, same
    kernels), which is what the graph replay must equal bit for bit.
    """

    def __init__(self, model: MLAModel, cache, batch_sizes: Sequence[int], max_ctx: int, device) -> None:
        self.model, self.cache, self.max_ctx, self.device = model, cache, max_ctx, torch.device(device)
        self.batch_sizes = sorted(batch_sizes)
        self.static: dict[int, dict[str, torch.Tensor]] = {}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        for bs in self.batch_sizes:
            self.static[bs] = dict(
                ids=torch.zeros(bs, dtype=torch.int64, device=self.device),
                pos=torch.zeros(bs, dtype=torch.int64, device=self.device),
                loc=torch.full((bs,), -1, dtype=torch.int64, device=self.device),
                table=torch.zeros(bs, max_ctx, dtype=torch.int64, device=self.device),
                lengths=torch.ones(bs, dtype=torch.int64, device=self.device),
            )

    def capture(self) -> None:
        """Capture one graph per batch size (CUDA only). Padding-only inputs: nothing is written."""
        for bs in self.batch_sizes:
            s = self.static[bs]
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm-up: build kernels, JIT modules, allocator pools
                for _ in range(2):
                    self.model.decode(self.cache, s["ids"], s["pos"], s["loc"], s["table"], s["lengths"])
            torch.cuda.current_stream(self.device).wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                s["out"] = self.model.decode(self.cache, s["ids"], s["pos"], s["loc"], s["table"], s["lengths"])
            self.graphs[bs] = g

    def bucket(self, n: int) -> int:
        for bs in self.batch_sizes:
            if n <= bs:
                return bs
        raise ValueError(f"{n} requests exceed the largest captured batch size {self.batch_sizes[-1]}")

    def run(self, ids, pos, loc, table_rows: list[torch.Tensor], use_graph: bool = True) -> torch.Tensor:
        """Decode ``n = len(ids)`` real rows padded to the bucket size; returns logits ``[n, vocab]``."""
        n = ids.shape[0]
        bs = self.bucket(n)
        s = self.static[bs]
        s["ids"].zero_(), s["pos"].zero_(), s["loc"].fill_(-1), s["table"].zero_(), s["lengths"].fill_(1)
        s["ids"][:n] = ids
        s["pos"][:n] = pos
        s["loc"][:n] = loc
        for i, row in enumerate(table_rows):
            if row.numel() > self.max_ctx:
                raise ValueError(f"request context {row.numel()} exceeds the captured max_ctx={self.max_ctx}")
            s["table"][i, : row.numel()] = row
            s["lengths"][i] = row.numel()
        if use_graph:
            self.graphs[bs].replay()
            return s["out"][:n].clone()
        return self.model.decode(self.cache, s["ids"], s["pos"], s["loc"], s["table"], s["lengths"])[:n].clone()


class Engine:
    """Prefill and greedy decode of requests over one cache backend and slot allocator."""

    def __init__(
        self,
        model: MLAModel,
        cache,
        allocator: TokenSlotAllocator,
        device,
        graph_runner: Optional[DecodeGraphRunner] = None,
        padded_runner: Optional[DecodeGraphRunner] = None,
    ) -> None:
        self.model, self.cache, self.alloc, self.device = model, cache, allocator, torch.device(device)
        self.graph_runner = graph_runner  # replays captured graphs
        self.padded_runner = padded_runner or graph_runner  # eager decode on the same padded shapes
        self.running: list[Request] = []

    def _slots(self, req: Request) -> torch.Tensor:
        return torch.tensor(self.alloc.slots_of(req), dtype=torch.int64, device=self.device)

    def _check_new(self, reqs: Sequence[Request]) -> list[Request]:
        """Refuse a batch that cannot be admitted, before anything is allocated."""
        if not isinstance(reqs, (list, tuple)):
            raise TypeError(f"reqs must be a list or tuple of Request, got {type(reqs).__name__}")
        vocab = self.model.cfg.vocab_size
        seen: set[int] = set()
        running = {id(r) for r in self.running}
        for i, r in enumerate(reqs):
            if not isinstance(r, Request):
                raise TypeError(f"reqs[{i}] must be a Request, got {type(r).__name__}")
            if id(r) in seen:
                raise ValueError(f"reqs[{i}] is the same Request as an earlier entry of this batch")
            if id(r) in running or r.output or r.done:
                raise ValueError(f"reqs[{i}] was already admitted (a Request is prefilled once)")
            seen.add(id(r))
            if not isinstance(r.prompt, (list, tuple)) or len(r.prompt) == 0:
                raise ValueError(f"reqs[{i}].prompt must be a non-empty list of token ids")
            for t in r.prompt:
                if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)) or not 0 <= t < vocab:
                    raise ValueError(f"reqs[{i}].prompt holds {t!r}: token ids must be ints in [0, {vocab})")
            m = r.max_new_tokens
            if isinstance(m, (bool, np.bool_)) or not isinstance(m, (int, np.integer)) or m < 1:
                raise ValueError(f"reqs[{i}].max_new_tokens must be an int >= 1, got {r.max_new_tokens!r}")
        return list(reqs)

    def prefill(self, reqs: Sequence[Request]) -> None:
        """Admit ``reqs``: check them (empty prompts, token ids outside the vocabulary, a request
        twice or already admitted are refused before anything is allocated), allocate their prompt
        slots, run one batched prefill, and take each request's first greedy token.

        All or nothing: if allocation (:class:`PoolFullError`) or the forward pass fails, every slot
        this call took is given back and the requests are left as they were."""
        reqs = self._check_new(reqs)
        new_slots = []
        try:
            for r in reqs:
                new_slots.append(self.alloc.alloc(r, len(r.prompt)))
            ids = torch.tensor([t for r in reqs for t in r.prompt], dtype=torch.int64, device=self.device)
            pos = torch.cat([torch.arange(len(r.prompt)) for r in reqs]).to(self.device)
            loc = torch.cat(new_slots).to(self.device)
            segs, start = [], 0
            for r in reqs:
                segs.append(PrefillSegment(start, len(r.prompt), self._slots(r)))
                start += len(r.prompt)
            logits = self.model.prefill(self.cache, ids, pos, loc, segs)
            firsts = []
            for seg in segs:
                last = logits[seg.start + seg.length - 1]
                firsts.append((last.float().cpu(), int(last.argmax())))
        except BaseException:
            for r in reqs[: len(new_slots)]:
                self.alloc.free(r)
            raise
        for r, (lg, tok) in zip(reqs, firsts):
            r.logits.append(lg)
            r.output.append(tok)
        self.running.extend(reqs)
        self._retire()

    def decode_step(self, use_graph: bool = True) -> None:
        """One greedy token for every running request, in batches of at most the largest captured
        batch size (each batch: all of its requests get a slot, or none do)."""
        reqs = [r for r in self.running if not r.done]
        runner = self.graph_runner or self.padded_runner
        step = runner.batch_sizes[-1] if runner is not None else max(1, len(reqs))
        for i in range(0, len(reqs), step):
            self._decode_batch(reqs[i : i + step], use_graph)
        self._retire()

    def _decode_batch(self, reqs: list[Request], use_graph: bool) -> None:
        got = []
        try:
            for r in reqs:
                got.append(self.alloc.alloc(r, 1))
            ids = torch.tensor([r.output[-1] for r in reqs], dtype=torch.int64, device=self.device)
            pos = torch.tensor([r.cached_len for r in reqs], dtype=torch.int64, device=self.device)
            loc = torch.cat(got).to(self.device)
            tables = [self._slots(r) for r in reqs]
            runner = self.graph_runner if (use_graph and self.graph_runner is not None) else self.padded_runner
            if runner is not None:
                logits = runner.run(ids, pos, loc, tables, use_graph=use_graph and runner is self.graph_runner)
            else:  # unpadded eager decode
                t = max(x.numel() for x in tables)
                table = torch.zeros(len(reqs), t, dtype=torch.int64, device=self.device)
                for i, row in enumerate(tables):
                    table[i, : row.numel()] = row
                lengths = torch.tensor([x.numel() for x in tables], device=self.device)
                logits = self.model.decode(self.cache, ids, pos, loc, table, lengths)
            outs = [(lg.float().cpu(), int(lg.argmax())) for lg in logits]
        except BaseException:
            for r in reqs[: len(got)]:  # undo this step's single slots
                self.alloc.release_last(r, 1)
            raise
        for r, (lg, tok) in zip(reqs, outs):
            r.logits.append(lg)
            r.output.append(tok)

    def _retire(self) -> None:
        for r in self.running:
            if not r.done and len(r.output) >= r.max_new_tokens:
                r.done = True
                self.alloc.free(r)
        self.running = [r for r in self.running if not r.done]
