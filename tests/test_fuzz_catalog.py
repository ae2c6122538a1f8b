"""Property-based fuzzing of the catalog loader (``jobs.upload_catalog.run``), file to table.

Hypothesis writes CSV catalogs as marketers' exports get them wrong: ids missing, blank or repeated;
prices and ratings that are not numbers, not finite or out of range; stock words nobody agreed
on; currencies that are not codes; image URLs that are not http(s); deep links without a scheme
or with one serving does not allow; titles and property values over their limits; text with
commas, quotes and non-ASCII characters. Every cell is drawn from a pool whose verdict is written
next to it, so the oracle here knows, independently of the loader, which reasons each row must
get. Each file is uploaded into its own catalog table:

- a file with any bad row is rejected whole (the table keeps its version) and its report lists
  exactly the bad rows, each with exactly the reasons the oracle gives;
- a clean file becomes the catalog: one row per product, typed as the oracle types it.
"""

from __future__ import annotations

import csv
import glob
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from carousel.config import load_config
from carousel.schemas import CATALOG_TABLE
from carousel.storage import table_exists
from jobs import upload_catalog
from jobs.upload_catalog import CatalogRejectedError

pytestmark = pytest.mark.integration

# column -> [(text, kind of reason or None when fine, typed value)]
OK = None
LONG_TITLE = "t" * 201  # catalog.max_text_chars.title is 200
LONG_BRAND = "b" * 1001  # catalog.max_property_chars is 1000
CELLS: dict[str, list[tuple[str, str | None, Any]]] = {
    "title": [
        ("Running shoe", OK, "Running shoe"),
        ('Shoe, "red", size 42', OK, 'Shoe, "red", size 42'),
        ("Sapato côr-de-rosa ✓", OK, "Sapato côr-de-rosa ✓"),
        ("   ", OK, None),
        (LONG_TITLE, "title is 201 characters", LONG_TITLE),
    ],
    "price": [
        ("12", OK, 12.0),
        ("0", OK, 0.0),
        (" 7.50 ", OK, 7.5),
        ("", OK, None),
        ("-3", "price '-3' is out of range", None),
        ("abc", "price 'abc' is not a number", None),
        ("1,5", "price '1,5' is not a number", None),
        ("NaN", "price 'NaN' is not a finite number", None),
        ("1e400", "price '1e400' is not a finite number", None),
    ],
    "rating": [
        ("4.5", OK, 4.5),
        ("5", OK, 5.0),
        ("", OK, None),
        ("6", "rating '6' is out of range", None),
        ("-1", "rating '-1' is out of range", None),
        ("good", "rating 'good' is not a number", None),
    ],
    "in_stock": [
        ("true", OK, True),
        ("Yes", OK, True),
        ("0", OK, False),
        ("n", OK, False),
        ("", OK, None),
        ("maybe", "in_stock 'maybe' is not true or false", None),
    ],
    "currency": [
        ("EUR", OK, "EUR"),
        ("usd", OK, "USD"),
        ("", OK, None),
        ("EURO", "currency 'EURO' is not a 3-letter code", None),
        ("€", "currency '€' is not a 3-letter code", None),
    ],
    "image_url": [
        ("https://img.example.com/a.png", OK, "https://img.example.com/a.png"),
        ("", OK, None),
        (
            "ftp://img.example.com/a.png",
            "image_url 'ftp://img.example.com/a.png' is not an http(s) URL",
            None,
        ),
        ("a picture", "image_url 'a picture' is not an http(s) URL", None),
    ],
    "deep_link": [
        ("carousel://product/1", OK, "carousel://product/1"),
        ("https://shop.example.com/p/1", OK, "https://shop.example.com/p/1"),
        ("", OK, None),
        ("javascript:alert(1)", "deep_link 'javascript:alert(1)' uses scheme 'javascript'", None),
        ("product 1", "deep_link 'product 1' is not a URI", None),
    ],
    "brand": [
        ("acme", OK, "acme"),
        ("", OK, None),
        (LONG_BRAND, "property 'brand' is 1001 characters", LONG_BRAND),
    ],
}
COLUMNS = ("item_id", *CELLS)
IDS = [f"p-{n}" for n in range(60)]


def _good(column: str) -> st.SearchStrategy[tuple[str, str | None, Any]]:
    return st.sampled_from([cell for cell in CELLS[column] if cell[1] is OK])


def _any(column: str) -> st.SearchStrategy[tuple[str, str | None, Any]]:
    good, bad = _good(column), st.sampled_from([cell for cell in CELLS[column] if cell[1] is not OK])
    return st.one_of(good, good, good, bad)


def _rows(clean: bool) -> st.SearchStrategy[list[dict[str, tuple[str, str | None, Any]]]]:
    cells = _good if clean else _any
    good_ids = st.sampled_from([(i, OK, i) for i in IDS])
    no_ids = st.sampled_from([("", "missing item_id", None), (" ", "missing item_id", None)])
    ids = good_ids if clean else st.one_of(good_ids, good_ids, good_ids, no_ids)
    row = st.fixed_dictionaries({"item_id": ids, **{column: cells(column) for column in CELLS}})
    if clean:
        return st.lists(row, min_size=1, max_size=40, unique_by=lambda r: r["item_id"][0])
    return st.lists(row, min_size=1, max_size=120)


files = st.booleans().flatmap(lambda clean: st.tuples(st.just(clean), _rows(clean)))


def expected_reasons(rows: list[dict[str, tuple[str, str | None, Any]]]) -> dict[int, set[str]]:
    """The oracle: row number as the loader counts it (the header is row 1) -> its reason kinds."""
    counts: dict[str, int] = {}
    for row in rows:
        if row["item_id"][2] is not None:
            counts[row["item_id"][2]] = counts.get(row["item_id"][2], 0) + 1
    expected = {}
    for number, row in enumerate(rows, start=2):
        kinds = {cell[1] for cell in row.values() if cell[1] is not OK}
        if counts.get(row["item_id"][2], 0) > 1:
            kinds.add(f"duplicate item_id '{row['item_id'][2]}'")
        if kinds:
            expected[number] = kinds
    return expected


def _kinds(reasons: list[str], wanted: set[str]) -> set[str]:
    """Each reason as the oracle's kind: the one ``wanted`` kind it starts with, else itself."""
    return {next((kind for kind in wanted if reason.startswith(kind)), reason) for reason in reasons}


def _write(path: Path, rows: list[dict[str, tuple[str, str | None, Any]]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(COLUMNS)
        for row in rows:
            writer.writerow([row[column][0] for column in COLUMNS])


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-catalog")


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(files)
def test_every_catalog_file_is_loaded_whole_or_rejected_with_each_rows_reasons(spark, folder, file) -> None:
    clean, rows = file
    root = folder / uuid.uuid4().hex[:10]
    root.mkdir()
    cfg = load_config(overrides=[f"storage.root={root}/data"], environ={})
    path = root / "catalog.csv"
    _write(path, rows)
    expected = expected_reasons(rows)
    assert not clean or not expected  # the generator's clean files are clean by the oracle too
    location = cfg.storage.table(CATALOG_TABLE)
    try:
        upload_catalog.run(spark, cfg, str(path))
    except CatalogRejectedError as refused:
        event("rejected")
        assert expected, f"a clean file was rejected: {refused}"
        assert refused.rejected_rows == len(expected)
        assert not table_exists(spark, location)  # nothing written
        parts = sorted(glob.glob(f"{refused.report_location}/part-*.json"))
        report = [json.loads(line) for part in parts for line in Path(part).read_text().splitlines()]
        got = {r["row"]: _kinds(r["reasons"], expected.get(r["row"], set())) for r in report}
        assert got == expected
        return
    event("loaded")
    assert not expected, f"bad rows were loaded: {expected}"
    table = {r["item_id"]: r for r in spark.read.format("delta").load(location).collect()}
    assert set(table) == {row["item_id"][2] for row in rows}
    for row in rows:
        product = table[row["item_id"][2]]
        for column in ("title", "price", "rating", "in_stock", "currency", "image_url", "deep_link"):
            assert product[column] == row[column][2], (column, product[column], row[column])
        assert (product["properties"] or {}).get("brand") == row["brand"][2]
        assert product["active"] is True
