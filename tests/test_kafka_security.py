"""A secured Kafka: the pipeline's clients authenticate from the configuration and the
environment, against the embedded broker started with a TLS + SCRAM listener, an mTLS one and
an OAUTHBEARER one (tokens from a small OAuth server in the test, checked by the broker).

The certificates are made by the test with ``openssl`` (tests/kafka_security_fixture.py). What is
exercised is carousel's own code: ``kafka.tls`` and the ``CAROUSEL_KAFKA_*`` credentials turned
into librdkafka settings (topic creation, the simulator's producer) and Java client options
(ingest's Spark source, the campaigns' Spark sink), and the broker's further listeners.
"""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from confluent_kafka.admin import (
    AdminClient,
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialUpsertion,
)
from kafka_security_fixture import (
    CLIENT_KEY_PASSWORD,
    OAuthServer,
    TlsFiles,
    make_certificates,
    secured_broker_config,
)
from pyspark.sql import Row
from pyspark.sql import functions as F
from pyspark.testing import assertDataFrameEqual
from support import finish, read_table

from carousel import broker
from carousel.config import KAFKA_SECRET_ENV, PROJECT_ROOT, CarouselConfig, load_config
from carousel.delivery import PAYLOAD_ID_HEADER, write_payloads
from carousel.schemas import EVENTS_TABLE
from jobs import simulate_events as sim
from streaming import ingest

pytestmark = pytest.mark.integration

SCRAM_USER = "carousel-ingest"
# A quote and a backslash: the Java client's JAAS line must escape both to authenticate.
SCRAM_PASSWORD = 'pa"ss\\word-1'
OAUTH_CLIENT_ID = "carousel-app"
OAUTH_CLIENT_SECRET = 'oauth"secret\\1'


class SecuredBroker:
    def __init__(
        self, config_file: Path, tls: TlsFiles, ports: tuple[int, int, int, int, int], idp: OAuthServer
    ) -> None:
        self.config_file = config_file
        self.tls = tls
        self.plain, _, self.scram, self.mtls, self.oauth = ports
        self.idp = idp


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("secured-kafka")
    tls = make_certificates(folder / "tls")
    ports = (
        broker.free_port(),
        broker.free_port(),
        broker.free_port(),
        broker.free_port(),
        broker.free_port(),
    )
    assert len(set(ports)) == 5
    with OAuthServer(OAUTH_CLIENT_ID, OAUTH_CLIENT_SECRET) as idp:
        config_file = secured_broker_config(
            folder / "broker.yaml", folder / "kafka", tls, ports, idp.jwks_url
        )
        broker_cfg = load_config([config_file], environ={}).broker
        bootstrap = broker.start(broker_cfg)
        try:
            # The SCRAM user, made over the PLAINTEXT listener the embedded broker keeps for itself.
            admin = AdminClient({"bootstrap.servers": bootstrap})
            credential = ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 8192)
            upsert = UserScramCredentialUpsertion(SCRAM_USER, credential, SCRAM_PASSWORD.encode())
            for future in admin.alter_user_scram_credentials([upsert]).values():
                future.result(30)
            yield SecuredBroker(config_file, tls, ports, idp)
        finally:
            broker.stop(broker_cfg)


def _client_env(monkeypatch: pytest.MonkeyPatch, **values: str) -> None:
    """The CAROUSEL_KAFKA_* credentials for this test, and none of the others."""
    for env in KAFKA_SECRET_ENV.values():
        monkeypatch.delenv(env, raising=False)
    for key, value in values.items():
        monkeypatch.setenv(KAFKA_SECRET_ENV[key], value)


def _config(tmp_path: Path, secured: SecuredBroker, port: int, *overrides: str) -> CarouselConfig:
    return load_config(
        [secured.config_file],
        overrides=[
            f"storage.root={tmp_path}/data",
            f"kafka.bootstrap_servers=127.0.0.1:{port}",
            f"kafka.tls.ca_file={secured.tls.ca}",
            f"kafka.topics.events.name=events-{uuid.uuid4().hex[:10]}",
            f"kafka.topics.email.name=email-{uuid.uuid4().hex[:10]}",
            "kafka.topics.events.partitions=2",
            *overrides,
        ],
        environ={},
    )


def _scram_env(monkeypatch: pytest.MonkeyPatch, password: str = SCRAM_PASSWORD) -> None:
    _client_env(
        monkeypatch,
        **{
            "security.protocol": "SASL_SSL",
            "sasl.mechanism": "SCRAM-SHA-512",
            "sasl.username": SCRAM_USER,
            "sasl.password": password,
        },
    )


def _read_topic(spark, cfg: CarouselConfig, topic: str):
    return (
        spark.read.format("kafka")
        .options(**cfg.kafka.spark_options())
        .option("subscribe", topic)
        .option("startingOffsets", "earliest")
        .option("includeHeaders", "true")
        .load()
    )


def test_pipeline_over_sasl_ssl_with_scram(spark, secured, tmp_path, monkeypatch):
    _scram_env(monkeypatch)
    cfg = _config(tmp_path, secured, secured.scram, "simulator.users=50", "simulator.items=40")
    # Topic creation and the simulator's producer: librdkafka over SASL_SSL (SCRAM-SHA-512).
    broker.ensure_topics(cfg.kafka, roles=["events", "email"])
    world = sim.build_world(cfg.simulator)
    records = list(sim.stream_records(world, cfg.simulator, 300, datetime.now(UTC), seed=5))
    sim.produce(records, cfg.kafka, cfg.kafka.topic("events").name)

    # Ingest's Spark source: the Java client with the JAAS line and the PEM trust store.
    finish(ingest.run(spark, cfg, available_now=True))
    valid_ids = [Row(event_id=json.loads(r.value)["event_id"]) for r in records if r.label == "valid"]
    assert valid_ids
    assertDataFrameEqual(read_table(spark, cfg, EVENTS_TABLE).select("event_id"), valid_ids)

    # The campaigns' Spark sink, read back through the source.
    email = cfg.kafka.topic("email").name
    rendered = spark.createDataFrame(
        [(email, "u-1", '{"n":1}', "p-1"), (email, "u-2", '{"n":2}', "p-2")],
        "topic string, key string, value string, payload_id string",
    )
    write_payloads(rendered, cfg)
    written = _read_topic(spark, cfg, email).select(
        F.col("key").cast("string").alias("key"),
        F.col("value").cast("string").alias("value"),
        F.col("headers")[0]["key"].alias("header"),
        F.col("headers")[0]["value"].cast("string").alias("payload_id"),
    )
    assertDataFrameEqual(
        written,
        [Row(key="u-1", value='{"n":1}', header=PAYLOAD_ID_HEADER, payload_id="p-1"),
         Row(key="u-2", value='{"n":2}', header=PAYLOAD_ID_HEADER, payload_id="p-2")],
    )  # fmt: skip


def test_mtls_client_authenticates_with_its_certificate(spark, secured, tmp_path, monkeypatch):
    _client_env(monkeypatch, **{"security.protocol": "SSL", "ssl.key.password": CLIENT_KEY_PASSWORD})
    cfg = _config(tmp_path, secured, secured.mtls, f"kafka.tls.client_pem_file={secured.tls.client_pem}")
    broker.ensure_topics(cfg.kafka, roles=["events"])
    topic = cfg.kafka.topic("events").name
    records = [sim.Record(f"u-{i}".encode(), f'{{"i":{i}}}'.encode(), "valid") for i in range(5)]
    sim.produce(records, cfg.kafka, topic)
    # The Java client: a PEM key store holding the certificate and the encrypted PKCS#8 key.
    read = _read_topic(spark, cfg, topic).select(F.col("key").cast("string").alias("key"))
    assertDataFrameEqual(read, [Row(key=f"u-{i}") for i in range(5)])


def _oauth_env(monkeypatch: pytest.MonkeyPatch, secret: str = OAUTH_CLIENT_SECRET) -> None:
    _client_env(
        monkeypatch,
        **{
            "security.protocol": "SASL_PLAINTEXT",
            "sasl.mechanism": "OAUTHBEARER",
            "sasl.oauthbearer.client.secret": secret,
        },
    )


def _oauth_config(tmp_path: Path, secured: SecuredBroker) -> CarouselConfig:
    return _config(
        tmp_path,
        secured,
        secured.oauth,
        f"kafka.oauth.token_endpoint_url={secured.idp.token_url}",
        f"kafka.oauth.client_id={OAUTH_CLIENT_ID}",
        "kafka.oauth.scope=kafka",
    )


def test_oauthbearer_clients_fetch_their_tokens_from_the_identity_provider(
    spark, secured, tmp_path, monkeypatch
):
    _oauth_env(monkeypatch)
    cfg = _oauth_config(tmp_path, secured)
    before = secured.idp.tokens_issued
    # librdkafka's OIDC login: topic creation and the simulator's producer.
    broker.ensure_topics(cfg.kafka, roles=["events"])
    topic = cfg.kafka.topic("events").name
    sim.produce([sim.Record(f"u-{i}".encode(), b"{}", "valid") for i in range(3)], cfg.kafka, topic)
    python_tokens = secured.idp.tokens_issued - before
    # The Java client's OIDC login (its JAAS line carries the client secret, quoted).
    read = _read_topic(spark, cfg, topic).select(F.col("key").cast("string").alias("key"))
    assertDataFrameEqual(read, [Row(key=f"u-{i}") for i in range(3)])
    assert python_tokens >= 1 and secured.idp.tokens_issued - before > python_tokens


def test_clients_without_the_right_credentials_are_refused(spark, secured, tmp_path, monkeypatch):
    # A wrong SCRAM password: the Python clients and Spark's Java client are both refused.
    _scram_env(monkeypatch, password="not-the-password")
    cfg = _config(tmp_path, secured, secured.scram)
    with pytest.raises(broker.BrokerError, match="refused the client: .*[Aa]uthentication failed"):
        broker.wait_until_reachable(cfg.kafka.bootstrap_servers, 30, cfg.kafka.client_settings())
    with pytest.raises(Exception, match="SaslAuthenticationException|Authentication failed"):
        _read_topic(spark, cfg, cfg.kafka.topic("events").name).count()

    # A wrong OAuth client secret: the identity provider gives no token.
    _oauth_env(monkeypatch, secret="not-the-secret")
    cfg = _oauth_config(tmp_path, secured)
    with pytest.raises(
        broker.BrokerError,
        match="refused the client: Failed to acquire SASL OAUTHBEARER token.*invalid_client",
    ):
        broker.wait_until_reachable(cfg.kafka.bootstrap_servers, 10, cfg.kafka.client_settings())

    # The identity provider out of reach: waited for, then named, not taken for a refusal.
    _oauth_env(monkeypatch)
    unreachable = f"http://127.0.0.1:{broker.free_port()}/token"
    cfg = _config(
        tmp_path,
        secured,
        secured.oauth,
        f"kafka.oauth.token_endpoint_url={unreachable}",
        f"kafka.oauth.client_id={OAUTH_CLIENT_ID}",
    )
    with pytest.raises(
        TimeoutError, match="did not answer within 4s: Failed to acquire SASL OAUTHBEARER token"
    ):
        broker.wait_until_reachable(cfg.kafka.bootstrap_servers, 4, cfg.kafka.client_settings())

    # A wrong passphrase for the client's key: named before any connection.
    _client_env(monkeypatch, **{"security.protocol": "SSL", "ssl.key.password": "bad-pass-7"})
    cfg = _config(tmp_path, secured, secured.mtls, f"kafka.tls.client_pem_file={secured.tls.client_pem}")
    named = r"cannot make a Kafka client .*ssl.key.location failed.*\(check kafka.tls"
    with pytest.raises(broker.BrokerError, match=named) as refused:
        broker.wait_until_reachable(cfg.kafka.bootstrap_servers, 10, cfg.kafka.client_settings())
    assert "bad-pass-7" not in str(refused.value)

    # No credentials at all, and no client certificate on the mTLS listener.
    _client_env(monkeypatch, **{"security.protocol": "SSL"})
    for port, reason in (
        (secured.scram, "another security protocol or credentials"),
        (secured.mtls, "bad certificate"),
    ):
        cfg = _config(tmp_path, secured, port)
        with pytest.raises(TimeoutError, match=reason):
            broker.wait_until_reachable(cfg.kafka.bootstrap_servers, 5, cfg.kafka.client_settings())


def test_a_job_with_a_wrong_password_exits_with_the_reason(secured, tmp_path, monkeypatch):
    """``./spark-submit.sh ingest`` refused by the broker: one line naming the refusal, no
    traceback, a non-zero status, and the password nowhere in the output."""
    _scram_env(monkeypatch, password="wrong-password-1")
    command = [
        str(PROJECT_ROOT / "spark-submit.sh"),
        "--driver-memory",
        "1g",
        "ingest",
        "--available-now",
        "--config",
        str(secured.config_file),
        "--set",
        f"storage.root={tmp_path}/data",
        "--set",
        f"kafka.bootstrap_servers=127.0.0.1:{secured.scram}",
        "--set",
        f"kafka.tls.ca_file={secured.tls.ca}",
        "--set",
        "metrics.enabled=false",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    # The job's own line: a permanent error, not retried in a loop of restarts.
    assert re.search(
        r"ingest failed: ingest-events failed with a permanent error \(not restarted\): "
        r"org\.apache\.kafka\.common\.errors\.SaslAuthenticationException: Authentication failed",
        output,
    ), output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert "wrong-password-1" not in output
