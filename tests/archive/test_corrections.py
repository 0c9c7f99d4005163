"""Corrections (IHE IOCM): rejection notes hide the instances they name from every query
and retrieval of their own tenant, and the instances are purged after the configured delay
(data retention: at once), objects and all, with nothing left orphaned.  On SQLite with
the filesystem store and on PostgreSQL with S3 (SeaweedFS)."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from kho.archive import corrections, keys
from kho.archive.archive import Archive
from kho.archive.catalog import InstanceRecord, open_catalog
from kho.archive.config import Settings
from kho.archive.ingest.pipeline import IngestOutcome
from kho.archive.query import engine as query
from kho.errors import DatasetMismatchError, NotFoundError, StorageError
from kho.storage.spool import is_spool_key
from tests.helpers.kos import Made, Study, make_study, rejection_note
from tests.helpers.postgres import postgres_database

TENANTS = ["hosp-a"]
DELAY_S = 0.3


def _settings(data_dir: Path, storage_url: str = "", **more: object) -> Settings:
    return Settings(
        data_dir=data_dir,
        dicom_port=0,
        http_port=0,
        tenants=TENANTS,
        storage_url=storage_url,
        fsync=False,
        rejected_purge_delay_s=DELAY_S,
        **more,  # type: ignore[arg-type]
    )


@contextlib.contextmanager
def _platform(
    data_dir: Path, engine: str, storage_url: str = "", **more: object
) -> Iterator[Archive]:
    with contextlib.ExitStack() as stack:
        catalog = None
        if engine == "postgresql":
            catalog = open_catalog(stack.enter_context(postgres_database()))
        root = stack.enter_context(
            Archive(_settings(data_dir, storage_url, **more), catalog=catalog)
        )
        root.finisher.stop()  # finished and collected by hand
        yield root


@pytest.fixture(params=["sqlite+filesystem", "postgresql+s3"])
def platform(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Archive]:
    engine = request.param.split("+")[0]
    url = request.getfixturevalue("bucket_url") if request.param.endswith("s3") else ""
    with _platform(tmp_path / "data", engine, url) as root:
        yield root


@pytest.fixture
def sqlite_archive(tmp_path: Path) -> Iterator[Archive]:
    with _platform(tmp_path / "data", "sqlite") as root:
        yield root


def _store(archive: Archive, study: Study) -> None:
    for made in study.instances:
        assert archive.ingest_part10(made.data).outcome == IngestOutcome.STORED
    archive.finisher.drain()  # at-rest pixels, thumbnail, metadata: every object kind


def _visible(archive: Archive, study_uid: str) -> set[str]:
    """What C-FIND and QIDO-RS find at image level in the study."""
    return {
        str(row["SOPInstanceUID"])
        for row in query.find(
            archive.catalog, "IMAGE", {"StudyInstanceUID": study_uid, "SOPInstanceUID": ""}
        )
    }


def _objects(archive: Archive) -> set[str]:
    return set(archive.store.list(""))


def _garbage(archive: Archive) -> set[str]:
    return {row[0] for row in archive.catalog.fetchall("SELECT object_key FROM garbage")}


def _keys_of(record: InstanceRecord) -> set[str]:
    out = {record.header_key, *(str(v) for v in record.derived_keys.values())}
    if record.pixel_format != "none":
        out.add(record.pixels_key)
    return {k for k in out if not is_spool_key(k)}


def _named_by_rows(archive: Archive) -> set[str]:
    out: set[str] = set()
    for record in archive.catalog.iter_instances():
        out |= _keys_of(record)
    for (text,) in archive.catalog.fetchall(
        "SELECT record FROM rejected_instances WHERE purged_at = 0"
    ):
        out |= _keys_of(InstanceRecord(**json.loads(text)))
    return out


def _assert_no_orphans(root: Archive) -> None:
    """Every stored object is named by an instance row, a rejected row awaiting its purge,
    or the garbage list; and no row names a missing object."""
    objects = _objects(root)
    named: set[str] = set()
    pending: set[str] = set()
    for tenant in root.tenant_archives():
        named |= _named_by_rows(tenant)
        pending |= _garbage(tenant)
    orphans = objects - named - pending
    assert not orphans, sorted(orphans)[:5]
    missing = named - objects
    assert not missing, sorted(missing)[:5]


def _prefixes(archive: Archive, made: list[Made]) -> list[str]:
    return [archive.catalog.require_instance(m.sop).object_prefix for m in made]


def _under(archive: Archive, prefix: str) -> list[str]:
    return list(archive.store.list(keys.objects_under(prefix)))


# --- rejection, then purge after the delay ------------------------------------------------


def test_a_note_hides_what_it_names_and_the_purge_deletes_it_after_the_delay(
    platform: Archive,
) -> None:
    study = make_study()
    _store(platform, study)
    first, second = list(study.series.values())
    named = [*first, second[0]]  # a whole series and one instance of the other
    prefixes = _prefixes(platform, named)
    assert all(_under(platform, p) for p in prefixes)
    note_uid, note = rejection_note(named)

    result = platform.ingest_part10(note)

    assert result.outcome == IngestOutcome.STORED and result.sop_uid == note_uid
    kept = {m.sop for m in second[1:]}
    assert _visible(platform, study.uid) == kept | {note_uid}  # the note is kept, visible
    for m in named:
        assert platform.catalog.get_instance(m.sop) is None
        with pytest.raises(NotFoundError):
            platform.read_instance(m.sop)
    # the emptied series is gone, the study counts what is left (two images and the note)
    assert (
        platform.catalog.fetchone("SELECT 1 FROM series WHERE series_uid = ?", (first[0].series,))
        is None
    )
    platform.catalog.fold_counters()
    row = platform.catalog.fetchone(
        "SELECT num_instances, num_series FROM studies WHERE study_uid = ?", (study.uid,)
    )
    assert row == (3, 2)
    stats = platform.stats()
    assert stats["rejected"] == {"pending_purge": 4, "purged": 0}
    assert platform.platform_stats()["totals"]["rejected"]["pending_purge"] == 4
    # not yet due: the objects stay (a correction can still be looked into)
    assert platform.purge_rejected() == 0
    assert all(_under(platform, p) for p in prefixes)
    _assert_no_orphans(platform)

    time.sleep(DELAY_S + 0.1)
    assert platform.purge_rejected() == 4

    assert not any(_under(platform, p) for p in prefixes)
    assert platform.stats()["rejected"] == {"pending_purge": 0, "purged": 4}
    assert not (_garbage(platform) & {k for p in prefixes for k in _under(platform, p)})
    _assert_no_orphans(platform)
    # the rest reads back bit for bit
    for m in second[1:]:
        _record, data = platform.read_instance(m.sop)
        assert data == m.data


def test_the_finishers_housekeeping_purges_due_rejections(platform: Archive) -> None:
    study = make_study(series=1, per_series=2)
    _store(platform, study)
    named = study.instances[:1]
    prefix = _prefixes(platform, named)[0]
    platform.ingest_part10(rejection_note(named)[1])
    time.sleep(DELAY_S + 0.1)
    platform.finisher.collect_garbage(force=True)  # what its threads do every few seconds
    assert not _under(platform, prefix)
    assert platform.stats()["rejected"]["purged"] == 1


def test_a_data_retention_note_deletes_at_once_and_is_not_kept(platform: Archive) -> None:
    study = make_study()
    other = make_study("IOCM-2", series=1, per_series=1)
    _store(platform, study)
    _store(platform, other)
    prefixes = _prefixes(platform, study.instances)
    note_uid, note = rejection_note(
        study.instances, code="113039", meaning="Data Retention Policy Expired"
    )

    result = platform.ingest_part10(note)

    assert result.outcome == IngestOutcome.APPLIED
    assert _visible(platform, study.uid) == set()
    assert platform.catalog.get_instance(note_uid) is None
    assert not any(_under(platform, p) for p in prefixes)
    # nothing of the study or its patient is left
    assert (
        platform.catalog.fetchone("SELECT 1 FROM studies WHERE study_uid = ?", (study.uid,)) is None
    )
    assert platform.catalog.fetchone("SELECT 1 FROM patients WHERE patient_id = 'IOCM-1'") is None
    assert platform.stats()["rejected"] == {"pending_purge": 0, "purged": 6}
    assert _visible(platform, other.uid) == {other.instances[0].sop}
    _assert_no_orphans(platform)


def test_a_note_acts_in_its_own_tenant_only(platform: Archive) -> None:
    """The same study in two hospitals: a note sent to one leaves the other's copy alone;
    a note naming only what its tenant does not hold is refused and changes nothing."""
    hosp_a = platform.for_tenant("hosp-a")
    study = make_study(series=1, per_series=2)
    _store(platform, study)
    _store(hosp_a, study)
    only_a = make_study("IOCM-A", series=1, per_series=1)
    _store(hosp_a, only_a)
    before = _objects(platform)

    with pytest.raises(DatasetMismatchError):
        platform.ingest_part10(rejection_note(only_a.instances, patient_id="IOCM-A")[1])
    assert _visible(hosp_a, only_a.uid) == {only_a.instances[0].sop}
    assert _objects(platform) == before

    # the default tenant rejects its copy; hosp-a's copy is untouched
    platform.ingest_part10(
        rejection_note(study.instances, code="113039", meaning="Data Retention Policy Expired")[1]
    )
    assert _visible(platform, study.uid) == set()
    assert _visible(hosp_a, study.uid) == {m.sop for m in study.instances}
    for m in study.instances:
        assert hosp_a.read_instance(m.sop)[1] == m.data
    assert hosp_a.stats()["rejected"] == {"pending_purge": 0, "purged": 0}


def test_a_note_naming_known_and_unknown_instances_rejects_the_known(
    sqlite_archive: Archive,
) -> None:
    study = make_study(series=1, per_series=2)
    _store(sqlite_archive, study)
    stranger = make_study("IOCM-X", series=1, per_series=1, study_uid=study.uid).instances[0]
    # right SOP Instance UID, wrong series: not the instance the catalog holds
    wrong_series = Made(study.uid, stranger.series, study.instances[1].sop, b"")
    note = rejection_note([study.instances[0], stranger, wrong_series])[1]
    sqlite_archive.ingest_part10(note)
    assert study.instances[0].sop not in _visible(sqlite_archive, study.uid)
    assert study.instances[1].sop in _visible(sqlite_archive, study.uid)


def test_a_note_sent_again_changes_nothing_more(sqlite_archive: Archive) -> None:
    study = make_study(series=1, per_series=2)
    _store(sqlite_archive, study)
    _uid, note = rejection_note(
        study.instances[:1], code="113037", meaning="Rejected for Patient Safety Reasons"
    )
    assert sqlite_archive.ingest_part10(note).outcome == IngestOutcome.STORED
    assert sqlite_archive.ingest_part10(note).outcome == IngestOutcome.DUPLICATE
    assert sqlite_archive.stats()["rejected"]["pending_purge"] == 1
    assert _visible(sqlite_archive, study.uid) == {study.instances[1].sop, _uid}


def test_a_rejected_instance_sent_again_is_stored_anew_and_survives_the_purge(
    sqlite_archive: Archive,
) -> None:
    study = make_study(series=1, per_series=2)
    _store(sqlite_archive, study)
    again = study.instances[0]
    old_prefix = _prefixes(sqlite_archive, [again])[0]
    sqlite_archive.ingest_part10(rejection_note([again])[1])
    assert sqlite_archive.ingest_part10(again.data).outcome == IngestOutcome.STORED
    sqlite_archive.finisher.drain()
    new_prefix = _prefixes(sqlite_archive, [again])[0]
    assert new_prefix != old_prefix
    time.sleep(DELAY_S + 0.1)
    assert sqlite_archive.purge_rejected() == 1
    assert not _under(sqlite_archive, old_prefix) and _under(sqlite_archive, new_prefix)
    assert sqlite_archive.read_instance(again.sop)[1] == again.data
    _assert_no_orphans(sqlite_archive)


def test_an_admin_rejection_and_deletion_make_their_own_note(platform: Archive) -> None:
    study = make_study()
    _store(platform, study)
    first, second = list(study.series.values())
    seen: list[corrections.Rejection] = []

    def record(tenant: str) -> corrections.RejectionRows:
        assert tenant == "default"
        return lambda rejection: seen.append(rejection) or []

    platform.rejection_records.append(record)

    result, rejection = platform.reject_instances(
        corrections.reason_for("safety"),
        study.uid,
        first[0].series,
        requested_by="dr-admin",
        requester_kind="token",
    )
    assert rejection.rejected == 3 and seen == [rejection]
    note = platform.catalog.require_instance(result.sop_uid)
    assert note.sop_class_uid == corrections.KOS_SOP_CLASS and note.study_uid == study.uid
    # the note kho made is a note: read back, it names the instances it rejected
    parsed = corrections.read_note(platform.read_instance(result.sop_uid)[1])
    assert parsed is not None and parsed.reason.code == "113037"
    assert {r.sop_uid for r in parsed.references} == {m.sop for m in first}
    assert _visible(platform, study.uid) == {m.sop for m in second} | {result.sop_uid}

    _result, deleted = platform.reject_instances(
        corrections.DATA_RETENTION, study.uid, requested_by="dr-admin", requester_kind="token"
    )
    assert deleted.purged >= 4 and deleted.studies[0].study_gone
    assert _visible(platform, study.uid) == set()
    with pytest.raises(NotFoundError):
        platform.reject_instances(
            corrections.DATA_RETENTION, study.uid, requested_by="x", requester_kind="open"
        )
    _assert_no_orphans(platform)


def test_a_rejected_instance_still_in_the_ingest_spool(tmp_path: Path) -> None:
    """Rejected before the finisher ran: taken off its queue, its spool segment kept until
    the purge, then nothing of it is left."""
    with _platform(tmp_path / "data", "sqlite") as root:
        assert root.spool is not None
        study = make_study(series=1, per_series=2)
        for m in study.instances:
            root.ingest_part10(m.data)
        assert root.catalog.unfinished_count() == 2
        root.ingest_part10(rejection_note(study.instances[:1])[1])
        assert root.catalog.unfinished_count() == 2  # the other image and the note
        time.sleep(DELAY_S + 0.1)
        assert root.purge_rejected() == 1
        root.finisher.drain()
        assert _visible(root, study.uid) == {study.instances[1].sop} | {
            r.sop_uid
            for r in root.catalog.instances_where("sop_class_uid = ?", [corrections.KOS_SOP_CLASS])
        }
        assert root.read_instance(study.instances[1].sop)[1] == study.instances[1].data
        _assert_no_orphans(root)


def test_the_purge_survives_a_store_outage_and_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    study = make_study(series=1, per_series=3)
    with _platform(tmp_path / "data", "sqlite") as root:
        _store(root, study)
        prefixes = _prefixes(root, study.instances[:2])
        root.ingest_part10(rejection_note(study.instances[:2])[1])
    # restarted: the rejection holds, the purge is still due
    with _platform(tmp_path / "data", "sqlite") as root:
        assert _visible(root, study.uid) >= {study.instances[2].sop}
        assert root.stats()["rejected"]["pending_purge"] == 2
        time.sleep(DELAY_S + 0.1)

        def refuse(key: str) -> None:
            raise StorageError("the store is down")

        monkeypatch.setattr(root.store, "delete", refuse)
        assert root.purge_rejected() == 2  # marked: its objects listed as garbage
        monkeypatch.undo()
        assert all(_under(root, p) for p in prefixes)
        assert {k for p in prefixes for k in _under(root, p)} <= _garbage(root)
        _assert_no_orphans(root)
        root.finisher.collect_garbage(force=True)
        assert not any(_under(root, p) for p in prefixes)
        _assert_no_orphans(root)


# --- hostile notes ------------------------------------------------------------------------


def _series_item(**keys: object) -> Dataset:
    item = Dataset()
    for keyword, value in keys.items():
        setattr(item, keyword, value)
    return item


def _hostile_cases(study: Study) -> dict[str, bytes]:
    m = study.instances[0]
    sop = _series_item(ReferencedSOPClassUID=m.sop_class, ReferencedSOPInstanceUID=m.sop)
    return {
        "no evidence": rejection_note([m], drop_evidence=True)[1],
        "empty evidence": rejection_note([m], evidence=Sequence())[1],
        "study without series": rejection_note(
            [m], evidence=Sequence([_series_item(StudyInstanceUID=m.study)])
        )[1],
        "series without instances": rejection_note(
            [m],
            evidence=Sequence(
                [
                    _series_item(
                        StudyInstanceUID=m.study,
                        ReferencedSeriesSequence=Sequence(
                            [_series_item(SeriesInstanceUID=m.series)]
                        ),
                    )
                ]
            ),
        )[1],
        "not a UID": rejection_note(
            [m],
            evidence=Sequence(
                [
                    _series_item(
                        StudyInstanceUID="../../etc/passwd",
                        ReferencedSeriesSequence=Sequence(
                            [
                                _series_item(
                                    SeriesInstanceUID=m.series,
                                    ReferencedSOPSequence=Sequence([sop]),
                                )
                            ]
                        ),
                    )
                ]
            ),
        )[1],
    }


def test_hostile_rejection_notes_are_refused_and_change_nothing(sqlite_archive: Archive) -> None:
    study = make_study(series=1, per_series=2)
    _store(sqlite_archive, study)
    before = (_visible(sqlite_archive, study.uid), _objects(sqlite_archive))
    cases = _hostile_cases(study)
    # truncated in the middle of the evidence sequence
    whole = rejection_note(study.instances[:1])[1]
    cases["truncated"] = whole[: whole.index(study.instances[0].sop.encode()) + 4]
    for name, data in cases.items():
        with pytest.raises(DatasetMismatchError if name != "truncated" else Exception):
            sqlite_archive.ingest_part10(data)
        assert (_visible(sqlite_archive, study.uid), _objects(sqlite_archive)) == before, name
    assert sqlite_archive.stats()["rejected"] == {"pending_purge": 0, "purged": 0}
    # a Key Object Selection of another title is an ordinary instance
    uid, of_interest = rejection_note(study.instances[:1], code="113000", meaning="Of Interest")
    assert sqlite_archive.ingest_part10(of_interest).outcome == IngestOutcome.STORED
    assert _visible(sqlite_archive, study.uid) == before[0] | {uid}
