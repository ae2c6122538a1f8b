"""Per-user state in the online store: profile, recent sends and answered triggers.

Role: the few Redis verbs the real-time path needs (Feast's ``online_read`` /
``online_write_batch`` shape), used by ``streaming/serve.py`` inside each micro-batch and by
``jobs/rebuild_online_store.py``. Inputs: a client from :func:`carousel.online_store.connect`.

Layout (``<prefix>`` = ``online_store.key_prefix``; ``{user}`` is a Redis Cluster hash tag, so
every key of one user lives in one slot):

* ``<prefix>:user:{<user id>}`` - one hash per user: ``p`` the :class:`OnlineProfile` (JSON),
  ``s`` the recent sends (JSON ``[[payload id, campaign, item id, sent micros], ...]``, within
  the longest ``sent_within_days`` / frequency-cap window), ``v`` a version counter. Expires
  ``online_store.profile_ttl_days`` after the last write.
* ``<prefix>:answered:{<user id>}:<trigger event id>`` - the answer given to a trigger (its Kafka
  coordinates and outbox records), kept ``serving.answered_ttl_hours``: a replayed batch re-sends
  the same answer, a trigger delivered again under a new offset is answered once.
* ``<prefix>:api-outbox`` - a stream: the API's outbox records (``api.record_outbox``:
  online_store) between the answer and the broker's acknowledgement; ``...:sweeper`` is the
  lease of the worker re-sending the ones left over.

The API (:mod:`carousel.api`) reads per request with :meth:`OnlineState.read_each`, the requests
a worker has in flight sharing one round trip.

Reads are one pipelined round trip per micro-batch (:func:`exchange`: the commands in one write,
the replies read in order, without redis-py's per-command pipeline bookkeeping). Writes are one
pipelined round trip too;
each user's hash is written by a compare-and-set on ``v`` (a three-line Lua script, no business
logic in Redis), so a concurrent writer - ``rebuild-online-store`` merging Delta profiles while
``serve`` runs - is never overwritten: the loser re-reads and re-applies its (idempotent) changes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.cluster import RedisCluster
from redis.exceptions import NoScriptError, ResponseError

from carousel.fastjson import compact_json
from carousel.online_profile import OnlineProfile
from carousel.online_store import STORE_ERRORS

log = logging.getLogger(__name__)

# KEYS[1] = the user's hash; ARGV = expected version ('' = absent), new version, profile, sends, ttl ms.
_CAS_SCRIPT = """
if (redis.call('HGET', KEYS[1], 'v') or '') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'p', ARGV[3], 's', ARGV[4])
if tonumber(ARGV[5]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[5]) else redis.call('PERSIST', KEYS[1]) end
return 1
"""
_CAS_SHA = hashlib.sha1(_CAS_SCRIPT.encode()).hexdigest()
# A lease (KEYS[1]) renewed, or given up, only by the owner that holds it (ARGV[1]); atomic.
_RENEW_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE_SCRIPT = (
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
)


@dataclass
class UserState:
    """One user's hash as read, and what this batch changed."""

    user_id: str
    version: str = ""  # '' = no hash yet
    profile: OnlineProfile = field(default_factory=OnlineProfile)
    sends: list[list[Any]] = field(default_factory=list)  # [[payload_id, campaign, item_id, micros]]
    changed: bool = False

    def sent_since(self, since_micros: int) -> list[dict[str, Any]]:
        """The recent sends as the ranking's exclusions read them."""
        return [
            {"payload_id": payload, "item_id": item, "sent_at": micros}
            for payload, _, item, micros in self.sends
            if micros >= since_micros
        ]

    def payloads_since(self, since_micros: int) -> int:
        """How many payloads (not items) the user got since then: the frequency cap's count."""
        return len({payload for payload, _, _, micros in self.sends if micros >= since_micros})

    def record_send(self, payload_id: str, campaign: str, items: Sequence[str], micros: int) -> None:
        known = {(entry[0], entry[2]) for entry in self.sends}
        for item in items:
            if (payload_id, item) not in known:
                self.sends.append([payload_id, campaign, item, micros])
        self.changed = True

    def prune_sends(self, keep_since_micros: int) -> None:
        kept = [entry for entry in self.sends if entry[3] >= keep_since_micros]
        if len(kept) != len(self.sends):
            self.sends = kept
            self.changed = True

    def merge_sends(self, other: Iterable[Sequence[Any]]) -> None:
        """Union with ``other`` sends (by payload id and item): idempotent."""
        known = {(entry[0], entry[2]) for entry in self.sends}
        for entry in other:
            if (entry[0], entry[2]) not in known:
                self.sends.append(list(entry))
                known.add((entry[0], entry[2]))
                self.changed = True


@dataclass(frozen=True)
class StateRequest:
    """What one API request reads: its user's state, the answers to ``triggers`` ((user, event
    id)) and one INCR of ``counter`` (its key's rate-limit window; None: no counter)."""

    user_id: str
    triggers: Sequence[tuple[str, str]] = ()
    counter: str | None = None


@dataclass(frozen=True)
class Answer:
    """What a trigger was answered with: its Kafka coordinates and its outbox records."""

    partition: int
    offset: int
    outbox: tuple[Mapping[str, Any], ...]

    def to_json(self) -> str:
        return compact_json({"at": [self.partition, self.offset], "o": list(self.outbox)})

    @classmethod
    def from_json(cls, text: str | bytes) -> Answer:
        data = json.loads(text)
        return cls(int(data["at"][0]), int(data["at"][1]), tuple(data["o"]))


class OnlineState:
    """Pipelined reads and compare-and-set writes of users' state (see the module docstring)."""

    def __init__(self, client: Any, key_prefix: str, profile_ttl_ms: int, answered_ttl_ms: int) -> None:
        self.client = client
        self.prefix = key_prefix
        self.profile_ttl_ms = profile_ttl_ms
        self.answered_ttl_ms = answered_ttl_ms
        # The CAS script is called by hash (Redis names a script by its SHA-1): no round trip to
        # load it per task; a server without it answers NOSCRIPT and :meth:`write` loads it (on
        # every primary of a cluster) once.

    def user_key(self, user_id: str) -> str:
        return f"{self.prefix}:user:{{{user_id}}}"

    def answered_key(self, user_id: str, event_id: str) -> str:
        return f"{self.prefix}:answered:{{{user_id}}}:{event_id}"

    # -- reads -----------------------------------------------------------------------------------
    def read(
        self, users: Sequence[str], triggers: Sequence[tuple[str, str]] = ()
    ) -> tuple[dict[str, UserState], dict[tuple[str, str], Answer]]:
        """The users' states and the answers already given to ``triggers`` ((user, event id)),
        in one pipelined round trip."""
        hashes, answered, _ = self._read_pipelined(users, triggers, (), 0)
        return (
            {user: _state(user, reply) for user, reply in zip(users, hashes, strict=True)},
            {
                trigger: Answer.from_json(reply)
                for trigger, reply in zip(triggers, answered, strict=True)
                if reply is not None
            },
        )

    def read_each(
        self, requests: Sequence[StateRequest], counter_ttl_ms: int
    ) -> list[tuple[UserState, dict[tuple[str, str], Answer], int] | Exception]:
        """Each request's user state, the answers already given to its triggers, and its counter's
        new value (INCR, expiring ``counter_ttl_ms`` later; 0: none): the API's reads, every
        request a worker has in flight in one pipelined round trip.

        A user asked for twice gets two separate states, so two requests never share one. A
        request whose stored values cannot be parsed gets the error in its place: one bad value
        fails its own request, not the others read with it. A store error is raised."""
        users = [request.user_id for request in requests]
        triggers = [trigger for request in requests for trigger in request.triggers]
        counters = [request.counter for request in requests if request.counter is not None]
        hashes, answered, counts = self._read_pipelined(users, triggers, counters, counter_ttl_ms)
        found = iter(zip(triggers, answered, strict=True))
        counted = iter(counts)
        results: list[tuple[UserState, dict[tuple[str, str], Answer], int] | Exception] = []
        for request, reply in zip(requests, hashes, strict=True):
            mine = [next(found) for _ in request.triggers]
            count = next(counted) if request.counter is not None else 0
            try:
                state = _state(request.user_id, reply)
                answers = {trigger: Answer.from_json(text) for trigger, text in mine if text is not None}
            except (ValueError, KeyError, TypeError, IndexError) as err:
                results.append(err)
                continue
            results.append((state, answers, count))
        return results

    def count(self, counter: str, ttl_ms: int) -> int:
        """INCR ``counter`` (expiring ``ttl_ms`` later) in one round trip; its new value."""
        return self._read_pipelined((), (), (counter,), ttl_ms)[2][0]

    def _read_pipelined(
        self,
        users: Sequence[str],
        triggers: Sequence[tuple[str, str]],
        counters: Sequence[str],
        counter_ttl_ms: int,
    ) -> tuple[list[Any], list[bytes | None], list[int]]:
        """One round trip: the users' hashes (v, p, s), the triggers' answers, and each counter
        INCRed (and set to expire); the raw replies in the order asked."""
        if not (users or triggers or counters):
            return [], [], []
        commands: list[tuple[Any, ...]] = [("HMGET", self.user_key(user), "v", "p", "s") for user in users]
        commands += [("GET", self.answered_key(user, event_id)) for user, event_id in triggers]
        for counter in counters:
            commands += [("INCR", counter), ("PEXPIRE", counter, counter_ttl_ms)]
        if isinstance(self.client, RedisCluster):  # routed by each key's slot
            pipe = self.client.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            replies = pipe.execute()
        else:
            replies = exchange(self.client, commands)
            _raise_first_error(replies)
        n_users, n_triggers = len(users), len(triggers)
        counts = [int(reply) for reply in replies[n_users + n_triggers :: 2]]  # INCR, PEXPIRE, ...
        return replies[:n_users], replies[n_users : n_users + n_triggers], counts

    # -- writes ----------------------------------------------------------------------------------
    def write(
        self, states: Iterable[UserState], answers: Mapping[tuple[str, str], Answer] | None = None
    ) -> list[str]:
        """Write the changed states (compare-and-set) and the new answers; one round trip.

        Returns the users whose hash another writer changed since :meth:`read`: nothing of theirs
        was written, and the caller re-reads and re-applies.
        """
        return self.write_with_outbox(states, answers, ())[0]

    def write_with_outbox(
        self,
        states: Iterable[UserState],
        answers: Mapping[tuple[str, str], Answer] | None,
        outbox: Sequence[OutboxEntry],
        forget: Sequence[str] = (),
    ) -> tuple[list[str], list[str]]:
        """:meth:`write`, and ``outbox`` appended to the outbox stream in the same round trip;
        (the users in conflict, the outbox entries' ids). On a single Redis the whole write is
        one MULTI/EXEC when it carries outbox entries: no reader, and no restart from the AOF,
        sees the sends without their outbox records (a command that errors inside does not undo
        the others: the error is raised). On a cluster the stream's node is written first, on
        its own. ``forget``: outbox entries the broker has acknowledged, removed in the same
        round trip (:meth:`forget_outbox` without a round trip of its own). A failed delete does
        not fail the write: it is tried once on its own (which follows a cluster's redirects),
        and if that fails too the entries stay, for the sweep to relay again (record-sends drops
        the duplicate)."""
        changed = [state for state in states if state.changed]
        if not changed and not answers and not outbox and not forget:
            return [], []
        # The outbox first: on a cluster its node is written before the users' (no transaction
        # spans them), so a failure between the two leaves a record of an answer that was not
        # given rather than an answer given and never recorded; the retry (same request id, same
        # payload id) is then recorded as that one, and record-sends keeps one per payload id.
        commands = [
            (self.outbox_key, ("XADD", self.outbox_key, "*", *_pairs(entry.fields()))) for entry in outbox
        ]
        commands += self._cas_commands(changed)
        commands += [
            (key, ("SET", key, answer.to_json(), "PX", self.answered_ttl_ms))
            for key, answer in (
                (self.answered_key(user, event_id), answer)
                for (user, event_id), answer in (answers or {}).items()
            )
        ]
        if forget:  # last: the replies before it keep their places
            commands.append((self.outbox_key, ("XDEL", self.outbox_key, *forget)))
        replies = self._run_commands(commands, atomic=bool(outbox))
        deleted = replies.pop() if forget else None  # not the write's: handled after it
        first_cas = len(outbox)
        missing = [
            i
            for i, reply in enumerate(replies[first_cas : first_cas + len(changed)], start=first_cas)
            if isinstance(reply, NoScriptError)
        ]
        if missing:
            # The server lost its script cache (a restart, SCRIPT FLUSH): load it again and run
            # those compare-and-sets once more (the rest of the write went through).
            self.client.script_load(_CAS_SCRIPT)
            for i, reply in zip(
                missing, self._run_commands([commands[i] for i in missing], False), strict=True
            ):
                replies[i] = reply
        _raise_first_error(replies)
        if isinstance(deleted, Exception):
            try:
                self.forget_outbox(forget)
            except STORE_ERRORS as err:
                log.warning("%d relayed outbox entries left in the store for the sweep: %s", len(forget), err)
        cas = replies[first_cas : first_cas + len(changed)]
        conflicts = [s.user_id for s, ok in zip(changed, cas, strict=True) if not int(ok)]
        return conflicts, [_text(reply) for reply in replies[:first_cas]]

    def _cas_commands(self, changed: Sequence[UserState]) -> list[tuple[str, tuple[Any, ...]]]:
        return [
            (
                key,
                (
                    "EVALSHA",
                    _CAS_SHA,
                    1,
                    key,
                    state.version,
                    str(int(state.version or 0) + 1),
                    state.profile.to_json(),
                    compact_json(state.sends),
                    self.profile_ttl_ms,
                ),
            )
            for key, state in ((self.user_key(state.user_id), state) for state in changed)
        ]

    def _run_commands(self, commands: Sequence[tuple[str, tuple[Any, ...]]], atomic: bool) -> list[Any]:
        """Run ``commands`` ((key, the command's words)) pipelined; their replies in order, an
        error in its command's place.

        On Redis Cluster the commands are grouped by the node that owns each key's slot and each
        node gets one plain pipeline (still one round trip per node; a cluster pipeline refuses
        scripts). ``atomic``: one MULTI/EXEC on a single Redis."""
        if isinstance(self.client, RedisCluster):
            groups: dict[str, tuple[Any, list[int]]] = {}
            for position, (key, _) in enumerate(commands):
                node = self.client.get_node_from_key(key)
                groups.setdefault(node.name, (node.redis_connection, []))[1].append(position)
            atomic = False
        else:
            groups = {"": (self.client, list(range(len(commands))))}
        replies: list[Any] = [None] * len(commands)
        for connection, positions in groups.values():
            words = [commands[position][1] for position in positions]
            if atomic:
                # In a transaction a NOSCRIPT cannot be undone (EXEC runs the other commands all
                # the same): the script's text instead, cached by the server per SHA.
                words = [("EVAL", _CAS_SCRIPT, *w[2:]) if w[0] == "EVALSHA" else w for w in words]
                got = _transaction_replies(exchange(connection, [("MULTI",), *words, ("EXEC",)]))
            else:
                got = exchange(connection, words)
            for position, reply in zip(positions, got, strict=True):
                replies[position] = reply
        return replies

    # -- the API's outbox ------------------------------------------------------------------------
    @property
    def outbox_key(self) -> str:
        return outbox_key(self.prefix)

    def outbox_length(self) -> int:
        """Entries in the outbox stream: records not yet acknowledged by the broker."""
        return int(self.client.xlen(self.outbox_key))

    def forget_outbox(self, ids: Sequence[str]) -> None:
        """Remove outbox entries the broker has acknowledged (XDEL; unknown ids are skipped)."""
        if ids:
            self.client.xdel(self.outbox_key, *ids)

    def outbox_older_than(
        self, before_ms: int, count: int, after: str | None = None
    ) -> list[tuple[str, OutboxEntry | None]]:
        """Up to ``count`` outbox entries added before ``before_ms`` (Unix milliseconds of the
        Redis server: a stream id is its time of the XADD; see :meth:`server_time_ms`), oldest
        first, after the entry ``after`` if given (paging). An entry that cannot be read comes
        with None."""
        start = f"({after}" if after else "-"
        found = self.client.xrange(self.outbox_key, start, f"{max(before_ms, 0)}", count=count)
        return [(_text(entry_id), OutboxEntry.from_fields(fields)) for entry_id, fields in found]

    def claim(self, key: str, owner: str, ttl_ms: int) -> bool:
        """Take (or renew) the lease ``key`` for ``owner`` for ``ttl_ms``; False while another
        owner holds it."""
        if self.client.set(key, owner, nx=True, px=ttl_ms):
            return True
        return bool(self.client.eval(_RENEW_SCRIPT, 1, key, owner, ttl_ms))  # only if still its own

    def release(self, key: str, owner: str) -> None:
        """Give up the lease ``key`` if ``owner`` still holds it."""
        self.client.eval(_RELEASE_SCRIPT, 1, key, owner)

    def server_time_ms(self) -> int:
        """The Redis server's clock (stream ids are its time), in Unix milliseconds."""
        reply = self.client.time()
        if isinstance(reply, dict):  # a cluster answers per node: any one (NTP keeps them close)
            reply = next(iter(reply.values()))
        seconds, micros = reply
        return int(seconds) * 1000 + int(micros) // 1000


def exchange(client: Any, commands: Sequence[Sequence[Any]]) -> list[Any]:
    """``commands`` (each a command's words) sent in one write on one of ``client``'s pooled
    connections, and their replies read in order, an error reply (:class:`ResponseError`) in its
    command's place.

    What redis-py's pipeline does, without its per-command bookkeeping (command objects, response
    callbacks, observability hooks): about half its CPU per round trip, on the API's request
    path (bench/README.md "API"). The replies are Redis's own: HMGET a list, GET bytes or None,
    INCR, PEXPIRE and EVAL integers, SET and MULTI ``b"OK"``, XADD the id. A connection or
    timeout error is retried by the client's retry policy on a fresh connection, as redis-py
    retries a pipeline."""
    pool = client.connection_pool
    connection = pool.get_connection()

    def send_and_read() -> list[Any]:
        connection.send_packed_command(connection.pack_commands(commands))
        replies: list[Any] = []
        for _ in commands:
            try:
                replies.append(connection.read_response())
            except ResponseError as err:
                replies.append(err)
        return replies

    try:
        return connection.retry.call_with_retry(send_and_read, lambda _error: connection.disconnect())
    finally:
        pool.release(connection)


def _raise_first_error(replies: Sequence[Any]) -> None:
    """Raise the first error reply of a round trip, if any (the others' replies are then moot)."""
    failed = next((reply for reply in replies if isinstance(reply, Exception)), None)
    if failed is not None:
        raise failed


def _transaction_replies(replies: Sequence[Any]) -> list[Any]:
    """The replies of the commands between a MULTI and its EXEC, from :func:`exchange`'s replies to
    all of them: EXEC's array, or, when the transaction was refused (a command refused as it was
    queued: EXECABORT), each command's own refusal, or EXEC's in the place of the others."""
    queued, executed = replies[1:-1], replies[-1]
    if isinstance(replies[0], Exception):
        raise replies[0]
    if isinstance(executed, Exception):
        refused = next((reply for reply in queued if isinstance(reply, Exception)), None)
        if refused is not None:  # EXECABORT: say why in the place of each discarded command
            executed = type(executed)(f"{executed} ({refused})")
        return [reply if isinstance(reply, Exception) else executed for reply in queued]
    if executed is None or len(executed) != len(queued):
        raise ResponseError(f"the transaction was not run as sent (EXEC replied {executed!r})")
    return list(executed)


def _pairs(fields: Mapping[str, Any]) -> list[Any]:
    return [word for pair in fields.items() for word in pair]


def outbox_key(prefix: str) -> str:
    """The outbox stream of the deployment whose keys start with ``prefix``."""
    return f"{prefix}:api-outbox"


def remove_users_outbox_entries(client: Any, prefix: str, users: Collection[str], page: int = 1000) -> int:
    """Delete the outbox entries of ``users`` (``forget-user``): records of answers not yet
    relayed to the broker hold the user's id. Every entry of theirs goes, whenever it was sent
    (stricter than the erasure rule, which keeps sends after ``erased_at``). One pass over the
    stream, ``page`` entries at a time; returns how many were deleted. An entry relayed
    meanwhile is already on the topic, where ``record-sends`` drops it (its user erased after
    its ``sent_at``)."""
    wanted, key, after, removed = set(users), outbox_key(prefix), "-", 0
    while True:
        found = client.xrange(key, after, "+", count=page)
        if not found:
            return removed
        mine = [entry_id for entry_id, fields in found if _entry_user(fields) in wanted]
        if mine:
            removed += int(client.xdel(key, *mine))
        after = f"({_text(found[-1][0])}"


def _entry_user(fields: Mapping[Any, Any]) -> str | None:
    try:
        entry = OutboxEntry.from_fields(fields)
    except UnicodeDecodeError:  # not an entry the API wrote
        return None
    return entry.user_id if entry is not None else None


@dataclass(frozen=True)
class OutboxEntry:
    """An answer's outbox record, kept in the online store until the broker has acknowledged it."""

    user_id: str
    payload_id: str
    record: str  # the outbox record's JSON, as the broker gets it

    def fields(self) -> dict[str, str]:
        return {"u": self.user_id, "p": self.payload_id, "r": self.record}

    @classmethod
    def from_fields(cls, fields: Mapping[Any, Any]) -> OutboxEntry | None:
        """The entry, or None when its fields are not an entry's (written by something else)."""
        values = {_text(key): _text(value) for key, value in fields.items()}
        if not {"u", "p", "r"} <= values.keys():
            return None
        return cls(values["u"], values["p"], values["r"])


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _state(user: str, reply: Sequence[bytes | None]) -> UserState:
    version, profile, sends = reply
    return UserState(
        user_id=user,
        version=version.decode() if version else "",
        profile=OnlineProfile.from_json(profile),
        sends=json.loads(sends) if sends else [],
    )
