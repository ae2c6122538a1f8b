"""Typed configuration for every carousel job.

Role: load ``conf/carousel.yaml`` (the defaults), overlay any ``--config FILE`` given, then
``CAROUSEL__SECTION__KEY`` environment variables, then ``--set section.key=value`` flags, and
validate the result into one immutable :class:`CarouselConfig`. Bad values fail at start with
the key path and the reason. Relative local paths are resolved against the project root: the
checkout, or, for code run from the shipped code zip on another node (a cluster-mode driver),
the zip's ``conf/`` unpacked on that node (:func:`_unpacked_home`).

Secrets are never read from YAML: Kafka credentials come from ``CAROUSEL_KAFKA_SECURITY_PROTOCOL``,
``CAROUSEL_KAFKA_SASL_MECHANISM``, ``CAROUSEL_KAFKA_SASL_USERNAME``,
``CAROUSEL_KAFKA_SASL_PASSWORD``, ``CAROUSEL_KAFKA_SSL_KEY_PASSWORD`` (the passphrase of the
client key for mTLS) and ``CAROUSEL_KAFKA_OAUTH_CLIENT_SECRET`` (OAUTHBEARER); AWS credentials
from boto3's standard chain.
:func:`describe` renders the config for the log with secrets masked.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

# Written last into an unpacked conf/ folder: the folder is complete.
_UNPACKED_MARKER = ".carousel-unpacked"


def _usable_home(home: Path) -> bool:
    """``home`` is a complete unpacked ``conf/`` of this user's: a real folder (not a link), owned
    by this user, with the marker written last."""
    try:
        info = os.lstat(home)
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and (home / _UNPACKED_MARKER).is_file()


def _unpacked_home(archive: Path) -> Path:
    """A folder holding the ``conf/`` of the code zip ``archive`` this module was imported from.

    A driver in ``--deploy-mode cluster`` (and an executor) runs on a node without the project's
    folder: the launcher ships ``conf/`` (defaults, templates, payload schemas and any submitted
    ``--config`` files) inside the code zip. It is unpacked once per user, node and zip content,
    into ``$TMPDIR/carousel-home-<uid>-<digest>``, made private (0700), marked complete last and
    moved into place whole: concurrent Python workers see it complete or not at all, and a folder
    of that name that is not this user's own complete copy (another user's, a link, one a tmp
    cleaner emptied) is never trusted; a private copy is used then. Where unpacking is
    impossible, the zip's path is returned: the old behaviour, enough for code that reads no
    project file."""
    try:
        with zipfile.ZipFile(archive) as bundle:
            members = sorted(
                (i for i in bundle.infolist() if i.filename.startswith("conf/")), key=lambda i: i.filename
            )
            digest = hashlib.sha256(repr([(i.filename, i.CRC, i.file_size) for i in members]).encode())
            home = Path(tempfile.gettempdir()) / f"carousel-home-{os.getuid()}-{digest.hexdigest()[:16]}"
            if _usable_home(home):
                return home
            staging = Path(tempfile.mkdtemp(prefix=f"{home.name}-", dir=home.parent))
            bundle.extractall(staging, members=members)
            (staging / _UNPACKED_MARKER).write_text(f"{archive}\n")
            try:
                staging.rename(home)
            except OSError:  # a folder of that name exists: another process's copy, or not ours
                if _usable_home(home):
                    shutil.rmtree(staging, ignore_errors=True)
                    return home
                return staging
            return home
    except (OSError, zipfile.BadZipFile):
        return archive


def _project_root() -> Path:
    # spark-submit.sh exports CAROUSEL_HOME; a source checkout is its own root; under spark-submit
    # on another node (a cluster-mode driver, an executor) this module comes from the code zip.
    if os.environ.get("CAROUSEL_HOME"):
        return Path(os.environ["CAROUSEL_HOME"])
    source = Path(__file__).resolve().parents[1]
    return _unpacked_home(source) if zipfile.is_zipfile(source) else source


PROJECT_ROOT = _project_root()
DEFAULT_CONFIG_FILE = PROJECT_ROOT / "conf" / "carousel.yaml"
ENV_PREFIX = "CAROUSEL__"
# The online store's password (Redis AUTH); a username, for Redis ACLs, is optional.
REDIS_PASSWORD_ENV = "CAROUSEL_REDIS_PASSWORD"
REDIS_USERNAME_ENV = "CAROUSEL_REDIS_USERNAME"
KAFKA_SECRET_ENV = {
    "security.protocol": "CAROUSEL_KAFKA_SECURITY_PROTOCOL",
    "sasl.mechanism": "CAROUSEL_KAFKA_SASL_MECHANISM",
    "sasl.username": "CAROUSEL_KAFKA_SASL_USERNAME",
    "sasl.password": "CAROUSEL_KAFKA_SASL_PASSWORD",
    "ssl.key.password": "CAROUSEL_KAFKA_SSL_KEY_PASSWORD",
    "sasl.oauthbearer.client.secret": "CAROUSEL_KAFKA_OAUTH_CLIENT_SECRET",
}
OAUTHBEARER = "OAUTHBEARER"
# The Java client's login for OAUTHBEARER with OIDC client credentials (KIP-768).
_OAUTH_LOGIN_MODULE = "org.apache.kafka.common.security.oauthbearer.OAuthBearerLoginModule"
_OAUTH_LOGIN_HANDLER = "org.apache.kafka.common.security.oauthbearer.OAuthBearerLoginCallbackHandler"
# The Java system property listing the OAuth URLs a Kafka client or broker may call.
OAUTH_ALLOWED_URLS_PROPERTY = "org.apache.kafka.sasl.oauthbearer.allowed.urls"
# The JAAS login module of each SASL mechanism carousel writes a JAAS line for (Java clients).
_JAAS_MODULES = {
    "PLAIN": "org.apache.kafka.common.security.plain.PlainLoginModule",
    "SCRAM-SHA-256": "org.apache.kafka.common.security.scram.ScramLoginModule",
    "SCRAM-SHA-512": "org.apache.kafka.common.security.scram.ScramLoginModule",
}
_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_INTERVAL = re.compile(r"^\d+(\.\d+)?\s+(millisecond|second|minute|hour)s?$")
# Delta's own VACUUM safety check: its default delta.deletedFileRetentionDuration, one week.
SAFE_VACUUM_RETENTION_HOURS = 168
# What a trending segment may be made of: the event contract's user attributes (age as a band of
# serving.trending.age_bands) and the device platform. tests/test_segment_trending.py checks it
# against carousel.schemas.USER_ATTRIBUTES_SCHEMA (this module does not import pyspark).
SEGMENT_ATTRIBUTES: tuple[str, ...] = ("country", "city", "language", "gender", "age_band", "platform")

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names the key and the reason."""


def resolve_path(value: str) -> str:
    """Local relative paths become absolute under the project root; URIs are kept as they are."""
    if _URI.match(value):
        return value
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (PROJECT_ROOT / path).resolve())


def _require_known_event_types(event_types: Iterable[str]) -> None:
    from carousel.schemas import EVENT_TYPES  # imported late: schemas imports pyspark

    unknown = [t for t in event_types if t not in EVENT_TYPES]
    if unknown:
        raise ValueError(f"unknown event types {unknown}; known: {list(EVENT_TYPES)}")


def _plain_names(value: dict[str, Any], what: str) -> dict[str, Any]:
    """``value`` when every key is letters, digits, '_' and '-' (names used in keys and paths)."""
    bad = [name for name in value if not re.match(r"^[a-zA-Z0-9_-]+$", name)]
    if bad:
        raise ValueError(f"{what} may hold letters, digits, '_' and '-' only: {bad}")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def aws_service_url(value: str, service: str) -> str:
    """An AWS-compatible service's address setting (``endpoint_url``): empty for AWS itself, else
    http(s)://host[:port] without credentials, path or query; the scheme lower-cased."""
    if not value:
        return value
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http:// or https:// URL of the {service} service, or empty for AWS")
    if parts.username or parts.password:
        # Keys in the URL would end up in logs and Spark's UI; they come from the AWS chain.
        raise ValueError("must not hold credentials (they come from the standard AWS chain)")
    if parts.path.strip("/") or parts.query:
        raise ValueError("must be the service's address only, without a path or query")
    return f"{parts.scheme}://{parts.netloc}"  # urlsplit lower-cases the scheme: http: is checked later


class S3Config(_Section):
    """The S3 service behind ``s3a://`` locations (``s3://`` to boto3 and delta-rs), for every client:
    Spark's S3A connector, delta-rs (serving lookups, ``summary``, ``carousel.portable``) and
    boto3. Credentials never come from here: each client's standard AWS chain (environment,
    shared config, instance or task role)."""

    # An S3-compatible server (MinIO, Ceph, a test server): http(s)://host[:port]. Empty: AWS.
    endpoint_url: str = ""
    # Empty: each SDK's own resolution (AWS_REGION, the shared config, the instance's region).
    region: str = ""
    # bucket.host/key (virtual-hosted, AWS's default) or host/bucket/key (most S3-compatible servers).
    path_style_access: bool = False

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        return aws_service_url(value, "S3")

    def hadoop_settings(self) -> dict[str, str]:
        """Spark's S3A connector settings (Hadoop names, without ``spark.hadoop.``)."""
        settings: dict[str, str] = {}
        if self.endpoint_url:
            settings["fs.s3a.endpoint"] = self.endpoint_url
            settings["fs.s3a.connection.ssl.enabled"] = str(self.endpoint_url.startswith("https:")).lower()
        if self.region:
            settings["fs.s3a.endpoint.region"] = self.region
        if self.path_style_access:
            settings["fs.s3a.path.style.access"] = "true"
        return settings

    def delta_rs_options(self) -> dict[str, str]:
        """delta-rs's ``storage_options`` for ``s3://`` tables (credentials left to its AWS chain)."""
        options: dict[str, str] = {}
        if self.endpoint_url:
            options["AWS_ENDPOINT_URL"] = self.endpoint_url
            if self.endpoint_url.startswith("http:"):
                options["AWS_ALLOW_HTTP"] = "true"
        if self.region:
            options["AWS_REGION"] = self.region
        if self.path_style_access:
            options["AWS_VIRTUAL_HOSTED_STYLE_REQUEST"] = "false"
        return options


class StorageConfig(_Section):
    root: str = Field(min_length=1)
    s3: S3Config = S3Config()
    # On s3a:// with Delta's single-driver log store: how long a batch job's writer lease on the
    # tables it commits to counts after its last renewal (renewed every third of this while the
    # job runs; a killed job's lapses after it). README "Tables on S3".
    writer_lease_seconds: float = Field(default=60, ge=3, le=3600)
    # There, how long a batch job waits for the running ingest / record-sends that commit to its
    # tables to hold their micro-batches back (they look every few seconds, once their running
    # micro-batch is done), and for other batch jobs' commits there to end, before it is refused;
    # 0: refused at once.
    writer_wait_seconds: float = Field(default=120, ge=0, le=3600)

    @field_validator("root")
    @classmethod
    def _resolve(cls, value: str) -> str:
        if value.lower().startswith(("s3://", "s3n://")):
            # Spark's Hadoop has no file system for these schemes; S3A reads the same objects.
            raise ValueError("Spark reaches S3 through S3A: write s3a://bucket/prefix")
        return resolve_path(value)

    def table(self, name: str) -> str:
        """Location of the Delta table called ``name``."""
        return f"{self.root.rstrip('/')}/tables/{name}"

    def checkpoint(self, query_name: str) -> str:
        """Checkpoint location of the streaming query called ``query_name``."""
        return f"{self.root.rstrip('/')}/checkpoints/{query_name}"

    def path(self, *parts: str) -> str:
        """Any other location under the storage root (reports, snapshots, simulator output)."""
        return "/".join([self.root.rstrip("/"), *parts])


def _kafka_text_values(value: Any) -> Any:
    """Kafka settings as text: YAML reads retention.ms: 604800000 as a number and true as a
    boolean, and Kafka takes every setting as text. A null value stays null (refused later)."""
    if isinstance(value, Mapping):
        return {
            str(k): v if v is None else str(v).lower() if isinstance(v, bool) else str(v)
            for k, v in value.items()
        }
    return value


# Kafka client settings that hold secrets: refused in the configuration (they come from the
# environment). Inline PEM keys end in ".key" (ssl.keystore.key) or "key.pem" (librdkafka).
_KAFKA_SECRET_KEY = re.compile(r"password|secret|jaas|passphrase|\.key$|key\.pem$")


class TopicConfig(_Section):
    name: str = Field(min_length=1, pattern=r"^[a-zA-Z0-9._-]+$")
    partitions: int = Field(ge=1, le=1024)
    # Copies of each partition: 1 for the embedded single broker, typically 3 on a cluster.
    replication_factor: int = Field(default=1, ge=1, le=32)
    # Topic-level settings applied when the topic is created (retention.ms, compression.type,
    # min.insync.replicas, cleanup.policy, ...). An existing topic's settings are left as they are.
    configs: dict[str, str] = Field(default_factory=dict)
    # Records keyed by user id, read in per-user order (serve applies a user's events in order):
    # adding partitions moves users to other partitions, so it is never done without being asked
    # (./spark-submit.sh broker topics --add-partitions).
    keyed: bool = True

    @field_validator("configs", mode="before")
    @classmethod
    def _text_values(cls, value: Any) -> Any:
        return _kafka_text_values(value)

    @model_validator(mode="after")
    def _writable(self) -> TopicConfig:
        bad = [k for k in self.configs if not re.fullmatch(r"[a-z0-9.]+", k)]
        if bad:
            raise ValueError(f"topic {self.name}: not Kafka topic setting names: {bad}")
        min_isr = self.configs.get("min.insync.replicas")
        if min_isr is not None and (not min_isr.isdigit() or int(min_isr) > self.replication_factor):
            raise ValueError(
                f"topic {self.name}: min.insync.replicas {min_isr} must be a number <= replication_factor "
                f"{self.replication_factor} (or no producer with acks=all could write)"
            )
        return self


class KafkaProducerConfig(_Section):
    """How carousel's producers write: Spark's Kafka sinks (serve, campaigns, ingest's outputs)
    and the Python producers (the API's outbox)."""

    # Payloads are mostly repeated markup: lz4 cut an 7.7 kB email to ~1.6 kB on the wire for
    # little CPU (bench/README.md, campaign results). Consumers decompress transparently.
    compression_type: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "lz4"
    linger_ms: int = Field(default=5, ge=0, le=10_000)
    batch_size_bytes: int = Field(default=262_144, ge=1024, le=16 * 1024 * 1024)


# The client settings each kafka.tls field writes, per client family: an option map may not set
# them too (a JKS trust store in client_options, without kafka.tls.ca_file, stays possible).
_TLS_JAVA_KEYS = {
    "ca_file": ("ssl.truststore.type", "ssl.truststore.location"),
    "client_pem_file": ("ssl.keystore.type", "ssl.keystore.location"),
    "verify_hostname": ("ssl.endpoint.identification.algorithm",),
}
_TLS_LIBRDKAFKA_KEYS = {
    "ca_file": ("ssl.ca.location",),
    "client_pem_file": ("ssl.certificate.location", "ssl.key.location"),
    "verify_hostname": ("ssl.endpoint.identification.algorithm",),
}
_PEM_CERTIFICATE = "-----BEGIN CERTIFICATE-----"
_PEM_PKCS8_KEYS = ("-----BEGIN PRIVATE KEY-----", "-----BEGIN ENCRYPTED PRIVATE KEY-----")


# The DER of PBES2's object identifier (1.2.840.113549.1.5.13), the scheme of an encrypted key.
_PBES2_OID = bytes.fromhex("06092a864886f70d01050d")


def _pbes2_encrypted(pem_text: str) -> bool:
    """Whether the PEM text's encrypted PKCS#8 key uses PBES2 (its algorithm identifier comes
    first in EncryptedPrivateKeyInfo, so the OID is within the first few dozen bytes)."""
    match = re.search(r"-----BEGIN ENCRYPTED PRIVATE KEY-----(.*?)-----END", pem_text, re.S)
    if match is None:
        return False
    try:
        der = base64.b64decode("".join(match.group(1).split()))
    except ValueError:
        return False
    return _PBES2_OID in der[:32]


class KafkaTlsConfig(_Section):
    """TLS to the brokers, in PEM files that both client families read: librdkafka (the Python
    producers, consumers and admin clients) and the Java client (Spark's Kafka source and sinks).

    The protocol itself (SSL, or SASL_SSL) comes from ``CAROUSEL_KAFKA_SECURITY_PROTOCOL``. On a
    cluster the files must be at the same path on the driver and every executor.
    """

    # The CA certificates (PEM) that signed the brokers' certificates; empty: the system's trust
    # store (librdkafka) and the JVM's (Java).
    ca_file: str = ""
    # mTLS: one PEM file holding this client's certificate (chain) and its private key in PKCS#8
    # ("BEGIN PRIVATE KEY" or "BEGIN ENCRYPTED PRIVATE KEY"; `openssl pkcs8 -topk8` converts an
    # RSA key). An encrypted key's passphrase comes from CAROUSEL_KAFKA_SSL_KEY_PASSWORD.
    client_pem_file: str = ""
    # Check that the broker's certificate names the host connected to. Off only for a test
    # cluster whose certificates do not name their hosts.
    verify_hostname: bool = True

    @field_validator("ca_file", "client_pem_file")
    @classmethod
    def _readable_pem(cls, value: str, info: ValidationInfo) -> str:
        if not value:
            return value
        path = Path(resolve_path(value))
        try:
            text = path.read_text(errors="replace")
        except OSError as err:
            raise ValueError(f"cannot read {path}: {err.strerror or err}") from None
        if _PEM_CERTIFICATE not in text:
            raise ValueError(f"{path} holds no PEM certificate ({_PEM_CERTIFICATE})")
        if info.field_name == "client_pem_file" and not any(marker in text for marker in _PEM_PKCS8_KEYS):
            hint = (
                " (its key is not PKCS#8, which the Java client needs: convert it with "
                "`openssl pkcs8 -topk8 -in client.key`)"
                if "PRIVATE KEY-----" in text
                else ""
            )
            raise ValueError(f"{path} holds no PKCS#8 private key beside the certificate{hint}")
        if info.field_name == "client_pem_file" and _pbes2_encrypted(text):
            raise ValueError(
                f"{path}: its key is encrypted with PBES2 (openssl's default), which the Java client "
                "(Spark's Kafka source and sinks) cannot read on Java 17, the JDK carousel is set up "
                "with (Java 19+ can: JDK-8286428); encrypt it with "
                "`openssl pkcs8 -topk8 -v1 PBE-SHA1-3DES -in client.key`"
            )
        return str(path)

    def key_encrypted(self) -> bool:
        """Whether the key in ``client_pem_file`` is encrypted (needs a passphrase)."""
        try:
            return "-----BEGIN ENCRYPTED PRIVATE KEY-----" in Path(self.client_pem_file).read_text(
                errors="replace"
            )
        except OSError as err:
            raise ConfigError(
                f"kafka.tls.client_pem_file: cannot read {self.client_pem_file}: {err}"
            ) from None

    def librdkafka_settings(self) -> dict[str, str]:
        """These settings in librdkafka's names (the key's passphrase comes with the credentials)."""
        settings: dict[str, str] = {}
        if self.ca_file:
            settings["ssl.ca.location"] = self.ca_file
        if self.client_pem_file:
            # librdkafka picks the certificates and the key out of the one file.
            settings["ssl.certificate.location"] = self.client_pem_file
            settings["ssl.key.location"] = self.client_pem_file
        if not self.verify_hostname:
            settings["ssl.endpoint.identification.algorithm"] = "none"
        return settings

    def java_settings(self) -> dict[str, str]:
        """These settings in the Java client's names (its PEM trust and key stores)."""
        settings: dict[str, str] = {}
        if self.ca_file:
            settings["ssl.truststore.type"] = "PEM"
            settings["ssl.truststore.location"] = self.ca_file
        if self.client_pem_file:
            settings["ssl.keystore.type"] = "PEM"
            settings["ssl.keystore.location"] = self.client_pem_file
        if not self.verify_hostname:
            settings["ssl.endpoint.identification.algorithm"] = ""
        return settings


class KafkaOAuthConfig(_Section):
    """OAUTHBEARER with OIDC client credentials (CAROUSEL_KAFKA_SASL_MECHANISM=OAUTHBEARER): each
    client fetches a token from the identity provider and refreshes it before it expires. The
    client secret comes from CAROUSEL_KAFKA_OAUTH_CLIENT_SECRET."""

    # The identity provider's token endpoint (https://idp.example/oauth2/token).
    token_endpoint_url: str = Field(default="", pattern=r"^(https?://\S+)?$")
    client_id: str = ""
    # Space-separated scopes to ask for; empty: the provider's default.
    scope: str = ""


class KafkaConfig(_Section):
    bootstrap_servers: str = Field(min_length=1)
    topics: dict[str, TopicConfig]
    producer: KafkaProducerConfig = Field(default_factory=KafkaProducerConfig)
    # Further Java client settings for Spark's Kafka source and sinks, without the "kafka."
    # prefix (e.g. request.timeout.ms, client.rack). Not secrets: those
    # come from the environment (CAROUSEL_KAFKA_*), so keys holding a password or a JAAS line
    # are refused.
    client_options: dict[str, str] = Field(default_factory=dict)
    # The same for the Python clients (librdkafka: the API's outbox producer, the simulator,
    # topic creation), in librdkafka's names (e.g. socket.keepalive.enable, client.rack).
    python_client_options: dict[str, str] = Field(default_factory=dict)
    # TLS to the brokers (CAROUSEL_KAFKA_SECURITY_PROTOCOL=SSL or SASL_SSL), for both clients.
    tls: KafkaTlsConfig = Field(default_factory=KafkaTlsConfig)
    # OAUTHBEARER (CAROUSEL_KAFKA_SASL_MECHANISM=OAUTHBEARER), for both clients.
    oauth: KafkaOAuthConfig = Field(default_factory=KafkaOAuthConfig)

    @field_validator("client_options", "python_client_options", mode="before")
    @classmethod
    def _options_as_text(cls, value: Any) -> Any:
        return _kafka_text_values(value)

    @field_validator("client_options", "python_client_options")
    @classmethod
    def _no_secrets_or_owned_keys(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not re.fullmatch(r"[a-z0-9.]+", key):
                raise ValueError(f"{key!r} is not a Kafka client setting name")
            if key.startswith("kafka."):
                raise ValueError(f"{key!r}: give client options without the 'kafka.' prefix")
            if key == "bootstrap.servers":
                raise ValueError("set kafka.bootstrap_servers, not client_options.bootstrap.servers")
            if _KAFKA_SECRET_KEY.search(key) or key in KAFKA_SECRET_ENV:
                raise ValueError(
                    f"{key!r}: credentials and the security protocol come from the environment "
                    f"({', '.join(KAFKA_SECRET_ENV.values())}), not from the configuration"
                )
        return value

    @model_validator(mode="after")
    def _tls_set_once(self) -> KafkaConfig:
        tls_set = {
            "ca_file": bool(self.tls.ca_file),
            "client_pem_file": bool(self.tls.client_pem_file),
            "verify_hostname": not self.tls.verify_hostname,
        }
        for options, name, owned in (
            (self.client_options, "client_options", _TLS_JAVA_KEYS),
            (self.python_client_options, "python_client_options", _TLS_LIBRDKAFKA_KEYS),
        ):
            clash = [key for field, keys in owned.items() if tls_set[field] for key in keys if key in options]
            if clash:
                raise ValueError(f"{name} {clash}: kafka.tls sets them already")
        if self.oauth.token_endpoint_url:
            for options, name in (
                (self.client_options, "client_options"),
                (self.python_client_options, "python_client_options"),
            ):
                clash = [
                    key for key in options if key.startswith(("sasl.oauthbearer.", "sasl.login.callback."))
                ]
                if clash:
                    raise ValueError(f"{name} {clash}: kafka.oauth sets the OAUTHBEARER login already")
        return self

    @field_validator("topics")
    @classmethod
    def _events_topic_declared(cls, topics: dict[str, TopicConfig]) -> dict[str, TopicConfig]:
        if "events" not in topics:
            raise ValueError("the 'events' topic must be declared")
        return topics

    def topic(self, role: str) -> TopicConfig:
        try:
            return self.topics[role]
        except KeyError:
            raise ConfigError(f"kafka.topics.{role} is not configured") from None

    def security_settings(self) -> dict[str, str]:
        """Security settings from the environment (librdkafka / Java client key names agree).

        An encrypted ``kafka.tls.client_pem_file`` key without its passphrase, or a passphrase for
        an unencrypted one, is a :class:`ConfigError`: the Java client refuses both, and
        librdkafka only the first, with an OpenSSL message that names neither."""
        settings = {key: os.environ[env] for key, env in KAFKA_SECRET_ENV.items() if os.environ.get(env)}
        if "sasl.mechanism" in settings:  # librdkafka takes only the upper-case names
            settings["sasl.mechanism"] = settings["sasl.mechanism"].upper()
        if self.tls.client_pem_file:
            encrypted = self.tls.key_encrypted()
            if encrypted != ("ssl.key.password" in settings):
                env = KAFKA_SECRET_ENV["ssl.key.password"]
                raise ConfigError(
                    f"kafka.tls.client_pem_file {self.tls.client_pem_file}: "
                    + (
                        f"its key is encrypted and {env} is not set"
                        if encrypted
                        else f"its key is not encrypted but {env} is set"
                    )
                )
        return settings

    def client_settings(self) -> dict[str, str]:
        """Settings for confluent-kafka producers, consumers and admin clients (librdkafka):
        ``python_client_options``, the bootstrap servers, the credentials and ``tls``."""
        settings = {
            **self.python_client_options,
            "bootstrap.servers": self.bootstrap_servers,
            **self.security_settings(),
            **self.tls.librdkafka_settings(),
        }
        if self.uses_oauth():
            settings["sasl.oauthbearer.method"] = "oidc"
            settings["sasl.oauthbearer.client.id"] = self.oauth.client_id
            settings["sasl.oauthbearer.token.endpoint.url"] = self.oauth.token_endpoint_url
            if self.oauth.scope:
                settings["sasl.oauthbearer.scope"] = self.oauth.scope
        return settings

    def check_credentials(self) -> None:
        """Raise :class:`ConfigError` now, naming what is missing or contradicts, rather than
        when the first client is made: the key and its passphrase, and the OAuth settings."""
        self.security_settings()
        self.uses_oauth()

    def uses_oauth(self) -> bool:
        """Whether carousel logs in with OAUTHBEARER client credentials: the mechanism (from the
        environment) is OAUTHBEARER and ``kafka.oauth.token_endpoint_url`` is set. Then the
        client id and secret must be set too, or this is a :class:`ConfigError` naming them.
        (OAUTHBEARER without a token endpoint is left to ``python_client_options``, e.g.
        librdkafka's cloud metadata login.)"""
        mechanism = os.environ.get(KAFKA_SECRET_ENV["sasl.mechanism"], "")
        if mechanism.upper() != OAUTHBEARER or not self.oauth.token_endpoint_url:
            return False
        secret_env = KAFKA_SECRET_ENV["sasl.oauthbearer.client.secret"]
        missing = [
            name
            for name, value in (
                ("kafka.oauth.client_id", self.oauth.client_id),
                (secret_env, os.environ.get(secret_env)),
            )
            if not value
        ]
        if missing:
            raise ConfigError(f"{KAFKA_SECRET_ENV['sasl.mechanism']}={mechanism} needs {', '.join(missing)}")
        return True

    def producer_settings(self) -> dict[str, str | int]:
        """Producer settings from ``kafka.producer`` (librdkafka and the Java client agree)."""
        return {
            "compression.type": self.producer.compression_type,
            "linger.ms": self.producer.linger_ms,
            "batch.size": self.producer.batch_size_bytes,
        }

    def spark_sink_options(self) -> dict[str, str]:
        """Options for Spark's Kafka sink: :meth:`spark_options` plus ``kafka.producer``."""
        return {**self.spark_options(), **{f"kafka.{k}": str(v) for k, v in self.producer_settings().items()}}

    def spark_options(self) -> dict[str, str]:
        """Options for Spark's Kafka source and sink (``kafka.``-prefixed Java client settings):
        ``client_options``, the bootstrap servers, the credentials (as a JAAS line) and ``tls``."""
        options = {f"kafka.{key}": option for key, option in self.client_options.items()}
        options["kafka.bootstrap.servers"] = self.bootstrap_servers
        security = self.security_settings()
        for key in ("security.protocol", "sasl.mechanism", "ssl.key.password"):
            if key in security:
                options[f"kafka.{key}"] = security[key]
        if self.uses_oauth():
            options["kafka.sasl.mechanism"] = OAUTHBEARER
            options["kafka.sasl.login.callback.handler.class"] = _OAUTH_LOGIN_HANDLER
            options["kafka.sasl.oauthbearer.token.endpoint.url"] = self.oauth.token_endpoint_url
            login = {
                "clientId": self.oauth.client_id,
                "clientSecret": security["sasl.oauthbearer.client.secret"],
            }
            if self.oauth.scope:
                login["scope"] = self.oauth.scope
            options["kafka.sasl.jaas.config"] = _jaas_line(_OAUTH_LOGIN_MODULE, login)
        elif "sasl.username" in security:
            options["kafka.sasl.jaas.config"] = jaas_config(
                security.get("sasl.mechanism", "PLAIN"),
                security["sasl.username"],
                security.get("sasl.password", ""),
            )
        options.update({f"kafka.{key}": value for key, value in self.tls.java_settings().items()})
        return options


def jaas_config(mechanism: str, username: str, password: str) -> str:
    """The Java client's ``sasl.jaas.config`` line for ``mechanism`` (PLAIN or SCRAM-SHA-*).

    Values are quoted with ``\\`` and ``\"`` escaped, as Kafka's JAAS parser reads them: a
    password holding a quote or a backslash authenticates instead of breaking the line."""
    module = _JAAS_MODULES.get(mechanism.upper())
    if module is None:
        raise ConfigError(
            f"{KAFKA_SECRET_ENV['sasl.mechanism']}={mechanism}: carousel writes the JAAS line for "
            f"{', '.join(_JAAS_MODULES)} (and {OAUTHBEARER}, from kafka.oauth) only"
        )

    return _jaas_line(module, {"username": username, "password": password})


def _jaas_line(module: str, options: Mapping[str, str]) -> str:
    def quoted(value: str) -> str:
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'

    return f"{module} required " + " ".join(f"{key}={quoted(value)}" for key, value in options.items()) + ";"


class BrokerListenerConfig(_Section):
    """A further listener of the embedded broker (its name is the key in ``extra_listeners``)."""

    port: int = Field(ge=1, le=65535)
    protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]


# server.properties keys the embedded broker writes itself (its node, quorum and listeners).
_BROKER_OWNED_PROPERTIES = frozenset(
    {
        "process.roles",
        "node.id",
        "controller.quorum.voters",
        "listeners",
        "advertised.listeners",
        "controller.listener.names",
        "inter.broker.listener.name",
        "security.inter.broker.protocol",
        "listener.security.protocol.map",
        "log.dirs",
    }
)
# A secret's value in server.properties may only be a config provider's reference: ${env:NAME}.
_CONFIG_PROVIDER_REFERENCE = re.compile(r"^\$\{[a-zA-Z0-9_.-]+:[^}]*\}$")


class BrokerConfig(_Section):
    state_dir: str = Field(min_length=1)
    host: str = "127.0.0.1"
    port: int = Field(ge=1, le=65535)
    controller_port: int = Field(ge=1, le=65535)
    heap: str = Field(pattern=r"^\d+[mMgG]$")
    start_timeout_seconds: float = Field(gt=0)
    # Further listeners beside the PLAINTEXT one on `port` (which start, stop and status use):
    # NAME -> {port, protocol}, e.g. {SECURE: {port: 9094, protocol: SASL_SSL}} to try a secured
    # setup locally. Their settings go in server_properties, per listener under
    # listener.name.<name in lower case>.<setting>.
    extra_listeners: dict[str, BrokerListenerConfig] = Field(default_factory=dict)
    # Further server.properties (key stores, sasl.enabled.mechanisms, ssl.client.auth, ...).
    # The keys carousel writes itself are refused, and so is a password unless its value is a
    # config provider's reference (${env:NAME} with config.providers=env): none in YAML.
    server_properties: dict[str, str] = Field(default_factory=dict)
    # Further JVM options of the broker, e.g. -Dorg.apache.kafka.sasl.oauthbearer.allowed.urls=...
    # for an OAUTHBEARER listener that fetches its identity provider's keys.
    jvm_options: list[str] = Field(default_factory=list)

    @field_validator("jvm_options")
    @classmethod
    def _options_start_with_a_dash(cls, value: list[str]) -> list[str]:
        for option in value:
            if not option.startswith("-") or "\n" in option or "\r" in option:
                raise ValueError(f"a JVM option is one line starting with '-' (got {option[:40]!r})")
            name = option.partition("=")[0]
            if re.search(r"password|secret|passphrase", name, re.I):
                raise ValueError(f"{name}: a secret in the configuration (and on the broker's command line)")
        return value

    @field_validator("state_dir")
    @classmethod
    def _resolve(cls, value: str) -> str:
        return resolve_path(value)

    @field_validator("server_properties", mode="before")
    @classmethod
    def _properties_as_text(cls, value: Any) -> Any:
        return _kafka_text_values(value)

    @field_validator("server_properties")
    @classmethod
    def _settable_properties(cls, value: dict[str, str]) -> dict[str, str]:
        for key, setting in value.items():
            if not re.fullmatch(r"[a-zA-Z0-9._-]+", key):
                raise ValueError(f"{key!r} is not a server.properties key")
            if key in _BROKER_OWNED_PROPERTIES or key.startswith("controller.quorum."):
                raise ValueError(
                    f"{key!r} is written by carousel (use broker.port, controller_port, extra_listeners)"
                )
            if "\n" in setting or "\r" in setting:
                raise ValueError(f"{key!r}: a value on more than one line")
            secret = re.search(r"password|secret|passphrase|\.key$", key) or re.search(
                r"(password|secret|user_[\w-]+)\s*=", setting
            )
            if secret and not _CONFIG_PROVIDER_REFERENCE.match(setting):
                raise ValueError(
                    f"{key!r}: a secret in the configuration; give it as a config provider's reference "
                    "(${env:NAME}, with config.providers=env and config.providers.env.class="
                    "org.apache.kafka.common.config.provider.EnvVarConfigProvider) "
                    "or use a PEM key store with an unencrypted key"
                )
        return value

    @field_validator("extra_listeners")
    @classmethod
    def _listener_names(cls, value: dict[str, BrokerListenerConfig]) -> dict[str, BrokerListenerConfig]:
        for name in value:
            if not re.fullmatch(r"[A-Z][A-Z0-9_]*", name) or name in ("PLAINTEXT", "CONTROLLER"):
                raise ValueError(
                    f"listener name {name!r}: upper-case letters, digits and '_', "
                    "other than PLAINTEXT and CONTROLLER"
                )
        return value

    @model_validator(mode="after")
    def _distinct_ports(self) -> BrokerConfig:
        ports = [
            self.port,
            self.controller_port,
            *(listener.port for listener in self.extra_listeners.values()),
        ]
        if len(set(ports)) != len(ports):
            raise ValueError(
                "broker.port, broker.controller_port and the extra listeners' ports "
                f"must differ (got {ports})"
            )
        return self


class OnlineStoreConfig(_Section):
    """The online store (Redis or Valkey) that the real-time path reads and writes.

    ``url`` names the server: ``redis://host:port/db``, or ``rediss://`` for TLS. The password
    comes from ``CAROUSEL_REDIS_PASSWORD`` (and an ACL user from ``CAROUSEL_REDIS_USERNAME``),
    never from YAML. With ``cluster`` the url is one seed node of a Redis Cluster; every key of
    one user carries the hash tag ``{<user id>}``, so a user's keys live in one slot.
    The other keys describe the embedded local server (``./spark-submit.sh online-store start``).
    """

    url: str = Field(pattern=r"^rediss?://[^\s]+$")
    cluster: bool = False
    # Keys are "<key_prefix>:<kind>:{<user id>}": several deployments may share one server.
    key_prefix: str = Field(min_length=1, pattern=r"^[a-zA-Z0-9._-]+$")
    # For rediss:// with a private CA (PEM file); empty = the system's trust store.
    tls_ca_file: str = ""
    socket_timeout_seconds: float = Field(gt=0)
    # A user's online keys expire this long after their last event (0 = never).
    profile_ttl_days: float = Field(ge=0)
    # The embedded local server.
    state_dir: str = Field(min_length=1)
    host: str = "127.0.0.1"
    port: int = Field(ge=1, le=65535)
    max_memory: str = Field(pattern=r"^\d+[kmgKMG][bB]?$")
    start_timeout_seconds: float = Field(gt=0)

    @field_validator("state_dir")
    @classmethod
    def _resolve(cls, value: str) -> str:
        return resolve_path(value)

    def credentials(self) -> dict[str, str]:
        """Username / password from the environment (empty when none is set)."""
        found = {
            "username": os.environ.get(REDIS_USERNAME_ENV),
            "password": os.environ.get(REDIS_PASSWORD_ENV),
        }
        return {key: value for key, value in found.items() if value}


class SparkConfig(_Section):
    master: str = Field(min_length=1)
    shuffle_partitions: int = Field(ge=1, le=10000)
    jars_dir: str
    driver_memory: str = Field(pattern=r"^\d+[mMgG]$")
    conf: dict[str, str] = Field(default_factory=dict)

    @field_validator("jars_dir")
    @classmethod
    def _resolve(cls, value: str) -> str:
        return resolve_path(value)

    @field_validator("conf", mode="before")
    @classmethod
    def _stringify(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            return {str(k): str(v).lower() if isinstance(v, bool) else str(v) for k, v in value.items()}
        return value


class StreamingQuerySection(_Section):
    """What every streaming query is configured with."""

    query_name: str = Field(min_length=1, pattern=r"^[a-zA-Z0-9._-]+$")
    trigger_interval: str
    max_offsets_per_trigger: int = Field(ge=1)
    # "earliest", "latest", or Spark's JSON of offsets per partition ({"events": {"0": 42, "1": -2}}),
    # used only when the query starts without a checkpoint.
    starting_offsets: str
    # On a stop request (./spark-submit.sh stop) or SIGTERM/SIGINT to the driver, the running
    # micro-batch may finish for this long before it is interrupted.
    stop_timeout_seconds: float = Field(gt=0)
    # While it runs the query renews a lease beside its checkpoint every third of this; jobs that
    # must not run beside it (rebuild-profiles; on S3, every job writing its tables) refuse while
    # the lease is younger than this. A killed driver's lease counts for this long.
    lease_seconds: float = Field(ge=3)

    @field_validator("trigger_interval")
    @classmethod
    def _interval(cls, value: str) -> str:
        if not _INTERVAL.match(value.strip()):
            raise ValueError("must look like '5 seconds', '500 milliseconds' or '0 seconds'")
        return value.strip()

    @field_validator("starting_offsets", mode="before")
    @classmethod
    def _offsets(cls, value: Any) -> str:
        import json

        if isinstance(value, dict):  # YAML (a file or --set) reads the JSON as a mapping
            value = json.dumps(value)
        if not isinstance(value, str):
            raise ValueError("must be 'earliest', 'latest' or a JSON object of offsets")
        value = value.strip()
        if value in ("earliest", "latest"):
            return value
        try:
            offsets = json.loads(value)
        except ValueError:
            offsets = None
        valid = isinstance(offsets, dict) and all(
            isinstance(parts, dict)
            and all(str(p).isdigit() and isinstance(o, int) and o >= -2 for p, o in parts.items())
            for parts in offsets.values()
        )
        if not valid:
            raise ValueError(
                "must be 'earliest', 'latest' or a JSON object of offsets per topic and partition "
                '(e.g. {"events": {"0": 42, "1": -2}}; -2 = earliest, -1 = latest)'
            )
        return value


class IngestConfig(StreamingQuerySection):
    min_event_time: str
    max_future_skew_seconds: int = Field(ge=0)
    max_record_bytes: int = Field(ge=64)
    # An event id is stored once within this many days of ingest time (the dedupe state's horizon).
    dedupe_horizon_days: float = Field(gt=0, le=366)
    # A micro-batch's commits to quarantine, events and user_profiles run side by side
    # (carousel.parallel); false: one after another.
    parallel_commits: bool = True
    # How a micro-batch writes its profile updates: "merge" (one MERGE into user_profiles) or
    # "append" (to profile_updates, folded into user_profiles every profile_fold_seconds, beside
    # the batches; readers combine the two: carousel.profiles).
    profile_writes: Literal["merge", "append"] = "merge"
    profile_fold_seconds: float = Field(default=300.0, gt=0)

    @field_validator("min_event_time")
    @classmethod
    def _iso_time(cls, value: str) -> str:
        from datetime import datetime

        try:
            datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError as err:
            raise ValueError(f"not an ISO-8601 time: {err}") from None
        return value


class ProfilesConfig(_Section):
    recent_items: int = Field(ge=1, le=1000)
    max_devices: int = Field(ge=1, le=1000)


class SimulatorConfig(_Section):
    users: int = Field(ge=1)
    items: int = Field(ge=10)
    categories: int = Field(ge=1)
    cluster_size: int = Field(ge=2)
    events: int = Field(ge=0)
    days: float = Field(gt=0)
    rate: float = Field(ge=0)
    seed: int
    bad_share: float = Field(ge=0, le=1)
    duplicate_share: float = Field(ge=0, le=1)

    @model_validator(mode="after")
    def _clusters_fit(self) -> SimulatorConfig:
        if self.cluster_size > self.items:
            raise ValueError("simulator.cluster_size must not exceed simulator.items")
        return self


class ModelConfig(_Section):
    # Which model of models.MODELS the nightly training fits (train --model overrides it).
    name: str = Field(default="next_item2vec", min_length=1)
    embedding_dim: int = Field(ge=2, le=1024)
    window: int = Field(ge=1, le=50)
    negatives: int = Field(ge=1, le=50)
    epochs: int = Field(ge=1, le=1000)
    batch_size: int = Field(ge=1)
    learning_rate: float = Field(gt=0, le=10)
    min_item_count: int = Field(ge=1)
    subsample: float = Field(ge=0, le=1)
    seed: int
    # next_item2vec's ranking: alpha * z(cosine of the input vectors) + (1 - alpha) * z(next-item
    # score), both standardised per item; 0 = the next-item score alone (models/next_item2vec.py).
    cosine_blend: float = Field(default=0.0, ge=0, le=1)
    # next_item2vec on large data: from this many sequence items (interactions after collapsing
    # repeats; 0 = never) on, it trains large_epochs passes with large_sampled_negatives shared
    # negatives per batch instead of epochs and 512 (the nightly time budget; bench/README.md),
    # and ranks with large_cosine_blend instead of cosine_blend (a long tail of rare items).
    large_data_items: int = Field(default=1_000_000, ge=0)
    large_epochs: int = Field(default=4, ge=1, le=1000)
    large_sampled_negatives: int = Field(default=256, ge=1)
    large_cosine_blend: float = Field(default=0.25, ge=0, le=1)
    # next_item2vec chooses its passes on a validation split (models/next_item2vec.py, "Epochs"):
    # the newest validation_share of its input (by time) cut off; a fit on the older part judged
    # after each pass on the newer part's next items (MRR@validation_k, at most
    # validation_max_pairs pairs), stopped after validation_patience clearly worse passes in a row,
    # at most validation_max_epochs; then the model fitted on all of it with the chosen count.
    # 0 = off; fewer than validation_min_pairs pairs after the cut or steps before it: the fixed
    # epochs. Never on large data (large_data_items): large_epochs, the nightly time budget.
    validation_share: float = Field(default=0.1, ge=0, lt=1)
    validation_max_epochs: int = Field(default=10, ge=1, le=1000)
    validation_patience: int = Field(default=2, ge=1, le=1000)
    validation_min_pairs: int = Field(default=500, ge=1)
    validation_max_pairs: int = Field(default=10_000, ge=1)
    validation_k: int = Field(default=20, ge=1)

    @model_validator(mode="after")
    def _validation_pairs(self) -> ModelConfig:
        if self.validation_max_pairs < self.validation_min_pairs:
            raise ValueError(
                f"validation_max_pairs ({self.validation_max_pairs}) is below validation_min_pairs "
                f"({self.validation_min_pairs}): the validation split would never run"
            )
        return self


class AwsBatchConfig(_Section):
    region: str = Field(min_length=1)
    job_queue: str = Field(min_length=1)
    job_definition: str = Field(min_length=1)
    poll_seconds: float = Field(gt=0)
    timeout_minutes: int = Field(ge=1)
    # An AWS Batch-compatible API (a test server): http(s)://host[:port]. Empty: AWS.
    endpoint_url: str = ""
    # S3 prefix for inputs and outputs of Batch runs while training.workspace is local.
    staging: str = ""
    # Keep the uploaded input and the downloaded output under the S3 base after a run (debugging).
    keep_staged: bool = False

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        return aws_service_url(value, "AWS Batch")

    @field_validator("staging")
    @classmethod
    def _staging_is_s3(cls, value: str) -> str:
        if value and not value.startswith(("s3://", "s3a://")):
            raise ValueError(f"must be an s3:// prefix or empty (got {value!r})")
        return value


class GateConfig(_Section):
    """The quality gate of publish: a candidate no worse than the live model, on a held-back window."""

    # Off: every valid candidate is published (recorded as "disabled" in model_publish_log).
    enabled: bool
    # train holds back the newest holdout_hours of its input from fitting; publish judges the
    # candidate and the live model on them (0: no held-back window, so no judgement).
    holdout_hours: float = Field(ge=0)
    # Refuse when Recall@k or MRR@k (k = evaluation.k) falls more than this share below the live
    # model's on the same next-item pairs (0.02 = 2 %, relative).
    max_drop: float = Field(ge=0, le=1)
    # Fewer next-item pairs than this in the window: too few to judge, published as "unjudged".
    min_pairs: int = Field(ge=1)


class OnlineTrainingConfig(_Section):
    """update-model: the live next_item2vec model warm-started on the events since its data end."""

    # How often the scheduler runs update-model: documents the schedule (the crontab and Airflow
    # examples say */15) and sizes bench-update's window; the job itself reads the events since
    # the live model's data end (at most max_window_minutes), whenever it runs.
    interval_minutes: int = Field(ge=1, le=1440)
    # Events this long before the live model's data end are read too: a user's pair that spans
    # the boundary (viewed a before it, b after) is learned; the overlap is trained again.
    context_minutes: float = Field(ge=0)
    # An update reads at most the last max_window_minutes (0: no limit): the first update after
    # a nightly model, whose data end lies gate.holdout_hours back, must not read a whole day.
    max_window_minutes: float = Field(ge=0)
    # Passes over the new events, and the (lazy Adam) rate they train at.
    epochs: int = Field(ge=1, le=100)
    learning_rate: float = Field(gt=0, le=10)
    # Fewer new interactions than this since the data end: nothing to learn yet, the run exits
    # 0 without a new version (logged).
    min_interactions: int = Field(ge=1)
    # The newest holdout_minutes are held back for publish's quality gate (0: none, unjudged);
    # the next update trains on them, as it reads from this model's data end.
    holdout_minutes: float = Field(ge=0)
    # Update outputs kept under <workspace>/models/updates (newest first; the live one always).
    keep_outputs: int = Field(ge=1)


class TrainingConfig(_Section):
    lookback_days: int = Field(ge=1)
    widen_step_days: int = Field(ge=1)
    max_lookback_days: int = Field(ge=1)
    min_interactions: int = Field(ge=1)
    # The export refuses a snapshot with fewer rows than this share of the previous snapshot's
    # (an ingest outage looks like a quiet day); 0 = no floor. --allow-smaller overrides it once.
    snapshot_floor: float = Field(ge=0, le=1)
    event_types: tuple[str, ...] = Field(min_length=1)
    workspace: str = Field(min_length=1)
    top_k: int = Field(ge=1, le=1000)
    model: ModelConfig
    aws_batch: AwsBatchConfig
    gate: GateConfig
    online: OnlineTrainingConfig

    @field_validator("workspace")
    @classmethod
    def _resolve(cls, value: str) -> str:
        return resolve_path(value)

    @field_validator("event_types")
    @classmethod
    def _known_types(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        _require_known_event_types(value)
        return value

    @model_validator(mode="after")
    def _lookback_fits(self) -> TrainingConfig:
        if self.lookback_days > self.max_lookback_days:
            raise ValueError("training.lookback_days must not exceed training.max_lookback_days")
        return self


class EvaluationConfig(_Section):
    test_days: float = Field(gt=0)
    k: int = Field(ge=1, le=1000)


class TrendingConfig(_Section):
    """Trending items: recent popularity with exponential time decay (new users, short lists)."""

    lookback_days: float = Field(gt=0)
    half_life_hours: float = Field(gt=0)
    event_weights: dict[str, float] = Field(min_length=1)
    top_n: int = Field(ge=1, le=100000)
    per_category_top_n: int = Field(ge=0, le=100000)
    # Recompute from the events table at most this often (serving keeps it between batches).
    refresh_minutes: float = Field(gt=0)
    # Cold users: trending among users like them, before overall trending. Each entry is one segment
    # definition (user attributes; SEGMENT_ATTRIBUTES); a user gets the first definition, in this
    # order, that they have every attribute of and whose segment counts at least segment_min_users
    # users in the lookback, so a small city falls back upward to its country, then to overall.
    segments: tuple[tuple[str, ...], ...]
    segment_min_users: int = Field(ge=1)
    # Items kept per segment (0 = no segment trending).
    segment_top_n: int = Field(ge=0, le=100000)
    # Age band edges for the age_band attribute: (18, 25) makes "<18", "18-24" and "25+".
    age_bands: tuple[int, ...]

    @field_validator("segments")
    @classmethod
    def _known_attributes(cls, value: tuple[tuple[str, ...], ...]) -> tuple[tuple[str, ...], ...]:
        for definition in value:
            unknown = [name for name in definition if name not in SEGMENT_ATTRIBUTES]
            if not definition or unknown:
                known = list(SEGMENT_ATTRIBUTES)
                raise ValueError(f"segment {list(definition)}: unknown attributes {unknown} (known: {known})")
        return value

    @field_validator("age_bands")
    @classmethod
    def _increasing(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(b <= a for a, b in zip(value, value[1:], strict=False)) or any(v < 0 for v in value):
            raise ValueError("age band edges must be >= 0 and strictly increasing")
        return value

    @field_validator("event_weights")
    @classmethod
    def _known_types(cls, value: dict[str, float]) -> dict[str, float]:
        _require_known_event_types(value)
        if any(w < 0 for w in value.values()):
            raise ValueError("weights must be >= 0")
        return value


class FrequencyCapConfig(_Section):
    max_payloads: int = Field(ge=0)
    window_hours: float = Field(gt=0)


class SentLogConfig(StreamingQuerySection):
    """The outbox query (``./spark-submit.sh record-sends``): ``recs.sent`` -> Delta sent_recommendations."""

    # A replayed serve batch re-emits its outbox records; they are dropped within this horizon.
    dedupe_hours: float = Field(gt=0)


# Link schemes that run code or read local data: never allowed in serving.deep_link_schemes.
UNSAFE_LINK_SCHEMES: frozenset[str] = frozenset({"javascript", "vbscript", "data", "file", "about", "blob"})


class ColdStartConfig(_Section):
    """New products (no list in the published matrix): content neighbours and exploration slots."""

    # Content neighbours per new product (TF-IDF of title, description, category, brand, price
    # band; carousel/content.py); 0 = off: a new product has no list and gets no exploration slot.
    content_neighbours: int = Field(ge=0, le=1000)
    # Up to this share of a request's slots (rounded down) go to new products of the same category
    # as the user's items (their content neighbours), strategy "new_item".
    exploration_share: float = Field(ge=0, le=1)
    # At most this many new products get content lists per catalog version (by product id).
    max_new_items: int = Field(ge=1)


class ServingConfig(StreamingQuerySection):
    """The real-time serving query (``./spark-submit.sh serve``) and the ranking shared with campaigns."""

    # How many of the user's most recent viewed/purchased items seed the candidates, and how much
    # each older one counts (weight = recency_decay ** position, newest = position 0).
    recent_items_used: int = Field(ge=1, le=100)
    recency_decay: float = Field(gt=0, le=1)
    # Purchases count this much more than views when seeding candidates.
    purchase_weight: float = Field(gt=0)
    templates_dir: str = Field(min_length=1)
    # JSON Schema per channel (<payload_schemas_dir>/<channel>.schema.json): the payload contract.
    payload_schemas_dir: str = Field(min_length=1)
    # An SMS is cut to fit this many parts as carriers count them (GSM-7: 160 characters alone,
    # 153 a part; one character outside GSM-7 makes it UCS-2: 70 alone, 67 a part). Each part is
    # billed, and senders commonly refuse more than 10.
    sms_max_segments: int = Field(ge=1, le=10)
    # Push carousels show at most this many items (a campaign may ask for more on other channels).
    push_max_items: int = Field(ge=1, le=10)
    trending: TrendingConfig
    cold_start: ColdStartConfig
    # The in-memory lookups (matrix, catalog, trending) check their Delta versions this often.
    refresh_seconds: float = Field(gt=0)
    # Triggers older than this (event time against the serving clock) are skipped, and counted.
    max_trigger_age_seconds: float = Field(gt=0)
    # How long an answered trigger id is kept: the same trigger again within it is not answered twice.
    answered_ttl_hours: float = Field(gt=0)
    # At most max_payloads real-time payloads per user within window_hours (0 = no cap).
    frequency_cap: FrequencyCapConfig
    # Kafka source setting on the hot path (the client default, 500 ms, adds to every batch).
    kafka_fetch_max_wait_ms: int = Field(ge=0, le=60000)
    # A payload larger than this goes to the dead-letter topic (the producer's max.request.size).
    max_payload_bytes: int = Field(ge=1024)
    # Offsets and commits written to the checkpoint beside the batches, at most this often (Spark's
    # asynchronous progress tracking, continuous trigger only); None: before and after each batch.
    async_progress_interval_ms: int | None = Field(default=None, ge=0)
    # The URL schemes a catalog deep link (and a link written in a template) may use: others are
    # refused at catalog upload and template check, and never rendered into a payload. Web
    # channels (email, SMS, web pop-ups) take only the http(s) ones of the list.
    deep_link_schemes: tuple[str, ...] = Field(default=("https", "carousel"), min_length=1)

    @field_validator("templates_dir", "payload_schemas_dir")
    @classmethod
    def _resolve(cls, value: str) -> str:
        return resolve_path(value)

    @field_validator("deep_link_schemes")
    @classmethod
    def _link_schemes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        schemes = tuple(dict.fromkeys(scheme.strip().lower().removesuffix(":") for scheme in value))
        for scheme in schemes:
            if not re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme):
                raise ValueError(f"{scheme!r} is not a URL scheme (letters, digits, '+', '.', '-')")
            if scheme in UNSAFE_LINK_SCHEMES:
                raise ValueError(f"{scheme!r} links can run code or read local data: not allowed")
        return schemes


class PropertyPredicate(_Section):
    """A filter on a catalog column or property, e.g. ``{property: brand, op: not_in, value: [acme]}``."""

    property: str = Field(min_length=1, pattern=r"^[a-zA-Z_][a-zA-Z0-9_]*$")
    op: Literal["eq", "ne", "in", "not_in", "gt", "ge", "lt", "le", "contains"]
    value: str | float | int | bool | list[str | float | int]

    @model_validator(mode="after")
    def _value_fits_op(self) -> PropertyPredicate:
        if self.op in ("in", "not_in") and not isinstance(self.value, list):
            raise ValueError(f"op {self.op!r} needs a list value")
        if self.op not in ("in", "not_in") and isinstance(self.value, list):
            raise ValueError(f"op {self.op!r} needs a single value, not a list")
        if self.op in ("gt", "ge", "lt", "le") and (
            isinstance(self.value, bool) or not isinstance(self.value, int | float)
        ):
            raise ValueError(f"op {self.op!r} needs a number")
        return self


class CampaignFilters(_Section):
    categories: tuple[str, ...] = ()
    in_stock_only: bool = True
    min_price: float | None = Field(default=None, ge=0)
    max_price: float | None = Field(default=None, ge=0)
    min_rating: float | None = Field(default=None, ge=0)
    where: tuple[PropertyPredicate, ...] = ()

    @model_validator(mode="after")
    def _price_range(self) -> CampaignFilters:
        if self.min_price is not None and self.max_price is not None and self.min_price > self.max_price:
            raise ValueError("min_price must not exceed max_price")
        return self


class CampaignExclusions(_Section):
    # Items the user viewed / purchased within this many days (from the profile's recent items);
    # 0 turns the exclusion off.
    viewed_within_days: float = Field(default=0, ge=0)
    purchased_within_days: float = Field(default=30, ge=0)
    # Items already sent to the user (any campaign, any channel) within this many days.
    sent_within_days: float = Field(default=7, ge=0)
    item_ids: tuple[str, ...] = ()


class CampaignVariant(_Section):
    """An A/B arm: which strategy fills the slots and, optionally, a pinned model version."""

    name: str = Field(min_length=1, pattern=r"^[a-zA-Z0-9_-]+$")
    share: float = Field(gt=0, le=1)
    strategy: Literal["model", "trending"] = "model"
    model_version: str | None = None


class CampaignSegment(_Section):
    """Who a batch campaign targets (``./spark-submit.sh campaign NAME``); every criterion is optional."""

    last_seen_within_days: float | None = Field(default=None, gt=0)
    platforms: tuple[str, ...] = ()
    countries: tuple[str, ...] = ()
    cities: tuple[str, ...] = ()
    genders: tuple[str, ...] = ()
    min_age: int | None = Field(default=None, ge=0)
    max_age: int | None = Field(default=None, ge=0)
    viewed_categories: tuple[str, ...] = ()
    purchased_at_least: int | None = Field(default=None, ge=1)


class CampaignConfig(_Section):
    channel: Literal["push", "in_app", "web_popup", "app_inbox", "email", "sms", "webhook"]
    # The template file under serving.templates_dir/<channel>/ (without extension).
    template: str = Field(default="default", min_length=1, pattern=r"^[a-zA-Z0-9_-]+$")
    # What an email payload's `content` carries: the rendered subject, HTML and text (`rendered`),
    # or a reference to the template for the sender to render from the payload's items and user
    # (`reference`: an email service's stored template, e.g. SendGrid's or SES's).
    content: Literal["rendered", "reference"] = "rendered"
    # Event types that trigger a real-time payload; empty = batch only.
    trigger_event_types: tuple[str, ...] = ()
    items: int = Field(default=3, ge=1, le=50)
    filters: CampaignFilters = CampaignFilters()
    exclusions: CampaignExclusions = CampaignExclusions()
    fallback: Literal["trending", "trending_category", "none"] = "trending"
    variants: tuple[CampaignVariant, ...] = ()
    control_share: float = Field(default=0, ge=0, lt=1)
    segment: CampaignSegment = CampaignSegment()
    enabled: bool = True

    @field_validator("trigger_event_types")
    @classmethod
    def _known_types(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        _require_known_event_types(value)
        return value

    @model_validator(mode="after")
    def _shares(self) -> CampaignConfig:
        if self.content == "reference" and self.channel != "email":
            raise ValueError(
                f"content: reference is for email campaigns; a {self.channel} payload's content is "
                "structured already (use content: rendered)"
            )
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be unique, got {names}")
        if "control" in names:
            raise ValueError("'control' is reserved for the control group (use control_share)")
        if self.variants:
            total = sum(v.share for v in self.variants) + self.control_share
            if abs(total - 1.0) > 1e-6:
                raise ValueError(f"variant shares plus control_share must sum to 1, got {total:g}")
        return self


class ReportingConfig(_Section):
    """Attribution and the report (``./spark-submit.sh report``)."""

    attribution_window_hours: float = Field(gt=0)
    confidence_level: float = Field(gt=0.5, lt=1)
    # How the p-values of all (campaign, variant, metric) tests of one report are adjusted for
    # multiplicity: a method of statsmodels' multipletests, or "none". Holm controls the family-wise
    # error under any dependence (metrics of one user, variants sharing a control are correlated);
    # fdr_bh / fdr_by control the false discovery rate instead. The two-stage FDR methods are left
    # out: their adjusted p-values depend on alpha.
    multiple_testing: Literal[
        "holm", "holm-sidak", "bonferroni", "sidak", "simes-hochberg", "hommel", "fdr_bh", "fdr_by", "none"
    ] = "holm"
    output_dir: str = Field(min_length=1)

    @field_validator("output_dir")
    @classmethod
    def _resolve(cls, value: str) -> str:
        return resolve_path(value)


class CatalogConfig(_Section):
    """Product catalog uploads (``./spark-submit.sh upload-catalog FILE``)."""

    # A refused upload's error lists this many offending rows; its report lists all of them.
    max_rejected_rows_shown: int = Field(default=20, ge=1, le=10000)
    # A full upload that would deactivate more than this share of the active products is refused
    # (a truncated export looks like a mass delisting); --allow-mass-deactivation overrides, 1 = off.
    max_deactivated_share: float = Field(default=0.5, ge=0, le=1)
    # The longest value, in characters, of each text column: a longer value rejects its row, like any
    # other invalid value. currency has no entry (it must be a 3-letter code). A column left out keeps
    # its default limit.
    max_text_chars: dict[
        Literal["item_id", "title", "description", "category", "image_url", "deep_link"], int
    ] = Field(
        default_factory=lambda: {
            "item_id": 256,
            "title": 200,
            "description": 2000,
            "category": 100,
            "image_url": 2048,
            "deep_link": 2048,
        }
    )
    # The longest value of one free-form property, and the most properties one product may have.
    max_property_chars: int = Field(default=1000, ge=1)
    max_properties: int = Field(default=50, ge=1)

    @field_validator("max_text_chars")
    @classmethod
    def _positive_limits(cls, value: dict[str, int]) -> dict[str, int]:
        bad = [
            f"{column} must be a positive number of characters, got {n}"
            for column, n in value.items()
            if n < 1
        ]
        if bad:
            raise ValueError("; ".join(bad))
        defaults = cls.model_fields["max_text_chars"].get_default(call_default_factory=True)
        return {**defaults, **value}


class ApiKeyConfig(_Section):
    """One API key: where its secret is (an environment variable) and its rate limit."""

    env: str = Field(pattern=r"^[A-Z_][A-Z0-9_]*$")
    requests_per_second: float = Field(gt=0)


# The outbox producer's linger.ms per api.record_outbox mode, when api.outbox_linger_ms is not set.
# With online_store nothing waits for the broker (the record is relayed after the answer), so
# records are batched longer: fewer, larger produce requests halved the broker's CPU at 1,000
# answers/s on 2 cores, and the answers' p99 went from 33-36 ms to 18-32 ms (bench/README.md
# "API"). An answer that waits for its record (broker_ack), or a record lost with a killed worker
# (background), keeps the short one.
OUTBOX_LINGER_MS: dict[str, int] = {"online_store": 50, "broker_ack": 5, "background": 5}
# How often a worker's event loop polls the outbox producer for delivery reports while records are
# out (api.outbox_poll_ms unset): only a broker_ack answer waits for its report; with the other
# modes a report only deletes the relayed entry, so the loop is not woken every millisecond.
OUTBOX_POLL_MS: dict[str, float] = {"online_store": 10, "broker_ack": 1, "background": 10}


class ApiConfig(_Section):
    """The recommendations API (``./spark-submit.sh api``)."""

    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    workers: int = Field(ge=1, le=64)
    worker_timeout_seconds: float = Field(ge=5, le=3600)
    keys: dict[str, ApiKeyConfig] = Field(min_length=1)
    default_similar: int = Field(ge=1, le=1000)
    max_similar: int = Field(ge=1, le=1000)
    # online_store: the outbox record is stored with the user's state, relayed to the broker after
    # the answer; broker_ack: the answer waits for the broker's acknowledgement; background:
    # neither (README "Recommendations API").
    record_outbox: Literal["online_store", "broker_ack", "background"]
    outbox_orphan_seconds: float = Field(ge=2, le=3600)
    outbox_max_entries: int = Field(ge=1000)
    record_timeout_ms: int = Field(ge=100, le=120_000)
    # None: the default of the record_outbox mode (:data:`OUTBOX_LINGER_MS`); see linger_ms.
    outbox_linger_ms: int | None = Field(default=None, ge=0, le=1000)
    # None: the default of the record_outbox mode (:data:`OUTBOX_POLL_MS`); see poll_ms.
    outbox_poll_ms: float | None = Field(default=None, gt=0, le=100)
    metrics_dir: str = Field(min_length=1)

    @field_validator("keys")
    @classmethod
    def _key_names(cls, value: dict[str, ApiKeyConfig]) -> dict[str, ApiKeyConfig]:
        return _plain_names(value, "API key names")

    @field_validator("metrics_dir")
    @classmethod
    def _resolve(cls, value: str) -> str:
        return resolve_path(value)

    @model_validator(mode="before")
    @classmethod
    def _replaced_settings(cls, data: Any) -> Any:
        if isinstance(data, dict) and "wait_for_outbox_ack" in data:
            raise ValueError(
                "api.wait_for_outbox_ack was replaced by api.record_outbox: true is broker_ack, false "
                "is background, and the default is online_store (README 'Recommendations API')"
            )
        return data

    @model_validator(mode="after")
    def _outbox_timing(self) -> ApiConfig:
        # The producer gives up on a record after half the orphan age (before the sweep sends
        # it again); librdkafka refuses a message timeout not above linger.ms.
        if self.record_outbox == "online_store" and self.linger_ms >= self.outbox_orphan_seconds * 500:
            raise ValueError(
                "api.outbox_linger_ms must be below half of api.outbox_orphan_seconds (in milliseconds)"
            )
        return self

    @model_validator(mode="after")
    def _similar_bounds(self) -> ApiConfig:
        if self.default_similar > self.max_similar:
            raise ValueError(
                f"default_similar ({self.default_similar}) exceeds max_similar ({self.max_similar})"
            )
        return self

    @property
    def poll_ms(self) -> float:
        """How often a worker polls the outbox producer for delivery reports while records are out:
        ``outbox_poll_ms``, else the mode's default."""
        return self.outbox_poll_ms if self.outbox_poll_ms is not None else OUTBOX_POLL_MS[self.record_outbox]

    @property
    def linger_ms(self) -> int:
        """The outbox producer's ``linger.ms``: ``outbox_linger_ms``, else the mode's default."""
        return (
            self.outbox_linger_ms
            if self.outbox_linger_ms is not None
            else OUTBOX_LINGER_MS[self.record_outbox]
        )

    def secrets(self) -> dict[str, str]:
        """key name -> secret, for the keys whose environment variable is set (never logged)."""
        return {name: os.environ[key.env] for name, key in self.keys.items() if os.environ.get(key.env)}


class CampaignRunsConfig(_Section):
    """How batch campaign runs send (``jobs/campaign.py``)."""

    # Payloads per send chunk. Each chunk is recorded once it is whole in the topic, so a resumed
    # run skips it; a chunk cut short by a kill is finished by reading the topic back from its
    # start, so at most one chunk's records are read again.
    chunk_payloads: int = Field(default=250_000, ge=1)
    # A run started without --run-id and --as-of resumes the campaign's unfinished run of that
    # kind started within this many hours (its id keeps its first start's date, so a retry after
    # midnight finishes the same run); 0: never, each day's run is a new one. Keep it below the
    # campaign's schedule interval.
    resume_within_hours: float = Field(default=12, ge=0, le=24 * 31)


class MaintenanceConfig(_Section):
    """Table upkeep (``./spark-submit.sh maintain``): compaction, retention, VACUUM, log cleanup."""

    # VACUUM deletes the data files a table no longer references once they were removed this long
    # ago; time travel and any query still reading an older version need them until then. Applied
    # as every table's delta.deletedFileRetentionDuration, which is what Delta 4.4's VACUUM goes by
    # (it ignores a RETAIN other than 0: spark.databricks.delta.vacuum.retentionWindowIgnore.enabled).
    vacuum_retention_hours: int = Field(default=168, ge=0)
    # Below Delta's safety threshold (168 hours, its default delta.deletedFileRetentionDuration) a
    # VACUUM can delete files that a running ingest or serve query still reads: refused unless this
    # is true.
    allow_unsafe_vacuum_retention: bool = False
    # Age-based retention: rows older than this many days are deleted, by the table's declared
    # time column (carousel.schemas.TABLES: events by event_date, events_quarantine by
    # quarantined_at, sent_recommendations by sent_date). A table not listed keeps every row.
    retention_days: dict[str, int] = Field(
        default_factory=lambda: {"events": 400, "events_quarantine": 30, "sent_recommendations": 180}
    )
    # Every table's delta.logRetentionDuration and delta.checkpointInterval: how far back the
    # transaction log (and so time travel) reaches, and how many commits lie between two
    # checkpoints (a reader replays at most that many JSON commits on top of the last checkpoint;
    # some of ingest's tables 1-3 more, carousel.schemas.TableSpec.checkpoint_offset).
    log_retention_days: int = Field(default=30, ge=1)
    checkpoint_interval: int = Field(default=10, ge=1, le=1000)
    # Deletion vectors only mask rows: REORG TABLE ... APPLY (PURGE) rewrites the files that carry
    # them, so that rows deleted by retention (or an erasure) are physically gone after VACUUM.
    purge_deletion_vectors: bool = True
    # Tasks VACUUM lists a table's files and compares them with its log in (Spark's
    # spark.sql.sources.parallelPartitionDiscovery.parallelism, set for the VACUUM only). Spark's
    # own 10,000 costs 25-30 s of task overhead per small table on 2 cores; raise it for tables
    # of many thousands of partition folders on a large cluster.
    vacuum_parallelism: int = Field(default=64, ge=1, le=100_000)
    # A step that loses a commit race with a running job (an ingest MERGE changed the same files)
    # is tried again, at most this many times in all.
    max_attempts: int = Field(default=3, ge=1, le=20)

    @field_validator("retention_days")
    @classmethod
    def _retained_tables(cls, value: dict[str, int]) -> dict[str, int]:
        from carousel.schemas import TABLES  # imported late: schemas imports pyspark

        possible = sorted(name for name, spec in TABLES.items() if spec.retention_column)
        unknown = sorted(set(value) - set(possible))
        if unknown:
            raise ValueError(f"no age-based retention for tables {unknown}; possible: {possible}")
        short = {name: days for name, days in value.items() if days < 1}
        if short:
            raise ValueError(f"retention must be at least 1 day: {short}")
        return value

    @model_validator(mode="after")
    def _safe_vacuum(self) -> MaintenanceConfig:
        unsafe = self.vacuum_retention_hours < SAFE_VACUUM_RETENTION_HOURS
        if unsafe and not self.allow_unsafe_vacuum_retention:
            raise ValueError(
                f"vacuum_retention_hours {self.vacuum_retention_hours} is below Delta's safety threshold "
                f"of {SAFE_VACUUM_RETENTION_HOURS} hours: running queries may still read the files it "
                "deletes (set allow_unsafe_vacuum_retention to true to do it anyway)"
            )
        return self

    def table_properties(self, checkpoint_offset: int = 0) -> dict[str, str]:
        """The upkeep settings every table carries as Delta table properties; ``checkpoint_offset``
        (the table's, :class:`carousel.schemas.TableSpec`) is added to the checkpoint interval."""
        return {
            "delta.logRetentionDuration": f"interval {self.log_retention_days} days",
            "delta.deletedFileRetentionDuration": f"interval {self.vacuum_retention_hours} hours",
            "delta.checkpointInterval": str(self.checkpoint_interval + checkpoint_offset),
        }


# The key of the erased-user hashes (carousel.erasure); never from YAML, never logged.
ERASURE_KEY_ENV = "CAROUSEL_ERASURE_KEY"
# Who runs an erasure, for its audit row (default: the OS user name and the host).
ERASURE_REQUESTED_BY_ENV = "CAROUSEL_ERASURE_REQUESTED_BY"


class ErasureConfig(_Section):
    """The right to be forgotten (``./spark-submit.sh forget-user``)."""

    # True: the hash key must come from CAROUSEL_ERASURE_KEY (a secret store); false: without it, a
    # random key kept at <storage.root>/erasure/hash_key is created at first use (README "Erasure").
    require_key_env: bool = False
    # Folders (local or s3://) searched for training snapshots besides <training.workspace>/snapshots
    # and the AWS Batch staging inputs: e.g. where `export-training-data --output` wrote others.
    snapshot_roots: list[str] = Field(default_factory=list)
    # At most this many ids per DELETE (one Delta commit each); a larger request takes several.
    ids_per_delete: int = Field(default=10_000, ge=1, le=1_000_000)

    @field_validator("snapshot_roots")
    @classmethod
    def _resolve(cls, value: list[str]) -> list[str]:
        if any(not root.strip() for root in value):
            raise ValueError("an empty snapshot root")
        return [resolve_path(root) for root in value]


METRICS_JOBS = ("ingest", "serve", "record-sends")


class MetricsConfig(_Section):
    """Prometheus /metrics of the streaming jobs, and the batch jobs' metrics files
    (carousel/query_metrics.py)."""

    enabled: bool = True
    host: str = Field(default="127.0.0.1", min_length=1)
    # One port per job (they may run on one machine); 0: no metrics for that job.
    ports: dict[str, int] = Field(
        default_factory=lambda: {"ingest": 9464, "serve": 9465, "record-sends": 9466}
    )
    # Where the batch jobs (nightly) write their last run's metrics, carousel_<job>.prom, for
    # node_exporter's textfile collector (--collector.textfile.directory); empty: none. A local
    # folder of the machine the job's driver runs on.
    textfile_dir: str = "./.state/metrics"

    @field_validator("textfile_dir")
    @classmethod
    def _local_folder(cls, value: str) -> str:
        if not value:
            return value
        if _URI.match(value):
            raise ValueError("a local folder (node_exporter reads it), not a URI")
        return resolve_path(value)

    @field_validator("ports")
    @classmethod
    def _known_jobs_and_ports(cls, value: dict[str, int]) -> dict[str, int]:
        unknown = sorted(set(value) - set(METRICS_JOBS))
        if unknown:
            raise ValueError(f"unknown jobs {unknown}; metrics are served by {list(METRICS_JOBS)}")
        if any(not 0 <= port <= 65535 for port in value.values()):
            raise ValueError("a port must be 0 (off) or 1-65535")
        used = [port for port in value.values() if port]
        if len(used) != len(set(used)):
            raise ValueError("two jobs share a port: each needs its own")
        return value


class SupervisionConfig(_Section):
    """Restarts of the always-on streaming queries (ingest, serve, record-sends) after transient errors."""

    max_restarts: int = Field(default=5, ge=0, le=1000)
    backoff_initial_seconds: float = Field(default=5.0, gt=0, le=3600)
    backoff_max_seconds: float = Field(default=120.0, gt=0, le=86400)
    healthy_after_seconds: float = Field(default=600.0, gt=0)
    transient_errors: list[str] = Field(default_factory=list)

    @field_validator("transient_errors")
    @classmethod
    def _no_blank_pattern(cls, value: list[str]) -> list[str]:
        if any(not pattern.strip() for pattern in value):
            raise ValueError("a blank pattern would match every error")
        return value

    @model_validator(mode="after")
    def _backoff_order(self) -> SupervisionConfig:
        if self.backoff_max_seconds < self.backoff_initial_seconds:
            raise ValueError("backoff_max_seconds must be at least backoff_initial_seconds")
        return self


class CarouselConfig(_Section):
    storage: StorageConfig
    kafka: KafkaConfig
    broker: BrokerConfig
    spark: SparkConfig
    ingest: IngestConfig
    profiles: ProfilesConfig
    simulator: SimulatorConfig
    training: TrainingConfig
    evaluation: EvaluationConfig
    serving: ServingConfig
    sent_log: SentLogConfig
    online_store: OnlineStoreConfig
    campaigns: dict[str, CampaignConfig]
    campaign_runs: CampaignRunsConfig = CampaignRunsConfig()
    reporting: ReportingConfig
    api: ApiConfig
    catalog: CatalogConfig = CatalogConfig()
    maintenance: MaintenanceConfig = MaintenanceConfig()
    erasure: ErasureConfig = ErasureConfig()
    supervision: SupervisionConfig = SupervisionConfig()
    metrics: MetricsConfig = MetricsConfig()

    @field_validator("campaigns")
    @classmethod
    def _campaign_names(cls, value: dict[str, CampaignConfig]) -> dict[str, CampaignConfig]:
        return _plain_names(value, "campaign names")

    @model_validator(mode="after")
    def _channel_topics(self) -> CarouselConfig:
        missing = sorted({c.channel for c in self.campaigns.values()} - set(self.kafka.topics))
        if missing:
            raise ValueError(f"campaigns use channels with no kafka.topics entry: {missing}")
        return self

    def campaign(self, name: str) -> CampaignConfig:
        try:
            return self.campaigns[name]
        except KeyError:
            raise ConfigError(f"no campaign {name!r}; configured: {sorted(self.campaigns)}") from None

    def with_overrides(self, **sections: Mapping[str, Any]) -> CarouselConfig:
        """A copy with some keys replaced, validated again (used by tests and benchmarks)."""
        data = self.model_dump()
        for section, values in sections.items():
            _deep_merge(data.setdefault(section, {}), dict(values))
        return _validate(data)


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value
    return base


_FREE_FORM_MAPS = {
    ("spark", "conf"),
    ("kafka", "client_options"),
    ("kafka", "python_client_options"),
    ("broker", "server_properties"),
}


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if not all(parts):
        raise ConfigError(f"bad key {dotted!r}: expected section.key")
    # spark.conf, the Kafka client option maps, broker.server_properties and
    # kafka.topics.<role>.configs hold free-form client keys, which contain dots themselves.
    if tuple(parts[:2]) in _FREE_FORM_MAPS and len(parts) > 2:
        parts = [*parts[:2], ".".join(parts[2:])]
    elif parts[:2] == ["kafka", "topics"] and len(parts) > 4 and parts[3] == "configs":
        parts = [*parts[:4], ".".join(parts[4:])]
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"bad key {dotted!r}: {part} is not a section")
    node[parts[-1]] = value


def _parse_scalar(text: str) -> Any:
    """Values given on the command line or in the environment are read as YAML scalars."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def on_local_disk(location: str) -> bool:
    """Whether ``location`` is on this machine's disk: a plain path, or a ``file:`` URI (any other
    ``scheme://`` is a shared store: s3a://, hdfs://, abfss://, ...)."""
    return "://" not in location or location.lower().startswith("file:")


def local_disk_path(location: str) -> Path:
    """The path on this machine's disk behind ``location`` (:func:`on_local_disk`): ``file:/x`` and
    ``file:///x`` are ``/x``."""
    if location.lower().startswith("file:"):
        return Path(urlsplit(location).path)
    return Path(location)


def config_file_path(file: str | Path) -> Path:
    """Where ``--config FILE`` is read from: as given (a relative path from the working folder),
    else, for a relative path missing there, under the project root, where cluster deploy mode
    ships the submitted files (``conf/submitted/``)."""
    path = Path(file).expanduser()
    if path.is_absolute() or path.exists() or not (PROJECT_ROOT / path).exists():
        return path
    return PROJECT_ROOT / path


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        content = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(content, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    return content


def _shown_input(value: Any) -> str:
    """What a validation message shows of the value refused: a whole map (client options, server
    properties, Spark settings) only by its keys, since what was refused may be a secret."""
    if isinstance(value, Mapping):
        return f"got keys {sorted(map(str, value))}"
    if isinstance(value, str) and "://" in value:
        return f"got {masked_url(value)!r}"
    return f"got {value!r}"


def _validate(data: dict[str, Any]) -> CarouselConfig:
    try:
        return CarouselConfig.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']} ({_shown_input(e.get('input'))})"
            for e in err.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}") from None


def load_config(
    config_files: Sequence[str | Path] = (),
    overrides: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
) -> CarouselConfig:
    """Load defaults, then each file, then ``CAROUSEL__A__B`` env vars, then ``a.b=value`` overrides."""
    data = _read_yaml(DEFAULT_CONFIG_FILE)
    for file in config_files:
        _deep_merge(data, _read_yaml(config_file_path(file)))
    environ = os.environ if environ is None else environ
    for key, value in sorted(environ.items()):
        if key.startswith(ENV_PREFIX) and len(key) > len(ENV_PREFIX):
            dotted = key[len(ENV_PREFIX) :].lower().replace("__", ".")
            _set_path(data, dotted, _parse_scalar(value))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        _set_path(data, key.strip(), _parse_scalar(value))
    return _validate(data)


def mask_secrets(text: str, *more: str | None) -> str:
    """``text`` with the secrets carousel reads from the environment (the Kafka SASL password, the
    OAuth client secret, the Kafka client key's passphrase and the Redis password) and ``more``
    (a password taken from a URL, say) replaced by ``***``: an error text may quote a connection
    string or an AUTH command, and it is logged and raised."""
    for secret in (
        os.environ.get(KAFKA_SECRET_ENV["sasl.password"]),
        os.environ.get(KAFKA_SECRET_ENV["ssl.key.password"]),
        os.environ.get(KAFKA_SECRET_ENV["sasl.oauthbearer.client.secret"]),
        os.environ.get(REDIS_PASSWORD_ENV),
        *more,
    ):
        if secret:
            text = text.replace(secret, "***")
    return text


def masked_url(url: str) -> str:
    """``url`` with any password in it replaced by ``***`` (safe for logs and messages)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def describe(cfg: CarouselConfig) -> str:
    """One-line JSON of the effective configuration; credentials appear only as '***'."""
    data = cfg.model_dump()
    data["online_store"]["url"] = masked_url(cfg.online_store.url)
    # What is set, read straight from the environment: describing never validates (the log line
    # of a job that fails its checks is still written).
    data["kafka"]["security"] = {key: "***" for key, env in KAFKA_SECRET_ENV.items() if os.environ.get(env)}
    for key in list(data["spark"]["conf"]):
        # ...key: fs.s3a.encryption.key (an SSE-C key), fs.s3a.access.key (the key's id).
        if re.search(r"secret|password|token|credential|\.key$", key, re.I):
            data["spark"]["conf"][key] = "***"
    return json.dumps(data, sort_keys=True, default=str)


def log_config(cfg: CarouselConfig, job: str) -> None:
    """Log where the job runs at INFO, and the whole effective configuration at DEBUG only."""
    log.info(
        "%s starting: master %s, storage %s, kafka %s, online store %s",
        job,
        cfg.spark.master,
        cfg.storage.root,
        cfg.kafka.bootstrap_servers,
        masked_url(cfg.online_store.url),
    )
    log.debug("%s configuration %s", job, describe(cfg))
