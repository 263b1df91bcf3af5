"""Token-slot allocation for the device pool: a free list of pages, per-request slot lists.

With ``page_size == 1`` every slot is its own page. With larger pages a request owns whole pages
and its tokens fill them in order; a new page is taken only when the last one is full. Page 0 is
the pool's reserved dummy page (the target of padded tokens) and is never handed out.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["PoolFullError", "TokenSlotAllocator"]


class PoolFullError(RuntimeError):
    """The pool has too few free slots for a request; nothing was allocated."""


def _as_int(value: object, name: str) -> int:
    """``value`` as an int: Python and numpy integers; bools, floats and the rest are refused."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


class TokenSlotAllocator:
    """Hands out token slots of an :class:`~mlakv.mem_cache.MLATokenToKVPool` to requests.

    Args:
        num_slots: the pool's ``num_slots`` (``size + page_size``; the first page is reserved), a
            multiple of ``page_size`` with at least one usable page.
        page_size: the pool's page size (>= 1).

    Every refused call (``PoolFullError``, ``ValueError``, ``TypeError``) leaves the allocator as it was.
    """

    def __init__(self, num_slots: int, page_size: int) -> None:
        num_slots, page_size = _as_int(num_slots, "num_slots"), _as_int(page_size, "page_size")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        if num_slots % page_size or num_slots < 2 * page_size:
            raise ValueError(
                f"num_slots={num_slots} must be a multiple of page_size={page_size} holding the reserved page "
                "and at least one more"
            )
        self.page_size = page_size
        self.num_pages = num_slots // page_size
        self._free = list(range(self.num_pages - 1, 0, -1))  # page 0 reserved; pop() gives low pages first
        self._owned: dict[object, list[int]] = {}  # request -> its slots, in token order
        self._in_use: set[int] = set()

    def free_slots(self) -> int:
        """Slots that can still be handed out (free pages only)."""
        return len(self._free) * self.page_size

    def slots_of(self, req: object) -> list[int]:
        """A copy of ``req``'s slots, in token order (empty if it holds none)."""
        return list(self._owned.get(req, ()))

    def _pages_needed(self, req: object, n: int) -> int:
        have = len(self._owned.get(req, ()))
        room = (-have) % self.page_size  # free tail of the request's last page
        return -(-(n - room) // self.page_size) if n > room else 0

    def alloc(self, req: object, n: int) -> torch.Tensor:
        """Give ``req`` ``n`` more slots (int64 ``[n]``, in token order). Raises
        :class:`PoolFullError` without allocating anything if the pool lacks room."""
        n = _as_int(n, "n")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        need = self._pages_needed(req, n)
        if need > len(self._free):
            raise PoolFullError(
                f"KV pool full: request needs {n} slots ({need} new pages of {self.page_size}) but only "
                f"{len(self._free)} pages are free"
            )
        slots = self._owned.setdefault(req, [])
        new: list[int] = []
        have = len(slots)
        if have % self.page_size:
            last = slots[-1]
            take = min(n, (-have) % self.page_size)
            new.extend(range(last + 1, last + 1 + take))
        for _ in range(need):
            page = self._free.pop()
            if page in self._in_use:
                raise RuntimeError(f"allocator bug: page {page} handed out twice")
            self._in_use.add(page)
            base = page * self.page_size
            new.extend(range(base, base + min(self.page_size, n - len(new))))
        slots.extend(new)
        return torch.tensor(new, dtype=torch.int64)

    def release_last(self, req: object, n: int) -> None:
        """Undo the last ``n`` (>= 0) slots given to ``req`` (pages left empty go back to the free list)."""
        n = _as_int(n, "n")
        slots = self._owned.get(req, [])
        if n < 0 or n > len(slots):
            raise ValueError(f"n must be in [0, {len(slots)}] (the slots the request holds), got {n}")
        keep, drop = slots[: len(slots) - n], slots[len(slots) - n :]
        kept_pages = {s // self.page_size for s in keep}
        for p in sorted({s // self.page_size for s in drop} - kept_pages, reverse=True):
            self._in_use.discard(p)
            self._free.append(p)
        if keep:
            self._owned[req] = keep
        else:
            self._owned.pop(req, None)

    def free(self, req: object) -> None:
        """Return all of ``req``'s pages (nothing happens for a request that holds none)."""
        slots = self._owned.pop(req, [])
        pages = sorted({s // self.page_size for s in slots}, reverse=True)
        for p in pages:
            self._in_use.discard(p)
        self._free.extend(pages)
