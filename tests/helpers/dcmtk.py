"""Running dcmtk's tools (Debian package dcmtk) from tests and benchmarks.

pynetdicom installs Python scripts named storescu/findscu/... that shadow dcmtk's on PATH,
so the tools are called by their absolute paths.  TCP_NODELAY=1 avoids Nagle delays.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

DCMTK_BIN = Path("/usr/bin")

# what storescu 3.6.7 can propose for a file's transfer syntax (option, or None for default)
STORESCU_PROPOSAL = {
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.5": "-xr",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
}


def tool(name: str) -> str:
    path = DCMTK_BIN / name
    if not path.exists():
        raise FileNotFoundError(f"dcmtk tool {path} is missing: apt-get install dcmtk")
    return str(path)


def env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def storescu(
    port: int,
    files: list[str | Path],
    *,
    aec: str = "KHO",
    aet: str = "STORESCU",
    proposal: str | None = None,
    extra: tuple[str, ...] = (),
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    args = [tool("storescu"), "-aet", aet, "-aec", aec]
    if proposal:
        args.append(proposal)
    args += [*extra, "127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(args, capture_output=True, text=True, env=env(), timeout=timeout)


@dataclass
class StoreSCP:
    """dcmtk's storescp writing what it receives bit-preserving into ``folder``."""

    port: int
    folder: Path
    process: subprocess.Popen[bytes]
    ae_title: str

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.rglob("*") if p.is_file())


@contextlib.contextmanager
def run_storescp(
    folder: Path,
    *,
    ae_title: str = "STORESCP",
    port: int | None = None,
    extra: tuple[str, ...] = (),
) -> Iterator[StoreSCP]:
    folder.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    proc = subprocess.Popen(
        [
            tool("storescp"),
            "--bit-preserving",
            "--accept-all",
            "-aet",
            ae_title,
            "-od",
            str(folder),
            *extra,
            str(port),
        ],
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, proc=proc)
        yield StoreSCP(port, folder, proc, ae_title)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def have_dcmtk() -> bool:
    return shutil.which("storescu", path=str(DCMTK_BIN)) is not None
