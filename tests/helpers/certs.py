"""Certificates made by the test (``cryptography``): a test CA that issues server and client
certificates, and as many other CAs as a test needs (a "foreign" CA whose certificates kho
must refuse).

Keys are RSA 2048 by default: dcmtk's BCP 195 profiles offer ECDHE-RSA suites for TLS 1.2,
so an RSA certificate works with every profile; ``key_type="ec"`` makes P-256 keys."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KeyType = Literal["rsa", "ec"]
_PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

_CA_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


@dataclass(frozen=True)
class Identity:
    """A certificate (PEM, the leaf alone) and its private key (PEM, unencrypted)."""

    cert: Path
    key: Path
    common_name: str


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _new_key(key_type: KeyType) -> _PrivateKey:
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _write_key(key: _PrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _san(hosts: tuple[str, ...]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


class TestCa:
    """A certificate authority living in ``directory`` (``ca.pem``); ``issue`` writes leaf
    certificates beside it."""

    __test__ = False  # not a pytest test class

    def __init__(self, directory: Path, name: str = "kho test CA", key_type: KeyType = "rsa"):
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.key_type = key_type
        now = datetime.datetime.now(datetime.UTC)
        self._validity = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=2))
        self._key = _new_key(key_type)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._validity[0])
            .not_valid_after(self._validity[1])
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_CA_USAGE, critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.cert = directory / "ca.pem"
        self.cert.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))

    def issue(
        self,
        common_name: str,
        *,
        server: bool = False,
        client: bool = False,
        hosts: tuple[str, ...] = (),
        file_stem: str | None = None,
    ) -> Identity:
        """A leaf certificate for ``common_name``: extended key usage serverAuth and/or
        clientAuth, subject alternative names ``hosts`` (IP addresses or DNS names)."""
        usages = [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
        usages += [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
        if not usages:
            raise ValueError("a certificate for a server, a client or both")
        key = _new_key(self.key_type)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._validity[0])
            .not_valid_after(self._validity[1])
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        )
        if hosts:
            builder = builder.add_extension(x509.SubjectAlternativeName(_san(hosts)), False)
        cert = builder.sign(self._key, hashes.SHA256())
        stem = file_stem or common_name.lower().replace(" ", "-")
        identity = Identity(
            self.directory / f"{stem}.pem", self.directory / f"{stem}.key", common_name
        )
        identity.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, identity.key)
        return identity


@dataclass(frozen=True)
class Pki:
    """A test CA with the usual cast: a server certificate for 127.0.0.1 and localhost
    (usable as a client certificate too, as an archive's own certificate is when it opens
    associations), a client certificate, and a second, foreign CA with a client of its own."""

    ca: TestCa
    server: Identity
    client: Identity
    foreign_ca: TestCa
    foreign_client: Identity


def make_pki(directory: Path, key_type: KeyType = "rsa", client_name: str = "modality") -> Pki:
    ca = TestCa(directory / "ca", "kho test CA", key_type)
    server = ca.issue(
        "localhost", server=True, client=True, hosts=("localhost", "127.0.0.1"), file_stem="server"
    )
    client = ca.issue(client_name, client=True, file_stem="client")
    foreign = TestCa(directory / "foreign", "foreign test CA", key_type)
    foreign_client = foreign.issue(client_name, client=True, file_stem="client")
    return Pki(ca, server, client, foreign, foreign_client)
