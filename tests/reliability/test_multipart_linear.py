"""Regression (found by the fuzz harness): the STOW-RS multipart parser searched the whole
buffered part for the boundary again on every chunk, so a large part cost time quadratic
in its size (a 32 MiB part in 64 KiB chunks: 6 s of CPU; 1 GiB: hours).  Counted here as
bytes searched, not as time."""

from __future__ import annotations

from kho.viewer_api.multipart import MultipartParser


class CountingBuffer(bytearray):
    """A bytearray that adds up how many bytes its find() calls had to look at."""

    searched = 0

    def find(self, sub, start=None, end=None):  # type: ignore[no-untyped-def, override]
        begin = 0 if start is None else start
        CountingBuffer.searched += max(0, len(self) - begin)
        return super().find(sub, start, end) if start is not None else super().find(sub)


def test_a_large_part_fed_in_chunks_is_searched_about_once() -> None:
    size = 4 << 20
    body = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + b"\x01" * size + b"\r\n--b--\r\n"
    parser = MultipartParser("b")
    parser._buffer = CountingBuffer()
    CountingBuffer.searched = 0
    parts = []
    for start in range(0, len(body), 16384):
        parts += parser.feed(body[start : start + 16384])
    parser.finish()
    assert [len(p.body) for p in parts] == [size]
    assert CountingBuffer.searched < 3 * len(body)
