"""Response helpers: JSON with gzip where it helps, multipart bodies."""

from __future__ import annotations

import gzip

from fastapi import Request, Response

from kho.viewer_api.media import DICOM_JSON

#: below this, gzip saves less than it costs
GZIP_MIN_BYTES = 4096


def wants_gzip(request: Request) -> bool:
    return "gzip" in request.headers.get("accept-encoding", "").lower()


def gzip_body(body: bytes) -> bytes:
    # level 1: JSON compresses ~8x even so, and it stays fast for large series
    return gzip.compress(body, compresslevel=1, mtime=0)


def json_response(
    request: Request,
    body: bytes,
    *,
    gzipped: bytes | None = None,
    headers: dict[str, str] | None = None,
    status_code: int = 200,
) -> Response:
    """application/dicom+json; gzip only for large bodies of clients that accept it
    (pixel data is never gzipped: it is already compressed or would cost too much)."""
    out_headers = dict(headers or {})
    out_headers["Vary"] = "Accept-Encoding"
    if wants_gzip(request) and len(body) >= GZIP_MIN_BYTES:
        out_headers["Content-Encoding"] = "gzip"
        body = gzipped if gzipped is not None else gzip_body(body)
    return Response(body, status_code=status_code, media_type=DICOM_JSON, headers=out_headers)
