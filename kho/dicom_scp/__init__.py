"""The DIMSE front door (pynetdicom, plus kho's fast C-STORE path): a thin adapter from
DIMSE events to the archive's services, behind the access checks of kho.dicom_scp.door.
Imports kho.access, kho.archive, codecs, storage, errors; never another front door."""
