"""A faster C-STORE path through pynetdicom, installed per association.

Waiting: pynetdicom's DUL reactor sleeps 1 ms whenever it has nothing queued before it
looks at the socket again, so every PDU of a dataset costs a sleep (dcmtk's storescu sends
128 KB PDUs: five sleeps per 512 KB CT slice, per association).  kho's loop is the same
state machine driven the same way, but it waits in select() on the socket, so incoming
data is read the moment it arrives (outgoing primitives still wait at most 1 ms).

Receiving: pynetdicom reads each PDU from the socket 4096 bytes at a time into a growing
bytearray; a 512 KB CT slice takes ~130 reads, each releasing and re-taking the GIL.  kho
reads a PDU straight into a buffer of its final size, as much per call as the kernel has.

Responding: profiling showed a quarter of the interpreter's time spent sending C-STORE
responses, pynetdicom building and encoding a pydicom Dataset for a ~150-byte command set.
A success response has a fixed shape (PS3.7 9.3.1.2), so kho writes it directly; every other
message (failures with an Error Comment, C-FIND, C-MOVE, C-GET...) goes through pynetdicom.
"""

from __future__ import annotations

import logging
import queue
import select
import struct
import time
import types
from typing import Any

from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket
from pynetdicom.utils import make_target

LOGGER = logging.getLogger("pynetdicom.dul")
_C_STORE_RSP = 0x8001
_NO_DATASET = 0x0101
_COMMAND_LAST_FRAGMENT = b"\x03"  # PS3.8 E.2: command, last fragment


def _element(element: int, value: bytes) -> bytes:
    """An implicit VR little endian element of group 0000."""
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def _uid(value: Any) -> bytes:
    raw = str(value).encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def encode_store_response(primitive: C_STORE) -> bytes | None:
    """The command set of a plain C-STORE response, or None when it needs more than
    Status (an Error Comment or Offending Element: left to pynetdicom)."""
    if primitive.ErrorComment or primitive.OffendingElement:
        return None
    message_id, status = primitive.MessageIDBeingRespondedTo, primitive.Status
    if (
        primitive.AffectedSOPClassUID is None
        or primitive.AffectedSOPInstanceUID is None
        or message_id is None
        or status is None
    ):
        return None
    body = b"".join(
        (
            _element(0x0002, _uid(primitive.AffectedSOPClassUID)),
            _element(0x0100, struct.pack("<H", _C_STORE_RSP)),
            _element(0x0120, struct.pack("<H", message_id)),
            _element(0x0800, struct.pack("<H", _NO_DATASET)),
            _element(0x0900, struct.pack("<H", status)),
            _element(0x1000, _uid(primitive.AffectedSOPInstanceUID)),
        )
    )
    return _element(0x0000, struct.pack("<I", len(body))) + body


def _send_msg(self: DIMSEServiceProvider, primitive: Any, context_id: int) -> None:
    if isinstance(primitive, C_STORE) and primitive.MessageIDBeingRespondedTo is not None:
        command = encode_store_response(primitive)
        if command is not None:
            pdata = P_DATA()
            pdata.presentation_data_value_list.append(
                (context_id, _COMMAND_LAST_FRAGMENT + command)
            )
            self.dul.send_pdu(pdata)
            return
    DIMSEServiceProvider.send_msg(self, primitive, context_id)


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


def install(association: Any) -> None:
    """Use the fast receive, wait and response paths on one association (before its
    threads start: EVT_CONN_OPEN)."""
    dimse = association.dimse
    dimse.send_msg = types.MethodType(_send_msg, dimse)
    dul = association.dul
    if not dul.is_alive():  # the thread's target was bound when the DUL was made
        dul._target = make_target(types.MethodType(_run_reactor, dul))
    sock = getattr(dul, "socket", None)
    if isinstance(sock, AssociationSocket):
        sock.recv = types.MethodType(_recv, sock)  # type: ignore[method-assign]
