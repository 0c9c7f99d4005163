"""Hostile DIMSE input: truncated PDU streams, hostile UIDs, absurd lengths, garbage.
Each gets a precise status (or a dropped association), nothing is stored, and the server
keeps serving."""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from kho.archive.archive import Archive
from kho.archive.dataset.part10 import build_file_meta, read_file_meta
from tests.archive.test_ingest import make_instance

CT = "1.2.840.10008.5.1.4.1.1.2"


def _associate(port: int):
    ae = AE(ae_title="HOSTILE")
    ae.add_requested_context(CT, ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="KHO")
    assert assoc.is_established
    return assoc


def _assert_still_serving(port: int, archive: Archive) -> None:
    assoc = _associate(port)
    try:
        assert assoc.send_c_echo().Status == 0x0000
        # and it still stores a good instance
        path_status = assoc.send_c_store(_as_file(make_instance(), Path("/dev/shm")))
        assert path_status.Status == 0x0000
    finally:
        assoc.release()


def _as_file(data: bytes, folder: Path) -> Path:
    path = folder / f"kho-hostile-{time.monotonic_ns()}.dcm"
    path.write_bytes(data)
    return path


def _hostile_file(tmp_path: Path, dataset: bytes, sop_uid: str) -> Path:
    """A Part 10 file whose dataset bytes are sent as is by pynetdicom."""
    meta = build_file_meta(CT, sop_uid, ExplicitVRLittleEndian)
    return _as_file(meta + dataset, tmp_path)


def _dataset_of(data: bytes) -> bytes:
    return data[read_file_meta(data)[1] :]


def test_truncated_pdu_stream_drops_the_association_only(archive: Archive, dicom_server) -> None:
    assoc = _associate(dicom_server.port)
    raw = assoc.dul.socket.socket
    # a P-DATA-TF PDU announcing 1 MB of which only 100 bytes ever arrive
    raw.sendall(struct.pack(">BBI", 0x04, 0, 1_000_000) + b"\x00" * 100)
    raw.shutdown(socket.SHUT_WR)
    time.sleep(0.5)
    assoc.abort()
    # garbage instead of an association request
    with socket.create_connection(("127.0.0.1", dicom_server.port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 10)
        s.shutdown(socket.SHUT_WR)
        s.settimeout(5)
        try:
            while s.recv(4096):
                pass
        except OSError:
            pass
    assert archive.catalog.counts()["instances"] == 0
    _assert_still_serving(dicom_server.port, archive)


def test_a_pdu_beyond_the_negotiated_maximum_aborts_at_once(archive: Archive, dicom_server) -> None:
    """A P-DATA-TF header announcing ~4 GiB: refused before anything is read or allocated
    (the association is aborted), and the server keeps serving."""
    assoc = _associate(dicom_server.port)
    raw = assoc.dul.socket.socket
    raw.sendall(struct.pack(">BBI", 0x04, 0, 0xFFFFFFF0) + b"\x00" * 1000)
    deadline = time.monotonic() + 10
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    assert assoc.is_aborted
    assert archive.catalog.counts()["instances"] == 0
    _assert_still_serving(dicom_server.port, archive)


@pytest.mark.parametrize(
    ("name", "expected"),
    [("dotdot-uid", 0xA900), ("absurd-length", 0xC000), ("garbage", 0xC000)],
)
def test_hostile_datasets_get_precise_statuses(
    archive: Archive, dicom_server, tmp_path: Path, name: str, expected: int
) -> None:
    if name == "dotdot-uid":
        uid = "../../x"
        dataset = _dataset_of(make_instance(sop_uid=uid))
    else:
        uid = "1.2.826.0.1.3680043.10.1425.66.1"
        good = _dataset_of(make_instance(sop_uid=uid))
        if name == "absurd-length":
            pos = good.index(b"\x10\x00\x10\x00PN")
            dataset = good[: pos + 6] + b"\xff\xff" + good[pos + 8 :]
        else:
            dataset = b"\x08\x00\x16\x00UI" + b"\xa5" * 5000
    assoc = _associate(dicom_server.port)
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the bytes as they are, not re-encoded
    try:
        status = assoc.send_c_store(_hostile_file(tmp_path, dataset, uid))
        assert status.Status == expected
        assert status.ErrorComment  # says why
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
        assoc.release()
    assert archive.catalog.counts()["instances"] == 0
    assert list(archive.store.list("")) == []
    _assert_still_serving(dicom_server.port, archive)
