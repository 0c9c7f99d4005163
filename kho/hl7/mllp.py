"""MLLP, the Minimal Lower Layer Protocol (HL7 v2 over TCP): each message framed as
0x0B, the message, 0x1C 0x0D.  Bytes before a start block are discarded (keep-alives,
noise); a frame larger than the limit ends the connection (a sender that never ends its
frame must not grow the buffer without bound)."""

from __future__ import annotations

from kho.errors import KhoError

START = b"\x0b"
END = b"\x1c\x0d"
#: the largest message taken (an ADT or an order is a few KiB)
MAX_MESSAGE_BYTES = 4 * 1024 * 1024


class FramingError(KhoError):
    """The peer's bytes are not MLLP frames kho can take."""


def frame(payload: bytes) -> bytes:
    return START + payload + END


class Deframer:
    """Bytes in, complete messages out."""

    def __init__(self, max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self.max_message_bytes = max_message_bytes
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """The messages ``data`` completes (their payloads, without framing)."""
        self._buffer += data
        out: list[bytes] = []
        while True:
            start = self._buffer.find(START)
            if start < 0:
                self._buffer.clear()  # nothing but noise
                return out
            if start:
                del self._buffer[:start]
            end = self._buffer.find(END, 1)
            if end < 0:
                if len(self._buffer) > self.max_message_bytes + 1:
                    raise FramingError(f"an MLLP frame longer than {self.max_message_bytes} bytes")
                return out
            out.append(bytes(self._buffer[1:end]))
            del self._buffer[: end + len(END)]

    @property
    def pending(self) -> int:
        """Bytes of an unfinished frame."""
        return len(self._buffer)
