"""Storage commitment (PS3.4 Annex J, Push Model) toward a destination: after a batch is
stored, kho asks the destination to commit the instances (N-ACTION on an association of
its own, proposing to receive the answer there: SCP/SCU role selection) and waits a
while for the N-EVENT-REPORT.  A report that comes later, on an association the
destination opens to kho, reaches :meth:`kho.routing.router.Router.commitment_report`
through the DICOM door.

This exchange is rare and small: pynetdicom does it as it is.
"""

from __future__ import annotations

import logging
import queue
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt

from kho.routing.errors import DestinationError

log = logging.getLogger(__name__)

STORAGE_COMMITMENT_PUSH = "1.2.840.10008.1.20.1"
#: the well-known SOP Instance of the Push Model (PS3.4 J.3.5)
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
#: N-ACTION Action Type ID: Request Storage Commitment
REQUEST_COMMITMENT = 1


@dataclass
class CommitmentReport:
    """What a destination's N-EVENT-REPORT said about one transaction."""

    transaction_uid: str
    #: (SOP Class UID, SOP Instance UID) committed
    committed: list[tuple[str, str]] = field(default_factory=list)
    #: (SOP Class UID, SOP Instance UID, Failure Reason) not committed
    failed: list[tuple[str, str, int]] = field(default_factory=list)


def parse_report(dataset: Dataset) -> CommitmentReport:
    """The Event Information of a Storage Commitment N-EVENT-REPORT (event type 1: all
    committed; 2: some failed; the lists say which)."""
    report = CommitmentReport(str(dataset.get("TransactionUID", "") or ""))
    for item in dataset.get("ReferencedSOPSequence", None) or []:
        report.committed.append(
            (
                str(item.get("ReferencedSOPClassUID", "") or ""),
                str(item.get("ReferencedSOPInstanceUID", "") or ""),
            )
        )
    for item in dataset.get("FailedSOPSequence", None) or []:
        report.failed.append(
            (
                str(item.get("ReferencedSOPClassUID", "") or ""),
                str(item.get("ReferencedSOPInstanceUID", "") or ""),
                int(item.get("FailureReason", 0x0110) or 0x0110),
            )
        )
    return report


def request_dataset(transaction_uid: str, references: Sequence[tuple[str, str]]) -> Dataset:
    """The N-ACTION's Action Information: the transaction and the instances."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    items = []
    for sop_class, sop_uid in references:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_uid
        items.append(item)
    ds.ReferencedSOPSequence = items
    return ds


def request_commitment(
    host: str,
    port: int,
    *,
    calling_ae: str,
    called_ae: str,
    transaction_uid: str,
    references: Sequence[tuple[str, str]],
    wait_s: float,
    tls: ssl.SSLContext | None = None,
    timeout: float = 60.0,
) -> CommitmentReport | None:
    """Ask for commitment of ``references``; the report if it came on this association
    within ``wait_s``, else None (it may come later, to kho's DICOM port).
    DestinationError when the request itself failed."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(STORAGE_COMMITMENT_PUSH)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    reports: queue.Queue[CommitmentReport] = queue.Queue()

    def on_report(event: Any) -> tuple[int, None]:
        try:
            reports.put(parse_report(event.event_information))
        except Exception:  # a malformed report: answered, and the rows wait their timeout
            log.exception("forwarding: unreadable storage commitment report")
            return 0x0110, None
        return 0x0000, None

    options: dict[str, Any] = {
        "ae_title": called_ae,
        "ext_neg": [build_role(STORAGE_COMMITMENT_PUSH, scu_role=True, scp_role=True)],
        "evt_handlers": [(evt.EVT_N_EVENT_REPORT, on_report)],
    }
    if tls is not None:
        options["tls_args"] = (tls, host)
    association = ae.associate(host, port, **options)
    if not association.is_established:
        raise DestinationError(f"{called_ae} refused the storage commitment association")
    try:
        status, _reply = association.send_n_action(
            request_dataset(transaction_uid, references),
            REQUEST_COMMITMENT,
            STORAGE_COMMITMENT_PUSH,
            STORAGE_COMMITMENT_INSTANCE,
        )
        code = int(getattr(status, "Status", 0xFFFF)) if status is not None else 0xFFFF
        if code != 0x0000:
            raise DestinationError(f"{called_ae} answered the commitment request with {code:#06x}")
        try:
            return reports.get(timeout=wait_s) if wait_s > 0 else None
        except queue.Empty:
            return None
    finally:
        end_association(association)


def end_association(association: Any) -> None:
    """Release a pynetdicom association, or abort it where releasing cannot work:
    pynetdicom's release() waits for the reactor thread to pause, forever when that thread
    has already ended (the peer closed the connection)."""
    if association.is_established and association.is_alive():
        association.release()
    else:
        association.abort()


__all__ = [
    "STORAGE_COMMITMENT_INSTANCE",
    "STORAGE_COMMITMENT_PUSH",
    "CommitmentReport",
    "end_association",
    "parse_report",
    "request_commitment",
    "request_dataset",
]
