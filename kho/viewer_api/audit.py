"""The HTTP door's audit trail: one ASGI middleware that observes every request once it is
answered and tells the Auditor what happened (kho.audit.auditor).  It never changes a
response: recording happens after the last byte is sent.

- 401: Security Alert (a credential that does not hold, or none);
- 403: Security Alert (a known caller beyond its grants);
- a successful GET of a collection (``/studies``, ``.../series``, ``.../instances``): Query,
  with the path and query string;
- a successful GET under one study (metadata, frames, rendered, thumbnails, bulk data):
  Instances Accessed, one per caller and study per window;
- the first request of a token or API key per window: User Authentication (success).
STOW-RS records its instances in their own commits (stow.py, ``with_rows``).
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kho.access.callers import Caller, CallerKind
from kho.audit.auditor import Auditor
from kho.audit.coalesce import AccessCoalescer
from kho.audit.messages import AlertReason
from kho.viewer_api.deps import ViewerState
from kho.viewer_api.security import AUTHORIZED_KEY, CALLER_KEY, Authorized, route_path

_COLLECTIONS = ("studies", "series", "instances")
#: paths whose next segment is a credential (share links, launch tokens): never recorded
_SECRET_SEGMENT_AFTER = ("/s/", "/launch/")


def _without_secrets(path: str) -> str:
    """The path as recorded: a share or launch token in it replaced by ``<token>`` (the
    audit trail is read by people who must not be able to open the link)."""
    for prefix in _SECRET_SEGMENT_AFTER:
        if path.startswith(prefix):
            rest = path[len(prefix) :]
            _token, slash, tail = rest.partition("/")
            return f"{prefix}<token>{slash}{tail}"
    return path


_AUTHENTICATED_KINDS = (CallerKind.TOKEN, CallerKind.API_KEY)


class AuditTrail:
    """ASGI middleware (outside authentication: it sees every refusal too)."""

    def __init__(self, app: ASGIApp, state: ViewerState, prefix: str) -> None:
        self.app = app
        self.state = state  # its auditor: None until kho serve sets one (tests: none)
        self.prefix = prefix
        self._logins: AccessCoalescer | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        auditor = self.state.auditor
        if scope["type"] != "http" or auditor is None or not auditor.enabled:
            await self.app(scope, receive, send)
            return
        status = 0

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        await self.app(scope, receive, send_status)
        try:
            self._observe(auditor, scope, status)
        except Exception:  # an observer never breaks a request (already answered)
            import logging

            logging.getLogger(__name__).exception("audit: request not recorded")

    def _observe(self, auditor: Auditor, scope: Scope, status: int) -> None:
        client = scope.get("client")
        address = client[0] if client else ""
        path = _without_secrets(route_path(scope))
        if status == 401:
            auditor.security_alert(
                AlertReason.BAD_TOKEN, address=address, description=f"{scope['method']} {path}"
            )
            return
        caller: Caller | None = scope.get(CALLER_KEY)
        if status == 403:
            auditor.security_alert(
                AlertReason.DENIED_REQUEST,
                user=caller or "",
                address=address,
                description=f"{scope['method']} {path}",
            )
            return
        if self._logins is None:
            self._logins = AccessCoalescer(auditor.read_window_s)
        if (
            caller is not None
            and caller.kind in _AUTHENTICATED_KINDS
            and self._logins.admit((caller.kind, caller.name), address)
        ):
            auditor.authentication(caller, success=True, address=address)
        authorized: Authorized | None = scope.get(AUTHORIZED_KEY)
        if authorized is None or not 200 <= status < 300 or scope["method"] not in ("GET", "HEAD"):
            return
        if not path.startswith(self.prefix + "/"):
            return  # /metrics and the like: no patient data
        parts = path[len(self.prefix) + 1 :].split("/")
        if parts[-1] in _COLLECTIONS:
            query = scope.get("query_string", b"").decode("latin-1")
            auditor.query(
                authorized.caller,
                authorized.tenant,
                target=path,
                query=query,
                via="QIDO-RS",
            )
        elif len(parts) >= 2 and parts[0] == "studies":
            auditor.accessed(authorized.caller, authorized.tenant, parts[1], via="WADO-RS")
