"""Certificates and a secured embedded broker for the secured-Kafka tests.

Role: make a throw-away CA, a broker certificate (for 127.0.0.1 and localhost) and a client
certificate with an encrypted PKCS#8 key (and the forms the configuration refuses), with the
system's ``openssl``; and describe an
embedded broker with two further listeners: ``SCRAM`` (SASL_SSL with SCRAM-SHA-512) and
``MTLS`` (SSL with ``ssl.client.auth=required``). Its PLAINTEXT listener stays for the test's
own administration (creating the SCRAM user).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

CLIENT_KEY_PASSWORD = "client-key-pass"


@dataclass(frozen=True)
class TlsFiles:
    ca: Path  # the CA certificate (PEM)
    broker_pem: Path  # the broker's key (unencrypted PKCS#8) and certificate chain
    client_pem: Path  # the client's certificate and its key (PKCS#8, encrypted)
    client_rsa_pem: Path  # the same certificate with a traditional RSA key (refused by the config)
    client_pbes2_pem: Path  # the same with a PBES2-encrypted key (refused by the config)


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args[:2])} failed: {result.stderr.strip()}")


def make_certificates(folder: Path) -> TlsFiles:
    """A CA, and broker and client certificates it signed, under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    days = "2"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
             "-days", days, "-subj", "/CN=carousel-test-ca", cwd=folder)  # fmt: skip
    for name, subject, extension in (
        ("broker", "/CN=localhost", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
        ("client", "/CN=carousel-client", "extendedKeyUsage=clientAuth"),
    ):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", subject, cwd=folder)  # fmt: skip
        (folder / f"{name}.ext").write_text(extension + "\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", days, "-extfile", f"{name}.ext", cwd=folder)  # fmt: skip
    # PBES1 (-v1): the Java client cannot read a PBES2 key, openssl's default (kept to check that
    # the configuration refuses it).
    for scheme, out in ((["-v1", "PBE-SHA1-3DES"], "client.enc.key"), ([], "client.pbes2.key")):
        _openssl("pkcs8", "-topk8", *scheme, "-in", "client.key", "-out", out, "-passout",
                 f"pass:{CLIENT_KEY_PASSWORD}", cwd=folder)  # fmt: skip
    _openssl("rsa", "-in", "client.key", "-out", "client.rsa.key", "-traditional", cwd=folder)
    broker_pem = folder / "broker.pem"
    broker_pem.write_text((folder / "broker.key").read_text() + (folder / "broker.crt").read_text())
    client_pem = folder / "client.pem"
    client_pem.write_text((folder / "client.crt").read_text() + (folder / "client.enc.key").read_text())
    client_rsa_pem = folder / "client-rsa.pem"
    client_rsa_pem.write_text((folder / "client.crt").read_text() + (folder / "client.rsa.key").read_text())
    client_pbes2_pem = folder / "client-pbes2.pem"
    client_pbes2_pem.write_text(
        (folder / "client.crt").read_text() + (folder / "client.pbes2.key").read_text()
    )
    return TlsFiles(folder / "ca.pem", broker_pem, client_pem, client_rsa_pem, client_pbes2_pem)


def secured_broker_config(
    path: Path, state_dir: Path, tls: TlsFiles, ports: tuple[int, int, int, int]
) -> Path:
    """Write a carousel YAML for an embedded broker with the SCRAM and MTLS listeners; its path."""
    plain, controller, scram, mtls = ports
    path.write_text(
        yaml.safe_dump(
            {
                "broker": {
                    "state_dir": str(state_dir),
                    "port": plain,
                    "controller_port": controller,
                    "heap": "512m",
                    "extra_listeners": {
                        "SCRAM": {"port": scram, "protocol": "SASL_SSL"},
                        "MTLS": {"port": mtls, "protocol": "SSL"},
                    },
                    "server_properties": {
                        "ssl.keystore.type": "PEM",
                        "ssl.keystore.location": str(tls.broker_pem),
                        "ssl.truststore.type": "PEM",
                        "ssl.truststore.location": str(tls.ca),
                        "sasl.enabled.mechanisms": "SCRAM-SHA-512",
                        "listener.name.scram.scram-sha-512.sasl.jaas.config": (
                            "org.apache.kafka.common.security.scram.ScramLoginModule required;"
                        ),
                        "listener.name.mtls.ssl.client.auth": "required",
                    },
                }
            }
        )
    )
    return path
