"""The HL7 v2 door: an MLLP listener taking the hospital information system's patients
(ADT) and orders (ORM, OMI) into the archive's services, one acknowledgement a message."""
