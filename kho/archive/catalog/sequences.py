"""Sequences the catalog keeps, for C-FIND / QIDO-RS sequence matching (PS3.4 C.2.2.2.6).

Each catalogued sequence belongs to one level and keeps a few attributes of each item, in
the columns v1..v4 of ``sequence_items`` (owner: the patient key, Study or Series Instance
UID).  A query gives a sequence one item of keys: an owner matches when any stored item
matches every non-universal key of that item; the items returned are those that match,
with the keys asked for (all the catalogued ones when the query item is empty).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: more items than this per sequence are not catalogued (the instance is stored whole)
MAX_ITEMS = 16
#: characters kept of each item value (LO is 64)
MAX_VALUE = 64


@dataclass(frozen=True, slots=True)
class CataloguedSequence:
    keyword: str
    level: str  # PATIENT | STUDY | SERIES
    items: tuple[str, ...]  # item keywords, in the order of the columns v1..v4


SEQUENCES: dict[str, CataloguedSequence] = {
    s.keyword: s
    for s in (
        # other identifiers of the patient in other systems (EMR, other hospitals)
        CataloguedSequence(
            "OtherPatientIDsSequence",
            "PATIENT",
            ("PatientID", "IssuerOfPatientID", "TypeOfPatientID"),
        ),
        # what was done: the procedure codes a study was performed for
        CataloguedSequence(
            "ProcedureCodeSequence",
            "STUDY",
            ("CodeValue", "CodingSchemeDesignator", "CodingSchemeVersion", "CodeMeaning"),
        ),
        # which order (requested procedure, scheduled step) a series fulfils
        CataloguedSequence(
            "RequestAttributesSequence",
            "SERIES",
            (
                "RequestedProcedureID",
                "ScheduledProcedureStepID",
                "ScheduledProcedureStepDescription",
            ),
        ),
    )
}
COLUMNS = ("v1", "v2", "v3", "v4")

Items = list[tuple[str, ...]]


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        value = "\\".join(str(v) for v in value)
    return str(value).strip().replace("\x00", "")[:MAX_VALUE]


def extract_sequences(ds: Any) -> dict[str, Items]:
    """The catalogued sequences present in a dataset, as rows of item values."""
    out: dict[str, Items] = {}
    for seq in SEQUENCES.values():
        try:
            if seq.keyword not in ds or ds[seq.keyword].VR != "SQ":
                continue
            rows: Items = []
            for item in list(ds[seq.keyword].value or [])[:MAX_ITEMS]:
                rows.append(tuple(_text(item.get(keyword)) for keyword in seq.items))
        except Exception:  # a malformed sequence is not catalogued; the bytes are kept
            continue
        out[seq.keyword] = rows
    return out


def query_item(seq: CataloguedSequence, raw: Any) -> dict[str, str]:
    """The query's item for a sequence key: {} (universal) or item keyword -> value."""
    from kho.errors import QueryError

    if raw is None or raw == "" or raw == []:
        return {}
    if not isinstance(raw, Mapping):
        raise QueryError(f"{seq.keyword} is a sequence: give it one item of keys")
    item: dict[str, str] = {}
    for keyword, value in raw.items():
        if keyword not in seq.items:
            raise QueryError(
                f"{seq.keyword} items are matched on {', '.join(seq.items)}, not {keyword}"
            )
        item[keyword] = _text(value)
    return item


def value_matches(pattern: str, value: str) -> bool:
    """C-FIND single value, wildcard and list matching for one text value."""
    alternatives = [p.strip() for p in pattern.split("\\") if p.strip()]
    if not alternatives or "*" in alternatives:
        return True
    for alt in alternatives:
        if "*" in alt or "?" in alt:
            escaped = "".join("[[]" if c == "[" else c for c in alt)
            if fnmatch.fnmatchcase(value, escaped):
                return True
        elif value == alt:
            return True
    return False


def matching_items(
    seq: CataloguedSequence, rows: Items, item: Mapping[str, str]
) -> list[dict[str, str]]:
    """The stored items that match the query item, with the keys it asks for."""
    wanted = list(item) or list(seq.items)
    out = []
    for row in rows:
        values = dict(zip(seq.items, row, strict=False))
        if all(value_matches(pattern, values.get(k, "")) for k, pattern in item.items()):
            out.append({k: values.get(k, "") for k in wanted})
    return out
