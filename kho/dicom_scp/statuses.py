"""DIMSE status codes kho answers with, and the mapping from kho errors (one place)."""

from __future__ import annotations

from collections.abc import Sequence

from pydicom.dataset import Dataset

from kho.errors import (
    CatalogError,
    DatasetMismatchError,
    DuplicateInstanceError,
    IdentityConflictError,
    InvalidDicomError,
    KhoError,
    NotFoundError,
    QueryError,
    StorageError,
)

SUCCESS = 0x0000
# C-STORE (PS3.4 B.2.3)
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
DUPLICATE_SOP_INSTANCE = 0x0111  # PS3.7 C.4: used by archives that refuse duplicates
PROCESSING_FAILURE = 0x0110
# PS3.7 C.5 general failure status, for every DIMSE service: "Refused: Not authorized".  kho
# answers it to a registered peer asking for a service (echo, store, find, get, move) its
# registry entry does not grant; PS3.4's C-FIND/C-GET/C-MOVE tables have no closer failure
NOT_AUTHORIZED = 0x0124
NOT_AUTHORIZED_COMMENT = "service not granted to this AE title"
# kho's own in the "cannot understand" family: the instance contradicts the catalog (its
# study belongs to another patient, its series to another study); Error Comment says which
IDENTITY_CONFLICT = 0xC410
COERCION_OF_DATA_ELEMENTS = 0xB000  # C-STORE warning: the archive invented a Type 1 UID
# C-FIND / C-MOVE / C-GET (PS3.4 C.4)
QR_OUT_OF_RESOURCES = 0xA700
QR_UNABLE_TO_CALCULATE_MATCHES = 0xA701
QR_UNABLE_TO_PERFORM_SUBOPERATIONS = 0xA702
MOVE_DESTINATION_UNKNOWN = 0xA801
IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
UNABLE_TO_PROCESS = 0xC000
CANCEL = 0xFE00
PENDING = 0xFF00
PENDING_WARNING = 0xFF01
SUBOPERATIONS_WITH_FAILURES = 0xB000

_ERROR_COMMENT_LIMIT = 64  # Error Comment (0000,0902) is LO


def store_status_for(exc: BaseException) -> int:
    """The C-STORE failure status for an exception raised by the archive."""
    if isinstance(exc, IdentityConflictError):
        return IDENTITY_CONFLICT
    if isinstance(exc, DatasetMismatchError):
        return DATASET_DOES_NOT_MATCH_SOP_CLASS
    if isinstance(exc, InvalidDicomError):
        return CANNOT_UNDERSTAND
    if isinstance(exc, DuplicateInstanceError):
        return DUPLICATE_SOP_INSTANCE
    if isinstance(exc, (StorageError, CatalogError, MemoryError)):
        return OUT_OF_RESOURCES
    if isinstance(exc, (QueryError, NotFoundError)):
        return UNABLE_TO_PROCESS
    if isinstance(exc, KhoError):
        return PROCESSING_FAILURE
    return PROCESSING_FAILURE


def error_comment(message: str) -> str:
    """An Error Comment (0000,0902) from a message: one line, as long as LO holds."""
    return " ".join(message.split())[:_ERROR_COMMENT_LIMIT]


def status_dataset(status: int, comment: str | None = None) -> Dataset:
    """A status dataset with an Error Comment (truncated to what LO holds)."""
    ds = Dataset()
    ds.Status = status
    if comment:
        ds.ErrorComment = error_comment(comment)
    return ds


def coercion_comment(coerced: Sequence[tuple[str, str]]) -> str:
    """The Error Comment of a coercion warning (0xB000): ``keyword=UID`` for the UIDs the
    archive invented, as many whole as LO holds and how many more (the log has them all);
    one 2.25 UID always fits whole."""
    items = [f"{keyword}={uid}" for keyword, uid in coerced]
    for shown in range(len(items), 0, -1):
        rest = len(items) - shown
        text = "; ".join(items[:shown]) + (f" (+{rest})" if rest else "")
        if len(text) <= _ERROR_COMMENT_LIMIT:
            return text
    return error_comment(items[0]) if items else ""
