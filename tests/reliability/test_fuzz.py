"""Hostile bytes into every parser kho runs on them (benchmarks/soak/fuzz_targets.py; the
atheris driver, benchmarks/soak/fuzz.py, runs the same targets for millions of inputs):
seeds (real files, crasher shapes) pass, and so do mutations of them: nothing raises but
kho's documented errors."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.soak.fuzz_targets import TARGETS, seeds


@st.composite
def mutated(draw: st.DrawFn, target: str) -> bytes:
    """A seed with a few bytes overwritten, inserted or cut (the shapes coverage-guided
    fuzzers make), or plain random bytes."""
    pool = seeds(target, limit=12)
    data = bytearray(draw(st.sampled_from(pool)))
    for _ in range(draw(st.integers(0, 6))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["set", "insert", "cut", "length"]))
        if action == "set":
            data[at] = draw(st.integers(0, 255))
        elif action == "insert":
            data[at:at] = draw(st.binary(max_size=8))
        elif action == "cut":
            del data[at : at + draw(st.integers(1, 64))]
        else:  # a length field's worth of 0xFF: lengths beyond the file, undefined lengths
            data[at : at + 4] = b"\xff\xff\xff\xff"
    if draw(st.booleans()) and draw(st.booleans()):
        return draw(st.binary(max_size=512))
    return bytes(data)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_seeds_raise_nothing_but_documented_errors(target: str) -> None:
    for data in seeds(target):
        TARGETS[target](data)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_mutated_inputs_raise_nothing_but_documented_errors(target: str) -> None:
    @settings(
        max_examples=60,
        deadline=None,  # no timings in the suite: the atheris driver reports slow inputs
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(mutated(target))
    def check(data: bytes) -> None:
        TARGETS[target](data)

    check()
