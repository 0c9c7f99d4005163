"""C-MOVE to a destination kho knows but cannot reach (issue 12, item 8): every
sub-operation fails (0xA702 with the Failed SOP Instance UID List), never 0xA801 "Move
destination unknown", which PS3.4 C.4.2.1.4 keeps for AE titles the SCP does not know.
Peers: dcmtk's movescu and storescp, and a pynetdicom SCP that rejects kho."""

from __future__ import annotations

import contextlib
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE, AllStoragePresentationContexts

from kho.archive.archive import Archive
from kho.archive.config import Settings
from kho.dicom_scp.server import DicomServer
from tests.archive.test_ingest import make_instance
from tests.helpers import dcmtk

STUDY = "1.2.826.0.1.3680043.10.1425.12.8.1"
SERIES = f"{STUDY}.1"
SOPS = [f"{SERIES}.{n}" for n in range(1, 4)]


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """kho with three instances of one study and three destinations: one where nothing
    listens, one that rejects every association, one dcmtk storescp."""
    ports = {name: dcmtk.free_port() for name in ("DOWNSCP", "REJECTSCP", "STORESCP")}
    settings = Settings(
        data_dir=tmp_path / "data",
        dicom_port=0,
        http_port=0,
        fsync=False,
        move_destinations={name: f"127.0.0.1:{port}" for name, port in ports.items()},
    )
    with Archive(settings) as archive:
        for sop in SOPS:
            archive.ingest_part10(make_instance(sop_uid=sop, study_uid=STUDY, series_uid=SERIES))
        server = DicomServer(archive).start()
        try:
            yield {"port": server.port, "ports": ports, "tmp": tmp_path}
        finally:
            server.stop()


@contextlib.contextmanager
def rejecting_scp(port: int) -> Iterator[None]:
    """A storage SCP that accepts only calling AE NOBODY: kho's association is rejected."""
    ae = AE(ae_title="REJECTSCP")
    ae.supported_contexts = AllStoragePresentationContexts
    ae.require_calling_aet = ["NOBODY"]
    server = ae.start_server(("127.0.0.1", port), block=False)
    try:
        yield
    finally:
        server.shutdown()


def movescu(port: int, destination: str) -> str:
    result = subprocess.run(
        [dcmtk.tool("movescu"), "-d", "-S", "-aec", "KHO", "-aem", destination,
         "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={STUDY}",
         "127.0.0.1", str(port)],
        capture_output=True, text=True, env=dcmtk.env(), timeout=120,
    )  # fmt: skip
    return result.stdout + result.stderr


def final_response(log: str) -> str:
    """The dump of the final C-MOVE-RSP (the last one movescu received)."""
    responses = log.split("Received Final Move Response")
    assert len(responses) > 1, log[-3000:]
    return responses[-1]


def failed_uids(log: str) -> list[str]:
    """The Failed SOP Instance UID List (0008,0058) of the last response's identifier."""
    match = re.findall(r"\(0008,0058\) UI \[([^\]]*)\]", log)
    assert match, log[-3000:]
    return match[-1].split("\\")


@pytest.mark.parametrize("destination", ["DOWNSCP", "REJECTSCP"])
def test_known_but_unreachable_destination_fails_every_suboperation(
    peers: dict[str, Any], destination: str
) -> None:
    scp = rejecting_scp if destination == "REJECTSCP" else lambda _port: contextlib.nullcontext()
    with scp(peers["ports"][destination]):
        log = movescu(peers["port"], destination)
    final = final_response(log)
    assert "0xa702" in final.lower(), final[-3000:]
    assert "0xa801" not in log.lower(), log[-3000:]
    assert re.search(r"Failed Suboperations\s*: 3\n", final), final
    assert re.search(r"Completed Suboperations\s*: 0\n", final), final
    assert sorted(failed_uids(final)) == sorted(SOPS)
    reason = "rejected the association" if destination == "REJECTSCP" else "unreachable"
    assert f"move destination {destination} {reason}" in final, final[-3000:]


def test_unknown_destination_is_still_a801(peers: dict[str, Any]) -> None:
    log = movescu(peers["port"], "NOSUCHAE")
    final = final_response(log)
    assert "0xa801" in final.lower(), final[-3000:]


def test_reachable_destination_after_a_failure_gets_everything(peers: dict[str, Any]) -> None:
    """A failed move leaves nothing behind: the same move to a live storescp completes."""
    log = movescu(peers["port"], "DOWNSCP")
    assert "0xa702" in final_response(log).lower()
    folder = peers["tmp"] / "received"
    with dcmtk.run_storescp(folder, ae_title="STORESCP", port=peers["ports"]["STORESCP"]) as scp:
        log = movescu(peers["port"], "STORESCP")
        received = scp.files()
    final = final_response(log)
    assert "0x0000" in final.lower(), final[-3000:]
    assert len(received) == len(SOPS), log[-3000:]
