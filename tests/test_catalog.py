"""The product catalog upload: real files (CSV, JSON Lines, Parquet), real Delta, real GE suite."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

import pytest
from delta.tables import DeltaTable
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.types import StructType
from pyspark.testing import assertDataFrameEqual

from carousel import cli
from carousel.config import CarouselConfig, ConfigError, load_config
from carousel.schemas import CATALOG_SCHEMA, CATALOG_TABLE
from jobs import simulate_events as sim
from jobs import upload_catalog as uc

# Everything but the columns that name the upload that wrote a row.
CONTENT_COLUMNS = [f.name for f in CATALOG_SCHEMA.fields if f.name not in ("upload_id", "updated_at")]
CONTENT_SCHEMA = StructType([CATALOG_SCHEMA[c] for c in CONTENT_COLUMNS])

CATALOG_V1 = """\
Product ID,title,description,category,price,currency,rating,in_stock,image_url,deep_link,Brand,colour
p1,Red Shoe,"Light, fast",shoes,19.90,eur,4.5,yes,https://img.example/p1.jpg,carousel://item/p1,Acme,red
p2,Blue Hat,,hats,5,EUR,3,false,http://img.example/p2.png,https://shop.example/p/p2,Acme,
p3,Green Bag,Roomy,bags,0,USD,,TRUE,,,Bagco,green
"""


def product(item_id: str, active: bool = True, **values: Any) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(CONTENT_COLUMNS)
    row.update({"item_id": item_id, "active": active, "properties": {}, **values})
    return row


P1 = product(
    "p1",
    title="Red Shoe",
    description="Light, fast",
    category="shoes",
    in_stock=True,
    price=19.9,
    currency="EUR",
    rating=4.5,
    image_url="https://img.example/p1.jpg",
    deep_link="carousel://item/p1",
    properties={"brand": "Acme", "colour": "red"},
)
P2 = product(
    "p2",
    title="Blue Hat",
    category="hats",
    in_stock=False,
    price=5.0,
    currency="EUR",
    rating=3.0,
    image_url="http://img.example/p2.png",
    deep_link="https://shop.example/p/p2",
    properties={"brand": "Acme"},
)
P3 = product(
    "p3",
    title="Green Bag",
    description="Roomy",
    category="bags",
    in_stock=True,
    price=0.0,
    currency="USD",
    properties={"brand": "Bagco", "colour": "green"},
)


@pytest.fixture
def cfg(tmp_path: Path) -> CarouselConfig:
    return load_config(overrides=[f"storage.root={tmp_path}/data"])


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def table(spark: SparkSession, cfg: CarouselConfig) -> DataFrame:
    return spark.read.format("delta").load(cfg.storage.table(CATALOG_TABLE))


def content(spark: SparkSession, cfg: CarouselConfig) -> DataFrame:
    return table(spark, cfg).select(*CONTENT_COLUMNS)


def expected(spark: SparkSession, *rows: dict[str, Any]) -> DataFrame:
    return spark.createDataFrame([tuple(r[c] for c in CONTENT_COLUMNS) for r in rows], CONTENT_SCHEMA)


def version(spark: SparkSession, cfg: CarouselConfig) -> int:
    return DeltaTable.forPath(spark, cfg.storage.table(CATALOG_TABLE)).history(1).first()["version"]


# ---------------------------------------------------------------------------------------------
# Pure pieces
# ---------------------------------------------------------------------------------------------
def test_plan_columns_maps_aliases_and_properties():
    plan = uc.plan_columns(["\ufeffProduct ID", "Name", "Availability", "Image Link", "Brand Name", "price"])
    assert plan.problems == ()
    assert dict(plan.columns) == {"item_id": 0, "title": 1, "in_stock": 2, "image_url": 3, "price": 5}
    assert dict(plan.properties) == {"brand_name": 4}
    assert plan.in_stock_header == "availability"

    clash = uc.plan_columns(["id", "product_id", "Colour", "colour ", "price"])
    assert clash.problems == (
        "columns 'id' and 'product_id' both give item_id",
        "columns 'Colour' and 'colour ' both give property 'colour'",
    )
    assert uc.plan_columns(["sku", "price"]).problems == ("no product id column (item_id, product_id or id)",)


def test_detect_format():
    assert uc.detect_format("s3a://b/catalog.CSV.gz") == "csv"
    assert uc.detect_format("/x/feed.ndjson") == "jsonl"
    assert uc.detect_format("/x/export.parquet") == "parquet"
    assert uc.detect_format("/x/folder", "parquet") == "parquet"
    with pytest.raises(ValueError, match="--format"):
        uc.detect_format("/x/catalog.txt")


def test_read_active_catalog_before_any_upload(spark, cfg):
    active = uc.read_active_catalog(spark, cfg)
    assert active.schema == CATALOG_SCHEMA and active.count() == 0


# ---------------------------------------------------------------------------------------------
# Full uploads
# ---------------------------------------------------------------------------------------------
def test_csv_upload_reupload_is_idempotent_and_missing_products_are_deactivated(spark, cfg, tmp_path):
    first = uc.run(spark, cfg, write(tmp_path, "v1.csv", CATALOG_V1))
    assert (first.rows_read, first.inserted, first.updated, first.deactivated) == (3, 3, 0, 0)
    assertDataFrameEqual(content(spark, cfg), expected(spark, P1, P2, P3))
    # Every upload keeps its GE report next to the data.
    report = json.loads(Path(first.report_location).read_text())
    assert report["success"] is True

    before = table(spark, cfg)
    before_rows = before.collect()
    again = uc.run(spark, cfg, write(tmp_path, "v1-again.csv", CATALOG_V1))
    assert (again.inserted, again.updated, again.deactivated) == (0, 0, 0)
    assertDataFrameEqual(table(spark, cfg), before_rows)  # upload_id and updated_at included

    # p1 gets a new price, p3 is gone, p4 is new.
    v2 = "\n".join(
        [
            "item_id,title,description,category,price,currency,rating,in_stock,image_url,deep_link,brand,colour",
            'p1,Red Shoe,"Light, fast",shoes,17.50,EUR,4.5,yes,https://img.example/p1.jpg,carousel://item/p1,Acme,red',
            "p2,Blue Hat,,hats,5,EUR,3,false,http://img.example/p2.png,https://shop.example/p/p2,Acme,",
            "p4,Scarf,,hats,9.99,EUR,5,yes,,,,",
        ]
    )
    second = uc.run(spark, cfg, write(tmp_path, "v2.csv", v2 + "\n"))
    assert (second.inserted, second.updated, second.deactivated) == (1, 1, 1)
    p4 = product("p4", title="Scarf", category="hats", price=9.99, currency="EUR", rating=5.0, in_stock=True)
    assertDataFrameEqual(
        content(spark, cfg), expected(spark, {**P1, "price": 17.5}, P2, {**P3, "active": False}, p4)
    )
    ids = {r.item_id: r.upload_id for r in table(spark, cfg).collect()}
    assert ids == {
        "p1": second.upload_id,
        "p2": first.upload_id,
        "p3": second.upload_id,
        "p4": second.upload_id,
    }
    assert sorted(r.item_id for r in uc.read_active_catalog(spark, cfg).collect()) == ["p1", "p2", "p4"]

    # A truncated export (only p1) would deactivate 2 of the 3 active products: refused, unchanged.
    truncated = write(tmp_path, "v3.csv", "\n".join(v2.splitlines()[:2]) + "\n")
    before_rows = table(spark, cfg).collect()
    with pytest.raises(uc.CatalogRejectedError, match=r"deactivate 2 of 3 active products \(67%"):
        uc.run(spark, cfg, truncated)
    assertDataFrameEqual(table(spark, cfg), before_rows)
    delisting = uc.run(spark, cfg, truncated, allow_mass_deactivation=True)
    assert (delisting.updated, delisting.deactivated) == (0, 2)
    assert [r.item_id for r in uc.read_active_catalog(spark, cfg).collect()] == ["p1"]


def test_jsonl_and_parquet_uploads_with_header_aliases(spark, tmp_path):
    jsonl = "\n".join(
        json.dumps(record)
        for record in [
            {"id": "p1", "name": "Red Shoe", "price": 19.9, "availability": "In Stock", "tags": ["a", "b"]},
            {"id": "p2", "name": "Blue Hat", "price": "5", "availability": "preorder", "rating": 3},
        ]
    )
    # A blank line is skipped (and still counted in the line numbers).
    jsonl_cfg = load_config(overrides=[f"storage.root={tmp_path}/jsonl"])
    result = uc.run(spark, jsonl_cfg, write(tmp_path, "catalog.jsonl", jsonl + "\n\n"))
    assert (result.rows_read, result.inserted) == (2, 2)
    assertDataFrameEqual(
        content(spark, jsonl_cfg),
        expected(
            spark,
            product("p1", title="Red Shoe", price=19.9, in_stock=True, properties={"tags": '["a","b"]'}),
            product("p2", title="Blue Hat", price=5.0, in_stock=False, rating=3.0),
        ),
    )

    parquet_cfg = load_config(overrides=[f"storage.root={tmp_path}/parquet"])
    source = spark.createDataFrame(
        [("p1", 19.9, False, 4, "Acme"), ("p2", 5.0, True, None, None)],
        "product_id string, price double, out_of_stock boolean, stars int, brand string",
    )
    source.coalesce(1).write.parquet(str(tmp_path / "catalog.parquet"))
    result = uc.run(spark, parquet_cfg, str(tmp_path / "catalog.parquet"))
    assert (result.rows_read, result.inserted) == (2, 2)
    assertDataFrameEqual(
        content(spark, parquet_cfg),
        expected(
            spark,
            product("p1", price=19.9, in_stock=True, properties={"stars": "4", "brand": "Acme"}),
            product("p2", price=5.0, in_stock=False),
        ),
    )


# ---------------------------------------------------------------------------------------------
# Partial uploads
# ---------------------------------------------------------------------------------------------
def test_partial_price_feed_changes_only_price(spark, cfg, tmp_path):
    first = uc.run(spark, cfg, write(tmp_path, "v1.csv", CATALOG_V1))
    feed = uc.run(spark, cfg, write(tmp_path, "prices.csv", "item_id,price\np1,15\np3,0\n"), partial=True)
    # p3's price is already 0: only p1 is rewritten.
    assert (feed.inserted, feed.updated, feed.deactivated) == (0, 1, 0)
    assertDataFrameEqual(content(spark, cfg), expected(spark, {**P1, "price": 15.0}, P2, P3))
    ids = {r.item_id: r.upload_id for r in table(spark, cfg).collect()}
    assert ids == {"p1": feed.upload_id, "p2": first.upload_id, "p3": first.upload_id}

    # A property feed replaces only its keys; other properties stay.
    uc.run(
        spark, cfg, write(tmp_path, "colours.jsonl", '{"item_id": "p2", "colour": "navy"}\n'), partial=True
    )
    row = table(spark, cfg).where("item_id = 'p2'").first()
    assert row.properties == {"brand": "Acme", "colour": "navy"} and row.title == "Blue Hat"

    # An id not in the catalog rejects the whole feed.
    before = table(spark, cfg).collect()
    unknown = write(tmp_path, "unknown.csv", "item_id,price\np1,1\np9,2\n")
    with pytest.raises(uc.CatalogRejectedError) as caught:
        uc.run(spark, cfg, unknown, partial=True)
    assert "row 3 (item_id 'p9'): unknown item_id 'p9' (a partial upload only updates products" in str(
        caught.value
    )
    assertDataFrameEqual(table(spark, cfg), before)


# ---------------------------------------------------------------------------------------------
# Rejection
# ---------------------------------------------------------------------------------------------
def test_bad_file_is_rejected_whole_and_the_previous_catalog_stays_live(spark, cfg, tmp_path):
    uc.run(spark, cfg, write(tmp_path, "v1.csv", CATALOG_V1))
    live_version = version(spark, cfg)
    before = table(spark, cfg).collect()

    bad = "\n".join(
        [
            "item_id,title,price,rating,image_url,deep_link",
            "p1,Fine,1,4,https://img.example/1.jpg,carousel://item/1",  # row 2: fine
            "p2,Dup A,1,4,,",  # row 3
            "p2,Dup B,1,4,,",  # row 4
            "p5,Negative,-3,4,,",  # row 5
            "p6,Seven,1,7,,",  # row 6
            "p7,Bad URL,1,4,ftp://img.example/7.jpg,not a link",  # row 7
            "p8,Not a price,abc,4,,",  # row 8
            "p9,Too,many,fields,,,",  # row 9
            ",No id,1,4,,",  # row 10
        ]
    )
    with pytest.raises(uc.CatalogRejectedError) as caught:
        uc.run(spark, cfg, write(tmp_path, "bad.csv", bad + "\n"))
    err = caught.value
    message = str(err)
    assert err.rejected_rows == 8
    for line in [
        "8 of 9 rows rejected",
        "row 3 (item_id 'p2'): duplicate item_id 'p2' (rows 3, 4)",
        "row 4 (item_id 'p2'): duplicate item_id 'p2' (rows 3, 4)",
        "row 5 (item_id 'p5'): price '-3' is out of range (price must be >= 0)",
        "row 6 (item_id 'p6'): rating '7' is out of range (rating must be between 0 and 5)",
        "row 7 (item_id 'p7'): image_url 'ftp://img.example/7.jpg' is not an http(s) URL; "
        "deep_link 'not a link' is not a URI with a scheme",
        "row 8 (item_id 'p8'): price 'abc' is not a number",
        "row 9 (item_id 'p9'): malformed CSV record (expected 6 fields)",
        "row 10 (no item_id): missing item_id",
        # GE's view of the same file.
        "data quality check 'catalog' failed",
        "expect_column_values_to_be_unique on column 'item_id'",
        "expect_column_values_to_be_null on column 'unconverted'",
    ]:
        assert line in message, f"{line!r} not in:\n{message}"
    assert "row 2 " not in message

    # The full list is in the report, one JSON object per rejected row.
    report = [json.loads(line) for p in sorted(Path(err.report_location).glob("part-*")) for line in p.open()]
    assert [(r["row"], r["item_id"]) for r in report] == [
        (3, "p2"),
        (4, "p2"),
        (5, "p5"),
        (6, "p6"),
        (7, "p7"),
        (8, "p8"),
        (9, "p9"),
        (10, None),
    ]
    assert json.loads(report[5]["record"])["price"] == "abc"

    assert version(spark, cfg) == live_version
    assertDataFrameEqual(table(spark, cfg), before)


def test_deep_links_with_unlisted_schemes_reject_the_file_naming_each_item(spark, cfg, tmp_path):
    uc.run(spark, cfg, write(tmp_path, "v1.csv", CATALOG_V1))
    live_version = version(spark, cfg)
    before = table(spark, cfg).collect()
    links = "\n".join(
        [
            "item_id,title,deep_link",
            "p1,Fine app link,carousel://item/p1",  # row 2: listed
            "p2,Fine web link,HTTPS://shop.example/p/p2",  # row 3: listed (any case)
            "p3,Script,javascript:alert(document.cookie)",  # row 4
            'p4,Inline page,"data:text/html;base64,PHNjcmlwdD4="',  # row 5
            "p5,Local file,file:///etc/passwd",  # row 6
            "p6,Plain http,http://shop.example/p/p6",  # row 7: not listed by default
        ]
    )
    with pytest.raises(uc.CatalogRejectedError) as caught:
        uc.run(spark, cfg, write(tmp_path, "links.csv", links + "\n"))
    message = str(caught.value)
    allowed = "not one of serving.deep_link_schemes (https, carousel)"
    for line in [
        "4 of 6 rows rejected",
        "row 4 (item_id 'p3'): deep_link 'javascript:alert(document.cookie)' uses scheme "
        f"'javascript', {allowed}",
        f"row 5 (item_id 'p4'): deep_link 'data:text/html;base64,PHNjcmlwdD4=' uses scheme 'data', {allowed}",
        f"row 6 (item_id 'p5'): deep_link 'file:///etc/passwd' uses scheme 'file', {allowed}",
        f"row 7 (item_id 'p6'): deep_link 'http://shop.example/p/p6' uses scheme 'http', {allowed}",
    ]:
        assert line in message, f"{line!r} not in:\n{message}"
    assert "row 2 " not in message and "row 3 " not in message
    assert version(spark, cfg) == live_version
    assertDataFrameEqual(table(spark, cfg), before)

    # The list comes from conf/: a listed scheme is accepted; unsafe ones cannot be listed.
    with_http = cfg.with_overrides(serving={"deep_link_schemes": ["https", "carousel", "http"]})
    fine = "item_id,title,deep_link\np1,Red Shoe,carousel://item/p1\np2,Blue Hat,http://shop.example/p/p2\n"
    assert uc.run(spark, with_http, write(tmp_path, "http.csv", fine), partial=True).updated == 1
    links = {r.item_id: r.deep_link for r in table(spark, cfg).collect()}
    assert links["p1"] == "carousel://item/p1" and links["p2"] == "http://shop.example/p/p2"
    for unsafe in ("javascript", "DATA", "file"):
        with pytest.raises(ConfigError, match="serving.deep_link_schemes"):
            load_config(overrides=[f"serving.deep_link_schemes=[https, {unsafe}]"])


def test_a_concurrent_upload_rejects_the_later_one_cleanly(spark, cfg, tmp_path, monkeypatch, caplog):
    uc.run(spark, cfg, write(tmp_path, "v1.csv", CATALOG_V1))
    other = write(tmp_path, "other.csv", CATALOG_V1.replace("19.90", "21.00"))
    mine = write(tmp_path, "mine.csv", CATALOG_V1.replace("19.90", "18.00"))
    # Injected, not timed: while "mine" is being checked, "other" is uploaded and committed.
    real_counts = uc.deactivation_counts
    committed: list[uc.UploadResult] = []
    pending = [other]

    def meanwhile_another_upload(*args: Any) -> tuple[int, int]:
        if pending:
            committed.append(uc.run(spark, cfg, pending.pop()))
        return real_counts(*args)

    monkeypatch.setattr(uc, "deactivation_counts", meanwhile_another_upload)
    with pytest.raises(uc.CatalogRejectedError) as caught:
        uc.run(spark, cfg, mine)
    message = str(caught.value)
    assert "\n" not in message, message
    assert f"(full, {mine}) rejected; the live catalog is unchanged: another write changed" in message
    assert "nothing written; upload the file again" in message
    # The other upload is live, untouched by the refused one.
    assert version(spark, cfg) == committed[0].table_version
    prices = {r.item_id: r.price for r in table(spark, cfg).collect()}
    assert prices["p1"] == 21.0

    # Through the job's entry point: exit status 1 and that one line.
    pending.append(write(tmp_path, "third.csv", CATALOG_V1.replace("19.90", "22.00")))
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        status = cli.run_job("upload-catalog", [mine, "--set", f"storage.root={cfg.storage.root}"])
    assert status == 1
    lines = [r.getMessage() for r in caplog.records if r.name == uc.__name__ and "rejected" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0] and "upload the file again" in lines[0], lines


def test_uploads_committing_at_the_same_time_end_cleanly(spark, cfg, tmp_path, monkeypatch):
    """Both uploads checked, then both MERGEs started together: Delta lets one commit; the other
    (its conflict, e.g. ConcurrentAppendException) is rejected with one line, or, had they not
    overlapped after all, ran after it. Never a raw exception."""
    uc.run(spark, cfg, write(tmp_path, "v1.csv", CATALOG_V1))
    start = version(spark, cfg)
    files = [
        write(tmp_path, f"{n}.csv", CATALOG_V1.replace("19.90", price))
        for n, price in (("a", "11"), ("b", "12"))
    ]
    together = threading.Barrier(2, timeout=300)
    real_merge = uc.merge_catalog

    def merge_together(*args: Any, **kwargs: Any) -> Any:
        together.wait()
        return real_merge(*args, **kwargs)

    monkeypatch.setattr(uc, "merge_catalog", merge_together)
    outcomes: dict[str, Any] = {}

    def upload(path: str) -> None:
        try:
            outcomes[path] = uc.run(spark, cfg, path)
        except Exception as err:  # noqa: BLE001 - the test looks at what it was
            outcomes[path] = err

    threads = [threading.Thread(target=upload, args=(path,)) for path in files]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done = [r for r in outcomes.values() if isinstance(r, uc.UploadResult)]
    refused = [e for e in outcomes.values() if not isinstance(e, uc.UploadResult)]
    for err in refused:
        assert isinstance(err, uc.CatalogRejectedError), repr(err)
        assert "\n" not in str(err) and "at the same time (Concurrent" in str(err), str(err)
        assert "nothing written; upload the file again" in str(err)
    assert done and version(spark, cfg) == start + len(done)


def test_file_level_problems_reject_before_reading_rows(spark, cfg, tmp_path):
    with pytest.raises(uc.CatalogRejectedError, match="no product id column"):
        uc.run(spark, cfg, write(tmp_path, "noid.csv", "sku,price\na,1\n"))
    with pytest.raises(uc.CatalogRejectedError, match="columns 'Price' and 'price' both give price"):
        uc.run(spark, cfg, write(tmp_path, "case.csv", "item_id,Price,price\np1,1,2\n"))
    with pytest.raises(uc.CatalogRejectedError, match="file not found"):
        uc.run(spark, cfg, str(tmp_path / "missing.csv"))
    with pytest.raises(uc.CatalogRejectedError, match="column 'active' is set by the upload job"):
        uc.run(spark, cfg, write(tmp_path, "reserved.csv", "item_id,active\np1,false\n"))
    with pytest.raises(uc.CatalogRejectedError, match="the file holds no products"):
        uc.run(spark, cfg, write(tmp_path, "empty.csv", ""))
    with pytest.raises(uc.CatalogRejectedError, match="needs at least one column besides the product id"):
        uc.run(spark, cfg, write(tmp_path, "ids.csv", "item_id\np1\n"), partial=True)
    assert not DeltaTable.isDeltaTable(spark, cfg.storage.table(CATALOG_TABLE))


# ---------------------------------------------------------------------------------------------
# Length limits
# ---------------------------------------------------------------------------------------------
def jsonl(*records: dict[str, Any]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def test_over_long_values_reject_the_file_with_field_length_and_limit(spark, tmp_path):
    cfg = load_config(
        overrides=[
            f"storage.root={tmp_path}/data",
            "catalog.max_text_chars.title=20",
            "catalog.max_property_chars=12",
            "catalog.max_properties=3",
        ]
    )
    uc.run(spark, cfg, write(tmp_path, "v1.csv", CATALOG_V1))
    live_version = version(spark, cfg)
    before = table(spark, cfg).collect()

    at_limit = "\u00e9" * 20  # 20 characters (40 bytes in UTF-8): lengths count characters
    bad = jsonl(
        {"item_id": "p1", "title": f"  {at_limit} ", "brand": "b" * 12, "colour": "red"},  # line 1: fine
        {"item_id": "p2", "title": "T" * 5000, "brand": "Acme"},
        {"item_id": "p3", "title": "Green Bag", "colour": "g" * 13},
        {"item_id": "p4", "title": "Four", "brand": "b", "colour": "c", "size": "s", "fit": "f"},
    )
    with pytest.raises(uc.CatalogRejectedError) as caught:
        uc.run(spark, cfg, write(tmp_path, "long.jsonl", bad))
    err = caught.value
    message = str(err)
    assert err.rejected_rows == 3
    for line in [
        "3 of 4 rows rejected",
        "row 2 (item_id 'p2'): title is 5000 characters, the limit is 20 (catalog.max_text_chars.title)",
        "row 3 (item_id 'p3'): property 'colour' is 13 characters, the limit is 12 "
        "(catalog.max_property_chars)",
        "row 4 (item_id 'p4'): 4 properties, the limit is 3 (catalog.max_properties)",
    ]:
        assert line in message, f"{line!r} not in:\n{message}"
    assert "row 1 " not in message
    report = [json.loads(line) for p in sorted(Path(err.report_location).glob("part-*")) for line in p.open()]
    assert [(r["row"], r["reasons"]) for r in report] == [
        (2, ["title is 5000 characters, the limit is 20 (catalog.max_text_chars.title)"]),
        (3, ["property 'colour' is 13 characters, the limit is 12 (catalog.max_property_chars)"]),
        (4, ["4 properties, the limit is 3 (catalog.max_properties)"]),
    ]
    # Nothing already stored is lost or half-written.
    assert version(spark, cfg) == live_version
    assertDataFrameEqual(table(spark, cfg), before)

    # Values exactly at the limits pass (after trimming).
    good = jsonl(
        {"item_id": "p1", "title": f"  {at_limit} ", "brand": "b" * 12, "colour": "red"},
        {"item_id": "p2", "title": "Blue Hat", "brand": "Acme"},
        {"item_id": "p3", "title": "Green Bag", "colour": "g" * 12, "size": "m", "fit": "slim"},
    )
    result = uc.run(spark, cfg, write(tmp_path, "good.jsonl", good))
    assert (result.inserted, result.updated, result.deactivated) == (0, 3, 0)
    assertDataFrameEqual(
        content(spark, cfg),
        expected(
            spark,
            product("p1", title=at_limit, properties={"brand": "b" * 12, "colour": "red"}),
            product("p2", title="Blue Hat", properties={"brand": "Acme"}),
            product("p3", title="Green Bag", properties={"colour": "g" * 12, "size": "m", "fit": "slim"}),
        ),
    )


def test_partial_uploads_check_only_their_columns_and_count_kept_properties(spark, cfg, tmp_path):
    uc.run(spark, cfg, write(tmp_path, "v1.csv", CATALOG_V1))
    # Limits lowered after the upload: "Red Shoe" (8 characters) is now too long, p1 has 2 properties.
    strict = cfg.with_overrides(catalog={"max_text_chars": {"title": 5}, "max_properties": 2})

    # A price feed carries no title: the stored titles are not checked.
    uc.run(spark, strict, write(tmp_path, "prices.csv", "item_id,price\np1,15\n"), partial=True)
    before = table(spark, cfg).collect()
    with pytest.raises(uc.CatalogRejectedError) as caught:
        uc.run(spark, strict, write(tmp_path, "titles.csv", "item_id,title\np2,Blue Hat\n"), partial=True)
    assert (
        "row 2 (item_id 'p2'): title is 8 characters, the limit is 5 (catalog.max_text_chars.title)"
        in str(caught.value)
    )
    # One new key on top of the 2 that p1 keeps is one too many.
    with pytest.raises(uc.CatalogRejectedError) as caught:
        uc.run(spark, strict, write(tmp_path, "sizes.csv", "item_id,size\np1,42\n"), partial=True)
    assert (
        "row 2 (item_id 'p1'): the product would have 3 properties (2 kept, 1 from the file), "
        "the limit is 2 (catalog.max_properties)"
    ) in str(caught.value)
    assertDataFrameEqual(table(spark, cfg), before)

    # Clearing colour while adding size keeps p1 at 2 properties.
    uc.run(spark, strict, write(tmp_path, "swap.csv", "item_id,colour,size\np1,,42\n"), partial=True)
    p1 = {**P1, "price": 15.0, "properties": {"brand": "Acme", "size": "42"}}
    assertDataFrameEqual(content(spark, cfg), expected(spark, p1, P2, P3))


def test_length_limits_config_is_validated_at_load():
    limits = load_config(overrides=["catalog.max_text_chars.title=500"]).catalog
    assert limits.max_text_chars == {
        "item_id": 256,
        "title": 500,
        "description": 2000,
        "category": 100,
        "image_url": 2048,
        "deep_link": 2048,
    }
    assert (limits.max_property_chars, limits.max_properties) == (1000, 50)
    for override, key in [
        ("catalog.max_text_chars.title=0", "catalog.max_text_chars: .*title must be a positive number"),
        ("catalog.max_text_chars.colour=10", r"catalog\.max_text_chars\.colour"),
        ("catalog.max_text_chars.currency=3", r"catalog\.max_text_chars\.currency"),
        ("catalog.max_property_chars=0", r"catalog\.max_property_chars: "),
        ("catalog.max_properties=-1", r"catalog\.max_properties: "),
    ]:
        with pytest.raises(ConfigError, match=key):
            load_config(overrides=[override])


# ---------------------------------------------------------------------------------------------
# The simulator's catalog
# ---------------------------------------------------------------------------------------------
def test_simulator_catalog_uploads_cleanly(spark, cfg, tmp_path):
    world = sim.build_world(cfg.simulator.model_copy(update={"items": 30, "users": 5}))
    written = sim.write_outputs(world, tmp_path / "sim")
    result = uc.run(spark, cfg, written["catalog.csv"])
    assert (result.rows_read, result.inserted) == (30, 30)
    rows = {r.item_id: r for r in uc.read_active_catalog(spark, cfg).collect()}
    assert sorted(rows) == [item.item_id for item in world.items]
    for item in world.items:
        row = rows[item.item_id]
        assert (row.title, row.category, row.price, row.rating, row.in_stock, row.deep_link) == (
            item.title,
            item.category,
            item.price,
            item.rating,
            item.in_stock,
            item.deep_link,
        )
        assert row.currency == "EUR" and row.properties == {"brand": item.title.split()[0]}
