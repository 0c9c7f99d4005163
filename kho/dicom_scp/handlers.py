"""DIMSE event handlers: thin adapters from pynetdicom events to archive calls."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, cast

from pydicom.dataset import Dataset
from pynetdicom.dimse_primitives import C_STORE

from kho.dicom_scp import fast_dimse
from kho.dicom_scp.statuses import (
    PROCESSING_FAILURE,
    SUCCESS,
    status_dataset,
    store_status_for,
)

if TYPE_CHECKING:
    from pynetdicom.events import Event

    from kho.archive.archive import Archive

log = logging.getLogger(__name__)


def handle_association_open(event: Event) -> None:
    """Per association: C-STORE responses take kho's direct encoding (fast_dimse)."""
    fast_dimse.install(event.assoc)


def handle_echo(event: Event) -> int:
    """C-ECHO: the archive is up."""
    return SUCCESS


def handle_store(event: Event, archive: Archive) -> int | Dataset:
    """C-STORE: ingest the dataset bytes exactly as received; success only once durable."""
    request = cast(C_STORE, event.request)
    buffer = request.DataSet
    data = buffer.getvalue() if buffer is not None else b""
    calling_ae = event.assoc.requestor.ae_title
    try:
        result = archive.ingest_dimse(
            data,
            transfer_syntax_uid=str(event.context.transfer_syntax),
            sop_class_uid=str(request.AffectedSOPClassUID),
            sop_instance_uid=str(request.AffectedSOPInstanceUID),
            source_ae=calling_ae,
        )
    except Exception as exc:  # every failure becomes a status; the association lives on
        status = store_status_for(exc)
        log.warning(
            "C-STORE %s from %s refused with 0x%04X: %s",
            request.AffectedSOPInstanceUID,
            calling_ae,
            status,
            exc,
        )
        if status == PROCESSING_FAILURE:  # not a known failure: keep the traceback
            log.error("unexpected C-STORE failure", exc_info=exc)
        return status_dataset(status, str(exc))
    log.debug("C-STORE %s from %s: %s", result.sop_uid, calling_ae, result.outcome.value)
    return SUCCESS
