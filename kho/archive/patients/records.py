"""What the hospital information system says about a patient (PatientRecord), the rules
its values must meet, and the one error a patient change that cannot be applied raises.

The citizen ID is the 12-digit personal identification number of a Vietnamese citizen
(citizen ID card, the national e-ID app): three digits of the province of birth
registration (001-096), one of sex and century of birth, two of the year of birth, six
more.  It is checked for that shape only: a number whose sex or year digits disagree with
the demographics is kept as the HIS sent it (the HIS, not the archive, owns the person).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kho.archive.catalog import fold_name, patient_key
from kho.errors import KhoError

#: the Issuer of Patient ID a citizen ID is kept under unless the settings name another
#: (``citizen_id_issuer``): the card's name, Căn cước công dân
DEFAULT_CITIZEN_ISSUER = "CCCD"

_CITIZEN_ID = re.compile(r"^(\d{3})\d{9}$")
_DATE = re.compile(r"^\d{8}$")
#: DICOM Patient's Sex (PS3.3 C.7.1.1): M, F, O; empty when unknown
SEXES = frozenset({"M", "F", "O", ""})
#: LO and the Patient ID keep 64 characters; PN 64 per component group
MAX_ID = 64
MAX_NAME = 64 * 3


class RecordError(KhoError, ValueError):
    """A patient or order change that cannot be applied (nothing of it is): ``field``
    names the value at fault (patient_id, citizen_id, birth_date, sex, name, merged_id,
    order...), for the sender's error report."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True, slots=True)
class PatientRecord:
    """A patient as the HIS sends it.  ``None`` means "not sent: keep what is known";
    ``""`` means "clear it" (HL7's ``""``)."""

    patient_id: str
    issuer: str = ""
    #: DICOM PN form: family^given^middle^prefix^suffix
    name: str | None = None
    #: YYYYMMDD
    birth_date: str | None = None
    #: M, F, O or ""
    sex: str | None = None
    #: the 12-digit citizen ID (None: not sent)
    citizen_id: str | None = None
    #: other identifiers the HIS sent (identifier, issuer): insurance numbers and the like
    #: (None: not sent, keep those known)
    other_ids: tuple[tuple[str, str], ...] | None = None

    @property
    def key(self) -> str:
        return patient_key(self.patient_id, self.issuer)

    def checked(self) -> PatientRecord:
        """This record if every value it carries has its shape, else RecordError."""
        check_patient_id(self.patient_id, "patient_id")
        if self.birth_date and not _is_date(self.birth_date):
            raise RecordError(f"birth date {self.birth_date!r} is not YYYYMMDD", "birth_date")
        if self.sex is not None and self.sex not in SEXES:
            raise RecordError(f"sex {self.sex!r} is not M, F, O or empty", "sex")
        if self.name is not None and len(self.name) > MAX_NAME:
            raise RecordError("patient name longer than DICOM allows", "name")
        if self.citizen_id:
            check_citizen_id(self.citizen_id)
        for identifier, _issuer in self.other_ids or ():
            check_patient_id(identifier, "other_ids")
        return self


def check_patient_id(value: str, field: str) -> str:
    if not value or not value.strip():
        raise RecordError("no patient identifier", field)
    if len(value) > MAX_ID or "\\" in value or any(ord(c) < 32 for c in value):
        raise RecordError(f"patient identifier {value[:64]!r} is not a DICOM Patient ID", field)
    return value


def check_citizen_id(value: str) -> str:
    """A citizen ID of the right shape (12 digits, a province code 001-096), or
    RecordError naming what is wrong (never the number itself: errors travel in ACKs and
    logs)."""
    found = _CITIZEN_ID.match(value)
    if not found:
        raise RecordError("citizen ID must be 12 digits", "citizen_id")
    if not 1 <= int(found.group(1)) <= 96:
        raise RecordError("citizen ID starts with no province code (001-096)", "citizen_id")
    return value


def is_citizen_id(value: str) -> bool:
    try:
        check_citizen_id(value)
    except RecordError:
        return False
    return True


def _is_date(text: str) -> bool:
    if not _DATE.match(text):
        return False
    month, day = int(text[4:6]), int(text[6:8])
    return 1 <= month <= 12 and 1 <= day <= 31


__all__ = [
    "DEFAULT_CITIZEN_ISSUER",
    "PatientRecord",
    "RecordError",
    "check_citizen_id",
    "fold_name",
    "is_citizen_id",
]
