"""Every error of the HTTP layer becomes a status here, in one place.

kho.errors (raised by the archive) and the few HTTP-only conditions below map to
PS3.18 statuses with a plain-text message saying what was wrong; 401 and 403 (access) are
JSON, 401 with the ``WWW-Authenticate: Bearer`` challenge.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse
from starlette.responses import Response

from kho.errors import (
    AccessDeniedError,
    AuthenticationError,
    CatalogError,
    CodecError,
    DatasetMismatchError,
    DuplicateInstanceError,
    IdentityConflictError,
    IdentityProviderUnavailableError,
    InvalidDicomError,
    InvalidKeyError,
    KhoError,
    NotFoundError,
    ObjectNotFoundError,
    QueryError,
    StorageUnavailableError,
)

log = logging.getLogger(__name__)


class HttpError(KhoError):
    """An HTTP-level condition (media types, sizes); ``status`` is the response status."""

    status = 400


class NotAcceptableError(HttpError):
    """Nothing the client accepts can be produced (406)."""

    status = 406


class UnsupportedMediaTypeError(HttpError):
    """The request body's media type is not one this resource takes (415)."""

    status = 415


class PayloadTooLargeError(HttpError):
    """The request body exceeds the configured maximum (413)."""

    status = 413


class UnauthorizedError(HttpError):
    """A request that needs credentials it does not carry, or carries wrong ones (401)."""

    status = 401


class BadRequestError(HttpError):
    """A malformed request that is not a query problem (bad multipart body, bad path)."""

    status = 400


#: kho.errors classes -> HTTP status, most specific first
STATUS_BY_ERROR: tuple[tuple[type[Exception], int], ...] = (
    (HttpError, 0),  # the instance's own status
    (AuthenticationError, 401),  # JSON, with WWW-Authenticate (security.py)
    (AccessDeniedError, 403),
    (ObjectNotFoundError, 404),
    (NotFoundError, 404),
    (InvalidKeyError, 400),
    (QueryError, 400),
    (IdentityConflictError, 409),  # before its base class: a conflict, not bad input
    (DatasetMismatchError, 400),
    (InvalidDicomError, 400),
    (DuplicateInstanceError, 409),
    (StorageUnavailableError, 503),
    (CatalogError, 503),
    (CodecError, 406),  # a frame the server cannot decode into what was asked for
)


def status_for(exc: Exception) -> int:
    for cls, status in STATUS_BY_ERROR:
        if isinstance(exc, cls):
            return exc.status if isinstance(exc, HttpError) else status
    return 500


def error_response(exc: Exception) -> Response:
    """The response for an archive or HTTP-level error (the handler of both routers)."""
    if isinstance(exc, (AuthenticationError, AccessDeniedError)):
        return access_error_response(exc)
    status = status_for(exc)
    if status >= 500:
        log.error("request failed: %s: %s", type(exc).__name__, exc)
    return PlainTextResponse(str(exc) or type(exc).__name__, status_code=status)


def _json_error(status: int, error: str, message: str, headers: dict[str, str]) -> Response:
    body = json.dumps({"error": error, "message": message}, ensure_ascii=False).encode()
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def access_error_response(exc: AuthenticationError | AccessDeniedError) -> Response:
    """401 (with the challenge RFC 6750 asks for) or 403, as JSON.  The message says what
    was wrong with the credential or the grant; it never names patient data (the errors
    are raised before anything is looked up)."""
    if isinstance(exc, IdentityProviderUnavailableError):  # the token may be fine
        return _json_error(503, "unavailable", str(exc), {"Retry-After": "5"})
    if isinstance(exc, AuthenticationError):
        return _json_error(
            401, "unauthorized", str(exc), {"WWW-Authenticate": 'Bearer realm="kho"'}
        )
    return _json_error(403, "forbidden", str(exc), {})


def install_error_handlers(app: FastAPI) -> None:
    async def on_kho_error(_request: Request, exc: Exception) -> Response:
        return error_response(exc)

    async def on_validation(_request: Request, exc: Exception) -> PlainTextResponse:
        errors: list[dict[str, Any]] = getattr(exc, "errors", lambda: [])()
        text = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in errors
        )
        return PlainTextResponse(text or "bad request", status_code=400)

    app.add_exception_handler(KhoError, on_kho_error)
    app.add_exception_handler(RequestValidationError, on_validation)
