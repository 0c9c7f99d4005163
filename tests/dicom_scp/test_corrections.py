"""Rejection notes over DIMSE with dcmtk: a Key Object Selection rejection note sent with
storescu hides the instances it names from findscu (C-FIND), getscu (C-GET) and movescu
(C-MOVE to dcmtk's storescp); the archive's own background housekeeping purges them after
the delay; a data-retention note deletes at once; a note naming nothing the archive holds,
or with broken evidence, is refused with a failure status."""

from __future__ import annotations

import subprocess
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from kho.archive import keys
from kho.archive.archive import Archive
from kho.archive.config import Settings
from kho.audit import EventKind, chain_all, search
from kho.audit.auditor import Auditor
from kho.dicom_scp.server import DicomServer
from tests.dicom_scp.test_qr import _query_file, findscu, movescu
from tests.helpers import dcmtk
from tests.helpers.kos import Study, make_study, rejection_note

DELAY_S = 1.0


@pytest.fixture
def served(tmp_path: Path) -> Iterator[dict[str, Any]]:
    move_port = dcmtk.free_port()
    settings = Settings(
        data_dir=tmp_path / "data",
        dicom_port=0,
        ae_title="KHO",
        fsync=False,
        rejected_purge_delay_s=DELAY_S,
        move_destinations={"STORESCP": f"127.0.0.1:{move_port}"},
    )
    with Archive(settings) as archive:
        auditor = Auditor(archive).start()
        archive.rejection_records.append(auditor.rejection_rows)
        server = DicomServer(archive).start()
        try:
            yield {
                "archive": archive,
                "port": server.port,
                "move_port": move_port,
                "auditor": auditor,
            }
        finally:
            server.stop()
            auditor.close()


def _send(port: int, files: list[Path]) -> str:
    result = dcmtk.storescu(port, files, extra=("-v",))
    return result.stdout + result.stderr


def _found(port: int, level: str, study_uid: str, out: Path, series_uid: str = "") -> set[str]:
    """findscu (study root): the UIDs of what matches at ``level`` in the study (at image
    level, in ``series_uid``: hierarchical C-FIND names every level above)."""
    key = {"STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID"}.get(level, "SOPInstanceUID")
    keys = [f"QueryRetrieveLevel={level}", f"StudyInstanceUID={study_uid}", key]
    if series_uid:
        keys.insert(2, f"SeriesInstanceUID={series_uid}")
    answers, log = findscu(port, "-S", keys, out)
    assert "Final Find Response (Success)" in log, log
    return {str(a.get(key, "")) for a in answers}


def _images(port: int, study: Study, out: Path, also: tuple[str, ...] = ()) -> set[str]:
    """Every instance findscu finds in the study's series (and ``also``: more series)."""
    found: set[str] = set()
    for n, series_uid in enumerate([*study.series, *also]):
        found |= _found(port, "IMAGE", study.uid, out / str(n), series_uid)
    return found


def _received(folder: Path) -> set[str]:
    out = set()
    for path in folder.rglob("*"):
        if path.is_file():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out.add(str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID))
    return out


def test_a_note_sent_with_storescu_hides_its_instances_from_find_get_and_move(
    served: dict[str, Any], tmp_path: Path
) -> None:
    archive: Archive = served["archive"]
    port = served["port"]
    study = make_study(series=2, per_series=3)
    log = _send(port, study.write(tmp_path / "study"))
    assert log.count("Received Store Response (Success)") == 6, log
    first, second = list(study.series.values())
    named = [*first, second[0]]
    prefixes = [archive.catalog.require_instance(m.sop).object_prefix for m in named]
    note_uid, note = rejection_note(named)
    note_path = tmp_path / "note.dcm"
    note_path.write_bytes(note)

    log = _send(port, [note_path])
    assert "Received Store Response (Success)" in log, log

    # audited with the rejection: who sent it, through which door, what it withdrew
    chain_all(archive.catalog)
    [record] = search(archive.catalog, event=EventKind.INSTANCES_ACCESSED)
    assert (record.action, record.user_id, record.via) == ("D", "STORESCU", "C-STORE")
    assert all(m.sop in record.message for m in named)
    kept = {m.sop for m in second[1:]}
    series = _found(port, "SERIES", study.uid, tmp_path / "f2")
    assert first[0].series not in series and second[0].series in series
    note_series = (series - set(study.series)).pop()
    assert _images(port, study, tmp_path / "f1", (note_series,)) == kept | {note_uid}
    # C-GET of the study: what is left, and the note
    query = _query_file(tmp_path, "q", QueryRetrieveLevel="STUDY", StudyInstanceUID=study.uid)
    got = tmp_path / "got"
    got.mkdir()
    result = subprocess.run(
        [dcmtk.tool("getscu"), "-v", "-S", "-aec", "KHO", "-od", str(got), "127.0.0.1",
         str(port), str(query)],
        capture_output=True, text=True, env=dcmtk.env(), timeout=60,
    )  # fmt: skip
    assert _received(got) <= kept | {note_uid}, result.stderr[-2000:]
    assert kept <= _received(got)
    # C-GET naming a rejected instance: nothing comes
    rejected_query = _query_file(
        tmp_path,
        "r",
        QueryRetrieveLevel="IMAGE",
        StudyInstanceUID=study.uid,
        SeriesInstanceUID=first[0].series,
        SOPInstanceUID=first[0].sop,
    )
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    subprocess.run(
        [dcmtk.tool("getscu"), "-S", "-aec", "KHO", "-od", str(nothing), "127.0.0.1",
         str(port), str(rejected_query)],
        capture_output=True, text=True, env=dcmtk.env(), timeout=60,
    )  # fmt: skip
    assert _received(nothing) == set()
    # C-MOVE to dcmtk's storescp: the same
    with dcmtk.run_storescp(
        tmp_path / "moved", port=served["move_port"], ae_title="STORESCP"
    ) as scp:
        log = movescu(port, "STORESCP", [query])
        assert _received(scp.folder) == kept | {note_uid}, log[-2000:]

    # the finisher's housekeeping (every few seconds, in this process) purges them
    deadline = time.monotonic() + DELAY_S + 20
    while archive.stats()["rejected"]["purged"] < 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert archive.stats()["rejected"] == {"pending_purge": 0, "purged": 4}
    assert not any(list(archive.store.list(keys.objects_under(p))) for p in prefixes)


def test_a_data_retention_note_deletes_at_once(served: dict[str, Any], tmp_path: Path) -> None:
    archive: Archive = served["archive"]
    port = served["port"]
    study = make_study(series=1, per_series=2)
    _send(port, study.write(tmp_path / "study"))
    prefixes = [archive.catalog.require_instance(m.sop).object_prefix for m in study.instances]
    note_path = tmp_path / "note.dcm"
    note_path.write_bytes(
        rejection_note(study.instances, code="113039", meaning="Data Retention Policy Expired")[1]
    )
    log = _send(port, [note_path])
    assert "Received Store Response (Success)" in log, log
    assert _found(port, "STUDY", study.uid, tmp_path / "f") == set()
    assert not any(list(archive.store.list(keys.objects_under(p))) for p in prefixes)
    assert archive.stats()["rejected"] == {"pending_purge": 0, "purged": 2}


def test_refused_notes_get_a_failure_status(served: dict[str, Any], tmp_path: Path) -> None:
    archive: Archive = served["archive"]
    port = served["port"]
    study = make_study(series=1, per_series=1)
    _send(port, study.write(tmp_path / "study"))
    unknown = make_study("IOCM-U", series=1, per_series=1)
    for name, data in (
        ("unknown", rejection_note(unknown.instances, patient_id="IOCM-U")[1]),
        ("no evidence", rejection_note(study.instances, drop_evidence=True)[1]),
    ):
        path = tmp_path / f"{name}.dcm"
        path.write_bytes(data)
        log = _send(port, [path])
        # 0xA900: Data Set does not match SOP Class (the note's evidence is unusable)
        assert "Store Response (Error: DataSetDoesNotMatchSOPClass)" in log, log
    assert _images(port, study, tmp_path / "f") == {study.instances[0].sop}
    assert archive.stats()["rejected"] == {"pending_purge": 0, "purged": 0}
