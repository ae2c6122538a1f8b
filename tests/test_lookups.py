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


def test_lookups_leave_the_collectors_reach_once_and_stay_freeable() -> None:
    lookups = _lookups()
    try:
        assert _tracked(lookups)
        assert keep_out_of_gc(lookups) is lookups
        assert lookups._frozen
        assert not _tracked(lookups), "the lookups are still visited by every collection"
        frozen = gc.get_freeze_count()
        later = _lookups()
        assert keep_out_of_gc(lookups) is lookups
        assert gc.get_freeze_count() == frozen, "frozen again although nothing changed"
        assert _tracked(later)
        assert keep_out_of_gc(later)._frozen and not _tracked(later)
        # Replaced lookups are still released (reference counting), frozen or not.
        released = weakref.ref(later)
        del later
        assert released() is None
    finally:
        gc.unfreeze()
