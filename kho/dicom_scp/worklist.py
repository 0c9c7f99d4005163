"""The Modality Worklist SCP (C-FIND on the Modality Worklist Information Model, PS3.4 K)
and the Modality Performed Procedure Step SCP (N-CREATE, N-SET, PS3.4 F.7): thin adapters
from pynetdicom events to kho.archive.worklist, in the association's tenant.

C-FIND is one pynetdicom event for every information model: ``handle_find`` answers the
worklist model and hands the others to the Query/Retrieve handler (kho.dicom_scp.qr).
A worklist response holds the keys the query asked for, from the matching item: a
sequence key with no item or an empty item returns the whole sequence, one with keys
returns those.  Responses with text beyond ASCII (Vietnamese names) carry Specific
Character Set ISO_IR 192 and are encoded in UTF-8, whatever character set the query came
in (pydicom decodes it by its own Specific Character Set).

Statuses: 0xFF00 pending, 0x0000 done, 0xFE00 after C-CANCEL, 0xC000 a malformed key
value, 0xA700 more matches than ``find_result_limit``, 0xA701 the catalog failed, 0x0124
not granted.  MPPS: 0x0111 duplicate SOP instance, 0x0112 no such instance, 0x0106 an
invalid status value, 0x0110 with Error ID 0xA710 for an update of a step already
COMPLETED or DISCONTINUED, 0x0124 not granted.

Which peers may use them: the worklist needs the ``worklist`` service of the AE registry
and MPPS the ``mpps`` service (a modality reads the worklist without the right to search
every patient's images).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pynetdicom.dimse_primitives import N_CREATE, N_SET

from kho.archive import worklist
from kho.archive.worklist import mpps
from kho.archive.worklist.matching import SEQUENCE, as_dataset, item_values
from kho.dicom_scp import qr
from kho.dicom_scp.statuses import (
    CANCEL,
    NOT_AUTHORIZED,
    NOT_AUTHORIZED_COMMENT,
    PENDING,
    PROCESSING_FAILURE,
    QR_OUT_OF_RESOURCES,
    QR_UNABLE_TO_CALCULATE_MATCHES,
    SUCCESS,
    UNABLE_TO_PROCESS,
    status_dataset,
)
from kho.errors import CatalogError, QueryError

if TYPE_CHECKING:
    from pynetdicom.events import Event

    from kho.archive.archive import Archive
    from kho.dicom_scp.door import Door

log = logging.getLogger(__name__)

#: Modality Worklist Information Model - FIND
MODALITY_WORKLIST_FIND = "1.2.840.10008.5.1.4.31"
#: Modality Performed Procedure Step SOP Class
MODALITY_PERFORMED_PROCEDURE_STEP = "1.2.840.10008.3.1.2.3.3"
#: the AE registry's names of the two services (kho.archive.config.DIMSE_SERVICES)
WORKLIST_SERVICE = "worklist"
MPPS_SERVICE = "mpps"

DUPLICATE_SOP_INSTANCE = 0x0111
NO_SUCH_OBJECT_INSTANCE = 0x0112
INVALID_ATTRIBUTE_VALUE = 0x0106
NO_SUCH_SOP_CLASS = 0x0118
#: PS3.4 F.7.2.2.2: "Performed Procedure Step Object may no longer be updated"
MAY_NO_LONGER_BE_UPDATED = 0xA710
_MPPS_STATUS = {
    worklist.MppsFailure.DUPLICATE: DUPLICATE_SOP_INSTANCE,
    worklist.MppsFailure.UNKNOWN: NO_SUCH_OBJECT_INSTANCE,
    worklist.MppsFailure.INVALID: INVALID_ATTRIBUTE_VALUE,
    worklist.MppsFailure.FINAL: PROCESSING_FAILURE,
}


# --- C-FIND ----------------------------------------------------------------------------


def handle_find(event: Event, door: Door) -> Iterator[tuple[int | Dataset, Dataset | None]]:
    """EVT_C_FIND for every model: the worklist here, Query/Retrieve in kho.dicom_scp.qr."""
    if str(event.request.AffectedSOPClassUID) != MODALITY_WORKLIST_FIND:
        yield from qr.handle_find(event, door)
        return
    session = door.admit(event.assoc, WORKLIST_SERVICE)
    if session is None:
        yield status_dataset(NOT_AUTHORIZED, NOT_AUTHORIZED_COMMENT), None
        return
    yield from find(event, session.archive)


def find(event: Event, archive: Archive) -> Iterator[tuple[int | Dataset, Dataset | None]]:
    """The worklist C-FIND: one pending response per matching step, then success."""
    settings = archive.settings
    limit = int(settings.find_result_limit)
    try:
        query = _identifier(event)
        keys, step_keys = query_keys(query)
        entries = worklist.find(
            archive.catalog,
            keys,
            step_keys,
            fuzzy_names=bool(settings.fuzzy_names),
            limit=limit + 1 if limit > 0 else None,
        )
    except QueryError as exc:
        yield status_dataset(UNABLE_TO_PROCESS, str(exc)), None
        return
    except CatalogError as exc:
        log.error("worklist C-FIND failed in the catalog: %s", exc)
        yield status_dataset(QR_UNABLE_TO_CALCULATE_MATCHES, str(exc)), None
        return
    if limit > 0 and len(entries) > limit:
        yield (
            status_dataset(QR_OUT_OF_RESOURCES, f"more than {limit} matches: narrow the query"),
            None,
        )
        return
    for entry in entries:
        if event.is_cancelled:
            yield CANCEL, None
            return
        yield PENDING, response(query, item_values(entry))


def _identifier(event: Event) -> Dataset:
    try:
        identifier = event.identifier
        for elem in identifier.iterall():  # a malformed value fails here, not halfway
            _ = elem.value
    except Exception as exc:  # pydicom raises many types for undecodable bytes
        raise QueryError(f"cannot decode the identifier: {exc}") from exc
    return identifier


def _text(elem: DataElement) -> str:
    value = elem.value
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value).strip()


def query_keys(query: Dataset) -> tuple[dict[str, str], dict[str, str]]:
    """(top-level keys, Scheduled Procedure Step item keys) -> value text."""
    keys: dict[str, str] = {}
    step_keys: dict[str, str] = {}
    for elem in query:
        if elem.tag.element == 0 or not elem.keyword:
            continue
        if elem.keyword == SEQUENCE:
            items = list(elem.value or [])
            if len(items) > 1:
                raise QueryError("the Scheduled Procedure Step Sequence key has one item")
            for inner in items[0] if items else []:
                if inner.VR != "SQ" and inner.keyword:
                    step_keys[inner.keyword] = _text(inner)
        elif elem.VR != "SQ":
            keys[elem.keyword] = _text(elem)
    return keys, step_keys


def response(query: Dataset, item: dict[str, Any]) -> Dataset:
    """The item's values (kho.archive.worklist.matching.item_values) of the keys the
    query asked for (PS3.4 C.2.2.1.2), with the item's Specific Character Set."""
    out = _selected(query, item)
    if "SpecificCharacterSet" in item:
        out.add(DataElement(0x00080005, "CS", item["SpecificCharacterSet"]))
    return out


def _selected(query: Dataset, item: dict[str, Any]) -> Dataset:
    out = Dataset()
    for elem in query:
        tag = elem.tag
        keyword = elem.keyword
        if tag.element == 0 or keyword == "SpecificCharacterSet":
            continue
        held = item.get(keyword) if keyword else None
        if elem.VR == "SQ":
            asked = list(elem.value or [])
            items = held if isinstance(held, list) else []
            if not asked or len(asked[0]) == 0:
                chosen = [as_dataset(i) for i in items]
            else:
                chosen = [_selected(asked[0], i) for i in items]
            out.add(DataElement(tag, "SQ", Sequence(chosen)))
        elif held is not None and not isinstance(held, list):
            out.add(DataElement(tag, elem.VR, held))
        else:
            out.add(DataElement(tag, elem.VR, None))
    return out


# --- MPPS ------------------------------------------------------------------------------


def handle_n_create(event: Event, door: Door) -> tuple[int | Dataset, Dataset | None]:
    """EVT_N_CREATE: a Modality Performed Procedure Step begins (IN PROGRESS)."""
    request = cast(N_CREATE, event.request)
    if str(request.AffectedSOPClassUID) != MODALITY_PERFORMED_PROCEDURE_STEP:
        return NO_SUCH_SOP_CLASS, None
    session = door.admit(event.assoc, MPPS_SERVICE)
    if session is None:
        return status_dataset(NOT_AUTHORIZED, NOT_AUTHORIZED_COMMENT), None
    sop_uid = str(request.AffectedSOPInstanceUID or "")
    if not sop_uid:
        return _failure(INVALID_ATTRIBUTE_VALUE, "no Affected SOP Instance UID"), None
    try:
        attributes = event.attribute_list
        started = mpps.create(
            session.archive.catalog, sop_uid, attributes, event.assoc.requestor.ae_title
        )
    except worklist.MppsError as exc:
        return _failure(_MPPS_STATUS[exc.reason], str(exc), exc.reason), None
    except CatalogError as exc:
        log.error("MPPS N-CREATE failed in the catalog: %s", exc)
        return _failure(PROCESSING_FAILURE, "the catalog failed"), None
    except Exception as exc:  # an undecodable attribute list
        return _failure(PROCESSING_FAILURE, f"cannot read the attribute list: {exc}"), None
    log.info("MPPS %s IN PROGRESS: %d worklist steps started", sop_uid, len(started))
    return SUCCESS, attributes


def handle_n_set(event: Event, door: Door) -> tuple[int | Dataset, Dataset | None]:
    """EVT_N_SET: a performed step changes (COMPLETED, DISCONTINUED end it)."""
    request = cast(N_SET, event.request)
    if str(request.RequestedSOPClassUID) != MODALITY_PERFORMED_PROCEDURE_STEP:
        return NO_SUCH_SOP_CLASS, None
    session = door.admit(event.assoc, MPPS_SERVICE)
    if session is None:
        return status_dataset(NOT_AUTHORIZED, NOT_AUTHORIZED_COMMENT), None
    sop_uid = str(request.RequestedSOPInstanceUID or "")
    try:
        modifications = event.modification_list
        status = mpps.update(session.archive.catalog, sop_uid, modifications)
    except worklist.MppsError as exc:
        return _failure(_MPPS_STATUS[exc.reason], str(exc), exc.reason), None
    except CatalogError as exc:
        log.error("MPPS N-SET failed in the catalog: %s", exc)
        return _failure(PROCESSING_FAILURE, "the catalog failed"), None
    except Exception as exc:
        return _failure(PROCESSING_FAILURE, f"cannot read the modification list: {exc}"), None
    log.info("MPPS %s %s", sop_uid, status)
    return SUCCESS, modifications


def _failure(status: int, comment: str, reason: Any = None) -> Dataset:
    ds = status_dataset(status, comment)
    if reason == worklist.MppsFailure.FINAL:
        ds.ErrorID = MAY_NO_LONGER_BE_UPDATED
    return ds
