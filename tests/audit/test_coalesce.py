"""Read-access coalescing: one record per study per client per window."""

from __future__ import annotations

from kho.audit.coalesce import AccessCoalescer


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_first_read_of_a_study_in_a_window_is_admitted() -> None:
    clock = Clock()
    reads = AccessCoalescer(30.0, clock=clock)
    assert reads.admit("dr.house", "1.1")
    assert not reads.admit("dr.house", "1.1")  # a frame after the metadata
    clock.now += 29.9
    assert not reads.admit("dr.house", "1.1")
    clock.now += 0.2
    assert reads.admit("dr.house", "1.1")  # a new window
    assert (reads.admitted, reads.suppressed) == (2, 2)


def test_each_study_and_each_client_has_its_own_window() -> None:
    clock = Clock()
    reads = AccessCoalescer(30.0, clock=clock)
    assert reads.admit("dr.house", "1.1")
    assert reads.admit("dr.house", "2.1")
    assert reads.admit(("dr.wilson", "10.0.0.2"), "1.1")
    assert reads.admit(("dr.wilson", "10.0.0.3"), "1.1")  # the same user elsewhere
    assert not reads.admit(("dr.wilson", "10.0.0.3"), "1.1")


def test_ended_windows_are_forgotten_and_memory_is_bounded() -> None:
    clock = Clock()
    reads = AccessCoalescer(10.0, max_entries=100, clock=clock)
    for i in range(100):
        reads.admit("viewer", f"study-{i}")
    assert len(reads) == 100
    reads.admit("viewer", "one-more")
    assert len(reads) == 100  # the oldest forgotten: its next read is admitted early
    assert reads.admit("viewer", "study-0")
    clock.now += 11
    reads.admit("viewer", "after")
    assert len(reads) == 1
