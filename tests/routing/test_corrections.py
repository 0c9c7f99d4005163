"""Forwarding and corrections: an instance rejected while its forwarding waits (the
destination down) is never sent; the rest arrive once the destination is up."""

from __future__ import annotations

import io
from pathlib import Path

from pydicom import dcmread

from kho.archive.archive import Archive
from kho.routing import Router, RoutingConfig
from tests.helpers import dcmtk
from tests.helpers.kos import Made, rejection_note
from tests.routing.conftest import ingest, queue_counts, wait_for


def test_a_rejected_instance_is_not_forwarded(
    archive: Archive, series: list[bytes], tmp_path: Path
) -> None:
    port = dcmtk.free_port()  # nothing listens yet
    config = RoutingConfig(
        rules=[{"name": "all", "destination": "pacs"}],
        destinations={
            "pacs": {
                "url": f"dicom://STORESCP@127.0.0.1:{port}",
                "retry_base_s": 0.2,
                "retry_max_s": 0.3,
            }
        },
    )
    made = []
    for data in series:
        ds = dcmread(io.BytesIO(data), stop_before_pixels=True)
        made.append(
            Made(
                str(ds.StudyInstanceUID),
                str(ds.SeriesInstanceUID),
                str(ds.SOPInstanceUID),
                data,
                str(ds.SOPClassUID),
            )
        )
    rejected, kept = made[:4], made[4:]
    with Router(archive, config) as router:
        ingest(archive, router, series)
        wait_for(lambda: queue_counts(router)["pacs"]["failures"] >= 1)
        note = rejection_note(rejected, patient_id=str(dcmread(io.BytesIO(series[0])).PatientID))
        archive.ingest_part10(note[1])
        with dcmtk.run_storescp(tmp_path / "dest", port=port) as scp:
            wait_for(lambda: queue_counts(router)["pacs"]["queued"] == 0)
            received = {
                str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in scp.files()
            }
        assert received == {m.sop for m in kept}
        dead = router.rows("default", "dead", "pacs", 100)
        assert {row.sop_uid for row in dead} == {m.sop for m in rejected}
