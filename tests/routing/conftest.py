"""Fixtures of the forwarding tests: a small CT series, instances ingested the way the
doors ingest them (the router's rows committed with each instance), destinations that
record what they receive."""

from __future__ import annotations

import contextlib
import io
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt

from kho.archive.archive import Archive
from kho.archive.dataset.part10 import read_file_meta
from kho.bench.phantom import ct_series_datasets
from kho.routing import Router
from tests.helpers.dcmtk import free_port

#: the smallest phantom CT that is still a CT (tests move many of them)
SLICE_SIZE = 64


@pytest.fixture
def series() -> list[bytes]:
    """Ten slices of one CT series (Part 10 bytes)."""
    return ct_series_datasets(10, rows=SLICE_SIZE, cols=SLICE_SIZE, seed=7)


def ingest(
    archive: Archive,
    router: Router,
    datas: list[bytes],
    *,
    calling_ae: str = "MODALITY",
    tenant: str | None = None,
) -> None:
    """Ingest as a door does: the router's rows go into each instance's transaction."""
    target = archive.for_tenant(tenant) if tenant else archive
    rows = router.stored_rows(None, target.tenant, "C-STORE", calling_ae)
    for data in datas:
        target.ingest_part10(data, with_rows=rows)


def dataset_of(part10: bytes) -> bytes:
    """A Part 10 file's dataset bytes (after its File Meta Information)."""
    _meta, offset = read_file_meta(part10)
    return part10[offset:]


def originals_of(datas: list[bytes]) -> dict[str, bytes]:
    """SOP Instance UID -> dataset bytes of Part 10 files."""
    out = {}
    for data in datas:
        ds = dcmread(io.BytesIO(data), stop_before_pixels=True)
        out[str(ds.SOPInstanceUID)] = dataset_of(data)
    return out


def wait_for(condition: Callable[[], bool], timeout: float = 30.0, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(every)


def queue_counts(router: Router, tenant: str = "default") -> dict[str, dict[str, Any]]:
    return dict(router.status([tenant])["tenants"][tenant])


@dataclass
class RecordingScp:
    """A pynetdicom storage SCP that keeps what it receives (SOP Instance UID -> dataset
    bytes), optionally slow, refusing, and answering storage commitment."""

    ae_title: str
    port: int
    received: dict[str, bytes] = field(default_factory=dict)
    stores: int = 0
    delay_s: float = 0.0
    status: int = 0x0000
    commitment_requests: list[Dataset] = field(default_factory=list)
    #: "same": the N-EVENT-REPORT on the requesting association; "none": never
    commitment: str = "same"
    fail_commitment: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_store(self, event: Any) -> int:
        if self.delay_s:
            time.sleep(self.delay_s)
        with self.lock:
            self.stores += 1
            if self.status == 0x0000:
                self.received[str(event.request.AffectedSOPInstanceUID)] = bytes(
                    event.request.DataSet.getvalue()
                )
        return self.status

    def on_action(self, event: Any) -> tuple[int, None]:
        request = event.action_information
        self.commitment_requests.append(request)
        if self.commitment == "same":
            association = event.assoc

            def report() -> None:
                time.sleep(0.1)
                association.send_n_event_report(
                    self.report(request), 1, "1.2.840.10008.1.20.1", "1.2.840.10008.1.20.1.1"
                )

            threading.Thread(target=report, daemon=True).start()
        return 0x0000, None

    def report(self, request: Dataset) -> Dataset:
        """The Event Information answering ``request``: committed what it holds."""
        ds = Dataset()
        ds.TransactionUID = request.TransactionUID
        committed, failed = [], []
        for item in request.ReferencedSOPSequence:
            uid = str(item.ReferencedSOPInstanceUID)
            ref = Dataset()
            ref.ReferencedSOPClassUID = item.ReferencedSOPClassUID
            ref.ReferencedSOPInstanceUID = uid
            if uid in self.received and uid not in self.fail_commitment:
                committed.append(ref)
            else:
                ref.FailureReason = 0x0112
                failed.append(ref)
        ds.ReferencedSOPSequence = committed
        if failed:
            ds.FailedSOPSequence = failed
        return ds


@contextlib.contextmanager
def recording_scp(ae_title: str = "RECORDER", port: int | None = None) -> Iterator[RecordingScp]:
    port = port or free_port()
    scp = RecordingScp(ae_title, port)
    ae = AE(ae_title=ae_title)
    ae.maximum_pdu_size = 0
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_SYNTAXES)
    ae.add_supported_context("1.2.840.10008.1.20.1", scu_role=True, scp_role=True)
    server = ae.start_server(
        ("127.0.0.1", port),
        block=False,
        evt_handlers=[(evt.EVT_C_STORE, scp.on_store), (evt.EVT_N_ACTION, scp.on_action)],
    )
    try:
        yield scp
    finally:
        server.shutdown()


ALL_SYNTAXES = [
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.4.80",
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.5",
]
