"""Share links for patients and launch tokens for EMRs: credentials scoped to studies.

Three kinds of token, one table, one check:

- a **share link** (``kho_share_<id>_<secret>``) opens one study (or a few) on a patient's
  phone: made by a doctor or admin with the viewer role in the study's hospital, valid
  until it expires (7 days unless told), optionally behind a PIN, revocable at once;
- a **launch token** (``kho_launch_<id>_<secret>``) is what an EMR's back end obtains to
  open the viewer on a patient's studies: valid 5 minutes, to be opened once;
- a **session** (``kho_session_<id>_<secret>``) is what a browser holds after opening
  either (an HttpOnly cookie: kho.viewer_api.share): it lives 2 hours for a share link
  (never past the link's expiry), 8 hours for a launch (a clinician's working session), and
  dies with its link: revoking the link ends its sessions on their next request.

Every token authenticates as a :class:`~kho.access.callers.Caller` of kind SHARE or LAUNCH
with the viewer role in its hospital and ``studies`` set: the HTTP door lets it reach those
studies and nothing else (kho.viewer_api.security).

Storage follows kho.access.api_keys: the text is ``kho_<kind>_<id>_<secret>`` with a
256-bit secret, the id finds the row with one primary-key lookup, only the secret's SHA-256
is kept, in the platform catalog (the default tenant's), in a table made on first use.  A
PIN is low-entropy, so it is kept as a salted scrypt hash, and each link allows
:data:`MAX_PIN_FAILURES` wrong PINs before it locks for good (the doctor makes a new one).
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
from enum import StrEnum

from kho.access.callers import Caller, CallerKind, Grant, Role
from kho.archive.catalog import Catalog
from kho.archive.dataset.attributes import check_uid
from kho.archive.query import engine as query
from kho.errors import (
    AccessDeniedError,
    AuthenticationError,
    CatalogError,
    DatasetMismatchError,
    KhoError,
)


class LinkKind(StrEnum):
    SHARE = "share"
    LAUNCH = "launch"
    SESSION = "session"


#: what each kind's text starts with; API keys are ``kho_<12 hex digits>_...``, and none of
#: these words is hex, so kho.access.service tells them apart by the prefix alone
PREFIXES = {kind: f"kho_{kind.value}_" for kind in LinkKind}
LINK_PREFIXES = tuple(PREFIXES.values())

#: bytes of randomness in a token's secret (token_urlsafe: 43 characters) and id (12 hex)
SECRET_BYTES = 32
ID_BYTES = 6
_ID = re.compile(rf"[0-9a-f]{{{2 * ID_BYTES}}}")
_SECRET = re.compile(r"[A-Za-z0-9_-]{43}")

#: lifetimes (seconds): a share link unless told, and at most; a launch token's window to
#: be opened, and at most; the browser session each opens
SHARE_TTL_S = 7 * 86400
SHARE_MAX_TTL_S = 90 * 86400
LAUNCH_TTL_S = 5 * 60
LAUNCH_MAX_TTL_S = 60 * 60
SESSION_TTL_S = {LinkKind.SHARE: 2 * 3600, LinkKind.LAUNCH: 8 * 3600}
#: wrong PINs a link allows before it locks
MAX_PIN_FAILURES = 5
#: a PIN: digits only (typed on a phone's number pad), this many
PIN_DIGITS = (4, 12)
#: studies one token may name (a launch for a patient with a long history included)
MAX_STUDIES = 500
#: scrypt cost: 16 MiB and ~40 ms per attempt, with a per-link salt
_SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32}

_TABLE = (
    "CREATE TABLE IF NOT EXISTS share_links ("
    "link_id TEXT PRIMARY KEY, "
    "kind TEXT NOT NULL, "
    "parent_id TEXT, "  # a session's link or launch token
    "tenant TEXT NOT NULL, "
    "studies TEXT NOT NULL, "  # JSON list of Study Instance UIDs
    "created_by TEXT NOT NULL, "
    "created_at DOUBLE PRECISION NOT NULL, "
    "expires_at DOUBLE PRECISION NOT NULL, "
    "secret_sha256 TEXT NOT NULL, "
    "pin_hash TEXT, "
    "pin_failures INTEGER NOT NULL DEFAULT 0, "
    "locked_at DOUBLE PRECISION, "
    "revoked_at DOUBLE PRECISION, "
    "opened_at DOUBLE PRECISION, "  # a launch token: when it was exchanged (once)
    "uses INTEGER NOT NULL DEFAULT 0, "
    "last_used_at DOUBLE PRECISION)"
)
_PARENT_INDEX = "CREATE INDEX IF NOT EXISTS share_links_parent ON share_links (parent_id)"

_FIELDS = (
    "link_id",
    "kind",
    "parent_id",
    "tenant",
    "studies",
    "created_by",
    "created_at",
    "expires_at",
    "secret_sha256",
    "pin_hash",
    "pin_failures",
    "locked_at",
    "revoked_at",
    "opened_at",
    "uses",
    "last_used_at",
)
_COLUMNS = ", ".join(_FIELDS)
#: a row and, for a session, its link's row (NULLs otherwise) in one lookup
_WITH_PARENT = (
    "SELECT "
    + ", ".join(f"t.{f}" for f in _FIELDS)
    + ", "
    + ", ".join(f"p.{f}" for f in _FIELDS)
    + " FROM share_links t LEFT JOIN share_links p ON p.link_id = t.parent_id"
    + " WHERE t.link_id = ?"
)


class LinkState(StrEnum):
    """Why a token does not open (or that it does)."""

    ACTIVE = "active"
    UNKNOWN = "unknown"  # no such token, or a wrong secret: nothing to tell apart
    EXPIRED = "expired"
    REVOKED = "revoked"
    LOCKED = "locked"  # too many wrong PINs
    USED = "used"  # a launch token already opened
    PIN_REQUIRED = "pin-required"
    WRONG_PIN = "wrong-pin"


class LinkRefusedError(AuthenticationError):
    """A share, launch or session token that does not open, and why (``state``).  An
    AuthenticationError: as a bearer token or cookie it is 401; the share page shows each
    state as a page of its own (410 expired/revoked, 403 wrong PIN or locked)."""

    def __init__(self, state: LinkState, message: str, *, attempts_left: int | None = None):
        super().__init__(message)
        self.state = state
        self.attempts_left = attempts_left


class LinkInputError(KhoError, ValueError):
    """A link asked for with bad input (no study, a malformed UID, a PIN that is not 4-12
    digits, an expiry out of range): the HTTP route answers 400, the CLI exits 2."""


def _digest(text: str) -> str:
    # as API keys: the secret is 256 random bits, a plain SHA-256 is the right store
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _pin_hash(pin: str, salt: bytes | None = None) -> str:
    salt = salt if salt is not None else secrets.token_bytes(16)
    derived = hashlib.scrypt(pin.encode("ascii"), salt=salt, **_SCRYPT)
    return f"scrypt${_SCRYPT['n']}${_SCRYPT['r']}${_SCRYPT['p']}${salt.hex()}${derived.hex()}"


def _pin_matches(pin: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, derived = stored.split("$")
        if scheme != "scrypt":
            return False
        candidate = hashlib.scrypt(
            pin.encode("ascii"),
            salt=bytes.fromhex(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(derived) // 2,
        )
    except (ValueError, UnicodeEncodeError):
        return False
    return hmac.compare_digest(candidate.hex(), derived)


def check_pin(pin: str) -> str:
    """The PIN if it is 4-12 digits, else LinkInputError."""
    low, high = PIN_DIGITS
    if not (pin.isascii() and pin.isdigit() and low <= len(pin) <= high):
        raise LinkInputError(f"a PIN is {low} to {high} digits")
    return pin


_DURATION = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smhdw]?)\s*")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str | float | int) -> float:
    """Seconds from ``90``, ``30m``, ``12h``, ``7d``, ``2w``; LinkInputError otherwise."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        m = _DURATION.fullmatch(str(text).lower())
        if m is None:
            raise LinkInputError(f"a duration is a number with s, m, h, d or w, not {text!r}")
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if seconds <= 0:
        raise LinkInputError("a duration must be positive")
    return seconds


def link_id_of(text: str) -> str | None:
    """The id inside a token's text, or a bare id; None when ``text`` is neither."""
    text = text.strip()
    for prefix in LINK_PREFIXES:
        if text.startswith(prefix):
            text = text[len(prefix) :].partition("_")[0]
            break
    return text if _ID.fullmatch(text) else None


def _iso(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


@dataclass(frozen=True, slots=True)
class LinkInfo:
    """What ``kho share list`` shows of a link or launch token: never its secret, hash or
    PIN."""

    link_id: str
    kind: LinkKind
    tenant: str
    studies: list[str]
    created_by: str
    created: float
    expires: float
    has_pin: bool
    uses: int
    last_used: float | None
    state: LinkState

    def as_dict(self) -> dict[str, object]:
        return {
            "id": self.link_id,
            "kind": self.kind.value,
            "tenant": self.tenant,
            "studies": list(self.studies),
            "created_by": self.created_by,
            "created": _iso(self.created),
            "expires": _iso(self.expires),
            "pin": self.has_pin,
            "uses": self.uses,
            "last_used": _iso(self.last_used),
            "state": self.state.value,
        }


@dataclass(frozen=True, slots=True)
class NewToken:
    """A token just made: its text is shown this once (only its hash is kept)."""

    link_id: str
    kind: LinkKind
    text: str
    tenant: str
    studies: tuple[str, ...]
    expires: float
    has_pin: bool = False


@dataclass(frozen=True, slots=True)
class Session:
    """A browser session opened from a share link or launch token (the cookie's value)."""

    caller: Caller
    text: str
    #: the link or launch token it was opened from
    link_id: str
    expires: float

    @property
    def max_age(self) -> int:
        """Seconds left (the cookie's Max-Age)."""
        return max(0, int(self.expires - time.time()))


@dataclass(frozen=True, slots=True)
class _Row:
    link_id: str
    kind: LinkKind
    parent_id: str | None
    tenant: str
    studies: tuple[str, ...]
    created_by: str
    created_at: float
    expires_at: float
    secret_sha256: str
    pin_hash: str | None
    pin_failures: int
    locked_at: float | None
    revoked_at: float | None
    opened_at: float | None
    uses: int
    last_used_at: float | None

    @classmethod
    def of(cls, row: Sequence[object]) -> _Row:
        (
            link_id,
            kind,
            parent_id,
            tenant,
            studies,
            created_by,
            created_at,
            expires_at,
            secret_sha256,
            pin_hash,
            pin_failures,
            locked_at,
            revoked_at,
            opened_at,
            uses,
            last_used_at,
        ) = row
        return cls(
            str(link_id),
            LinkKind(str(kind)),
            str(parent_id) if parent_id is not None else None,
            str(tenant),
            tuple(json.loads(str(studies))),
            str(created_by),
            float(created_at),  # type: ignore[arg-type]
            float(expires_at),  # type: ignore[arg-type]
            str(secret_sha256),
            str(pin_hash) if pin_hash is not None else None,
            int(pin_failures),  # type: ignore[call-overload]
            _float(locked_at),
            _float(revoked_at),
            _float(opened_at),
            int(uses),  # type: ignore[call-overload]
            _float(last_used_at),
        )

    def state(self, now: float) -> LinkState:
        if self.revoked_at is not None:
            return LinkState.REVOKED
        if self.locked_at is not None:
            return LinkState.LOCKED
        if self.kind == LinkKind.LAUNCH and self.opened_at is not None:
            return LinkState.USED
        if self.expires_at <= now:
            return LinkState.EXPIRED
        return LinkState.ACTIVE


def _float(value: object) -> float | None:
    return float(value) if value is not None else None  # type: ignore[arg-type]


_MESSAGES = {
    LinkState.UNKNOWN: "unknown share link or token",
    LinkState.EXPIRED: "this link has expired",
    LinkState.REVOKED: "this link has been withdrawn",
    LinkState.LOCKED: "this link is locked after too many wrong PINs",
    LinkState.USED: "this launch token has already been used",
    LinkState.PIN_REQUIRED: "this link needs its PIN",
    LinkState.WRONG_PIN: "wrong PIN",
}


def _refused(state: LinkState, attempts_left: int | None = None) -> LinkRefusedError:
    return LinkRefusedError(state, _MESSAGES[state], attempts_left=attempts_left)


def present_studies(catalog: Catalog, studies: Sequence[str]) -> list[str]:
    """Which of ``studies`` the tenant's ``catalog`` holds (in the order asked);
    LinkInputError for a value that is no UID (a wildcard is never "every study")."""
    if not studies:
        return []
    for study in studies:
        try:
            check_uid(study, "Study Instance UID")
        except DatasetMismatchError as exc:
            raise LinkInputError(str(exc)) from None
    rows = query.find(catalog, "STUDY", {"StudyInstanceUID": list(studies)})
    found = {str(row["StudyInstanceUID"]) for row in rows}
    return [study for study in studies if study in found]


def find_studies(
    catalog: Catalog,
    *,
    patient_id: str | None = None,
    issuer: str | None = None,
    accession: str | None = None,
) -> list[str]:
    """The studies of a patient (``patient_id``, with ``issuer`` when given) and/or with an
    accession number, in the tenant's ``catalog``: exact values only (a wildcard would
    widen a launch to other patients: LinkInputError)."""
    filters: dict[str, str] = {}
    for keyword, value in (
        ("PatientID", patient_id),
        ("IssuerOfPatientID", issuer),
        ("AccessionNumber", accession),
    ):
        if value is None:
            continue
        value = value.strip()
        if not value or any(c in value for c in "*?\\"):
            raise LinkInputError(f"{keyword} must be one exact value")
        filters[keyword] = value
    if "PatientID" not in filters and "AccessionNumber" not in filters:
        raise LinkInputError("name the studies, a patient ID or an accession number")
    rows = query.find(catalog, "STUDY", filters, limit=MAX_STUDIES + 1)
    return [str(row["StudyInstanceUID"]) for row in rows]


class ShareLinks:
    """The share links, launch tokens and their sessions of one archive, in its platform
    catalog (shared by every ``kho serve`` process)."""

    def __init__(self, catalog: Catalog, tenant_names: Sequence[str]) -> None:
        self.catalog = catalog
        self.tenant_names = list(tenant_names)
        self._table_ready = False
        self._table_lock = threading.Lock()

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
                    self.catalog.execute(_PARENT_INDEX)
            except CatalogError:
                # PostgreSQL: another process created it at the same moment
                self.catalog.fetchone("SELECT count(*) FROM share_links")
            self._table_ready = True

    def _row(self, link_id: str, *, lock: bool = False) -> _Row | None:
        found = self.catalog.fetchone(
            f"SELECT {_COLUMNS} FROM share_links WHERE link_id = ?"
            + (self.catalog.ROW_LOCK if lock else ""),
            (link_id,),
        )
        return _Row.of(found) if found is not None else None

    # --- making ------------------------------------------------------------------------

    def _checked(self, tenant: str, studies: Iterable[str], created_by: Caller) -> tuple[str, ...]:
        if tenant not in self.tenant_names:
            # the same answer as a tenant the caller may not see (kho.access.service)
            raise AccessDeniedError(f"no access to tenant {tenant!r}")
        created_by.require(Role.VIEWER, tenant)
        if created_by.studies is not None:
            # a share or launch caller passes on nothing (it could widen nothing, but a
            # patient's link must not mint more links)
            raise AccessDeniedError(f"{created_by.kind.value} callers cannot make links")
        unique: list[str] = []
        for study in studies:
            study = str(study).strip()
            try:
                check_uid(study, "Study Instance UID")
            except DatasetMismatchError as exc:
                raise LinkInputError(str(exc)) from None
            if study not in unique:
                unique.append(study)
        if not unique:
            raise LinkInputError("a link needs at least one study")
        if len(unique) > MAX_STUDIES:
            raise LinkInputError(f"a link names at most {MAX_STUDIES} studies")
        return tuple(unique)

    def _insert(
        self,
        kind: LinkKind,
        tenant: str,
        studies: tuple[str, ...],
        created_by: str,
        expires_at: float,
        *,
        pin_hash: str | None = None,
        parent_id: str | None = None,
        now: float | None = None,
    ) -> NewToken:
        self._ensure_table()
        now = time.time() if now is None else now
        link_id = secrets.token_hex(ID_BYTES)
        text = f"{PREFIXES[kind]}{link_id}_{secrets.token_urlsafe(SECRET_BYTES)}"
        with self.catalog.transaction():
            self.catalog.execute(
                "INSERT INTO share_links (link_id, kind, parent_id, tenant, studies, "
                "created_by, created_at, expires_at, secret_sha256, pin_hash) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    link_id,
                    kind.value,
                    parent_id,
                    tenant,
                    json.dumps(list(studies)),
                    created_by,
                    now,
                    expires_at,
                    _digest(text),
                    pin_hash,
                ),
            )
        return NewToken(link_id, kind, text, tenant, studies, expires_at, pin_hash is not None)

    def create_share(
        self,
        tenant: str,
        studies: Iterable[str],
        *,
        created_by: Caller,
        expires_s: float | str = SHARE_TTL_S,
        pin: str | None = None,
    ) -> NewToken:
        """A share link for ``studies`` of ``tenant`` (usually one study), made by a caller
        with the viewer role there (AccessDeniedError otherwise).  ``expires_s``: seconds
        or ``7d``-style text, at most 90 days.  ``pin``: 4-12 digits, or None."""
        checked = self._checked(tenant, studies, created_by)
        ttl = parse_duration(expires_s)
        if ttl > SHARE_MAX_TTL_S:
            raise LinkInputError(f"a share link lives at most {SHARE_MAX_TTL_S // 86400} days")
        pin_hash = _pin_hash(check_pin(pin)) if pin is not None else None
        now = time.time()
        return self._insert(
            LinkKind.SHARE, tenant, checked, created_by.name, now + ttl, pin_hash=pin_hash, now=now
        )

    def create_launch(
        self,
        tenant: str,
        studies: Iterable[str],
        *,
        created_by: Caller,
        ttl_s: float | str = LAUNCH_TTL_S,
    ) -> NewToken:
        """A launch token for ``studies`` of ``tenant`` (a patient's, or a list the EMR
        names), made by a caller with the viewer role there.  It is to be opened within
        ``ttl_s`` (5 minutes unless told, at most an hour), once: :meth:`open_session`."""
        checked = self._checked(tenant, studies, created_by)
        ttl = parse_duration(ttl_s)
        if ttl > LAUNCH_MAX_TTL_S:
            raise LinkInputError(f"a launch token lives at most {LAUNCH_MAX_TTL_S // 60} minutes")
        now = time.time()
        return self._insert(LinkKind.LAUNCH, tenant, checked, created_by.name, now + ttl, now=now)

    # --- checking ----------------------------------------------------------------------

    def _parse(self, text: str) -> tuple[LinkKind, str]:
        for kind, prefix in PREFIXES.items():
            if text.startswith(prefix):
                link_id, _, secret = text[len(prefix) :].partition("_")
                if _ID.fullmatch(link_id) and _SECRET.fullmatch(secret):
                    return kind, link_id
                break
        raise _refused(LinkState.UNKNOWN)

    def _holding(self, text: str) -> tuple[_Row, _Row | None]:
        """The row whose secret ``text`` holds, and a session's link (one query: a page's
        every image read checks its session); UNKNOWN otherwise (one answer for an
        unknown id and a wrong secret: nothing to probe)."""
        kind, link_id = self._parse(text)
        self._ensure_table()
        found = self.catalog.fetchone(_WITH_PARENT, (link_id,))
        row = _Row.of(found[: len(_FIELDS)]) if found is not None else None
        if (
            found is None
            or row is None
            or row.kind != kind
            or not hmac.compare_digest(row.secret_sha256, _digest(text))
        ):
            raise _refused(LinkState.UNKNOWN)
        parent = found[len(_FIELDS) :]
        return row, _Row.of(parent) if parent[0] is not None else None

    def _caller(self, row: _Row, address: str, kind: LinkKind | None = None) -> Caller:
        kind = kind or row.kind
        caller_kind = CallerKind.SHARE if kind == LinkKind.SHARE else CallerKind.LAUNCH
        return Caller(
            caller_kind,
            f"{kind.value}:{row.parent_id or row.link_id}",
            frozenset({Grant(Role.VIEWER, row.tenant)}),
            home_tenant=row.tenant,
            address=address,
            studies=frozenset(row.studies),
        )

    def inspect(self, text: str) -> tuple[LinkInfo, LinkState]:
        """What a token is and whether it would open now (without its PIN: PIN_REQUIRED
        then), without counting a use; LinkRefusedError(UNKNOWN) for a token that is not
        one.  The share page reads this to choose its page."""
        row, parent = self._holding(text)
        state = self._resolve(row, parent, time.time())[0]
        if state == LinkState.ACTIVE and row.pin_hash is not None:
            state = LinkState.PIN_REQUIRED
        return self._info(row, state), state

    def _resolve(self, row: _Row, parent: _Row | None, now: float) -> tuple[LinkState, LinkKind]:
        """Whether ``row`` opens now, and the kind of caller it makes (a session's is its
        link's).  A session dies with its link: revoked or locked, or (a share link's)
        expired; a launch session outlives its token's five minutes, not a revocation."""
        state = row.state(now)
        if row.kind != LinkKind.SESSION:
            return state, row.kind
        if parent is None:
            return LinkState.REVOKED, LinkKind.SHARE
        parent_state = parent.state(now)
        if state == LinkState.ACTIVE:
            if parent_state in (LinkState.REVOKED, LinkState.LOCKED):
                state = LinkState.REVOKED
            elif parent.kind == LinkKind.SHARE and parent_state == LinkState.EXPIRED:
                state = LinkState.EXPIRED
        return state, parent.kind

    def _verified(self, text: str, pin: str | None, address: str) -> tuple[_Row, Caller]:
        row, parent = self._holding(text)
        state, kind = self._resolve(row, parent, time.time())
        if state != LinkState.ACTIVE:
            raise _refused(state)
        if row.pin_hash is not None:
            if pin is None:
                raise _refused(LinkState.PIN_REQUIRED)
            self._check_pin(row, pin)
        return row, self._caller(row, address, kind)

    def verify(self, text: str, pin: str | None = None, *, address: str = "") -> Caller:
        """The caller a share link, launch token or session authenticates as; raises
        LinkRefusedError (an AuthenticationError) for one that does not open: unknown,
        expired, revoked, locked, a launch token already opened, a share link with a PIN
        when ``pin`` is None (PIN_REQUIRED) or wrong (WRONG_PIN, counted: the link locks
        after MAX_PIN_FAILURES).  Revocation counts at once: the row is read each time."""
        return self._verified(text, pin, address)[1]

    def verify_session(self, text: str, *, address: str = "") -> Caller:
        """A session cookie's caller: only a session's text is taken (a link's own text
        in a cookie would skip its PIN page)."""
        if not text.startswith(PREFIXES[LinkKind.SESSION]):
            raise _refused(LinkState.UNKNOWN)
        return self.verify(text, address=address)

    def session_of(self, text: str, link_id: str, *, address: str = "") -> Caller | None:
        """The caller of session ``text`` if it is a valid session opened from link
        ``link_id``; None otherwise (the share page then asks for the PIN again)."""
        if not text or not text.startswith(PREFIXES[LinkKind.SESSION]):
            return None
        try:
            row, parent = self._holding(text)
        except LinkRefusedError:
            return None
        if row.parent_id != link_id:
            return None
        state, kind = self._resolve(row, parent, time.time())
        return self._caller(row, address, kind) if state == LinkState.ACTIVE else None

    def _check_pin(self, row: _Row, pin: str) -> None:
        """Right, or a counted failure (and the lock at the last one).  The hash is
        compared outside the transaction; the count and the lock are decided inside it,
        under the row's lock, so parallel guesses get MAX_PIN_FAILURES tries in all."""
        assert row.pin_hash is not None
        matches = _pin_matches(pin, row.pin_hash)
        with self.catalog.transaction():
            current = self._row(row.link_id, lock=True)
            if current is None or current.revoked_at is not None:
                raise _refused(LinkState.REVOKED)
            if current.locked_at is not None:
                raise _refused(LinkState.LOCKED)
            if matches:
                if current.pin_failures:
                    self.catalog.execute(
                        "UPDATE share_links SET pin_failures = 0 WHERE link_id = ?",
                        (row.link_id,),
                    )
                return
            failures = current.pin_failures + 1
            locked = time.time() if failures >= MAX_PIN_FAILURES else None
            self.catalog.execute(
                "UPDATE share_links SET pin_failures = ?, locked_at = ? WHERE link_id = ?",
                (failures, locked, row.link_id),
            )
        if locked is not None:
            raise _refused(LinkState.LOCKED)
        raise _refused(LinkState.WRONG_PIN, attempts_left=MAX_PIN_FAILURES - failures)

    # --- sessions ----------------------------------------------------------------------

    def open_session(self, text: str, pin: str | None = None, *, address: str = "") -> Session:
        """A browser session from a share link (its PIN checked) or a launch token (which
        is spent: a second opening is refused, USED).  The session lives 2 h (share link;
        never past its expiry) or 8 h (launch) and ends when its link is revoked."""
        row, caller = self._verified(text, pin, address)
        if row.kind == LinkKind.SESSION:
            raise _refused(LinkState.UNKNOWN)  # a session opens no other session
        now = time.time()
        expires = now + SESSION_TTL_S[row.kind]
        if row.kind == LinkKind.SHARE:
            expires = min(expires, row.expires_at)
        with self.catalog.transaction():
            current = self._row(row.link_id, lock=True)
            state = current.state(now) if current is not None else LinkState.REVOKED
            if state != LinkState.ACTIVE:
                raise _refused(state)
            self.catalog.execute(
                "UPDATE share_links SET uses = uses + 1, last_used_at = ?, "
                "opened_at = COALESCE(opened_at, ?) WHERE link_id = ?",
                (now, now if row.kind == LinkKind.LAUNCH else None, row.link_id),
            )
            # sessions that ended a day ago are of no use to anyone: cleared as new ones come
            self.catalog.execute(
                "DELETE FROM share_links WHERE kind = ? AND expires_at < ?",
                (LinkKind.SESSION.value, now - 86400),
            )
        made = self._insert(
            LinkKind.SESSION,
            row.tenant,
            row.studies,
            caller.name,
            expires,
            parent_id=row.link_id,
            now=now,
        )
        return Session(caller, made.text, row.link_id, expires)

    # --- administration ----------------------------------------------------------------

    def _info(self, row: _Row, state: LinkState | None = None) -> LinkInfo:
        return LinkInfo(
            row.link_id,
            row.kind,
            row.tenant,
            list(row.studies),
            row.created_by,
            row.created_at,
            row.expires_at,
            row.pin_hash is not None,
            row.uses,
            row.last_used_at,
            state or row.state(time.time()),
        )

    def list(
        self,
        kinds: Iterable[LinkKind] = (LinkKind.SHARE,),
        *,
        tenant: str | None = None,
    ) -> list[LinkInfo]:
        """The links (and, when asked, launch tokens) oldest first, every state."""
        self._ensure_table()
        wanted = [LinkKind(k).value for k in kinds if LinkKind(k) != LinkKind.SESSION]
        if not wanted:
            return []
        marks = ", ".join("?" for _ in wanted)
        sql = f"SELECT {_COLUMNS} FROM share_links WHERE kind IN ({marks})"
        params: list[object] = list(wanted)
        if tenant is not None:
            sql += " AND tenant = ?"
            params.append(tenant)
        rows = self.catalog.fetchall(sql + " ORDER BY created_at, link_id", params)
        return [self._info(_Row.of(r)) for r in rows]

    def get(self, link_id: str) -> LinkInfo | None:
        """One link or launch token by its id (or text); None when there is none."""
        found = link_id_of(link_id)
        if found is None:
            return None
        self._ensure_table()
        row = self._row(found)
        if row is None or row.kind == LinkKind.SESSION:
            return None
        return self._info(row)

    def revoke(self, link_id: str) -> bool:
        """Withdraw a link or launch token (its id or text) and, with it, every session
        opened from it: refused from the next request on, by every process.  Whether a
        link that was not yet revoked was found."""
        found = link_id_of(link_id)
        if found is None:
            return False
        self._ensure_table()
        with self.catalog.transaction():
            row = self._row(found, lock=True)
            if row is None or row.kind == LinkKind.SESSION or row.revoked_at is not None:
                return False
            self.catalog.execute(
                "UPDATE share_links SET revoked_at = ? WHERE link_id = ?", (time.time(), found)
            )
        return True


__all__ = [
    "LAUNCH_TTL_S",
    "LINK_PREFIXES",
    "MAX_PIN_FAILURES",
    "PREFIXES",
    "SESSION_TTL_S",
    "SHARE_TTL_S",
    "LinkInfo",
    "LinkInputError",
    "LinkKind",
    "LinkRefusedError",
    "LinkState",
    "NewToken",
    "Session",
    "ShareLinks",
    "check_pin",
    "find_studies",
    "link_id_of",
    "parse_duration",
    "present_studies",
]
