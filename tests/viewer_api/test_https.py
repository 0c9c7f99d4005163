"""HTTPS (issue 16): with ``http_tls`` kho's HTTP port speaks TLS only, with the protocol floor
of the DICOM TLS port (TLS 1.2), and every response carries Strict-Transport-Security.

Real clients verifying kho's certificate against the test CA (tests.helpers.certs):
dicomweb-client (requests) storing, searching and retrieving; httpx; Python ssl clients
offering TLS 1.1; plain HTTP sent to the HTTPS port."""

from __future__ import annotations

import io
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from dicomweb_client.session_utils import add_certs_to_session, create_session

from kho.archive.archive import Archive
from kho.archive.config import Settings
from kho.viewer_api.server import HttpServer
from tests.archive.test_ingest import make_instance
from tests.helpers.certs import Pki, make_pki

STUDY = "1.2.826.0.1.3680043.10.1425.16.2"
SERIES = f"{STUDY}.1"
SOP = f"{SERIES}.1"
HSTS = "max-age=31536000"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def https(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """kho's HTTP server with http_tls on (auth off: loopback)."""
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("https") / "data",
        dicom_port=0,
        http_port=0,
        fsync=False,
        tls_cert_file=str(pki.server.cert),
        tls_key_file=str(pki.server.key),
        http_tls=True,
    )
    with Archive(settings) as archive, HttpServer(archive, host="127.0.0.1", port=0) as server:
        yield {
            "server": server,
            "port": server.port,
            "base": f"https://localhost:{server.port}/dicom-web",
        }


def test_dicomweb_client_stores_searches_and_retrieves_over_https(
    https: dict[str, Any], pki: Pki
) -> None:
    # kho's certificate checked against the test CA alone (requests would let the
    # environment's REQUESTS_CA_BUNDLE override the session's bundle)
    session = add_certs_to_session(create_session(), ca_bundle=str(pki.ca.cert))
    session.trust_env = False
    client = DICOMwebClient(https["base"], session=session)
    sent = make_instance(sop_uid=SOP, study_uid=STUDY, series_uid=SERIES)
    client.store_instances([pydicom.dcmread(io.BytesIO(sent))])
    (found,) = client.search_for_studies(search_filters={"StudyInstanceUID": STUDY})
    # the URLs kho hands out name the scheme it was reached by (the host from the Host
    # header, which dicomweb-client sends without the port)
    assert found["00081190"]["Value"][0].startswith("https://localhost")
    instance = client.retrieve_instance(STUDY, SERIES, SOP)
    assert instance.SOPInstanceUID == SOP
    assert instance.PixelData == pydicom.dcmread(io.BytesIO(sent)).PixelData


def test_httpx_over_https_gets_hsts(https: dict[str, Any], pki: Pki) -> None:
    with httpx.Client(verify=ssl.create_default_context(cafile=str(pki.ca.cert))) as client:
        response = client.get(https["base"] + "/studies")
        assert response.status_code in (200, 204)
        assert response.headers["strict-transport-security"] == HSTS
        # answers kho's middleware gives itself carry it too
        missing = client.get(https["base"] + "/studies/1.2.3/series/4.5/instances/6.7")
        assert missing.status_code == 404
        assert missing.headers["strict-transport-security"] == HSTS
    assert response.extensions["http_version"] == b"HTTP/1.1"


def test_certificate_from_another_ca_is_not_trusted_by_clients(
    https: dict[str, Any], pki: Pki
) -> None:
    """The test's trust is real: a client trusting only the foreign CA refuses kho."""
    foreign = ssl.create_default_context(cafile=str(pki.foreign_ca.cert))
    with httpx.Client(verify=foreign) as client, pytest.raises(httpx.ConnectError):
        client.get(https["base"] + "/studies")


def test_plain_http_to_the_https_port_is_refused(https: dict[str, Any]) -> None:
    """No answer in clear text (not even a redirect): the handshake fails, the connection
    closes."""
    with httpx.Client() as client, pytest.raises(httpx.TransportError):
        client.get(f"http://127.0.0.1:{https['port']}/dicom-web/studies")
    with socket.create_connection(("127.0.0.1", https["port"]), timeout=10) as raw:
        raw.sendall(b"GET /dicom-web/studies HTTP/1.1\r\nHost: localhost\r\n\r\n")
        answer = b""
        try:
            while chunk := raw.recv(4096):
                answer += chunk
        except ConnectionResetError:
            pass
    assert not answer.startswith(b"HTTP/"), answer[:200]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # ssl.TLSVersion.TLSv1_1 itself
def test_tls_below_1_2_is_refused(https: dict[str, Any]) -> None:
    """A client offering TLS 1.0 and 1.1 only fails the handshake (asyncio closes it, with
    or without getting the protocol_version alert out first); the same client allowed
    TLS 1.2 gets through."""

    def connect(maximum: ssl.TLSVersion) -> str:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.set_ciphers("DEFAULT:@SECLEVEL=0")  # the client allows them: kho must refuse
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = maximum
        with (
            socket.create_connection(("127.0.0.1", https["port"]), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="localhost") as secured,
        ):
            return str(secured.version())

    with pytest.raises(ssl.SSLError) as failure:
        connect(ssl.TLSVersion.TLSv1_1)
    assert failure.value.reason in ("TLSV1_ALERT_PROTOCOL_VERSION", "UNEXPECTED_EOF_WHILE_READING")
    assert connect(ssl.TLSVersion.TLSv1_2) == "TLSv1.2"


def test_no_hsts_over_plain_http(tmp_path: Path) -> None:
    """RFC 6797 7.2: the header is never sent over plain HTTP."""
    settings = Settings(data_dir=tmp_path / "data", dicom_port=0, http_port=0, fsync=False)
    with Archive(settings) as archive, HttpServer(archive, host="127.0.0.1", port=0) as server:
        response = httpx.get(f"http://127.0.0.1:{server.port}/dicom-web/studies")
    assert response.status_code in (200, 204)
    assert "strict-transport-security" not in response.headers
