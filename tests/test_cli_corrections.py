"""kho reject, kho delete and the rejected counts of kho stats (kho/cli.py), run in process
against a real data directory; each correction leaves an audit record naming the person at
the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kho.archive.archive import Archive
from kho.archive.config import Settings
from kho.audit import EventKind, chain_all, search
from kho.cli import main
from tests.helpers.kos import make_study, rejection_note


def test_reject_delete_and_stats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data_dir = tmp_path / "data"
    study = make_study(series=2, per_series=2)
    with Archive(Settings(data_dir=data_dir)) as archive:
        for made in study.instances:
            archive.ingest_part10(made.data, defer=False)
    first, _second = list(study.series)
    base = ["--data-dir", str(data_dir), "--study", study.uid]

    assert main(["reject", *base, "--series", first, "--reason", "worklist"]) == 0
    assert "2 instance(s) rejected (113038 Incorrect Modality Worklist Entry)" in (
        capsys.readouterr().out
    )
    assert main(["stats", "--data-dir", str(data_dir), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["instances"] == 3  # two images and the note
    assert stats["rejected"] == {"pending_purge": 2, "purged": 0}
    assert main(["stats", "--data-dir", str(data_dir)]) == 0
    assert "rejected: 2 instance(s) hidden, awaiting deletion; 0 deleted" in (
        capsys.readouterr().out
    )

    assert main(["delete", *base]) == 0
    assert "3 instance(s) rejected (113039" in capsys.readouterr().out
    assert main(["stats", "--data-dir", str(data_dir), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["instances"] == 0 and stats["studies"] == 0
    # the two rejected earlier wait for their delay (a day by default)
    assert stats["rejected"] == {"pending_purge": 2, "purged": 3}

    assert main(["delete", *base]) == 2
    assert "no such instances" in capsys.readouterr().err
    assert main(["reject", *base, "--instance", "1.2.3", "--reason", "quality"]) == 2
    assert main(["reject", *base, "--reason", "nonsense"]) == 2

    with Archive(Settings(data_dir=data_dir)) as archive:
        chain_all(archive.catalog)
        deleted = search(archive.catalog, event=EventKind.STUDY_DELETED)
        rejected = search(archive.catalog, event=EventKind.INSTANCES_ACCESSED)
    assert len(deleted) == 1 and deleted[0].user_id.startswith("local")
    assert [r.action for r in rejected] == ["D"]


def test_import_carries_out_a_deletion_note(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "data"
    study = make_study(series=1, per_series=2)
    files = study.write(tmp_path / "in")
    assert main(["import", "--data-dir", str(data_dir), "--json", "--quiet", *map(str, files)]) == 0
    assert json.loads(capsys.readouterr().out)["stored"] == 2
    note = tmp_path / "note" / "note.dcm"
    note.parent.mkdir()
    note.write_bytes(
        rejection_note(study.instances, code="113039", meaning="Data Retention Policy Expired")[1]
    )
    assert main(["import", "--data-dir", str(data_dir), "--json", "--quiet", str(note)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["applied"] == 1 and summary["stored"] == 0
    assert main(["stats", "--data-dir", str(data_dir), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["instances"] == 0 and stats["rejected"] == {"pending_purge": 0, "purged": 2}
