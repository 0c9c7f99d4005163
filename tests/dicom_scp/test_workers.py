"""`kho serve --workers 2` on the embedded default: two processes, one port, one data
directory; what either acknowledged (from its own ingest spool) the other retrieves bit for
bit, before and after the background finishers have moved it into the object store."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pydicom

from kho.archive.catalog import open_catalog
from kho.archive.dataset.part10 import read_file_meta
from kho.bench.phantom import write_ct_series
from tests.helpers import dcmtk
from tests.helpers.server import kho_serve


def _get_study(port: int, study_uid: str, out: Path) -> dict[str, bytes]:
    """C-GET the study with dcmtk getscu on a new association: SOP UID -> dataset bytes."""
    out.mkdir(parents=True)
    result = subprocess.run(
        [dcmtk.tool("getscu"), "-S", "-aec", "KHO", "+B", "-od", str(out),
         "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
         "127.0.0.1", str(port)],
        capture_output=True, text=True, env=dcmtk.env(), timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    got = {}
    for path in out.iterdir():
        data = path.read_bytes()
        sop = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        got[sop] = data[read_file_meta(data)[1] :]
    return got


def _storescu(port: int, files: list[Path]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [dcmtk.tool("storescu"), "-aec", "KHO", "127.0.0.1", str(port), *map(str, files)],
        env=dcmtk.env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def test_two_workers_retrieve_what_either_acknowledged(tmp_path: Path) -> None:
    files = write_ct_series(tmp_path / "ct", 16)
    sent = {}
    for path in files:
        data = path.read_bytes()
        sop = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        sent[sop] = data[read_file_meta(data)[1] :]
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    data_dir = tmp_path / "data"
    with kho_serve(data_dir, args=("--workers", "2")) as (_proc, port):
        senders = [_storescu(port, files[i::4]) for i in range(4)]
        for sender in senders:
            _out, err = sender.communicate(timeout=120)
            assert sender.returncode == 0, err[-2000:]
        # each getscu is a new association: the kernel spreads them over both processes
        for attempt in range(4):
            assert _get_study(port, study, tmp_path / f"got-{attempt}") == sent
        catalog = open_catalog(data_dir / "catalog.sqlite3")
        try:
            deadline = time.monotonic() + 120
            while catalog.unfinished_count() and time.monotonic() < deadline:
                time.sleep(0.2)
            assert catalog.unfinished_count() == 0
            formats = {r[0] for r in catalog.fetchall("SELECT pixel_format FROM instances")}
            assert formats == {"jpeg-ls"}
        finally:
            catalog.close()
        for attempt in range(2):
            assert _get_study(port, study, tmp_path / f"finished-{attempt}") == sent
