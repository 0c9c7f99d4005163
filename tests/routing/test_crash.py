"""kill -9: of a process sending the queue (after a restart everything arrives;
duplicates are harmless), and of a process ingesting (every acknowledged instance a rule
selects is queued, no row without its instance)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from kho.archive.archive import Archive
from kho.archive.config import Settings
from kho.bench.phantom import ct_series_datasets
from kho.routing import Router, RoutingConfig
from tests.helpers import dcmtk
from tests.helpers.postgres import ENGINES, postgres_database
from tests.routing.conftest import originals_of, queue_counts, recording_scp, wait_for

ROOT = Path(__file__).resolve().parents[2]

WORKER = """
import json, sys, time
from kho.archive.archive import Archive
from kho.archive.config import Settings
from kho.routing import Router, RoutingConfig

spec = json.loads(open(sys.argv[1]).read())
archive = Archive(Settings(**spec["settings"]))
router = Router(archive, RoutingConfig(**spec["routing"])).start()
print("ready", flush=True)
while True:
    time.sleep(1)
"""

INGEST = """
import json, sys
from pathlib import Path
from kho.archive.archive import Archive
from kho.archive.config import Settings
from kho.routing import Router, RoutingConfig

spec = json.loads(open(sys.argv[1]).read())
archive = Archive(Settings(**spec["settings"]))
router = Router(archive, RoutingConfig(**spec["routing"]))
rows = router.stored_rows(None, archive.tenant, "C-STORE", "MODALITY")
print("ready", flush=True)
for path in sorted(Path(spec["files"]).glob("*.dcm")):
    result = archive.ingest_part10(path.read_bytes(), with_rows=rows)
    print(result.sop_uid, flush=True)
"""


@contextmanager
def running(script: str, spec: dict[str, Any], tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    spec_file = tmp_path / f"spec-{os.getpid()}-{threading.get_ident()}.json"
    spec_file.write_text(json.dumps(spec))
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(spec_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_kill_9_while_sending_loses_nothing(tmp_path: Path) -> None:
    datas = ct_series_datasets(60, rows=64, cols=64, seed=11)
    settings = {"data_dir": str(tmp_path / "data"), "dicom_port": 0, "http_port": 0}
    with recording_scp() as scp:
        scp.delay_s = 0.03  # a slow destination: the kill lands mid-batch
        routing = {
            "rules": [{"name": "all", "destination": "pacs"}],
            "destinations": {
                "pacs": {"url": f"dicom://{scp.ae_title}@127.0.0.1:{scp.port}", "batch": 20}
            },
        }
        with Archive(Settings(**settings)) as archive:
            rows = Router(archive, RoutingConfig(**routing)).stored_rows(
                None, archive.tenant, "C-STORE", "MODALITY"
            )
            for data in datas:
                archive.ingest_part10(data, with_rows=rows)
        spec = {"settings": settings, "routing": routing}
        with running(WORKER, spec, tmp_path) as first:
            wait_for(lambda: scp.stores >= 15)
            first.send_signal(signal.SIGKILL)
            first.wait()
        assert len(scp.received) < len(datas)
        with running(WORKER, spec, tmp_path):
            wait_for(lambda: len(scp.received) == len(datas), timeout=60)
        assert set(scp.received) == set(originals_of(datas))
        with Archive(Settings(**settings)) as archive:
            router = Router(archive, RoutingConfig(**routing))
            wait_for(lambda: queue_counts(router)["pacs"]["queued"] == 0)
            assert queue_counts(router)["pacs"]["dead"] == 0


@pytest.mark.parametrize("engine", ENGINES)
def test_kill_9_while_ingesting_queues_every_acknowledged_instance(
    engine: str, tmp_path: Path
) -> None:
    files = tmp_path / "files"
    files.mkdir()
    datas = ct_series_datasets(150, rows=64, cols=64, seed=12)
    for number, data in enumerate(datas):
        (files / f"{number:04d}.dcm").write_bytes(data)
    with postgres_database() if engine == "postgresql" else _nothing() as url:
        settings: dict[str, Any] = {"data_dir": str(tmp_path / "data"), "dicom_port": 0}
        if url:
            settings["catalog_url"] = url
        with dcmtk.run_storescp(tmp_path / "dest") as scp:
            routing = {
                "rules": [{"name": "all", "destination": "pacs"}],
                "destinations": {"pacs": {"url": f"dicom://{scp.ae_title}@127.0.0.1:{scp.port}"}},
            }
            acknowledged: list[str] = []
            spec = {"settings": settings, "routing": routing, "files": str(files)}
            with running(INGEST, spec, tmp_path) as proc:
                assert proc.stdout is not None
                for line in proc.stdout:
                    acknowledged.append(line.strip())
                    if len(acknowledged) == 40:
                        proc.send_signal(signal.SIGKILL)
                        break
            with Archive(Settings(**settings)) as archive:
                archive.recover(grace_s=0)
                catalog = archive.catalog
                queued = {r[0] for r in catalog.fetchall("SELECT sop_uid FROM forward_queue")}
                stored = {r.sop_uid for r in catalog.instances_where("1 = 1", ())}
                assert set(acknowledged) <= queued  # acknowledged: queued with it
                assert queued == stored  # and no row without its instance
                router = Router(archive, RoutingConfig(**routing))
                assert router.run_once() == len(queued)
            delivered = {
                str(dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in scp.files()
            }
            assert delivered == queued


@contextmanager
def _nothing() -> Iterator[str]:
    yield ""
