"""The embedded Redis online store and the client side: lifecycle, persistence, keys, reachability.

The lifecycle tests start their own real redis-server on a free loopback port with a temporary
state folder and always stop it; the client tests use the session's server (conftest).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import redis

from carousel import broker, online_store, online_store_server
from carousel.config import OnlineStoreConfig, load_config
from carousel.online_store import OnlineStoreError

pytestmark = pytest.mark.integration


def _store_config(*overrides: str) -> OnlineStoreConfig:
    return load_config(overrides=list(overrides), environ={}).online_store


def _own_server(state_dir: Path, *overrides: str) -> OnlineStoreConfig:
    port = broker.free_port()
    return _store_config(
        f"online_store.state_dir={state_dir}",
        f"online_store.port={port}",
        f"online_store.url=redis://127.0.0.1:{port}/0",
        "online_store.max_memory=64mb",
        *overrides,
    )


@pytest.fixture
def own_server(tmp_path):
    cfg = _own_server(tmp_path / "redis")
    try:
        yield cfg
    finally:
        online_store_server.stop(cfg)


def test_lifecycle_start_idempotent_restart_keeps_data_stop(own_server):
    cfg = own_server
    assert online_store_server.status(cfg)["running"] is False

    url = online_store_server.start(cfg)
    assert url == f"redis://127.0.0.1:{cfg.port}/0"
    pid = online_store_server.status(cfg)["pid"]
    assert online_store_server.start(cfg) == url  # idempotent: the same process
    assert online_store_server.status(cfg)["pid"] == pid

    conf = (Path(cfg.state_dir) / "redis.conf").read_text()
    for line in ("bind 127.0.0.1", "appendonly yes", "appendfsync everysec", "maxmemory-policy noeviction"):
        assert line in conf

    client = online_store.connect(cfg)
    client.set(online_store.user_key(cfg, "profile", "u1"), b"kept")
    state = online_store_server.status(cfg)
    assert state["running"] and state["reachable"] and state["keys"] == 1
    assert state["url"] == url and state["used_memory_human"]

    assert online_store_server.stop(cfg) is True
    assert online_store_server.status(cfg)["running"] is False
    assert online_store_server.stop(cfg) is False  # nothing left to stop

    online_store_server.start(cfg)
    assert online_store_server.status(cfg)["pid"] != pid
    # The append-only file brought the key back (the pooled client reconnects by itself).
    assert client.get(online_store.user_key(cfg, "profile", "u1")) == b"kept"

    assert online_store_server.flush(cfg) == 1
    assert online_store_server.status(cfg)["keys"] == 0


def test_full_store_rejects_writes_instead_of_evicting(tmp_path):
    cfg = _own_server(tmp_path / "redis", "online_store.max_memory=2mb")
    online_store_server.start(cfg)
    try:
        client = online_store.connect(cfg)
        value = b"x" * 64 * 1024
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            for index in range(1000):
                client.set(f"fill:{index}", value)
        assert client.exists("fill:0") == 1  # nothing was evicted
    finally:
        online_store_server.stop(cfg)


def test_non_loopback_host_is_refused(tmp_path):
    cfg = _own_server(tmp_path / "redis", "online_store.host=0.0.0.0")
    with pytest.raises(online_store_server.OnlineStoreServerError, match="loopback") as caught:
        online_store_server.start(cfg)
    assert "0.0.0.0" in str(caught.value)
    assert not (Path(cfg.state_dir) / "redis.pid").exists()


def test_port_taken_by_another_process_is_refused(tmp_path, online_store_url):
    taken = int(online_store_url.rsplit(":", 1)[1].split("/")[0])
    cfg = _own_server(tmp_path / "redis", f"online_store.port={taken}")
    with pytest.raises(online_store_server.OnlineStoreServerError, match="already in use"):
        online_store_server.start(cfg)


def test_password_from_the_environment_is_required_by_the_local_server(tmp_path, monkeypatch):
    password = f"pw-{uuid.uuid4().hex}"
    monkeypatch.setenv("CAROUSEL_REDIS_PASSWORD", password)
    cfg = _own_server(tmp_path / "redis")
    online_store_server.start(cfg)
    try:
        assert online_store.connect(cfg).ping() is True
        anonymous = redis.Redis(host="127.0.0.1", port=cfg.port)
        with pytest.raises(redis.exceptions.AuthenticationError):
            anonymous.ping()
        anonymous.close()
        assert (Path(cfg.state_dir) / "redis.conf").stat().st_mode & 0o077 == 0
        assert password not in (Path(cfg.state_dir) / "logs" / "redis.log").read_text()
    finally:
        online_store_server.stop(cfg)


def test_missing_binary_names_the_install_command():
    with pytest.raises(online_store_server.OnlineStoreServerError) as caught:
        online_store_server.find_redis_server(path="", dirs=())
    assert "sudo apt-get install -y redis-server" in str(caught.value)
    assert Path(online_store_server.find_redis_server()).name in online_store_server.SERVER_NAMES


def test_command_line_prints_one_line_and_fails_without_traceback(tmp_path, capsys):
    state = tmp_path / "redis"
    port = broker.free_port()
    flags = ["--set", f"online_store.state_dir={state}", "--set", f"online_store.port={port}"]
    try:
        assert online_store_server.main([*flags, "start"]) == 0
        assert capsys.readouterr().out.strip() == f"redis://127.0.0.1:{port}/0"
        assert online_store_server.main([*flags, "status"]) == 0
        out = capsys.readouterr().out
        assert out.count("\n") == 1 and json.loads(out)["running"] is True
        assert online_store_server.main([*flags, "flush"]) == 0
        assert capsys.readouterr().out.startswith("flushed 0 keys")
        assert online_store_server.main([*flags, "stop"]) == 0
        assert capsys.readouterr().out.strip() == "stopped"
    finally:
        online_store_server.stop(
            _store_config(f"online_store.state_dir={state}", f"online_store.port={port}")
        )
    assert online_store_server.main([*flags, "--set", "online_store.host=10.1.2.3", "start"]) == 1
    err = capsys.readouterr().err
    assert "loopback" in err and "Traceback" not in err and err.count("\n") == 1


def test_connect_reuses_one_client_and_keys_carry_the_user_hash_tag(online_store_url):
    cfg = _store_config(
        f"online_store.url={online_store_url}", f"online_store.key_prefix=t{uuid.uuid4().hex[:8]}"
    )
    client = online_store.connect(cfg)
    assert online_store.connect(cfg) is client
    assert isinstance(client, redis.Redis)

    key = online_store.user_key(cfg, "profile", "user-42")
    assert key == f"{cfg.key_prefix}:profile:{{user-42}}"
    assert online_store.user_key("p", "sends", "u") == "p:sends:{u}"
    # The hash tag: every kind of one user's keys hashes to the same cluster slot.
    slots = {redis.cluster.key_slot(online_store.user_key(cfg, kind, "user-42").encode()) for kind in "abc"}
    assert len(slots) == 1
    with pytest.raises(ValueError):
        online_store.user_key(cfg, "profile", "")

    client.set(key, b"\x00\xffbytes")
    assert client.get(key) == b"\x00\xffbytes"  # replies stay bytes
    online_store.check_reachable(cfg)


def test_check_reachable_names_the_url_and_start_command_never_the_password(monkeypatch):
    password = f"secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("CAROUSEL_REDIS_PASSWORD", password)
    port = broker.free_port()  # nothing listens there
    url = f"redis://127.0.0.1:{port}/0"
    cfg = _store_config(f"online_store.url={url}", "online_store.socket_timeout_seconds=2")
    with pytest.raises(OnlineStoreError) as caught:
        online_store.check_reachable(cfg)
    message = str(caught.value)
    assert url in message and "./spark-submit.sh online-store start" in message
    assert password not in message

    inline = _store_config(f"online_store.url=redis://user:{password}@127.0.0.1:{port}/0")
    with pytest.raises(OnlineStoreError) as caught:
        online_store.check_reachable(inline)
    assert password not in str(caught.value) and f"redis://user:***@127.0.0.1:{port}/0" in str(caught.value)
