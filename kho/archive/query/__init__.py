"""The matching engine of C-FIND and QIDO-RS (PS3.4 C.2.2.2) over the catalog.
Imports the catalog only."""
