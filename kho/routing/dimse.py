"""A C-STORE sender (SCU) for forwarding: the association negotiated with pynetdicom's PDU
encoders, then the PDUs written and read on the socket by this module.

pynetdicom's own requestor sleeps a millisecond whenever its reactor has nothing queued
and hands every PDU through two threads: it sent a 512 KB CT slice at a quarter of
dcmtk storescu's rate to a local storescp.  Here one thread does the whole exchange with
blocking calls: the command and the dataset's PDUs (as large as the peer accepts) go out
in one ``sendmsg`` of buffers that point into the instance's bytes (no copy), and the
response is read as soon as it arrives: storescu's rate.

One C-STORE at a time (no asynchronous operations window), as storescu does.  The bytes
are sent exactly as given (``dataset``: the instance as received, after its File Meta
Information); nothing here parses or re-encodes a dataset.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext

from kho.archive.dataset.part10 import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from kho.routing.errors import DestinationError

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
#: what kho accepts in one PDU from the peer (responses: small)
_OUR_MAX_PDU = 1024 * 1024
#: PDU size when the peer accepts any (its maximum is 0)
_UNLIMITED_PDU = 4 * 1024 * 1024
#: the most contexts one association may propose (PS3.8: odd IDs 1-255)
MAX_CONTEXTS = 128
_IOV_MAX = 512

_P_DATA = 0x04
_ASSOCIATE_AC = 0x02
_ASSOCIATE_RJ = 0x03
_RELEASE_RQ = 0x05
_RELEASE_RP = 0x06
_ABORT = 0x07
_RELEASE_RQ_PDU = b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00"
_RELEASE_RP_PDU = b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00"
_ABORT_PDU = b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00"

# command fields (PS3.7 E.1)
_STATUS = 0x00000900
_ERROR_COMMENT = 0x00000902
_C_STORE_RQ = 0x0001
_C_STORE_RSP = 0x8001
_PRIORITY_MEDIUM = 0x0000
_DATASET_PRESENT = 0x0000


def _element(tag: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00"
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def _uid(text: str) -> bytes:
    return text.encode("ascii")


def store_request(message_id: int, sop_class: str, sop_uid: str) -> bytes:
    """A C-STORE-RQ command set (Implicit VR Little Endian, PS3.7 9.3.1.1)."""
    body = b"".join(
        (
            _element(0x00000002, _uid(sop_class)),
            _element(0x00000100, struct.pack("<H", _C_STORE_RQ)),
            _element(0x00000110, struct.pack("<H", message_id)),
            _element(0x00000700, struct.pack("<H", _PRIORITY_MEDIUM)),
            _element(0x00000800, struct.pack("<H", _DATASET_PRESENT)),
            _element(0x00001000, _uid(sop_uid)),
        )
    )
    return _element(0x00000000, struct.pack("<I", len(body))) + body


def parse_command(data: bytes) -> dict[int, bytes]:
    """A command set's elements (tag -> raw value)."""
    out: dict[int, bytes] = {}
    at = 0
    while at + 8 <= len(data):
        group, element, length = struct.unpack_from("<HHI", data, at)
        at += 8
        out[(group << 16) | element] = data[at : at + length]
        at += length
    return out


@dataclass(frozen=True, slots=True)
class Proposal:
    """One presentation context to propose: a SOP class and the syntaxes, best first."""

    sop_class: str
    syntaxes: tuple[str, ...]


class StoreAssociation:
    """An established association to one destination; ``open`` it, ``store`` instances,
    ``release`` it (or ``abort`` it).  DestinationError for anything that ends the
    association; a C-STORE's status (success or not) is the peer's answer."""

    def __init__(
        self, sock: socket.socket, peer_max_pdu: int, accepted: dict[int, tuple[str, str]]
    ) -> None:
        self._sock = sock
        self._chunk = (peer_max_pdu or _UNLIMITED_PDU) - 6  # PDV header: 4 + 2 bytes
        #: context ID -> (SOP class, transfer syntax) the peer accepted
        self.accepted = accepted
        self._message_id = 0
        self._closed = False
        self._vectored = not isinstance(sock, ssl.SSLSocket)

    # --- opening ------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        host: str,
        port: int,
        *,
        calling_ae: str,
        called_ae: str,
        proposals: Sequence[Proposal],
        tls: ssl.SSLContext | None = None,
        timeout: float = 60.0,
    ) -> StoreAssociation:
        if not proposals:
            raise ValueError("an association needs at least one presentation context")
        contexts = []
        for number, proposal in enumerate(proposals[:MAX_CONTEXTS]):
            context = PresentationContext()
            context.context_id = 2 * number + 1
            context.abstract_syntax = proposal.sop_class
            context.transfer_syntax = list(proposal.syntaxes)
            contexts.append(context)
        try:
            raw = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise DestinationError(f"cannot connect to {host}:{port}: {exc}") from exc
        sock: socket.socket = raw
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls is not None:
                sock = tls.wrap_socket(raw, server_hostname=host)
            sock.sendall(_associate_request(calling_ae, called_ae, contexts))
            kind, pdu = _read_pdu(sock)
        except ssl.SSLError as exc:
            raw.close()
            raise DestinationError(f"TLS with {host}:{port} failed: {exc}") from exc
        except (OSError, DestinationError) as exc:
            sock.close()
            raise DestinationError(f"association with {called_ae} failed: {exc}") from exc
        if kind == _ASSOCIATE_RJ:
            sock.close()
            rejected = A_ASSOCIATE_RJ()
            rejected.decode(pdu)
            raise DestinationError(
                f"{called_ae} rejected the association (result {rejected.result}, source "
                f"{rejected.source}, reason {rejected.reason_diagnostic})"
            )
        if kind != _ASSOCIATE_AC:
            sock.close()
            raise DestinationError(f"{called_ae} answered the association with PDU {kind:#x}")
        answer = A_ASSOCIATE_AC()
        answer.decode(pdu)
        primitive = answer.to_primitive()
        peer_max = 0
        for item in primitive.user_information:
            if isinstance(item, MaximumLengthNotification):
                peer_max = int(item.maximum_length_received or 0)
        proposed = {c.context_id: c.abstract_syntax for c in contexts}
        accepted: dict[int, tuple[str, str]] = {}
        for result in primitive.presentation_context_definition_results_list:
            context_id = result.context_id
            if result.result == 0 and context_id in proposed and result.transfer_syntax:
                accepted[int(context_id or 0)] = (
                    str(proposed[context_id]),
                    str(result.transfer_syntax[0]),
                )
        return cls(sock, peer_max, accepted)

    # --- what was accepted --------------------------------------------------------------

    def syntaxes_for(self, sop_class: str) -> list[str]:
        """The syntaxes the peer accepted for ``sop_class``, in the order proposed."""
        return [ts for (cls_, ts) in self.accepted.values() if cls_ == sop_class]

    def context_for(self, sop_class: str, syntax: str) -> int | None:
        for context_id, (cls_, ts) in sorted(self.accepted.items()):
            if cls_ == sop_class and ts == syntax:
                return context_id
        return None

    # --- storing ------------------------------------------------------------------------

    def store(
        self, sop_class: str, sop_uid: str, syntax: str, dataset: bytes | memoryview
    ) -> tuple[int, str]:
        """Send one instance's dataset (after its File Meta Information) in ``syntax``;
        (status, error comment) of the peer's C-STORE-RSP."""
        context = self.context_for(sop_class, syntax)
        if context is None:
            raise ValueError(f"no accepted context for {sop_class} in {syntax}")
        self._message_id = self._message_id % 0xFFFF + 1
        command = store_request(self._message_id, sop_class, sop_uid)
        buffers = self._pdus(context, command, command=True)
        buffers += self._pdus(context, memoryview(dataset), command=False)
        try:
            self._send(buffers)
            response = self._read_command()
        except (OSError, ssl.SSLError) as exc:
            self._fail()
            raise DestinationError(f"connection lost during C-STORE: {exc}") from exc
        fields = parse_command(response)
        status_raw = fields.get(_STATUS)
        if status_raw is None or len(status_raw) < 2:
            self._fail()
            raise DestinationError("C-STORE response without a status")
        status = struct.unpack("<H", status_raw[:2])[0]
        comment = fields.get(_ERROR_COMMENT, b"").rstrip(b"\x00 ").decode("ascii", "replace")
        return status, comment

    def _pdus(
        self, context: int, data: bytes | memoryview, *, command: bool
    ) -> list[bytes | memoryview]:
        """P-DATA-TF PDUs carrying ``data``, one PDV each (header bytes, then a view)."""
        view = memoryview(data)
        out: list[bytes | memoryview] = []
        total = len(view)
        at = 0
        while True:
            piece = view[at : at + self._chunk]
            at += len(piece)
            last = at >= total
            control = (0x01 if command else 0x00) | (0x02 if last else 0x00)
            out.append(
                struct.pack(">BBIIBB", _P_DATA, 0, len(piece) + 6, len(piece) + 2, context, control)
            )
            out.append(piece)
            if last:
                return out

    def _send(self, buffers: list[bytes | memoryview]) -> None:
        if not self._vectored:  # an SSL socket has no sendmsg: one write per PDU
            for at in range(0, len(buffers), 2):
                self._sock.sendall(b"".join(buffers[at : at + 2]))
            return
        pending = list(buffers)
        while pending:
            sent = self._sock.sendmsg(pending[:_IOV_MAX])
            while sent:
                head = pending[0]
                if sent >= len(head):
                    sent -= len(head)
                    pending.pop(0)
                else:
                    pending[0] = memoryview(head)[sent:]
                    sent = 0

    def _read_command(self) -> bytes:
        """The next command set the peer sends (its PDVs joined)."""
        parts: list[bytes] = []
        while True:
            kind, pdu = _read_pdu(self._sock)
            if kind == _ABORT:
                self._closed = True
                raise DestinationError("the destination aborted the association")
            if kind == _RELEASE_RQ:
                with contextlib.suppress(OSError):
                    self._sock.sendall(_RELEASE_RP_PDU)
                self._closed = True
                raise DestinationError("the destination released the association")
            if kind != _P_DATA:
                raise DestinationError(f"unexpected PDU {kind:#x} while waiting for a response")
            at = 6
            while at + 6 <= len(pdu):
                length, _context, control = struct.unpack_from(">IBB", pdu, at)
                value = pdu[at + 6 : at + 4 + length]
                at += 4 + length
                if not control & 0x01:
                    continue  # a dataset with a response (none for C-STORE): not ours
                parts.append(value)
                if control & 0x02:
                    return b"".join(parts)

    # --- closing ------------------------------------------------------------------------

    def release(self) -> None:
        """A-RELEASE; the socket is closed whatever the peer answers."""
        if self._closed:
            return
        try:
            self._sock.sendall(_RELEASE_RQ_PDU)
            self._sock.settimeout(10.0)
            while True:
                kind, _pdu = _read_pdu(self._sock)
                if kind in (_RELEASE_RP, _ABORT):
                    break
        except (OSError, DestinationError):
            pass
        finally:
            self._close()

    def abort(self) -> None:
        if not self._closed:
            with contextlib.suppress(OSError):
                self._sock.sendall(_ABORT_PDU)
        self._close()

    def _fail(self) -> None:
        self.abort()

    def _close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.close()

    def __enter__(self) -> StoreAssociation:
        return self

    def __exit__(self, kind: object, *_rest: object) -> None:
        if kind is None:
            self.release()
        else:
            self.abort()


def _associate_request(
    calling_ae: str, called_ae: str, contexts: list[PresentationContext]
) -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = APPLICATION_CONTEXT
    primitive.calling_ae_title = calling_ae
    primitive.called_ae_title = called_ae
    primitive.presentation_context_definition_list = contexts
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = _OUR_MAX_PDU
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    primitive.user_information = [maximum, implementation, version]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        count = sock.recv_into(view[got:])
        if not count:
            raise DestinationError("the destination closed the connection")
        got += count
    return bytes(buffer)


def _read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    """(PDU type, the whole PDU) of the next PDU."""
    head = _recv_exact(sock, 6)
    kind, _reserved, length = struct.unpack(">BBI", head)
    if length > 64 * 1024 * 1024:
        raise DestinationError(f"PDU of {length} bytes from the destination")
    return kind, head + _recv_exact(sock, length)


__all__ = ["MAX_CONTEXTS", "Proposal", "StoreAssociation", "parse_command", "store_request"]
