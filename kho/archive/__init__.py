"""The archive's services, one folder per flow: ingest (received bytes -> a durable,
catalogued instance), finish (at-rest encoding, derived objects, the background finisher),
read (record -> bytes, frames, transcoded or rendered output), query (the matching engine),
over dataset (the Part 10 walk, catalog attributes) and catalog (SQL, one module per
dialect).  ``archive.Archive`` is the composition root that wires them; no flow imports it.
Imports codecs, storage and errors; never a front door."""
