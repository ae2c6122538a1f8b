"""Event simulator: realistic device events, with a planted item structure, produced to Kafka.

Role: feed the pipeline with a reproducible stream that looks like production traffic. A seeded
*world* (catalog, users, devices) is built first; sessions of users then browse it: an
``App Launched``, a run of ``Product Viewed`` mostly inside one of the user's preferred *planted
clusters* (items of one category that are viewed and bought together), some ``Added To Cart`` /
``Added To Wishlist``, purchases of viewed items, occasional ``Notification Clicked`` and
``Favorites Viewed``. A share of deliberately bad records and of exact re-sends (duplicates) is
mixed in, each labelled, so that tests know what validation must quarantine or drop.

Inputs: ``conf/carousel.yaml`` section ``simulator`` (users, items, categories, cluster_size,
events, days, rate, seed, bad_share, duplicate_share) and ``kafka`` (bootstrap servers, the
``events`` topic); flags override them.

Outputs:

* JSON events (the contract in :mod:`carousel.schemas`) on the ``events`` topic, Kafka key = the
  user id; event times spread over the ``days`` before ``--end-time`` (default: now);
* ``<storage.root>/simulator/catalog.csv`` - the catalog (for the catalog upload);
* ``<storage.root>/simulator/planted.json`` - item -> the other items of its planted cluster,
  what a good item-to-item model should recover (for training evaluation);
* a final JSON summary of the records produced per label on stdout.

Layout: a pure, deterministic core (:func:`build_world`, :func:`generate_events`,
:func:`corrupt_record`, :func:`stream_records`; same seed -> same bytes, no I/O) and thin edges
(:func:`produce`, :func:`write_outputs`, :func:`run`, :func:`main`).

Record labels: ``"valid"``, ``"duplicate"`` (an earlier valid record re-sent unchanged, same
``event_id``) and ``"bad:<kind>"`` for each kind in :data:`BAD_KINDS`.

Sessions are emitted one after the other (events strictly time-ordered inside a session);
sessions start at random times in the window, so the stream as a whole is not time-ordered.
Events of mobile devices carry the user's local time with its UTC offset (``+01:00``), the others
UTC (``Z``); every ``event_time`` has millisecond precision.

    ./spark-submit.sh simulate --events 100000 --rate 2000
    ./spark-submit.sh simulate --events 20000 --seed 3 --bad-share 0.05 --dry-run
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import accumulate
from pathlib import Path
from typing import Any, NamedTuple

from botocore.client import BaseClient

from carousel import objectstore
from carousel.cli import add_config_args, config_from_args, setup_logging
from carousel.config import CarouselConfig, KafkaConfig, SimulatorConfig
from carousel.schemas import (
    ADDED_TO_CART,
    ADDED_TO_WISHLIST,
    APP_LAUNCHED,
    EVENT_TYPES,
    FAVORITES_VIEWED,
    ITEM_EVENT_TYPES,
    NOTIFICATION_CLICKED,
    PLATFORMS,
    PRODUCT_PURCHASED,
    PRODUCT_VIEWED,
    REQUIRED_EVENT_FIELDS,
)

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------
VALID = "valid"
DUPLICATE = "duplicate"
BAD_PREFIX = "bad:"
# Each kind of bad record, and the validation failure it provokes.
BAD_KINDS: tuple[str, ...] = (
    "malformed_json",  # not JSON at all (truncated text)
    "json_array",  # valid JSON, but an array holding the event instead of an object
    *(f"missing_{name}" for name in REQUIRED_EVENT_FIELDS),  # required field absent or null
    "unknown_event_type",  # an event type outside EVENT_TYPES
    "unparseable_time",  # event_time that is not ISO-8601 with an offset
    "absurd_time",  # event_time in 1970 or far in the future
    "missing_item_id",  # an item event without item_id
    "mistyped_field",  # epoch millis as event_time, an array as event_type
)
BAD_LABELS: tuple[str, ...] = tuple(BAD_PREFIX + kind for kind in BAD_KINDS)
LABELS: tuple[str, ...] = (VALID, DUPLICATE, *BAD_LABELS)

_MISSING_KIND_FIELDS = {f"missing_{name}": name for name in REQUIRED_EVENT_FIELDS}
_UNKNOWN_TYPES = tuple(
    name
    for name in ("Product Teleported", "Cart Exploded", "page_view", "ProductViewed", "Screen Shaken")
    if name not in EVENT_TYPES
)
_BAD_TIMES = ("yesterday", "2026-13-45T99:61:00Z", "29/11/2026 03:00", "not a time", "T12:00Z", "2026-02-30")
# A number or array where the contract says text, in fields where that cannot pass (an id of the
# wrong JSON type is read as its text, and a mistyped optional object is dropped, not the event).
_MISTYPED = {"event_time": 1764380000000, "event_type": ["Product Viewed"]}

# ---------------------------------------------------------------------------------------------
# World vocabulary
# ---------------------------------------------------------------------------------------------
_CATEGORY_NOUNS = (
    "Sneakers",
    "Headphones",
    "Backpack",
    "Coffee Maker",
    "Desk Lamp",
    "Rain Jacket",
    "Smartwatch",
    "Yoga Mat",
    "Cookware Set",
    "Sunglasses",
    "Board Game",
    "Bluetooth Speaker",
    "Water Bottle",
    "Office Chair",
    "Phone Case",
    "Perfume",
    "Tent",
    "Blender",
    "Notebook",
    "Running Shorts",
)
_BRANDS = (
    "Norvik",
    "Altea",
    "Brisa",
    "Kestrel",
    "Lumo",
    "Ostra",
    "Pavo",
    "Quill",
    "Rindo",
    "Solen",
    "Tavira",
    "Umbra",
    "Veloz",
    "Wexa",
    "Zenit",
)
_SERIES = (
    "Aero",
    "Bold",
    "Core",
    "Dune",
    "Echo",
    "Flux",
    "Glow",
    "Halo",
    "Ivy",
    "Jade",
    "Koa",
    "Luxe",
    "Mira",
    "Nova",
    "Orbit",
    "Pulse",
    "Rift",
    "Sol",
    "Terra",
    "Vibe",
)
_VARIANTS = ("Classic", "Pro", "Lite", "Max", "Mini", "Plus", "Sport", "Studio", "Travel", "Eco")
_COLOURS = ("black", "white", "navy", "sand", "olive", "red", "grey", "teal")
# city, country, language, UTC offset in minutes (fixed: the simulator ignores daylight saving)
_CITIES = (
    ("Lisbon", "PT", "pt", 0),
    ("Porto", "PT", "pt", 0),
    ("Madrid", "ES", "es", 60),
    ("Barcelona", "ES", "es", 60),
    ("Paris", "FR", "fr", 60),
    ("Lyon", "FR", "fr", 60),
    ("Berlin", "DE", "de", 60),
    ("Munich", "DE", "de", 60),
    ("London", "GB", "en", 0),
    ("Dublin", "IE", "en", 0),
    ("Warsaw", "PL", "pl", 60),
    ("Athens", "GR", "el", 120),
    ("Helsinki", "FI", "fi", 120),
    ("New York", "US", "en", -300),
    ("Sao Paulo", "BR", "pt", -180),
    ("Mexico City", "MX", "es", -360),
    ("Tokyo", "JP", "ja", 540),
    ("Mumbai", "IN", "en", 330),
)
_CITY_WEIGHTS = (6, 3, 6, 4, 6, 2, 6, 3, 7, 2, 3, 2, 1, 5, 3, 2, 2, 2)
# Mostly end-user devices; a few point-of-sale terminals and server-side senders.
_PLATFORM_WEIGHTS = {"android": 46, "ios": 34, "web": 16, "pos": 2.5, "server": 1.5}
_DEVICE_PLATFORMS = [p for p in PLATFORMS if p in _PLATFORM_WEIGHTS]
_DEVICE_PLATFORM_WEIGHTS = [_PLATFORM_WEIGHTS[p] for p in _DEVICE_PLATFORMS]
_PLATFORM_SOURCE = {"android": "mobile", "ios": "mobile", "web": "web", "pos": "pos", "server": "api"}
_OS_VERSIONS = {
    "android": ("12", "13", "14", "15"),
    "ios": ("16.7", "17.5", "18.1", "18.2"),
    "web": ("Chrome 131", "Firefox 133", "Safari 18", "Edge 131"),
    "pos": ("PosOS 3.2", "PosOS 4.0"),
    "server": ("linux",),
}
_MODELS = {
    "android": ("Pixel 8", "Pixel 9", "Galaxy S23", "Galaxy A54", "Xiaomi 13", "Moto G84"),
    "ios": ("iPhone 13", "iPhone 14", "iPhone 15", "iPhone 16", "iPad Air"),
    "web": ("desktop", "laptop", "tablet"),
    "pos": ("Verifone V400m", "Ingenico Move 5000"),
    "server": ("backend",),
}
_APP_VERSIONS = ("5.0.2", "5.1.0", "5.1.3", "5.2.0", "5.3.0")
_REFERRERS = ("home", "search", "category", "recommendation", "notification", "similar_items")
_REFERRER_WEIGHTS = (30, 25, 20, 12, 5, 8)

# Session behaviour
_FOCUS_SHARE = 0.8  # share of views inside the session's focus cluster (the rest is noise)
_POPULAR_NOISE_SHARE = 0.5  # of the noise: a popular item (the rest: any item, long tail)
_MEAN_EXTRA_VIEWS = 4.5
_MAX_VIEWS = 25
_CART_P = 0.09
_WISHLIST_P = 0.04
_PURCHASE_FROM_CART_P = 0.45
_BUY_NOW_P = 0.03
_NOTIFICATION_P = 0.08
_FAVORITES_P = 0.07
_API_PURCHASE_P = 0.15  # purchases confirmed server-side (source "api")
_CRM_NOTIFICATION_P = 0.35  # e-mail campaigns tracked by the CRM (source "crm")
_ATTRIBUTES_ON_OTHER_P = 0.03  # user_attributes on events other than App Launched
_MAX_SESSION_SHARE = 0.5  # a session never spans more than this share of the window
_ZIPF_EXPONENT = 1.05
_DAY_MS = 86_400_000
_DUPLICATE_POOL = 4096  # duplicates re-send one of the last N valid records

_ENCODER = json.JSONEncoder(separators=(",", ":"))


class Record(NamedTuple):
    """One Kafka record: key (the user id), value (the JSON text) and what it is (its label)."""

    key: bytes
    value: bytes
    label: str


# ---------------------------------------------------------------------------------------------
# The world
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Item:
    item_id: str
    category: str
    price: float
    rating: float
    title: str
    description: str
    image_url: str
    deep_link: str
    in_stock: bool
    cluster: int  # index into World.clusters
    popularity: float  # relative Zipf weight (popular head, long tail)


@dataclass(frozen=True)
class Device:
    device_id: str
    platform: str
    os_version: str
    model: str
    app_version: str
    # The app is upgraded to this version at this fraction of the simulated window (never if None).
    upgraded_app_version: str | None = None
    upgrade_at: float = 1.0

    def as_dict(self, upgraded: bool = False) -> dict[str, str]:
        version = self.upgraded_app_version if upgraded and self.upgraded_app_version else self.app_version
        return {
            "platform": self.platform,
            "os_version": self.os_version,
            "app_version": version,
            "model": self.model,
        }


@dataclass(frozen=True)
class User:
    user_id: str
    devices: tuple[Device, ...]
    attributes: dict[str, Any]  # age, gender, city, country, language
    utc_offset_minutes: int
    preferred_clusters: tuple[int, ...]  # favourite first
    activity: float  # relative share of sessions
    # Some users move: from this fraction of the window on, their attributes are these.
    moved_attributes: dict[str, Any] | None = None
    moved_at: float = 1.0


@dataclass
class World:
    """The simulated catalog and population; built by :func:`build_world`, never mutated."""

    seed: int
    items: list[Item]  # sorted by item_id
    clusters: list[list[int]]  # planted clusters: indices into items, one category each
    users: list[User]
    categories: list[str]
    _index: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._index = {item.item_id: i for i, item in enumerate(self.items)}

    def item(self, item_id: str) -> Item:
        return self.items[self._index[item_id]]

    def cluster_of(self, item_id: str) -> int:
        """The planted cluster of an item."""
        return self.items[self._index[item_id]].cluster

    def planted_neighbours(self) -> dict[str, list[str]]:
        """Item -> the other items of its planted cluster (what a good model should recover)."""
        result: dict[str, list[str]] = {}
        for members in self.clusters:
            ids = sorted(self.items[i].item_id for i in members)
            for item_id in ids:
                result[item_id] = [other for other in ids if other != item_id]
        return dict(sorted(result.items()))


def _zipf_weights(n: int, rng: random.Random) -> list[float]:
    ranks = list(range(n))
    rng.shuffle(ranks)
    return [1.0 / (rank + 1) ** _ZIPF_EXPONENT for rank in ranks]


def _cluster_sizes(items: int, cluster_size: int) -> list[int]:
    sizes = [cluster_size] * (items // cluster_size)
    remainder = items % cluster_size
    if remainder >= 2 or not sizes:
        sizes.append(remainder)
    elif remainder == 1:
        sizes[-1] += 1  # a cluster of one has no neighbours: fold it into the last one
    return sizes


def _sample_distinct(
    rng: random.Random, population: Sequence[int], cum_weights: Sequence[float], k: int
) -> list[int]:
    chosen: list[int] = []
    k = min(k, len(population))
    for _ in range(50 * k):
        if len(chosen) == k:
            break
        pick = rng.choices(population, cum_weights=cum_weights)[0]
        if pick not in chosen:
            chosen.append(pick)
    return chosen


def _make_device(rng: random.Random, platform: str | None = None) -> Device:
    if platform is None:
        platform = rng.choices(_DEVICE_PLATFORMS, weights=_DEVICE_PLATFORM_WEIGHTS)[0]
    version_index = rng.randrange(len(_APP_VERSIONS))
    upgraded = None
    upgrade_at = 1.0
    if version_index < len(_APP_VERSIONS) - 1 and platform in ("android", "ios") and rng.random() < 0.25:
        upgraded = _APP_VERSIONS[rng.randrange(version_index + 1, len(_APP_VERSIONS))]
        upgrade_at = rng.uniform(0.1, 0.9)
    return Device(
        device_id=f"d-{rng.getrandbits(48):012x}",
        platform=platform,
        os_version=rng.choice(_OS_VERSIONS[platform]),
        model=rng.choice(_MODELS[platform]),
        app_version=_APP_VERSIONS[version_index],
        upgraded_app_version=upgraded,
        upgrade_at=upgrade_at,
    )


def _make_attributes(rng: random.Random) -> tuple[dict[str, Any], int]:
    city, country, language, offset = rng.choices(_CITIES, weights=_CITY_WEIGHTS)[0]
    age = int(min(85, max(16, rng.gauss(36, 12))))
    gender = rng.choices(("f", "m", "x"), weights=(49, 48, 3))[0]
    return {"age": age, "gender": gender, "city": city, "country": country, "language": language}, offset


def build_world(sim_cfg: SimulatorConfig) -> World:
    """The catalog, its planted clusters and the users, all from ``sim_cfg.seed``."""
    rng = random.Random(f"carousel-sim:{sim_cfg.seed}:world")
    n_categories = sim_cfg.categories
    categories = [f"c-{c + 1:02d}" for c in range(n_categories)]
    sizes = _cluster_sizes(sim_cfg.items, sim_cfg.cluster_size)
    # Every category gets clusters (as far as there are enough), in a random arrangement.
    cluster_categories = [k % n_categories for k in range(len(sizes))]
    rng.shuffle(cluster_categories)
    # Item ids are shuffled so that a cluster is not a run of consecutive ids.
    id_numbers = list(range(1, sim_cfg.items + 1))
    rng.shuffle(id_numbers)
    popularity = _zipf_weights(sim_cfg.items, rng)
    category_price = [rng.uniform(8, 250) for _ in range(n_categories)]
    category_noun = [_CATEGORY_NOUNS[c % len(_CATEGORY_NOUNS)] for c in range(n_categories)]

    items: list[Item] = []
    position = 0
    for cluster, size in enumerate(sizes):
        cat = cluster_categories[cluster]
        brand = rng.choice(_BRANDS)
        series = _SERIES[cluster % len(_SERIES)]
        noun = category_noun[cat]
        base_price = category_price[cat] * rng.lognormvariate(0, 0.35)
        for _ in range(size):
            number = id_numbers[position]
            item_id = f"i-{number:06d}"
            variant = rng.choice(_VARIANTS)
            colour = rng.choice(_COLOURS)
            title = f"{brand} {series} {noun} {variant}"
            items.append(
                Item(
                    item_id=item_id,
                    category=categories[cat],
                    price=round(base_price * rng.uniform(0.8, 1.25), 2),
                    rating=round(min(5.0, max(1.0, rng.gauss(4.1, 0.55))), 1),
                    title=title,
                    description=f"{title} in {colour}, from the {brand} {series} {noun.lower()} collection.",
                    image_url=f"https://img.carousel.example/items/{item_id}.jpg",
                    deep_link=f"carousel://item/{item_id}",
                    in_stock=rng.random() >= 0.05,
                    cluster=cluster,
                    popularity=popularity[position],
                )
            )
            position += 1
    order = sorted(range(len(items)), key=lambda i: items[i].item_id)
    items = [items[old] for old in order]
    clusters: list[list[int]] = [[] for _ in sizes]
    for i, item in enumerate(items):
        clusters[item.cluster].append(i)

    # Users prefer popular clusters, flattened a little so that the tail gets visitors too.
    cluster_weights = [sum(items[i].popularity for i in members) ** 0.6 for members in clusters]
    cluster_cum = list(accumulate(cluster_weights))
    cluster_ids = list(range(len(clusters)))
    users: list[User] = []
    for u in range(sim_cfg.users):
        n_devices = 2 if rng.random() < 0.3 else 1
        devices = tuple(_make_device(rng) for _ in range(n_devices))
        attributes, offset = _make_attributes(rng)
        moved, moved_at = None, 1.0
        if rng.random() < 0.03:
            moved_attrs, _ = _make_attributes(rng)
            moved = {**attributes, **{k: moved_attrs[k] for k in ("city", "country", "language")}}
            moved_at = rng.uniform(0.2, 0.8)
        n_preferred = rng.choice((1, 2, 2, 3, 3, 4))
        users.append(
            User(
                user_id=f"u-{u + 1:06d}",
                devices=devices,
                attributes=attributes,
                utc_offset_minutes=offset,
                preferred_clusters=tuple(_sample_distinct(rng, cluster_ids, cluster_cum, n_preferred)),
                activity=rng.lognormvariate(0, 1.0),
                moved_attributes=moved,
                moved_at=moved_at,
            )
        )
    return World(seed=sim_cfg.seed, items=items, clusters=clusters, users=users, categories=categories)


# ---------------------------------------------------------------------------------------------
# Events
# ---------------------------------------------------------------------------------------------
class _TimeFormatter:
    """Epoch milliseconds -> ISO-8601 with offset, fast (the hour prefix is cached)."""

    def __init__(self) -> None:
        self._prefixes: dict[int, str] = {}
        self._suffixes: dict[int, str] = {}

    def __call__(self, ms: int, offset_minutes: int | None) -> str:
        if offset_minutes is None:
            local, suffix = ms, "Z"
        else:
            local = ms + offset_minutes * 60_000
            suffix = self._suffixes.get(offset_minutes)
            if suffix is None:
                sign = "+" if offset_minutes >= 0 else "-"
                hours, minutes = divmod(abs(offset_minutes), 60)
                suffix = self._suffixes[offset_minutes] = f"{sign}{hours:02d}:{minutes:02d}"
        hour, rest = divmod(local, 3_600_000)
        prefix = self._prefixes.get(hour)
        if prefix is None:
            prefix = datetime.fromtimestamp(hour * 3600, UTC).strftime("%Y-%m-%dT%H:")
            self._prefixes[hour] = prefix
        minute, rest = divmod(rest, 60_000)
        second, milli = divmod(rest, 1000)
        return f"{prefix}{minute:02d}:{second:02d}.{milli:03d}{suffix}"


def _epoch_ms(moment: datetime) -> int:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(round(moment.timestamp() * 1000))


class _Generator:
    """Session-by-session event generation over a world (all randomness from one rng)."""

    def __init__(
        self, world: World, sim_cfg: SimulatorConfig, end_time: datetime, rng: random.Random, id_prefix: str
    ) -> None:
        self.world = world
        self.rng = rng
        self.id_prefix = id_prefix
        self.end_ms = _epoch_ms(end_time)
        self.window_ms = max(1, int(sim_cfg.days * _DAY_MS))
        self.start_ms = self.end_ms - self.window_ms
        self.fmt = _TimeFormatter()
        items = world.items
        self.item_ids = [item.item_id for item in items]
        self.item_price = [f"{item.price:.2f}" for item in items]
        self.in_stock = [item.in_stock for item in items]
        self.item_cluster = [item.cluster for item in items]
        self.all_items = list(range(len(items)))
        self.item_cum = list(accumulate(item.popularity for item in items))
        # Inside a cluster the tail is flattened: every member gets views (and co-occurrences).
        self.cluster_members = world.clusters
        self.cluster_cum = [
            list(accumulate(items[i].popularity ** 0.5 for i in members)) for members in world.clusters
        ]
        self.users = world.users
        self.user_range = list(range(len(world.users)))
        self.user_cum = list(accumulate(user.activity for user in world.users))
        self.user_keys = [user.user_id for user in world.users]
        self.order_seq = 0

    # -- picking ------------------------------------------------------------------------------
    def _cluster_item(self, cluster: int, avoid: int) -> int:
        members = self.cluster_members[cluster]
        cum = self.cluster_cum[cluster]
        choices = self.rng.choices
        pick = choices(members, cum_weights=cum)[0]
        if pick == avoid and len(members) > 1:
            pick = choices(members, cum_weights=cum)[0]
        return pick

    def _noise_item(self) -> int:
        rng = self.rng
        if rng.random() < _POPULAR_NOISE_SHARE:
            return rng.choices(self.all_items, cum_weights=self.item_cum)[0]
        return rng.randrange(len(self.all_items))

    # -- one session --------------------------------------------------------------------------
    def session(self, user: User) -> list[tuple[str, int, int, dict[str, str]]]:
        """(event_type, item index or -1, offset ms from the session start, properties)."""
        rng = self.rng
        rand = rng.random
        events: list[tuple[str, int, int, dict[str, str]]] = []
        t = 0
        events.append((APP_LAUNCHED, -1, t, {"launch": "cold" if rand() < 0.6 else "warm", "screen": "home"}))
        referrer_first = None
        if rand() < _NOTIFICATION_P:
            t += 1000 + int(rng.expovariate(1 / 4000))
            channel = "email" if rand() < _CRM_NOTIFICATION_P else "push"
            events.append(
                (
                    NOTIFICATION_CLICKED,
                    -1,
                    t,
                    {"campaign": f"cmp-{rng.randrange(1, 40):03d}", "channel": channel},
                )
            )
            referrer_first = "notification"
        if rand() < _FAVORITES_P:
            t += 2000 + int(rng.expovariate(1 / 8000))
            count = str(rng.randrange(1, 30))
            events.append((FAVORITES_VIEWED, -1, t, {"screen": "favorites", "count": count}))
        return self._browse(user, events, t, referrer_first)

    def _browse(
        self, user: User, events: list[tuple[str, int, int, dict[str, str]]], t: int, referrer: str | None
    ) -> list[tuple[str, int, int, dict[str, str]]]:
        rng = self.rng
        rand = rng.random
        preferred = user.preferred_clusters
        # The favourite cluster is the most likely focus of a session.
        focus = preferred[0] if len(preferred) == 1 or rand() < 0.5 else rng.choice(preferred)
        n_views = 1 + min(_MAX_VIEWS - 1, int(rng.expovariate(1 / _MEAN_EXTRA_VIEWS)))
        cart: list[int] = []
        previous = -1
        last_focus_item = -1
        for position in range(n_views):
            t += 1000 + int(rng.lognormvariate(9.6, 0.8))  # median ~15 s between views
            if rand() < _FOCUS_SHARE:
                item = self._cluster_item(focus, previous)
                last_focus_item = item
            else:
                item = self._noise_item()
            if referrer is None or position > 0:
                referrer = rng.choices(_REFERRERS, cum_weights=_REFERRER_CUM)[0]
            events.append(
                (
                    PRODUCT_VIEWED,
                    item,
                    t,
                    {"screen": "product", "referrer": referrer, "position": str(position + 1)},
                )
            )
            previous = item
            r = rand()
            if r < _CART_P:
                t += 2000 + int(rng.expovariate(1 / 15000))
                events.append((ADDED_TO_CART, item, t, {"quantity": "1", "price": self.item_price[item]}))
                cart.append(item)
            elif r < _CART_P + _WISHLIST_P:
                t += 1500 + int(rng.expovariate(1 / 8000))
                events.append((ADDED_TO_WISHLIST, item, t, {"screen": "product"}))
        bought = [item for item in cart if self.in_stock[item] and rand() < _PURCHASE_FROM_CART_P]
        if not cart and last_focus_item >= 0 and self.in_stock[last_focus_item] and rand() < _BUY_NOW_P:
            bought.append(last_focus_item)
        for item in dict.fromkeys(bought):
            t += 20_000 + int(rng.expovariate(1 / 90_000))
            self.order_seq += 1
            events.append(
                (
                    PRODUCT_PURCHASED,
                    item,
                    t,
                    {
                        "order_id": f"o-{self.id_prefix}{self.order_seq:08d}",
                        "quantity": "1",
                        "price": self.item_price[item],
                        "currency": "EUR",
                    },
                )
            )
        return events

    # -- the stream ---------------------------------------------------------------------------
    def events(self, n_events: int) -> Iterator[dict[str, Any]]:
        rng = self.rng
        rand = rng.random
        fmt = self.fmt
        item_ids = self.item_ids
        window, start_ms = self.window_ms, self.start_ms
        produced = 0
        while produced < n_events:
            user_index = rng.choices(self.user_range, cum_weights=self.user_cum)[0]
            user = self.users[user_index]
            devices = user.devices
            device = devices[0] if len(devices) == 1 or rand() < 0.75 else devices[1]
            session = self.session(user)
            duration = session[-1][2]
            limit = int(window * _MAX_SESSION_SHARE)
            if duration > limit:  # a very short window: squeeze the session, keep it strictly ordered
                scaled: list[tuple[str, int, int, dict[str, str]]] = []
                last = -1
                for etype, item, offset, props in session:
                    offset = max(last + 1, offset * limit // duration)
                    scaled.append((etype, item, offset, props))
                    last = offset
                session, duration = scaled, last
            begin = start_ms + int(rand() * max(0, window - duration))
            fraction = (begin - start_ms) / window
            device_dict = device.as_dict(upgraded=fraction >= device.upgrade_at)
            attributes = (
                user.moved_attributes
                if user.moved_attributes is not None and fraction >= user.moved_at
                else user.attributes
            )
            source = _PLATFORM_SOURCE[device.platform]
            offset_minutes = user.utc_offset_minutes if source == "mobile" else None
            user_id = user.user_id
            device_id = device.device_id
            for etype, item, offset, props in session:
                if produced >= n_events:
                    break
                event_source = source
                if etype == PRODUCT_PURCHASED and rand() < _API_PURCHASE_P:
                    event_source = "api"
                elif etype == NOTIFICATION_CLICKED and props["channel"] == "email":
                    event_source = "crm"
                event: dict[str, Any] = {
                    "event_id": f"{self.id_prefix}{produced:09d}",
                    "user_id": user_id,
                    "device_id": device_id,
                    "event_type": etype,
                }
                if item >= 0:
                    event["item_id"] = item_ids[item]
                event["event_time"] = fmt(begin + offset, offset_minutes if event_source == source else None)
                event["source"] = event_source
                event["device"] = dict(device_dict)
                event["properties"] = props
                if etype == APP_LAUNCHED or rand() < _ATTRIBUTES_ON_OTHER_P:
                    event["user_attributes"] = dict(attributes)
                produced += 1
                yield event


_REFERRER_CUM = list(accumulate(_REFERRER_WEIGHTS))


def _events_rng(seed: int, stream: str) -> random.Random:
    return random.Random(f"carousel-sim:{seed}:{stream}")


def generate_events(
    world: World, sim_cfg: SimulatorConfig, n_events: int, end_time: datetime, seed: int
) -> Iterator[dict[str, Any]]:
    """Exactly ``n_events`` valid events (dicts per the contract), deterministic for ``seed``.

    Event ids are ``e-<seed>-<n:09d>``; times lie in ``[end_time - sim_cfg.days, end_time]``.
    """
    generator = _Generator(world, sim_cfg, end_time, _events_rng(seed, "events"), f"e-{seed}-")
    return generator.events(n_events)


def interaction_rows(
    world: World, sim_cfg: SimulatorConfig, n_events: int, end_time: datetime, seed: int
) -> dict[str, list[str]]:
    """The item interactions (user_id, item_id, event_type, event_time text) among ``n_events`` events.

    Columns of the training contract (``INTERACTION_COLUMNS``), for offline training and evaluation
    without going through Kafka; ``pandas.DataFrame(...)`` of it is an interaction frame.
    """
    rows: dict[str, list[str]] = {"user_id": [], "item_id": [], "event_type": [], "event_time": []}
    for event in generate_events(world, sim_cfg, n_events, end_time, seed):
        if event["event_type"] in ITEM_EVENT_TYPES:
            for column, values in rows.items():
                values.append(event[column])
    return rows


def encode_event(event: dict[str, Any]) -> bytes:
    """The compact JSON text of an event."""
    return _ENCODER.encode(event).encode()


# ---------------------------------------------------------------------------------------------
# Bad records
# ---------------------------------------------------------------------------------------------
def corrupt_record(event: dict[str, Any], kind: str, rng: random.Random) -> tuple[bytes, bytes]:
    """A bad (key, value) made from a valid ``event``; ``kind`` is one of :data:`BAD_KINDS`."""
    key = str(event["user_id"]).encode()
    bad = {name: (dict(value) if isinstance(value, dict) else value) for name, value in event.items()}
    if kind == "malformed_json":
        text = encode_event(bad).decode()
        variant = rng.randrange(3)
        if variant == 0:
            value = text[: rng.randrange(1, len(text) - 1)]  # truncated
        elif variant == 1:
            value = text.replace('"', "'")  # Python-repr style quoting
        else:
            value = text[:-1] + ',"extra":}'  # dangling member
        return key, value.encode()
    if kind == "json_array":
        return key, _ENCODER.encode([bad]).encode()
    if kind in _MISSING_KIND_FIELDS:
        name = _MISSING_KIND_FIELDS[kind]
        if rng.random() < 0.6:
            bad.pop(name, None)
        else:
            bad[name] = None
    elif kind == "unknown_event_type":
        bad["event_type"] = rng.choice(_UNKNOWN_TYPES)
    elif kind == "unparseable_time":
        bad["event_time"] = rng.choice(_BAD_TIMES)
    elif kind == "absurd_time":
        if rng.random() < 0.5:
            moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(seconds=rng.randrange(0, 86400 * 365))
        else:
            moment = datetime(2100 + rng.randrange(0, 800), 1, 1, tzinfo=UTC) + timedelta(
                seconds=rng.randrange(0, 86400 * 365)
            )
        bad["event_time"] = moment.strftime("%Y-%m-%dT%H:%M:%S.000Z")
    elif kind == "missing_item_id":
        if bad.get("event_type") not in ITEM_EVENT_TYPES:
            bad["event_type"] = rng.choice(ITEM_EVENT_TYPES)
        if rng.random() < 0.7:
            bad.pop("item_id", None)
        else:
            bad["item_id"] = None
    elif kind == "mistyped_field":
        name = rng.choice(sorted(_MISTYPED))
        bad[name] = _MISTYPED[name]
    else:
        raise ValueError(f"unknown bad record kind {kind!r}; expected one of {BAD_KINDS}")
    return key, encode_event(bad)


def corrupt_records(
    world: World, sim_cfg: SimulatorConfig, n_records: int, end_time: datetime, seed: int
) -> Iterator[Record]:
    """``n_records`` bad records, kinds drawn uniformly from :data:`BAD_KINDS`, labelled ``bad:<kind>``.

    They are made from valid-looking events of their own (ids ``x-<seed>-<n>``), never from
    events of the valid stream.
    """
    rng = _events_rng(seed, "bad")
    generator = _Generator(world, sim_cfg, end_time, _events_rng(seed, "bad-base"), f"x-{seed}-")
    bases = generator.events(n_records)
    for base in bases:
        kind = rng.choice(BAD_KINDS)
        key, value = corrupt_record(base, kind, rng)
        yield Record(key, value, BAD_PREFIX + kind)


# ---------------------------------------------------------------------------------------------
# The labelled stream
# ---------------------------------------------------------------------------------------------
def label_counts(n_records: int, bad_share: float, duplicate_share: float) -> dict[str, int]:
    """How many valid, duplicate and bad records a stream of ``n_records`` holds (exact)."""
    n_bad = min(n_records, round(n_records * bad_share))
    n_dup = min(n_records - n_bad, round(n_records * duplicate_share))
    n_valid = n_records - n_bad - n_dup
    if n_valid == 0 and n_dup > 0:  # a duplicate needs an original
        n_dup -= 1
        n_valid = 1
    return {VALID: n_valid, DUPLICATE: n_dup, "bad": n_bad}


def stream_records(
    world: World, sim_cfg: SimulatorConfig, n_records: int, end_time: datetime, seed: int
) -> Iterator[Record]:
    """Exactly ``n_records`` labelled records: valid events with bad ones and duplicates mixed in.

    The counts are exact (:func:`label_counts` of ``sim_cfg.bad_share`` and
    ``sim_cfg.duplicate_share``), their positions random; the valid records are, in order,
    ``generate_events(world, sim_cfg, n_valid, end_time, seed)``. Deterministic for the seed.
    """
    counts = label_counts(n_records, sim_cfg.bad_share, sim_cfg.duplicate_share)
    left_valid, left_dup, left_bad = counts[VALID], counts[DUPLICATE], counts["bad"]
    valid = generate_events(world, sim_cfg, left_valid, end_time, seed)
    bad = corrupt_records(world, sim_cfg, left_bad, end_time, seed)
    rng = _events_rng(seed, "labels")
    rand = rng.random
    pool: list[tuple[bytes, bytes]] = []
    pool_next = 0
    encode = _ENCODER.encode
    for left in range(n_records, 0, -1):
        r = rand() * left
        if r < left_bad:
            left_bad -= 1
            yield next(bad)
            continue
        if r < left_bad + left_dup and pool:
            left_dup -= 1
            key, value = pool[rng.randrange(len(pool))]
            yield Record(key, value, DUPLICATE)
            continue
        if left_valid == 0:  # only duplicates are left, and the pool has records
            left_dup -= 1
            key, value = pool[rng.randrange(len(pool))]
            yield Record(key, value, DUPLICATE)
            continue
        left_valid -= 1
        event = next(valid)
        record = (event["user_id"].encode(), encode(event).encode())
        if len(pool) < _DUPLICATE_POOL:
            pool.append(record)
        else:
            pool[pool_next] = record
            pool_next = (pool_next + 1) % _DUPLICATE_POOL
        yield Record(record[0], record[1], VALID)


# ---------------------------------------------------------------------------------------------
# Edges: Kafka, files, command line
# ---------------------------------------------------------------------------------------------
PRODUCER_SETTINGS: dict[str, Any] = {
    "linger.ms": 20,
    "batch.num.messages": 10000,
    "batch.size": 1_000_000,
    "compression.type": "lz4",
    "acks": "all",
    "enable.idempotence": True,
    "queue.buffering.max.messages": 200_000,
    "queue.buffering.max.kbytes": 262_144,
}


class ProduceError(RuntimeError):
    """Some records were not delivered."""


def _produce_when_room(
    producer: Any, topic: str, key: bytes, value: bytes, on_delivery: Callable[[Any, Any], None]
) -> None:
    """Produce once librdkafka's local queue has room again (it drains as the broker acknowledges)."""
    waiting_since = time.monotonic()
    warned_at = waiting_since
    while True:
        producer.poll(0.05)
        try:
            producer.produce(topic, value, key, on_delivery=on_delivery)
            return
        except BufferError:
            now = time.monotonic()
            if now - warned_at >= 10:
                log.warning("producer queue full for %.0f s: is the broker reachable?", now - waiting_since)
                warned_at = now


def produce(
    records: Iterable[Record],
    kafka_cfg: KafkaConfig,
    topic: str,
    rate: float = 0.0,
    progress_every: int = 10_000,
    flush_timeout: float = 60.0,
    settings: Mapping[str, Any] | None = None,
) -> dict[str, int]:
    """Produce the records to ``topic``; returns how many were produced per label.

    ``rate`` > 0 limits the pace to that many records per second (a token bucket on an absolute
    schedule: no drift, bursts of at most one second after a stall). ``settings`` are librdkafka
    settings that override :data:`PRODUCER_SETTINGS` (e.g. ``message.timeout.ms``). Raises
    :class:`ProduceError` when a record was not delivered or the final flush did not finish within
    ``flush_timeout``.
    """
    from confluent_kafka import Producer

    producer = Producer({**kafka_cfg.client_settings(), **PRODUCER_SETTINGS, **(settings or {})})
    first_errors: list[str] = []
    delivered = [0]
    failed = [0]

    def on_delivery(err: Any, msg: Any) -> None:
        if err is None:
            delivered[0] += 1
        else:
            failed[0] += 1
            if len(first_errors) < 5:
                first_errors.append(str(err))

    counts: dict[str, int] = {}
    started = time.monotonic()
    interval = 1.0 / rate if rate > 0 else 0.0
    burst = 1.0  # seconds of tokens that may accumulate
    due = started
    last_report, last_report_n = started, 0
    n = 0
    produce_one = producer.produce
    poll = producer.poll
    try:
        for key, value, label in records:
            if interval:
                now = time.monotonic()
                if due > now:
                    poll(due - now)  # wait, serving delivery reports meanwhile
                    while time.monotonic() < due:
                        poll(max(0.0, due - time.monotonic()))
                elif now - due > burst:
                    due = now - burst
                due += interval
            try:
                produce_one(topic, value, key, on_delivery=on_delivery)
            except BufferError:
                _produce_when_room(producer, topic, key, value, on_delivery)
            n += 1
            counts[label] = counts.get(label, 0) + 1
            if n % 1000 == 0:
                poll(0)
            if progress_every and n % progress_every == 0:
                now = time.monotonic()
                log.info(
                    "produced %d records (%.0f/s now, %.0f/s overall), %d delivered",
                    n,
                    (n - last_report_n) / max(now - last_report, 1e-9),
                    n / max(now - started, 1e-9),
                    delivered[0],
                )
                last_report, last_report_n = now, n
    except KeyboardInterrupt:
        log.warning("interrupted after %d records: flushing what was produced", n)
        producer.flush(min(flush_timeout, 10.0))
        raise
    remaining = producer.flush(flush_timeout)
    elapsed = time.monotonic() - started
    log.info(
        "produced %d records in %.1f s (%.0f/s), %d delivered",
        n,
        elapsed,
        n / max(elapsed, 1e-9),
        delivered[0],
    )
    if failed[0]:
        raise ProduceError(
            f"{failed[0]} of {n} records were not delivered to {topic!r}; first errors: {first_errors}"
        )
    if remaining:
        producer.purge()  # drop what is still queued: the producer is abandoned with this error
        raise ProduceError(f"{remaining} of {n} records still undelivered after a {flush_timeout:g} s flush")
    return dict(sorted(counts.items()))


def write_outputs(world: World, out_dir: str | Path, client: BaseClient | None = None) -> dict[str, str]:
    """Write ``catalog.csv`` and ``planted.json`` under ``out_dir`` (a folder or an s3/s3a URI,
    written with ``client``: :func:`carousel.objectstore.s3_client` of the configuration)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        [
            "item_id",
            "category",
            "price",
            "rating",
            "title",
            "description",
            "image_url",
            "deep_link",
            "in_stock",
            "currency",
            "brand",  # not a first-class column: lands in the catalog's properties
        ]
    )
    for item in world.items:
        writer.writerow(
            [
                item.item_id,
                item.category,
                f"{item.price:.2f}",
                f"{item.rating:.1f}",
                item.title,
                item.description,
                item.image_url,
                item.deep_link,
                "true" if item.in_stock else "false",
                "EUR",  # the simulated shop prices everything in euros
                item.title.split(" ", 1)[0],  # titles start with the (one-word) brand
            ]
        )
    files = {
        "catalog.csv": buffer.getvalue(),
        "planted.json": json.dumps(world.planted_neighbours(), indent=1, sort_keys=True) + "\n",
    }
    target = str(out_dir)
    scheme, sep, _ = target.partition("://")
    if sep and not objectstore.is_s3(target) and scheme != "file":
        raise ValueError(f"cannot write simulator outputs to {target!r}: only local folders and s3 URIs")
    written: dict[str, str] = {}
    for name, text in files.items():
        # On S3 through the configured service (storage.s3); locally written whole, then renamed.
        uri = objectstore.join(target, name)
        objectstore.write_text(uri, text, client=client)
        written[name] = uri if objectstore.is_s3(target) else str(objectstore.local_path(uri))
    log.info("wrote %s", ", ".join(written.values()))
    return written


def _totals(counts: dict[str, int]) -> dict[str, int]:
    return {
        VALID: counts.get(VALID, 0),
        DUPLICATE: counts.get(DUPLICATE, 0),
        "bad": sum(v for k, v in counts.items() if k.startswith(BAD_PREFIX)),
    }


def run(
    cfg: CarouselConfig,
    n_events: int | None = None,
    rate: float | None = None,
    seed: int | None = None,
    topic: str | None = None,
    end_time: datetime | None = None,
    out_dir: str | Path | None = None,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Build the world, write its outputs, produce the labelled stream; returns the summary.

    The world comes from ``cfg.simulator.seed``; ``seed`` (default: the same) seeds the events, so
    a second run with another seed adds distinct events (ids ``e-<seed>-...``) to the same world.
    ``dry_run`` generates and counts the records without Kafka.
    """
    sim = cfg.simulator
    n_records = sim.events if n_events is None else n_events
    rate = sim.rate if rate is None else rate
    seed = sim.seed if seed is None else seed
    topic = topic or cfg.kafka.topic("events").name
    end_time = end_time or datetime.now(UTC)
    if end_time.tzinfo is None:
        end_time = end_time.replace(tzinfo=UTC)
    out_dir = out_dir if out_dir is not None else cfg.storage.path("simulator")

    started = time.monotonic()
    world = build_world(sim)
    outputs = write_outputs(
        world, out_dir, objectstore.s3_client(cfg) if objectstore.is_s3(str(out_dir)) else None
    )
    records = stream_records(world, sim, n_records, end_time, seed)
    log.info(
        "simulating %d records (bad %.2f%%, duplicates %.2f%%) for %d users and %d items over %s days "
        "ending %s, seed %d -> %s",
        n_records,
        100 * sim.bad_share,
        100 * sim.duplicate_share,
        len(world.users),
        len(world.items),
        sim.days,
        end_time.isoformat(),
        seed,
        "nowhere (dry run)" if dry_run else f"topic {topic!r}",
    )
    if dry_run:
        counts: dict[str, int] = {}
        for record in records:
            counts[record.label] = counts.get(record.label, 0) + 1
        counts = dict(sorted(counts.items()))
    else:
        counts = produce(records, cfg.kafka, topic, rate=rate)
    elapsed = time.monotonic() - started
    return {
        "topic": None if dry_run else topic,
        "records": sum(counts.values()),
        "totals": _totals(counts),
        "counts": counts,
        "seed": seed,
        "world_seed": sim.seed,
        "end_time": end_time.isoformat(),
        "days": sim.days,
        "outputs": outputs,
        "seconds": round(elapsed, 3),
    }


def _parse_end_time(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"not an ISO-8601 time: {text!r} ({err})") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="simulate",
        description="Produce realistic events with a planted item structure to Kafka.",
    )
    parser.add_argument("--events", type=int, metavar="N", help="records to produce (simulator.events)")
    parser.add_argument("--rate", type=float, metavar="R", help="records per second, 0 = unlimited")
    parser.add_argument("--seed", type=int, metavar="S", help="seed of the world and the events")
    parser.add_argument("--users", type=int, metavar="U")
    parser.add_argument("--items", type=int, metavar="I")
    parser.add_argument("--days", type=float, metavar="D", help="event times spread over these days")
    parser.add_argument("--bad-share", type=float, metavar="F", help="share of invalid records")
    parser.add_argument("--duplicate-share", type=float, metavar="F", help="share of re-sent valid records")
    parser.add_argument("--topic", metavar="NAME", help="topic name (default: kafka.topics.events.name)")
    parser.add_argument("--end-time", type=_parse_end_time, metavar="ISO", help="latest event time (now)")
    parser.add_argument(
        "--out-dir",
        metavar="PATH",
        help="catalog.csv / planted.json folder (default: <storage.root>/simulator)",
    )
    parser.add_argument("--dry-run", action="store_true", help="generate and count, do not produce")
    return add_config_args(parser)


_FLAG_KEYS = {
    "events": "events",
    "rate": "rate",
    "seed": "seed",
    "users": "users",
    "items": "items",
    "days": "days",
    "bad_share": "bad_share",
    "duplicate_share": "duplicate_share",
}


def main(argv: list[str]) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    overrides = [
        f"simulator.{key}={getattr(args, flag)}"
        for flag, key in _FLAG_KEYS.items()
        if getattr(args, flag) is not None
    ]
    cfg = config_from_args(args, "simulate", overrides)
    summary = run(cfg, topic=args.topic, end_time=args.end_time, out_dir=args.out_dir, dry_run=args.dry_run)
    text = json.dumps(summary, sort_keys=True)
    log.info("simulation summary %s", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
