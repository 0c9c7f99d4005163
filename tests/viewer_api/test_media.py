"""Accept negotiation and the multipart/related parser, without a server."""

from __future__ import annotations

import pytest

from kho.viewer_api.errors import BadRequestError, NotAcceptableError
from kho.viewer_api.media import parse_accept
from kho.viewer_api.multipart import MultipartParser, join_parts
from kho.viewer_api.wado import negotiate_frames

JLS = "1.2.840.10008.1.2.4.80"
EVRLE = "1.2.840.10008.1.2.1"


@pytest.mark.parametrize(
    ("accept", "stored", "frames", "expected"),
    [
        (None, JLS, 1, (EVRLE, None)),
        # PS3.18 8.7.3.3: the default (uncompressed, little endian octet-stream) for */*
        ("*/*", JLS, 1, (EVRLE, None)),
        ("*/*", JLS, 3, (EVRLE, None)),
        # a named range is preferred over */* whatever their order
        ("*/*, image/jls", JLS, 1, (JLS, "image/jls")),
        (
            "multipart/related; type=application/octet-stream; transfer-syntax=*",
            JLS,
            1,
            (JLS, None),
        ),
        ('multipart/related; type="application/octet-stream"', JLS, 2, (EVRLE, None)),
        (f'multipart/related; type="image/jls"; transfer-syntax={JLS}', JLS, 1, (JLS, None)),
        ("image/jls", JLS, 1, (JLS, "image/jls")),
        ("application/octet-stream", EVRLE, 1, (EVRLE, "application/octet-stream")),
        (
            "multipart/related; type=application/octet-stream; transfer-syntax=*",
            EVRLE,
            3,
            (EVRLE, None),
        ),
        # q-values order the ranges
        (
            'image/jp2;q=0.9, multipart/related; type="application/octet-stream";q=0.5',
            JLS,
            1,
            (EVRLE, None),
        ),
    ],
)
def test_frame_negotiation(accept: str | None, stored: str, frames: int, expected: tuple) -> None:
    assert negotiate_frames(accept, stored, frames) == expected


@pytest.mark.parametrize(
    "accept",
    [
        "image/jp2",
        'multipart/related; type="image/jp2"; transfer-syntax=1.2.840.10008.1.2.4.90',
        "text/html",
    ],
)
def test_frame_negotiation_refuses(accept: str) -> None:
    with pytest.raises(NotAcceptableError):
        negotiate_frames(accept, JLS, 1)


def test_single_part_needs_a_single_frame() -> None:
    with pytest.raises(NotAcceptableError):
        negotiate_frames("image/jls", JLS, 2)


def test_accept_parsing_keeps_quoted_commas_and_drops_q0() -> None:
    ranges = parse_accept('multipart/related; type="a/b, c"; q=0.4, image/png;q=0, image/jpeg')
    assert [r.media for r in ranges] == ["image/jpeg", "multipart/related"]
    assert ranges[1].params["type"] == "a/b, c"


@pytest.mark.parametrize("step", [1, 2, 5, 64, 4096, 1 << 20])
def test_parser_in_any_chunking(step: int) -> None:
    payloads = [b"\r\n--boun\r\n--other\r\n", b"", bytes(range(256)) * 50]
    body = (
        b"preamble\r\n"
        + join_parts("bound", [(p, "application/dicom") for p in payloads])
        + b"epilogue"
    )
    parser = MultipartParser("bound")
    parts = []
    for i in range(0, len(body), step):
        parts += parser.feed(body[i : i + step])
    parser.finish()
    assert [p.body for p in parts] == payloads
    assert all(p.content_type == "application/dicom" for p in parts)


def test_parser_accepts_transport_padding() -> None:
    body = b"--b  \r\nContent-Type: application/dicom\r\n\r\nabc\r\n--b--\r\n"
    parser = MultipartParser("b")
    (part,) = parser.feed(body)
    assert part.body == b"abc"
    parser.finish()


@pytest.mark.parametrize(
    "body",
    [
        b"--b\r\nContent-Type: application/dicom\r\n\r\nabc",  # no closing boundary
        b"no boundary at all",
    ],
)
def test_parser_rejects_truncated_bodies(body: bytes) -> None:
    parser = MultipartParser("b")
    parser.feed(body)
    with pytest.raises(BadRequestError):
        parser.finish()


def test_parser_rejects_junk_after_a_boundary() -> None:
    with pytest.raises(BadRequestError):
        MultipartParser("b").feed(b"--bjunk\r\n\r\n")
