"""MLLP over TLS (``hl7_tls_port``): an interface engine's connection completes a TLS
handshake against kho's certificate, with a client certificate where required, before
any HL7 is read; a plain or uncertified client gets nothing."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from kho.archive.archive import Archive
from kho.hl7.server import Hl7Server
from tests.audit.certs import Pki, make_pki
from tests.hl7.fixtures import Hl7Settings
from tests.hl7.mllp_client import END, START, MllpClient, message, msa

ADT = ("EVN|A08|20240601120000", "PID|1||BN7^^^BV^PI||Trần^Văn Bình||19800101|M")


class TlsMllpClient(MllpClient):
    """The test's MLLP client on a TLS connection."""

    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
        self._buffer = b""


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki", "hl7")


def _settings(tmp_path: Path, pki: Pki, **extra: Any) -> Hl7Settings:
    return Hl7Settings(
        data_dir=tmp_path / "data",
        dicom_port=0,
        http_port=0,
        ae_title="KHO",
        tls_cert_file=str(pki.server_cert),
        tls_key_file=str(pki.server_key),
        tls_ca_file=str(pki.ca),
        **extra,
    )


@pytest.fixture
def server(tmp_path: Path, pki: Pki, request: pytest.FixtureRequest) -> Iterator[Hl7Server]:
    with (
        Archive(_settings(tmp_path, pki, **getattr(request, "param", {}))) as archive,
        Hl7Server(archive, port=0, tls_port=0) as hl7,
    ):
        yield hl7


def _client_context(pki: Pki, *, certificate: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if certificate:
        context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    return context


def test_messages_over_tls_are_acknowledged(server: Hl7Server, pki: Pki) -> None:
    assert server.tls_port is not None and server.tls_port != server.port
    with TlsMllpClient(server.tls_port, _client_context(pki, certificate=True)) as client:
        assert msa(client.send(message(*ADT)))[1] == "AA"
        assert msa(client.send(message(*ADT)))[1] == "AA"  # the connection stays open
    with MllpClient(server.port) as plain:  # the plain port still serves
        assert msa(plain.send(message(*ADT)))[1] == "AA"


def test_plain_mllp_on_the_tls_port_gets_no_answer(server: Hl7Server) -> None:
    assert server.tls_port is not None
    with socket.create_connection(("127.0.0.1", server.tls_port), timeout=15) as sock:
        sock.sendall(START + message(*ADT).encode() + END)
        received = b""
        try:
            while chunk := sock.recv(4096):
                received += chunk
        except ConnectionResetError:
            pass  # kho closed it with our bytes unread
    assert b"MSA" not in received  # the handshake failed; nothing was read as HL7


@pytest.mark.parametrize("server", [{"tls_require_client_cert": True}], indirect=True)
def test_a_client_certificate_is_required_when_configured(server: Hl7Server, pki: Pki) -> None:
    assert server.tls_port is not None
    refused = _client_context(pki, certificate=False)
    with (
        pytest.raises((ssl.SSLError, ConnectionError, OSError)),
        TlsMllpClient(server.tls_port, refused) as client,
    ):
        client.send(message(*ADT))
    with TlsMllpClient(server.tls_port, _client_context(pki, certificate=True)) as client:
        assert msa(client.send(message(*ADT)))[1] == "AA"


def test_tls_only_when_the_plain_port_is_off(tmp_path: Path, pki: Pki) -> None:
    settings = _settings(tmp_path, pki, hl7_tls_port=1)  # a port, so TLS is on
    with Archive(settings) as archive, Hl7Server(archive, tls_port=0) as hl7:
        assert not hl7.serve_plain
        assert hl7.tls_port is not None and hl7.port == hl7.tls_port


def test_a_tls_port_without_a_certificate_is_a_settings_error(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="hl7_tls_port needs tls_cert_file"):
        Hl7Settings(data_dir=tmp_path / "data", hl7_tls_port=2576)
