"""benchmarks/results/reliability.json (+ .md): each campaign writes its own section and
the page is rebuilt from all of them, so campaigns run at different times add up."""

from __future__ import annotations

import json
import time
from typing import Any

from benchmarks.common import RESULTS_DIR, write_results

NAME = "reliability"


def load() -> dict[str, Any]:
    path = RESULTS_DIR / f"{NAME}.json"
    if path.is_file():
        loaded: dict[str, Any] = json.loads(path.read_text())
        return loaded
    return {}


def record(campaign: str, payload: dict[str, Any]) -> None:
    results = load()
    results[campaign] = {**payload, "recorded_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_results(NAME, results)
