"""batch_rows / column_values read Arrow batches exactly as ``to_pylist()`` does, whatever the nesting."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carousel.arrow_rows import batch_rows, column_values

_LEAVES = [
    pa.string(),
    pa.large_string(),
    pa.int64(),
    pa.int32(),
    pa.uint8(),
    pa.float64(),
    pa.float32(),
    pa.bool_(),
    pa.timestamp("us", tz="UTC"),
    pa.timestamp("us"),
    pa.null(),
    pa.map_(pa.string(), pa.int64()),
    pa.list_(pa.string(), 2),  # fixed size
]


def _types() -> st.SearchStrategy[pa.DataType]:
    def nest(children: st.SearchStrategy[pa.DataType]) -> st.SearchStrategy[pa.DataType]:
        fields = st.lists(children, min_size=0, max_size=3).map(
            lambda kinds: pa.struct([pa.field(f"f{n}", kind) for n, kind in enumerate(kinds)])
        )
        return st.one_of(children.map(pa.list_), children.map(pa.large_list), fields)

    return st.recursive(st.sampled_from(_LEAVES), nest, max_leaves=6)


def _values(kind: pa.DataType) -> st.SearchStrategy[Any]:
    """Python values of ``kind``, nulls included at every level."""
    if pa.types.is_null(kind):
        return st.none()
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        value: st.SearchStrategy[Any] = st.text(max_size=8)
    elif pa.types.is_uint8(kind):
        value = st.integers(0, 255)
    elif pa.types.is_int32(kind):
        value = st.integers(-(2**31), 2**31 - 1)
    elif pa.types.is_integer(kind):
        value = st.integers(-(2**63), 2**63 - 1)
    elif pa.types.is_floating(kind):
        value = st.floats(allow_nan=False, width=32 if kind == pa.float32() else 64)
    elif pa.types.is_boolean(kind):
        value = st.booleans()
    elif pa.types.is_timestamp(kind):
        value = st.datetimes(datetime(1970, 1, 1), datetime(2100, 1, 1))
        if kind.tz:
            value = value.map(lambda moment: moment.replace(tzinfo=UTC))
    elif pa.types.is_map(kind):
        value = st.lists(st.tuples(st.text(max_size=4), _values(kind.item_type)), max_size=3)
    elif pa.types.is_fixed_size_list(kind):
        value = st.lists(_values(kind.value_type), min_size=kind.list_size, max_size=kind.list_size)
    elif pa.types.is_struct(kind):
        value = st.fixed_dictionaries({field.name: _values(field.type) for field in kind})
    else:  # list, large list
        value = st.lists(_values(kind.value_type), max_size=4)
    return st.none() | value


@st.composite
def _batches(draw: st.DrawFn) -> pa.RecordBatch:
    kinds = draw(st.lists(_types(), min_size=1, max_size=4))
    schema = pa.schema([pa.field(f"c{n}", kind) for n, kind in enumerate(kinds)])
    rows = draw(st.lists(st.fixed_dictionaries({f.name: _values(f.type) for f in schema}), max_size=12))
    batch = pa.RecordBatch.from_pylist(rows, schema=schema)
    start = draw(st.integers(0, len(rows)))
    return batch.slice(start, draw(st.integers(0, len(rows) - start)))  # slices keep offsets


@settings(max_examples=400, deadline=None)
@given(_batches())
def test_rows_equal_to_pylist_for_any_nesting_nulls_and_slice(batch: pa.RecordBatch) -> None:
    assert batch_rows(batch) == batch.to_pylist()
    assert (
        batch_rows(pa.Table.from_batches([batch, batch])) == pa.Table.from_batches([batch, batch]).to_pylist()
    )


def test_a_render_request_reads_the_same() -> None:
    items = pa.list_(
        pa.struct(
            [
                ("item_id", pa.string()),
                ("rank", pa.int32()),
                ("score", pa.float64()),
                ("strategy", pa.string()),
            ]
        )
    )
    schema = pa.schema([("user_id", pa.string()), ("created_at", pa.int64()), ("items", items)])
    rows = [
        {
            "user_id": "u-1",
            "created_at": 5,
            "items": [{"item_id": "a", "rank": 1, "score": 0.5, "strategy": "model"}],
        },
        {"user_id": None, "created_at": None, "items": None},
        {
            "user_id": "u-3",
            "created_at": 7,
            "items": [None, {"item_id": None, "rank": 2, "score": None, "strategy": "x"}],
        },
    ]
    batch = pa.RecordBatch.from_pylist(rows, schema=schema)
    assert batch_rows(batch) == rows
    assert column_values(batch.column("items").slice(2)) == [rows[2]["items"]]
    assert batch_rows(pa.RecordBatch.from_pylist([], schema=schema)) == []


def test_null_lists_whose_offsets_still_span_values_read_as_none() -> None:
    # Arrow lets a null list's offsets span values (writers other than pyarrow's do this); they
    # are not the list's, and the next list starts where its offsets say.
    values = pa.array([{"item_id": "a"}, {"item_id": "b"}, {"item_id": "c"}, {"item_id": "d"}])
    lists = pa.ListArray.from_arrays(
        pa.array([0, 2, 3, 4], pa.int32()), values, mask=pa.array([False, True, False])
    )
    outer = pa.ListArray.from_arrays(pa.array([0, 1, 3], pa.int32()), lists)
    expected = [[[{"item_id": "a"}, {"item_id": "b"}]], [None, [{"item_id": "d"}]]]
    assert outer.to_pylist() == expected
    assert column_values(outer) == expected
    assert column_values(outer.slice(1)) == expected[1:]
    assert column_values(lists.slice(1)) == [None, [{"item_id": "d"}]]


def test_empty_lists_without_an_offsets_buffer_are_not_read() -> None:
    # What Spark sends for a batch whose rows all have empty lists: the values' nested list
    # array has length 0 and no offsets buffer (pyarrow's own reads of it crash).
    nested = pa.list_(pa.string())
    bare = pa.Array.from_buffers(nested, 0, [None, None], children=[pa.array([], pa.string())])
    values = pa.StructArray.from_arrays([bare], names=["tags"])
    outer = pa.ListArray.from_arrays(pa.array([0, 0, 0], pa.int32()), values)
    assert column_values(outer) == [[], []]


def test_a_struct_with_a_repeated_field_name_is_refused_as_by_to_pylist() -> None:
    repeated = pa.StructArray.from_arrays([pa.array([1]), pa.array([2])], names=["a", "a"])
    with pytest.raises(ValueError, match="duplicate field names"):
        column_values(repeated)
