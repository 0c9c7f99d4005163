"""Split DICOM Part 10 bytes into header and pixel data without re-encoding anything.

The walker reads the top-level elements of a dataset exactly as encoded (implicit or explicit
VR, little or big endian), skips sequences item by item, and finds the Pixel Data element
(or Float / Double Float Pixel Data).  It checks every length against the buffer, so
truncated or hostile input fails here with InvalidDicomError before anything is stored.
Deflated datasets are not walked: their bytes are kept whole.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from kho.errors import InvalidDicomError

PREAMBLE_LENGTH = 128
MAGIC = b"DICM"

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
NATIVE_SYNTAXES = frozenset(
    {IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN}
)

PIXEL_DATA = 0x7FE00010
FLOAT_PIXEL_DATA = 0x7FE00008
DOUBLE_FLOAT_PIXEL_DATA = 0x7FE00009
PIXEL_TAGS = frozenset({PIXEL_DATA, FLOAT_PIXEL_DATA, DOUBLE_FLOAT_PIXEL_DATA})

ITEM = 0xFFFEE000
ITEM_DELIMITER = 0xFFFEE00D
SEQUENCE_DELIMITER = 0xFFFEE0DD
UNDEFINED_LENGTH = 0xFFFFFFFF

# explicit VRs whose length field is 4 bytes after 2 reserved bytes (PS3.5 7.1.2)
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_MAX_DEPTH = 32  # nested sequences deeper than this are hostile, not clinical


@dataclass(frozen=True, slots=True)
class PixelLocation:
    """Where the top-level pixel element sits in the Part 10 bytes."""

    tag: int
    element_offset: int  # first byte of the element (its tag)
    value_offset: int  # first byte of the value
    value_length: int  # bytes of the value; for encapsulated data up to the end of the delimiter
    encapsulated: bool

    def header_of(self, data: bytes) -> bytes:
        """The header object: the bytes before the pixel value and any after it."""
        return data[: self.value_offset] + data[self.value_offset + self.value_length :]


#: a top-level element as found by the walker: (explicit VR or None, value offset, length)
ElementSpan = tuple[bytes | None, int, int]


@dataclass(frozen=True, slots=True)
class TopLevel:
    """The dataset's top-level elements as encoded (the walk that finds the pixels
    records them): what a catalog reader needs to pick values without pydicom."""

    implicit: bool
    little: bool
    elements: dict[int, ElementSpan]
    duplicated: bool  # a tag occurs twice: only pydicom's reading is trusted then


@dataclass(frozen=True, slots=True)
class Part10Layout:
    """The parts of a Part 10 file that the archive stores separately."""

    transfer_syntax_uid: str
    media_sop_class_uid: str
    media_sop_instance_uid: str
    dataset_offset: int  # first byte after the File Meta Information
    pixels: PixelLocation | None
    top_level: TopLevel | None = None  # None for deflated datasets (not walked)


def _uid_text(raw: bytes) -> str:
    return raw.rstrip(b"\x00 ").decode("ascii", errors="replace")


def read_file_meta(data: bytes | memoryview) -> tuple[dict[int, bytes], int]:
    """Parse the File Meta Information; return {tag: raw value} and the dataset offset.

    Accepts the standard layout (preamble, 'DICM', group 0002) and the variants seen in the
    wild: 'DICM' without preamble, group 0002 without preamble nor 'DICM', and no meta at all
    (a bare dataset: empty dict, offset 0).
    """
    if (
        len(data) >= PREAMBLE_LENGTH + 4
        and bytes(data[PREAMBLE_LENGTH : PREAMBLE_LENGTH + 4]) == MAGIC
    ):
        pos = PREAMBLE_LENGTH + 4
    elif bytes(data[:4]) == MAGIC:
        pos = 4
    else:
        pos = 0
    meta: dict[int, bytes] = {}
    end = len(data)
    while pos + 8 <= end:
        group, element = struct.unpack_from("<HH", data, pos)
        if group != 0x0002:
            break
        vr = bytes(data[pos + 4 : pos + 6])
        if vr in _LONG_VRS:
            if pos + 12 > end:
                raise InvalidDicomError("truncated File Meta Information")
            (length,) = struct.unpack_from("<I", data, pos + 8)
            value_pos = pos + 12
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            value_pos = pos + 8
        if length == UNDEFINED_LENGTH or value_pos + length > end:
            raise InvalidDicomError(f"bad length in File Meta element ({group:04X},{element:04X})")
        meta[(group << 16) | element] = bytes(data[value_pos : value_pos + length])
        pos = value_pos + length
    return meta, pos


def _is_vr(two: bytes) -> bool:
    return len(two) == 2 and 65 <= two[0] <= 90 and 65 <= two[1] <= 90


def sniff_encoding(data: bytes | memoryview, offset: int) -> tuple[bool, bool]:
    """(implicit, little endian) judged from the first element of a dataset, as pydicom does."""
    if offset + 8 > len(data):
        raise InvalidDicomError("truncated dataset: no complete first element")
    group_le = struct.unpack_from("<H", data, offset)[0]
    group_be = struct.unpack_from(">H", data, offset)[0]
    little = not (group_le > 0x00FF and group_be <= 0x00FF)
    return not _is_vr(bytes(data[offset + 4 : offset + 6])), little


def syntax_for_encoding(implicit: bool, little: bool) -> str:
    if implicit:
        return IMPLICIT_VR_LITTLE_ENDIAN
    return EXPLICIT_VR_LITTLE_ENDIAN if little else EXPLICIT_VR_BIG_ENDIAN


class _Walker:
    """Walks encoded elements, checking every length against the buffer."""

    def __init__(self, data: bytes | memoryview, *, implicit: bool, little: bool) -> None:
        self.data = data
        self.end = len(data)
        self.implicit = implicit
        self.little = little
        self._u16 = struct.Struct("<H" if little else ">H")
        self._u32 = struct.Struct("<I" if little else ">I")
        self._tag = struct.Struct("<HH" if little else ">HH")
        self.duplicated = False

    def _need(self, pos: int, count: int, what: str) -> None:
        if pos + count > self.end:
            raise InvalidDicomError(f"truncated dataset: {what} at byte {pos} runs past the end")

    def header(self, pos: int, implicit: bool) -> tuple[int, bytes | None, int, int]:
        """(tag, vr or None, value length, value offset) of the element at ``pos``."""
        self._need(pos, 8, "element header")
        group, element = self._tag.unpack_from(self.data, pos)
        tag = (group << 16) | element
        if group == 0xFFFE or implicit:
            (length,) = self._u32.unpack_from(self.data, pos + 4)
            return tag, None, length, pos + 8
        vr = bytes(self.data[pos + 4 : pos + 6])
        if vr in _LONG_VRS:
            self._need(pos, 12, "element header")
            (length,) = self._u32.unpack_from(self.data, pos + 8)
            return tag, vr, length, pos + 12
        if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
            raise InvalidDicomError(
                f"invalid VR {vr!r} in element ({group:04X},{element:04X}) at byte {pos}"
            )
        (length,) = self._u16.unpack_from(self.data, pos + 6)
        return tag, vr, length, pos + 8

    def skip_items(self, pos: int, implicit: bool, depth: int) -> int:
        """Skip undefined-length sequence items up to and including the delimiter."""
        if depth > _MAX_DEPTH:
            raise InvalidDicomError("sequences nested too deeply")
        while True:
            tag, _vr, length, value_pos = self.header(pos, True)
            if tag == SEQUENCE_DELIMITER:
                return value_pos
            if tag != ITEM:
                raise InvalidDicomError(
                    f"expected a sequence item at byte {pos}, found tag {tag:08X}"
                )
            if length == UNDEFINED_LENGTH:
                pos = self.elements(value_pos, self.end, implicit, depth + 1, item=True)
            else:
                self._need(value_pos, length, "sequence item")
                # walk defined-length items too: a hostile length inside must not go unseen
                self.elements(value_pos, value_pos + length, implicit, depth + 1, item=False)
                pos = value_pos + length

    def skip_fragments(self, pos: int) -> int:
        """Skip encapsulated pixel data items up to and including the sequence delimiter."""
        while True:
            if pos == self.end:
                # a missing final delimiter is a common writer bug; the fragments are whole
                return pos
            tag, _vr, length, value_pos = self.header(pos, True)
            if tag == SEQUENCE_DELIMITER:
                return value_pos
            if tag != ITEM or length == UNDEFINED_LENGTH:
                raise InvalidDicomError(f"malformed encapsulated pixel data at byte {pos}")
            self._need(value_pos, length, "pixel data fragment")
            pos = value_pos + length

    def elements(
        self,
        pos: int,
        stop: int,
        implicit: bool,
        depth: int,
        *,
        item: bool,
        pixels: list[PixelLocation] | None = None,
        top_level: dict[int, ElementSpan] | None = None,
    ) -> int:
        """Walk elements from ``pos`` to ``stop`` (or to an item delimiter if ``item``);
        ``top_level`` receives each element walked at this level."""
        while pos < stop:
            tag, vr, length, value_pos = self.header(pos, implicit)
            if top_level is not None:
                if tag in top_level:
                    self.duplicated = True
                top_level[tag] = (vr, value_pos, length)
            if tag == ITEM_DELIMITER:
                if item:
                    return value_pos
                raise InvalidDicomError(f"unexpected item delimiter at byte {pos}")
            if (tag >> 16) == 0xFFFE and not (tag == 0xFFFCFFFC):
                raise InvalidDicomError(f"unexpected delimiter tag {tag:08X} at byte {pos}")
            if length == UNDEFINED_LENGTH:
                if pixels is not None and tag == PIXEL_DATA and depth == 0:
                    end = self.skip_fragments(value_pos)
                    pixels.append(PixelLocation(tag, pos, value_pos, end - value_pos, True))
                    pos = end
                    continue
                if vr not in (None, b"SQ", b"UN"):
                    raise InvalidDicomError(
                        f"undefined length on VR {vr!r} in element {tag:08X} at byte {pos}"
                    )
                # UN with undefined length holds implicit VR little endian items (PS3.5 6.2.2)
                pos = self.skip_items(value_pos, implicit or vr == b"UN", depth)
                continue
            self._need(value_pos, length, f"value of element ({tag >> 16:04X},{tag & 0xFFFF:04X})")
            if vr == b"SQ":
                self.defined_items(value_pos, value_pos + length, implicit, depth + 1)
            if pixels is not None and tag in PIXEL_TAGS and depth == 0:
                pixels.append(PixelLocation(tag, pos, value_pos, length, False))
            pos = value_pos + length
        if item:
            raise InvalidDicomError("truncated dataset: sequence item has no delimiter")
        if pos != stop:
            raise InvalidDicomError("element runs past the end of its enclosing item")
        return pos

    def defined_items(self, pos: int, stop: int, implicit: bool, depth: int) -> None:
        """Walk the items of a defined-length sequence value."""
        if depth > _MAX_DEPTH:
            raise InvalidDicomError("sequences nested too deeply")
        while pos < stop:
            tag, _vr, length, value_pos = self.header(pos, True)
            if tag != ITEM:
                raise InvalidDicomError(
                    f"expected a sequence item at byte {pos}, found tag {tag:08X}"
                )
            if length == UNDEFINED_LENGTH:
                pos = self.elements(value_pos, stop, implicit, depth + 1, item=True)
            else:
                if value_pos + length > stop:
                    raise InvalidDicomError(f"sequence item at byte {pos} runs past its sequence")
                self.elements(value_pos, value_pos + length, implicit, depth + 1, item=False)
                pos = value_pos + length
        if pos != stop:
            raise InvalidDicomError("sequence item runs past the end of its sequence")


def dataset_encoding(transfer_syntax_uid: str) -> tuple[bool, bool] | None:
    """(implicit, little endian) for a syntax kho can walk; None for deflate."""
    if transfer_syntax_uid == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
        return None
    if transfer_syntax_uid == IMPLICIT_VR_LITTLE_ENDIAN:
        return True, True
    if transfer_syntax_uid == EXPLICIT_VR_BIG_ENDIAN:
        return False, False
    # every other standard syntax (and any private one) encodes the dataset explicit VR LE
    return False, True


def locate_pixels(
    data: bytes | memoryview, dataset_offset: int, transfer_syntax_uid: str
) -> PixelLocation | None:
    """Walk the dataset and return where its top-level pixel element is (None if absent)."""
    return walk_dataset(data, dataset_offset, transfer_syntax_uid)[0]


def walk_dataset(
    data: bytes | memoryview, dataset_offset: int, transfer_syntax_uid: str
) -> tuple[PixelLocation | None, TopLevel | None]:
    """Walk the dataset: where its top-level pixel element is (None if absent) and its
    top-level elements (None for a deflated dataset, which is not walked)."""
    if dataset_encoding(transfer_syntax_uid) is None:
        return None, None
    # follow the bytes, not the declared syntax: some writers put an implicit VR dataset
    # behind an explicit VR transfer syntax, and readers (pydicom, dcmtk) accept it
    implicit, little = sniff_encoding(data, dataset_offset)
    walker = _Walker(data, implicit=implicit, little=little)
    found: list[PixelLocation] = []
    elements: dict[int, ElementSpan] = {}
    walker.elements(
        dataset_offset, len(data), implicit, 0, item=False, pixels=found, top_level=elements
    )
    if len(found) > 1:
        raise InvalidDicomError("dataset holds more than one pixel data element")
    top_level = TopLevel(implicit, little, elements, walker.duplicated)
    return (found[0] if found else None), top_level


def parse_part10(data: bytes | memoryview) -> Part10Layout:
    """Check a DICOM file's structure and find its pieces; raise InvalidDicomError.

    Without a Transfer Syntax UID in the meta (or without meta), the syntax is judged from
    the dataset's first element.
    """
    meta, dataset_offset = read_file_meta(data)
    if dataset_offset >= len(data):
        raise InvalidDicomError("file holds no dataset after the File Meta Information")
    ts = _uid_text(meta.get(0x00020010, b""))
    if not ts:
        ts = syntax_for_encoding(*sniff_encoding(data, dataset_offset))
    pixels, top_level = walk_dataset(data, dataset_offset, ts)
    return Part10Layout(
        transfer_syntax_uid=ts,
        media_sop_class_uid=_uid_text(meta.get(0x00020002, b"")),
        media_sop_instance_uid=_uid_text(meta.get(0x00020003, b"")),
        dataset_offset=dataset_offset,
        pixels=pixels,
        top_level=top_level,
    )


def _element(tag: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00" if vr in (b"UI", b"OB") else b" "
    group, element = tag >> 16, tag & 0xFFFF
    if vr in _LONG_VRS:
        return struct.pack("<HH2sHI", group, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1425.1"  # kho's root for this purpose
IMPLEMENTATION_VERSION_NAME = "KHO_010"


def build_file_meta(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, source_ae: str = ""
) -> bytes:
    """Preamble, 'DICM' and a File Meta Information group for a dataset received over DIMSE."""
    elements = [
        _element(0x00020001, b"OB", b"\x00\x01"),
        _element(0x00020002, b"UI", sop_class_uid.encode("ascii")),
        _element(0x00020003, b"UI", sop_instance_uid.encode("ascii")),
        _element(0x00020010, b"UI", transfer_syntax_uid.encode("ascii")),
        _element(0x00020012, b"UI", IMPLEMENTATION_CLASS_UID.encode("ascii")),
        _element(0x00020013, b"SH", IMPLEMENTATION_VERSION_NAME.encode("ascii")),
    ]
    if source_ae.strip():
        elements.append(_element(0x00020016, b"AE", source_ae.strip().encode("ascii", "replace")))
    body = b"".join(elements)
    group_length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body))
    return b"\x00" * PREAMBLE_LENGTH + MAGIC + group_length + body
