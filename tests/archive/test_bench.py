"""`kho bench`: capacity arithmetic, an embedded run on a generated CT, a run against a
running archive over DICOM."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kho.archive.archive import Archive
from kho.bench import phantom
from kho.bench import runner as bench


def test_capacity_projection_arithmetic() -> None:
    p = bench.project_capacity(200e6, 50e6, studies_per_day=800, years=10)
    assert p["studies"] == 2_922_000
    assert p["tb_uncompressed"] == pytest.approx(584.4)
    assert p["tb_with_kho"] == pytest.approx(146.1)
    assert p["tb_saved"] == pytest.approx(438.3)


def test_embedded_bench_reports_per_modality_and_projection(tmp_path: Path) -> None:
    files = phantom.write_ct_series(tmp_path / "ct", 6, rows=128, cols=128)
    report = bench.bench_embedded(files, threads=2, studies_per_day=100, years=1)
    assert report.instances == 6 and report.rejected == 0
    assert [row["modality"] for row in report.by_modality] == ["CT"]
    assert report.received_bytes == sum(f.stat().st_size for f in files)
    assert report.projection["studies"] == round(100 * 365.25)
    assert "CT" in bench.format_report(report)
    chart = bench.write_chart(report, tmp_path / "chart.png")
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_bench_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kho.cli",
            "bench",
            "--generate",
            "4",
            "--quiet",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    payload = json.loads(out.read_text())
    assert payload["instances"] == 4
    assert payload["projection"]["tb_uncompressed"] > 0
    assert "projection" in result.stdout


def test_remote_bench_against_a_running_archive(
    tmp_path: Path, archive: Archive, dicom_server
) -> None:
    files = phantom.write_ct_series(tmp_path / "ct", 5, rows=64, cols=64)
    ok, refused, _seconds, sent = bench.bench_remote(
        files, host="127.0.0.1", port=dicom_server.port, called_ae="KHO", associations=2
    )
    assert (ok, refused) == (5, 0)
    assert sent == sum(f.stat().st_size for f in files)
    assert archive.catalog.counts()["instances"] == 5
