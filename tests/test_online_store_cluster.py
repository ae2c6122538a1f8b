"""The online state on a real three-node Redis Cluster: hash tags keep a user's keys together.

The cluster runs as three ``redis-server --cluster-enabled yes`` processes on free loopback ports,
joined by ``redis-cli --cluster create``; the client is what ``online_store.cluster: true``
configures.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from support import wait_for

from carousel.broker import free_port
from carousel.online_state import Answer, OnlineState, OutboxEntry
from carousel.online_store import connect

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        pytest.fail("redis-server / redis-cli missing: run `make setup` (it installs redis-server)")
    ports = [_cluster_port() for _ in range(3)]
    processes = []
    try:
        for port in ports:
            folder = tmp_path_factory.mktemp(f"cluster-{port}")
            processes.append(
                subprocess.Popen(
                    [
                        server,
                        "--port",
                        str(port),
                        "--bind",
                        "127.0.0.1",
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        str(Path(folder) / "nodes.conf"),
                        "--dir",
                        str(folder),
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        for port in ports:
            wait_for(lambda p=port: _pings(p), timeout=30, what=f"redis node on port {port}", poll=0.1)
        subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *[f"127.0.0.1:{p}" for p in ports],
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        wait_for(lambda: _cluster_ok(ports[0]), timeout=60, what="cluster state ok", poll=0.2)
        yield f"redis://127.0.0.1:{ports[0]}/0"
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)


def _cluster_port() -> int:
    """A free port for a cluster node: its bus port (+10000) must fit too, so at most 55535."""
    while True:
        port = free_port()
        if port <= 55535 and _free(port + 10000):
            return port


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pings(port: int) -> bool:
    try:
        return bool(redis.Redis(port=port, socket_timeout=1).ping())
    except redis.ConnectionError:
        return False


def _cluster_ok(port: int) -> bool:
    return redis.Redis(port=port).cluster("info").get("cluster_state") == "ok"


def test_online_state_on_redis_cluster(cluster_url: str, make_config: Any) -> None:
    cfg = make_config(f"online_store.url={cluster_url}", "online_store.cluster=true")
    client = connect(cfg.online_store)
    assert isinstance(client, redis.cluster.RedisCluster)
    store = OnlineState(client, cfg.online_store.key_prefix, 60_000, 60_000)
    users = [f"user-{n}" for n in range(50)]  # spread over the three nodes' slots
    states, _ = store.read(users, [(u, "t") for u in users])
    for n, user in enumerate(users):
        states[user].profile.apply(
            {"event_id": f"e{n}", "event_type": "Product Viewed", "item_id": f"i{n}", "event_time": n}, 5
        )
        states[user].changed = True
    answers = {(u, "t"): Answer(0, n, ()) for n, u in enumerate(users)}
    assert store.write(states.values(), answers) == []
    again, answered = store.read(users, [(u, "t") for u in users])
    assert [again[u].profile.views for u in users] == [[[f"i{n}", n]] for n in range(50)]
    assert {k: a.offset for k, a in answered.items()} == {(u, "t"): n for n, u in enumerate(users)}
    # A user's hash and answers share the slot of the hash tag {user id}.
    slot = client.keyslot(store.user_key("user-7"))
    assert client.keyslot(store.answered_key("user-7", "t")) == slot
    assert len({client.keyslot(store.user_key(u)) for u in users}) > 1
    # The API's outbox entries go to the stream's node in the same write as the users' keys.
    for user in users:
        again[user].record_send(f"p-{user}", "widget", ["a"], 1)
    entries = [OutboxEntry(u, f"p-{u}", "{}") for u in users[:3]]
    # With the script cache lost: only the compare-and-sets run again, one entry each stays.
    client.script_flush()
    conflicts, ids = store.write_with_outbox(again.values(), {}, entries)
    assert conflicts == [] and len(ids) == 3
    assert store.outbox_older_than(2**62, 10) == list(zip(ids, entries, strict=True))
    assert store.read(users)[0]["user-7"].sends == [["p-user-7", "widget", "a", 1]]
