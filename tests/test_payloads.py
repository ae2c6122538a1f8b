"""Channel payloads: templates, escaping, length limits, JSON Schemas, start-up checks, Spark glue.

Real parts only: the repository's templates and schemas (or copies of them in a temp folder), a
real ``local[2]`` SparkSession, and the ``jsonschema`` validator.
"""

from __future__ import annotations

import json
import pickle
import shutil
import sys
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from pyspark.sql import Row
from pyspark.testing import assertDataFrameEqual

from carousel.config import CarouselConfig, load_config
from carousel.experiments import run_payload_id, trigger_payload_id
from carousel.payloads import (
    CATALOG_ITEM_FIELDS,
    PAYLOAD_OUTPUT_SCHEMA,
    PAYLOAD_REQUEST_SCHEMA,
    SMS_ELLIPSIS,
    SMS_GSM7,
    SMS_UCS2,
    TEMPLATE_PARTS,
    USER_FIELDS,
    CatalogItems,
    PayloadError,
    PayloadRenderer,
    SmsLength,
    TemplateCheckError,
    check_templates,
    fit_sms,
    payload_json,
    render_payload,
    render_payloads,
    safe_url,
    sms_length,
    validate_payload,
)
from carousel.schemas import CHANNELS, EMAIL, PUSH, SMS, STRATEGIES

CREATED = datetime(2026, 11, 29, 3, 0, 0, 123000, tzinfo=UTC)


@pytest.fixture(scope="module")
def cfg() -> CarouselConfig:
    return load_config()


@pytest.fixture(scope="module")
def renderer(cfg: CarouselConfig) -> PayloadRenderer:
    return PayloadRenderer.from_config(cfg)


def item(n: int, strategy: str = "model", **catalog: Any) -> dict[str, Any]:
    row = {
        "item_id": f"i-{n:03d}",
        "rank": n,
        "score": 1.0 / n,
        "strategy": strategy,
        "title": f"Trail shoe {n}",
        "description": "Light, grippy, waterproof.",
        "category": "shoes",
        "price": 89.5 + n,
        "currency": "EUR",
        "rating": 4.2,
        "image_url": f"https://img.example.com/{n}.jpg",
        "deep_link": f"https://shop.example.com/p/{n}",
    }
    row.update(catalog)
    return row


def request(channel: str, items: list[dict[str, Any]] | None = None, **fields: Any) -> dict[str, Any]:
    row = {
        "payload_id": f"p-{channel}-1",
        "campaign": f"{channel}-campaign",
        "channel": channel,
        "template": "default",
        "variant": "model",
        "user_id": "u-000042",
        "trigger_event_id": "e-7-000000042",
        "trigger_event_type": "App Launched",
        "run_id": None,
        "model_version": "v-20261129",
        "created_at": CREATED,
        "user": {
            "age": 31,
            "gender": "f",
            "city": "Lisbon",
            "country": "PT",
            "language": "pt",
            "platform": "ios",
        },
        "items": items
        if items is not None
        else [item(1, "model"), item(2, "trending_category"), item(3, "trending")],
    }
    row.update(fields)
    return row


# ---------------------------------------------------------------------------------------------
# Every channel's default template against its schema
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("channel", CHANNELS)
def test_default_template_renders_a_payload_matching_the_channel_schema(channel, cfg, renderer):
    payload = render_payload(request(channel), renderer)

    validate_payload(payload, channel, cfg.serving.payload_schemas_dir)
    assert payload["schema_version"] == 1
    assert payload["channel"] == channel
    assert payload["variant"] == "model"
    assert payload["created_at"] == "2026-11-29T03:00:00.123Z"
    assert [(i["item_id"], i["rank"], i["strategy"]) for i in payload["items"]] == [
        ("i-001", 1, "model"),
        ("i-002", 2, "trending_category"),
        ("i-003", 3, "trending"),
    ]
    # The payload goes on the topic as JSON: it must survive the round trip unchanged.
    assert json.loads(payload_json(payload)) == payload


@pytest.mark.parametrize("channel", CHANNELS)
def test_default_templates_cope_with_one_item_and_null_catalog_fields(channel, cfg, renderer):
    bare = item(1, "trending", **dict.fromkeys(["title", "description", "category", "price"], None))
    bare.update(currency=None, rating=None, image_url=None, deep_link=None, score=None)
    payload = render_payload(request(channel, [bare], user=None, trigger_event_id=None), renderer)

    validate_payload(payload, channel, cfg.serving.payload_schemas_dir)
    assert "None" not in json.dumps(payload["content"])


def test_schema_rejects_payloads_that_break_the_contract(cfg, renderer):
    payload = render_payload(request(PUSH), renderer)
    schemas = cfg.serving.payload_schemas_dir

    broken = json.loads(payload_json(payload))
    broken["items"][0]["strategy"] = "random"
    del broken["variant"]
    broken["content"]["deep_link"] = "javascript:alert(1)"
    with pytest.raises(PayloadError) as err:
        validate_payload(broken, PUSH, schemas)
    message = str(err.value)
    assert "p-push-1" in message
    assert "$.items[0].strategy" in message and "'variant' is a required property" in message
    assert "$.content.deep_link" in message

    # A push payload is not an email payload.
    with pytest.raises(PayloadError, match="email.schema.json"):
        validate_payload(payload, EMAIL, schemas)


def test_an_unknown_strategy_is_refused_naming_the_payload_and_item(renderer):
    with pytest.raises(PayloadError, match=r"'p-sms-1'.*item 0 \(i-001\): unknown strategy 'random'"):
        render_payload(request(SMS, [item(1, "random")]), renderer)
    with pytest.raises(PayloadError, match="'p-sms-1'.*no items to send"):
        render_payload(request(SMS, []), renderer)


# ---------------------------------------------------------------------------------------------
# Email escaping
# ---------------------------------------------------------------------------------------------
class _Tags(HTMLParser):
    """Every start tag and attribute of a document, as a browser's tokenizer sees them."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, attrs))


HOSTILE = [
    item(
        1,
        title='<script>alert("t")</script>',
        description="</p><img src=x onerror=alert(1)><p>",
        deep_link="javascript:alert(document.cookie)",
        image_url='https://img.example.com/1.jpg" onerror="alert(1)',
    ),
    item(
        2,
        title='" onmouseover="alert(2)" x="',
        description="Tom & Jerry's <b>best</b>",
        deep_link=" JaVaScRiPt:alert(2)",
        image_url="data:image/svg+xml;base64,PHN2Zz48L3N2Zz4=",
    ),
    item(
        3,
        title="Shoes\r\nBcc: victim@example.com",
        deep_link="java\tscript:alert(3)",
        image_url="//evil.example.com/x.png",
    ),
    item(4, title="Fine 'n' dandy", deep_link='https://shop.example.com/p/4?a=1&b="2"'),
]


def test_email_escapes_every_catalog_string_and_refuses_unsafe_urls(cfg, renderer):
    payload = render_payload(request(EMAIL, HOSTILE), renderer)
    validate_payload(payload, EMAIL, cfg.serving.payload_schemas_dir)
    html, text, subject = (payload["content"][k] for k in ("html", "text", "subject"))

    parser = _Tags()
    parser.feed(html)
    parser.close()
    tags = {tag for tag, _ in parser.tags}
    assert tags <= {
        "html",
        "head",
        "meta",
        "title",
        "body",
        "table",
        "tr",
        "td",
        "h1",
        "h2",
        "p",
        "a",
        "img",
        "strong",
    }
    assert "script" not in tags and "b" not in tags
    for tag, attrs in parser.tags:
        for name, value in attrs:
            assert not name.startswith("on"), f"event handler attribute {name} on <{tag}>"
            assert name not in ("x", "mouseover"), f"attribute injected: {name}"
            if name in ("href", "src"):
                assert value is not None and value.startswith("https://"), f"{tag} {name}={value!r}"
    links = [value for _, attrs in parser.tags for name, value in attrs if name == "href"]
    assert links == ['https://shop.example.com/p/4?a=1&b="2"'] * 2  # decoded by the parser
    assert "javascript" not in html.lower() and "data:image" not in html
    assert "&lt;script&gt;alert(&#34;t&#34;)&lt;/script&gt;" in html
    assert "&#34; onmouseover=&#34;alert(2)&#34; x=&#34;" in html
    assert "Tom &amp; Jerry&#39;s &lt;b&gt;best&lt;/b&gt;" in html
    assert "https://shop.example.com/p/4?a=1&amp;b=&#34;2&#34;" in html

    # The plain-text part prints no refused link; the subject stays one header line.
    assert "javascript" not in text.lower() and "https://shop.example.com/p/4" in text
    assert "\r" not in subject and "\n" not in subject


def test_safe_url_allows_listed_schemes_only():
    app = frozenset({"https", "shop"})
    assert safe_url("https://a.example/x") == "https://a.example/x"
    assert safe_url("  HTTP://a.example/x ") == "HTTP://a.example/x"
    assert safe_url("shop://product/1") is None
    assert safe_url("shop://product/1", app) == "shop://product/1"
    assert safe_url("http://a.example/x", app) is None  # not listed
    assert safe_url("other://product/1", app) is None
    # A blocked scheme stays refused even when a caller lists it.
    assert safe_url("javascript:alert(1)", frozenset({"javascript"})) is None
    for bad in (
        "javascript:alert(1)",
        "JAVASCRIPT:x",
        "java\nscript:x",
        "data:text/html,x",
        "//evil",
        "/p/1",
        "http://",
        "https://a.example/x y",
        "https://a.example/\x00",
        None,
    ):
        assert safe_url(bad, app | {"http", "data"}) is None, bad


def test_push_and_in_app_keep_app_deep_links_but_web_popup_does_not(cfg, renderer):
    items = [item(1, deep_link="carousel://item/1"), item(2, deep_link="javascript:alert(1)")]
    push = render_payload(request(PUSH, items), renderer)["content"]
    popup = render_payload(request("web_popup", items), renderer)
    validate_payload(popup, "web_popup", cfg.serving.payload_schemas_dir)

    assert push["deep_link"] == "carousel://item/1"
    assert [c["deep_link"] for c in push["carousel"]] == ["carousel://item/1", None]
    assert [c["deep_link"] for c in popup["content"]["cards"]] == [None, None]


def test_deep_links_outside_the_configured_schemes_are_never_rendered(cfg):
    # The catalog may hold links uploaded before a scheme was taken off the list: none of them
    # reaches a payload, neither in content nor in the items passed on.
    narrowed = cfg.with_overrides(serving={"deep_link_schemes": ["https", "shop"]})
    renderer = PayloadRenderer.from_config(narrowed)
    links = [
        "shop://product/1",
        "carousel://item/2",
        "data:text/html,x",
        "file:///etc/passwd",
        "http://a.example/5",
    ]
    items = [item(n, deep_link=link) for n, link in enumerate(links, 1)]
    for channel in CHANNELS:
        payload = render_payload(request(channel, items), renderer)
        validate_payload(payload, channel, narrowed.serving.payload_schemas_dir)
        assert [i["deep_link"] for i in payload["items"]] == ["shop://product/1", None, None, None, None]
        text = payload_json(payload)
        for refused in ("carousel://", "data:", "file:", "http://a.example"):
            assert refused not in text, (channel, refused)
    push = render_payload(request(PUSH, items), renderer)["content"]
    assert push["deep_link"] == "shop://product/1"


def test_check_templates_refuses_links_with_unlisted_schemes(cfg, tmp_path: Path):
    templates = tmp_path / "templates"
    shutil.copytree(cfg.serving.templates_dir, templates)
    html = templates / "email" / "default.html.j2"
    html.write_text(html.read_text() + '\n<a href="JavaScript:alert(1)">x</a>\n')
    (templates / "push" / "default.body.j2").write_text("Open data:text/html,hi or ftp://files.example/x\n")
    broken = cfg.with_overrides(serving={"templates_dir": str(templates)})

    with pytest.raises(TemplateCheckError) as err:
        check_templates(broken)
    message = str(err.value)
    assert "campaign weekly-email (email/default): template" in message
    assert "email/default.html.j2 line" in message and "a javascript: link; allowed here: https" in message
    assert "campaign launch-push (push/default): template" in message
    assert "push/default.body.j2 line 1: a ftp: link; allowed here: carousel, https" in message
    # Listing the scheme makes the push template acceptable again; javascript: never is.
    with pytest.raises(TemplateCheckError, match="javascript") as again:
        check_templates(broken.with_overrides(serving={"deep_link_schemes": ["https", "carousel", "ftp"]}))
    assert "ftp" not in str(again.value)


# ---------------------------------------------------------------------------------------------
# SMS and push limits
# ---------------------------------------------------------------------------------------------
def test_sms_is_cut_to_the_limit_keeping_the_link_whole(cfg, renderer):
    long_title = "Ultralight waterproof trail running shoe with extra grip " * 5
    link = "https://shop.example.com/p/1?utm_source=sms&utm_campaign=launch"
    payload = render_payload(request(SMS, [item(1, title=long_title, deep_link=link), item(2)]), renderer)
    validate_payload(payload, SMS, cfg.serving.payload_schemas_dir)
    text = payload["content"]["text"]

    assert cfg.serving.sms_max_segments == 1
    # "…" is not in the GSM alphabet: it would make the SMS UCS-2, 70 characters instead of 160.
    assert sms_length(text) == sms_length("x" * len(text)) and sms_length(text).segments == 1
    assert 150 <= len(text) <= 160  # the whole GSM-7 budget is used
    assert text.startswith("Picked for you: Ultralight waterproof")
    assert text.endswith(f"{SMS_ELLIPSIS} {link}")


def test_sms_with_a_curly_quote_is_cut_to_one_ucs2_part_keeping_the_link_whole(cfg, renderer):
    title = "Women’s ultralight waterproof trail running shoe with extra grip"
    link = "https://shop.example.com/p/1"
    payload = render_payload(request(SMS, [item(1, title=title, deep_link=link), item(2)]), renderer)
    validate_payload(payload, SMS, cfg.serving.payload_schemas_dir)
    text = payload["content"]["text"]

    length = sms_length(text)
    assert length.encoding == SMS_UCS2 and length.units <= 70 and length.segments == 1
    assert text.startswith("Picked for you: Women’s ultralight")
    assert text.endswith(f"{SMS_ELLIPSIS} {link}")


def test_sms_length_counts_gsm7_septets_and_parts():
    assert sms_length("a" * 160) == SmsLength(SMS_GSM7, 160, 1)
    assert sms_length("a" * 161) == SmsLength(SMS_GSM7, 161, 2)  # 153 + 8
    assert sms_length("a" * 306) == SmsLength(SMS_GSM7, 306, 2)
    assert sms_length("a" * 307) == SmsLength(SMS_GSM7, 307, 3)
    assert sms_length("") == SmsLength(SMS_GSM7, 0, 1)
    # The whole basic table, accents and Greek capitals included, is one septet a character.
    assert sms_length("@£$¥èéùìòÇØøÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ!\"#¤%&'()*+,-./:;<=>?¡ÄÖÑÜ§¿äöñüà").encoding == SMS_GSM7
    # Extension characters are escape + character: two septets each.
    for ch in "^{}\\[]~|€":
        assert sms_length(ch) == SmsLength(SMS_GSM7, 2, 1), ch
    assert sms_length("€" * 80) == SmsLength(SMS_GSM7, 160, 1)
    assert sms_length("€" * 81) == SmsLength(SMS_GSM7, 162, 2)


def test_a_part_never_ends_between_an_escape_and_its_character():
    # 306 septets would fill exactly two parts of 153, but the escape pair cannot straddle the
    # boundary after 152 septets: the "€" moves whole to part two, and the last "a" to part three.
    assert sms_length("a" * 152 + "€" + "a" * 152) == SmsLength(SMS_GSM7, 306, 3)
    assert sms_length("a" * 151 + "€" + "a" * 153) == SmsLength(SMS_GSM7, 306, 2)


def test_one_character_outside_gsm7_makes_the_whole_sms_ucs2():
    # One curly quote turns a 160-character message into three parts (67 + 67 + 26).
    assert sms_length("a" * 159 + "’") == SmsLength(SMS_UCS2, 160, 3)
    assert sms_length("a" * 69 + "’") == SmsLength(SMS_UCS2, 70, 1)
    assert sms_length("a" * 70 + "’") == SmsLength(SMS_UCS2, 71, 2)
    for ch in ("…", "ç", "“", "\x1b", "é\u0301"[1]):
        assert sms_length(ch).encoding == SMS_UCS2, repr(ch)


def test_an_emoji_counts_two_ucs2_units_and_is_never_split():
    assert sms_length("😀") == SmsLength(SMS_UCS2, 2, 1)
    assert sms_length("😀" * 35) == SmsLength(SMS_UCS2, 70, 1)
    assert sms_length("😀" * 36) == SmsLength(SMS_UCS2, 72, 2)
    # 134 units would fill two parts of 67, but the surrogate pair cannot straddle the boundary.
    assert sms_length("a" * 66 + "😀" + "a" * 66) == SmsLength(SMS_UCS2, 134, 3)
    assert sms_length("a" * 65 + "😀" + "a" * 67) == SmsLength(SMS_UCS2, 134, 2)


def test_fit_sms_cuts_between_words_and_never_inside_a_url():
    assert fit_sms("short text", 1) == "short text"
    assert fit_sms("a" * 160, 1) == "a" * 160
    words = " ".join(f"word{n}" for n in range(60))
    cut = fit_sms(words, 1)
    assert cut.endswith(SMS_ELLIPSIS) and 150 <= len(cut) <= 160
    assert words.startswith(cut[: -len(SMS_ELLIPSIS)] + " ")  # cut after a whole word
    # The link sits in the middle: the cut falls before it rather than inside it.
    middle = "See https://shop.example.com/p/" + "1" * 150 + " for our newest arrivals"
    assert fit_sms(middle, 1) == "See..."
    # Text after the link is kept with it (e.g. an opt-out line).
    tail = "Big news about many lovely things " * 6 + "https://s.example/p/1 STOP=opt out"
    fitted = fit_sms(tail, 1)
    assert fitted.endswith(" many... https://s.example/p/1 STOP=opt out") and len(fitted) <= 160
    # Only a link longer than the whole budget gets cut.
    long_link = "https://shop.example.com/" + "x" * 200
    assert fit_sms(long_link, 1) == long_link[:157] + SMS_ELLIPSIS
    with pytest.raises(ValueError, match="max_segments"):
        fit_sms(tail, 0)


@pytest.mark.parametrize("max_segments", [1, 2, 3, 10])
def test_fit_sms_fits_the_parts_of_the_encoding_it_needs(max_segments):
    link = " https://s.example/p/1 STOP=opt out"
    texts = [
        "Big news about many lovely things " * 60 + link,
        "Big news about many lovely {things} " * 60 + link,  # extension characters: 2 septets
        "Big news about many lovely things’ " * 60 + link,  # UCS-2
        "Big news about many lovely things 😀 " * 60 + link,  # UCS-2, 2 units an emoji
        "€" * 2000,
        "a" * 152 + "€" + "a" * 2000,
    ]
    for text in texts:
        fitted = fit_sms(text, max_segments)
        length = sms_length(fitted)
        assert length.segments <= max_segments, (text[:40], length)
        # Not needlessly short: about the whole budget of the text's own encoding is used.
        single, per_part = (160, 153) if sms_length(text).encoding == SMS_GSM7 else (70, 67)
        budget = single if max_segments == 1 else per_part * max_segments
        assert length.units >= budget - 20, (text[:40], length)
        assert fitted.endswith(link) or "STOP" not in text, (text[:40], fitted[-50:])


def test_fit_sms_with_a_curly_quote_fits_one_ucs2_part_and_keeps_the_link():
    link = "https://shop.example.com/p/1"
    text = f"Women’s ultralight waterproof trail running shoe with extra grip, now in stock {link}"
    fitted = fit_sms(text, 1)
    length = sms_length(fitted)
    assert length == SmsLength(SMS_UCS2, len(fitted), 1) and length.units <= 70
    assert fitted == f"Women’s ultralight waterproof trail{SMS_ELLIPSIS} {link}"  # 35 + 4 + 28 units


def test_fit_sms_is_not_needlessly_short_when_the_cut_drops_the_only_ucs2_character():
    link = "https://shop.example.com/p/1"
    # The curly quote comes after what GSM-7 can hold anyway: cutting before it keeps 160 septets.
    late = "Big news about many lovely things " * 4 + "it’s here " * 5 + link
    fitted = fit_sms(late, 1)
    assert sms_length(fitted).encoding == SMS_GSM7 and len(fitted) > 140
    assert fitted.endswith(f"{SMS_ELLIPSIS} {link}")
    # The quote sits halfway: cutting before it keeps more than a UCS-2 part would.
    middle = "Big news about many lovely things " * 3 + "it’s here " * 10 + link
    fitted = fit_sms(middle, 1)
    assert sms_length(fitted).encoding == SMS_GSM7 and len(fitted) > 100
    assert fitted.endswith(f"things{SMS_ELLIPSIS} {link}")
    # The quote is in the opt-out line after the link: only UCS-2 keeps that line whole.
    tail = "Big news about many lovely things " * 6 + link + " Don’t want these? STOP"
    fitted = fit_sms(tail, 1)
    assert sms_length(fitted).encoding == SMS_UCS2 and sms_length(fitted).units <= 70
    assert fitted.endswith(f"{SMS_ELLIPSIS} {link} Don’t want these? STOP")


def test_push_carousel_holds_at_most_push_max_items(cfg):
    limited = PayloadRenderer.from_config(cfg.with_overrides(serving={"push_max_items": 2}))
    items = [item(n, STRATEGIES[n % 3]) for n in range(1, 8)]
    payload = render_payload(request(PUSH, items), limited)
    validate_payload(payload, PUSH, cfg.serving.payload_schemas_dir)

    assert [c["item_id"] for c in payload["content"]["carousel"]] == ["i-001", "i-002"]
    # Every item the ranking chose is still listed, with its strategy.
    assert [(i["item_id"], i["strategy"]) for i in payload["items"]] == [
        (f"i-{n:03d}", STRATEGIES[n % 3]) for n in range(1, 8)
    ]


# ---------------------------------------------------------------------------------------------
# Template errors and the start-up check
# ---------------------------------------------------------------------------------------------
def test_an_undefined_variable_names_the_template_the_line_and_the_variable(renderer):
    texts = {
        **renderer.texts,
        "push/typo.title.j2": "{# a comment #}\nHello {{ user.city }}\n{{ items[0].titel }}\n",
        "push/typo.body.j2": "body",
    }
    typo = PayloadRenderer(texts, sms_max_segments=1, push_max_items=5)
    with pytest.raises(PayloadError) as err:
        render_payload(request(PUSH, template="typo"), typo)
    message = str(err.value)
    assert "template push/typo.title.j2 line 3" in message
    assert "titel" in message and "'p-push-1'" in message and "u-000042" in message


def test_templates_run_in_a_sandbox(renderer):
    texts = {**renderer.texts, "sms/escape.txt.j2": "{{ items.__class__.__mro__ }}"}
    sandboxed = PayloadRenderer(texts, sms_max_segments=1, push_max_items=5)
    with pytest.raises(PayloadError, match=r"template sms/escape.txt.j2 line 1: SecurityError"):
        render_payload(request(SMS, template="escape"), sandboxed)


def test_check_templates_passes_on_the_shipped_templates(cfg):
    renderer = check_templates(cfg)
    assert {f"{c}/default.{p}.j2" for c, parts in TEMPLATE_PARTS.items() for p in parts} <= set(
        renderer.texts
    )


def test_check_templates_lists_missing_broken_and_failing_templates(cfg, tmp_path: Path):
    templates = tmp_path / "templates"
    shutil.copytree(cfg.serving.templates_dir, templates)
    (templates / "email" / "default.html.j2").unlink()  # weekly-email: missing
    (templates / "in_app" / "default.body.j2").write_text("{% for x in items %}no end\n")  # wishlist-inapp
    (templates / "push" / "default.title.j2").write_text("{{ items[1].title }}")  # fails with one item
    broken = cfg.with_overrides(serving={"templates_dir": str(templates)})

    with pytest.raises(TemplateCheckError) as err:
        check_templates(broken)
    message = str(err.value)
    assert (
        f"campaign weekly-email (email/default): missing template {templates}/email/default.html.j2"
        in message
    )
    assert "campaign wishlist-inapp (in_app/default): template" in message
    assert "in_app/default.body.j2 line 1: Unexpected end of template" in message
    assert "campaign launch-push (push/default), sample with 1 item with null fields" in message
    assert "push/default.title.j2 line 1" in message

    # A disabled campaign's templates are not required.
    relaxed = broken.with_overrides(
        campaigns={name: {"enabled": False} for name in ("weekly-email", "wishlist-inapp", "launch-push")}
    )
    check_templates(relaxed)


def test_check_templates_reports_a_missing_schema(cfg, tmp_path: Path):
    schemas = tmp_path / "schemas"
    shutil.copytree(cfg.serving.payload_schemas_dir, schemas)
    (schemas / "email.schema.json").unlink()
    with pytest.raises(
        TemplateCheckError, match=r"weekly-email.*payload schema not found: .*email\.schema\.json"
    ):
        check_templates(cfg.with_overrides(serving={"payload_schemas_dir": str(schemas)}))


# ---------------------------------------------------------------------------------------------
# Email content as a template reference (campaigns.<name>.content: reference)
# ---------------------------------------------------------------------------------------------
def test_a_reference_campaign_sends_items_and_user_for_the_senders_own_template(cfg):
    referenced = cfg.with_overrides(
        campaigns={"weekly-email": {"content": "reference", "template": "esp-weekly"}}
    )
    # There is no email/esp-weekly.*.j2: the sender holds that template, so carousel needs none.
    renderer = check_templates(referenced)
    source = request(EMAIL, campaign="weekly-email", template="esp-weekly", items=[item(1, title="<b>x</b>")])

    payload = render_payload(source, renderer)

    validate_payload(payload, EMAIL, cfg.serving.payload_schemas_dir)
    assert payload["content"] == {"template": "esp-weekly", "user": source["user"]}
    assert list(payload["content"]["user"]) == list(USER_FIELDS)
    # The envelope and the items (catalog strings as uploaded) are those of the rendered payload.
    rendered = render_payload({**source, "template": "default"}, PayloadRenderer.from_config(cfg))
    assert {**payload, "content": None} == {**rendered, "content": None}
    assert payload["items"][0]["title"] == "<b>x</b>"
    # Other campaigns of the same configuration still render.
    assert set(render_payload(request(EMAIL), renderer)["content"]) == {"subject", "html", "text"}
    # Rendered, the same campaign needs its templates.
    with pytest.raises(TemplateCheckError, match=r"weekly-email \(email/esp-weekly\): missing template"):
        check_templates(cfg.with_overrides(campaigns={"weekly-email": {"template": "esp-weekly"}}))


def test_email_schema_takes_rendered_or_reference_content_but_not_a_mix(cfg, renderer):
    schemas = cfg.serving.payload_schemas_dir
    payload = json.loads(payload_json(render_payload(request(EMAIL), renderer)))
    user = dict.fromkeys(USER_FIELDS)
    for content in (
        {**payload["content"], "template": "default", "user": user},  # both
        {"template": "default"},  # no user
        {"template": "default", "user": {**user, "email": "x@example.com"}},  # a field not in the contract
        {"template": "../default", "user": user},
    ):
        with pytest.raises(PayloadError, match="p-email-1"):
            validate_payload({**payload, "content": content}, EMAIL, schemas)
    validate_payload({**payload, "content": {"template": "default", "user": user}}, EMAIL, schemas)


def test_items_filled_from_the_catalog_render_as_items_that_carry_the_catalog_fields(renderer):
    full = [
        item(1, deep_link="javascript:alert(1)", price=float("nan")),
        item(2, "trending", title=None, rating=None),
        item(3, "new_item"),
    ]
    table = pa.table(
        {"item_id": [i["item_id"] for i in full], **{f: [i[f] for i in full] for f in CATALOG_ITEM_FIELDS}}
    )
    catalog = CatalogItems(table)
    unknown = {"item_id": "i-999", "rank": 4, "score": 0.1, "strategy": "trending"}
    ranked_only = [{k: i[k] for k in ("item_id", "rank", "score", "strategy")} for i in full] + [unknown]

    for channel in (EMAIL, PUSH, SMS):
        from_catalog = render_payload(request(channel, ranked_only), renderer, catalog)
        carried = render_payload(
            request(channel, [*full, {**unknown, **dict.fromkeys(CATALOG_ITEM_FIELDS)}]), renderer
        )
        assert from_catalog == carried
    assert from_catalog["items"][0]["deep_link"] is None and from_catalog["items"][0]["price"] is None
    assert from_catalog["items"][3]["title"] is None


def test_renderer_pickles_as_template_texts(renderer):
    assert renderer.environment is not None  # compiled on the driver
    copy = pickle.loads(pickle.dumps(renderer))
    assert copy.texts == renderer.texts and copy._env is None
    assert render_payload(request(EMAIL), copy) == render_payload(request(EMAIL), renderer)


# ---------------------------------------------------------------------------------------------
# Spark glue
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def python_workers(spark):
    """Python workers from this interpreter (the venv, with pyarrow), as spark-submit.sh arranges.

    The shared test session is built without PYSPARK_PYTHON, so its workers would otherwise run
    the system ``python3``.
    """
    context = spark.sparkContext
    previous = context.pythonExec
    context.pythonExec = sys.executable
    yield spark
    context.pythonExec = previous


def test_render_payloads_on_a_spark_dataframe(python_workers, cfg):
    spark = python_workers
    trigger = request(
        PUSH,
        payload_id=trigger_payload_id("e-1", "launch-push", PUSH),
        campaign="launch-push",
        user_id="u-1",
        trigger_event_id="e-1",
    )
    batch = [
        request(
            EMAIL,
            payload_id=run_payload_id("r-9", "weekly-email", EMAIL, user),
            campaign="weekly-email",
            user_id=user,
            trigger_event_id=None,
            trigger_event_type=None,
            run_id="r-9",
            items=[item(1, title="Ünïcode <b>shoe</b>"), item(2, "trending")],
        )
        for user in ("u-2", "u-3")
    ]
    sms = request(SMS, payload_id="p-sms", campaign="sms-campaign", user_id="u-4", user=None)
    requests = spark.createDataFrame([trigger, *batch, sms], PAYLOAD_REQUEST_SCHEMA)

    rendered = render_payloads(requests, cfg)

    assert rendered.schema == PAYLOAD_OUTPUT_SCHEMA
    expected = spark.createDataFrame(
        [
            Row(topic="recs.push", key="u-1", payload_id=trigger["payload_id"], channel=PUSH),
            Row(topic="recs.email", key="u-2", payload_id=batch[0]["payload_id"], channel=EMAIL),
            Row(topic="recs.email", key="u-3", payload_id=batch[1]["payload_id"], channel=EMAIL),
            Row(topic="recs.sms", key="u-4", payload_id="p-sms", channel=SMS),
        ]
    )
    assertDataFrameEqual(rendered.select("topic", "key", "payload_id", "channel"), expected)

    by_id = {row.payload_id: row for row in rendered.collect()}
    for source in (trigger, *batch, sms):
        row = by_id[source["payload_id"]]
        payload = json.loads(row.value)
        validate_payload(payload, row.channel, cfg.serving.payload_schemas_dir)
        # Executors render exactly what the plain function renders on the driver.
        assert payload == render_payload(source, PayloadRenderer.from_config(cfg))
        assert payload["user_id"] == row.key and row.campaign == source["campaign"]
    assert json.loads(by_id[batch[0]["payload_id"]].value)["run_id"] == "r-9"
    assert (
        "Ünïcode &lt;b&gt;shoe&lt;/b&gt;"
        in json.loads(by_id[batch[0]["payload_id"]].value)["content"]["html"]
    )


def test_render_payloads_names_missing_columns_and_failing_rows(python_workers, cfg):
    spark = python_workers
    requests = spark.createDataFrame([request(SMS)], PAYLOAD_REQUEST_SCHEMA)
    with pytest.raises(ValueError, match=r"lack columns \['variant'\]"):
        render_payloads(requests.drop("variant"), cfg)

    bad = spark.createDataFrame(
        [request(SMS, [item(1, "random")], payload_id="p-bad")], PAYLOAD_REQUEST_SCHEMA
    )
    with pytest.raises(Exception, match=r"'p-bad'.*unknown strategy 'random'"):
        render_payloads(bad, cfg).collect()
