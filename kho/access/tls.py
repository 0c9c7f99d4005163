"""TLS contexts for kho's DICOM and HTTP doors and its own outgoing associations, after
the BCP 195 profile of PS3.15 (Annex B.9, RFC 9325): TLS 1.2 and 1.3 only; on TLS 1.2 only
forward-secret AEAD cipher suites (ECDHE/DHE with AES-GCM or ChaCha20-Poly1305); no
compression, no renegotiation.  TLS 1.3's own suites are all AEAD and kept as OpenSSL
orders them.

Mutual TLS: with ``tls_ca_file`` a DICOM client's certificate is verified against it (and
refused in the handshake when it does not verify); ``tls_require_client_cert`` refuses a
handshake without one.  The certificate's subject Common Name is what the AE registry
matches a peer's ``tls_subject`` against (kho.access.dicom_peers).

Only Python's ``ssl`` module: nothing here parses certificates or speaks TLS itself.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kho.errors import ConfigError

if TYPE_CHECKING:
    from kho.archive.config import Settings

#: the protocol floor (BCP 195: never SSL, TLS 1.0 or TLS 1.1)
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
#: TLS 1.2 suites: forward secrecy and AEAD only (RFC 9325 4.2); no RSA key exchange, no
#: CBC, no SHA-1 MACs.  DHE needs DH parameters, which kho does not load: ECDHE in practice.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!PSK:!DSS"
_OPTIONS = (
    ssl.OP_NO_COMPRESSION  # CRIME
    | ssl.OP_NO_RENEGOTIATION  # renegotiation attacks and their cost (TLS 1.2)
    | ssl.OP_CIPHER_SERVER_PREFERENCE
)


@dataclass(frozen=True, slots=True)
class TlsPeer:
    """What the handshake established about one connection: the protocol, the cipher, and
    the peer's verified certificate (its subject Common Names; empty: no certificate)."""

    version: str
    cipher: str
    common_names: tuple[str, ...] = ()

    @property
    def has_certificate(self) -> bool:
        return bool(self.common_names)


def _harden(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = MINIMUM_VERSION
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= _OPTIONS
    return context


def _load_chain(context: ssl.SSLContext, settings: Settings) -> None:
    try:
        context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"tls_cert_file {settings.tls_cert_file!r} / tls_key_file "
            f"{settings.tls_key_file!r}: cannot load the certificate and key: {exc}"
        ) from exc


def _load_ca(context: ssl.SSLContext, settings: Settings) -> None:
    try:
        context.load_verify_locations(cafile=settings.tls_ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"tls_ca_file {settings.tls_ca_file!r}: cannot load the CA certificates: {exc}"
        ) from exc


def server_context(settings: Settings, *, client_certificates: bool = True) -> ssl.SSLContext:
    """The context of a TLS port: kho's certificate and key (``tls_cert_file``,
    ``tls_key_file``).  ``client_certificates`` (DICOM): with ``tls_ca_file`` a client
    certificate is asked for and verified against it, and with ``tls_require_client_cert``
    a handshake without one fails.  HTTPS passes False: its callers prove who they are with
    tokens, and a browser asked for a certificate would prompt its user."""
    if not (settings.tls_cert_file and settings.tls_key_file):
        raise ConfigError("TLS needs tls_cert_file and tls_key_file")
    context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    _load_chain(context, settings)
    if client_certificates:
        if settings.tls_require_client_cert and not settings.tls_ca_file:
            raise ConfigError(
                "tls_require_client_cert needs tls_ca_file (the CA client certificates "
                "are checked against)"
            )
        if settings.tls_ca_file:
            _load_ca(context, settings)
            context.verify_mode = (
                ssl.CERT_REQUIRED if settings.tls_require_client_cert else ssl.CERT_OPTIONAL
            )
    return context


def client_context(settings: Settings) -> ssl.SSLContext:
    """The context of kho's own TLS associations (C-MOVE destinations, forwarding): the
    peer's certificate is verified against ``tls_ca_file`` (else the system's CAs) and must
    name the host kho connects to; kho's certificate and key, when configured, are its
    client certificate (it then needs the clientAuth extended key usage too)."""
    context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))  # CERT_REQUIRED, host names
    if settings.tls_ca_file:
        _load_ca(context, settings)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if settings.tls_cert_file and settings.tls_key_file:
        _load_chain(context, settings)
    return context


def common_names(certificate: dict[str, Any] | None) -> tuple[str, ...]:
    """The subject Common Names of a certificate as ``SSLSocket.getpeercert()`` gives it
    (only a verified certificate is given: an empty dict or None when there is none)."""
    names: list[str] = []
    for rdn in (certificate or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                names.append(str(value))
    return tuple(names)


def peer_of(sock: object) -> TlsPeer | None:
    """The TlsPeer of a connected socket; None for a plain TCP socket."""
    if not isinstance(sock, ssl.SSLSocket):
        return None
    try:
        cipher = sock.cipher()
        return TlsPeer(
            version=str(sock.version() or ""),
            cipher=cipher[0] if cipher else "",
            common_names=common_names(sock.getpeercert()),
        )
    except (OSError, ValueError):  # closed under us: no handshake to describe
        return TlsPeer(version="", cipher="")


def failure_reason(exc: BaseException) -> str:
    """A short, loggable reason for a failed handshake (OpenSSL's reason code when there is
    one: UNSUPPORTED_PROTOCOL, CERTIFICATE_VERIFY_FAILED, PEER_DID_NOT_RETURN_A_CERTIFICATE,
    HTTP_REQUEST, WRONG_VERSION_NUMBER...)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    reason = getattr(exc, "reason", None)
    if reason:
        return str(reason).replace("_", " ").lower()
    if isinstance(exc, TimeoutError):
        return "no handshake within the time allowed"
    return type(exc).__name__


__all__ = [
    "MINIMUM_VERSION",
    "TLS12_CIPHERS",
    "TlsPeer",
    "client_context",
    "common_names",
    "failure_reason",
    "peer_of",
    "server_context",
]
