"""Many clients store the same study at once (benchmarks/soak/concurrency.py in small):
one study, one series, its instances, each stored once, every byte as sent."""

from __future__ import annotations

from pathlib import Path

from benchmarks.soak.concurrency import run_same_study, run_upload_delete


def test_clients_storing_the_same_study_at_once_make_one_study_stored_once(
    tmp_path: Path,
) -> None:
    outcome = run_same_study("sqlite", tmp_path, clients=6, uploads=2, instances=20)
    assert outcome["counts"]["studies"] == 1
    assert outcome["counts"]["series"] == 1
    assert outcome["counts"]["instances"] == 20
    assert outcome["refused"] == {} and outcome["unanswered"] == 0
    assert outcome["corrupt"] == []
    assert outcome["orphans"] == [] and outcome["missing_objects"] == []
    # every object that is not garbage waiting for its delay is an instance's
    assert outcome["objects_not_garbage"] <= outcome["objects_referenced"]


def test_clients_uploading_and_deleting_the_same_study_end_empty(tmp_path: Path) -> None:
    """Orthanc's upload-and-delete shape, small: every client's last step is a delete, so
    nothing may be left: no row, no rejected instance awaiting purge, no stray object."""
    outcome = run_upload_delete("sqlite", tmp_path, clients=3, uploads=3, instances=10)
    assert outcome["counts"]["studies"] == 0
    assert outcome["counts"]["series"] == 0
    assert outcome["counts"]["instances"] == 0
    assert outcome["rejected_pending_purge"] == 0
    assert outcome["refused"] == {} and outcome["unanswered"] == 0
    assert set(outcome["deletes"]) <= {"200", "404"}
    assert sum(outcome["deletes"].values()) == 9
    assert outcome["orphans"] == [] and outcome["missing_objects"] == []
    assert outcome["objects_outside_garbage"] == []
