"""The catalog shared by several processes: opening it beside one that is writing."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from kho.archive.catalog import Catalog, open_catalog
from tests.helpers.part10 import part10_bytes
from tests.helpers.postgres import postgres_database


def test_opening_a_postgresql_catalog_beside_a_writer_runs_no_ddl() -> None:
    """A process starting (kho serve, kho stats) while another holds a write transaction
    on the instances table must not wait for it: the schema is in place, so no CREATE
    INDEX (which locks its table even when the index exists) is run."""
    with postgres_database() as url:
        writer = open_catalog(url)
        try:
            with writer.transaction():
                writer.execute(
                    "INSERT INTO unfinished (sop_uid, object_prefix, queued_at) VALUES (?, ?, ?)",
                    ("1.2.3", "i/00/00/x", 0.0),
                )
                writer.execute("UPDATE instances SET source = source WHERE sop_uid = ?", ("x",))
                opened: list[Catalog] = []
                thread = threading.Thread(target=lambda: opened.append(open_catalog(url)))
                thread.start()
                thread.join(15)  # it would wait for the writer's commit: never, here
                assert opened, "opening the catalog waited for another process's writes"
                assert opened[0].unfinished_count() == 0  # the writer has not committed
                opened[0].close()
        finally:
            writer.close()


def test_connections_of_ended_threads_are_closed(tmp_path) -> None:
    """Every association runs in its own thread; the catalog must not keep one open
    connection per association it ever served."""
    catalog = open_catalog(tmp_path / "catalog.sqlite3")
    try:
        for _ in range(3):
            threads = [threading.Thread(target=lambda: catalog.counts()) for _ in range(5)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert catalog.open_connections <= 6  # this thread's and the last batch's
        # a new thread's first connection closes those of the threads that have ended
        last = threading.Thread(target=catalog.unfinished_count)
        last.start()
        last.join()
        assert catalog.open_connections == 2
    finally:
        catalog.close()


def test_concurrent_ingest_of_one_series_with_changing_attributes(tmp_path) -> None:
    """PostgreSQL: eight threads store one series whose instances disagree on patient,
    study and sequence attributes (as re-sent or corrected studies do): row locks are taken
    in one order and conflicts retried, so every instance is stored and counted once."""
    from io import BytesIO

    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    from kho.archive.archive import Archive
    from kho.archive.config import Settings
    from tests.archive.test_ingest import make_instance

    datasets = []
    for i in range(48):
        ds = pydicom.dcmread(BytesIO(make_instance()))
        ds.PatientSex = "MF"[i % 2]
        ds.StudyDescription = f"desc {i % 3}"
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator = f"C{i % 4}", "99KHO"
        ds.ProcedureCodeSequence = Sequence([code] * (1 + i % 2))
        datasets.append(part10_bytes(ds))
    with postgres_database() as url:
        settings = Settings(data_dir=tmp_path / "data", catalog_url=url)
        with Archive(settings) as archive:
            archive.finisher.stop()
            errors: list[BaseException] = []

            def store(chunk: list[bytes]) -> None:
                for data in chunk:
                    try:
                        archive.ingest_part10(data, defer=True)
                    except BaseException as exc:  # collected: the assertion shows them
                        errors.append(exc)

            threads = [threading.Thread(target=store, args=(datasets[i::8],)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert errors == []
            assert archive.catalog.counts()["instances"] == 48
            archive.catalog.fold_counters()  # the ingests' counts, kept as deltas until folded
            row = archive.catalog.fetchone("SELECT num_instances FROM series")
            assert row == (48,)


def test_instance_counts_are_exact_before_and_after_folding(tmp_path: Path) -> None:
    """PostgreSQL ingests add their instance counts as deltas (no shared counter row to
    queue on); C-FIND/QIDO counts include the pending ones, and folding changes nothing a
    query sees."""
    from kho.archive.archive import Archive
    from kho.archive.config import Settings
    from kho.archive.query import engine as query
    from tests.archive.test_ingest import make_instance
    from tests.helpers.postgres import postgres_database

    with postgres_database() as url:
        settings = Settings(data_dir=tmp_path / "d", catalog_url=url)
        with Archive(settings) as archive:
            archive.finisher.stop()
            for n in range(5):
                archive.ingest_part10(make_instance(pixel_value=n))
            pending = archive.catalog.fetchone("SELECT count(*) FROM instance_deltas")
            assert pending == (5,)
            counts = []
            for _ in range(2):
                keys = {
                    "NumberOfPatientRelatedInstances": "",
                    "NumberOfStudyRelatedInstances": "",
                }
                rows = list(query.find(archive.catalog, "STUDY", keys))
                series = list(
                    query.find(archive.catalog, "SERIES", {"NumberOfSeriesRelatedInstances": ""})
                )
                counts.append(
                    [
                        rows[0]["NumberOfPatientRelatedInstances"],
                        rows[0]["NumberOfStudyRelatedInstances"],
                        series[0]["NumberOfSeriesRelatedInstances"],
                    ]
                )
                archive.catalog.fold_counters()
            assert counts == [[5, 5, 5], [5, 5, 5]]
            assert archive.catalog.fetchone("SELECT count(*) FROM instance_deltas") == (0,)
            assert archive.catalog.fetchone("SELECT num_instances FROM studies") == (5,)


@pytest.mark.parametrize(
    ("spool", "background"),
    [("on", True), ("off", True), ("off", False)],
    ids=["spooled", "journalled-queued", "journalled-inline"],
)
def test_postgresql_one_statement_ingest_writes_what_the_general_path_writes(
    tmp_path: Path, spool: str, background: bool
) -> None:
    """PostgreSQL stores a new instance of a series it holds unchanged in one statement;
    an instance whose patient, study or series differs, or whose SOP Instance UID is
    stored, is left whole to the general path (the statement writes nothing).  The
    catalog ends the same as SQLite's, row for row."""
    from io import BytesIO

    import pydicom

    from kho.archive.archive import Archive
    from kho.archive.catalog.postgresql import PostgresCatalog
    from kho.archive.config import Settings
    from tests.archive.test_ingest import make_instance

    def variant(n: int, **changes: object) -> bytes:
        ds = pydicom.dcmread(BytesIO(make_instance(sop_uid=f"1.2.826.0.1.3680043.10.1425.7.{n}")))
        for keyword, value in changes.items():
            setattr(ds, keyword, value)
        return part10_bytes(ds)

    sent = [
        variant(1),  # no Series Number: NULL in the catalog, matched as such
        variant(2),
        variant(3, StudyDescription="corrected"),
        variant(4, StudyDescription="corrected"),
        variant(5, SeriesNumber=7),
        variant(6, PatientSex="F"),
        variant(7, PatientSex="F"),
        variant(2),  # a duplicate
        variant(3, StudyDescription="corrected", PatientSex="F"),  # another version
    ]
    taken: list[bool] = []
    real = PostgresCatalog._commit_new_in_known_series

    def counted(self: Catalog, *args: object) -> bool:
        taken.append(real(self, *args))  # type: ignore[arg-type]
        return taken[-1]

    tables = {
        "patients": "patient_key",
        "studies": "study_uid",
        "series": "series_uid",
        "instances": "sop_uid",
        "unfinished": "sop_uid",
        "pending": "object_prefix",
    }
    # times, and where in its process's spool each instance lies
    volatile = {"updated_at", "received_at", "queued_at", "object_prefix", "derived", "source"}
    catalogs = {}
    for engine in ("sqlite", "postgresql"):
        with postgres_database() as url:
            settings = Settings(
                data_dir=tmp_path / engine,
                catalog_url=url if engine == "postgresql" else "",
                spool=spool,
                finish_in_background=background,
            )
            with Archive(settings) as archive:
                archive.finisher.stop()
                original = PostgresCatalog._commit_new_in_known_series
                PostgresCatalog._commit_new_in_known_series = counted  # type: ignore[method-assign]
                try:
                    outcomes = [archive.ingest_part10(data).outcome.value for data in sent]
                finally:
                    PostgresCatalog._commit_new_in_known_series = original  # type: ignore[method-assign]
                archive.catalog.fold_counters()
                rows = {}
                for table, key in tables.items():
                    cursor = archive.catalog.execute(f"SELECT * FROM {table} ORDER BY {key}")
                    names = [d[0] for d in cursor.description]
                    rows[table] = [
                        {n: v for n, v in zip(names, row, strict=True) if n not in volatile}
                        for row in cursor.fetchall()
                    ]
                catalogs[engine] = (outcomes, rows)
    assert catalogs["sqlite"] == catalogs["postgresql"]
    outcomes, rows = catalogs["postgresql"]
    assert outcomes == ["stored"] * 7 + ["duplicate", "replaced"]
    assert len(rows["instances"]) == 7 and not rows["pending"]
    assert len(rows["unfinished"]) == (7 if background else 0)
    assert rows["series"][0]["num_instances"] == 7
    # one statement for every instance of an unchanged series; the first of the series,
    # each change (study, series, patient), the duplicate and the other version fall back
    # (a duplicate is recognised before anything is written, unless it is spooled: then
    # the append costs less than looking first)
    duplicate = [False] if spool == "on" else []
    assert taken == [False, True, False, True, False, False, True, *duplicate, False]
