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
"""

from __future__ import annotations

import logging
import queue
import select
import time
import types
from typing import Any

from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import AssociationSocket
from pynetdicom.utils import make_target

from kho.dicom_scp import fast_store

LOGGER = logging.getLogger("pynetdicom.dul")


def _recv(self: AssociationSocket, nr_bytes: int) -> bytearray:
    """Read exactly ``nr_bytes`` (fewer only if the peer closes the connection)."""
    sock = self.socket
    assert sock is not None
    buffer = bytearray(nr_bytes)
    view = memoryview(buffer)
    received = 0
    while received < nr_bytes:
        count = sock.recv_into(view[received:], nr_bytes - received)
        if not count:  # connection closed: pynetdicom expects what arrived so far
            del view
            del buffer[received:]
            return buffer
        received += count
    return buffer


_LOOP_WAIT_S = 0.001  # pynetdicom's own run-loop delay


def _run_reactor(self: DULServiceProvider) -> None:
    """DULServiceProvider.run_reactor, waiting on the socket instead of sleeping."""
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
                    select.select([raw], [], [], _LOOP_WAIT_S)
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
        wait = False


def install(association: Any, store: fast_store.StoreFunction | None = None) -> None:
    """Use kho's receive and wait paths on one association (before its threads start:
    EVT_CONN_OPEN); with ``store``, C-STOREs are received and answered by kho's path."""
    dul = association.dul
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
