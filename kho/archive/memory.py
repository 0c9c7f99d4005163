"""The process's C heap under glibc: settings for a long-running server, a periodic
trim, and the figures ``/metrics`` shows.

Why: under sustained load (many associations, each on its own threads, with pixel
buffers of hundreds of kilobytes freed in any order) glibc's default malloc keeps
growing the resident memory of ``kho serve`` far beyond the memory in use (memray: the
tracked heap at ~210-230 MB for 10 minutes while RSS rose at ~900 MB an hour; see
benchmarks/results/reliability.md, "Memory under sustained load").  Three defaults
cause it: one arena per thread up to 8 per core, each keeping what its threads
freed; a mmap threshold that rises to the largest block ever freed (so later pixel
buffers come from the arenas and fragment them); and a trim threshold that rises with
it (so up to twice that stays unreturned at the top of each arena).

Each setting is left as it is where the administrator set glibc's own variable for it
(``MALLOC_ARENA_MAX``, ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` or
``GLIBC_TUNABLES``).  On a C library other than glibc (musl, macOS) nothing is done.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
from dataclasses import dataclass
from functools import cache

log = logging.getLogger(__name__)

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

#: blocks this large and larger are mapped on their own and unmapped when freed (a 512x512
#: 16-bit slice is 512 KiB; PDU and small-object buffers stay in the arenas)
MMAP_THRESHOLD = 256 * 1024
#: free memory at the top of an arena beyond this goes back to the system at once
TRIM_THRESHOLD = 1024 * 1024
#: arenas per core (glibc's default is 8 per core on 64-bit)
ARENAS_PER_CORE = 2


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",  # bytes the arenas took from the system (sbrk + their mmapped heaps)
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",  # bytes in blocks mapped on their own
            "usmblks",
            "fsmblks",
            "uordblks",  # bytes in use in the arenas
            "fordblks",  # bytes free in the arenas
            "keepcost",
        )
    ]


@cache
def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    for name in ("mallopt", "malloc_trim", "mallinfo2"):
        if not hasattr(libc, name):  # mallinfo2: glibc >= 2.33
            return None
    libc.mallinfo2.restype = _MallInfo2
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    return libc


def _set_by_environment(variable: str, tunable: str) -> bool:
    return variable in os.environ or tunable in os.environ.get("GLIBC_TUNABLES", "")


def tune_for_server(cores: int | None = None) -> dict[str, int]:
    """Apply the server settings (before the server starts its threads: arenas are made
    as threads first contend).  Returns what was set, by glibc's variable name; empty
    where not glibc."""
    libc = _glibc()
    if libc is None:
        return {}
    cores = cores or os.cpu_count() or 1
    wanted = [
        ("MALLOC_ARENA_MAX", "glibc.malloc.arena_max", _M_ARENA_MAX, ARENAS_PER_CORE * cores),
        (
            "MALLOC_MMAP_THRESHOLD_",
            "glibc.malloc.mmap_threshold",
            _M_MMAP_THRESHOLD,
            MMAP_THRESHOLD,
        ),
        (
            "MALLOC_TRIM_THRESHOLD_",
            "glibc.malloc.trim_threshold",
            _M_TRIM_THRESHOLD,
            TRIM_THRESHOLD,
        ),
    ]
    applied = {}
    for variable, tunable, parameter, value in wanted:
        if _set_by_environment(variable, tunable):
            continue
        if libc.mallopt(parameter, value) == 1:
            applied[variable] = value
        else:
            log.warning("glibc refused mallopt %s=%d", variable, value)
    return applied


def trim() -> None:
    """Give the arenas' free pages back to the system (glibc ``malloc_trim``): free
    memory inside an arena, not only at its top, is released with ``MADV_DONTNEED``."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@cache
def _sqlite() -> ctypes.CDLL | None:
    """The SQLite library Python's sqlite3 module uses, if it is a shared library this
    process has mapped (a statically linked one keeps its figures to itself)."""
    import sqlite3  # noqa: F401  (maps the library)

    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            paths = {line.split()[-1] for line in maps if "/libsqlite3.so" in line}
    except OSError:
        return None
    if len(paths) != 1:  # none, or two copies: which one Python uses is unknown
        return None
    try:
        lib = ctypes.CDLL(paths.pop())
        lib.sqlite3_memory_used.restype = ctypes.c_int64
    except (OSError, AttributeError):
        return None
    return lib


def sqlite_bytes() -> int | None:
    """Bytes SQLite holds in this process, every connection's page cache included
    (``sqlite3_memory_used``); None where that cannot be read."""
    lib = _sqlite()
    return int(lib.sqlite3_memory_used()) if lib is not None else None


@dataclass(frozen=True)
class HeapFigures:
    """glibc's own account of the C heap (``mallinfo2``), in bytes."""

    arenas: int  # what the arenas hold from the system
    in_use: int  # allocated and not freed, in the arenas
    free: int  # free inside the arenas (kept for reuse: resident until trimmed)
    mapped: int  # blocks mapped on their own (in use)


def heap_figures() -> HeapFigures | None:
    """The C heap's figures; None where not glibc."""
    libc = _glibc()
    if libc is None:
        return None
    info = libc.mallinfo2()
    return HeapFigures(
        arenas=int(info.arena),
        in_use=int(info.uordblks),
        free=int(info.fordblks),
        mapped=int(info.hblkhd),
    )


__all__ = ["HeapFigures", "heap_figures", "sqlite_bytes", "trim", "tune_for_server"]
