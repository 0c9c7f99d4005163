"""Audit events and their DICOM Audit Message form (PS3.15 A.5, the IHE ATNA content).

An :class:`AuditEvent` is what happened: which kind of event (its EventID), the action,
the outcome, who took part (active participants), and what it touched (patients, studies,
a query, an alert subject).  It is built by one of the factories below from a request's
:class:`~kho.access.callers.Caller`, travels as compact JSON (the journal's outbox row, so
an ingest commit pays for a ``json.dumps`` and not for XML), and is rendered to the
standard XML (``xml.etree``) when the journal chains it.

The archive itself is the participant every event has; it is added at rendering from the
event's :class:`AuditSource` (set by the AuditLog that records the event), so the factories
need only the caller.

Codes (DCM = DICOM PS3.16, RFC-3881 = the value sets the audit schema inherited):

- EventID: CID 400 (110100 Application Activity ... 110114 User Authentication)
- EventTypeCode: CID 401/403 (110120 Application Start, 110122 Login, 110126 Node
  Authentication, 110132 Use of Restricted Function, ...)
- RoleIDCode: CID 402 (110150 Application, 110152 Destination, 110153 Source, ...)
- ParticipantObjectIDTypeCode: CID 404 (110180 Study Instance UID, 110181 SOP Class UID)
  and RFC-3881 (2 Patient Number, 12 URI)

Element order follows the DICOM schema (PS3.15 A.5.1): SOPClass and Accession are children
of ParticipantObjectIdentification after ParticipantObjectDetail (the form DICOM uses since
it diverged from RFC 3881, which wrapped them in ParticipantObjectDescription).
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import socket
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import IntEnum, StrEnum
from typing import Any

from kho.access.callers import Caller, CallerKind

#: the JSON layout of an event (the outbox row); a reader refuses a newer one
EVENT_FORMAT = 1


@dataclass(frozen=True, slots=True)
class Code:
    """A coded value: (code, coding scheme, meaning) -- ``csd-code``, ``codeSystemName``,
    ``originalText`` in the XML."""

    code: str
    scheme: str
    meaning: str

    def element(self, parent: ET.Element, tag: str) -> ET.Element:
        return ET.SubElement(
            parent,
            tag,
            {"csd-code": self.code, "codeSystemName": self.scheme, "originalText": self.meaning},
        )

    def as_list(self) -> list[str]:
        return [self.code, self.scheme, self.meaning]

    @classmethod
    def from_list(cls, values: list[str]) -> Code:
        return cls(*values)


def _dcm(code: str, meaning: str) -> Code:
    return Code(code, "DCM", meaning)


class EventKind(StrEnum):
    """The event families kho records (the EventID of PS3.15 A.5.3)."""

    APPLICATION_ACTIVITY = "application-activity"
    AUDIT_LOG_USED = "audit-log-used"
    BEGIN_TRANSFERRING = "begin-transferring"
    INSTANCES_ACCESSED = "instances-accessed"
    INSTANCES_TRANSFERRED = "instances-transferred"
    STUDY_DELETED = "study-deleted"
    EXPORT = "export"
    PATIENT_RECORD = "patient-record"
    QUERY = "query"
    SECURITY_ALERT = "security-alert"
    USER_AUTHENTICATION = "user-authentication"


EVENT_IDS: dict[EventKind, Code] = {
    EventKind.APPLICATION_ACTIVITY: _dcm("110100", "Application Activity"),
    EventKind.AUDIT_LOG_USED: _dcm("110101", "Audit Log Used"),
    EventKind.BEGIN_TRANSFERRING: _dcm("110102", "Begin Transferring DICOM Instances"),
    EventKind.INSTANCES_ACCESSED: _dcm("110103", "DICOM Instances Accessed"),
    EventKind.INSTANCES_TRANSFERRED: _dcm("110104", "DICOM Instances Transferred"),
    EventKind.STUDY_DELETED: _dcm("110105", "DICOM Study Deleted"),
    EventKind.EXPORT: _dcm("110106", "Export"),
    EventKind.PATIENT_RECORD: _dcm("110110", "Patient Record"),
    EventKind.QUERY: _dcm("110112", "Query"),
    EventKind.SECURITY_ALERT: _dcm("110113", "Security Alert"),
    EventKind.USER_AUTHENTICATION: _dcm("110114", "User Authentication"),
}


class EventType:
    """EventTypeCode values (CID 401 and 403)."""

    APPLICATION_START = _dcm("110120", "Application Start")
    APPLICATION_STOP = _dcm("110121", "Application Stop")
    LOGIN = _dcm("110122", "Login")
    LOGOUT = _dcm("110123", "Logout")
    NODE_AUTHENTICATION = _dcm("110126", "Node Authentication")
    SECURITY_CONFIGURATION = _dcm("110129", "Security Configuration")
    SOFTWARE_CONFIGURATION = _dcm("110131", "Software Configuration")
    USE_OF_RESTRICTED_FUNCTION = _dcm("110132", "Use of Restricted Function")
    USER_SECURITY_ATTRIBUTES_CHANGED = _dcm("110137", "User security Attributes Changed")
    AUTHENTICATION_DECISION = _dcm("110143", "Authentication Decision")


class Role:
    """RoleIDCode values of active participants (CID 402)."""

    APPLICATION = _dcm("110150", "Application")
    APPLICATION_LAUNCHER = _dcm("110151", "Application Launcher")
    DESTINATION = _dcm("110152", "Destination Role ID")
    SOURCE = _dcm("110153", "Source Role ID")
    DESTINATION_MEDIA = _dcm("110154", "Destination Media")


class ObjectIdType:
    """ParticipantObjectIDTypeCode values."""

    PATIENT_NUMBER = Code("2", "RFC-3881", "Patient Number")
    URI = Code("12", "RFC-3881", "URI")
    STUDY_UID = _dcm("110180", "Study Instance UID")
    SOP_CLASS_UID = _dcm("110181", "SOP Class UID")
    NODE_ID = _dcm("110182", "Node ID")


class Action(StrEnum):
    """EventActionCode."""

    CREATE = "C"
    READ = "R"
    UPDATE = "U"
    DELETE = "D"
    EXECUTE = "E"


class Outcome(IntEnum):
    """EventOutcomeIndicator."""

    SUCCESS = 0
    MINOR_FAILURE = 4  # the action failed, may be retried (a wrong password)
    SERIOUS_FAILURE = 8  # the action was ended (an association or handshake refused)
    MAJOR_FAILURE = 12  # the function is unavailable


class AlertReason(StrEnum):
    """Why a Security Alert was raised; each maps to one EventTypeCode and an outcome."""

    REFUSED_ASSOCIATION = "refused-association"  # an AE not in the registry, or refused
    TLS_FAILURE = "tls-failure"  # a handshake that failed (protocol, certificate)
    BAD_TOKEN = "bad-token"  # a bearer token or API key that does not hold
    DENIED_REQUEST = "denied-request"  # a known caller asked beyond its grants
    SETTINGS_CHANGE = "settings-change"  # the archive's settings changed
    SECURITY_SETTINGS_CHANGE = "security-settings-change"  # TLS, OIDC, AE registry changed
    CREDENTIALS_CHANGE = "credentials-change"  # API keys, share links made or revoked


ALERTS: dict[AlertReason, tuple[Code, Outcome]] = {
    AlertReason.REFUSED_ASSOCIATION: (EventType.NODE_AUTHENTICATION, Outcome.MINOR_FAILURE),
    AlertReason.TLS_FAILURE: (EventType.NODE_AUTHENTICATION, Outcome.SERIOUS_FAILURE),
    AlertReason.BAD_TOKEN: (EventType.AUTHENTICATION_DECISION, Outcome.MINOR_FAILURE),
    AlertReason.DENIED_REQUEST: (EventType.USE_OF_RESTRICTED_FUNCTION, Outcome.MINOR_FAILURE),
    AlertReason.SETTINGS_CHANGE: (EventType.SOFTWARE_CONFIGURATION, Outcome.SUCCESS),
    AlertReason.SECURITY_SETTINGS_CHANGE: (EventType.SECURITY_CONFIGURATION, Outcome.SUCCESS),
    AlertReason.CREDENTIALS_CHANGE: (EventType.USER_SECURITY_ATTRIBUTES_CHANGED, Outcome.SUCCESS),
}

_CALLER_KINDS = {
    CallerKind.TOKEN: "OIDC user",
    CallerKind.API_KEY: "API key",
    CallerKind.DICOM: "AE title",
    CallerKind.OPEN: "unauthenticated local user",
    CallerKind.SHARE: "share link",
    CallerKind.LAUNCH: "EMR launch",
}

#: the EventIDs a query of the journal may name, by their short names
KINDS_BY_NAME = {kind.value: kind for kind in EventKind}


# --- the parts of an event ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Participant:
    """An active participant: a person, application or DICOM AE (the archive's own entry
    comes from the AuditSource)."""

    user_id: str
    requestor: bool = False
    role: Code | None = None
    #: NetworkAccessPointID: the IP address (or host name, or URI) it acted from
    address: str = ""
    alternative_user_id: str = ""
    user_name: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.user_id, "req": self.requestor}
        if self.role:
            out["role"] = self.role.as_list()
        for key, value in (
            ("addr", self.address),
            ("alt", self.alternative_user_id),
            ("name", self.user_name),
        ):
            if value:
                out[key] = value
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Participant:
        role = data.get("role")
        return cls(
            data["id"],
            bool(data.get("req")),
            Code.from_list(role) if role else None,
            data.get("addr", ""),
            data.get("alt", ""),
            data.get("name", ""),
        )


@dataclass(frozen=True, slots=True)
class SopClassCount:
    """The instances of one SOP class in a study: how many, and (optionally) which."""

    uid: str
    count: int
    instances: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Study:
    """A study the event touched."""

    uid: str
    sop_classes: tuple[SopClassCount, ...] = ()
    accession: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"uid": self.uid}
        if self.sop_classes:
            out["sop"] = [[s.uid, s.count, list(s.instances)] for s in self.sop_classes]
        if self.accession:
            out["acc"] = self.accession
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Study:
        classes = tuple(SopClassCount(u, int(n), tuple(i)) for u, n, i in data.get("sop", ()))
        return cls(data["uid"], classes, data.get("acc", ""))

    def merged(self, other: Study) -> Study:
        """This study's instances and ``other``'s, counted per SOP class (an instance
        named by both counts once)."""
        unnamed: dict[str, int] = {}  # counts given without the instances' UIDs
        named: dict[str, dict[str, None]] = {}  # ordered sets of instance UIDs
        for sop in (*self.sop_classes, *other.sop_classes):
            uids = named.setdefault(sop.uid, {})
            uids.update(dict.fromkeys(sop.instances))
            unnamed[sop.uid] = unnamed.get(sop.uid, 0) + (0 if sop.instances else sop.count)
        classes = tuple(
            SopClassCount(uid, unnamed[uid] + len(uids), tuple(uids)) for uid, uids in named.items()
        )
        return Study(self.uid, classes, self.accession or other.accession)


def one_instance(study_uid: str, sop_class_uid: str, sop_instance_uid: str) -> Study:
    """A study with one instance (what one C-STORE or one STOW part touches)."""
    return Study(study_uid, (SopClassCount(sop_class_uid, 1, (sop_instance_uid,)),))


@dataclass(frozen=True, slots=True)
class Patient:
    id: str
    name: str = ""


@dataclass(frozen=True, slots=True)
class QueryObject:
    """What was asked: a DIMSE C-FIND identifier (the dataset bytes as received, with its
    SOP class and transfer syntax) or a QIDO-RS request (its path and query string)."""

    #: the C-FIND SOP Class UID, or the QIDO-RS path
    target: str
    #: the identifier's bytes, or the query string (UTF-8)
    query: bytes
    #: the identifier's transfer syntax (DIMSE only)
    transfer_syntax: str = ""

    @property
    def is_dimse(self) -> bool:
        return not self.target.startswith("/")


@dataclass(frozen=True, slots=True)
class OtherObject:
    """Another participant object: an alert's subject, an export's media, the audit log."""

    id: str
    id_type: Code
    type_code: int = 2  # system object
    role: int = 13  # security resource
    name: str = ""
    #: ParticipantObjectDetail (type, text); the text is base64-encoded in the XML
    details: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "idt": self.id_type.as_list(),
            "t": self.type_code,
            "r": self.role,
            "name": self.name,
            "det": [list(d) for d in self.details],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> OtherObject:
        return cls(
            data["id"],
            Code.from_list(data["idt"]),
            int(data["t"]),
            int(data["r"]),
            data.get("name", ""),
            tuple((str(a), str(b)) for a, b in data.get("det", ())),
        )


@dataclass(frozen=True, slots=True)
class AuditSource:
    """The archive as reporter (AuditSourceIdentification) and as participant."""

    #: AuditSourceID: which kho installation reports
    source_id: str
    #: AuditEnterpriseSiteID: the hospital (tenant) or organisation
    site_id: str = ""
    #: the archive's AE title (its UserID as a DICOM participant)
    ae_title: str = "KHO"
    #: the host it runs on (its NetworkAccessPointID)
    host: str = ""
    #: the process (AlternativeUserID)
    process_id: str = ""

    @classmethod
    def here(cls, ae_title: str = "KHO", site_id: str = "") -> AuditSource:
        host = socket.gethostname()
        return cls(f"kho@{host}", site_id, ae_title, host, str(os.getpid()))

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.source_id,
            "site": self.site_id,
            "ae": self.ae_title,
            "host": self.host,
            "pid": self.process_id,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AuditSource:
        return cls(data["id"], data["site"], data["ae"], data["host"], data["pid"])


# --- the event ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One audited event (see the module's docstring)."""

    kind: EventKind
    action: Action
    outcome: Outcome
    #: when it happened (seconds since the epoch)
    time: float
    #: the participants other than the archive
    participants: tuple[Participant, ...]
    event_type: Code | None = None
    #: EventOutcomeDescription: why it failed, or what changed
    description: str = ""
    patients: tuple[Patient, ...] = ()
    studies: tuple[Study, ...] = ()
    query: QueryObject | None = None
    others: tuple[OtherObject, ...] = ()
    #: the hospital whose data (or door) it concerns
    tenant: str = ""
    #: the archive's role in it (None: it only reports)
    local_role: Code | None = None
    local_requestor: bool = False
    #: how it came (C-STORE, STOW-RS, C-MOVE, WADO-RS ...): kept in the journal and search
    via: str = ""
    #: the reporter; set by the AuditLog that records the event
    source: AuditSource | None = None

    # --- who acted ------------------------------------------------------------------------

    @property
    def requestor(self) -> Participant | None:
        for participant in self.participants:
            if participant.requestor:
                return participant
        return self.participants[0] if self.participants else None

    @property
    def user(self) -> str:
        who = self.requestor
        return who.user_id if who else ""

    @property
    def address(self) -> str:
        who = self.requestor
        return who.address if who else ""

    def stamped(self, source: AuditSource) -> AuditEvent:
        """This event reported by ``source`` (kept if it already names one)."""
        return self if self.source is not None else replace(self, source=source)

    # --- the compact form -------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """A compact, JSON-ready dict of the fields search results show."""
        return {
            "time": _iso(self.time),
            "event": self.kind.value,
            "type": self.event_type.meaning if self.event_type else "",
            "action": self.action.value,
            "outcome": int(self.outcome),
            "user": self.user,
            "address": self.address,
            "tenant": self.tenant,
            "via": self.via,
            "patients": [p.id for p in self.patients],
            "studies": [s.uid for s in self.studies],
            "instances": sum(c.count for s in self.studies for c in s.sop_classes),
            "description": self.description,
        }

    def to_json(self) -> str:
        data: dict[str, Any] = {
            "v": EVENT_FORMAT,
            "k": self.kind.value,
            "a": self.action.value,
            "o": int(self.outcome),
            "t": self.time,
            "p": [p.to_json() for p in self.participants],
        }
        if self.event_type:
            data["et"] = self.event_type.as_list()
        if self.description:
            data["d"] = self.description
        if self.patients:
            data["pt"] = [[p.id, p.name] for p in self.patients]
        if self.studies:
            data["st"] = [s.to_json() for s in self.studies]
        if self.query is not None:
            q = self.query
            data["q"] = [q.target, base64.b64encode(q.query).decode(), q.transfer_syntax]
        if self.others:
            data["ot"] = [o.to_json() for o in self.others]
        if self.tenant:
            data["tn"] = self.tenant
        if self.local_role:
            data["lr"] = self.local_role.as_list()
        if self.local_requestor:
            data["lq"] = True
        if self.via:
            data["via"] = self.via
        if self.source is not None:
            data["src"] = self.source.to_json()
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> AuditEvent:
        data = json.loads(text)
        if int(data.get("v", 0)) > EVENT_FORMAT:
            raise ValueError(f"audit event format {data.get('v')} is newer than this kho")
        query = data.get("q")
        return cls(
            kind=EventKind(data["k"]),
            action=Action(data["a"]),
            outcome=Outcome(int(data["o"])),
            time=float(data["t"]),
            participants=tuple(Participant.from_json(p) for p in data.get("p", ())),
            event_type=Code.from_list(data["et"]) if data.get("et") else None,
            description=data.get("d", ""),
            patients=tuple(Patient(i, n) for i, n in data.get("pt", ())),
            studies=tuple(Study.from_json(s) for s in data.get("st", ())),
            query=(QueryObject(query[0], base64.b64decode(query[1]), query[2]) if query else None),
            others=tuple(OtherObject.from_json(o) for o in data.get("ot", ())),
            tenant=data.get("tn", ""),
            local_role=Code.from_list(data["lr"]) if data.get("lr") else None,
            local_requestor=bool(data.get("lq")),
            via=data.get("via", ""),
            source=AuditSource.from_json(data["src"]) if data.get("src") else None,
        )

    # --- coalescing instance events into one record ------------------------------------------

    def merge_key(self) -> tuple[Any, ...] | None:
        """Events with the same key differ only in their instances (one C-STORE each of a
        study sent by one peer): the journal may fold them into one record.  None: never."""
        if self.kind not in (EventKind.INSTANCES_TRANSFERRED, EventKind.INSTANCES_ACCESSED):
            return None
        if len(self.studies) != 1:
            return None
        return (
            self.kind,
            self.action,
            self.outcome,
            self.participants,
            self.event_type,
            self.description,
            self.patients,
            self.studies[0].uid,
            self.tenant,
            self.local_role,
            self.local_requestor,
            self.via,
            self.source,
        )

    def merged(self, other: AuditEvent) -> AuditEvent:
        """This event and ``other`` (same merge_key) as one: the earlier time, the
        instances of both."""
        return replace(
            self,
            time=min(self.time, other.time),
            studies=(self.studies[0].merged(other.studies[0]),),
        )

    # --- the DICOM Audit Message -------------------------------------------------------------

    def to_element(self) -> ET.Element:
        source = self.source or AuditSource.here()
        root = ET.Element("AuditMessage")
        ident = ET.SubElement(
            root,
            "EventIdentification",
            {
                "EventActionCode": self.action.value,
                "EventDateTime": _iso(self.time),
                "EventOutcomeIndicator": str(int(self.outcome)),
            },
        )
        EVENT_IDS[self.kind].element(ident, "EventID")
        if self.event_type:
            self.event_type.element(ident, "EventTypeCode")
        if self.description:
            ET.SubElement(ident, "EventOutcomeDescription").text = self.description
        for participant in self.participants:
            _participant_element(root, participant)
        local = Participant(
            source.ae_title,
            self.local_requestor,
            self.local_role,
            source.host,
            source.process_id,
            source.source_id,
        )
        _participant_element(root, local)
        attrs = {"AuditSourceID": source.source_id}
        if source.site_id:
            attrs["AuditEnterpriseSiteID"] = source.site_id
        audit_source = ET.SubElement(root, "AuditSourceIdentification", attrs)
        ET.SubElement(audit_source, "AuditSourceTypeCode", {"csd-code": "4"})
        for patient in self.patients:
            element = _object_element(root, patient.id, 1, 1, ObjectIdType.PATIENT_NUMBER)
            if patient.name:
                ET.SubElement(element, "ParticipantObjectName").text = patient.name
        for study in self.studies:
            element = _object_element(root, study.uid, 2, 3, ObjectIdType.STUDY_UID)
            for sop in study.sop_classes:
                sop_element = ET.SubElement(
                    element, "SOPClass", {"UID": sop.uid, "NumberOfInstances": str(sop.count)}
                )
                for uid in sop.instances:
                    ET.SubElement(sop_element, "Instance", {"UID": uid})
            if study.accession:
                ET.SubElement(element, "Accession", {"Number": study.accession})
        if self.query is not None:
            q = self.query
            id_type = ObjectIdType.SOP_CLASS_UID if q.is_dimse else ObjectIdType.URI
            element = _object_element(root, q.target, 2, 3 if q.is_dimse else 24, id_type)
            ET.SubElement(element, "ParticipantObjectQuery").text = _b64(q.query)
            if q.transfer_syntax:
                ET.SubElement(
                    element,
                    "ParticipantObjectDetail",
                    {"type": "TransferSyntax", "value": _b64(q.transfer_syntax.encode())},
                )
        for other in self.others:
            element = _object_element(root, other.id, other.type_code, other.role, other.id_type)
            if other.name:
                ET.SubElement(element, "ParticipantObjectName").text = other.name
            for kind, text in other.details:
                ET.SubElement(
                    element,
                    "ParticipantObjectDetail",
                    {"type": kind, "value": _b64(text.encode())},
                )
        return root

    def to_xml(self) -> str:
        """The DICOM Audit Message (no XML declaration: syslog and the journal add what
        they need)."""
        return ET.tostring(self.to_element(), encoding="unicode")


def _iso(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="microseconds")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _access_point_type(address: str) -> str:
    """NetworkAccessPointTypeCode: 2 an IP address, 5 a URI, 1 a machine name."""
    try:
        ipaddress.ip_address(address.strip("[]"))
        return "2"
    except ValueError:
        return "5" if "://" in address else "1"


def _participant_element(root: ET.Element, p: Participant) -> None:
    attrs = {"UserID": p.user_id or "-", "UserIsRequestor": "true" if p.requestor else "false"}
    if p.alternative_user_id:
        attrs["AlternativeUserID"] = p.alternative_user_id
    if p.user_name:
        attrs["UserName"] = p.user_name
    if p.address:
        attrs["NetworkAccessPointID"] = p.address
        attrs["NetworkAccessPointTypeCode"] = _access_point_type(p.address)
    element = ET.SubElement(root, "ActiveParticipant", attrs)
    if p.role:
        p.role.element(element, "RoleIDCode")


def _object_element(
    root: ET.Element, object_id: str, type_code: int, role: int, id_type: Code
) -> ET.Element:
    element = ET.SubElement(
        root,
        "ParticipantObjectIdentification",
        {
            "ParticipantObjectID": object_id,
            "ParticipantObjectTypeCode": str(type_code),
            "ParticipantObjectTypeCodeRole": str(role),
        },
    )
    id_type.element(element, "ParticipantObjectIDTypeCode")
    return element


# --- the events kho records: one factory each --------------------------------------------------


def caller_participant(
    caller: Caller, *, role: Code | None = None, requestor: bool = True
) -> Participant:
    """The active participant a request's caller is."""
    return Participant(
        caller.name or caller.kind.value,
        requestor,
        role,
        caller.address,
        user_name=_CALLER_KINDS.get(caller.kind, caller.kind.value),
    )


def _who(caller: Caller | str, address: str, role: Code | None = None) -> Participant:
    if isinstance(caller, Caller):
        return caller_participant(caller, role=role)
    return Participant(caller or "-", True, role, address)


def _tenant(caller: Caller | str, tenant: str | None) -> str:
    if tenant is not None:
        return tenant
    return caller.home_tenant if isinstance(caller, Caller) else ""


def _now(when: float | None) -> float:
    return time.time() if when is None else when


def application_activity(
    *, started: bool, launcher: str = "", when: float | None = None, tenant: str = ""
) -> AuditEvent:
    """Application Activity (A.5.3.1): the archive started or stopped; ``launcher`` is who
    started it (the operating-system user), if known."""
    participants = (Participant(launcher, True, Role.APPLICATION_LAUNCHER),) if launcher else ()
    return AuditEvent(
        EventKind.APPLICATION_ACTIVITY,
        Action.EXECUTE,
        Outcome.SUCCESS,
        _now(when),
        participants,
        EventType.APPLICATION_START if started else EventType.APPLICATION_STOP,
        tenant=tenant,
        local_role=Role.APPLICATION,
    )


def user_authentication(
    user: Caller | str,
    *,
    success: bool,
    address: str = "",
    logout: bool = False,
    description: str = "",
    tenant: str | None = None,
    when: float | None = None,
) -> AuditEvent:
    """User Authentication (A.5.3.13): a login (a token or key that held, or did not) or a
    logout.  A failure names the user it claimed to be, if any."""
    return AuditEvent(
        EventKind.USER_AUTHENTICATION,
        Action.EXECUTE,
        Outcome.SUCCESS if success else Outcome.MINOR_FAILURE,
        _now(when),
        (_who(user, address),),
        EventType.LOGOUT if logout else EventType.LOGIN,
        description,
        tenant=_tenant(user, tenant),
    )


def security_alert(
    reason: AlertReason,
    *,
    user: Caller | str = "",
    address: str = "",
    subject: str = "",
    description: str = "",
    outcome: Outcome | None = None,
    tenant: str | None = None,
    when: float | None = None,
) -> AuditEvent:
    """Security Alert (A.5.3.11).  ``user``: who acted (the caller, the claimed AE title,
    or empty when unknown); ``subject``: what the alert is about (the request's URL, the
    called AE title, the changed setting); ``description``: why, in words."""
    event_type, default_outcome = ALERTS[reason]
    participants = (_who(user, address),) if (user or address) else ()
    others: tuple[OtherObject, ...] = ()
    if subject:
        id_type = ObjectIdType.URI if "/" in subject else ObjectIdType.NODE_ID
        details = (("Alert Description", description),) if description else ()
        others = (OtherObject(subject, id_type, 2, 13, details=details),)
    return AuditEvent(
        EventKind.SECURITY_ALERT,
        Action.EXECUTE,
        default_outcome if outcome is None else outcome,
        _now(when),
        participants,
        event_type,
        description or reason.value,
        others=others,
        tenant=_tenant(user, tenant),
        via=reason.value,
    )


def instances_stored(
    caller: Caller,
    *,
    patient: Patient,
    study: Study,
    via: str = "C-STORE",
    updated: bool = False,
    outcome: Outcome = Outcome.SUCCESS,
    description: str = "",
    tenant: str | None = None,
    when: float | None = None,
) -> AuditEvent:
    """DICOM Instances Transferred (A.5.3.7), received: ``caller`` sent ``study``'s
    instances to the archive (C-STORE, STOW-RS); ``updated``: they replaced stored ones."""
    return AuditEvent(
        EventKind.INSTANCES_TRANSFERRED,
        Action.UPDATE if updated else Action.CREATE,
        outcome,
        _now(when),
        (caller_participant(caller, role=Role.SOURCE),),
        description=description,
        patients=(patient,),
        studies=(study,),
        tenant=_tenant(caller, tenant),
        local_role=Role.DESTINATION,
        via=via,
    )


def _sent(
    kind: EventKind,
    action: Action,
    caller: Caller,
    destination: str,
    destination_address: str,
    patient: Patient,
    study: Study,
    via: str,
    outcome: Outcome,
    description: str,
    tenant: str | None,
    when: float | None,
) -> AuditEvent:
    if destination and destination != caller.name:  # C-MOVE: a third party receives
        participants: tuple[Participant, ...] = (
            caller_participant(caller),
            Participant(destination, False, Role.DESTINATION, destination_address),
        )
    else:  # C-GET, WADO: the caller receives
        participants = (caller_participant(caller, role=Role.DESTINATION),)
    return AuditEvent(
        kind,
        action,
        outcome,
        _now(when),
        participants,
        description=description,
        patients=(patient,),
        studies=(study,),
        tenant=_tenant(caller, tenant),
        local_role=Role.SOURCE,
        via=via,
    )


def instances_sent(
    caller: Caller,
    *,
    patient: Patient,
    study: Study,
    destination: str = "",
    destination_address: str = "",
    via: str = "C-GET",
    outcome: Outcome = Outcome.SUCCESS,
    description: str = "",
    tenant: str | None = None,
    when: float | None = None,
) -> AuditEvent:
    """DICOM Instances Transferred (A.5.3.7), sent: the archive sent ``study``'s instances
    to ``destination`` (a C-MOVE's move destination; empty: the caller itself, C-GET or
    WADO-RS)."""
    return _sent(
        EventKind.INSTANCES_TRANSFERRED,
        Action.READ,
        caller,
        destination,
        destination_address,
        patient,
        study,
        via,
        outcome,
        description,
        tenant,
        when,
    )


def begin_transferring(
    caller: Caller,
    *,
    patient: Patient,
    study: Study,
    destination: str = "",
    destination_address: str = "",
    via: str = "C-MOVE",
    outcome: Outcome = Outcome.SUCCESS,
    description: str = "",
    tenant: str | None = None,
    when: float | None = None,
) -> AuditEvent:
    """Begin Transferring DICOM Instances (A.5.3.3): a retrieval of ``study`` started."""
    return _sent(
        EventKind.BEGIN_TRANSFERRING,
        Action.EXECUTE,
        caller,
        destination,
        destination_address,
        patient,
        study,
        via,
        outcome,
        description,
        tenant,
        when,
    )


def query(
    caller: Caller,
    *,
    target: str,
    query: bytes | str,
    transfer_syntax: str = "",
    via: str = "",
    outcome: Outcome = Outcome.SUCCESS,
    description: str = "",
    tenant: str | None = None,
    when: float | None = None,
) -> AuditEvent:
    """Query (A.5.3.10): a C-FIND (``target`` its SOP Class UID, ``query`` the identifier
    as received, ``transfer_syntax`` its syntax) or a QIDO-RS search (``target`` the path,
    ``query`` the query string).  The query goes base64 into ParticipantObjectQuery."""
    data = query.encode() if isinstance(query, str) else bytes(query)
    return AuditEvent(
        EventKind.QUERY,
        Action.EXECUTE,
        outcome,
        _now(when),
        (caller_participant(caller, role=Role.SOURCE),),
        description=description,
        query=QueryObject(target, data, transfer_syntax),
        tenant=_tenant(caller, tenant),
        local_role=Role.DESTINATION,
        via=via or ("C-FIND" if not target.startswith("/") else "QIDO-RS"),
    )


def instances_accessed(
    caller: Caller,
    *,
    patient: Patient,
    study: Study,
    action: Action = Action.READ,
    via: str = "WADO-RS",
    outcome: Outcome = Outcome.SUCCESS,
    description: str = "",
    tenant: str | None = None,
    when: float | None = None,
) -> AuditEvent:
    """DICOM Instances Accessed (A.5.3.5): ``caller`` read (viewed metadata, frames,
    rendered images, thumbnails of) or changed ``study``."""
    return AuditEvent(
        EventKind.INSTANCES_ACCESSED,
        action,
        outcome,
        _now(when),
        (caller_participant(caller),),
        description=description,
        patients=(patient,),
        studies=(study,),
        tenant=_tenant(caller, tenant),
        via=via,
    )


def export(
    caller: Caller,
    *,
    patient: Patient,
    study: Study,
    destination: str,
    destination_address: str = "",
    via: str = "export",
    outcome: Outcome = Outcome.SUCCESS,
    description: str = "",
    tenant: str | None = None,
    when: float | None = None,
) -> AuditEvent:
    """Export (A.5.3.6): ``study`` left the archive's control (a forwarding rule, a
    download, media); ``destination`` names where it went."""
    return AuditEvent(
        EventKind.EXPORT,
        Action.READ,
        outcome,
        _now(when),
        (
            caller_participant(caller),
            Participant(destination, False, Role.DESTINATION_MEDIA, destination_address),
        ),
        description=description,
        patients=(patient,),
        studies=(study,),
        tenant=_tenant(caller, tenant),
        local_role=Role.SOURCE,
        via=via,
    )


def patient_record(
    caller: Caller | str,
    *,
    patient: Patient,
    action: Action,
    address: str = "",
    via: str = "",
    outcome: Outcome = Outcome.SUCCESS,
    description: str = "",
    tenant: str | None = None,
    when: float | None = None,
) -> AuditEvent:
    """Patient Record (A.5.3.9): a patient's demographics were created, read, updated or
    deleted (an HL7 ADT update, a merge, an admin's edit)."""
    return AuditEvent(
        EventKind.PATIENT_RECORD,
        action,
        outcome,
        _now(when),
        (_who(caller, address),),
        description=description,
        patients=(patient,),
        tenant=_tenant(caller, tenant),
        via=via,
    )


def study_deleted(
    caller: Caller,
    *,
    patient: Patient,
    study: Study,
    outcome: Outcome = Outcome.SUCCESS,
    description: str = "",
    tenant: str | None = None,
    when: float | None = None,
) -> AuditEvent:
    """DICOM Study Deleted (A.5.3.4)."""
    return AuditEvent(
        EventKind.STUDY_DELETED,
        Action.DELETE,
        outcome,
        _now(when),
        (caller_participant(caller),),
        description=description,
        patients=(patient,),
        studies=(study,),
        tenant=_tenant(caller, tenant),
    )


def audit_log_used(
    caller: Caller,
    *,
    uri: str,
    description: str = "",
    tenant: str | None = None,
    when: float | None = None,
) -> AuditEvent:
    """Audit Log Used (A.5.3.2): someone read the audit trail (``kho audit search``, the
    admin route)."""
    return AuditEvent(
        EventKind.AUDIT_LOG_USED,
        Action.READ,
        Outcome.SUCCESS,
        _now(when),
        (caller_participant(caller),),
        description=description,
        others=(OtherObject(uri, ObjectIdType.URI, 2, 13, "Security Audit Log"),),
        tenant=_tenant(caller, tenant),
    )


__all__ = [
    "ALERTS",
    "EVENT_IDS",
    "Action",
    "AlertReason",
    "AuditEvent",
    "AuditSource",
    "Code",
    "EventKind",
    "EventType",
    "ObjectIdType",
    "OtherObject",
    "Outcome",
    "Participant",
    "Patient",
    "QueryObject",
    "Role",
    "SopClassCount",
    "Study",
    "application_activity",
    "audit_log_used",
    "begin_transferring",
    "caller_participant",
    "export",
    "instances_accessed",
    "instances_sent",
    "instances_stored",
    "one_instance",
    "patient_record",
    "query",
    "security_alert",
    "study_deleted",
    "user_authentication",
]
