"""DICOMweb (PS3.18) for EMR viewers, under ``/dicom-web``.

Entry points: :func:`kho.viewer_api.app.create_app` (the FastAPI application; OpenAPI at
``/openapi.json``, docs at ``/docs``) and :class:`kho.viewer_api.server.HttpServer`
(uvicorn in a background thread).

Resources (one router per module):

- qido.py: ``GET /studies``, ``/series``, ``/instances``, ``/studies/{s}/series``,
  ``/studies/{s}/instances``, ``/studies/{s}/series/{se}/instances`` (keywords or tags,
  ``includefield`` incl. ``all``, ``limit``, ``offset``, ``fuzzymatching``);
- wado.py: ``GET /studies/{s}[/series/{se}[/instances/{i}]]`` (multipart application/dicom,
  as stored), ``.../metadata`` (DICOM JSON made at ingest), ``.../frames/{list}``
  (stored syntax when accepted, else decoded), ``.../bulkdata/{tag}``;
- rendered.py: ``.../rendered``, ``.../frames/{f}/rendered`` (``window``, ``viewport``,
  ``quality``, ``accept``), ``thumbnail`` at study, series, instance and frame level, and
  ``.../frames/{f}/tiles/{level}/{x}/{y}`` (256x256 JPEG/PNG tiles; level 0 = full size);
- stow.py: ``POST /studies``, ``POST /studies/{s}`` (multipart/related application/dicom).

security.py: who may call what.  An ASGI middleware authenticates every request (OIDC
bearer token or API key, kho.access) before the fast path and the routers, answering 401
with ``WWW-Authenticate: Bearer``; each router declares the role its routes need
(``requires(Role.VIEWER)``: QIDO, WADO, rendered; uploader: STOW; admin: /metrics) and
create_app refuses a route that declares none.  ``/tenants/<t>/dicom-web/...`` is the same
API acting in hospital ``<t>``; ``/dicom-web/...`` acts in the caller's own.  Routes read
the archive of the tenant the request acts in (deps.ArchiveDep).

fastpath.py dispatches the requests viewers repeat most (frames, instance and frame
thumbnails, tiles, series metadata) to the same handlers without FastAPI's routing and
dependency solving (most of a small request's CPU); metrics.py times every request by
route template.  paths.py checks every path parameter (UIDs as ingest accepts them, frame
numbers), for the routers and the fast path alike: a blank or malformed UID is 400, never
"everything"; head.py answers HEAD wherever GET works.  Errors map to statuses in errors.py
only.  CORS origins and the STOW-RS size limit are settings (``cors_origins``,
``stow_max_bytes``).
"""
