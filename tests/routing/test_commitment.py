"""Storage commitment toward a destination (PS3.4 Annex J): a pynetdicom SCP plays the
destination's side, answering on the requesting association, later on one of its own,
with failures, or never."""

from __future__ import annotations

import time
from typing import Any

from pynetdicom import AE, build_role

from kho.archive.archive import Archive
from kho.archive.config import Settings
from kho.dicom_scp.server import DicomServer
from kho.routing import Router, RoutingConfig, parse_report
from kho.routing.commitment import STORAGE_COMMITMENT_INSTANCE, STORAGE_COMMITMENT_PUSH
from tests.routing.conftest import ingest, originals_of, queue_counts, recording_scp, wait_for


def _config(port: int, **destination: Any) -> RoutingConfig:
    return RoutingConfig(
        rules=[{"name": "all", "destination": "pacs"}],
        destinations={
            "pacs": {
                "url": f"dicom://RECORDER@127.0.0.1:{port}",
                "commitment": True,
                "retry_base_s": 0.1,
                **destination,
            }
        },
    )


def test_committed_on_the_same_association(archive: Archive, series: list[bytes]) -> None:
    with recording_scp() as scp:
        router = Router(archive, _config(scp.port, commitment_wait_s=10))
        ingest(archive, router, series)
        assert router.run_once() == len(series)
        assert len(scp.commitment_requests) == 1
        request = scp.commitment_requests[0]
        asked = {str(i.ReferencedSOPInstanceUID) for i in request.ReferencedSOPSequence}
        assert asked == set(originals_of(series))
        counts = queue_counts(router)["pacs"]
        assert counts["committing"] == 0 and counts["queued"] == 0


def _report_to_kho(port: int, calling_ae: str, report: Any) -> int:
    """The destination's side of a late report: its own association to kho's DICOM
    server (proposing the SCP role, PS3.4 J.3.3), one N-EVENT-REPORT; the status."""
    destination = AE(ae_title=calling_ae)
    destination.add_requested_context(STORAGE_COMMITMENT_PUSH)
    association = destination.associate(
        "127.0.0.1",
        port,
        ae_title="KHO",
        ext_neg=[build_role(STORAGE_COMMITMENT_PUSH, scu_role=True, scp_role=True)],
    )
    assert association.is_established
    try:
        status = association.send_n_event_report(
            report, 1, STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE
        )
    finally:
        association.release()
    return int(status[0].Status)


def test_a_late_report_on_the_destinations_own_association(
    archive: Archive, series: list[bytes]
) -> None:
    """The destination answers later, opening an association to kho's DICOM server: the
    door hands the N-EVENT-REPORT to the router, which settles the rows."""
    with recording_scp() as scp:
        scp.commitment = "none"
        router = Router(archive, _config(scp.port, commitment_wait_s=0.2))
        ingest(archive, router, series)
        router.run_once()
        assert queue_counts(router)["pacs"]["committing"] == len(series)
        server = DicomServer(archive).start()
        server.door.router = router
        try:
            report = scp.report(scp.commitment_requests[0])
            # another AE title cannot settle deliveries made to RECORDER
            assert _report_to_kho(server.port, "INTRUDER", report) == 0
            assert queue_counts(router)["pacs"]["committing"] == len(series)
            assert _report_to_kho(server.port, "RECORDER", report) == 0
        finally:
            server.stop()
        assert queue_counts(router)["pacs"]["committing"] == 0
        assert queue_counts(router)["pacs"]["queued"] == 0


def test_a_late_report_settles_only_its_tenants_rows(tmp_path: Any, series: list[bytes]) -> None:
    """With tenants, a report coming on an association of hospital B's peer cannot settle
    hospital A's deliveries, even with the right transaction UID and AE title."""
    settings = Settings(
        data_dir=tmp_path / "data",
        dicom_port=0,
        http_port=0,
        ae_title="KHO",
        auth="on",
        tenants=["hosp-a", "hosp-b"],
        dicom_peers={
            "RECORDER": {"tenant": "hosp-b", "services": ["echo", "store"]},
        },
    )
    with Archive(settings) as archive, recording_scp() as scp:
        archive.derivers = []
        scp.commitment = "none"
        router = Router(archive, _config(scp.port, commitment_wait_s=0.2))
        ingest(archive, router, series, tenant="hosp-a")
        router.run_once()
        assert queue_counts(router, "hosp-a")["pacs"]["committing"] == len(series)
        server = DicomServer(archive).start()
        server.door.router = router
        try:
            report = scp.report(scp.commitment_requests[0])
            assert _report_to_kho(server.port, "RECORDER", report) == 0
        finally:
            server.stop()
        assert queue_counts(router, "hosp-a")["pacs"]["committing"] == len(series)
        # the router itself, asked for hospital A's tenant, settles them
        assert router.commitment_report(
            parse_report(report), tenant="hosp-a", calling_ae="RECORDER"
        ) == len(series)
        assert queue_counts(router, "hosp-a")["pacs"]["committing"] == 0


def test_uncommitted_instances_are_sent_again(archive: Archive, series: list[bytes]) -> None:
    with recording_scp() as scp:
        failing = sorted(originals_of(series))[:2]
        scp.fail_commitment = set(failing)
        router = Router(archive, _config(scp.port, commitment_wait_s=10))
        ingest(archive, router, series)
        router.run_once()
        assert queue_counts(router)["pacs"]["queued"] == 2
        scp.fail_commitment = set()
        time.sleep(0.3)  # their retry delay
        wait_for(lambda: router.run_once() >= 0 and queue_counts(router)["pacs"]["queued"] == 0)
        assert scp.stores == len(series) + 2
        assert queue_counts(router)["pacs"]["committing"] == 0


def test_no_report_in_time_sends_again(archive: Archive, series: list[bytes]) -> None:
    with recording_scp() as scp:
        scp.commitment = "none"
        router = Router(archive, _config(scp.port, commitment_wait_s=0, commitment_timeout_s=0.3))
        ingest(archive, router, series[:3])
        router.run_once()
        assert queue_counts(router)["pacs"]["committing"] == 3
        time.sleep(0.4)
        router.run_once()  # expired: queued and sent again (and committing again)
        assert scp.stores == 6
        assert len(scp.commitment_requests) == 2
