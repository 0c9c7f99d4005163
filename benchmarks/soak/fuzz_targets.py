"""The parsers kho runs on hostile bytes, as fuzz targets: each takes bytes and either
returns or raises one of kho's documented errors (a KhoError subclass).  Anything else
(an IndexError, a RecursionError, a struct.error, a hang) is a finding.  Used by the
atheris driver (benchmarks/soak/fuzz.py) and the hypothesis tests
(tests/reliability/test_fuzz.py); seeds are real files and known crasher shapes."""

from __future__ import annotations

import contextlib
import functools
import json
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

from kho.errors import KhoError

Target = Callable[[bytes], None]


def part10(data: bytes) -> None:
    """The Part 10 walker, then the attribute reader on what it accepted."""
    from kho.archive.dataset.attributes import read_catalog_values, read_header
    from kho.archive.dataset.part10 import parse_part10

    try:
        layout = parse_part10(data)
        read_catalog_values(data, layout)
        read_header(data, layout.pixels.element_offset if layout.pixels else None)
    except KhoError:
        pass


def stow_multipart(data: bytes) -> None:
    """The STOW-RS multipart parser, fed in uneven chunks; the boundary from the first
    bytes (as a hostile Content-Type would give it)."""
    from kho.viewer_api.multipart import MultipartParser

    cut = data.find(b"\n")
    boundary, body = (data[:cut], data[cut + 1 :]) if cut >= 0 else (b"b", data)
    try:
        parser = MultipartParser(boundary.decode("latin-1"))
        step = max(1 + (len(body) % 7) * 13, len(body) // 64)
        for start in range(0, len(body), step):
            parser.feed(body[start : start + step])
        parser.finish()
    except KhoError:
        pass


def hl7(data: bytes) -> None:
    """The MLLP deframer (in two feeds) and the message parser on every frame."""
    from kho.hl7.message import Message, acknowledgement
    from kho.hl7.mllp import Deframer

    deframer = Deframer(max_message_bytes=1 << 20)
    try:
        half = len(data) // 2
        messages = deframer.feed(data[:half]) + deframer.feed(data[half:])
    except KhoError:
        return
    for raw in messages:
        try:
            message = Message(raw)
            acknowledgement(message.header, "AA")
        except KhoError:
            pass


def dimse_pdv(data: bytes) -> None:
    """The fast C-STORE path's P-DATA splitter and command reader."""
    from kho.dicom_scp.fast_store import parse_store_command, split_pdvs

    try:
        pdvs = split_pdvs(memoryview(data))
        for _context, header, value in pdvs or []:
            if header & 0x01:  # a command fragment
                parse_store_command(bytes(value))
        parse_store_command(data)
    except KhoError:
        pass


_VERIFIER = None


def _verifier() -> object:
    global _VERIFIER
    if _VERIFIER is None:
        from kho.access.tokens import TokenVerifier
        from kho.archive.config import Settings
        from tests.helpers.oidc import SigningKey

        folder = Path(tempfile.mkdtemp(prefix="kho-fuzz-jwks-"))
        jwks = folder / "jwks.json"
        keys = [SigningKey.generate("RS256"), SigningKey.generate("ES256")]
        jwks.write_text(json.dumps({"keys": [k.jwk for k in keys]}))
        settings = Settings(
            data_dir=folder / "data",
            oidc_issuer="https://issuer.invalid",
            oidc_audience="kho",
            oidc_jwks_file=str(jwks),
        )
        _VERIFIER = TokenVerifier(settings)
    return _VERIFIER


def token(data: bytes) -> None:
    """Bearer token verification (signature, claims) on garbage and near-JWTs."""
    verifier = _verifier()
    with contextlib.suppress(KhoError):
        verifier.verify(data.decode("utf-8", "replace"))  # type: ignore[attr-defined]


TARGETS: dict[str, Target] = {
    "part10": part10,
    "stow_multipart": stow_multipart,
    "hl7": hl7,
    "dimse_pdv": dimse_pdv,
    "token": token,
}


# --- seeds --------------------------------------------------------------------------------


def _element(tag: int, vr: bytes, value: bytes, *, length: int | None = None) -> bytes:
    group, elem = tag >> 16, tag & 0xFFFF
    n = len(value) if length is None else length
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"OF"):
        return struct.pack("<HH2sHI", group, elem, vr, 0, n) + value
    return struct.pack("<HH2sH", group, elem, vr, n) + value


def _part10(dataset: bytes) -> bytes:
    ts = b"1.2.840.10008.1.2.1\0"
    meta = _element(0x00020010, b"UI", ts)
    meta = _element(0x00020000, b"UL", struct.pack("<I", len(meta))) + meta
    return b"\0" * 128 + b"DICM" + meta + dataset


def crasher_shapes() -> list[bytes]:
    """Known shapes that break DICOM parsers: sequences nested 300 deep, lengths beyond
    the file, odd lengths, undefined lengths where they may not be."""
    item_undefined = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    deep = b""
    for _ in range(300):
        deep = _element(0x00081115, b"SQ", b"", length=0xFFFFFFFF) + item_undefined + deep
    shapes = [
        _part10(deep),
        _part10(_element(0x00100010, b"PN", b"DOE^JANE", length=0xFFF0)),  # beyond the file
        _part10(_element(0x00100010, b"UT", b"DOE", length=0x7FFFFFF0)),  # far beyond
        _part10(_element(0x00100010, b"PN", b"DOE", length=3)),  # odd length
        _part10(_element(0x00100010, b"UT", b"", length=0xFFFFFFFF)),  # undefined, not SQ
        _part10(_element(0x00100010, b"PN", b"", length=0xFFFF)),
        _part10(_element(0x7FE00010, b"OB", b"\0" * 8, length=0xFFFFFFFF)),  # no fragments
        _part10(_element(0x7FE00010, b"OW", b"\0" * 7)),  # odd pixel data
        _part10(struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)),  # a delimiter at top level
        b"\0" * 128 + b"DICM",  # no meta
        b"DICM" * 40,
    ]
    return shapes


@functools.cache
def seeds(target: str, limit: int = 40) -> list[bytes]:
    """Seed inputs for ``target``: real files and crasher shapes."""
    dicom = _dicom_seeds(limit) + crasher_shapes()
    if target == "part10":
        return dicom
    if target == "stow_multipart":
        out = []
        for body in dicom[:8]:
            part = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + body + b"\r\n--b--\r\n"
            out.append(b"b\n" + part)
        out.append(b"b\n--b\r\n" + b"X: " * 30000 + b"\r\n\r\n")  # huge headers
        out.append(b"b\n--b\r\nContent-Length: 4294967296\r\n\r\n\r\n--b--")
        return out
    if target == "hl7":
        adt = (
            b"MSH|^~\\&|HIS|HOSP|KHO|HOSP|20260101120000||ADT^A08^ADT_A01|1|P|2.5.1"
            b"|||||||UNICODE UTF-8\r"
            b"PID|1||P-1^^^HOSP^MR||DOE^JANE||19700101|F\r"
        )
        return [b"\x0b" + adt + b"\x1c\r", b"\x0b" + adt.replace(b"|", b"\\") + b"\x1c\r",
                b"\x0b\x0b\x1c\r", b"\x0bMSH\x1c\r", b"\x0bMSH|\x1c\r"]  # fmt: skip
    if target == "dimse_pdv":
        command = _element(0x00000100, b"US", struct.pack("<H", 1))
        pdv = struct.pack(">IB", len(command) + 2, 1) + bytes([0x03]) + command
        return [pdv, pdv * 3, struct.pack(">IBB", 0xFFFFFFFF, 1, 3), b"\0\0\0\0"]
    if target == "token":
        return [
            b"eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.",
            b"eyJhbGciOiJSUzI1NiIsImtpZCI6IngifQ.e30.c2ln",
            b"a.b.c", b"....", b"\xff\xfe", b"e" * 20000,
        ]  # fmt: skip
    raise KeyError(target)


def _dicom_seeds(limit: int) -> list[bytes]:
    files: list[Path] = []
    samples = Path("/work/shared/dicom-samples")
    if samples.is_dir():
        files += sorted(samples.glob("*.dcm"))[: limit // 2]
    import pydicom.data  # its bundled test files (get_testdata_files would download more)

    bundled = Path(pydicom.data.__file__).parent / "test_files"
    files += sorted(bundled.glob("*.dcm"))[: limit - len(files)]
    out = []
    for path in files:
        data = path.read_bytes()
        if len(data) <= 256 * 1024:  # small ones: fuzzing speed
            out.append(data)
    return out
