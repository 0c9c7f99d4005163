"""WADO-RS (PS3.18 10.4): instances, metadata, frames and bulk data.

- Instances go out as received (``transfer-syntax=*``, the stored syntax, or none named);
  another syntax is refused with 406 (no transcoding).
- Metadata is the DICOM JSON made at ingest (kho.archive.dicomjson), one read per
  instance; a series' concatenation is cached (and gzipped once) until the series changes.
- Frames go out in the stored syntax when the client accepts it (``transfer-syntax=*``,
  that syntax, or its media type), else decoded to native little endian
  (``application/octet-stream``).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from typing import Annotated

import numpy as np
import pydicom
from fastapi import APIRouter, Path, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from kho.archive import dicomjson, query
from kho.archive.archive import Archive
from kho.archive.catalog import InstanceRecord
from kho.archive.pixels import JPEG_LS_LOSSLESS, frame_array, frame_count, stored_frame
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
    parse_accept,
)
from kho.viewer_api.paths import frame_list
from kho.viewer_api.responses import gzip_body, json_response

router = APIRouter(tags=["WADO-RS"])

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
    if record.pixel_format == "encapsulated":
        return record.transfer_syntax_uid
    if record.pixel_format == "jpeg-ls":
        return JPEG_LS_LOSSLESS
    return EXPLICIT_VR_LITTLE_ENDIAN


# --- retrieve ---------------------------------------------------------------------------


def _negotiate_instances(request: Request, records: list[InstanceRecord]) -> bool:
    """True for multipart (always, except a single-part application/dicom of one
    instance); 406 when the client names only transfer syntaxes other than the stored."""
    ranges = parse_accept(request.headers.get("accept"))
    if not ranges:
        return True
    stored = {r.transfer_syntax_uid for r in records}
    for r in ranges:
        if r.media == "*/*" or (r.is_multipart and r.inner in ("", DICOM, "*/*")):
            multi = True
        elif r.media == DICOM and len(records) == 1:
            multi = False
        else:
            continue
        syntax = r.transfer_syntax
        if syntax in (None, "*") or stored == {syntax}:
            return multi
    raise NotAcceptableError(
        "instances are served in their stored transfer syntax "
        f"({', '.join(sorted(stored))}) with transfer-syntax=* or that syntax; "
        "transcoding is not offered"
    )


def _retrieve(archive: Archive, request: Request, records: list[InstanceRecord]) -> Response:
    multi = _negotiate_instances(request, records)
    if not multi:
        return Response(archive.read_part10(records[0]), media_type=DICOM)
    boundary = multipart.new_boundary()
    # read the first instance before the status line goes out, so an unreachable store
    # answers 503; a failure after that can only cut the stream short
    first = archive.read_part10(records[0])

    def parts() -> Iterator[tuple[bytes, str]]:
        for i, record in enumerate(records):  # one instance in memory at a time
            yield (
                first if i == 0 else archive.read_part10(record),
                f"{DICOM}; transfer-syntax={record.transfer_syntax_uid}",
            )

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
        dicomjson.with_absolute_uris(dicomjson.instance_document(archive, r), instance_url(base, r))
        for r in records
    ]
    return b"[" + b",".join(docs) + b"]"


def _cached_series(
    state: ViewerState, base: str, series: str, records: list[InstanceRecord]
) -> tuple[bytes, bytes | None] | None:
    cached = state.metadata_cache.get((series, base))
    if cached is not None and cached[0] == dicomjson.documents_key(records):
        return cached[1], cached[2]
    return None


def _series_metadata(
    state: ViewerState,
    base: str,
    study: str,
    series: str,
    records: list[InstanceRecord] | None = None,
) -> tuple[bytes, bytes | None]:
    """The series' documents joined (one read per instance), cached per series and base
    URL until an instance is added, removed or replaced."""
    if records is None:
        records = series_records(state.archive, study, series)
    cached = _cached_series(state, base, series, records)
    if cached is not None:
        return cached
    key = dicomjson.documents_key(records)
    cache_key = (series, base)
    body = _documents(state.archive, base, records)
    gzipped = gzip_body(body)
    if len(state.metadata_cache) > 256:  # bounded: forget everything, refill on demand
        state.metadata_cache.clear()
    state.metadata_cache[cache_key] = (key, body, gzipped)
    return body, gzipped


@router.get("/studies/{study}/metadata", summary="Study metadata (DICOM JSON)")
def study_metadata(study: str, request: Request, state: StateDep, base: BaseUrlDep) -> Response:
    _check_json_accept(request)
    records = series_records(state.archive, study, None)
    series_uids = list(dict.fromkeys(r.series_uid for r in records))
    bodies = [_series_metadata(state, base, study, s)[0] for s in series_uids]
    body = b"[" + b",".join(b[1:-1] for b in bodies if len(b) > 2) + b"]"
    return json_response(request, body)


@router.get("/studies/{study}/series/{series}/metadata", summary="Series metadata (DICOM JSON)")
async def series_metadata(
    study: str, series: str, request: Request, state: StateDep, base: BaseUrlDep
) -> Response:
    return await series_metadata_response(state, request, base, study, series)


async def series_metadata_response(
    state: ViewerState, request: Request, base: str, study: str, series: str
) -> Response:
    """The series' metadata: from the cache while the series' version is unchanged."""
    _check_json_accept(request)
    cached = None
    version = dicomjson.series_version(state.archive, study, series)
    if version is not None:
        found = state.metadata_cache.get((series, base))
        if found is not None and found[0] == version:
            cached = found[1], found[2]
    if cached is None:
        cached = await run_in_threadpool(_series_metadata, state, base, study, series)
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


def negotiate_frames(accept: str | None, stored_ts: str, frames: int) -> tuple[str, str | None]:
    """("stored" | "native", single-part media type or None for multipart/related)."""
    ranges = parse_accept(accept)
    stored_media = frame_media_type(stored_ts)
    for r in ranges:
        if r.media == "*/*":  # anything: the default below, unless a later range is named
            continue
        if r.is_multipart:
            single = None
        elif frames == 1:
            single = r.media
        else:
            continue
        inner = r.inner or "*/*"
        syntax = r.transfer_syntax
        if inner in ("*/*", "image/*"):
            return "stored", None if single is None else stored_media
        if syntax == "*" and inner in (OCTET_STREAM, stored_media):
            return "stored", None if single is None else stored_media
        if syntax == stored_ts or (syntax is None and inner == stored_media != OCTET_STREAM):
            return "stored", single
        if inner == OCTET_STREAM and syntax in (None, EXPLICIT_VR_LITTLE_ENDIAN):
            return "native", single
    if not ranges or any(r.media == "*/*" for r in ranges):
        # PS3.18 8.7.3.3, Table 8.7.3-4: the default for bulk data (and frames) is
        # uncompressed little endian application/octet-stream, multipart
        return "native", None
    raise NotAcceptableError(
        f"frames are stored as {stored_ts} ({stored_media}); ask for transfer-syntax=*, "
        f"that syntax, or application/octet-stream (decoded)"
    )


def native_frame(archive: Archive, record: InstanceRecord, number: int) -> bytes:
    """One frame decoded to native little-endian bytes."""
    if record.pixel_format == "raw":
        data, _syntax = stored_frame(archive, record, number)
        return data
    arr = frame_array(archive, record, number)
    little = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
    return np.ascontiguousarray(little).tobytes()


def frames_response(
    archive: Archive,
    record: InstanceRecord,
    numbers: list[int],
    accept: str | None,
    negotiated: tuple[str, str | None] | None = None,
) -> Response:
    if record.pixel_format == "none":
        raise NotFoundError(f"instance {record.sop_uid} has no pixel data")
    stored_ts = stored_syntax(record)
    mode, single = negotiated or negotiate_frames(accept, stored_ts, len(numbers))
    parts: list[tuple[bytes, str]] = []
    for number in numbers:
        if mode == "stored":
            data, syntax = stored_frame(archive, record, number)
        else:
            data, syntax = native_frame(archive, record, number), EXPLICIT_VR_LITTLE_ENDIAN
        parts.append((data, f"{frame_media_type(syntax)}; transfer-syntax={syntax}"))
    if single is not None:
        syntax = stored_ts if mode == "stored" else EXPLICIT_VR_LITTLE_ENDIAN
        return Response(parts[0][0], media_type=f"{single}; transfer-syntax={syntax}")
    boundary = multipart.new_boundary()
    inner = frame_media_type(stored_ts) if mode == "stored" else OCTET_STREAM
    return Response(
        multipart.join_parts(boundary, parts),
        media_type=multipart.content_type(inner, boundary),
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
    if record.pixel_format != "none":
        negotiated = negotiate_frames(accept, stored_syntax(record), len(numbers))
        if len(numbers) <= 4 and (negotiated[0] == "stored" or record.pixel_format == "raw"):
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
