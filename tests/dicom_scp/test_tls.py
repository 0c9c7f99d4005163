"""DICOM over TLS (issue 16): kho's TLS port after the BCP 195 profile, mutual TLS mapped to
the AE registry, and kho's own C-MOVE associations over TLS.

Real peers with certificates made by the test (tests.helpers.certs): dcmtk's echoscu,
storescu and findscu with ``+tls``; getscu (dcmtk 3.6.7 has no TLS in getscu) through a TLS
tunnel made here with Python's ssl; movescu asking kho to move to a dcmtk ``storescp +tls``
that requires kho's client certificate; Python ssl clients offering what BCP 195 forbids
(TLS 1.0/1.1, TLS 1.2 without AEAD or forward secrecy)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
import socket
import ssl
import subprocess
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from kho.access import dicom_peers, tls
from kho.access.dicom_peers import DicomRefusal, PeerRejection
from kho.archive.archive import Archive
from kho.archive.config import Settings
from kho.dicom_scp.door import SESSION_ATTRIBUTE, PeerSession
from kho.dicom_scp.server import DicomServer
from kho.errors import ConfigError
from tests.archive.test_ingest import part10_of
from tests.helpers import dcmtk
from tests.helpers.certs import Identity, Pki, make_pki

STUDY = "1.2.826.0.1.3680043.10.1425.16.1"
SERIES = f"{STUDY}.1"
SLICES = 3
CALLING_AE_NOT_RECOGNIZED = "Calling AE Title Not Recognized"


def ct_slice(number: int, rows: int = 256) -> bytes:
    """A CT slice large enough to span several PDUs (kho's fast C-STORE path reassembles
    them), random pixels so that nothing compresses it away."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = f"{SERIES}.{number}"
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = SERIES
    ds.PatientName = "TLS^PATIENT"
    ds.PatientID = "TLS-1"
    ds.Modality = "CT"
    ds.StudyDate = "20260101"
    ds.InstanceNumber = number
    ds.Rows = ds.Columns = rows
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    pixels = np.random.default_rng(number).integers(0, 4096, (rows, rows), dtype=np.uint16)
    ds.PixelData = pixels.tobytes()
    return part10_of(ds)


# --- the dcmtk tools over TLS ------------------------------------------------------------


def _run(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, env=dcmtk.env(), timeout=timeout)


def tls_options(pki: Pki, identity: Identity | None) -> list[str]:
    """dcmtk's TLS options: kho's certificate verified against the test CA; the client's
    certificate (None: anonymous TLS, no client certificate); the BCP 195 profile."""
    client = ["+tls", str(identity.key), str(identity.cert)] if identity else ["+tla"]
    return [*client, "+cf", str(pki.ca.cert), "+px"]


def echo(port: int, aet: str, extra: list[str]) -> subprocess.CompletedProcess[str]:
    return _run([dcmtk.tool("echoscu"), "-v", "-aet", aet, "-aec", "KHO", *extra,
                 "127.0.0.1", str(port)])  # fmt: skip


def rejection(log: str) -> str:
    """The reason of an A-ASSOCIATE-RJ (rejected permanent, by the service user)."""
    assert "Association Rejected" in log, log[-3000:]
    assert "Result: Rejected Permanent, Source: Service User" in log, log[-3000:]
    found = re.search(r"Reason: ([^\n]+)", log)
    assert found, log[-3000:]
    return found.group(1).strip()


def _query() -> list[str]:
    return ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={STUDY}"]


def _statuses(log: str) -> list[int]:
    return [int(s, 16) for s in re.findall(r"DIMSE Status\s*: 0x([0-9a-fA-F]{4})", log)]


@contextlib.contextmanager
def tls_tunnel(port: int, context: ssl.SSLContext) -> Iterator[int]:
    """A loopback port whose connections are carried over TLS to kho's ``port`` (for a tool
    without TLS of its own): yields the plain port."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                plain, _ = listener.accept()
            except TimeoutError:
                continue
            secured = context.wrap_socket(
                socket.create_connection(("127.0.0.1", port)), server_hostname="localhost"
            )
            for source, sink in ((plain, secured), (secured, plain)):
                threading.Thread(target=pump, args=(source, sink), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def python_client(pki: Pki, identity: Identity | None = None) -> ssl.SSLContext:
    """A Python TLS client trusting the test CA (with a client certificate)."""
    context = ssl.create_default_context(cafile=str(pki.ca.cert))
    if identity is not None:
        context.load_cert_chain(str(identity.cert), str(identity.key))
    return context


def handshake(port: int, context: ssl.SSLContext) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=20)
    try:
        return context.wrap_socket(raw, server_hostname="localhost")
    except BaseException:
        raw.close()
        raise


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def kho(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """kho with authentication on, a plain and a TLS port, client certificates verified
    against the test CA when sent; the AE registry: a modality bound to its certificate
    (``tls_subject``), a workstation that may come either way, and two C-MOVE destinations
    registered for TLS: a storescp with a certificate of the test CA, one with a
    certificate of a foreign CA.  The study is stored by the modality over TLS."""
    tmp = tmp_path_factory.mktemp("tls")
    foreign_server = pki.foreign_ca.issue(
        "localhost", server=True, hosts=("localhost", "127.0.0.1"), file_stem="server"
    )
    dest_ports = {"DEST_TLS": dcmtk.free_port(), "DEST_FOREIGN": dcmtk.free_port()}
    settings = Settings(
        data_dir=tmp / "data",
        dicom_port=0,
        http_port=0,
        ae_title="KHO",
        fsync=False,
        auth="on",
        tls_cert_file=str(pki.server.cert),
        tls_key_file=str(pki.server.key),
        tls_ca_file=str(pki.ca.cert),
        dicom_tls_port=dcmtk.free_port(),
        # a connection that never handshakes must not hold others up, for a whole ARTIM
        artim_timeout=60,
        dicom_peers={
            "MODALITY": {"services": ["echo", "store"], "tls_subject": pki.client.common_name},
            "WS": {"services": ["echo", "find", "get", "move"]},
            "DEST_TLS": {
                "services": [],
                "host": "127.0.0.1",
                "port": dest_ports["DEST_TLS"],
                "tls": True,
            },
            "DEST_FOREIGN": {
                "services": [],
                "host": "127.0.0.1",
                "port": dest_ports["DEST_FOREIGN"],
                "tls": True,
            },
        },
    )
    refusals: list[DicomRefusal] = []
    dicom_peers.REFUSAL_OBSERVERS.append(refusals.append)
    files = []
    for number in range(1, SLICES + 1):
        path = tmp / f"slice-{number}.dcm"
        path.write_bytes(ct_slice(number))
        files.append(path)
    # storescp requires a client certificate (dcmtk's default -rc): kho presents its own
    destinations = {
        "DEST_TLS": ("+tls", str(pki.server.key), str(pki.server.cert), "+cf", str(pki.ca.cert)),
        "DEST_FOREIGN": (
            "+tls",
            str(foreign_server.key),
            str(foreign_server.cert),
            "+cf",
            str(pki.ca.cert),
        ),
    }
    try:
        with Archive(settings) as archive:
            archive.derivers = []
            server = DicomServer(archive).start()
            try:
                with (
                    dcmtk.run_storescp(
                        tmp / "dest-tls",
                        ae_title="DEST_TLS",
                        port=dest_ports["DEST_TLS"],
                        extra=("-uf", *destinations["DEST_TLS"]),
                    ) as dest,
                    dcmtk.run_storescp(
                        tmp / "dest-foreign",
                        ae_title="DEST_FOREIGN",
                        port=dest_ports["DEST_FOREIGN"],
                        extra=("-uf", *destinations["DEST_FOREIGN"]),
                    ) as foreign_dest,
                ):
                    stored = dcmtk.storescu(
                        server.tls_port or 0,
                        files,
                        aet="MODALITY",
                        extra=tuple(tls_options(pki, pki.client)),
                    )
                    assert stored.returncode == 0, stored.stdout + stored.stderr
                    yield {
                        "archive": archive,
                        "server": server,
                        "files": files,
                        "refusals": refusals,
                        "dest": dest,
                        "foreign_dest": foreign_dest,
                        "tmp": tmp,
                    }
            finally:
                server.stop()
    finally:
        dicom_peers.REFUSAL_OBSERVERS.remove(refusals.append)


def tls_refusal(refusals: list[DicomRefusal], count: int) -> DicomRefusal:
    """The first TLS handshake refusal after the first ``count`` refusals: the client may
    see its handshake fail before kho's thread has reported it, so wait a little."""
    deadline = time.monotonic() + 10
    while True:
        found = [r for r in refusals[count:] if r.reason == dicom_peers.TLS_HANDSHAKE_FAILED]
        if found:
            return found[0]
        assert time.monotonic() < deadline, f"no TLS refusal reported: {refusals[count:]}"
        time.sleep(0.02)


# --- the services over TLS, with dcmtk ---------------------------------------------------


def test_storescu_over_tls_stores_every_byte(kho: dict[str, Any]) -> None:
    """The fixture's storescu +tls (the modality's certificate) went through kho's fast
    C-STORE path on the TLS port: every instance is stored as sent."""
    archive = kho["archive"]
    for path in kho["files"]:
        sent = pydicom.dcmread(path)
        record, data = archive.read_instance(sent.SOPInstanceUID)
        assert hashlib.sha256(data).hexdigest() == record.sha256
        assert pydicom.dcmread(io.BytesIO(data)).PixelData == sent.PixelData


def test_echoscu_over_tls(kho: dict[str, Any], pki: Pki) -> None:
    result = echo(kho["server"].tls_port, "MODALITY", tls_options(pki, pki.client))
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    assert "Received Echo Response (Success)" in log


def test_findscu_over_anonymous_tls(kho: dict[str, Any], pki: Pki, tmp_path: Path) -> None:
    """The workstation is not bound to a certificate: TLS without one is enough."""
    result = _run(
        [dcmtk.tool("findscu"), "-d", "-S", "-aet", "WS", "-aec", "KHO",
         *tls_options(pki, None), "-X", "-od", str(tmp_path), *_query(),
         "-k", "PatientName", "127.0.0.1", str(kho["server"].tls_port)]
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    answers = [pydicom.dcmread(p) for p in sorted(tmp_path.glob("rsp*.dcm"))]
    assert [str(a.PatientName) for a in answers] == ["TLS^PATIENT"]
    assert _statuses(log)[-1] == 0x0000


def test_getscu_over_tls(kho: dict[str, Any], pki: Pki, tmp_path: Path) -> None:
    """getscu (no TLS in dcmtk 3.6.7) through a TLS tunnel with the workstation's
    certificate: the slices come back over kho's TLS port with the pixels sent."""
    with tls_tunnel(kho["server"].tls_port, python_client(pki, pki.client)) as port:
        result = _run(
            [dcmtk.tool("getscu"), "-d", "-S", "-aet", "WS", "-aec", "KHO",
             "-od", str(tmp_path), *_query(), "127.0.0.1", str(port)]
        )  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = {str(d.SOPInstanceUID): d for d in map(pydicom.dcmread, sorted(tmp_path.iterdir()))}
    assert len(got) == SLICES
    for path in kho["files"]:
        sent = pydicom.dcmread(path)
        assert got[str(sent.SOPInstanceUID)].PixelData == sent.PixelData


def test_move_to_a_tls_destination(kho: dict[str, Any]) -> None:
    """movescu asks kho (plain port) to move the study to DEST_TLS, registered with
    ``tls = true``: kho verifies storescp's certificate against the test CA and presents
    its own, which storescp requires."""
    dest = kho["dest"]
    before = len(dest.files())
    result = _run(
        [dcmtk.tool("movescu"), "-d", "-S", "-aet", "WS", "-aec", "KHO", "-aem", "DEST_TLS",
         *_query(), "127.0.0.1", str(kho["server"].port)]
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert _statuses(log)[-1] == 0x0000, log[-3000:]
    received = dest.files()[before:]
    assert len(received) == SLICES
    sent = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p).PixelData for p in kho["files"]}
    for path in received:
        ds = pydicom.dcmread(path)
        assert ds.PixelData == sent[ds.SOPInstanceUID]


def test_move_to_a_destination_with_an_unverifiable_certificate_fails(
    kho: dict[str, Any],
) -> None:
    """DEST_FOREIGN's certificate comes from a CA kho does not trust: kho does not send it
    a byte of the study, and every sub-operation fails."""
    result = _run(
        [dcmtk.tool("movescu"), "-d", "-S", "-aet", "WS", "-aec", "KHO", "-aem",
         "DEST_FOREIGN", *_query(), "127.0.0.1", str(kho["server"].port)]
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert _statuses(log)[-1] == 0xA702, log[-3000:]  # unable to perform sub-operations
    assert "move destination DEST_FOREIGN unreachable over TLS" in log
    failed = re.search(r"\(0008,0058\) UI \[([^\]]*)\]", log)  # Failed SOP Instance UID List
    assert failed, log[-3000:]
    assert len(failed.group(1).split("\\")) == SLICES
    assert kho["foreign_dest"].files() == []


# --- who may come over TLS ---------------------------------------------------------------


def test_association_over_tls_records_its_handshake(kho: dict[str, Any], pki: Pki) -> None:
    """The accepted association's session keeps what the handshake established (the
    Caller itself is unchanged); a plain association's has none."""
    server: DicomServer = kho["server"]
    scu = AE(ae_title="MODALITY")
    scu.add_requested_context(Verification)
    context = python_client(pki, pki.client)
    association = scu.associate(
        "127.0.0.1", server.tls_port, ae_title="KHO", tls_args=(context, "localhost")
    )
    try:
        assert association.is_established
        sessions: list[PeerSession] = [
            getattr(a, SESSION_ATTRIBUTE)
            for a in server.ae.active_associations
            if getattr(a, SESSION_ATTRIBUTE, None) is not None
        ]
        (session,) = [s for s in sessions if s.caller.name == "MODALITY"]
        assert session.tls is not None
        assert session.tls.version in ("TLSv1.2", "TLSv1.3")
        assert session.tls.common_names == (pki.client.common_name,)
        assert session.caller.address == "127.0.0.1"
    finally:
        association.release()
    plain = AE(ae_title="WS")
    plain.add_requested_context(Verification)
    association = plain.associate("127.0.0.1", server.port, ae_title="KHO")
    try:
        assert association.is_established
        (session,) = [
            getattr(a, SESSION_ATTRIBUTE)
            for a in server.ae.active_associations
            if getattr(getattr(a, SESSION_ATTRIBUTE, None), "caller", None) is not None
            and getattr(a, SESSION_ATTRIBUTE).caller.name == "WS"
        ]
        assert session.tls is None
    finally:
        association.release()


@pytest.mark.parametrize("how", ["plain", "anonymous tls", "another certificate"])
def test_peer_bound_to_its_certificate_is_rejected_without_it(
    kho: dict[str, Any], pki: Pki, how: str
) -> None:
    """MODALITY is registered with tls_subject: over plain TCP, over TLS without a client
    certificate, or with a valid certificate of another name, it is not recognised."""
    server: DicomServer = kho["server"]
    if how == "plain":
        port, extra = server.port, []
    elif how == "anonymous tls":
        port, extra = server.tls_port, tls_options(pki, None)
    else:
        other = pki.ca.issue("other-device", client=True, file_stem="other-device")
        port, extra = server.tls_port, tls_options(pki, other)
    result = echo(port, "MODALITY", extra)
    assert rejection(result.stdout + result.stderr) == CALLING_AE_NOT_RECOGNIZED
    refusal = kho["refusals"][-1]
    assert (refusal.calling_ae, refusal.reason) == (
        "MODALITY",
        PeerRejection.WRONG_CERTIFICATE.value,
    )


def test_client_certificate_of_another_ca_is_refused(kho: dict[str, Any], pki: Pki) -> None:
    """A certificate with the right name from a CA kho does not trust fails the handshake:
    no association is even requested."""
    count = len(kho["refusals"])
    result = echo(kho["server"].tls_port, "MODALITY", tls_options(pki, pki.foreign_client))
    log = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Association Accepted" not in log and "Association Rejected" not in log, log
    refusal = tls_refusal(kho["refusals"], count)
    assert "certificate verify failed" in refusal.detail
    assert (refusal.calling_ae, refusal.address) == ("", "127.0.0.1")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # ssl.TLSVersion.TLSv1_1 itself
@pytest.mark.parametrize("version", ["TLSv1", "TLSv1_1"])
def test_tls_below_1_2_is_refused(kho: dict[str, Any], version: str) -> None:
    """A client offering only TLS 1.0 or 1.1 gets kho's protocol_version alert (the client
    itself is allowed them: OpenSSL's security level 0)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    context.minimum_version = ssl.TLSVersion.TLSv1
    context.maximum_version = getattr(ssl.TLSVersion, version)
    count = len(kho["refusals"])
    with pytest.raises(ssl.SSLError) as failure:
        handshake(kho["server"].tls_port, context).close()
    assert failure.value.reason == "TLSV1_ALERT_PROTOCOL_VERSION"
    assert tls_refusal(kho["refusals"], count).detail == "unsupported protocol"


def test_tls_1_2_without_aead_or_forward_secrecy_is_refused(kho: dict[str, Any]) -> None:
    """BCP 195 on TLS 1.2: CBC suites and RSA key exchange are not offered; ECDHE with
    AES-GCM is."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("ECDHE-RSA-AES128-SHA256:ECDHE-RSA-AES256-SHA:AES128-GCM-SHA256")
    count = len(kho["refusals"])
    with pytest.raises(ssl.SSLError):
        handshake(kho["server"].tls_port, context).close()
    assert tls_refusal(kho["refusals"], count).detail == "no shared cipher"
    context.set_ciphers("DEFAULT")
    with handshake(kho["server"].tls_port, context) as secured:
        assert secured.version() == "TLSv1.2"
        name, _protocol, _bits = secured.cipher() or ("", "", 0)
        assert name.startswith("ECDHE-") and ("GCM" in name or "CHACHA20" in name), name


def test_plain_dicom_on_the_tls_port_is_refused(kho: dict[str, Any]) -> None:
    count = len(kho["refusals"])
    result = echo(kho["server"].tls_port, "WS", [])
    assert result.returncode != 0
    assert "Association Accepted" not in result.stdout + result.stderr
    tls_refusal(kho["refusals"], count)


def test_connections_that_never_handshake_hold_up_no_one(kho: dict[str, Any], pki: Pki) -> None:
    """Three connections that say nothing (kho waits a whole ARTIM timeout, 60 s here, for
    their ClientHello) do not delay an echo over TLS: the handshakes run in their own
    threads, not in the accept loop."""
    port = kho["server"].tls_port
    silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    try:
        result = subprocess.run(
            [dcmtk.tool("echoscu"), "-aet", "MODALITY", "-aec", "KHO",
             *tls_options(pki, pki.client), "127.0.0.1", str(port)],
            capture_output=True, text=True, env=dcmtk.env(), timeout=30,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
    finally:
        for sock in silent:
            sock.close()


# --- a TLS-only archive requiring client certificates -------------------------------------


@pytest.fixture
def strict(pki: Pki, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """TLS only (no plain port), client certificates required, auth off, one association
    slot (two connections may wait for their handshake)."""
    plain_port = dcmtk.free_port()
    settings = Settings(
        data_dir=tmp_path / "data",
        dicom_port=plain_port,
        http_port=0,
        ae_title="KHO",
        fsync=False,
        tls_cert_file=str(pki.server.cert),
        tls_key_file=str(pki.server.key),
        tls_ca_file=str(pki.ca.cert),
        tls_require_client_cert=True,
        dicom_tls_port=dcmtk.free_port(),
        dicom_plain=False,
        max_associations=1,
        artim_timeout=60,
    )
    refusals: list[DicomRefusal] = []
    dicom_peers.REFUSAL_OBSERVERS.append(refusals.append)
    try:
        with Archive(settings) as archive:
            server = DicomServer(archive).start()
            try:
                yield {"server": server, "plain_port": plain_port, "refusals": refusals}
            finally:
                server.stop()
    finally:
        dicom_peers.REFUSAL_OBSERVERS.remove(refusals.append)


def test_tls_only_serves_no_plain_port(strict: dict[str, Any]) -> None:
    server: DicomServer = strict["server"]
    assert server.port == server.tls_port
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", strict["plain_port"]), timeout=5).close()


def test_required_client_certificate(strict: dict[str, Any], pki: Pki) -> None:
    port = strict["server"].tls_port
    anonymous = echo(port, "ANY", tls_options(pki, None))
    assert anonymous.returncode != 0
    assert "Association Accepted" not in anonymous.stdout + anonymous.stderr
    assert "certificate" in tls_refusal(strict["refusals"], 0).detail  # none returned
    with_certificate = echo(port, "ANY", tls_options(pki, pki.client))
    assert with_certificate.returncode == 0, with_certificate.stdout + with_certificate.stderr


def test_handshakes_waiting_are_bounded(strict: dict[str, Any], pki: Pki) -> None:
    """Beyond two connections waiting for their handshake (2 x max_associations), the
    oldest is closed, long before its ARTIM timeout; real clients still get through."""
    server: DicomServer = strict["server"]
    port = server.tls_port
    silent = [socket.create_connection(("127.0.0.1", port), timeout=20) for _ in range(3)]
    try:
        assert silent[0].recv(1) == b""  # closed by kho (a timeout here fails the test)
        assert server.gate.closed_waiting >= 1
        result = echo(port, "ANY", tls_options(pki, pki.client))
        assert result.returncode == 0, result.stdout + result.stderr
    finally:
        for sock in silent:
            sock.close()


# --- settings that cannot work ------------------------------------------------------------


def test_tls_contexts_follow_bcp_195(pki: Pki, tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path,
        tls_cert_file=str(pki.server.cert),
        tls_key_file=str(pki.server.key),
        tls_ca_file=str(pki.ca.cert),
    )
    for context in (tls.server_context(settings), tls.client_context(settings)):
        assert context.minimum_version == ssl.TLSVersion.TLSv1_2
        assert context.options & ssl.OP_NO_COMPRESSION
        assert context.options & ssl.OP_NO_RENEGOTIATION
        tls12 = [c for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"]
        assert tls12
        assert all(c["aead"] and c["kea"] in ("kx-ecdhe", "kx-dhe") for c in tls12), tls12
    assert tls.server_context(settings).verify_mode == ssl.CERT_OPTIONAL
    assert tls.server_context(settings, client_certificates=False).verify_mode == ssl.CERT_NONE


def test_settings_that_cannot_work_fail_at_start(pki: Pki, tmp_path: Path) -> None:
    base: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "dicom_port": 0,
        "http_port": 0,
        "tls_cert_file": str(pki.server.cert),
        "tls_key_file": str(pki.server.key),
        "dicom_tls_port": dcmtk.free_port(),
    }
    # refused by the settings themselves (no tls_ca_file to check certificates against)
    with pytest.raises(ValueError, match="tls_ca_file"):
        Settings(**base, tls_require_client_cert=True)
    missing = Settings(**{**base, "tls_key_file": str(tmp_path / "missing.key")})
    with Archive(missing) as archive, pytest.raises(ConfigError, match="tls_key_file"):
        DicomServer(archive).start()
    with pytest.raises(ValueError, match="tls_subject"):  # no tls_ca_file
        Settings(**base, dicom_peers={"CT": {"tls_subject": "ct"}})
