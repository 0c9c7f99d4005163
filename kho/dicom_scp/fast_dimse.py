"""A faster C-STORE path through pynetdicom, installed per association.

Waiting: pynetdicom's DUL reactor sleeps 1 ms whenever it has nothing queued before it
looks at the socket again, so every PDU of a dataset costs a sleep (dcmtk's storescu sends
128 KB PDUs: five sleeps per 512 KB CT slice, per association).  kho's loop is the same
state machine driven the same way, but it waits in select() on the socket, so incoming
data is read the moment it arrives (outgoing primitives still wait at most 1 ms).

Receiving: pynetdicom reads each PDU from the socket 4096 bytes at a time into a growing
bytearray; a 512 KB CT slice takes ~130 reads, each releasing and re-taking the GIL.  kho
reads a PDU straight into a buffer of its final size, as much per call as the kernel has.

C-STORE: received, stored and answered in this thread (kho.dicom_scp.fast_store); every
other message goes through pynetdicom.

The association's own thread: pynetdicom's acceptor loop wakes every millisecond to look for
a decoded message, a release or an abort; four associations made 4000 wake-ups a second,
each taking the GIL from the thread doing the work (17% of the samples in a py-spy profile
of four storescu associations).  Everything that loop looks for is put there by the DUL
thread's state machine, so kho's loop sleeps until the DUL thread has acted (or 50 ms, for
the timers and a kill from elsewhere).

Connection accounting: pynetdicom's acceptor waits up to the ACSE timeout for the
A-ASSOCIATE-RQ on a queue that nothing fills when the peer closes first (the DUL goes back to
Sta1 and ends, the association thread keeps waiting), and it counts every such thread against
``maximum_associations``: ~65 connect-and-close probes (a load balancer's health check, a port
scan) refused every association for the next 30 s.  kho's acceptor waits for the DUL thread
instead, so a connection whose peer closed (EOF or RST, before or after its A-ASSOCIATE-RQ)
ends at once, and one that sends nothing ends when the ARTIM timer (PS3.8 9.1.5) expires.
Until its A-ASSOCIATE-RQ arrives a connection is not an association (``awaiting_request``):
the server does not count it against the association limit (kho.dicom_scp.server).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import socket
import threading
import time
import types
from typing import Any, cast

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import AssociationSocket
from pynetdicom.utils import make_target

from kho.dicom_scp import fast_store

LOGGER = logging.getLogger("pynetdicom.dul")


_FIRST_BUFFER = 1 << 20  # a PDU's announced length is the peer's word: grow as data comes


def _recv(self: AssociationSocket, nr_bytes: int) -> bytearray:
    """Read exactly ``nr_bytes`` (fewer only if the peer closes the connection).  The buffer
    starts at most 1 MiB and doubles as bytes arrive, so a header announcing 4 GiB costs
    nothing until the bytes are really sent."""
    sock = self.socket
    assert sock is not None
    buffer = bytearray(min(nr_bytes, _FIRST_BUFFER))
    received = 0
    while received < nr_bytes:
        if received == len(buffer):
            buffer.extend(bytes(min(len(buffer), nr_bytes - len(buffer))))
        with memoryview(buffer) as view:
            count = sock.recv_into(view[received:], len(buffer) - received)
        if not count:  # connection closed: pynetdicom expects what arrived so far
            del buffer[received:]
            return buffer
        received += count
    return buffer


_LOOP_WAIT_S = 0.001  # pynetdicom's own run-loop delay
# awaiting the A-ASSOCIATE-RQ (Sta2) only the socket and the ARTIM timer can act: no need to
# look 1000 times a second while a silent connection holds its thread
_AWAITING_REQUEST_WAIT_S = 0.05


def _run_reactor(self: DULServiceProvider) -> None:
    """DULServiceProvider.run_reactor, waiting on the socket instead of sleeping."""
    try:
        _dul_loop(self)
    finally:  # the association thread notices that this thread has ended
        self._kho_wake.set()  # type: ignore[attr-defined]


def _dul_loop(self: DULServiceProvider) -> None:
    self._idle_timer.start()
    assoc_sock = self.socket
    wait = False
    while True:
        if not self.assoc._dul_ready.is_set():
            self.assoc._dul_ready.set()
            wait = True
        if wait:
            raw = getattr(assoc_sock, "socket", None)
            try:
                if raw is not None and raw.fileno() >= 0:
                    awaiting = self.state_machine.current_state == "Sta2"
                    select.select(
                        [raw], [], [], _AWAITING_REQUEST_WAIT_S if awaiting else _LOOP_WAIT_S
                    )
                else:
                    time.sleep(_LOOP_WAIT_S)
            except (OSError, ValueError):  # closed under us: the checks below notice
                time.sleep(_LOOP_WAIT_S)
        if self._kill_thread:
            break
        if self.artim_timer.expired:
            self.event_queue.put("Evt18")
        try:
            if self._process_recv_primitive():
                pass
            elif self._is_transport_event():
                self._idle_timer.restart()
        except Exception as exc:
            # as pynetdicom does: bypass the state machine with an A-ABORT and stop
            LOGGER.error("Exception in DUL.run(), aborting association")
            LOGGER.exception(exc)
            abort_pdu = A_ABORT_RQ()
            abort_pdu.source = 0x02
            abort_pdu.reason_diagnostic = 0x00
            if assoc_sock is not None:
                assoc_sock.send(abort_pdu.encode())
            self.assoc.is_aborted = True
            self.assoc.is_established = False
            self.assoc._kill = True
            self._kill_thread = True
            return
        try:
            event = self.event_queue.get(block=False)
        except queue.Empty:
            wait = True
            continue
        self.state_machine.do_action(event)
        self._kho_wake.set()  # type: ignore[attr-defined]  # the association thread looks
        wait = False


_ASSOCIATION_WAIT_S = 0.05  # timers (network timeout) and kills from other threads


def _run_association_reactor(self: Association) -> None:
    """Association._run_reactor (the acceptor's loop), waiting for the DUL thread's wake-up
    instead of sleeping 1 ms a turn; the same checks in the same order."""
    wake: threading.Event = self.dul._kho_wake  # type: ignore[attr-defined]
    self._is_paused = False
    served = False
    while not self._kill:
        if not served:  # after a message, look again at once: another may be queued
            wake.wait(_ASSOCIATION_WAIT_S)
        wake.clear()  # anything queued from here on sets it again
        # pynetdicom pauses the loop here while an SCP handler sends on the association
        self._is_paused = True
        self._reactor_checkpoint.wait()
        self._is_paused = False
        context_id, message = self.dimse.get_msg(block=False)
        served = bool(message)
        if message:
            self._serve_request(message, cast(int, context_id))
        if self.is_established and self.acse.is_release_requested():
            self.acse.send_release(is_response=True)
            LOGGER.info("Association Released")
            self.is_released = True
            self.is_established = False
            evt.trigger(self, evt.EVT_RELEASED, {})
            self.kill()
            return
        if self.acse.is_aborted():
            LOGGER.info(
                "Association Aborted%s", " (A-P-ABORT)" if self.acse.is_aborted("a-p-abort") else ""
            )
            self.dul.receive_pdu(wait=False)  # EVT_ACSE_RECV for its subscribers
            self.is_aborted = True
            self.is_established = False
            evt.trigger(self, evt.EVT_ABORTED, {})
            self.kill()
            return
        if not self.dul.is_alive():
            self.kill()
            return
        if self.dul.idle_timer_expired():
            LOGGER.error("Network timeout reached")
            if self.network_timeout_response == "A-RELEASE":
                self._is_paused = True
                self._reactor_checkpoint.wait()
                self.release()
                self._is_paused = False
            else:
                self.abort()
            self.kill()
            return


def awaiting_request(association: Any) -> bool:
    """Whether an acceptor's connection is still waiting for its A-ASSOCIATE-RQ."""
    return bool(getattr(association, "_kho_awaiting_request", False))


def drop_connection(association: Any) -> None:
    """Close a connection from another thread (its DUL sees the end of the stream and the
    association thread ends as for a peer's close)."""
    sock = getattr(association.dul, "socket", None)
    raw = getattr(sock, "socket", None)
    if isinstance(raw, socket.socket):
        with contextlib.suppress(OSError):
            raw.shutdown(socket.SHUT_RDWR)


def _await_association_request(self: Association) -> bool:
    """Wait until the DUL has an A-ASSOCIATE-RQ for this acceptor (True), or until it has
    ended: the peer closed or aborted, the ARTIM timer expired (False)."""
    dul = self.dul
    wake: threading.Event = dul._kho_wake  # type: ignore[attr-defined]
    # the ARTIM timer closes a silent connection; this bound only covers a stopped timer
    deadline = time.monotonic() + (self.acse_timeout or 30) + (dul.artim_timer.timeout or 0)
    while True:
        wake.clear()  # anything the DUL does from here on sets it again
        if not dul.to_user_queue.empty():
            return True
        if not dul.is_alive():  # AA-2 / AA-5 end the DUL thread: nothing will come
            return not dul.to_user_queue.empty()
        remaining = deadline - time.monotonic()
        if self._kill or remaining <= 0:
            return False
        wake.wait(min(remaining, _ASSOCIATION_WAIT_S))


def _run_acceptor(self: Association) -> None:
    """Association.run_reactor for an acceptor: the same, but the wait for the
    A-ASSOCIATE-RQ ends the moment the connection does."""
    if not self._started_dul:
        self.dul.start()
        self._started_dul = True
        self._dul_ready.wait()
    requested = _await_association_request(self)
    self._kho_awaiting_request = False  # type: ignore[attr-defined]
    if requested:  # pynetdicom negotiates (and counts it) as always
        Association.run_reactor(self)
        return
    if self.dul.is_alive():  # gave up before the DUL did: close, so that it ends (Sta1)
        drop_connection(self)
    self.kill()
    sock = self.dul.socket
    if self._server is not None and sock is not None and sock.socket is not None:
        self._server.shutdown_request(sock.socket)


def install(association: Any, store: fast_store.StoreFunction | None = None) -> None:
    """Use kho's receive and wait paths on one association (before its threads start:
    EVT_CONN_OPEN); with ``store``, C-STOREs are received and answered by kho's path."""
    dul = association.dul
    dul._kho_wake = threading.Event()
    if association.is_acceptor:
        association._kho_awaiting_request = True
        # the thread's target was bound when the association was made
        association._target = make_target(types.MethodType(_run_acceptor, association))
        association._run_reactor = types.MethodType(_run_association_reactor, association)
    if not dul.is_alive():  # the thread's target was bound when the DUL was made
        dul._target = make_target(types.MethodType(_run_reactor, dul))
    sock = getattr(dul, "socket", None)
    if isinstance(sock, AssociationSocket):
        sock.recv = types.MethodType(_recv, sock)  # type: ignore[method-assign]
    if store is not None:
        receiver = fast_store.StoreReceiver(
            dul, store, lambda raw: fast_store.deliver_pdu(dul, raw)
        )
        dul._read_pdu_data = lambda: fast_store.read_pdu(dul, receiver)
