"""A pydicom dataset as Part 10 bytes, for tests and benchmarks that build instances in memory.

``part10_bytes`` writes the dataset to a buffer with ``enforce_file_format=True`` (preamble,
``DICM`` and a complete File Meta Information group) and returns the buffer's bytes.
``implicit_vr`` and ``little_endian`` reach ``save_as`` only when given; left out, pydicom
takes the encoding from the dataset's transfer syntax.
"""

from __future__ import annotations

from io import BytesIO
from typing import Any

from pydicom.dataset import Dataset


def part10_bytes(
    ds: Dataset, *, implicit_vr: bool | None = None, little_endian: bool | None = None
) -> bytes:
    """Return ``ds`` written as a Part 10 file."""
    options: dict[str, Any] = {}
    if implicit_vr is not None:
        options["implicit_vr"] = implicit_vr
    if little_endian is not None:
        options["little_endian"] = little_endian
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True, **options)
    return buffer.getvalue()
