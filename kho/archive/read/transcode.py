"""Retrieval negotiation: the transfer syntax an instance (or a frame) goes out in, and the
transcoder that produces it.  One rule for every front door (C-GET and C-MOVE
sub-operations, WADO-RS instances, frames and bulk data; DESIGN.md "Serving viewers and
workstations"), per instance, given the syntaxes the peer accepts in its order of
preference:

1. the bytes as received, when the peer accepts the received syntax;
2. the at-rest JPEG-LS frames re-wrapped as JPEG-LS Lossless (1.2.840.10008.1.2.4.80),
   when accepted: no decode, the streams go out as stored (their precision P is Bits
   Stored, as the received header says);
3. else the pixels decoded and encoded into a syntax the peer accepted, in its order, that
   an encoder here can produce: every encoder is lossless (native syntaxes, Deflated, RLE,
   JPEG-LS, JPEG 2000, JPEG lossless SV1).  A lossy original is therefore sent as received
   or decoded (its decoded pixels, kept exactly, possibly in a lossless container, with
   Lossy Image Compression "01"), never re-encoded lossily.  Syntaxes that permit lossy
   coding but also hold lossless streams (JPEG-LS near-lossless 4.81, JPEG 2000 4.91,
   JPEG lossless process 14 4.57) get lossless streams.

Encoders are registered by transfer syntax UID (``register_encoder``), each with
``is_available()`` (its dependency imports and works here) and ``can_encode(layout)``
(the pixel layout fits it), as pydicom's encoder registry does.  JPEG lossless SV1 comes
from libjpeg-turbo 3 (lossless mode, predictor 1) through ``imagecodecs.jpeg8_encode``;
imagecodecs' ``ljpeg_encode`` (liblj92) writes predictor 6, which is process 14 but not SV1.
"""

from __future__ import annotations

import json
import logging
import threading
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from io import BytesIO
from typing import TYPE_CHECKING, Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate

from kho.archive.dataset.part10 import (
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    build_file_meta,
    read_file_meta,
)
from kho.archive.read.objects import read_header_object
from kho.archive.read.pixels import (
    _sign_extend,
    frame_array,
    has_pixels,
    is_little_endian,
    stored_frame,
)
from kho.codecs.jpegls import TRANSFER_SYNTAX as JPEG_LS_LOSSLESS
from kho.codecs.rle import TRANSFER_SYNTAX as RLE_LOSSLESS
from kho.errors import CodecError, CodecUnavailableError, KhoError, ObjectNotFoundError

if TYPE_CHECKING:
    from kho.archive.catalog import InstanceRecord
    from kho.archive.read.source import StoredArchive

log = logging.getLogger(__name__)

JPEG_LS_NEAR_LOSSLESS = "1.2.840.10008.1.2.4.81"
JPEG_2000_LOSSLESS = "1.2.840.10008.1.2.4.90"
JPEG_2000 = "1.2.840.10008.1.2.4.91"
JPEG_LOSSLESS_P14 = "1.2.840.10008.1.2.4.57"
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"

#: syntaxes whose pixel data is exactly what was encoded (a lossless source stays lossless)
LOSSLESS_SYNTAXES = frozenset(
    {
        IMPLICIT_VR_LITTLE_ENDIAN,
        EXPLICIT_VR_LITTLE_ENDIAN,
        DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
        EXPLICIT_VR_BIG_ENDIAN,
        "1.2.840.10008.1.2.1.98",  # encapsulated uncompressed
        JPEG_LOSSLESS_P14,
        JPEG_LOSSLESS_SV1,
        JPEG_LS_LOSSLESS,
        JPEG_2000_LOSSLESS,
        "1.2.840.10008.1.2.4.92",  # JPEG 2000 part 2 lossless
        "1.2.840.10008.1.2.4.201",  # HTJ2K lossless
        "1.2.840.10008.1.2.4.202",  # HTJ2K lossless RPCL
        RLE_LOSSLESS,
        "1.2.840.10008.1.2.8.1",  # deflated image frame compression
    }
)

_PIXEL_TAG_BYTES = (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")  # (7FE0,0010) LE, BE
# binary VRs whose values are words of this many bytes: swapped when the byte order changes
_WORD_VRS = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}


# --- pixel layouts and encoders -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PixelLayout:
    """What an encoder needs to know of the pixels it gets (after any decode)."""

    rows: int
    columns: int
    samples_per_pixel: int
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    photometric_interpretation: str

    @classmethod
    def of_record(cls, record: InstanceRecord) -> PixelLayout:
        bits = int(record.bits_allocated or 0)
        return cls(
            rows=int(record.rows_ or 0),
            columns=int(record.columns_ or 0),
            samples_per_pixel=int(record.samples_per_pixel or 1),
            bits_allocated=bits,
            # float pixel data (parametric maps) has no Bits Stored: 0, which no encoder takes
            bits_stored=int(record.bits_stored or 0),
            pixel_representation=int(record.pixel_representation or 0),
            photometric_interpretation=(record.photometric_interpretation or "").strip(),
        )

    @classmethod
    def of_dataset(cls, ds: Dataset) -> PixelLayout:
        return cls(
            rows=int(ds.get("Rows", 0) or 0),
            columns=int(ds.get("Columns", 0) or 0),
            samples_per_pixel=int(ds.get("SamplesPerPixel", 1) or 1),
            bits_allocated=int(ds.get("BitsAllocated", 0) or 0),
            bits_stored=int(ds.get("BitsStored", 0) or 0) if "PixelData" in ds else 0,
            pixel_representation=int(ds.get("PixelRepresentation", 0) or 0),
            photometric_interpretation=str(ds.get("PhotometricInterpretation", "")).strip(),
        )

    @property
    def subsampled(self) -> bool:
        """Colour with chroma subsampling (YBR_FULL_422, YBR_PARTIAL_420...): native data of
        that kind has fewer chroma samples than pixels, which no frame encoder here takes."""
        pi = self.photometric_interpretation
        return pi.startswith("YBR") and ("422" in pi or "420" in pi)

    def fits(self, bits_allocated: tuple[int, ...], min_bits_stored: int = 1) -> bool:
        return (
            self.rows > 0
            and self.columns > 0
            and self.samples_per_pixel in (1, 3)
            and self.bits_allocated in bits_allocated
            and min_bits_stored <= self.bits_stored <= self.bits_allocated
            and not self.subsampled
        )


def stored_values(frame: np.ndarray, layout: PixelLayout) -> np.ndarray:
    """A frame's raw sample words as unsigned values below 2**Bits Stored (the form JPEG-LS,
    JPEG and JPEG 2000 streams hold; decoders sign-extend them again for signed data).
    CodecError when a bit above Bits Stored holds something else than zero (unsigned) or
    the sign (signed): those pixels cannot be kept exactly in Bits Stored bits."""
    raw = _unsigned(frame)
    bits = layout.bits_stored
    if bits >= raw.dtype.itemsize * 8:
        return raw
    masked = raw & np.array((1 << bits) - 1, dtype=raw.dtype)
    if layout.pixel_representation == 1:
        high = np.array(((1 << (raw.dtype.itemsize * 8)) - 1) ^ ((1 << bits) - 1), raw.dtype)
        negative = (masked >> np.array(bits - 1, raw.dtype)) & np.array(1, raw.dtype)
        expected = np.where(negative.astype(bool), masked | high, masked)
        if not np.array_equal(expected, raw):
            raise CodecError("pixel values do not fit Bits Stored (signed)")
    elif not np.array_equal(masked, raw):
        raise CodecError("pixel values use bits above Bits Stored")
    return masked


class SyntaxEncoder:
    """Produces one transfer syntax from decoded pixels.  Native syntaxes (``encapsulated``
    False) re-encode the dataset; the others encode one frame at a time."""

    encapsulated = True

    def __init__(self, transfer_syntax_uid: str, name: str) -> None:
        self.transfer_syntax_uid = transfer_syntax_uid
        self.name = name
        self._available: bool | None = None

    def is_available(self) -> bool:
        """Whether it runs here (checked once: its dependency imports and works)."""
        if self._available is None:
            self._available = self._check_available()
        return self._available

    def _check_available(self) -> bool:
        return True

    def can_encode(self, layout: PixelLayout) -> bool:
        """Whether pixels of this layout can be encoded (native syntaxes: any)."""
        return not self.encapsulated

    def encode_frame(self, frame: np.ndarray, layout: PixelLayout) -> bytes:
        """One frame: sample words (Bits Allocated, signed or not), shape (rows, columns) or
        (rows, columns, samples), colour by pixel."""
        raise CodecUnavailableError(f"{self.name} does not encode frames")


class NativeSyntax(SyntaxEncoder):
    """An uncompressed syntax: the dataset is written again (pydicom)."""

    encapsulated = False


class JpegLsEncoder(SyntaxEncoder):
    """kho's own JPEG-LS encoder (kho.codecs.jpegls), NEAR = 0, P = Bits Stored; no restart
    intervals, which decoders before CharLS 2.3 (dcmtk 3.6.7) cannot read."""

    def _check_available(self) -> bool:
        from kho.codecs import registry

        return registry.available_codecs().get(JPEG_LS_LOSSLESS, False)

    def can_encode(self, layout: PixelLayout) -> bool:
        return layout.fits((8, 16), min_bits_stored=2)

    def encode_frame(self, frame: np.ndarray, layout: PixelLayout) -> bytes:
        from kho.codecs import jpegls

        return jpegls.encode(stored_values(frame, layout), bits_stored=layout.bits_stored)


class RleEncoder(SyntaxEncoder):
    """kho's own RLE Lossless encoder (kho.codecs.rle): whole bytes, any sample values."""

    def _check_available(self) -> bool:
        from kho.codecs import registry

        return registry.available_codecs().get(RLE_LOSSLESS, False)

    def can_encode(self, layout: PixelLayout) -> bool:
        return layout.fits((8, 16, 32))

    def encode_frame(self, frame: np.ndarray, layout: PixelLayout) -> bytes:
        from kho.codecs import rle

        return rle.encode(np.ascontiguousarray(_unsigned(frame)))


class Jpeg2000Encoder(SyntaxEncoder):
    """JPEG 2000 reversible (lossless) through pydicom's JPEG2000Lossless encoder
    (pylibjpeg-openjpeg), without the colour transform so the Photometric Interpretation
    stays as it is.  Its six resolution levels need 32 pixels a side."""

    def _check_available(self) -> bool:
        try:
            from pydicom.pixels import get_encoder
            from pydicom.uid import JPEG2000Lossless

            return bool(get_encoder(JPEG2000Lossless).is_available)
        except Exception:  # pydicom raises several types for a missing plugin
            return False

    def can_encode(self, layout: PixelLayout) -> bool:
        return (
            layout.fits((8, 16))
            and min(layout.rows, layout.columns) >= 32
            and layout.photometric_interpretation
            in ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "YBR_FULL")
        )

    def encode_frame(self, frame: np.ndarray, layout: PixelLayout) -> bytes:
        from pydicom.pixels import get_encoder
        from pydicom.uid import JPEG2000Lossless

        values = stored_values(frame, layout)
        if layout.pixel_representation == 1:
            values = _sign_extended(values, layout.bits_stored)
        kwargs: dict[str, Any] = {
            "rows": layout.rows,
            "columns": layout.columns,
            "samples_per_pixel": layout.samples_per_pixel,
            "bits_allocated": layout.bits_allocated,
            "bits_stored": layout.bits_stored,
            "pixel_representation": layout.pixel_representation,
            "photometric_interpretation": layout.photometric_interpretation,
            "number_of_frames": 1,
            "use_mct": False,
        }
        if layout.samples_per_pixel > 1:
            kwargs["planar_configuration"] = 0
        try:
            encoder = get_encoder(JPEG2000Lossless)
            return bytes(encoder.encode(np.ascontiguousarray(values), **kwargs))
        except Exception as exc:  # pydicom wraps the plugin's failures in several types
            raise CodecError(f"JPEG 2000 encoding failed: {exc}") from exc


class JpegLosslessEncoder(SyntaxEncoder):
    """JPEG lossless, process 14, selection value 1 (ITU-T T.81 H): libjpeg-turbo 3's
    lossless mode through imagecodecs, precision P = Bits Stored (2-16), no colour transform
    (an Adobe marker says so for three components)."""

    def _check_available(self) -> bool:
        try:
            import imagecodecs

            probe = np.arange(16, dtype=np.uint16).reshape(4, 4)
            stream = imagecodecs.jpeg8_encode(probe, lossless=True, predictor=1, bitspersample=12)
            return b"\xff\xc3" in bytes(stream)  # SOF3: lossless
        except Exception:  # an imagecodecs without lossless JPEG raises its own types
            return False

    def can_encode(self, layout: PixelLayout) -> bool:
        # YCbCr is left out: decoders differ on whether a three-component lossless JPEG
        # stream is converted to RGB, so its decoded values would be ambiguous
        return layout.fits((8, 16), min_bits_stored=2) and (
            layout.samples_per_pixel == 1 or layout.photometric_interpretation == "RGB"
        )

    def encode_frame(self, frame: np.ndarray, layout: PixelLayout) -> bytes:
        import imagecodecs

        values = np.ascontiguousarray(stored_values(frame, layout))
        # colour as it is (an Adobe marker says so): no YCbCr transform in lossless mode
        space = "RGB" if values.ndim == 3 else None
        try:
            stream = imagecodecs.jpeg8_encode(
                values,
                lossless=True,
                predictor=1,
                bitspersample=layout.bits_stored,
                colorspace=space,
                outcolorspace=space,
            )
        except Exception as exc:  # imagecodecs raises its own error types
            raise CodecError(f"JPEG lossless encoding failed: {exc}") from exc
        return bytes(stream)


def _unsigned(frame: np.ndarray) -> np.ndarray:
    """The same sample words as unsigned integers."""
    return frame.view(np.dtype(f"u{frame.dtype.itemsize}")) if frame.dtype.kind == "i" else frame


def _sign_extended(masked: np.ndarray, bits_stored: int) -> np.ndarray:
    """Masked (unsigned) Bits Stored values back to signed integers of the same size."""
    size = masked.dtype.itemsize
    return _sign_extend(masked, bits_stored, size * 8).view(np.dtype(f"i{size}"))


_ENCODERS: dict[str, SyntaxEncoder] = {}
_ENCODERS_LOCK = threading.Lock()
# producible_syntaxes() per kind of instance
_PRODUCIBLE: dict[tuple[Any, ...], tuple[str, ...]] = {}
_PRODUCIBLE_LOCK = threading.Lock()


def register_encoder(encoder: SyntaxEncoder) -> None:
    """Register (or replace) the encoder of a transfer syntax."""
    with _ENCODERS_LOCK:
        _ENCODERS[encoder.transfer_syntax_uid] = encoder
    with _PRODUCIBLE_LOCK:
        _PRODUCIBLE.clear()


def registered_encoders() -> dict[str, SyntaxEncoder]:
    with _ENCODERS_LOCK:
        return dict(_ENCODERS)


def available_encoders() -> dict[str, bool]:
    """Transfer syntax UID -> whether its encoder runs here."""
    return {uid: encoder.is_available() for uid, encoder in registered_encoders().items()}


def encoder_for(transfer_syntax_uid: str) -> SyntaxEncoder | None:
    """The registered encoder of a syntax, if it runs here."""
    with _ENCODERS_LOCK:
        encoder = _ENCODERS.get(transfer_syntax_uid)
    return encoder if encoder is not None and encoder.is_available() else None


for _encoder in (
    NativeSyntax(EXPLICIT_VR_LITTLE_ENDIAN, "explicit-le"),
    NativeSyntax(IMPLICIT_VR_LITTLE_ENDIAN, "implicit-le"),
    NativeSyntax(DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN, "deflated"),
    NativeSyntax(EXPLICIT_VR_BIG_ENDIAN, "explicit-be"),
    JpegLsEncoder(JPEG_LS_LOSSLESS, "jpeg-ls"),
    JpegLsEncoder(JPEG_LS_NEAR_LOSSLESS, "jpeg-ls"),
    RleEncoder(RLE_LOSSLESS, "rle"),
    Jpeg2000Encoder(JPEG_2000_LOSSLESS, "jpeg-2000"),
    Jpeg2000Encoder(JPEG_2000, "jpeg-2000"),
    JpegLosslessEncoder(JPEG_LOSSLESS_SV1, "jpeg-lossless"),
    JpegLosslessEncoder(JPEG_LOSSLESS_P14, "jpeg-lossless"),
):
    register_encoder(_encoder)

#: kho's order when it proposes syntaxes itself (a C-MOVE destination picks among them):
#: uncompressed first (every peer decodes it), then the compact lossless ones
PROPOSAL_ORDER = (
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    JPEG_LS_LOSSLESS,
    RLE_LOSSLESS,
    JPEG_2000_LOSSLESS,
    JPEG_LOSSLESS_SV1,
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,
    JPEG_LS_NEAR_LOSSLESS,
    JPEG_2000,
    JPEG_LOSSLESS_P14,
)


# --- the rule ------------------------------------------------------------------------------


def is_lossy(transfer_syntax_uid: str) -> bool:
    """Whether pixel data in this syntax may have lost information."""
    return transfer_syntax_uid not in LOSSLESS_SYNTAXES


def _decodable(record: InstanceRecord) -> bool:
    """Whether the instance's pixels can be decoded here (native and at-rest ones always;
    received compressed ones where pydicom has a decoder)."""
    if record.pixel_format != "encapsulated":
        return True
    try:
        from pydicom.pixels import get_decoder

        return bool(get_decoder(record.transfer_syntax_uid).is_available)
    except Exception:  # pydicom raises NotImplementedError or ValueError for unknown syntaxes
        return False


def decoded_layout(record: InstanceRecord) -> PixelLayout:
    """The layout of the instance's pixels once decoded for re-encoding: compressed colour
    is converted to RGB (pydicom's decoding), native colour stays as it is."""
    layout = PixelLayout.of_record(record)
    if record.pixel_format == "encapsulated" and layout.samples_per_pixel == 3:
        return replace(layout, photometric_interpretation="RGB")
    return layout


def can_produce(record: InstanceRecord, transfer_syntax_uid: str) -> bool:
    """Whether the instance can be sent in this syntax (without trying the encode)."""
    if transfer_syntax_uid == record.transfer_syntax_uid:
        return True
    if transfer_syntax_uid in (JPEG_LS_LOSSLESS, JPEG_LS_NEAR_LOSSLESS) and (
        record.pixel_format == "jpeg-ls"
    ):
        return True
    if not has_pixels(record):
        # nothing to encode: the dataset is written again, Explicit VR Little Endian for
        # every encapsulated syntax (PS3.5 A.4)
        return encoder_for(transfer_syntax_uid) is not None or _known_syntax(transfer_syntax_uid)
    encoder = encoder_for(transfer_syntax_uid)
    if encoder is None or not _decodable(record):
        return False
    return encoder.can_encode(decoded_layout(record))


def _known_syntax(transfer_syntax_uid: str) -> bool:
    uid = pydicom.uid.UID(transfer_syntax_uid)
    return uid.is_transfer_syntax and uid in pydicom.uid.AllTransferSyntaxes


def syntax_candidates(record: InstanceRecord, accepted: Iterable[str]) -> list[str]:
    """The syntaxes the instance may go out in, best first (the module's rule)."""
    accepted = list(dict.fromkeys(accepted))
    out: list[str] = []
    if record.transfer_syntax_uid in accepted:
        out.append(record.transfer_syntax_uid)
    if record.pixel_format == "jpeg-ls" and JPEG_LS_LOSSLESS in accepted:
        out.append(JPEG_LS_LOSSLESS)
    out += [ts for ts in accepted if ts not in out and can_produce(record, ts)]
    return out


def choose_syntax(record: InstanceRecord, accepted: Iterable[str]) -> str | None:
    """The syntax the instance goes out in, or None if the peer accepts none it can."""
    candidates = syntax_candidates(record, accepted)
    return candidates[0] if candidates else None


def producible_syntaxes(record: InstanceRecord) -> list[str]:
    """Every syntax the instance can be sent in, in :data:`PROPOSAL_ORDER` (and its
    received syntax).  Remembered per kind of instance: a C-MOVE asks for each of its
    instances, and most of a study's are alike."""
    kind = (
        record.transfer_syntax_uid,
        record.pixel_format,
        has_pixels(record),
        decoded_layout(record),
    )
    with _PRODUCIBLE_LOCK:
        found = _PRODUCIBLE.get(kind)
    if found is None:
        found = tuple(ts for ts in PROPOSAL_ORDER if can_produce(record, ts))
        if record.transfer_syntax_uid not in found:
            found += (record.transfer_syntax_uid,)
        with _PRODUCIBLE_LOCK:
            _PRODUCIBLE[kind] = found
            if len(_PRODUCIBLE) > 256:
                _PRODUCIBLE.pop(next(iter(_PRODUCIBLE)))
    return list(found)


# --- instances -----------------------------------------------------------------------------


def encode_instance(
    archive: StoredArchive, record: InstanceRecord, transfer_syntax_uid: str
) -> bytes:
    """The instance's dataset bytes (no File Meta Information) in the given syntax: as
    received, re-wrapped from the at-rest JPEG-LS frames, or transcoded.  CodecError (or
    CodecUnavailableError) when it cannot be produced."""
    if transfer_syntax_uid == record.transfer_syntax_uid:
        return archive.read_dataset(record)
    if transfer_syntax_uid in (JPEG_LS_LOSSLESS, JPEG_LS_NEAR_LOSSLESS) and (
        record.pixel_format == "jpeg-ls" and not record.stored_as_received
    ):
        try:
            return _rewrap_at_rest(archive, record, transfer_syntax_uid)
        except ObjectNotFoundError:
            pass  # replaced meanwhile: read_part10 finds the current version
        except _RestartIntervalsError:
            # large frames are stored with restart intervals, which decoders older than
            # CharLS 2.3 (dcmtk 3.6.7 among them) cannot read: a peer gets them re-encoded
            # without (JpegLsEncoder writes none)
            pass
    return _transcode(archive, record, transfer_syntax_uid)


class _RestartIntervalsError(CodecError):
    """An at-rest stream holds restart intervals (a DRI segment)."""


def _has_restart_intervals(stream: bytes) -> bool:
    """Whether a JPEG-LS stream's header (the segments before its first SOS) holds a DRI."""
    at = 2  # after SOI
    while at + 4 <= len(stream) and stream[at] == 0xFF:
        marker = stream[at + 1]
        if marker == 0xDD:  # DRI
            return True
        if marker == 0xDA:  # SOS: the scan begins
            return False
        at += 2 + int.from_bytes(stream[at + 2 : at + 4], "big")
    return False


def encode_part10(
    archive: StoredArchive, record: InstanceRecord, transfer_syntax_uid: str
) -> bytes:
    """A Part 10 file in the given syntax: the received bytes (bit for bit, File Meta
    Information included) in the received syntax, else our File Meta and the transcoded
    dataset."""
    if transfer_syntax_uid == record.transfer_syntax_uid:
        return archive.read_part10(record)
    body = encode_instance(archive, record, transfer_syntax_uid)
    return build_file_meta(record.sop_class_uid, record.sop_uid, transfer_syntax_uid) + body


def encode_for(
    archive: StoredArchive, record: InstanceRecord, accepted: Iterable[str]
) -> tuple[str, bytes]:
    """(syntax, dataset bytes) by the rule: the first candidate that encodes.  An encode may
    still fail where the metadata allowed it (a pixel above Bits Stored): the next one is
    tried.  CodecUnavailableError when none works."""
    return _first_that_encodes(record, accepted, lambda ts: encode_instance(archive, record, ts))


def encode_part10_for(
    archive: StoredArchive, record: InstanceRecord, accepted: Iterable[str]
) -> tuple[str, bytes]:
    """:func:`encode_for` as a Part 10 file (:func:`encode_part10`)."""
    return _first_that_encodes(record, accepted, lambda ts: encode_part10(archive, record, ts))


def _first_that_encodes(
    record: InstanceRecord, accepted: Iterable[str], produce: Callable[[str], bytes]
) -> tuple[str, bytes]:
    accepted = list(accepted)
    errors: list[str] = []
    for syntax in syntax_candidates(record, accepted):
        try:
            return syntax, produce(syntax)
        except CodecError as exc:
            log.info("%s: cannot send in %s: %s", record.sop_uid, syntax, exc)
            errors.append(f"{syntax}: {exc}")
    reason = "; ".join(errors) if errors else "no encoder for any of them"
    raise CodecUnavailableError(
        f"{record.sop_uid} (received as {record.transfer_syntax_uid}) cannot be sent in "
        f"any syntax the peer accepts ({', '.join(accepted) or 'none'}): {reason}"
    )


def _pixel_element_header_length(head: bytes) -> int:
    """Bytes of the Pixel Data element's header at the end of ``head`` (12 explicit VR,
    8 implicit VR)."""
    if len(head) >= 12 and head[-12:-8] in _PIXEL_TAG_BYTES and head[-8:-6] in (b"OB", b"OW"):
        return 12
    if len(head) >= 8 and head[-8:-4] in _PIXEL_TAG_BYTES:
        return 8
    raise CodecError("the stored header does not end with a Pixel Data element")


def _rewrap_at_rest(
    archive: StoredArchive, record: InstanceRecord, transfer_syntax_uid: str
) -> bytes:
    """The received header with the at-rest JPEG-LS frames as encapsulated Pixel Data.

    The streams hold Bits Stored bits (P = Bits Stored, as the header says) of unsigned or
    two's complement values, colour by pixel: the header keeps its pixel attributes except
    Planar Configuration, 0 for JPEG-LS (PS3.5 8.2.3)."""
    header = read_header_object(archive.store, record.header_key)
    split = record.pixel_split
    head, tail = header[:split], header[split:]
    cut = _pixel_element_header_length(head)
    ds = _read(head[: split - cut] + tail)
    index: list[list[list[int]]] = json.loads(record.frame_index or "[]")
    streams = [
        archive.store.get_range(record.pixels_key, offset, length) for ((offset, length),) in index
    ]
    if len(streams) != int(record.number_of_frames or 1):
        raise CodecError(f"{record.sop_uid}: {len(streams)} at-rest frames, header says more")
    if any(_has_restart_intervals(stream) for stream in streams):
        raise _RestartIntervalsError(f"{record.sop_uid}: at-rest frames with restart intervals")
    _set_encapsulated(ds, streams)
    return _write(ds, transfer_syntax_uid, is_little_endian(record.transfer_syntax_uid))


def _read(data: bytes) -> Dataset:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(BytesIO(data), force=True)
    except Exception as exc:  # pydicom raises many types for odd input
        raise CodecError(f"cannot parse the stored instance: {exc}") from exc


def _set_encapsulated(ds: Dataset, frames: list[bytes]) -> None:
    ds.PixelData = encapsulate(frames)
    element = ds["PixelData"]
    element.VR = "OB"
    element.is_undefined_length = True
    if int(ds.get("SamplesPerPixel", 1) or 1) > 1:
        ds.PlanarConfiguration = 0


def _transcode(archive: StoredArchive, record: InstanceRecord, transfer_syntax_uid: str) -> bytes:
    if not can_produce(record, transfer_syntax_uid):
        raise CodecUnavailableError(
            f"{record.sop_uid}: cannot produce {transfer_syntax_uid} from "
            f"{record.transfer_syntax_uid}"
        )
    ds = _native_dataset(archive, record)
    encoder = encoder_for(transfer_syntax_uid)
    if encoder is not None and encoder.encapsulated and "PixelData" in ds:
        layout = PixelLayout.of_dataset(ds)
        if not encoder.can_encode(layout):
            raise CodecUnavailableError(
                f"{record.sop_uid}: {encoder.name} cannot encode {layout.bits_allocated}-bit "
                f"{layout.photometric_interpretation} pixels"
            )
        frames = [encoder.encode_frame(frame, layout) for frame in _native_frames(ds, layout)]
        _set_encapsulated(ds, frames)
    lossy = is_lossy(record.transfer_syntax_uid)
    if lossy and "PixelData" in ds and "LossyImageCompression" not in ds:
        ds.LossyImageCompression = "01"  # PS3.3 C.7.6.1.1.5: once lossy, always flagged
    return _write(ds, transfer_syntax_uid, True)


def _native_dataset(archive: StoredArchive, record: InstanceRecord) -> Dataset:
    """The instance with native little-endian pixel data (binary values little endian)."""
    ds = _read(archive.read_part10(record))
    received = record.transfer_syntax_uid
    if not is_little_endian(received):
        _swap_words(ds)
        return ds
    if "PixelData" not in ds or record.pixel_format != "encapsulated":
        return ds  # native (deflated ones inflated by pydicom)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            single_bit = ds.get("BitsAllocated") == 1
            pixels = ds.pixel_array if single_bit else None
            ds.decompress(generate_instance_uid=False)
            if pixels is not None:  # pydicom leaves 1-bit pixels unpacked: pack them again
                ds.PixelData = pydicom.pixels.pack_bits(pixels)
    except Exception as exc:  # pydicom's pixel handlers raise many types
        raise CodecError(f"{record.sop_uid}: cannot decode {received}: {exc}") from exc
    return ds


def _native_frames(ds: Dataset, layout: PixelLayout) -> list[np.ndarray]:
    """Native little-endian Pixel Data as raw frames (unsigned words), colour by pixel."""
    value = ds.PixelData
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    spp = layout.samples_per_pixel
    dtype = np.dtype(f"<u{layout.bits_allocated // 8}")
    count = frames * layout.rows * layout.columns * spp
    if len(value) < count * dtype.itemsize:
        raise CodecError("native Pixel Data is shorter than its attributes say")
    arr = np.frombuffer(value, dtype=dtype, count=count)
    if spp == 1:
        return list(arr.reshape(frames, layout.rows, layout.columns))
    if int(ds.get("PlanarConfiguration", 0) or 0) == 1:
        planes = arr.reshape(frames, spp, layout.rows, layout.columns)
        return [np.ascontiguousarray(f.transpose(1, 2, 0)) for f in planes]
    return list(arr.reshape(frames, layout.rows, layout.columns, spp))


def _swap_words(ds: Dataset) -> None:
    """Swap the byte order of every binary word value (OW, OF, OL, OD, OV), sequences
    included: pydicom keeps such values as the bytes it read, so a dataset read in one byte
    order and written in the other needs it (numbers of other VRs it converts itself)."""
    for element in ds:
        if element.VR == "SQ":
            for item in element.value or []:
                _swap_words(item)
            continue
        size = _WORD_VRS.get(str(element.VR))
        value = element.value
        if size and isinstance(value, bytes) and value and len(value) % size == 0:
            if element.tag == 0x7FE00010 and element.is_undefined_length:
                continue  # encapsulated fragments are byte streams
            element.value = np.frombuffer(value, f"u{size}").byteswap().tobytes()


def _write(ds: Dataset, transfer_syntax_uid: str, values_little_endian: bool) -> bytes:
    """The dataset's bytes in the given syntax (deflated where it says so)."""
    uid = pydicom.uid.UID(transfer_syntax_uid)
    implicit = uid == IMPLICIT_VR_LITTLE_ENDIAN
    little = uid != EXPLICIT_VR_BIG_ENDIAN
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # ambiguous VRs (OB or OW, US or SS) resolved as pydicom would on writing, so the
            # word swap below sees the VR that is written
            pydicom.filewriter.correct_ambiguous_vr(ds, values_little_endian)
            if little != values_little_endian:
                _swap_words(ds)
            ds.file_meta.TransferSyntaxUID = uid
            out = BytesIO()
            pydicom.dcmwrite(
                out, ds, implicit_vr=implicit, little_endian=little, force_encoding=True
            )
    except KhoError:
        raise
    except Exception as exc:  # pydicom raises many types for values it cannot write
        raise CodecError(f"cannot write the dataset as {transfer_syntax_uid}: {exc}") from exc
    data = out.getvalue()
    _meta, offset = read_file_meta(data)
    return data[offset:]


# --- frames (WADO-RS) ---------------------------------------------------------------------


def stored_frame_syntax(record: InstanceRecord) -> str:
    """The syntax of a frame as stored_frame() returns it."""
    if record.pixel_format == "encapsulated":
        return record.transfer_syntax_uid
    if record.pixel_format == "jpeg-ls":
        return JPEG_LS_LOSSLESS
    return EXPLICIT_VR_LITTLE_ENDIAN


def can_produce_frame(record: InstanceRecord, transfer_syntax_uid: str) -> bool:
    """Whether a frame of the instance can be served in this syntax: as stored, decoded
    (Explicit VR Little Endian: native bytes) or encoded by a frame encoder."""
    if not has_pixels(record):
        return False
    if transfer_syntax_uid in (stored_frame_syntax(record), EXPLICIT_VR_LITTLE_ENDIAN):
        return True
    encoder = encoder_for(transfer_syntax_uid)
    if encoder is None or not encoder.encapsulated or not _decodable(record):
        return False
    return encoder.can_encode(_frame_layout(record))


def frame_syntax_candidates(record: InstanceRecord, accepted: Iterable[str]) -> list[str]:
    """The module's rule for one frame: as stored (received fragments or the at-rest JPEG-LS
    stream) when accepted, else in the client's order what can be produced."""
    accepted = list(dict.fromkeys(accepted))
    stored = stored_frame_syntax(record)
    out = [stored] if stored in accepted else []
    return out + [ts for ts in accepted if ts not in out and can_produce_frame(record, ts)]


def _frame_layout(record: InstanceRecord) -> PixelLayout:
    """Frames are decoded without colour conversion (frame_array); J2K's colour transforms
    are undone by the decoder itself, so those come out RGB."""
    layout = PixelLayout.of_record(record)
    if layout.photometric_interpretation in ("YBR_ICT", "YBR_RCT"):
        return replace(layout, photometric_interpretation="RGB")
    return layout


def encode_frame(
    archive: StoredArchive, record: InstanceRecord, frame_number: int, transfer_syntax_uid: str
) -> bytes:
    """One frame (1-based) in a compressed syntax: as stored when it is the stored one, else
    decoded and encoded (lossless).  Native frames are the viewer API's (decoded bytes)."""
    if transfer_syntax_uid == stored_frame_syntax(record):
        data, _syntax = stored_frame(archive, record, frame_number)
        return data
    encoder = encoder_for(transfer_syntax_uid)
    layout = _frame_layout(record)
    if encoder is None or not encoder.encapsulated or not encoder.can_encode(layout):
        raise CodecUnavailableError(
            f"{record.sop_uid}: frames cannot be encoded as {transfer_syntax_uid}"
        )
    arr = frame_array(archive, record, frame_number)
    return encoder.encode_frame(np.ascontiguousarray(arr), layout)
