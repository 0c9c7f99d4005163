"""Share links, launch tokens and their sessions on both catalog engines (issue 17): made
by a caller with the viewer role, stored as a SHA-256 (the PIN as a salted scrypt hash),
refused once expired or revoked, locked after too many wrong PINs, a launch token opened
once, a session ending with its link; and the access service telling them from API keys.

Time passing is simulated by moving a row's expiry into the past in the catalog itself."""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kho.access.api_keys import ApiKeys
from kho.access.callers import Caller, CallerKind, Grant, Role
from kho.access.links import (
    LAUNCH_TTL_S,
    MAX_PIN_FAILURES,
    SESSION_TTL_S,
    SHARE_TTL_S,
    LinkInputError,
    LinkKind,
    LinkRefusedError,
    LinkState,
    ShareLinks,
    link_id_of,
    parse_duration,
)
from kho.access.service import Access
from kho.archive.archive import Archive
from kho.archive.catalog import Catalog, open_catalog
from kho.archive.config import Settings
from kho.errors import AccessDeniedError, AuthenticationError
from tests.helpers.postgres import ENGINES, postgres_database

TENANTS = ["default", "hosp-a", "hosp-b"]
STUDY = "1.2.826.0.1.3680043.8.498.1"
OTHER_STUDY = "1.2.826.0.1.3680043.8.498.2"


@pytest.fixture(params=ENGINES)
def catalog(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Catalog]:
    with contextlib.ExitStack() as stack:
        if request.param == "postgresql":
            url = stack.enter_context(postgres_database())
        else:
            url = str(tmp_path / "catalog.sqlite")
        yield stack.enter_context(contextlib.closing(open_catalog(url)))


@pytest.fixture
def links(catalog: Catalog) -> ShareLinks:
    return ShareLinks(catalog, TENANTS)


def doctor(*grants: str, name: str = "dr-house") -> Caller:
    parsed = set()
    for grant in grants:
        role, _, tenant = grant.partition("@")
        parsed.add(Grant(Role(role), tenant))
    return Caller(CallerKind.TOKEN, name, frozenset(parsed), home_tenant="hosp-a")


DOCTOR = doctor("viewer@hosp-a")


def expire(catalog: Catalog, link_id: str) -> None:
    """The link's time is up (as if its expiry had passed)."""
    with catalog.transaction():
        catalog.execute(
            "UPDATE share_links SET expires_at = ? WHERE link_id = ?", (time.time() - 1, link_id)
        )


class _Refused:
    """``with _Refused(state):`` the block raises LinkRefusedError with that state."""

    def __init__(self, state: LinkState) -> None:
        self.state = state
        self.error: LinkRefusedError | None = None

    def __enter__(self) -> _Refused:
        return self

    def __exit__(self, kind: object, error: BaseException | None, _tb: object) -> bool:
        assert isinstance(error, LinkRefusedError), f"expected {self.state}, got {error!r}"
        assert error.state == self.state, f"expected {self.state}, got {error.state}"
        assert isinstance(error, AuthenticationError)  # 401 as a bearer token or cookie
        self.error = error
        return True


# --- share links -------------------------------------------------------------------------


def test_a_share_link_opens_its_study_as_a_scoped_viewer(links: ShareLinks) -> None:
    made = links.create_share("hosp-a", [STUDY], created_by=DOCTOR)
    assert made.kind == LinkKind.SHARE
    assert made.text.startswith(f"kho_share_{made.link_id}_")
    assert made.expires == pytest.approx(time.time() + SHARE_TTL_S, abs=60)
    caller = links.verify(made.text, address="10.0.0.7")
    assert caller.kind == CallerKind.SHARE
    assert caller.name == f"share:{made.link_id}"
    assert caller.studies == frozenset({STUDY})
    assert caller.home_tenant == "hosp-a"
    assert caller.grants == {Grant(Role.VIEWER, "hosp-a")}
    assert caller.address == "10.0.0.7"
    assert not caller.may(Role.VIEWER, "hosp-b")
    assert not caller.may(Role.UPLOADER, "hosp-a")


def test_only_the_secrets_hash_is_stored(links: ShareLinks, catalog: Catalog) -> None:
    made = links.create_share("hosp-a", [STUDY], created_by=DOCTOR, pin="4711")
    stored = catalog.fetchall("SELECT * FROM share_links")
    flat = " ".join(str(value) for row in stored for value in row)
    assert made.text not in flat
    assert made.text.rpartition("_")[2] not in flat
    assert hashlib.sha256(made.text.encode()).hexdigest() in flat
    (pin_hash,) = catalog.fetchone(
        "SELECT pin_hash FROM share_links WHERE link_id = ?", (made.link_id,)
    ) or (None,)
    # salted and slow: scrypt with its parameters, never the PIN nor a plain digest of it
    assert str(pin_hash).startswith("scrypt$16384$8$1$")
    assert "4711" not in str(pin_hash)
    assert hashlib.sha256(b"4711").hexdigest() not in str(pin_hash)
    other = links.create_share("hosp-a", [STUDY], created_by=DOCTOR, pin="4711")
    (other_hash,) = catalog.fetchone(
        "SELECT pin_hash FROM share_links WHERE link_id = ?", (other.link_id,)
    ) or (None,)
    assert other_hash != pin_hash  # a salt of its own


def test_wrong_secrets_and_made_up_tokens_are_one_answer(links: ShareLinks) -> None:
    made = links.create_share("hosp-a", [STUDY], created_by=DOCTOR)
    prefix, _, secret = made.text.rpartition("_")
    flipped = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    for text in (
        f"{prefix}_{flipped}",  # the right id, a wrong secret
        "kho_share_0123456789ab_" + "x" * 43,  # an id that exists nowhere
        made.text.replace("kho_share_", "kho_launch_"),  # the right secret, another kind
        made.text.replace("kho_share_", "kho_session_"),
        "kho_share_" + made.link_id,  # no secret
        made.text + "x",
        "",
    ):
        with _Refused(LinkState.UNKNOWN):
            links.verify(text)


def test_an_expired_link_is_refused(links: ShareLinks, catalog: Catalog) -> None:
    made = links.create_share("hosp-a", [STUDY], created_by=DOCTOR, expires_s="1h")
    assert made.expires == pytest.approx(time.time() + 3600, abs=60)
    session = links.open_session(made.text)
    expire(catalog, made.link_id)
    with _Refused(LinkState.EXPIRED):
        links.verify(made.text)
    with _Refused(LinkState.EXPIRED):
        links.open_session(made.text)
    # its session ends with it
    with _Refused(LinkState.EXPIRED):
        links.verify(session.text)
    assert links.inspect(made.text)[1] == LinkState.EXPIRED
    assert links.list()[0].state == LinkState.EXPIRED


def test_revocation_counts_at_once_for_the_link_and_its_sessions(
    links: ShareLinks, catalog: Catalog
) -> None:
    made = links.create_share("hosp-a", [STUDY], created_by=DOCTOR)
    sessions = [links.open_session(made.text) for _ in range(2)]
    for session in sessions:
        assert links.verify_session(session.text).studies == {STUDY}
    # another process sharing the catalog revokes it
    assert ShareLinks(catalog, TENANTS).revoke(made.link_id)
    with _Refused(LinkState.REVOKED):
        links.verify(made.text)
    for session in sessions:
        with _Refused(LinkState.REVOKED):
            links.verify_session(session.text)
        assert links.session_of(session.text, made.link_id) is None
    assert not links.revoke(made.link_id)  # once
    assert not links.revoke("not-an-id")
    assert not links.revoke(sessions[0].text)  # a session is no link to revoke
    [info] = links.list()
    assert info.state == LinkState.REVOKED


def test_revoke_takes_the_link_text_too(links: ShareLinks) -> None:
    made = links.create_share("hosp-a", [STUDY], created_by=DOCTOR)
    assert link_id_of(made.text) == made.link_id
    assert links.revoke(made.text)


def test_a_pin_is_asked_checked_and_locks_after_too_many_failures(links: ShareLinks) -> None:
    made = links.create_share("hosp-a", [STUDY], created_by=DOCTOR, pin="4711")
    assert made.has_pin
    with _Refused(LinkState.PIN_REQUIRED):
        links.verify(made.text)
    with _Refused(LinkState.PIN_REQUIRED):
        links.open_session(made.text)
    assert links.inspect(made.text)[1] == LinkState.PIN_REQUIRED
    assert links.verify(made.text, "4711").studies == {STUDY}
    for attempt in range(1, MAX_PIN_FAILURES):
        with _Refused(LinkState.WRONG_PIN) as wrong:
            links.verify(made.text, "0000")
        assert wrong.error is not None
        assert wrong.error.attempts_left == MAX_PIN_FAILURES - attempt
    with _Refused(LinkState.LOCKED):  # the last wrong PIN locks it
        links.verify(made.text, "1234")
    with _Refused(LinkState.LOCKED):  # for good: the right PIN too
        links.verify(made.text, "4711")
    assert links.inspect(made.text)[1] == LinkState.LOCKED
    assert links.list()[0].state == LinkState.LOCKED


def test_a_right_pin_resets_the_count(links: ShareLinks) -> None:
    made = links.create_share("hosp-a", [STUDY], created_by=DOCTOR, pin="123456")
    for _ in range(MAX_PIN_FAILURES - 1):
        with _Refused(LinkState.WRONG_PIN):
            links.verify(made.text, "654321")
    links.open_session(made.text, "123456")
    with _Refused(LinkState.WRONG_PIN) as wrong:
        links.verify(made.text, "654321")
    assert wrong.error is not None and wrong.error.attempts_left == MAX_PIN_FAILURES - 1


def test_parallel_guesses_get_the_allowed_attempts_in_all(links: ShareLinks) -> None:
    made = links.create_share("hosp-a", [STUDY], created_by=DOCTOR, pin="4711")
    states: list[LinkState] = []
    lock = threading.Lock()

    def guess(pin: str) -> None:
        try:
            links.verify(made.text, pin)
            state = LinkState.ACTIVE
        except LinkRefusedError as exc:
            state = exc.state
        with lock:
            states.append(state)

    threads = [threading.Thread(target=guess, args=(f"{n:04d}",)) for n in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert states.count(LinkState.WRONG_PIN) == MAX_PIN_FAILURES - 1
    assert states.count(LinkState.LOCKED) == 20 - (MAX_PIN_FAILURES - 1)
    with _Refused(LinkState.LOCKED):
        links.verify(made.text, "4711")


def test_a_session_skips_the_pin_and_knows_its_link(links: ShareLinks) -> None:
    made = links.create_share("hosp-a", [STUDY], created_by=DOCTOR, pin="4711", expires_s="1h")
    other = links.create_share("hosp-a", [OTHER_STUDY], created_by=DOCTOR)
    session = links.open_session(made.text, "4711", address="10.0.0.7")
    assert session.text.startswith("kho_session_")
    assert session.link_id == made.link_id
    # never past the link's own expiry (1 h here, less than a session's 2 h)
    assert session.expires == pytest.approx(made.expires, abs=1)
    assert 3500 < session.max_age <= 3600
    caller = links.verify_session(session.text, address="10.0.0.8")
    assert caller.kind == CallerKind.SHARE
    assert caller.name == f"share:{made.link_id}"
    assert caller.studies == {STUDY}
    assert caller.address == "10.0.0.8"
    assert links.session_of(session.text, made.link_id) is not None
    assert links.session_of(session.text, other.link_id) is None  # another link's page
    assert links.session_of(made.text, made.link_id) is None  # a link is no session
    # a session opens nothing further, and a cookie holding the link itself is refused
    with _Refused(LinkState.UNKNOWN):
        links.open_session(session.text)
    with _Refused(LinkState.UNKNOWN):
        links.verify_session(other.text)
    [info, _] = links.list()
    assert info.uses == 1 and info.last_used is not None


def test_share_sessions_last_two_hours_unless_the_link_ends_first(links: ShareLinks) -> None:
    made = links.create_share("hosp-a", [STUDY], created_by=DOCTOR)
    session = links.open_session(made.text)
    assert session.expires == pytest.approx(time.time() + SESSION_TTL_S[LinkKind.SHARE], abs=60)


def test_expired_sessions_are_refused(links: ShareLinks, catalog: Catalog) -> None:
    made = links.create_share("hosp-a", [STUDY], created_by=DOCTOR)
    session = links.open_session(made.text)
    expire(catalog, link_id_of(session.text) or "")
    with _Refused(LinkState.EXPIRED):
        links.verify_session(session.text)
    assert links.verify(made.text).studies == {STUDY}  # the link itself still opens


# --- launch tokens -------------------------------------------------------------------------


def test_a_launch_token_opens_once_for_eight_hours(links: ShareLinks, catalog: Catalog) -> None:
    made = links.create_launch("hosp-a", [STUDY, OTHER_STUDY, STUDY], created_by=DOCTOR)
    assert made.text.startswith(f"kho_launch_{made.link_id}_")
    assert made.studies == (STUDY, OTHER_STUDY)
    assert made.expires == pytest.approx(time.time() + LAUNCH_TTL_S, abs=60)
    caller = links.verify(made.text)  # as a bearer token, before it is opened
    assert caller.kind == CallerKind.LAUNCH
    assert caller.studies == {STUDY, OTHER_STUDY}
    session = links.open_session(made.text)
    assert session.expires == pytest.approx(time.time() + SESSION_TTL_S[LinkKind.LAUNCH], abs=60)
    assert links.verify_session(session.text).kind == CallerKind.LAUNCH
    with _Refused(LinkState.USED):
        links.open_session(made.text)
    with _Refused(LinkState.USED):
        links.verify(made.text)
    # the launch token's five minutes end; the session it opened goes on
    expire(catalog, made.link_id)
    assert links.verify_session(session.text).studies == {STUDY, OTHER_STUDY}
    # until the token is revoked
    assert links.revoke(made.link_id)
    with _Refused(LinkState.REVOKED):
        links.verify_session(session.text)
    assert links.list() == []  # share links only, unless asked
    assert [i.kind for i in links.list([LinkKind.LAUNCH])] == [LinkKind.LAUNCH]


def test_an_unopened_launch_token_expires(links: ShareLinks, catalog: Catalog) -> None:
    made = links.create_launch("hosp-a", [STUDY], created_by=DOCTOR, ttl_s=60)
    expire(catalog, made.link_id)
    with _Refused(LinkState.EXPIRED):
        links.open_session(made.text)


def test_two_openings_at_once_get_one_session(links: ShareLinks) -> None:
    made = links.create_launch("hosp-a", [STUDY], created_by=DOCTOR)
    opened: list[str] = []
    refusals: list[LinkState] = []
    lock = threading.Lock()

    def open_it() -> None:
        try:
            session = links.open_session(made.text)
            with lock:
                opened.append(session.text)
        except LinkRefusedError as exc:
            with lock:
                refusals.append(exc.state)

    threads = [threading.Thread(target=open_it) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(opened) == 1
    assert refusals == [LinkState.USED] * 5


# --- who may make them, and with what ------------------------------------------------------


def test_only_a_viewer_of_the_studys_hospital_makes_links(links: ShareLinks) -> None:
    for maker in (
        doctor("viewer@hosp-b"),  # another hospital
        doctor("uploader@hosp-a"),  # no read right
        Caller(CallerKind.TOKEN, "nobody"),
    ):
        for create in (links.create_share, links.create_launch):
            with pytest.raises(AccessDeniedError):
                create("hosp-a", [STUDY], created_by=maker)
    with pytest.raises(AccessDeniedError):  # an undeclared hospital: the same answer
        links.create_share("no-such-hospital", [STUDY], created_by=doctor("admin@*"))
    # admins (of the hospital, or the platform) may
    assert links.create_share("hosp-a", [STUDY], created_by=doctor("admin@hosp-a"))
    assert links.create_launch("hosp-a", [STUDY], created_by=doctor("admin@*"))
    # a share or launch caller passes nothing on, though it holds the viewer role there
    made = links.create_share("hosp-a", [STUDY], created_by=DOCTOR)
    scoped = links.verify(made.text)
    assert scoped.may(Role.VIEWER, "hosp-a")
    with pytest.raises(AccessDeniedError):
        links.create_share("hosp-a", [STUDY], created_by=scoped)


@pytest.mark.parametrize(
    ("studies", "options"),
    [
        ([], {}),
        (["1.2.*"], {}),
        (["1.2..3"], {}),
        (["../etc"], {}),
        ([STUDY], {"pin": "12"}),
        ([STUDY], {"pin": "12ab"}),
        ([STUDY], {"pin": "1" * 13}),
        ([STUDY], {"expires_s": "91d"}),
        ([STUDY], {"expires_s": "0"}),
        ([STUDY], {"expires_s": "soon"}),
    ],
)
def test_bad_input_makes_no_link(
    links: ShareLinks, studies: list[str], options: dict[str, str]
) -> None:
    with pytest.raises(LinkInputError):
        links.create_share("hosp-a", studies, created_by=DOCTOR, **options)
    assert links.list() == []


def test_launch_tokens_live_an_hour_at_most(links: ShareLinks) -> None:
    with pytest.raises(LinkInputError):
        links.create_launch("hosp-a", [STUDY], created_by=DOCTOR, ttl_s="2h")


def test_durations() -> None:
    assert parse_duration("90") == 90
    assert parse_duration(90) == 90
    assert parse_duration("30m") == 1800
    assert parse_duration("12h") == 43200
    assert parse_duration("7d") == 7 * 86400
    assert parse_duration(" 2W ") == 14 * 86400
    for bad in ("", "d", "-1d", "1y", "1.5.2h"):
        with pytest.raises(LinkInputError):
            parse_duration(bad)


def test_list_shows_no_secret(links: ShareLinks) -> None:
    made = links.create_share("hosp-a", [STUDY], created_by=DOCTOR, pin="4711")
    links.create_share("hosp-b", [OTHER_STUDY], created_by=doctor("viewer@hosp-b"))
    infos = links.list()
    assert [i.tenant for i in infos] == ["hosp-a", "hosp-b"]
    assert [i.tenant for i in links.list(tenant="hosp-b")] == ["hosp-b"]
    shown = infos[0].as_dict()
    assert shown["id"] == made.link_id
    assert shown["studies"] == [STUDY]
    assert shown["created_by"] == "dr-house"
    assert shown["pin"] is True and shown["state"] == "active" and shown["uses"] == 0
    assert made.text.rpartition("_")[2] not in str(shown)
    assert "4711" not in str(shown) and "scrypt" not in str(shown)


# --- the access service: which credential is which ---------------------------------------


def test_the_http_door_tells_links_from_api_keys(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path / "data", fsync=False, dicom_port=0, http_port=0, auth="on",
        tenants=["hosp-a"],
    )  # fmt: skip
    with Archive(settings) as archive:
        access = Access(settings, archive)
        keys: ApiKeys = access.api_keys
        _, key = keys.create("emr", ["viewer@hosp-a"])
        share = access.links.create_share("hosp-a", [STUDY], created_by=DOCTOR)
        launch = access.links.create_launch("hosp-a", [STUDY], created_by=DOCTOR)
        session = access.links.open_session(share.text)
        assert access.authenticate_http(f"Bearer {key}", None).kind == CallerKind.API_KEY
        assert access.authenticate_http(None, key).kind == CallerKind.API_KEY
        for text, kind in ((share.text, CallerKind.SHARE), (launch.text, CallerKind.LAUNCH)):
            caller = access.authenticate_http(f"Bearer {text}", None)
            assert (caller.kind, caller.studies) == (kind, {STUDY})
        # the session cookie: taken when no header speaks for the caller
        assert access.authenticate_http(None, None, session=session.text).studies == {STUDY}
        assert access.authenticate_http(f"Bearer {key}", None, session=session.text).studies is None
        # an API key's text is never read as a link, nor a link's as an API key
        for text in (key.replace("kho_", "kho_share_", 1), share.text.replace("share_", "", 1)):
            with pytest.raises(AuthenticationError):
                access.authenticate_http(f"Bearer {text}", None)
        with pytest.raises(AuthenticationError):  # a link's own text is no session cookie
            access.authenticate_http(None, None, session=share.text)
        with pytest.raises(AuthenticationError):
            access.authenticate_http(None, None)
        # links live in the platform catalog: another process's Access sees them
        assert Access(settings, archive).authenticate_http(f"Bearer {share.text}", None).studies


def test_with_authentication_off_every_caller_is_the_open_one(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", fsync=False, dicom_port=0, http_port=0)
    with Archive(settings) as archive:
        access = Access(settings, archive)
        made = access.links.create_share("default", [STUDY], created_by=doctor("viewer@default"))
        caller = access.authenticate_http(f"Bearer {made.text}", None)
        assert caller.kind == CallerKind.OPEN and caller.studies is None
