"""kho's C-STORE response encoding and PDU reads match pynetdicom's, byte for byte; the
association loop is kho's."""

from __future__ import annotations

import socket
import threading
import types

import pytest
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.transport import AssociationSocket

from kho.dicom_scp import fast_dimse, fast_store


def _pynetdicom_encoding(primitive: C_STORE) -> bytes:
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    pdata = list(message.encode_msg(1, 16382))
    return b"".join(v[1:] for p in pdata for _cid, v in p.presentation_data_value_list)


@pytest.mark.parametrize("status", [0x0000, 0xB000, 0xA700])
@pytest.mark.parametrize("sop_uid", ["1.2.3.4", "1.2.826.0.1.3680043.8.498.1234567890123"])
@pytest.mark.parametrize("comment", [None, "cannot parse", "odd length"])
def test_store_response_matches_pynetdicom(status: int, sop_uid: str, comment: str | None) -> None:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = 65535
    primitive.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    primitive.AffectedSOPInstanceUID = sop_uid
    primitive.Status = status
    if comment:
        primitive.ErrorComment = comment
    ours = fast_store.store_response_command(
        "1.2.840.10008.5.1.4.1.1.2", sop_uid, 65535, status, comment
    )
    assert ours == _pynetdicom_encoding(primitive)


def test_recv_reads_whole_pdus_and_returns_partial_data_on_close() -> None:
    left, right = socket.socketpair()
    sock = AssociationSocket.__new__(AssociationSocket)
    sock.socket = right
    sock.recv = types.MethodType(fast_dimse._recv, sock)  # type: ignore[method-assign]
    payload = bytes(range(256)) * 4096 * 3  # 3 MiB, in many segments: the buffer grows

    def send() -> None:
        left.sendall(payload)
        left.sendall(b"tail")
        left.close()

    sender = threading.Thread(target=send)
    sender.start()
    try:
        assert sock.recv(len(payload)) == payload
        assert sock.recv(100) == b"tail"  # the peer closed after 4 of 100 bytes
    finally:
        sender.join()
        right.close()


def test_associations_run_on_kho_s_dul_reactor(archive, monkeypatch, tmp_path) -> None:
    """Each association's DUL thread runs kho's loop (waits in select(), not sleeps), and a
    real peer's store through it lands intact."""
    from kho.dicom_scp.server import DicomServer
    from tests.archive.test_ingest import make_instance
    from tests.helpers import dcmtk

    loops: list[int] = []
    original = fast_dimse._run_reactor

    def counted(self: object) -> None:
        loops.append(1)
        original(self)  # type: ignore[arg-type]

    monkeypatch.setattr(fast_dimse, "_run_reactor", counted)
    files = []
    for i in range(3):
        path = tmp_path / f"{i}.dcm"
        path.write_bytes(make_instance())
        files.append(path)
    server = DicomServer(archive).start()
    try:
        result = dcmtk.storescu(server.port, files)
        assert result.returncode == 0, result.stderr[-1000:]
    finally:
        server.stop()
    assert loops == [1]
    assert archive.catalog.counts()["instances"] == 3
