"""WADO-RS (PS3.18 10.4): instances, metadata, frames and bulk data.

Instances, frames and pixel bulk data follow the archive's retrieval rule
(kho.archive.read.transcode, the same as C-GET/C-MOVE) over the syntaxes the Accept header
names, best first:

- Instances: ``transfer-syntax=*`` keeps the received bytes, bit for bit; a named syntax
  is served as received if it is the received one, else re-wrapped from the at-rest
  JPEG-LS frames (JPEG-LS Lossless), else transcoded losslessly; no syntax named
  (``application/dicom``, ``*/*`` or no Accept) means Explicit VR Little Endian
  (PS3.18 8.7.3.4, 8.7.3.5.2).  406 when an instance cannot be served in any of them.
- Frames go out as stored when the client accepts that (``transfer-syntax=*``, the
  syntax, or its media type), else decoded (``application/octet-stream``, the default) or
  encoded losslessly into the media type asked: ``image/jls`` (JPEG-LS), ``image/jp2``
  (JPEG 2000), ``image/jpeg`` (JPEG lossless SV1 unless the frame was received as JPEG),
  ``image/dicom-rle``; the part's Content-Type names the syntax served.  "Any syntax in
  octet-stream" (OHIF's Accept) may be answered decoded for small lossless frames
  (setting ``viewer_decoded_frame_max_bytes``, off by default: :func:`decoded_for_any`).
- Metadata is the DICOM JSON made at ingest (kho.archive.read.metadata), one read per
  instance; a series' concatenation is cached (and gzipped once) until the series changes.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Iterator
from typing import Annotated

import pydicom
from fastapi import APIRouter, Path, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from kho.access.callers import Role
from kho.archive.archive import Archive
from kho.archive.catalog import InstanceRecord
from kho.archive.query import engine as query
from kho.archive.read import metadata, transcode
from kho.archive.read.pixels import frame_array, frame_count, has_pixels, native_bytes, stored_frame
from kho.errors import NotFoundError, QueryError
from kho.viewer_api import multipart
from kho.viewer_api.deps import (
    ArchiveDep,
    BaseUrlDep,
    InstanceDep,
    StateDep,
    ViewerState,
    instance_url,
)
from kho.viewer_api.errors import NotAcceptableError
from kho.viewer_api.media import (
    DICOM,
    DICOM_JSON,
    EXPLICIT_VR_LITTLE_ENDIAN,
    OCTET_STREAM,
    frame_media_type,
    frame_syntaxes,
    parse_accept,
)
from kho.viewer_api.paths import frame_list
from kho.viewer_api.responses import gzip_body, json_response
from kho.viewer_api.security import requires

router = APIRouter(tags=["WADO-RS"], dependencies=[requires(Role.VIEWER)])

PIXEL_TAGS = frozenset({"7FE00010", "7FE00008", "7FE00009"})


# --- helpers ----------------------------------------------------------------------------


def series_records(archive: Archive, study: str, series: str | None) -> list[InstanceRecord]:
    filters = {"StudyInstanceUID": study}
    level = "STUDY"
    if series is not None:
        filters["SeriesInstanceUID"] = series
        level = "SERIES"
    records = query.instances(archive.catalog, level, filters)
    if not records:
        what = f"series {series} of study {study}" if series else f"study {study}"
        raise NotFoundError(f"no {what}")
    return records


def stored_syntax(record: InstanceRecord) -> str:
    """The transfer syntax of a frame as stored_frame() returns it."""
    return transcode.stored_frame_syntax(record)


# --- retrieve ---------------------------------------------------------------------------


def _negotiate_instances(
    request: Request, records: list[InstanceRecord]
) -> tuple[bool, list[list[str]]]:
    """(multipart?, per instance the syntaxes it may go out in, best first).

    Multipart always, except a single-part application/dicom of one instance.  The Accept
    ranges that ask for instances give the syntaxes in their order: ``*`` the received one,
    none named Explicit VR Little Endian (also with no Accept).  406 when an instance can be
    served in none of them (kho.archive.read.transcode decides what can be produced)."""
    ranges = parse_accept(request.headers.get("accept"))
    multi: bool | None = True if not ranges else None
    wanted = [] if ranges else [EXPLICIT_VR_LITTLE_ENDIAN]
    for r in ranges:
        if r.media == "*/*" or (r.is_multipart and r.inner in ("", DICOM, "*/*")):
            this = True
        elif r.media == DICOM and len(records) == 1:
            this = False
        else:
            continue
        multi = this if multi is None else multi
        wanted.append(r.transfer_syntax or EXPLICIT_VR_LITTLE_ENDIAN)
    if multi is None:
        raise NotAcceptableError(
            'instances are served as multipart/related; type="application/dicom"'
            + (" or application/dicom" if len(records) == 1 else "")
        )
    accepted: list[list[str]] = []
    for record in records:
        syntaxes = [record.transfer_syntax_uid if w == "*" else w for w in wanted]
        if transcode.choose_syntax(record, syntaxes) is None:
            raise NotAcceptableError(
                f"instance {record.sop_uid}, received as {record.transfer_syntax_uid}, cannot "
                f"be served in {', '.join(dict.fromkeys(wanted))}: ask for transfer-syntax=* "
                "(as received) or a syntax kho produces losslessly (Explicit VR Little "
                "Endian, JPEG-LS, JPEG 2000, JPEG lossless, RLE, Deflated)"
            )
        accepted.append(syntaxes)
    return multi, accepted


def _retrieve(archive: Archive, request: Request, records: list[InstanceRecord]) -> Response:
    multi, accepted = _negotiate_instances(request, records)
    # the first instance is made before the status line goes out, so an unreachable store
    # answers 503 (and a failed transcode an error); a failure after that can only cut the
    # stream short
    syntax, first = transcode.encode_part10_for(archive, records[0], accepted[0])
    if not multi:
        return Response(first, media_type=f"{DICOM}; transfer-syntax={syntax}")
    boundary = multipart.new_boundary()

    def parts() -> Iterator[tuple[bytes, str]]:
        for i, record in enumerate(records):  # one instance in memory at a time
            if i == 0:
                ts, data = syntax, first
            else:
                ts, data = transcode.encode_part10_for(archive, record, accepted[i])
            yield data, f"{DICOM}; transfer-syntax={ts}"

    return StreamingResponse(
        multipart.write_parts(boundary, parts()),
        media_type=multipart.content_type(DICOM, boundary),
    )


@router.get("/studies/{study}", summary="Retrieve a study")
def retrieve_study(study: str, request: Request, archive: ArchiveDep) -> Response:
    return _retrieve(archive, request, series_records(archive, study, None))


@router.get("/studies/{study}/series/{series}", summary="Retrieve a series")
def retrieve_series(study: str, series: str, request: Request, archive: ArchiveDep) -> Response:
    return _retrieve(archive, request, series_records(archive, study, series))


@router.get("/studies/{study}/series/{series}/instances/{instance}", summary="Retrieve an instance")
def retrieve_instance(record: InstanceDep, request: Request, archive: ArchiveDep) -> Response:
    return _retrieve(archive, request, [record])


# --- metadata ---------------------------------------------------------------------------


def _check_json_accept(request: Request) -> None:
    ranges = parse_accept(request.headers.get("accept"))
    if ranges and not any(r.matches(DICOM_JSON) or r.matches("application/json") for r in ranges):
        raise NotAcceptableError("metadata is served as application/dicom+json only")


def _documents(archive: Archive, base: str, records: list[InstanceRecord]) -> bytes:
    docs = [
        metadata.with_absolute_uris(metadata.instance_document(archive, r), instance_url(base, r))
        for r in records
    ]
    return b"[" + b",".join(docs) + b"]"


def _cached_series(
    state: ViewerState,
    archive: Archive,
    cache_key: tuple[str, str, str],
    records: list[InstanceRecord],
) -> tuple[bytes, bytes | None] | None:
    cached = state.metadata_cache.get(cache_key)
    # the key includes the patient's revision: an HL7 update is never served stale
    if cached is not None and cached[0] == metadata.documents_key(records, archive):
        return cached[1], cached[2]
    return None


def _series_metadata(
    state: ViewerState,
    archive: Archive,
    base: str,
    study: str,
    series: str,
    records: list[InstanceRecord] | None = None,
) -> tuple[bytes, bytes | None]:
    """The series' documents joined (one read per instance), cached per tenant, series and
    base URL until an instance is added, removed or replaced."""
    if records is None:
        records = series_records(archive, study, series)
    # the tenant first: two hospitals may hold the same series UID, and one base URL
    # (/dicom-web) serves each caller's home tenant
    cache_key = (archive.tenant, series, base)
    cached = _cached_series(state, archive, cache_key, records)
    if cached is not None:
        return cached
    key = metadata.documents_key(records, archive)
    body = _documents(archive, base, records)
    gzipped = gzip_body(body)
    if len(state.metadata_cache) > 256:  # bounded: forget everything, refill on demand
        state.metadata_cache.clear()
    state.metadata_cache[cache_key] = (key, body, gzipped)
    return body, gzipped


@router.get("/studies/{study}/metadata", summary="Study metadata (DICOM JSON)")
def study_metadata(
    study: str, request: Request, state: StateDep, archive: ArchiveDep, base: BaseUrlDep
) -> Response:
    _check_json_accept(request)
    records = series_records(archive, study, None)
    series_uids = list(dict.fromkeys(r.series_uid for r in records))
    bodies = [_series_metadata(state, archive, base, study, s)[0] for s in series_uids]
    body = b"[" + b",".join(b[1:-1] for b in bodies if len(b) > 2) + b"]"
    return json_response(request, body)


@router.get("/studies/{study}/series/{series}/metadata", summary="Series metadata (DICOM JSON)")
async def series_metadata(
    study: str,
    series: str,
    request: Request,
    state: StateDep,
    archive: ArchiveDep,
    base: BaseUrlDep,
) -> Response:
    return await series_metadata_response(state, archive, request, base, study, series)


async def series_metadata_response(
    state: ViewerState, archive: Archive, request: Request, base: str, study: str, series: str
) -> Response:
    """The series' metadata: from the cache while the series' version is unchanged."""
    _check_json_accept(request)
    cached = None
    version = metadata.series_version(archive, study, series)
    if version is not None:
        found = state.metadata_cache.get((archive.tenant, series, base))
        if found is not None and found[0] == version:
            cached = found[1], found[2]
    if cached is None:
        cached = await run_in_threadpool(_series_metadata, state, archive, base, study, series)
    body, gzipped = cached
    return json_response(request, body, gzipped=gzipped)


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/metadata",
    summary="Instance metadata (DICOM JSON)",
)
def instance_metadata(
    record: InstanceDep, request: Request, archive: ArchiveDep, base: BaseUrlDep
) -> Response:
    _check_json_accept(request)
    return json_response(request, _documents(archive, base, [record]))


# --- frames -----------------------------------------------------------------------------


def negotiate_frames(
    accept: str | None,
    stored_ts: str,
    frames: int,
    can_produce: Callable[[str], bool] | None = None,
    decoded_for_any: bool = False,
) -> tuple[str, str | None]:
    """(the syntax the frames go out in, the single-part media type or None for
    multipart/related).  ``can_produce``: whether a syntax other than the stored one and
    Explicit VR Little Endian (decoded) can be made (kho.archive.read.transcode).
    ``decoded_for_any``: ``application/octet-stream; transfer-syntax=*`` (any syntax in
    octet-stream, what OHIF's Cornerstone asks for) is answered decoded rather than as
    stored (see :func:`decoded_for_any`)."""
    ranges = parse_accept(accept)
    stored_media = frame_media_type(stored_ts)

    def producible(syntax: str) -> bool:
        if syntax in (stored_ts, EXPLICIT_VR_LITTLE_ENDIAN):
            return True
        return can_produce is not None and can_produce(syntax)

    for r in ranges:
        if r.media == "*/*":  # anything: the default below, unless a later range is named
            continue
        if r.is_multipart:
            multipart_asked = True
        elif frames == 1:
            multipart_asked = False
        else:
            continue
        inner = r.inner or "*/*"
        if decoded_for_any and inner == OCTET_STREAM and r.transfer_syntax == "*":
            return EXPLICIT_VR_LITTLE_ENDIAN, None if multipart_asked else OCTET_STREAM
        if inner in ("*/*", "image/*"):
            return stored_ts, None if multipart_asked else stored_media
        for syntax in frame_syntaxes(inner, r.transfer_syntax, stored_ts):
            if producible(syntax):
                return syntax, None if multipart_asked else frame_media_type(syntax)
    if not ranges or any(r.media == "*/*" for r in ranges):
        # PS3.18 8.7.3.3, Table 8.7.3-4: the default for bulk data (and frames) is
        # uncompressed little endian application/octet-stream, multipart
        return EXPLICIT_VR_LITTLE_ENDIAN, None
    raise NotAcceptableError(
        f"frames are stored as {stored_ts} ({stored_media}); ask for transfer-syntax=*, "
        "that syntax, application/octet-stream (decoded), or image/jls, image/jp2, "
        "image/jpeg, image/dicom-rle (encoded losslessly where the pixels allow it)"
    )


def decoded_for_any(archive: Archive, record: InstanceRecord, stored_ts: str) -> bool:
    """Whether "any syntax" in octet-stream gets this instance's frames decoded: stored
    losslessly compressed and small (setting ``viewer_decoded_frame_max_bytes``, default
    0: never).

    It spares the browser its WebAssembly decode (the codec fetched and compiled in each
    decode worker, then the decode) at the price of kho's native decode (~4 ms a 512x512
    frame, read ahead along the series) and 2-3x the bytes on the wire.  Measured with
    OHIF on one loaded 2-core machine (benchmarks/viewer.py --decoded-variant, browser
    and servers sharing the cores) the same-run gain for CT and XA was no larger than the
    difference between two kho servers answering the radiograph identically, so it stays
    off until measured where it matters (a slow workstation, a fast network).  Lossy
    frames stay as stored (the browser's decode of them is the one the modality's pixels
    were meant for)."""
    limit = int(archive.settings.viewer_decoded_frame_max_bytes)
    bits = int(record.bits_allocated or 0)
    if limit <= 0 or bits not in (8, 16) or stored_ts == EXPLICIT_VR_LITTLE_ENDIAN:
        return False
    if stored_ts not in transcode.LOSSLESS_SYNTAXES:
        return False
    size = int(record.rows_ or 0) * int(record.columns_ or 0) * int(record.samples_per_pixel or 1)
    return 0 < size * bits // 8 <= limit


def frame_producer(record: InstanceRecord) -> Callable[[str], bool]:
    """negotiate_frames' ``can_produce`` for one instance."""
    return lambda syntax: transcode.can_produce_frame(record, syntax)


def native_frame(archive: Archive, record: InstanceRecord, number: int) -> bytes:
    """One frame decoded to native little-endian bytes (1-bit: packed, as in Pixel Data)."""
    bits = int(record.bits_allocated or 8)
    # 1-bit frames need not start on a byte: decoded (and packed again from bit 0)
    if record.pixel_format == "raw" and bits != 1:
        data, _syntax = stored_frame(archive, record, number)
        return data
    arr = frame_array(archive, record, number)
    return native_bytes(arr, bits, record.planar_configuration == 1)


def frames_response(
    archive: Archive,
    record: InstanceRecord,
    numbers: list[int],
    accept: str | None,
    negotiated: tuple[str, str | None] | None = None,
) -> Response:
    if not has_pixels(record):
        raise NotFoundError(f"instance {record.sop_uid} has no pixel data")
    stored_ts = stored_syntax(record)
    syntax, single = negotiated or negotiate_frames(
        accept, stored_ts, len(numbers), frame_producer(record)
    )
    media = frame_media_type(syntax)
    parts: list[tuple[bytes, str]] = []
    for number in numbers:
        if syntax == EXPLICIT_VR_LITTLE_ENDIAN:
            data = native_frame(archive, record, number)
        elif syntax == stored_ts:
            data, _stored = stored_frame(archive, record, number)
        else:  # encoded now, losslessly (the negotiation checked that it can be)
            data = transcode.encode_frame(archive, record, number, syntax)
        parts.append((data, f"{media}; transfer-syntax={syntax}"))
    if single is not None:
        return Response(parts[0][0], media_type=f"{single}; transfer-syntax={syntax}")
    boundary = multipart.new_boundary()
    return Response(
        multipart.join_parts(boundary, parts),
        media_type=multipart.content_type(media, boundary),
    )


FrameList = Annotated[str, Path(description="frame numbers, 1-based, comma-separated")]


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/frames/{frames}",
    summary="Retrieve frames",
)
async def retrieve_frames(
    record: InstanceDep, frames: FrameList, request: Request, archive: ArchiveDep
) -> Response:
    return await retrieve_frames_response(archive, record, frames, request.headers.get("accept"))


async def retrieve_frames_response(
    archive: Archive, record: InstanceRecord, frames: str, accept: str | None
) -> Response:
    """Frames in the stored syntax (a ranged read or two: cheaper on the event loop than a
    thread hop) or decoded (in the thread pool: the decoders release the GIL)."""
    numbers = frame_list(frames)  # checked already (paths.py): parsed again, cheaply
    negotiated = None
    if has_pixels(record):
        stored_ts = stored_syntax(record)
        negotiated = negotiate_frames(
            accept,
            stored_ts,
            len(numbers),
            frame_producer(record),
            decoded_for_any(archive, record, stored_ts),
        )
        # a deflated dataset's frames and 1-bit frames are decoded, frames in another
        # compressed syntax encoded: in the thread pool
        decoded = negotiated[0] == EXPLICIT_VR_LITTLE_ENDIAN
        plain_raw = decoded and record.pixel_format == "raw" and record.bits_allocated != 1
        as_stored = negotiated[0] == stored_ts and not decoded
        inline = as_stored and record.pixel_format != "none"
        if len(numbers) <= 4 and (inline or plain_raw):
            return frames_response(archive, record, numbers, accept, negotiated)
    return await run_in_threadpool(frames_response, archive, record, numbers, accept, negotiated)


# --- bulk data --------------------------------------------------------------------------


def _bulk_value(archive: Archive, record: InstanceRecord, tag: int) -> bytes:
    data = archive.read_part10(record)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
    if tag not in ds:
        raise NotFoundError(f"instance {record.sop_uid} has no attribute ({tag:08X})")
    value = ds[tag].value
    if not isinstance(value, bytes):
        raise NotFoundError(f"attribute ({tag:08X}) is not bulk data")
    return value


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/bulkdata/{tag}",
    summary="Retrieve bulk data (BulkDataURI targets)",
)
def retrieve_bulkdata(
    record: InstanceDep, tag: str, request: Request, archive: ArchiveDep
) -> Response:
    tag = tag.upper()
    if len(tag) != 8 or any(c not in "0123456789ABCDEF" for c in tag):
        raise QueryError(f"bulk data path must be an 8-digit hex tag, not {tag!r}")
    accept = request.headers.get("accept")
    if tag in PIXEL_TAGS:
        numbers = list(range(1, frame_count(record) + 1))
        return frames_response(archive, record, numbers, accept)
    ranges = parse_accept(accept)
    if ranges and not any(
        r.matches(OCTET_STREAM) or r.inner in ("", OCTET_STREAM, "*/*") for r in ranges
    ):
        raise NotAcceptableError("bulk data is served as application/octet-stream")
    value = _bulk_value(archive, record, int(tag, 16))
    boundary = multipart.new_boundary()
    return Response(
        multipart.join_parts(boundary, [(value, OCTET_STREAM)]),
        media_type=multipart.content_type(OCTET_STREAM, boundary),
    )
