"""The read flow: from a catalog record to bytes (as received, bit for bit),
frames (stored or decoded), transcoded instances and rendered images.  Imports dataset,
catalog, codecs, storage."""
