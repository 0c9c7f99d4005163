"""`kho serve` as a real subprocess (for crash and multi-process tests)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from tests.helpers.dcmtk import free_port, wait_for_port


@contextlib.contextmanager
def kho_serve(
    data_dir: Path,
    *,
    port: int | None = None,
    env: dict[str, str] | None = None,
    args: tuple[str, ...] = (),
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """Start `kho serve` on a free port; stop it by PID (SIGTERM, then SIGKILL)."""
    port = port or free_port()
    command = [sys.executable, "-m", "kho.cli", "serve", "--data-dir", str(data_dir)]
    command += ["--port", str(port), *args]
    if "--http-port" not in args:
        command += ["--http-port", "0"]  # a free port; tests that need it pass one
    # the HL7 listener off unless a test asks for it (its default port, 2575, is one port
    # for every kho serve a test run starts)
    # and no OHIF download (tests/viewer_api/test_viewer.py tests it, from a cached copy)
    run_env = {**os.environ, "KHO_HL7_PORT": "0", "KHO_VIEWER_AUTO_INSTALL": "false", **(env or {})}
    with open(data_dir.parent / f"serve-{port}.log", "ab") as log:
        proc = subprocess.Popen(command, env=run_env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_port(port, timeout=60, proc=proc)
            yield proc, port
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
