"""The `kho` command: import (with its summary and rejections), verify, stats."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from kho.archive.archive import Archive
from kho.archive.config import Settings
from tests.conftest import sample_files


def kho(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kho.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_import_stores_folder_and_reports_duplicates_and_rejections(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.dcm").write_bytes(b"")
    (bad / "garbage.dcm").write_bytes(b"not dicom at all" * 20)
    samples = Path(sample_files()[0]).parent

    first = kho("import", "--data-dir", str(data_dir), "--json", str(samples), str(bad))
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout)
    others = [p for p in samples.iterdir() if p.suffix != ".dcm"]  # README, licence
    assert summary["files"] == len(sample_files()) + len(others) + 2
    reasons = {Path(r["path"]).name: r["reason"] for r in summary["rejections"]}
    assert set(reasons) == {"empty.dcm", "garbage.dcm", *(p.name for p in others)}
    assert "0 bytes" in reasons["empty.dcm"]
    assert "not a DICOM" in reasons["garbage.dcm"] or "truncated" in reasons["garbage.dcm"]
    assert summary["stored"] + summary["duplicates"] + summary["replaced"] == len(sample_files())

    again = json.loads(kho("import", "--data-dir", str(data_dir), "--json", str(samples)).stdout)
    # nothing new; files that share a SOP Instance UID with another sample replace each other
    # again (policy replace), every other file is an identical duplicate
    assert again["stored"] == 0
    assert again["duplicates"] + again["replaced"] == len(sample_files())
    assert again["duplicates"] >= 30

    verify = kho("verify", "--data-dir", str(data_dir))
    assert verify.returncode == 0
    assert "0 damaged" in verify.stdout

    stats = json.loads(kho("stats", "--data-dir", str(data_dir), "--json").stdout)
    assert stats["instances"] == summary["stored"]
    assert stats["received_bytes"] > 0
    assert {row["modality"] for row in stats["by_modality"]} >= {"CT", "MR", "US"}


def test_verify_finds_a_damaged_object(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    kho("import", "--data-dir", str(data_dir), "--quiet", str(sample_files()[0]))
    with Archive(Settings(data_dir=data_dir)) as archive:
        record = next(archive.catalog.iter_instances())
        key = record.header_key
        header = bytearray(archive.store.get(key))
        header[-1] ^= 0xFF  # one flipped bit on disk
        archive.store.put(key, bytes(header))
    verify = kho("verify", "--data-dir", str(data_dir))
    assert verify.returncode == 1
    # an uncompressed object reads back different bytes; a compressed one fails to inflate
    assert f"BAD {record.sop_uid}: " in verify.stdout
