"""What the catalog keeps: an instance's row (InstanceRecord) and the attributes of an
instance, its patient, study and series (InstanceAttributes) that ingest reads from the
header and the catalog files it under."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from typing import Any

from kho.archive import keys

#: how long replaced objects stay readable after the switch (a reader that loaded the old
#: row a moment ago can still fetch them)
GARBAGE_DELAY_S = 60.0
#: the entry of ``instances.derived`` naming a pixel object written after ingest
PIXELS_OBJECT = "pixels"
#: the entry naming a header object other than ``<prefix>.header`` (the received object)
HEADER_OBJECT = "header"


def patient_key(patient_id: str, issuer: str) -> str:
    """Patients are identified by Patient ID within its issuer; hashed for a fixed-size key."""
    return hashlib.sha256(f"{issuer}\x00{patient_id}".encode()).hexdigest()[:32]


@dataclass(slots=True)
class InstanceAttributes:
    """What the catalog keeps about one instance (and its patient, study and series)."""

    # patient
    patient_id: str
    issuer_of_patient_id: str
    patient_name: str
    patient_birth_date: str
    patient_sex: str
    # study
    study_uid: str
    study_date: str
    study_time: str
    accession_number: str
    study_id: str
    study_description: str
    referring_physician_name: str
    # series
    series_uid: str
    modality: str
    series_number: int | None
    series_description: str
    body_part_examined: str
    series_date: str
    series_time: str
    # instance
    sop_uid: str
    sop_class_uid: str
    instance_number: int | None
    rows: int | None
    columns: int | None
    number_of_frames: int
    bits_allocated: int | None
    bits_stored: int | None
    pixel_representation: int | None
    samples_per_pixel: int | None
    photometric_interpretation: str
    planar_configuration: int | None
    content_date: str
    content_time: str
    sop_uid_in_dataset: bool = True
    warnings: list[str] = field(default_factory=list)
    #: UIDs the archive invented because the instance lacked them (keyword, UID)
    coerced: tuple[tuple[str, str], ...] = ()
    #: catalogued sequences present in the instance (kho.archive.catalog.sequences)
    sequences: dict[str, list[tuple[str, ...]]] = field(default_factory=dict)

    @property
    def patient_key(self) -> str:
        return patient_key(self.patient_id, self.issuer_of_patient_id)


@dataclass(slots=True)
class InstanceRecord:
    """One row of ``instances``: where an instance's objects are and how to rebuild it."""

    sop_uid: str
    series_uid: str
    study_uid: str
    sop_class_uid: str
    instance_number: int | None
    rows_: int | None
    columns_: int | None
    number_of_frames: int
    bits_allocated: int | None
    bits_stored: int | None
    pixel_representation: int | None
    samples_per_pixel: int | None
    photometric_interpretation: str
    planar_configuration: int | None
    content_date: str
    content_time: str
    transfer_syntax_uid: str
    sha256: str
    received_size: int
    stored_size: int
    object_prefix: str
    header_size: int
    pixel_split: int  # offset in the header object where the pixel value goes back in
    pixel_format: str  # "none" | "raw" | "encapsulated" | codec name ("jpeg-ls", ...) | "zstd"
    pixel_size: int  # bytes of the pixel object (0 if none)
    frame_index: str  # JSON: [[offset, length], ...] into the pixel object
    # JSON: {"metadata": key, "thumbnail": key, "pixels": key of an at-rest pixel object}
    derived: str
    received_at: float
    source: str

    @property
    def frames(self) -> list[tuple[int, int]]:
        return [(int(o), int(n)) for o, n in json.loads(self.frame_index or "[]")]

    @property
    def derived_keys(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(self.derived or "{}")
        return loaded

    @property
    def header_key(self) -> str:
        """The header object's key; the same as :attr:`pixels_key` when the instance is
        kept as one object, the Part 10 bytes exactly as received (until finished)."""
        key = self.derived_keys.get(HEADER_OBJECT)
        return str(key) if key else keys.header_key(self.object_prefix)

    @property
    def stored_as_received(self) -> bool:
        return self.pixel_format != "none" and self.header_key == self.pixels_key

    @property
    def pixels_key(self) -> str:
        """The pixel object's key: the received value at ``<prefix>.pixels``, or the at-rest
        encoding a background finisher wrote beside it (named in ``derived``)."""
        key = self.derived_keys.get(PIXELS_OBJECT)
        return str(key) if key else keys.pixels_key(self.object_prefix)


INSTANCE_COLUMNS = [f.name for f in fields(InstanceRecord)]


def fold_name(name: str) -> str:
    """Person name folded for case-insensitive matching."""
    return name.upper()
