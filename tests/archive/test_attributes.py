"""kho's own catalog reader (read_catalog_values) gives exactly pydicom's attributes, and
declines where it could not."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pydicom.config
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from kho.archive.dataset.attributes import (
    InstanceAttributes,
    check_uid,
    extract_attributes,
    read_catalog_values,
    read_header,
)
from kho.archive.dataset.part10 import parse_part10
from kho.errors import DatasetMismatchError, KhoError
from tests.archive.test_ingest import part10_of
from tests.conftest import pydicom_test_files, sample_files


def _both(data: bytes) -> tuple[InstanceAttributes | None, InstanceAttributes]:
    """(kho's reading or None where it declines, pydicom's reading)."""
    layout = parse_part10(data)
    split = layout.pixels.element_offset if layout.pixels else None
    reference = extract_attributes(read_header(data, split), sop_uid_fallback="1.2.3.4")
    values = read_catalog_values(data, layout)
    if values is None:
        return None, reference
    return extract_attributes(values, sop_uid_fallback="1.2.3.4"), reference


def _equal_or_declined(data: bytes) -> bool:
    """True where kho read the attributes (and they equal pydicom's)."""
    ours, reference = _both(data)
    if ours is None:
        return False
    assert dataclasses.asdict(ours) == dataclasses.asdict(reference)
    return True


def test_every_sample_and_pydicom_file_reads_as_pydicom_reads_it() -> None:
    read = declined = 0
    for path in [*sample_files(), *pydicom_test_files()]:
        data = path.read_bytes()
        try:
            layout = parse_part10(data)
            split = layout.pixels.element_offset if layout.pixels else None
            extract_attributes(read_header(data, split), sop_uid_fallback="1.2.3.4")
        except KhoError:
            continue  # a file kho refuses with pydicom's reading too (hostile or not DICOM)
        if _equal_or_declined(data):  # must not raise where pydicom's reading did not
            read += 1
        else:
            declined += 1
    # the fast reader must be the common case, not a curiosity
    assert read > 2 * declined, (read, declined)


def _part10(ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> bytes:
    ds.SOPClassUID = ds.get("SOPClassUID", "1.2.840.10008.5.1.4.1.1.2")
    ds.SOPInstanceUID = ds.get("SOPInstanceUID", "1.2.826.0.1.3680043.10.1425.7.1")
    return part10_of(ds, syntax)


def _rich_dataset() -> Dataset:
    ds = Dataset()
    ds.PatientName = "Müller^Jürgen"
    ds.PatientID = "ID 42 "
    ds.StudyInstanceUID = "1.2.3.4.5"
    ds.SeriesInstanceUID = "1.2.3.4.6"
    ds.StudyDescription = "CHEST "
    ds.SeriesDescription = "A \\B  "  # two values, inner padding pydicom strips
    ds.BodyPartExamined = "CHEST"
    ds.Modality = "CT"
    ds.SeriesNumber = "3"
    ds.InstanceNumber = "12"
    ds.NumberOfFrames = "1"
    ds.Rows = 512
    ds.Columns = 256
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.PixelRepresentation = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.StudyDate = "20261201"
    ds.StudyTime = "101500.123"
    ds.ReferringPhysicianName = "Dr^Who\\Dr^No"
    ds.PixelData = b"\x00\x01" * 16
    return ds


@pytest.mark.parametrize(
    "syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]
)
@pytest.mark.parametrize("charset", [None, "ISO_IR 100", "ISO_IR 192"])
def test_values_read_as_pydicom_reads_them(syntax: str, charset: str | None) -> None:
    ds = _rich_dataset()
    if charset:
        ds.SpecificCharacterSet = charset
    data = _part10(ds, syntax)
    assert _equal_or_declined(data), "this dataset is the fast reader's case"


def _declines(ds: Dataset) -> None:
    data = _part10(ds)
    ours, reference = _both(data)
    assert ours is None
    assert reference.sop_uid  # pydicom's reading still serves it


def test_other_character_sets_are_left_to_pydicom() -> None:
    ds = _rich_dataset()
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    ds.PatientName = "Yamada^Tarou=山田^太郎"
    _declines(ds)
    ds.SpecificCharacterSet = "ISO_IR 144"  # Cyrillic: another single-byte codec
    ds.PatientName = "\u041b\u044e\u043a\u0441\u0435\u043c\u0431\u0443\u0440\u0433"
    _declines(ds)


def test_catalogued_sequences_are_left_to_pydicom() -> None:
    ds = _rich_dataset()
    item = Dataset()
    item.CodeValue = "CT-1"
    ds.ProcedureCodeSequence = [item]
    _declines(ds)


def test_integer_strings_pydicom_tolerates_are_left_to_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # pydicom's default: kho's DICOM server turns its validation off process-wide, and
    # another test in this process may have built one
    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.WARN)
    ds = _rich_dataset()
    ds.InstanceNumber = "5.0"
    with pytest.warns(UserWarning):  # pydicom's own complaint when reading it back
        _declines(ds)


def test_invalid_utf8_is_left_to_pydicom() -> None:
    ds = _rich_dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    data = bytearray(_part10(ds))
    at = data.index(b"CHEST ")  # StudyDescription: a text VR decoded by the charset
    data[at : at + 2] = b"\xc3\x28"  # not UTF-8
    layout = parse_part10(bytes(data))
    assert read_catalog_values(bytes(data), layout) is None


def test_a_vr_other_than_the_dictionary_s_is_left_to_pydicom() -> None:
    data = bytearray(_part10(_rich_dataset()))
    at = data.index(b"\x28\x00\x10\x00US")  # Rows, explicit VR US
    data[at + 4 : at + 6] = b"SS"
    assert read_catalog_values(bytes(data), parse_part10(bytes(data))) is None


def test_repeated_tags_are_left_to_pydicom(tmp_path: Path) -> None:
    data = _part10(_rich_dataset())
    element = b"\x08\x00\x60\x00CS\x02\x00CT"  # Modality
    at = data.index(element)
    doubled = data[:at] + element + data[at:]
    layout = parse_part10(doubled)
    assert layout.top_level is not None and layout.top_level.duplicated
    assert read_catalog_values(doubled, layout) is None


def test_values_after_the_pixel_data_are_left_to_pydicom() -> None:
    """pydicom reads the header up to the pixel data; an out-of-order element after it
    must not be read by kho's reader either."""
    ds = _rich_dataset()
    del ds.Modality
    data = _part10(ds) + b"\x08\x00\x60\x00CS\x02\x00MR"  # Modality, after (7FE0,0010)
    ours, reference = _both(data)
    assert ours is None and reference.modality == ""


@pytest.mark.parametrize("uid", ["1..2", "1.2.", ".1.2", "1.2\\3", "1.2 3", "1" * 65, ""])
def test_uids_no_dicomweb_path_could_name_are_refused(uid: str) -> None:
    with pytest.raises(DatasetMismatchError):
        check_uid(uid, "Study Instance UID")


def test_tolerated_uids_come_with_a_warning() -> None:
    warnings_: list[str] = []
    assert check_uid("1.2.ABC-4_5", "Series Instance UID", warnings_) == "1.2.ABC-4_5"
    assert warnings_ and "non-conformant" in warnings_[0]
