"""The frame codec interface: one class per transfer syntax, pure arrays <-> bytes.

A codec encodes or decodes ONE frame.  Arrays are C-contiguous, shape ``(rows, columns)`` for
one sample per pixel or ``(rows, columns, samples)`` for colour (sample-interleaved, as DICOM
native colour-by-pixel data is), dtype uint8 or uint16 (uint32 where a codec says so).
Callers mask signed data to ``bits_stored`` bits before encoding (the DICOM convention for
JPEG-LS and RLE): codecs know nothing of Pixel Representation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np


class FrameCodec(ABC):
    """A lossless codec for single frames, registered by transfer syntax UID."""

    #: short name used in the catalog and in `kho stats` ("jpeg-ls", "rle")
    name: ClassVar[str]
    #: the DICOM transfer syntax whose encapsulated fragments this codec reads and writes
    transfer_syntax_uid: ClassVar[str]

    @classmethod
    def is_available(cls) -> bool:
        """Whether the codec can run here (its dependencies import)."""
        return True

    @abstractmethod
    def encode(self, frame: np.ndarray, *, bits_stored: int) -> bytes:
        """Encode one frame losslessly.  Every value must be < 2**bits_stored."""

    @abstractmethod
    def decode(
        self,
        data: bytes | bytearray | memoryview,
        *,
        rows: int | None = None,
        columns: int | None = None,
        samples_per_pixel: int | None = None,
        bits_allocated: int | None = None,
    ) -> np.ndarray:
        """Decode one frame.  Codecs whose stream carries the geometry (JPEG-LS) may ignore
        the keyword arguments, but must check them against the stream when given."""
