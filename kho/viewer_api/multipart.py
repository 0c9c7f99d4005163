"""multipart/related (RFC 2387) for DICOMweb: a writer for responses and an incremental
parser for STOW-RS request bodies.

The parser takes the body chunk by chunk and hands back each part as soon as its closing
boundary arrives, so it holds at most one part plus one chunk beyond what the caller keeps;
the caller enforces the total size limit (413) while feeding.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from kho.viewer_api.errors import BadRequestError

CRLF = b"\r\n"


def new_boundary() -> str:
    return "kho-" + secrets.token_hex(12)


def content_type(inner: str, boundary: str, transfer_syntax: str | None = None) -> str:
    text = f'multipart/related; type="{inner}"; boundary={boundary}'
    if transfer_syntax:
        text += f"; transfer-syntax={transfer_syntax}"
    return text


def part_head(boundary: str, part_type: str, extra: dict[str, str] | None = None) -> bytes:
    lines = [f"--{boundary}", f"Content-Type: {part_type}"]
    lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def part_tail(boundary: str) -> bytes:
    return f"\r\n--{boundary}--\r\n".encode("latin-1")


def write_parts(boundary: str, parts: Iterable[tuple[bytes, str]]) -> Iterator[bytes]:
    """Body chunks of a multipart/related message from (payload, part content type)."""
    first = True
    for payload, part_type in parts:
        yield (b"" if first else CRLF) + part_head(boundary, part_type)
        yield payload
        first = False
    if first:  # no part at all: still a well-formed (empty) message
        yield f"--{boundary}--\r\n".encode("latin-1")
    else:
        yield part_tail(boundary)


def join_parts(boundary: str, parts: Iterable[tuple[bytes, str]]) -> bytes:
    return b"".join(write_parts(boundary, parts))


@dataclass(slots=True)
class Part:
    headers: dict[str, str]
    body: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")


class MultipartParser:
    """Incremental multipart/related parser: ``feed`` chunks, get completed parts back."""

    def __init__(self, boundary: str) -> None:
        if not boundary or len(boundary) > 200:
            raise BadRequestError("multipart boundary missing or too long")
        self._dash_boundary = b"--" + boundary.encode("latin-1")
        self._delimiter = CRLF + self._dash_boundary
        self._buffer = bytearray()
        self._state = "preamble"  # preamble -> headers -> body -> ... -> done
        self._headers: dict[str, str] = {}
        #: in a part's body: where the next search for the delimiter starts (the bytes
        #: before it were searched already; without it each chunk rescans the whole part,
        #: quadratic in its size)
        self._search_from = 0
        self.parts_seen = 0

    @property
    def done(self) -> bool:
        return self._state == "done"

    def feed(self, chunk: bytes) -> list[Part]:
        self._buffer += chunk
        out: list[Part] = []
        while True:
            if self._state == "preamble":
                # the first boundary may start the body (no CRLF before it)
                if self._buffer.startswith(self._dash_boundary):
                    start = 0
                else:
                    start = self._buffer.find(self._delimiter)
                    if start < 0:
                        keep = len(self._delimiter)
                        if len(self._buffer) > keep:
                            del self._buffer[: len(self._buffer) - keep]
                        return out
                    start += 2
                after = start + len(self._dash_boundary)
                if not self._after_boundary(after):
                    return out
            elif self._state == "headers":
                end = self._buffer.find(CRLF + CRLF)
                if end < 0:
                    if len(self._buffer) > 64 * 1024:
                        raise BadRequestError("multipart part headers larger than 64 KiB")
                    return out
                self._headers = _parse_headers(bytes(self._buffer[:end]))
                del self._buffer[: end + 4]
                self._state = "body"
            elif self._state == "body":
                end = self._buffer.find(self._delimiter, self._search_from)
                if end < 0:  # the delimiter may straddle this chunk and the next
                    self._search_from = max(0, len(self._buffer) - len(self._delimiter) + 1)
                    return out
                self._search_from = 0
                body = bytes(self._buffer[:end])
                out.append(Part(self._headers, body))
                self.parts_seen += 1
                if not self._after_boundary(end + len(self._delimiter)):
                    # keep the delimiter for the next feed; drop the body already taken
                    del self._buffer[:end]
                    self._state = "delimiter"
                    return out
            elif self._state == "delimiter":
                if not self._after_boundary(len(self._delimiter)):
                    return out
            else:  # done: ignore the epilogue
                self._buffer.clear()
                return out

    def _after_boundary(self, pos: int) -> bool:
        """Consume a boundary ending at ``pos``: '--' closes, CRLF opens a part.
        False when more bytes are needed."""
        tail = bytes(self._buffer[pos : pos + 2])
        if len(tail) < 2:
            return False
        if tail == b"--":
            self._state = "done"
            self._buffer.clear()
            return True
        # transport padding (spaces/tabs) may follow the boundary before CRLF
        line_end = self._buffer.find(CRLF, pos)
        if line_end < 0:
            return False
        if bytes(self._buffer[pos:line_end]).strip(b" \t"):
            raise BadRequestError("malformed multipart boundary line")
        del self._buffer[: line_end + 2]
        self._state = "headers"
        return True

    def finish(self) -> None:
        if self._state != "done":
            raise BadRequestError("multipart body ends before its closing boundary")


def _parse_headers(raw: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in raw.decode("latin-1").split("\r\n"):
        if not line.strip():
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise BadRequestError(f"malformed multipart header line {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    return headers
