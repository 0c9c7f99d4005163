"""C-STORE received, stored and answered in the association's DUL thread.

pynetdicom turns every P-DATA-TF PDU into PDU and primitive objects, hands them from the
DUL thread to the association thread over queues (a thread wakes every millisecond to look),
assembles the dataset in a BytesIO and builds the response as a pydicom Dataset.  Profiled
under four storescu associations this machinery held the GIL ~1.3 ms per CT slice and the
thread hand-offs were the largest share of the kernel's time.

Here the DUL thread reads each PDU itself.  While an association is established, a P-DATA-TF
PDU is split into its PDVs (PS3.8 9.3.5, E.2) with struct; a command that is a C-STORE-RQ
on an accepted presentation context has its dataset fragments kept as views of the PDU
buffers, joined once, ingested, and the response is written straight to the socket.  Every
other PDU and every other message (C-ECHO, C-FIND, C-MOVE, C-GET, C-CANCEL, responses to
kho's own C-STOREs, anything malformed) is handed to pynetdicom exactly as its own reader
would hand it, so negotiation, release, abort and the other services are unchanged.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pynetdicom.dul import DULServiceProvider

log = logging.getLogger(__name__)

_PDU_HEADER = struct.Struct(">BBL")  # type, reserved, length
_PDV_HEADER = struct.Struct(">LBB")  # item length, presentation context ID, control header
_ELEMENT_HEADER = struct.Struct("<HHL")  # implicit VR little endian: group, element, length
_US = struct.Struct("<H")
_P_DATA_TF = 0x04
_KNOWN_PDU_TYPES = frozenset(range(0x01, 0x08))
_IS_COMMAND = 0x01  # message control header bits (PS3.8 E.2)
_IS_LAST = 0x02
_C_STORE_RQ = 0x0001
_C_STORE_RSP = 0x8001
_NO_DATASET = 0x0101

#: (dataset fragments, transfer syntax, SOP class, SOP instance, calling AE) -> status, comment
StoreFunction = Callable[[Sequence[Any], str, str, str, str], tuple[int, str | None]]


@dataclass(slots=True)
class StoreCommand:
    """The fields of a C-STORE-RQ command set kho needs to store and answer it."""

    message_id: int
    sop_class_uid: str
    sop_instance_uid: str


def _uid_text(raw: bytes | memoryview) -> str:
    return bytes(raw).rstrip(b"\x00 ").decode("ascii", "replace")


def _command_elements(command: bytes) -> tuple[list[tuple[int, int, bytes]], bool]:
    """The (group, element, value) items of an implicit VR little endian command set, as
    far as they fit, and whether they tile it exactly."""
    items: list[tuple[int, int, bytes]] = []
    pos, end = 0, len(command)
    while end - pos >= 8:
        group, element, length = _ELEMENT_HEADER.unpack_from(command, pos)
        pos += 8
        if length > end - pos:
            return items, False
        items.append((group, element, command[pos : pos + length]))
        pos += length
    return items, pos == end


def parse_store_command(command: bytes) -> StoreCommand | None:
    """The C-STORE-RQ fields of a command set, or None when it is not a well-formed
    C-STORE-RQ with a dataset (then pynetdicom decides what to do with it)."""
    items, whole = _command_elements(command)
    if not whole or any(group != 0x0000 for group, _element, _value in items):
        return None
    fields = {element: value for _group, element, value in items}
    try:
        (command_field,) = _US.unpack(fields[0x0100])
        (message_id,) = _US.unpack(fields[0x0110])
        (dataset_type,) = _US.unpack(fields[0x0800])
        sop_class = _uid_text(fields[0x0002])
        sop_instance = _uid_text(fields[0x1000])
    except (KeyError, struct.error):
        return None
    if command_field != _C_STORE_RQ or dataset_type == _NO_DATASET:
        return None
    if not sop_class or not sop_instance:
        return None
    return StoreCommand(message_id, sop_class, sop_instance)


def _element(element: int, value: bytes) -> bytes:
    return _ELEMENT_HEADER.pack(0x0000, element, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    raw = text.encode("ascii", "replace")
    return raw + pad if len(raw) % 2 else raw


def store_response_command(
    sop_class_uid: str,
    sop_instance_uid: str,
    message_id: int,
    status: int,
    error_comment: str | None = None,
) -> bytes:
    """The command set of a C-STORE-RSP (PS3.7 9.3.1.2), elements in tag order."""
    elements = [
        _element(0x0002, _padded(sop_class_uid, b"\x00")),
        _element(0x0100, _US.pack(_C_STORE_RSP)),
        _element(0x0120, _US.pack(message_id)),
        _element(0x0800, _US.pack(_NO_DATASET)),
        _element(0x0900, _US.pack(status)),
    ]
    if error_comment:
        elements.append(_element(0x0902, _padded(error_comment, b" ")))
    elements.append(_element(0x1000, _padded(sop_instance_uid, b"\x00")))
    body = b"".join(elements)
    return _element(0x0000, struct.pack("<L", len(body))) + body


def p_data_pdu(pdvs: Sequence[tuple[int, int, bytes | memoryview]]) -> bytes:
    """A P-DATA-TF PDU from (context ID, message control header, fragment) items."""
    items = b"".join(
        _PDV_HEADER.pack(len(data) + 2, context_id, control) + bytes(data)
        for context_id, control, data in pdvs
    )
    return _PDU_HEADER.pack(_P_DATA_TF, 0, len(items)) + items


def split_pdvs(body: memoryview) -> list[tuple[int, int, memoryview]] | None:
    """The PDVs of a P-DATA-TF PDU's body, or None when the items do not tile it."""
    pdvs = []
    pos, end = 0, len(body)
    while pos < end:
        if end - pos < 6:
            return None
        length, context_id, control = _PDV_HEADER.unpack_from(body, pos)
        if length < 2 or length > end - pos - 4:
            return None
        pdvs.append((context_id, control, body[pos + 6 : pos + 4 + length]))
        pos += 4 + length
    return pdvs


class StoreReceiver:
    """Per association: assembles C-STORE messages from P-DATA-TF PDUs and answers them;
    hands everything else to pynetdicom (``deliver``: raw PDU bytes to its decoder)."""

    def __init__(
        self, dul: DULServiceProvider, store: StoreFunction, deliver: Callable[[bytes], None]
    ) -> None:
        self.dul = dul
        self.store = store
        self.deliver = deliver
        self._command: list[tuple[int, int, bytes]] = []  # fragments of the current command
        self._forwarding = False  # passing the current message's dataset to pynetdicom
        self._storing: tuple[int, StoreCommand] | None = None
        self._parts: list[memoryview] = []

    @property
    def idle(self) -> bool:
        """Between messages: nothing of a message is held here."""
        return not (self._command or self._forwarding or self._storing)

    def feed(self, head: bytes | bytearray, body: memoryview) -> None:
        """One P-DATA-TF PDU: its 6-byte header and its items."""
        pdvs = split_pdvs(body)
        if pdvs is None:
            if self.idle:  # pynetdicom rejects it as it always has (A-ABORT)
                self.deliver(bytes(head) + bytes(body))
            else:
                self._abort("malformed P-DATA-TF PDU in the middle of a message")
            return
        forward: list[tuple[int, int, bytes | memoryview]] = []
        for context_id, control, data in pdvs:
            if self._storing is not None:
                if control & _IS_COMMAND or context_id != self._storing[0]:
                    self._abort("C-STORE dataset interrupted by another message")
                    return
                self._parts.append(data)
                if control & _IS_LAST:
                    self._flush(forward)
                    forward = []
                    self._finish_store()
                continue
            if self._forwarding:
                forward.append((context_id, control, data))
                if not control & _IS_COMMAND and control & _IS_LAST:
                    self._forwarding = False
                continue
            if not control & _IS_COMMAND:  # a dataset with no command: pynetdicom's to judge
                forward.append((context_id, control, data))
                continue
            self._command.append((context_id, control, bytes(data)))
            if control & _IS_LAST:
                forward.extend(self._end_of_command())
        self._flush(forward)

    def _end_of_command(self) -> list[tuple[int, int, bytes]]:
        """The command is complete: keep a C-STORE-RQ here, else return it to forward."""
        fragments, self._command = self._command, []
        context_ids = {context_id for context_id, _, _ in fragments}
        command = b"".join(data for _, _, data in fragments)
        parsed = parse_store_command(command) if len(context_ids) == 1 else None
        context_id = fragments[0][0]
        if parsed is not None and context_id in self.dul.assoc._accepted_cx:
            self._storing = (context_id, parsed)
            return []
        # not kept: forward the whole message; a dataset follows unless the command says not
        self._forwarding = _has_dataset(command)
        return fragments

    def _finish_store(self) -> None:
        assert self._storing is not None
        (context_id, command), self._storing = self._storing, None
        parts, self._parts = self._parts, []
        context = self.dul.assoc._accepted_cx[context_id]
        # a long store (a huge instance, a catalog lock wait) is not the peer's silence
        timer = getattr(self.dul, "_idle_timer", None)
        if timer is not None:
            timer.restart()
        status, comment = self.store(
            parts,
            str(context.transfer_syntax[0]),
            command.sop_class_uid,
            command.sop_instance_uid,
            self.dul.assoc.requestor.ae_title,
        )
        del parts
        if timer is not None:
            timer.restart()
        response = store_response_command(
            command.sop_class_uid, command.sop_instance_uid, command.message_id, status, comment
        )
        socket = self.dul.socket
        if socket is not None:
            socket.send(p_data_pdu([(context_id, _IS_COMMAND | _IS_LAST, response)]))

    def _flush(self, forward: list[tuple[int, int, bytes | memoryview]]) -> None:
        if forward:
            self.deliver(p_data_pdu(forward))

    def _abort(self, reason: str) -> None:
        log.warning("association from %s: %s; aborting", self.dul.assoc.requestor.ae_title, reason)
        self._command, self._parts, self._storing, self._forwarding = [], [], None, False
        self.dul.event_queue.put("Evt19")  # invalid PDU: the state machine sends A-ABORT


def _has_dataset(command: bytes) -> bool:
    """Whether a (forwarded) command says a dataset follows: its first Command Data Set
    Type (0000,0800) is not 0x0101."""
    for group, element, value in _command_elements(command)[0]:
        if group == 0x0000 and element == 0x0800 and len(value) == 2:
            return bool(_US.unpack(value)[0] != _NO_DATASET)
    return False


def read_pdu(dul: DULServiceProvider, receiver: StoreReceiver) -> None:
    """DULServiceProvider._read_pdu_data with P-DATA-TF PDUs of an established association
    going to ``receiver``; the same events for everything else."""
    sock = dul.socket
    assert sock is not None
    try:
        head = sock.recv(6)
    except (OSError, TimeoutError):
        dul.event_queue.put("Evt17")  # transport closed
        return
    if len(head) < 6:
        dul.event_queue.put("Evt17")
        return
    pdu_type, _, length = _PDU_HEADER.unpack(head)
    if pdu_type not in _KNOWN_PDU_TYPES:
        log.error("unknown PDU type 0x%02X received", pdu_type)
        dul.event_queue.put("Evt19")
        return
    limit = dul.assoc.acceptor.maximum_length if pdu_type == _P_DATA_TF else 0
    if limit and length > limit + 6:  # PS3.8 9.3.1: beyond what kho accepted (+ slack)
        log.error("P-DATA-TF PDU of %d bytes exceeds the negotiated %d", length, limit)
        dul.event_queue.put("Evt19")  # invalid PDU: A-ABORT
        return
    try:
        body = sock.recv(length)
    except (OSError, TimeoutError):
        dul.event_queue.put("Evt17")
        return
    if len(body) != length:
        log.error("PDU shorter than announced (%d of %d bytes)", len(body), length)
        dul.event_queue.put("Evt17")
        return
    if pdu_type == _P_DATA_TF and dul.state_machine.current_state == "Sta6":
        receiver.feed(head, memoryview(body))
        return
    deliver_pdu(dul, bytes(head) + bytes(body))


def deliver_pdu(dul: DULServiceProvider, raw: bytes) -> None:
    """Give a received PDU to pynetdicom's state machine, as its own reader does."""
    try:
        pdu, event = dul._decode_pdu(bytearray(raw))
    except Exception as exc:
        log.error("unable to decode the received PDU: %s", exc)
        dul.event_queue.put("Evt19")
        return
    dul.event_queue.put(event)
    dul._recv_pdu.put(pdu)
