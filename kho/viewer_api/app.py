"""The FastAPI application: DICOMweb under ``/dicom-web`` on one Archive, the OHIF viewer at
``/viewer/``, the start page at ``/``, the EMR launch (IHE Invoke Image Display).

CORS origins and the STOW-RS size limit come from the archive's settings
(``cors_origins`` / ``KHO_CORS_ORIGINS``, ``stow_max_bytes`` / ``KHO_STOW_MAX_BYTES``);
who may call what from its access settings (kho.access, kho.viewer_api.security).
"""

from __future__ import annotations

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware

from kho.access.service import Access
from kho.archive.archive import Archive
from kho.audit.auditor import Auditor
from kho.viewer_api import (
    corrections,
    forwarding,
    launch,
    metrics,
    ohif,
    peer,
    qido,
    rendered,
    share,
    start_page,
    stow,
    viewer,
    wado,
)
from kho.viewer_api.audit import AuditTrail
from kho.viewer_api.deps import ViewerState
from kho.viewer_api.errors import install_error_handlers
from kho.viewer_api.fastpath import FastPath
from kho.viewer_api.head import HeadAsGet
from kho.viewer_api.paths import PathGuard, valid_path
from kho.viewer_api.proxy import ForwardedHeaders
from kho.viewer_api.security import Authenticate, check_routes

PREFIX = "/dicom-web"


def create_app(
    archive: Archive,
    *,
    cors_origins: list[str] | None = None,
    max_upload_bytes: int | None = None,
    fast_path: bool = True,
    access: Access | None = None,
    auditor: Auditor | None = None,
) -> FastAPI:
    """The DICOMweb application for ``archive`` (the caller keeps and closes it).

    ``fast_path=False``: every request through FastAPI's router (the reference the fast
    path is tested against).  ``access``: the access service (one per process, shared with
    the DICOM door); made from the archive's settings when not given.

    Raises UnguardedRouteError when a route declares no role (deny by default)."""
    app = FastAPI(
        title="kho DICOMweb",
        summary="QIDO-RS, WADO-RS (metadata, frames, bulk data, rendered, thumbnails, tiles) "
        "and STOW-RS over the kho archive",
        version="1",
    )
    access = access if access is not None else Access(archive.settings, archive)
    app.state.viewer = ViewerState(
        root_archive=archive,
        access=access,
        auditor=auditor,
        max_upload_bytes=max_upload_bytes
        if max_upload_bytes is not None
        else archive.settings.stow_max_bytes,
    )
    #: the OHIF build (kho.viewer_api.ohif), looked for again until one is installed
    app.state.viewer_files = viewer.ViewerFiles(ohif.viewer_dir(archive.settings))
    install_error_handlers(app)
    # Middleware, outermost first: the public address (a reverse proxy's forwarded headers,
    # or public_url), request timer, CORS (answers preflights, and puts its
    # headers on 401s too, so a browser viewer can read them), HEAD as GET, access (the
    # caller; /tenants/<t> taken off the path), path guard, fast path, FastAPI's router.
    # The fast path answers the hot GET routes without FastAPI's routing and dependency
    # solving; like the router, it sees the caller and a checked path.
    if fast_path:
        app.add_middleware(FastPath, state=app.state.viewer, prefix=PREFIX)
    app.add_middleware(PathGuard, prefix=PREFIX)
    app.add_middleware(Authenticate, access=access)
    # outside authentication: it records the refusals too (once an auditor is set)
    app.add_middleware(AuditTrail, state=app.state.viewer, prefix=PREFIX)
    app.add_middleware(HeadAsGet)
    origins = cors_origins if cors_origins is not None else archive.settings.cors_origins
    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "HEAD", "POST", "DELETE", "OPTIONS"],
            allow_headers=["*"],
            expose_headers=[
                "Content-Type",
                "Content-Length",
                "Warning",
                "Content-Encoding",
                "WWW-Authenticate",
            ],
        )
    # QIDO first: its /studies/{s}/series must not be read as a WADO retrieve; every path
    # parameter (UIDs, frame numbers) checked before any route looks it up.  Each router
    # declares the role its routes need (security.requires).
    for module in (qido, wado, rendered, stow, forwarding, corrections):
        app.include_router(module.router, prefix=PREFIX, dependencies=[Depends(valid_path)])
    app.include_router(peer.router)  # the other hosts' reads of this host's spool
    share.install(app)  # share links (/api/shares, the patient's page /s/), /api/launch
    app.include_router(launch.router)  # IHE Invoke Image Display (the EMR's call)
    app.include_router(launch.pages)  # /launch/<token> (the clinician's browser)
    app.include_router(viewer.router)  # OHIF at /viewer/ (public files)
    app.include_router(start_page.router)  # / (a public page; its data via /dicom-web)
    # /metrics and request latencies by route template
    metrics.install(
        app,
        [(PREFIX, m.router) for m in (qido, wado, rendered, stow, forwarding, corrections)]
        + [("", launch.router), ("", viewer.router), ("", start_page.router)],
    )
    # outermost: every other middleware and route sees the request's public address
    app.add_middleware(ForwardedHeaders, settings=archive.settings)
    check_routes(app)  # deny by default: no route without a declared role
    return app
