"""Configuration loading: defaults, layering, validation, secrets."""

from __future__ import annotations

import argparse
import json

import pytest
from kafka_security_fixture import make_certificates
from pydantic import ValidationError

from carousel import broker
from carousel.broker import server_properties
from carousel.cli import config_from_args
from carousel.config import (
    KAFKA_SECRET_ENV,
    PROJECT_ROOT,
    CarouselConfig,
    ConfigError,
    describe,
    jaas_config,
    load_config,
    mask_secrets,
)


def test_defaults_load_and_resolve_relative_paths():
    cfg = load_config(environ={})
    assert cfg.storage.root == str(PROJECT_ROOT / "data")
    assert cfg.storage.table("events") == f"{PROJECT_ROOT}/data/tables/events"
    assert cfg.storage.checkpoint("ingest-events") == f"{PROJECT_ROOT}/data/checkpoints/ingest-events"
    assert cfg.kafka.topic("events").partitions >= 1


def test_layers_file_then_environment_then_flags(tmp_path):
    override = tmp_path / "site.yaml"
    override.write_text(
        "profiles:\n  recent_items: 7\n  max_devices: 3\nstorage:\n  root: s3a://lake/carousel\n"
    )
    env = {"CAROUSEL__PROFILES__RECENT_ITEMS": "8", "UNRELATED": "x"}
    cfg = load_config([override], ["profiles.max_devices=4"], environ=env)
    assert (cfg.profiles.recent_items, cfg.profiles.max_devices) == (8, 4)
    assert cfg.storage.root == "s3a://lake/carousel"  # URIs are kept as they are


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("profiles.recent_items=0", "profiles.recent_items"),
        ("ingest.trigger_interval=soon", "ingest.trigger_interval"),
        ("ingest.starting_offsets=middle", "ingest.starting_offsets"),
        ('ingest.starting_offsets={"events": {"0": "x"}}', "ingest.starting_offsets"),
        ("ingest.dedupe_horizon_days=0", "ingest.dedupe_horizon_days"),
        ("ingest.lease_seconds=1", "ingest.lease_seconds"),
        ("kafka.topics.events.partitions=0", "kafka.topics.events.partitions"),
        ("broker.controller_port=9092", "must differ"),
        ("ingest.unknown_key=1", "ingest.unknown_key"),
        ("spark.driver_memory=lots", "spark.driver_memory"),
        ("ingest.min_event_time=last year", "ingest.min_event_time"),
        ("reporting.multiple_testing=fisher", "reporting.multiple_testing"),
        ("serving.sms_max_segments=0", "serving.sms_max_segments"),
        ("serving.sms_max_segments=11", "serving.sms_max_segments"),
        ("serving.sms_max_chars=160", "serving.sms_max_chars"),  # replaced by sms_max_segments
        ("serving.deep_link_schemes=[https, javascript]", "serving.deep_link_schemes"),
        ("serving.deep_link_schemes=[https, 'not a scheme']", "serving.deep_link_schemes"),
        ("serving.deep_link_schemes=[]", "serving.deep_link_schemes"),
        ("campaign_runs.resume_within_hours=-1", "campaign_runs.resume_within_hours"),
        ("kafka.client_options.sasl.jaas.config=x", "credentials .* come from the environment"),
        ("kafka.client_options.ssl.keystore.password=x", "kafka.client_options"),
        ("kafka.client_options.ssl.keystore.key=x", "credentials"),
        ("kafka.client_options.Request Timeout=1", "not a Kafka client setting name"),
        ("kafka.client_options.kafka.request.timeout.ms=1", "without the 'kafka.' prefix"),
        ("kafka.client_options.bootstrap.servers=h:1", "kafka.bootstrap_servers"),
        ("kafka.python_client_options.sasl.password=x", "credentials .* come from the environment"),
        ("kafka.python_client_options.ssl.key.pem=-----BEGIN", "credentials"),
        ("broker.server_properties.security.inter.broker.protocol=SSL", "written by carousel"),
        (
            "broker.server_properties.listener.name.s.plain.sasl.jaas.config='m required user_alice=\"x\";'",
            "a secret",
        ),
        ("broker.server_properties.ssl.keystore.key=-----BEGIN", "a secret"),
        ("kafka.tls.ca_file=/nonexistent/ca.pem", "kafka.tls.ca_file.*cannot read"),
        ("broker.server_properties.listeners=PLAINTEXT://:1", "written by carousel"),
        ("broker.server_properties.ssl.keystore.password=x", "a secret in the configuration"),
        (
            "broker.server_properties.listener.name.s.plain.sasl.jaas.config='m required password=\"x\";'",
            "a secret",
        ),
        ("broker.extra_listeners.secure={port: 9094, protocol: SASL_SSL}", "listener name"),
        ("broker.extra_listeners.PLAINTEXT={port: 9094, protocol: SSL}", "listener name"),
        ("broker.extra_listeners.SECURE={port: 9092, protocol: SASL_SSL}", "must differ"),
        ("broker.extra_listeners.SECURE={port: 9094, protocol: TLS}", "protocol"),
        ("broker.jvm_options=[Xmx1g]", "a JVM option is one line starting with '-'"),
        ("broker.jvm_options=[-Djavax.net.ssl.keyStorePassword=x]", "a secret in the configuration"),
        ("online_store.url=http://:hunter2@h:6379", "got 'http://:\\*\\*\\*@h:6379'"),
        ("kafka.oauth.token_endpoint_url=idp.example/token", "kafka.oauth.token_endpoint_url"),
        ("supervision.max_restarts=-1", "supervision.max_restarts"),
        ("metrics.ports.campaign=9470", "unknown jobs \\['campaign'\\]"),
        ("metrics.ports.serve=9464", "two jobs share a port"),
        ("metrics.ports.serve=70000", "a port must be 0"),
        ("supervision.backoff_max_seconds=1", "backoff_max_seconds must be at least"),
        ("supervision.transient_errors=['', x]", "a blank pattern"),
        ("api.wait_for_outbox_ack=true", "replaced by api.record_outbox: true is broker_ack"),
        ("api.record_outbox=kafka", "api.record_outbox"),
        ("api.outbox_max_entries=10", "api.outbox_max_entries"),
        ("api.worker_timeout_seconds=1", "api.worker_timeout_seconds"),
        ("campaigns.launch-push.content=reference", "launch-push.*content: reference is for email campaigns"),
        ("campaigns.weekly-email.content=html", "weekly-email.content"),
        ("training.model.validation_max_pairs=100", "the validation split would never run"),
        ("training.model.validation_share=1", "training.model.validation_share"),
    ],
)
def test_bad_values_are_rejected_with_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override], environ={})


@pytest.mark.parametrize(
    ("overrides", "linger_ms"),
    [
        ([], 50),  # online_store: the relay runs after the answer, nothing waits for it
        (["api.record_outbox=broker_ack"], 5),  # the answer waits for the broker
        (["api.record_outbox=background"], 5),
        (["api.record_outbox=broker_ack", "api.outbox_linger_ms=0"], 0),
        (["api.outbox_linger_ms=20"], 20),
    ],
)
def test_the_outbox_linger_and_poll_default_to_the_recording_modes(overrides, linger_ms):
    api = load_config(overrides=overrides, environ={}).api
    assert api.linger_ms == linger_ms
    # Only a broker_ack answer waits for its delivery report.
    assert api.poll_ms == (1 if api.record_outbox == "broker_ack" else 10)


def test_kafka_client_options_reach_sparks_source_and_sink_with_their_dots():
    cfg = load_config(
        overrides=["kafka.client_options.request.timeout.ms=3000", "kafka.client_options.client.rack=eu-1a"],
        environ={"CAROUSEL__KAFKA__CLIENT_OPTIONS__RETRY__BACKOFF__MS": "250"},
    )
    assert cfg.kafka.client_options == {
        "request.timeout.ms": "3000",
        "client.rack": "eu-1a",
        "retry.backoff.ms": "250",
    }
    options = cfg.kafka.spark_sink_options()
    assert options["kafka.request.timeout.ms"] == "3000" and options["kafka.client.rack"] == "eu-1a"
    assert options["kafka.bootstrap.servers"] == cfg.kafka.bootstrap_servers
    topic = load_config(overrides=["kafka.topics.events.configs.retention.ms=3600000"], environ={})
    assert topic.kafka.topic("events").configs["retention.ms"] == "3600000"


def test_starting_offsets_take_a_json_of_offsets_per_partition():
    offsets = '{"events": {"0": 1234, "1": -2}}'
    cfg = load_config(overrides=[f"ingest.starting_offsets={offsets}"], environ={})
    assert json.loads(cfg.ingest.starting_offsets) == {"events": {"0": 1234, "1": -2}}


def test_malformed_override_and_missing_file_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(overrides=["profiles.recent_items"], environ={})
    with pytest.raises(ConfigError, match="not found"):
        load_config([tmp_path / "nope.yaml"], environ={})


def test_secrets_come_from_the_environment_and_are_masked(monkeypatch):
    monkeypatch.setenv("CAROUSEL_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("CAROUSEL_KAFKA_SASL_MECHANISM", "PLAIN")
    monkeypatch.setenv("CAROUSEL_KAFKA_SASL_USERNAME", "svc")
    monkeypatch.setenv("CAROUSEL_KAFKA_SASL_PASSWORD", "hunter2")
    monkeypatch.setenv("CAROUSEL__SPARK__CONF__SPARK.HADOOP.FS.S3A.SECRET.KEY", "abc123")
    monkeypatch.setenv("CAROUSEL__SPARK__CONF__SPARK.HADOOP.FS.S3A.ENCRYPTION.KEY", "sse-c-key")
    cfg = load_config(overrides=["online_store.url=rediss://svc:s3cret-in-url@redis.example:6380/0"])
    assert cfg.kafka.client_settings()["sasl.password"] == "hunter2"
    assert 'password="hunter2"' in cfg.kafka.spark_options()["kafka.sasl.jaas.config"]
    text = describe(cfg)
    assert "hunter2" not in text and "abc123" not in text and "s3cret-in-url" not in text
    assert "sse-c-key" not in text
    assert "rediss://svc:***@redis.example:6380/0" in text


def test_a_jaas_line_quotes_what_a_password_holds():
    line = jaas_config("SCRAM-SHA-512", 'svc"1', 'a"b\\c')
    module = "org.apache.kafka.common.security.scram.ScramLoginModule"
    assert line == f'{module} required username="svc\\"1" password="a\\"b\\\\c";'
    assert jaas_config("PLAIN", "u", "p").startswith(
        "org.apache.kafka.common.security.plain.PlainLoginModule"
    )
    with pytest.raises(ConfigError, match="GSSAPI: carousel writes the JAAS line for PLAIN"):
        jaas_config("GSSAPI", "u", "p")


def test_tls_files_reach_both_client_families_and_bad_keys_are_refused(tmp_path, monkeypatch):
    certificates = make_certificates(tmp_path / "tls")
    monkeypatch.setenv(KAFKA_SECRET_ENV["ssl.key.password"], "key-pass")
    cfg = load_config(
        overrides=[
            f"kafka.tls.ca_file={certificates.ca}",
            f"kafka.tls.client_pem_file={certificates.client_pem}",
            "kafka.tls.verify_hostname=false",
            "kafka.python_client_options.client.rack=eu-1a",
        ],
        environ={},
    )
    ca, pem = str(certificates.ca), str(certificates.client_pem)
    assert cfg.kafka.client_settings() == {
        "bootstrap.servers": cfg.kafka.bootstrap_servers,
        "client.rack": "eu-1a",
        "ssl.key.password": "key-pass",
        "ssl.ca.location": ca,
        "ssl.certificate.location": pem,
        "ssl.key.location": pem,
        "ssl.endpoint.identification.algorithm": "none",
    }
    spark = cfg.kafka.spark_options()
    assert {k: v for k, v in spark.items() if k.startswith("kafka.ssl.")} == {
        "kafka.ssl.key.password": "key-pass",
        "kafka.ssl.truststore.type": "PEM",
        "kafka.ssl.truststore.location": ca,
        "kafka.ssl.keystore.type": "PEM",
        "kafka.ssl.keystore.location": pem,
        "kafka.ssl.endpoint.identification.algorithm": "",
    }
    assert "key-pass" not in describe(cfg)
    assert mask_secrets("cannot decrypt with key-pass") == "cannot decrypt with ***"
    for pem_file, reason in (
        (certificates.client_rsa_pem, "not PKCS#8.*openssl pkcs8 -topk8"),
        (certificates.client_pbes2_pem, "PBES2.*-v1 PBE-SHA1-3DES"),
        (certificates.ca, "no PKCS#8 private key"),
    ):
        with pytest.raises(ConfigError, match=f"kafka.tls.client_pem_file.*{reason}"):
            load_config(overrides=[f"kafka.tls.client_pem_file={pem_file}"], environ={})
    # The key and its passphrase must go together: named before any client tries.
    monkeypatch.delenv(KAFKA_SECRET_ENV["ssl.key.password"])
    with pytest.raises(
        ConfigError, match="its key is encrypted and CAROUSEL_KAFKA_SSL_KEY_PASSWORD is not set"
    ):
        cfg.kafka.client_settings()
    plain_pem = tmp_path / "plain.pem"
    plain_pem.write_text(
        certificates.client_pem.read_text().split("-----BEGIN ENCRYPTED")[0]
        + (tmp_path / "tls" / "client.key").read_text()
    )
    monkeypatch.setenv(KAFKA_SECRET_ENV["ssl.key.password"], "key-pass")
    plain = load_config(overrides=[f"kafka.tls.client_pem_file={plain_pem}"], environ={})
    with pytest.raises(
        ConfigError, match="its key is not encrypted but CAROUSEL_KAFKA_SSL_KEY_PASSWORD is set"
    ):
        plain.kafka.spark_options()
    key_only = tmp_path / "key-only.pem"
    key_only.write_text((tmp_path / "tls" / "client.key").read_text())
    with pytest.raises(ConfigError, match="holds no PEM certificate"):
        load_config(overrides=[f"kafka.tls.ca_file={key_only}"], environ={})


def test_oauthbearer_settings_for_both_client_families(monkeypatch):
    monkeypatch.setenv(KAFKA_SECRET_ENV["security.protocol"], "SASL_SSL")
    monkeypatch.setenv(KAFKA_SECRET_ENV["sasl.mechanism"], "OAUTHBEARER")
    cfg = load_config(
        overrides=["kafka.oauth.token_endpoint_url=https://idp.example/token", "kafka.oauth.client_id=app"],
        environ={},
    )
    with pytest.raises(ConfigError, match="OAUTHBEARER needs CAROUSEL_KAFKA_OAUTH_CLIENT_SECRET"):
        cfg.kafka.client_settings()
    monkeypatch.setenv(KAFKA_SECRET_ENV["sasl.oauthbearer.client.secret"], 's"1')
    settings = cfg.kafka.client_settings()
    assert {k: v for k, v in settings.items() if k.startswith("sasl.")} == {
        "sasl.mechanism": "OAUTHBEARER",
        "sasl.oauthbearer.client.secret": 's"1',
        "sasl.oauthbearer.method": "oidc",
        "sasl.oauthbearer.client.id": "app",
        "sasl.oauthbearer.token.endpoint.url": "https://idp.example/token",
    }
    options = cfg.kafka.spark_options()
    assert options["kafka.sasl.login.callback.handler.class"].endswith(
        "oauthbearer.OAuthBearerLoginCallbackHandler"
    )
    assert options["kafka.sasl.oauthbearer.token.endpoint.url"] == "https://idp.example/token"
    module = "org.apache.kafka.common.security.oauthbearer.OAuthBearerLoginModule"
    assert options["kafka.sasl.jaas.config"] == f'{module} required clientId="app" clientSecret="s\\"1";'
    assert 's"1' not in describe(cfg) and mask_secrets('secret s"1') == "secret ***"
    no_client = load_config(
        overrides=["kafka.oauth.token_endpoint_url=https://idp.example/token"], environ={}
    )
    with pytest.raises(ConfigError, match="OAUTHBEARER needs kafka.oauth.client_id$"):
        no_client.kafka.spark_options()
    # Without a token endpoint, OAUTHBEARER is left to python_client_options (a cloud login).
    cloud = load_config(overrides=["kafka.python_client_options.sasl.oauthbearer.method=oidc"], environ={})
    assert "sasl.oauthbearer.client.id" not in cloud.kafka.client_settings()
    with pytest.raises(ConfigError, match="kafka.oauth sets the OAUTHBEARER login already"):
        load_config(
            overrides=[
                "kafka.oauth.token_endpoint_url=https://idp.example/token",
                "kafka.client_options.sasl.oauthbearer.token.endpoint.url=https://other/token",
            ],
            environ={},
        )
    # librdkafka takes the mechanism in upper case only.
    monkeypatch.setenv(KAFKA_SECRET_ENV["sasl.mechanism"], "oauthbearer")
    assert cfg.kafka.client_settings()["sasl.mechanism"] == "OAUTHBEARER"


def test_a_job_with_contradicting_kafka_credentials_stops_at_start(tmp_path, monkeypatch, caplog):
    certificates = make_certificates(tmp_path / "tls")
    monkeypatch.delenv(KAFKA_SECRET_ENV["ssl.key.password"], raising=False)
    args = argparse.Namespace(config=[], overrides=[f"kafka.tls.client_pem_file={certificates.client_pem}"])
    cfg = load_config(overrides=args.overrides, environ={})
    assert "client_pem_file" in describe(cfg)  # describing does not check
    with pytest.raises(SystemExit) as stopped:
        config_from_args(args, "ingest")
    assert stopped.value.code == 2
    assert "its key is encrypted and CAROUSEL_KAFKA_SSL_KEY_PASSWORD is not set" in caplog.text


def test_a_refused_secret_is_not_repeated_in_the_message():
    for override in (
        "broker.server_properties.ssl.keystore.password=hunter2",
        "kafka.python_client_options.sasl.password=hunter2",
        "kafka.client_options.sasl.jaas.config=hunter2",
    ):
        with pytest.raises(ConfigError) as refused:
            load_config(overrides=[override], environ={})
        assert "hunter2" not in str(refused.value) and "got keys" in str(refused.value)


def test_an_option_map_may_not_set_what_kafka_tls_sets(tmp_path):
    certificates = make_certificates(tmp_path / "tls")
    jks = load_config(
        overrides=["kafka.client_options.ssl.truststore.location=/etc/kafka/ca.jks"], environ={}
    )
    assert jks.kafka.spark_options()["kafka.ssl.truststore.location"] == "/etc/kafka/ca.jks"
    for override in (
        "kafka.client_options.ssl.truststore.location=/etc/kafka/ca.jks",
        "kafka.python_client_options.ssl.ca.location=/etc/ca.pem",
    ):
        with pytest.raises(ConfigError, match="kafka.tls sets them already"):
            load_config(overrides=[f"kafka.tls.ca_file={certificates.ca}", override], environ={})


def test_the_embedded_broker_takes_further_listeners_and_properties(tmp_path, monkeypatch):
    cfg = load_config(
        overrides=[
            "broker.port=9092",
            "broker.controller_port=9093",
            "broker.extra_listeners.SECURE={port: 9094, protocol: SASL_SSL}",
            "broker.server_properties.sasl.enabled.mechanisms=SCRAM-SHA-512",
            "broker.server_properties.ssl.keystore.password=${env:KEYSTORE_PASSWORD}",
            "broker.server_properties.ssl.truststore.location=C:\\kafka\\ca.pem",
            "broker.server_properties.sasl.kerberos.service.name=kafka-é",
            "broker.jvm_options=[-Dorg.apache.kafka.sasl.oauthbearer.allowed.urls=https://idp.example/keys]",
        ],
        environ={},
    )
    properties = server_properties(cfg.broker)
    assert (
        properties["listeners"]
        == "PLAINTEXT://127.0.0.1:9092,SECURE://127.0.0.1:9094,CONTROLLER://127.0.0.1:9093"
    )
    assert properties["advertised.listeners"] == "PLAINTEXT://127.0.0.1:9092,SECURE://127.0.0.1:9094"
    assert (
        properties["listener.security.protocol.map"]
        == "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SECURE:SASL_SSL"
    )
    assert properties["sasl.enabled.mechanisms"] == "SCRAM-SHA-512"
    assert properties["ssl.keystore.password"] == "${env:KEYSTORE_PASSWORD}"
    # Written to server.properties with the backslashes doubled, so that Java reads them back.
    written = tmp_path / "server.properties"
    broker._write_properties(written, properties)
    assert "ssl.truststore.location=C:\\\\kafka\\\\ca.pem\n" in written.read_text()
    assert "sasl.kerberos.service.name=kafka-\\u00e9\n" in written.read_text()
    jars = tmp_path / "jars"
    jars.mkdir()
    (jars / "kafka_2.13-4.1.2.jar").touch()
    monkeypatch.setattr(broker, "_java", lambda: "java")
    command = broker._jvm_command(cfg.broker, jars, "kafka.Kafka")
    assert "-Dorg.apache.kafka.sasl.oauthbearer.allowed.urls=https://idp.example/keys" in command


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("campaigns.launch-push.channel=fax", "campaigns.launch-push.channel"),
        ("campaigns.launch-push.trigger_event_types=[App Crashed]", "unknown event types"),
        ("campaigns.launch-push.items=0", "campaigns.launch-push.items"),
        ("campaigns.launch-push.filters.min_price=50", None),  # fine alone...
        ("campaigns.weekly-email.control_share=0.3", "must sum to 1"),
        ("campaigns.launch-push.filters.where=[{property: brand, op: between, value: 1}]", "op"),
        ("campaigns.launch-push.filters.where=[{property: price, op: gt, value: cheap}]", "needs a number"),
        ("campaigns.launch-push.filters.where=[{property: brand, op: in, value: acme}]", "needs a list"),
        ("campaigns.launch-push.fallback=random", "campaigns.launch-push.fallback"),
        ("campaigns.bad name.channel=push", "letters, digits"),
        ("serving.recency_decay=0", "serving.recency_decay"),
        ("serving.trending.event_weights={App Crashed: 1}", "unknown event types"),
    ],
)
def test_bad_campaign_definitions_fail_at_start_with_the_key(override, message):
    if message is None:
        load_config(overrides=[override], environ={})
        return
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override], environ={})


def test_price_range_and_channel_topics_are_checked():
    with pytest.raises(ConfigError, match="min_price must not exceed max_price"):
        load_config(
            overrides=[
                "campaigns.launch-push.filters.min_price=50",
                "campaigns.launch-push.filters.max_price=10",
            ],
            environ={},
        )
    data = load_config(environ={}).model_dump()
    del data["kafka"]["topics"]["push"]
    with pytest.raises(ValidationError, match="no kafka.topics entry"):
        CarouselConfig.model_validate(data)


def test_one_s3_setting_for_spark_delta_rs_and_boto3():
    from carousel.objectstore import s3_client
    from carousel.session import hadoop_settings

    aws = load_config()
    assert aws.storage.s3.hadoop_settings() == {} and aws.storage.s3.delta_rs_options() == {}
    cfg = load_config(
        overrides=[
            "storage.root=s3a://lake/carousel",
            "storage.s3.endpoint_url=http://minio.internal:9000/",
            "storage.s3.region=eu-west-1",
            "storage.s3.path_style_access=true",
            "spark.conf.spark.hadoop.fs.s3a.connection.maximum=200",
            "spark.conf.spark.hadoop.fs.s3a.path.style.access=false",  # spark.conf wins
        ]
    )
    assert hadoop_settings(cfg) == {
        "fs.s3a.endpoint": "http://minio.internal:9000",
        "fs.s3a.connection.ssl.enabled": "false",
        "fs.s3a.endpoint.region": "eu-west-1",
        "fs.s3a.path.style.access": "false",
        "fs.s3a.connection.maximum": "200",
    }
    assert cfg.storage.s3.delta_rs_options() == {
        "AWS_ENDPOINT_URL": "http://minio.internal:9000",
        "AWS_ALLOW_HTTP": "true",
        "AWS_REGION": "eu-west-1",
        "AWS_VIRTUAL_HOSTED_STYLE_REQUEST": "false",
    }
    client = s3_client(cfg)
    assert client.meta.endpoint_url == "http://minio.internal:9000"
    assert client.meta.region_name == "eu-west-1"
    tls = load_config(overrides=["storage.s3.endpoint_url=https://s3.internal"]).storage.s3
    assert tls.hadoop_settings()["fs.s3a.connection.ssl.enabled"] == "true"
    assert "AWS_ALLOW_HTTP" not in tls.delta_rs_options()


@pytest.mark.parametrize(
    ("endpoint", "reason"),
    [
        ("minio.internal:9000", "http:// or https:// URL"),
        ("ftp://minio.internal", "http:// or https:// URL"),
        ("http://key:secret@minio.internal", "must not hold credentials"),
        ("http://minio.internal/lake", "without a path"),
    ],
)
@pytest.mark.parametrize("setting", ["storage.s3.endpoint_url", "training.aws_batch.endpoint_url"])
def test_a_bad_aws_endpoint_is_refused_at_start(setting, endpoint, reason):
    with pytest.raises(ConfigError, match=f"{setting}: .*{reason}") as refused:
        load_config(overrides=[f"{setting}={endpoint}"])
    assert "secret" not in str(refused.value)


def test_s3_roots_are_refused_and_the_endpoint_scheme_is_normalised():
    with pytest.raises(ConfigError, match="storage.root: .*write s3a://bucket/prefix"):
        load_config(overrides=["storage.root=s3://lake/carousel"])
    # An upper-case scheme is the same service (delta-rs is still allowed plain HTTP).
    upper = load_config(overrides=["storage.s3.endpoint_url=HTTP://minio:9000"]).storage.s3
    assert upper.delta_rs_options()["AWS_ALLOW_HTTP"] == "true"
    batch = load_config(overrides=["training.aws_batch.endpoint_url=HTTP://batch.internal:5000/"])
    assert batch.training.aws_batch.endpoint_url == "http://batch.internal:5000"


def test_the_batch_container_reaches_the_s3_service_of_the_staging():
    from carousel.objectstore import s3_client
    from jobs.aws_batch import training_overrides

    cfg = load_config(overrides=["storage.s3.endpoint_url=http://minio:9000", "storage.s3.region=eu-west-1"])
    assert {"storage.s3.endpoint_url=http://minio:9000", "storage.s3.region=eu-west-1"} <= set(
        training_overrides(cfg)
    )
    # Virtual-hosted addressing unless storage.s3 asks for path style.
    assert s3_client(cfg).meta.config.s3 is None
