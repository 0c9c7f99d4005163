"""A dispatcher in front of FastAPI's router for the requests viewers make by the thousand.

A viewer scrolling a series asks for hundreds of frames, thumbnails and tiles, each a
ranged read of well under a millisecond.  FastAPI's routing and dependency solving cost
more than that per request (~0.5 ms of CPU), and on a busy server every request waits for
the CPU time of the ones before it.  This middleware matches those GET routes with one
regular expression each and calls the same functions the FastAPI endpoints call, so the
responses are the same; anything it is not sure of (an unexpected query parameter value,
a root path, another method) goes to FastAPI, which stays the reference (and the OpenAPI
document).  ``tests/viewer_api/test_fastpath.py`` checks that FastAPI's router picks the
same route for every path matched here.

Access control holds here as in the routers: the caller the access middleware (outside
this one) authenticated must hold the viewer role in the request's tenant, checked by the
routers' own function (security.authorize_scope) before any lookup, and every handler reads
that tenant's archive; a share or launch caller only for a study of its own (every route
here names one).  Paths under ``/tenants/<t>`` arrive with the prefix in the root
path; the routes match the path without it, as FastAPI's router does.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from kho.access.callers import Role
from kho.archive.archive import Archive
from kho.errors import KhoError
from kho.viewer_api import rendered, wado
from kho.viewer_api.deps import ViewerState, base_url, instance_record
from kho.viewer_api.errors import error_response
from kho.viewer_api.metrics import ROUTE_KEY
from kho.viewer_api.paths import check_path_params
from kho.viewer_api.security import authorize_scope, require_study, route_path

Handler = Callable[[ViewerState, Archive, Request, tuple[str, ...]], Awaitable[Response | None]]
#: the role of every route here (the WADO-RS and rendered routers declare the same)
ROLE = Role.VIEWER

_SEGMENT = "([^/]+)"
_NUMBER = "([0-9]{1,9})"
_INSTANCE = f"/studies/{_SEGMENT}/series/{_SEGMENT}/instances/{_SEGMENT}"
_QUALITY = re.compile("[0-9]{1,3}")


@dataclass(frozen=True, slots=True)
class FastRoute:
    regex: re.Pattern[str]
    template: str  # the FastAPI route's path, prefix included
    handler: Handler
    names: tuple[str, ...]  # the template's path parameters, in the regex's group order


async def _frames(
    _state: ViewerState, archive: Archive, request: Request, groups: tuple[str, ...]
) -> Response:
    study, series, sop, frames = groups
    record = instance_record(archive, study, series, sop)
    return await wado.retrieve_frames_response(
        archive, record, frames, request.headers.get("accept")
    )


def _query(request: Request, names: tuple[str, ...]) -> dict[str, str | None] | None:
    """The named query parameters (None when absent); None when one is repeated."""
    params = request.query_params
    out: dict[str, str | None] = {}
    for name in names:
        values = params.getlist(name)
        if len(values) > 1:
            return None
        out[name] = values[0] if values else None
    return out


async def _thumbnail(
    _state: ViewerState, archive: Archive, request: Request, groups: tuple[str, ...]
) -> Response | None:
    study, series, sop, *frame = groups
    query = _query(request, ("viewport", "accept"))
    if query is None:
        return None
    record = instance_record(archive, study, series, sop)
    return await rendered._thumbnail(
        archive,
        record,
        int(frame[0]) if frame else 1,
        request,
        query["viewport"],
        query["accept"],
    )


def _quality(text: str | None) -> int | None:
    """The JPEG quality asked (90 when not), None when out of 1..100 or not a number."""
    if text is None:
        return 90
    if _QUALITY.fullmatch(text) and 1 <= int(text) <= 100:
        return int(text)
    return None


async def _tile(
    state: ViewerState, archive: Archive, request: Request, groups: tuple[str, ...]
) -> Response | None:
    study, series, sop, frame, level, x, y = groups
    query = _query(request, ("window", "quality", "accept"))
    if query is None:
        return None
    quality = _quality(query["quality"])
    if quality is None:
        return None  # FastAPI's validation answers
    record = instance_record(archive, study, series, sop)
    return await rendered.tile_response(
        state,
        archive,
        request,
        record,
        int(frame),
        int(level),
        int(x),
        int(y),
        window=query["window"],
        quality=quality,
        accept=query["accept"],
    )


async def _rendered(
    state: ViewerState, archive: Archive, request: Request, groups: tuple[str, ...]
) -> Response | None:
    study, series, sop, *frame = groups
    query = _query(request, ("window", "viewport", "quality", "accept"))
    if query is None:
        return None
    quality = _quality(query["quality"])
    if quality is None:
        return None  # FastAPI's validation answers
    record = instance_record(archive, study, series, sop)
    return await rendered.rendered_response(
        state,
        archive,
        request,
        record,
        int(frame[0]) if frame else 1,
        window=query["window"],
        viewport=query["viewport"],
        quality=quality,
        accept=query["accept"],
    )


async def _series_metadata(
    state: ViewerState, archive: Archive, request: Request, groups: tuple[str, ...]
) -> Response:
    study, series = groups
    return await wado.series_metadata_response(
        state, archive, request, await base_url(request), study, series
    )


def _route(prefix: str, path: str, pattern: str, handler: Handler) -> FastRoute:
    names = tuple(re.findall(r"{(\w+)}", path))
    return FastRoute(re.compile(re.escape(prefix) + pattern), prefix + path, handler, names)


def fast_routes(prefix: str) -> list[FastRoute]:
    instance = "/studies/{study}/series/{series}/instances/{instance}"
    return [
        _route(prefix, f"{instance}/frames/{{frames}}", f"{_INSTANCE}/frames/{_SEGMENT}", _frames),
        _route(prefix, f"{instance}/thumbnail", f"{_INSTANCE}/thumbnail", _thumbnail),
        _route(
            prefix,
            f"{instance}/frames/{{frame}}/thumbnail",
            f"{_INSTANCE}/frames/{_NUMBER}/thumbnail",
            _thumbnail,
        ),
        _route(
            prefix,
            f"{instance}/frames/{{frame}}/tiles/{{level}}/{{x}}/{{y}}",
            f"{_INSTANCE}/frames/{_NUMBER}/tiles/{_NUMBER}/{_NUMBER}/{_NUMBER}",
            _tile,
        ),
        _route(prefix, f"{instance}/rendered", f"{_INSTANCE}/rendered", _rendered),
        _route(
            prefix,
            f"{instance}/frames/{{frame}}/rendered",
            f"{_INSTANCE}/frames/{_NUMBER}/rendered",
            _rendered,
        ),
        _route(
            prefix,
            "/studies/{study}/series/{series}/metadata",
            f"/studies/{_SEGMENT}/series/{_SEGMENT}/metadata",
            _series_metadata,
        ),
    ]


class FastPath:
    """ASGI middleware: the routes of :func:`fast_routes` without FastAPI's machinery;
    errors become the same responses as the application's exception handlers give."""

    def __init__(self, app: ASGIApp, state: ViewerState, prefix: str) -> None:
        self.app = app
        self.state = state
        self.prefix = prefix
        self.routes = fast_routes(prefix)

    def match(self, scope: Scope) -> tuple[FastRoute, tuple[str, ...]] | None:
        if scope["type"] != "http" or scope["method"] != "GET":
            return None
        path = route_path(scope)  # as the router sees it: without /tenants/<t>
        if not path.startswith(self.prefix):
            return None
        for route in self.routes:
            m = route.regex.fullmatch(path)
            if m is not None:
                return route, m.groups()
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = self.match(scope)
        if found is not None:
            route, groups = found
            request = Request(scope, receive)
            response: Response | None
            try:
                # the routers' own dependencies, in their order, before any lookup: the
                # path check (input syntax only), then the role in the tenant
                params = dict(zip(route.names, groups, strict=True))
                check_path_params(params)
                # as the router does: the study the path names is what a share or launch
                # caller is checked against (every route here names one)
                scope["path_params"] = params
                authorized = authorize_scope(self.state, scope, ROLE)
                require_study(authorized.caller, params["study"])
                response = await route.handler(self.state, authorized.archive, request, groups)
            except KhoError as exc:
                response = error_response(exc)
            if response is not None:
                scope[ROUTE_KEY] = route.template
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
