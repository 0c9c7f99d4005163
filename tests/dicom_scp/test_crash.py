"""Durability: SIGKILL the server in the middle of a multi-association ingest; after a
restart every acknowledged instance is there, intact, and nothing is half-visible."""

from __future__ import annotations

import hashlib
import signal
import threading
import time
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config

from kho.archive.archive import Archive
from kho.archive.config import Settings
from kho.archive.dataset.part10 import read_file_meta
from tests.archive.test_ingest import make_instance
from tests.helpers.server import kho_serve

CT = "1.2.840.10008.5.1.4.1.1.2"


def _write_instances(folder: Path, count: int) -> list[Path]:
    """CT-like 256x256 instances; distinct pixels so every file has its own SHA-256."""
    folder.mkdir()
    template = pydicom.dcmread(BytesIO(make_instance()))
    rng = np.random.default_rng(5)
    paths = []
    for i in range(count):
        template.SOPInstanceUID = template.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        template.Rows = template.Columns = 256
        template.PixelData = rng.integers(0, 4096, (256, 256), dtype=np.uint16).tobytes()
        template.InstanceNumber = i + 1
        path = folder / f"{i:04d}.dcm"
        template.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _sender(port: int, files: list[Path], acked: list[Path], stop: threading.Event) -> None:
    ae = AE(ae_title="CRASHTEST")
    ae.add_requested_context(CT, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 3  # notice the death quickly
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="KHO")
        if not assoc.is_established:
            return
        for path in files:
            if stop.is_set():
                break
            status = assoc.send_c_store(path)
            if "Status" in status and status.Status == 0x0000:
                acked.append(path)
            elif not assoc.is_established:
                break
        assoc.release()
    except Exception:  # the server dies under us: that is the point
        return


def test_sigkill_during_ingest_loses_no_acknowledged_instance(tmp_path: Path) -> None:
    _config.STORE_SEND_CHUNKED_DATASET = True
    files = _write_instances(tmp_path / "in", 160)
    data_dir = tmp_path / "data"
    acked: list[Path] = []
    stop = threading.Event()
    try:
        with kho_serve(data_dir) as (proc, port):
            chunks = [files[i::4] for i in range(4)]
            threads = [
                threading.Thread(target=_sender, args=(port, chunk, acked, stop), daemon=True)
                for chunk in chunks
            ]
            for t in threads:
                t.start()
            deadline = time.monotonic() + 30
            while len(acked) < 20 and time.monotonic() < deadline:
                time.sleep(0.01)
            proc.send_signal(signal.SIGKILL)  # mid-ingest: several associations in flight
            proc.wait(10)
            stop.set()
            # no acknowledgement can arrive from a dead server: the senders are left to
            # time out on their own (daemon threads)
            acked = list(acked)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    assert 20 <= len(acked) < len(files), "the kill must land mid-ingest"

    # restart: recovery runs, then the archive serves again
    with kho_serve(data_dir):
        pass
    with Archive(Settings(data_dir=data_dir)) as archive:
        for path in acked:
            original = path.read_bytes()
            sop = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            record, data = archive.read_instance(sop)
            assert data[read_file_meta(data)[1] :] == original[read_file_meta(original)[1] :]
            assert hashlib.sha256(data).hexdigest() == record.sha256
        # nothing half-visible: every catalogued instance reads back intact
        problems = [p for _r, p in archive.verify() if p]
        assert problems == []
        # and nothing orphaned: every object belongs to a catalogued instance
        prefixes = {r.object_prefix for r in archive.catalog.iter_instances()}
        assert archive.catalog.pending_prefixes() == []
        for key in archive.store.list(""):
            assert key.rsplit(".", 1)[0] in prefixes, key
