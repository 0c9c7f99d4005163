"""Access control at the DICOM door (issue 15): the DIMSE part of the deny-by-default matrix,
and tenancy over DIMSE.

kho runs with authentication on, two hospitals (``hosp-a``, ``hosp-b``) and an AE registry;
the peers are dcmtk's echoscu, storescu, findscu, getscu and movescu, and two dcmtk storescp
as C-MOVE destinations (one registered per hospital).  Every service x {unknown calling AE,
wrong called AE, calling from outside the peer's network, service not granted, another
hospital's study} is refused with the A-ASSOCIATE-RJ reason or the DIMSE status it should
be; the allowed cases work; both hospitals send the same study (same UIDs) and each sees and
retrieves only its own copy.  Store checks run on both C-STORE paths (kho's fast path and
pynetdicom's handler)."""

from __future__ import annotations

import contextlib
import re
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from kho.access import dicom_peers
from kho.access.dicom_peers import DicomRefusal
from kho.archive.archive import Archive
from kho.archive.config import DIMSE_SERVICES, Settings
from kho.dicom_scp import handlers
from kho.dicom_scp.server import DicomServer, build_ae, event_handlers
from kho.dicom_scp.statuses import MOVE_DESTINATION_UNKNOWN, NOT_AUTHORIZED, SUCCESS
from tests.archive.test_ingest import make_instance
from tests.helpers import dcmtk

# the same study, series and instance UIDs in both hospitals
STUDY = "1.2.826.0.1.3680043.10.1425.15.1"
SERIES = f"{STUDY}.1"
SOP = f"{SERIES}.1"
NAMES = {"hosp-a": "PATIENT^OF^A", "hosp-b": "PATIENT^OF^B"}

CALLING_AE_NOT_RECOGNIZED = "Calling AE Title Not Recognized"
CALLED_AE_NOT_RECOGNIZED = "Called AE Title Not Recognized"


def registry(dest_ports: dict[str, int]) -> dict[str, dict[str, Any]]:
    """The AE registry of the tests: per hospital a modality (store), a workstation
    (query/retrieve) and a C-MOVE destination; peers of hosp-a that call from the wrong
    network or lack a service."""
    return {
        "CT_A": {"tenant": "hosp-a", "services": ["echo", "store"], "network": "127.0.0.1"},
        "WS_A": {
            "tenant": "hosp-a",
            "services": ["echo", "find", "get", "move"],
            "network": "127.0.0.0/8",
        },
        "CT_B": {"tenant": "hosp-b", "services": ["echo", "store"]},
        "WS_B": {"tenant": "hosp-b", "services": ["echo", "find", "get", "move"]},
        "DEST_A": {
            "tenant": "hosp-a",
            "services": [],
            "host": "127.0.0.1",
            "port": dest_ports["DEST_A"],
        },
        "DEST_B": {
            "tenant": "hosp-b",
            "services": [],
            "host": "127.0.0.1",
            "port": dest_ports["DEST_B"],
        },
        # every service, but registered for a network the tests do not call from
        "FAR_A": {"tenant": "hosp-a", "services": list(DIMSE_SERVICES), "network": "10.9.9.0/24"},
        "ECHO_A": {"tenant": "hosp-a", "services": ["echo"]},
        "NOECHO_A": {"tenant": "hosp-a", "services": ["store", "find", "get", "move"]},
    }


def destination(
    tmp: Path, ae_title: str, ports: dict[str, int]
) -> contextlib.AbstractContextManager[dcmtk.StoreSCP]:
    """A storescp C-MOVE destination (unique file names: a study moved twice is two files)."""
    return dcmtk.run_storescp(
        tmp / ae_title.lower(), ae_title=ae_title, port=ports[ae_title], extra=("-uf",)
    )


@pytest.fixture(scope="module")
def door(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """kho with authentication on, its fast-path server and a pynetdicom-path server on the
    same archive, two storescp destinations, and the same study stored by both hospitals'
    modalities (through storescu)."""
    tmp = tmp_path_factory.mktemp("access")
    dest_ports = {"DEST_A": dcmtk.free_port(), "DEST_B": dcmtk.free_port()}
    settings = Settings(
        data_dir=tmp / "data",
        dicom_port=0,
        http_port=0,
        ae_title="KHO",
        fsync=False,
        auth="on",
        tenants=["hosp-a", "hosp-b"],
        dicom_peers=registry(dest_ports),
        # the settings' plain destinations are not the registry: ignored with auth on
        move_destinations={"LEGACY": f"127.0.0.1:{dest_ports['DEST_A']}"},
    )
    refusals: list[DicomRefusal] = []
    dicom_peers.REFUSAL_OBSERVERS.append(refusals.append)
    with Archive(settings) as archive:
        archive.derivers = []
        server = DicomServer(archive).start()
        plain_ae = build_ae(archive)
        plain = [
            h
            for h in event_handlers(archive, access=server.access)
            if h[1] is not handlers.handle_association_open
        ]
        plain_server = plain_ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=plain)
        try:
            with (
                destination(tmp, "DEST_A", dest_ports) as dest_a,
                destination(tmp, "DEST_B", dest_ports) as dest_b,
            ):
                state = {
                    "archive": archive,
                    "ports": {"fast": server.port, "pynetdicom": plain_server.server_address[1]},
                    "port": server.port,
                    "dest": {"DEST_A": dest_a, "DEST_B": dest_b},
                    "tmp": tmp,
                    "refusals": refusals,
                }
                for tenant, modality in (("hosp-a", "CT_A"), ("hosp-b", "CT_B")):
                    path = tmp / f"{tenant}.dcm"
                    path.write_bytes(
                        make_instance(
                            sop_uid=SOP,
                            study_uid=STUDY,
                            series_uid=SERIES,
                            patient_name=NAMES[tenant],
                        )
                    )
                    status, log = store(server.port, modality, path)
                    assert status == SUCCESS, log[-3000:]
                yield state
        finally:
            plain_ae.shutdown()
            server.stop()
            dicom_peers.REFUSAL_OBSERVERS.remove(refusals.append)


# --- running the dcmtk tools -------------------------------------------------------------


def _run(args: list[str]) -> str:
    result = subprocess.run(args, capture_output=True, text=True, env=dcmtk.env(), timeout=120)
    return result.stdout + result.stderr


def _status(log: str) -> int:
    """The status of the last DIMSE response in a dcmtk tool's -d log."""
    found = re.findall(r"DIMSE Status\s*: 0x([0-9a-fA-F]{4})", log)
    if found:
        return int(found[-1], 16)
    echo = re.findall(r"Received Echo Response \(([^)]*)\)", log)  # echoscu dumps no message
    assert echo, log[-3000:]
    if echo[-1] == "Success":
        return SUCCESS
    code = re.search(r"0x([0-9a-fA-F]+)", echo[-1])
    assert code, log[-3000:]
    return int(code.group(1), 16)


def _query(level: str = "STUDY") -> list[str]:
    return ["-k", f"QueryRetrieveLevel={level}", "-k", f"StudyInstanceUID={STUDY}"]


def store(port: int, aet: str, path: Path, aec: str = "KHO") -> tuple[int | None, str]:
    log = _run(
        [dcmtk.tool("storescu"), "-d", "-aet", aet, "-aec", aec, "127.0.0.1", str(port), str(path)]
    )
    found = re.findall(r"DIMSE Status\s*: 0x([0-9a-fA-F]{4})", log)
    return (int(found[-1], 16) if found else None), log


def echo(port: int, aet: str, aec: str = "KHO") -> str:
    return _run([dcmtk.tool("echoscu"), "-v", "-aet", aet, "-aec", aec, "127.0.0.1", str(port)])


def find(port: int, aet: str, out: Path, aec: str = "KHO") -> tuple[list[Any], str]:
    """findscu at study level (study root): (the matches, the log)."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("rsp*.dcm"):
        old.unlink()
    log = _run(
        [dcmtk.tool("findscu"), "-d", "-S", "-aet", aet, "-aec", aec, "-X", "-od", str(out),
         *_query(), "-k", "PatientName", "127.0.0.1", str(port)]
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        answers = [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]
    return answers, log


def get(port: int, aet: str, out: Path, aec: str = "KHO") -> tuple[list[Any], str]:
    """getscu of the study: (the instances received, the log)."""
    out.mkdir(parents=True, exist_ok=True)
    log = _run(
        [dcmtk.tool("getscu"), "-d", "-S", "-aet", aet, "-aec", aec, "-od", str(out),
         *_query(), "127.0.0.1", str(port)]
    )  # fmt: skip
    return [pydicom.dcmread(p) for p in sorted(out.iterdir()) if p.is_file()], log


def move(port: int, aet: str, destination: str, aec: str = "KHO") -> str:
    return _run(
        [dcmtk.tool("movescu"), "-d", "-S", "-aet", aet, "-aec", aec, "-aem", destination,
         *_query(), "127.0.0.1", str(port)]
    )  # fmt: skip


def request(door: dict[str, Any], service: str, aet: str, aec: str = "KHO") -> str:
    """One request of ``service`` from ``aet`` (to ``aec``): the tool's log."""
    port, out = door["port"], door["tmp"] / f"out-{service}-{aet}-{aec}"
    if service == "echo":
        return echo(port, aet, aec)
    if service == "store":
        return store(port, aet, door["tmp"] / "hosp-a.dcm", aec)[1]
    if service == "find":
        return find(port, aet, out, aec)[1]
    if service == "get":
        return get(port, aet, out, aec)[1]
    return move(port, aet, "DEST_A", aec)


def rejection(log: str) -> str:
    """The reason of an A-ASSOCIATE-RJ in a dcmtk tool's log (rejected permanent, by the
    service user)."""
    assert "Association Rejected" in log, log[-3000:]
    assert "Result: Rejected Permanent, Source: Service User" in log, log[-3000:]
    found = re.search(r"Reason: ([^\n]+)", log)
    assert found, log[-3000:]
    return found.group(1).strip()


def other_study(tmp_path: Path, number: int) -> tuple[Path, str]:
    """An instance of another study of hosp-b's patient (same Patient ID, same name: kho
    keeps the latest name of a patient): its file and SOP Instance UID."""
    study = f"{STUDY}.{number}"
    sop = f"{study}.1.1"
    path = tmp_path / f"study-{number}.dcm"
    path.write_bytes(
        make_instance(
            sop_uid=sop, study_uid=study, series_uid=f"{study}.1", patient_name=NAMES["hosp-b"]
        )
    )
    return path, sop


def stored_in(archive: Archive, tenant: str) -> bool:
    return archive.for_tenant(tenant).catalog.get_instance(SOP) is not None


# --- associations: who may connect --------------------------------------------------------


@pytest.mark.parametrize("service", DIMSE_SERVICES)
def test_unknown_calling_ae_is_rejected(door: dict[str, Any], service: str) -> None:
    log = request(door, service, "STRANGER")
    assert rejection(log) == CALLING_AE_NOT_RECOGNIZED
    refusal = door["refusals"][-1]
    assert (refusal.calling_ae, refusal.address, refusal.service) == (
        "STRANGER",
        "127.0.0.1",
        None,
    )
    assert refusal.reason == "calling AE title not recognized"


@pytest.mark.parametrize("service", DIMSE_SERVICES)
def test_wrong_called_ae_is_rejected(door: dict[str, Any], service: str) -> None:
    log = request(door, service, "CT_A" if service == "store" else "WS_A", aec="NOT_KHO")
    assert rejection(log) == CALLED_AE_NOT_RECOGNIZED
    assert door["refusals"][-1].called_ae == "NOT_KHO"


@pytest.mark.parametrize("service", DIMSE_SERVICES)
def test_call_from_outside_the_peers_network_is_rejected(
    door: dict[str, Any], service: str
) -> None:
    """FAR_A may use every service, from 10.9.9.0/24 only: from 127.0.0.1 it is not
    recognised (the same answer as an unknown AE: nothing tells a prober it guessed a
    registered title)."""
    log = request(door, service, "FAR_A")
    assert rejection(log) == CALLING_AE_NOT_RECOGNIZED
    refusal = door["refusals"][-1]
    assert (refusal.calling_ae, refusal.address) == ("FAR_A", "127.0.0.1")
    assert refusal.reason == dicom_peers.PeerRejection.WRONG_NETWORK.value


# --- services: what a recognised peer may do ---------------------------------------------


@pytest.mark.parametrize(
    ("service", "aet"),
    [
        ("echo", "NOECHO_A"),
        ("store", "ECHO_A"),
        ("store", "WS_A"),  # a workstation is no modality
        ("find", "ECHO_A"),
        ("find", "CT_A"),  # a modality does not list patients
        ("get", "ECHO_A"),
        ("get", "CT_A"),
        ("move", "ECHO_A"),
        ("move", "CT_A"),
    ],
)
def test_service_not_granted_is_refused_not_authorized(
    door: dict[str, Any], service: str, aet: str
) -> None:
    """0x0124 Refused: Not authorized (PS3.7 C.5); nothing is matched, sent or stored."""
    dest = door["dest"]["DEST_A"]
    before = dest.files()
    log = request(door, service, aet)
    assert "Association Accepted" in log, log[-3000:]
    assert _status(log) == NOT_AUTHORIZED, log[-3000:]
    assert dest.files() == before  # a refused C-MOVE contacts no destination
    refusal = door["refusals"][-1]
    assert (refusal.calling_ae, refusal.service, refusal.tenant) == (aet, service, "hosp-a")
    assert refusal.reason == dicom_peers.SERVICE_NOT_GRANTED


@pytest.mark.parametrize("path", ["fast", "pynetdicom"])
def test_store_not_granted_is_refused_on_both_paths(
    door: dict[str, Any], path: str, tmp_path: Path
) -> None:
    instance, sop = other_study(tmp_path, {"fast": 7, "pynetdicom": 8}[path])
    status, log = store(door["ports"][path], "ECHO_A", instance)
    assert status == NOT_AUTHORIZED, log[-3000:]
    archive = door["archive"]
    for tenant in archive.settings.tenant_names:
        assert archive.for_tenant(tenant).catalog.get_instance(sop) is None


@pytest.mark.parametrize("path", ["fast", "pynetdicom"])
def test_store_goes_into_the_peers_hospital_on_both_paths(
    door: dict[str, Any], path: str, tmp_path: Path
) -> None:
    instance, sop = other_study(tmp_path, {"fast": 5, "pynetdicom": 6}[path])
    status, log = store(door["ports"][path], "CT_B", instance)
    assert status == SUCCESS, log[-3000:]
    archive = door["archive"]
    assert archive.for_tenant("hosp-b").catalog.get_instance(sop) is not None
    assert archive.for_tenant("hosp-a").catalog.get_instance(sop) is None
    assert archive.catalog.get_instance(sop) is None  # the default tenant: not there either


def test_granted_echo_succeeds(door: dict[str, Any]) -> None:
    for aet in ("CT_A", "WS_A", "ECHO_A", "WS_B"):
        assert _status(echo(door["port"], aet)) == SUCCESS


# --- tenancy: each hospital sees its own copy of the same study --------------------------


def test_same_uids_from_two_hospitals_are_two_studies(door: dict[str, Any]) -> None:
    archive = door["archive"]
    assert stored_in(archive, "hosp-a") and stored_in(archive, "hosp-b")
    assert not stored_in(archive, archive.settings.default_tenant)


@pytest.mark.parametrize(("aet", "tenant"), [("WS_A", "hosp-a"), ("WS_B", "hosp-b")])
def test_find_sees_only_its_hospitals_copy(door: dict[str, Any], aet: str, tenant: str) -> None:
    answers, log = find(door["port"], aet, door["tmp"] / f"find-{aet}")
    assert _status(log) == SUCCESS, log[-3000:]
    assert [str(a.PatientName) for a in answers] == [NAMES[tenant]]


@pytest.mark.parametrize(("aet", "tenant"), [("WS_A", "hosp-a"), ("WS_B", "hosp-b")])
def test_get_retrieves_only_its_hospitals_copy(
    door: dict[str, Any], aet: str, tenant: str, tmp_path: Path
) -> None:
    received, log = get(door["port"], aet, tmp_path / "got")
    assert _status(log) == SUCCESS, log[-3000:]
    assert [(str(ds.SOPInstanceUID), str(ds.PatientName)) for ds in received] == [
        (SOP, NAMES[tenant])
    ]


def test_another_hospitals_study_is_not_there(door: dict[str, Any], tmp_path: Path) -> None:
    """A study only hosp-b holds: hosp-a's workstation finds nothing, gets and moves zero
    sub-operations (as for any UID the archive does not hold)."""
    instance = tmp_path / "only-b.dcm"
    only_b = "1.2.826.0.1.3680043.10.1425.15.2"
    instance.write_bytes(
        make_instance(
            sop_uid=f"{only_b}.1.1",
            study_uid=only_b,
            series_uid=f"{only_b}.1",
            patient_name=NAMES["hosp-b"],
        )
    )
    status, log = store(door["port"], "CT_B", instance)
    assert status == SUCCESS, log[-3000:]
    query = ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={only_b}"]
    port = str(door["port"])
    found = _run(
        [dcmtk.tool("findscu"), "-d", "-S", "-aet", "WS_A", "-aec", "KHO", *query,
         "127.0.0.1", port]
    )  # fmt: skip
    assert _status(found) == SUCCESS and "Received Find Response" not in found, found[-3000:]
    out = tmp_path / "got"
    out.mkdir()
    got = _run(
        [dcmtk.tool("getscu"), "-d", "-S", "-aet", "WS_A", "-aec", "KHO", "-od", str(out),
         *query, "127.0.0.1", port]
    )  # fmt: skip
    assert _status(got) == SUCCESS and not list(out.iterdir()), got[-3000:]
    dest = door["dest"]["DEST_A"]
    before = dest.files()
    moved = _run(
        [dcmtk.tool("movescu"), "-d", "-S", "-aet", "WS_A", "-aec", "KHO", "-aem", "DEST_A",
         *query, "127.0.0.1", port]
    )  # fmt: skip
    assert _status(moved) == SUCCESS, moved[-3000:]
    assert re.search(r"Completed Suboperations\s*: 0\b", moved), moved[-3000:]
    assert dest.files() == before
    # hosp-b's own workstation does find it
    mine = _run(
        [dcmtk.tool("findscu"), "-d", "-S", "-aet", "WS_B", "-aec", "KHO", *query,
         "127.0.0.1", port]
    )  # fmt: skip
    assert mine.count("Received Find Response") == 1, mine[-3000:]


# --- C-MOVE: only to the hospital's own registered destinations --------------------------


@pytest.mark.parametrize(
    ("aet", "tenant", "dest"), [("WS_A", "hosp-a", "DEST_A"), ("WS_B", "hosp-b", "DEST_B")]
)
def test_move_to_own_destination_sends_own_copy(
    door: dict[str, Any], aet: str, tenant: str, dest: str
) -> None:
    scp = door["dest"][dest]
    before = set(scp.files())
    log = move(door["port"], aet, dest)
    assert _status(log) == SUCCESS, log[-3000:]
    new = [p for p in scp.files() if p not in before]
    assert len(new) == 1, log[-3000:]
    ds = pydicom.dcmread(new[0])
    assert (str(ds.SOPInstanceUID), str(ds.PatientName)) == (SOP, NAMES[tenant])


@pytest.mark.parametrize(
    "destination",
    [
        "DEST_B",  # registered, but another hospital's
        "LEGACY",  # in the settings' move_destinations, not in the registry
        "CT_A",  # registered for hosp-a, but with no port: not a destination
        "NOWHERE",  # not registered at all
    ],
)
def test_move_to_a_destination_not_of_the_hospital_is_unknown(
    door: dict[str, Any], destination: str
) -> None:
    sent_before = {name: scp.files() for name, scp in door["dest"].items()}
    log = move(door["port"], "WS_A", destination)
    assert _status(log) == MOVE_DESTINATION_UNKNOWN, log[-3000:]
    assert {name: scp.files() for name, scp in door["dest"].items()} == sent_before
    refusal = door["refusals"][-1]
    assert (refusal.calling_ae, refusal.service, refusal.detail) == ("WS_A", "move", destination)
    assert refusal.reason == dicom_peers.MOVE_DESTINATION_UNKNOWN


# --- authentication off: everything as before ----------------------------------------------


def test_auth_off_accepts_any_calling_ae_and_checks_the_called_ae_when_asked(
    tmp_path: Path,
) -> None:
    settings = Settings(
        data_dir=tmp_path / "data",
        dicom_port=0,
        http_port=0,
        ae_title="KHO",
        fsync=False,
        require_called_ae=True,
    )
    assert not settings.auth_on
    with Archive(settings) as archive:
        server = DicomServer(archive).start()
        try:
            for aet in ("ANYONE", "STRANGER"):
                assert _status(echo(server.port, aet)) == SUCCESS
            assert rejection(echo(server.port, "ANYONE", "NOT_KHO")) == CALLED_AE_NOT_RECOGNIZED
        finally:
            server.stop()
