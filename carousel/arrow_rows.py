"""Arrow record batches as Python rows, built column by column: what ``to_pylist()`` returns, faster.

Role: the one reader of the Arrow batches that the Python steps take row by row: a campaign's
ranking and rendering tasks (``mapInArrow``), serve's micro-batches, the online-store rebuild.
``RecordBatch.to_pylist()`` builds nested values one scalar object at a time: a struct becomes a
``StructScalar`` read through ``collections.abc.Mapping`` and every list element a scalar of its
own. For a campaign's render request (a user struct and ten item structs) that was 74 µs a row,
twice the rendering itself. Here each leaf column is converted once (strings and numbers through
numpy, ~10x faster than a scalar object per value) and the rows are zipped from the columns: the
same values, several times faster.

Inputs: a ``pa.RecordBatch`` or ``pa.Table`` (sliced or not, with nulls at any level). Output: a
list of ``dict`` rows equal to ``to_pylist()``'s. Types other than structs and lists (maps,
dictionaries, timestamps, ...) are converted by Arrow's own ``to_pylist()``, so they stay the same.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

_LIST_TYPES = (pa.ListArray, pa.LargeListArray)
_FLOATS = (pa.float32(), pa.float64())


def column_values(array: pa.Array | pa.ChunkedArray) -> list[Any]:
    """``array.to_pylist()``, with structs and lists built from their children's columns."""
    if isinstance(array, pa.ChunkedArray):
        return [value for chunk in array.chunks for value in column_values(chunk)]
    if len(array) == 0:
        # Not a buffer read: an empty list array from Spark may come without its offsets buffer
        # (Arrow allows it), and pyarrow's offsets or flatten() of one read past the end.
        return []
    if isinstance(array, pa.StructArray):
        names = [field.name for field in array.type]
        if len(set(names)) != len(names):
            return array.to_pylist()  # which raises, naming the repeated fields
        if not names:
            return _with_nulls(array, [{} for _ in range(len(array))])
        # field(i) is the child sliced to this array's offset and length (not its validity).
        children = [column_values(array.field(i)) for i in range(len(names))]
        return _with_nulls(
            array, [dict(zip(names, values, strict=True)) for values in zip(*children, strict=True)]
        )
    if isinstance(array, _LIST_TYPES) and not isinstance(array, pa.MapArray):  # a map reads as (key, value)s
        # flatten(), not .values and the offsets: it minds this array's slice and leaves out what
        # a null list's offsets may still span (Spark's Arrow writer does not promise empty ones).
        values = column_values(array.flatten())
        lists, start = [], 0
        for length in array.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).tolist():
            lists.append(values[start : start + length])
            start += length
        return _with_nulls(array, lists)
    return _leaf_values(array)


def _leaf_values(array: pa.Array) -> list[Any]:
    # Array.to_pylist() makes a scalar object per value (~0.5 µs a string); through numpy it is
    # ~50 ns. Only where numpy's values read back the same: strings, and numbers and booleans
    # with their nulls put back (numpy has none for them).
    kind = array.type
    if pa.types.is_null(kind):
        return [None] * len(array)
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return array.to_numpy(zero_copy_only=False).tolist()
    if pa.types.is_integer(kind) or pa.types.is_boolean(kind) or kind in _FLOATS:
        if array.null_count == 0:
            return array.to_numpy(zero_copy_only=False).tolist()
        filled = array.fill_null(pa.scalar(False if pa.types.is_boolean(kind) else 0, kind))
        return _with_nulls(array, filled.to_numpy(zero_copy_only=False).tolist())
    return array.to_pylist()


def _with_nulls(array: pa.Array, values: list[Any]) -> list[Any]:
    if array.null_count == 0:
        return values
    valid = array.is_valid().to_numpy(zero_copy_only=False).tolist()
    return [value if ok else None for value, ok in zip(values, valid, strict=True)]


def batch_rows(batch: pa.RecordBatch | pa.Table) -> list[dict[str, Any]]:
    """``batch.to_pylist()``: one dict per row, column names as keys."""
    names = batch.schema.names
    if not names:
        return [{} for _ in range(batch.num_rows)]
    columns = [column_values(batch.column(i)) for i in range(len(names))]
    return [dict(zip(names, values, strict=True)) for values in zip(*columns, strict=True)]
