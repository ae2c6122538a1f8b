"""Certificates and a secured embedded broker for the secured-Kafka tests.

Role: make a throw-away CA, a broker certificate (for 127.0.0.1 and localhost) and a client
certificate with an encrypted PKCS#8 key (and the forms the configuration refuses), with the
system's ``openssl``; and describe an
embedded broker with two further listeners: ``SCRAM`` (SASL_SSL with SCRAM-SHA-512) and
``MTLS`` (SSL with ``ssl.client.auth=required``). Its PLAINTEXT listener stays for the test's
own administration (creating the SCRAM user).
"""

from __future__ import annotations

import base64
import json
import subprocess
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote_plus

import yaml
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

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
    path: Path, state_dir: Path, tls: TlsFiles, ports: tuple[int, int, int, int, int], jwks_url: str
) -> Path:
    """Write a carousel YAML for an embedded broker with the SCRAM, MTLS and OAUTH listeners
    (OAUTH: SASL_PLAINTEXT with OAUTHBEARER tokens checked against ``jwks_url``); its path."""
    plain, controller, scram, mtls, oauth = ports
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
                        "OAUTH": {"port": oauth, "protocol": "SASL_PLAINTEXT"},
                    },
                    # Kafka 4 calls no OAuth URL that is not listed.
                    "jvm_options": [f"-Dorg.apache.kafka.sasl.oauthbearer.allowed.urls={jwks_url}"],
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
                        "listener.name.oauth.sasl.enabled.mechanisms": "OAUTHBEARER",
                        "listener.name.oauth.oauthbearer.sasl.jaas.config": (
                            "org.apache.kafka.common.security.oauthbearer.OAuthBearerLoginModule required;"
                        ),
                        "listener.name.oauth.oauthbearer.sasl.server.callback.handler.class": (
                            "org.apache.kafka.common.security.oauthbearer.OAuthBearerValidatorCallbackHandler"
                        ),
                        "sasl.oauthbearer.jwks.endpoint.url": jwks_url,
                    },
                }
            }
        )
    )
    return path


class OAuthServer:
    """A small OAuth 2 authorisation server on loopback, for OAUTHBEARER tests: ``/token``
    answers the client-credentials grant of one client with an RS256-signed JWT (``sub`` the
    client id), and ``/jwks`` publishes the signing key for the broker to verify it."""

    def __init__(self, client_id: str, client_secret: str) -> None:
        self.client_id, self.client_secret = client_id, client_secret
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.tokens_issued = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, name="oauth-server", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def token_url(self) -> str:
        return f"{self.base_url}/token"

    @property
    def jwks_url(self) -> str:
        return f"{self.base_url}/jwks"

    def __enter__(self) -> OAuthServer:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _jwt(self, subject: str, scope: str) -> str:
        now = int(time.time())
        header = {"alg": "RS256", "typ": "JWT", "kid": "test-key"}
        claims: dict[str, object] = {"sub": subject, "iat": now, "exp": now + 3600, "iss": self.base_url}
        if scope:  # Kafka refuses an empty scope claim
            claims["scope"] = scope
        signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
        signature = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64(signature)}"

    def _jwks(self) -> dict[str, object]:
        numbers = self._key.public_key().public_numbers()

        def integer(value: int) -> str:
            return _b64(value.to_bytes((value.bit_length() + 7) // 8, "big"))

        key = {
            "kty": "RSA",
            "use": "sig",
            "alg": "RS256",
            "kid": "test-key",
            "n": integer(numbers.n),
            "e": integer(numbers.e),
        }
        return {"keys": [key]}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args: object) -> None:  # quiet
                return

            def _answer(self, status: int, body: dict[str, object]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path == "/jwks":
                    self._answer(200, server._jwks())
                else:
                    self._answer(404, {"error": "not_found"})

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length") or 0)
                form = parse_qs(self.rfile.read(length).decode())
                client_id, client_secret = form.get("client_id", [""])[0], form.get("client_secret", [""])[0]
                basic = self.headers.get("Authorization", "")
                if basic.startswith("Basic "):
                    decoded = base64.b64decode(basic[6:]).decode()
                    client_id, _, client_secret = decoded.partition(":")
                    client_id, client_secret = unquote_plus(client_id), unquote_plus(client_secret)
                if self.path != "/token" or form.get("grant_type") != ["client_credentials"]:
                    self._answer(400, {"error": "unsupported_grant_type"})
                elif (client_id, client_secret) != (server.client_id, server.client_secret):
                    self._answer(401, {"error": "invalid_client"})
                else:
                    server.tokens_issued += 1
                    scope = form.get("scope", [""])[0]
                    token = server._jwt(client_id, scope)
                    self._answer(200, {"access_token": token, "token_type": "bearer", "expires_in": 3600})

        return Handler


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
