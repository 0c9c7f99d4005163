"""Sharing a study with a patient, and launch tokens for an EMR: routes and the phone page.

API (the viewer role in the study's hospital, as every read route):

- ``POST /api/shares`` ``{"study": UID, "tenant"?, "expires"?: "7d", "pin"?: "1234"}``
  (or ``/tenants/<t>/api/shares``: the hospital in the path, as for DICOMweb) makes a share
  link: 201 with its URL (``/s/<token>``, shown this once), QR code URLs,
  its id and expiry.  ``DELETE /api/shares/{id}`` revokes it (its maker, or an admin of
  its hospital).
- ``POST /api/launch`` ``{"studies": [...]}`` or ``{"patient_id", "issuer"?}`` or
  ``{"accession"}``: a launch token for an EMR's back end (5 minutes to be opened, once);
  the viewer's launch endpoint opens it with :func:`open_session` and
  :func:`set_session_cookies`.

The patient's page, under ``/s/`` (its token in its path is its credential: the access
middleware lets the prefix through, and these routes check the token, PIN and all):

- ``GET /s/<token>``: the study's images on a phone (rendered JPEGs, window presets for
  CT, swipe or slide through instances and series), or the PIN form, or a page saying
  plainly that the link expired or was withdrawn (410), is locked (403) or unknown (404);
- ``POST /s/<token>``: the PIN form's answer (a wrong PIN is 403 with the attempts left);
- ``GET /s/<token>/qr.svg`` and ``qr.png``: the link as a QR code, for the results sheet;
- ``GET /s/static/<file>``: the page's script and style sheet (no patient data).

Opening the page starts a browser session (kho.access.links): an HttpOnly, SameSite=Strict
cookie (Secure over HTTPS), path-scoped to ``/dicom-web/`` (where the page's image reads go)
and ``/s/`` (so a reload within the session skips the PIN).  The images come from the
ordinary ``/rendered`` and ``/thumbnail`` routes, where the session's caller sees its study
and nothing else (kho.viewer_api.security).  Every opening is recorded (Instances Accessed),
every wrong PIN too (Security Alert), as is every link made or revoked.
"""

from __future__ import annotations

import hashlib
import html
import io
import json
import time
from collections.abc import Sequence
from importlib import resources
from typing import Annotated, Any

import segno
from fastapi import APIRouter, Body, Depends, FastAPI, Request, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from kho.access.callers import Caller, Role
from kho.access.links import (
    LinkInputError,
    LinkKind,
    LinkRefusedError,
    LinkState,
    NewToken,
    Session,
    ShareLinks,
    find_studies,
    present_studies,
)
from kho.archive.archive import Archive
from kho.archive.query import engine as query
from kho.audit.messages import AlertReason
from kho.errors import AccessDeniedError, NotFoundError
from kho.viewer_api.deps import AuthorizedDep, ViewerState
from kho.viewer_api.errors import BadRequestError
from kho.viewer_api.metrics import ROUTE_KEY
from kho.viewer_api.security import (
    DICOMWEB_PREFIX,
    SESSION_COOKIE,
    SHARE_PAGE_PREFIX,
    Authorized,
    own_credential,
    requires,
)

#: the page's size for rendered images: a phone's screen at 2-3x, aspect kept; one size
#: for every image, so the render cache and the browser's cache serve a second look
VIEWPORT = "1024,1024"
#: window presets (center, width in the modality's units: HU for CT)
CT_PRESETS = (
    ("Soft tissue", "40,400"),
    ("Lung", "-600,1500"),
    ("Bone", "400,1800"),
    ("Brain", "40,80"),
)
_STATIC = ("share.js", "share.css")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_STATIC_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
#: a token in a path is at most this long (kho_session_ + 12 + 1 + 43)
_TOKEN_MAX = 80

# --- routers ------------------------------------------------------------------------------

api = APIRouter(tags=["sharing"], dependencies=[requires(Role.VIEWER)])
#: the patient's page: its own credential (the token in its path), so no role
pages = APIRouter(
    prefix=SHARE_PAGE_PREFIX.rstrip("/"),
    tags=["share page"],
    dependencies=[Depends(own_credential)],
    include_in_schema=False,
)


def install(app: FastAPI) -> None:
    """Add the sharing routes to ``app`` (once; create_app calls it before check_routes)."""
    if getattr(app.state, "share_routes", False):
        return
    app.include_router(api)
    app.include_router(pages)
    app.state.share_routes = True


def _state(request: Request) -> ViewerState:
    state: ViewerState = request.app.state.viewer
    return state


def _links(request: Request) -> ShareLinks:
    return _state(request).access.links


def _address(request: Request) -> str:
    return request.client.host if request.client else ""


def public_base(request: Request) -> str:
    """The origin and root path the request reached us at (a proxy's public address when
    kho is told to trust its forwarded headers)."""
    return str(request.base_url).rstrip("/")


def page_url(request: Request, token: str) -> str:
    return f"{public_base(request)}{SHARE_PAGE_PREFIX}{token}"


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


# --- sessions (the viewer's launch endpoint uses these too) ---------------------------------


def set_session_cookies(
    response: Response, request: Request, session: Session, *, page: bool = False
) -> None:
    """The session cookie where the browser needs it: ``/dicom-web/`` (image and metadata
    reads) and, for the share page, ``/s/`` (a reload skips the PIN).  HttpOnly (no script
    reads it), SameSite=Strict (no other site's page sends it), Secure over HTTPS."""
    root = request.scope.get("root_path", "")
    paths = [f"{root}{DICOMWEB_PREFIX}/"]
    if page:
        paths.append(f"{root}{SHARE_PAGE_PREFIX}")
    for path in paths:
        response.set_cookie(
            SESSION_COOKIE,
            session.text,
            max_age=session.max_age,
            path=path,
            secure=request.url.scheme == "https",
            httponly=True,
            samesite="strict",
        )


def open_session(request: Request, token: str, pin: str | None = None) -> Session:
    """A browser session from a share link or launch token (LinkRefusedError when it does
    not open); its opening recorded as an access to each of its studies."""
    session = _links(request).open_session(token, pin, address=_address(request))
    _record_access(request, session.caller)
    return session


def _record_access(request: Request, caller: Caller) -> None:
    auditor = _state(request).auditor
    if auditor is None or caller.studies is None:
        return
    via = "share link" if caller.kind.value == "share" else "launch"
    for study in sorted(caller.studies):
        auditor.accessed(caller, caller.home_tenant, study, via=via)


def _alert(request: Request, reason: AlertReason, user: Caller | str, description: str) -> None:
    auditor = _state(request).auditor
    if auditor is not None:
        auditor.security_alert(
            reason, user=user, address=_address(request), description=description
        )


# --- the API ----------------------------------------------------------------------------


class ShareRequest(BaseModel):
    study: str = Field(description="Study Instance UID")
    tenant: str | None = Field(None, description="the hospital (default: the caller's)")
    expires: str | int = Field("7d", description="seconds, or 30m, 12h, 7d, 2w (at most 90d)")
    pin: str | None = Field(None, description="4-12 digits the patient must type")


class LaunchRequest(BaseModel):
    studies: list[str] | None = Field(None, description="Study Instance UIDs")
    patient_id: str | None = Field(None, description="every study of this patient")
    issuer: str | None = Field(None, description="the patient ID's issuer")
    accession: str | None = Field(None, description="the studies with this accession number")
    tenant: str | None = Field(None, description="the hospital (default: the caller's)")
    ttl: str | int = Field("5m", description="time to open it (at most 1h)")


def _tenant_archive(
    request: Request, authorized: Authorized, tenant: str | None
) -> tuple[str, Archive]:
    """The hospital a request names (or the caller's), where it holds the viewer role."""
    state = _state(request)
    name = state.access.tenant_for(authorized.caller, Role.VIEWER, tenant or authorized.tenant)
    return name, state.root_archive.for_tenant(name)


def _created(request: Request, made: NewToken, caller: Caller) -> None:
    what = "share link" if made.kind == LinkKind.SHARE else "launch token"
    _alert(
        request,
        AlertReason.CREDENTIALS_CHANGE,
        caller,
        f"{what} {made.link_id} made for {len(made.studies)} "
        f"{'study' if len(made.studies) == 1 else 'studies'} in {made.tenant}, "
        f"expires {_iso(made.expires)}{', with PIN' if made.has_pin else ''}",
    )


@api.post("/api/shares", status_code=201, summary="Make a share link for a patient")
def create_share(
    body: Annotated[ShareRequest, Body()], request: Request, authorized: AuthorizedDep
) -> dict[str, Any]:
    tenant, archive = _tenant_archive(request, authorized, body.tenant)
    try:
        if not present_studies(archive.catalog, [body.study.strip()]):
            raise NotFoundError("no such study in this hospital")
        made = _links(request).create_share(
            tenant,
            [body.study],
            created_by=authorized.caller,
            expires_s=body.expires,
            pin=body.pin,
        )
    except LinkInputError as exc:
        raise BadRequestError(str(exc)) from None
    _created(request, made, authorized.caller)
    url = page_url(request, made.text)
    return {
        "id": made.link_id,
        "url": url,
        "qr_svg": f"{url}/qr.svg",
        "qr_png": f"{url}/qr.png",
        "token": made.text,
        "tenant": made.tenant,
        "studies": list(made.studies),
        "expires": _iso(made.expires),
        "pin": made.has_pin,
    }


@api.delete("/api/shares/{link_id}", status_code=204, summary="Revoke a share link")
def revoke_share(link_id: str, request: Request, authorized: AuthorizedDep) -> Response:
    links = _links(request)
    caller = authorized.caller
    info = links.get(link_id)
    # a link of a hospital the caller cannot read is no link it may learn of: 404
    if info is None or info.kind != LinkKind.SHARE or not caller.may(Role.VIEWER, info.tenant):
        raise NotFoundError("no such share link")
    if info.created_by != caller.name and not caller.may(Role.ADMIN, info.tenant):
        raise AccessDeniedError("only its maker or an admin of its hospital revokes a link")
    if links.revoke(info.link_id):
        _alert(
            request, AlertReason.CREDENTIALS_CHANGE, caller, f"share link {info.link_id} revoked"
        )
    return Response(status_code=204)


@api.post("/api/launch", status_code=201, summary="Make a launch token for an EMR")
def create_launch(
    body: Annotated[LaunchRequest, Body()], request: Request, authorized: AuthorizedDep
) -> dict[str, Any]:
    tenant, archive = _tenant_archive(request, authorized, body.tenant)
    try:
        if body.studies:
            studies = [s.strip() for s in body.studies]
        else:
            studies = find_studies(
                archive.catalog,
                patient_id=body.patient_id,
                issuer=body.issuer,
                accession=body.accession,
            )
            if not studies:
                raise NotFoundError("no studies for that patient or accession number yet")
        made = _links(request).create_launch(
            tenant, studies, created_by=authorized.caller, ttl_s=body.ttl
        )
    except LinkInputError as exc:
        raise BadRequestError(str(exc)) from None
    _created(request, made, authorized.caller)
    return {
        "id": made.link_id,
        "token": made.text,
        "tenant": made.tenant,
        "studies": list(made.studies),
        "expires": _iso(made.expires),
    }


# --- the page -----------------------------------------------------------------------------


def _static_version() -> str:
    digest = hashlib.sha256()
    for name in _STATIC:
        digest.update(_static_bytes(name))
    return digest.hexdigest()[:12]


def _static_bytes(name: str) -> bytes:
    return resources.files("kho.viewer_api").joinpath("static", "share", name).read_bytes()


_VERSION = _static_version()

_SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Robots-Tag": "noindex, nofollow",
    "Content-Security-Policy": (
        "default-src 'none'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
}


def _html(
    request: Request,
    title: str,
    body: str,
    *,
    status: int = 200,
    script: bool = False,
    head: str = "",
) -> Response:
    root = html.escape(request.scope.get("root_path", ""))
    static = f"{root}{SHARE_PAGE_PREFIX}static"
    script_tag = f'<script src="{static}/share.js?v={_VERSION}" defer></script>' if script else ""
    page = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1, viewport-fit=cover">
<meta name="robots" content="noindex, nofollow">
<meta name="referrer" content="no-referrer">
<title>{html.escape(title)}</title>
<link rel="stylesheet" href="{static}/share.css?v={_VERSION}">
{head}{script_tag}
</head>
<body>
{body}
</body>
</html>
"""
    return Response(
        page.encode(), status_code=status, media_type="text/html", headers=_SECURITY_HEADERS
    )


#: what the patient reads for each refusal: (status, title, explanation)
_REFUSALS = {
    LinkState.UNKNOWN: (
        404,
        "Link not recognised",
        "This link is not valid. Check that it was copied completely, or ask the hospital "
        "that sent it for a new one.",
    ),
    LinkState.EXPIRED: (
        410,
        "This link has expired",
        "Links to images work for a limited time. Ask the hospital or your doctor for a new "
        "link if you still need to see these images.",
    ),
    LinkState.REVOKED: (
        410,
        "This link has been withdrawn",
        "The hospital has withdrawn this link. Ask the hospital or your doctor for a new "
        "one if you still need to see these images.",
    ),
    LinkState.USED: (
        410,
        "This link has already been used",
        "This link could be opened once only. Open the images again from where you found the link.",
    ),
    LinkState.LOCKED: (
        403,
        "This link is locked",
        "The PIN was entered wrongly too many times, so the link has been locked to "
        "protect your images. Ask the hospital or your doctor for a new link.",
    ),
}


def _refusal(request: Request, state: LinkState) -> Response:
    status, title, text = _REFUSALS.get(state, _REFUSALS[LinkState.UNKNOWN])
    body = (
        f'<main class="notice" data-state="{state.value}"><h1>{html.escape(title)}</h1>'
        f"<p>{html.escape(text)}</p></main>"
    )
    return _html(request, title, body, status=status)


def _pin_form(request: Request, *, attempts_left: int | None = None) -> Response:
    wrong = ""
    status = 200
    if attempts_left is not None:
        status = 403
        plural = "attempt" if attempts_left == 1 else "attempts"
        wrong = (
            f'<p class="error" role="alert">That PIN is not right. '
            f"{attempts_left} {plural} left before the link locks.</p>"
        )
    body = f"""<main class="notice" data-state="pin">
<h1>Enter your PIN</h1>
<p>These images are protected by a PIN. You received it with the link (by text message,
letter or from your doctor).</p>
{wrong}
<form method="post" autocomplete="off">
<label for="pin">PIN</label>
<input id="pin" name="pin" type="password" inputmode="numeric" pattern="[0-9]*"
 minlength="4" maxlength="12" autocomplete="one-time-code" required autofocus>
<button type="submit">Show my images</button>
</form>
</main>"""
    return _html(request, "Enter your PIN", body, status=status)


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("inf")


def _date(text: Any) -> str:
    text = str(text or "")
    if len(text) == 8 and text.isdigit():
        months = [
            "Jan",
            "Feb",
            "Mar",
            "Apr",
            "May",
            "Jun",
            "Jul",
            "Aug",
            "Sep",
            "Oct",
            "Nov",
            "Dec",
        ]
        month = int(text[4:6])
        if 1 <= month <= 12:
            return f"{int(text[6:8])} {months[month - 1]} {text[:4]}"
    return ""


def manifest(archive: Archive, studies: Sequence[str]) -> dict[str, Any]:
    """What the page shows, read from the catalog: each study's description and date, its
    series (number, modality, description) and their images (instance, frames) in order.
    Instances without pixels (reports, presentation states) are left out.  No patient
    name or ID: the page shows images, not who they belong to."""
    series: dict[str, dict[str, Any]] = {}
    described: list[dict[str, str]] = []
    for study in studies:
        found = list(
            query.find(
                archive.catalog,
                "STUDY",
                {"StudyInstanceUID": study},
                return_keys=("StudyDate", "StudyDescription", "ModalitiesInStudy"),
            )
        )
        if not found:
            continue
        row = found[0]
        modalities = row.get("ModalitiesInStudy") or ""
        if isinstance(modalities, list):
            modalities = "\\".join(modalities)
        described.append(
            {
                "description": str(row.get("StudyDescription") or ""),
                "date": _date(row.get("StudyDate")),
                "modalities": ", ".join(m for m in str(modalities).split("\\") if m),
            }
        )
        images = query.find(
            archive.catalog,
            "IMAGE",
            {"StudyInstanceUID": study},
            return_keys=(
                "SeriesInstanceUID",
                "SeriesNumber",
                "SeriesDescription",
                "Modality",
                "InstanceNumber",
                "NumberOfFrames",
                "Rows",
            ),
        )
        for image in images:
            if not image.get("Rows"):
                continue
            uid = str(image["SeriesInstanceUID"])
            entry = series.setdefault(
                uid,
                {
                    "study": study,
                    "uid": uid,
                    "number": image.get("SeriesNumber"),
                    "modality": str(image.get("Modality") or ""),
                    "description": str(image.get("SeriesDescription") or ""),
                    "instances": [],
                },
            )
            frames = int(_number(image.get("NumberOfFrames")) if image.get("NumberOfFrames") else 1)
            entry["instances"].append(
                (_number(image.get("InstanceNumber")), str(image["SOPInstanceUID"]), max(frames, 1))
            )
    ordered = sorted(series.values(), key=lambda s: (_number(s["number"]), s["uid"]))
    out = []
    for entry in ordered:
        entry["instances"].sort()
        out.append(
            {
                "study": entry["study"],
                "uid": entry["uid"],
                "modality": entry["modality"],
                "label": entry["description"]
                or entry["modality"]
                or (f"Series {entry['number']}" if entry["number"] is not None else "Series"),
                "images": [[sop, frames] for _, sop, frames in entry["instances"]],
            }
        )
    return {"studies": described, "series": out}


def _rendered_url(base: str, series: dict[str, Any], sop: str, frame: int) -> str:
    return (
        f"{base}/studies/{series['study']}/series/{series['uid']}/instances/{sop}"
        f"/frames/{frame}/rendered?viewport={VIEWPORT}"
    )


def _middle_frame(images: list[list[Any]]) -> tuple[str, int]:
    """The image a series opens on, as share.js picks it: the middle frame of the stack
    (the middle of a CT shows more than its first slice)."""
    frames = [(sop, f) for sop, count in images for f in range(1, int(count) + 1)]
    return frames[(len(frames) - 1) // 2]


def _viewer(request: Request, caller: Caller, expires: float) -> Response:
    archive = _state(request).root_archive.for_tenant(caller.home_tenant)
    shown = manifest(archive, sorted(caller.studies or ()))
    root = request.scope.get("root_path", "")
    base = f"{root}{DICOMWEB_PREFIX}"
    data = {
        "base": base,
        "viewport": VIEWPORT,
        "presets": {"CT": [list(p) for p in CT_PRESETS]},
        **shown,
    }
    # the manifest inside a non-executed script element: "<" escaped so no text in it can
    # close the element (descriptions are free text from the modality)
    manifest_json = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")
    studies = shown["studies"]
    title = (studies[0]["description"] if studies else "") or "Your images"
    details = (
        " · ".join(x for x in (studies[0]["date"], studies[0]["modalities"]) if x)
        if studies
        else ""
    )
    until = time.strftime("%d %b %Y, %H:%M UTC", time.gmtime(expires))
    first = ""
    head = ""
    if shown["series"]:
        series = shown["series"][0]
        sop, frame = _middle_frame(series["images"])
        first = html.escape(_rendered_url(base, series, sop, frame))
        # fetched while the script loads: the first image does not wait for it
        head = f'<link rel="preload" as="image" href="{first}">\n'
        stage = f'<img id="image" src="{first}" alt="Series 1" draggable="false">'
    else:
        stage = '<p class="empty">There are no images in this study yet.</p>'
    body = f"""<header>
<h1>{html.escape(title)}</h1>
<p class="details">{html.escape(details)}</p>
</header>
<main id="stage" aria-live="polite">{stage}</main>
<div id="controls">
<button id="previous" type="button" aria-label="Previous image">&#8249;</button>
<input id="slider" type="range" min="1" max="1" value="1" aria-label="Image">
<button id="next" type="button" aria-label="Next image">&#8250;</button>
</div>
<p id="position" class="position"></p>
<nav id="presets" aria-label="Window presets"></nav>
<nav id="series" aria-label="Series"></nav>
<footer><p>Swipe left or right for the next image, up or down for the next series.
This link works until <time id="until" datetime="{_iso(expires)}">{html.escape(until)}</time>.</p>
</footer>
<script id="manifest" type="application/json">{manifest_json}</script>"""
    return _html(request, title, body, script=True, head=head)


def _share_token(request: Request, token: str, template: str = "/{token}") -> str:
    """The token from the path (empty when too long to be one); the request timed under
    the route's template, never its path (which holds the token)."""
    request.scope[ROUTE_KEY] = SHARE_PAGE_PREFIX.rstrip("/") + template
    return token if len(token) <= _TOKEN_MAX else ""


@pages.get("/static/{name}")
def static_file(name: str) -> Response:
    """The page's script and style sheet: no patient data, no credential needed."""
    if name not in _STATIC:
        raise NotFoundError("no such file")
    suffix = name[name.rfind(".") :]
    return Response(
        _static_bytes(name),
        media_type=_STATIC_TYPES[suffix],
        headers={
            "Cache-Control": "public, max-age=86400",
            "X-Content-Type-Options": "nosniff",
        },
    )


@pages.get("/{token}")
def share_page(token: str, request: Request) -> Response:
    links = _links(request)
    try:
        info, state = links.inspect(_share_token(request, token))
    except LinkRefusedError as exc:
        return _refusal(request, exc.state)
    if info.kind != LinkKind.SHARE:
        return _refusal(request, LinkState.UNKNOWN)
    if state not in (LinkState.ACTIVE, LinkState.PIN_REQUIRED):
        return _refusal(request, state)
    cookie = request.cookies.get(SESSION_COOKIE, "")
    caller = links.session_of(cookie, info.link_id, address=_address(request))
    if caller is not None:  # a reload within the session: no PIN again
        _record_access(request, caller)
        return _viewer(request, caller, info.expires)
    if state == LinkState.PIN_REQUIRED:
        return _pin_form(request)
    try:
        session = open_session(request, token)
    except LinkRefusedError as exc:
        return _refusal(request, exc.state)
    response = _viewer(request, session.caller, info.expires)
    set_session_cookies(response, request, session, page=True)
    return response


@pages.post("/{token}")
async def share_pin(token: str, request: Request) -> Response:
    links = _links(request)
    try:
        info, state = links.inspect(_share_token(request, token))
    except LinkRefusedError as exc:
        return _refusal(request, exc.state)
    if info.kind != LinkKind.SHARE:
        return _refusal(request, LinkState.UNKNOWN)
    if state not in (LinkState.ACTIVE, LinkState.PIN_REQUIRED):
        return _refusal(request, state)
    form = await request.form()
    pin = str(form.get("pin") or "").strip()
    try:
        # scrypt (tens of ms) and a catalog write: off the event loop
        session = await run_in_threadpool(open_session, request, token, pin or None)
    except LinkRefusedError as exc:
        if exc.state in (LinkState.WRONG_PIN, LinkState.LOCKED):
            _alert(
                request,
                AlertReason.BAD_TOKEN,
                f"share:{info.link_id}",
                f"share link {info.link_id}: wrong PIN"
                + (" (locked)" if exc.state == LinkState.LOCKED else ""),
            )
        if exc.state == LinkState.WRONG_PIN:
            return _pin_form(request, attempts_left=exc.attempts_left)
        if exc.state == LinkState.PIN_REQUIRED:
            return _pin_form(request)
        return _refusal(request, exc.state)
    # back to the page with a GET (a reload does not post the PIN again)
    root = request.scope.get("root_path", "")
    response = Response(status_code=303, headers={"Location": f"{root}{SHARE_PAGE_PREFIX}{token}"})
    response.headers.update({"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"})
    set_session_cookies(response, request, session, page=True)
    return response


def _qr(request: Request, token: str, kind: str) -> segno.QRCode | Response:
    try:
        info, state = _links(request).inspect(_share_token(request, token, f"/{{token}}/qr.{kind}"))
    except LinkRefusedError as exc:
        return _refusal(request, exc.state)
    if info.kind != LinkKind.SHARE:
        return _refusal(request, LinkState.UNKNOWN)
    if state not in (LinkState.ACTIVE, LinkState.PIN_REQUIRED):
        return _refusal(request, state)
    # error correction M: survives a crease or a smudge on a printed sheet
    return segno.make(page_url(request, token), error="m", micro=False)


_QR_HEADERS = {
    "Cache-Control": "no-store",  # it holds the link itself
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


@pages.get("/{token}/qr.svg")
def share_qr_svg(token: str, request: Request) -> Response:
    code = _qr(request, token, "svg")
    if isinstance(code, Response):
        return code
    out = io.BytesIO()
    code.save(out, kind="svg", scale=8, border=4, xmldecl=False, title="Link to your images")
    return Response(out.getvalue(), media_type="image/svg+xml", headers=_QR_HEADERS)


@pages.get("/{token}/qr.png")
def share_qr_png(token: str, request: Request) -> Response:
    code = _qr(request, token, "png")
    if isinstance(code, Response):
        return code
    out = io.BytesIO()
    code.save(out, kind="png", scale=10, border=4)
    return Response(out.getvalue(), media_type="image/png", headers=_QR_HEADERS)


def qr_code(url: str, kind: str = "svg") -> bytes:
    """A share link's URL as a QR code (``svg`` or ``png``), for ``kho share create --qr``."""
    out = io.BytesIO()
    code = segno.make(url, error="m", micro=False)
    if kind == "png":
        code.save(out, kind="png", scale=10, border=4)
    else:
        code.save(out, kind="svg", scale=8, border=4, xmldecl=False)
    return out.getvalue()


__all__ = [
    "api",
    "install",
    "manifest",
    "open_session",
    "page_url",
    "pages",
    "qr_code",
    "set_session_cookies",
]
