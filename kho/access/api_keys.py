"""API keys for machine clients (the EMR's back end, scripts): ``kho keys create`` makes one,
shows it once, and keeps only its SHA-256; ``kho keys revoke`` ends it at once for every
process sharing the catalog.

The key text is ``kho_<key id>_<secret>``: the key id finds the row with one primary-key
lookup, the secret (256 random bits) proves the caller holds the key.  Keys live in the
platform catalog (the default tenant's), in one table this module creates on first use.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from kho.access.callers import Caller, CallerKind, Grant, parse_grants
from kho.archive.catalog import Catalog
from kho.archive.config import PLATFORM
from kho.errors import AuthenticationError, CatalogError, ConfigError

#: what every key's text starts with (kho.access.service tells keys from JWTs by it)
KEY_PREFIX = "kho_"
#: bytes of randomness in a key's secret (token_urlsafe: 43 characters)
SECRET_BYTES = 32
#: bytes of randomness in a key id (hex: 12 characters)
KEY_ID_BYTES = 6
_KEY_ID = re.compile(rf"[0-9a-f]{{{2 * KEY_ID_BYTES}}}")
_SECRET = re.compile(r"[A-Za-z0-9_-]{43,128}")
#: longest key name (it appears in logs and audit records as the caller's name)
NAME_MAX = 100

_TABLE = (
    "CREATE TABLE IF NOT EXISTS api_keys ("
    "key_id TEXT PRIMARY KEY, "
    "name TEXT NOT NULL, "
    "key_sha256 TEXT NOT NULL, "
    "grants TEXT NOT NULL, "  # JSON list of "role@tenant" strings
    "created_at DOUBLE PRECISION NOT NULL, "
    "revoked_at DOUBLE PRECISION)"
)


def _digest(text: str) -> str:
    # A plain SHA-256 is the right store for these keys: the secret is 256 random bits, so
    # no dictionary or brute-force attack applies to it, and a slow password KDF (bcrypt,
    # scrypt, argon2) would only add milliseconds to every authenticated request.
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def key_id_of(text: str) -> str | None:
    """The key id inside a key's text (``kho_<id>_<secret>``), or a bare key id; None when
    ``text`` is neither."""
    text = text.strip()
    if text.startswith(KEY_PREFIX):
        text = text[len(KEY_PREFIX) :].partition("_")[0]
    return text if _KEY_ID.fullmatch(text) else None


@dataclass(frozen=True, slots=True)
class ApiKeyInfo:
    """What ``kho keys list`` shows of a key: never its secret nor its hash."""

    key_id: str
    name: str
    grants: list[str]
    created: float  # seconds since the epoch
    revoked: float | None  # when it was revoked; None while it is valid

    def as_dict(self) -> dict[str, object]:
        return {
            "id": self.key_id,
            "name": self.name,
            "grants": list(self.grants),
            "created": _iso(self.created),
            "revoked": _iso(self.revoked) if self.revoked is not None else None,
        }


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


class ApiKeys:
    """The API keys of one archive, in its platform catalog."""

    def __init__(self, catalog: Catalog, tenant_names: Sequence[str]) -> None:
        self.catalog = catalog
        #: every tenant of the archive, the default one first
        self.tenant_names = list(tenant_names)
        self._table_ready = False
        self._table_lock = threading.Lock()
        #: parsed grants by their stored JSON text (a handful of distinct values)
        self._grants_cache: dict[str, frozenset[Grant]] = {}

    # --- the table ---------------------------------------------------------------------

    def _ensure_table(self) -> None:
        if self._table_ready:
            return
        with self._table_lock:
            if self._table_ready:
                return
            try:
                with self.catalog.transaction():
                    self.catalog.execute(_TABLE)
            except CatalogError:
                # PostgreSQL: two processes creating it at the same moment, one loses the
                # race on the catalog's unique name index; the table is there all the same
                self.catalog.fetchone("SELECT count(*) FROM api_keys")
            self._table_ready = True

    # --- grants ------------------------------------------------------------------------

    def validate_grants(self, entries: Iterable[str]) -> list[str]:
        """The grants in canonical form (``role@tenant``); ConfigError for any entry that
        grants nothing (unknown role, undeclared tenant, no tenant named)."""
        canonical: list[str] = []
        for entry in entries:
            parsed = parse_grants([entry], home_tenant=None, known_tenants=self.tenant_names)
            if not parsed:
                raise ConfigError(
                    f"grant {entry!r} grants nothing: write ROLE@TENANT with a role of "
                    f"viewer, uploader or admin and a tenant of {self.tenant_names} "
                    f"(or admin@{PLATFORM} for the whole platform)"
                )
            canonical.extend(str(g) for g in parsed if str(g) not in canonical)
        if not canonical:
            raise ConfigError("an API key needs at least one grant (ROLE@TENANT)")
        return canonical

    def _grants(self, stored: str) -> frozenset[Grant]:
        grants = self._grants_cache.get(stored)
        if grants is None:
            # parsed against today's tenants: a grant for a tenant since removed grants nothing
            grants = parse_grants(
                json.loads(stored), home_tenant=None, known_tenants=self.tenant_names
            )
            if len(self._grants_cache) < 1024:
                self._grants_cache[stored] = grants
        return grants

    # --- administration ------------------------------------------------------------------

    def create(self, name: str, grants: list[str]) -> tuple[str, str]:
        """A new key: ``(key id, key text)``.  The text is returned this once; only its
        SHA-256 is stored."""
        name = name.strip()
        if not name or len(name) > NAME_MAX or not name.isprintable():
            raise ConfigError(f"a key name is 1-{NAME_MAX} printable characters")
        canonical = self.validate_grants(grants)
        self._ensure_table()
        key_id = secrets.token_hex(KEY_ID_BYTES)
        text = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(SECRET_BYTES)}"
        with self.catalog.transaction():
            self.catalog.execute(
                "INSERT INTO api_keys (key_id, name, key_sha256, grants, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (key_id, name, _digest(text), json.dumps(canonical), time.time()),
            )
        return key_id, text

    def list(self) -> list[ApiKeyInfo]:
        """Every key, valid and revoked, oldest first."""
        self._ensure_table()
        rows = self.catalog.fetchall(
            "SELECT key_id, name, grants, created_at, revoked_at FROM api_keys "
            "ORDER BY created_at, key_id"
        )
        return [
            ApiKeyInfo(
                str(key_id),
                str(name),
                list(json.loads(grants)),
                float(created),
                float(revoked) if revoked is not None else None,
            )
            for key_id, name, grants, created, revoked in rows
        ]

    def active_count(self) -> int:
        """How many keys are valid (not revoked)."""
        self._ensure_table()
        row = self.catalog.fetchone("SELECT count(*) FROM api_keys WHERE revoked_at IS NULL")
        return int(row[0]) if row else 0

    def revoke(self, key_id: str) -> bool:
        """Revoke a key (its id, or its text); whether a valid key was revoked.  Every
        process sharing the catalog refuses it from its next request on: verify reads
        the row each time."""
        found = key_id_of(key_id)
        if found is None:
            return False
        self._ensure_table()
        with self.catalog.transaction():
            row = self.catalog.fetchone(
                "SELECT revoked_at FROM api_keys WHERE key_id = ?" + self.catalog.ROW_LOCK,
                (found,),
            )
            if row is None or row[0] is not None:
                return False
            self.catalog.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE key_id = ?", (time.time(), found)
            )
        return True

    # --- authentication ------------------------------------------------------------------

    def verify(self, text: str, *, address: str = "") -> Caller:
        """The caller holding this key; AuthenticationError for a malformed, unknown or
        revoked key.  One primary-key lookup: revocation counts at once."""
        if not text.startswith(KEY_PREFIX):
            raise AuthenticationError("malformed API key")
        key_id, _, secret = text[len(KEY_PREFIX) :].partition("_")
        if not _KEY_ID.fullmatch(key_id) or not _SECRET.fullmatch(secret):
            raise AuthenticationError("malformed API key")
        self._ensure_table()
        row = self.catalog.fetchone(
            "SELECT key_sha256, name, grants, revoked_at FROM api_keys WHERE key_id = ?",
            (key_id,),
        )
        # the same answer for unknown, wrong and revoked keys: nothing to probe
        if row is None:
            raise AuthenticationError("unknown or revoked API key")
        stored, name, grants_text, revoked = row
        if not hmac.compare_digest(str(stored), _digest(text)) or revoked is not None:
            raise AuthenticationError("unknown or revoked API key")
        grants = self._grants(str(grants_text))
        tenants = {g.tenant for g in grants if g.tenant != PLATFORM}
        home = next(iter(tenants)) if len(tenants) == 1 else self.tenant_names[0]
        return Caller(CallerKind.API_KEY, str(name), grants, home_tenant=home, address=address)


__all__ = ["KEY_PREFIX", "ApiKeyInfo", "ApiKeys", "key_id_of"]
