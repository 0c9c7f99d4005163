"""What each HL7 message type does: a registry from message type and trigger event to a
handler that reads the segments into the services' terms and calls them
(kho.archive.patients, kho.archive.worklist).  Handlers run inside the message's catalog
transaction (kho.archive.patients.journal.run): a failure leaves nothing applied.

Patient identity (PID-3, repeating CX): the repetition whose identifier type (CX-5) is a
national person identifier (NI, NNVNM, CZ) or whose assigning authority (CX-4) is the
citizen ID issuer is the citizen ID; the hospital's own Patient ID is the first other
repetition of type PI, MR or PT, else the first other one; the rest are kept as other
identifiers.  The local ID is filed under the Issuer of Patient ID the settings give
(``hl7_patient_id_issuer``, default none: what modalities send), so images of the
patient land on the same catalog patient.

Orders: each ORC starts an order group (with its OBR, TQ1, IPC, ZDS); ORC-1 says what to
do (NW, XO, XX, SC: write the steps; CA, OC, CR: cancel; DC, OD, DR: discontinue).  One
step per IPC segment (OMI^O23), else one from the OBR (ORM^O01, the IHE fields OBR-18
accession, OBR-19 requested procedure ID, OBR-20 step ID, OBR-24 modality, ZDS-1 study
UID).  What the order leaves out is derived: the accession number from the filler or
placer order number, the IDs from it, the Study Instance UID from the order (a UUID-derived
2.25 UID, the same for every resend), the start from the message time.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kho.archive import patients, worklist
from kho.archive.catalog import Catalog
from kho.archive.patients import PatientChange, PatientRecord
from kho.hl7.message import (
    REQUIRED_FIELD_MISSING,
    TABLE_VALUE_NOT_FOUND,
    UNSUPPORTED_EVENT_CODE,
    Message,
    MessageError,
    repetitions,
    value,
)

#: identifier types (HL7 table 0203) of a national person identifier
CITIZEN_TYPES = frozenset({"NI", "NNVNM", "CZ", "NN"})
#: identifier types of the hospital's own patient number
LOCAL_TYPES = ("PI", "MR", "PT")
NULL = '""'  # HL7: delete the value


@dataclass(frozen=True, slots=True)
class Context:
    """Where and how a message is applied."""

    catalog: Catalog
    #: Issuer of Patient ID of citizen IDs (settings.citizen_id_issuer)
    citizen_issuer: str
    #: Issuer of Patient ID the HIS's local patient IDs are filed under
    local_issuer: str


#: what a handler reports: the patients it changed (for the audit trail)
Handler = Callable[[Message, Context], list[PatientChange]]
HANDLERS: dict[tuple[str, str], Handler] = {}


def handles(message_type: str, *triggers: str) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        for trigger in triggers:
            HANDLERS[(message_type, trigger)] = handler
        return handler

    return register


def handler_for(message_type: str, trigger: str) -> Handler:
    """The handler of a message type; MessageError (AR) for a type kho does not take."""
    found = HANDLERS.get((message_type.upper(), trigger.upper()))
    if found is not None:
        return found
    known = {t for t, _ in HANDLERS}
    if message_type.upper() in known:
        raise MessageError(
            f"unsupported trigger event {message_type}^{trigger}",
            "AR",
            UNSUPPORTED_EVENT_CODE,
            "MSH^1^9",
        )
    raise MessageError(f"unsupported message type {message_type}", "AR", location="MSH^1^9")


# --- values ----------------------------------------------------------------------------


def _given(text: str) -> str | None:
    """A field's value for an update: None when absent (keep), "" for HL7's null."""
    if text == "":
        return None
    return "" if text == NULL else text


def person_name(segment: Any, field: int, repetition: int = 1) -> str:
    """An XPN (or the name part of XCN/CNN, ``offset`` 1) as a DICOM PN:
    family^given^middle^prefix^suffix, empty trailing components dropped."""
    family = value(segment, field, repetition, 1, 1)
    given = value(segment, field, repetition, 2)
    middle = value(segment, field, repetition, 3)
    suffix = value(segment, field, repetition, 4)
    prefix = value(segment, field, repetition, 5)
    return "^".join([family, given, middle, prefix, suffix]).rstrip("^")


def _doctor(segment: Any, field: int) -> str:
    """An XCN (id^family^given^middle^suffix^prefix) as a DICOM PN."""
    if segment is None:
        return ""
    parts = [value(segment, field, 1, n) for n in (2, 3, 4, 6, 5)]
    return "^".join(parts).rstrip("^")


def _pid_name(pid: Any) -> str | None:
    count = repetitions(pid, 5)
    if count == 0:
        return None
    chosen = 1
    for rep in range(1, count + 1):
        if value(pid, 5, rep, 7).upper() == "L":  # the legal name
            chosen = rep
            break
    if value(pid, 5, chosen, 1) == NULL:
        return ""
    return person_name(pid, 5, chosen)


def _sex(text: str) -> str | None:
    given = _given(text.upper())
    if given is None or given in ("M", "F", "O", ""):
        return given
    if given in ("U", "A", "N"):  # unknown, ambiguous, not applicable
        return ""
    raise patients.RecordError(f"unknown administrative sex {given[:8]!r}", "sex")


def _date(text: str) -> str | None:
    given = _given(text)
    return given[:8] if given else given


def identifiers(
    segment: Any, field: int, context: Context
) -> tuple[str, str | None, list[tuple[str, str]]]:
    """(local Patient ID, citizen ID or None, other (identifier, issuer)) of a CX list."""
    local: list[tuple[str, str]] = []  # (id, type)
    citizen: str | None = None
    others: list[tuple[str, str]] = []
    for rep in range(1, repetitions(segment, field) + 1):
        identifier = value(segment, field, rep, 1)
        if not identifier or identifier == NULL:
            continue
        authority = value(segment, field, rep, 4, 1)
        kind = value(segment, field, rep, 5).upper()
        if kind in CITIZEN_TYPES or (
            authority and authority.casefold() == context.citizen_issuer.casefold()
        ):
            citizen = identifier
        else:
            local.append((identifier, kind))
            others.append((identifier, authority))
    if not local:
        return "", citizen, []
    chosen = next((i for i, kind in local if kind in LOCAL_TYPES), local[0][0])
    return chosen, citizen, [(i, a) for i, a in others if i != chosen]


def patient_record(pid: Any, context: Context) -> PatientRecord:
    if pid is None:
        raise MessageError("no PID segment", "AE", REQUIRED_FIELD_MISSING, "PID")
    local, citizen, others = identifiers(pid, 3, context)
    if not local:
        raise MessageError(
            "no patient identifier of the hospital in PID-3",
            "AE",
            REQUIRED_FIELD_MISSING,
            "PID^1^3",
        )
    return PatientRecord(
        local,
        context.local_issuer,
        name=_pid_name(pid),
        birth_date=_date(value(pid, 7)),
        sex=_sex(value(pid, 8)),
        citizen_id=citizen,
        other_ids=tuple(others),
    )


# --- ADT -----------------------------------------------------------------------------


@handles("ADT", "A01", "A04", "A05", "A08", "A28", "A31")
def register_patient(message: Message, context: Context) -> list[PatientChange]:
    """Admit, register, pre-admit, update, add or update person: the patient as PID says."""
    record = patient_record(message.first("PID"), context)
    return [patients.register(context.catalog, record, citizen_issuer=context.citizen_issuer)]


def _prior(mrg: Any, context: Context) -> str:
    if mrg is None:
        raise MessageError("no MRG segment", "AE", REQUIRED_FIELD_MISSING, "MRG")
    local, _citizen, _others = identifiers(mrg, 1, context)
    if not local:
        raise MessageError(
            "no prior patient identifier in MRG-1", "AE", REQUIRED_FIELD_MISSING, "MRG^1^1"
        )
    return local


def _pairs(message: Message) -> list[tuple[Any, Any]]:
    """The PID, MRG pairs of a merge message (A40 may repeat its patient group)."""
    pairs: list[tuple[Any, Any]] = []
    pid = None
    for segment in message.segments():
        name = str(segment[0])
        if name == "PID":
            pid = segment
        elif name == "MRG":
            pairs.append((pid, segment))
            pid = None
    return pairs or [(message.first("PID"), None)]


@handles("ADT", "A40")
def merge_patients(message: Message, context: Context) -> list[PatientChange]:
    """Merge patient (patient identifier list): MRG-1's patient into PID-3's."""
    changes = []
    for pid, mrg in _pairs(message):
        survivor = patient_record(pid, context)
        merged = _prior(mrg, context)
        changes.append(
            patients.merge(
                context.catalog,
                survivor,
                merged,
                context.local_issuer,
                citizen_issuer=context.citizen_issuer,
            )
        )
    return changes


@handles("ADT", "A47")
def change_identifier(message: Message, context: Context) -> list[PatientChange]:
    """Change patient identifier list: MRG-1's ID becomes PID-3's."""
    changes = []
    for pid, mrg in _pairs(message):
        record = patient_record(pid, context)
        old = _prior(mrg, context)
        changes.append(
            patients.change_id(
                context.catalog,
                record,
                old,
                context.local_issuer,
                citizen_issuer=context.citizen_issuer,
            )
        )
    return changes


# --- orders ----------------------------------------------------------------------------

_SCHEDULE = frozenset({"NW", "XO", "XX", "SN", "NA", "SC"})
_CANCEL = {
    "CA": worklist.CANCELED,
    "OC": worklist.CANCELED,
    "CR": worklist.CANCELED,
    "DC": worklist.DISCONTINUED,
    "OD": worklist.DISCONTINUED,
    "DR": worklist.DISCONTINUED,
}
#: ORC-5 order status (HL7 table 0038) of a status change (SC)
_ORDER_STATUS = {
    "SC": worklist.SCHEDULED,
    "IP": worklist.STARTED,
    "CM": worklist.COMPLETED,
    "CA": worklist.CANCELED,
    "DC": worklist.DISCONTINUED,
}
#: priority (ORC-7.6, TQ1-9) -> Requested Procedure Priority
_PRIORITY = {"S": "STAT", "A": "HIGH", "P": "HIGH", "C": "HIGH", "R": "ROUTINE", "T": "MEDIUM"}


def _groups(message: Message) -> list[dict[str, list[Any]]]:
    """The order groups: each ORC with the segments after it up to the next ORC."""
    groups: list[dict[str, list[Any]]] = []
    for segment in message.segments():
        name = str(segment[0])
        if name == "ORC":
            groups.append({"ORC": [segment]})
        elif groups and name in ("OBR", "TQ1", "IPC", "ZDS"):
            groups[-1].setdefault(name, []).append(segment)
    return groups


def _codes(segment: Any, field: int) -> tuple[worklist.Code, ...]:
    codes = []
    for rep in range(1, repetitions(segment, field) + 1):
        code = value(segment, field, rep, 1)
        if code:
            codes.append(
                worklist.Code(code, value(segment, field, rep, 3), value(segment, field, rep, 2))
            )
    return tuple(codes)


def _start(*candidates: str, fallback: str) -> tuple[str, str]:
    """(date, time) of the first datetime given (YYYYMMDD[HHMM[SS[.S]]][+ZZZZ])."""
    for text in (*candidates, fallback):
        text = text.split("+")[0].split("-")[0].strip()
        if len(text) >= 8 and text[:8].isdigit():
            clock = text[8:].split(".")[0]
            return text[:8], clock[:6] if clock.isdigit() else ""
    return "", ""


def _study_uid(order_number: str, procedure_id: str) -> str:
    """A Study Instance UID for an order that names none: derived from it (the same for
    every message about the order), 2.25 (PS3.5 B.2)."""
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, f'kho order {order_number} {procedure_id}').int}"


@handles("ORM", "O01")
@handles("OMI", "O23")
def order(message: Message, context: Context) -> list[PatientChange]:
    """New, changed, cancelled orders: the patient as PID says, then each order group's
    scheduled steps written or their status set."""
    pid = message.first("PID")
    record = patient_record(pid, context)
    change = patients.register(context.catalog, record, citizen_issuer=context.citizen_issuer)
    pv1 = message.first("PV1")
    msh_time = value(message.first("MSH"), 7) or time.strftime("%Y%m%d%H%M%S")
    groups = _groups(message)
    if not groups:
        raise MessageError("no ORC segment", "AE", REQUIRED_FIELD_MISSING, "ORC")
    for number, group in enumerate(groups, 1):
        orc = group["ORC"][0]
        control = value(orc, 1).upper()
        placer, filler = value(orc, 2), value(orc, 3)
        order_number = placer or filler
        if not order_number:
            raise MessageError(
                "no placer or filler order number", "AE", REQUIRED_FIELD_MISSING, f"ORC^{number}^2"
            )
        status = worklist.SCHEDULED
        if control in _CANCEL:
            worklist.cancel(context.catalog, order_number, _CANCEL[control])
            continue
        if control == "SC":
            status = _ORDER_STATUS.get(value(orc, 5).upper(), "")
            if not status:
                raise MessageError(
                    "unknown order status", "AE", TABLE_VALUE_NOT_FOUND, f"ORC^{number}^5"
                )
            if not group.get("OBR"):
                worklist.cancel(context.catalog, order_number, status)
                continue
        elif control not in _SCHEDULE:
            raise MessageError(
                f"unsupported order control {control[:4]!r}",
                "AE",
                TABLE_VALUE_NOT_FOUND,
                f"ORC^{number}^1",
            )
        obr = (group.get("OBR") or [None])[0]
        if obr is None:
            raise MessageError("no OBR segment in the order", "AE", REQUIRED_FIELD_MISSING, "OBR")
        tq1 = (group.get("TQ1") or [None])[0]
        zds = (group.get("ZDS") or [None])[0]
        start = _start(value(tq1, 7), value(obr, 27, 1, 4), value(orc, 7, 1, 4), fallback=msh_time)
        priority = _PRIORITY.get((value(tq1, 9) or value(orc, 7, 1, 6)).upper(), "")
        service = _codes(obr, 4)
        accession = value(obr, 18) or filler or placer
        procedure_id = value(obr, 19) or accession
        common: dict[str, Any] = {
            "order_number": order_number,
            "patient_id": record.patient_id,
            "issuer_of_patient_id": record.issuer,
            "filler_order_number": filler,
            "requested_procedure_description": value(obr, 4, 1, 2),
            "requested_procedure_codes": _codes(obr, 44) or service,
            "start_date": start[0],
            "start_time": start[1],
            "performing_physician": _doctor(obr, 34),
            "referring_physician": _doctor(pv1, 8),
            "requesting_physician": _doctor(obr, 16),
            "admission_id": value(pv1, 19),
            "priority": priority,
            "reason": value(obr, 31, 1, 2) or value(obr, 31),
            "status": status,
        }
        steps = []
        for ipc in group.get("IPC") or []:
            ipc_accession = value(ipc, 1) or accession
            ipc_procedure = value(ipc, 2) or procedure_id
            steps.append(
                worklist.ScheduledStep(
                    **common,
                    accession_number=ipc_accession,
                    requested_procedure_id=ipc_procedure,
                    study_uid=value(ipc, 3) or _study_uid(order_number, ipc_procedure),
                    sps_id=value(ipc, 4) or ipc_procedure,
                    sps_description=value(ipc, 6, 1, 2) or value(obr, 4, 1, 2),
                    protocol_codes=_codes(ipc, 6) or service,
                    modality=value(ipc, 5) or value(obr, 24),
                    station_name=value(ipc, 7),
                    location=value(ipc, 8),
                    station_ae=value(ipc, 9) or value(orc, 18),
                )
            )
        if not steps:
            steps.append(
                worklist.ScheduledStep(
                    **common,
                    accession_number=accession,
                    requested_procedure_id=procedure_id,
                    study_uid=value(zds, 1) or _study_uid(order_number, procedure_id),
                    sps_id=value(obr, 20) or procedure_id,
                    sps_description=value(obr, 4, 1, 2),
                    protocol_codes=service,
                    modality=value(obr, 24),
                    station_ae=value(orc, 18),
                )
            )
        worklist.schedule(context.catalog, steps)
    return [change]
