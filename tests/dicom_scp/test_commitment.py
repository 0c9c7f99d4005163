"""Storage Commitment (PS3.4 Annex J) with kho as the SCP: a modality stores a series with
dcmtk's storescu, then asks kho (pynetdicom plays the modality's commitment side) to
commit it; the report comes on the same association, or on a new one kho opens to the
modality when it has released, and names what kho does not hold."""

from __future__ import annotations

import io
import queue
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, evt

from kho.archive.archive import Archive
from kho.archive.config import Settings
from kho.bench.phantom import ct_series_datasets
from kho.dicom_scp.server import DicomServer
from kho.routing.commitment import (
    STORAGE_COMMITMENT_INSTANCE,
    STORAGE_COMMITMENT_PUSH,
    request_dataset,
)
from tests.helpers.dcmtk import free_port, storescu

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


@pytest.fixture
def series_files(tmp_path: Path) -> list[Path]:
    files = []
    for index, data in enumerate(ct_series_datasets(4, rows=32, cols=32, seed=11)):
        path = tmp_path / f"ct{index}.dcm"
        path.write_bytes(data)
        files.append(path)
    return files


def _uids(files: list[Path]) -> list[str]:
    return [
        str(dcmread(io.BytesIO(p.read_bytes()), stop_before_pixels=True).SOPInstanceUID)
        for p in files
    ]


@pytest.fixture
def kho(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """kho's DICOM server; the modality's own commitment port registered (auth off:
    ``move_destinations``) so that a report can come back on a new association."""
    modality_port = free_port()
    overrides = getattr(request, "param", {})
    settings = Settings(
        data_dir=tmp_path / "data",
        dicom_port=0,
        http_port=0,
        ae_title="KHO",
        move_destinations={"MODALITY": f"127.0.0.1:{modality_port}"},
        **overrides,
    )
    with Archive(settings) as archive:
        archive.derivers = []
        server = DicomServer(archive).start()
        try:
            yield {"archive": archive, "port": server.port, "modality_port": modality_port}
        finally:
            server.stop()


def _references(uids: list[str], sop_class: str = CT_IMAGE_STORAGE) -> list[tuple[str, str]]:
    return [(sop_class, uid) for uid in uids]


def _ask(
    port: int,
    references: list[tuple[str, str]],
    *,
    release_at_once: bool,
    calling_ae: str = "MODALITY",
    transaction_uid: str = "1.2.3.4.5.6.7",
) -> tuple[int, queue.Queue[tuple[int, Dataset]]]:
    """The modality's N-ACTION; the N-ACTION status and where the reports arrive."""
    reports: queue.Queue[tuple[int, Dataset]] = queue.Queue()

    def on_report(event: Any) -> tuple[int, None]:
        reports.put((int(event.request.EventTypeID), event.event_information))
        return 0x0000, None

    modality = AE(ae_title=calling_ae)
    modality.add_requested_context(STORAGE_COMMITMENT_PUSH)
    association = modality.associate(
        "127.0.0.1", port, ae_title="KHO", evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)]
    )
    assert association.is_established
    try:
        status, _reply = association.send_n_action(
            request_dataset(transaction_uid, references),
            1,
            STORAGE_COMMITMENT_PUSH,
            STORAGE_COMMITMENT_INSTANCE,
        )
        if not release_at_once and int(status.Status) == 0:
            reports.put(reports.get(timeout=20))  # kept open until the report came
    finally:
        association.release()
    return int(status.Status), reports


def test_report_on_the_requesting_association(
    kho: dict[str, Any], series_files: list[Path]
) -> None:
    sent = storescu(kho["port"], series_files, aet="MODALITY")
    assert sent.returncode == 0, sent.stderr
    uids = _uids(series_files)
    unknown = "1.2.826.0.1.3680043.8.498.999999"
    references = [*_references(uids), (CT_IMAGE_STORAGE, unknown), (MR_IMAGE_STORAGE, uids[0])]
    status, reports = _ask(kho["port"], references, release_at_once=False)
    assert status == 0x0000
    event_type, report = reports.get(timeout=1)
    assert event_type == 2  # some failed
    assert str(report.TransactionUID) == "1.2.3.4.5.6.7"
    committed = {str(i.ReferencedSOPInstanceUID) for i in report.ReferencedSOPSequence}
    assert committed == set(uids)
    failed = {
        (str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID)): int(i.FailureReason)
        for i in report.FailedSOPSequence
    }
    assert failed == {
        (CT_IMAGE_STORAGE, unknown): 0x0112,  # no such object instance
        (MR_IMAGE_STORAGE, uids[0]): 0x0119,  # class-instance conflict
    }


def test_report_on_a_new_association_after_release(
    kho: dict[str, Any], series_files: list[Path]
) -> None:
    """The modality releases at once (as many do) and listens on its own port: kho opens
    an association to it, proposing the SCP role, and reports there."""
    assert storescu(kho["port"], series_files, aet="MODALITY").returncode == 0
    arrived: queue.Queue[tuple[int, Dataset, str]] = queue.Queue()

    def on_report(event: Any) -> tuple[int, None]:
        arrived.put(
            (
                int(event.request.EventTypeID),
                event.event_information,
                str(event.assoc.requestor.ae_title).strip(),
            )
        )
        return 0x0000, None

    listener = AE(ae_title="MODALITY")
    listener.add_supported_context(STORAGE_COMMITMENT_PUSH, scu_role=True, scp_role=True)
    server = listener.start_server(
        ("127.0.0.1", kho["modality_port"]),
        block=False,
        evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)],
    )
    try:
        status, _ = _ask(kho["port"], _references(_uids(series_files)), release_at_once=True)
        assert status == 0x0000
        event_type, report, from_ae = arrived.get(timeout=20)
    finally:
        server.shutdown()
    assert event_type == 1 and from_ae == "KHO"
    assert {str(i.ReferencedSOPInstanceUID) for i in report.ReferencedSOPSequence} == set(
        _uids(series_files)
    )
    assert "FailedSOPSequence" not in report


def test_bad_requests_get_precise_statuses(kho: dict[str, Any]) -> None:
    modality = AE(ae_title="MODALITY")
    modality.add_requested_context(STORAGE_COMMITMENT_PUSH)
    association = modality.associate("127.0.0.1", kho["port"], ae_title="KHO")
    assert association.is_established
    try:
        no_references = request_dataset("1.2.3", [])
        status, _ = association.send_n_action(
            no_references, 1, STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE
        )
        assert int(status.Status) == 0x0120  # missing attribute
        status, _ = association.send_n_action(
            request_dataset("1.2.3", [(CT_IMAGE_STORAGE, "1.2.3.4")]),
            7,
            STORAGE_COMMITMENT_PUSH,
            STORAGE_COMMITMENT_INSTANCE,
        )
        assert int(status.Status) == 0x0123  # no such action
    finally:
        association.release()


@pytest.mark.parametrize(
    "kho",
    [
        {
            "auth": "on",
            "tenants": ["hosp-a", "hosp-b"],
            "dicom_peers": {
                "MODALITY": {"tenant": "hosp-a", "services": ["echo", "store"]},
                "CT_B": {"tenant": "hosp-b", "services": ["echo", "store"]},
                "VIEWER": {"tenant": "hosp-a", "services": ["echo", "find"]},
            },
        }
    ],
    indirect=True,
)
def test_commitment_is_scoped_to_the_callers_tenant_and_grants(
    kho: dict[str, Any], series_files: list[Path]
) -> None:
    """Hospital B's modality asking about hospital A's instances hears 'no such object
    instance'; a peer not granted store is refused the request."""
    assert storescu(kho["port"], series_files, aet="MODALITY").returncode == 0
    references = _references(_uids(series_files))
    status, reports = _ask(kho["port"], references, release_at_once=False, calling_ae="CT_B")
    assert status == 0x0000
    event_type, report = reports.get(timeout=1)
    assert event_type == 2
    assert len(report.ReferencedSOPSequence) == 0
    assert {int(i.FailureReason) for i in report.FailedSOPSequence} == {0x0112}
    status, _ = _ask(kho["port"], references, release_at_once=True, calling_ae="VIEWER")
    assert status == 0x0124  # not authorized
