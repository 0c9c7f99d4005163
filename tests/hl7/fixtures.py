"""Helpers shared by the HL7, patient and worklist tests: settings with the HL7 keys the
lead adds to kho's Settings, small real Part 10 instances, HL7 messages."""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from kho.archive.config import Settings
from tests.helpers.part10 import part10_bytes


class Hl7Settings(Settings):
    """Settings with the HL7 door's keys (read by kho with getattr and these defaults)."""

    hl7_port: int = 0
    hl7_senders: dict[str, str] = {}
    citizen_id_issuer: str = "CCCD"
    hl7_patient_id_issuer: str = ""
    hl7_housekeeping_interval_s: float = 3600.0


def instance(
    patient_id: str,
    patient_name: str = "",
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    accession: str = "",
    birth_date: str = "",
    sex: str = "",
    modality: str = "OT",
    charset: str = "ISO_IR 192",
    other_ids: tuple[tuple[str, str], ...] = (),
) -> bytes:
    """A small Secondary Capture instance (8x8, 8 bits) as Part 10 bytes."""
    ds = Dataset()
    ds.SpecificCharacterSet = charset
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.PatientBirthDate = birth_date
    ds.PatientSex = sex
    ds.AccessionNumber = accession
    ds.Modality = modality
    ds.StudyDate = "20240601"
    ds.StudyTime = "101500"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    if other_ids:
        items = []
        for identifier, issuer in other_ids:
            item = Dataset()
            item.PatientID = identifier
            item.IssuerOfPatientID = issuer
            item.TypeOfPatientID = "TEXT"
            items.append(item)
        ds.OtherPatientIDsSequence = items
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.arange(64, dtype=np.uint8).tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return part10_bytes(ds)
