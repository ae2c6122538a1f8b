"""In-memory serving lookups: the published matrix, the catalog, trending and the erased users,
refreshed by Delta version.

Role: what every trigger is ranked and rendered against, held as compact arrays in each Spark
Python worker that runs ``serve`` (and reused across micro-batches, since Spark reuses its Python
workers). Inputs: the Delta tables ``catalog``, ``item_recommendations``, ``trending_items`` and
``erased_users`` (the keyed hashes of the users ``forget-user`` erased; serve drops their events),
read with delta-rs (``deltalake``) - no Spark job, no JVM round trip on the hot path. Outputs:
:class:`ServingLookups`, from which :func:`current_lookups` hands out, per campaign arm, the
:class:`~carousel.ranking.ItemLists`, :class:`~carousel.ranking.FallbackLists` and
:class:`~carousel.ranking.RankingRules` of the one ranking function, and the catalog fields a
payload's items carry, and the erased users (:func:`carousel.erasure.erased_times`).

Freshness: at most every ``serving.refresh_seconds`` a worker asks each table for its latest
version (an incremental read of the Delta log); when one changed, a background thread of the
worker rebuilds the lookups (and the campaigns' item lists) from the new versions while the
batches go on with the ones held, and swaps them in when ready. So a newly published model, a
catalog upload, a stock feed or an erasure (``forget-user``) apply within the refresh interval
plus the reload (seconds for a large matrix; an erasure reloads neither catalog nor matrix),
without a restart, and no micro-batch waits for a reload. A model version pinned by an A/B arm
is read at the table version it was published at (the commit's ``userMetadata``, as ``publish``
writes it).
"""

from __future__ import annotations

import gc
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import pyarrow as pa
from deltalake import DeltaTable
from deltalake.exceptions import TableNotFoundError

from carousel.config import CampaignConfig, CampaignFilters, CarouselConfig, ServingConfig
from carousel.erasure import erased_times
from carousel.experiments import arms
from carousel.payloads import CATALOG_ITEM_FIELDS, CatalogItems
from carousel.portable import open_table, read_table
from carousel.ranking import (
    FILTER_COLUMNS,
    MATRIX_COLUMNS,
    FallbackLists,
    ItemLists,
    RankingRules,
    fallback_lists,
    item_lists_from_arrow,
)
from carousel.schemas import (
    CATALOG_TABLE,
    CONTROL_VARIANT,
    ERASED_USERS_TABLE,
    ITEM_RECOMMENDATIONS_TABLE,
    TRENDING_TABLE,
)

log = logging.getLogger(__name__)

CATALOG_COLUMNS: tuple[str, ...] = tuple(dict.fromkeys(("item_id", *FILTER_COLUMNS, *CATALOG_ITEM_FIELDS)))
TRENDING_COLUMNS: tuple[str, ...] = ("item_id", "category", "score", "segment")
ERASED_COLUMNS: tuple[str, ...] = ("user_hash", "erased_at")


class ServingLookupError(RuntimeError):
    """A serving table cannot be read; the message names it."""


@dataclass(frozen=True, eq=False)
class LookupSources:
    """Where the lookups come from (plain values: pickled into the serving closure)."""

    catalog: str
    matrix: str
    trending: str
    refresh_seconds: float
    serving: ServingConfig
    campaigns: tuple[tuple[str, CampaignConfig], ...]
    erased: str | None = None  # the erased_users table; None: no erased set is read
    # delta-rs's object store settings (storage.s3), as pairs: the sources stay hashable and plain.
    storage_options: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, cfg: CarouselConfig, campaigns: tuple[tuple[str, CampaignConfig], ...]) -> LookupSources:
        """The configured tables and serving settings, for ``campaigns`` (serve: the trigger
        campaigns; the API: every enabled one)."""
        return cls(
            catalog=cfg.storage.table(CATALOG_TABLE),
            matrix=cfg.storage.table(ITEM_RECOMMENDATIONS_TABLE),
            trending=cfg.storage.table(TRENDING_TABLE),
            refresh_seconds=cfg.serving.refresh_seconds,
            serving=cfg.serving,
            campaigns=campaigns,
            erased=cfg.storage.table(ERASED_USERS_TABLE),
            storage_options=tuple(sorted(cfg.storage.s3.delta_rs_options().items())),
        )

    # Derived once per worker (cached on first use), not per payload or batch.
    @cached_property
    def _campaigns(self) -> dict[str, CampaignConfig]:
        return dict(self.campaigns)

    def campaign(self, name: str) -> CampaignConfig:
        return self._campaigns[name]

    @cached_property
    def key(self) -> str:
        """Identifies these sources and settings (the per-process cache key)."""
        campaigns = (f"{name}={c.model_dump_json()}" for name, c in self.campaigns)
        settings = [self.serving.model_dump_json(), *campaigns]
        tables = [self.catalog, self.matrix, self.trending, str(self.erased), str(self.storage_options)]
        return "|".join([*tables, str(self.refresh_seconds), *settings])


@dataclass(frozen=True)
class ArmInputs:
    """What one campaign arm ranks with."""

    lists: ItemLists
    fallback: FallbackLists
    rules: RankingRules
    use_model: bool


def _open(sources: LookupSources, location: str, version: int | None = None) -> DeltaTable | None:
    try:
        return open_table(location, version, dict(sources.storage_options))
    except TableNotFoundError:
        return None


def _read(table: DeltaTable | None, columns: tuple[str, ...]) -> pa.Table | None:
    if table is None:
        return None
    return table.to_pyarrow_table(columns=list(columns))


def published_version(table: DeltaTable, model_version: str) -> int | None:
    """The latest table version at which ``model_version`` was published (None: never)."""
    for commit in table.history():
        metadata = commit.get("userMetadata")
        if not metadata:
            continue
        try:
            model = json.loads(metadata).get("model_version")
        except (ValueError, AttributeError):
            continue
        if model == model_version:
            return int(commit["version"])
    return None


@dataclass
class ServingLookups:
    """The lookups at one set of table versions; per-arm inputs are built on first use."""

    sources: LookupSources
    versions: dict[str, int | None]
    catalog: pa.Table
    matrices: dict[str | None, pa.Table | None]  # model version (None = live) -> matrix rows
    trending: pa.Table
    erased: dict[str, int] = field(default_factory=dict)  # user hash -> erased_at (epoch micros)
    _arms: dict[tuple[str, str], ArmInputs] = field(default_factory=dict)
    _lists: dict[tuple[str, str | None], ItemLists] = field(default_factory=dict)
    _catalog_items: CatalogItems | None = None
    _frozen: bool = False  # moved out of the garbage collector's reach (see keep_out_of_gc)

    def arm(self, campaign_name: str, arm: str) -> ArmInputs:
        """The ranking inputs of one (campaign, arm); arm = a variant name or ``default``."""
        key = (campaign_name, arm)
        inputs = self._arms.get(key)
        if inputs is None:
            campaign = self.sources.campaign(campaign_name)
            variant = next((v for v in campaign.variants if v.name == arm), None)
            use_model = variant is None or variant.strategy == "model"
            model_version = variant.model_version if variant is not None else None
            matrix = self.matrices.get(model_version) if use_model else None
            lists = self.lists(campaign.filters, model_version, use_model, f"{campaign_name}/{arm}")
            rules = RankingRules.of(campaign, self.sources.serving)
            inputs = self._arms[key] = ArmInputs(
                lists, fallback_lists(self.trending, lists, rules), rules, use_model and matrix is not None
            )
        return inputs

    def lists(
        self,
        filters: CampaignFilters,
        model_version: str | None = None,
        use_model: bool = True,
        purpose: str = "similar items",
    ) -> ItemLists:
        """The item lists of one matrix (None = live) cut to the products ``filters`` admit;
        built once per lookups and shared by every arm with the same filters and model."""
        key = (filters.model_dump_json(), model_version if use_model else "-")
        lists = self._lists.get(key)
        if lists is None:
            started = time.monotonic()
            matrix = self.matrices.get(model_version) if use_model else None
            lists = self._lists[key] = item_lists_from_arrow(
                matrix, self.catalog, filters, self.sources.serving.cold_start
            )
            log.info(
                "serving lists for %s: %d items, %d entries, %.1f MB, %.2fs",
                purpose,
                len(lists.ids),
                len(lists.recs),
                lists.nbytes / 1e6,
                time.monotonic() - started,
            )
        return lists

    @property
    def catalog_items(self) -> CatalogItems:
        """The catalog fields payload items carry, by item id (what rendering fills items from)."""
        if self._catalog_items is None:
            self._catalog_items = CatalogItems(self.catalog)
        return self._catalog_items

    def item_fields(self, item_id: str) -> dict[str, Any]:
        """The catalog fields a payload item carries (all None for an unknown item)."""
        return self.catalog_items.fields(item_id)


class _Cache:
    """The lookups of one worker process, and when their versions were last checked."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.current: dict[str, tuple[ServingLookups, float]] = {}
        self.tables: dict[tuple[str, tuple[tuple[str, str], ...]], DeltaTable | None] = {}
        self.loading: dict[str, threading.Thread] = {}  # sources key -> its background reload

    def latest_version(self, sources: LookupSources, location: str) -> int | None:
        key = (location, sources.storage_options)
        table = self.tables.get(key)
        if table is None:
            table = self.tables[key] = _open(sources, location)
            return None if table is None else table.version()
        table.update_incremental()
        return table.version()


_CACHE = _Cache()


def _pinned_models(sources: LookupSources) -> set[str]:
    return {
        v.model_version
        for _, campaign in sources.campaigns
        for v in campaign.variants
        if v.strategy == "model" and v.model_version
    }


def _trending(sources: LookupSources, versions: dict[str, int | None]) -> pa.Table:
    table = None
    if versions["trending"] is not None:
        delta = _open(sources, sources.trending, versions["trending"])
        # A table written before segment trending has no segment column (its rows are overall).
        present = {f.name for f in delta.schema().fields} if delta is not None else set()
        table = _read(delta, tuple(c for c in TRENDING_COLUMNS if c in present or c != "segment"))
    if table is None:
        empty = {
            "item_id": pa.string(),
            "category": pa.string(),
            "score": pa.float64(),
            "segment": pa.string(),
        }
        table = pa.table({name: pa.array([], kind) for name, kind in empty.items()})
    return table


def _erased(
    sources: LookupSources, versions: dict[str, int | None], previous: ServingLookups | None
) -> dict[str, int]:
    """The erased users at ``versions["erased"]`` (none while the table does not exist); the set
    ``previous`` holds when that version did not change."""
    version = versions.get("erased")
    if previous is not None and previous.versions.get("erased") == version:
        return previous.erased
    if version is None or sources.erased is None:
        return {}
    # Through delta-rs's query engine, which reads deletion vectors: a table someone gave them
    # must not stop serve from seeing erasures (the table is small: one row per erased user).
    options = dict(sources.storage_options)
    return erased_times(read_table(sources.erased, ERASED_COLUMNS, version=version, storage_options=options))


def load_lookups(
    sources: LookupSources, versions: dict[str, int | None], previous: ServingLookups | None = None
) -> ServingLookups:
    """Read the tables at ``versions`` (None = table absent) into :class:`ServingLookups`.

    What ``previous`` holds at the same versions is reused: a trending refresh or an erasure
    reloads neither the catalog nor the matrix, and keeps the item lists."""
    started = time.monotonic()
    if previous is not None and all(previous.versions[t] == versions[t] for t in ("catalog", "matrix")):
        lookups = ServingLookups(
            sources,
            dict(versions),
            previous.catalog,
            previous.matrices,
            _trending(sources, versions),
            _erased(sources, versions, previous),
        )
        lookups._lists = previous._lists
        log.info(
            "serving lookups: trending reloaded at version %s, %d erased users at version %s",
            versions["trending"],
            len(lookups.erased),
            versions.get("erased"),
        )
        return lookups
    catalog = _read(
        _open(sources, sources.catalog, versions["catalog"]) if versions["catalog"] is not None else None,
        CATALOG_COLUMNS,
    )
    if catalog is None:
        raise ServingLookupError(
            f"no product catalog at {sources.catalog}: "
            "upload one first (./spark-submit.sh upload-catalog FILE)"
        )
    matrices: dict[str | None, pa.Table | None] = {None: None}
    if versions["matrix"] is not None:
        live = _open(sources, sources.matrix, versions["matrix"])
        matrices[None] = _read(live, MATRIX_COLUMNS)
        for model in _pinned_models(sources):
            at = published_version(live, model) if live is not None else None
            if at is None:
                log.warning(
                    "model version %r was never published to %s: its arm falls back", model, sources.matrix
                )
                matrices[model] = None
            else:
                matrices[model] = _read(_open(sources, sources.matrix, at), MATRIX_COLUMNS)
    trending = _trending(sources, versions)
    erased = _erased(sources, versions, previous)
    lookups = ServingLookups(sources, dict(versions), catalog, matrices, trending, erased)
    log.info(
        "serving lookups loaded at versions %s: %d products, %d matrix rows, %d trending items, "
        "%d erased users (%.2fs)",
        versions,
        catalog.num_rows,
        0 if matrices[None] is None else matrices[None].num_rows,
        trending.num_rows,
        len(erased),
        time.monotonic() - started,
    )
    return lookups


def warm(lookups: ServingLookups) -> ServingLookups:
    """Build every trigger campaign's arm inputs (item lists, their id indexes and flat lists) and
    the catalog fields' index now, not at the first trigger."""
    for name, campaign in lookups.sources.campaigns:
        for arm, _upper in arms(campaign):
            if arm != CONTROL_VARIANT:
                lookups.arm(name, arm).lists.warm()
    lookups.item_fields("")
    return lookups


def keep_out_of_gc(lookups: ServingLookups) -> ServingLookups:
    """Move ``lookups`` (and everything else alive in this worker now) out of the collector's reach.

    PySpark's worker daemon runs a full ``gc.collect()`` after every task. A full collection
    visits every tracked container, and the lookups are hundreds of thousands of them (ids, index
    dicts, catalog columns): 29 ms a collection with the bench's 100k items, a quarter of the
    serve workers' profile samples at 1,000 triggers/s (bench/README.md "Serving"), 0 ms once
    frozen. :func:`gc.freeze` puts what is alive now in the permanent generation, which
    collections skip; reference counting still frees it once unreferenced, so a replaced set of
    lookups is released as before (they hold no reference cycles). Called by the task's own thread
    between batches (not by the reload thread), so no batch's objects are frozen with them.
    """
    if not lookups._frozen:
        gc.collect()
        gc.freeze()
        lookups._frozen = True
    return lookups


def current_lookups(sources: LookupSources, now: float | None = None) -> ServingLookups:
    """This process's lookups for ``sources``; their table versions are checked at most every
    ``refresh_seconds``.

    The first call loads them (nothing to serve with before). A later version is loaded and
    warmed by a background thread while batches go on with the lookups held; the next call after
    it finished gets the new ones. A batch never waits for a reload (a new matrix takes seconds).
    """
    now = time.monotonic() if now is None else now
    with _CACHE.lock:
        held = _CACHE.current.get(sources.key)
        if held is not None and now - held[1] < sources.refresh_seconds:
            return keep_out_of_gc(held[0])
        versions = {
            "catalog": _CACHE.latest_version(sources, sources.catalog),
            "matrix": _CACHE.latest_version(sources, sources.matrix),
            "trending": _CACHE.latest_version(sources, sources.trending),
            "erased": _CACHE.latest_version(sources, sources.erased) if sources.erased else None,
        }
        if held is None:
            lookups = warm(load_lookups(sources, versions))
        elif held[0].versions == versions:
            lookups = held[0]
        else:
            _reload_in_background(sources, versions, held[0])
            lookups = held[0]
        _CACHE.current[sources.key] = (lookups, now)
        return keep_out_of_gc(lookups)


def _reload_in_background(
    sources: LookupSources, versions: dict[str, int | None], held: ServingLookups
) -> None:
    """Start loading ``versions`` beside the batches (one reload at a time per sources)."""
    running = _CACHE.loading.get(sources.key)
    if running is not None and running.is_alive():
        return  # the next check after it finished sees any later version

    def reload() -> None:
        try:
            lookups = warm(load_lookups(sources, versions, held))
        except Exception as err:  # noqa: BLE001 - a failed reload keeps serving what is held
            log.warning(
                "serving lookups: reload at versions %s failed, keeping %s: %s", versions, held.versions, err
            )
            return
        with _CACHE.lock:
            _CACHE.current[sources.key] = (lookups, time.monotonic())

    thread = threading.Thread(target=reload, name="serving-lookups-reload", daemon=True)
    _CACHE.loading[sources.key] = thread
    thread.start()
