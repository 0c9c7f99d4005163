"""Path parameters of every DICOMweb route, checked in one place.

A UID in a path selects what a request reads; an empty, blank or wildcard one would reach
the matching engine as universal matching ("everything").  So every ``{study}``,
``{series}`` and ``{instance}`` must be a UID as ingest accepts it
(:func:`kho.archive.dataset.attributes.check_uid`: PS3.5 9.1, plus the letters, '-' and '_' that
real writers use), with no empty component; frame numbers are positive integers.  Anything
else is 400 with a message naming the parameter.

:func:`check_path_params` is the one check: the routers run it as a dependency
(:func:`valid_path`, installed on every router in app.py), the fast path calls it with the
groups it matched, and :class:`PathGuard` answers the paths that can reach no route
because a segment was an encoded '/' or a dot segment ('..' is never a UID).
"""

from __future__ import annotations

from collections.abc import Mapping

from fastapi import Request
from fastapi.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from kho.archive.dataset.attributes import check_uid
from kho.errors import DatasetMismatchError
from kho.viewer_api.errors import BadRequestError
from kho.viewer_api.security import route_path

#: path parameter -> what it names (in messages)
UID_PARAMS = {
    "study": "Study Instance UID",
    "series": "Series Instance UID",
    "instance": "SOP Instance UID",
}
#: frame numbers: 1-based; more than 9 digits is no frame any instance has
FRAME_PARAMS = frozenset({"frame"})
FRAME_LIST_PARAMS = frozenset({"frames"})
#: tile coordinates: 0-based
INDEX_PARAMS = frozenset({"level", "x", "y"})
_MAX_DIGITS = 9


def checked_uid(value: str, name: str) -> str:
    """``value`` if it is a UID that ingest would have accepted, else BadRequestError."""
    try:
        check_uid(value, name)
    except DatasetMismatchError as exc:
        raise BadRequestError(f"{exc} (blank, wildcard or malformed UIDs are refused)") from None
    return value


def _number(value: str, name: str, minimum: int) -> int:
    if not (value.isascii() and value.isdigit()) or len(value) > _MAX_DIGITS:
        raise BadRequestError(
            f"{name} must be an integer of at most {_MAX_DIGITS} digits, not {value!r}"
        )
    number = int(value)
    if number < minimum:
        raise BadRequestError(f"{name} must be at least {minimum}, not {number}")
    return number


def frame_number(value: str) -> int:
    """A frame number (1-based) from a path, else BadRequestError."""
    return _number(value, "frame number", 1)


def frame_list(value: str) -> list[int]:
    """A frame list (``1,3,5``: PS3.18 10.4.1.1.4) from a path, else BadRequestError."""
    return [frame_number(piece) for piece in value.split(",")]


def check_path_params(params: Mapping[str, str]) -> None:
    """Every known path parameter of a DICOMweb route checked (BadRequestError: 400)."""
    for key, value in params.items():
        name = UID_PARAMS.get(key)
        if name is not None:
            checked_uid(value, name)
        elif key in FRAME_PARAMS:
            frame_number(value)
        elif key in FRAME_LIST_PARAMS:
            frame_list(value)
        elif key in INDEX_PARAMS:
            _number(value, f"tile {key}", 0)


async def valid_path(request: Request) -> None:
    """The routers' dependency: runs before the route's own (the instance lookup)."""
    check_path_params(request.path_params)


class PathGuard:
    """ASGI middleware: 400 for a DICOMweb path holding an encoded '/' (``%2F``) or a dot
    segment.  Neither can be part of a UID, and either would make the router match another
    route or none (404), hiding that the request named no valid UID."""

    def __init__(self, app: ASGIApp, prefix: str) -> None:
        self.app = app
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            problem = self.problem(scope)
            if problem is not None:
                await PlainTextResponse(problem, status_code=400)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def problem(self, scope: Scope) -> str | None:
        path = route_path(scope)  # without a /tenants/<t> prefix (kho.viewer_api.security)
        if not path.startswith(self.prefix):
            return None
        raw: bytes = scope.get("raw_path") or b""
        # the path only (Starlette's test client leaves the query string on raw_path)
        if b"%2f" in raw.partition(b"?")[0].lower():
            return "a path segment holds an encoded '/': not a DICOM UID"
        if "/." in path:
            for segment in path.split("/"):
                if segment in (".", ".."):
                    return f"path segment {segment!r} is not a DICOM UID"
        return None
