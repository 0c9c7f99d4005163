"""Hostile bytes into every parser kho runs on them (benchmarks/soak/fuzz_targets.py; the
atheris driver, benchmarks/soak/fuzz.py, runs the same targets for millions of inputs):
seeds (real files, crasher shapes) pass, and so do mutations of them: nothing raises but
kho's documented errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.soak.fuzz_targets import TARGETS, codec_head, codecs, qido_params, seeds


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


# --- QIDO-RS parameters and the codecs: structured inputs beside the byte mutations --------

QIDO_NAMES = [
    "PatientName", "PatientID", "IssuerOfPatientID", "StudyDate", "StudyTime",
    "SeriesTime", "ContentTime", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
    "ModalitiesInStudy", "Modality", "SeriesNumber", "InstanceNumber", "AccessionNumber",
    "OtherPatientIDsSequence.PatientID", "ProcedureCodeSequence.CodeValue",
    "RequestAttributesSequence.ScheduledProcedureStepID", "00100010", "0008,0020",
    "includefield", "limit", "offset", "fuzzymatching", "PatientName.PatientID", "",
]  # fmt: skip
QIDO_VALUES = [
    "", "*", "?", "SMI*", "*^*", "%", "_", "!", "\\", "a\\b", "CT\\MR", ",", "1.2.3,1.2.4",
    "1.2.826.0.1.3680043.10.1146.1.1", "20200101", "20200101-", "-20200101",
    "20200101-20191231", "2020-01-01", "20200230", "10", "1015", "235959.999999", "24",
    "10:15", "1000-0900", "-", "--", "all", "true", "0", "-1", "9" * 30, "1" * 5000,
    "\x00", "a\x00b", "\ud800", "\U0001f600", "Müller", "=ミュラー",
]  # fmt: skip


@settings(max_examples=150, deadline=None, database=None)
@given(
    level=st.sampled_from(["STUDY", "SERIES", "IMAGE"]),
    params=st.lists(
        st.tuples(
            st.one_of(st.sampled_from(QIDO_NAMES), st.text(max_size=12)),
            st.one_of(st.sampled_from(QIDO_VALUES), st.text(max_size=20)),
        ),
        max_size=5,
    ),
    hostile_path=st.one_of(st.none(), st.sampled_from(QIDO_VALUES)),
)
def test_qido_parameters_raise_nothing_but_documented_errors(
    level: str, params: list[tuple[str, str]], hostile_path: str | None
) -> None:
    path = {} if hostile_path is None or level == "STUDY" else {"StudyInstanceUID": hostile_path}
    qido_params(level, params, path)


@settings(max_examples=80, deadline=None, database=None)
@given(
    syntax=st.sampled_from(["1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.5"]),
    shape=st.tuples(st.integers(1, 24), st.integers(1, 24), st.sampled_from([1, 3])),
    declared=st.tuples(st.integers(1, 24), st.integers(1, 24), st.sampled_from([1, 3])),
    bits=st.sampled_from([8, 16]),
    same=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_codec_frames_decode_to_the_declared_geometry_or_are_refused(
    syntax: str,
    shape: tuple[int, int, int],
    declared: tuple[int, int, int],
    bits: int,
    same: bool,
    seed: int,
) -> None:
    """Valid streams under a declared geometry that may not be theirs: the codecs target
    checks the decoded shape and the memory a decode takes."""
    from kho.codecs import jpegls, rle

    samples = shape[2]
    image = np.random.default_rng(seed).integers(0, 1 << bits, shape, dtype=f"uint{bits}")
    if syntax == "1.2.840.10008.1.2.5":
        stream = rle.encode(image[:, :, 0] if samples == 1 else image)
    else:
        stream = jpegls.encode(image[:, :, 0] if samples == 1 else image, bits_stored=bits)
    head = codec_head(syntax, *(shape if same else declared), bits)
    codecs(head + stream)
