"""The DICOM Audit Message of each event kind (PS3.15 A.5): parsed back from the XML, its
event codes, participants, audit source and participant objects."""

from __future__ import annotations

import base64
import xml.etree.ElementTree as ET
from datetime import datetime
from typing import Any

import pytest

from kho.access.callers import Caller
from kho.audit import messages as m

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
STUDY = "1.2.826.0.1.3680043.8.498.1"
FIND = "1.2.840.10008.5.1.4.1.2.2.1"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def parse(event: m.AuditEvent, source: m.AuditSource) -> ET.Element:
    root = ET.fromstring(event.stamped(source).to_xml())
    assert root.tag == "AuditMessage"
    # the schema's order: event, participants, one audit source, then objects
    tags = [child.tag for child in root]
    assert tags[0] == "EventIdentification"
    source_at = tags.index("AuditSourceIdentification")
    assert set(tags[1:source_at]) == {"ActiveParticipant"}
    assert set(tags[source_at + 1 :]) <= {"ParticipantObjectIdentification"}
    return root


def code(element: ET.Element | None) -> tuple[str, str, str]:
    assert element is not None
    return (element.get("csd-code"), element.get("codeSystemName"), element.get("originalText"))


def participants(root: ET.Element) -> dict[str, ET.Element]:
    return {p.get("UserID"): p for p in root.findall("ActiveParticipant")}


def role(participant: ET.Element) -> str | None:
    element = participant.find("RoleIDCode")
    return element.get("csd-code") if element is not None else None


def objects(root: ET.Element) -> dict[str, ET.Element]:
    return {
        o.get("ParticipantObjectID"): o for o in root.findall("ParticipantObjectIdentification")
    }


def check_event(root: ET.Element, event_id: tuple[str, str, str], action: str, outcome: int):
    ident = root.find("EventIdentification")
    assert ident is not None
    assert code(ident.find("EventID")) == event_id
    assert ident.get("EventActionCode") == action
    assert ident.get("EventOutcomeIndicator") == str(outcome)
    stamp = datetime.fromisoformat(ident.get("EventDateTime", ""))
    assert stamp.utcoffset() is not None  # unambiguous: UTC with its offset
    return ident


def check_source(root: ET.Element, source: m.AuditSource) -> None:
    audit_source = root.find("AuditSourceIdentification")
    assert audit_source is not None
    assert audit_source.get("AuditSourceID") == source.source_id
    assert audit_source.get("AuditEnterpriseSiteID") == source.site_id
    type_code = audit_source.find("AuditSourceTypeCode")
    assert type_code is not None and type_code.get("csd-code") == "4"  # application server
    archive = participants(root)[source.ae_title]
    assert archive.get("NetworkAccessPointID") == source.host
    assert archive.get("NetworkAccessPointTypeCode") == "1"  # a machine name
    assert archive.get("AlternativeUserID") == source.process_id


def check_patient(root: ET.Element, patient_id: str, name: str) -> None:
    patient = objects(root)[patient_id]
    assert patient.get("ParticipantObjectTypeCode") == "1"  # person
    assert patient.get("ParticipantObjectTypeCodeRole") == "1"  # patient
    assert code(patient.find("ParticipantObjectIDTypeCode")) == ("2", "RFC-3881", "Patient Number")
    assert patient.findtext("ParticipantObjectName") == name


def check_study(root: ET.Element, uid: str, sop_classes: dict[str, list[str]]) -> None:
    study = objects(root)[uid]
    assert study.get("ParticipantObjectTypeCode") == "2"  # system object
    assert study.get("ParticipantObjectTypeCodeRole") == "3"  # report
    assert code(study.find("ParticipantObjectIDTypeCode")) == (
        "110180",
        "DCM",
        "Study Instance UID",
    )
    found = {
        s.get("UID"): (int(s.get("NumberOfInstances", "-1")), [i.get("UID") for i in s])
        for s in study.findall("SOPClass")
    }
    assert found == {uid: (len(uids), uids) for uid, uids in sop_classes.items()}


def test_instances_received_by_c_store(modality: Caller, source: m.AuditSource) -> None:
    event = m.instances_stored(
        modality,
        patient=m.Patient("PAT-1", "Müller^Jürgen"),
        study=m.one_instance(STUDY, CT, f"{STUDY}.1.1"),
    )
    root = parse(event, source)
    check_event(root, ("110104", "DCM", "DICOM Instances Transferred"), "C", 0)
    check_source(root, source)
    who = participants(root)
    assert set(who) == {"CT_SCANNER_1", "KHO"}
    assert who["CT_SCANNER_1"].get("UserIsRequestor") == "true"
    assert role(who["CT_SCANNER_1"]) == "110153"  # source: the modality sent
    assert who["CT_SCANNER_1"].get("NetworkAccessPointID") == "10.20.30.40"
    assert who["CT_SCANNER_1"].get("NetworkAccessPointTypeCode") == "2"  # an IP address
    assert who["KHO"].get("UserIsRequestor") == "false"
    assert role(who["KHO"]) == "110152"  # destination: the archive received
    check_patient(root, "PAT-1", "Müller^Jürgen")
    check_study(root, STUDY, {CT: [f"{STUDY}.1.1"]})
    assert event.summary()["via"] == "C-STORE"


def test_instances_received_by_stow_replacing_stored_ones(
    radiologist: Caller, source: m.AuditSource
) -> None:
    event = m.instances_stored(
        radiologist,
        patient=m.Patient("PAT-1"),
        study=m.one_instance(STUDY, MR, f"{STUDY}.2.1"),
        via="STOW-RS",
        updated=True,
    )
    root = parse(event, source)
    check_event(root, ("110104", "DCM", "DICOM Instances Transferred"), "U", 0)
    assert participants(root)["dr.house"].get("UserName") == "OIDC user"


def test_instances_sent_by_c_move_to_a_third_party(
    workstation: Caller, source: m.AuditSource
) -> None:
    study = m.Study(STUDY, (m.SopClassCount(CT, 120), m.SopClassCount(MR, 3)), "ACC-9")
    event = m.instances_sent(
        workstation,
        patient=m.Patient("PAT-1", "DOE^JANE"),
        study=study,
        destination="VIEWER_3",
        destination_address="10.20.30.99",
        via="C-MOVE",
    )
    root = parse(event, source)
    check_event(root, ("110104", "DCM", "DICOM Instances Transferred"), "R", 0)
    who = participants(root)
    assert who["READING_WS"].get("UserIsRequestor") == "true"  # asked for the move
    assert role(who["READING_WS"]) is None
    assert who["VIEWER_3"].get("UserIsRequestor") == "false"
    assert role(who["VIEWER_3"]) == "110152"  # destination
    assert role(who["KHO"]) == "110153"  # the archive sent
    study_element = objects(root)[STUDY]
    counts = {s.get("UID"): s.get("NumberOfInstances") for s in study_element.findall("SOPClass")}
    assert counts == {CT: "120", MR: "3"}
    accession = study_element.find("Accession")
    assert accession is not None and accession.get("Number") == "ACC-9"


def test_instances_sent_by_c_get_to_the_caller(workstation: Caller, source) -> None:
    event = m.instances_sent(
        workstation, patient=m.Patient("PAT-1"), study=m.Study(STUDY), via="C-GET"
    )
    who = participants(parse(event, source))
    assert set(who) == {"READING_WS", "KHO"}
    assert role(who["READING_WS"]) == "110152"  # the caller is the destination
    assert who["READING_WS"].get("UserIsRequestor") == "true"


def test_begin_transferring(workstation: Caller, source: m.AuditSource) -> None:
    event = m.begin_transferring(
        workstation, patient=m.Patient("PAT-1"), study=m.Study(STUDY), destination="VIEWER_3"
    )
    root = parse(event, source)
    check_event(root, ("110102", "DCM", "Begin Transferring DICOM Instances"), "E", 0)
    assert role(participants(root)["KHO"]) == "110153"


def test_c_find_query_is_base64_with_its_transfer_syntax(
    workstation: Caller, source: m.AuditSource
) -> None:
    identifier = b"\x08\x00\x52\x00\x06\x00\x00\x00STUDY \x10\x00\x20\x00\x04\x00\x00\x00PAT*"
    event = m.query(workstation, target=FIND, query=identifier, transfer_syntax=EXPLICIT_LE)
    root = parse(event, source)
    check_event(root, ("110112", "DCM", "Query"), "E", 0)
    who = participants(root)
    assert role(who["READING_WS"]) == "110153"  # issued the query
    assert role(who["KHO"]) == "110152"  # responds to it
    query = objects(root)[FIND]
    assert query.get("ParticipantObjectTypeCode") == "2"
    assert query.get("ParticipantObjectTypeCodeRole") == "3"
    assert code(query.find("ParticipantObjectIDTypeCode")) == ("110181", "DCM", "SOP Class UID")
    assert base64.b64decode(query.findtext("ParticipantObjectQuery", "")) == identifier
    detail = query.find("ParticipantObjectDetail")
    assert detail is not None and detail.get("type") == "TransferSyntax"
    assert base64.b64decode(detail.get("value", "")).decode() == EXPLICIT_LE
    children = [c.tag for c in query]  # the schema's order
    assert children == [
        "ParticipantObjectIDTypeCode",
        "ParticipantObjectQuery",
        "ParticipantObjectDetail",
    ]


def test_qido_query_names_the_path_and_keeps_the_query_string(
    radiologist: Caller, source: m.AuditSource
) -> None:
    event = m.query(radiologist, target="/dicom-web/studies", query="PatientID=PAT-1&limit=10")
    root = parse(event, source)
    query = objects(root)["/dicom-web/studies"]
    assert code(query.find("ParticipantObjectIDTypeCode")) == ("12", "RFC-3881", "URI")
    assert query.get("ParticipantObjectTypeCodeRole") == "24"  # query
    decoded = base64.b64decode(query.findtext("ParticipantObjectQuery", ""))
    assert decoded == b"PatientID=PAT-1&limit=10"
    assert event.via == "QIDO-RS"


def test_instances_accessed_by_wado(radiologist: Caller, source: m.AuditSource) -> None:
    event = m.instances_accessed(
        radiologist, patient=m.Patient("PAT-1", "DOE^JANE"), study=m.Study(STUDY)
    )
    root = parse(event, source)
    check_event(root, ("110103", "DCM", "DICOM Instances Accessed"), "R", 0)
    who = participants(root)
    assert who["dr.house"].get("UserIsRequestor") == "true"
    assert who["dr.house"].get("NetworkAccessPointID") == "192.168.1.50"
    check_patient(root, "PAT-1", "DOE^JANE")
    check_study(root, STUDY, {})


def test_export(radiologist: Caller, source: m.AuditSource) -> None:
    event = m.export(
        radiologist,
        patient=m.Patient("PAT-1"),
        study=m.Study(STUDY),
        destination="https://other-hospital.example/dicom-web",
    )
    root = parse(event, source)
    check_event(root, ("110106", "DCM", "Export"), "R", 0)
    media = participants(root)["https://other-hospital.example/dicom-web"]
    assert role(media) == "110154"  # destination media


def test_patient_record_update_from_hl7(source: m.AuditSource) -> None:
    event = m.patient_record(
        "HIS^HOSPITAL",
        patient=m.Patient("PAT-1", "DOE^JANE^M"),
        action=m.Action.UPDATE,
        address="10.0.0.7",
        via="HL7 ADT^A08",
        tenant="hosp-a",
    )
    root = parse(event, source)
    check_event(root, ("110110", "DCM", "Patient Record"), "U", 0)
    assert participants(root)["HIS^HOSPITAL"].get("UserIsRequestor") == "true"
    check_patient(root, "PAT-1", "DOE^JANE^M")


@pytest.mark.parametrize("started", [True, False])
def test_application_activity(started: bool, source: m.AuditSource) -> None:
    root = parse(m.application_activity(started=started, launcher="kho-service"), source)
    ident = check_event(root, ("110100", "DCM", "Application Activity"), "E", 0)
    expected = (
        ("110120", "DCM", "Application Start")
        if started
        else (
            "110121",
            "DCM",
            "Application Stop",
        )
    )
    assert code(ident.find("EventTypeCode")) == expected
    who = participants(root)
    assert role(who["KHO"]) == "110150"  # the application
    assert role(who["kho-service"]) == "110151"  # who launched it


@pytest.mark.parametrize(
    ("success", "logout", "outcome", "type_code"),
    [(True, False, 0, "110122"), (False, False, 4, "110122"), (True, True, 0, "110123")],
)
def test_user_authentication(
    radiologist: Caller, source, success: bool, logout: bool, outcome: int, type_code: str
) -> None:
    event = m.user_authentication(radiologist, success=success, logout=logout)
    root = parse(event, source)
    ident = check_event(root, ("110114", "DCM", "User Authentication"), "E", outcome)
    type_element = ident.find("EventTypeCode")
    assert type_element is not None and type_element.get("csd-code") == type_code
    assert participants(root)["dr.house"].get("UserIsRequestor") == "true"


ALERT_CASES = [
    (m.AlertReason.REFUSED_ASSOCIATION, "110126", 4, "UNKNOWN_AE"),
    (m.AlertReason.TLS_FAILURE, "110126", 8, "KHO"),
    (m.AlertReason.BAD_TOKEN, "110143", 4, "/dicom-web/studies"),
    (m.AlertReason.DENIED_REQUEST, "110132", 4, "/dicom-web/studies/1.2.3"),
    (m.AlertReason.SETTINGS_CHANGE, "110131", 0, "http_port"),
    (m.AlertReason.SECURITY_SETTINGS_CHANGE, "110129", 0, "oidc_issuer"),
    (m.AlertReason.CREDENTIALS_CHANGE, "110137", 0, "/admin/keys/reporting"),
]


@pytest.mark.parametrize(("reason", "type_code", "outcome", "subject"), ALERT_CASES)
def test_security_alert(
    reason: m.AlertReason, type_code: str, outcome: int, subject: str, source: m.AuditSource
) -> None:
    event = m.security_alert(
        reason, user="mallory", address="203.0.113.9", subject=subject, description="why"
    )
    root = parse(event, source)
    ident = check_event(root, ("110113", "DCM", "Security Alert"), "E", outcome)
    type_element = ident.find("EventTypeCode")
    assert type_element is not None and type_element.get("csd-code") == type_code
    assert type_element.get("codeSystemName") == "DCM"
    assert ident.findtext("EventOutcomeDescription") == "why"
    who = participants(root)
    assert who["mallory"].get("NetworkAccessPointID") == "203.0.113.9"
    assert who["KHO"].get("UserIsRequestor") == "false"  # the reporter
    alert_subject = objects(root)[subject]
    id_type = alert_subject.find("ParticipantObjectIDTypeCode")
    assert id_type is not None
    assert id_type.get("csd-code") == ("12" if "/" in subject else "110182")
    detail = alert_subject.find("ParticipantObjectDetail")
    assert detail is not None and base64.b64decode(detail.get("value", "")) == b"why"


def test_study_deleted_and_audit_log_used(radiologist: Caller, source) -> None:
    root = parse(
        m.study_deleted(radiologist, patient=m.Patient("PAT-1"), study=m.Study(STUDY)), source
    )
    check_event(root, ("110105", "DCM", "DICOM Study Deleted"), "D", 0)
    root = parse(m.audit_log_used(radiologist, uri="/admin/audit?patient=PAT-1"), source)
    check_event(root, ("110101", "DCM", "Audit Log Used"), "R", 0)
    log = objects(root)["/admin/audit?patient=PAT-1"]
    assert log.findtext("ParticipantObjectName") == "Security Audit Log"


def all_events(caller: Caller) -> list[m.AuditEvent]:
    patient, study = m.Patient("PAT-1", "DOE^JANE"), m.one_instance(STUDY, CT, f"{STUDY}.9")
    return [
        m.application_activity(started=True),
        m.user_authentication(caller, success=False, description="expired"),
        m.security_alert(m.AlertReason.DENIED_REQUEST, user=caller, subject="/x/y"),
        m.instances_stored(caller, patient=patient, study=study),
        m.instances_sent(caller, patient=patient, study=study, destination="OTHER"),
        m.begin_transferring(caller, patient=patient, study=study),
        m.query(caller, target=FIND, query=b"\x00\x01", transfer_syntax=EXPLICIT_LE),
        m.instances_accessed(caller, patient=patient, study=study),
        m.export(caller, patient=patient, study=study, destination="MEDIA"),
        m.patient_record(caller, patient=patient, action=m.Action.CREATE),
        m.study_deleted(caller, patient=patient, study=study),
        m.audit_log_used(caller, uri="/admin/audit"),
    ]


def test_every_event_survives_its_json_form(radiologist: Caller, source) -> None:
    """The outbox row carries the event as JSON; the journal renders it later."""
    events = all_events(radiologist)
    assert {e.kind for e in events} == set(m.EventKind)
    for event in events:
        stamped = event.stamped(source)
        again = m.AuditEvent.from_json(stamped.to_json())
        assert again == stamped
        assert again.to_xml() == stamped.to_xml()


def test_summary_is_the_compact_searchable_form(radiologist: Caller) -> None:
    event = m.instances_stored(
        radiologist,
        patient=m.Patient("PAT-1"),
        study=m.one_instance(STUDY, CT, f"{STUDY}.1"),
        via="STOW-RS",
    )
    summary: dict[str, Any] = event.summary()
    assert summary["event"] == "instances-transferred"
    assert summary["user"] == "dr.house"
    assert summary["address"] == "192.168.1.50"
    assert summary["tenant"] == "hosp-a"
    assert summary["patients"] == ["PAT-1"]
    assert summary["studies"] == [STUDY]
    assert summary["instances"] == 1
    assert summary["outcome"] == 0
    assert datetime.fromisoformat(summary["time"]).timestamp() == pytest.approx(event.time)


def test_a_future_event_format_is_refused() -> None:
    with pytest.raises(ValueError, match="newer"):
        m.AuditEvent.from_json('{"v": 99, "k": "query"}')


def test_merging_keeps_every_instance_once(modality: Caller) -> None:
    patient = m.Patient("PAT-1")
    first = m.instances_stored(modality, patient=patient, study=m.one_instance(STUDY, CT, "1"))
    second = m.instances_stored(modality, patient=patient, study=m.one_instance(STUDY, CT, "2"))
    third = m.instances_stored(modality, patient=patient, study=m.one_instance(STUDY, MR, "3"))
    assert first.merge_key() == second.merge_key() == third.merge_key()
    merged = first.merged(second).merged(third).merged(second)
    classes = {s.uid: (s.count, s.instances) for s in merged.studies[0].sop_classes}
    assert classes[CT] == (2, ("1", "2"))  # the second "2" counts once
    assert classes[MR] == (1, ("3",))
    assert merged.time == min(first.time, second.time, third.time)
    other_study = m.instances_stored(modality, patient=patient, study=m.one_instance("9", CT, "4"))
    assert other_study.merge_key() != first.merge_key()
    assert m.query(modality, target=FIND, query=b"").merge_key() is None
