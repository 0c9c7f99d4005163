"""kho.archive.memory: glibc malloc settings for kho serve, the trim, the heap figures.

Each case runs in a child interpreter: mallopt changes the whole process, and the
environment variables glibc reads are read when a process starts."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="the settings are glibc's (nothing is done elsewhere)"
)

PROBE = """
import json, sys
from kho.archive import memory
applied = memory.tune_for_server(cores=2)
before = memory.heap_figures()
block = bytearray(512 * 1024)  # a 512x512 16-bit slice
during = memory.heap_figures()
del block
after = memory.heap_figures()
memory.trim()
print(json.dumps({"applied": applied, "before": before.__dict__, "during": during.__dict__,
                  "after": after.__dict__}))
"""


def _probe(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    clean.pop("GLIBC_TUNABLES", None)
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, check=True
    )
    return json.loads(out.stdout)


def test_server_settings_map_pixel_buffers_on_their_own() -> None:
    found = _probe()
    assert found["applied"] == {
        "MALLOC_ARENA_MAX": 4,
        "MALLOC_MMAP_THRESHOLD_": 256 * 1024,
        "MALLOC_TRIM_THRESHOLD_": 1024 * 1024,
    }
    # the slice's buffer is a mapping of its own, returned to the system when freed
    assert found["during"]["mapped"] - found["before"]["mapped"] >= 512 * 1024
    assert found["after"]["mapped"] == found["before"]["mapped"]
    assert found["during"]["in_use"] - found["before"]["in_use"] < 512 * 1024


def test_the_administrators_glibc_variables_win() -> None:
    found = _probe(MALLOC_ARENA_MAX="3", GLIBC_TUNABLES="glibc.malloc.mmap_threshold=4194304")
    assert found["applied"] == {"MALLOC_TRIM_THRESHOLD_": 1024 * 1024}
    # the tunable's 4 MiB threshold stands: the 512 KiB block comes from an arena
    assert found["during"]["mapped"] == found["before"]["mapped"]
    assert found["during"]["in_use"] - found["before"]["in_use"] >= 512 * 1024


def test_without_the_settings_glibc_keeps_its_defaults() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "from kho.archive import memory; print(memory.heap_figures())"],
        capture_output=True,
        check=True,
        text=True,
    )
    assert "HeapFigures(arenas=" in out.stdout
