"""The start page at ``/``: find patients and studies, see their thumbnails, open the viewer.

Plain HTML, one small script and one style sheet (``static/start/``), no build step.  The
page itself holds no patient data and is public (kho.viewer_api.security.is_public); the
script asks ``/dicom-web`` (QIDO-RS, ``/thumbnail``) with the user's credential:

- authentication off (loopback): none needed;
- a token in the URL fragment (``/#token=...``; kept in the tab's sessionStorage, taken off
  the address at once, never sent to a server in a URL), sent as ``Authorization: Bearer``;
  else the access token of the viewer's OpenID Connect sign-in (OHIF keeps it in
  sessionStorage), so a user signed in through ``/viewer/`` can search here too;
- an EMR launch's session cookie, which the browser sends by itself.

A 401 shows how to sign in; nothing of the archive shows without a credential that holds.
Searches: patient name (wildcards; case-insensitive), patient ID, citizen ID (Patient ID or
Other Patient IDs), accession number, study date range, modality.  Results show each
study's thumbnail; a click shows its series' thumbnails; "Open" opens the study in OHIF.

The page is served with a strict Content-Security-Policy (its own script only, images from
itself and blob: URLs), so patient data that reached it could not run as script even if it
were put in as HTML (it never is: text only).
"""

from __future__ import annotations

import html
from functools import cache
from importlib import resources

from fastapi import APIRouter, Depends, Request, Response

from kho.viewer_api.security import public

router = APIRouter(tags=["start page"], dependencies=[Depends(public)], include_in_schema=False)

_ASSETS = {
    "start.js": "text/javascript; charset=utf-8",
    "start.css": "text/css; charset=utf-8",
}
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'self'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


@cache
def _asset(name: str) -> bytes:
    return resources.files("kho.viewer_api").joinpath("static", "start", name).read_bytes()


def _prefix(request: Request) -> str:
    return str(request.scope.get("root_path", "")).rstrip("/")


@router.get("/", summary="The start page: find a study")
async def start_page(request: Request) -> Response:
    page = _asset("index.html").decode().replace("%PREFIX%", html.escape(_prefix(request)))
    return Response(page, media_type="text/html; charset=utf-8", headers=_SECURITY_HEADERS)


@router.get("/favicon.ico", summary="The site's icon (the viewer's)")
async def favicon(request: Request) -> Response:
    build = request.app.state.viewer_files.build()
    icon = build.dist / "assets" / "favicon.ico" if build is not None else None
    if icon is None or not icon.is_file():
        return Response(status_code=404)
    headers = {"Cache-Control": "public, max-age=86400"}
    return Response(icon.read_bytes(), media_type="image/x-icon", headers=headers)


@router.get("/start/{name}", summary="The start page's script and style sheet")
async def start_asset(name: str) -> Response:
    media_type = _ASSETS.get(name)
    if media_type is None:
        return Response("no such file", status_code=404, media_type="text/plain")
    return Response(_asset(name), media_type=media_type, headers=_SECURITY_HEADERS)
