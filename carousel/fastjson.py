"""Compact JSON for the hot path: online-store values, outbox records, payloads.

Role: the one encoder of what ``serve`` and the API write per answer. orjson, not ``json``: on
the API's request path the standard library's encoder was about 7 % of a worker's Python time
(three encodings per answer). The output is the same compact JSON (``separators=(",", ":")``)
except that non-ASCII text is written as UTF-8 instead of ``\\u`` escapes; every reader (Spark's
``from_json``, ``json.loads``, the senders) reads both.

Inputs: plain values (dict, list, str, int, float, bool, None; numpy scalars are converted).
Outputs: ``str``; an unknown type raises ``ValueError``. NaN and infinity become ``null`` (json
wrote them as the invalid tokens ``NaN``/``Infinity``); payload scores are checked finite before.
"""

from __future__ import annotations

from typing import Any

import orjson


def _plain(value: Any) -> Any:
    """numpy scalars (``np.float32`` scores, ``np.int64`` ranks) as Python numbers."""
    item = getattr(value, "item", None)
    if callable(item):
        return item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def compact_json(value: Any) -> str:
    """``value`` as compact JSON text."""
    try:
        return orjson.dumps(value, default=_plain).decode()
    except (orjson.JSONEncodeError, TypeError) as err:
        raise ValueError(str(err)) from None
