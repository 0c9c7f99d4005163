"""The ingest flow: received bytes -> a durable, catalogued instance (C-STORE,
STOW-RS and kho import all come through here).  Imports finish (to encode at once when
finish_in_background is off), dataset, catalog, storage."""
