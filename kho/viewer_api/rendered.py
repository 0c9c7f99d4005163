"""Rendered resources (PS3.18 10.4.1.1.3 and 10.7): rendered studies, series, instances and
frames, thumbnails, tiles.

An instance's rendered resource is its first frame; a rendered study or series is
multipart/related with one such image per instance that has pixel data, in series then
instance number order, each part naming its instance's rendered URL (Content-Location).
Thumbnails of instances come from the JPEG made at ingest; series and study thumbnails
use their middle instance.  Tiles (level 0 = full resolution, level L = 1/2**L) are cut
from a cached display image per level (see kho.archive.read.rendering).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from kho.access.callers import Role
from kho.archive.archive import Archive
from kho.archive.catalog import InstanceRecord
from kho.archive.finish import images
from kho.archive.read import metadata, rendering
from kho.archive.read.pixels import frame_array, frame_count, has_pixels
from kho.codecs.render import RenderParams
from kho.errors import CodecError, NotFoundError
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
from kho.viewer_api.media import parse_accept, parse_media_type
from kho.viewer_api.security import requires
from kho.viewer_api.wado import series_records

router = APIRouter(tags=["WADO-RS rendered"], dependencies=[requires(Role.VIEWER)])
log = logging.getLogger(__name__)

#: frames larger than this (pixels a side) keep their decoded values in the render cache
LARGE_IMAGE = 1024

WindowParam = Annotated[str | None, Query(description="center,width[,LINEAR|LINEAR_EXACT|SIGMOID]")]
ViewportParam = Annotated[str | None, Query(description="vw,vh[,sx,sy,sw,sh]")]
QualityParam = Annotated[int, Query(ge=1, le=100, description="JPEG quality")]
AcceptParam = Annotated[str | None, Query(alias="accept", description="media type override")]


def choose_image_type(request: Request, accept_param: str | None) -> str:
    """image/jpeg (default) or image/png from the ``accept`` parameter or header; a
    ``multipart/related; type="image/..."`` range (dicomweb-client's bulk data requests)
    gets the same image as the one part of a multipart body (see :func:`_image`)."""
    ranges = parse_accept(accept_param or request.headers.get("accept"))
    if not ranges:
        return rendering.JPEG
    for r in ranges:
        inner = parse_media_type(r.inner or "*/*") if r.is_multipart else r
        prefix = "multipart:" if r.is_multipart else ""
        if inner.matches(rendering.JPEG):
            return prefix + rendering.JPEG
        if inner.matches(rendering.PNG):
            return prefix + rendering.PNG
    raise NotAcceptableError("rendered images are image/jpeg or image/png")


def params_of(archive: Archive, record: InstanceRecord) -> RenderParams:
    """From the instance's DICOM JSON; from its header when it has LUT tables."""
    document = json.loads(metadata.instance_document(archive, record))
    if not rendering.needs_header(document):
        return rendering.params_from_json(document)
    return rendering.params_from_dataset(metadata.stored_header(archive, record))


def _params_with(archive: Archive, record: InstanceRecord, window: str | None) -> RenderParams:
    return rendering.with_window(params_of(archive, record), rendering.parse_window(window))


def _image(img: np.ndarray, media_type: str, quality: int) -> Response:
    return _encoded(
        rendering.encode_image(img, media_type.removeprefix("multipart:"), quality), media_type
    )


def _encoded(data: bytes, media_type: str) -> Response:
    headers = {"Cache-Control": "private, max-age=3600"}
    if media_type.startswith("multipart:"):
        inner = media_type.removeprefix("multipart:")
        boundary = multipart.new_boundary()
        return Response(
            multipart.join_parts(boundary, [(data, inner)]),
            media_type=multipart.content_type(inner, boundary),
            headers=headers,
        )
    return Response(data, media_type=media_type, headers=headers)


def render_frame(
    archive: Archive,
    record: InstanceRecord,
    number: int,
    *,
    window: str | None,
    viewport: str | None,
    max_size: int | None = None,
    cache: rendering.RenderCache | None = None,
    from_stored_levels: bool = False,
) -> np.ndarray:
    if not has_pixels(record):
        raise NotFoundError(f"instance {record.sop_uid} has no pixel data")
    parsed_viewport = rendering.parse_viewport(viewport)
    if from_stored_levels and number == 1 and window is None and parsed_viewport is not None:
        # a small view from the stored thumbnail or tile pyramid, not the decoded frame
        small = rendering.stored_level_image(archive, record, parsed_viewport)
        if small is not None:
            return small
    params = _params_with(archive, record, window)
    large = max(record.rows_ or 0, record.columns_ or 0) > LARGE_IMAGE
    if cache is not None and large:
        # viewers pan over large images with viewport regions: decode the frame once
        key = values_key(archive, record, number)
        values = cache.get_or_make(key, lambda: frame_array(archive, record, number))
    else:
        values = frame_array(archive, record, number)
    return rendering.render(values, params, viewport=parsed_viewport, max_size=max_size)


def values_key(archive: Archive, record: InstanceRecord, number: int) -> tuple[object, ...]:
    """The render cache's key of a frame's decoded values.  The tenant is part of every
    key: two hospitals may hold the same UIDs, and one must not learn from a cache hit
    what the other holds."""
    return (archive.tenant, record.sop_uid, record.sha256, number, "values")


async def rendered_response(
    state: ViewerState,
    archive: Archive,
    request: Request,
    record: InstanceRecord,
    number: int,
    *,
    window: str | None,
    viewport: str | None,
    quality: int,
    accept: str | None,
) -> Response:
    """A rendered frame.  The encoded image is kept in the render cache under everything
    that shaped it, so the same view asked again (a viewer scrolling back, a second viewer)
    is answered from memory, on the event loop; otherwise it is made in the thread pool."""
    media_type = choose_image_type(request, accept)
    key = (
        "rendered",
        archive.tenant,
        record.sop_uid,
        record.sha256,
        number,
        window,
        viewport,
        quality,
        media_type,
    )
    cached = state.render_cache.get_encoded(key)
    if cached is not None:
        return _encoded(cached, media_type)

    def make() -> bytes:
        img = render_frame(
            archive,
            record,
            number,
            window=window,
            viewport=viewport,
            cache=state.render_cache,
            from_stored_levels=media_type.endswith(rendering.JPEG),
        )
        data = rendering.encode_image(img, media_type.removeprefix("multipart:"), quality)
        state.render_cache.put_encoded(key, data)
        return data

    return _encoded(await run_in_threadpool(make), media_type)


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/rendered",
    summary="Rendered instance (frame 1)",
)
async def rendered_instance(
    record: InstanceDep,
    request: Request,
    state: StateDep,
    archive: ArchiveDep,
    window: WindowParam = None,
    viewport: ViewportParam = None,
    quality: QualityParam = 90,
    accept: AcceptParam = None,
) -> Response:
    return await rendered_response(
        state,
        archive,
        request,
        record,
        1,
        window=window,
        viewport=viewport,
        quality=quality,
        accept=accept,
    )


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/frames/{frame}/rendered",
    summary="Rendered frame",
)
async def rendered_frame(
    record: InstanceDep,
    frame: int,
    request: Request,
    state: StateDep,
    archive: ArchiveDep,
    window: WindowParam = None,
    viewport: ViewportParam = None,
    quality: QualityParam = 90,
    accept: AcceptParam = None,
) -> Response:
    return await rendered_response(
        state,
        archive,
        request,
        record,
        frame,
        window=window,
        viewport=viewport,
        quality=quality,
        accept=accept,
    )


# --- rendered studies and series ---------------------------------------------------------


def rendered_collection(
    archive: Archive,
    records: list[InstanceRecord],
    request: Request,
    base: str,
    *,
    window: str | None,
    viewport: str | None,
    quality: int,
    accept: str | None,
) -> Response:
    """multipart/related: each instance with pixel data rendered as its /rendered resource
    is (frame 1), streamed one image at a time.

    The first image is made before the status line goes out, so a bad parameter or an
    unreadable store answers with its own status.  An instance that cannot be decoded
    (a syntax no installed decoder reads) is left out and logged rather than failing the
    images of every other instance; 406 when none can be rendered at all."""
    media_type = choose_image_type(request, accept).removeprefix("multipart:")
    renderable = [r for r in records if has_pixels(r)]
    if not renderable:
        raise NotAcceptableError("no instance here has pixel data to render as an image")

    def render_one(record: InstanceRecord) -> bytes:
        # made as the instance's /rendered makes it (the same image, byte for byte)
        img = render_frame(
            archive,
            record,
            1,
            window=window,
            viewport=viewport,
            from_stored_levels=media_type == rendering.JPEG,
        )
        return rendering.encode_image(img, media_type, quality)

    def part(record: InstanceRecord, image: bytes) -> bytes:
        location = {"Content-Location": f"{instance_url(base, record)}/rendered"}
        return multipart.part_head(boundary, media_type, location) + image

    boundary = multipart.new_boundary()
    first: bytes | None = None
    failure: CodecError | None = None
    rest = iter(renderable)
    for record in rest:
        try:
            first = part(record, render_one(record))
            break
        except CodecError as exc:
            log.warning("rendered resource: %s left out: %s", record.sop_uid, exc)
            failure = exc
    if first is None:
        assert failure is not None
        raise failure

    def body(head: bytes) -> Iterator[bytes]:
        yield head
        for record in rest:
            try:
                image = render_one(record)
            except CodecError as exc:
                log.warning("rendered resource: %s left out: %s", record.sop_uid, exc)
                continue
            yield multipart.CRLF + part(record, image)
        yield multipart.part_tail(boundary)

    return StreamingResponse(
        body(first),
        media_type=multipart.content_type(media_type, boundary),
        headers={"Cache-Control": "private, max-age=3600"},
    )


@router.get("/studies/{study}/rendered", summary="Rendered study (frame 1 of each instance)")
def rendered_study(
    study: str,
    request: Request,
    archive: ArchiveDep,
    base: BaseUrlDep,
    window: WindowParam = None,
    viewport: ViewportParam = None,
    quality: QualityParam = 90,
    accept: AcceptParam = None,
) -> Response:
    return rendered_series(study, None, request, archive, base, window, viewport, quality, accept)


@router.get(
    "/studies/{study}/series/{series}/rendered",
    summary="Rendered series (frame 1 of each instance)",
)
def rendered_series(
    study: str,
    series: str | None,
    request: Request,
    archive: ArchiveDep,
    base: BaseUrlDep,
    window: WindowParam = None,
    viewport: ViewportParam = None,
    quality: QualityParam = 90,
    accept: AcceptParam = None,
) -> Response:
    """The rendered instances of a series (of the whole study for ``series=None``)."""
    return rendered_collection(
        archive,
        series_records(archive, study, series),
        request,
        base,
        window=window,
        viewport=viewport,
        quality=quality,
        accept=accept,
    )


# --- thumbnails -------------------------------------------------------------------------


async def _thumbnail(
    archive: Archive,
    record: InstanceRecord,
    frame: int,
    request: Request,
    viewport: str | None,
    accept: str | None,
) -> Response:
    media_type = choose_image_type(request, accept)
    if frame == 1 and viewport is None and media_type.endswith(rendering.JPEG):
        # the JPEG made at ingest: one small read, done on the event loop
        stored = rendering.stored_thumbnail(archive, record)
        if stored is not None:
            return _encoded(stored, media_type)

    def make() -> Response:
        img = render_frame(
            archive,
            record,
            frame,
            window=None,
            viewport=viewport,
            max_size=rendering.THUMBNAIL_SIZE,
        )
        return _image(img, media_type, 85)

    return await run_in_threadpool(make)


def _middle(records: list[InstanceRecord]) -> InstanceRecord:
    with_pixels = [r for r in records if has_pixels(r)] or records
    return with_pixels[len(with_pixels) // 2]


@router.get("/studies/{study}/thumbnail", summary="Study thumbnail")
async def study_thumbnail(
    study: str,
    request: Request,
    archive: ArchiveDep,
    viewport: ViewportParam = None,
    accept: AcceptParam = None,
) -> Response:
    records = series_records(archive, study, None)
    first_series = records[0].series_uid
    record = _middle([r for r in records if r.series_uid == first_series])
    return await _thumbnail(archive, record, 1, request, viewport, accept)


@router.get("/studies/{study}/series/{series}/thumbnail", summary="Series thumbnail")
async def series_thumbnail(
    study: str,
    series: str,
    request: Request,
    archive: ArchiveDep,
    viewport: ViewportParam = None,
    accept: AcceptParam = None,
) -> Response:
    record = _middle(series_records(archive, study, series))
    return await _thumbnail(archive, record, 1, request, viewport, accept)


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/thumbnail",
    summary="Instance thumbnail",
)
async def instance_thumbnail(
    record: InstanceDep,
    request: Request,
    archive: ArchiveDep,
    viewport: ViewportParam = None,
    accept: AcceptParam = None,
) -> Response:
    return await _thumbnail(archive, record, 1, request, viewport, accept)


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/frames/{frame}/thumbnail",
    summary="Frame thumbnail",
)
async def frame_thumbnail(
    record: InstanceDep,
    frame: int,
    request: Request,
    archive: ArchiveDep,
    viewport: ViewportParam = None,
    accept: AcceptParam = None,
) -> Response:
    return await _thumbnail(archive, record, frame, request, viewport, accept)


# --- tiles ------------------------------------------------------------------------------


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/frames/{frame}/tiles/{level}/{x}/{y}",
    summary="A 256x256 tile of a frame",
    description="Level 0 is full resolution, level L is downsampled by 2**L, up to the "
    "level where the frame fits one tile; x is the tile column, y the tile row. "
    "Edge tiles are smaller than 256 pixels.",
)
async def tile(
    record: InstanceDep,
    frame: int,
    level: int,
    x: int,
    y: int,
    request: Request,
    state: StateDep,
    archive: ArchiveDep,
    window: WindowParam = None,
    quality: QualityParam = 90,
    accept: AcceptParam = None,
) -> Response:
    return await tile_response(
        state,
        archive,
        request,
        record,
        frame,
        level,
        x,
        y,
        window=window,
        quality=quality,
        accept=accept,
    )


async def tile_response(
    state: ViewerState,
    archive: Archive,
    request: Request,
    record: InstanceRecord,
    frame: int,
    level: int,
    x: int,
    y: int,
    *,
    window: str | None,
    quality: int,
    accept: str | None,
) -> Response:
    media_type = choose_image_type(request, accept)
    if not has_pixels(record) or not 1 <= frame <= frame_count(record):
        raise NotFoundError(f"instance {record.sop_uid} has no frame {frame}")
    rows, cols = int(record.rows_ or 0), int(record.columns_ or 0)
    levels = rendering.tile_levels(rows, cols)
    if not 0 <= level < levels:
        raise NotFoundError(f"no level {level}: levels 0..{levels - 1}")
    default_look = frame == 1 and window is None and quality == images.PYRAMID_QUALITY
    if default_look and media_type == rendering.JPEG:
        try:  # the pyramid the finisher stored: one ranged read
            stored = rendering.stored_tile(archive, record, level, x, y)
        except IndexError as exc:
            raise NotFoundError(str(exc)) from None
        if stored is not None:
            return _encoded(stored, media_type)
    params = _params_with(archive, record, window)
    key = values_key(archive, record, frame)
    values = state.render_cache.get(key)
    if values is None:  # decode once, off the event loop; neighbouring tiles reuse it
        values = await run_in_threadpool(
            state.render_cache.get_or_make, key, lambda: frame_array(archive, record, frame)
        )
    frame_values = values

    def make() -> bytes:
        try:
            piece = rendering.render_tile(frame_values, params, level, x, y)
        except IndexError as exc:
            raise NotFoundError(str(exc)) from None
        return rendering.encode_image(piece, media_type.removeprefix("multipart:"), quality)

    # the window kernel and the JPEG encoder release the GIL: in the thread pool, tiles
    # render on another core while the event loop serves the next requests (at 8 clients
    # on 2 cores: ~30% more tiles a second than inline, for ~0.3 ms more at 1 client)
    return _encoded(await run_in_threadpool(make), media_type)
