"""Per-user online state against a real Redis: round trip, compare-and-set, lost script cache,
and the API's round trips coalesced over the requests in flight."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from carousel.api import CoalescingStore
from carousel.broker import free_port
from carousel.online_profile import OnlineProfile
from carousel.online_state import Answer, OnlineState, OutboxEntry, StateRequest, UserState, exchange
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


def test_an_exchange_reads_every_reply_in_order_an_error_in_its_place(store: OnlineState) -> None:
    client = store.client
    client.set("x-text", "a")
    replies = exchange(
        client, [("GET", "x-text"), ("INCR", "x-text"), ("HMGET", "x-none", "v"), ("INCR", "x-n")]
    )
    assert replies[0] == b"a" and replies[2] == [None] and replies[3] == 1
    assert isinstance(replies[1], redis.exceptions.ResponseError) and "not an integer" in str(replies[1])
    # The connection was left with nothing unread: the next exchange gets its own replies.
    assert exchange(client, [("GET", "x-n")]) == [b"1"]


@pytest.mark.parametrize("retries", [0, 1])
def test_a_connection_the_server_dropped_is_retried_by_the_clients_policy(
    store: OnlineState, monkeypatch, retries: int
) -> None:
    """The server drops the pooled connection after the pool handed it out: with no retries (the
    project's client) the exchange raises and the next one gets a fresh connection; with one, the
    client's retry policy sends it again on a fresh connection."""
    options = store.client.connection_pool.connection_kwargs
    where = {"host": options["host"], "port": options["port"], "password": options.get("password")}
    client = redis.Redis(**where, retry=Retry(NoBackoff(), retries))
    killer = redis.Redis(**where)
    pool = client.connection_pool
    [pooled] = exchange(client, [("CLIENT", "ID")])
    handed_out = pool.get_connection
    kills: list[int] = []

    def lost_once_handed_out() -> Any:
        connection = handed_out()
        if not kills:
            kills.append(killer.client_kill_filter(_id=pooled))
        return connection

    monkeypatch.setattr(pool, "get_connection", lost_once_handed_out)
    commands = [("SET", "x-after", "1"), ("GET", "x-after"), ("CLIENT", "ID")]
    try:
        if retries:
            replies = exchange(client, commands)
        else:
            with pytest.raises(redis.exceptions.ConnectionError):
                exchange(client, commands)
            replies = exchange(client, commands)
    finally:
        killer.close()
        client.close()
    assert kills == [1]
    assert replies[:2] == [b"OK", b"1"] and replies[2] != pooled


def test_a_refused_transaction_runs_none_of_its_commands(store: OnlineState, monkeypatch) -> None:
    """A command refused as it is queued (here an unknown one) aborts the whole MULTI/EXEC: the
    write raises and the outbox entry and state queued with it are not stored."""
    states, _ = store.read(["u"])
    states["u"].profile.apply(view("a", 1), 5)
    states["u"].changed = True
    entry = OutboxEntry("u", "p1", '{"payload_id": "p1"}')
    original = store._cas_commands
    monkeypatch.setattr(store, "_cas_commands", lambda changed: [*original(changed), ("k", ("NO-SUCH", "k"))])
    with pytest.raises(redis.exceptions.ResponseError, match="unknown command"):
        store.write_with_outbox(states.values(), {}, [entry])
    assert store.outbox_length() == 0
    assert store.read(["u"])[0]["u"].version == ""


def test_a_lost_script_cache_is_reloaded(store: OnlineState) -> None:
    store.client.script_flush()
    states, _ = store.read(["u"])
    states["u"].profile.apply(view("a", 1), 5)
    states["u"].changed = True
    assert store.write(states.values()) == []
    assert store.read(["u"])[0]["u"].version == "1"


def test_outbox_entries_are_stored_with_the_state_listed_when_old_and_forgotten(store: OnlineState) -> None:
    states, _ = store.read(["u1"])
    states["u1"].record_send("p1", "widget", ["a"], 20)
    first, second = OutboxEntry("u1", "p1", '{"payload_id": "p1"}'), OutboxEntry("u2", "p2", "{}")
    conflicts, ids = store.write_with_outbox(states.values(), {}, [first, second])
    assert conflicts == [] and len(ids) == 2 and store.read(["u1"])[0]["u1"].version == "1"
    # A stale state is refused, and its outbox entry is stored all the same: the answer was given.
    conflicts, (late,) = store.write_with_outbox(states.values(), {}, [OutboxEntry("u1", "p3", "{}")])
    assert conflicts == ["u1"]
    entry_ms = int(ids[0].split("-")[0])
    assert store.outbox_older_than(entry_ms - 1, 10) == []  # none older than the first
    assert store.outbox_older_than(entry_ms + 60_000, 10) == [
        (ids[0], first),
        (ids[1], second),
        (late, OutboxEntry("u1", "p3", "{}")),
    ]
    assert store.outbox_older_than(entry_ms + 60_000, 1) == [(ids[0], first)]
    store.forget_outbox(ids)
    assert [entry_id for entry_id, _ in store.outbox_older_than(entry_ms + 60_000, 10)] == [late]


def test_a_lost_script_cache_does_not_store_an_outbox_entry_twice(store: OnlineState) -> None:
    states, _ = store.read(["u"])
    states["u"].record_send("p1", "widget", ["a"], 20)
    store.client.script_flush()
    conflicts, ids = store.write_with_outbox(states.values(), {}, [OutboxEntry("u", "p1", "{}")])
    assert conflicts == [] and store.read(["u"])[0]["u"].version == "1"
    assert [entry_id for entry_id, _ in store.outbox_older_than(2**62, 10)] == ids  # one entry


class CountedRoundTrips(OnlineState):
    """The real store, counting the API's read and write round trips."""

    reads = 0
    writes = 0

    def read_each(self, requests: Any, counter_ttl_ms: int) -> Any:
        self.reads += 1
        return super().read_each(requests, counter_ttl_ms)

    def write_with_outbox(
        self, states: Any, answers: Any, outbox: Any, forget: Any = ()
    ) -> tuple[list[str], list[str]]:
        self.writes += 1
        return super().write_with_outbox(states, answers, outbox, forget)


def counted_store(make_config: Any) -> CountedRoundTrips:
    cfg = make_config()
    return CountedRoundTrips(connect(cfg.online_store), cfg.online_store.key_prefix, 60_000, 60_000)


def test_requests_in_flight_share_one_read_and_one_write(make_config: Any) -> None:
    state = counted_store(make_config)
    store = CoalescingStore(state, 2_000)
    counter = f"{state.prefix}:api-rate:test"

    async def answer(user: str, payload: str) -> int:
        mine, answered, count = await store.read(StateRequest(user, [(user, f"t-{payload}")], counter))
        assert answered == {}
        mine.record_send(payload, "launch", [f"item-{payload}"], 100)
        shown = Answer(-1, -1, ({"payload_id": payload, "items": []},))
        await store.write(mine, {(user, f"t-{payload}"): shown}, 5, 0)
        return count

    async def two_users_at_once() -> list[int]:
        return list(await asyncio.gather(answer("u1", "p1"), answer("u2", "p2")))

    counts = asyncio.run(two_users_at_once())
    assert (state.reads, state.writes) == (1, 1)
    assert sorted(counts) == [1, 2]  # each request got its own increment of the window

    async def one_user_twice() -> list[int]:
        # u1 twice in one flush: two states of one version; the second write loses the
        # compare-and-set and is merged in, as a concurrent writer's would be.
        return list(await asyncio.gather(answer("u1", "p3"), answer("u1", "p4")))

    assert sorted(asyncio.run(one_user_twice())) == [3, 4]
    assert state.reads == 2
    stored, answers = state.read(["u1", "u2"], [("u1", f"t-p{n}") for n in (1, 3, 4)] + [("u2", "t-p2")])
    assert sorted(stored["u1"].sends) == [[f"p{n}", "launch", f"item-p{n}", 100] for n in (1, 3, 4)]
    assert stored["u2"].sends == [["p2", "launch", "item-p2", 100]]
    assert stored["u1"].version == "3"  # written three times: nothing was overwritten
    assert sorted(answer.outbox[0]["payload_id"] for answer in answers.values()) == ["p1", "p2", "p3", "p4"]


def test_each_write_in_a_flush_gets_its_own_outbox_entry(make_config: Any) -> None:
    # One flush: u1 twice (the second state is stale and merged after), u2 with no entry (an
    # answer not kept in the store), u3 in conflict with a writer that came first.
    state = counted_store(make_config)
    store = CoalescingStore(state, 2_000)
    other = state.read(["u3"])[0]
    other["u3"].record_send("p-other", "launch", ["x"], 1)
    state.write(other.values())

    async def answer(user: str, payload: str, stale: bool = False) -> str | None:
        mine, _, _ = await store.read(StateRequest(user))
        if stale:
            mine.version = ""  # as read before the other writer's write
        mine.record_send(payload, "widget", [f"item-{payload}"], 100)
        entry = None if user == "u2" else OutboxEntry(user, payload, f'{{"payload_id": "{payload}"}}')
        return await store.write(mine, {}, 5, 0, entry)

    async def at_once() -> list[str | None]:
        return list(
            await asyncio.gather(
                answer("u1", "p1"), answer("u1", "p2"), answer("u2", "p3"), answer("u3", "p4", True)
            )
        )

    before = state.writes
    ids = asyncio.run(at_once())
    assert state.writes - before == 3  # the flush, then the merges of u1's second state and u3's
    assert ids[2] is None and None not in (ids[0], ids[1], ids[3])
    stored = {entry_id: entry.payload_id for entry_id, entry in state.outbox_older_than(2**62, 10) if entry}
    assert {ids[0]: "p1", ids[1]: "p2", ids[3]: "p4"} == stored
    users = state.read(["u1", "u3"])[0]
    assert sorted(send[0] for send in users["u1"].sends) == ["p1", "p2"]
    assert sorted(send[0] for send in users["u3"].sends) == ["p-other", "p4"]


def test_acknowledged_outbox_entries_are_deleted_with_the_next_write(make_config: Any, monkeypatch) -> None:
    state = counted_store(make_config)
    store = CoalescingStore(state, 2_000)
    _, relayed = state.write_with_outbox([], {}, [OutboxEntry(f"u{n}", f"p{n}", "{}") for n in range(3)])
    store.acknowledged.extend(relayed[:2])  # as the broker's acknowledgements append them

    def own_round_trip(ids: Any) -> None:
        raise AssertionError(f"a delete of {ids} in a round trip of its own")

    monkeypatch.setattr(state, "forget_outbox", own_round_trip)

    async def answer() -> str | None:
        mine, _, _ = await store.read(StateRequest("u9"))
        mine.record_send("p9", "widget", ["a"], 100)
        return await store.write(mine, {}, 5, 0, OutboxEntry("u9", "p9", "{}"))

    before = state.writes
    new = asyncio.run(answer())
    assert state.writes - before == 1  # no round trip of its own for the delete
    assert store.acknowledged == []
    assert [entry_id for entry_id, _ in state.outbox_older_than(2**62, 10)] == [relayed[2], new]
    # Only a delete to do (no state, answer or entry): still done.
    state.write_with_outbox([], {}, [], forget=[relayed[2]])
    assert [entry_id for entry_id, _ in state.outbox_older_than(2**62, 10)] == [new]


def test_a_failed_delete_of_acknowledged_entries_does_not_fail_the_write(store: OnlineState) -> None:
    # The delete refused in the write's transaction (here: not a stream id) is tried on its own;
    # the write stands and its results come back.
    states, _ = store.read(["u1"])
    states["u1"].record_send("p1", "widget", ["a"], 20)
    tried: list[Any] = []
    store.forget_outbox = tried.append  # type: ignore[method-assign]
    conflicts, ids = store.write_with_outbox(states.values(), {}, [OutboxEntry("u1", "p1", "{}")], ["bad-id"])
    assert conflicts == [] and len(ids) == 1 and tried == [["bad-id"]]
    assert store.read(["u1"])[0]["u1"].version == "1"
    assert [entry_id for entry_id, _ in store.outbox_older_than(2**62, 10)] == ids


def test_acknowledged_entries_stay_listed_when_the_write_fails(make_config: Any) -> None:
    cfg = make_config()
    nowhere = redis.Redis(port=free_port(), socket_connect_timeout=1, socket_timeout=1)
    store = CoalescingStore(OnlineState(nowhere, cfg.online_store.key_prefix, 60_000, 60_000), 2_000)
    store.acknowledged.append("1-0")

    async def write() -> None:
        await store.write(UserState("u1"), {}, 5, 0, OutboxEntry("u1", "p1", "{}"))

    with pytest.raises(redis.exceptions.ConnectionError):
        asyncio.run(write())
    assert store.acknowledged == ["1-0"]  # deleted by a later write or the service's own timer


def test_each_request_gets_its_own_reads_from_a_mixed_flush(make_config: Any) -> None:
    state = counted_store(make_config)
    store = CoalescingStore(state, 2_000)
    earlier = Answer(0, 7, ({"payload_id": "p-earlier", "items": []},))
    assert state.write([], {("u2", "t-done"): earlier}) == []
    state.client.hset(state.user_key("u-bad"), mapping={"v": "1", "p": "{not json", "s": "[]"})
    counter = f"{state.prefix}:api-rate:mixed"

    async def four_at_once() -> list[Any]:
        return list(
            await asyncio.gather(
                store.read(StateRequest("u1")),  # no trigger, no counter
                store.read(StateRequest("u2", [("u2", "t-new"), ("u2", "t-done")], counter)),
                store.read(StateRequest("u-bad", [], counter)),
                store.read(StateRequest("u3", [("u3", "t-x")], counter)),
                return_exceptions=True,
            )
        )

    plain, answered, bad, third = asyncio.run(four_at_once())
    assert state.reads == 1
    assert (plain[0].user_id, plain[1], plain[2]) == ("u1", {}, 0)
    assert (answered[0].user_id, answered[1], answered[2]) == ("u2", {("u2", "t-done"): earlier}, 1)
    assert isinstance(bad, ValueError)  # the corrupt profile fails its own request only
    assert (third[0].user_id, third[1], third[2]) == ("u3", {}, 3)


def test_a_store_error_reaches_every_request_waiting_on_it(make_config: Any) -> None:
    cfg = make_config()
    nowhere = redis.Redis(port=free_port(), socket_connect_timeout=1, socket_timeout=1)
    store = CoalescingStore(OnlineState(nowhere, cfg.online_store.key_prefix, 60_000, 60_000), 2_000)

    async def two_at_once() -> list[Any]:
        return list(
            await asyncio.gather(
                store.read(StateRequest("u1")), store.read(StateRequest("u2")), return_exceptions=True
            )
        )

    errors = asyncio.run(two_at_once())
    assert [type(err) for err in errors] == [redis.exceptions.ConnectionError] * 2
