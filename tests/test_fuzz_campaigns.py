"""Property-based fuzzing of campaign definitions, from a YAML file to the rules that rank with them.

Hypothesis writes thousands of ``campaigns:`` sections as a marketer might get them wrong: every
key of a campaign (channel, template, trigger types, items, filters with property predicates,
exclusions, A/B variants and the control share, the batch segment) absent, good, out of range, of
the wrong YAML type or unknown, and campaign names that are not plain. Each file is loaded the way
every job loads its configuration (``load_config``):

- a bad definition stops the load with a ``ConfigError`` naming ``campaigns.<name>`` or the
  campaign names, never another exception;
- a good one yields campaigns whose A/B arms partition [0, 1) (so every user gets exactly one
  arm, and the same one in Python and in Spark's formula), whose ranking rules build, and whose
  filters pick exactly the catalog products an oracle written here, independently of
  ``carousel.ranking.eligible_mask``, says they pick.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from carousel.config import CampaignConfig, CampaignFilters, ConfigError, PropertyPredicate, load_config
from carousel.experiments import arms, assign_variant
from carousel.ranking import RankingRules, eligible_mask
from carousel.schemas import EVENT_TYPES

ABSENT = object()
CHANNELS = ("push", "in_app", "web_popup", "app_inbox", "email", "sms", "webhook")
OPS = ("eq", "ne", "in", "not_in", "gt", "ge", "lt", "le", "contains")

# ---------------------------------------------------------------------------------------------
# Generators
# ---------------------------------------------------------------------------------------------
junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 100),
    st.floats(-2, 60, allow_nan=False),
    st.text(max_size=6),
    st.lists(st.integers(0, 3), max_size=2),
    st.dictionaries(st.sampled_from(["x", "share"]), st.integers(0, 2), max_size=1),
)


def maybe(
    valid: st.SearchStrategy[Any], invalid: st.SearchStrategy[Any] | None = None
) -> st.SearchStrategy[Any]:
    """A key's value: mostly valid, else absent, a wrong value of the right type, or junk of any
    YAML type (rare enough that a definition is often good as a whole)."""

    def pick(roll: int) -> st.SearchStrategy[Any]:
        if roll < 1:
            return junk
        if roll < 3 and invalid is not None:
            return invalid
        if roll < 15:
            return st.just(ABSENT)
        return valid

    return st.integers(0, 99).flatmap(pick)


def section(**fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """A mapping of ``fields`` (absent ones left out), rarely with a key nobody knows."""
    extra = st.integers(0, 49).map(lambda roll: {"colour": "red"} if roll == 0 else {})
    return st.builds(
        lambda values, unknown: {k: v for k, v in values.items() if v is not ABSENT} | unknown,
        st.fixed_dictionaries(fields),
        extra,
    )


def _predicate(op: str) -> st.SearchStrategy[dict[str, Any]]:
    if op in ("in", "not_in"):
        value: st.SearchStrategy[Any] = st.lists(st.sampled_from(["acme", "zeta", "red", 5, 2.5]), max_size=3)
    elif op in ("gt", "ge", "lt", "le"):
        value = st.one_of(st.integers(0, 10), st.floats(0, 10, allow_nan=False))
    else:
        value = st.one_of(
            st.sampled_from(["acme", "zeta", "red", "true", "5", "a"]), st.integers(0, 5), st.booleans()
        )
    return st.fixed_dictionaries(
        {
            "property": st.sampled_from(["brand", "colour", "price", "rating", "category", "in_stock"]),
            "op": st.just(op),
            "value": value,
        }
    )


predicate = maybe(
    st.sampled_from(OPS).flatmap(_predicate),
    st.sampled_from(
        [
            {"property": "brand", "op": "gt", "value": "acme"},
            {"property": "brand", "op": "in", "value": "acme"},
            {"property": "brand", "op": "eq", "value": ["acme"]},
            {"property": "9bad", "op": "eq", "value": "x"},
            {"property": "brand", "op": "like", "value": "a"},
        ]
    ),
)
prices = st.floats(0, 60, allow_nan=False)
filters = section(
    categories=maybe(st.lists(st.sampled_from(["shoes", "bags", "hats"]), max_size=2)),
    in_stock_only=maybe(st.booleans()),
    min_price=maybe(prices, st.just(-1)),
    max_price=maybe(prices, st.just(-0.5)),
    min_rating=maybe(st.floats(0, 5, allow_nan=False), st.just(-1)),
    where=maybe(st.lists(predicate, max_size=3).map(lambda ps: [p for p in ps if p is not ABSENT])),
)
days = st.floats(0, 30, allow_nan=False)
exclusions = section(
    viewed_within_days=maybe(days, st.just(-1)),
    purchased_within_days=maybe(days, st.just(-2)),
    sent_within_days=maybe(days, st.just(-0.5)),
    item_ids=maybe(st.lists(st.sampled_from(["a", "b"]), max_size=2)),
)
segment = section(
    last_seen_within_days=maybe(st.floats(0.5, 60, allow_nan=False), st.just(0)),
    platforms=maybe(st.lists(st.sampled_from(["android", "ios"]), max_size=2)),
    countries=maybe(st.lists(st.sampled_from(["PT", "DE"]), max_size=2)),
    min_age=maybe(st.integers(0, 80), st.just(-1)),
    max_age=maybe(st.integers(0, 80), st.just(-3)),
    purchased_at_least=maybe(st.integers(1, 3), st.just(0)),
)


def _arms(control: float, names: list[str]) -> dict[str, Any]:
    """A control share and variants whose shares add up to 1 with it."""
    arms_: dict[str, Any] = {"control_share": control}
    if names:
        share = (1 - control) / len(names)
        arms_["variants"] = [
            {"name": name, "share": share, "strategy": "trending" if name == "trending" else "model"}
            for name in names
        ]
    return arms_


split = st.builds(
    _arms,
    st.sampled_from([0, 0.1, 0.5]),
    st.lists(st.sampled_from(["model", "trending", "b", "c"]), max_size=3, unique=True),
)
bad_split = st.sampled_from(
    [
        {"variants": [{"name": "a", "share": 0.4}]},  # shares short of 1
        {"variants": [{"name": "a", "share": 0.5}, {"name": "a", "share": 0.5}]},  # a name twice
        {"variants": [{"name": "control", "share": 1}]},  # the reserved name
        {"variants": [{"name": "bad name", "share": 1}]},
        {"variants": [{"name": "a", "share": 0}]},
        {"control_share": 1},
        {"control_share": -0.1},
    ]
)
campaign = st.builds(
    # The arms: a split, none, or junk given as the variants.
    lambda base, arms_: (
        base | (arms_ if isinstance(arms_, dict) else {} if arms_ is ABSENT else {"variants": arms_})
    ),
    section(
        channel=maybe(st.sampled_from(CHANNELS), st.just("fax")),
        template=maybe(st.sampled_from(["default", "compact"]), st.sampled_from(["no good", ""])),
        trigger_event_types=maybe(
            st.lists(st.sampled_from(EVENT_TYPES), max_size=2), st.just(["Product Teleported"])
        ),
        items=maybe(st.integers(1, 50), st.sampled_from([-1, 0, 60])),
        filters=maybe(filters),
        exclusions=maybe(exclusions),
        fallback=maybe(st.sampled_from(["trending", "trending_category", "none"]), st.just("random")),
        segment=maybe(segment),
        enabled=maybe(st.booleans()),
    ),
    maybe(split, bad_split),
)
campaign_names = st.integers(0, 19).flatmap(
    lambda roll: (
        st.sampled_from(["", "spring sale", "a/b"])
        if roll == 0
        else st.sampled_from(["spring-sale", "w2", "x_1"])
    )
)
campaign_sections = st.dictionaries(campaign_names, campaign, min_size=1, max_size=3)

# ---------------------------------------------------------------------------------------------
# The catalog the filters run on, and the oracle of what they pick
# ---------------------------------------------------------------------------------------------
PRODUCTS = [
    # item, category, in_stock, price, rating, active, properties
    ("a", "shoes", True, 10.0, 4.5, True, {"brand": "acme", "colour": "red"}),
    ("b", "shoes", False, 25.0, 3.0, True, {"brand": "zeta"}),
    ("c", "bags", None, 5.0, None, True, {"colour": "5"}),
    ("d", "bags", True, None, 2.0, True, None),
    ("e", None, True, 40.0, 5.0, True, {"brand": "acme"}),
    ("f", "hats", True, 2.5, 1.0, False, {"brand": "acme"}),
]
CATALOG = pa.table(
    {
        "item_id": [p[0] for p in PRODUCTS],
        "title": [f"Product {p[0]}" for p in PRODUCTS],
        "description": [None] * len(PRODUCTS),
        "category": [p[1] for p in PRODUCTS],
        "in_stock": pa.array([p[2] for p in PRODUCTS], pa.bool_()),
        "price": pa.array([p[3] for p in PRODUCTS], pa.float64()),
        "currency": ["EUR"] * len(PRODUCTS),
        "rating": pa.array([p[4] for p in PRODUCTS], pa.float64()),
        "image_url": [None] * len(PRODUCTS),
        "deep_link": [None] * len(PRODUCTS),
        "properties": pa.array(
            [None if p[6] is None else list(p[6].items()) for p in PRODUCTS],
            pa.map_(pa.string(), pa.string()),
        ),
        "active": [p[5] for p in PRODUCTS],
    }
)
_COLUMNS = ("category", "in_stock", "price", "rating")


def _value(product: tuple[Any, ...], name: str) -> Any:
    if name in _COLUMNS:
        return product[1 + _COLUMNS.index(name)]
    return (product[6] or {}).get(name)


def _as_text(value: Any) -> str | None:
    if value is None:
        return None
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def _as_number(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except ValueError:
        return None


def _passes(product: tuple[Any, ...], pred: PropertyPredicate) -> bool:
    value = _value(product, pred.property)
    if pred.op in ("gt", "ge", "lt", "le"):
        number, bound = _as_number(value), float(pred.value)
        if number is None:
            return False
        return {"gt": number > bound, "ge": number >= bound, "lt": number < bound, "le": number <= bound}[
            pred.op
        ]
    text = _as_text(value)
    if pred.op in ("in", "not_in"):
        inside = text is not None and text in {_as_text(v) for v in pred.value}
        return inside if pred.op == "in" else not inside
    wanted = _as_text(pred.value)
    if pred.op == "eq":
        return text == wanted
    if pred.op == "ne":
        return text != wanted
    return text is not None and wanted in text  # contains


def oracle_picks(rules: CampaignFilters) -> list[str]:
    picked = []
    for product in PRODUCTS:
        item, category, in_stock, price, rating, active, _ = product
        ok = active is True and not (rules.in_stock_only and in_stock is False)
        ok &= not rules.categories or category in rules.categories
        ok &= rules.min_price is None or (price is not None and price >= rules.min_price)
        ok &= rules.max_price is None or (price is not None and price <= rules.max_price)
        ok &= rules.min_rating is None or (rating is not None and rating >= rules.min_rating)
        ok &= all(_passes(product, pred) for pred in rules.where)
        if ok:
            picked.append(item)
    return picked


# ---------------------------------------------------------------------------------------------
# The properties
# ---------------------------------------------------------------------------------------------
SERVING = load_config(environ={}).serving


def _load(campaigns: dict[str, Any]) -> dict[str, CampaignConfig]:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, "campaigns.yaml")
        # Merged into the defaults' campaigns, as a marketer's own file is; only these are checked.
        path.write_text(yaml.safe_dump({"campaigns": campaigns}, allow_unicode=True))
        cfg = load_config(config_files=[path], environ={})
    return {name: c for name, c in cfg.campaigns.items() if name in campaigns}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(campaign_sections)
def test_every_campaign_definition_loads_or_is_refused_with_its_name(campaigns: dict[str, Any]) -> None:
    try:
        loaded = _load(campaigns)
    except ConfigError as refused:
        event("refused")
        message = str(refused)
        assert message.startswith("invalid configuration: campaigns"), message
        # The offending campaign is named, or the names are (a name that is not plain).
        assert any(f"campaigns.{name}" in message for name in campaigns) or "campaign names" in message, (
            message
        )
        return
    event("accepted")
    assert set(loaded) == set(campaigns)
    for name, definition in loaded.items():
        bounds = arms(definition)
        uppers = [upper for _, upper in bounds]
        assert uppers == sorted(uppers) and uppers[-1] == 1.0 and len({n for n, _ in bounds}) == len(bounds)
        assert all(lower < upper for lower, upper in zip([0.0, *uppers], uppers, strict=False)), bounds
        for user in ("u-1", "u-2", "u-3"):
            assert assign_variant(name, definition, user) in {n for n, _ in bounds}
        rules = RankingRules.of(definition, SERVING)
        assert 1 <= rules.slots <= definition.items
        mask = eligible_mask(CATALOG, definition.filters)
        items = CATALOG.column("item_id").to_pylist()
        picked = [item for item, keep in zip(items, mask, strict=True) if keep]
        assert picked == oracle_picks(definition.filters), definition.filters


GT_TEXT = {"property": "brand", "op": "gt", "value": "x"}


@pytest.mark.parametrize(
    ("campaign_section", "named"),
    [
        ({"spring": {"channel": "push", "items": 0}}, "campaigns.spring.items"),
        ({"spring": {"channel": "push", "variants": [{"name": "a", "share": 0.4}]}}, "must sum to 1"),
        ({"spring": {"channel": "push", "filters": {"where": [GT_TEXT]}}}, "needs a number"),
        ({"spring": {"channel": "push", "trigger_event_types": ["Teleported"]}}, "unknown event types"),
        ({"spring sale": {"channel": "push"}}, "letters, digits"),
    ],
)  # fmt: skip
def test_known_bad_definitions_name_the_reason(campaign_section: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        _load(campaign_section)
