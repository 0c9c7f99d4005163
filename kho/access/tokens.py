"""OpenID Connect bearer tokens: a JWT signed by the configured issuer becomes a Caller.

What a token must be to count (RFC 7519, RFC 8725 "JWT best current practices"):

- signed with an algorithm ``settings.oidc_algorithms`` allows (asymmetric only: the settings
  refuse ``none`` and ``HS*``), by a key of the issuer's key set (JWKS) whose own type, curve
  and ``alg`` fit that algorithm -- so neither ``alg: none`` nor an HS256 token "signed" with the
  issuer's public key as an HMAC secret can pass;
- ``iss`` the configured issuer, ``aud`` naming the configured audience, ``exp`` present and not
  past, ``nbf`` and ``iat`` not in the future, each with ``oidc_leeway_s`` of clock skew.

The issuer's keys come from ``oidc_jwks_file``, else ``oidc_jwks_url``, else the ``jwks_uri`` of
the issuer's ``/.well-known/openid-configuration``.  They are fetched on first use and cached;
a token naming an unknown key id triggers one refetch (the issuer rotated its keys), at most
once per ``refetch_interval_s`` however many such tokens arrive, and the cached set is refreshed
in the background once it is older than ``max_age_s`` (so a key the issuer withdrew stops being
accepted).  A failed fetch keeps the keys already cached.

Verification with cached keys does no I/O and takes no lock: it is safe from any thread and
costs one signature check (tens of microseconds for RS256).  A token that verified is
remembered (by its exact text) until it expires, as long as the key set it was checked against
is the current one, so a viewer's hundreds of requests with one token cost a dictionary
look-up each after the first.  Only the very first token, and a token naming an unknown key,
may wait for a fetch (at most ``FETCH_TIMEOUT_S``): call :meth:`TokenVerifier.refresh` at
start-up, and verify from a worker thread, not the event loop.  On the event loop,
:meth:`TokenVerifier.remembered` answers for tokens already verified without I/O or signature
checks; the others go to :meth:`TokenVerifier.verify` in a thread.

Error messages say what is wrong in a few words and never repeat what the token contains.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import threading
import time
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import jwt

from kho.access.callers import Caller, CallerKind, Grant, parse_grants
from kho.archive.config import PLATFORM
from kho.errors import AuthenticationError, ConfigError, IdentityProviderUnavailableError

if TYPE_CHECKING:
    from kho.archive.config import Settings

log = logging.getLogger(__name__)

#: a token naming an unknown key refetches the key set at most this often (seconds)
REFETCH_INTERVAL_S = 10.0
#: cached keys older than this are refreshed in the background (seconds)
KEYS_MAX_AGE_S = 600.0
#: one fetch of the discovery document or the key set gives up after this long (seconds)
FETCH_TIMEOUT_S = 5.0
#: a discovery document or key set larger than this is refused (bytes)
MAX_DOCUMENT_BYTES = 1 << 20
#: longer "tokens" are refused before any parsing (real ones are a few kilobytes)
MAX_TOKEN_CHARS = 16384
#: RSA keys shorter than this are not used (NIST SP 800-131A)
MIN_RSA_BITS = 2048
#: verified tokens remembered (a viewer sends one token with hundreds of requests)
VERIFIED_CACHE_SIZE = 4096

#: the key a JWS algorithm needs: JWK key type and the curves allowed ("" = no curve)
_KEY_FAMILY: dict[str, tuple[str, frozenset[str]]] = {
    **{alg: ("RSA", frozenset({""})) for alg in ("RS256", "RS384", "RS512")},
    **{alg: ("RSA", frozenset({""})) for alg in ("PS256", "PS384", "PS512")},
    "ES256": ("EC", frozenset({"P-256"})),
    "ES384": ("EC", frozenset({"P-384"})),
    "ES512": ("EC", frozenset({"P-521"})),
    "EdDSA": ("OKP", frozenset({"Ed25519", "Ed448"})),
}


@dataclass(frozen=True, slots=True)
class IssuerKey:
    """One public signing key of the issuer's key set."""

    kid: str  # "" when the JWK names none
    kty: str
    crv: str  # "" for RSA
    alg: str  # the JWK's own "alg"; "" when it names none (then any of its family fits)
    key: Any  # a cryptography public key object

    def fits(self, alg: str) -> bool:
        """Whether a token signed with ``alg`` may be checked with this key."""
        if self.alg and self.alg != alg:
            return False
        kty, curves = _KEY_FAMILY.get(alg, ("", frozenset()))
        return self.kty == kty and self.crv in curves


#: the issuer's key set: key id ("" for none) -> its keys; replaced whole, never mutated
KeySet = Mapping[str, tuple[IssuerKey, ...]]


@dataclass(frozen=True, slots=True)
class _Verified:
    """A token that held: what it grants, until when, and under which key set."""

    name: str
    grants: frozenset[Grant]
    home_tenant: str
    expires_at: int
    keys: KeySet


class TokenVerifier:
    """Verifies OIDC bearer tokens (JWT) of ``settings.oidc_issuer`` and maps their claims
    to a :class:`~kho.access.callers.Caller`.  One per process; thread-safe."""

    def __init__(
        self,
        settings: Settings,
        *,
        refetch_interval_s: float = REFETCH_INTERVAL_S,
        max_age_s: float = KEYS_MAX_AGE_S,
    ) -> None:
        if not settings.oidc_issuer or not settings.oidc_audience:
            raise ConfigError("OIDC tokens need oidc_issuer and oidc_audience")
        unknown = [a for a in settings.oidc_algorithms if a not in _KEY_FAMILY]
        if unknown:
            raise ConfigError(f"oidc_algorithms: unsupported {unknown}")
        self.issuer = settings.oidc_issuer
        self.audience = settings.oidc_audience
        self.algorithms = frozenset(settings.oidc_algorithms)
        self.leeway_s = settings.oidc_leeway_s
        self._roles_path = tuple(p for p in settings.oidc_roles_claim.split(".") if p)
        self._tenant_claim = settings.oidc_tenant_claim
        self._user_claim = settings.oidc_user_claim
        self._tenants = tuple(settings.tenant_names)
        self._default_tenant = settings.default_tenant
        self._jwks_file = settings.oidc_jwks_file
        self._jwks_url = settings.oidc_jwks_url  # from discovery when not configured
        self._refetch_interval_s = refetch_interval_s
        self._max_age_s = max_age_s

        # The key set is replaced whole, never mutated: readers take no lock.
        self._keys: KeySet | None = None
        self._loaded_at = -math.inf
        self._attempted_at = -math.inf
        self._fetch_lock = threading.Lock()
        self._background: threading.Thread | None = None
        # token text -> what it granted; only tokens that verified, only while their key set
        # is the current one (a rotation or a withdrawn key forgets them)
        self._verified: dict[str, _Verified] = {}
        self._verified_lock = threading.Lock()
        self._warn_if_cleartext(self.issuer)

    # --- public ------------------------------------------------------------------------

    def verify(self, token: str, *, address: str = "") -> Caller:
        """The caller a bearer token stands for.  Raises AuthenticationError (401) when the
        token does not hold.  May wait for a key fetch (see the module docstring)."""
        caller = self.remembered(token, address=address)
        if caller is not None:
            return caller
        claims, keys = self._claims(token)
        caller = self._caller(claims, address)
        self._remember(token, caller, int(claims["exp"]), keys)
        return caller

    def remembered(self, token: str, *, address: str = "") -> Caller | None:
        """The caller of a token that already verified against the current key set, or
        None when it must be verified (:meth:`verify`).  Never does I/O or signature
        checks: safe on the event loop.  Raises AuthenticationError once it expired."""
        if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS:
            return None
        known = self._verified.get(token)
        if known is None or known.keys is not self._keys:
            return None
        if time.monotonic() - self._loaded_at > self._max_age_s:
            self._refresh_in_background()
        if known.expires_at <= time.time() - self.leeway_s:
            self._verified.pop(token, None)
            raise AuthenticationError("token expired")
        return Caller(
            CallerKind.TOKEN, known.name, known.grants, known.home_tenant, address=address
        )

    def refresh(self) -> bool:
        """Fetch the issuer's keys now (at start-up, so the first request does not wait).
        Returns whether a fresh key set was loaded; failures are logged, never raised."""
        return self._refresh(wait=True)

    @property
    def key_ids(self) -> list[str]:
        """The key ids of the cached key set (diagnostics)."""
        return sorted((self._keys or {}).keys())

    @property
    def key_source(self) -> str:
        if self._jwks_file:
            return self._jwks_file
        return self._jwks_url or f"{self._discovery_url} (discovery)"

    # --- the token ---------------------------------------------------------------------

    def _remember(self, token: str, caller: Caller, expires_at: int, keys: KeySet) -> None:
        entry = _Verified(caller.name, caller.grants, caller.home_tenant, expires_at, keys)
        with self._verified_lock:
            if len(self._verified) >= VERIFIED_CACHE_SIZE:
                self._verified.clear()  # crude but O(1) amortised; refills from live traffic
            self._verified[token] = entry

    def _claims(self, token: str) -> tuple[dict[str, Any], KeySet]:
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_CHARS:
            raise AuthenticationError("malformed token")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthenticationError("malformed token") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise AuthenticationError("token algorithm not allowed")
        key, keys = self._key_for(header.get("kid"), alg)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway_s,
                options={"require": ["exp", "iss", "aud"]},
            )
        # subclasses before their bases; PyJWT's own messages are not passed on
        except jwt.InvalidSignatureError:
            raise AuthenticationError("bad token signature") from None
        except jwt.ExpiredSignatureError:
            raise AuthenticationError("token expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthenticationError("token not yet valid") from None
        except jwt.InvalidIssuerError:
            raise AuthenticationError("wrong token issuer") from None
        except jwt.InvalidAudienceError:
            raise AuthenticationError("wrong token audience") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthenticationError(f"token lacks the {exc.claim} claim") from None
        except jwt.InvalidAlgorithmError:
            raise AuthenticationError("token algorithm not allowed") from None
        except jwt.InvalidIssuedAtError:
            raise AuthenticationError("malformed token (iat)") from None
        except (jwt.PyJWTError, ValueError, TypeError):
            raise AuthenticationError("malformed token") from None
        return claims, keys

    def _key_for(self, kid: object, alg: str) -> tuple[IssuerKey, KeySet]:
        if kid is not None and not isinstance(kid, str):
            raise AuthenticationError("malformed token (kid)")
        keys = self._keys
        if keys is None:
            self._refresh(wait=True)
            keys = self._keys
            if keys is None:
                raise IdentityProviderUnavailableError("issuer keys unavailable")
        elif time.monotonic() - self._loaded_at > self._max_age_s:
            self._refresh_in_background()
        key = self._find(keys, kid, alg)
        if key is None:
            # unknown key: the issuer may have rotated; one refetch, rate-limited, then the
            # newest set whoever fetched it
            self._refresh(wait=True)
            keys = self._keys or {}
            key = self._find(keys, kid, alg)
            if key is None:
                raise AuthenticationError("unknown token signing key")
        return key, keys

    @staticmethod
    def _find(keys: KeySet, kid: str | None, alg: str) -> IssuerKey | None:
        if kid is None:
            candidates = [k for same_kid in keys.values() for k in same_kid]
        else:
            candidates = list(keys.get(kid, ()))
        if not candidates:
            return None
        fitting = [k for k in candidates if k.fits(alg)]
        if not fitting:
            raise AuthenticationError("token algorithm does not match the issuer's key")
        if kid is None and len(fitting) > 1:
            raise AuthenticationError("token names no key id (kid)")
        return fitting[0]

    # --- claims -> caller --------------------------------------------------------------

    def _caller(self, claims: dict[str, Any], address: str) -> Caller:
        name = claims.get(self._user_claim)
        if not isinstance(name, str) or not name:
            name = claims.get("sub")
            if not isinstance(name, str) or not name:
                raise AuthenticationError("token names no user (sub)")
        roles = _role_strings(_claim_at(claims, self._roles_path))
        tenant = _tenant_string(claims.get(self._tenant_claim))
        # Unqualified roles ("viewer") hold for the token's tenant.  Without a tenant claim
        # they hold only where there is no choice: an archive of one hospital.
        if tenant is None and len(self._tenants) == 1:
            grant_tenant: str | None = self._default_tenant
        else:
            grant_tenant = tenant
        grants = parse_grants(roles, home_tenant=grant_tenant, known_tenants=self._tenants)
        granted = {g.tenant for g in grants if g.tenant != PLATFORM}
        if tenant is not None and tenant in self._tenants:
            home = tenant
        elif len(granted) == 1:
            home = granted.pop()
        else:
            home = self._default_tenant
        return Caller(CallerKind.TOKEN, name, grants, home_tenant=home, address=address)

    # --- the issuer's keys -------------------------------------------------------------

    @property
    def _discovery_url(self) -> str:
        return self.issuer.rstrip("/") + "/.well-known/openid-configuration"

    def _refresh(self, *, wait: bool) -> bool:
        if not self._fetch_lock.acquire(blocking=wait):
            return False
        try:
            now = time.monotonic()
            if now - self._attempted_at < self._refetch_interval_s:
                return False
            self._attempted_at = now
            try:
                keys = self._load_keys()
            except (OSError, ValueError, http.client.HTTPException) as exc:
                kept = "keeping the cached keys" if self._keys is not None else "no keys yet"
                log.warning(
                    "OIDC: could not load the issuer's keys from %s (%s); %s",
                    self.key_source,
                    exc,
                    kept,
                )
                return False
            if self._keys is None or set(keys) != set(self._keys):
                log.info("OIDC: issuer keys %s from %s", sorted(keys), self.key_source)
            self._keys = keys
            self._loaded_at = time.monotonic()
            return True
        finally:
            self._fetch_lock.release()

    def _refresh_in_background(self) -> None:
        thread = self._background
        if thread is not None and thread.is_alive():
            return
        if time.monotonic() - self._attempted_at < self._refetch_interval_s:
            return
        thread = threading.Thread(
            target=self._refresh, kwargs={"wait": False}, name="kho-oidc-keys", daemon=True
        )
        self._background = thread
        thread.start()

    def _load_keys(self) -> dict[str, tuple[IssuerKey, ...]]:
        if self._jwks_file:
            document = json.loads(Path(self._jwks_file).read_bytes())
        else:
            if not self._jwks_url:
                discovery = _fetch_json(self._discovery_url)
                if not isinstance(discovery, dict):
                    raise ValueError("discovery document is not a JSON object")
                # OpenID Connect Discovery 1.0 section 4.3: it must name the same issuer
                if str(discovery.get("issuer", "")).rstrip("/") != self.issuer.rstrip("/"):
                    raise ValueError("discovery document names another issuer")
                jwks_uri = discovery.get("jwks_uri")
                if not isinstance(jwks_uri, str) or not jwks_uri:
                    raise ValueError("discovery document has no jwks_uri")
                self._warn_if_cleartext(jwks_uri)
                self._jwks_url = jwks_uri
            document = _fetch_json(self._jwks_url)
        return _parse_jwks(document)

    @staticmethod
    def _warn_if_cleartext(url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "::1", "localhost"):
            log.warning("OIDC: %s is plain http; use https outside a test bench", url)


def _fetch_json(url: str) -> Any:
    if urlsplit(url).scheme not in ("http", "https"):
        raise ValueError(f"not an http(s) URL: {url!r}")
    request = urllib.request.Request(
        url, headers={"Accept": "application/json", "User-Agent": "kho"}
    )
    # urllib honours the https_proxy/no_proxy environment and SSL_CERT_FILE (a private CA)
    with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT_S) as response:
        body = response.read(MAX_DOCUMENT_BYTES + 1)
    if len(body) > MAX_DOCUMENT_BYTES:
        raise ValueError(f"{url} answered more than {MAX_DOCUMENT_BYTES} bytes")
    return json.loads(body)


def _parse_jwks(document: Any) -> dict[str, tuple[IssuerKey, ...]]:
    """The usable signing keys of a JWKS document, by key id.  Keys for encryption,
    symmetric keys, private keys, short RSA keys and unsupported types are left out."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWKS document (no keys list)")
    keys: dict[str, list[IssuerKey]] = {}
    for jwk in document["keys"]:
        if not isinstance(jwk, dict):
            continue
        kid = jwk.get("kid", "")
        kty = jwk.get("kty")
        alg = jwk.get("alg", "")
        if jwk.get("use", "sig") != "sig" or kty not in ("RSA", "EC", "OKP"):
            continue  # encryption keys; "oct" (shared secrets) never verify a token here
        if not isinstance(kid, str) or not isinstance(alg, str):
            continue
        if alg and alg not in _KEY_FAMILY:
            continue
        if "d" in jwk:
            log.warning("OIDC: the issuer's key set publishes a private key (kid %r); ignored", kid)
            continue
        try:
            public = jwt.PyJWK(jwk).key
        except (jwt.PyJWTError, ValueError, TypeError):
            continue
        if kty == "RSA" and public.key_size < MIN_RSA_BITS:
            log.warning("OIDC: RSA key %r has %d bits; ignored", kid, public.key_size)
            continue
        crv = jwk.get("crv", "") if kty != "RSA" else ""
        keys.setdefault(kid, []).append(IssuerKey(kid, kty, str(crv), alg, public))
    if not keys:
        raise ValueError("the key set holds no usable signing key")
    return {kid: tuple(found) for kid, found in keys.items()}


def _claim_at(claims: Mapping[str, Any], path: Iterable[str]) -> Any:
    """The value at a dotted claim path (``realm_access.roles``), or None."""
    value: Any = claims
    for part in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def _role_strings(value: Any) -> list[str]:
    """Roles from a list of strings or a space-separated string (an OAuth ``scope`` style)."""
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


def _tenant_string(value: Any) -> str | None:
    """The tenant claim: a string, or a list holding exactly one (multivalued mappers)."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


__all__ = ["IssuerKey", "TokenVerifier"]
