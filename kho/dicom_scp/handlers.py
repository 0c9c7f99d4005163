"""DIMSE event handlers: thin adapters from pynetdicom events to archive calls."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from pydicom.dataset import Dataset
from pynetdicom.dimse_primitives import C_STORE

from kho.dicom_scp import fast_dimse
from kho.dicom_scp.statuses import (
    COERCION_OF_DATA_ELEMENTS,
    NOT_AUTHORIZED,
    NOT_AUTHORIZED_COMMENT,
    PROCESSING_FAILURE,
    SUCCESS,
    coercion_comment,
    error_comment,
    status_dataset,
    store_status_for,
)

if TYPE_CHECKING:
    from pynetdicom.events import Event

    from kho.archive.archive import Archive
    from kho.archive.ingest.pipeline import DatasetBytes, RowsFor
    from kho.dicom_scp.door import Door

log = logging.getLogger(__name__)


def handle_association_open(event: Event, door: Door) -> None:
    """Per association: kho's own C-STORE receive path and response encoding (fast_dimse).
    Each C-STORE on it passes the door's check and goes into its peer's tenant."""
    association = event.assoc

    def store(
        parts: Sequence[Any], transfer_syntax: str, sop_class: str, sop_instance: str, ae: str
    ) -> tuple[int, str | None]:
        session = door.admit(association, "store")
        if session is None:
            return NOT_AUTHORIZED, NOT_AUTHORIZED_COMMENT
        return store_instance(
            session.archive,
            parts,
            transfer_syntax_uid=transfer_syntax,
            sop_class_uid=sop_class,
            sop_instance_uid=sop_instance,
            calling_ae=ae,
            with_rows=door.stored_rows(session, ae),
        )

    fast_dimse.install(association, store)


def handle_echo(event: Event, door: Door) -> int:
    """C-ECHO: the archive is up (for a peer granted echo: PS3.7 0x0124 otherwise)."""
    if door.admit(event.assoc, "echo") is None:
        return NOT_AUTHORIZED
    return SUCCESS


def store_instance(
    archive: Archive,
    dataset: DatasetBytes,
    *,
    transfer_syntax_uid: str,
    sop_class_uid: str,
    sop_instance_uid: str,
    calling_ae: str,
    with_rows: RowsFor | None = None,
) -> tuple[int, str | None]:
    """Ingest a C-STORE's dataset exactly as received (bytes, or its fragments in order):
    the status to answer (success only once durable) and an Error Comment for failures
    (an identity conflict: 0xC410 naming it) and for the warning 0xB000, which says the
    archive catalogued the instance under UIDs it invented (naming them)."""
    try:
        result = archive.ingest_dimse(
            dataset,
            transfer_syntax_uid=transfer_syntax_uid,
            sop_class_uid=sop_class_uid,
            sop_instance_uid=sop_instance_uid,
            source_ae=calling_ae,
            with_rows=with_rows,  # the audit record, committed with the instance
        )
    except Exception as exc:  # every failure becomes a status; the association lives on
        status = store_status_for(exc)
        log.warning(
            "C-STORE %s from %s refused with 0x%04X: %s",
            sop_instance_uid,
            calling_ae,
            status,
            exc,
        )
        if status == PROCESSING_FAILURE:  # not a known failure: keep the traceback
            log.error("unexpected C-STORE failure", exc_info=exc)
        return status, error_comment(str(exc))
    if result.coerced:  # stored, but the sender must learn the UIDs it is filed under
        log.warning(
            "C-STORE %s from %s stored with coerced UIDs (0x%04X): %s",
            result.sop_uid,
            calling_ae,
            COERCION_OF_DATA_ELEMENTS,
            "; ".join(f"{keyword} coerced to {uid}" for keyword, uid in result.coerced),
        )
        return COERCION_OF_DATA_ELEMENTS, coercion_comment(result.coerced)
    log.debug("C-STORE %s from %s: %s", result.sop_uid, calling_ae, result.outcome.value)
    return SUCCESS, None


def handle_store(event: Event, door: Door) -> int | Dataset:
    """C-STORE through pynetdicom (associations without kho's receive path)."""
    session = door.admit(event.assoc, "store")
    if session is None:
        return status_dataset(NOT_AUTHORIZED, NOT_AUTHORIZED_COMMENT)
    request = cast(C_STORE, event.request)
    buffer = request.DataSet
    status, comment = store_instance(
        session.archive,
        buffer.getvalue() if buffer is not None else b"",
        transfer_syntax_uid=str(event.context.transfer_syntax),
        sop_class_uid=str(request.AffectedSOPClassUID),
        sop_instance_uid=str(request.AffectedSOPInstanceUID),
        calling_ae=event.assoc.requestor.ae_title,
        with_rows=door.stored_rows(session, event.assoc.requestor.ae_title),
    )
    return status if status == SUCCESS else status_dataset(status, comment)
