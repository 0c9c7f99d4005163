"""OIDC bearer tokens against a real issuer: real RSA and EC keys, a JWKS and discovery
document served on a loopback port, tokens signed by PyJWT (tests/helpers/oidc.py)."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from kho.access.callers import Caller, CallerKind, Grant, Role
from kho.access.tokens import TokenVerifier
from kho.archive.config import PLATFORM, Settings
from kho.errors import AuthenticationError
from tests.helpers.oidc import HOSTILE_TOKENS, OidcIssuer, SigningKey

KEY_SOURCES = ["discovery", "url", "file"]
TENANTS = ["hosp-a", "hosp-b"]
#: what a well-formed token of hosp-a's radiologist carries
CLAIMS = {"roles": ["viewer", "uploader"], "tenant": "hosp-a", "preferred_username": "dr-who"}

#: the answer to each hostile token kind
REFUSALS = {
    "expired": "token expired",
    "not_yet_valid": "token not yet valid",
    "wrong_issuer": "wrong token issuer",
    "wrong_audience": "wrong token audience",
    "bad_signature": "bad token signature",
    "alg_none": "token algorithm not allowed",
    "hs256_public_key": "token algorithm not allowed",
    "unknown_kid": "unknown token signing key",
}


@pytest.fixture
def issuer() -> Iterator[OidcIssuer]:
    with OidcIssuer() as running:
        yield running


def make_settings(
    issuer: OidcIssuer, tmp_path: Path, keys: str = "discovery", **more: Any
) -> Settings:
    fields: dict[str, Any] = {"tenants": TENANTS, **issuer.settings_fields(keys, tmp_path)}
    fields.update(more)
    return Settings(data_dir=tmp_path / "data", dicom_port=0, http_port=0, **fields)


def verifier_for(
    issuer: OidcIssuer, tmp_path: Path, keys: str = "discovery", **more: Any
) -> TokenVerifier:
    options = {k: more.pop(k) for k in ("refetch_interval_s", "max_age_s") if k in more}
    return TokenVerifier(make_settings(issuer, tmp_path, keys, **more), **options)


def refusal(verifier: TokenVerifier, token: str) -> str:
    with pytest.raises(AuthenticationError) as caught:
        verifier.verify(token)
    return str(caught.value)


# --- tokens that hold -----------------------------------------------------------------


@pytest.mark.parametrize("keys", KEY_SOURCES)
@pytest.mark.parametrize("alg", ["RS256", "ES256"])
def test_a_valid_token_becomes_a_caller(
    issuer: OidcIssuer, tmp_path: Path, keys: str, alg: str
) -> None:
    verifier = verifier_for(issuer, tmp_path, keys)
    caller = verifier.verify(issuer.mint(CLAIMS, alg=alg), address="10.1.2.3")
    assert caller.kind == CallerKind.TOKEN
    assert caller.name == "dr-who"
    assert caller.home_tenant == "hosp-a"
    assert caller.address == "10.1.2.3"
    assert caller.grants == {Grant(Role.VIEWER, "hosp-a"), Grant(Role.UPLOADER, "hosp-a")}
    assert caller.may(Role.VIEWER, "hosp-a")
    assert not caller.may(Role.VIEWER, "hosp-b")
    assert not caller.may(Role.ADMIN, "hosp-a")
    assert verifier.key_ids == ["ec-1", "rsa-1"]
    # the key set was fetched once, by the route the settings name
    if keys == "file":
        assert issuer.jwks_requests == 0 and issuer.discovery_requests == 0
    else:
        assert issuer.jwks_requests == 1
        assert issuer.discovery_requests == (1 if keys == "discovery" else 0)


def test_a_remembered_token_still_answers_with_the_callers_address(
    issuer: OidcIssuer, tmp_path: Path
) -> None:
    verifier = verifier_for(issuer, tmp_path)
    token = issuer.mint(CLAIMS)
    first = verifier.verify(token, address="10.0.0.1")
    second = verifier.verify(token, address="10.0.0.2")
    assert (first.address, second.address) == ("10.0.0.1", "10.0.0.2")
    assert first.grants == second.grants and first.home_tenant == second.home_tenant == "hosp-a"


def test_remembered_answers_only_for_tokens_that_already_held(
    issuer: OidcIssuer, tmp_path: Path
) -> None:
    verifier = verifier_for(issuer, tmp_path, refetch_interval_s=0)
    token = issuer.mint(CLAIMS)
    assert verifier.remembered(token) is None  # never verified: no answer, no fetch
    assert issuer.jwks_requests == 0
    for hostile in issuer.hostile_tokens(CLAIMS).values():
        with pytest.raises(AuthenticationError):
            verifier.verify(hostile)
        assert verifier.remembered(hostile) is None  # refused tokens are not remembered
    verifier.verify(token)
    caller = verifier.remembered(token, address="10.9.9.9")
    assert caller is not None and caller.address == "10.9.9.9" and caller.name == "dr-who"
    issuer.rotate("ES256")
    verifier.verify(issuer.mint(CLAIMS, alg="ES256"))  # a new key set was fetched
    assert verifier.remembered(token) is None  # checked again against the new set
    assert verifier.verify(token).name == "dr-who"  # rsa-1 is still published


def test_an_audience_list_naming_kho_holds(issuer: OidcIssuer, tmp_path: Path) -> None:
    verifier = verifier_for(issuer, tmp_path)
    caller = verifier.verify(issuer.mint({**CLAIMS, "aud": ["account", issuer.audience]}))
    assert caller.may(Role.VIEWER, "hosp-a")


def test_refresh_loads_the_keys_before_the_first_token(issuer: OidcIssuer, tmp_path: Path) -> None:
    verifier = verifier_for(issuer, tmp_path)
    assert verifier.key_ids == []
    assert verifier.refresh()
    assert verifier.key_ids == ["ec-1", "rsa-1"]
    verifier.verify(issuer.mint(CLAIMS))
    assert issuer.jwks_requests == 1


# --- tokens that do not hold ----------------------------------------------------------


@pytest.mark.parametrize("keys", KEY_SOURCES)
@pytest.mark.parametrize("kind", HOSTILE_TOKENS)
def test_hostile_tokens_are_refused_with_a_precise_message(
    issuer: OidcIssuer, tmp_path: Path, keys: str, kind: str
) -> None:
    verifier = verifier_for(issuer, tmp_path, keys)
    verifier.verify(issuer.mint(CLAIMS))  # the real thing holds
    token = issuer.hostile_tokens(CLAIMS)[kind]
    message = refusal(verifier, token)
    assert message == REFUSALS[kind]
    # nothing of the token comes back: no segment, no claim value
    assert not any(segment and segment[:12] in message for segment in token.split("."))
    for value in ("dr-who", "hosp-a", "rsa-1", "example.invalid", "some-other-client"):
        assert value not in message


def test_a_token_for_one_key_type_signed_under_another_kid_is_refused(
    issuer: OidcIssuer, tmp_path: Path
) -> None:
    verifier = verifier_for(issuer, tmp_path)
    # an RS256 token naming the EC key, and an ES256 token naming the RSA key
    rs_under_ec = issuer.mint(CLAIMS, alg="RS256", headers={"kid": issuer.ec_key.kid})
    es_under_rsa = issuer.mint(CLAIMS, alg="ES256", headers={"kid": issuer.rsa_key.kid})
    for token in (rs_under_ec, es_under_rsa):
        assert refusal(verifier, token) == "token algorithm does not match the issuer's key"


def test_the_keys_own_alg_binds_it(issuer: OidcIssuer, tmp_path: Path) -> None:
    """A JWK that names RS256 does not verify PS256; one that names no alg verifies any
    algorithm of its family the settings allow."""
    verifier = verifier_for(issuer, tmp_path)
    ps256 = issuer.mint(CLAIMS, alg="PS256")  # the RSA key, published as RS256
    assert refusal(verifier, ps256) == "token algorithm does not match the issuer's key"

    bare = SigningKey.generate("PS256", "rsa-no-alg", publish_alg=False)
    issuer.published.append(bare)
    verifier = verifier_for(issuer, tmp_path)
    for alg in ("PS256", "RS256"):
        assert verifier.verify(issuer.mint(CLAIMS, alg=alg, key=bare)).name == "dr-who"


def test_only_the_algorithms_the_settings_allow(issuer: OidcIssuer, tmp_path: Path) -> None:
    verifier = verifier_for(issuer, tmp_path, oidc_algorithms=["ES256"])
    assert refusal(verifier, issuer.mint(CLAIMS, alg="RS256")) == "token algorithm not allowed"
    assert verifier.verify(issuer.mint(CLAIMS, alg="ES256")).home_tenant == "hosp-a"


@pytest.mark.parametrize("claim", ["exp", "iss", "aud"])
def test_required_claims(issuer: OidcIssuer, tmp_path: Path, claim: str) -> None:
    verifier = verifier_for(issuer, tmp_path)
    assert refusal(verifier, issuer.mint({**CLAIMS, claim: None})) == (
        f"token lacks the {claim} claim"
    )


@pytest.mark.parametrize(
    "token",
    [
        "",
        "not-a-token",
        "a.b.c",
        "eyJhbGciOiJSUzI1NiJ9.e30",  # two segments
        "x" * 20000,
        "eyJhbGciOiJSUzI1NiJ9.!!!!.sig",
    ],
)
def test_malformed_tokens(issuer: OidcIssuer, tmp_path: Path, token: str) -> None:
    verifier = verifier_for(issuer, tmp_path)
    assert refusal(verifier, token).startswith("malformed token")


def test_a_token_without_a_subject_is_refused(issuer: OidcIssuer, tmp_path: Path) -> None:
    verifier = verifier_for(issuer, tmp_path)
    token = issuer.mint({**CLAIMS, "sub": None, "preferred_username": None})
    assert refusal(verifier, token) == "token names no user (sub)"


def test_a_token_without_kid_uses_the_one_key_of_its_family(
    issuer: OidcIssuer, tmp_path: Path
) -> None:
    verifier = verifier_for(issuer, tmp_path)
    no_kid = issuer.mint(CLAIMS, alg="ES256", headers={"kid": None})
    assert verifier.verify(no_kid).name == "dr-who"
    issuer.rotate("ES256", keep_old=True)  # two EC keys now: which one is ambiguous
    verifier = verifier_for(issuer, tmp_path)
    no_kid = issuer.mint(CLAIMS, alg="ES256", headers={"kid": None})
    assert refusal(verifier, no_kid) == "token names no key id (kid)"


# --- clock skew -----------------------------------------------------------------------


def test_leeway_on_exp_nbf_and_iat(issuer: OidcIssuer, tmp_path: Path) -> None:
    now = int(time.time())
    just_expired = issuer.mint({**CLAIMS, "iat": now - 600, "exp": now - 10})
    early = issuer.mint({**CLAIMS, "nbf": now + 10})
    issued_ahead = issuer.mint({**CLAIMS, "iat": now + 10})

    lenient = verifier_for(issuer, tmp_path, oidc_leeway_s=30)
    for token in (just_expired, early, issued_ahead):
        assert lenient.verify(token).name == "dr-who"

    strict = verifier_for(issuer, tmp_path, oidc_leeway_s=0)
    assert refusal(strict, just_expired) == "token expired"
    assert refusal(strict, early) == "token not yet valid"
    assert refusal(strict, issued_ahead) == "token not yet valid"


def test_a_remembered_token_still_expires(issuer: OidcIssuer, tmp_path: Path) -> None:
    verifier = verifier_for(issuer, tmp_path, oidc_leeway_s=0)
    token = issuer.mint(CLAIMS, lifetime_s=2)
    assert verifier.verify(token).name == "dr-who"
    expires_at = json.loads(_claims_segment(token))["exp"]
    time.sleep(max(0.0, expires_at - time.time()) + 0.1)
    assert refusal(verifier, token) == "token expired"


def _claims_segment(token: str) -> bytes:
    segment = token.split(".")[1]
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


# --- key rotation, refetching, outages ------------------------------------------------


@pytest.mark.parametrize("keys", KEY_SOURCES)
def test_a_rotated_key_is_picked_up_and_the_withdrawn_one_refused(
    issuer: OidcIssuer, tmp_path: Path, keys: str
) -> None:
    verifier = verifier_for(issuer, tmp_path, keys, refetch_interval_s=0)
    old_token = issuer.mint(CLAIMS)
    assert verifier.verify(old_token).name == "dr-who"

    new_key = issuer.rotate("RS256")
    if keys == "file":
        issuer.write_jwks(tmp_path / "jwks.json")
    new_token = issuer.mint(CLAIMS)
    assert verifier.verify(new_token).name == "dr-who"
    assert new_key.kid in verifier.key_ids and "rsa-1" not in verifier.key_ids
    # the old token was verified (and remembered) before; its key is gone now
    assert refusal(verifier, old_token) == "unknown token signing key"


def test_a_flood_of_unknown_kids_fetches_the_keys_once(issuer: OidcIssuer, tmp_path: Path) -> None:
    verifier = verifier_for(issuer, tmp_path)  # the default 10 s between refetches
    good = issuer.mint(CLAIMS)
    verifier.verify(good)
    assert issuer.jwks_requests == 1
    bogus = [issuer.mint(CLAIMS, headers={"kid": f"bogus-{i}"}) for i in range(50)]

    def attempt(token: str) -> str:
        try:
            verifier.verify(token)
        except AuthenticationError as exc:
            return str(exc)
        return "accepted"

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(attempt, bogus + [good] * 50))
    assert answers[:50] == ["unknown token signing key"] * 50
    assert answers[50:] == ["accepted"] * 50
    assert issuer.jwks_requests == 1


def test_refetches_are_spaced_not_stopped(issuer: OidcIssuer, tmp_path: Path) -> None:
    verifier = verifier_for(issuer, tmp_path, refetch_interval_s=0.5)
    verifier.verify(issuer.mint(CLAIMS))
    for i in range(20):
        with pytest.raises(AuthenticationError):
            verifier.verify(issuer.mint(CLAIMS, headers={"kid": f"bogus-{i}"}))
    fetched = issuer.jwks_requests
    assert fetched <= 2  # the first load, and at most one refetch if this machine is slow
    new_key = issuer.rotate("RS256", keep_old=True)
    time.sleep(0.6)
    assert verifier.verify(issuer.mint(CLAIMS, key=new_key)).name == "dr-who"
    assert issuer.jwks_requests == fetched + 1


def test_an_issuer_outage_keeps_the_cached_keys(issuer: OidcIssuer, tmp_path: Path) -> None:
    verifier = verifier_for(issuer, tmp_path, refetch_interval_s=0)
    token = issuer.mint(CLAIMS)
    verifier.verify(token)
    issuer.failing = True
    unknown = issuer.unknown_kid(CLAIMS)
    assert refusal(verifier, unknown) == "unknown token signing key"  # tried, 503, kept
    assert issuer.jwks_requests == 1
    assert verifier.verify(issuer.mint(CLAIMS, alg="ES256")).name == "dr-who"
    assert verifier.key_ids == ["ec-1", "rsa-1"]


def test_no_keys_at_all_is_issuer_keys_unavailable(issuer: OidcIssuer, tmp_path: Path) -> None:
    verifier = verifier_for(issuer, tmp_path, refetch_interval_s=0)
    issuer.failing = True
    assert refusal(verifier, issuer.mint(CLAIMS)) == "issuer keys unavailable"
    assert not verifier.refresh()
    issuer.failing = False  # the issuer comes back: the next token loads the keys
    assert verifier.verify(issuer.mint(CLAIMS)).name == "dr-who"


def test_an_unreachable_issuer_is_issuer_keys_unavailable(tmp_path: Path) -> None:
    issuer = OidcIssuer().start()
    settings = make_settings(issuer, tmp_path)
    token = issuer.mint(CLAIMS)
    issuer.stop()  # nothing listens on its port any more
    verifier = TokenVerifier(settings)
    assert refusal(verifier, token) == "issuer keys unavailable"


def test_old_keys_are_refreshed_in_the_background(issuer: OidcIssuer, tmp_path: Path) -> None:
    verifier = verifier_for(issuer, tmp_path, refetch_interval_s=0, max_age_s=0)
    old_token = issuer.mint(CLAIMS)
    verifier.verify(old_token)
    issuer.rotate("RS256")  # the issuer withdraws rsa-1; no token names the new key yet
    deadline = time.monotonic() + 30
    while "rsa-1" in verifier.key_ids and time.monotonic() < deadline:
        # served from the cached set meanwhile; each call may start a background refresh
        verifier.verify(issuer.mint(CLAIMS, alg="ES256"))
        time.sleep(0.05)
    assert "rsa-1" not in verifier.key_ids
    assert refusal(verifier, old_token) == "unknown token signing key"


def test_a_jwks_file_keeps_only_usable_signing_keys(issuer: OidcIssuer, tmp_path: Path) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    document = issuer.jwks()
    document["keys"] += [
        {"kty": "oct", "kid": "shared-secret", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQ", "alg": "HS256"},
        {**issuer.rsa_key.jwk, "kid": "for-encryption", "use": "enc", "alg": "RSA-OAEP"},
        {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(weak.public_key())), "kid": "weak"},
        {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(weak)), "kid": "private"},
        {"kty": "RSA", "kid": "broken", "n": "AQAB"},
        "not a key",
    ]
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(document))
    verifier = TokenVerifier(
        make_settings(issuer, tmp_path, oidc_jwks_file=str(path)), refetch_interval_s=0
    )
    assert verifier.refresh()
    assert verifier.key_ids == ["ec-1", "rsa-1"]

    path.write_text("{not json")  # a broken file later: the loaded keys stay
    assert not verifier.refresh()
    assert verifier.verify(issuer.mint(CLAIMS)).name == "dr-who"


# --- claims -> caller -----------------------------------------------------------------


def caller_for(
    issuer: OidcIssuer, tmp_path: Path, claims: dict[str, Any], **settings: Any
) -> Caller:
    verifier = verifier_for(issuer, tmp_path, "url", **settings)
    return verifier.verify(issuer.mint(claims))


def test_roles_at_a_dotted_claim_path(issuer: OidcIssuer, tmp_path: Path) -> None:
    """Keycloak's realm roles: realm_access.roles, among its own default roles."""
    claims = {
        "tenant": "hosp-a",
        "roles": ["admin"],  # not where this archive looks
        "realm_access": {"roles": ["offline_access", "uma_authorization", "viewer"]},
    }
    caller = caller_for(issuer, tmp_path, claims, oidc_roles_claim="realm_access.roles")
    assert caller.grants == {Grant(Role.VIEWER, "hosp-a")}
    missing = caller_for(issuer, tmp_path, {"tenant": "hosp-a"}, oidc_roles_claim="a.b.c")
    assert missing.grants == frozenset()


def test_roles_as_a_space_separated_string(issuer: OidcIssuer, tmp_path: Path) -> None:
    caller = caller_for(issuer, tmp_path, {"tenant": "hosp-b", "roles": "viewer admin@hosp-a"})
    assert caller.grants == {Grant(Role.VIEWER, "hosp-b"), Grant(Role.ADMIN, "hosp-a")}
    assert caller.home_tenant == "hosp-b"


def test_tenant_qualified_and_platform_roles(issuer: OidcIssuer, tmp_path: Path) -> None:
    caller = caller_for(issuer, tmp_path, {"roles": ["viewer@hosp-b"]})
    assert caller.grants == {Grant(Role.VIEWER, "hosp-b")}
    assert caller.home_tenant == "hosp-b"  # the one tenant it holds anything in

    platform = caller_for(issuer, tmp_path, {"roles": ["admin@*"]})
    assert platform.grants == {Grant(Role.ADMIN, PLATFORM)}
    assert platform.home_tenant == "default"
    assert platform.may(Role.VIEWER, "hosp-b") and platform.platform_wide


def test_an_undeclared_tenant_grants_nothing(issuer: OidcIssuer, tmp_path: Path) -> None:
    caller = caller_for(issuer, tmp_path, {"tenant": "hosp-z", "roles": ["viewer", "admin"]})
    assert caller.grants == frozenset()
    assert caller.home_tenant == "default"
    assert not caller.may(Role.VIEWER, "default")
    qualified = caller_for(issuer, tmp_path, {"roles": ["viewer@hosp-z", "admin@other"]})
    assert qualified.grants == frozenset()


def test_unqualified_roles_need_a_tenant_claim_on_a_shared_archive(
    issuer: OidcIssuer, tmp_path: Path
) -> None:
    shared = caller_for(issuer, tmp_path, {"roles": ["viewer"]})
    assert shared.grants == frozenset()
    # an archive of one hospital: there is no other tenant the role could mean
    single = caller_for(issuer, tmp_path, {"roles": ["viewer"]}, tenants=[])
    assert single.grants == {Grant(Role.VIEWER, "default")}
    assert single.home_tenant == "default"
    # but a token that names another hospital still gets nothing there
    other = caller_for(issuer, tmp_path, {"roles": ["viewer"], "tenant": "hosp-a"}, tenants=[])
    assert other.grants == frozenset()


def test_claim_names_come_from_the_settings(issuer: OidcIssuer, tmp_path: Path) -> None:
    claims = {"hospital": ["hosp-a"], "email": "who@hosp-a.example", "roles": ["viewer"]}
    caller = caller_for(
        issuer, tmp_path, claims, oidc_tenant_claim="hospital", oidc_user_claim="email"
    )
    assert caller.name == "who@hosp-a.example"
    assert caller.home_tenant == "hosp-a"  # a one-element list from a multivalued mapper
    assert caller.grants == {Grant(Role.VIEWER, "hosp-a")}
    # no user claim: the subject
    fallback = caller_for(issuer, tmp_path, {**claims, "email": None}, oidc_user_claim="email")
    assert fallback.name == "3f2a-test-user"


def test_verification_from_many_threads(issuer: OidcIssuer, tmp_path: Path) -> None:
    verifier = verifier_for(issuer, tmp_path)
    tokens = [
        issuer.mint({**CLAIMS, "preferred_username": f"user-{i}"}, alg=alg)
        for i in range(20)
        for alg in ("RS256", "ES256")
    ]
    barrier = threading.Barrier(8)

    def run(offset: int) -> list[str]:
        barrier.wait()
        return [verifier.verify(t).name for t in tokens[offset:] + tokens[:offset]]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, range(8)))
    expected = sorted(f"user-{i}" for i in range(20) for _ in range(2))
    assert all(sorted(names) == expected for names in results)
    assert issuer.jwks_requests == 1
