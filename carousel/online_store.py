"""The online store: Redis (or Valkey) keys that the real-time path reads and writes per user.

Role: one place that knows how to reach the store and how its keys are named. Every key of one
user is ``<key_prefix>:<kind>:{<user id>}``: the hash tag ``{<user id>}`` keeps a user's keys in
one Redis Cluster slot, so they can be read and written together in one pipeline.

Inputs: the ``online_store`` section of the configuration (``url``, ``cluster``, ``key_prefix``,
``tls_ca_file``, ``socket_timeout_seconds``); ``CAROUSEL_REDIS_PASSWORD`` and
``CAROUSEL_REDIS_USERNAME`` from the environment (never from YAML, never logged).

Outputs: clients (:func:`connect`, one per process, url and credentials, reused across the tasks a
Spark Python worker runs) and key names (:func:`user_key`).

A library module, no command of its own; the local server for the demo and the tests is
``./spark-submit.sh online-store start`` (:mod:`carousel.online_store_server`).
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections.abc import Callable
from urllib.parse import urlsplit

import redis
import redis.cluster
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from carousel.config import OnlineStoreConfig, mask_secrets, masked_url

START_COMMAND = "./spark-submit.sh online-store start"

Client = redis.Redis | redis.cluster.RedisCluster


class OnlineStoreError(RuntimeError):
    """The online store cannot be reached or used; the message names the url (password masked)."""


# ---------------------------------------------------------------------------------------------
# Connection

# (pid, url, cluster, tls CA, timeout, credentials digest) -> client. The pid keeps a forked
# process from sharing its parent's sockets; redis-py pools reconnect on their own after errors.
_CLIENTS: dict[tuple[int, str, bool, str, float, str], Client] = {}
_CLIENTS_LOCK = threading.Lock()


def _credentials_digest(credentials: dict[str, str]) -> str:
    text = "\0".join(f"{key}={credentials[key]}" for key in sorted(credentials))
    return hashlib.sha256(text.encode()).hexdigest()


def connect(store_cfg: OnlineStoreConfig) -> Client:
    """The process's client for ``store_cfg.url``: a ``redis.Redis``, or a ``RedisCluster`` with ``cluster``.

    Clients are cached per process, url, cluster flag and credentials, so the tasks a Spark Python
    worker runs one after another reuse its connections. ``rediss://`` urls use TLS, verified
    against ``tls_ca_file`` when set (else the system's trust store). Replies are bytes.
    A cluster client contacts its seed node here, so it may raise ``RedisClusterException`` or
    ``redis.RedisError``; :func:`check_reachable` turns those into :class:`OnlineStoreError`.
    """
    credentials = store_cfg.credentials()
    key = (
        os.getpid(),
        store_cfg.url,
        store_cfg.cluster,
        store_cfg.tls_ca_file,
        store_cfg.socket_timeout_seconds,
        _credentials_digest(credentials),
    )
    client = _CLIENTS.get(key)
    if client is not None:
        return client
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is not None:
            return client
        options: dict[str, object] = {
            "socket_timeout": store_cfg.socket_timeout_seconds,
            "socket_connect_timeout": store_cfg.socket_timeout_seconds,
            "decode_responses": False,
            **credentials,
        }
        if store_cfg.tls_ca_file and urlsplit(store_cfg.url).scheme == "rediss":
            options["ssl_ca_certs"] = store_cfg.tls_ca_file
        if store_cfg.cluster:
            # RedisCluster keeps its node connections healthy itself and drops health_check_interval.
            client = redis.cluster.RedisCluster.from_url(store_cfg.url, **options)
        else:
            client = redis.Redis.from_url(store_cfg.url, health_check_interval=30, **options)
        _CLIENTS[key] = client
        return client


def user_key(store_cfg_or_prefix: OnlineStoreConfig | str, kind: str, user_id: str) -> str:
    """``<prefix>:<kind>:{<user id>}``: the hash tag puts all of a user's keys in one cluster slot."""
    prefix = store_cfg_or_prefix if isinstance(store_cfg_or_prefix, str) else store_cfg_or_prefix.key_prefix
    if not user_id or "{" in kind or "}" in kind:
        raise ValueError(f"cannot build a key from kind={kind!r}, user_id={user_id!r}")
    return f"{prefix}:{kind}:{{{user_id}}}"


def user_of_key(key: str, prefix: str) -> str | None:
    """The user id of an online-store key ``<prefix>:<kind>:{<user id>}[:...]``; None for a key
    of no user (another prefix, the API's rate counters)."""
    match = re.fullmatch(rf"{re.escape(prefix)}:[^:{{}}]+:\{{(.+?)\}}(?::.*)?", key, flags=re.DOTALL)
    return match.group(1) if match else None


# What a call to the online store may raise when the store (not the caller) fails.
STORE_ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, RedisClusterException, OSError)


def ping_check(store_cfg: OnlineStoreConfig, timeout_seconds: float) -> Callable[[], object]:
    """A quick PING for a supervisor's probe (:func:`carousel.supervision.dependency_probe`): its
    own client, ``timeout_seconds`` per call and no retries, so a store that is down or hung is
    told in about that time (the serving client retries, which is right for serving, not for a
    probe). It raises while the store does not answer."""
    if store_cfg.cluster:  # the cluster client reaches its seed node at construction
        quick = store_cfg.model_copy(update={"socket_timeout_seconds": timeout_seconds})
        return lambda: connect(quick).ping()
    options: dict[str, object] = {
        "socket_timeout": timeout_seconds,
        "socket_connect_timeout": timeout_seconds,
        "retry": Retry(NoBackoff(), 0),
        **store_cfg.credentials(),
    }
    if store_cfg.tls_ca_file and urlsplit(store_cfg.url).scheme == "rediss":
        options["ssl_ca_certs"] = store_cfg.tls_ca_file
    client = redis.Redis.from_url(store_cfg.url, **options)
    return client.ping


def check_reachable(store_cfg: OnlineStoreConfig) -> None:
    """PING the store; raises :class:`OnlineStoreError` naming the url and how to start a local one."""
    url = masked_url(store_cfg.url)
    try:
        connect(store_cfg).ping()
    except STORE_ERRORS as err:
        # The qualified class name: supervision.transient_errors matches it on a restart.
        reason = mask_secrets(
            f"{type(err).__module__}.{type(err).__name__}: {err}", urlsplit(store_cfg.url).password
        )
        raise OnlineStoreError(
            f"the online store at {url} does not answer ({reason}). Start the local one with "
            f"`{START_COMMAND}`, or point online_store.url at a running Redis / Valkey"
        ) from None
