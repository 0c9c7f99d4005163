"""`kho serve` wires forwarding: a rule in the settings sends what a modality stores on to a
dcmtk storescp, bit for bit (the dataset as received), and the sending is audited."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pydicom

from kho.archive.archive import Archive
from kho.archive.config import Settings
from kho.audit import EventKind, chain_all, search
from tests.archive.test_ingest import make_instance
from tests.helpers import dcmtk
from tests.helpers.server import kho_serve


def test_a_rule_forwards_what_kho_serve_receives(tmp_path: Path) -> None:
    sent = tmp_path / "ct.dcm"
    sent.write_bytes(make_instance(patient_name="FORWARD^ME"))
    with dcmtk.run_storescp(tmp_path / "dest", ae_title="DEST") as destination:
        env = {
            "KHO_FORWARD_DESTINATIONS": json.dumps(
                {"dest": {"url": f"dicom://DEST@127.0.0.1:{destination.port}"}}
            ),
            "KHO_FORWARD_RULES": json.dumps([{"name": "all-ct", "destination": "dest"}]),
        }
        with kho_serve(tmp_path / "data", env=env) as (_proc, port):
            stored = dcmtk.storescu(port, [sent])
            assert stored.returncode == 0, stored.stderr
            deadline = time.monotonic() + 30
            while not destination.files() and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(1.5)  # the audit trail's flush (within a second)
        received = destination.files()
    assert len(received) == 1
    original, forwarded = pydicom.dcmread(sent), pydicom.dcmread(received[0])
    assert forwarded.SOPInstanceUID == original.SOPInstanceUID
    assert forwarded.PixelData == original.PixelData
    with Archive(Settings(data_dir=tmp_path / "data")) as archive:
        chain_all(archive.catalog)
        records = search(archive.catalog, event=EventKind.INSTANCES_TRANSFERRED, limit=100)
    vias = sorted(r.via for r in records)
    assert vias == ["C-STORE", "FORWARD"]
