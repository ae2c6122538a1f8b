"""The online profile: what the real-time path keeps per user, and how an event changes it.

Role: the seconds-fresh counterpart of the Delta ``user_profiles`` row, kept in the online store
(:mod:`carousel.online_store`) and updated by ``serve`` before it answers a trigger, and by
``rebuild-online-store``. It holds what ranking and templates read: the recent viewed and
purchased items, the latest platform and the user attributes (merged field by field). Plain
Python on plain values, so it runs in Spark's Python workers and in unit tests alike.

Every update is a *join* in the lattice sense: commutative, associative and idempotent.

* recent views / purchases: the latest time per distinct item, newest first (ties: larger item id
  first), at most ``limit`` of them - exactly the rule of ``streaming.profile_updates`` (Delta
  profiles and ``rebuild-profiles``), so the online lists equal theirs for the same events;
* platform and each user attribute: the value of the latest event, ordered by (event time,
  event id), as the Delta profile orders its "latest" structs.

So applying an event twice (a replayed micro-batch), out of order (a late event) or after a
rebuild has merged the Delta profile in changes nothing that one application would not have:
no offset watermark is needed for exactly-once results.

Times are epoch microseconds (what Spark's Arrow batches carry, and exact in JSON).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from carousel.fastjson import compact_json
from carousel.schemas import PRODUCT_PURCHASED, PRODUCT_VIEWED, USER_ATTRIBUTES_SCHEMA

USER_ATTRIBUTE_FIELDS: tuple[str, ...] = tuple(USER_ATTRIBUTES_SCHEMA.fieldNames())


def remember_item(entries: list[list[Any]], item_id: str, micros: int, limit: int) -> bool:
    """Add ``(item_id, micros)`` to ``entries`` (``[[item, micros], ...]``, newest first, distinct).

    Keeps the latest time per item and at most ``limit`` items, ordered by (time, item id)
    descending. Returns whether ``entries`` changed.
    """
    for position, (known, when) in enumerate(entries):
        if known == item_id:
            if when >= micros:
                return False
            del entries[position]
            break
    key = (micros, item_id)
    position = 0
    while position < len(entries) and (entries[position][1], entries[position][0]) > key:
        position += 1
    if position >= limit:
        return False
    entries.insert(position, [item_id, micros])
    del entries[limit:]
    return True


def _later(candidate: tuple[int, str], held: Sequence[Any] | None) -> bool:
    return held is None or candidate > (held[1], held[2])


@dataclass
class OnlineProfile:
    """One user's online profile (see the module docstring)."""

    views: list[list[Any]] = field(default_factory=list)  # [[item_id, micros], ...] newest first
    purchases: list[list[Any]] = field(default_factory=list)
    platform: list[Any] | None = None  # [platform, micros, event_id]
    attributes: dict[str, list[Any]] = field(default_factory=dict)  # name -> [value, micros, event_id]
    last_seen: int = 0  # micros of the latest event applied

    # -- updates ------------------------------------------------------------------------------
    def apply(self, event: Mapping[str, Any], limit: int) -> bool:
        """Apply one valid event (``event_id, event_type, item_id, event_time, platform,
        user_attributes``; time in micros). Returns whether anything changed."""
        micros, event_id = event["event_time"], event["event_id"]
        changed = False
        item, kind = event.get("item_id"), event.get("event_type")
        if item is not None:
            if kind == PRODUCT_VIEWED:
                changed |= remember_item(self.views, item, micros, limit)
            elif kind == PRODUCT_PURCHASED:
                changed |= remember_item(self.purchases, item, micros, limit)
        platform = event.get("platform")
        if platform is not None and _later((micros, event_id), self.platform):
            self.platform = [platform, micros, event_id]
            changed = True
        for name, value in (event.get("user_attributes") or {}).items():
            if value is not None and name in USER_ATTRIBUTE_FIELDS:
                if _later((micros, event_id), self.attributes.get(name)):
                    self.attributes[name] = [value, micros, event_id]
                    changed = True
        if micros > self.last_seen:
            self.last_seen = micros
            changed = True
        return changed

    def merge(self, other: OnlineProfile, limit: int) -> bool:
        """Join ``other`` into this profile (a rebuild merging the Delta profile into the store).

        Returns whether anything changed: a rebuild over a store that already holds it writes nothing.
        """
        changed = False
        for item, micros in other.views:
            changed |= remember_item(self.views, item, micros, limit)
        for item, micros in other.purchases:
            changed |= remember_item(self.purchases, item, micros, limit)
        if other.platform is not None and _later((other.platform[1], other.platform[2]), self.platform):
            self.platform = list(other.platform)
            changed = True
        for name, held in other.attributes.items():
            if _later((held[1], held[2]), self.attributes.get(name)):
                self.attributes[name] = list(held)
                changed = True
        if other.last_seen > self.last_seen:
            self.last_seen = other.last_seen
            changed = True
        return changed

    # -- what ranking and templates read ----------------------------------------------------------
    def recent(self, kind: str) -> list[dict[str, Any]]:
        """``recent_views`` / ``recent_purchases`` as the ranking reads them (newest first)."""
        entries = self.views if kind == "views" else self.purchases
        return [{"item_id": item, "event_time": micros} for item, micros in entries]

    def user_context(self, platform: str | None = None) -> dict[str, Any]:
        """The template's ``user``: the latest attributes, and ``platform`` (else the latest one)."""
        context = {
            name: (held[0] if (held := self.attributes.get(name)) else None) for name in USER_ATTRIBUTE_FIELDS
        }
        context["platform"] = (
            platform if platform is not None else (self.platform[0] if self.platform else None)
        )
        return context

    # -- storage ---------------------------------------------------------------------------------
    def to_json(self) -> str:
        return compact_json(
            {
                "v": self.views,
                "p": self.purchases,
                "pl": self.platform,
                "a": self.attributes,
                "t": self.last_seen,
            }
        )

    @classmethod
    def from_json(cls, text: str | bytes | None) -> OnlineProfile:
        if not text:
            return cls()
        data = json.loads(text)
        return cls(
            views=data.get("v") or [],
            purchases=data.get("p") or [],
            platform=data.get("pl"),
            attributes=data.get("a") or {},
            last_seen=int(data.get("t") or 0),
        )

    @classmethod
    def from_events(cls, events: Iterable[Mapping[str, Any]], limit: int) -> OnlineProfile:
        profile = cls()
        for event in events:
            profile.apply(event, limit)
        return profile
