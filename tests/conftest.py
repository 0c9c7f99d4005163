"""Fixtures shared by every test folder: settings, an archive, a running DICOM server,
and the real DICOM files the archive must accept."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from kho.archive.archive import Archive
from kho.archive.config import Settings

SAMPLES_DIR = Path(__file__).resolve().parents[2] / "shared" / "dicom-samples"
if not SAMPLES_DIR.is_dir():  # CI clones next to shared/; a developer checkout may differ
    SAMPLES_DIR = Path("/work/shared/dicom-samples")


def sample_files() -> list[Path]:
    files = sorted(SAMPLES_DIR.glob("*.dcm"))
    assert files, f"no DICOM samples in {SAMPLES_DIR}"
    return files


def pydicom_test_files() -> list[Path]:
    """Every file in pydicom's own test data (readable or not: tests decide)."""
    import pydicom.data

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = pydicom.data.get_testdata_files("*")
    return sorted(
        {Path(p) for p in found if Path(p).is_file() and Path(p).suffix.lower() in (".dcm", "")}
    )


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", dicom_port=0, http_port=0, ae_title="KHO")


@pytest.fixture
def archive(settings: Settings) -> Iterator[Archive]:
    with Archive(settings) as arc:
        yield arc


@pytest.fixture
def dicom_server(archive: Archive) -> Iterator[object]:
    from kho.dicom_scp.server import DicomServer

    server = DicomServer(archive).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """One SeaweedFS S3 server for the session (tests make their own buckets)."""
    from tests.helpers.seaweedfs import run_seaweedfs

    with run_seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture
def bucket_url(seaweedfs) -> str:
    """An s3:// URL of a fresh, empty key space on the session's SeaweedFS.

    One bucket with a prefix per test: every new bucket is a SeaweedFS collection that
    allocates volumes of its own, which a small test server runs out of."""
    import secrets

    return seaweedfs.url(f"kho-tests/{secrets.token_hex(6)}")


@pytest.fixture(autouse=True)
def _quiet_pynetdicom() -> None:
    logging.getLogger("pynetdicom").setLevel(logging.ERROR)
