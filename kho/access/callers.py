"""Who is asking: a caller, the roles it holds and for which hospitals (tenants).

Every request reaches the archive with a :class:`Caller`: a person or application with an
OIDC bearer token, a machine with an API key, a DICOM peer from the AE registry, the local
user of an archive running with authentication off (loopback), or a share or launch token.
The caller travels with the request so that audit records and queued work know who acted.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from kho.archive.config import PLATFORM
from kho.errors import AccessDeniedError


class Role(StrEnum):
    """What a grant allows.  ``admin`` includes the other two; ``uploader`` does not read
    (a modality pushes studies but has no business listing patients)."""

    VIEWER = "viewer"  # query, retrieve, metadata, rendered images
    UPLOADER = "uploader"  # STOW-RS
    ADMIN = "admin"  # statistics, metrics, keys, settings-level operations; and both above


class CallerKind(StrEnum):
    TOKEN = "token"  # OIDC bearer token (JWT)
    API_KEY = "api_key"  # kho keys create
    DICOM = "dicom"  # a registered DICOM peer (AE registry)
    OPEN = "open"  # authentication off: the loopback user of a zero-set-up archive
    SHARE = "share"  # a patient's share link (one study)
    LAUNCH = "launch"  # an EMR launch token (its studies)


@dataclass(frozen=True, slots=True)
class Grant:
    """One role for one tenant, or for the whole platform (tenant ``"*"``)."""

    role: Role
    tenant: str

    def covers(self, role: Role, tenant: str) -> bool:
        return (self.role == role or self.role == Role.ADMIN) and self.tenant in (
            tenant,
            PLATFORM,
        )

    def __str__(self) -> str:
        return f"{self.role.value}@{self.tenant}"


def parse_grants(
    entries: Iterable[str], *, home_tenant: str | None, known_tenants: Iterable[str]
) -> frozenset[Grant]:
    """Grants from role strings: ``viewer`` (for ``home_tenant``), ``viewer@hosp-a``,
    ``admin@*`` (platform).  Unknown roles, undeclared tenants and unqualified roles
    without a home tenant grant nothing (deny by default)."""
    known = set(known_tenants)
    grants = set()
    for entry in entries:
        role_text, _, tenant = str(entry).partition("@")
        try:
            role = Role(role_text.strip())
        except ValueError:
            continue
        tenant = tenant.strip() or (home_tenant or "")
        if tenant == PLATFORM or tenant in known:
            grants.add(Grant(role, tenant))
    return frozenset(grants)


@dataclass(frozen=True, slots=True)
class Caller:
    """One authenticated (or, with authentication off, assumed) caller."""

    kind: CallerKind
    #: who: the token's user claim, the API key's name, the AE title
    name: str
    grants: frozenset[Grant] = field(default_factory=frozenset)
    #: the hospital the caller acts for when a request names none (the token's tenant
    #: claim, the key's or AE's tenant; the default tenant for platform-wide callers)
    home_tenant: str = ""
    #: the network address it called from
    address: str = ""
    #: share and launch tokens: the only studies it may see (None: whatever grants allow)
    studies: frozenset[str] | None = None

    def may(self, role: Role, tenant: str) -> bool:
        return any(grant.covers(role, tenant) for grant in self.grants)

    def require(self, role: Role, tenant: str) -> None:
        """Raise AccessDeniedError unless a grant covers ``role`` in ``tenant``."""
        if not self.may(role, tenant):
            raise AccessDeniedError(f"{self.kind.value} {self.name!r} may not {role.value} here")

    @property
    def platform_wide(self) -> bool:
        return any(grant.tenant == PLATFORM for grant in self.grants)

    def tenants(self, role: Role, all_tenants: Iterable[str]) -> list[str]:
        """The tenants where ``role`` is granted, in the archive's order."""
        return [t for t in all_tenants if self.may(role, t)]

    def describe(self) -> str:
        grants = ", ".join(sorted(str(g) for g in self.grants)) or "no grants"
        return f"{self.kind.value}:{self.name} ({grants})"


def open_caller(default_tenant: str, address: str = "") -> Caller:
    """The caller of an archive with authentication off: a platform admin."""
    return Caller(
        CallerKind.OPEN,
        "anonymous",
        frozenset({Grant(Role.ADMIN, PLATFORM)}),
        home_tenant=default_tenant,
        address=address,
    )
