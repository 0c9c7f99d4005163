"""Query/Retrieve handlers: C-FIND, C-GET and C-MOVE for the Patient Root and Study Root
information models, on the shared matching engine (kho.archive.query.engine).

Each sub-operation sends its instance by the archive's retrieval rule
(kho.archive.read.transcode, the same as WADO-RS): the bytes as received when the peer accepted
the received syntax, else the at-rest JPEG-LS frames re-wrapped when it accepted JPEG-LS
Lossless, else decoded and encoded (losslessly) into a syntax it accepted; when nothing it
accepted can be produced the sub-operation fails and the instance is listed in the Failed
SOP Instance UID List.  pynetdicom re-encodes any pydicom Dataset a C-GET/C-MOVE handler
yields, which would change the bytes (group lengths dropped, sequence lengths
rewritten...).  So the handlers yield a placeholder Dataset (StoredInstance) and replace
``send_c_store`` on the association that sends it with one that writes the Part 10 bytes
to a temporary file and hands pynetdicom that path; with
``_config.STORE_SEND_CHUNKED_DATASET`` (set by the server) pynetdicom then sends the file's
dataset bytes unchanged.  A C-MOVE proposes to its destination, per SOP class, one context
with every syntax kho can produce for those instances (the destination picks the one it
prefers), one per received syntax alone (so the received bytes can go unchanged), and
JPEG-LS Lossless alone for instances held as JPEG-LS at rest.

C-FIND pending responses are written straight to pynetdicom's DUL (their command set has a
fixed shape), which is ~6x cheaper than pynetdicom's own path; see _DirectResponses.

Statuses chosen (PS3.4 C.4.1.1.4, C.4.2.1.5, C.4.3.1.4):
  0xA900 Identifier does not match SOP Class: no/unknown Query/Retrieve Level, a level the
         model lacks, a missing or non-single unique key of a level above the query level.
  0xC000 Unable to process: undecodable identifier, malformed values (bad date range,
         wildcard in a UID).
  0xA700 Refused: out of resources: more matches than settings.find_result_limit.
  0xA701 Unable to calculate matches: the catalog failed.
  0xFF01 Pending with unsupported optional keys (answered empty); 0xFE00 after C-CANCEL.
  0xA801 Move destination unknown: only for an AE title the caller may not send to
         (PS3.4 C.4.2.1.4: an AE the SCP does not know): with authentication off one not
         in settings.move_destinations; on, one not registered in the AE registry with a
         host and port for the caller's tenant (another hospital's AE is as unknown).
  0x0124 Refused: Not authorized (PS3.7 C.5, a general status of every DIMSE service): a
         registered peer asking for find, get or move its registry entry does not grant;
         nothing is matched and no destination is contacted.
  0xB000 / 0xA702: some / all sub-operations failed, with the Number of Failed
         Sub-operations and the Failed SOP Instance UID List.  A known destination that
         cannot be reached (connection refused, association rejected or aborted) fails
         every sub-operation: 0xA702 with an Error Comment saying why (pynetdicom 3.0.4
         would answer 0xA801 itself: see MoveDestination).  So does an object store that
         is unavailable: once one sub-operation fails for that reason the rest are not
         tried (each would wait out the store's retries, about 3 s: a 1,000-slice study
         would keep the peer waiting ~50 minutes for a refusal); they are counted and
         listed as failed, 0xB000 when some were sent before, 0xA702 when none were.

Each handler acts on the archive of the association's tenant (kho.dicom_scp.door): another
hospital's studies are not in its catalog, so they simply do not match (C-FIND: no match;
C-GET, C-MOVE: zero sub-operations, as for any UID the archive does not hold).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import struct
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import _config, build_context, evt
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, code_to_category

from kho.archive.catalog import InstanceRecord
from kho.archive.dataset.part10 import build_file_meta
from kho.archive.query import engine as query
from kho.archive.read import transcode
from kho.dicom_scp.statuses import (
    CANCEL,
    IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
    NOT_AUTHORIZED,
    NOT_AUTHORIZED_COMMENT,
    OUT_OF_RESOURCES,
    PENDING,
    PENDING_WARNING,
    QR_OUT_OF_RESOURCES,
    QR_UNABLE_TO_CALCULATE_MATCHES,
    QR_UNABLE_TO_PERFORM_SUBOPERATIONS,
    SUBOPERATIONS_WITH_FAILURES,
    UNABLE_TO_PROCESS,
    status_dataset,
)
from kho.errors import CatalogError, KhoError, QueryError, StorageUnavailableError

if TYPE_CHECKING:
    from pynetdicom.association import Association
    from pynetdicom.events import Event

    from kho.archive.archive import Archive
    from kho.dicom_scp.door import Door

log = logging.getLogger(__name__)

FIND_MODELS = {
    str(PatientRootQueryRetrieveInformationModelFind): "PATIENT",
    str(StudyRootQueryRetrieveInformationModelFind): "STUDY",
}
GET_MODELS = {
    str(PatientRootQueryRetrieveInformationModelGet): "PATIENT",
    str(StudyRootQueryRetrieveInformationModelGet): "STUDY",
}
MOVE_MODELS = {
    str(PatientRootQueryRetrieveInformationModelMove): "PATIENT",
    str(StudyRootQueryRetrieveInformationModelMove): "STUDY",
}
QR_SOP_CLASSES = [*FIND_MODELS, *GET_MODELS, *MOVE_MODELS]

#: levels each information model has (study root has no patient level)
MODEL_LEVELS = {
    "PATIENT": ("PATIENT", "STUDY", "SERIES", "IMAGE"),
    "STUDY": ("STUDY", "SERIES", "IMAGE"),
}
# answered without being "unsupported": they carry no matching
_ALWAYS_ACCEPTED = {"QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle"}
_BINARY_NUMBER_VRS = {"US", "UL", "SS", "SL", "UV", "SV"}
_VERIFICATION = "1.2.840.10008.1.1"
_MAX_CONTEXTS = 128  # presentation contexts one association may propose (PS3.8 9.3.2.2)


class Refusal(Exception):
    """A request refused before any match: the status and the reason."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status


def handle_connection_open(event: Event) -> None:
    """TCP_NODELAY on every DICOM connection: a C-FIND answers with small messages back to
    back (pending, final), and Nagle's algorithm with the peer's delayed ACK holds each one
    for ~40 ms.  pynetdicom does not set it itself."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# --- identifiers -----------------------------------------------------------------------


def _decode_identifier(event: Event) -> Dataset:
    try:
        identifier = event.identifier
        # touch every element so a malformed value fails here, not halfway through
        for elem in identifier:
            _ = elem.value
    except Exception as exc:  # pydicom raises many types for undecodable bytes
        raise Refusal(UNABLE_TO_PROCESS, f"cannot decode the identifier: {exc}") from exc
    return identifier


def _text_value(elem: Any) -> str:
    value = elem.value
    if value is None:
        return ""
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return "\\".join(str(v) for v in value)
    if isinstance(value, bytes):
        return value.decode("ascii", "replace")
    return str(value).strip()


def _query_item(elem: Any) -> dict[str, str]:
    """A sequence key's one item as keyword -> value (PS3.4 C.2.2.2.6); no item: {}."""
    items = list(elem.value or [])
    if len(items) > 1:
        raise Refusal(UNABLE_TO_PROCESS, f"{elem.keyword}: a sequence key has one item")
    if not items:
        return {}
    return {e.keyword: _text_value(e) for e in items[0] if e.keyword and e.tag.element != 0}


def _item(values: dict[str, str]) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        item.add_new(keyword, pydicom.datadict.dictionary_VR(keyword), value)
    return item


def _level(identifier: Dataset, model: str) -> str:
    raw = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    if not raw:
        raise Refusal(IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, "no Query/Retrieve Level (0008,0052)")
    if raw not in MODEL_LEVELS[model]:
        raise Refusal(
            IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
            f"level {raw} is not in the {model.lower()} root model",
        )
    return raw


def _check_hierarchy(level: str, model: str, keys: dict[str, str]) -> None:
    """Hierarchical queries (PS3.4 C.4.1.3.1.1): each level above the query level is named
    by its unique key with one value."""
    for above in MODEL_LEVELS[model][: MODEL_LEVELS[model].index(level)]:
        unique = query.UNIQUE_KEY[above]
        value = keys.get(unique, "")
        if not value or "*" in value or "?" in value or "\\" in value:
            raise Refusal(
                IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
                f"{level} level in the {model.lower()} root model needs a single {unique}",
            )


class FindPlan:
    """What one C-FIND request asks: level, filters, and the keys to answer with."""

    def __init__(self, identifier: Dataset, model: str) -> None:
        self.model = model
        self.level = _level(identifier, model)
        supported = query.supported_keywords(self.level)
        self.filters: dict[str, str] = {}
        self.sequences: dict[str, dict[str, str]] = {}  # sequence matching: the query item
        self.unsupported: list[Any] = []  # elements answered empty (status 0xFF01)
        self.requested: list[Any] = []  # the identifier's elements, in order
        for elem in identifier:
            keyword = elem.keyword
            if keyword in _ALWAYS_ACCEPTED:
                continue
            if elem.tag.element == 0:  # group length: not a key
                continue
            self.requested.append(elem)
            if keyword in supported and elem.VR == "SQ":
                self.sequences[keyword] = _query_item(elem)
            elif keyword in supported:
                self.filters[keyword] = _text_value(elem)
            else:
                self.unsupported.append(elem)
        _check_hierarchy(self.level, model, self.filters)
        self.filters.update(self.sequences)  # type: ignore[arg-type]
        self.retrieve_ae_requested = "RetrieveAETitle" in identifier
        # looked up once: pydicom's tag and keyword lookups would dominate each response
        self._unique_tags = [(_TAG_OF[k], k) for k in query.unique_keys(self.level, model)]
        self._fields = [(int(e.tag), e.keyword, e.VR) for e in self.requested]

    def response(self, match: dict[str, Any], ae_title: str) -> Dataset:
        ds = Dataset()
        texts = [v for v in match.values() if isinstance(v, str)]
        if any(not t.isascii() for t in texts):
            ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: catalog text is Unicode
        ds.QueryRetrieveLevel = self.level
        if self.retrieve_ae_requested:
            ds.RetrieveAETitle = ae_title
        for key in query.unique_keys(self.level, self.model):
            ds.add_new(key, pydicom.datadict.dictionary_VR(key), match.get(key, ""))
        for elem in self.requested:
            keyword = elem.keyword
            if keyword in match and elem.VR == "SQ":
                ds.add_new(elem.tag, "SQ", Sequence([_item(i) for i in match[keyword]]))
            elif keyword in match:
                value = match[keyword]
                if elem.VR in _BINARY_NUMBER_VRS:
                    value = int(value) if value != "" else None
                elif isinstance(value, int):
                    value = str(value)
                ds.add_new(elem.tag, elem.VR, value)
            elif elem.tag not in ds:
                ds.add_new(elem.tag, elem.VR, [] if elem.VR == "SQ" else None)
        return ds

    def encode(self, match: dict[str, Any], ae_title: str, explicit: bool) -> bytes | None:
        """The response identifier encoded directly in little endian (what ``response``
        gives pydicom to write, at a fraction of the cost), or None when a value needs
        pydicom (a VR this writer does not do)."""
        elements: dict[int, tuple[str, bytes]] = {}
        texts = [v for v in match.values() if isinstance(v, str)]
        utf8 = any(not t.isascii() for t in texts)
        if utf8:
            elements[0x00080005] = ("CS", b"ISO_IR 192")
        elements[0x00080052] = ("CS", _value_bytes("CS", self.level) or b"")
        if self.retrieve_ae_requested:
            elements[0x00080054] = ("AE", _value_bytes("AE", ae_title) or b"")
        for tag, key in self._unique_tags:
            elements[tag] = ("UI", _value_bytes("UI", match.get(key, "")) or b"")
        for tag, keyword, vr in self._fields:
            if keyword in match:
                raw = _value_bytes(vr, match[keyword])
                if raw is None:
                    return None
                elements[tag] = (vr, raw)
            elif tag not in elements:
                elements[tag] = (vr, b"")
        return b"".join(
            _encode_element(tag, vr, raw, explicit) for tag, (vr, raw) in sorted(elements.items())
        )


_TAG_OF = {
    key: int(pydicom.datadict.tag_for_keyword(key) or 0) for key in query.UNIQUE_KEY.values()
}
_TEXT_VRS = {
    "AE",
    "AS",
    "CS",
    "DA",
    "DS",
    "DT",
    "IS",
    "LO",
    "LT",
    "PN",
    "SH",
    "ST",
    "TM",
    "UC",
    "UI",
    "UR",
    "UT",
}
_LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
_NUMBER_FORMATS = {"US": "<H", "UL": "<I", "SS": "<h", "SL": "<i"}


def _value_bytes(vr: str, value: Any) -> bytes | None:
    if vr in _TEXT_VRS:
        raw = str(value).encode("utf-8")
        if len(raw) % 2:
            raw += b"\x00" if vr == "UI" else b" "
        return raw
    if vr in _NUMBER_FORMATS:
        return b"" if value == "" else struct.pack(_NUMBER_FORMATS[vr], int(value))
    return None


def _encode_element(tag: int, vr: str, raw: bytes, explicit: bool) -> bytes:
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    if not explicit:
        return head + struct.pack("<I", len(raw)) + raw
    if vr in _LONG_VRS:
        return head + vr.encode("ascii") + b"\x00\x00" + struct.pack("<I", len(raw)) + raw
    return head + vr.encode("ascii") + struct.pack("<H", len(raw)) + raw


class _DirectResponses:
    """Sends C-FIND pending responses as ready-made P-DATA-TF PDUs.

    pynetdicom builds, validates and encodes a pydicom Dataset for every command set (twice:
    once to measure the group length) and then hands each PDU through its DUL thread's
    queue, about 1.5 ms a response on this hardware.  A pending response's command set has
    a fixed shape (PS3.7 9.3.2.2), so it is encoded once, and the PDU is written to the
    socket from the handler's thread: while a C-FIND runs nothing else of this association
    is being sent (pynetdicom serves one request at a time and the peer waits for the final
    response before its next request), and the DUL thread keeps reading the socket, so a
    C-CANCEL is still seen.  Final, failure and cancel responses go through pynetdicom.
    A response too large for one PDU, or a TLS socket (not safe to write from a second
    thread), takes pynetdicom's DUL queue, and so do all the responses after it."""

    def __init__(self, event: Event) -> None:
        context = event.context
        syntax = UID(str(context.transfer_syntax))
        self.usable = syntax in (ImplicitVRLittleEndian, ExplicitVRLittleEndian)
        self.explicit = syntax == ExplicitVRLittleEndian
        self.context_id = int(context.context_id)
        self.assoc = event.assoc
        self.max_length = int(getattr(event.assoc.requestor, "maximum_length", 0) or 0)
        self.sop_class = str(event.request.AffectedSOPClassUID)
        self.message_id = int(event.request.MessageID or 0)
        self._commands: dict[int, bytes] = {}
        raw = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
        self._socket = (
            raw if isinstance(raw, socket.socket) and not isinstance(raw, ssl.SSLSocket) else None
        )

    def _command(self, status: int) -> bytes:
        command = self._commands.get(status)
        if command is None:
            uid = self.sop_class.encode("ascii")
            if len(uid) % 2:
                uid += b"\x00"
            body = b"".join(
                (
                    _encode_element(0x00000002, "UI", uid, False),
                    _encode_element(0x00000100, "US", struct.pack("<H", 0x8020), False),
                    _encode_element(0x00000120, "US", struct.pack("<H", self.message_id), False),
                    _encode_element(0x00000800, "US", struct.pack("<H", 0x0000), False),
                    _encode_element(0x00000900, "US", struct.pack("<H", status), False),
                )
            )
            command = _encode_element(0x00000000, "UL", struct.pack("<I", len(body)), False) + body
            self._commands[status] = command
        return command

    def send(self, status: int, identifier: bytes) -> bool:
        """Send one pending response; False when it must go through pynetdicom."""
        command = self._command(status)
        # one P-DATA-TF: two PDV items (4-byte length, context ID, control header, data)
        if self.max_length and 12 + len(command) + len(identifier) > self.max_length:
            self._socket = None  # pynetdicom's queue from here on: keep the order
            return False
        if self._socket is not None:
            items = b"".join(
                (
                    struct.pack(">IBB", len(command) + 2, self.context_id, 0x03),
                    command,
                    struct.pack(">IBB", len(identifier) + 2, self.context_id, 0x02),
                    identifier,
                )
            )
            try:
                self._socket.sendall(struct.pack(">BBI", 0x04, 0x00, len(items)) + items)
                return True
            except OSError:
                self._socket = None  # the association is going: let pynetdicom see to it
                return False
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((self.context_id, b"\x03" + command))
        pdata.presentation_data_value_list.append((self.context_id, b"\x02" + identifier))
        self.assoc.dul.send_pdu(pdata)
        return True


def _retrieve_filters(identifier: Dataset, model: str) -> tuple[str, dict[str, str]]:
    """Level and unique keys of a C-GET / C-MOVE identifier (PS3.4 C.4.2.2.1: only the
    unique keys of the level and the levels above it; others are ignored)."""
    level = _level(identifier, model)
    path = MODEL_LEVELS[model][: MODEL_LEVELS[model].index(level) + 1]
    filters: dict[str, str] = {}
    for name in path:
        key = query.UNIQUE_KEY[name]
        value = _text_value(identifier[key]) if key in identifier else ""
        if not value or "*" in value or "?" in value:
            raise Refusal(
                IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, f"retrieve at {level} level needs {key}"
            )
        if "\\" in value and name != level:
            raise Refusal(
                IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, f"{key} must hold one value above {level}"
            )
        filters[key] = value
    return level, filters


# --- C-FIND ----------------------------------------------------------------------------


def handle_find(event: Event, door: Door) -> Iterator[tuple[int | Dataset, Dataset | None]]:
    """C-FIND for a peer granted find, in its tenant's catalog (0x0124 otherwise)."""
    session = door.admit(event.assoc, "find")
    if session is None:
        yield status_dataset(NOT_AUTHORIZED, NOT_AUTHORIZED_COMMENT), None
        return
    door.audit_query(session, event)
    yield from find(event, session.archive)


def find(event: Event, archive: Archive) -> Iterator[tuple[int | Dataset, Dataset | None]]:
    """C-FIND: one pending response per match, then success (pynetdicom sends it)."""
    model = FIND_MODELS.get(str(event.request.AffectedSOPClassUID), "STUDY")
    limit = archive.settings.find_result_limit
    try:
        plan = FindPlan(_decode_identifier(event), model)
        matches = query.find(
            archive.catalog,
            plan.level,
            plan.filters,
            model=model,
            fuzzy_names=bool(archive.settings.fuzzy_names),
        )
        # The cap: a query with more matches than find_result_limit is refused before any
        # match is sent, with 0xA700 "Refused: Out of resources" (C-FIND has no warning
        # status, PS3.4 C.4.1.1.4); a truncated list ending in success would look complete.
        # (no cap: matches stream from the catalog cursor as they are sent)
        found: Iterable[dict[str, Any]] = list(islice(matches, limit + 1)) if limit > 0 else matches
    except Refusal as refusal:
        yield status_dataset(refusal.status, str(refusal)), None
        return
    except QueryError as exc:
        yield status_dataset(UNABLE_TO_PROCESS, str(exc)), None
        return
    except CatalogError as exc:
        log.error("C-FIND failed in the catalog: %s", exc)
        yield status_dataset(QR_UNABLE_TO_CALCULATE_MATCHES, str(exc)), None
        return
    if isinstance(found, list) and len(found) > limit:
        yield (
            status_dataset(QR_OUT_OF_RESOURCES, f"more than {limit} matches: narrow the query"),
            None,
        )
        return
    status = PENDING_WARNING if plan.unsupported else PENDING
    ae_title = archive.settings.ae_title
    direct = _DirectResponses(event)
    matches_left = iter(found)
    while True:
        try:
            match = next(matches_left)
        except StopIteration:
            return
        except CatalogError as exc:  # streaming (no cap): the catalog failed mid-way
            log.error("C-FIND failed in the catalog: %s", exc)
            yield status_dataset(QR_UNABLE_TO_CALCULATE_MATCHES, str(exc)), None
            return
        _wait_until_sent(event.assoc)
        if event.is_cancelled:
            yield CANCEL, None
            return
        if direct.usable:
            identifier = plan.encode(match, ae_title, direct.explicit)
            if identifier is not None and direct.send(status, identifier):
                continue
        yield status, plan.response(match, ae_title)


def _wait_until_sent(assoc: Association, batch: int = 128, timeout: float = 30.0) -> None:
    """Backpressure: let pynetdicom's DUL empty its send queue once ``batch`` responses
    wait in it.

    Its reactor reads the socket only when it has nothing left to send, so a handler that
    keeps the queue full would not see a C-CANCEL until every match was sent (and would
    hold them all in memory); waiting on every response instead would cost the reactor's
    1 ms idle sleep per response.  A batch keeps it sending back to back and lets it read
    the socket between batches."""
    outgoing = getattr(getattr(assoc, "dul", None), "to_provider_queue", None)
    if outgoing is None or outgoing.qsize() < batch:
        return
    deadline = time.monotonic() + timeout
    while outgoing.qsize() > 0 and time.monotonic() < deadline and assoc.is_established:
        time.sleep(0.0002)


# --- retrieval: sending stored bytes -----------------------------------------------------


class SubOperations:
    """What the sender learnt of one C-GET's or C-MOVE's sub-operations: the instances
    that failed (a raised error or a failure status from the peer) and whether the object
    store was unavailable, so the handler stops trying (see the module docstring)."""

    def __init__(self) -> None:
        self.failed: list[str] = []
        self.store_unavailable: str | None = None

    def final_if_store_unavailable(
        self, records: list[InstanceRecord], next_index: int
    ) -> tuple[Dataset, Dataset] | None:
        """The final response (status, identifier) once the store is unavailable: every
        instance from ``records[next_index]`` on is failed without being tried."""
        if self.store_unavailable is None:
            return None
        identifier = Dataset()
        identifier.FailedSOPInstanceUIDList = self.failed + [
            record.sop_uid for record in records[next_index:]
        ]
        status = (
            SUBOPERATIONS_WITH_FAILURES
            if next_index > len(self.failed)
            else QR_UNABLE_TO_PERFORM_SUBOPERATIONS
        )
        comment = f"object store unavailable: {self.store_unavailable}"
        return status_dataset(status, comment), identifier


#: the attribute of an association under which the handler puts its SubOperations
_SUBOPERATIONS_ATTR = "kho_suboperations"


def _peer_failed(status: Any) -> bool:
    """Whether a sub-operation's answer from the peer means it failed: no status, or one
    pynetdicom counts as failed (anything but the Success and Warning categories)."""
    code = getattr(status, "Status", None)
    return code is None or code_to_category(int(code)) not in (STATUS_SUCCESS, STATUS_WARNING)


class StoredInstance(Dataset):
    """What a C-GET/C-MOVE handler yields: names a stored instance, holds no data.

    Only the sender installed by ``install_raw_sender`` knows how to send it; it carries the
    SOP UIDs so pynetdicom can list it in Failed SOP Instance UID List."""

    def __init__(self, record: InstanceRecord) -> None:
        super().__init__()
        self.SOPClassUID = record.sop_class_uid
        self.SOPInstanceUID = record.sop_uid
        self.kho_record = record


def _spool_dir(archive: Archive) -> Path:
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm
    folder = archive.settings.data_dir / "tmp"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _accepted_syntaxes(assoc: Association, sop_class: str) -> list[str]:
    return [
        str(cx.transfer_syntax[0])
        for cx in assoc.accepted_contexts
        if cx.abstract_syntax == sop_class and cx.as_scu
    ]


def encode_for_peer(
    archive: Archive, record: InstanceRecord, accepted: list[str]
) -> tuple[str, bytes]:
    """(transfer syntax, dataset bytes) to send, by the archive's retrieval rule
    (kho.archive.read.transcode).  Raises KhoError (CodecUnavailableError) when nothing the peer
    accepted can be produced."""
    return transcode.encode_for(archive, record, accepted)


def install_raw_sender(archive: Archive, assoc: Association) -> None:
    """Make ``assoc.send_c_store`` send StoredInstance placeholders as stored bytes."""
    original = assoc.send_c_store
    if getattr(original, "kho_raw_sender", False):
        return

    def send_c_store(
        dataset: Any,
        msg_id: int = 1,
        priority: int = 2,
        originator_aet: str | None = None,
        originator_id: int | None = None,
    ) -> Dataset:
        if not isinstance(dataset, StoredInstance):
            return original(dataset, msg_id, priority, originator_aet, originator_id)
        record = dataset.kho_record
        tracker: SubOperations | None = getattr(assoc, _SUBOPERATIONS_ATTR, None)
        accepted = _accepted_syntaxes(assoc, record.sop_class_uid)
        try:
            syntax, body = encode_for_peer(archive, record, accepted)
        except KhoError as exc:
            # pynetdicom counts a raising sub-operation as failed and lists the instance
            log.warning("retrieve sub-operation failed: %s", exc)
            if tracker is not None:
                tracker.failed.append(record.sop_uid)
                if isinstance(exc, StorageUnavailableError):
                    tracker.store_unavailable = str(exc)
            raise
        # our own File Meta, so pynetdicom takes the catalog's UIDs and the syntax sent
        meta = build_file_meta(record.sop_class_uid, record.sop_uid, syntax)
        fd, name = tempfile.mkstemp(prefix="kho-retrieve-", suffix=".dcm", dir=_spool_dir(archive))
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(meta)
                fh.write(body)
            status = original(name, msg_id, priority, originator_aet, originator_id)
            if tracker is not None and _peer_failed(status):
                tracker.failed.append(record.sop_uid)
            return status
        finally:
            with contextlib.suppress(OSError):
                os.unlink(name)

    send_c_store.kho_raw_sender = True  # type: ignore[attr-defined]
    assoc.send_c_store = send_c_store  # type: ignore[method-assign]


# --- C-GET -----------------------------------------------------------------------------


def _retrieve_records(
    event: Event, archive: Archive, models: dict[str, str]
) -> list[InstanceRecord]:
    model = models.get(str(event.request.AffectedSOPClassUID), "STUDY")
    level, filters = _retrieve_filters(_decode_identifier(event), model)
    try:
        return query.instances(archive.catalog, level, filters)
    except QueryError as exc:
        raise Refusal(IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, str(exc)) from exc
    except CatalogError as exc:
        raise Refusal(QR_UNABLE_TO_CALCULATE_MATCHES, str(exc)) from exc


def handle_get(event: Event, door: Door) -> Iterator[Any]:
    """C-GET for a peer granted get, from its tenant's catalog (0x0124 otherwise)."""
    session = door.admit(event.assoc, "get")
    if session is None:
        # pynetdicom needs a sub-operation count before any status: one, which fails
        yield 1
        yield status_dataset(NOT_AUTHORIZED, NOT_AUTHORIZED_COMMENT), None
        return
    sent: list[InstanceRecord] = []
    try:
        yield from get(event, session.archive, sent)
    finally:  # what was sent, once pynetdicom is done with the generator
        door.audit_sent(session, event, sent, via="C-GET")


def get(event: Event, archive: Archive, sent: list[InstanceRecord] | None = None) -> Iterator[Any]:
    """C-GET: C-STORE sub-operations over the requesting association (the instances
    offered are added to ``sent``)."""
    try:
        records = _retrieve_records(event, archive, GET_MODELS)
    except Refusal as refusal:
        # pynetdicom needs a sub-operation count before any status: one, which fails
        yield 1
        yield status_dataset(refusal.status, str(refusal)), None
        return
    install_raw_sender(archive, event.assoc)
    tracker = SubOperations()  # this request's; the association may carry several
    setattr(event.assoc, _SUBOPERATIONS_ATTR, tracker)
    yield len(records)
    for index, record in enumerate(records):
        if event.is_cancelled:
            yield CANCEL, None
            return
        final = tracker.final_if_store_unavailable(records, index)
        if final is not None:
            log.warning("C-GET: %s; %d sub-operations not tried", final[0].ErrorComment,
                        len(records) - index)  # fmt: skip
            yield final
            return
        if sent is not None:
            sent.append(record)
        yield PENDING, StoredInstance(record)


# --- C-MOVE ----------------------------------------------------------------------------


def _move_contexts(records: list[InstanceRecord]) -> list[Any]:
    """Presentation contexts for the destination (see the module docstring): per SOP class
    first one context with every syntax each of its (decodable) instances can be produced
    in, so the destination picks the one it prefers; then each (SOP class, received syntax)
    alone, so it accepts or refuses exactly that; then JPEG-LS Lossless alone for classes
    with instances held as JPEG-LS at rest (re-wrapped, no decode).  At most 128, in that
    order of importance."""
    by_class: dict[str, list[InstanceRecord]] = {}
    for record in records:
        by_class.setdefault(record.sop_class_uid, []).append(record)
    choices: list[Any] = []
    received: list[Any] = []
    at_rest: list[Any] = []
    for sop_class, members in by_class.items():
        common: list[str] | None = None
        for record in members:
            producible = transcode.producible_syntaxes(record)
            if producible == [record.transfer_syntax_uid]:
                continue  # cannot be decoded here: its received syntax or nothing
            common = producible if common is None else [s for s in common if s in producible]
        if common:
            choices.append(build_context(sop_class, common))
        syntaxes = list(dict.fromkeys(r.transfer_syntax_uid for r in members))
        received += [build_context(sop_class, [ts]) for ts in syntaxes]
        if transcode.JPEG_LS_LOSSLESS not in syntaxes and any(
            r.pixel_format == "jpeg-ls" for r in members
        ):
            at_rest.append(build_context(sop_class, [transcode.JPEG_LS_LOSSLESS]))
    return (choices + received + at_rest)[:_MAX_CONTEXTS]


#: the key of a C-MOVE destination's options under which handle_move passes its
#: MoveDestination to the server AE's ``associate`` (kho.dicom_scp.server)
MOVE_DESTINATION_OPTION = "kho_move_destination"


class MoveDestination:
    """The association to one C-MOVE's destination, as handle_move learns of it: ready
    (kho's sender installed) or unreachable, and why.

    pynetdicom 3.0.4 opens that association itself and answers 0xA801 Move Destination
    Unknown when it fails; PS3.4 C.4.2.1.4 keeps that status for an AE the SCP does not
    know.  So the server AE hands a failed association to ``unreachable``, which gives
    pynetdicom a stand-in and lets handle_move answer every sub-operation failed."""

    def __init__(self, archive: Archive | None, ae_title: str) -> None:
        self.archive = archive
        self.ae_title = ae_title
        self.settled = threading.Event()
        self.connected = False
        self.failure: str | None = None
        #: the move was refused before any destination: the server AE opens nothing and
        #: hands pynetdicom the stand-in (``unreachable``) at once
        self.refused = False
        #: the association goes over TLS (its handshake is part of connecting)
        self.tls = False
        self.suboperations = SubOperations()

    def connection_opened(self, event: Event) -> None:
        """EVT_CONN_OPEN of the association to the destination: TCP got through."""
        self.connected = True
        handle_connection_open(event)

    def established(self, event: Event) -> None:
        """EVT_ESTABLISHED of the association to the destination (in its thread)."""
        if self.archive is not None:
            install_raw_sender(self.archive, event.assoc)
            setattr(event.assoc, _SUBOPERATIONS_ATTR, self.suboperations)
        self.settled.set()

    def unreachable(self, association: Association | None) -> _UnreachableDestination:
        """The association could not be opened (or, refused, was not tried: None): say
        why, and what pynetdicom gets."""
        if association is None:
            self.failure = "not contacted (move refused)"
            self.settled.set()
            return _UnreachableDestination()
        if not self.connected:  # connection refused, timed out, no route; TLS refused
            # (an Error Comment holds 64 characters: pynetdicom logs the TLS error itself)
            self.failure = "unreachable over TLS" if self.tls else "unreachable (no connection)"
        elif association.is_rejected:
            self.failure = "rejected the association"
        else:
            self.failure = "aborted the association"
        sock = association.dul.socket  # pynetdicom closes it by hand in this case too
        if sock is not None:
            sock.close()
        self.settled.set()
        return _UnreachableDestination()


class _UnreachableDestination:
    """What pynetdicom gets instead of an association it could not open to a known
    destination: it resumes handle_move, which yields the failure, and releases this."""

    is_established = True  # so that pynetdicom resumes the handler instead of answering

    def release(self) -> None:
        """Nothing is open."""

    def send_c_store(self, dataset: Dataset, *args: Any, **kwargs: Any) -> Dataset:
        """Never called (handle_move sends nothing once the destination failed); should it
        be, the sub-operation fails."""
        return status_dataset(OUT_OF_RESOURCES, "move destination unreachable")


def _all_failed(records: list[InstanceRecord]) -> Dataset:
    """The identifier of a C-MOVE final response whose sub-operations all failed."""
    identifier = Dataset()
    identifier.FailedSOPInstanceUIDList = [record.sop_uid for record in records]
    return identifier


def handle_move(event: Event, door: Door) -> Iterator[Any]:
    """C-MOVE for a peer granted move, from its tenant's catalog, to a destination its
    tenant may send to (0x0124 / 0xA801 otherwise)."""
    session = door.admit(event.assoc, "move")
    if session is None:
        yield from _refuse_move(event, NOT_AUTHORIZED, NOT_AUTHORIZED_COMMENT)
        return
    destination_ae = (event.move_destination or "").strip()
    address = door.move_destination(event.assoc, session, destination_ae)
    if address is None:
        yield None, None  # pynetdicom answers 0xA801 Move Destination unknown
        return
    sent: list[InstanceRecord] = []
    try:
        yield from move(
            event,
            session.archive,
            destination_ae,
            address,
            door.destination_tls(destination_ae),
            sent,
        )
    finally:  # what was sent, once pynetdicom is done with the generator
        door.audit_sent(session, event, sent, via="C-MOVE", destination=(destination_ae, address))


def _refuse_move(event: Event, status: int, comment: str) -> Iterator[Any]:
    """A C-MOVE answered with a failure ``status`` before any destination is contacted:
    pynetdicom wants a destination, so it gets one that the server AE never opens (see
    MoveDestination.refused), then the one failing sub-operation and the status."""
    destination = MoveDestination(None, (event.move_destination or "").strip())
    destination.refused = True
    yield "127.0.0.1", 1, {MOVE_DESTINATION_OPTION: destination}
    yield 1
    yield status_dataset(status, comment), None


def move(
    event: Event,
    archive: Archive,
    destination_ae: str,
    address: tuple[str, int],
    tls: ssl.SSLContext | None = None,
    sent: list[InstanceRecord] | None = None,
) -> Iterator[Any]:
    """C-MOVE: yields the destination, the sub-operation count, then one placeholder per
    instance; pynetdicom opens the association and counts the sub-operations.  ``tls``:
    the client context of a destination registered for TLS (its certificate must verify
    and name the host kho connects to)."""
    refusal: Refusal | None = None
    records: list[InstanceRecord] = []
    try:
        records = _retrieve_records(event, archive, MOVE_MODELS)
    except Refusal as exc:
        refusal = exc
    destination = MoveDestination(archive, destination_ae)
    options = {
        # Verification when nothing is to be sent: a refusal still makes pynetdicom
        # associate before it sends our status, and that must not fail
        "contexts": _move_contexts(records) or [build_context(_VERIFICATION)],
        "evt_handlers": [
            (evt.EVT_CONN_OPEN, destination.connection_opened),
            (evt.EVT_ESTABLISHED, destination.established),
        ],
        "max_pdu": 0,
        MOVE_DESTINATION_OPTION: destination,
    }
    if tls is not None:
        options["tls_args"] = (tls, address[0])
        destination.tls = True
    yield address[0], address[1], options
    if refusal is not None:
        yield 1
        yield status_dataset(refusal.status, str(refusal)), None
        return
    yield len(records)
    # pynetdicom resumes us once its association to the destination is up; our sender is
    # installed by EVT_ESTABLISHED in that association's thread, so wait for it (a
    # placeholder sent by pynetdicom's own sender would be a bogus two-element instance)
    if not destination.settled.wait(30):
        yield (
            status_dataset(QR_UNABLE_TO_PERFORM_SUBOPERATIONS, "destination association not ready"),
            _all_failed(records),
        )
        return
    if destination.failure is not None:
        log.warning(
            "C-MOVE of %d instances to %s (%s:%d): %s; all sub-operations failed",
            len(records),
            destination_ae,
            address[0],
            address[1],
            destination.failure,
        )
        comment = f"move destination {destination_ae} {destination.failure}"
        yield (
            status_dataset(QR_UNABLE_TO_PERFORM_SUBOPERATIONS, comment),
            _all_failed(records),
        )
        return
    for index, record in enumerate(records):
        if event.is_cancelled:
            yield CANCEL, None
            return
        final = destination.suboperations.final_if_store_unavailable(records, index)
        if final is not None:
            log.warning("C-MOVE to %s: %s; %d sub-operations not tried", destination_ae,
                        final[0].ErrorComment, len(records) - index)  # fmt: skip
            yield final
            return
        if sent is not None:
            sent.append(record)
        yield PENDING, StoredInstance(record)


def enable_raw_sending() -> None:
    """pynetdicom sends a file path's dataset bytes unchanged only in chunked mode."""
    _config.STORE_SEND_CHUNKED_DATASET = True
