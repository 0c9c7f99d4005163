"""The ingest pipeline: every real file accepted and handed back bit for bit; bad input
refused with a precise error and nothing left behind; duplicates; crash recovery."""

from __future__ import annotations

import hashlib
import socket
import struct
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from kho.archive import keys
from kho.archive.archive import Archive
from kho.archive.catalog import PROCESS_OWNER
from kho.archive.config import DuplicatePolicy, Settings
from kho.archive.dataset.part10 import read_file_meta
from kho.archive.ingest.pipeline import IngestOutcome
from kho.errors import DatasetMismatchError, DuplicateInstanceError, InvalidDicomError, StorageError
from kho.storage.spool import is_spool_key
from tests.conftest import sample_files
from tests.helpers.part10 import part10_bytes
from tests.helpers.postgres import ENGINES, archive_on


def make_instance(
    *,
    sop_uid: str | None = None,
    study_uid: str = "1.2.826.0.1.3680043.10.1425.9.1",
    series_uid: str = "1.2.826.0.1.3680043.10.1425.9.2",
    patient_name: str = "DOE^JANE",
    pixel_value: int = 7,
) -> bytes:
    """A small, valid CT instance as Part 10 bytes."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientName = patient_name
    ds.PatientID = "P-1"
    ds.Modality = "CT"
    ds.StudyDate = "20260101"
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = struct.pack("<16H", *([pixel_value] * 16))
    return part10_of(ds)


def part10_of(ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> bytes:
    """A dataset as Part 10 bytes, with a File Meta naming its SOP class and instance."""
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return part10_bytes(ds)


@pytest.fixture(params=ENGINES)
def archive(request: pytest.FixtureRequest, settings: Settings) -> Iterator[Archive]:
    """The ingest tests run on both catalog engines."""
    with archive_on(request.param, settings) as archive:
        yield archive


def stored_keys(archive: Archive) -> list[str]:
    """Every object, once the background finisher is done with what ingest queued."""
    assert archive.finisher.wait_idle(timeout=60)
    return list(archive.store.list(""))


def test_every_sample_file_is_accepted_and_handed_back_bit_for_bit(archive: Archive) -> None:
    for path in sample_files():
        data = path.read_bytes()
        result = archive.ingest_part10(data, lenient_identity=True)
        record, back = archive.read_instance(result.sop_uid)
        assert back == data, path.name
        assert hashlib.sha256(back).hexdigest() == record.sha256
    assert not [problem for _record, problem in archive.verify() if problem]


@pytest.mark.parametrize(
    ("mutate", "error"),
    [
        (lambda d: b"", InvalidDicomError),
        (lambda d: b"\x00" * 300, InvalidDicomError),
        (lambda d: b"garbage" * 100, InvalidDicomError),
        (lambda d: d[: len(d) - 5], InvalidDicomError),  # truncated pixel data
        (lambda d: d[:200], InvalidDicomError),  # truncated inside the meta / dataset
    ],
    ids=["empty", "zeros", "garbage", "truncated-pixels", "truncated-header"],
)
def test_bad_input_is_refused_and_leaves_nothing(archive: Archive, mutate, error) -> None:
    with pytest.raises(error):
        archive.ingest_part10(mutate(make_instance()))
    assert stored_keys(archive) == []
    assert archive.catalog.counts()["instances"] == 0


def _set_length(data: bytes, tag_bytes: bytes, length: int) -> bytes:
    """Overwrite the 16-bit length of the first explicit-VR short element with this tag."""
    pos = data.index(tag_bytes, 132)
    return data[: pos + 6] + struct.pack("<H", length) + data[pos + 8 :]


def test_absurd_element_lengths_are_refused(archive: Archive) -> None:
    data = make_instance()
    # Patient's Name (0010,0010) claiming 65535 bytes
    hostile = _set_length(data, b"\x10\x00\x10\x00PN", 0xFFFF)
    with pytest.raises(InvalidDicomError):
        archive.ingest_part10(hostile)
    # Pixel Data (7FE0,0010) OW with a 4 GiB - 2 length
    pos = data.index(b"\xe0\x7f\x10\x00OW")
    huge = data[: pos + 8] + struct.pack("<I", 0xFFFFFFFE) + data[pos + 12 :]
    with pytest.raises(InvalidDicomError):
        archive.ingest_part10(huge)
    assert stored_keys(archive) == []


def test_deeply_nested_sequences_are_refused(archive: Archive) -> None:
    item = b""
    for _ in range(100):  # 100 levels of undefined-length SQ inside undefined-length items
        item = (
            b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff"
            + b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
            + item
            + b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
            + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
        )
    data = make_instance()
    pos = data.index(b"\x10\x00\x10\x00PN")  # before Patient's Name: groups stay ordered
    with pytest.raises(InvalidDicomError, match="nested"):
        archive.ingest_part10(data[:pos] + item + data[pos:])


@pytest.mark.parametrize(
    "uid",
    ["../../x", "1.2/3", "1.2\\3", "a" * 65, "1.2 3", "1.2.3\x00\x01"],
    ids=["dotdot-slash", "slash", "backslash", "too-long", "space", "control"],
)
def test_hostile_uids_are_refused(archive: Archive, uid: str) -> None:
    with pytest.raises(DatasetMismatchError):
        archive.ingest_part10(make_instance(sop_uid=uid))
    assert stored_keys(archive) == []


def test_missing_sop_instance_uid_is_refused_for_network_input(archive: Archive) -> None:
    ds = pydicom.dcmread(BytesIO(make_instance()))
    sop = ds.SOPInstanceUID
    del ds.SOPInstanceUID
    out = BytesIO()
    ds.save_as(out)
    _meta, offset = read_file_meta(out.getvalue())
    with pytest.raises(DatasetMismatchError, match="no SOP Instance UID"):
        archive.ingest_dimse(
            out.getvalue()[offset:],
            transfer_syntax_uid=ExplicitVRLittleEndian,
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            sop_instance_uid=sop,
        )
    assert stored_keys(archive) == []


def test_object_keys_never_contain_uid_text(archive: Archive) -> None:
    sop = "1.2.826.0.1.3680043.10.1425.77.77"
    archive.ingest_part10(make_instance(sop_uid=sop))
    for key in stored_keys(archive):
        assert "1.2.826" not in key and "DOE" not in key


def test_identical_duplicate_is_success_and_stores_nothing_twice(archive: Archive) -> None:
    data = make_instance()
    first = archive.ingest_part10(data)
    objects = stored_keys(archive)
    second = archive.ingest_part10(data)
    assert first.outcome == IngestOutcome.STORED
    assert second.outcome == IngestOutcome.DUPLICATE
    assert stored_keys(archive) == objects
    assert archive.catalog.counts()["instances"] == 1
    assert archive.stats()["instances"] == 1
    # spooled, the second was appended before the commit found it stored: no row refers to
    # those bytes (the segment goes when the rest of it may), nothing is queued or pending
    record = archive.catalog.require_instance(first.sop_uid)
    assert not is_spool_key(record.pixels_key)
    assert archive.catalog.unfinished_count() == 0
    assert archive.catalog.pending_prefixes() == []


def test_different_duplicate_replaces_by_default_and_is_recorded(archive: Archive) -> None:
    sop = generate_uid()
    old = make_instance(sop_uid=sop, pixel_value=1)
    new = make_instance(sop_uid=sop, pixel_value=2)
    archive.ingest_part10(old)
    result = archive.ingest_part10(new)
    assert result.outcome == IngestOutcome.REPLACED
    _record, back = archive.read_instance(sop)
    assert back == new
    rows = archive.catalog.fetchall("SELECT old_sha256, new_sha256 FROM replacements")
    assert rows == [(hashlib.sha256(old).hexdigest(), hashlib.sha256(new).hexdigest())]
    # the old version's objects are gone; one instance counted
    prefixes = {k.rsplit(".", 1)[0] for k in stored_keys(archive)}
    assert prefixes == {_record.object_prefix}
    archive.catalog.fold_counters()  # PostgreSQL keeps counts as deltas until folded
    row = archive.catalog.fetchone("SELECT num_instances FROM series")
    assert row == (1,)


@pytest.mark.parametrize("policy", [DuplicatePolicy.KEEP, DuplicatePolicy.REJECT])
def test_duplicate_policies_keep_and_reject(tmp_path: Path, policy: DuplicatePolicy) -> None:
    settings = Settings(data_dir=tmp_path, duplicate_policy=policy)
    with Archive(settings) as archive:
        sop = generate_uid()
        old = make_instance(sop_uid=sop, pixel_value=1)
        archive.ingest_part10(old)
        objects = stored_keys(archive)
        new = make_instance(sop_uid=sop, pixel_value=2)
        if policy is DuplicatePolicy.REJECT:
            with pytest.raises(DuplicateInstanceError):
                archive.ingest_part10(new)
        else:
            assert archive.ingest_part10(new).outcome == IngestOutcome.KEPT
        assert archive.read_instance(sop)[1] == old
        assert stored_keys(archive) == objects


def test_recovery_removes_objects_of_an_interrupted_ingest(archive: Archive) -> None:
    """Objects written under a journalled prefix but never committed (a crash between the
    object writes and the catalog commit) are invisible, and recovery deletes them once the
    process that wrote them is gone; another live process's ingest in flight is left alone."""
    kept = archive.ingest_part10(make_instance())
    # finished first: the finisher journals the prefix it moves an instance to, and would
    # otherwise show it among the pending ones below when it starts late (a loaded machine)
    assert archive.finisher.wait_idle(timeout=60)
    dead = "i/ab/cd/" + "ab" * 20 + "-0123456789abcdef"
    live = "i/ab/cd/" + "cd" * 20 + "-0123456789abcdef"
    host = socket.gethostname()
    for prefix, owner in ((dead, f"{host}:999999:1"), (live, PROCESS_OWNER)):
        archive.catalog.execute(
            "INSERT INTO pending (object_prefix, created_at, owner) VALUES (?, ?, ?)",
            (prefix, time.time(), owner),
        )
        archive.store.put(keys.header_key(prefix), b"half-written instance")
    assert archive.catalog.counts()["instances"] == 1
    assert archive.recover() == 1
    assert not archive.store.exists(keys.header_key(dead))
    assert archive.store.exists(keys.header_key(live))  # its writer may still commit
    assert archive.catalog.pending_prefixes() == [live]
    assert archive.recover(grace_s=-1) == 1  # past the grace period: abandoned
    assert archive.catalog.pending_prefixes() == []
    assert archive.read_instance(kept.sop_uid)[1]


def test_spool_outage_is_reported_and_nothing_is_visible(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "d")
    with Archive(settings) as archive:
        assert archive.spool is not None  # the default with a filesystem store
        settings.spool_dir.rmdir()
        settings.spool_dir.write_bytes(b"")  # a file where the segments must go
        with pytest.raises(StorageError):
            archive.ingest_part10(make_instance())
        assert archive.catalog.counts()["instances"] == 0
        assert archive.catalog.unfinished_count() == 0
        settings.spool_dir.unlink()
        settings.spool_dir.mkdir()
        result = archive.ingest_part10(make_instance())  # back by itself
        assert archive.read_instance(result.sop_uid)[1]


def test_storage_outage_is_reported_and_nothing_is_visible(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "d", spool="off")
    with Archive(settings) as archive:
        objects = settings.objects_dir
        objects.chmod(0o500)  # the store refuses writes (root ignores modes: use a file)
        try:
            blocker = objects / "i"
            if not blocker.exists():
                blocker.write_bytes(b"")  # a file where the fan-out folder must go
            with pytest.raises(StorageError):
                archive.ingest_part10(make_instance())
            assert archive.catalog.counts()["instances"] == 0
        finally:
            objects.chmod(0o700)
