"""Tests of the public data set fetcher (``jobs/public_dataset.py``): parsing, conversion, checksum.

No network: the archive is a small wheel-like zip built here, so the pinned-checksum gate, the
member extraction and the conversion run on real files; the CSV written is read back with the
evaluation's own reader (:func:`models.interactions.read_interactions`).
"""

from __future__ import annotations

import dataclasses
import zipfile

import pandas as pd
import pytest

from carousel.schemas import INTERACTION_COLUMNS, PRODUCT_VIEWED
from jobs.public_dataset import (
    DATASETS,
    DatasetError,
    download_archive,
    parse_atomic_inter,
    read_member,
    sha256_of,
    to_interactions,
    verify_checksum,
)
from models.interactions import read_interactions

HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
# Two users; user 7 rates 10 and 11 in the same second (source order 11, 10 must be kept).
INTER = HEADER + "7\t11\t4\t881250950\n5\t3\t2\t881250949\n7\t10\t5\t881250950\n5\t3\t2\t881250949\n"


def test_parse_atomic_inter_keeps_ids_and_seconds():
    rows = parse_atomic_inter(INTER)
    assert rows["user"].tolist() == ["7", "5", "7", "5"]
    assert rows["item"].tolist() == ["11", "3", "10", "3"]
    assert rows["timestamp"].tolist() == [881250950, 881250949, 881250950, 881250949]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("user_id:token\titem_id:token\trating:float\n1\t2\t3\n", "lacks ['timestamp:float']"),
        (HEADER + "1\t2\t3\t881250949\n1\t\t3\t881250950\n", "line 3: missing item_id:token"),
        (HEADER + "1\t2\t3\t881250949\n1\t4\t3\tsoon\n", "line 3: timestamp:float 'soon' is not a whole"),
        (HEADER + "1\t2\t3\t881250949.5\n", "line 2: timestamp:float '881250949.5'"),
        ("", "empty file"),
    ],
)
def test_parse_atomic_inter_names_line_and_reason(text, message):
    with pytest.raises(DatasetError, match="demo.inter") as err:
        parse_atomic_inter(text, "demo.inter")
    assert message in str(err.value)


def test_to_interactions_orders_by_time_keeps_ties_in_source_order_and_drops_duplicates():
    frame, skipped = to_interactions(parse_atomic_inter(INTER), PRODUCT_VIEWED, "u", "m")
    expected = pd.DataFrame(
        {
            "user_id": ["u5", "u7", "u7"],
            "item_id": ["m3", "m11", "m10"],
            "event_type": [PRODUCT_VIEWED] * 3,
            "event_time": ["1997-12-04T15:55:49Z", "1997-12-04T15:55:50Z", "1997-12-04T15:55:50Z"],
        }
    )
    pd.testing.assert_frame_equal(frame, expected)
    assert skipped == 1


def _wheel(tmp_path, member, text):
    path = tmp_path / "demo-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as bundle:
        bundle.writestr(member, text)
    return path


def test_cached_archive_with_the_pinned_checksum_is_used_and_converts_to_a_valid_training_csv(tmp_path):
    member = "demo/data/demo.inter"
    wheel = _wheel(tmp_path, member, INTER)
    spec = dataclasses.replace(
        DATASETS["ml-100k"], archive=wheel.name, sha256=sha256_of(wheel), member=member
    )
    # Already in the cache with the right checksum: no download is attempted.
    assert download_archive(spec, tmp_path) == wheel
    frame, _ = to_interactions(parse_atomic_inter(read_member(wheel, member)), spec.event_type, "u", "m")
    out = tmp_path / "demo.csv"
    frame.to_csv(out, index=False)
    back = read_interactions(str(out))
    assert list(back.columns) == list(INTERACTION_COLUMNS)
    assert back["item_id"].astype(str).tolist() == ["m3", "m11", "m10"]
    assert str(back["event_time"].dt.tz) == "UTC"


def test_checksum_mismatch_is_refused(tmp_path):
    wheel = _wheel(tmp_path, "x.inter", INTER)
    with pytest.raises(DatasetError, match="does not match the pinned"):
        verify_checksum(wheel, "0" * 64)


def test_missing_member_is_named(tmp_path):
    wheel = _wheel(tmp_path, "x.inter", INTER)
    with pytest.raises(DatasetError, match="has no member 'y.inter'"):
        read_member(wheel, "y.inter")


def test_pinned_dataset_is_the_recbole_wheel():
    spec = DATASETS["ml-100k"]
    assert (spec.package, spec.version) == ("recbole", "1.2.1")
    assert len(spec.sha256) == 64 and spec.archive.startswith("recbole-1.2.1-")
