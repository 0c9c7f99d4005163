"""The OHIF viewer at ``/viewer/``: its static files, its configuration for kho's DICOMweb.

The build comes from kho.viewer_api.ohif (``kho viewer install``, or ``kho serve`` on
first start).  What is served:

- ``/viewer/app-config.js``: made here for this archive (:func:`app_config`); the data
  source reads kho's own DICOMweb at the address the browser reached the page from
  (``window.location.origin`` and the request's path prefix: a proxy prefix or
  ``/tenants/<t>``), so the same configuration works directly and behind a proxy;
- ``/viewer/index.html`` and every path that is not a file (OHIF's client-side routes,
  ``/viewer/viewer?StudyInstanceUIDs=...``): the build's index.html with its URLs under
  the prefix (``window.PUBLIC_URL``), without the service-worker loader (it fetches
  Workbox from a Google CDN and caches on the device: not for an archive's viewer, online
  or off), and with kho's small launch script first (below);
- every other file as it is on disk, with its media type (``application/wasm`` for the
  codecs), its gzip twin when the browser accepts gzip, and a year's immutable caching for
  the content-hashed names (``app.bundle.0f6159c501addfe9.js``); the rest revalidates
  (ETag).

Until a build is installed, ``/viewer/`` answers 503 with a page that says why and how to
install one.  The routes are public (kho.viewer_api.security.is_public): none of these
files holds patient data; the viewer's reads go to ``/dicom-web`` with the user's
credential.

The data source settings, chosen for time to first image against kho:

- ``imageRendering: 'wadors'`` with Cornerstone's own Accept
  (``transfer-syntax=*``): frames come as stored -- JPEG-LS from the at-rest codec, or the
  bytes the modality sent -- with no server-side decode, and the browser's WebAssembly
  CharLS/OpenJPEG decode them (answering those requests with decoded frames instead,
  setting ``viewer_decoded_frame_max_bytes``, was measured: no gain beyond the noise on
  one loaded machine, where OHIF's own JavaScript and software WebGL take most of the
  time to first image, not the codec);
- ``enableStudyLazyLoad``: the first series' metadata is asked for (and displayed) before
  the others', one request per series (kho answers a series' metadata from one cached
  document);
- thumbnails from kho's ``/thumbnail`` (a JPEG made at ingest, one small read):
  ``'thumbnailDirect'`` (plain ``<img src>``, parallel, cached by the browser) when no
  credential is needed, else ``'thumbnail'`` (fetched with the credential);
- ``qidoSupportsIncludeField``, ``supportsWildcard``, ``supportsFuzzyMatching``: kho's
  QIDO does all three, so the study list asks for what it shows in one query;
- ``bulkDataURI.enabled``: metadata carries absolute BulkDataURIs (kho writes them under the
  request's public address); ``singlepart: 'bulkdata,video,pdf'`` asks for those as single
  parts (no multipart parsing in the browser);
- ``omitQuotationForMultipartRequest``: the unquoted ``type=`` OHIF's tools send (kho
  takes both).
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse

from kho.viewer_api import ohif
from kho.viewer_api.security import public

router = APIRouter(tags=["viewer"], dependencies=[Depends(public)], include_in_schema=False)

VIEWER = "/viewer"
#: the launch cookie's companion (not a credential): tells app-config.js that this browser
#: was launched by an EMR, so OHIF's own sign-in is skipped
LAUNCH_MARK_COOKIE = "kho_launched"

_MEDIA_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".json": "application/json",
    ".jsonc": "application/json",
    ".map": "application/json",
    ".webapp": "application/x-web-app-manifest+json",
    ".wasm": "application/wasm",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".ico": "image/x-icon",
    ".gif": "image/gif",
    ".woff": "font/woff",
    ".woff2": "font/woff2",
    ".ttf": "font/ttf",
    ".xml": "application/xml",
    ".txt": "text/plain; charset=utf-8",
    ".md": "text/markdown; charset=utf-8",
}
#: file names with a content hash (webpack's [contenthash:16]): cached for a year
_HASHED = re.compile(r"(^|[.])[0-9a-f]{16}\.[a-z0-9]+$")
IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATE = "no-cache"
#: how often a missing or replaced build is looked for again
_RECHECK_S = 1.0

#: runs first in the viewer's page: a launch may hand a token in the URL fragment
#: (``#token=...``); it moves to sessionStorage and, for OHIF, into the ``token`` query
#: parameter (OHIF sends it as a bearer token and takes it off the URL at once).  The
#: fragment never reaches a server or its logs.
_LAUNCH_SCRIPT = (
    "<script>(function(){try{var k='kho.token',m=/(?:^#|&)token=([^&]+)/"
    ".exec(location.hash),t=m?decodeURIComponent(m[1]):null;if(t){sessionStorage"
    ".setItem(k,t)}else{t=sessionStorage.getItem(k)}if(t){var u=new URL(location.href);"
    "u.hash='';if(!u.searchParams.has('token')){u.searchParams.set('token',t)}"
    "history.replaceState(null,'',u.toString())}}catch(e){}})()</script>"
)

_NOT_INSTALLED = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>kho viewer: not installed</title>
<meta name="viewport" content="width=device-width,initial-scale=1">
<style>body{{font:16px system-ui,sans-serif;max-width:42em;margin:3em auto;padding:0 1em;
color:#1b1f24}}code{{background:#eef1f4;padding:.1em .3em}}</style></head>
<body><h1>The viewer is not installed yet</h1>
<p>{status}</p>
<p>kho serves the OHIF viewer (version {version}, MIT licence) from its data directory.
To install it by hand:</p>
<ul><li>with access to registry.npmjs.org: <code>kho viewer install</code></li>
<li>offline: download <code>{tarball}</code> elsewhere, bring the file over and run
<code>kho viewer install --from app-{version}.tgz</code> (its SHA-512 is checked against
the one kho pins)</li></ul>
<p>This page reloads itself when the viewer is ready.</p>
<script>setTimeout(function(){{location.reload()}},10000)</script>
</body></html>
"""


class ViewerFiles:
    """The installed build (found again when it appears or is replaced) and the pages
    made from it, per path prefix."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        #: an install running in this process (kho serve), for the placeholder page
        self.pending: ohif.BackgroundInstall | None = None
        self._build: ohif.OhifBuild | None = None
        self._current_mtime: float | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        self._index: dict[str, bytes] = {}
        self._configs: dict[tuple[str, bool, bool], bytes] = {}

    def build(self) -> ohif.OhifBuild | None:
        now = time.monotonic()
        if now - self._checked < _RECHECK_S:
            return self._build
        with self._lock:
            self._checked = now
            try:
                mtime: float | None = (self.directory / ohif.CURRENT).stat().st_mtime
            except OSError:
                mtime = None
            if mtime != self._current_mtime or self._build is None:
                self._current_mtime = mtime
                self._build = ohif.installed(self.directory) if mtime is not None else None
                self._index.clear()
        return self._build

    def index_html(self, build: ohif.OhifBuild, base: str) -> bytes:
        page = self._index.get(base)
        if page is None:
            original = (build.dist / "index.html").read_text(encoding="utf-8")
            page = self._index[base] = render_index(original, base).encode()
        return page

    def config_js(self, settings: Any, prefix: str, launched: bool) -> bytes:
        key = (prefix, bool(settings.auth_on), launched)
        script = self._configs.get(key)
        if script is None:
            script = self._configs[key] = app_config(settings, prefix, launched=launched).encode()
        return script

    def status(self) -> str:
        pending = self.pending
        if pending is None:
            return f"No OHIF build was found in {self.directory}."
        if pending.error:
            return f"Installing it on start failed: {pending.error}"
        if not pending.done.is_set():
            return f"It is being installed now ({pending.status}); this takes a minute."
        return "It was just installed."


def render_index(original: str, base: str) -> str:
    """The build's index.html served under ``base`` (``<prefix>/viewer/``)."""
    html = re.sub(r"<script[^>]*init-service-worker\.js[^>]*>\s*</script>", "", original)
    html = html.replace('window.PUBLIC_URL="/"', f"window.PUBLIC_URL={_js_string(base)}")
    html = re.sub(r'(\s(?:href|src|content))="/(?!/)', lambda m: f'{m.group(1)}="{base}', html)
    return html.replace("<head>", "<head>" + _LAUNCH_SCRIPT, 1)


def _js_string(text: str) -> str:
    """A JavaScript string literal safe inside an HTML script element."""
    return json.dumps(text).replace("<", "\\u003c").replace(">", "\\u003e")


def data_source(settings: Any, *, launched: bool) -> dict[str, Any]:
    """OHIF's DICOMweb data source for kho (roots filled in by the page: see app_config)."""
    # an <img> sends no bearer token; it does send a launch session's cookie
    direct_thumbnails = not settings.auth_on or launched
    return {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "kho",
        "configuration": {
            "friendlyName": "kho",
            "name": "kho",
            "qidoSupportsIncludeField": True,
            "supportsReject": False,
            "supportsStow": False,
            "dicomUploadEnabled": False,
            "imageRendering": "wadors",
            "thumbnailRendering": "thumbnailDirect" if direct_thumbnails else "thumbnail",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": True,
            "supportsWildcard": True,
            "staticWado": False,
            "singlepart": "bulkdata,video,pdf",
            "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
            "omitQuotationForMultipartRequest": True,
        },
    }


def oidc_client(settings: Any) -> dict[str, Any] | None:
    """OHIF's OpenID Connect sign-in, when authentication is on with an issuer and the
    viewer has a client id there (setting ``viewer_oidc_client_id``): the authorization
    code flow with PKCE, a public client (no secret in a browser)."""
    client_id = str(settings.viewer_oidc_client_id or "")
    if not (settings.auth_on and settings.oidc_issuer and client_id):
        return None
    scope = str(settings.viewer_oidc_scope or "openid profile")
    return {
        "authority": settings.oidc_issuer,
        "client_id": client_id,
        "redirect_uri": "/callback",
        "silent_redirect_uri": "/silent-refresh.html",
        "post_logout_redirect_uri": "/",
        "response_type": "code",
        "scope": scope,
        "automaticSilentRenew": True,
        "revokeAccessTokenOnSignout": True,
    }


def app_config(settings: Any, prefix: str, *, launched: bool = False) -> str:
    """``app-config.js`` for the viewer served under ``prefix`` (``''``, a proxy prefix,
    ``/tenants/<t>``): OHIF reads kho's DICOMweb at ``<origin><prefix>/dicom-web``."""
    config: dict[str, Any] = {
        "routerBasename": prefix + VIEWER,
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 3,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": True,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "groupEnabledModesFirst": True,
        "maxNumRequests": {"interaction": 100, "thumbnail": 75, "prefetch": 25},
        "defaultDataSourceName": "kho",
        "dataSources": [data_source(settings, launched=launched)],
    }
    oidc = None if launched else oidc_client(settings)
    if oidc is not None:
        config["oidc"] = [oidc]
    return (
        "/* kho: OHIF's configuration for this archive (made by kho.viewer_api.viewer) */\n"
        "(function () {\n"
        f"  var dicomweb = window.location.origin + {_js_string(prefix + '/dicom-web')};\n"
        f"  var config = {json.dumps(config, indent=2)};\n"
        "  var source = config.dataSources[0].configuration;\n"
        "  source.qidoRoot = source.wadoRoot = source.wadoUriRoot = dicomweb;\n"
        "  try {\n"
        "    // an EMR launch brought its own credential: no sign-in of OHIF's own\n"
        "    if (config.oidc && sessionStorage.getItem('kho.token')) delete config.oidc;\n"
        "  } catch (e) {}\n"
        "  window.config = config;\n"
        "})();\n"
    )


def prefix_of(request: Request) -> str:
    """The path prefix the request came under: a proxy's, ``/tenants/<t>`` (both in the
    root path), or ''."""
    return str(request.scope.get("root_path", "")).rstrip("/")


def files_of(request: Request) -> ViewerFiles:
    files: ViewerFiles = request.app.state.viewer_files
    return files


def _wants_gzip(request: Request) -> bool:
    return "gzip" in request.headers.get("accept-encoding", "").lower()


def _not_installed(files: ViewerFiles) -> HTMLResponse:
    tarball = f"{ohif.REGISTRY}/@ohif/app/-/app-{ohif.PINNED_VERSION}.tgz"
    body = _NOT_INSTALLED.format(
        status=files.status(), version=ohif.PINNED_VERSION, tarball=tarball
    )
    return HTMLResponse(
        body, status_code=503, headers={"Retry-After": "30", "Cache-Control": "no-store"}
    )


def _page_headers() -> dict[str, str]:
    return {
        "Cache-Control": REVALIDATE,
        # the launch script moves a token into the address for OHIF: no Referer carries it
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "SAMEORIGIN",
    }


def _safe_file(dist: Path, relative: str) -> Path | None:
    """``dist/relative`` when it is a file inside dist (no dot segments, no hidden
    names); None otherwise."""
    parts = [p for p in relative.split("/") if p]
    if not parts or any(p.startswith(".") or "\\" in p or "\x00" in p for p in parts):
        return None
    path = dist.joinpath(*parts)
    return path if path.is_file() else None


def _static(request: Request, path: Path, name: str) -> Response:
    media_type = _MEDIA_TYPES.get(path.suffix.lower(), "application/octet-stream")
    headers = {
        "Cache-Control": IMMUTABLE if _HASHED.search(name) else REVALIDATE,
        "X-Content-Type-Options": "nosniff",
        "Vary": "Accept-Encoding",
    }
    served = path
    twin = path.with_name(path.name + ".gz")
    if _wants_gzip(request) and "range" not in request.headers and twin.is_file():
        served = twin
        headers["Content-Encoding"] = "gzip"
    stat = served.stat()
    etag = f'"{stat.st_size:x}-{stat.st_mtime_ns:x}{"-gz" if served is twin else ""}"'
    headers["ETag"] = etag
    if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
        return Response(status_code=304, headers=headers)
    return FileResponse(served, media_type=media_type, headers=headers)


@router.get("/viewer", summary="The viewer (redirect to /viewer/)")
async def viewer_root(request: Request) -> Response:
    query = request.url.query
    return RedirectResponse(
        prefix_of(request) + VIEWER + "/" + (f"?{query}" if query else ""), status_code=308
    )


@router.get("/viewer/app-config.js", summary="OHIF's configuration for this archive")
async def viewer_config(request: Request) -> Response:
    settings = request.app.state.viewer.root_archive.settings
    launched = request.cookies.get(LAUNCH_MARK_COOKIE) == "1"
    script = files_of(request).config_js(settings, prefix_of(request), launched)
    headers = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
    return Response(script, media_type="text/javascript; charset=utf-8", headers=headers)


@router.get("/viewer/{path:path}", summary="The viewer's files and routes")
async def viewer_file(path: str, request: Request) -> Response:
    files = files_of(request)
    build = files.build()
    last = path.rsplit("/", 1)[-1]
    if build is None:
        if "." in last and last != "index.html":
            return Response("the viewer is not installed", status_code=404)
        return _not_installed(files)
    if path and last != "index.html":
        found = _safe_file(build.dist, path)
        if found is not None:
            return _static(request, found, last)
        if "." in last:  # a file that is not there: not the app's page (a clear 404)
            return Response("no such file", status_code=404, media_type="text/plain")
    base = prefix_of(request) + VIEWER + "/"
    page = files.index_html(build, base)
    return Response(page, media_type="text/html; charset=utf-8", headers=_page_headers())
