"""Interaction data for the item-to-item models: reading, per-user sequences, time split.

Role: the one place where a training snapshot (``user_id,item_id,event_type,event_time``, see
:data:`carousel.schemas.INTERACTION_COLUMNS`) becomes what the models consume. Everything is
vectorised (numpy / pandas), so 5 million interactions take seconds.

Inputs: a CSV path or buffer (:func:`read_interactions`), or any pandas DataFrame with those four
columns (``event_time`` datetime64, UTC-aware or naive UTC).

Outputs:

* :func:`read_interactions` - a validated DataFrame (categorical ids and event types,
  ``event_time`` datetime64[ns, UTC]);
* :func:`user_sequences` - :class:`Sequences`: the item vocabulary and every user's time-ordered
  item codes (consecutive repeats collapsed) as one flat array plus offsets;
* :func:`user_item_matrix` - the binary user x item matrix (scipy CSR) of the same vocabulary;
* :func:`time_split` - train / test frames by a global time cutoff.
"""

from __future__ import annotations

import io
import os
from typing import IO, NamedTuple

import numpy as np
import pandas as pd
from scipy import sparse

from carousel.schemas import INTERACTION_COLUMNS

__all__ = [
    "Sequences",
    "next_item_pairs",
    "read_interactions",
    "time_ns",
    "time_split",
    "user_item_matrix",
    "user_sequences",
]


class Sequences(NamedTuple):
    """Every user's time-ordered item codes, flattened.

    ``items[c]`` is the item id of code ``c`` (sorted ids); user ``u``'s sequence is
    ``codes[offsets[u]:offsets[u + 1]]``; ``counts[c]`` is how many interactions item ``c`` had
    (before repeats were collapsed); ``users[u]`` is the user id.
    """

    items: np.ndarray  # (n_items,) object, sorted item ids
    codes: np.ndarray  # (n_tokens,) int32
    offsets: np.ndarray  # (n_users + 1,) int64
    counts: np.ndarray  # (n_items,) int64
    users: np.ndarray  # (n_users,) object

    @property
    def n_items(self) -> int:
        return len(self.items)

    @property
    def n_users(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        """Sequence length of every user."""
        return np.diff(self.offsets)

    def split(self) -> list[np.ndarray]:
        """The sequences as a list of arrays (views into ``codes``; for small data and tests)."""
        return np.split(self.codes, self.offsets[1:-1])

    def user_of_token(self) -> np.ndarray:
        """(n_tokens,) int32: the user index of every position of ``codes``."""
        return np.repeat(np.arange(self.n_users, dtype=np.int32), self.lengths())


def next_item_pairs(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(a_items, b_items): every user's consecutive distinct items, a != b, as item ids.

    Each user's interactions are taken in time order (ties keep the row order), consecutive
    repeats of one item collapsed; each step from one item to the next is a pair. Users come in
    id order, each user's pairs in time order. Users with a single distinct run give no pair.
    """
    if len(df) == 0:
        empty = np.array([], dtype=object)
        return empty, empty.copy()
    sequences = user_sequences(df)
    codes = sequences.codes
    user = sequences.user_of_token()
    same_user = user[1:] == user[:-1]
    return sequences.items[codes[:-1][same_user]], sequences.items[codes[1:][same_user]]


def read_interactions(path_or_buffer: str | os.PathLike[str] | IO[str] | IO[bytes]) -> pd.DataFrame:
    """Read a training CSV (header exactly ``user_id,item_id,event_type,event_time``).

    Event times are ISO-8601 (any offset, or none = UTC) and come back as datetime64[ns, UTC];
    ids and event types come back categorical. Raises :class:`ValueError` naming the line and the
    column of the first problem: a wrong header, a missing value or an unparseable time.
    """
    expected = list(INTERACTION_COLUMNS)
    try:
        frame = pd.read_csv(
            path_or_buffer,
            dtype=str,
            keep_default_na=False,
            na_values=[""],
            skipinitialspace=False,
            engine="c",
        )
    except pd.errors.EmptyDataError:
        raise ValueError(f"line 1: empty file; expected the header {','.join(expected)}") from None
    except pd.errors.ParserError as err:
        raise ValueError(f"malformed CSV: {err}") from None
    header = [str(c) for c in frame.columns]
    if header != expected:
        raise ValueError(f"line 1: bad header {','.join(header)!r}; expected exactly {','.join(expected)!r}")
    for column in expected:
        missing = frame[column].isna().to_numpy()
        if missing.any():
            row = int(np.flatnonzero(missing)[0])
            raise ValueError(f"line {row + 2}, column {column}: missing value")
    raw_times = frame["event_time"].str.strip()
    # Times without an offset are UTC. Made explicit: pandas 2 misreads a column mixing both kinds.
    naive = ~raw_times.str.contains(r"(?:Z|[+-]\d{2}:?\d{2})$", regex=True)
    raw_times = raw_times.where(~naive, raw_times + "Z")
    try:
        times = pd.to_datetime(raw_times, utc=True, format="ISO8601")
    except (ValueError, TypeError, OverflowError):
        times = pd.to_datetime(raw_times, utc=True, format="ISO8601", errors="coerce")
        bad = times.isna().to_numpy()
        if not bad.any():  # parseable one by one yet not together: report the whole column
            raise ValueError("column event_time: times are not ISO-8601") from None
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"line {row + 2}, column event_time: unparseable ISO-8601 time {frame['event_time'].iloc[row]!r}"
        ) from None
    return pd.DataFrame(
        {
            "user_id": frame["user_id"].astype("category"),
            "item_id": frame["item_id"].astype("category"),
            "event_type": frame["event_type"].astype("category"),
            "event_time": times.astype("datetime64[ns, UTC]"),
        }
    )


def _check_columns(df: pd.DataFrame, needed: tuple[str, ...]) -> None:
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise ValueError(f"interactions lack the columns {missing}; expected {list(INTERACTION_COLUMNS)}")


def time_ns(times: pd.Series) -> np.ndarray:
    """int64 nanoseconds since the epoch (UTC) of a datetime column (aware or naive UTC)."""
    if not pd.api.types.is_datetime64_any_dtype(times):
        times = pd.to_datetime(times, utc=True, format="ISO8601")
    if getattr(times.dt, "tz", None) is not None:
        times = times.dt.tz_convert("UTC").dt.tz_localize(None)
    return times.astype("datetime64[ns]").to_numpy().view(np.int64)


def _factorize_sorted(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(codes int64 with -1 for missing, sorted unique values as an object array)."""
    codes, uniques = pd.factorize(values, sort=False, use_na_sentinel=True)
    labels = np.asarray(uniques.astype(str), dtype=object)
    order = np.argsort(labels, kind="stable")
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    codes = np.where(codes >= 0, rank[np.maximum(codes, 0)], -1)
    return codes, labels[order]


def user_sequences(
    df: pd.DataFrame,
    min_item_count: int = 1,
    max_length: int | None = None,
    known_items: np.ndarray | None = None,
) -> Sequences:
    """Every user's items in time order, consecutive repeats collapsed.

    Items with fewer than ``min_item_count`` interactions (rows) are dropped first; so are rows
    without an item. Ties in time keep the frame's row order. ``max_length`` keeps only the most
    recent items of very long sequences. Users left without items are dropped.

    ``known_items`` (an earlier model's vocabulary, for a warm start): these items are kept with
    any count, and the vocabulary is their union with the frame's kept items (sorted, as always);
    a known item absent from the frame has count 0.
    """
    _check_columns(df, ("user_id", "item_id", "event_time"))
    item_codes, item_ids = _factorize_sorted(df["item_id"])
    user_codes, user_ids = _factorize_sorted(df["user_id"])
    present = (item_codes >= 0) & (user_codes >= 0)
    counts = np.bincount(item_codes[present], minlength=len(item_ids))
    kept_items = counts >= max(1, min_item_count)
    new_code = np.cumsum(kept_items) - 1
    if known_items is not None:
        known = {str(item) for item in known_items}
        kept_items |= np.fromiter((item in known for item in item_ids), dtype=bool, count=len(item_ids))
        vocabulary = np.asarray(sorted(known | set(item_ids[kept_items])), dtype=object)
        # Both sorted the same way (str order): each kept item's code in the union vocabulary.
        new_code = np.full(len(item_ids), -1, dtype=np.int64)
        new_code[kept_items] = np.searchsorted(vocabulary, item_ids[kept_items])
        union_counts = np.zeros(len(vocabulary), dtype=np.int64)
        union_counts[new_code[kept_items]] = counts[kept_items]
    rows = present & kept_items[np.maximum(item_codes, 0)]
    times = time_ns(df["event_time"])
    if not rows.all():
        item_codes, user_codes, times = item_codes[rows], user_codes[rows], times[rows]
    item_codes = new_code[item_codes].astype(np.int32)
    if known_items is not None:
        item_ids, counts = vocabulary, union_counts
    else:
        item_ids = item_ids[kept_items]
        counts = counts[kept_items]
    order = np.lexsort((times, user_codes))  # stable: equal times keep their row order
    users = user_codes[order]
    items = item_codes[order]
    keep = np.ones(len(items), dtype=bool)
    keep[1:] = (users[1:] != users[:-1]) | (items[1:] != items[:-1])
    users, items = users[keep], items[keep]
    lengths = np.bincount(users, minlength=len(user_ids)) if len(users) else np.zeros(len(user_ids), int)
    if max_length is not None and len(users) and lengths.max() > max_length:
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        position = np.arange(len(users)) - np.repeat(starts, lengths)
        tail = position >= np.repeat(lengths - max_length, lengths)
        users, items = users[tail], items[tail]
        lengths = np.minimum(lengths, max_length)
    has_items = lengths > 0
    offsets = np.zeros(int(has_items.sum()) + 1, dtype=np.int64)
    np.cumsum(lengths[has_items], out=offsets[1:])
    return Sequences(
        items=item_ids,
        codes=np.ascontiguousarray(items, dtype=np.int32),
        offsets=offsets,
        counts=counts.astype(np.int64),
        users=user_ids[has_items],
    )


def user_item_matrix(sequences: Sequences, max_items_per_user: int | None = None) -> sparse.csr_matrix:
    """The binary user x item matrix (scipy.sparse CSR, float32) of the users' distinct items.

    ``max_items_per_user`` keeps, for very active users, only their most recent distinct items
    (as Mahout caps preferences per user): one heavy user must not dominate co-occurrence counts.
    """
    user = sequences.user_of_token().astype(np.int64)
    codes = sequences.codes.astype(np.int64)
    if max_items_per_user is not None:
        # The position of every token counted from the end of its user's sequence; keep the
        # last occurrence of each (user, item) and then the most recent max_items_per_user of them.
        key = user * sequences.n_items + codes
        rev = np.arange(len(key))[::-1]
        _, last = np.unique(key[rev], return_index=True)
        last = np.sort(rev[last])
        user, codes = user[last], codes[last]
        lengths = np.bincount(user, minlength=sequences.n_users)
        ends = np.cumsum(lengths)
        from_end = np.repeat(ends, lengths) - np.arange(len(user))
        keep = from_end <= max_items_per_user
        user, codes = user[keep], codes[keep]
    data = np.ones(len(user), dtype=np.float32)
    matrix = sparse.csr_matrix((data, (user, codes)), shape=(sequences.n_users, sequences.n_items))
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    return matrix


def time_split(df: pd.DataFrame, test_days: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, test): the test set is every interaction at or after ``max(event_time) - test_days``."""
    if test_days <= 0:
        raise ValueError(f"test_days must be positive, got {test_days}")
    _check_columns(df, ("event_time",))
    times = time_ns(df["event_time"])
    if len(times) == 0:
        return df.iloc[:0], df.iloc[:0]
    cutoff = times.max() - int(round(test_days * 86_400 * 1e9))
    test = times >= cutoff
    return df[~test], df[test]


def to_csv_text(df: pd.DataFrame) -> str:
    """The CSV text of an interaction frame in the training format (ISO-8601 UTC times; for tests)."""
    out = df[list(INTERACTION_COLUMNS)].copy()
    times = pd.to_datetime(out["event_time"], utc=True)
    out["event_time"] = times.dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    buffer = io.StringIO()
    out.to_csv(buffer, index=False)
    return buffer.getvalue()
