"""Small synthetic studies and rejection notes (Key Object Selection Documents) made with
pydicom, independently of kho's own note builder, for the corrections tests."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from tests.helpers.part10 import part10_bytes

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
KOS = "1.2.840.10008.5.1.4.1.1.88.59"


@dataclass
class Made:
    """One synthetic instance: its UIDs and Part 10 bytes."""

    study: str
    series: str
    sop: str
    data: bytes
    sop_class: str = CT_IMAGE


@dataclass
class Study:
    uid: str
    patient_id: str
    series: dict[str, list[Made]] = field(default_factory=dict)

    @property
    def instances(self) -> list[Made]:
        return [m for members in self.series.values() for m in members]

    def write(self, folder: Path) -> list[Path]:
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for m in self.instances:
            path = folder / f"{m.sop}.dcm"
            path.write_bytes(m.data)
            paths.append(path)
        return paths


def _part10(ds: Dataset) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(str(ds.SOPClassUID))
    meta.MediaStorageSOPInstanceUID = UID(str(ds.SOPInstanceUID))
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return part10_bytes(ds)


def make_study(
    patient_id: str = "IOCM-1",
    *,
    series: int = 2,
    per_series: int = 3,
    size: int = 64,
    study_uid: str | None = None,
) -> Study:
    """A CT study of ``series`` series of ``per_series`` native 16-bit images (big
    enough to get a thumbnail and at-rest pixels from the finisher)."""
    study = Study(study_uid or str(generate_uid()), patient_id)
    for s in range(series):
        series_uid = str(generate_uid())
        members = study.series.setdefault(series_uid, [])
        for n in range(per_series):
            ds = Dataset()
            ds.PatientID, ds.PatientName = patient_id, "Iocm^Test"
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study.uid, series_uid
            ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE, generate_uid()
            ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20240102", "101500", "ACC-IOCM"
            ds.StudyID, ds.Modality = "1", "CT"
            ds.SeriesNumber, ds.InstanceNumber = s + 1, n + 1
            ds.Rows = ds.Columns = size
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
            ds.PixelRepresentation, ds.SamplesPerPixel = 0, 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            pixels = (np.arange(size * size, dtype=np.uint16) * (n + 1 + s)) % 4096
            ds.PixelData = pixels.astype(np.uint16).tobytes()
            members.append(Made(study.uid, series_uid, str(ds.SOPInstanceUID), _part10(ds)))
    return study


def rejection_note(
    named: list[Made],
    *,
    code: str = "113001",
    meaning: str = "Rejected for Quality Reasons",
    patient_id: str = "IOCM-1",
    study_uid: str | None = None,
    evidence: Sequence | None = None,
    drop_evidence: bool = False,
) -> tuple[str, bytes]:
    """A Key Object Selection Document titled (code, DCM, meaning) naming ``named``
    through Current Requested Procedure Evidence Sequence; (its SOP Instance UID, bytes).
    ``evidence``: that sequence as given (hostile tests); ``drop_evidence``: none at all."""
    ds = Dataset()
    ds.PatientID, ds.PatientName = patient_id, "Iocm^Test"
    ds.StudyInstanceUID = study_uid or (named[0].study if named else str(generate_uid()))
    ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid()
    ds.SOPClassUID, ds.Modality = KOS, "KO"
    ds.SeriesNumber, ds.InstanceNumber = 99, 1
    ds.ContentDate, ds.ContentTime = "20240103", "120000"
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    title = Dataset()
    title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning = code, "DCM", meaning
    ds.ConceptNameCodeSequence = Sequence([title])
    template = Dataset()
    template.MappingResource, template.TemplateIdentifier = "DCMR", "2010"
    ds.ContentTemplateSequence = Sequence([template])
    ds.ReferencedPerformedProcedureStepSequence = Sequence()
    content = []
    for m in named:
        ref = Dataset()
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = m.sop_class, m.sop
        item = Dataset()
        item.RelationshipType, item.ValueType = "CONTAINS", "IMAGE"
        item.ReferencedSOPSequence = Sequence([ref])
        content.append(item)
    ds.ContentSequence = Sequence(content)
    if evidence is not None:
        ds.CurrentRequestedProcedureEvidenceSequence = evidence
    elif not drop_evidence:
        studies: dict[str, dict[str, list[Made]]] = {}
        for m in named:
            studies.setdefault(m.study, {}).setdefault(m.series, []).append(m)
        items = []
        for study_uid_, by_series in studies.items():
            study_item = Dataset()
            study_item.StudyInstanceUID = study_uid_
            series_items = []
            for series_uid, members in by_series.items():
                series_item = Dataset()
                series_item.SeriesInstanceUID = series_uid
                refs = []
                for m in members:
                    ref = Dataset()
                    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = m.sop_class, m.sop
                    refs.append(ref)
                series_item.ReferencedSOPSequence = Sequence(refs)
                series_items.append(series_item)
            study_item.ReferencedSeriesSequence = Sequence(series_items)
            items.append(study_item)
        ds.CurrentRequestedProcedureEvidenceSequence = Sequence(items)
    return str(ds.SOPInstanceUID), _part10(ds)
