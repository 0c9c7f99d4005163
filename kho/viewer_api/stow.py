"""STOW-RS (PS3.18 10.5): store instances through the same ingest path as C-STORE.

The body is parsed as it arrives (bounded by the maximum upload size: 413); every part is
checked and ingested on its own, so a bad part is refused with its reason and nothing of it
is stored, while the good parts are stored.  Statuses (PS3.18 10.5.3): 200 all stored,
202 some failed or stored with a warning, 409 none stored, 400 malformed body,
415 not multipart/related application/dicom, 503 storage unavailable for every part.

A part that contradicts the catalog (its study belongs to another patient, its series to
another study) fails with 0xC410 and the conflict in its Error Comment; a part stored
under a Study or Series Instance UID the archive invented (it had none) carries Warning
Reason 0xB000 (coercion), the invented UIDs, and a Retrieve URL built from them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from kho.access.callers import Role
from kho.archive.archive import Archive
from kho.archive.dataset.attributes import read_header
from kho.archive.dataset.part10 import parse_part10
from kho.archive.ingest.pipeline import RowsFor, combine_rows
from kho.errors import (
    CatalogError,
    DatasetMismatchError,
    DuplicateInstanceError,
    IdentityConflictError,
    InvalidDicomError,
    StorageError,
)
from kho.storage import is_full
from kho.viewer_api.deps import ArchiveDep, BaseUrlDep, StateDep
from kho.viewer_api.errors import (
    BadRequestError,
    NotAcceptableError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)
from kho.viewer_api.media import DICOM, DICOM_JSON, parse_accept, parse_media_type
from kho.viewer_api.multipart import MultipartParser, Part
from kho.viewer_api.responses import json_response
from kho.viewer_api.security import authorized_of, requires

router = APIRouter(tags=["STOW-RS"], dependencies=[requires(Role.UPLOADER)])
log = logging.getLogger(__name__)

# PS3.18 Table 10.5.3-? / PS3.4 Annex B failure reasons
PROCESSING_FAILURE = 0x0110
DUPLICATE_SOP_INSTANCE = 0x0111
OUT_OF_RESOURCES = 0xA700
DATA_SET_DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
STUDY_MISMATCH = 0xC409  # Study Instance UID differs from the request's (dcm4chee's code)
# the instance contradicts the catalog (study of another patient, series of another study);
# the same code as the DIMSE door's (kho.dicom_scp.statuses), kept here: doors share nothing
IDENTITY_CONFLICT = 0xC410
# Warning Reason (0008,1196) values: PS3.4 B.2.3 warning statuses
COERCION_OF_DATA_ELEMENTS = 0xB000  # the archive invented a Type 1 UID the part lacked

#: DICOM JSON tags of the UIDs an ingest may invent (IngestResult.coerced keywords)
_COERCED_TAGS = {"StudyInstanceUID": "0020000D", "SeriesInstanceUID": "0020000E"}


@dataclass(slots=True)
class PartOutcome:
    sop_class_uid: str
    sop_uid: str
    study_uid: str
    series_uid: str = ""
    failure: int | None = None
    reason: str = ""
    warning: int | None = None
    #: UIDs the archive invented for this part (keyword -> UID)
    coerced: tuple[tuple[str, str], ...] = ()
    #: out of resources because a disk is full (507), not unreachable (503)
    disk_full: bool = False


def _identity(data: bytes) -> tuple[str, str, str]:
    """(SOP Class UID, SOP Instance UID, Study Instance UID) of a part, read before ingest."""
    layout = parse_part10(data)
    split = layout.pixels.element_offset if layout.pixels else None
    ds = read_header(data, split)
    return (
        str(ds.get("SOPClassUID", "") or layout.media_sop_class_uid),
        str(ds.get("SOPInstanceUID", "") or layout.media_sop_instance_uid),
        str(ds.get("StudyInstanceUID", "")),
    )


def store_part(
    archive: Archive, part: Part, study: str | None, with_rows: RowsFor | None = None
) -> PartOutcome:
    part_type = parse_media_type(part.content_type or DICOM)
    if part_type.media != DICOM:
        reason = f"part type {part_type.media}"
        return PartOutcome("", "", "", failure=CANNOT_UNDERSTAND, reason=reason)
    data = part.body
    try:
        sop_class, sop_uid, part_study = _identity(data)
    except InvalidDicomError as exc:
        return PartOutcome("", "", "", failure=CANNOT_UNDERSTAND, reason=str(exc))
    outcome = PartOutcome(sop_class, sop_uid, part_study)
    if study is not None and part_study != study:
        outcome.failure = STUDY_MISMATCH
        outcome.reason = f"Study Instance UID {part_study} is not the request's {study}"
        return outcome
    try:
        result = archive.ingest_part10(data, source="stow", with_rows=with_rows)
    except DuplicateInstanceError as exc:
        outcome.failure, outcome.reason = DUPLICATE_SOP_INSTANCE, str(exc)
    except IdentityConflictError as exc:
        log.warning("STOW-RS: %s refused: %s", sop_uid, exc)
        outcome.failure, outcome.reason = IDENTITY_CONFLICT, str(exc)
    except DatasetMismatchError as exc:
        outcome.failure, outcome.reason = DATA_SET_DOES_NOT_MATCH, str(exc)
    except InvalidDicomError as exc:
        outcome.failure, outcome.reason = CANNOT_UNDERSTAND, str(exc)
    except (StorageError, CatalogError) as exc:
        log.error("STOW-RS: cannot store %s: %s", sop_uid, exc)
        outcome.failure, outcome.reason = OUT_OF_RESOURCES, str(exc)
        outcome.disk_full = is_full(exc)
    else:
        outcome.sop_uid, outcome.study_uid = result.sop_uid, result.study_uid
        outcome.series_uid = result.series_uid
        if result.coerced:  # the item names the invented UIDs (and its URL uses them)
            outcome.warning, outcome.coerced = COERCION_OF_DATA_ELEMENTS, result.coerced
    return outcome


def response_dataset(base: str, outcomes: list[PartOutcome], study: str | None) -> dict[str, Any]:
    """The PS3.18 store response (DICOM JSON)."""

    def uid(value: str) -> dict[str, Any]:
        return {"vr": "UI", "Value": [value]} if value else {"vr": "UI"}

    referenced, failed = [], []
    for o in outcomes:
        item: dict[str, Any] = {"00081150": uid(o.sop_class_uid), "00081155": uid(o.sop_uid)}
        if o.failure is None:
            url = f"{base}/studies/{o.study_uid}/series/{o.series_uid}/instances/{o.sop_uid}"
            item["00081190"] = {"vr": "UR", "Value": [url]}
            if o.warning is not None:
                item["00081196"] = {"vr": "US", "Value": [o.warning]}
            for keyword, invented in o.coerced:
                tag = _COERCED_TAGS.get(keyword)
                if tag is not None:
                    item[tag] = uid(invented)
            referenced.append(item)
        else:
            item["00081197"] = {"vr": "US", "Value": [o.failure]}
            # why, as DIMSE says it: Error Comment is LO, 64 characters (the log has it all)
            if o.reason:
                item["00000902"] = {"vr": "LO", "Value": [" ".join(o.reason.split())[:64]]}
            failed.append(item)
    out: dict[str, Any] = {}
    studies = {o.study_uid for o in outcomes if o.failure is None}
    target = study or (studies.pop() if len(studies) == 1 else "")
    if target:
        out["00081190"] = {"vr": "UR", "Value": [f"{base}/studies/{target}"]}
    if failed:
        out["00081198"] = {"vr": "SQ", "Value": failed}
    if referenced:
        out["00081199"] = {"vr": "SQ", "Value": referenced}
    return out


async def read_parts(request: Request, max_bytes: int) -> list[Part]:
    media = parse_media_type(request.headers.get("content-type", ""))
    if media.media != "multipart/related":
        raise UnsupportedMediaTypeError(
            f'STOW-RS takes multipart/related; type="application/dicom", not {media.media!r}'
        )
    if media.params.get("type", DICOM).lower() != DICOM:
        raise UnsupportedMediaTypeError(
            f"only application/dicom parts are accepted, not {media.params.get('type')!r}"
        )
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLargeError(f"request body larger than {max_bytes} bytes")
    boundary = media.params.get("boundary", "")
    if not boundary:
        raise BadRequestError("multipart/related without a boundary")
    parser = MultipartParser(boundary)
    parts: list[Part] = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > max_bytes:
            raise PayloadTooLargeError(f"request body larger than {max_bytes} bytes")
        parts += parser.feed(chunk)
    parser.finish()
    if not parts:
        raise BadRequestError("multipart body has no part")
    return parts


async def _store(
    request: Request, state: StateDep, archive: Archive, base: str, study: str | None
) -> Response:
    ranges = parse_accept(request.headers.get("accept"))
    if ranges and not any(r.matches(DICOM_JSON) or r.matches("application/json") for r in ranges):
        raise NotAcceptableError("the STOW-RS response is application/dicom+json")
    parts = await read_parts(request, state.max_upload_bytes)
    # each instance's audit record and forwarding tasks commit with it
    authorized = authorized_of(request.scope)
    caller, tenant = authorized.caller, authorized.tenant
    with_rows = combine_rows(
        state.auditor.stored_rows(caller, tenant, "STOW-RS") if state.auditor else None,
        state.router.stored_rows(caller, tenant, "STOW-RS", "") if state.router else None,
    )

    def store_all() -> list[PartOutcome]:
        return [store_part(archive, part, study, with_rows) for part in parts]

    outcomes = await run_in_threadpool(store_all)
    stored = sum(1 for o in outcomes if o.failure is None)
    warned = any(o.failure is None and o.warning is not None for o in outcomes)
    if stored == len(outcomes):
        status = 202 if warned else 200
    elif stored:
        status = 202
    elif all(o.failure == OUT_OF_RESOURCES for o in outcomes):
        # a full disk: 507 Insufficient Storage (freeing space helps, waiting does not);
        # an unreachable store or catalog: 503
        status = 507 if any(o.disk_full for o in outcomes) else 503
    else:
        status = 409
    body = json.dumps(response_dataset(base, outcomes, study), separators=(",", ":")).encode()
    return json_response(request, body, status_code=status)


@router.post("/studies", summary="Store instances")
async def store_instances(
    request: Request, state: StateDep, archive: ArchiveDep, base: BaseUrlDep
) -> Response:
    return await _store(request, state, archive, base, None)


@router.post("/studies/{study}", summary="Store instances of one study")
async def store_study_instances(
    study: str, request: Request, state: StateDep, archive: ArchiveDep, base: BaseUrlDep
) -> Response:
    return await _store(request, state, archive, base, study)
