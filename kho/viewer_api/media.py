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


#: the syntaxes a frame media type may carry; the first is what kho produces for the media
#: type when the client names no syntax (a lossless one: PS3.18 Table 8.7.3-5 makes JPEG
#: baseline the default of image/jpeg, which kho never produces from other pixels)
MEDIA_SYNTAXES: dict[str, tuple[str, ...]] = {
    OCTET_STREAM: (EXPLICIT_VR_LITTLE_ENDIAN,),
    "image/jls": ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"),
    "image/jp2": ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"),
    "image/jpx": ("1.2.840.10008.1.2.4.92", "1.2.840.10008.1.2.4.93"),
    "image/jphc": ("1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"),
    "image/jpeg": (
        "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.57",
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.51",
    ),
    "image/dicom-rle": ("1.2.840.10008.1.2.5",),
}


def frame_syntaxes(media: str, transfer_syntax: str | None, stored_ts: str) -> list[str]:
    """The syntaxes a frame may go out in for one Accept range (its media type and
    ``transfer-syntax`` parameter), best first; ``stored_ts``: the frame's stored syntax.

    ``*``: the stored syntax when its media type is the one asked (or octet-stream, which
    asks for the frame as it is), else any syntax of the media type.  A named syntax: that
    one, if the media type carries it.  None: the stored syntax when its media type is the
    one asked, then the media type's first syntax (:data:`MEDIA_SYNTAXES`)."""
    stored_media = frame_media_type(stored_ts)
    carried = MEDIA_SYNTAXES.get(media, ())
    if transfer_syntax == "*":
        if media in (OCTET_STREAM, stored_media):
            return [stored_ts]
        return list(carried)
    if transfer_syntax is not None:
        return [transfer_syntax] if transfer_syntax in carried else []
    first = [stored_ts] if media == stored_media != OCTET_STREAM else []
    return first + [ts for ts in carried[:1] if ts not in first]


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
