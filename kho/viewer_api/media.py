"""Media types: Accept header parsing and the transfer syntax <-> media type table."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

OCTET_STREAM = "application/octet-stream"
DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
MULTIPART_RELATED = "multipart/related"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"

NATIVE_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2",
        EXPLICIT_VR_LITTLE_ENDIAN,
        "1.2.840.10008.1.2.2",
        "1.2.840.10008.1.2.1.99",
    }
)

#: PS3.18 Table 8.7.3-5: the media type a frame in a compressed transfer syntax goes out as
FRAME_MEDIA_TYPE = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx",
    "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}


def frame_media_type(transfer_syntax_uid: str) -> str:
    return FRAME_MEDIA_TYPE.get(transfer_syntax_uid, OCTET_STREAM)


@dataclass(frozen=True, slots=True)
class MediaRange:
    """One entry of an Accept header."""

    media: str  # "type/subtype", lower case
    params: dict[str, str] = field(default_factory=dict)
    q: float = 1.0

    @property
    def is_multipart(self) -> bool:
        return self.media == MULTIPART_RELATED

    @property
    def inner(self) -> str:
        """The media type of the parts (``type=`` of multipart/related), or itself."""
        if self.is_multipart:
            return self.params.get("type", "").lower()
        return self.media

    @property
    def transfer_syntax(self) -> str | None:
        return self.params.get("transfer-syntax")

    def matches(self, media: str) -> bool:
        """Whether this range accepts ``media`` (wildcards allowed on either part)."""
        want_type, _, want_sub = self.media.partition("/")
        got_type, _, got_sub = media.lower().partition("/")
        return want_type in ("*", got_type) and want_sub in ("*", got_sub)


def _split_outside_quotes(text: str, sep: str) -> list[str]:
    out: list[str] = []
    current: list[str] = []
    quoted = False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == sep and not quoted:
            out.append("".join(current))
            current = []
        else:
            current.append(ch)
    out.append("".join(current))
    return out


def parse_media_type(text: str) -> MediaRange:
    pieces = _split_outside_quotes(text, ";")
    media = pieces[0].strip().lower()
    params: dict[str, str] = {}
    q = 1.0
    for piece in pieces[1:]:
        name, _, value = piece.partition("=")
        name, value = name.strip().lower(), value.strip().strip('"')
        if not name:
            continue
        if name == "q":
            try:
                q = float(value)
            except ValueError:
                q = 0.0
        else:
            params[name] = value
    return MediaRange(media, params, q)


def parse_accept(header: str | None) -> list[MediaRange]:
    """Accept ranges, best first (stable for equal q); [] when absent or empty."""
    if not header or not header.strip():
        return []
    if len(header) > 512:
        return _parse_accept(header)
    return list(_parse_accept_cached(header))


def _parse_accept(header: str) -> list[MediaRange]:
    ranges = [parse_media_type(p) for p in _split_outside_quotes(header, ",") if p.strip()]
    ranges = [r for r in ranges if r.q > 0 and "/" in r.media]
    return sorted(ranges, key=lambda r: -r.q)


@lru_cache(maxsize=512)
def _parse_accept_cached(header: str) -> tuple[MediaRange, ...]:
    # a viewer sends the same few Accept headers with every request (parsing one is
    # ~10 us of a ~100 us frame request); the ranges are frozen, their params never
    # changed after parsing
    return tuple(_parse_accept(header))
