"""Read-access coalescing: one Instances Accessed record per study per client per short
window, not one per frame.

A viewer opening a CT asks for the study's metadata, then hundreds of frames, thumbnails
and rendered images within seconds.  The audit question is "who looked at this patient's
images, when, from where": the first read of a study by a client in a window answers it;
the others would only bury it.  The record is written at the first read (not at the end of
the window), so it is never later than the read it reports.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable

#: how long reads of one study by one client count as one access
DEFAULT_WINDOW_S = 60.0


class AccessCoalescer:
    """Admits the first read of a study by a client in each window; thread-safe.

    ``admit(who, study_uid)`` is True when that read should be recorded.  Memory is
    bounded by ``max_entries``: past it the oldest entries are forgotten, which can only
    admit a read early (one record more), never hide one.
    """

    def __init__(
        self,
        window_s: float = DEFAULT_WINDOW_S,
        *,
        max_entries: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window_s = window_s
        self.max_entries = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        # (who, study) -> end of its window, oldest window first
        self._windows: OrderedDict[tuple[Hashable, str], float] = OrderedDict()
        self.admitted = 0
        self.suppressed = 0

    def admit(self, who: Hashable, study_uid: str) -> bool:
        now = self._clock()
        key = (who, study_uid)
        with self._lock:
            until = self._windows.get(key)
            if until is not None and until > now:
                self.suppressed += 1
                return False
            self._windows.pop(key, None)
            self._windows[key] = now + self.window_s  # at the end: windows stay in order
            self._forget(now)
            self.admitted += 1
            return True

    def _forget(self, now: float) -> None:
        """Drop ended windows (they are at the front) and, past max_entries, the oldest."""
        windows = self._windows
        while windows:
            key, until = next(iter(windows.items()))
            if until > now and len(windows) <= self.max_entries:
                return
            del windows[key]

    def __len__(self) -> int:
        return len(self._windows)


__all__ = ["DEFAULT_WINDOW_S", "AccessCoalescer"]
