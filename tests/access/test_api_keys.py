"""API keys on both catalog engines: shown once, stored as a SHA-256, listed without their
secret, revoked at once for every process sharing the catalog."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from kho.access.api_keys import ApiKeys, key_id_of
from kho.access.callers import CallerKind, Grant, Role
from kho.access.service import Access
from kho.archive.archive import Archive
from kho.archive.catalog import Catalog, open_catalog
from kho.archive.config import Settings
from kho.errors import AuthenticationError, ConfigError
from tests.helpers.postgres import ENGINES, postgres_database

TENANTS = ["default", "hosp-a", "hosp-b"]


@pytest.fixture(params=ENGINES)
def catalog_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "postgresql":
        with postgres_database() as url:
            yield url
    else:
        yield str(tmp_path / "catalog.sqlite")


@pytest.fixture
def catalog(catalog_url: str) -> Iterator[Catalog]:
    with contextlib.closing(open_catalog(catalog_url)) as opened:
        yield opened


@pytest.fixture
def keys(catalog: Catalog) -> ApiKeys:
    return ApiKeys(catalog, TENANTS)


def test_a_new_key_authenticates_as_its_name_with_its_grants(keys: ApiKeys) -> None:
    key_id, text = keys.create("emr-backend", ["viewer@hosp-a", "uploader@hosp-a"])
    assert text.startswith(f"kho_{key_id}_")
    caller = keys.verify(text, address="127.0.0.1")
    assert caller.kind == CallerKind.API_KEY
    assert caller.name == "emr-backend"
    assert caller.grants == {Grant(Role.VIEWER, "hosp-a"), Grant(Role.UPLOADER, "hosp-a")}
    assert caller.home_tenant == "hosp-a"
    assert caller.address == "127.0.0.1"
    assert caller.may(Role.VIEWER, "hosp-a")
    assert not caller.may(Role.VIEWER, "hosp-b")
    assert not caller.may(Role.ADMIN, "hosp-a")


def test_home_tenant_is_the_default_unless_the_grants_name_exactly_one(keys: ApiKeys) -> None:
    _, platform = keys.create("ops", ["admin@*"])
    caller = keys.verify(platform)
    assert caller.home_tenant == "default"
    assert caller.platform_wide and caller.may(Role.VIEWER, "hosp-b")
    _, two = keys.create("regional", ["viewer@hosp-a", "viewer@hosp-b"])
    assert keys.verify(two).home_tenant == "default"
    _, mixed = keys.create("a-and-platform", ["viewer@hosp-b", "admin@*"])
    assert keys.verify(mixed).home_tenant == "hosp-b"


def test_only_the_sha256_of_the_key_is_stored(keys: ApiKeys, catalog: Catalog) -> None:
    _, text = keys.create("script", ["viewer@default"])
    secret = text.split("_", 2)[2]
    assert len(secret) >= 43  # token_urlsafe(32): 256 random bits
    rows = catalog.fetchall("SELECT * FROM api_keys")
    assert len(rows) == 1
    stored = " ".join(str(value) for value in rows[0])
    assert secret not in stored and text not in stored
    assert hashlib.sha256(text.encode()).hexdigest() in stored
    # and the listing has neither secret nor hash
    listing = json.dumps([info.as_dict() for info in keys.list()])
    assert secret not in listing
    assert hashlib.sha256(text.encode()).hexdigest() not in listing
    assert keys.create("script", ["viewer@default"])[1] != text  # every key is new


def test_list_shows_every_key_and_its_state(keys: ApiKeys) -> None:
    first, _ = keys.create("one", ["viewer@hosp-a"])
    second, _ = keys.create("two", ["admin@*", "viewer@default"])
    assert keys.revoke(first)
    listed = {info.key_id: info for info in keys.list()}
    assert set(listed) == {first, second}
    assert listed[first].name == "one" and listed[first].revoked is not None
    assert listed[second].grants == ["admin@*", "viewer@default"]
    assert listed[second].revoked is None
    as_dict = listed[second].as_dict()
    assert as_dict["id"] == second and str(as_dict["created"]).endswith("Z")
    assert keys.active_count() == 1


def test_a_revoked_key_is_refused_at_once_by_every_process(keys: ApiKeys, catalog_url: str) -> None:
    key_id, text = keys.create("leaked", ["viewer@hosp-a"])
    # another kho serve process: its own connections to the same catalog
    with contextlib.closing(open_catalog(catalog_url)) as other_catalog:
        other = ApiKeys(other_catalog, TENANTS)
        assert other.verify(text).name == "leaked"
        assert keys.revoke(key_id)
        with pytest.raises(AuthenticationError, match="unknown or revoked"):
            other.verify(text)
    with pytest.raises(AuthenticationError):
        keys.verify(text)
    assert not keys.revoke(key_id)  # already revoked
    assert not keys.revoke("0123456789ab")  # no such key
    assert not keys.revoke("not a key id")


def test_revoke_accepts_the_key_text_itself(keys: ApiKeys) -> None:
    key_id, text = keys.create("pasted", ["viewer@default"])
    assert key_id_of(text) == key_id
    assert keys.revoke(text)
    with pytest.raises(AuthenticationError):
        keys.verify(text)


def test_malformed_unknown_and_forged_keys_are_refused(keys: ApiKeys) -> None:
    key_id, text = keys.create("real", ["viewer@default"])
    secret = text.split("_", 2)[2]
    forged_secret = ("A" if secret[0] != "A" else "B") + secret[1:]
    other_id = "0" * 12 if key_id != "0" * 12 else "1" * 12
    for bad in (
        "",
        "kho_",
        "kho_abc",
        f"kho_{key_id}",
        f"kho_{key_id}_",
        f"kho_{key_id}_{forged_secret}",  # right id, wrong secret
        f"kho_{other_id}_{secret}",  # right secret, unknown id
        f"kho_{key_id.upper()}_{secret}",
        f"{text}x",
        f"{text}\n",
        f" {text}",
        f"kho_{key_id}_{secret[:-1]}",
        f"xkho_{key_id}_{secret}",
        f"kho_{key_id}_{secret}\u00e9",
        "eyJhbGciOiJub25lIn0.e30.",
    ):
        with pytest.raises(AuthenticationError):
            keys.verify(bad)
    assert keys.verify(text).name == "real"


@pytest.mark.parametrize(
    "grant",
    ["viewer", "viewer@", "viewer@hosp-z", "reader@default", "", "@default", "admin@**"],
)
def test_a_grant_that_grants_nothing_is_refused(keys: ApiKeys, grant: str) -> None:
    with pytest.raises(ConfigError, match="grants nothing"):
        keys.create("bad", ["viewer@default", grant])
    assert keys.list() == []


def test_names_and_grant_lists_are_checked(keys: ApiKeys) -> None:
    with pytest.raises(ConfigError, match="at least one grant"):
        keys.create("none", [])
    with pytest.raises(ConfigError, match="name"):
        keys.create("  ", ["viewer@default"])
    with pytest.raises(ConfigError, match="name"):
        keys.create("x" * 101, ["viewer@default"])
    _, text = keys.create(" spaced ", [" viewer @ hosp-a ", "viewer@hosp-a"])
    caller = keys.verify(text)
    assert caller.name == "spaced"
    assert keys.list()[0].grants == ["viewer@hosp-a"]


def test_a_grant_for_a_tenant_since_removed_grants_nothing(keys: ApiKeys, catalog: Catalog) -> None:
    _, text = keys.create("old", ["viewer@hosp-b"])
    fewer = ApiKeys(catalog, ["default", "hosp-a"])  # hosp-b left the platform
    caller = fewer.verify(text)
    assert caller.grants == frozenset()
    assert not caller.may(Role.VIEWER, "hosp-b")


def test_the_access_service_takes_a_key_as_bearer_token_or_x_api_key(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", auth="on", tenants=["hosp-a"])
    with Archive(settings) as archive:
        access = Access(settings, archive)
        key_id, text = access.api_keys.create("emr", ["viewer@hosp-a"])
        for caller in (
            access.authenticate_http(f"Bearer {text}", None, "10.0.0.7"),
            access.authenticate_http(None, text, "10.0.0.7"),
        ):
            assert (caller.kind, caller.name, caller.address) == (
                CallerKind.API_KEY,
                "emr",
                "10.0.0.7",
            )
            assert access.tenant_for(caller, Role.VIEWER) == "hosp-a"
        assert access.api_keys.revoke(key_id)
        with pytest.raises(AuthenticationError):
            access.authenticate_http(f"Bearer {text}", None)
