"""Channel payloads: Jinja2 templates, rendering, the JSON Schema contract, and the Spark glue.

Role: turn a *render request* (who gets it, which campaign / channel / template / A/B variant, and
the ranked items enriched with their catalog rows) into the JSON payload that a channel's sender
consumes, and check it against the channel's JSON Schema. Real-time serving (inside
``foreachBatch``) and batch campaigns both call :func:`render_payloads`. Neither calls it per
record; it runs per partition on the executors.

Inputs:

- request rows shaped like :data:`PAYLOAD_REQUEST_SCHEMA`;
- templates ``<serving.templates_dir>/<channel>/<template>.<part>.j2``, with the parts of each
  channel in :data:`TEMPLATE_PARTS`. Email HTML (``*.html.j2``) is autoescaped. Every template
  renders with ``StrictUndefined`` in Jinja's sandbox;
- JSON Schemas ``<serving.payload_schemas_dir>/<channel>.schema.json`` (draft 2020-12), which
  share ``common.schema.json``.

Outputs: rows of :data:`PAYLOAD_OUTPUT_SCHEMA` (``topic``, ``key`` = user id, ``value`` = the
payload JSON, plus ``payload_id``, ``channel`` and ``campaign``) for Spark's Kafka sink.

This module is not a job. ``./spark-submit.sh serve`` and ``./spark-submit.sh campaign NAME``
call :func:`check_templates` at start, so a missing or broken template stops the job before any
data is read. They then call :func:`render_payloads` on each batch.

Catalog strings are untrusted. In the payload's ``items`` they are passed on as uploaded, except
a ``deep_link`` whose scheme is not in ``serving.deep_link_schemes`` (null instead). In
``content`` they are rendered safely: escaped in HTML, and every link and image URL goes
through :func:`safe_url`. Images must use http(s), and so must links on web channels (the http(s)
schemes of ``serving.deep_link_schemes``). App deep links (push, in-app, app inbox) may use any
scheme of ``serving.deep_link_schemes`` (e.g. ``carousel://``), never ``javascript:``, ``data:`` and
the like. Links written in an enabled campaign's templates must use a listed scheme too
(:func:`check_templates`).
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import pyarrow as pa
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from markupsafe import Markup
from pyspark.broadcast import Broadcast
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import ArrayType, StringType, StructField, StructType, TimestampType
from referencing import Registry, Resource
from referencing.exceptions import Unresolvable

from carousel.arrow_rows import batch_rows
from carousel.config import UNSAFE_LINK_SCHEMES, CampaignConfig, CarouselConfig
from carousel.errors import JobError
from carousel.fastjson import compact_json
from carousel.schemas import (
    APP_INBOX,
    CATALOG_SCHEMA,
    CHANNELS,
    EMAIL,
    IN_APP,
    PUSH,
    RANKED_ITEM_SCHEMA,
    SMS,
    STRATEGIES,
    USER_ATTRIBUTES_SCHEMA,
    WEB_POPUP,
    WEBHOOK,
)

PAYLOAD_SCHEMA_VERSION = 1

# The template files each channel needs: <channel>/<template>.<part>.j2.
TEMPLATE_PARTS: dict[str, tuple[str, ...]] = {
    PUSH: ("title", "body"),
    IN_APP: ("title", "body"),
    WEB_POPUP: ("title", "body"),
    APP_INBOX: ("title", "body"),
    EMAIL: ("subject", "html", "txt"),
    SMS: ("txt",),
    WEBHOOK: ("title",),
}
# Parts that may render empty; every other part must produce text.
OPTIONAL_PARTS: frozenset[str] = frozenset({"body"})
# The layout the client renders for each JSON channel.
CLIENT_LAYOUTS: dict[str, str] = {IN_APP: "carousel", WEB_POPUP: "modal", APP_INBOX: "list"}
# Links on these channels open inside the app, so the app schemes of serving.deep_link_schemes
# (carousel://...) are allowed; elsewhere only its http(s) ones.
APP_LINK_CHANNELS: frozenset[str] = frozenset({PUSH, IN_APP, APP_INBOX})
WEB_URL_SCHEMES: frozenset[str] = frozenset({"http", "https"})
BLOCKED_URL_SCHEMES: frozenset[str] = UNSAFE_LINK_SCHEMES
# GSM 03.38 has no "…". A single one would switch the whole SMS to UCS-2, with 70 characters a
# segment instead of 160.
SMS_ELLIPSIS = "..."
# Below this many units (septets or UTF-16 code units) of text, keeping the closing link whole is
# no longer worth it.
_SMS_MIN_PROSE = 10
COMMON_SCHEMA_FILE = "common.schema.json"

# ---------------------------------------------------------------------------------------------
# Request and output schemas
# ---------------------------------------------------------------------------------------------
CATALOG_ITEM_FIELDS: tuple[str, ...] = (
    "title",
    "description",
    "category",
    "price",
    "currency",
    "rating",
    "image_url",
    "deep_link",
)
# One item of a request: the ranking's fields, then the catalog's. The payload's items use the same
# names in the same order.
PAYLOAD_ITEM_SCHEMA = StructType(
    [*RANKED_ITEM_SCHEMA.fields, *(CATALOG_SCHEMA[name] for name in CATALOG_ITEM_FIELDS)]
)
PAYLOAD_ITEM_FIELDS: tuple[str, ...] = tuple(PAYLOAD_ITEM_SCHEMA.fieldNames())
# The ranking's part of an item: what a request carries when the catalog fills the rest.
RANKED_ITEM_FIELDS: tuple[str, ...] = tuple(RANKED_ITEM_SCHEMA.fieldNames())
# The user part of the template context: the latest user attributes and the latest platform.
PAYLOAD_USER_SCHEMA = StructType([*USER_ATTRIBUTES_SCHEMA.fields, StructField("platform", StringType())])
USER_FIELDS: tuple[str, ...] = tuple(PAYLOAD_USER_SCHEMA.fieldNames())
PAYLOAD_REQUEST_SCHEMA = StructType(
    [
        StructField("payload_id", StringType(), False),
        StructField("campaign", StringType(), False),
        StructField("channel", StringType(), False),
        StructField("template", StringType(), False),
        StructField("variant", StringType(), False),
        StructField("user_id", StringType(), False),
        StructField("trigger_event_id", StringType()),  # null for batch campaigns
        StructField("trigger_event_type", StringType()),
        StructField("run_id", StringType()),  # null for real-time serving
        StructField("model_version", StringType()),
        StructField("created_at", TimestampType(), False),
        StructField("user", PAYLOAD_USER_SCHEMA),
        StructField("items", ArrayType(PAYLOAD_ITEM_SCHEMA), False),
    ]
)
REQUEST_COLUMNS: tuple[str, ...] = tuple(PAYLOAD_REQUEST_SCHEMA.fieldNames())
# What render_payloads yields: ready for Spark's Kafka sink (topic, key, value), plus bookkeeping.
PAYLOAD_OUTPUT_SCHEMA = StructType(
    [
        StructField("topic", StringType(), False),
        StructField("key", StringType(), False),
        StructField("value", StringType(), False),
        StructField("payload_id", StringType(), False),
        StructField("channel", StringType(), False),
        StructField("campaign", StringType(), False),
    ]
)
_ARROW_OUTPUT_SCHEMA = pa.schema(
    [pa.field(f.name, pa.string(), nullable=False) for f in PAYLOAD_OUTPUT_SCHEMA]
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class PayloadError(ValueError):
    """A request cannot be rendered, or a payload breaks its schema. The message names the payload."""


class TemplateCheckError(JobError, ValueError):
    """Templates or schemas of enabled campaigns are missing or invalid (raised at job start)."""


class CatalogItems:
    """The catalog fields a payload item carries (:data:`CATALOG_ITEM_FIELDS`), by item id.

    Serving's lookups and a campaign's render tasks fill their items from it. Pickles as its
    Arrow table (compact, for a broadcast); the id index is built on first use, once per process,
    and each product's fields once, when first asked for (a campaign asks for the same ones often).
    """

    def __init__(self, table: pa.Table) -> None:
        self.table = table.select(["item_id", *CATALOG_ITEM_FIELDS])
        self._rows: dict[str, int] | None = None
        self._columns: dict[str, list[Any]] = {}
        self._fields: dict[str, dict[str, Any]] = {}
        # link schemes -> item id -> cleaned fields. Keyed by plain strings: a key tuple holding the
        # (always tracked) frozenset would be one more object for every full collection to walk.
        self._payload_fields: dict[frozenset[str], dict[str, dict[str, Any]]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"table": self.table, "_rows": None, "_columns": {}, "_fields": {}, "_payload_fields": {}}

    def _row(self, item_id: str) -> int | None:
        if self._rows is None:
            self._columns = {name: self.table.column(name).to_pylist() for name in CATALOG_ITEM_FIELDS}
            self._rows = {item: row for row, item in enumerate(self.table.column("item_id").to_pylist())}
        return self._rows.get(item_id)

    def fields(self, item_id: str) -> dict[str, Any]:
        """The catalog fields of ``item_id`` (all None for an unknown item). Shared: do not modify."""
        fields = self._fields.get(item_id)
        if fields is None:
            row = self._row(item_id)
            fields = {name: (None if row is None else values[row]) for name, values in self._columns.items()}
            if row is not None:
                self._fields[item_id] = fields
        return fields

    def payload_fields(self, item_id: str, link_schemes: frozenset[str]) -> dict[str, Any]:
        """The catalog fields of ``item_id`` as a payload item carries them (all None for an unknown
        item), cleaned once per product (:func:`_item_catalog_fields`). Shared: do not modify."""
        cleaned = self._payload_fields.get(link_schemes)
        if cleaned is None:
            cleaned = self._payload_fields[link_schemes] = {}
        fields = cleaned.get(item_id)
        if fields is None:
            row = self._row(item_id)
            values = tuple(None if row is None else column[row] for column in self._columns.values())
            fields = _item_catalog_fields(values, link_schemes)
            if row is not None:
                cleaned[item_id] = fields
        return fields


# ---------------------------------------------------------------------------------------------
# URLs and text helpers (pure)
# ---------------------------------------------------------------------------------------------
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*):")
# Whitespace or control characters anywhere in a URL: browsers drop some of them ("java\tscript:"),
# so such a URL is refused instead of repaired.
_UNSAFE_URL_CHARS = re.compile(r"[\x00-\x20\x7f]")
_WEB_URL = re.compile(r"[hH][tT][tT][pP][sS]?://[^\x00-\x20\x7f]+")
_URL_IN_TEXT = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://\S+")


@lru_cache(maxsize=65536)
def safe_url(url: str | None, schemes: frozenset[str] = WEB_URL_SCHEMES) -> str | None:
    """``url`` (trimmed) if it is safe to put in a link or image, else None.

    It must be absolute, with no whitespace or control characters, and its scheme (any case) must
    be one of ``schemes`` (default: http and https) and not one of :data:`BLOCKED_URL_SCHEMES`;
    an http(s) URL must name a host. Cached: a catalog's URLs recur in many payloads.
    """
    if not isinstance(url, str):
        return None
    url = url.strip()
    match = _SCHEME.match(url)
    if not match or _UNSAFE_URL_CHARS.search(url):
        return None
    scheme = match.group(1).lower()
    if scheme not in schemes or scheme in BLOCKED_URL_SCHEMES:
        return None
    if scheme in WEB_URL_SCHEMES and not _WEB_URL.fullmatch(url):
        return None
    return url


# A link written into a template: an attribute that takes a URL, or anything with "scheme://".
_TEMPLATE_LINK = re.compile(
    r"""(?i)\b(?:href|src|action|formaction|xlink:href)\s*=\s*["']?\s*([a-z][a-z0-9+.-]*):"""
    r"|\b([a-z][a-z0-9+.-]*)://|\b(javascript|vbscript):"
)


def template_link_problems(text: str, schemes: frozenset[str]) -> list[str]:
    """A reason for each link written in a template ``text`` whose scheme is not in ``schemes``."""
    problems = []
    for match in _TEMPLATE_LINK.finditer(text):
        scheme = next(group for group in match.groups() if group).lower()
        if scheme not in schemes or scheme in BLOCKED_URL_SCHEMES:
            line = text.count("\n", 0, match.start()) + 1
            allowed = ", ".join(sorted(schemes)) or "none"
            problems.append(
                f"line {line}: a {scheme}: link; allowed here: {allowed} (serving.deep_link_schemes)"
            )
    return problems


def one_line(text: str) -> str:
    """Collapse all whitespace, so that a catalog string cannot inject a line (subject, SMS, titles)."""
    return " ".join(text.split())


# SMS length as carriers count it (3GPP TS 23.038). The GSM 03.38 basic table costs one septet a
# character; 0x1B is its escape to the extension table, not a character, so it is left out.
_GSM7_BASIC = (
    "@£$¥èéùìòÇ\nØø\rÅå\u0394_\u03a6\u0393\u039b\u03a9\u03a0\u03a8\u03a3\u0398\u039eÆæßÉ"
    " !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
# Extension table characters: sent as escape + character, two septets each.
_GSM7_EXTENSION = "\f^{}\\[]~|€"
_NOT_GSM7 = re.compile(f"[^{re.escape(_GSM7_BASIC + _GSM7_EXTENSION)}]")
_GSM7_EXTENSION_CHARS = frozenset(_GSM7_EXTENSION)
_GSM7_SEPTETS: dict[str, float] = {**dict.fromkeys(_GSM7_BASIC, 1.0), **dict.fromkeys(_GSM7_EXTENSION, 2.0)}
SMS_GSM7 = "GSM-7"
SMS_UCS2 = "UCS-2"
# Units in a single-part SMS, and in each part of a concatenated one (its header takes the rest).
_SMS_LIMITS: dict[str, tuple[int, int]] = {SMS_GSM7: (160, 153), SMS_UCS2: (70, 67)}


@dataclass(frozen=True, slots=True)
class SmsLength:
    """How carriers count an SMS: its encoding, its length in that encoding's units, its parts.

    ``units`` are septets for GSM-7 (an extension character counts 2) and UTF-16 code units for
    UCS-2 (a character outside the BMP, such as an emoji, counts 2). An empty text is one part.
    """

    encoding: str
    units: int
    segments: int


def _sms_unit_costs(text: str, encoding: str) -> list[int]:
    if encoding == SMS_GSM7:
        return [2 if ch in _GSM7_EXTENSION_CHARS else 1 for ch in text]
    return [2 if ord(ch) > 0xFFFF else 1 for ch in text]


def sms_length(text: str) -> SmsLength:
    """The encoding, units and segment count of ``text`` sent as one SMS (3GPP TS 23.038).

    GSM-7 when every character is in the GSM 03.38 basic or extension table, else UCS-2. One part
    holds 160 septets or 70 UCS-2 units; beyond that every part holds 153 or 67, and a part never
    ends between an escape and its extension character, nor inside a UTF-16 surrogate pair.
    """
    encoding = SMS_UCS2 if _NOT_GSM7.search(text) else SMS_GSM7
    if encoding == SMS_GSM7:
        units = len(text) + sum(text.count(ch) for ch in _GSM7_EXTENSION)
    else:
        # surrogatepass: a lone surrogate from a broken catalog string counts 1 instead of raising.
        units = len(text.encode("utf-16-le", "surrogatepass")) // 2
    single, per_part = _SMS_LIMITS[encoding]
    if units <= single:
        return SmsLength(encoding, units, 1)
    if units == len(text):  # no two-unit character: nothing can straddle a boundary
        return SmsLength(encoding, units, -(-units // per_part))
    segments, used = 1, 0
    for cost in _sms_unit_costs(text, encoding):
        # A two-unit character that would straddle the boundary moves whole to the next part.
        if used + cost > per_part:
            segments, used = segments + 1, 0
        used += cost
    return SmsLength(encoding, units, segments)


def fit_sms(text: str, max_segments: int) -> str:
    """``text`` cut to fit ``max_segments`` SMS parts (see :func:`sms_length`) with :data:`SMS_ELLIPSIS`.

    The cut falls between words, never inside a URL. When the last URL and everything after it
    fit, they are kept whole and the words before them are shortened instead. A URL longer than
    the whole budget is the only case that gets cut. The budget is that of the encoding the
    result needs: a text with a character outside GSM-7 gets 70 UCS-2 units a part, unless cutting
    before that character keeps the link or more of the text within the GSM-7 budget.
    """
    if max_segments < 1:
        raise ValueError(f"max_segments must be >= 1, got {max_segments}")
    length = sms_length(text)
    if length.segments <= max_segments:
        return text
    urls = [m.span() for m in _URL_IN_TEXT.finditer(text)]
    # Under GSM-7 every other character is out of reach, so that cut stays GSM-7 and fits 160 a part.
    gsm7 = [_GSM7_SEPTETS.get(ch, math.inf) for ch in text]
    fitted, kept_link = _fit_sms_units(text, urls, gsm7, SMS_GSM7, max_segments)
    if length.encoding == SMS_UCS2:
        other = _fit_sms_units(text, urls, _sms_unit_costs(text, SMS_UCS2), SMS_UCS2, max_segments)
        # Keeping the link is what the message is for; then the longer text wins.
        if (other[1], len(other[0])) > (kept_link, len(fitted)):
            fitted = other[0]
    return fitted


def _fit_sms_units(
    text: str, urls: Sequence[tuple[int, int]], costs: Sequence[float], encoding: str, max_segments: int
) -> tuple[str, bool]:
    """The cut of ``text`` within ``encoding``'s budget, and whether it kept the closing link."""
    single, per_part = _SMS_LIMITS[encoding]
    budget = single if max_segments == 1 else per_part * max_segments
    # A part cannot end inside an escape or surrogate pair, so a text within the budget can still
    # need one more part: each retry gives up one unit (at most one per part boundary).
    while True:
        fitted = _fit_sms_budget(text, urls, costs, budget)
        if sms_length(fitted[0]).segments <= max_segments:
            return fitted
        budget -= 1


def _fit_sms_budget(
    text: str, urls: Sequence[tuple[int, int]], costs: Sequence[float], budget: int
) -> tuple[str, bool]:
    # The ellipsis is GSM-7 and in the BMP: one unit a character under either encoding.
    if urls:
        start = urls[-1][0]
        room = budget - sum(costs[start:]) - len(SMS_ELLIPSIS) - 1
        if room >= _SMS_MIN_PROSE:
            prose = _cut_words(text[:start].rstrip(), _chars_within(costs, room), urls[:-1])
            if prose:
                return f"{prose}{SMS_ELLIPSIS} {text[start:]}", True
    return _cut_words(text, _chars_within(costs, budget - len(SMS_ELLIPSIS)), urls) + SMS_ELLIPSIS, False


def _chars_within(costs: Sequence[float], budget: float) -> int:
    """How many leading characters fit in ``budget`` units."""
    used = 0.0
    for count, cost in enumerate(costs):
        used += cost
        if used > budget:
            return count
    return len(costs)


def _cut_words(text: str, limit: int, urls: Sequence[tuple[int, int]]) -> str:
    """``text`` cut to at most ``limit`` characters, between words and never inside a URL."""
    if len(text) <= limit:
        return text
    cut = limit
    for start, end in urls:
        if start < cut < end:
            cut = start
    if 0 < cut < len(text) and not text[cut].isspace() and not text[cut - 1].isspace():
        space = max(text.rfind(" ", 0, cut), text.rfind("\n", 0, cut))
        # Step back to the previous word, unless that throws away most of the text.
        if space > cut // 2:
            cut = space
    if cut == 0:  # the text starts with a URL longer than the limit: nothing else to cut
        cut = limit
    return text[:cut].rstrip(" \t\n,;:-")


def money(price: float | None, currency: str | None = None) -> str:
    """``49.90 EUR`` (empty for an unknown price). Used by the templates."""
    if price is None:
        return ""
    return f"{price:,.2f} {currency}" if currency else f"{price:,.2f}"


# ---------------------------------------------------------------------------------------------
# Templates
# ---------------------------------------------------------------------------------------------
def template_name(channel: str, template: str, part: str) -> str:
    """The template's path relative to ``serving.templates_dir``: ``email/default.html.j2``."""
    return f"{channel}/{template}.{part}.j2"


def item_block_name(name: str) -> str:
    """The item-block template of a part: ``email/default.html.j2`` -> ``email/default.item.html.j2``."""
    stem, part, suffix = name.rsplit(".", 2)
    return f"{stem}.item.{part}.{suffix}"


def _autoescape(name: str | None) -> bool:
    return name is not None and name.endswith(".html.j2")


def _web_url_filter(schemes: frozenset[str]) -> Callable[[str | None], str]:
    def web_url(url: str | None) -> str:
        # In templates a refused URL is "" (falsy), so `{% if item.deep_link|safe_url %}` works.
        return safe_url(url, schemes) or ""

    return web_url


# The loop variable's documented attributes that are plain numbers and flags.
_LOOP_ATTRIBUTES = frozenset(
    {"index", "index0", "revindex", "revindex0", "first", "last", "length", "depth", "depth0"}
)


class _PayloadSandbox(ImmutableSandboxedEnvironment):
    def getattr(self, obj: Any, attribute: str) -> Any:
        if type(obj) is TemplateRecord and attribute in obj:
            return obj[attribute]
        # `loop.index` in a list of items: the sandbox's generic checks cost more than the
        # template's own work there (a sixth of an email's rendering), for attributes that are
        # known plain values.
        if type(obj) is jinja2.runtime.LoopContext and attribute in _LOOP_ATTRIBUTES:
            return getattr(obj, attribute)
        return super().getattr(obj, attribute)

    def make_globals(self, d: MutableMapping[str, Any] | None) -> MutableMapping[str, Any]:
        # A plain dict, not Jinja's ChainMap over the environment's globals: every render copies
        # the globals into a new context, and iterating a ChainMap (pure Python) cost nine times
        # more than running these small templates (serve's profile). Nothing changes the
        # environment's globals after _build_environment, so a copy taken at load is the same.
        return {**self.globals, **(d or {})}


def _build_environment(texts: Mapping[str, str], web_schemes: frozenset[str]) -> jinja2.Environment:
    def load(name: str) -> tuple[str, str, Callable[[], bool]] | None:
        # Report the template's own name as its file name: errors and tracebacks then name it.
        return (texts[name], name, lambda: True) if name in texts else None

    # Sandboxed: templates are edited by campaign owners and must not reach Python internals.
    env = _PayloadSandbox(
        loader=jinja2.FunctionLoader(load),
        undefined=jinja2.StrictUndefined,
        autoescape=_autoescape,
        trim_blocks=True,
        lstrip_blocks=True,
        auto_reload=False,
    )
    env.filters["safe_url"] = _web_url_filter(web_schemes)
    env.filters["money"] = money
    env.globals["item_blocks"] = _item_blocks_function(env)
    return env


# An item block is rendered once per distinct product and reused: the same product's markup recurs
# in thousands of a campaign's payloads. Bounded (oldest out first), since a worker lives long.
_ITEM_BLOCK_CACHE_SIZE = 100_000
# What an item block sees of its item: neither its score nor its rank, which differ per payload
# (the including template numbers the blocks with loop.index).
ITEM_BLOCK_FIELDS: tuple[str, ...] = ("item_id", "strategy", *CATALOG_ITEM_FIELDS)


def _item_blocks_function(env: jinja2.Environment) -> Callable[..., list[str]]:
    cache: OrderedDict[tuple[Any, ...], str] = OrderedDict()
    seen_fields = operator.itemgetter(*ITEM_BLOCK_FIELDS)

    @jinja2.pass_context
    def item_blocks(context: jinja2.runtime.Context, items: Sequence[Mapping[str, Any]]) -> list[str]:
        """``{% for block in item_blocks(items) %}``: each item rendered by the part's item-block
        template (:func:`item_block_name`). The block sees ``item`` (without ``score`` and
        ``rank``), ``campaign`` and ``channel`` - nothing of the user - so each block is rendered
        once per product and reused across payloads. One call per part, not per item: a
        sandboxed call costs more than a lookup."""
        name = item_block_name(context.name or "")
        campaign, channel = context.get("campaign"), context.get("channel")
        escaped = _autoescape(name)
        blocks = []
        for item in items:
            values = seen_fields(item)
            key = (name, campaign, channel, values)
            block = cache.get(key)
            if block is None:
                record = TemplateRecord(zip(ITEM_BLOCK_FIELDS, values, strict=True))
                text = env.get_template(name).render(item=record, campaign=campaign, channel=channel)
                # Autoescaped output is markup already: the including template must not escape it.
                block = Markup(text) if escaped else text
                if len(cache) >= _ITEM_BLOCK_CACHE_SIZE:
                    # popitem, not del of next(iter()): finding a dict's first key skips every
                    # slot deleted before it, so each eviction was slower than the last.
                    cache.popitem(last=False)
                cache[key] = block
            blocks.append(block)
        return blocks

    return item_blocks


# Python workers are reused across tasks: compiled templates are kept per set of template texts.
_ENVIRONMENTS: dict[str, jinja2.Environment] = {}


def _environment(texts: Mapping[str, str], web_schemes: frozenset[str]) -> jinja2.Environment:
    digest = hashlib.sha256(",".join(sorted(web_schemes)).encode())
    for name in sorted(texts):
        digest.update(f"{len(name)}:{name}{len(texts[name])}:{texts[name]}".encode())
    key = digest.hexdigest()
    env = _ENVIRONMENTS.get(key)
    if env is None:
        if len(_ENVIRONMENTS) >= 8:
            _ENVIRONMENTS.clear()
        env = _ENVIRONMENTS[key] = _build_environment(texts, web_schemes)
    return env


def _template_line(err: BaseException, name: str) -> int | None:
    """The template line that raised, from the traceback Jinja rewrites to template lines."""
    line = getattr(err, "lineno", None)
    tb = err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == name:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


class TemplateRecord(dict):
    """The payload's own data (items, user): plain values that templates read as ``item.title``.

    The sandbox reads these keys directly. Its attribute checks would otherwise take most of the
    rendering time, and plain strings and numbers have nothing to guard.
    """

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class PayloadRenderer:
    """Renders payload templates from template *texts*, so executors need no access to the files.

    Pickles as its texts and limits. The compiled Jinja environment is rebuilt, and cached, in
    each Python worker. ``reference_campaigns``: the campaigns whose payloads carry a template
    reference instead of rendered content (``campaigns.<name>.content: reference``).
    """

    def __init__(
        self,
        texts: Mapping[str, str],
        *,
        sms_max_segments: int,
        push_max_items: int,
        origin: str = "<memory>",
        deep_link_schemes: Iterable[str] = WEB_URL_SCHEMES,
        reference_campaigns: Iterable[str] = (),
    ) -> None:
        self.texts: dict[str, str] = dict(texts)
        self.sms_max_segments = sms_max_segments
        self.push_max_items = push_max_items
        self.origin = origin
        self.reference_campaigns = frozenset(reference_campaigns)
        # Links on app channels and in payload items: any listed scheme; on web channels: http(s).
        self.link_schemes = frozenset(s.lower() for s in deep_link_schemes) - BLOCKED_URL_SCHEMES
        self.web_link_schemes = self.link_schemes & WEB_URL_SCHEMES
        self._env: jinja2.Environment | None = None

    @classmethod
    def from_directory(
        cls,
        templates_dir: str | Path,
        *,
        sms_max_segments: int,
        push_max_items: int,
        deep_link_schemes: Iterable[str] = WEB_URL_SCHEMES,
        reference_campaigns: Iterable[str] = (),
    ) -> PayloadRenderer:
        """Read every ``*.j2`` under ``templates_dir``, keyed by relative path (so includes work)."""
        root = Path(templates_dir)
        if not root.is_dir():
            raise TemplateCheckError(f"templates folder not found: {root}")
        texts = {p.relative_to(root).as_posix(): p.read_text(encoding="utf-8") for p in root.rglob("*.j2")}
        return cls(
            texts,
            sms_max_segments=sms_max_segments,
            push_max_items=push_max_items,
            origin=str(root),
            deep_link_schemes=deep_link_schemes,
            reference_campaigns=reference_campaigns,
        )

    @classmethod
    def from_config(cls, cfg: CarouselConfig) -> PayloadRenderer:
        serving = cfg.serving
        return cls.from_directory(
            serving.templates_dir,
            sms_max_segments=serving.sms_max_segments,
            push_max_items=serving.push_max_items,
            deep_link_schemes=serving.deep_link_schemes,
            reference_campaigns=[n for n, c in cfg.campaigns.items() if c.content == "reference"],
        )

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_env": None}

    @property
    def environment(self) -> jinja2.Environment:
        if self._env is None:
            self._env = _environment(self.texts, self.web_link_schemes)
        return self._env

    def compile(self, name: str) -> None:
        """Load and compile one template; raises :class:`TemplateCheckError` naming file and line."""
        if name not in self.texts:
            raise TemplateCheckError(f"missing template {self.origin}/{name}")
        try:
            self.environment.get_template(name)
        except jinja2.TemplateSyntaxError as err:
            raise TemplateCheckError(
                f"template {self.origin}/{name} line {err.lineno}: {err.message}"
            ) from None

    def render(self, name: str, context: Mapping[str, Any]) -> str:
        """Render one template; any failure names the template, the line and the reason."""
        if name not in self.texts:
            raise PayloadError(f"missing template {self.origin}/{name}")
        try:
            return self.environment.get_template(name).render(context)
        except jinja2.TemplateSyntaxError as err:
            raise PayloadError(f"template {name} line {err.lineno}: {err.message}") from None
        except (
            jinja2.TemplateError,
            TypeError,
            ValueError,
            ArithmeticError,
            LookupError,
            AttributeError,
        ) as err:
            line = _template_line(err, name)
            where = f"template {name}" + (f" line {line}" if line else "")
            raise PayloadError(f"{where}: {type(err).__name__}: {err}") from err


# ---------------------------------------------------------------------------------------------
# Rendering one payload (pure)
# ---------------------------------------------------------------------------------------------
def _describe(request: Mapping[str, Any]) -> str:
    return (
        f"payload {request.get('payload_id')!r} (campaign {request.get('campaign')!r}, "
        f"user {request.get('user_id')!r})"
    )


def _iso_utc(value: Any, ref: str) -> str:
    if not isinstance(value, datetime):
        raise PayloadError(f"{ref}: created_at must be a timestamp, got {value!r}")
    if value.tzinfo is None:  # Spark hands out naive datetimes in the session time zone (UTC)
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _optional_number(value: Any) -> float | None:
    # A NaN or infinite catalog price/rating is unknown, and JSON cannot carry it anyway.
    if value is None or isinstance(value, bool):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _optional_text(value: Any) -> str | None:
    return None if value is None else str(value)


def _deep_link(value: Any, schemes: frozenset[str]) -> str | None:
    """The catalog's deep link as uploaded, or None when it has none or its scheme is not listed."""
    text = _optional_text(value)
    return text if safe_url(text, schemes) else None


def _item_catalog_fields(values: tuple[Any, ...], link_schemes: frozenset[str]) -> dict[str, Any]:
    """A payload item's catalog fields (:data:`CATALOG_ITEM_FIELDS`, in order) from their raw values:
    texts as text, non-finite numbers as None, a deep link whose scheme is not listed as None."""
    title, description, category, price, currency, rating, image_url, deep_link = values
    return {
        "title": _optional_text(title),
        "description": _optional_text(description),
        "category": _optional_text(category),
        "price": _optional_number(price),
        "currency": _optional_text(currency),
        "rating": _optional_number(rating),
        "image_url": _optional_text(image_url),
        "deep_link": _deep_link(deep_link, link_schemes),
    }


def _catalog_part(raw: Mapping[str, Any], link_schemes: frozenset[str]) -> dict[str, Any]:
    """The cleaned catalog fields of one item that carries them (a missing one is unknown)."""
    return _item_catalog_fields(tuple(raw.get(name) for name in CATALOG_ITEM_FIELDS), link_schemes)


def _payload_items(
    raw_items: Sequence[Mapping[str, Any]],
    ref: str,
    link_schemes: frozenset[str],
    catalog: CatalogItems | None = None,
) -> list[TemplateRecord]:
    """The payload's items, checked and in rank order. Their catalog fields come from ``catalog``
    when given (the raw items then need only the ranking's fields), else from the raw items."""
    items = []
    for position, raw in enumerate(raw_items):
        item_id, rank, strategy = raw.get("item_id"), raw.get("rank"), raw.get("strategy")
        if not isinstance(item_id, str) or not item_id:
            raise PayloadError(f"{ref}: item {position}: item_id is missing")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise PayloadError(
                f"{ref}: item {position} ({item_id}): rank must be an integer >= 1, got {rank!r}"
            )
        if strategy not in STRATEGIES:
            raise PayloadError(
                f"{ref}: item {position} ({item_id}): unknown strategy {strategy!r}; "
                f"known: {list(STRATEGIES)}"
            )
        score = raw.get("score")
        if score is not None and (isinstance(score, bool) or not math.isfinite(float(score))):
            raise PayloadError(
                f"{ref}: item {position} ({item_id}): score must be a finite number, got {score!r}"
            )
        items.append(
            TemplateRecord(
                item_id=item_id,
                rank=rank,
                score=None if score is None else float(score),
                strategy=strategy,
                **(
                    _catalog_part(raw, link_schemes)
                    if catalog is None
                    else catalog.payload_fields(item_id, link_schemes)
                ),
            )
        )
    items.sort(key=lambda item: item["rank"])
    ranks = [item["rank"] for item in items]
    if len(set(ranks)) != len(ranks):
        raise PayloadError(f"{ref}: duplicate ranks {ranks}")
    return items


def _render_parts(
    renderer: PayloadRenderer, channel: str, template: str, context: Mapping[str, Any], ref: str
) -> dict[str, str]:
    parts = {}
    for part in TEMPLATE_PARTS[channel]:
        name = template_name(channel, template, part)
        try:
            text = renderer.render(name, context).strip()
        except PayloadError as err:
            raise PayloadError(f"{ref}: {err}") from err.__cause__
        if not text and part not in OPTIONAL_PARTS:
            raise PayloadError(f"{ref}: template {name} rendered an empty {part}")
        parts[part] = text
    return parts


def _card(item: Mapping[str, Any], link_schemes: frozenset[str]) -> dict[str, Any]:
    return {
        "item_id": item["item_id"],
        "title": item["title"] or "",
        "description": item["description"],
        "price_text": money(item["price"], item["currency"]) or None,
        "rating": item["rating"],
        "image_url": safe_url(item["image_url"]),
        "deep_link": safe_url(item["deep_link"], link_schemes),
    }


def _content(
    renderer: PayloadRenderer, channel: str, parts: Mapping[str, str], items: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    app_links = renderer.link_schemes if channel in APP_LINK_CHANNELS else renderer.web_link_schemes
    if channel == PUSH:
        shown = items[: renderer.push_max_items]
        return {
            "title": one_line(parts["title"]),
            "body": parts["body"],
            "deep_link": safe_url(items[0]["deep_link"], app_links),
            "image_url": safe_url(items[0]["image_url"]),
            "carousel": [
                {
                    "item_id": item["item_id"],
                    "title": item["title"] or "",
                    "image_url": safe_url(item["image_url"]),
                    "deep_link": safe_url(item["deep_link"], app_links),
                }
                for item in shown
            ],
        }
    if channel in CLIENT_LAYOUTS:
        return {
            "layout": CLIENT_LAYOUTS[channel],
            "title": one_line(parts["title"]),
            "body": parts["body"],
            "cards": [_card(item, app_links) for item in items],
        }
    if channel == EMAIL:
        # One line: a catalog string with a line break must not add mail headers.
        return {"subject": one_line(parts["subject"]), "html": parts["html"], "text": parts["txt"]}
    if channel == SMS:
        return {"text": fit_sms(one_line(parts["txt"]), renderer.sms_max_segments)}
    return {"title": one_line(parts["title"])}  # webhook: the receiver works from `items`


def _reference_content(template: str, user: Mapping[str, Any]) -> dict[str, Any]:
    """An email's content as a template reference: the sender renders its own template named
    ``template`` from the payload's ``items`` and this ``user`` (what carousel's templates see)."""
    return {"template": template, "user": {name: user[name] for name in USER_FIELDS}}


def render_payload(
    request: Mapping[str, Any], renderer: PayloadRenderer, catalog: CatalogItems | None = None
) -> dict[str, Any]:
    """The payload (a JSON-ready dict, contract ``schema_version`` 1) for one render request.

    ``request`` has the fields of :data:`PAYLOAD_REQUEST_SCHEMA`; with ``catalog``, its items need
    only the ranking's fields (:data:`RANKED_ITEM_FIELDS`), and the catalog's come from it.
    ``created_at`` is a datetime, and a naive one is read as UTC. A campaign of
    ``renderer.reference_campaigns`` gets the template reference as its content
    (:func:`_reference_content`), and nothing is rendered. Raises :class:`PayloadError` naming the
    payload and the reason for an unknown channel or strategy, missing fields, no items, or a
    template that fails or renders an empty required part.
    """
    ref = _describe(request)
    channel = request.get("channel")
    if channel not in TEMPLATE_PARTS:
        raise PayloadError(f"{ref}: unknown channel {channel!r}; known: {list(CHANNELS)}")
    for required in ("payload_id", "campaign", "template", "variant", "user_id"):
        if not request.get(required):
            raise PayloadError(f"{ref}: {required} is missing")
    items = _payload_items(request.get("items") or (), ref, renderer.link_schemes, catalog)
    if not items:
        raise PayloadError(f"{ref}: no items to send")
    created_at = _iso_utc(request.get("created_at"), ref)
    attributes = request.get("user") or {}
    user = TemplateRecord(user_id=request["user_id"], **{name: attributes.get(name) for name in USER_FIELDS})
    context = {
        "user": user,
        "items": items,
        "campaign": request["campaign"],
        "channel": channel,
        "variant": request["variant"],
        "trigger_event_type": request.get("trigger_event_type"),
    }
    if request["campaign"] in renderer.reference_campaigns:
        content = _reference_content(request["template"], user)
    else:
        parts = _render_parts(renderer, channel, request["template"], context, ref)
        content = _content(renderer, channel, parts, items)
    return {
        "payload_id": request["payload_id"],
        "schema_version": PAYLOAD_SCHEMA_VERSION,
        "campaign": request["campaign"],
        "channel": channel,
        "variant": request["variant"],
        "user_id": request["user_id"],
        "trigger_event_id": request.get("trigger_event_id"),
        "trigger_event_type": request.get("trigger_event_type"),
        "run_id": request.get("run_id"),
        "model_version": request.get("model_version"),
        "created_at": created_at,
        "items": items,
        "content": content,
    }


def payload_json(payload: Mapping[str, Any]) -> str:
    """The payload as compact UTF-8 JSON (what goes on the topic).

    orjson (:func:`carousel.fastjson.compact_json`), not ``json``: the encoding was a fifth of a
    campaign's Python time. Payload numbers are checked finite when the request is read
    (:func:`_payload_items`), so orjson's NaN -> null never applies; a value JSON cannot carry
    raises :class:`ValueError`."""
    return compact_json(payload)


# ---------------------------------------------------------------------------------------------
# JSON Schemas
# ---------------------------------------------------------------------------------------------
def schema_path(schemas_dir: str | Path, channel: str) -> Path:
    return Path(schemas_dir) / f"{channel}.schema.json"


@lru_cache(maxsize=64)
def _validator(schemas_dir: str, channel: str) -> Draft202012Validator:
    """The channel's validator. References between the folder's schemas resolve offline, by ``$id``."""
    folder = Path(schemas_dir)
    path = schema_path(folder, channel)
    if not path.is_file():
        raise TemplateCheckError(f"payload schema not found: {path}")
    resources, documents = [], {}
    for file in sorted(folder.glob("*.schema.json")):
        try:
            document = json.loads(file.read_text(encoding="utf-8"))
            Draft202012Validator.check_schema(document)
        except json.JSONDecodeError as err:
            raise TemplateCheckError(f"payload schema {file} is not valid JSON: {err}") from None
        except SchemaError as err:
            raise TemplateCheckError(f"payload schema {file} is invalid: {err.message}") from None
        if "$id" not in document:
            raise TemplateCheckError(f"payload schema {file} has no $id")
        resources.append((document["$id"], Resource.from_contents(document)))
        documents[file.name] = document
    registry = Registry().with_resources(resources)
    schema = documents[path.name]
    return Draft202012Validator(schema, registry=registry, format_checker=Draft202012Validator.FORMAT_CHECKER)


def validate_payload(payload: Mapping[str, Any], channel: str, schemas_dir: str | Path) -> None:
    """Check ``payload`` against ``<schemas_dir>/<channel>.schema.json``.

    Raises :class:`PayloadError` that names the payload and lists every violation with its JSON
    path. Raises :class:`TemplateCheckError` when the schema is missing or broken.
    """
    validator = _validator(str(schemas_dir), channel)
    try:
        errors = sorted(validator.iter_errors(payload), key=lambda e: e.json_path)
    except Unresolvable as err:
        raise TemplateCheckError(f"payload schema {schema_path(schemas_dir, channel)}: {err}") from None
    if errors:
        problems = "; ".join(f"{e.json_path}: {e.message}" for e in errors[:10])
        more = f" (and {len(errors) - 10} more)" if len(errors) > 10 else ""
        raise PayloadError(
            f"payload {payload.get('payload_id')!r} does not match {channel}.schema.json: {problems}{more}"
        )


# ---------------------------------------------------------------------------------------------
# Start-up check
# ---------------------------------------------------------------------------------------------
def sample_request(
    campaign_name: str, channel: str, template: str = "default", items: int = 3, sparse: bool = False
) -> dict[str, Any]:
    """A representative request for trial renders. With ``sparse``, every nullable field is null."""
    sample_items = [
        {
            "item_id": f"sample-{n}",
            "rank": n,
            "score": None if sparse else 1.0 / n,
            "strategy": STRATEGIES[(n - 1) % len(STRATEGIES)],
            **(
                dict.fromkeys(CATALOG_ITEM_FIELDS)
                if sparse
                else {
                    "title": f"Sample product {n}",
                    "description": "A sample description.",
                    "category": "sample",
                    "price": 19.99 * n,
                    "currency": "EUR",
                    "rating": 4.5,
                    "image_url": f"https://img.example.com/sample-{n}.jpg",
                    "deep_link": f"https://shop.example.com/p/sample-{n}",
                }
            ),
        }
        for n in range(1, items + 1)
    ]
    user = (
        dict.fromkeys(USER_FIELDS)
        if sparse
        else {
            "age": 31,
            "gender": "f",
            "city": "Lisbon",
            "country": "PT",
            "language": "pt",
            "platform": "ios",
        }
    )
    return {
        "payload_id": f"sample-{campaign_name}",
        "campaign": campaign_name,
        "channel": channel,
        "template": template,
        "variant": "default",
        "user_id": "sample-user",
        "trigger_event_id": None,
        "trigger_event_type": None,
        "run_id": None if sparse else "sample-run",
        "model_version": None,
        "created_at": datetime(2026, 1, 1, tzinfo=UTC),
        "user": user,
        "items": sample_items,
    }


def _campaign_problems(
    renderer: PayloadRenderer, cfg: CarouselConfig, name: str, campaign: CampaignConfig
) -> list[str]:
    channel, template = campaign.channel, campaign.template
    label = f"campaign {name} ({channel}/{template})"
    problems = []
    # A campaign whose payloads carry a template reference renders nothing here: the sender holds
    # the template. Its sample payloads are still checked against the schema below.
    rendered_here = name not in renderer.reference_campaigns
    for part in TEMPLATE_PARTS[channel] if rendered_here else ():
        try:
            renderer.compile(template_name(channel, template, part))
        except TemplateCheckError as err:
            problems.append(f"{label}: {err}")
    # Links written into the campaign's templates: only listed schemes (web channels: http(s)).
    schemes = renderer.link_schemes if channel in APP_LINK_CHANNELS else renderer.web_link_schemes
    for file in sorted(n for n in renderer.texts if rendered_here and n.startswith(f"{channel}/{template}.")):
        for problem in template_link_problems(renderer.texts[file], schemes):
            problems.append(f"{label}: template {renderer.origin}/{file} {problem}")
    try:
        _validator(cfg.serving.payload_schemas_dir, channel)
    except TemplateCheckError as err:
        problems.append(f"{label}: {err}")
    if problems:
        return problems
    # Trial renders catch what compiling cannot: undefined variables, and templates that fail on
    # null catalog fields or on a single item.
    samples = {
        f"{campaign.items} full items": sample_request(name, channel, template, campaign.items),
        "1 item with null fields": sample_request(name, channel, template, 1, sparse=True),
    }
    for what, request in samples.items():
        try:
            validate_payload(render_payload(request, renderer), channel, cfg.serving.payload_schemas_dir)
        except (PayloadError, TemplateCheckError) as err:
            problems.append(f"{label}, sample with {what}: {err}")
    return problems


def check_templates(cfg: CarouselConfig) -> PayloadRenderer:
    """Check every enabled campaign's templates and payload schema. Returns the loaded renderer.

    Every part must exist and compile. Two trial renders must then pass the channel's JSON Schema:
    one with the campaign's item count, and one with a single item whose fields are all null.
    Raises :class:`TemplateCheckError` that lists every problem, each naming the file.
    """
    try:
        renderer = PayloadRenderer.from_config(cfg)
    except TemplateCheckError as err:
        raise TemplateCheckError(f"payload templates are not usable: {err}") from None
    problems = [
        problem
        for name, campaign in sorted(cfg.campaigns.items())
        if campaign.enabled
        for problem in _campaign_problems(renderer, cfg, name, campaign)
    ]
    if len(problems) == 1:
        raise TemplateCheckError(
            f"payload template of an enabled campaign is missing or invalid: {problems[0]}"
        )
    if problems:
        raise TemplateCheckError(
            "payload templates of enabled campaigns are missing or invalid:\n  - " + "\n  - ".join(problems)
        )
    return renderer


# ---------------------------------------------------------------------------------------------
# Spark glue
# ---------------------------------------------------------------------------------------------
def _missing_request_fields(
    schema: StructType, item_fields: Sequence[str] = PAYLOAD_ITEM_FIELDS
) -> list[str]:
    missing = [name for name in REQUEST_COLUMNS if name not in schema.fieldNames()]
    for column, fields in (("user", USER_FIELDS), ("items", item_fields)):
        if column not in schema.fieldNames():
            continue
        data_type = schema[column].dataType
        element = data_type.elementType if isinstance(data_type, ArrayType) else data_type
        present = element.fieldNames() if isinstance(element, StructType) else []
        missing.extend(f"{column}.{name}" for name in fields if name not in present)
    return missing


def _render_rows(
    rows: Sequence[dict[str, Any]],
    renderer: PayloadRenderer,
    topics: Mapping[str, str],
    catalog: CatalogItems | None = None,
) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {name: [] for name in _ARROW_OUTPUT_SCHEMA.names}
    for row in rows:
        micros = row["created_at"]
        row["created_at"] = None if micros is None else _EPOCH + timedelta(microseconds=micros)
        payload = render_payload(row, renderer, catalog)
        channel = payload["channel"]
        if channel not in topics:
            raise PayloadError(f"{_describe(row)}: kafka.topics.{channel} is not configured")
        try:
            value = payload_json(payload)
        except ValueError as err:
            raise PayloadError(f"{_describe(row)}: not serialisable as JSON: {err}") from None
        out["topic"].append(topics[channel])
        out["key"].append(payload["user_id"])
        out["value"].append(value)
        out["payload_id"].append(payload["payload_id"])
        out["channel"].append(channel)
        out["campaign"].append(payload["campaign"])
    return out


def render_payloads(
    requests: DataFrame,
    cfg: CarouselConfig,
    renderer: PayloadRenderer | None = None,
    catalog: Broadcast[CatalogItems] | None = None,
) -> DataFrame:
    """Render each request row into a Kafka-ready row of :data:`PAYLOAD_OUTPUT_SCHEMA`.

    ``requests`` carries the columns of :data:`PAYLOAD_REQUEST_SCHEMA`; extra columns are ignored.
    With ``catalog`` (a broadcast :class:`CatalogItems`), the items need only the ranking's fields
    (:data:`RANKED_ITEM_FIELDS`): the executors fill in the catalog fields, so a campaign joins
    nothing and groups nothing before rendering. ``renderer`` is the one :func:`check_templates`
    returned at start. Without it, the templates are read from ``serving.templates_dir`` now.
    Rendering runs in Python on the executors (``mapInArrow``), one Arrow batch at a time. A
    request that cannot be rendered fails the task with a :class:`PayloadError` naming the payload.
    """
    item_fields = RANKED_ITEM_FIELDS if catalog is not None else PAYLOAD_ITEM_FIELDS
    missing = _missing_request_fields(requests.schema, item_fields)
    if missing:
        raise ValueError(
            f"render requests lack columns {missing}; expected {PAYLOAD_REQUEST_SCHEMA.simpleString()}"
        )
    renderer = renderer or PayloadRenderer.from_config(cfg)
    topics = {channel: cfg.kafka.topics[channel].name for channel in CHANNELS if channel in cfg.kafka.topics}
    user = F.struct(*[F.col("user")[name].alias(name) for name in USER_FIELDS])
    items = F.transform("items", lambda i: F.struct(*[i[name].alias(name) for name in item_fields]))
    # created_at travels as epoch microseconds: unambiguous in Arrow, whatever the session time zone.
    # user and items are rebuilt by name, so the field order of the caller's structs does not matter.
    special = {"created_at": F.unix_micros(F.col("created_at")), "user": user, "items": items}
    columns = [special.get(name, F.col(name)).alias(name) for name in REQUEST_COLUMNS]

    def render_batches(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        items_source = catalog.value if catalog is not None else None
        for batch in batches:
            rendered = _render_rows(batch_rows(batch), renderer, topics, items_source)
            yield pa.RecordBatch.from_pydict(rendered, schema=_ARROW_OUTPUT_SCHEMA)

    return requests.select(*columns).mapInArrow(render_batches, PAYLOAD_OUTPUT_SCHEMA)
