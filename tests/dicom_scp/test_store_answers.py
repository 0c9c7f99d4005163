"""What a C-STORE answers for the archive's identity rules (issue 12, items 1 and 6), on both
C-STORE paths (kho's fast path, pynetdicom's handler) and both catalog engines: an instance
the archive catalogued under an invented 2.25 UID gets Warning 0xB000 (coercion) naming it;
one that contradicts the catalog gets 0xC410 naming the conflict.  The sender is dcmtk's
storescu with real files (pydicom's CT_small.dcm, altered with pydicom)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pydicom.data
import pytest
from pydicom.uid import generate_uid

from kho.archive.config import Settings
from kho.dicom_scp import handlers
from kho.dicom_scp.server import DicomServer, build_ae, event_handlers
from tests.dicom_scp.test_qr import findscu
from tests.helpers import dcmtk
from tests.helpers.postgres import ENGINES, archive_on

CT_SMALL = Path(pydicom.data.get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]


@pytest.fixture(params=[(e, p) for e in ENGINES for p in ("fast", "pynetdicom")], ids=str)
def peers(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """An archive on one engine, its DICOM port answering C-STORE through kho's fast path
    or through pynetdicom's handler (the server without kho's receive path)."""
    engine, path = request.param
    settings = Settings(data_dir=tmp_path / "data", dicom_port=0, http_port=0, fsync=False)
    with archive_on(engine, settings) as archive:
        archive.derivers = []
        if path == "fast":
            server = DicomServer(archive).start()
            try:
                yield {"archive": archive, "port": server.port, "tmp": tmp_path}
            finally:
                server.stop()
            return
        ae = build_ae(archive)
        plain = [h for h in event_handlers(archive) if h[1] is not handlers.handle_association_open]
        scp = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=plain)
        try:
            yield {"archive": archive, "port": scp.server_address[1], "tmp": tmp_path}
        finally:
            ae.shutdown()


def ct_small(tmp_path: Path, name: str, **changes: str | None) -> tuple[Path, str]:
    """CT_small.dcm with a new SOP Instance UID and ``changes`` (None deletes), written to
    tmp_path: (its path, its SOP Instance UID)."""
    ds = pydicom.dcmread(CT_SMALL)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    path = tmp_path / f"{name}.dcm"
    ds.save_as(path)
    return path, str(ds.SOPInstanceUID)


def store(peers: dict[str, Any], path: Path) -> tuple[str, str, str]:
    """storescu -d: (the response's DIMSE status line, its Error Comment, the whole log)."""
    result = dcmtk.storescu(peers["port"], [path], extra=("-d",))
    log = result.stdout + result.stderr
    statuses = re.findall(r"DIMSE Status\s*: (0x[0-9a-f]{4}[^\n]*)", log)
    assert statuses, log[-3000:]
    comments = re.findall(r"\(0000,0902\) LO \[([^\]]*)\]", log)
    return statuses[-1], comments[-1] if comments else "", log


def invented(comment: str, keyword: str) -> str:
    found = re.search(rf"{keyword}=(2\.25\.\d+)", comment)
    assert found, comment
    return found.group(1)


def test_missing_series_uid_answers_coercion_warning(peers: dict[str, Any]) -> None:
    path, sop = ct_small(peers["tmp"], "noseries", SeriesInstanceUID=None)
    status, comment, log = store(peers, path)
    assert status.startswith("0xb000"), log[-3000:]
    assert "Coercion of Data Elements" in status, status
    series = invented(comment, "SeriesInstanceUID")
    assert len(comment) <= 64
    record = peers["archive"].catalog.get_instance(sop)
    assert record is not None and record.series_uid == series
    # and a peer finds it under that UID
    answers, find_log = findscu(
        peers["port"],
        "-S",
        ["QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={record.study_uid}",
         f"SeriesInstanceUID={series}", "SOPInstanceUID"],
        peers["tmp"] / "find",
    )  # fmt: skip
    assert [str(a.SOPInstanceUID) for a in answers] == [sop], find_log[-3000:]


def test_missing_study_and_series_uids_name_what_fits(peers: dict[str, Any]) -> None:
    path, sop = ct_small(peers["tmp"], "nouids", StudyInstanceUID=None, SeriesInstanceUID=None)
    status, comment, log = store(peers, path)
    assert status.startswith("0xb000"), log[-3000:]
    assert len(comment) <= 64, comment
    record = peers["archive"].catalog.get_instance(sop)
    assert record is not None
    assert record.study_uid.startswith("2.25.") and record.series_uid.startswith("2.25.")
    # the first invented UID whole, the other named or counted
    assert invented(comment, "StudyInstanceUID") == record.study_uid
    assert f"SeriesInstanceUID={record.series_uid}" in comment or "(+1)" in comment, comment


def test_identity_conflict_answers_c410_naming_it(peers: dict[str, Any]) -> None:
    study = generate_uid()
    first, sop_a = ct_small(peers["tmp"], "a", PatientID="SPLIT-A", StudyInstanceUID=study)
    second, sop_b = ct_small(
        peers["tmp"],
        "b",
        PatientID="SPLIT-B",
        PatientName="Beta^Bob",
        StudyInstanceUID=study,
        SeriesInstanceUID=generate_uid(),
    )
    status, _comment, log = store(peers, first)
    assert status.startswith("0x0000"), log[-3000:]
    status, comment, log = store(peers, second)
    assert status.startswith("0xc410"), log[-3000:]
    assert "SPLIT-A" in comment and "SPLIT-B" in comment, comment
    catalog = peers["archive"].catalog
    assert catalog.get_instance(sop_a) is not None
    assert catalog.get_instance(sop_b) is None
