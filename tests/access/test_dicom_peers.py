"""The AE registry (kho.access.dicom_peers): who may associate, from where, for which services
and destinations, and in which hospital; with authentication off, everything as before."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from kho.access import dicom_peers
from kho.access.callers import CallerKind, Grant, Role
from kho.access.dicom_peers import (
    AeRegistry,
    DicomRefusal,
    PeerRejectedError,
    PeerRejection,
    report_refusal,
)
from kho.archive.config import DIMSE_SERVICES, PLATFORM, Settings
from kho.errors import AuthenticationError, ConfigError

PEERS: dict[str, dict[str, Any]] = {
    "CT_A": {"tenant": "hosp-a", "services": ["echo", "store"], "network": "10.1.0.0/16"},
    "WS_A": {"tenant": "hosp-a", "services": ["find", "get", "move"], "host": "10.1.2.3"},
    "PACS_A": {"tenant": "hosp-a", "services": [], "host": "10.1.9.9", "port": 104},
    "PACS_B": {"tenant": "hosp-b", "services": [], "host": "10.2.9.9", "port": 11112},
    "WS_B": {"tenant": "hosp-b", "services": ["echo", "find"]},
    "LOCAL": {"services": ["echo"], "host": "localhost"},  # the default tenant, by name
    "V6": {"tenant": "hosp-b", "services": ["echo"], "network": "fd00:1::/64"},
}


def settings_with(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "ae_title": "KHO",
        "tenants": ["hosp-a", "hosp-b"],
        "dicom_peers": PEERS,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def peers(tmp_path: Path) -> AeRegistry:
    return AeRegistry(settings_with(tmp_path))


def rejection(peers: AeRegistry, calling: str, called: str, address: str) -> PeerRejection:
    with pytest.raises(PeerRejectedError) as caught:
        peers.authenticate(calling, called, address)
    assert isinstance(caught.value, AuthenticationError)
    return caught.value.reason


def test_a_registry_turns_authentication_on(tmp_path: Path) -> None:
    assert settings_with(tmp_path).auth_on
    assert not settings_with(tmp_path, dicom_peers={}).auth_on


def test_registered_peer_is_a_dicom_caller_of_its_hospital(peers: AeRegistry) -> None:
    caller = peers.authenticate("CT_A", "KHO", "10.1.200.7")
    assert caller.kind == CallerKind.DICOM
    assert (caller.name, caller.home_tenant, caller.address) == ("CT_A", "hosp-a", "10.1.200.7")
    # store is an upload; it reads nothing
    assert caller.grants == frozenset({Grant(Role.UPLOADER, "hosp-a")})
    workstation = peers.authenticate("WS_A", "KHO", "10.1.2.3")
    assert workstation.grants == frozenset({Grant(Role.VIEWER, "hosp-a")})
    assert not workstation.may(Role.VIEWER, "hosp-b")


def test_peer_without_tenant_belongs_to_the_default_one(peers: AeRegistry) -> None:
    caller = peers.authenticate("LOCAL", "KHO", "127.0.0.1")
    assert caller.home_tenant == "default"


def test_ae_titles_compare_without_padding(peers: AeRegistry) -> None:
    caller = peers.authenticate(" CT_A  ", "KHO       ", "10.1.0.1")
    assert caller.name == "CT_A"


def test_unknown_calling_ae_is_rejected(peers: AeRegistry) -> None:
    assert rejection(peers, "STRANGER", "KHO", "10.1.0.1") == PeerRejection.UNKNOWN_CALLING_AE
    # AE titles are case-sensitive (PS3.5 AE)
    assert rejection(peers, "ct_a", "KHO", "10.1.0.1") == PeerRejection.UNKNOWN_CALLING_AE


@pytest.mark.parametrize(
    ("calling", "address", "allowed"),
    [
        ("CT_A", "10.1.0.1", True),
        ("CT_A", "10.1.255.254", True),
        ("CT_A", "10.2.0.1", False),
        ("CT_A", "127.0.0.1", False),
        ("CT_A", "::ffff:10.1.3.4", True),  # IPv4-mapped, as a dual-stack socket reports it
        ("CT_A", "not an address", False),
        ("CT_A", "", False),
        # no network: its host's address alone
        ("WS_A", "10.1.2.3", True),
        ("WS_A", "10.1.2.4", False),
        # neither network nor host: from anywhere
        ("WS_B", "192.0.2.55", True),
        ("WS_B", "", True),
        # a host name: what it resolves to
        ("LOCAL", "127.0.0.1", True),
        ("LOCAL", "10.1.0.1", False),
        ("V6", "fd00:1::42", True),
        ("V6", "fd00:2::42", False),
        ("V6", "10.1.0.1", False),
    ],
)
def test_calls_from_outside_the_network_are_rejected(
    peers: AeRegistry, calling: str, address: str, allowed: bool
) -> None:
    if allowed:
        assert peers.authenticate(calling, "KHO", address).name == calling
    else:
        assert rejection(peers, calling, "KHO", address) == PeerRejection.WRONG_NETWORK


def test_wrong_called_ae_is_rejected(peers: AeRegistry) -> None:
    assert rejection(peers, "CT_A", "OTHER", "10.1.0.1") == PeerRejection.WRONG_CALLED_AE
    # an unknown caller learns nothing about the called AE title first
    assert rejection(peers, "STRANGER", "OTHER", "10.1.0.1") == PeerRejection.UNKNOWN_CALLING_AE


def test_bad_network_is_a_configuration_error(tmp_path: Path) -> None:
    bad = {"CT": {"services": ["echo"], "network": "10.1.0.0/33"}}
    with pytest.raises(ConfigError, match="network"):
        AeRegistry(settings_with(tmp_path, dicom_peers=bad))


def test_services_are_those_granted(peers: AeRegistry) -> None:
    ct = peers.authenticate("CT_A", "KHO", "10.1.0.1")
    ws = peers.authenticate("WS_A", "KHO", "10.1.2.3")
    assert [s for s in DIMSE_SERVICES if peers.allows(ct, s)] == ["echo", "store"]
    assert [s for s in DIMSE_SERVICES if peers.allows(ws, s)] == ["find", "get", "move"]
    # a destination-only entry may do nothing itself
    pacs = peers.authenticate("PACS_A", "KHO", "10.1.9.9")
    assert not any(peers.allows(pacs, s) for s in DIMSE_SERVICES)


def test_move_goes_only_to_the_hospitals_registered_destinations(
    tmp_path: Path,
) -> None:
    settings = settings_with(tmp_path, move_destinations={"LEGACY": "10.9.9.9:104"})
    peers = AeRegistry(settings)
    ws_a = peers.authenticate("WS_A", "KHO", "10.1.2.3")
    ws_b = peers.authenticate("WS_B", "KHO", "10.2.0.1")
    assert peers.move_destination(ws_a, "PACS_A") == ("10.1.9.9", 104)
    assert peers.move_destination(ws_a, " PACS_A ") == ("10.1.9.9", 104)
    assert peers.move_destination(ws_a, "PACS_B") is None  # another hospital's
    assert peers.move_destination(ws_b, "PACS_B") == ("10.2.9.9", 11112)
    assert peers.move_destination(ws_b, "PACS_A") is None
    assert peers.move_destination(ws_a, "CT_A") is None  # registered, no port
    assert peers.move_destination(ws_a, "NOWHERE") is None
    assert peers.move_destination(ws_a, "LEGACY") is None  # not the registry


def test_auth_off_is_the_open_caller_and_todays_destinations(tmp_path: Path) -> None:
    settings = settings_with(
        tmp_path, auth="off", move_destinations={"STORESCP": "127.0.0.1:11113"}
    )
    peers = AeRegistry(settings)
    caller = peers.authenticate("ANYONE", "WHATEVER", "192.0.2.1")
    assert caller.kind == CallerKind.OPEN
    assert caller.home_tenant == "default"
    assert caller.may(Role.ADMIN, PLATFORM)
    assert all(peers.allows(caller, s) for s in DIMSE_SERVICES)
    assert peers.move_destination(caller, "STORESCP") == ("127.0.0.1", 11113)
    assert peers.move_destination(caller, "PACS_A") is None  # the registry is not used


def test_auth_off_checks_the_called_ae_only_when_asked(tmp_path: Path) -> None:
    strict = AeRegistry(settings_with(tmp_path, auth="off", require_called_ae=True))
    assert rejection(strict, "ANYONE", "OTHER", "") == PeerRejection.WRONG_CALLED_AE
    assert strict.authenticate("ANYONE", "KHO", "").kind == CallerKind.OPEN


def test_refusals_are_logged_and_observed(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[DicomRefusal] = []

    def broken(refusal: DicomRefusal) -> None:
        raise RuntimeError("an observer that fails")

    dicom_peers.REFUSAL_OBSERVERS.extend([broken, seen.append])
    try:
        refusal = DicomRefusal(
            "CT_A", "KHO", "10.1.0.1", dicom_peers.SERVICE_NOT_GRANTED, "find", "hosp-a"
        )
        with caplog.at_level(logging.WARNING, logger=dicom_peers.REFUSAL_LOGGER):
            report_refusal(refusal)
    finally:
        dicom_peers.REFUSAL_OBSERVERS.remove(broken)
        dicom_peers.REFUSAL_OBSERVERS.remove(seen.append)
    assert seen == [refusal]  # the failing observer before it changed nothing
    messages = [r.getMessage() for r in caplog.records if r.name == dicom_peers.REFUSAL_LOGGER]
    assert any(
        "find refused" in m and "'CT_A'" in m and "10.1.0.1" in m and "service not granted" in m
        for m in messages
    ), messages
