"""Storage Commitment, Push Model (PS3.4 Annex J), in kho's DICOM server, both ways.

- **kho as the SCP**: a modality that has sent a study asks kho to commit it (N-ACTION,
  action type 1).  The request is answered at once; the report (N-EVENT-REPORT: event
  type 1, all committed, or 2, some failed) follows on the same association while the
  modality keeps it open, otherwise on an association kho opens to the modality's
  registered address (the AE registry, or ``move_destinations`` with authentication off),
  proposing the SCP role for itself (SCP/SCU role selection, PS3.4 J.3.3).  An instance is
  committed when it is in the catalog of the caller's tenant with the same SOP class: an
  acknowledged C-STORE is already durable (DESIGN.md), so kho commits what it acknowledged.
  Asking needs the ``store`` service.
- **kho as the SCU**: a forwarding destination that reports late, on an association of its
  own, reaches :meth:`kho.routing.router.Router.commitment_report`, scoped to the tenant of
  the association and to destinations of the caller's AE title.

Both are rare and small; pynetdicom does the exchange as it is.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role
from pynetdicom.dimse_primitives import N_ACTION, N_EVENT_REPORT
from pynetdicom.events import Event

from kho.archive.catalog import Catalog
from kho.dicom_scp.door import Door, PeerSession
from kho.dicom_scp.statuses import NOT_AUTHORIZED, NOT_AUTHORIZED_COMMENT, SUCCESS, status_dataset
from kho.routing.commitment import (
    STORAGE_COMMITMENT_INSTANCE,
    STORAGE_COMMITMENT_PUSH,
    end_association,
    parse_report,
    request_dataset,
)

log = logging.getLogger(__name__)

#: N-ACTION Action Type ID of the Push Model: Request Storage Commitment
REQUEST_COMMITMENT = 1
#: N-EVENT-REPORT Event Type IDs: all committed; some failed (PS3.4 J.3.3)
ALL_COMMITTED = 1
SOME_FAILED = 2
# PS3.7 C.5 general statuses, and the failure reasons of PS3.4 J.3.3.1.1
NO_SUCH_SOP_CLASS = 0x0118
NO_SUCH_ACTION = 0x0123
NO_SUCH_EVENT_TYPE = 0x0113
MISSING_ATTRIBUTE = 0x0120
PROCESSING_FAILURE = 0x0110
NO_SUCH_OBJECT_INSTANCE = 0x0112
CLASS_INSTANCE_CONFLICT = 0x0119
#: how long the report waits for the N-ACTION response to go out first
_REPORT_DELAY_S = 0.05
#: asking needs the right to store (what is committed is what the caller stored)
COMMITMENT_SERVICE = "store"


def handle_n_action(event: Event, door: Door) -> tuple[int | Dataset, Dataset | None]:
    """EVT_N_ACTION: a Storage Commitment request; the report follows in a thread."""
    request = cast(N_ACTION, event.request)
    if str(request.RequestedSOPClassUID) != STORAGE_COMMITMENT_PUSH:
        return NO_SUCH_SOP_CLASS, None
    session = door.admit(event.assoc, COMMITMENT_SERVICE)
    if session is None:
        return status_dataset(NOT_AUTHORIZED, NOT_AUTHORIZED_COMMENT), None
    if request.ActionTypeID != REQUEST_COMMITMENT:
        return NO_SUCH_ACTION, None
    try:
        information = event.action_information
        transaction_uid = str(information.get("TransactionUID", "") or "")
        references = [
            (
                str(item.get("ReferencedSOPClassUID", "") or ""),
                str(item.get("ReferencedSOPInstanceUID", "") or ""),
            )
            for item in information.get("ReferencedSOPSequence", None) or []
        ]
    except Exception as exc:  # an undecodable Action Information
        return status_dataset(PROCESSING_FAILURE, f"cannot read the request: {exc}"), None
    if not transaction_uid or not references:
        return status_dataset(
            MISSING_ATTRIBUTE, "Transaction UID and Referenced SOP Sequence are required"
        ), None
    report = commitment_report(session.archive.catalog, transaction_uid, references)
    calling_ae = str(event.assoc.requestor.ae_title or "").strip()
    threading.Thread(
        target=_send_report,
        args=(event.assoc, door, session, calling_ae, report),
        name=f"kho-commitment-{transaction_uid[-12:]}",
        daemon=True,
    ).start()
    return SUCCESS, None


def commitment_report(
    catalog: Catalog, transaction_uid: str, references: list[tuple[str, str]]
) -> Dataset:
    """The Event Information answering a request: each reference committed when the
    catalog holds that instance with that SOP class, failed (with the reason) otherwise."""
    committed: list[Dataset] = []
    failed: list[Dataset] = []
    for sop_class, sop_uid in references:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_uid
        record = catalog.get_instance(sop_uid) if sop_uid else None
        if record is None:
            item.FailureReason = NO_SUCH_OBJECT_INSTANCE
            failed.append(item)
        elif record.sop_class_uid != sop_class:
            item.FailureReason = CLASS_INSTANCE_CONFLICT
            failed.append(item)
        else:
            committed.append(item)
    report = request_dataset(transaction_uid, [])
    report.ReferencedSOPSequence = committed
    if failed:
        report.FailedSOPSequence = failed
    return report


def _send_report(
    association: Any, door: Door, session: PeerSession, calling_ae: str, report: Dataset
) -> None:
    event_type = SOME_FAILED if "FailedSOPSequence" in report else ALL_COMMITTED
    time.sleep(_REPORT_DELAY_S)
    if association.is_established:
        try:
            answer = association.send_n_event_report(
                report, event_type, STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE
            )
            if answer and answer[0] is not None and "Status" in answer[0]:
                _log_sent(report, calling_ae, "the requesting association", answer[0].Status)
                return
        except Exception as exc:  # released under us: go through a new association
            log.info("storage commitment report on the requesting association failed: %s", exc)
    address = door.peers.move_destination(session.caller, calling_ae)
    if address is None:
        log.warning(
            "storage commitment report for %s not sent: %s released the association and "
            "has no registered address",
            report.TransactionUID,
            calling_ae,
        )
        return
    ae = AE(ae_title=door.archive.settings.ae_title)
    ae.add_requested_context(STORAGE_COMMITMENT_PUSH)
    options: dict[str, Any] = {
        "ae_title": calling_ae,
        "ext_neg": [build_role(STORAGE_COMMITMENT_PUSH, scp_role=True)],
    }
    tls = door.destination_tls(calling_ae)
    if tls is not None:
        options["tls_args"] = (tls, address[0])
    try:
        association = ae.associate(address[0], address[1], **options)
        if not association.is_established:
            log.warning("storage commitment report: %s refused the association", calling_ae)
            return
        try:
            answer = association.send_n_event_report(
                report, event_type, STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE
            )
            status = answer[0].Status if answer and answer[0] is not None else None
            _log_sent(report, calling_ae, f"{address[0]}:{address[1]}", status)
        finally:
            end_association(association)
    except Exception:
        log.exception("storage commitment report to %s failed", calling_ae)


def _log_sent(report: Dataset, calling_ae: str, where: str, status: Any) -> None:
    log.info(
        "storage commitment %s for %s: %d committed, %d failed, reported on %s (status %s)",
        report.TransactionUID,
        calling_ae,
        len(report.ReferencedSOPSequence),
        len(report.get("FailedSOPSequence", None) or []),
        where,
        f"{int(status):#06x}" if status is not None else "none",
    )


def handle_n_event_report(event: Event, door: Door) -> tuple[int | Dataset, Dataset | None]:
    """EVT_N_EVENT_REPORT: a forwarding destination's late Storage Commitment report."""
    request = cast(N_EVENT_REPORT, event.request)
    if str(request.AffectedSOPClassUID) != STORAGE_COMMITMENT_PUSH:
        return NO_SUCH_SOP_CLASS, None
    session = door.session(event.assoc)
    if session is None:  # cannot happen past the door; fail closed all the same
        return status_dataset(NOT_AUTHORIZED, NOT_AUTHORIZED_COMMENT), None
    if request.EventTypeID not in (ALL_COMMITTED, SOME_FAILED):
        return NO_SUCH_EVENT_TYPE, None
    try:
        report = parse_report(event.event_information)
    except Exception as exc:
        return status_dataset(PROCESSING_FAILURE, f"cannot read the report: {exc}"), None
    calling_ae = str(event.assoc.requestor.ae_title or "").strip()
    settled = 0
    if door.router is not None:
        settled = door.router.commitment_report(
            report, tenant=session.archive.tenant, calling_ae=calling_ae
        )
    if not settled:
        log.info(
            "storage commitment report %s from %s: no delivery of ours to settle",
            report.transaction_uid,
            calling_ae,
        )
    return SUCCESS, None


__all__ = [
    "COMMITMENT_SERVICE",
    "commitment_report",
    "handle_n_action",
    "handle_n_event_report",
]
