"""The HL7 door over a real MLLP socket: each message type, ACK codes, resends, malformed
messages, senders and tenants, character sets, and what the messages do to the catalog."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from kho.archive.archive import Archive
from kho.archive.patients import journal
from kho.archive.query import engine as query
from kho.hl7.mllp import Deframer, FramingError, frame
from kho.hl7.receiver import Hl7Receiver
from kho.hl7.server import Hl7Server
from kho.viewer_api.app import create_app
from tests.hl7.fixtures import Hl7Settings, instance
from tests.hl7.mllp_client import MllpClient, control_id, err, message, msa

NAME = "Nguyễn^Thị Ánh"
CITIZEN = "079190012345"


def pid(
    patient_id: str = "BN001", name: str = NAME, citizen: str = CITIZEN, extra: str = ""
) -> str:
    ids = f"{patient_id}^^^BV^PI"
    if citizen:
        ids += f"~{citizen}^^^CCCD^NI"
    return f"PID|1||{ids}||{name}||19900102|F{extra}"


def his_row(archive: Archive, patient_id: str) -> tuple | None:
    return archive.catalog.fetchone(
        "SELECT patient_name, patient_birth_date, patient_sex, merged_into, revision "
        "FROM his_patients WHERE patient_id = ?",
        (patient_id,),
    )


# --- framing ---------------------------------------------------------------------------


def test_deframer_splits_frames_and_discards_noise() -> None:
    deframer = Deframer(max_message_bytes=100)
    assert deframer.feed(b"noise" + frame(b"MSH|one")[:4]) == []
    assert deframer.feed(frame(b"MSH|one")[4:] + frame(b"MSH|two")) == [b"MSH|one", b"MSH|two"]
    assert deframer.pending == 0
    with pytest.raises(FramingError):
        deframer.feed(b"\x0b" + b"x" * 200)


# --- ADT -------------------------------------------------------------------------------


def test_register_then_update_over_mllp(client: MllpClient, hl7_archive: Archive) -> None:
    control = control_id()
    ack = client.send(message("EVN|A04", pid(), "PV1|1|O", kind="ADT^A04^ADT_A01", control=control))
    fields = msa(ack)
    assert fields[1:3] == ["AA", control]
    assert ack.startswith("MSH|^~\\&|KHO|PACS|HIS|BV|")
    assert "|ACK^A04^ACK|" in ack and ack.split("\r")[0].endswith("|UNICODE UTF-8")
    assert his_row(hl7_archive, "BN001") == (NAME, "19900102", "F", "", 1)
    ids = hl7_archive.catalog.fetchall("SELECT identifier, issuer, origin FROM patient_identifiers")
    assert ids == [(CITIZEN, "CCCD", "citizen")]
    # A08 with only a new name: birth date and sex stay (empty fields mean "no change")
    ack = client.send(message("EVN|A08", "PID|1||BN001^^^BV^PI||Trần^Thị Ánh"))
    assert msa(ack)[1] == "AA"
    assert his_row(hl7_archive, "BN001") == ("Trần^Thị Ánh", "19900102", "F", "", 2)
    # HL7's null "" clears a value
    assert msa(client.send(message('PID|1||BN001^^^BV^PI||||""')))[1] == "AA"
    assert his_row(hl7_archive, "BN001")[1] == ""
    # the citizen ID stays: PID-3 without it says nothing about it
    assert hl7_archive.catalog.fetchone("SELECT count(*) FROM patient_identifiers")[0] == 1


def test_resend_is_idempotent(client: MllpClient, hl7_archive: Archive) -> None:
    control = control_id()
    text = message(pid(), control=control)
    first = client.send(text)
    second = client.send(text)
    assert msa(first)[1] == "AA" and second == first  # the same ACK, from the journal
    assert his_row(hl7_archive, "BN001")[4] == 1  # applied once
    rows = hl7_archive.catalog.fetchall(
        "SELECT ack_code FROM hl7_messages WHERE control_id = ?", (control,)
    )
    assert rows == [("AA",)]
    # the same control ID for another message: refused, the first stands
    other = client.send(message(pid(name="Lê^Văn Bình"), control=control))
    assert msa(other)[1:3] == ["AE", control]
    assert "control ID" in msa(other)[3]
    assert his_row(hl7_archive, "BN001")[0] == NAME


@pytest.mark.parametrize(
    ("raw", "code", "condition"),
    [
        (b"this is not HL7", "AR", "100"),
        (message(pid(), kind="ADT^A99^ADT_A01").encode(), "AR", "201"),
        (message(pid(), kind="ORU^R01").encode(), "AR", "200"),
        (message(pid(), version="3.0").encode(), "AR", "203"),
        (message(pid(), charset="UNICODE UTF-7").encode(), "AR", "102"),
        (message(pid()).encode("utf-8").replace("Ánh".encode(), b"\xff\xfe"), "AR", "102"),
        (message("PID|1||^^^BV^PI||X").encode(), "AE", "101"),
        (message("EVN|A08").encode(), "AE", "101"),
        (message(pid(citizen="12345")).encode(), "AE", "102"),
        (message(pid(citizen="999190012345")).encode(), "AE", "102"),
        (message(pid(extra="")[:-1] + "Q").encode(), "AE", "102"),
        (message(pid().replace("19900102", "19901340")).encode(), "AE", "102"),
        (message(pid(), "MRG|", kind="ADT^A40^ADT_A39").encode(), "AE", "101"),
    ],
    # names, not the messages: those carry time-based control IDs, and test processes
    # running side by side (pytest -n) must collect the same tests
    ids=[
        "not-hl7",
        "unknown-event",
        "unsupported-type",
        "version-3",
        "utf-7",
        "bad-utf-8",
        "no-patient-id",
        "no-pid-segment",
        "short-citizen-id",
        "bad-citizen-id",
        "bad-sex",
        "bad-birth-date",
        "merge-without-mrg",
    ],
)
def test_malformed_messages_change_nothing(
    client: MllpClient, hl7_archive: Archive, raw: bytes, code: str, condition: str
) -> None:
    ack = client.send(raw)
    assert msa(ack)[1] == code, ack
    assert err(ack)[3].split("^")[0] == condition, ack
    assert err(ack)[4] == "E"
    assert hl7_archive.catalog.fetchone("SELECT count(*) FROM his_patients")[0] == 0
    assert hl7_archive.catalog.fetchone("SELECT count(*) FROM patient_identifiers")[0] == 0
    # the citizen ID never appears in an answer or the journal's reason
    assert "12345" not in msa(ack)[3]
    # the connection stays usable
    assert msa(client.send(message(pid())))[1] == "AA"


def test_every_message_is_journalled(client: MllpClient, hl7_archive: Archive) -> None:
    client.send(message(pid()))
    client.send(message(pid(citizen="1")))
    client.send(message(pid(), kind="ADT^A99"))
    rows = hl7_archive.catalog.fetchall(
        "SELECT message_type, ack_code, message, ack FROM hl7_messages ORDER BY received_at"
    )
    assert [(r[0], r[1]) for r in rows] == [
        ("ADT^A08", "AA"),
        ("ADT^A08", "AE"),
        ("ADT^A99", "AR"),
    ]
    assert NAME in rows[0][2] and rows[0][3].startswith("MSH|")


def test_latin1_message_and_ack(client: MllpClient, hl7_archive: Archive) -> None:
    text = message(pid(name="Müller^Jürgen", citizen=""), charset="8859/1")
    ack = client.send(text.encode("latin-1"), encoding="latin-1")
    assert msa(ack)[1] == "AA"
    assert his_row(hl7_archive, "BN001")[0] == "Müller^Jürgen"


def test_unregistered_sender_is_refused_with_authentication_on(tmp_path: Path) -> None:
    settings = Hl7Settings(
        data_dir=tmp_path / "data",
        dicom_port=0,
        http_port=0,
        auth="on",
        hl7_senders={"HIS^BV": "default"},
    )
    with Archive(settings) as archive, Hl7Server(archive, port=0) as server:
        with MllpClient(server.port) as client:
            refused = client.send(message(pid(), sender="LIS|XN"))
            assert msa(refused)[1] == "AR"
            assert his_row(archive, "BN001") is None
            assert msa(client.send(message(pid(), sender="HIS|BV")))[1] == "AA"
        rows = archive.catalog.fetchall("SELECT sender, ack_code, message FROM hl7_messages")
        refused_row = next(r for r in rows if r[1] == "AR")
        assert refused_row[0] == "LIS^XN" and NAME not in refused_row[2]  # MSH only


def test_sender_acts_in_its_tenant(tmp_path: Path) -> None:
    settings = Hl7Settings(
        data_dir=tmp_path / "data",
        dicom_port=0,
        http_port=0,
        tenants=["hosp-a"],
        hl7_senders={"HIS^A": "hosp-a", "HIS^B": "nowhere"},
    )
    with Archive(settings) as archive, Hl7Server(archive, port=0) as server:
        with MllpClient(server.port) as client:
            assert msa(client.send(message(pid(), sender="HIS|A")))[1] == "AA"
            assert msa(client.send(message(pid(), sender="HIS|B")))[1] == "AR"
        assert his_row(archive.for_tenant("hosp-a"), "BN001") is not None
        assert his_row(archive, "BN001") is None


# --- patient updates reach the images --------------------------------------------------


def _ingest(archive: Archive, data: bytes) -> str:
    archive.ingest_part10(data)
    return hashlib.sha256(data).hexdigest()


def test_update_reaches_catalog_queries_and_metadata(
    client: MllpClient, hl7_archive: Archive
) -> None:
    typed = instance("BN001", "NGUYEN^THI ANH", accession="A1")  # typed at the console
    sha = _ingest(hl7_archive, typed)
    assert msa(client.send(message(pid())))[1] == "AA"
    studies = list(
        query.find(
            hl7_archive.catalog, "STUDY", {"PatientID": "BN001"}, return_keys=["PatientName"]
        )
    )
    assert [s["PatientName"] for s in studies] == [NAME]
    # a later instance of the patient typed wrongly again does not undo the HIS's name
    _ingest(hl7_archive, instance("BN001", "NGUYEN THI ANH", accession="A2", sex="M"))
    row = hl7_archive.catalog.fetchone(
        "SELECT patient_name, patient_sex, num_studies FROM patients WHERE patient_id = ?",
        ("BN001",),
    )
    assert row == (NAME, "F", 2)
    with TestClient(create_app(hl7_archive)) as web:
        found = web.get(
            "/dicom-web/studies", params={"PatientName": "nguyễn*", "fuzzymatching": "true"}
        )
        assert found.status_code == 200 and len(found.json()) == 2
        study = studies[0]["StudyInstanceUID"]
        meta = web.get(f"/dicom-web/studies/{study}/metadata").json()[0]
        assert meta["00100010"]["Value"][0]["Alphabetic"] == NAME
        assert meta["00100040"]["Value"] == ["F"]
        assert meta["00080005"]["Value"] == ["ISO_IR 192"]
        others = meta["00101002"]["Value"]
        assert {"00100020": {"vr": "LO", "Value": [CITIZEN]}}.items() <= others[0].items()
        # the bytes as received, unchanged
        record = hl7_archive.catalog.get_instance(meta["00080018"]["Value"][0])
        assert record is not None and record.sha256 == sha
        assert hashlib.sha256(hl7_archive.read_part10(record)).hexdigest() == sha
        # a second update shows at once
        assert msa(client.send(message(pid(name="Trần^Thị Ánh"))))[1] == "AA"
        url = (
            f"/dicom-web/studies/{study}/series/{record.series_uid}/instances/"
            f"{record.sop_uid}/metadata"
        )
        meta = web.get(url).json()[0]
        assert meta["00100010"]["Value"][0]["Alphabetic"] == "Trần^Thị Ánh"


def test_merge_moves_studies_and_keeps_the_old_id_findable(
    client: MllpClient, hl7_archive: Archive
) -> None:
    _ingest(hl7_archive, instance("BN001", "A", accession="A1"))
    _ingest(hl7_archive, instance("BN002", "B", accession="A2"))
    _ingest(hl7_archive, instance("BN002", "B", accession="A3"))
    ack = client.send(message(pid(), "MRG|BN002^^^BV^PI", kind="ADT^A40^ADT_A39"))
    assert msa(ack)[1] == "AA", ack
    rows = hl7_archive.catalog.fetchall(
        "SELECT patient_id, num_studies, num_instances FROM patients"
    )
    assert rows == [("BN001", 3, 3)]
    for asked in ("BN001", "BN002", CITIZEN):
        found = list(
            query.find(
                hl7_archive.catalog, "STUDY", {"PatientID": asked}, return_keys=["PatientName"]
            )
        )
        assert len(found) == 3, asked
        assert {f["PatientID"] for f in found} == {"BN001"}
    assert his_row(hl7_archive, "BN002")[3]  # merged_into
    # an image sent later under the merged-away ID is moved by the housekeeping pass
    _ingest(hl7_archive, instance("BN002", "B", accession="A4"))
    server_like = Hl7Server(hl7_archive, port=0)
    assert server_like.housekeep() == (0, 1)
    assert len(list(query.find(hl7_archive.catalog, "STUDY", {"PatientID": "BN001"}))) == 4
    with TestClient(create_app(hl7_archive)) as web:
        answer = web.get("/dicom-web/studies", params={"PatientID": "BN002"})
        assert len(answer.json()) == 4
    # a register of the merged-away ID is refused
    refused = client.send(message(pid(patient_id="BN002", citizen="")))
    assert msa(refused)[1] == "AE"


def test_change_identifier(client: MllpClient, hl7_archive: Archive) -> None:
    _ingest(hl7_archive, instance("BN009", "X"))
    ack = client.send(message(pid(patient_id="BN010"), "MRG|BN009^^^BV^PI", kind="ADT^A47^ADT_A30"))
    assert msa(ack)[1] == "AA", ack
    assert hl7_archive.catalog.fetchall("SELECT patient_id, patient_name FROM patients") == [
        ("BN010", NAME)
    ]
    assert len(list(query.find(hl7_archive.catalog, "STUDY", {"PatientID": "BN009"}))) == 1
    # to an ID in use: that is a merge, refused
    _ingest(hl7_archive, instance("BN011", "Y"))
    ack = client.send(message(pid(patient_id="BN011"), "MRG|BN010^^^BV^PI", kind="ADT^A47^ADT_A30"))
    assert msa(ack)[1] == "AE" and err(ack)[2] == "PID^1^3"


# --- orders ----------------------------------------------------------------------------


def orm(control: str, order: str, *, extra_obr: str = "CT", station: str = "CT01") -> str:
    return message(
        pid(),
        "PV1|1|O|||||BS001^Phạm^Văn Cường",
        f"ORC|{control}|{order}|F{order}||SC||^^^20240601090000^^R|||||||||||{station}",
        f"OBR|1|{order}|F{order}|CT001^CT sọ não^BV||||||||||||BS002^Lê^Văn Bình"
        f"||ACC{order}|RP{order}|SPS{order}||||{extra_obr}",
        f"ZDS|1.2.826.0.1.{order[-3:]}^KHO^Application^DICOM",
        kind="ORM^O01",
        version="2.3.1",
    )


def steps(archive: Archive) -> list[tuple]:
    return archive.catalog.fetchall(
        "SELECT order_number, status, accession_number, sps_id, study_uid, station_ae, "
        "modality, start_date, start_time FROM worklist_items ORDER BY order_number"
    )


def test_orders_new_changed_cancelled(client: MllpClient, hl7_archive: Archive) -> None:
    assert msa(client.send(orm("NW", "P100")))[1] == "AA"
    assert steps(hl7_archive) == [
        (
            "P100",
            "SCHEDULED",
            "ACCP100",
            "SPSP100",
            "1.2.826.0.1.100",
            "CT01",
            "CT",
            "20240601",
            "090000",
        )
    ]
    assert msa(client.send(orm("XO", "P100", extra_obr="MR", station="MR01")))[1] == "AA"
    assert steps(hl7_archive)[0][5:7] == ("MR01", "MR")
    assert msa(client.send(orm("CA", "P100")))[1] == "AA"
    assert steps(hl7_archive)[0][1] == "CANCELED"
    # a cancel of an order never received: AE, nothing changed
    unknown = client.send(orm("CA", "P404"))
    assert msa(unknown)[1] == "AE" and err(unknown)[2] == "ORC^1^2"
    assert len(steps(hl7_archive)) == 1


def test_omi_with_imaging_procedure_control(client: MllpClient, hl7_archive: Archive) -> None:
    text = message(
        pid(),
        "ORC|NW|P200|F200",
        "TQ1|1||||||20240602143000|",
        "OBR|1|P200|F200|XR01^X-quang ngực^BV",
        "IPC|ACC200|RP200|1.2.826.0.1.200|SPS200A|DX|XR01^Ngực thẳng^BV|XQUANG1|Phòng 3|DX01",
        "IPC|ACC200|RP200|1.2.826.0.1.200|SPS200B|DX|XR02^Ngực nghiêng^BV|XQUANG1|Phòng 3|DX01",
        kind="OMI^O23^OMI_O23",
    )
    assert msa(client.send(text))[1] == "AA"
    rows = steps(hl7_archive)
    assert [r[3] for r in rows] == ["SPS200A", "SPS200B"]
    assert {r[5:9] for r in rows} == {("DX01", "DX", "20240602", "143000")}


# --- replay ----------------------------------------------------------------------------


def test_replay_applies_the_journal_again(client: MllpClient, hl7_archive: Archive) -> None:
    client.send(message(pid()))
    client.send(orm("NW", "P300"))
    hl7_archive.catalog.execute("DELETE FROM his_patients")
    hl7_archive.catalog.execute("DELETE FROM worklist_items")
    receiver = Hl7Receiver(hl7_archive)
    assert receiver.replay("default") == 2
    assert his_row(hl7_archive, "BN001")[0] == NAME
    assert len(steps(hl7_archive)) == 1
    assert [e.ack_code for e in journal.entries(hl7_archive.catalog)] == ["AA", "AA"]


# --- audit -----------------------------------------------------------------------------


def test_patient_changes_are_audited(hl7_archive: Archive) -> None:
    from kho.audit import EventKind, chain_all, search
    from kho.audit.auditor import Auditor

    auditor = Auditor(hl7_archive).start()
    try:
        with (
            Hl7Server(hl7_archive, auditor=auditor, port=0) as server,
            MllpClient(server.port) as client,
        ):
            assert msa(client.send(message(pid(), kind="ADT^A04^ADT_A01")))[1] == "AA"
            assert msa(client.send(message(pid(name="Trần^Thị Ánh"))))[1] == "AA"
            assert msa(client.send(message(pid(citizen="1"))))[1] == "AE"  # nothing
        for audit_log in list(auditor._logs.values()):
            audit_log.flush()
        chain_all(hl7_archive.catalog)
        found = search(hl7_archive.catalog, event=EventKind.PATIENT_RECORD, limit=100)
    finally:
        auditor.close()
    assert len(found) == 2
    assert all(r.via == "hl7" and r.user_id == "HL7 HIS^BV" for r in found)
    assert all("BN001" in r.message for r in found)
