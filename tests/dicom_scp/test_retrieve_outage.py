"""C-GET and C-MOVE while the object store is away (kho.dicom_scp.qr): once one
sub-operation fails because the store is unavailable the rest are not tried (each would
wait out the store's retries); every instance is counted and listed as failed, 0xA702.
After the store is back the same requests deliver every instance, bit for bit."""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, StoragePresentationContexts, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from kho.archive.archive import Archive
from kho.archive.config import Settings
from kho.bench.phantom import ct_series_datasets
from kho.dicom_scp.server import DicomServer
from tests.helpers import dcmtk
from tests.helpers.seaweedfs import SeaweedFS, run_seaweedfs

INSTANCES = 12


class Received:
    """A storage SCP's (or a C-GET SCU's) record of what arrived: SHA-256 of each
    dataset's bytes as received."""

    def __init__(self) -> None:
        self.digests: dict[str, str] = {}
        self.lock = threading.Lock()

    def on_store(self, event: Any) -> int:
        with self.lock:
            ds = event.dataset
            self.digests[str(ds.SOPInstanceUID)] = hashlib.sha256(
                event.request.DataSet.getvalue()
            ).hexdigest()
        return 0x0000


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("retrieve-outage")
    dest_port = dcmtk.free_port()
    destination = Received()
    scp_ae = AE(ae_title="OUTDEST")
    scp_ae.supported_contexts = StoragePresentationContexts
    scp = scp_ae.start_server(
        ("127.0.0.1", dest_port),
        block=False,
        evt_handlers=[(evt.EVT_C_STORE, destination.on_store)],
    )
    with run_seaweedfs(root / "weed") as s3:
        s3.client().make_bucket("kho-retrieve")
        settings = Settings(
            data_dir=root / "data",
            storage_url=s3.url("kho-retrieve"),
            dicom_port=0,
            fsync=False,
            move_destinations={"OUTDEST": f"127.0.0.1:{dest_port}"},
        )
        with Archive(settings) as archive:
            sent = {}
            for dataset in ct_series_datasets(INSTANCES, rows=64, cols=64):
                result = archive.ingest_part10(dataset)
                sent[result.sop_uid] = result.study_uid
            assert archive.finisher.wait_idle(timeout=120)  # every object in S3, none spooled
            server = DicomServer(archive).start()
            try:
                yield {
                    "archive": archive,
                    "port": server.port,
                    "s3": s3,
                    "study": next(iter(sent.values())),
                    "uids": set(sent),
                    "destination": destination,
                }
            finally:
                server.stop()
                scp.shutdown()


def _identifier(study: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = study
    return ds


def _c_get(port: int, study: str) -> tuple[list[Dataset], Received]:
    received = Received()
    ae = AE(ae_title="GETSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    # the syntax the phantom was sent in: the bytes as received come back
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate(
        "127.0.0.1",
        port,
        ae_title="KHO",
        ext_neg=[build_role(CTImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, received.on_store)],
    )
    assert assoc.is_established
    try:
        answers = [
            status
            for status, _identifier in assoc.send_c_get(
                _identifier(study), StudyRootQueryRetrieveInformationModelGet
            )
        ]
    finally:
        assoc.release()
    return answers, received


def _c_move(port: int, study: str) -> list[tuple[Dataset, Dataset | None]]:
    ae = AE(ae_title="MOVESCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", port, ae_title="KHO")
    assert assoc.is_established
    try:
        return list(
            assoc.send_c_move(
                _identifier(study), "OUTDEST", StudyRootQueryRetrieveInformationModelMove
            )
        )
    finally:
        assoc.release()


def _tried(caplog: pytest.LogCaptureFixture) -> int:
    return sum("retrieve sub-operation failed" in r.getMessage() for r in caplog.records)


def test_store_away_c_get_and_c_move_fail_every_instance_after_one_try(
    served: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    s3: SeaweedFS = served["s3"]
    caplog.set_level(logging.WARNING, logger="kho")
    s3.stop()
    try:
        answers, received = _c_get(served["port"], served["study"])
        final = answers[-1]
        assert final.Status == 0xA702
        assert final.NumberOfFailedSuboperations == INSTANCES
        assert final.NumberOfCompletedSuboperations == 0
        assert "object store unavailable" in str(final.get("ErrorComment", ""))
        assert not received.digests
        # one sub-operation tried, the other eleven failed without waiting on the store
        assert _tried(caplog) == 1
        assert len([a for a in answers if a.Status == 0xFF00]) <= 1

        caplog.clear()
        moves = _c_move(served["port"], served["study"])
        status, identifier = moves[-1]
        assert status.Status == 0xA702
        assert status.NumberOfFailedSuboperations == INSTANCES
        assert identifier is not None
        assert set(identifier.FailedSOPInstanceUIDList) == served["uids"]
        assert not served["destination"].digests
        assert _tried(caplog) == 1
    finally:
        s3.start()

    # back: both deliver every instance, bit for bit what the archive holds
    archive: Archive = served["archive"]
    expected = {
        uid: hashlib.sha256(archive.read_dataset(archive.catalog.require_instance(uid))).hexdigest()
        for uid in served["uids"]
    }
    answers, received = _c_get(served["port"], served["study"])
    assert answers[-1].Status == 0x0000
    assert received.digests == expected
    status, _identifier = _c_move(served["port"], served["study"])[-1]
    assert status.Status == 0x0000
    assert served["destination"].digests == expected
