"""Modality Performed Procedure Steps (PS3.4 F.7): what a modality reports it is doing.

N-CREATE makes a performed step, IN PROGRESS; the worklist items it names (Scheduled Step
Attributes Sequence: by Scheduled Procedure Step ID with Accession Number, else by
Accession Number or Study Instance UID) become STARTED.  N-SET changes it; COMPLETED or
DISCONTINUED is final, and the items become COMPLETED or DISCONTINUED with it.  A final
step is not changed any more (PS3.4 F.7.2.2: "may no longer be updated").  The last
dataset is kept (DICOM JSON) in ``performed_steps``.
"""

from __future__ import annotations

import json
import time
from enum import StrEnum
from typing import Any

from pydicom.dataset import Dataset

from kho.archive.catalog import Catalog
from kho.archive.worklist import items
from kho.errors import KhoError

IN_PROGRESS, COMPLETED, DISCONTINUED = "IN PROGRESS", "COMPLETED", "DISCONTINUED"
_ITEM_STATUS = {COMPLETED: items.COMPLETED, DISCONTINUED: items.DISCONTINUED}


class MppsFailure(StrEnum):
    DUPLICATE = "duplicate"  # N-CREATE of a SOP Instance UID that exists
    UNKNOWN = "unknown"  # N-SET of one that does not
    INVALID = "invalid"  # a status value the step may not take
    FINAL = "final"  # N-SET of a step COMPLETED or DISCONTINUED


class MppsError(KhoError):
    def __init__(self, reason: MppsFailure, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def create(catalog: Catalog, sop_uid: str, dataset: Dataset, calling_ae: str = "") -> list[str]:
    """N-CREATE: a performed step IN PROGRESS; the worklist items it starts (keys)."""
    status = str(dataset.get("PerformedProcedureStepStatus", "") or "").strip()
    if status != IN_PROGRESS:
        raise MppsError(MppsFailure.INVALID, "a new performed step must be IN PROGRESS")
    with catalog.transaction():
        if catalog.fetchone("SELECT 1 FROM performed_steps WHERE sop_uid = ?", (sop_uid,)):
            raise MppsError(MppsFailure.DUPLICATE, "the performed step exists")
        keys = _scheduled_items(catalog, dataset)
        now = time.time()
        catalog.execute(
            "INSERT INTO performed_steps (sop_uid, status, calling_ae, item_keys, attributes, "
            "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (sop_uid, status, calling_ae, json.dumps(keys), _json(dataset), now, now),
        )
        items.set_status(catalog, keys, items.STARTED, only=(items.SCHEDULED,))
    return keys


def update(catalog: Catalog, sop_uid: str, modifications: Dataset) -> str:
    """N-SET: the step's attributes replaced by ``modifications``' (top level); its
    status after.  A final status ends its worklist items."""
    with catalog.transaction():
        row = catalog.fetchone(
            f"SELECT status, item_keys, attributes FROM performed_steps WHERE sop_uid = ?"
            f"{catalog.ROW_LOCK}",
            (sop_uid,),
        )
        if row is None:
            raise MppsError(MppsFailure.UNKNOWN, "no such performed step")
        current, keys_text, attributes = row
        if current != IN_PROGRESS:
            raise MppsError(MppsFailure.FINAL, "the performed step may no longer be updated")
        stored = Dataset.from_json(attributes)
        for elem in modifications:
            stored[elem.tag] = elem
        status = str(stored.get("PerformedProcedureStepStatus", "") or "").strip()
        if status not in (IN_PROGRESS, COMPLETED, DISCONTINUED):
            raise MppsError(MppsFailure.INVALID, f"unknown performed step status {status!r}")
        catalog.execute(
            "UPDATE performed_steps SET status = ?, attributes = ?, updated_at = ? "
            "WHERE sop_uid = ?",
            (status, _json(stored), time.time(), sop_uid),
        )
        if status in _ITEM_STATUS:
            keys = json.loads(keys_text or "[]")
            items.set_status(
                catalog, keys, _ITEM_STATUS[status], only=(items.SCHEDULED, items.STARTED)
            )
    return status


def get(catalog: Catalog, sop_uid: str) -> tuple[str, Dataset] | None:
    """(status, last dataset) of a performed step."""
    row = catalog.fetchone(
        "SELECT status, attributes FROM performed_steps WHERE sop_uid = ?", (sop_uid,)
    )
    return (str(row[0]), Dataset.from_json(row[1])) if row is not None else None


def _scheduled_items(catalog: Catalog, dataset: Dataset) -> list[str]:
    """The worklist items a performed step names (none: an unscheduled procedure)."""
    found: list[str] = []
    for ref in dataset.get("ScheduledStepAttributesSequence", None) or []:
        sps_id = _text(ref, "ScheduledProcedureStepID")
        accession = _text(ref, "AccessionNumber")
        study_uid = _text(ref, "StudyInstanceUID")
        conditions: list[tuple[str, tuple[Any, ...]]] = []
        if sps_id and accession:
            conditions.append(("sps_id = ? AND accession_number = ?", (sps_id, accession)))
        if sps_id:
            conditions.append(("sps_id = ?", (sps_id,)))
        if accession:
            conditions.append(("accession_number = ?", (accession,)))
        if study_uid:
            conditions.append(("study_uid = ?", (study_uid,)))
        for where, params in conditions:  # the most specific that names any
            rows = catalog.fetchall(f"SELECT item_key FROM worklist_items WHERE {where}", params)
            if rows:
                found += [str(key) for (key,) in rows if key not in found]
                break
    return found


def _text(ds: Dataset, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip()


def _json(ds: Dataset) -> str:
    return json.dumps(ds.to_json_dict(), ensure_ascii=False)
