"""A real MLLP client for the tests and the benchmark: framed messages over a socket."""

from __future__ import annotations

import socket
import time

START, END = b"\x0b", b"\x1c\x0d"


class MllpClient:
    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 30.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffer = b""

    def send(self, message: str | bytes, encoding: str = "utf-8") -> str:
        """Send one message, wait for its ACK, return it decoded."""
        raw = message.encode(encoding) if isinstance(message, str) else message
        self.sock.sendall(START + raw + END)
        return self.read_ack(encoding)

    def read_ack(self, encoding: str = "utf-8") -> str:
        while END not in self._buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            self._buffer += chunk
        end = self._buffer.index(END)
        start = self._buffer.index(START)
        payload, self._buffer = self._buffer[start + 1 : end], self._buffer[end + 2 :]
        return payload.decode(encoding)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> MllpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def msa(ack: str) -> list[str]:
    """The MSA fields of an ACK (MSA-1 at index 1)."""
    for segment in ack.split("\r"):
        if segment.startswith("MSA|"):
            return segment.split("|")
    raise AssertionError(f"no MSA in {ack!r}")


def err(ack: str) -> list[str]:
    for segment in ack.split("\r"):
        if segment.startswith("ERR|"):
            return segment.split("|")
    return []


_counter = [0]


def control_id() -> str:
    _counter[0] += 1
    return f"T{int(time.time() * 1000)}{_counter[0]}"


def message(
    *segments: str,
    kind: str = "ADT^A08^ADT_A01",
    control: str | None = None,
    sender: str = "HIS|BV",
    charset: str = "UNICODE UTF-8",
    version: str = "2.5",
) -> str:
    """An HL7 message: MSH made here, then ``segments``; CR-separated."""
    app, facility = sender.split("|")
    msh = (
        f"MSH|^~\\&|{app}|{facility}|KHO|PACS|20240601120000||{kind}|{control or control_id()}"
        f"|P|{version}|||||VNM|{charset}"
    )
    return "\r".join([msh, *segments]) + "\r"
