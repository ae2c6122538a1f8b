"""Per-user online state against a real Redis: round trip, compare-and-set, lost script cache."""

from __future__ import annotations

from typing import Any

import pytest

from carousel.online_profile import OnlineProfile
from carousel.online_state import Answer, OnlineState
from carousel.online_store import connect

pytestmark = [pytest.mark.integration]


@pytest.fixture
def store(make_config: Any) -> OnlineState:
    cfg = make_config()
    return OnlineState(connect(cfg.online_store), cfg.online_store.key_prefix, 60_000, 60_000)


def view(item: str, micros: int) -> dict[str, Any]:
    return {
        "event_id": f"e-{item}-{micros}",
        "event_type": "Product Viewed",
        "item_id": item,
        "event_time": micros,
    }


def test_states_and_answers_round_trip(store: OnlineState) -> None:
    states, answers = store.read(["u1", "u2"], [("u1", "t1")])
    assert states["u1"].version == "" and answers == {}
    states["u1"].profile.apply(view("a", 10), 5)
    states["u1"].record_send("p1", "launch", ["b", "c"], 20)
    answer = Answer(3, 42, ({"payload_id": "p1", "items": []},))
    assert store.write(states.values(), {("u1", "t1"): answer}) == []

    again, answers = store.read(["u1", "u2"], [("u1", "t1"), ("u2", "t9")])
    assert again["u1"].version == "1"
    assert again["u1"].profile == OnlineProfile(views=[["a", 10]], last_seen=10)
    assert again["u1"].sends == [["p1", "launch", "b", 20], ["p1", "launch", "c", 20]]
    assert again["u2"].version == ""  # untouched users are not written
    assert answers == {("u1", "t1"): answer}
    assert 0 < store.client.pttl(store.user_key("u1")) <= 60_000


def test_a_concurrent_writer_is_never_overwritten(store: OnlineState) -> None:
    serve_view, rebuild_view = store.read(["u"])[0], store.read(["u"])[0]
    rebuild_view["u"].profile.apply(view("from-delta", 5), 5)
    rebuild_view["u"].changed = True
    assert store.write(rebuild_view.values()) == []
    serve_view["u"].profile.apply(view("live", 9), 5)
    serve_view["u"].changed = True
    assert store.write(serve_view.values()) == ["u"]  # stale version: refused, reported
    fresh = store.read(["u"])[0]["u"]
    assert [item for item, _ in fresh.profile.views] == ["from-delta"]


def test_a_lost_script_cache_is_reloaded(store: OnlineState) -> None:
    store.client.script_flush()
    states, _ = store.read(["u"])
    states["u"].profile.apply(view("a", 1), 5)
    states["u"].changed = True
    assert store.write(states.values()) == []
    assert store.read(["u"])[0]["u"].version == "1"
