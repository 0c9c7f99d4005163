"""Worklist items: the scheduled procedure steps of the HIS's imaging orders, kept in a
tenant's catalog (``worklist_items``) for the Modality Worklist.

An order (HL7 ORM^O01, OMI^O23) schedules one or more steps; each step is one worklist
item, known by its order (placer order number, else filler) and its Requested Procedure
and Scheduled Procedure Step IDs.  A new or changed order writes its items; a cancelled
or discontinued one sets their status.  Statuses are DICOM's Scheduled Procedure Step
Status (PS3.3 C.4.10): SCHEDULED when ordered, STARTED once a modality reports the step in
progress (MPPS), COMPLETED when it reports it done or its study arrives, DISCONTINUED,
CANCELED.  A change from the HIS does not reopen a step a modality has started or ended.

Like the patient functions, ``schedule`` and ``cancel`` run inside the caller's write
transaction (the message's, see kho.archive.patients.journal).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from kho.archive.catalog import Catalog, patient_key
from kho.errors import KhoError

SCHEDULED, STARTED, COMPLETED, DISCONTINUED, CANCELED = (
    "SCHEDULED",
    "STARTED",
    "COMPLETED",
    "DISCONTINUED",
    "CANCELED",
)
STATUSES = (SCHEDULED, STARTED, COMPLETED, DISCONTINUED, CANCELED)
#: what a modality asking for its worklist sees unless it asks for a status
OPEN_STATUSES = (SCHEDULED, STARTED)
#: statuses a modality set: a change of the order keeps them
_PERFORMED = (STARTED, COMPLETED, DISCONTINUED)


class OrderError(KhoError, ValueError):
    """An order that cannot be applied (nothing of it is); ``field`` names the value at
    fault (order, accession_number, sps_id, start, modality, station_ae...)."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True, slots=True)
class Code:
    """A coded entry (Code Value, Coding Scheme Designator, Code Meaning)."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True, slots=True)
class ScheduledStep:
    """One scheduled procedure step of an order, as the worklist answers it."""

    #: the placer order number (ORC-2), else the filler's (ORC-3): how the HIS names it
    order_number: str
    patient_id: str
    issuer_of_patient_id: str = ""
    filler_order_number: str = ""
    accession_number: str = ""
    requested_procedure_id: str = ""
    requested_procedure_description: str = ""
    requested_procedure_codes: tuple[Code, ...] = ()
    study_uid: str = ""
    sps_id: str = ""
    sps_description: str = ""
    protocol_codes: tuple[Code, ...] = ()
    station_ae: str = ""
    station_name: str = ""
    location: str = ""
    modality: str = ""
    #: YYYYMMDD and HHMMSS
    start_date: str = ""
    start_time: str = ""
    performing_physician: str = ""
    referring_physician: str = ""
    requesting_physician: str = ""
    admission_id: str = ""
    #: STAT, HIGH, ROUTINE, MEDIUM, LOW or ""
    priority: str = ""
    reason: str = ""
    status: str = SCHEDULED
    #: set when read back: when it last changed
    updated_at: float = field(default=0.0, compare=False)

    @property
    def patient_key(self) -> str:
        return patient_key(self.patient_id, self.issuer_of_patient_id)

    @property
    def item_key(self) -> str:
        return item_key(self.order_number, self.requested_procedure_id, self.sps_id)

    def checked(self) -> ScheduledStep:
        if not self.order_number:
            raise OrderError("the order has no order number", "order")
        if not self.sps_id:
            raise OrderError("the step has no Scheduled Procedure Step ID", "sps_id")
        if self.status not in STATUSES:
            raise OrderError(f"unknown step status {self.status!r}", "status")
        for name, limit in (("accession_number", 16), ("sps_id", 16), ("station_ae", 16)):
            if len(getattr(self, name)) > limit:
                raise OrderError(f"{name} longer than DICOM allows ({limit})", name)
        if self.start_date and not (len(self.start_date) == 8 and self.start_date.isdigit()):
            raise OrderError("the start date is not YYYYMMDD", "start")
        return self


#: the step fields kept as columns (matching keys); the others go in ``attributes``
_COLUMNS = {
    "order_number": "order_number",
    "accession_number": "accession_number",
    "requested_procedure_id": "requested_procedure_id",
    "sps_id": "sps_id",
    "study_uid": "study_uid",
    "station_ae": "station_ae",
    "station_name": "station_name",
    "modality": "modality",
    "start_date": "start_date",
    "start_time": "start_time",
    "performing_physician": "performing_physician",
    "status": "status",
}
_STEP_FIELDS = [f.name for f in fields(ScheduledStep) if f.name != "updated_at"]
#: what a read of worklist_items selects, in order (then patient_key, attributes, updated_at)
SELECTED = [f"w.{column}" for column in _COLUMNS.values()]


def item_key(order_number: str, requested_procedure_id: str, sps_id: str) -> str:
    text = f"{order_number}\x00{requested_procedure_id}\x00{sps_id}"
    return hashlib.sha256(text.encode()).hexdigest()[:40]


def step_from_row(row: Sequence[Any]) -> ScheduledStep:
    """A ScheduledStep from SELECTED, attributes (JSON) and updated_at."""
    values: dict[str, Any] = dict(zip(_COLUMNS, row[: len(_COLUMNS)], strict=True))
    extra = json.loads(row[len(_COLUMNS)] or "{}")
    for name in ("requested_procedure_codes", "protocol_codes"):
        extra[name] = tuple(Code(*code) for code in extra.get(name, ()))
    values.update({k: v for k, v in extra.items() if k in _STEP_FIELDS})
    return ScheduledStep(**values, updated_at=float(row[len(_COLUMNS) + 1]))


def schedule(catalog: Catalog, steps: Sequence[ScheduledStep]) -> list[str]:
    """Write new or changed steps (a step a modality started or ended keeps its status);
    their item keys.  OrderError for a malformed step."""
    keys = []
    now = time.time()
    for step in steps:
        step.checked()
        data = asdict(step)
        data.pop("updated_at")
        attributes = {k: v for k, v in data.items() if k not in _COLUMNS}
        columns = list(_COLUMNS.values())
        names = ["item_key", "patient_key", *columns, "attributes", "updated_at"]
        values = [
            step.item_key,
            step.patient_key,
            *(data[k] for k in _COLUMNS),
            json.dumps(attributes, ensure_ascii=False, sort_keys=True),
            now,
        ]
        performed = ", ".join(f"'{s}'" for s in _PERFORMED)
        sets = ", ".join(f"{name} = excluded.{name}" for name in names[1:] if name != "status")
        catalog.execute(
            f"INSERT INTO worklist_items ({', '.join(names)}) "
            f"VALUES ({', '.join('?' for _ in names)}) ON CONFLICT (item_key) DO UPDATE SET "
            f"{sets}, status = CASE WHEN worklist_items.status IN ({performed}) "
            f"AND excluded.status = '{SCHEDULED}' THEN worklist_items.status "
            "ELSE excluded.status END",
            values,
        )
        keys.append(step.item_key)
    return keys


def cancel(catalog: Catalog, order_number: str, status: str = CANCELED) -> int:
    """Set the status of every step of an order (CANCELED, DISCONTINUED, or another the
    HIS reports); how many steps.  OrderError for an order the worklist does not hold."""
    if status not in STATUSES:
        raise OrderError(f"unknown step status {status!r}", "status")
    cursor = catalog.execute(
        "UPDATE worklist_items SET status = ?, updated_at = ? WHERE order_number = ?",
        (status, time.time(), order_number),
    )
    if cursor.rowcount < 1:
        raise OrderError("no scheduled step of this order is known", "order")
    return int(cursor.rowcount)


def set_status(
    catalog: Catalog, item_keys: Sequence[str], status: str, *, only: Sequence[str]
) -> int:
    """Set the status of these items where it is one of ``only``; how many changed."""
    if not item_keys:
        return 0
    keys = list(item_keys)
    marks = ", ".join("?" for _ in keys)
    allowed = ", ".join("?" for _ in only)
    cursor = catalog.execute(
        f"UPDATE worklist_items SET status = ?, updated_at = ? WHERE item_key IN ({marks}) "
        f"AND status IN ({allowed})",
        (status, time.time(), *keys, *only),
    )
    return max(0, int(cursor.rowcount))


def get(catalog: Catalog, key: str) -> ScheduledStep | None:
    row = catalog.fetchone(
        f"SELECT {', '.join(SELECTED)}, w.attributes, w.updated_at FROM worklist_items w "
        "WHERE w.item_key = ?",
        (key,),
    )
    return step_from_row(row) if row is not None else None


def of_order(catalog: Catalog, order_number: str) -> list[ScheduledStep]:
    rows = catalog.fetchall(
        f"SELECT {', '.join(SELECTED)}, w.attributes, w.updated_at FROM worklist_items w "
        "WHERE w.order_number = ? ORDER BY w.requested_procedure_id, w.sps_id",
        (order_number,),
    )
    return [step_from_row(row) for row in rows]


def complete_arrived(catalog: Catalog) -> int:
    """Steps still SCHEDULED whose study has arrived (its Study Instance UID, or its
    Accession Number, in the catalog) become COMPLETED; how many.  Steps a modality
    reported STARTED wait for its MPPS to end them.  Run periodically (each run reads the
    open steps, two index lookups each)."""
    rows = catalog.fetchall(
        "SELECT w.item_key FROM worklist_items w WHERE w.status = ? AND ("
        "(w.study_uid <> '' AND EXISTS (SELECT 1 FROM studies s "
        "WHERE s.study_uid = w.study_uid)) OR (w.accession_number <> '' AND EXISTS "
        "(SELECT 1 FROM studies s WHERE s.accession_number = w.accession_number)))",
        (SCHEDULED,),
    )
    keys = [str(key) for (key,) in rows]
    if not keys:
        return 0
    with catalog.transaction():
        return set_status(catalog, keys, COMPLETED, only=(SCHEDULED,))
