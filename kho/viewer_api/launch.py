"""Opening images from an EMR: IHE Invoke Image Display (RAD-106) and the launch.

``GET /IHEInvokeImageDisplay`` (also ``/tenants/<t>/IHEInvokeImageDisplay``) takes the
profile's parameters:

- ``requestType=STUDY`` with ``studyUID`` and/or ``accessionNumber`` (comma-separated
  lists), optionally ``patientID`` (then only that patient's studies count);
- ``requestType=PATIENT`` with ``patientID`` (HL7 CX: ``ID^^^&issuer&ISO``; the ID is
  matched exactly, the issuer is not: one hospital, one tenant, one patient ID domain),
  optionally ``lowerDateTime``/``upperDateTime`` (ISO 8601), ``mostRecentResults`` (a
  count) and ``modalitiesInStudy`` (comma-separated);
- ``viewerType``, ``diagnosticQuality`` and ``keyImagesOnly`` are accepted: kho has one
  viewer (OHIF), every image it serves is diagnostic quality (lossless), and OHIF shows
  whole studies (key images are the KO series among them).

It resolves to studies of the tenant the request acts in (exact values only: a wildcard
in an EMR's parameter would widen a launch to other patients: 400) and opens OHIF on them,
most recent first (at most :data:`MAX_STUDIES`).  A study not (yet) in the archive is a
404 page that says so, in words, with a retry link and, where some requested studies did
arrive, a link to those: never a viewer with nothing in it.  No page names a patient or a
UID (counts only).

Who asks: the route needs the viewer role, as every read.  With authentication off
(loopback) the browser itself opens the IID URL and is redirected (303) to the viewer.
With authentication on, the EMR's back end calls it with its API key or token; kho makes
a launch token scoped to exactly those studies (kho.access.links, 5 minutes to be opened,
once) and answers the browser URL ``<public base>/launch/<token>``: as JSON
(``{"url", "expires", "studies"}``) for a client that does not ask for HTML -- a back end
that followed a redirect would spend the token itself -- or as a 303 for one that asks for
``text/html`` (an EMR-side proxy that adds the API key to the clinician's own request).

``GET /launch/<token>`` (its token in its path is its credential, as a share link's):
opens the token once into a browser session (an HttpOnly SameSite=Strict cookie on
``/dicom-web/``, 8 hours, ended when the token is revoked), records the access, and
redirects to the viewer on the token's studies.  That browser then reaches those studies
and nothing else (kho.viewer_api.security).  An expired, used or revoked token is a page
that says so.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse

from kho.access.callers import Caller, Role
from kho.access.links import LinkRefusedError, LinkState
from kho.archive.archive import Archive
from kho.archive.query import engine as query
from kho.errors import QueryError
from kho.viewer_api.deps import AuthorizedDep, ViewerState
from kho.viewer_api.errors import BadRequestError
from kho.viewer_api.metrics import ROUTE_KEY
from kho.viewer_api.paths import checked_uid
from kho.viewer_api.security import TENANT_KEY, TENANTS_PREFIX, own_credential, requires
from kho.viewer_api.share import open_session, set_session_cookies
from kho.viewer_api.viewer import LAUNCH_MARK_COOKIE, VIEWER

router = APIRouter(tags=["IHE Invoke Image Display"], dependencies=[requires(Role.VIEWER)])
#: the browser's half: the launch token in the path is the credential
pages = APIRouter(dependencies=[Depends(own_credential)], include_in_schema=False)

IID_PATH = "/IHEInvokeImageDisplay"
LAUNCH_PREFIX = "/launch/"
#: studies one launch opens (most recent first): a viewer with hundreds of studies open
#: would spend its first minutes loading metadata nobody looks at
MAX_STUDIES = 50
#: how long a launch token may wait to be opened (kho.access.links allows up to an hour)
LAUNCH_TTL_S = 300
_TOKEN_MAX = 128
_EXACT = re.compile(r"^[^*?\\]{1,64}$")
_MODALITY = re.compile(r"^[A-Z0-9]{1,16}$")
_ISO_DATE = re.compile(r"^(\d{4})-?(\d{2})-?(\d{2})")

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>{title}</title>
<style>body{{font:16px system-ui,sans-serif;max-width:44em;margin:3em auto;padding:0 1em;
color:#1b1f24}}a.button{{display:inline-block;background:#0b63b6;color:#fff;padding:.4em 1em;
border-radius:4px;text-decoration:none;margin:.3em .6em .3em 0}}code{{background:#eef1f4;
padding:.1em .3em}}</style></head>
<body data-state="{state}"><h1>{title}</h1>
{body}
</body></html>
"""
_SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


@dataclass
class Resolution:
    """What an IID request named and what of it the archive holds."""

    studies: list[str] = field(default_factory=list)  # most recent first
    asked: int = 0  # study UIDs and accession numbers named (STUDY requests)
    missing: int = 0  # of those, not (yet) in the archive


# --- the request's parameters -------------------------------------------------------------


def _param(request: Request, name: str) -> str:
    """A parameter by its IHE name (compared case-insensitively: EMRs vary)."""
    wanted = name.lower()
    for key, value in request.query_params.multi_items():
        if key.lower() == wanted:
            return value.strip()
    return ""


def _list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _exact(value: str, what: str) -> str:
    if not _EXACT.match(value):
        raise BadRequestError(f"{what} must be one exact value (no wildcards), of 1-64 characters")
    return value


def patient_id_of(cx: str) -> str:
    """The ID of an HL7 CX value (``ID^^^&1.2.3&ISO``): its first component."""
    return _exact(cx.split("^", 1)[0].strip(), "patientID")


def _dicom_date(text: str, what: str) -> str:
    found = _ISO_DATE.match(text)
    if not found:
        raise BadRequestError(f"{what} must be an ISO 8601 date or date-time")
    return "".join(found.groups())


# --- resolution --------------------------------------------------------------------------


def _most_recent_first(rows: list[dict[str, Any]]) -> list[str]:
    rows = sorted(
        rows,
        key=lambda r: (str(r.get("StudyDate") or ""), str(r.get("StudyTime") or "")),
        reverse=True,
    )
    seen: list[str] = []
    for row in rows:
        uid = str(row["StudyInstanceUID"])
        if uid not in seen:
            seen.append(uid)
    return seen


def _find(archive: Archive, filters: dict[str, Any]) -> list[dict[str, Any]]:
    try:
        return list(
            query.find(
                archive.catalog,
                "STUDY",
                filters,
                return_keys=("StudyDate", "StudyTime"),
                limit=10 * MAX_STUDIES,
            )
        )
    except QueryError as exc:
        raise BadRequestError(str(exc)) from None


def resolve(archive: Archive, request: Request) -> Resolution:
    """The studies an IID request names, in ``archive`` (the request's tenant)."""
    request_type = _param(request, "requestType").upper()
    patient_cx = _param(request, "patientID")
    patient = patient_id_of(patient_cx) if patient_cx else None
    if request_type == "STUDY":
        uids = [checked_uid(uid, "studyUID") for uid in _list(_param(request, "studyUID"))]
        accessions = [
            _exact(a, "accessionNumber") for a in _list(_param(request, "accessionNumber"))
        ]
        if not uids and not accessions:
            raise BadRequestError("requestType=STUDY needs studyUID or accessionNumber")
        found: list[dict[str, Any]] = []
        missing = 0
        base: dict[str, Any] = {"PatientID": patient} if patient else {}
        if uids:
            rows = _find(archive, {**base, "StudyInstanceUID": uids})
            present = {str(r["StudyInstanceUID"]) for r in rows}
            missing += sum(1 for uid in dict.fromkeys(uids) if uid not in present)
            found += rows
        for accession in dict.fromkeys(accessions):
            rows = _find(archive, {**base, "AccessionNumber": accession})
            missing += 0 if rows else 1
            found += rows
        asked = len(dict.fromkeys(uids)) + len(dict.fromkeys(accessions))
        return Resolution(_most_recent_first(found)[:MAX_STUDIES], asked, missing)
    if request_type == "PATIENT":
        if not patient:
            raise BadRequestError("requestType=PATIENT needs patientID")
        filters: dict[str, Any] = {"PatientID": patient}
        lower, upper = _param(request, "lowerDateTime"), _param(request, "upperDateTime")
        if lower or upper:
            low = _dicom_date(lower, "lowerDateTime") if lower else ""
            high = _dicom_date(upper, "upperDateTime") if upper else ""
            filters["StudyDate"] = f"{low}-{high}"
        modalities = _list(_param(request, "modalitiesInStudy").upper())
        if modalities:
            if not all(_MODALITY.match(m) for m in modalities):
                raise BadRequestError("modalitiesInStudy must be modality codes (CT,MR,...)")
            filters["ModalitiesInStudy"] = modalities
        studies = _most_recent_first(_find(archive, filters))
        most_recent = _param(request, "mostRecentResults")
        if most_recent:
            if not most_recent.isdigit() or int(most_recent) < 1:
                raise BadRequestError("mostRecentResults must be a positive integer")
            studies = studies[: int(most_recent)]
        return Resolution(studies[:MAX_STUDIES])
    raise BadRequestError("requestType must be STUDY or PATIENT (IHE Invoke Image Display)")


# --- answers ------------------------------------------------------------------------------


def _state(request: Request) -> ViewerState:
    state: ViewerState = request.app.state.viewer
    return state


def _wants_html(request: Request) -> bool:
    return "text/html" in request.headers.get("accept", "").lower()


def _page(title: str, body: str, *, status: int, state: str) -> HTMLResponse:
    page = _PAGE.format(title=html.escape(title), body=body, state=html.escape(state))
    return HTMLResponse(page, status_code=status, headers=_SECURITY_HEADERS)


def _untenanted_root(request: Request) -> str:
    """The root path without a ``/tenants/<t>`` the request named (a launch's session
    acts in its token's tenant by itself)."""
    root = str(request.scope.get("root_path", "")).rstrip("/")
    tenant = request.scope.get(TENANT_KEY)
    suffix = f"{TENANTS_PREFIX}{tenant}"
    return root[: -len(suffix)] if tenant and root.endswith(suffix) else root


def viewer_path(root: str, studies: list[str]) -> str:
    uids = ",".join(quote(uid, safe=".") for uid in studies)
    return f"{root}{VIEWER}/viewer?StudyInstanceUIDs={uids}"


def _origin(request: Request) -> str:
    """scheme://host as the request reached us (forwarded-aware: kho.viewer_api.proxy)."""
    return f"{request.url.scheme}://{request.url.netloc}"


def _usage(request: Request) -> HTMLResponse:
    root = html.escape(str(request.scope.get("root_path", "")).rstrip("/"))
    body = f"""<p>kho's IHE Invoke Image Display endpoint. An EMR opens images with</p>
<p><code>{root}{IID_PATH}?requestType=STUDY&amp;studyUID=1.2.3</code> (or
<code>accessionNumber=A123</code>), or
<code>{root}{IID_PATH}?requestType=PATIENT&amp;patientID=12345</code>
(with <code>lowerDateTime</code>, <code>upperDateTime</code>, <code>mostRecentResults</code>,
<code>modalitiesInStudy</code>).</p>
<p>With authentication on, the EMR's back end calls it with its API key and opens the
<code>url</code> of the answer in the clinician's browser.</p>"""
    return _page("Invoke Image Display", body, status=200, state="usage")


def _not_arrived(request: Request, resolution: Resolution, link: str | None) -> Response:
    found = len(resolution.studies)
    if resolution.asked and found:
        detail = (
            f"{resolution.missing} of the {resolution.asked} requested studies "
            f"{'is' if resolution.missing == 1 else 'are'} not in the archive yet."
        )
    elif resolution.asked:
        detail = "The requested images are not in the archive yet."
    else:
        detail = "The archive holds no images for this patient that match the request."
    advice = (
        "If the examination has just been done, the images may still be on their way from "
        "the modality: try again in a few minutes. If they do not arrive, call the imaging "
        "department."
    )
    if not _wants_html(request):
        payload = {
            "error": "not_found",
            "detail": f"{detail} {advice}",
            "missing": resolution.missing,
            "found": found,
            "url": link,
        }
        return JSONResponse(payload, status_code=404, headers=_SECURITY_HEADERS)
    retry = html.escape(
        str(request.url.path) + ("?" + request.url.query if request.url.query else "")
    )
    links = f'<a class="button" href="{retry}">Try again</a>'
    if link is not None:
        plural = "study" if found == 1 else "studies"
        links += (
            f'<a class="button" href="{html.escape(link)}">'
            f"Open the {found} {plural} that arrived</a>"
        )
    body = f"<p>{html.escape(detail)}</p><p>{html.escape(advice)}</p><p>{links}</p>"
    return _page("The images are not here yet", body, status=404, state="not-arrived")


def _opening_url(
    request: Request, authorized: Any, studies: list[str]
) -> tuple[str, dict[str, Any]]:
    """The URL a browser opens to see ``studies``, and what the JSON answer adds."""
    access = _state(request).access
    if not access.enabled:
        root = str(request.scope.get("root_path", "")).rstrip("/")
        return _origin(request) + viewer_path(root, studies), {}
    made = access.links.create_launch(
        authorized.tenant, studies, created_by=authorized.caller, ttl_s=LAUNCH_TTL_S
    )
    _record_launch(request, authorized.caller, made.link_id, len(made.studies), made.tenant)
    url = f"{_origin(request)}{_untenanted_root(request)}{LAUNCH_PREFIX}{made.text}"
    return url, {"expires_in": LAUNCH_TTL_S, "tenant": made.tenant}


def _record_launch(request: Request, caller: Caller, link_id: str, count: int, tenant: str) -> None:
    auditor = _state(request).auditor
    if auditor is None:
        return
    from kho.audit.messages import AlertReason

    auditor.security_alert(
        AlertReason.CREDENTIALS_CHANGE,
        user=caller,
        address=request.client.host if request.client else "",
        description=f"launch token {link_id} made for {count} "
        f"{'study' if count == 1 else 'studies'} in {tenant} (IHE IID)",
    )


@router.get(IID_PATH, summary="IHE Invoke Image Display: open the viewer on studies")
def invoke_image_display(request: Request, authorized: AuthorizedDep) -> Response:
    if not request.url.query:
        return _usage(request)
    resolution = resolve(authorized.archive, request)
    auditor = _state(request).auditor
    if auditor is not None:  # which patient's studies were looked up, by whom
        auditor.query(
            authorized.caller,
            authorized.tenant,
            target=IID_PATH,
            query=request.url.query,
            via="IHE IID",
        )
    if resolution.missing or not resolution.studies:
        link = (
            _opening_url(request, authorized, resolution.studies)[0] if resolution.studies else None
        )
        return _not_arrived(request, resolution, link)
    url, extra = _opening_url(request, authorized, resolution.studies)
    if _wants_html(request):
        return Response(status_code=303, headers={"Location": url, **_SECURITY_HEADERS})
    payload = {"url": url, "studies": resolution.studies, **extra}
    return JSONResponse(payload, headers=_SECURITY_HEADERS)


# --- the browser's half: /launch/<token> ------------------------------------------------------


_REFUSED = {
    LinkState.EXPIRED: (410, "This link has expired", "Open the images again from the EMR."),
    LinkState.USED: (
        410,
        "This link has already been used",
        "A launch link opens once. Open the images again from the EMR.",
    ),
    LinkState.REVOKED: (410, "This link has been withdrawn", "Open the images again from the EMR."),
}


@pages.get(LAUNCH_PREFIX + "{token}", summary="Open a launch token in this browser")
def open_launch(token: str, request: Request) -> Response:
    request.scope[ROUTE_KEY] = LAUNCH_PREFIX + "{token}"  # timed by template, not token
    try:
        if len(token) > _TOKEN_MAX or not token.startswith("kho_launch_"):
            raise LinkRefusedError(LinkState.UNKNOWN, "not a launch token")
        session = open_session(request, token)
    except LinkRefusedError as exc:
        status, title, text = _REFUSED.get(
            exc.state, (404, "Link not recognised", "Open the images again from the EMR.")
        )
        return _page(title, f"<p>{html.escape(text)}</p>", status=status, state=exc.state.value)
    caller = session.caller
    archive = _state(request).root_archive.for_tenant(caller.home_tenant)
    rows = _find(archive, {"StudyInstanceUID": sorted(caller.studies or ())})
    studies = _most_recent_first(rows) or sorted(caller.studies or ())
    root = str(request.scope.get("root_path", "")).rstrip("/")
    response = Response(
        status_code=303, headers={"Location": viewer_path(root, studies), **_SECURITY_HEADERS}
    )
    set_session_cookies(response, request, session)
    # read by /viewer/app-config.js (no OHIF sign-in for a launched browser); no credential
    response.set_cookie(
        LAUNCH_MARK_COOKIE,
        "1",
        max_age=session.max_age,
        path=f"{root}{VIEWER}/",
        secure=request.url.scheme == "https",
        httponly=True,
        samesite="lax",
    )
    return response
