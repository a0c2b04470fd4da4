"""`freeze_startup_heap` takes what is alive out of the collector's passes, garbage excluded."""

from __future__ import annotations

import gc
import weakref

from router.gc_heap import freeze_startup_heap


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the collector frees it


def test_live_objects_are_frozen_and_garbage_is_collected_first() -> None:
    kept = [_Node() for _ in range(100)]
    lost = _Node()
    gone = weakref.ref(lost)
    del lost  # cyclic garbage: freed only by a collection
    try:
        frozen = freeze_startup_heap()
        assert gone() is None, "garbage was frozen instead of collected"
        assert frozen == gc.get_freeze_count() >= len(kept)
        assert all(gc.is_tracked(k) for k in kept)
        # New cyclic garbage after the freeze is still collected.
        later = weakref.ref(_Node())
        gc.collect()
        assert later() is None
    finally:
        gc.unfreeze()
