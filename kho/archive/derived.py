"""Objects derived at ingest (DESIGN.md "derived"): which derivers an archive runs.

Each deriver takes (Part 10 bytes, layout, parsed header, attributes, encoded pixels) and
returns {object name: bytes}; the names become keys under the instance's prefix and are
recorded in ``instances.derived``.

- ``metadata`` (kho.archive.dicomjson): the DICOM JSON served by WADO-RS metadata;
- ``thumbnail`` (kho.archive.rendering): a JPEG of frame 1 within 128x128 pixels;
- ``tiles`` (kho.archive.rendering, ``tile_pyramid`` setting): the JPEG tile pyramid of
  frame 1 of images over 1024 pixels a side.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kho.archive.archive import Deriver
    from kho.archive.config import Settings


def default_derivers(settings: Settings) -> list[Deriver]:
    from kho.archive.dicomjson import metadata_deriver
    from kho.archive.rendering import thumbnail_deriver, tile_pyramid_deriver

    derivers: list[Deriver] = [metadata_deriver, thumbnail_deriver]
    if settings.tile_pyramid:
        derivers.append(tile_pyramid_deriver)
    return derivers
