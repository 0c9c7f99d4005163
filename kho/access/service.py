"""The access service: turns what a request or association presents into a Caller, and
answers which tenant (hospital) it acts in.  Doors hold one ``Access`` and ask it; routes and
DIMSE handlers never parse credentials themselves."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from kho.access.api_keys import ApiKeys
from kho.access.callers import Caller, Role, open_caller
from kho.access.dicom_peers import AeRegistry
from kho.access.links import LINK_PREFIXES, ShareLinks
from kho.errors import AccessDeniedError, AuthenticationError, NotFoundError

if TYPE_CHECKING:
    from kho.access.tokens import TokenVerifier
    from kho.archive.archive import Archive
    from kho.archive.config import Settings

log = logging.getLogger(__name__)

#: API keys are sent as a bearer token too; their text starts so (JWTs start "eyJ").  Share
#: links, launch tokens and their sessions start ``kho_share_``, ``kho_launch_``,
#: ``kho_session_`` (LINK_PREFIXES): an API key's id is hex, never one of those words
API_KEY_PREFIX = "kho_"


class Access:
    """Authentication and tenant resolution for one archive."""

    def __init__(self, settings: Settings, archive: Archive) -> None:
        self.settings = settings
        self.enabled = settings.auth_on
        self.tenant_names = settings.tenant_names
        self.tokens: TokenVerifier | None = None
        if settings.oidc_issuer:
            from kho.access.tokens import TokenVerifier

            self.tokens = TokenVerifier(settings)
        #: API keys live in the platform (default tenant's) catalog
        self.api_keys: ApiKeys = ApiKeys(archive.catalog, self.tenant_names)
        self.peers: AeRegistry = AeRegistry(settings)
        #: share links, launch tokens and their browser sessions (platform catalog too)
        self.links: ShareLinks = ShareLinks(archive.catalog, self.tenant_names)

    # --- HTTP --------------------------------------------------------------------------

    def authenticate_http(
        self,
        authorization: str | None,
        api_key: str | None,
        address: str = "",
        session: str | None = None,
    ) -> Caller:
        """The caller behind an ``Authorization: Bearer`` header or an ``X-API-Key``
        header, or else behind ``session`` (a share or launch session's cookie: the HTTP
        door passes it only where a browser page's reads go); with authentication off,
        the open (platform admin) caller.  Raises AuthenticationError (401) when
        authentication is on and nothing valid came."""
        if not self.enabled:
            return open_caller(self.settings.default_tenant, address)
        credential = api_key
        if credential is None and authorization:
            scheme, _, value = authorization.strip().partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                raise AuthenticationError("Authorization must be 'Bearer <token>'")
            credential = value.strip()
        if not credential:
            if session:  # a header, when there is one, speaks for the caller instead
                return self.links.verify_session(session, address=address)
            raise AuthenticationError("a bearer token or API key is required")
        if credential.startswith(LINK_PREFIXES):  # before API keys: the same "kho_" start
            return self.links.verify(credential, address=address)
        if credential.startswith(API_KEY_PREFIX):
            return self.api_keys.verify(credential, address=address)
        if self.tokens is None:
            raise AuthenticationError("bearer tokens are not accepted here (no oidc_issuer)")
        return self.tokens.verify(credential, address=address)

    # --- tenants -----------------------------------------------------------------------

    def tenant_for(self, caller: Caller, role: Role, requested: str | None = None) -> str:
        """The tenant a request acts in: the one it names (``/tenants/<t>/...``), else the
        caller's home tenant.  Raises NotFoundError for an undeclared tenant and
        AccessDeniedError when no grant of the caller covers ``role`` there."""
        tenant = requested or caller.home_tenant or self.settings.default_tenant
        if tenant not in self.tenant_names:
            # the same answer as a tenant the caller may not see: names are not disclosed
            raise AccessDeniedError(f"no access to tenant {tenant!r}")
        caller.require(role, tenant)
        return tenant

    def require_known_tenant(self, tenant: str) -> None:
        if tenant not in self.tenant_names:
            raise NotFoundError(f"no tenant {tenant!r}")


__all__ = ["API_KEY_PREFIX", "Access", "AuthenticationError"]
