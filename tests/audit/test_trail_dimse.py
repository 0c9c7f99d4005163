"""The DICOM door's audit trail (issue 16), produced by real dcmtk clients: C-STORE
(Instances Transferred, committed with the instance), C-FIND (Query, the identifier
itself), C-GET (Instances Transferred, sent), a refused association and a refused service
(Security Alerts); and `kill -9` during a burst of stores: every acknowledged instance has
its record after the restart.
"""

from __future__ import annotations

import base64
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config

from kho.archive.archive import Archive
from kho.archive.catalog import Catalog
from kho.archive.config import Settings
from kho.audit import EventKind, chain_all, search, verify
from kho.audit.auditor import Auditor
from kho.audit.journal import AuditRecord
from kho.dicom_scp.server import DicomServer
from tests.archive.test_ingest import make_instance
from tests.dicom_scp.test_crash import _write_instances
from tests.helpers import dcmtk
from tests.helpers.server import kho_serve

STUDY = "1.2.826.0.1.3680043.10.1425.16.1"
SERIES = f"{STUDY}.1"
SOP = f"{SERIES}.1"
CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture
def door(tmp_path: Path) -> Iterator[dict[str, Any]]:
    settings = Settings(
        data_dir=tmp_path / "data",
        dicom_port=0,
        http_port=0,
        fsync=False,
        auth="on",
        tenants=["hosp-a"],
        dicom_peers={
            "CT_A": {"tenant": "hosp-a", "services": ["echo", "store"]},
            "WS_A": {"tenant": "hosp-a", "services": ["echo", "find", "get"]},
        },
    )
    with Archive(settings) as archive:
        archive.derivers = []
        auditor = Auditor(archive).start().watch_dicom_refusals()
        server = DicomServer(archive)
        server.door.auditor = auditor
        server.start()
        try:
            yield {"archive": archive, "auditor": auditor, "port": server.port, "tmp": tmp_path}
        finally:
            server.stop()
            auditor.close()


def records(state: dict[str, Any], tenant: str, kind: EventKind) -> list[AuditRecord]:
    auditor: Auditor = state["auditor"]
    for audit_log in list(auditor._logs.values()):
        audit_log.flush()
    catalog = state["archive"].for_tenant(tenant).catalog
    chain_all(catalog)
    return search(catalog, event=kind, limit=1000)


def _store(state: dict[str, Any], aet: str = "CT_A") -> subprocess.CompletedProcess[str]:
    path = state["tmp"] / "one.dcm"
    path.write_bytes(
        make_instance(sop_uid=SOP, study_uid=STUDY, series_uid=SERIES, patient_name="DIMSE^AUDIT")
    )
    return dcmtk.storescu(state["port"], [path], aet=aet)


def test_c_store_is_recorded_with_the_instance(door: dict[str, Any]) -> None:
    assert _store(door).returncode == 0
    [record] = records(door, "hosp-a", EventKind.INSTANCES_TRANSFERRED)
    assert record.user_id == "CT_A"
    assert record.via == "C-STORE"
    assert record.address == "127.0.0.1"
    assert STUDY in record.study_uids_json and SOP in record.message
    assert verify(door["archive"].for_tenant("hosp-a").catalog) == []


def test_c_find_is_a_query_with_its_identifier(door: dict[str, Any]) -> None:
    assert _store(door).returncode == 0
    out = door["tmp"] / "find"
    out.mkdir()
    found = subprocess.run(
        [
            *(dcmtk.tool("findscu"), "-S", "-aet", "WS_A", "-aec", "KHO", "-X", "-od", str(out)),
            *("-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={STUDY}"),
            *("-k", "PatientName", "127.0.0.1", str(door["port"])),
        ],
        capture_output=True,
        text=True,
        env=dcmtk.env(),
        timeout=60,
    )
    assert found.returncode == 0, found.stderr
    [record] = records(door, "hosp-a", EventKind.QUERY)
    assert record.user_id == "WS_A"
    assert record.via == "C-FIND"
    query = ElementTree.fromstring(record.message).find(".//ParticipantObjectQuery")
    assert query is not None and query.text
    assert STUDY.encode() in base64.b64decode(query.text)  # the identifier as sent


def test_c_get_is_recorded_as_sent(door: dict[str, Any]) -> None:
    assert _store(door).returncode == 0
    out = door["tmp"] / "get"
    out.mkdir()
    got = subprocess.run(
        [
            *(dcmtk.tool("getscu"), "-S", "-aet", "WS_A", "-aec", "KHO", "-od", str(out)),
            *("-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={STUDY}"),
            *("127.0.0.1", str(door["port"])),
        ],
        capture_output=True,
        text=True,
        env=dcmtk.env(),
        timeout=60,
    )
    assert got.returncode == 0, got.stderr
    assert len(list(out.iterdir())) == 1
    transferred = records(door, "hosp-a", EventKind.INSTANCES_TRANSFERRED)
    sent = [r for r in transferred if r.via == "C-GET"]
    assert len(sent) == 1
    assert sent[0].user_id == "WS_A" and SOP in sent[0].message
    assert "DIMSE^AUDIT" in sent[0].message  # the patient, looked up from the catalog


def test_refusals_are_security_alerts(door: dict[str, Any]) -> None:
    # an unknown calling AE: the association is rejected (platform journal)
    assert _store(door, aet="STRANGER").returncode != 0
    # a registered workstation asking for a service it lacks (store): refused (its tenant)
    _store(door, aet="WS_A")  # answered 0x0124 (tests/dicom_scp/test_access.py checks it)
    platform = records(door, "default", EventKind.SECURITY_ALERT)
    assert [r.user_id for r in platform] == ["STRANGER"]
    assert "calling AE title not recognized" in platform[0].message
    tenant = records(door, "hosp-a", EventKind.SECURITY_ALERT)
    assert [r.user_id for r in tenant] == ["WS_A"]
    assert "store: service not granted" in tenant[0].message
    # nothing was stored by either
    assert records(door, "hosp-a", EventKind.INSTANCES_TRANSFERRED) == []


# --- kill -9 during a burst of stores ---------------------------------------------------


def _sender(port: int, files: list[Path], acked: list[str], stop: threading.Event) -> None:
    ae = AE(ae_title="CRASHTEST")
    ae.add_requested_context(CT, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 3
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="KHO")
        if not assoc.is_established:
            return
        for path in files:
            if stop.is_set():
                break
            status = assoc.send_c_store(path)
            if "Status" in status and status.Status == 0x0000:
                acked.append(str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID))
            elif not assoc.is_established:
                break
        assoc.release()
    except Exception:  # the server dies under us: that is the point
        return


def _audited_sops(catalog: Catalog) -> str:
    chain_all(catalog)
    found = search(catalog, event=EventKind.INSTANCES_TRANSFERRED, limit=100_000)
    return "\n".join(r.message for r in found)


def test_sigkill_keeps_the_record_of_every_acknowledged_instance(tmp_path: Path) -> None:
    _config.STORE_SEND_CHUNKED_DATASET = True
    files = _write_instances(tmp_path / "in", 120)
    data_dir = tmp_path / "data"
    acked: list[str] = []
    stop = threading.Event()
    try:
        with kho_serve(data_dir) as (proc, port):  # audit on: kho serve's default
            threads = [
                threading.Thread(target=_sender, args=(port, files[i::3], acked, stop), daemon=True)
                for i in range(3)
            ]
            for thread in threads:
                thread.start()
            deadline = time.monotonic() + 30
            while len(acked) < 20 and time.monotonic() < deadline:
                time.sleep(0.01)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            stop.set()
            acked = list(acked)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    assert 20 <= len(acked) < len(files), "the kill must land mid-ingest"
    with kho_serve(data_dir):  # the restart chains what the dead process left queued
        time.sleep(1.5)
    with Archive(Settings(data_dir=data_dir)) as archive:
        messages = _audited_sops(archive.catalog)
        missing = [sop for sop in acked if sop not in messages]
        assert missing == []
        assert verify(archive.catalog) == []


# --- forwarding configured by the settings ----------------------------------------------


def test_settings_forward_the_trail_to_a_syslog_tls_repository(tmp_path: Path) -> None:
    """audit_syslog_* make kho's Auditor forward each tenant's records (mutual TLS): a
    C-STORE's record reaches a real syslog-TLS receiver on loopback."""
    from tests.audit.certs import make_pki
    from tests.audit.test_syslog import Receiver, server_context, wait_until

    pki = make_pki(tmp_path / "pki")
    port = dcmtk.free_port()
    receiver = Receiver(port, server_context(pki))
    receiver.start()
    settings = Settings(
        data_dir=tmp_path / "data",
        dicom_port=0,
        http_port=0,
        fsync=False,
        audit_syslog_host="localhost",
        audit_syslog_port=port,
        audit_syslog_ca_file=str(pki.ca),
        audit_syslog_cert_file=str(pki.client_cert),
        audit_syslog_key_file=str(pki.client_key),
    )
    try:
        with Archive(settings) as archive:
            archive.derivers = []
            auditor = Auditor(archive).start()
            server = DicomServer(archive)
            server.door.auditor = auditor
            server.start()
            try:
                state = {"port": server.port, "tmp": tmp_path}
                assert _store(state).returncode == 0
                wait_until(lambda: any(SOP in _text(m.xml) for m in receiver.messages), 30)
            finally:
                server.stop()
                auditor.close()
    finally:
        receiver.stop()
    [text] = [_text(m.xml) for m in receiver.messages if SOP in _text(m.xml)]
    assert "DIMSE^AUDIT" in text and 'UserID="CT_A"' in text


def _text(element: ElementTree.Element) -> str:
    return ElementTree.tostring(element, encoding="unicode")


def test_a_deidentified_delivery_is_an_export_naming_the_real_patient(tmp_path: Path) -> None:
    """Forwarding with a de-identification project: an Export record (A.5.3.6) in the
    hospital's trail that names whose data left (the pseudonym is not who it was)."""
    from kho.access.callers import Caller, CallerKind

    with Archive(Settings(data_dir=tmp_path / "data", fsync=False)) as archive:
        archive.derivers = []
        archive.ingest_part10(
            make_instance(
                sop_uid=SOP, study_uid=STUDY, series_uid=SERIES, patient_name="REAL^PATIENT"
            )
        )
        auditor = Auditor(archive).start()
        try:
            forwarder = Caller(CallerKind.OPEN, "kho-forwarder:KHO")
            auditor.sent(
                forwarder,
                "default",
                [(STUDY, CT, SOP)],
                via="FORWARD",
                destination="research",
                destination_address="10.0.0.9:2762",
                deidentified_for="trial-7",
            )
            state = {"auditor": auditor, "archive": archive}
            [record] = records(state, "default", EventKind.EXPORT)
        finally:
            auditor.close()
    assert record.user_id == "kho-forwarder:KHO"
    assert "REAL^PATIENT" in record.message and SOP in record.message
    assert "de-identified for project trial-7" in record.message
    assert 'UserID="research"' in record.message
