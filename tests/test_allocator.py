"""The device slot allocator (``TokenSlotAllocator``): refusals and a seeded property test.

The property test drives thousands of random alloc / release_last / free steps (plus refused
calls) against a plain model of who owns which slots, and checks after every step that no slot is
owned twice, the reserved page is never handed out, pages fill in order and the free count is exact.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from mlakv.mem_cache.allocator import PoolFullError, TokenSlotAllocator


@pytest.mark.parametrize(
    "args,exc,match",
    [
        ((16, 0), ValueError, "page_size must be >= 1"),  # issue 13 case 6: ZeroDivisionError before
        ((16, -4), ValueError, "page_size must be >= 1"),
        ((10, 4), ValueError, "multiple of page_size=4"),
        ((4, 4), ValueError, "at least one more"),
        ((16.0, 4), TypeError, "num_slots must be an int"),
        ((16, True), TypeError, "page_size must be an int"),
    ],
)
def test_bad_construction_is_refused(args, exc, match):
    with pytest.raises(exc, match=match):
        TokenSlotAllocator(*args)


def test_numpy_sizes_are_accepted():
    a = TokenSlotAllocator(np.int64(64), np.int32(4))
    assert a.free_slots() == 60 and a.alloc("r", np.int64(5)).numel() == 5


@pytest.mark.parametrize("n,exc", [(-3, ValueError), (5, ValueError), (1.0, TypeError), (True, TypeError)])
def test_release_last_refuses_bad_counts_and_changes_nothing(n, exc):
    """Issue 13 case 6: ``release_last(r, -3)`` did nothing and raised nothing."""
    a = TokenSlotAllocator(64, 4)
    a.alloc("r", 3)
    before = (a.free_slots(), a.slots_of("r"))
    with pytest.raises(exc, match="n must"):
        a.release_last("r", n)
    assert (a.free_slots(), a.slots_of("r")) == before


@pytest.mark.parametrize("n,exc", [(-1, ValueError), (2.5, TypeError), ("3", TypeError)])
def test_alloc_refuses_bad_counts(n, exc):
    a = TokenSlotAllocator(64, 4)
    with pytest.raises(exc, match="n must"):
        a.alloc("r", n)
    assert a.free_slots() == 60 and a.slots_of("r") == []


def test_slots_of_is_a_copy():
    """Issue 13 case 6: a caller's ``.clear()`` on the returned list corrupted the free count."""
    a = TokenSlotAllocator(64, 4)
    a.alloc("r", 6)
    got = a.slots_of("r")
    got.clear()
    assert len(a.slots_of("r")) == 6
    a.free("r")
    assert a.free_slots() == 60


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_property_random_sequences(page_size):
    num_pages = 24
    a = TokenSlotAllocator(num_pages * page_size, page_size)
    rng = random.Random(99 + page_size)
    model: dict[str, list[int]] = {}  # request -> slots in token order
    reqs = [f"r{i}" for i in range(8)]
    for _ in range(4000):
        r = rng.choice(reqs)
        op = rng.random()
        before = {k: list(v) for k, v in model.items()}
        free_before = a.free_slots()
        if op < 0.5:
            n = rng.randint(0, 3 * page_size)
            try:
                new = a.alloc(r, n).tolist()
            except PoolFullError:
                assert a.free_slots() == free_before and {k: a.slots_of(k) for k in model} == before
                continue
            assert len(new) == n
            model.setdefault(r, []).extend(new)
        elif op < 0.7:
            held = len(model.get(r, []))
            n = rng.randint(-2, held + 2)
            if 0 <= n <= held:
                a.release_last(r, n)
                model[r] = model.get(r, [])[: held - n]
            else:
                with pytest.raises(ValueError):
                    a.release_last(r, n)
                assert a.free_slots() == free_before
        elif op < 0.85:
            a.free(r)
            model.pop(r, None)
            a.free(r)  # a second free of the same request gives nothing back twice
        else:
            a.slots_of(r).clear()  # callers cannot corrupt the allocator through the copy
        # invariants
        owned = [s for v in model.values() for s in v]
        assert len(owned) == len(set(owned)), "a slot is owned twice"
        assert all(s >= page_size for s in owned), "the reserved page was handed out"
        for k, v in model.items():
            assert a.slots_of(k) == v
            for i in range(1, len(v)):  # inside a page, tokens fill consecutive slots
                if v[i] % page_size:
                    assert v[i] == v[i - 1] + 1
        pages_used = {s // page_size for s in owned}
        assert a.free_slots() == (num_pages - 1 - len(pages_used)) * page_size
