from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kho.archive.archive import Archive
from kho.hl7.server import Hl7Server
from tests.hl7.fixtures import Hl7Settings
from tests.hl7.mllp_client import MllpClient


@pytest.fixture
def hl7_settings(tmp_path: Path) -> Hl7Settings:
    return Hl7Settings(data_dir=tmp_path / "data", dicom_port=0, http_port=0, ae_title="KHO")


@pytest.fixture
def hl7_archive(hl7_settings: Hl7Settings) -> Iterator[Archive]:
    with Archive(hl7_settings) as archive:
        yield archive


@pytest.fixture
def hl7_server(hl7_archive: Archive) -> Iterator[Hl7Server]:
    with Hl7Server(hl7_archive, port=0) as server:
        yield server


@pytest.fixture
def client(hl7_server: Hl7Server) -> Iterator[MllpClient]:
    with MllpClient(hl7_server.port) as mllp:
        yield mllp
