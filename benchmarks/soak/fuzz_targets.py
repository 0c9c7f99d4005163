"""The parsers kho runs on hostile bytes, as fuzz targets: each takes bytes and either
returns or raises one of kho's documented errors (a KhoError subclass).  Anything else
(an IndexError, a RecursionError, a struct.error, a hang, an AssertionError of a
target's own check) is a finding.  Used by the atheris driver (benchmarks/soak/fuzz.py)
and the hypothesis tests (tests/reliability/test_fuzz.py); seeds are real files, valid
encodings and known crasher shapes."""

from __future__ import annotations

import contextlib
import functools
import json
import struct
import tempfile
import tracemalloc
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


# --- QIDO-RS: parameters parsed, then run against a small real catalog ----------------------

#: (level, path keys) of the QIDO-RS routes: /studies, /series, /studies/{s}/series,
#: /instances, /studies/{s}/instances, /studies/{s}/series/{r}/instances
_QIDO_ROUTES = (
    ("STUDY", ()),
    ("SERIES", ()),
    ("SERIES", ("StudyInstanceUID",)),
    ("IMAGE", ()),
    ("IMAGE", ("StudyInstanceUID",)),
    ("IMAGE", ("StudyInstanceUID", "SeriesInstanceUID")),
)
#: the result cap of the fuzzed searches (the archive's find_result_limit)
_QIDO_CAP = 20


def _qido_instance(index: int, **attributes: Any) -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    from tests.helpers.part10 import part10_bytes

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = f"1.2.826.0.1.3680043.10.1146.9.{index}"
    ds.InstanceNumber = index
    for keyword, value in attributes.items():
        if isinstance(value, list):  # a sequence: items as dicts
            items = []
            for fields in value:
                item = Dataset()
                for name, text in fields.items():
                    setattr(item, name, text)
                items.append(item)
            value = items
        setattr(ds, keyword, value)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return part10_bytes(ds)


def _qido_instances() -> list[bytes]:
    """Instances whose values exercise every kind of key: names with SQL wildcards and
    non-ASCII letters, full and partial times, an empty date, the three catalogued
    sequences, numbers."""
    study = "1.2.826.0.1.3680043.10.1146.1"
    series = "1.2.826.0.1.3680043.10.1146.2"
    common = {"ReferringPhysicianName": "House^Gregory", "Modality": "CT", "Rows": 4}
    return [
        _qido_instance(
            1,
            **common,
            PatientID="FZ1",
            IssuerOfPatientID="HOSP",
            PatientName="SMITH^JOHN",
            PatientBirthDate="19500101",
            PatientSex="M",
            OtherPatientIDsSequence=[
                {"PatientID": "CIT-1", "IssuerOfPatientID": "NATION", "TypeOfPatientID": "TEXT"}
            ],
            StudyInstanceUID=study + ".1",
            StudyDate="20200101",
            StudyTime="101530",
            AccessionNumber="ACC_1",
            StudyID="S1",
            StudyDescription="CHEST%",
            ProcedureCodeSequence=[
                {"CodeValue": "CT-CH", "CodingSchemeDesignator": "L", "CodeMeaning": "CT chest"}
            ],
            SeriesInstanceUID=series + ".1",
            SeriesNumber=1,
            SeriesDate="20200101",
            SeriesTime="1015",
            RequestAttributesSequence=[
                {"RequestedProcedureID": "RP1", "ScheduledProcedureStepID": "SPS1"}
            ],
            ContentDate="20200101",
            ContentTime="101530.123456",
        ),
        _qido_instance(
            2,
            **common,
            PatientID="FZ%2",
            PatientName="Müller^Jürgen=ミュラー^ユルゲン",
            PatientBirthDate="",
            StudyInstanceUID=study + ".2",
            StudyDate="",
            StudyTime="08",
            AccessionNumber="",
            SeriesInstanceUID=series + ".2",
            SeriesNumber=2,
        ),
        _qido_instance(
            3,
            **{**common, "Modality": "MR"},
            PatientID="FZ1",
            IssuerOfPatientID="HOSP",
            PatientName="SMITH^JOHN",
            StudyInstanceUID=study + ".1",
            StudyDate="20200101",
            StudyTime="101530",
            SeriesInstanceUID=series + ".3",
            SeriesNumber=3,
            SeriesTime="235959.5",
        ),
    ]


_QIDO_CATALOG: tuple[Any, dict[str, str]] | None = None


def _qido_catalog() -> tuple[Any, dict[str, str]]:
    """A SQLite catalog filled by real ingest (the instances above and a few real files),
    built once per process; and the UIDs the resource paths name."""
    global _QIDO_CATALOG
    if _QIDO_CATALOG is None:
        import warnings

        from kho.archive.archive import Archive
        from kho.archive.catalog import open_catalog
        from kho.archive.config import Settings

        settings = Settings(
            data_dir=Path(tempfile.mkdtemp(prefix="kho-fuzz-qido-")) / "data", fsync=False
        )
        with Archive(settings) as archive, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            archive.derivers = []  # rows are what is queried: no thumbnails
            for data in _qido_instances():
                archive.ingest_part10(data)
            for data in _dicom_seeds(6):
                with contextlib.suppress(KhoError):
                    archive.ingest_part10(data, lenient_identity=True)
        uids = {
            "StudyInstanceUID": "1.2.826.0.1.3680043.10.1146.1.1",
            "SeriesInstanceUID": "1.2.826.0.1.3680043.10.1146.2.1",
        }
        _QIDO_CATALOG = (open_catalog(settings.sqlite_path, synchronous_full=False), uids)
    return _QIDO_CATALOG


def qido_params(level: str, params: list[tuple[str, str]], path: dict[str, str]) -> None:
    """One QIDO-RS search without HTTP: the parameters parsed (parse_search), the query
    run on the fuzz catalog (find_page) and its rows made DICOM JSON."""
    from kho.viewer_api.qido import find_page, parse_search, result_json

    catalog, _uids = _qido_catalog()
    try:
        parameters = parse_search(params, level, path)
        rows, _warning = find_page(catalog, parameters, _QIDO_CAP)
        for row in rows:
            result_json(row, "http://127.0.0.1/dicom-web/studies/x")
    except KhoError:
        pass


def qido(data: bytes) -> None:
    """QIDO-RS parameters: the first byte picks the route (level and path UIDs), the rest
    is the query string, parsed as Starlette parses a request's (latin-1, then
    ``parse_qsl``: percent escapes as UTF-8).  Bit 6 of the first byte: decode the bytes
    as UTF-8 with surrogate escapes instead (lone surrogates, which HTTP cannot carry,
    for parse_search's other callers); bit 7: the first value as the path's last UID."""
    if not data:
        return
    selector, raw = data[0], data[1:]
    level, path_keys = _QIDO_ROUTES[selector % len(_QIDO_ROUTES)]
    if selector & 0x40:
        params = urllib.parse.parse_qsl(
            raw.decode("utf-8", "surrogateescape"),
            keep_blank_values=True,
            errors="surrogateescape",
        )
    else:
        params = urllib.parse.parse_qsl(raw.decode("latin-1"), keep_blank_values=True)
    _catalog, uids = _qido_catalog()
    path = {key: uids[key] for key in path_keys}
    if selector & 0x80 and path_keys and params:
        path[path_keys[-1]] = params[0][1]
    qido_params(level, params, path)


# --- codecs: kho's own decoders behind the public FrameCodec.decode ---------------------------

#: rows and columns of a fuzzed frame description are at most this
CODEC_MAX_SIDE = 512
_CODEC_BITS = (8, 16, 1, 32)
_CODEC_SYNTAXES = ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.5")  # JPEG-LS, RLE
#: allocation slack of one decode beyond its frame and input (small arrays, tables)
_CODEC_SLACK = 2 << 20


def codec_frame(data: bytes) -> tuple[str, int, int, int, int, bytes]:
    """(transfer syntax, rows, columns, samples, bits allocated, stream) of a fuzz input:
    byte 0 picks the codec (bit 0), samples (bit 1: 3, else 1) and bits allocated (bits
    2-3: 8, 16, 1, 32); bytes 1-2 and 3-4 the rows and columns (big endian, 1 to
    CODEC_MAX_SIDE); the rest is the frame's stream."""
    head = data[:5].ljust(5, b"\0")
    rows = 1 + int.from_bytes(head[1:3], "big") % CODEC_MAX_SIDE
    columns = 1 + int.from_bytes(head[3:5], "big") % CODEC_MAX_SIDE
    samples = 3 if head[0] & 2 else 1
    return (
        _CODEC_SYNTAXES[head[0] & 1],
        rows,
        columns,
        samples,
        _CODEC_BITS[(head[0] >> 2) & 3],
        data[5:],
    )


def codec_head(syntax: str, rows: int, columns: int, samples: int, bits: int) -> bytes:
    """The 5 bytes that codec_frame reads as this frame description."""
    flags = _CODEC_SYNTAXES.index(syntax) | (2 if samples == 3 else 0)
    flags |= _CODEC_BITS.index(bits) << 2
    return bytes([flags]) + (rows - 1).to_bytes(2, "big") + (columns - 1).to_bytes(2, "big")


def codecs(data: bytes) -> None:
    """JPEG-LS and RLE frames decoded through the registry's codec, as the read path
    decodes them, with the frame description from the first bytes.  Checks beside
    "KhoError only": a decoded frame has the declared rows, columns and samples, and a
    decode allocates (numpy arrays, traced) no more than a few times the declared
    frame and its input: a hostile header claiming a huge frame is refused, not
    allocated.  The numba kernels are not instrumented (atheris sees Python only)."""
    from kho.codecs import registry

    syntax, rows, columns, samples, bits, stream = codec_frame(data)
    budget = 4 * rows * columns * samples * 4 + 16 * len(stream) + _CODEC_SLACK
    codec = registry.get_codec(syntax)
    # traced for this decode only unless tracing already (the atheris driver traces the
    # whole run: tracemalloc started and stopped for each of millions of inputs leaks)
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    try:
        image = codec.decode(
            stream, rows=rows, columns=columns, samples_per_pixel=samples, bits_allocated=bits
        )
    except KhoError:
        image = None
    finally:
        peak = tracemalloc.get_traced_memory()[1] - before
        if started:
            tracemalloc.stop()
    assert peak <= budget, f"decoding a {rows}x{columns}x{samples} frame allocated {peak} bytes"
    if image is not None:
        shape = (rows, columns) if samples == 1 else (rows, columns, samples)
        assert image.shape == shape, f"decoded {image.shape}, declared {shape}"


TARGETS: dict[str, Target] = {
    "part10": part10,
    "stow_multipart": stow_multipart,
    "hl7": hl7,
    "dimse_pdv": dimse_pdv,
    "token": token,
    "qido": qido,
    "codecs": codecs,
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
    if target == "qido":
        return _qido_seeds()
    if target == "codecs":
        return _codec_seeds()
    raise KeyError(target)


def _qido_seeds() -> list[bytes]:
    """Query strings (after a route byte) with every kind of key and hostile values."""
    queries = [
        (0, "PatientName=SMI*&limit=2&offset=1&includefield=all"),
        (0, "PatientName=m%C3%BCller*&fuzzymatching=true&includefield=00100030,StudyID"),
        (0, "StudyDate=20200101-20201231&StudyTime=1000-1100&ModalitiesInStudy=CT"),
        (0, "StudyDate=-20200101&StudyTime=10&AccessionNumber=ACC_?"),
        (0, "PatientID=CIT-1&IssuerOfPatientID=NATION"),
        (0, "OtherPatientIDsSequence.PatientID=CIT*&OtherPatientIDsSequence.TypeOfPatientID="),
        (0, "ProcedureCodeSequence.CodeValue=CT-CH&includefield=ProcedureCodeSequence"),
        (0, "StudyInstanceUID=1.2.826.0.1.3680043.10.1146.1.1,1.2.3%5C1.2.4"),
        (0, "0020000D=1.2.826.0.1.3680043.10.1146.1.2&0010,0010=*"),
        (1, "Modality=CT&SeriesNumber=1&SeriesDate=20200101-&SeriesTime=235959.5-"),
        (1, "RequestAttributesSequence.RequestedProcedureID=RP1&limit=0"),
        (2, "SeriesInstanceUID=1.2.826.0.1.3680043.10.1146.2.3&includefield=all"),
        (3, "SOPClassUID=1.2.840.10008.5.1.4.1.1.2&InstanceNumber=-1&Rows=4"),
        (4, "ContentDate=20200101&ContentTime=101530.123456-&NumberOfFrames="),
        (5, "includefield=all&limit=1&offset=0"),
        (0, "limit=99999999999999999999&offset=99999999999999999999"),
        (0, "PatientName=%00&StudyDescription=CHEST%25&StudyID=%FF%FE"),
        (0, "StudyDate=20200230&StudyTime=25&PatientBirthDate=2020.01.01"),
        (1, "SeriesNumber=" + "9" * 40 + "&Modality=" + "\\".join(["CT"] * 50)),
        (0, "PatientName=" + "*?" * 200),
        (0x40 | 0, "PatientName=\udcff&limit=1"),
        (0x80 | 2, "*&Modality=MR"),
    ]
    out = []
    for selector, text in queries:
        raw = text.encode("utf-8", "surrogateescape")
        out.append(bytes([selector]) + raw)
    return out


def _codec_seeds() -> list[bytes]:
    """Frames kho's own encoders made of small images (grey 2, 8, 12 and 16 bits, colour
    in every JPEG-LS interleave, restart intervals, RLE of 8, 16 and 32 bits and 1-bit
    packed), the JPEG-LS and RLE frames of the sample files, and huge-frame headers."""
    import numpy as np

    from kho.codecs import jpegls, rle

    jls, rle_syntax = _CODEC_SYNTAXES
    random = np.random.default_rng(20)
    grey8 = random.integers(0, 256, (17, 23), dtype=np.uint8)
    grey12 = (np.add.outer(np.arange(32), np.arange(40)) * 50 % 4096).astype(np.uint16)
    grey16 = random.integers(0, 65536, (9, 7), dtype=np.uint16)
    colour = random.integers(0, 256, (11, 13, 3), dtype=np.uint8)
    flat = np.full((64, 64), 7, dtype=np.uint8)
    out = [
        codec_head(jls, 17, 23, 1, 8) + jpegls.encode(grey8, bits_stored=8),
        codec_head(jls, 32, 40, 1, 16) + jpegls.encode(grey12, bits_stored=12),
        codec_head(jls, 32, 40, 1, 16) + jpegls.encode(grey12, bits_stored=12, restart_interval=5),
        codec_head(jls, 9, 7, 1, 16) + jpegls.encode(grey16, bits_stored=16),
        codec_head(jls, 17, 23, 1, 8) + jpegls.encode(grey8 & 3, bits_stored=2),
        codec_head(jls, 64, 64, 1, 8) + jpegls.encode(flat, bits_stored=8),
        codec_head(rle_syntax, 17, 23, 1, 8) + rle.encode(grey8),
        codec_head(rle_syntax, 9, 7, 1, 16) + rle.encode(grey16),
        codec_head(rle_syntax, 11, 13, 3, 8) + rle.encode(colour),
        codec_head(rle_syntax, 9, 7, 1, 32) + rle.encode(grey16.astype(np.uint32) << 7),
        codec_head(rle_syntax, 64, 64, 1, 8) + rle.encode(flat),
        # 1-bit: one segment of the packed bits, 8 pixels a byte
        codec_head(rle_syntax, 16, 16, 1, 1)
        + rle.encode(np.packbits(grey8.ravel()[:256] & 1, bitorder="little")[None, :]),
    ]
    for ilv in ("none", "line", "sample"):
        out.append(
            codec_head(jls, 11, 13, 3, 8) + jpegls.encode(colour, bits_stored=8, interleave=ilv)
        )
    # headers (SOF55: P, Y, X, Nf) claiming frames far larger than the declared one: 65535
    # x 65535 (refused as absurd), 32767 x 16384 on too few bytes for its lines, and 2048
    # x 2048 and 16384 x 16384 with bytes enough for one bit a line
    sof = out[0].index(b"\xff\xf7")
    for size, padding in ((b"\xff\xff\xff\xff", 0), (b"\x7f\xff\x40\x00", 0),
                          (b"\x08\x00\x08\x00", 0), (b"\x40\x00\x40\x00", 2048)):  # fmt: skip
        out.append(out[0][: sof + 5] + size + out[0][sof + 9 :] + b"\0" * padding)
    out += _sample_frames()
    return out


def _sample_frames() -> list[bytes]:
    """The first frame of each JPEG-LS lossless and RLE sample file small enough to fuzz."""
    import warnings

    import pydicom
    import pydicom.data
    from pydicom.encaps import generate_frames

    jls, _rle = _CODEC_SYNTAXES
    samples = Path("/work/shared/dicom-samples")
    bundled = Path(pydicom.data.__file__).parent / "test_files"
    files = sorted(samples.glob("*.dcm")) if samples.is_dir() else []
    files += sorted(bundled.glob("*.dcm"))
    out = []
    for path in files:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=False)
                syntax = str(ds.file_meta.TransferSyntaxUID)
                if syntax not in _CODEC_SYNTAXES or max(ds.Rows, ds.Columns) > CODEC_MAX_SIDE:
                    continue
                frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
                frame = next(generate_frames(ds.PixelData, number_of_frames=frames))
            except Exception:  # not every bundled file is readable: seeds are a bonus
                continue
        if len(frame) > 64 * 1024:
            continue
        bits = int(ds.BitsAllocated)
        if syntax == jls and bits not in (8, 16):
            continue
        head = codec_head(syntax, int(ds.Rows), int(ds.Columns), int(ds.SamplesPerPixel), bits)
        out.append(head + frame)
    return out


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
