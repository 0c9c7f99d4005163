"""Connection accounting under floods (issue 12, item 7): connections whose peer closed free
their slot at once, silent connections hold none and are closed by the ARTIM timer, and
the association limit answers A-ASSOCIATE-RJ "local limit exceeded" only for real
associations.  Peers: raw sockets, dcmtk's echoscu and storescu, pynetdicom."""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom.data
from pynetdicom import AE, build_context
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from kho.archive.archive import Archive
from kho.archive.config import Settings
from kho.dicom_scp.server import DicomServer
from tests.helpers import dcmtk

CT_SMALL = Path(pydicom.data.get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]
CT_SMALL_SOP = "1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322"
FLOOD = 200  # the load balancer sent ~65 in 30 s; kho now takes 200 in well under 10 s
FLOOD_CAP_S = 120.0  # only keeps the loop bounded should connecting stall


@contextlib.contextmanager
def serving(
    tmp_path: Path, *, max_associations: int = 64, artim_timeout: float = 10.0
) -> Iterator[tuple[Archive, DicomServer]]:
    settings = Settings(
        data_dir=tmp_path / "data",
        dicom_port=0,
        http_port=0,
        fsync=False,
        max_associations=max_associations,
    )
    with Archive(settings) as archive:
        server = DicomServer(archive, artim_timeout=artim_timeout).start()
        try:
            yield archive, server
        finally:
            server.stop()


def echoscu(port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [dcmtk.tool("echoscu"), "-v", "-aec", "KHO", "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        env=dcmtk.env(),
        timeout=60,
    )


def connections_of(server: DicomServer) -> int:
    """Acceptor threads still alive: connections the server holds, waiting or associated."""
    assert server._server is not None
    return len(server._server.active_associations)


def wait_until(condition: object, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return bool(condition())  # type: ignore[operator]


def association_request(calling: str = "FLOODER", called: str = "KHO") -> bytes:
    """An A-ASSOCIATE-RQ PDU proposing Verification."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    context = build_context(Verification)
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16384
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.826.0.1.3680043.10.1425.99"
    primitive.user_information = [max_length, implementation]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def close_with_reset(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN (SO_LINGER 0), as a crashed peer or a scanner."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def is_closed_by_server(sock: socket.socket) -> bool:
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_connect_and_close_flood_leaves_every_slot_free(tmp_path: Path) -> None:
    """200 connect-and-close (FIN and RST alike) as fast as loopback takes them, then a
    C-ECHO and a C-STORE from dcmtk succeed at once and the instance is stored."""
    with serving(tmp_path) as (archive, server):
        deadline = time.monotonic() + FLOOD_CAP_S
        sent = 0
        while sent < FLOOD and time.monotonic() < deadline:
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            if sent % 2:
                close_with_reset(sock)
            else:
                sock.close()
            sent += 1
        assert sent > 64  # more than max_associations: before the fix, a lock-out

        echo = echoscu(server.port)
        assert echo.returncode == 0, echo.stdout + echo.stderr
        assert "Received Echo Response (Success)" in echo.stdout + echo.stderr
        store = dcmtk.storescu(server.port, [CT_SMALL], extra=("-v",))
        assert store.returncode == 0, store.stdout + store.stderr
        assert "Received Store Response (Success)" in store.stdout + store.stderr
        assert archive.catalog.get_instance(CT_SMALL_SOP) is not None
        # and no connection of the flood is still held
        assert wait_until(lambda: connections_of(server) == 0)


def test_peer_closing_after_its_request_frees_the_slot(tmp_path: Path) -> None:
    """Peers that send an A-ASSOCIATE-RQ and vanish (FIN or RST; before reading the answer,
    or once associated, without A-RELEASE or A-ABORT) free their slot as soon as the server
    sees the connection gone: with a limit of 2, after twelve of them a C-ECHO succeeds."""
    request = association_request()
    with serving(tmp_path, max_associations=2) as (_archive, server):
        for index in range(12):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            sock.sendall(request)
            if index % 4 < 2:
                answer = sock.recv(1)
                assert answer == b"\x02", answer  # A-ASSOCIATE-AC: an association now
            else:
                assert wait_until(lambda: connections_of(server) == 1)
            if index % 2:
                close_with_reset(sock)
            else:
                sock.close()
            assert wait_until(lambda: connections_of(server) == 0)
        echo = echoscu(server.port)
        assert echo.returncode == 0, echo.stdout + echo.stderr


def test_silent_connection_holds_no_slot_and_is_closed_by_artim(tmp_path: Path) -> None:
    """A connection that sends nothing does not block associations (even at a limit of 1)
    and is closed by the server once the ARTIM timeout has passed."""
    with serving(tmp_path, max_associations=1, artim_timeout=1.0) as (_archive, server):
        silent = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        try:
            echo = echoscu(server.port)
            assert echo.returncode == 0, echo.stdout + echo.stderr
            assert "Received Echo Response (Success)" in echo.stdout + echo.stderr
            assert wait_until(lambda: is_closed_by_server(silent))
            assert wait_until(lambda: connections_of(server) == 0)
        finally:
            silent.close()


def test_silent_flood_is_bounded_and_never_blocks(tmp_path: Path) -> None:
    """At most 2 x max_associations connections wait for their A-ASSOCIATE-RQ: with a limit
    of 2 and 10 silent connections, the server closes the oldest 6 at once (long before the
    ARTIM timeout) and a C-ECHO still succeeds."""
    with serving(tmp_path, max_associations=2, artim_timeout=600.0) as (_archive, server):
        port = server.port
        silent = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(10)]
        try:
            closed: set[int] = set()

            def six_closed() -> bool:
                closed.update(
                    i for i, s in enumerate(silent) if i not in closed and is_closed_by_server(s)
                )
                return len(closed) >= 6

            assert wait_until(six_closed)
            assert wait_until(lambda: connections_of(server) <= 4)
            assert server.gate.closed_waiting >= 6
            echo = echoscu(server.port)
            assert echo.returncode == 0, echo.stdout + echo.stderr
        finally:
            for sock in silent:
                sock.close()


def test_associations_beyond_the_limit_are_rejected_transiently(tmp_path: Path) -> None:
    """max_associations real associations open: the next gets A-ASSOCIATE-RJ (transient,
    local limit exceeded); once one is released a C-ECHO succeeds at once."""
    with serving(tmp_path, max_associations=2) as (_archive, server):
        held = []
        for _ in range(2):
            ae = AE(ae_title="HOLDER")
            ae.add_requested_context(Verification)
            assoc = ae.associate("127.0.0.1", server.port, ae_title="KHO")
            assert assoc.is_established
            held.append(assoc)
        try:
            refused = echoscu(server.port)
            output = refused.stdout + refused.stderr
            assert refused.returncode != 0, output
            assert "Rejected Transient" in output, output
            assert "Local Limit Exceeded" in output, output
        finally:
            held.pop().release()
        try:
            echo = echoscu(server.port)
            assert echo.returncode == 0, echo.stdout + echo.stderr
        finally:
            for assoc in held:
                assoc.release()
