"""The Modality Worklist: scheduled procedure steps from the HIS's orders, their matching
for the worklist C-FIND, and the performed steps (MPPS) and arrivals that end them.
Imports the catalog and the query engine's matching."""

from kho.archive.worklist.items import (
    CANCELED,
    COMPLETED,
    DISCONTINUED,
    SCHEDULED,
    STARTED,
    Code,
    OrderError,
    ScheduledStep,
    cancel,
    complete_arrived,
    schedule,
)
from kho.archive.worklist.matching import WorklistEntry, find, item_dataset
from kho.archive.worklist.mpps import MppsError, MppsFailure

__all__ = [
    "CANCELED",
    "COMPLETED",
    "DISCONTINUED",
    "SCHEDULED",
    "STARTED",
    "Code",
    "MppsError",
    "MppsFailure",
    "OrderError",
    "ScheduledStep",
    "WorklistEntry",
    "cancel",
    "complete_arrived",
    "find",
    "item_dataset",
    "schedule",
]
