"""The memory soak (benchmarks/soak/memory.py) in small: kho serve takes C-STOREs on
several associations while DICOMweb readers search and retrieve, and the soak's samples
carry what the flatness judgement rests on (RSS, the caches, the C heap in use and kept
free).  Flatness itself needs the 30-minute run: no slope is asserted here."""

from __future__ import annotations

import platform
from pathlib import Path

from benchmarks.soak.memory import run


def test_the_soak_stores_reads_and_samples_the_heap(tmp_path: Path) -> None:
    outcome = run(
        "sqlite",
        tmp_path,
        minutes=0.4,
        associations=4,
        readers=2,
        rate_per_s=4.0,
        warmup_s=5.0,
        sample_s=2.0,
    )
    assert outcome["server_alive_at_end"]
    assert outcome["stores_acknowledged"] > 0
    assert outcome["stores_refused"] == {} and outcome["stores_unanswered"] == 0
    assert outcome["read_failures"] == {}
    assert all(count > 0 for count in outcome["reads"].values()), outcome["reads"]
    samples = [s for s in outcome["samples"] if s[2] is not None]
    assert samples, "no /metrics scrape answered"
    assert all(rss > 0 for _t, rss, *_ in samples)
    if platform.libc_ver()[0] == "glibc":  # kho serve tuned its heap and reports it
        assert all(in_use > 0 and free is not None for *_, in_use, free, _sqlite in samples)
        assert outcome["malloc_in_use_mb_end"] is not None
        (log,) = tmp_path.glob("serve-*.log")
        assert "malloc: MALLOC_ARENA_MAX=" in log.read_text()
