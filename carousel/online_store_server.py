"""The embedded local Redis server that holds the online store for the demo and the tests.

Role: run a real ``redis-server`` (or ``valkey-server``) process bound to the loopback address
``online_store.host`` only, with append-only-file persistence (``appendfsync everysec``: survives
a restart, loses at most about a second on a crash) and ``maxmemory-policy noeviction`` (a full
store fails writes loudly instead of silently dropping profiles). Production points
``online_store.url`` at a managed Redis / Valkey instead and never runs this.

Inputs: the ``online_store`` section of the configuration (state folder, host, port, max memory,
start timeout, the db number of ``url``); ``CAROUSEL_REDIS_PASSWORD`` (and
``CAROUSEL_REDIS_USERNAME``) when set, which the server then requires; the server binary, found on
``PATH`` or in /usr/bin, /usr/sbin (``scripts/setup.sh`` installs the Debian package).

Outputs, all under ``online_store.state_dir``: ``redis.conf`` (rewritten on every start, mode 0600),
``data/`` (the append-only files), ``logs/redis.log`` (the server's log), ``logs/redis.out`` (its
stdout / stderr) and ``redis.pid`` while it runs.

Run it with::

    ./spark-submit.sh online-store start     # start (no-op when already running); prints the url
    ./spark-submit.sh online-store status    # one-line JSON: running, pid, url, memory, keys
    ./spark-submit.sh online-store flush     # FLUSHDB: every key of the configured db is deleted
    ./spark-submit.sh online-store stop
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from carousel import local_process
from carousel.config import ConfigError, OnlineStoreConfig, load_config

log = logging.getLogger(__name__)

SERVER_NAMES = ("redis-server", "valkey-server")
SEARCH_DIRS = ("/usr/bin", "/usr/sbin", "/usr/local/bin")
INSTALL_COMMAND = "sudo apt-get install -y redis-server"
START_COMMAND = "./spark-submit.sh online-store start"
POLL_SECONDS = 0.1
LOG_TAIL_LINES = 40

# Servers started by this Python process: their Popen objects let us reap them, so a server that
# died is not mistaken for a running one (a zombie still answers os.kill(pid, 0)).
_CHILDREN: local_process.Children = {}


class OnlineStoreServerError(RuntimeError):
    """The local server is missing, did not start, stop or answer; the message says what to do."""


# ---------------------------------------------------------------------------------------------
# Paths, files and addresses


def _state(store_cfg: OnlineStoreConfig) -> Path:
    return Path(store_cfg.state_dir)


def _pid_file(store_cfg: OnlineStoreConfig) -> Path:
    return _state(store_cfg) / "redis.pid"


def _lock_file(store_cfg: OnlineStoreConfig) -> Path:
    return _state(store_cfg) / "redis.lock"


def _conf_file(store_cfg: OnlineStoreConfig) -> Path:
    return _state(store_cfg) / "redis.conf"


def _logs_dir(store_cfg: OnlineStoreConfig) -> Path:
    return _state(store_cfg) / "logs"


def _data_dir(store_cfg: OnlineStoreConfig) -> Path:
    return _state(store_cfg) / "data"


def _bind_host(store_cfg: OnlineStoreConfig) -> str:
    """The loopback address to bind; anything else is refused (the local server has no TLS)."""
    host = store_cfg.host.strip()
    if host == "localhost":
        return "127.0.0.1"
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise OnlineStoreServerError(
            f"online_store.host must be a loopback address (127.0.0.1, ::1 or localhost) for the "
            f"embedded server, got {store_cfg.host!r}; for a shared server set online_store.url instead"
        )
    return host


def _db(store_cfg: OnlineStoreConfig) -> int:
    path = urlsplit(store_cfg.url).path.strip("/")
    return int(path) if path.isdigit() else 0


def local_url(store_cfg: OnlineStoreConfig) -> str:
    """``redis://host:port/db`` of the local server (db from ``online_store.url``)."""
    host = _bind_host(store_cfg)
    shown = f"[{host}]" if ":" in host else host
    return f"redis://{shown}:{store_cfg.port}/{_db(store_cfg)}"


def find_redis_server(path: str | None = None, dirs: Sequence[str] = SEARCH_DIRS) -> str:
    """The server binary: ``redis-server`` or ``valkey-server`` on ``path`` (default ``PATH``) or in ``dirs``.

    Raises :class:`OnlineStoreServerError` naming the command that installs it.
    """
    for name in SERVER_NAMES:
        found = shutil.which(name, path=path)
        if found:
            return found
    for directory in dirs:
        for name in SERVER_NAMES:
            candidate = Path(directory) / name
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    raise OnlineStoreServerError(
        f"no redis-server or valkey-server found (PATH, {', '.join(dirs) or 'no other folders'}): "
        f"install it with `{INSTALL_COMMAND}` (as root: `apt-get install -y redis-server`)"
    )


def _quote(value: str) -> str:
    """A redis.conf argument in double quotes (the server's own config tokenizer unescapes it)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def server_conf(store_cfg: OnlineStoreConfig) -> str:
    """The ``redis.conf`` text for the local server (without the credentials, see :func:`start`)."""
    return "\n".join(
        [
            "# Written by carousel.online_store_server on every start; edit conf/carousel.yaml instead.",
            f"bind {_bind_host(store_cfg)}",
            "protected-mode yes",
            f"port {store_cfg.port}",
            # No `pidfile`: the server would overwrite ours (pid and start time) with its bare pid.
            "daemonize no",
            "loglevel notice",
            f"logfile {_quote(str(_logs_dir(store_cfg) / 'redis.log'))}",
            f"dir {_quote(str(_data_dir(store_cfg)))}",
            # Durability from the append-only file, fsynced once a second; no RDB snapshots on top.
            "appendonly yes",
            "appendfsync everysec",
            'save ""',
            # A full store must reject writes, never evict a user's profile behind our back.
            f"maxmemory {store_cfg.max_memory.lower()}",
            "maxmemory-policy noeviction",
            # The config path in the process title lets stop() / status() recognise our process.
            'proc-title-template "{title} {listen-addr} {server-mode} {config-file}"',
            "",
        ]
    )


def _credential_lines(store_cfg: OnlineStoreConfig) -> list[str]:
    creds = store_cfg.credentials()
    password = creds.get("password")
    if not password:
        return []
    lines = [f"requirepass {_quote(password)}"]
    username = creds.get("username")
    if username and username != "default":
        lines.append(f"user {_quote(username)} on {_quote('>' + password)} ~* &* +@all")
    return lines


def _write_conf(store_cfg: OnlineStoreConfig) -> None:
    path = _conf_file(store_cfg)
    text = server_conf(store_cfg) + "\n".join([*_credential_lines(store_cfg), ""])
    # 0600: the file may carry the password.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(path, 0o600)


def _log_tails(store_cfg: OnlineStoreConfig) -> str:
    logs = _logs_dir(store_cfg)
    return local_process.log_tails([logs / "redis.log", logs / "redis.out"], LOG_TAIL_LINES)


# ---------------------------------------------------------------------------------------------
# Process handling


def _is_ours(pid: int, store_cfg: OnlineStoreConfig) -> bool:
    """True while ``pid`` is alive and is the server of this state folder (not a reused pid): its
    start time is the one in the pid file or, for a pid file without one, its process title matches."""

    def matches(cmdline: str) -> bool:
        listen = f"{_bind_host(store_cfg)}:{store_cfg.port}"
        return any(name in cmdline for name in SERVER_NAMES) and (
            str(_conf_file(store_cfg)) in cmdline or listen in cmdline
        )

    started = local_process.recorded_start_time(_pid_file(store_cfg), pid)
    return local_process.is_ours(pid, _CHILDREN, matches, started)


def _ours(store_cfg: OnlineStoreConfig) -> Callable[[int], bool]:
    return lambda pid: _is_ours(pid, store_cfg)


def _running_pid(store_cfg: OnlineStoreConfig) -> int | None:
    return local_process.running_pid(_pid_file(store_cfg), _ours(store_cfg))


def _kill(pid: int, store_cfg: OnlineStoreConfig) -> None:
    """SIGKILL the server's process group (it leads its own session; the group also holds an
    append-only-file rewrite child, if one runs) and wait until it is gone."""
    local_process.kill(pid, _ours(store_cfg), _CHILDREN, POLL_SECONDS)


def _shutdown(pid: int, store_cfg: OnlineStoreConfig, timeout: float) -> None:
    """SHUTDOWN (or SIGTERM when that fails); SIGKILL after ``timeout`` seconds."""
    client = _client(store_cfg, timeout=min(timeout, 10.0))
    try:
        # SHUTDOWN fsyncs the append-only file before the server exits.
        client.shutdown()
    except redis.RedisError as err:
        log.info("SHUTDOWN failed (%s); sending SIGTERM", type(err).__name__)
        local_process.send_signal(pid, signal.SIGTERM)
    finally:
        client.close()
    local_process.kill_unless_gone(
        pid,
        is_ours=_ours(store_cfg),
        children=_CHILDREN,
        timeout=timeout,
        poll_seconds=POLL_SECONDS,
        label="online store",
        error=OnlineStoreServerError,
        logger=log,
    )


def _client(store_cfg: OnlineStoreConfig, timeout: float = 2.0) -> redis.Redis:
    """A one-off management client for the local server: no retries, so polling stays prompt."""
    return redis.Redis(
        host=_bind_host(store_cfg),
        port=store_cfg.port,
        db=_db(store_cfg),
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        **store_cfg.credentials(),
    )


def _wait_ping(store_cfg: OnlineStoreConfig, timeout: float, pid: int) -> None:
    """Poll PING until it answers (the server also refuses commands while it loads its AOF)."""
    deadline = time.monotonic() + timeout
    last_error = "nothing tried yet"
    while True:
        if not _is_ours(pid, store_cfg):
            raise OnlineStoreServerError(f"the server process {pid} exited while starting")
        client = _client(store_cfg, timeout=max(0.2, min(2.0, deadline - time.monotonic())))
        try:
            if client.ping():
                return
        except redis.AuthenticationError as err:
            raise OnlineStoreServerError(
                f"the server answers but refuses our credentials ({err}): it runs with another "
                f"CAROUSEL_REDIS_PASSWORD; stop it and start it again"
            ) from None
        except redis.RedisError as err:
            last_error = f"{type(err).__name__}: {err}"
        finally:
            client.close()
        if time.monotonic() >= deadline:
            raise OnlineStoreServerError(f"no answer to PING within {timeout:.0f}s ({last_error})")
        time.sleep(POLL_SECONDS)


# ---------------------------------------------------------------------------------------------
# Public API


def start(store_cfg: OnlineStoreConfig) -> str:
    """Start the local server (no-op when ours already runs), wait until PING answers; returns its url.

    Raises :class:`OnlineStoreServerError` when the host is not loopback, the binary is missing, the
    port is taken by another process, or the server exits or does not answer within
    ``start_timeout_seconds`` (the message then carries the log tails).
    """
    url = local_url(store_cfg)  # refuses a non-loopback host first
    started = time.monotonic()
    with local_process.locked(_lock_file(store_cfg)):
        pid = _running_pid(store_cfg)
        if pid is not None:
            log.info("online store already running (pid %d); waiting until %s answers", pid, url)
            try:
                _wait_ping(store_cfg, store_cfg.start_timeout_seconds, pid)
            except OnlineStoreServerError as err:
                raise OnlineStoreServerError(
                    f"online store pid {pid} runs but does not answer: {err}\n{_log_tails(store_cfg)}"
                ) from None
            return url
        _pid_file(store_cfg).unlink(missing_ok=True)  # stale: its process is gone
        local_process.refuse_taken_ports(
            _bind_host(store_cfg),
            (store_cfg.port,),
            store_cfg.state_dir,
            "choose another online_store.port",
            OnlineStoreServerError,
        )
        binary = find_redis_server()
        _logs_dir(store_cfg).mkdir(parents=True, exist_ok=True)
        _data_dir(store_cfg).mkdir(parents=True, exist_ok=True)
        _write_conf(store_cfg)
        # In a new session, so it outlives the `online-store start` command; spawn writes the pid
        # file (pid and start time).
        proc = local_process.spawn(
            [binary, str(_conf_file(store_cfg))],
            _logs_dir(store_cfg) / "redis.out",
            _state(store_cfg),
            _pid_file(store_cfg),
            _CHILDREN,
        )
        log.info("online store pid %d starting on %s (logs in %s)", proc.pid, url, _logs_dir(store_cfg))
        try:
            _wait_ping(store_cfg, store_cfg.start_timeout_seconds, proc.pid)
        except OnlineStoreServerError as err:
            state = local_process.abandon_start(proc, _pid_file(store_cfg), lambda pid: _kill(pid, store_cfg))
            raise OnlineStoreServerError(
                f"{Path(binary).name} on {url} {state} ({err})\n{_log_tails(store_cfg)}"
            ) from None
    if urlsplit(store_cfg.url).port not in (None, store_cfg.port):
        log.warning("online_store.url does not point at this local server (%s)", url)
    log.info("online store ready on %s after %.1fs", url, time.monotonic() - started)
    return url


def stop(store_cfg: OnlineStoreConfig, timeout: float = 30) -> bool:
    """Stop the local server: SHUTDOWN (or SIGTERM), SIGKILL after ``timeout`` s. True when one ran."""
    return local_process.stop_running(
        _lock_file(store_cfg),
        _pid_file(store_cfg),
        _ours(store_cfg),
        lambda pid: _shutdown(pid, store_cfg, timeout),
        "online store",
        log,
    )


def status(store_cfg: OnlineStoreConfig) -> dict[str, Any]:
    """Whether the local server runs; its pid, url, state folder, memory in use and key count."""
    pid = _running_pid(store_cfg) if _state(store_cfg).is_dir() else None
    result: dict[str, Any] = {
        "running": pid is not None,
        "pid": pid,
        "url": local_url(store_cfg),
        "state_dir": store_cfg.state_dir,
        "max_memory": store_cfg.max_memory,
        "reachable": False,
        "used_memory_human": None,
        "keys": None,
    }
    if pid is not None:
        client = _client(store_cfg)
        try:
            result["used_memory_human"] = client.info("memory").get("used_memory_human")
            result["keys"] = int(client.dbsize())
            result["reachable"] = True
        except redis.RedisError as err:
            log.warning("online store pid %d does not answer: %s", pid, type(err).__name__)
        finally:
            client.close()
    return result


def flush(store_cfg: OnlineStoreConfig) -> int:
    """FLUSHDB on the local server's configured db (a "lost store"); returns how many keys it held."""
    client = _client(store_cfg, timeout=store_cfg.socket_timeout_seconds)
    try:
        keys = int(client.dbsize())
        client.flushdb()
    except redis.RedisError as err:
        raise OnlineStoreServerError(
            f"cannot flush {local_url(store_cfg)} ({type(err).__name__}: {err}); is it running? "
            f"({START_COMMAND})"
        ) from None
    finally:
        client.close()
    log.info("flushed %d keys from %s", keys, local_url(store_cfg))
    return keys


# ---------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    def config_flags(parser: argparse.ArgumentParser, suffix: str) -> None:
        # The same flags before and after the subcommand, kept in separate lists, because argparse
        # would let the subcommand's empty defaults overwrite the ones given before it.
        parser.add_argument(
            "--config",
            action="append",
            default=[],
            metavar="FILE",
            dest=f"config{suffix}",
            help="YAML file overriding conf/carousel.yaml (repeatable)",
        )
        parser.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            dest=f"overrides{suffix}",
            help="override one setting, e.g. --set online_store.port=6391",
        )

    parser = argparse.ArgumentParser(
        prog="./spark-submit.sh online-store", description=__doc__.split("\n\n")[0]
    )
    config_flags(parser, "")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in [
        ("start", "start the local server (no-op when running) and wait until it answers"),
        ("stop", "stop the local server"),
        ("status", "print the local server's status as one line of JSON"),
        ("flush", "delete every key of the configured db (FLUSHDB)"),
    ]:
        sub = commands.add_parser(name, help=text, description=text)
        config_flags(sub, "_sub")
        if name == "stop":
            sub.add_argument("--timeout", type=float, default=30, help="seconds before SIGKILL")
    return parser


def main(argv: Sequence[str]) -> int:
    """``./spark-submit.sh online-store start|stop|status|flush [--config FILE] [--set k=v]``."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(list(argv))
    try:
        cfg = load_config([*args.config, *args.config_sub], [*args.overrides, *args.overrides_sub])
        store_cfg = cfg.online_store
        if args.command == "start":
            print(start(store_cfg))
        elif args.command == "stop":
            print("stopped" if stop(store_cfg, timeout=args.timeout) else "not running")
        elif args.command == "status":
            print(json.dumps(status(store_cfg), sort_keys=True))
        elif args.command == "flush":
            print(f"flushed {flush(store_cfg)} keys from {local_url(store_cfg)}")
    except (OnlineStoreServerError, ConfigError, redis.RedisError, OSError) as err:
        print(f"online-store {args.command}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
