"""Hosts sharing one bucket read each other's spools: an instance acknowledged from one
host's spool is retrieved bit for bit through another before it reaches the bucket
(kho.storage.peer, kho.viewer_api.peer)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest

from kho.archive import metrics
from kho.archive.archive import Archive
from kho.archive.catalog import InstanceRecord
from kho.archive.config import Settings
from kho.errors import StorageUnavailableError
from kho.storage.spool import is_spool_key
from kho.viewer_api.server import HttpServer
from tests.archive.test_ingest import make_instance
from tests.helpers.dcmtk import free_port
from tests.helpers.postgres import postgres_database

TOKEN = "s3cret-of-the-archive"


@contextmanager
def host(
    root: Path, catalog_url: str, bucket_url: str, *, token: str = TOKEN, serve: bool = True
) -> Iterator[tuple[Archive, HttpServer | None, str]]:
    """One host of the archive: its own data directory (spool), the shared catalog and
    bucket, peer reads on (so the spool is on: spool = auto), its finisher held."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    settings = Settings(
        data_dir=root,
        catalog_url=catalog_url,
        storage_url=bucket_url,
        http_port=port,
        dicom_port=0,
        peer_url=url,
        peer_token=token,
    )
    with ExitStack() as stack:
        archive = stack.enter_context(Archive(settings))
        archive.finisher.stop()  # the instance stays in the spool until the test moves it
        server = None
        if serve:
            server = stack.enter_context(HttpServer(archive, host="127.0.0.1", port=port))
        yield archive, server, url


def spooled(archive: Archive, data: bytes) -> InstanceRecord:
    """Store ``data`` through ``archive``; its catalog row (pointing into the spool)."""
    record = archive.catalog.require_instance(archive.ingest_part10(data).sop_uid)
    assert is_spool_key(record.pixels_key)
    return record


def peer_reads(outcome: str) -> float:
    return metrics.REGISTRY.get_sample_value("kho_peer_reads_total", {"outcome": outcome}) or 0.0


@pytest.fixture
def catalog_url() -> Iterator[str]:
    with postgres_database() as url:
        yield url


def test_another_host_reads_an_instance_still_in_the_spool(
    tmp_path: Path, catalog_url: str, bucket_url: str
) -> None:
    data = make_instance(pixel_value=3)
    with (
        host(tmp_path / "a", catalog_url, bucket_url) as (a, a_server, _),
        host(tmp_path / "b", catalog_url, bucket_url) as (b, _b_server, _),
    ):
        assert a.spool is not None  # auto: on, every host can read it
        result = a.ingest_part10(data)
        record = b.catalog.require_instance(result.sop_uid)
        assert is_spool_key(record.pixels_key)
        assert not b.spool_reader.holds_segment(record.pixels_key)
        served = peer_reads("ok")
        assert b.read_part10(record) == data
        assert peer_reads("ok") == served + 1  # on /metrics: kho_peer_reads_total
        assert b.store.get_range(record.pixels_key, 5, 100) == data[5:105]
        assert b.store.exists(record.pixels_key)
        assert b.store.size(record.pixels_key) == len(data)

        # host B's finisher may finish it: it reads from A and writes to the bucket
        assert b.finisher.drain() == 1
        finished = b.catalog.require_instance(result.sop_uid)
        assert not is_spool_key(finished.pixels_key)
        assert a_server is not None
        a_server.stop()  # A gone: the instance is read from the bucket
        assert b.read_part10(finished) == data
        assert b.read_part10(record) == data  # a row loaded before the move: read again
        assert b.catalog.unfinished_count() == 0


def test_an_unreachable_or_refusing_host_is_an_outage_not_a_missing_instance(
    tmp_path: Path, catalog_url: str, bucket_url: str
) -> None:
    data = make_instance(pixel_value=4)
    with host(tmp_path / "a", catalog_url, bucket_url) as (a, a_server, _):
        key = spooled(a, data).pixels_key
        wrong_token = host(
            tmp_path / "b", catalog_url, bucket_url, token="not-the-archive-token", serve=False
        )
        with wrong_token as (b, _, _), pytest.raises(StorageUnavailableError, match="HTTP 401"):
            b.store.get(key)
        with host(tmp_path / "c", catalog_url, bucket_url, serve=False) as (c, _, _):
            assert c.store.get(key) == data
            assert a_server is not None
            a_server.stop()
            unavailable = peer_reads("unavailable")
            with pytest.raises(StorageUnavailableError, match="cannot be reached"):
                c.store.get(key)
            assert peer_reads("unavailable") == unavailable + 1
            # a spool no host serves: unreadable from here, not missing
            unknown = "spool/hnowhere-1-abcdef-000001/0-10"
            with pytest.raises(StorageUnavailableError, match="no host"):
                c.store.get(unknown)
            # the finisher leaves it queued (its bytes are where nobody can read them now),
            # its claim given back for later
            assert c.finisher.drain() == 0
            assert c.catalog.unfinished_count() == 1
            assert c.catalog.fetchall("SELECT owner FROM unfinished") == [("",)]


def test_a_host_that_does_not_say_the_key_is_gone_is_an_outage(
    tmp_path: Path, catalog_url: str, bucket_url: str
) -> None:
    """A 404 from whatever answers at a host's address is an absence only if that host
    checked the token and said so; a host restarted without peer reads (or another server
    at its address) makes the instance unreadable for now, never missing."""
    data = make_instance(pixel_value=6)
    with host(tmp_path / "a", catalog_url, bucket_url, serve=False) as (a, _, url):
        record = spooled(a, data)
        port = int(url.rsplit(":", 1)[1])
        no_peers = Archive(Settings(data_dir=tmp_path / "other", http_port=port))
        with (
            no_peers,
            HttpServer(no_peers, host="127.0.0.1", port=port),
            host(tmp_path / "b", catalog_url, bucket_url, serve=False) as (b, _, _),
        ):
            with pytest.raises(StorageUnavailableError, match="HTTP 404"):
                b.store.get(record.pixels_key)
            with pytest.raises(StorageUnavailableError):
                b.read_part10(record)


def test_the_peer_endpoint_wants_the_token_and_a_spool_key(
    tmp_path: Path, catalog_url: str, bucket_url: str
) -> None:
    data = make_instance(pixel_value=5)
    with host(tmp_path / "a", catalog_url, bucket_url) as (a, _, url):
        key = spooled(a, data).pixels_key
        path = f"{url}/kho/peer/spool/{key.removeprefix('spool/')}"
        auth = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(timeout=10) as http:
            assert http.get(path, headers=auth).content == data
            got = http.get(path, params={"offset": 10, "length": 20}, headers=auth)
            assert got.content == data[10:30]
            assert http.get(path).status_code == 401
            assert http.get(path, headers={"Authorization": "Bearer nope"}).status_code == 401
            assert http.get(path, headers={"Authorization": TOKEN}).status_code == 401
            past = http.get(path, params={"offset": len(data) + 1}, headers=auth)
            assert past.status_code == 400
            assert http.get(path, params={"offset": -1}, headers=auth).status_code == 400
            bad = f"{url}/kho/peer/spool/..%2F..%2Fcatalog/0-10"
            assert http.get(bad, headers=auth).status_code in (400, 404)
            gone = http.get(f"{url}/kho/peer/spool/x/0-10", headers=auth)
            assert gone.status_code == 404 and gone.headers["X-Kho-Spool"] == "absent"
            beyond = path.rsplit("/", 1)[0] + f"/0-{len(data) * 1000}"
            assert http.get(beyond, headers=auth).status_code == 404
    # a host without peer reads does not serve its spool at all
    with ExitStack() as stack:
        port = free_port()
        archive = stack.enter_context(Archive(Settings(data_dir=tmp_path / "solo")))
        stack.enter_context(HttpServer(archive, host="127.0.0.1", port=port))
        archive.finisher.stop()
        key = archive.catalog.require_instance(archive.ingest_part10(data).sop_uid).pixels_key
        assert archive.spool_reader.exists(key)
        path = f"http://127.0.0.1:{port}/kho/peer/spool/{key.removeprefix('spool/')}"
        refused = httpx.get(path, headers={"Authorization": "Bearer x"})
        assert refused.status_code == 404 and "X-Kho-Spool" not in refused.headers
