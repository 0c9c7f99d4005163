"""A real OpenID Connect issuer for tests: real keys, a real loopback HTTP server, real JWTs.

``OidcIssuer`` holds an RSA-2048 key (kid ``rsa-1``, RS256) and an EC P-256 key (kid ``ec-1``,
ES256), publishes them as a JWKS and an OpenID Connect discovery document on a free
``127.0.0.1`` port (a ``ThreadingHTTPServer`` in a daemon thread), and signs tokens with PyJWT::

    with OidcIssuer() as issuer:                       # or start() / stop()
        settings = Settings(..., **issuer.settings_fields())      # discovery
        settings = Settings(..., **issuer.settings_fields("url"))  # oidc_jwks_url
        settings = Settings(..., **issuer.settings_fields("file", tmp_path))  # a JWKS file
        env = issuer.env()                                 # the same as KHO_* variables
        token = issuer.mint({"roles": ["viewer"], "tenant": "hosp-a"})
        httpx.get(url, headers={"Authorization": f"Bearer {token}"})

Claims of ``mint``: ``iss`` (``issuer.url``), ``aud`` (``issuer.audience``, default ``"kho"``),
``sub``, ``preferred_username``, ``iat`` and ``exp`` (now + ``lifetime_s``), updated with
``claims``; a claim given as ``None`` is left out.  ``alg`` picks the published key of that
family unless ``key`` names one; ``headers`` adds or overrides JOSE header fields (``kid``;
``None`` leaves a field out).

Hostile tokens (each otherwise valid: right issuer, audience and roles unless the name says
otherwise), for the deny-by-default matrix:

    expired, not_yet_valid, wrong_issuer, wrong_audience,
    bad_signature      -- signed by an impostor key under a published kid
    alg_none           -- ``alg: none``, no signature
    hs256_public_key   -- HS256 with the issuer's public key PEM as the HMAC secret
    unknown_kid        -- a well-formed token from a key the issuer never published

``issuer.hostile_tokens(claims)`` returns all of them by those names; ``HOSTILE_TOKENS`` lists
the names.  ``issuer.rotate()`` replaces the published key of a family with a new one (new kid)
and returns it; ``issuer.jwks_requests`` counts key-set downloads; ``issuer.failing = True``
makes the server answer 503 (an issuer outage).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

#: the hostile-token kinds hostile_tokens() returns
HOSTILE_TOKENS = (
    "expired",
    "not_yet_valid",
    "wrong_issuer",
    "wrong_audience",
    "bad_signature",
    "alg_none",
    "hs256_public_key",
    "unknown_kid",
)

#: the path under which the issuer lives (Keycloak's shape: /realms/<realm>)
REALM_PATH = "/realms/kho-test"


@dataclass
class SigningKey:
    """One key pair of the issuer: ``kid``, the JWS ``alg`` it signs with, the private key
    (a cryptography object) and its public JWK (as published)."""

    kid: str
    alg: str
    private_key: Any
    jwk: dict[str, Any]

    @property
    def public_pem(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @classmethod
    def generate(
        cls, alg: str = "RS256", kid: str | None = None, *, publish_alg: bool = True
    ) -> SigningKey:
        """A fresh key for ``alg`` (RS*/PS*: RSA-2048; ES256: P-256).  ``publish_alg=False``
        leaves ``alg`` out of the JWK, as some issuers do."""
        if alg.startswith(("RS", "PS")):
            private_key: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            algorithm: Any = jwt.algorithms.RSAAlgorithm
        elif alg == "ES256":
            private_key = ec.generate_private_key(ec.SECP256R1())
            algorithm = jwt.algorithms.ECAlgorithm
        else:
            raise ValueError(f"no test key for {alg}")
        kid = kid or f"{alg[:2].lower()}-{secrets.token_hex(4)}"
        jwk = json.loads(algorithm.to_jwk(private_key.public_key()))
        jwk.update({"kid": kid, "use": "sig"})
        if publish_alg:
            jwk["alg"] = alg
        return cls(kid, alg, private_key, jwk)


class OidcIssuer:
    """A test OpenID Connect issuer on a loopback port (see the module docstring)."""

    __test__ = False  # not a pytest test class

    def __init__(self, *, audience: str = "kho") -> None:
        self.audience = audience
        self.rsa_key = SigningKey.generate("RS256", "rsa-1")
        self.ec_key = SigningKey.generate("ES256", "ec-1")
        #: the keys the JWKS publishes, in order
        self.published: list[SigningKey] = [self.rsa_key, self.ec_key]
        #: key-set (JWKS) downloads served so far
        self.jwks_requests = 0
        #: discovery-document downloads served so far
        self.discovery_requests = 0
        #: answer every request with 503 (an issuer outage)
        self.failing = False
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> OidcIssuer:
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = issuer._answer(self.path)
                if body is None:
                    self.send_response(503 if issuer.failing else 404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},  # so stop() returns at once
            name="test-oidc-issuer",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(10)
        self._server = self._thread = None

    def __enter__(self) -> OidcIssuer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- where it is -------------------------------------------------------------------

    @property
    def port(self) -> int:
        assert self._server is not None, "OidcIssuer not started"
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """The issuer identifier (the ``iss`` of its tokens)."""
        return f"http://127.0.0.1:{self.port}{REALM_PATH}"

    @property
    def jwks_url(self) -> str:
        return f"{self.url}/protocol/openid-connect/certs"

    @property
    def discovery_url(self) -> str:
        return f"{self.url}/.well-known/openid-configuration"

    def jwks(self) -> dict[str, Any]:
        with self._lock:
            return {"keys": [dict(key.jwk) for key in self.published]}

    def write_jwks(self, path: Path) -> Path:
        """Write the published key set to ``path`` (for ``oidc_jwks_file``)."""
        path.write_text(json.dumps(self.jwks()))
        return path

    def settings_fields(self, keys: str = "discovery", tmp_path: Path | None = None) -> dict:
        """Settings keyword arguments trusting this issuer.  ``keys``: ``"discovery"``
        (the well-known document), ``"url"`` (oidc_jwks_url) or ``"file"`` (a JWKS file
        written under ``tmp_path``)."""
        fields: dict[str, Any] = {"oidc_issuer": self.url, "oidc_audience": self.audience}
        if keys == "url":
            fields["oidc_jwks_url"] = self.jwks_url
        elif keys == "file":
            assert tmp_path is not None, "a JWKS file needs tmp_path"
            fields["oidc_jwks_file"] = str(self.write_jwks(tmp_path / "jwks.json"))
        elif keys != "discovery":
            raise ValueError(f"keys must be discovery, url or file, not {keys!r}")
        return fields

    def env(self, keys: str = "discovery", tmp_path: Path | None = None) -> dict[str, str]:
        """The same as ``KHO_*`` environment variables (for ``kho serve`` subprocesses)."""
        return {f"KHO_{k.upper()}": str(v) for k, v in self.settings_fields(keys, tmp_path).items()}

    # --- tokens ------------------------------------------------------------------------

    def key_for(self, alg: str) -> SigningKey:
        """The published key that signs ``alg`` (RS*/PS*: the RSA key, ES256: the EC key)."""
        kty = "EC" if alg.startswith("ES") else "RSA"
        with self._lock:
            for key in self.published:
                if key.jwk["kty"] == kty:
                    return key
        raise LookupError(f"no published key for {alg}")

    def claims(self, claims: Mapping[str, Any] | None = None, lifetime_s: float = 300) -> dict:
        now = int(time.time())
        merged: dict[str, Any] = {
            "iss": self.url,
            "aud": self.audience,
            "sub": "3f2a-test-user",
            "preferred_username": "alice",
            "iat": now,
            "exp": now + int(lifetime_s),
        }
        merged.update(claims or {})
        return {k: v for k, v in merged.items() if v is not None}

    def mint(
        self,
        claims: Mapping[str, Any] | None = None,
        alg: str = "RS256",
        key: SigningKey | None = None,
        headers: Mapping[str, Any] | None = None,
        lifetime_s: float = 300,
    ) -> str:
        """A token signed by ``key`` (default: the published key for ``alg``), valid for
        ``lifetime_s`` unless ``claims`` say otherwise."""
        key = key or self.key_for(alg)
        header = {"kid": key.kid, **(headers or {})}
        header = {k: v for k, v in header.items() if v is not None}
        return jwt.encode(self.claims(claims, lifetime_s), key.private_key, alg, header)

    # --- hostile tokens ----------------------------------------------------------------

    def expired(self, claims: Mapping[str, Any] | None = None) -> str:
        now = int(time.time())
        return self.mint({"iat": now - 7200, "exp": now - 3600, **(claims or {})})

    def not_yet_valid(self, claims: Mapping[str, Any] | None = None) -> str:
        now = int(time.time())
        return self.mint({"nbf": now + 3600, "exp": now + 7200, **(claims or {})})

    def wrong_issuer(self, claims: Mapping[str, Any] | None = None) -> str:
        return self.mint({**(claims or {}), "iss": "https://idp.example.invalid/realms/other"})

    def wrong_audience(self, claims: Mapping[str, Any] | None = None) -> str:
        return self.mint({**(claims or {}), "aud": "some-other-client"})

    def bad_signature(self, claims: Mapping[str, Any] | None = None) -> str:
        """Signed by an impostor RSA key under the published RSA key's kid."""
        impostor = SigningKey.generate("RS256", self.rsa_key.kid)
        return self.mint(claims, key=impostor)

    def alg_none(self, claims: Mapping[str, Any] | None = None) -> str:
        header = {"alg": "none", "typ": "JWT", "kid": self.key_for("RS256").kid}
        return _compact(header, self.claims(claims), b"")

    def hs256_public_key(self, claims: Mapping[str, Any] | None = None) -> str:
        """HS256 with the issuer's RSA public key PEM as the HMAC secret (the classic
        algorithm-confusion attack).  PyJWT refuses to make this token, so it is assembled
        here from the JWS compact form (RFC 7515 section 7.1) with hmac."""
        key = self.key_for("RS256")
        header = {"alg": "HS256", "typ": "JWT", "kid": key.kid}
        signing_input = _signing_input(header, self.claims(claims))
        signature = hmac.new(key.public_pem, signing_input, hashlib.sha256).digest()
        return f"{signing_input.decode()}.{_b64(signature)}"

    def unknown_kid(self, claims: Mapping[str, Any] | None = None) -> str:
        """Signed by a key the issuer never published, under a kid it never used."""
        return self.mint(claims, key=SigningKey.generate("RS256"))

    def hostile_tokens(self, claims: Mapping[str, Any] | None = None) -> dict[str, str]:
        """Every hostile token kind of ``HOSTILE_TOKENS``, each carrying ``claims`` (roles,
        tenant) that would be granted if the token held."""
        return {name: getattr(self, name)(claims) for name in HOSTILE_TOKENS}

    # --- key rotation ------------------------------------------------------------------

    def rotate(self, alg: str = "RS256", *, keep_old: bool = False) -> SigningKey:
        """Publish a new key (new kid) for ``alg``'s family, replacing the old one unless
        ``keep_old``; later ``mint(alg=...)`` calls sign with it."""
        new = SigningKey.generate(alg)
        old = self.key_for(alg)
        with self._lock:
            if keep_old:
                self.published.insert(0, new)
            else:
                self.published = [new if k is old else k for k in self.published]
        if old is self.rsa_key and not keep_old:
            self.rsa_key = new
        elif old is self.ec_key and not keep_old:
            self.ec_key = new
        return new

    # --- the server --------------------------------------------------------------------

    def _answer(self, path: str) -> dict[str, Any] | None:
        if self.failing:
            return None
        path = path.split("?", 1)[0]
        if path == f"{REALM_PATH}/.well-known/openid-configuration":
            with self._lock:
                self.discovery_requests += 1
            return {
                "issuer": self.url,
                "jwks_uri": self.jwks_url,
                "authorization_endpoint": f"{self.url}/protocol/openid-connect/auth",
                "token_endpoint": f"{self.url}/protocol/openid-connect/token",
                "id_token_signing_alg_values_supported": ["RS256", "ES256"],
                "response_types_supported": ["code"],
                "subject_types_supported": ["public"],
            }
        if path == f"{REALM_PATH}/protocol/openid-connect/certs":
            with self._lock:
                self.jwks_requests += 1
            return self.jwks()
        return None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _signing_input(header: Mapping[str, Any], claims: Mapping[str, Any]) -> bytes:
    parts = (json.dumps(header, separators=(",", ":")), json.dumps(claims, separators=(",", ":")))
    return ".".join(_b64(p.encode()) for p in parts).encode()


def _compact(header: Mapping[str, Any], claims: Mapping[str, Any], signature: bytes) -> str:
    return f"{_signing_input(header, claims).decode()}.{_b64(signature)}"
