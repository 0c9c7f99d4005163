"""Patient management from the hospital information system (HL7 ADT): patients registered,
updated, merged and re-identified in a tenant's catalog, their citizen ID and other
identifiers, and the journal of the messages that said so.  Imports the catalog only."""

from kho.archive.patients.records import (
    DEFAULT_CITIZEN_ISSUER,
    PatientRecord,
    RecordError,
    check_citizen_id,
    is_citizen_id,
)
from kho.archive.patients.service import (
    PatientChange,
    change_id,
    follow_merges,
    merge,
    register,
    surviving_key,
)

__all__ = [
    "DEFAULT_CITIZEN_ISSUER",
    "PatientChange",
    "PatientRecord",
    "RecordError",
    "change_id",
    "check_citizen_id",
    "follow_merges",
    "is_citizen_id",
    "merge",
    "register",
    "surviving_key",
]
