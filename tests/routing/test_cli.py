"""``kho routes`` (kho.routing.cli's functions, registered as kho.cli will) and the HTTP
door's "send this study to X" logic (kho.routing.http), on settings that carry the
routing fields the way kho's Settings will."""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import Field
from pydicom import dcmread

from kho.access.callers import Caller, CallerKind
from kho.archive.archive import Archive
from kho.archive.config import Settings
from kho.errors import AccessDeniedError, NotFoundError, QueryError
from kho.routing import cli
from kho.routing.config import DeidProject, ForwardDestination, ForwardRule
from kho.routing.http import send_request
from kho.routing.router import Router
from tests.helpers import dcmtk


class RoutingSettings(Settings):
    """kho's Settings with the fields the lead adds (see the report)."""

    forward_rules: list[ForwardRule] = Field(default_factory=list)
    forward_destinations: dict[str, ForwardDestination] = Field(default_factory=dict)
    deid_projects: dict[str, DeidProject] = Field(default_factory=dict)
    forward_threads: int = 4


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kho")
    sub = parser.add_subparsers(dest="command", required=True)
    cli.add_parser(sub, lambda p: p.add_argument("--data-dir", type=Path))
    return parser.parse_args(["routes", *argv])


@pytest.fixture
def destination(tmp_path: Path) -> Iterator[dcmtk.StoreSCP]:
    with dcmtk.run_storescp(tmp_path / "dest") as scp:
        yield scp


@pytest.fixture
def routed(tmp_path: Path, destination: dcmtk.StoreSCP, series: list[bytes]) -> Iterator[Archive]:
    settings = RoutingSettings(
        data_dir=tmp_path / "data",
        dicom_port=0,
        http_port=0,
        forward_rules=[ForwardRule(name="to-pacs", destination="pacs", modality=["CT"])],
        forward_destinations={
            "pacs": ForwardDestination(
                url=f"dicom://{destination.ae_title}@127.0.0.1:{destination.port}"
            ),
            "down": ForwardDestination(url="dicom://DOWN@127.0.0.1:9", dead_after_s=0.001),
        },
        deid_projects={"trial": DeidProject(secret="a secret for the trial")},
    )
    with Archive(settings) as archive:
        rows = Router(archive).stored_rows(None, archive.tenant, "C-STORE", "CT1")
        for data in series:
            archive.ingest_part10(data, with_rows=rows)
        yield archive


def test_status_run_and_an_empty_queue(
    routed: Archive,
    destination: dcmtk.StoreSCP,
    series: list[bytes],
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = parse()
    assert args.routes_command(args, routed) == 0
    out = capsys.readouterr().out
    assert "pacs: dicom://STORESCP@127.0.0.1" in out and "to-pacs" in out
    assert f"queued {len(series):>6}" in out
    args = parse("run", "--timeout", "30")
    assert args.routes_command(args, routed) == 0
    assert len(destination.files()) == len(series)
    assert f"{len(series)} instance(s) delivered" in capsys.readouterr().out
    args = parse("status", "--json")
    args.routes_command(args, routed)
    report = json.loads(capsys.readouterr().out)
    assert report["tenants"]["default"]["pacs"]["queued"] == 0


def test_send_list_dead_and_retry(
    routed: Archive, series: list[bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    study = str(dcmread(io.BytesIO(series[0]), stop_before_pixels=True).StudyInstanceUID)
    args = parse("send", "--destination", "down", "--study", study)
    assert args.routes_command(args, routed) == 0
    assert f"{len(series)} instance(s) queued for down" in capsys.readouterr().out
    Router(routed).run_once()  # unreachable, and past its dead_after_s already
    args = parse("status")
    assert args.routes_command(args, routed) == 1  # a failing destination: exit status 1
    assert "failing: 1 consecutive" in capsys.readouterr().out
    args = parse("list", "--destination", "down")
    args.routes_command(args, routed)
    listing = capsys.readouterr().out
    assert listing.count("(on demand)") == len(series) and "connect" in listing
    args = parse("retry", "--destination", "down")
    args.routes_command(args, routed)
    assert f"{len(series)} instance(s) queued again" in capsys.readouterr().out


def test_send_request_queues_and_checks_its_body(routed: Archive, series: list[bytes]) -> None:
    router = Router(routed)
    caller = Caller(CallerKind.OPEN, "admin")
    ds = dcmread(io.BytesIO(series[0]), stop_before_pixels=True)
    answer = send_request(
        router,
        tenant="default",
        caller=caller,
        study_uid=ds.StudyInstanceUID,
        series_uid=ds.SeriesInstanceUID,
        body={"destination": "pacs", "deidentify": "trial"},
    )
    assert answer == {"queued": len(series), "destination": "pacs", "deidentify": "trial"}
    queued = router.rows("default", "queued", "pacs", limit=1000)
    assert sum(1 for r in queued if r.project == "trial" and r.requested_by) == len(series)
    bad_bodies = [
        None,
        {},
        {"destination": ""},
        {"destination": "pacs", "extra": 1},
        {"destination": "pacs", "instances": "1.2.3"},
        {"destination": "pacs", "allow_burned_in": "yes"},
    ]
    for body in bad_bodies:
        with pytest.raises(QueryError):
            send_request(
                router, tenant="default", caller=caller, study_uid=ds.StudyInstanceUID, body=body
            )
    with pytest.raises(NotFoundError):
        send_request(
            router,
            tenant="default",
            caller=caller,
            study_uid=ds.StudyInstanceUID,
            body={"destination": "pacs", "deidentify": "no-such-project"},
        )
    routed.settings.forward_destinations["pacs"].tenants.append("hosp-b")  # type: ignore[attr-defined]
    with pytest.raises(AccessDeniedError):
        send_request(
            Router(routed),
            tenant="default",
            caller=caller,
            study_uid=ds.StudyInstanceUID,
            body={"destination": "pacs"},
        )
