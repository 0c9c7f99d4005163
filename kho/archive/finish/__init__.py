"""The finish flow: at-rest encoding (JPEG-LS), derived objects (DICOM JSON,
thumbnail, tile pyramid) and the background finisher that switches a catalog row to them.
Imports read, dataset, catalog, codecs, storage."""
