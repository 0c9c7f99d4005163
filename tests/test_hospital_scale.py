"""Hospital scale: several `kho serve` processes on one PostgreSQL catalog and one S3
bucket (SeaweedFS) behave as one archive; an object-store outage mid-ingest answers
0xA700, leaves nothing half-visible, and the archive resumes by itself."""

from __future__ import annotations

import hashlib
import subprocess
import threading
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config

from kho.archive.archive import Archive
from kho.archive.config import Settings
from kho.archive.dataset.part10 import read_file_meta
from kho.bench.phantom import write_ct_series
from tests.helpers import dcmtk
from tests.helpers.postgres import postgres_database
from tests.helpers.server import kho_serve

CT = "1.2.840.10008.5.1.4.1.1.2"


def _dataset(data: bytes) -> bytes:
    return data[read_file_meta(data)[1] :]


@pytest.fixture
def shared(bucket_url: str, tmp_path: Path):
    """Environment for kho processes sharing one PostgreSQL database and one bucket."""
    with postgres_database() as catalog_url:
        yield (
            {
                "KHO_CATALOG_URL": catalog_url,
                "KHO_STORAGE_URL": bucket_url,
            },
            Settings(data_dir=tmp_path / "local", catalog_url=catalog_url, storage_url=bucket_url),
        )


def test_two_processes_are_one_archive(shared, tmp_path: Path) -> None:
    env, settings = shared
    files = write_ct_series(tmp_path / "ct", 4, rows=128, cols=128)
    with (
        kho_serve(tmp_path / "a", env=env) as (_a, port_a),
        kho_serve(tmp_path / "b", env=env) as (_b, port_b),
    ):
        sent = dcmtk.storescu(port_a, files, proposal="-xe")
        assert sent.returncode == 0, sent.stderr
        # found and retrieved through the other process
        target = pydicom.dcmread(files[2], stop_before_pixels=True)
        out = tmp_path / "got"
        out.mkdir()
        got = subprocess.run(
            [dcmtk.tool("getscu"), "-S", "-aec", "KHO", "-od", str(out),
             "-k", "QueryRetrieveLevel=IMAGE",
             "-k", f"StudyInstanceUID={target.StudyInstanceUID}",
             "-k", f"SeriesInstanceUID={target.SeriesInstanceUID}",
             "-k", f"SOPInstanceUID={target.SOPInstanceUID}",
             "127.0.0.1", str(port_b)],
            capture_output=True, text=True, env=dcmtk.env(), timeout=60,
        )  # fmt: skip
        received = sorted(out.iterdir())
        assert len(received) == 1, got.stderr[-2000:]
        assert _dataset(received[0].read_bytes()) == _dataset(files[2].read_bytes())

        # the same instance stored through both processes at once: one copy
        same = files[0]
        results: list[subprocess.CompletedProcess[str]] = []
        threads = [
            threading.Thread(
                target=lambda p=port: results.append(dcmtk.storescu(p, [same], proposal="-xe"))
            )
            for port in (port_a, port_b) * 3
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(r.returncode == 0 for r in results)
    with Archive(settings) as archive:
        assert archive.catalog.counts()["instances"] == 4
        record = archive.catalog.require_instance(
            str(pydicom.dcmread(same, stop_before_pixels=True).SOPInstanceUID)
        )
        archive.catalog.fold_counters()  # the ingests' counts, kept as deltas until folded
        assert archive.catalog.fetchone(
            "SELECT num_instances FROM series WHERE series_uid = ?", (record.series_uid,)
        ) == (4,)
        prefixes = {key.rsplit(".", 1)[0] for key in archive.store.list("")}
        assert prefixes == {r.object_prefix for r in archive.catalog.iter_instances()}
        assert [p for _r, p in archive.verify() if p] == []


def _send_all(port: int, files: list[Path]) -> dict[Path, int]:
    ae = AE(ae_title="OUTAGE")
    ae.add_requested_context(CT, ExplicitVRLittleEndian)
    ae.dimse_timeout = ae.network_timeout = 60
    statuses: dict[Path, int] = {}
    assoc = ae.associate("127.0.0.1", port, ae_title="KHO")
    assert assoc.is_established
    try:
        for path in files:
            status = assoc.send_c_store(path)
            statuses[path] = int(status.Status) if "Status" in status else -1
    finally:
        assoc.release()
    return statuses


def test_object_store_outage_mid_ingest(seaweedfs, shared, tmp_path: Path) -> None:
    env, settings = shared
    files = write_ct_series(tmp_path / "ct", 24, rows=64, cols=64)
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        with kho_serve(tmp_path / "a", env=env) as (_proc, port):
            first = _send_all(port, files[:10])
            assert set(first.values()) == {0}
            seaweedfs.stop()  # the object store goes away
            try:
                during = _send_all(port, files[10:14])  # each waits out the retries
            finally:
                seaweedfs.start()
            after = _send_all(port, files[14:])  # it resumes by itself
            retried = _send_all(port, files[10:14])
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    assert set(during.values()) == {0xA700}, during  # out of resources, not a crash
    assert set(after.values()) == {0} and set(retried.values()) == {0}
    with Archive(settings) as archive:
        assert archive.catalog.counts()["instances"] == 24
        assert [p for _r, p in archive.verify() if p] == []
        for path in files:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sop = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            record, data = archive.read_instance(sop)
            assert hashlib.sha256(data).hexdigest() == record.sha256
            assert _dataset(data) == _dataset(path.read_bytes())
        # whatever the outage left half-written is invisible, then swept by recovery
        archive.recover(grace_s=-1)
        prefixes = {key.rsplit(".", 1)[0] for key in archive.store.list("")}
        assert prefixes == {r.object_prefix for r in archive.catalog.iter_instances()}
