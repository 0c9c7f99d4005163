"""Tenants (hospitals) on one archive: one catalog each (a SQLite file, a PostgreSQL
schema), object keys carrying the tenant, everything else shared (store, spool, finisher).
Two hospitals send the same real Part 10 files; each keeps, queries, finishes and reads
back its own copy, and nothing one does reaches the other."""

from __future__ import annotations

import contextlib
import hashlib
import re
import threading
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from kho.archive import keys, metrics
from kho.archive.archive import Archive
from kho.archive.catalog import Catalog, open_catalog
from kho.archive.config import Settings
from kho.archive.finish import finisher as finisher_module
from kho.archive.ingest.pipeline import IngestOutcome
from kho.archive.query import engine as query
from kho.errors import KhoError, NotFoundError
from kho.storage.spool import is_spool_key, segment_of
from tests.conftest import SAMPLES_DIR
from tests.helpers.part10 import part10_bytes
from tests.helpers.postgres import ENGINES, postgres_database

TENANTS = ["hosp-a", "hosp-b"]
#: a native CT (encoded at rest), a native MR, a JPEG Lossless US (kept as received)
FILES = ["693_UNCI.dcm", "emri_small.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm"]
CT = FILES[0]


@pytest.fixture(scope="module")
def part10() -> dict[str, bytes]:
    return {name: (SAMPLES_DIR / name).read_bytes() for name in FILES}


def _settings(data_dir: Path, tenants: list[str] | None = None, storage_url: str = "") -> Settings:
    return Settings(
        data_dir=data_dir,
        dicom_port=0,
        http_port=0,
        tenants=tenants or [],
        storage_url=storage_url,
    )


@contextlib.contextmanager
def _platform(data_dir: Path, engine: str, storage_url: str = "") -> Iterator[Archive]:
    """The root archive with two declared tenants; its catalog SQLite (in ``data_dir``) or
    a fresh PostgreSQL database."""
    settings = _settings(data_dir, tenants=TENANTS, storage_url=storage_url)
    with contextlib.ExitStack() as stack:
        catalog = None
        if engine == "postgresql":
            catalog = open_catalog(stack.enter_context(postgres_database()))
        yield stack.enter_context(Archive(settings, catalog=catalog))


@pytest.fixture(params=["sqlite+filesystem", "postgresql+s3"])
def platform(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Archive]:
    engine = request.param.split("+")[0]
    url = request.getfixturevalue("bucket_url") if request.param.endswith("s3") else ""
    with _platform(tmp_path / "data", engine, url) as root:
        root.finisher.stop()  # finished by hand (drain): one finisher for every tenant
        yield root


@pytest.fixture(params=ENGINES)
def spooling(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Archive]:
    """The platform on a filesystem store, with the ingest spool every tenant shares."""
    with _platform(tmp_path / "data", request.param) as root:
        assert root.spool is not None
        root.finisher.stop()
        yield root


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _studies(archive: Archive, **filters: str) -> list[dict[str, object]]:
    return list(query.find(archive.catalog, "STUDY", {"StudyInstanceUID": "", **filters}))


def _expire_garbage(archive: Archive) -> None:
    archive.catalog.execute("UPDATE garbage SET not_before = 0")


def _referenced(archive: Archive) -> set[str]:
    out: set[str] = set()
    for record in archive.catalog.iter_instances():
        out.add(record.header_key)
        if record.pixel_format != "none":
            out.add(record.pixels_key)
        out.update(str(v) for v in record.derived_keys.values())
    return out


# --- object keys ----------------------------------------------------------------------


def test_the_default_tenants_keys_are_as_before_and_another_tenants_carry_it() -> None:
    uids = ("1.2.3", "1.2.3.4", "1.2.3.4.5")
    sha = "ab" * 32
    default = keys.instance_prefix(*uids, sha, tenant="")
    uid_hash = hashlib.sha256("\x00".join(uids).encode()).hexdigest()  # as before tenants
    assert re.fullmatch(
        rf"i/{uid_hash[:2]}/{uid_hash[2:4]}/{uid_hash[:40]}-{sha[:16]}-[0-9a-f]{{8}}", default
    )
    a = keys.instance_prefix(*uids, sha, tenant="hosp-a")
    b = keys.instance_prefix(*uids, sha, tenant="hosp-b")
    a_hash = hashlib.sha256("\x00".join(("hosp-a", *uids)).encode()).hexdigest()
    assert re.fullmatch(
        rf"t/hosp-a/i/{a_hash[:2]}/{a_hash[2:4]}/{a_hash[:40]}-{sha[:16]}-[0-9a-f]{{8}}", a
    )
    assert b.startswith("t/hosp-b/i/")
    # the same UIDs hash apart per tenant
    assert len({p.rsplit("/", 1)[1][:40] for p in (default, a, b)}) == 3


# --- opening tenants -----------------------------------------------------------------


def test_each_declared_tenant_is_opened_once_with_its_own_catalog(platform: Archive) -> None:
    root = platform
    assert root.tenant == "default" and root.for_tenant("default") is root
    # opened lazily, once, whichever thread asks first
    barrier = threading.Barrier(8)
    opened: list[Archive] = []

    def open_b() -> None:
        barrier.wait()
        opened.append(root.for_tenant("hosp-b"))

    threads = [threading.Thread(target=open_b) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    b = opened[0]
    assert len(opened) == 8 and all(other is b for other in opened)
    a = root.for_tenant("hosp-a")
    assert (a.tenant, b.tenant) == ("hosp-a", "hosp-b")
    assert root.tenant_archives() == [root, a, b]
    assert a.for_tenant("hosp-b") is b and b.for_tenant("default") is root
    # shared: the store (and its spool and peer client), the finisher, the settings
    for child in (a, b):
        assert child.store is root.store and child.spool is root.spool
        assert child.spool_reader is root.spool_reader
        assert child.finisher is root.finisher and child.settings is root.settings
        assert child.derivers is root.derivers
    # not shared: the catalog
    assert len({id(x.catalog) for x in (root, a, b)}) == 3
    if root.catalog.dialect == "sqlite":
        data_dir = root.settings.data_dir
        assert root.catalog.path == data_dir / "catalog.sqlite3"  # type: ignore[attr-defined]
        assert a.catalog.path == data_dir / "catalog-hosp-a.sqlite3"  # type: ignore[attr-defined]
    else:
        schemas = root.catalog.fetchall(
            "SELECT schema_name FROM information_schema.schemata "
            "WHERE schema_name LIKE ? ORDER BY 1",
            ("tenant%",),
        )
        assert schemas == [("tenant_hosp-a",), ("tenant_hosp-b",)]
        assert a.catalog.fetchall("SELECT current_schemas(false)") == [(["tenant_hosp-a"],)]
        assert root.catalog.fetchall("SELECT current_schemas(false)") == [(["public"],)]
    for archive in (root, a):
        with pytest.raises(NotFoundError):
            archive.for_tenant("hosp-c")


def test_closing_the_root_closes_every_tenant(tmp_path: Path) -> None:
    root = Archive(_settings(tmp_path / "data", tenants=TENANTS))
    a = root.for_tenant("hosp-a")
    a.close()  # shared, kept by the root: nothing is closed
    assert a.catalog.counts()["instances"] == 0 and a.catalog.open_connections == 1
    root.close()
    assert a.catalog.open_connections == 0 and root.catalog.open_connections == 0
    with pytest.raises(KhoError):
        root.for_tenant("hosp-b")


# --- two hospitals, the same files ----------------------------------------------------


def test_two_tenants_keep_query_finish_and_read_back_their_own_copies(
    platform: Archive, part10: dict[str, bytes]
) -> None:
    root = platform
    a, b = root.for_tenant("hosp-a"), root.for_tenant("hosp-b")
    results = {
        archive.tenant: {name: archive.ingest_part10(data) for name, data in part10.items()}
        for archive in (a, b)
    }
    for archive in (a, b):
        assert {r.outcome for r in results[archive.tenant].values()} == {IngestOutcome.STORED}
        assert archive.catalog.unfinished_count() == len(FILES)
    assert root.stats()["instances"] == 0 and root.catalog.unfinished_count() == 0

    def check(archive: Archive) -> None:
        """Its own study of each file, its bytes as received, its keys."""
        stats = archive.stats()
        assert (stats["studies"], stats["instances"]) == (len(FILES), len(FILES))
        assert len(_studies(archive)) == len(FILES)
        for name, data in part10.items():
            result = results[archive.tenant][name]
            found = _studies(archive, StudyInstanceUID=result.study_uid)
            assert [r["StudyInstanceUID"] for r in found] == [result.study_uid]
            record, back = archive.read_instance(result.sop_uid)
            assert back == data and _sha(back) == record.sha256
            assert record.object_prefix.startswith(f"t/{archive.tenant}/i/")
            for key in {record.header_key, record.pixels_key, *record.derived_keys.values()}:
                assert is_spool_key(key) or key.startswith(f"t/{archive.tenant}/i/")
        assert [p for _r, p in archive.verify() if p] == []

    for archive in (a, b):
        check(archive)
    # the same UIDs, two instances: neither sees the other's, the default tenant neither
    ct = results["hosp-a"][CT]
    assert ct.study_uid == results["hosp-b"][CT].study_uid
    prefixes = {x.catalog.require_instance(ct.sop_uid).object_prefix for x in (a, b)}
    assert len(prefixes) == 2
    assert _studies(root, StudyInstanceUID=ct.study_uid) == []
    assert root.catalog.get_instance(ct.sop_uid) is None

    # one finisher walks every tenant's queue
    assert root.finisher.drain() == 2 * len(FILES)
    for archive in (a, b):
        assert archive.catalog.unfinished_count() == 0
        assert archive.catalog.require_instance(ct.sop_uid).pixel_format == "jpeg-ls"
        check(archive)
        _expire_garbage(archive)
    finisher_module.collect_garbage(root)
    for archive in (a, b):
        # what the store holds under a tenant's keys is what its catalog points at
        listed = set(root.store.list(f"t/{archive.tenant}/"))
        assert listed == {k for k in _referenced(archive) if not is_spool_key(k)}
    assert list(root.store.list("i/")) == []
    totals = root.platform_stats()["totals"]
    assert totals["instances"] == 2 * len(FILES) and totals["studies"] == 2 * len(FILES)


def test_a_corrected_resend_in_one_tenant_leaves_the_other_alone(
    platform: Archive, part10: dict[str, bytes]
) -> None:
    root = platform
    a, b = root.for_tenant("hosp-a"), root.for_tenant("hosp-b")
    original = part10[CT]
    first = {x.tenant: x.ingest_part10(original) for x in (a, b)}
    root.finisher.drain()
    b_before = b.catalog.require_instance(first["hosp-b"].sop_uid)
    ds = pydicom.dcmread(BytesIO(original))
    ds.SeriesDescription = "corrected"
    corrected = part10_bytes(ds)

    assert a.ingest_part10(corrected).outcome == IngestOutcome.REPLACED
    root.finisher.drain()
    root.recover(grace_s=0)  # the replaced version's objects are deleted, in A only
    for archive in (a, b):
        _expire_garbage(archive)
    finisher_module.collect_garbage(root)

    sop_uid = first["hosp-a"].sop_uid
    assert a.read_instance(sop_uid)[1] == corrected
    assert b.catalog.require_instance(sop_uid) == b_before  # the same row, the same objects
    assert b.read_instance(sop_uid)[1] == original
    series = {
        x.tenant: list(query.find(x.catalog, "SERIES", {"SeriesDescription": ""})) for x in (a, b)
    }
    assert [r["SeriesDescription"] for r in series["hosp-a"]] == ["corrected"]
    assert [r["SeriesDescription"] for r in series["hosp-b"]] != ["corrected"]
    assert b.catalog.fetchall("SELECT sop_uid FROM replacements") == []
    assert [p for _r, p in b.verify() if p] == []


def test_the_spool_segment_another_tenant_still_needs_survives_garbage_collection(
    spooling: Archive, part10: dict[str, bytes]
) -> None:
    """A and B's instances sit in one segment of the host's spool.  A finishes first; its
    catalog then refers to nothing in the spool, but B's does: collecting A's garbage
    (and the finisher's own pass over every tenant) must keep the segment."""
    root = spooling
    a, b = root.for_tenant("hosp-a"), root.for_tenant("hosp-b")
    data = part10[CT]
    in_a, in_b = a.ingest_part10(data, defer=True), b.ingest_part10(data, defer=True)
    spooled = [x.catalog.require_instance(r.sop_uid).pixels_key for x, r in ((a, in_a), (b, in_b))]
    assert all(is_spool_key(key) for key in spooled)
    segment = segment_of(spooled[0])
    assert segment_of(spooled[1]) == segment  # one spool, one segment for both tenants

    for sop_uid, prefix, _attempts in a.catalog.claim_unfinished(10, 600):
        assert root.finisher.finish_one(sop_uid, prefix, archive=a)
    assert b.catalog.unfinished_count() == 1
    _expire_garbage(a)
    assert finisher_module.collect_garbage(a) == 1  # A's spool key, its garbage now
    assert a.catalog.spool_segments_in_use() == set()  # A alone would delete it
    assert b.catalog.spool_segments_in_use() == {segment}
    assert root.spool is not None
    assert finisher_module.reclaim_spool(a, root.spool, force=True) == 0
    root.finisher.collect_garbage(force=True)
    assert finisher_module.reclaim_spool(root, root.spool, force=True) == 0
    assert segment in root.spool.segment_names()
    assert b.read_instance(in_b.sop_uid)[1] == data

    assert root.finisher.drain() == 1  # B's, now
    _expire_garbage(b)
    finisher_module.collect_garbage(root)
    assert finisher_module.reclaim_spool(root, root.spool, force=True) == 1
    assert root.spool.segment_names() == []
    for archive, result in ((a, in_a), (b, in_b)):
        record, back = archive.read_instance(result.sop_uid)
        assert back == data and record.pixel_format == "jpeg-ls"


@pytest.mark.parametrize("engine", ENGINES)
def test_a_tenant_taken_out_of_the_settings_keeps_what_it_holds_in_the_spool(
    engine: str, tmp_path: Path, part10: dict[str, bytes]
) -> None:
    """Not served any more, but its queued instances are still finished and the spool
    segment they sit in is not deleted under them."""
    data_dir = tmp_path / "data"
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(postgres_database()) if engine == "postgresql" else ""

        def platform(tenants: list[str]) -> Archive:
            catalog = open_catalog(url) if url else None
            return Archive(_settings(data_dir, tenants=tenants), catalog=catalog)

        with platform(TENANTS) as root:
            root.finisher.stop()
            queued = root.for_tenant("hosp-b").ingest_part10(part10[CT], defer=True)
        with platform(["hosp-a"]) as root:
            root.finisher.stop()
            with pytest.raises(NotFoundError):
                root.for_tenant("hosp-b")
            assert [x.tenant for x in root.housekept_archives()] == [
                "default",
                "hosp-a",
                "hosp-b",
            ]
            assert root.spool is not None
            assert finisher_module.reclaim_spool(root, root.spool, force=True) == 0
            assert root.finisher.drain() == 1
        with platform(TENANTS) as root:
            record, back = root.for_tenant("hosp-b").read_instance(queued.sop_uid)
            assert back == part10[CT] and record.pixel_format == "jpeg-ls"


def test_the_background_finisher_and_recovery_serve_every_tenant(
    tmp_path: Path, part10: dict[str, bytes]
) -> None:
    with _platform(tmp_path / "data", "sqlite") as root:
        a, b = root.for_tenant("hosp-a"), root.for_tenant("hosp-b")
        results = [(x, x.ingest_part10(part10[CT])) for x in (a, b, root)]
        assert root.finisher.wait_idle(timeout=120)
        for archive, result in results:
            record, back = archive.read_instance(result.sop_uid)
            assert record.pixel_format == "jpeg-ls" and back == part10[CT]
        # an ingest of B's that a crash interrupted: its objects are rolled back
        prefix = keys.instance_prefix("1.2", "1.2.3", "1.2.3.4", "cd" * 32, tenant="hosp-b")
        b.catalog.begin_pending(prefix)
        root.store.put(keys.header_key(prefix), b"half an ingest")
        assert root.recover(grace_s=-1) == 1
        assert not root.store.exists(keys.header_key(prefix))
        assert b.catalog.pending_prefixes() == []


# --- an archive from before tenants ---------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_an_archive_from_before_tenants_is_the_default_tenant(
    engine: str, tmp_path: Path, part10: dict[str, bytes]
) -> None:
    data_dir = tmp_path / "data"
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(postgres_database()) if engine == "postgresql" else ""

        def catalog() -> Catalog | None:
            return open_catalog(url) if url else None

        with Archive(_settings(data_dir), catalog=catalog()) as before:
            stored = {name: before.ingest_part10(data) for name, data in part10.items()}
            before.finisher.drain()
            prefixes = {
                name: before.catalog.require_instance(r.sop_uid).object_prefix
                for name, r in stored.items()
            }
        assert all(p.startswith("i/") for p in prefixes.values())

        settings = _settings(data_dir, tenants=TENANTS)
        with Archive(settings, catalog=catalog()) as root:
            assert root.tenant == "default"
            if engine == "sqlite":
                assert root.catalog.path == data_dir / "catalog.sqlite3"  # type: ignore[attr-defined]
            assert root.stats()["instances"] == len(FILES)
            for name, result in stored.items():
                record, back = root.read_instance(result.sop_uid)
                assert back == part10[name] and record.object_prefix == prefixes[name]
            assert [p for _r, p in root.verify() if p] == []
            a = root.for_tenant("hosp-a")
            assert a.stats()["instances"] == 0 and _studies(a) == []
            # new instances of the default tenant keep the keys of before
            again = root.ingest_part10(part10[CT], defer=False)
            assert again.outcome == IngestOutcome.DUPLICATE
            moved = pydicom.dcmread(BytesIO(part10[CT]))
            moved.SOPInstanceUID = generate_uid()
            new = root.ingest_part10(part10_bytes(moved))
            assert root.catalog.require_instance(new.sop_uid).object_prefix.startswith("i/")


# --- statistics and metrics -----------------------------------------------------------


def test_stats_are_per_tenant_and_the_platform_sums_them(
    tmp_path: Path, part10: dict[str, bytes]
) -> None:
    with _platform(tmp_path / "data", "sqlite") as root:
        root.finisher.stop()
        a, b = root.for_tenant("hosp-a"), root.for_tenant("hosp-b")
        a.ingest_part10(part10[CT])
        for data in part10.values():
            b.ingest_part10(data)
        assert (a.stats()["instances"], b.stats()["instances"]) == (1, len(FILES))
        platform = root.platform_stats()
        assert list(platform["tenants"]) == ["default", "hosp-a", "hosp-b"]
        totals = platform["totals"]
        assert totals["instances"] == 1 + len(FILES) and totals["unfinished"] == 1 + len(FILES)
        ct_row = next(r for r in totals["by_modality"] if r["modality"] == "CT")
        assert ct_row["instances"] == 2
        assert ct_row["received_bytes"] == 2 * len(part10[CT])
        assert totals["spool"] == root.spool_stats()  # the host's, counted once
        assert list(root.platform_stats(["hosp-b"])["tenants"]) == ["hosp-b"]

        labelled = metrics.exposition(tenants=lambda: root.platform_stats()["tenants"]).decode()
        assert 'kho_objects{level="instances",tenant="hosp-a"} 1.0' in labelled
        assert f'kho_objects{{level="instances",tenant="hosp-b"}} {len(FILES)}.0' in labelled
        assert 'kho_objects{level="instances",tenant="default"} 0.0' in labelled
        assert 'kho_modality_instances{modality="CT",tenant="hosp-a"} 1.0' in labelled
        assert 'kho_unfinished_instances{tenant="hosp-a"} 1.0' in labelled
        assert re.search(r"^kho_spool_bytes [1-9]", labelled, re.MULTILINE)
        # one hospital's view: its series only, without the host's spool
        one = metrics.exposition(
            tenants=lambda: root.platform_stats(["hosp-a"])["tenants"], host=False
        ).decode()
        assert 'tenant="hosp-b"' not in one and "kho_spool_bytes" not in one
        assert 'kho_objects{level="instances",tenant="hosp-a"} 1.0' in one
        # as before tenants: one archive's figures, unlabelled
        plain = metrics.exposition(a.stats).decode()
        assert 'kho_objects{level="instances"} 1.0' in plain and 'tenant="' not in plain
