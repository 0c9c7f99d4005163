"""Who is asking, and may they: authentication, roles and tenants for every HTTP route.

Two halves, one rule:

- :class:`Authenticate` (plain ASGI middleware, outside the fast path and FastAPI's router,
  so both see its result) turns the request's ``Authorization: Bearer`` or ``X-API-Key``
  header into a :class:`~kho.access.Caller` (``kho.access.Access.authenticate_http``) and
  leaves it in the scope, or answers 401 with ``WWW-Authenticate: Bearer``.  It also takes
  the tenant prefix off: ``/tenants/<t>/dicom-web/...`` is served by the ``/dicom-web``
  routes, with ``<t>`` kept in the scope and ``/tenants/<t>`` added to ``root_path`` so that
  Retrieve URLs and BulkDataURIs come out under the same prefix.
- :func:`authorize` decides, per route, whether the caller holds the route's role in the
  tenant the request acts in, and hands the route that tenant's Archive.  Routers declare
  the role with :func:`requires` (FastAPI ``Security`` scopes); the fast path calls the same
  :func:`authorize_scope` before answering.  :func:`check_routes` makes create_app refuse an
  application with a route that declares no role, so a new route cannot be forgotten.

Exempt from authentication, and nothing else: a CORS preflight (browsers never send
credentials with one; it reaches no route), the peer spool route (host to host, with its
own token: kho.storage.peer), the share page under ``/s/`` (its token is in its path:
kho.viewer_api.share checks it, PIN and all), and the public pages' files (:func:`is_public`:
the start page's shell and the OHIF viewer, which hold no patient data; what they show
comes through the DICOMweb routes, with the caller's credential).

Share links and launch tokens (kho.access.links) make callers with ``Caller.studies`` set.
They arrive as a bearer token, or as the session cookie :data:`SESSION_COOKIE` that the
share page (or a launch) sets -- taken only on GET and HEAD under ``/dicom-web``, where a
page's image reads go, and only from a request with no Authorization or X-API-Key header.
Such a caller reaches ``/dicom-web`` and nothing else: a route that names a study
(``{study}``) answers only for its studies (:func:`require_study`, checked here, in the
fast path and again where the instance is loaded, deps.py); the three searches without a
study (``/studies``, ``/series``, ``/instances``) are narrowed to its studies
(:func:`narrow_search`); any other route is 403.

401: no credential, or one that does not hold.  403: a valid caller whose grants do not
cover the route's role in the tenant asked for -- also for an undeclared tenant, so tenant
names are not disclosed.  A UID that is not in the caller's tenant is 404, as a UID that
exists nowhere: each tenant has its own catalog, and another hospital's studies are simply
not there.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Set
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Protocol
from urllib.parse import parse_qsl, urlencode

from fastapi import Depends, FastAPI, Request, Security
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer, SecurityScopes
from starlette.concurrency import run_in_threadpool
from starlette.requests import cookie_parser
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from kho.access.callers import Caller, Role
from kho.access.service import API_KEY_PREFIX
from kho.archive.config import PLATFORM
from kho.errors import AccessDeniedError, AuthenticationError, KhoError
from kho.storage.peer import PEER_SPOOL_PATH
from kho.viewer_api.errors import access_error_response, error_response

if TYPE_CHECKING:
    from kho.access.service import Access
    from kho.archive.archive import Archive

#: scope keys: the authenticated caller; the tenant the path names (None: the caller's
#: home tenant); what authorize() decided for the route
CALLER_KEY = "kho.caller"
TENANT_KEY = "kho.tenant"
AUTHORIZED_KEY = "kho.authorized"

TENANTS_PREFIX = "/tenants/"
#: what may follow ``/tenants/<t>``: the routes that act in one tenant
#: (the viewer too: ``/tenants/<t>/viewer/`` is OHIF reading that tenant's DICOMweb; and the
#: EMR launch, resolving studies in that tenant; share links and launch tokens made there)
TENANT_SCOPED = (
    "/dicom-web",
    "/metrics",
    "/viewer",
    "/IHEInvokeImageDisplay",
    "/api/shares",
    "/api/launch",
)
_TENANT_PATH = re.compile(r"/tenants/([^/]+)(/.*)?")

#: the patient's share page (kho.viewer_api.share): its token is in its path
SHARE_PAGE_PREFIX = "/s/"
#: paths whose routes check a credential of their own (the middleware lets them through)
#: an EMR launch's browser half (kho.viewer_api.launch): its launch token is in its path
LAUNCH_PAGE_PREFIX = "/launch/"
OWN_CREDENTIAL_PREFIXES = (PEER_SPOOL_PATH, SHARE_PAGE_PREFIX, LAUNCH_PAGE_PREFIX)
API_KEY_HEADER = "X-API-Key"

#: served to anyone, credential or not: the start page's shell (``/`` and its script and
#: style under ``/start/``) and the OHIF viewer's static files and configuration (under
#: ``/viewer``).  None holds patient data: every datum these pages show comes from the
#: DICOMweb routes, with the caller's credential, through the rule below
PUBLIC_PATHS = frozenset({"/", "/favicon.ico", "/viewer"})
PUBLIC_PREFIXES = ("/start/", "/viewer/")


def is_public(path: str) -> bool:
    """Whether ``path`` (as the routes see it) is one of the public pages' files."""
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


#: the session cookie of a share link or launch (kho.access.links sessions)
SESSION_COOKIE = "kho_session"
#: where a share or launch caller may go, and where its session cookie is read
DICOMWEB_PREFIX = "/dicom-web"
#: the searches that name no study: narrowed to a share or launch caller's studies
STUDY_SEARCHES = frozenset(
    f"{DICOMWEB_PREFIX}/{level}" for level in ("studies", "series", "instances")
)
#: scope key: the search was narrowed (authorize_scope lets such a caller through then)
NARROWED_KEY = "kho.narrowed"
#: the query parameter names QIDO reads as Study Instance UID (its keyword, its tag with or
#: without a comma, either case), once stripped as QIDO strips them: a name missed here
#: would add its values to the caller's own (QIDO takes a repeated key as "any of")
_STUDY_UID_PARAM = re.compile(r"studyinstanceuid|0020,?000d")


class UnguardedRouteError(KhoError, RuntimeError):
    """create_app found a route that declares no role (deny by default: refuse to start)."""


# --- the tenant prefix ------------------------------------------------------------------


def route_path(scope: Scope) -> str:
    """The path the routes see: the request's path without the scope's ``root_path``
    (which holds a proxy's prefix and the ``/tenants/<t>`` prefix taken off)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("/", ""):
        return path[len(root) :] or "/"
    return path


def split_tenant(path: str) -> tuple[str | None, str]:
    """``("hosp-a", "/dicom-web/studies")`` for ``/tenants/hosp-a/dicom-web/studies``;
    ``(None, path)`` for a path with no tenant prefix or one no tenant route follows."""
    if not path.startswith(TENANTS_PREFIX):
        return None, path
    m = _TENANT_PATH.fullmatch(path)
    if m is None or not m.group(2):
        return None, path
    rest = m.group(2)
    for scoped in TENANT_SCOPED:
        if rest == scoped or rest.startswith(scoped + "/"):
            return m.group(1), rest
    return None, path


# --- authentication (middleware) -----------------------------------------------------


class Authenticate:
    """ASGI middleware: the caller of every HTTP request, in ``scope[CALLER_KEY]``.

    Most requests are authenticated on the event loop: with authentication off there is
    nothing to check; an API key is one primary-key lookup (as every route's instance
    lookup is); a bearer token seen before is a dictionary hit in the verifier.  A bearer
    token not seen before goes to a worker thread once: its check may have to fetch the
    issuer's keys (first use, rotation), which must not stall every other request."""

    #: bearer tokens that verified, remembered (their text) up to this many
    SEEN_TOKENS = 4096

    def __init__(self, app: ASGIApp, access: Access) -> None:
        self.app = app
        self.access = access
        self._seen_tokens: set[str] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan; no websocket route exists (check_routes)
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        if path.startswith(TENANTS_PREFIX):
            tenant, rest = split_tenant(path)
            if tenant is not None:
                # routed as /dicom-web/...; URLs built from request.base_url keep the prefix
                scope["root_path"] = scope.get("root_path", "") + TENANTS_PREFIX + tenant
                scope[TENANT_KEY] = tenant
                path = rest
        if path.startswith(OWN_CREDENTIAL_PREFIXES) or _is_preflight(scope) or is_public(path):
            await self.app(scope, receive, send)
            return
        try:
            caller = scope[CALLER_KEY] = await self.authenticate(scope, path)
            if caller.studies is not None:
                confine(scope, path, caller.studies)
        except (AuthenticationError, AccessDeniedError) as exc:
            await access_error_response(exc)(scope, receive, send)
            return
        except KhoError as exc:  # the key store unreachable: 503, not a crash
            await error_response(exc)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def authenticate(self, scope: Scope, path: str) -> Caller:
        client = scope.get("client")
        address = client[0] if client else ""
        access = self.access
        if not access.enabled:
            return access.authenticate_http(None, None, address)
        authorization = api_key = cookies = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                if authorization is not None:
                    raise AuthenticationError("more than one Authorization header")
                authorization = value.decode("latin-1")
            elif name == b"x-api-key":
                if api_key is not None:
                    raise AuthenticationError(f"more than one {API_KEY_HEADER} header")
                api_key = value.decode("latin-1")
            elif name == b"cookie":
                cookies = value.decode("latin-1") if cookies is None else cookies
        session = _session_cookie(scope, path, cookies)
        if access.tokens is None or not self._new_token(authorization, api_key):
            return access.authenticate_http(authorization, api_key, address, session)
        caller = await run_in_threadpool(access.authenticate_http, authorization, api_key, address)
        if len(self._seen_tokens) >= self.SEEN_TOKENS:
            self._seen_tokens.clear()  # refills from live traffic
        self._seen_tokens.add(_credential(authorization, api_key))
        return caller

    def _new_token(self, authorization: str | None, api_key: str | None) -> bool:
        """Whether the credential is a bearer token (not an API key) not seen to verify."""
        credential = _credential(authorization, api_key)
        if not credential or credential.startswith(API_KEY_PREFIX):
            return False
        return credential not in self._seen_tokens


def _credential(authorization: str | None, api_key: str | None) -> str:
    """The credential text as kho.access.service reads it: the API key header, else what
    follows ``Bearer``."""
    if api_key is not None:
        return api_key
    return (authorization or "").strip().partition(" ")[2].strip()


def _session_cookie(scope: Scope, path: str, cookies: str | None) -> str | None:
    """The share or launch session cookie, where it counts: a read (GET, HEAD) under
    /dicom-web.  Nowhere else, so a cookie cannot carry a write (SameSite=Strict is the
    browser's half of that) nor reach anything beyond a page's image reads."""
    if cookies is None or scope["method"] not in ("GET", "HEAD"):
        return None
    if not path.startswith(DICOMWEB_PREFIX + "/"):
        return None
    return cookie_parser(cookies).get(SESSION_COOKIE) or None


def confine(scope: Scope, path: str, studies: Set[str]) -> None:
    """A share or launch caller's request: under /dicom-web only (AccessDeniedError
    elsewhere), and a search that names no study narrowed to its studies."""
    if not path.startswith(DICOMWEB_PREFIX + "/"):
        raise AccessDeniedError("a share link or launch token reaches its studies only")
    if path in STUDY_SEARCHES and scope["method"] in ("GET", "HEAD"):
        narrow_search(scope, studies)


def narrow_search(scope: Scope, studies: Set[str]) -> None:
    """Narrow a search to ``studies``, in the query string itself (before any Request
    object reads it): with no StudyInstanceUID asked, the caller's studies are added as a
    UID list; with some asked, each must be one of them (AccessDeniedError otherwise: the
    same answer as naming another study in a path).  Marks the scope (NARROWED_KEY)."""
    raw = scope.get("query_string", b"").decode("latin-1")
    pairs = parse_qsl(raw, keep_blank_values=True)
    asked = [value for name, value in pairs if _STUDY_UID_PARAM.fullmatch(name.strip().lower())]
    if asked:
        uids = [
            uid.strip() for value in asked for part in value.split(",") for uid in part.split("\\")
        ]
        if any(uid not in studies for uid in uids):
            raise AccessDeniedError("a share link or launch token searches its studies only")
    else:
        pairs.append(("StudyInstanceUID", ",".join(sorted(studies))))
        scope["query_string"] = urlencode(pairs).encode("latin-1")
    scope[NARROWED_KEY] = True


def _is_preflight(scope: Scope) -> bool:
    """A CORS preflight: OPTIONS with Access-Control-Request-Method.  No route takes
    OPTIONS (check_routes), so letting it through reaches CORS' answer or a 405."""
    if scope["method"] != "OPTIONS":
        return False
    return any(name == b"access-control-request-method" for name, _ in scope["headers"])


# --- authorization (routes and the fast path) ------------------------------------------


@dataclass(frozen=True, slots=True)
class Authorized:
    """What authorize() decided for one request: who, with which role, in which tenant,
    and that tenant's archive (what routes read and write)."""

    caller: Caller
    role: Role
    tenant: str
    archive: Archive
    #: the tenant was named in the path (``/tenants/<t>/...``), not the caller's home
    named: bool

    @property
    def platform_view(self) -> bool:
        """A platform-wide grant of the role, asked for no one tenant: sees every tenant
        (/metrics)."""
        return not self.named and self.caller.may(self.role, PLATFORM)


class AccessState(Protocol):
    """What authorization needs of the application's state (deps.ViewerState)."""

    @property
    def access(self) -> Access: ...

    @property
    def root_archive(self) -> Archive: ...


def authorize_scope(state: AccessState, scope: Scope, role: Role) -> Authorized:
    """The one authorization rule of every route (FastAPI's and the fast path's): the
    caller the middleware left must hold ``role`` in the tenant the request acts in.
    Raises AuthenticationError when no caller is there (fail closed: a request that did
    not pass the middleware gets nothing) and AccessDeniedError when no grant covers it."""
    caller: Caller | None = scope.get(CALLER_KEY)
    if caller is None:
        raise AuthenticationError("a bearer token or API key is required")
    if caller.studies is not None:
        _scoped_to_studies(caller, scope, role)
    requested: str | None = scope.get(TENANT_KEY)
    tenant = state.access.tenant_for(caller, role, requested)
    archive = state.root_archive.for_tenant(tenant)
    authorized = Authorized(caller, role, tenant, archive, requested is not None)
    scope[AUTHORIZED_KEY] = authorized
    return authorized


def _scoped_to_studies(caller: Caller, scope: Scope, role: Role) -> None:
    """A share or launch caller: reads only, of the study the route names (its path
    parameter, which the router -- or the fast path -- has put in the scope), or a search
    the middleware narrowed to its studies; nothing else."""
    if role != Role.VIEWER:
        raise AccessDeniedError(f"a {caller.kind.value} token may not {role.value}")
    study = (scope.get("path_params") or {}).get("study")
    if study is not None:
        require_study(caller, study)
    elif not scope.get(NARROWED_KEY):
        raise AccessDeniedError(f"a {caller.kind.value} token reaches its studies only")


def require_study(caller: Caller, study: str) -> None:
    """AccessDeniedError unless ``caller`` may see ``study``: a share or launch caller,
    only its own studies; any other caller, whatever its grants allow (checked before)."""
    if caller.studies is not None and study not in caller.studies:
        raise AccessDeniedError(f"this {caller.kind.value} token does not open that study")


_bearer = HTTPBearer(auto_error=False, description="an OIDC access token or a kho API key")
_api_key = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="a kho API key")


async def authorize(
    security_scopes: SecurityScopes,
    request: Request,
    # for the OpenAPI document (which credentials a route takes): the middleware has
    # already authenticated the request from these headers
    _bearer_credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    _api_key_credentials: Annotated[str | None, Depends(_api_key)],
) -> Authorized:
    """The routers' dependency, declared with :func:`requires` (the role is its scope)."""
    (role,) = security_scopes.scopes
    return authorize_scope(request.app.state.viewer, request.scope, Role(role))


def requires(role: Role) -> Any:
    """A router's (or route's) declaration: every route here needs ``role``."""
    return Security(authorize, scopes=[role.value])


async def public() -> None:
    """Marks a route of the public pages (:data:`PUBLIC_PATHS`, :data:`PUBLIC_PREFIXES`):
    the middleware lets its path through, and check_routes accepts it, without a role."""


async def own_credential() -> None:
    """Marks a route that checks a credential of its own (the peer spool route): the
    middleware lets its path through, and check_routes accepts it without a role."""


def authorized_of(scope: Scope) -> Authorized:
    """What authorize() decided for this request; AccessDeniedError when it did not run
    (a route without a role: check_routes refuses those, this is the second lock)."""
    authorized: Authorized | None = scope.get(AUTHORIZED_KEY)
    if authorized is None:
        raise AccessDeniedError("this route declares no role")
    return authorized


# --- deny by default, checked when the application is made ------------------------------


@dataclass(frozen=True, slots=True)
class GuardedRoute:
    """One route of the application and what guards it."""

    path: str  # the template, prefix included: /dicom-web/studies/{study}
    methods: frozenset[str]
    #: the role it declares; None for the documentation pages (any authenticated caller)
    #: and for routes with a credential of their own (``own_credential``)
    role: Role | None
    own_credential: bool = False
    #: a public page's file (no patient data; ``public``)
    public: bool = False


def _route_entries(app: FastAPI) -> Iterator[tuple[BaseRoute, str, set[str], Any]]:
    """(the route as declared, its full path, methods, its dependant) for every route,
    routers included: FastAPI >= 0.16x keeps included routers as one entry of
    ``app.routes`` and resolves their routes lazily (``iter_route_contexts``); older
    versions copy every route into ``app.routes``."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # FastAPI before included routers were kept whole
        for route in app.routes:
            path = str(getattr(route, "path", ""))
            methods = set(getattr(route, "methods", None) or ())
            yield route, path, methods, getattr(route, "dependant", None)
        return
    for context in iter_route_contexts(app.routes):
        original = context.original_route
        dependant = getattr(context, "dependant", None) if isinstance(original, APIRoute) else None
        yield original, str(context.path or ""), set(context.methods or ()), dependant


def declared_roles(dependant: Any) -> list[str]:
    """The roles the route's authorize dependencies name (the router's among them)."""
    roles: list[str] = []
    for sub in getattr(dependant, "dependencies", ()):
        if sub.call is authorize:
            roles += sub.own_oauth_scopes or []
    return roles


def _checks_own_credential(dependant: Any) -> bool:
    return any(sub.call is own_credential for sub in getattr(dependant, "dependencies", ()))


def _is_public_route(dependant: Any) -> bool:
    return any(sub.call is public for sub in getattr(dependant, "dependencies", ()))


def check_routes(app: FastAPI) -> list[GuardedRoute]:
    """Every route of ``app`` guarded: each API route declares exactly one role (or, under
    an own-credential prefix, checks its own credential); the only other routes are
    FastAPI's documentation pages (GET, for any authenticated caller).  Returns the route
    table with each route's role; raises UnguardedRouteError otherwise."""
    docs = {app.openapi_url, app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url}
    table: list[GuardedRoute] = []
    for route, path, methods, dependant in _route_entries(app):
        if isinstance(route, APIRoute):
            if "OPTIONS" in methods:
                raise UnguardedRouteError(f"{path}: OPTIONS is left to CORS preflights")
            roles = declared_roles(dependant)
            if _checks_own_credential(dependant):
                if roles or not path.startswith(OWN_CREDENTIAL_PREFIXES):
                    raise UnguardedRouteError(
                        f"{path}: a route with its own credential must live under "
                        f"{OWN_CREDENTIAL_PREFIXES} and declare no role"
                    )
                table.append(GuardedRoute(path, frozenset(methods), None, own_credential=True))
                continue
            if _is_public_route(dependant):
                template = path.split("{", 1)[0]  # /viewer/{path:path} -> /viewer/
                if roles or not methods <= {"GET", "HEAD"} or not is_public(template):
                    raise UnguardedRouteError(
                        f"{path}: a public route must be a GET under {sorted(PUBLIC_PATHS)} "
                        f"or {PUBLIC_PREFIXES} and declare no role"
                    )
                table.append(GuardedRoute(path, frozenset(methods), None, public=True))
                continue
            if len(roles) != 1 or roles[0] not in {r.value for r in Role}:
                raise UnguardedRouteError(
                    f"{' '.join(sorted(methods))} {path} declares "
                    f"{'no role' if not roles else f'roles {roles}'}: add "
                    "dependencies=[requires(Role.<role>)] to its router (deny by default)"
                )
            table.append(GuardedRoute(path, frozenset(methods), Role(roles[0])))
        elif isinstance(route, Route) and path in docs and methods <= {"GET", "HEAD"}:
            # the API's description: no patient data, for any authenticated caller
            table.append(GuardedRoute(path, frozenset(methods), None))
        else:
            raise UnguardedRouteError(f"{path}: {type(route).__name__} routes cannot be guarded")
    return table
