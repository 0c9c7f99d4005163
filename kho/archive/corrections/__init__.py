"""Corrections (IHE Imaging Object Change Management): rejection notes received or made
by an admin hide the instances they name from every query and retrieval, and the
instances are deleted after a delay (kho.archive.corrections.service)."""

from kho.archive.corrections.notes import (
    DATA_RETENTION,
    KOS_SOP_CLASS,
    REASONS,
    Reference,
    RejectionNote,
    RejectionReason,
    build_note,
    may_be_note,
    read_note,
    reason_for,
)
from kho.archive.corrections.service import (
    Rejection,
    RejectionRows,
    WithdrawnStudy,
    check_note,
    purge_due,
    reject,
    rejected_counts,
)

__all__ = [
    "DATA_RETENTION",
    "KOS_SOP_CLASS",
    "REASONS",
    "Reference",
    "Rejection",
    "RejectionNote",
    "RejectionReason",
    "RejectionRows",
    "WithdrawnStudy",
    "build_note",
    "check_note",
    "may_be_note",
    "purge_due",
    "read_note",
    "reason_for",
    "reject",
    "rejected_counts",
]
