"""One HL7 v2 message: its bytes decoded in the character set MSH-18 names, parsed (the
``hl7`` package, python-hl7), read field by field, and answered with an acknowledgement.

Character sets (HL7 table 0211): ``UNICODE UTF-8`` (and bare ``UNICODE``), ``ASCII``,
``8859/1`` to ``8859/9`` and ``8859/15``, ``GB 18030-2000``, ``BIG-5``, ``KS X 1001``.
A message without MSH-18 is read as UTF-8 (what Vietnamese hospital systems send; ASCII
is a subset), and strictly: bytes that are not valid in the named set refuse the message
(AR) instead of filing a garbled name.  The ACK is written in the message's character set.

Acknowledgements (original mode, HL7 v2.5 chapter 2): MSA-1 AA (applied), AE (application
error: the message was understood but not applied; nothing of it was), AR (rejected: not a
message kho takes from this sender).  MSA-3 and ERR carry the reason: ERR-2 the location
(segment^sequence^field), ERR-3 the HL7 error code (table 0357), ERR-4 severity E, ERR-8
the text.  Reasons never contain patient data.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import time
from dataclasses import dataclass

import hl7

from kho.errors import KhoError

#: MSH-18 value -> Python codec
CHARSETS = {
    "UNICODE UTF-8": "utf-8",
    "UNICODE": "utf-8",
    "ASCII": "ascii",
    **{f"8859/{n}": f"iso8859-{n}" for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 15)},
    "GB 18030-2000": "gb18030",
    "BIG-5": "big5",
    "KS X 1001": "euc_kr",
}
DEFAULT_CHARSET = "utf-8"

# HL7 table 0357: message error condition codes
SEGMENT_SEQUENCE_ERROR = "100"
REQUIRED_FIELD_MISSING = "101"
DATA_TYPE_ERROR = "102"
TABLE_VALUE_NOT_FOUND = "103"
UNSUPPORTED_MESSAGE_TYPE = "200"
UNSUPPORTED_EVENT_CODE = "201"
UNSUPPORTED_VERSION = "203"
UNKNOWN_KEY = "204"
INTERNAL_ERROR = "207"
_ERROR_TEXT = {
    SEGMENT_SEQUENCE_ERROR: "Segment sequence error",
    REQUIRED_FIELD_MISSING: "Required field missing",
    DATA_TYPE_ERROR: "Data type error",
    TABLE_VALUE_NOT_FOUND: "Table value not found",
    UNSUPPORTED_MESSAGE_TYPE: "Unsupported message type",
    UNSUPPORTED_EVENT_CODE: "Unsupported event code",
    UNSUPPORTED_VERSION: "Unsupported version id",
    UNKNOWN_KEY: "Unknown key identifier",
    INTERNAL_ERROR: "Application internal error",
}

_control_ids = itertools.count(1)
_VERSION = re.compile(r"^2\.\d")


class MessageError(KhoError, ValueError):
    """What is wrong with a message: the ACK code it gets (AR or AE), the HL7 error code
    and the location (``SEG^1^3``)."""

    def __init__(self, text: str, code: str = "AR", error: str = "", location: str = "") -> None:
        super().__init__(text)
        self.code = code
        self.error = error or (UNSUPPORTED_MESSAGE_TYPE if code == "AR" else INTERNAL_ERROR)
        self.location = location


@dataclass(frozen=True, slots=True)
class Header:
    """The MSH fields an answer needs, read from the raw bytes (before any decoding, so
    even a message that cannot be decoded gets a proper AR)."""

    field_separator: str
    encoding_characters: str
    sending_application: str
    sending_facility: str
    receiving_application: str
    receiving_facility: str
    message_type: str
    trigger: str
    structure: str
    control_id: str
    processing_id: str
    version: str
    charset: str

    @property
    def sender(self) -> str:
        """``application^facility``: who sent it (the sender registry's key)."""
        return f"{self.sending_application}^{self.sending_facility}"

    @property
    def type_name(self) -> str:
        return f"{self.message_type}^{self.trigger}" if self.trigger else self.message_type


def read_header(raw: bytes) -> Header:
    """The MSH of a message's bytes; MessageError (AR) if there is none."""
    if not raw.startswith(b"MSH") or len(raw) < 8:
        raise MessageError(
            "the message does not start with an MSH segment", "AR", SEGMENT_SEQUENCE_ERROR
        )
    end = min((i for i in (raw.find(b"\r"), raw.find(b"\n")) if i >= 0), default=len(raw))
    # MSH is ASCII but for names: decoded leniently here, strictly with the whole message
    text = raw[:end].decode("latin-1")
    if len(text) < 8:  # "MSH" then a segment break: no field separator, no encoding
        raise MessageError(
            "the MSH segment is too short to name its separators", "AR", SEGMENT_SEQUENCE_ERROR
        )
    separator = text[3]
    fields = text.split(separator)
    encoding = fields[1] if len(fields) > 1 else "^~\\&"
    component = encoding[0] if encoding else "^"
    repetition = encoding[1] if len(encoding) > 1 else "~"

    def msh(n: int) -> str:  # MSH-n (MSH-1 is the separator itself)
        return fields[n - 1].strip() if len(fields) > n - 1 else ""

    def first(n: int, part: int = 0) -> str:
        value = msh(n).split(repetition)[0].split(component)
        return value[part].strip() if len(value) > part else ""

    return Header(
        separator,
        encoding,
        first(3),
        first(4),
        first(5),
        first(6),
        first(9, 0),
        first(9, 1),
        first(9, 2),
        msh(10),
        first(11),
        first(12),
        msh(18).split(repetition)[0].strip(),
    )


def codec_of(header: Header) -> str | None:
    """The Python codec of a message's MSH-18 (None: a character set kho does not read)."""
    if not header.charset:
        return DEFAULT_CHARSET
    return CHARSETS.get(header.charset.upper())


class Message:
    """A decoded, parsed message; values read by segment, field, repetition, component
    (1-based, as HL7 numbers them), unescaped."""

    def __init__(self, raw: bytes, header: Header | None = None) -> None:
        self.header = header or read_header(raw)
        codec = codec_of(self.header)
        if codec is None:
            raise MessageError(
                f"unsupported character set (MSH-18) {self.header.charset[:32]!r}",
                "AR",
                DATA_TYPE_ERROR,
                "MSH^1^18",
            )
        self.codec = codec
        try:
            text = raw.decode(codec)
        except UnicodeDecodeError as exc:
            raise MessageError(
                f"the message is not valid {self.header.charset or 'UTF-8'} text "
                f"(byte {exc.start})",
                "AR",
                DATA_TYPE_ERROR,
                "MSH^1^18",
            ) from exc
        #: the message as text, segments ended by CR (as journalled)
        self.text = text.replace("\r\n", "\r").replace("\n", "\r").strip("\r")
        if not self.header.control_id:
            raise MessageError(
                "no message control ID (MSH-10)", "AR", REQUIRED_FIELD_MISSING, "MSH^1^10"
            )
        if not _VERSION.match(self.header.version):
            raise MessageError(
                f"unsupported HL7 version {self.header.version[:16]!r} (2.x)",
                "AR",
                UNSUPPORTED_VERSION,
                "MSH^1^12",
            )
        try:
            self.parsed = hl7.parse(self.text)
        except Exception as exc:  # python-hl7 raises several types on malformed text
            raise MessageError(
                f"the message cannot be parsed: {exc}", "AR", SEGMENT_SEQUENCE_ERROR
            ) from exc

    # --- reading -------------------------------------------------------------------------

    def segments(self, name: str | None = None) -> list[hl7.Segment]:
        return [seg for seg in self.parsed if name is None or str(seg[0]) == name]

    def first(self, name: str) -> hl7.Segment | None:
        found = self.segments(name)
        return found[0] if found else None


def value(
    segment: hl7.Segment | None, field: int, repetition: int = 1, component: int = 1, sub: int = 1
) -> str:
    """One value of a segment, unescaped ("" when absent; HL7's null ``""`` as is)."""
    if segment is None:
        return ""
    try:
        return str(segment.extract_field(1, field, repetition, component, sub)).strip()
    except (IndexError, KeyError, TypeError, AttributeError):
        return ""


def repetitions(segment: hl7.Segment | None, field: int) -> int:
    """How many repetitions a field has (0: empty or absent)."""
    if segment is None:
        return 0
    count = 0
    for rep in range(1, 100):
        try:
            segment.extract_field(1, field, rep, 1, 1)
        except (IndexError, KeyError, TypeError, AttributeError):
            break
        count = rep
    if count == 1 and not _field_text(segment, field):
        return 0
    return count


def _field_text(segment: hl7.Segment, field: int) -> str:
    with contextlib.suppress(IndexError, TypeError):
        return str(segment[field]).strip()
    return ""


# --- answers ---------------------------------------------------------------------------

_ESCAPES = (("\\", "\\E\\"), ("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"), ("~", "\\R\\"))


def escape(text: str) -> str:
    """Text made safe inside a field (HL7 escape sequences for the default delimiters)."""
    text = text.replace("\r", " ").replace("\n", " ")
    for plain, escaped in _ESCAPES:
        text = text.replace(plain, escaped)
    return text


def acknowledgement(
    header: Header,
    code: str,
    text: str = "",
    *,
    error: str = "",
    location: str = "",
    application: str = "KHO",
    facility: str = "",
) -> str:
    """The ACK of a message (segments ended by CR).  MSH-3/4: the receiving application
    and facility the message named, else ``application``/``facility``; MSH-18 echoes the
    message's character set."""
    now = time.strftime("%Y%m%d%H%M%S")
    control = f"K{int(time.time() * 1000)}{next(_control_ids) % 1000:03d}"
    version = header.version if _VERSION.match(header.version) else "2.5"
    trigger = escape(header.trigger)
    fields = [
        "MSH",
        "^~\\&",
        escape(header.receiving_application or application),
        escape(header.receiving_facility or facility),
        escape(header.sending_application),
        escape(header.sending_facility),
        now,
        "",
        f"ACK^{trigger}^ACK" if trigger else "ACK",
        control,
        escape(header.processing_id or "P"),
        escape(version),
        "",
        "",
        "",
        "",
        "",
        escape(header.charset) if header.charset.upper() in CHARSETS else "",
    ]
    segments = [
        "|".join(fields).rstrip("|"),
        f"MSA|{code}|{escape(header.control_id)}|{escape(text[:200])}".rstrip("|"),
    ]
    if code != "AA":
        condition = error or (UNSUPPORTED_MESSAGE_TYPE if code == "AR" else INTERNAL_ERROR)
        meaning = _ERROR_TEXT.get(condition, "")
        segments.append(
            f"ERR||{location}|{condition}^{escape(meaning)}^HL70357|E||||{escape(text[:200])}"
        )
    return "\r".join(segments) + "\r"
