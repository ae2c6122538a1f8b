"""Unit tests of the serving lookups' process-level handling (carousel/lookups.py).

Loading, refreshing by Delta version and warming are covered end to end in tests/test_serve.py.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any

import pyarrow as pa

from carousel.lookups import ServingLookups, keep_out_of_gc


def _lookups() -> ServingLookups:
    empty = pa.table({"item_id": pa.array([], pa.string())})
    sources: Any = None  # not read by keep_out_of_gc
    return ServingLookups(sources, {"catalog": 1, "matrix": 1, "trending": 1}, empty, {None: None}, empty)


def _tracked(obj: object) -> bool:
    """Whether a collection would visit ``obj`` (frozen objects are in no generation)."""
    return any(o is obj for o in gc.get_objects())


def test_lookups_leave_the_collectors_reach_once_and_stay_freeable(monkeypatch) -> None:
    freezes: list[int] = []
    freeze = gc.freeze

    def counted_freeze() -> None:
        freezes.append(1)
        freeze()

    monkeypatch.setattr(gc, "freeze", counted_freeze)
    lookups = _lookups()
    try:
        assert _tracked(lookups)
        assert keep_out_of_gc(lookups) is lookups
        assert lookups._frozen and len(freezes) == 1
        assert not _tracked(lookups), "the lookups are still visited by every collection"
        later = _lookups()
        assert keep_out_of_gc(lookups) is lookups
        assert len(freezes) == 1, "frozen again although nothing changed"
        assert _tracked(later)
        assert keep_out_of_gc(later)._frozen and not _tracked(later) and len(freezes) == 2
        # Replaced lookups are still released (reference counting), frozen or not.
        released = weakref.ref(later)
        del later
        assert released() is None
    finally:
        gc.unfreeze()
