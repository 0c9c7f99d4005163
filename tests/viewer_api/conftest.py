"""A running DICOMweb server over an archive filled with real sample files."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient

from kho.archive.archive import Archive
from kho.archive.config import Settings
from kho.viewer_api.app import PREFIX
from kho.viewer_api.server import HttpServer
from tests.conftest import SAMPLES_DIR

#: distinct SOP Instance UIDs covering the stored forms: JPEG-LS at rest (native CT,
#: signed 14 bit), encapsulated JPEG 2000 / JPEG-LS / JPEG lossless, raw RGB, multi-frame
#: (10-frame JPEG-LS, 2-frame RGB and CT), a MONOCHROME1 radiograph > 1024 px, overlays.
SAMPLES = (
    "693_UNCR.dcm",
    "MR2_J2KR.dcm",
    "JLSL_16_15_1_1F.dcm",
    "emri_small_jpeg_ls_lossless.dcm",
    "US1_UNCR.dcm",
    "SC_rgb_2frame.dcm",
    "RG3_J2KR.dcm",
    "eCT_Supplemental.dcm",
    "MR-SIEMENS-DICOM-WithOverlays.dcm",
    "JPGLosslessP14SV1_1s_1f_8b.dcm",
    "JPEG-LL.dcm",
)


@dataclass(frozen=True)
class Sample:
    name: str
    data: bytes
    study: str
    series: str
    sop: str

    def dataset(self) -> pydicom.Dataset:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(SAMPLES_DIR / self.name)


@dataclass
class Served:
    archive: Archive
    server: HttpServer
    base: str
    client: DICOMwebClient
    samples: dict[str, Sample]

    def url(self, path: str) -> str:
        return self.base + path

    def instance_path(self, name: str) -> str:
        s = self.samples[name]
        return f"/studies/{s.study}/series/{s.series}/instances/{s.sop}"


def serve(archive: Archive) -> tuple[HttpServer, str, DICOMwebClient]:
    server = HttpServer(archive, host="127.0.0.1", port=0).start()
    base = f"http://127.0.0.1:{server.port}/dicom-web"
    return server, base, DICOMwebClient(base)


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    data_dir = tmp_path_factory.mktemp("viewer") / "data"
    archive = Archive(Settings(data_dir=data_dir, fsync=False, dicom_port=0, http_port=0))
    samples: dict[str, Sample] = {}
    for name in SAMPLES:
        data = (SAMPLES_DIR / name).read_bytes()
        result = archive.ingest_part10(data, lenient_identity=True)
        samples[name] = Sample(name, data, result.study_uid, result.series_uid, result.sop_uid)
    server, base, client = serve(archive)
    try:
        yield Served(archive, server, base, client, samples)
    finally:
        server.stop()
        archive.close()


@pytest.fixture
def fresh(archive: Archive) -> Iterator[Served]:
    """An empty archive with its own server (STOW-RS tests)."""
    server, base, client = serve(archive)
    try:
        yield Served(archive, server, base, client, {})
    finally:
        server.stop()


def sample_path(name: str) -> Path:
    return SAMPLES_DIR / name


# --- the route table (tests generated from it: every route, present and future) ----------

#: the sample whose UIDs fill route templates (a single-frame image: frame 1, tile 0/0/0)
ROUTE_SAMPLE = "MR2_J2KR.dcm"


def get_routes(served: Served) -> list[str]:
    """Every GET route template under the DICOMweb prefix, from the application's own
    table (its OpenAPI paths: FastAPI lists every route it routes to there)."""
    paths = served.server.app.openapi()["paths"]
    routes = [path for path, methods in paths.items() if "get" in methods]
    routes = [path for path in routes if path.startswith(PREFIX)]
    assert len(routes) > 20  # QIDO, WADO, rendered, thumbnails, tiles, bulk data
    return routes


def valid_values(served: Served) -> dict[str, str]:
    s = served.samples[ROUTE_SAMPLE]
    return {
        "study": s.study,
        "series": s.series,
        "instance": s.sop,
        "frame": "1",
        "frames": "1",
        "level": "0",
        "x": "0",
        "y": "0",
        "tag": "7FE00010",
    }


def fill(template: str, values: dict[str, str]) -> str:
    def one(m: re.Match[str]) -> str:
        name = m.group(1)
        assert name in values, f"a new path parameter {{{name}}}: give it a valid value here"
        return values[name]

    return re.sub(r"\{(\w+)\}", one, template)


def params_of(template: str) -> list[str]:
    return re.findall(r"\{(\w+)\}", template)
