"""The benchmark scripts run on demand, never in the suite; this keeps them importable
against the package as it is (a moved module must not break them unnoticed)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

SCRIPTS = sorted(
    p.stem
    for p in (Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py")
    if p.stem != "__init__"
)


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_benchmark_imports(name: str) -> None:
    module = importlib.import_module(f"benchmarks.{name}")
    assert module.__name__ == f"benchmarks.{name}"


def test_ingest_corpus_series_have_uids_of_their_own_and_are_reused(tmp_path: Path) -> None:
    """benchmarks.ingest --series N: N copies of one corpus, each its own study, series and
    instances (a resend would be a duplicate, not an ingest), kept for the next run."""
    import pydicom

    from benchmarks.ingest import build_corpus

    groups = build_corpus(tmp_path, series=2, slices=3, radiographs=0, multiframes=0)
    assert [len(group) for group in groups] == [3, 3]
    read = [[pydicom.dcmread(p, stop_before_pixels=True) for p in group] for group in groups]
    for datasets in read:
        assert len({ds.SeriesInstanceUID for ds in datasets}) == 1  # still one series
        assert len({ds.SOPInstanceUID for ds in datasets}) == 3
        for ds in datasets:
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    first, second = ({(ds.StudyInstanceUID, ds.SOPInstanceUID) for ds in d} for d in read)
    assert {s for s, _ in first}.isdisjoint({s for s, _ in second})
    assert {i for _, i in first}.isdisjoint({i for _, i in second})
    stamps = [p.stat().st_mtime_ns for group in groups for p in group]
    again = build_corpus(tmp_path, series=2, slices=3, radiographs=0, multiframes=0)
    assert again == groups
    assert [p.stat().st_mtime_ns for group in again for p in group] == stamps


def test_ingest_corpus_spreads_large_files_among_the_slices() -> None:
    from benchmarks.ingest import _spread

    small = [Path(f"CT{n}") for n in range(8)]
    large = [Path("DX1"), Path("XA1")]
    order = _spread(small, large)
    assert sorted(order) == sorted(small + large)
    assert [p for p in order if p.name.startswith("CT")] == small
    positions = [order.index(p) for p in large]
    assert 0 < positions[0] < positions[1] < len(order) - 1


def test_multiframe_writer_makes_a_readable_cine_run(tmp_path: Path) -> None:
    import pydicom

    from benchmarks.synthetic import write_multiframe

    path = write_multiframe(tmp_path / "xa.dcm", frames=3, rows=64, cols=48)
    ds = pydicom.dcmread(path)
    assert ds.Modality == "XA" and int(ds.NumberOfFrames) == 3
    assert ds.pixel_array.shape == (3, 64, 48)
    assert ds.pixel_array.max() > ds.pixel_array.min()  # an image, not a constant
