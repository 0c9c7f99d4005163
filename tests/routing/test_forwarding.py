"""Forwarding to real destinations: dcmtk's storescp (plain and TLS), a pynetdicom SCP
that records, refuses or stalls, and a second kho over STOW-RS."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from kho.access.api_keys import ApiKeys
from kho.archive.archive import Archive
from kho.archive.config import Settings
from kho.bench.phantom import ct_series_datasets
from kho.errors import AccessDeniedError, NotFoundError
from kho.routing import Delivery, Router, RoutingConfig
from kho.routing import queue as q
from tests.conftest import SAMPLES_DIR
from tests.helpers import dcmtk
from tests.helpers.certs import make_pki
from tests.helpers.part10 import part10_bytes
from tests.routing.conftest import (
    dataset_of,
    ingest,
    originals_of,
    queue_counts,
    recording_scp,
    wait_for,
)


def storescp_url(scp: dcmtk.StoreSCP, scheme: str = "dicom") -> str:
    return f"{scheme}://{scp.ae_title}@127.0.0.1:{scp.port}"


def received_datasets(scp: dcmtk.StoreSCP) -> dict[str, bytes]:
    """What storescp wrote (--bit-preserving: the dataset as it came), by SOP UID."""
    out = {}
    for path in scp.files():
        data = path.read_bytes()
        out[str(dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)] = dataset_of(
            data
        )
    return out


def test_each_instance_arrives_bit_for_bit(
    archive: Archive, series: list[bytes], tmp_path: Path
) -> None:
    finished = ct_series_datasets(3, rows=64, cols=64, seed=8)
    with dcmtk.run_storescp(tmp_path / "dest") as scp:
        config = RoutingConfig(
            rules=[{"name": "all", "destination": "pacs"}],
            destinations={"pacs": {"url": storescp_url(scp)}},
        )
        with Router(archive, config) as router:
            ingest(archive, router, series)
            # stored at rest as JPEG-LS before forwarding: rebuilt bit for bit
            rows = router.stored_rows(None, archive.tenant, "C-STORE", "MODALITY")
            for data in finished:
                archive.ingest_part10(data, defer=False, with_rows=rows)
            wanted = originals_of(series + finished)
            wait_for(lambda: len(scp.files()) >= len(wanted))
            wait_for(lambda: queue_counts(router)["pacs"]["queued"] == 0)
        assert received_datasets(scp) == wanted
        record = archive.catalog.get_instance(next(iter(originals_of(finished))))
        assert record is not None and record.pixel_format == "jpeg-ls"
        health = queue_counts(router)["pacs"]
        assert health["failures"] == 0 and health["last_success"] > 0


def test_rules_pick_destinations(archive: Archive, series: list[bytes]) -> None:
    mr = SAMPLES_DIR / "MR2_UNCR.dcm"
    with recording_scp("CT_AI") as ct_ai, recording_scp("ARCHIVE2") as everything:
        config = RoutingConfig(
            rules=[
                {
                    "name": "stroke",
                    "destination": "ai",
                    "modality": ["CT"],
                    "calling_ae": ["ER_CT*"],
                    "series_description": ["re:^AXIAL"],
                },
                {"name": "copy", "destination": "archive2", "sop_class": ["!CTImageStorage"]},
            ],
            destinations={
                "ai": {"url": f"dicom://CT_AI@127.0.0.1:{ct_ai.port}"},
                "archive2": {"url": f"dicom://ARCHIVE2@127.0.0.1:{everything.port}"},
            },
        )
        router = Router(archive, config)
        ingest(archive, router, series[:4], calling_ae="ER_CT_1")
        ingest(archive, router, series[4:], calling_ae="OTHER_CT")  # not from the ER
        ingest(archive, router, [mr.read_bytes()], calling_ae="MR1")
        assert router.run_once() == 5
        assert set(ct_ai.received) == set(originals_of(series[:4]))
        assert set(everything.received) == set(originals_of([mr.read_bytes()]))


def test_stable_series_waits_for_its_last_slice(archive: Archive, series: list[bytes]) -> None:
    with recording_scp() as scp:
        config = RoutingConfig(
            rules=[{"name": "series", "destination": "d", "trigger": "series", "stable_s": 1.5}],
            destinations={"d": {"url": f"dicom://{scp.ae_title}@127.0.0.1:{scp.port}"}},
        )
        with Router(archive, config) as router:
            ingest(archive, router, series[:6])
            assert queue_counts(router)["d"]["waiting"] == 6
            assert scp.received == {}
            ingest(archive, router, series[6:])
            counts = queue_counts(router)["d"]
            assert counts["waiting"] == len(series)  # the last slice restarted the quiet
            assert scp.received == {}
            wait_for(lambda: len(scp.received) == len(series))
        assert set(scp.received) == set(originals_of(series))


def test_destination_down_then_up(archive: Archive, series: list[bytes], tmp_path: Path) -> None:
    port = dcmtk.free_port()
    config = RoutingConfig(
        rules=[{"name": "all", "destination": "pacs"}],
        destinations={
            "pacs": {
                "url": f"dicom://STORESCP@127.0.0.1:{port}",
                "retry_base_s": 0.2,
                "retry_max_s": 0.5,
            }
        },
    )
    with Router(archive, config) as router:
        ingest(archive, router, series)
        wait_for(lambda: queue_counts(router)["pacs"]["failures"] >= 2)
        down = queue_counts(router)["pacs"]
        assert down["queued"] == len(series) and "connect" in down["last_error"]
        with dcmtk.run_storescp(tmp_path / "dest", port=port) as scp:
            wait_for(lambda: len(scp.files()) == len(series))
            wait_for(lambda: queue_counts(router)["pacs"]["queued"] == 0)
            assert received_datasets(scp) == originals_of(series)
        assert queue_counts(router)["pacs"]["failures"] == 0


def test_dead_letter_after_the_limit_then_retry(
    archive: Archive, series: list[bytes], tmp_path: Path
) -> None:
    port = dcmtk.free_port()
    config = RoutingConfig(
        rules=[{"name": "all", "destination": "pacs"}],
        destinations={
            "pacs": {
                "url": f"dicom://STORESCP@127.0.0.1:{port}",
                "retry_base_s": 0.1,
                "retry_max_s": 0.2,
                "dead_after_s": 0.5,
            }
        },
    )
    with Router(archive, config) as router:
        ingest(archive, router, series)
        wait_for(lambda: queue_counts(router)["pacs"]["dead"] == len(series))
        assert queue_counts(router)["pacs"]["queued"] == 0
        dead = router.rows("default", q.DEAD)
        assert {r.sop_uid for r in dead} == set(originals_of(series))
        assert all("connect" in r.last_error for r in dead)
        with dcmtk.run_storescp(tmp_path / "dest", port=port) as scp:
            assert router.retry("default") == len(series)
            wait_for(lambda: len(scp.files()) == len(series))
            wait_for(lambda: queue_counts(router)["pacs"]["queued"] == 0)


def test_a_permanent_refusal_is_dead_at_once(archive: Archive, series: list[bytes]) -> None:
    with recording_scp() as scp:
        scp.status = 0xA900  # dataset does not match SOP class: never will
        config = RoutingConfig(
            rules=[{"name": "all", "destination": "d"}],
            destinations={"d": {"url": f"dicom://{scp.ae_title}@127.0.0.1:{scp.port}"}},
        )
        router = Router(archive, config)
        ingest(archive, router, series[:3])
        router.run_once()
        counts = queue_counts(router)["d"]
        assert counts["dead"] == 3 and counts["queued"] == 0
        assert "0xa900" in router.rows("default", q.DEAD)[0].last_error
        # out of resources is a "not now": retried
        scp.status = 0xA700
        assert router.retry("default") == 3
        router.run_once()
        assert queue_counts(router)["d"]["queued"] == 3
        assert scp.stores == 6


def test_on_demand_send_of_a_study_and_a_series(archive: Archive, tmp_path: Path) -> None:
    first = ct_series_datasets(3, rows=32, cols=32, seed=1)
    for data in first:
        archive.ingest_part10(data)
    ds = dcmread(io.BytesIO(first[0]), stop_before_pixels=True)
    with dcmtk.run_storescp(tmp_path / "dest") as scp:
        config = RoutingConfig(
            destinations={
                "pacs": {"url": storescp_url(scp)},
                "elsewhere": {"url": storescp_url(scp), "tenants": ["hosp-b"]},
            }
        )
        router = Router(archive, config)
        sent: list[Delivery] = []
        router.on_sent.append(sent.append)
        assert router.send("default", "pacs", study_uid=ds.StudyInstanceUID, requested_by="u") == 3
        assert (
            router.send(
                "default", "pacs", study_uid=ds.StudyInstanceUID, series_uid=ds.SeriesInstanceUID
            )
            == 3
        )
        assert router.run_once() == 6
        assert received_datasets(scp) == originals_of(first)
        assert sum(len(d.instances) for d in sent) == 6
        assert any(d.requested_by == ("u",) for d in sent)
        with pytest.raises(NotFoundError):
            router.send("default", "nowhere", study_uid=ds.StudyInstanceUID)
        with pytest.raises(NotFoundError):
            router.send("default", "pacs", study_uid="1.2.3.404")
        with pytest.raises(AccessDeniedError):
            router.send("default", "elsewhere", study_uid=ds.StudyInstanceUID)


def test_deidentified_route_and_withheld_burned_in(archive: Archive, series: list[bytes]) -> None:
    burned = dcmread(io.BytesIO(ct_series_datasets(1, rows=16, cols=16, seed=2)[0]))
    burned.BurnedInAnnotation = "YES"
    burned_data = part10_bytes(burned)
    with recording_scp("RESEARCH") as scp:
        config = RoutingConfig(
            rules=[{"name": "trial", "destination": "research", "deidentify": "trial"}],
            destinations={"research": {"url": f"dicom://RESEARCH@127.0.0.1:{scp.port}"}},
            projects={"trial": {"secret": "trial-7 secret, keep it here"}},
        )
        router = Router(archive, config)
        ingest(archive, router, [*series, burned_data])
        assert router.run_once() == len(series)
        counts = queue_counts(router)["research"]
        assert counts["withheld"] == 1 and counts["queued"] == 0
        project = router.projects["trial"]
        expected = {project.uid(uid) for uid in originals_of(series)}
        assert set(scp.received) == expected
        for sop_uid, dataset in scp.received.items():
            ds = dcmread(io.BytesIO(dataset), force=True)
            assert str(ds.SOPInstanceUID) == sop_uid
            assert ds.PatientIdentityRemoved == "YES"
            assert str(ds.PatientID).startswith("ANON-")
            assert "PatientBirthDate" not in ds or not ds.PatientBirthDate
        studies = {
            str(dcmread(io.BytesIO(d), force=True).StudyInstanceUID) for d in scp.received.values()
        }
        assert studies == {project.uid(str(dcmread(io.BytesIO(series[0])).StudyInstanceUID))}
        # allowed after a person looked at it: sent on retry of the withheld one
        withheld = router.rows("default", q.WITHHELD)
        assert "burned-in" in withheld[0].last_error


@pytest.fixture
def second_kho(tmp_path: Path) -> Iterator[tuple[Archive, str, str]]:
    """Another kho (auth on) serving DICOMweb on loopback: (archive, base URL, API key)."""
    from kho.viewer_api.server import HttpServer

    settings = Settings(data_dir=tmp_path / "second", http_port=0, dicom_port=0, auth="on")
    with Archive(settings) as archive:
        _key_id, key = ApiKeys(archive.catalog, settings.tenant_names).create(
            "forwarder", ["uploader@default"]
        )
        server = HttpServer(archive, port=0).start()
        try:
            yield archive, f"http://127.0.0.1:{server.port}/dicom-web", key
        finally:
            server.stop()


def test_stow_to_a_second_kho(
    archive: Archive, series: list[bytes], second_kho: tuple[Archive, str, str]
) -> None:
    other, base, key = second_kho
    config = RoutingConfig(
        rules=[{"name": "all", "destination": "kho2"}],
        destinations={
            "kho2": {"url": f"stow+{base}", "token": key, "stow_batch_bytes": 40_000},
            "kho2-no-token": {"url": f"stow+{base}", "retry_base_s": 60},
        },
    )
    router = Router(archive, config)
    ingest(archive, router, series)
    assert router.run_once() == len(series)
    for sop_uid, dataset in originals_of(series).items():
        _record, data = other.read_instance(sop_uid)
        assert dataset_of(data) == dataset
    # without the token the second kho answers 401: the destination is failing, retried
    ds = dcmread(io.BytesIO(series[0]), stop_before_pixels=True)
    router.send("default", "kho2-no-token", study_uid=ds.StudyInstanceUID)
    router.run_once()
    failing = queue_counts(router)["kho2-no-token"]
    assert failing["queued"] == len(series) and "401" in failing["last_error"]


def test_tls_destination(archive: Archive, series: list[bytes], tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    settings = archive.settings.model_copy(
        update={
            "tls_cert_file": str(pki.server.cert),
            "tls_key_file": str(pki.server.key),
            "tls_ca_file": str(pki.ca.cert),
        }
    )
    tls = ("-uf", "+tls", str(pki.server.key), str(pki.server.cert), "+cf", str(pki.ca.cert))
    with dcmtk.run_storescp(tmp_path / "dest", ae_title="DEST_TLS", extra=tls) as scp:
        config = RoutingConfig(
            rules=[{"name": "all", "destination": "tls"}],
            destinations={"tls": {"url": f"dicoms://DEST_TLS@localhost:{scp.port}"}},
        )
        archive.settings = settings
        router = Router(archive, config)
        ingest(archive, router, series[:3])
        assert router.run_once() == 3
        assert received_datasets(scp) == originals_of(series[:3])
