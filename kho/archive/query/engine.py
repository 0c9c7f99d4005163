"""The matching engine shared by C-FIND (dicom_scp) and QIDO-RS (viewer_api).

Filters use C-FIND value semantics (PS3.4 C.2.2.2): single value, universal (empty or
``*``), wildcard (``*`` ``?``), date and time ranges (``A-``, ``-B``, ``A-B``), lists of
values (``a\\b`` or a Python list; the list matching of UIDs, and any-of for the other
keys, since a backslash cannot occur inside one DICOM value).  Every value becomes a bound
parameter; the SQL is the same for SQLite and PostgreSQL.

Dates and times (DA, TM) are compared as dates and times, not as text:

- A query date must be a calendar date ``YYYYMMDD``; a query time ``HH[MM[SS[.F{1,6}]]]``
  (the ACR-NEMA form ``HH:MM[:SS[.F]]`` is accepted too) with HH <= 23, MM <= 59,
  SS <= 60 (leap second).  Anything else, and a range that starts after it ends (a time
  range cannot cross midnight, PS3.4 C.2.2.2.5), is a QueryError.
- A time with missing trailing components denotes the span it covers: ``1015`` is
  10:15:00 to 10:15:59.999999, ``10`` is 10:00:00 to 10:59:59.999999 (a leap second 60
  included).  That holds for query bounds (a lower bound starts at the start of its span,
  an upper bound ends at the end of its span, so ``-1000`` includes 10:00:30) and for
  stored values.
- A stored time matches when its span overlaps the query's span (range-overlap matching,
  as dcm4chee and Orthanc users expect): a stored ``1015`` matches ``101500-101530``, a
  stored ``10`` matches ``100000-110000`` and also ``0900-1000`` (whose upper bound
  10:00-10:00:59 lies inside 10:00-10:59).  Stored ACR-NEMA times (``10:15:30``) compare
  the same.  An empty stored value matches no range.
- Stored dates compare whole: ``YYYYMMDD`` and the ACR-NEMA ``YYYY.MM.DD`` of old files.
- StudyDate and StudyTime ranges in one query are matched independently (PS3.4
  C.2.2.2.5 without extended negotiation; combined date-time matching is not offered).

The SQL stays index-friendly on both engines, with no schema of its own: date bounds are
sargable comparisons on the stored text (one branch per stored form); a stored time,
colons removed, is compared with fully padded bounds (its start is at most the query's
end exactly when its text is, and its end at least the query's start exactly when its
text is at least the query start cut to its length), after an hour-prefix comparison that
the (date, time) index can use.  Every comparison is between strings of one layout, so
the result does not depend on the database collation.

Lists are bounded: at most MAX_VALUES_PER_KEY distinct values for one key (repeated
values are folded) and MAX_VALUES_PER_QUERY for all keys together; more is a QueryError.
Equal-value alternatives become one ``IN``; other alternatives are OR-ed as a balanced
tree, so no list reaches SQLite's expression depth limit (1000).

Results are dicts keyword -> value ('' for empty, int for counts and numbers): the return
keys asked for plus the unique keys of the level and, as the information model requires,
of the levels above.

A patient is found by any of its identifiers: an exact (wildcard-free) Patient ID value
matches the patient's own Patient ID, the identifiers the hospital information system
gave it (its 12-digit citizen ID, IDs a merge or a change of identifier replaced:
``patient_identifiers``) and the Other Patient IDs its instances carry; with Issuer of
Patient ID the issuer must match as well.  So a citizen ID finds the person's studies
under every local Patient ID of the hospital (the tenant's catalog: never another's).
The Patient ID returned is the local one.  Other Patient IDs Sequence matching and
results include the HIS's identifiers too.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kho.archive.catalog import INSTANCE_COLUMNS, Catalog, InstanceRecord, fold_name
from kho.archive.catalog.sequences import COLUMNS, SEQUENCES, matching_items, query_item
from kho.errors import QueryError

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
MODELS = ("PATIENT", "STUDY")
UNIQUE_KEY = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}
#: keys that carry no matching (the C-FIND adapter and QIDO handle them); ignored here
IGNORED_KEYS = frozenset(
    {"QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle", "TimezoneOffsetFromUTC"}
)

#: the most distinct values one key may carry (a UID list, QIDO's repeated keys)
MAX_VALUES_PER_KEY = 1000
#: the most values of all keys of one query together: keeps the bound parameters (at most
#: 4 a value) below SQLite's default 32766 and PostgreSQL's 65535
MAX_VALUES_PER_QUERY = 4000

_ESCAPE = "!"  # LIKE escape character: ASCII so SQLite's LIKE optimisation still applies
#: the sequence whose items the HIS's patient identifiers extend (patient_identifiers)
OTHER_PATIENT_IDS = "OtherPatientIDsSequence"
#: patient_identifiers as Other Patient IDs items (owner, v1..v4: see catalog.sequences)
_IDENTIFIER_ITEMS = (
    "(SELECT patient_key AS owner, identifier AS v1, issuer AS v2, 'TEXT' AS v3, '' AS v4 "
    "FROM patient_identifiers)"
)
_DATE = re.compile(r"^(\d{4})(\d{2})(\d{2})$")
_TIME = re.compile(r"^(\d{2})(?:(\d{2})(?:(\d{2})(?:\.(\d{1,6}))?)?)?$")
_ACR_NEMA_TIME = re.compile(r"^(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,6}))?)?$")
_INT = re.compile(r"^[+-]?\d+$")
_INT64 = 1 << 63  # the engines' integers are 64-bit: |values| below this
_UID = re.compile(r"^[0-9A-Za-z._-]{1,64}$")


@dataclass(frozen=True, slots=True)
class _Attribute:
    keyword: str
    level: str  # the level the attribute belongs to
    column: str  # SQL expression (alias.column) or "" for derived attributes
    kind: str  # text | pn | uid | date | time | int | count | modalities | derived | sequence
    folded: str = ""  # SQL expression for case-insensitive person-name matching


_A = _Attribute
_ATTRIBUTES: dict[str, _Attribute] = {
    a.keyword: a
    for a in (
        # patient (alias p)
        _A("PatientID", "PATIENT", "p.patient_id", "text"),
        _A("IssuerOfPatientID", "PATIENT", "p.issuer_of_patient_id", "text"),
        _A("PatientName", "PATIENT", "p.patient_name", "pn", "p.patient_name_folded"),
        _A("PatientBirthDate", "PATIENT", "p.patient_birth_date", "date"),
        _A("PatientSex", "PATIENT", "p.patient_sex", "text"),
        _A("NumberOfPatientRelatedStudies", "PATIENT", "p.num_studies", "count"),
        _A(
            "NumberOfPatientRelatedSeries",
            "PATIENT",
            "(SELECT COALESCE(SUM(x.num_series), 0) FROM studies x "
            "WHERE x.patient_key = p.patient_key)",
            "count",
        ),
        _A(
            "NumberOfPatientRelatedInstances",
            "PATIENT",
            # plus what PostgreSQL ingests have not folded in yet (Catalog.fold_counters)
            "(p.num_instances + COALESCE((SELECT SUM(d.delta) FROM instance_deltas d "
            "WHERE d.patient_key = p.patient_key), 0))",
            "count",
        ),
        # study (alias s)
        _A("StudyInstanceUID", "STUDY", "s.study_uid", "uid"),
        _A("StudyDate", "STUDY", "s.study_date", "date"),
        _A("StudyTime", "STUDY", "s.study_time", "time"),
        _A("AccessionNumber", "STUDY", "s.accession_number", "text"),
        _A("StudyID", "STUDY", "s.study_id", "text"),
        _A("StudyDescription", "STUDY", "s.study_description", "text"),
        _A(
            "ReferringPhysicianName",
            "STUDY",
            "s.referring_physician_name",
            "pn",
            "UPPER(s.referring_physician_name)",
        ),
        _A("ModalitiesInStudy", "STUDY", "s.modalities_in_study", "modalities"),
        _A("NumberOfStudyRelatedSeries", "STUDY", "s.num_series", "count"),
        _A(
            "NumberOfStudyRelatedInstances",
            "STUDY",
            # plus what PostgreSQL ingests have not folded in yet (Catalog.fold_counters)
            "(s.num_instances + COALESCE((SELECT SUM(d.delta) FROM instance_deltas d "
            "WHERE d.study_uid = s.study_uid), 0))",
            "count",
        ),
        _A("SOPClassesInStudy", "STUDY", "", "derived"),
        # series (alias r)
        _A("SeriesInstanceUID", "SERIES", "r.series_uid", "uid"),
        _A("Modality", "SERIES", "r.modality", "text"),
        _A("SeriesNumber", "SERIES", "r.series_number", "int"),
        _A("SeriesDescription", "SERIES", "r.series_description", "text"),
        _A("BodyPartExamined", "SERIES", "r.body_part_examined", "text"),
        _A("SeriesDate", "SERIES", "r.series_date", "date"),
        _A("SeriesTime", "SERIES", "r.series_time", "time"),
        _A(
            "NumberOfSeriesRelatedInstances",
            "SERIES",
            # plus what PostgreSQL ingests have not folded in yet (Catalog.fold_counters)
            "(r.num_instances + COALESCE((SELECT SUM(d.delta) FROM instance_deltas d "
            "WHERE d.series_uid = r.series_uid), 0))",
            "count",
        ),
        # instance (alias i)
        _A("SOPInstanceUID", "IMAGE", "i.sop_uid", "uid"),
        _A("SOPClassUID", "IMAGE", "i.sop_class_uid", "uid"),
        _A("InstanceNumber", "IMAGE", "i.instance_number", "int"),
        _A("Rows", "IMAGE", "i.rows_", "int"),
        _A("Columns", "IMAGE", "i.columns_", "int"),
        _A("NumberOfFrames", "IMAGE", "i.number_of_frames", "int"),
        _A("BitsAllocated", "IMAGE", "i.bits_allocated", "int"),
        _A("BitsStored", "IMAGE", "i.bits_stored", "int"),
        _A("SamplesPerPixel", "IMAGE", "i.samples_per_pixel", "int"),
        _A("PhotometricInterpretation", "IMAGE", "i.photometric_interpretation", "text"),
        _A("ContentDate", "IMAGE", "i.content_date", "date"),
        _A("ContentTime", "IMAGE", "i.content_time", "time"),
        _A("AvailableTransferSyntaxUID", "IMAGE", "i.transfer_syntax_uid", "uid"),
        # sequences (kho.archive.catalog.sequences); the column is the items' owner
        _A("OtherPatientIDsSequence", "PATIENT", "p.patient_key", "sequence"),
        _A("ProcedureCodeSequence", "STUDY", "s.study_uid", "sequence"),
        _A("RequestAttributesSequence", "SERIES", "r.series_uid", "sequence"),
    )
}
assert all(a.keyword in SEQUENCES for a in _ATTRIBUTES.values() if a.kind == "sequence")

# below the study level the study and series UIDs are read from the lowest table, so a
# query "series of study X" uses the series index without joining studies at all
_LOWEST_COLUMN = {
    ("SERIES", "StudyInstanceUID"): "r.study_uid",
    ("IMAGE", "StudyInstanceUID"): "i.study_uid",
    ("IMAGE", "SeriesInstanceUID"): "i.series_uid",
    ("SERIES", "ProcedureCodeSequence"): "r.study_uid",
    ("IMAGE", "ProcedureCodeSequence"): "i.study_uid",
    ("IMAGE", "RequestAttributesSequence"): "i.series_uid",
}

_BASE_TABLE = {
    "PATIENT": ("patients p", "p.patient_key"),
    "STUDY": ("studies s", "s.study_uid"),
    "SERIES": ("series r", "r.series_uid"),
    "IMAGE": ("instances i", "i.sop_uid"),
}


def _level_index(level: str) -> int:
    return LEVELS.index(level)


def _check_level(level: str) -> str:
    normal = str(level).strip().upper()
    if normal not in LEVELS:
        raise QueryError(f"unsupported query level {level!r}: one of {', '.join(LEVELS)}")
    return normal


def supported_keywords(level: str) -> set[str]:
    """Keywords matchable and returnable at ``level`` (its own and the levels above)."""
    depth = _level_index(_check_level(level))
    return {k for k, a in _ATTRIBUTES.items() if _level_index(a.level) <= depth}


def unique_keys(level: str, model: str = "STUDY") -> list[str]:
    """The unique keys a result at ``level`` carries, highest level first."""
    level = _check_level(level)
    model = _check_model(model)
    first = 0 if model == "PATIENT" else 1
    return [UNIQUE_KEY[name] for name in LEVELS[first : _level_index(level) + 1]] or [
        UNIQUE_KEY[level]
    ]


def _check_model(model: str) -> str:
    normal = str(model).strip().upper()
    if normal not in MODELS:
        raise QueryError(f"unsupported information model {model!r}: PATIENT or STUDY")
    return normal


def _values(value: str | Sequence[str] | None) -> list[str]:
    """The distinct alternatives of one filter value, in order; [] means universal matching.

    NUL characters are dropped, as ingest drops them from the values it catalogues (and
    PostgreSQL refuses them in text); a lone surrogate, which no stored text holds, is a
    QueryError."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            item = str(item)
        if not item.isascii():
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise QueryError(f"{item!r} is not text (a lone surrogate)") from None
        out.extend(part.strip() for part in item.replace("\x00", "").split("\\"))
    out = [v for v in out if v != ""]
    # a lone '*' is universal matching (PS3.4 C.2.2.2.4)
    if not out or any(v == "*" for v in out):
        return []
    return list(dict.fromkeys(out))  # a repeated value is one alternative


def _like_pattern(value: str) -> str:
    escaped = (
        value.replace(_ESCAPE, _ESCAPE * 2).replace("%", _ESCAPE + "%").replace("_", _ESCAPE + "_")
    )
    return escaped.replace("*", "%").replace("?", "_")


def _has_wildcard(value: str) -> bool:
    return "*" in value or "?" in value


# --- dates and times ------------------------------------------------------------------


def _date(keyword: str, text: str) -> str:
    """A query date checked: 'YYYYMMDD' naming a day of the calendar."""
    found = _DATE.match(text)
    if found:
        try:
            datetime.date(*(int(part) for part in found.groups()))
        except ValueError:
            found = None
    if not found:
        raise QueryError(f"{keyword}: {text!r} is not a valid date (YYYYMMDD)")
    return text


def _dotted_date(date: str) -> str:
    """The ACR-NEMA form of a checked date, as old files carry it: 'YYYY.MM.DD'."""
    return f"{date[:4]}.{date[4:6]}.{date[6:]}"


def _time(keyword: str, text: str) -> tuple[str, str]:
    """A query time checked, as the first and the last instant of the span it denotes,
    both 'HHMMSS.FFFFFF': '1015' -> ('101500.000000', '101560.999999')."""
    found = _TIME.match(text) or _ACR_NEMA_TIME.match(text)
    hours, minutes, seconds, fraction = found.groups() if found else ("99", None, None, None)
    if int(hours) > 23 or int(minutes or 0) > 59 or int(seconds or 0) > 60:
        raise QueryError(f"{keyword}: {text!r} is not a valid time (HHMMSS.FFFFFF)")
    # an upper end of '60' seconds keeps a stored leap second (PS3.5: SS is 00-60) inside
    start = f"{hours}{minutes or '00'}{seconds or '00'}.{(fraction or '').ljust(6, '0')}"
    end = f"{hours}{minutes or '59'}{seconds or '60'}.{(fraction or '').ljust(6, '9')}"
    return start, end


def _bounds(keyword: str, value: str) -> tuple[str, str]:
    """The two sides of a range value (either may be ''); QueryError if malformed."""
    low, _, high = value.partition("-")
    if (not low and not high) or "-" in high:
        raise QueryError(f"{keyword}: malformed range {value!r}")
    return low.strip(), high.strip()


def _date_condition(column: str, low: str, high: str) -> tuple[str, list[Any]]:
    """Stored dates in [low, high] ('' = open): one sargable branch per stored form, each
    comparing strings of one layout ('YYYYMMDD' with 'YYYYMMDD', 'YYYY.MM.DD' with
    'YYYY.MM.DD'), which order as the dates do under any collation."""
    branches: list[str] = []
    params: list[Any] = []
    for form, convert in (
        (f"LENGTH({column}) = 8", lambda d: d),
        (f"{column} LIKE '____.__.__'", _dotted_date),
    ):
        parts = []
        if low:
            parts.append(f"{column} >= ?")
            params.append(convert(low))
        if high:
            parts.append(f"{column} <= ?")
            params.append(convert(high))
        branches.append("(" + " AND ".join([*parts, form]) + ")")
    return "(" + " OR ".join(branches) + ")", params


def _time_condition(column: str, start: str, end: str) -> tuple[str, list[Any]]:
    """Stored times whose span overlaps [start, end] (full 'HHMMSS.FFFFFF'; '' = open).

    With ``t`` the stored text without colons: its first instant (``t`` padded with zeros)
    is at most ``end`` exactly when ``t <= end``; its last instant (``t`` padded with the
    largest digits) is at least ``start`` exactly when ``t`` is at least ``start`` cut to
    the length of ``t``.  The comparisons on the hours before them are implied by those
    and are what an index on the column can narrow."""
    digits = f"REPLACE({column}, ':', '')"
    parts = [f"{column} <> ''"]
    params: list[Any] = []
    if start:
        parts.append(f"{column} >= ?")
        params.append(start[:2])
    if end and end[:2] < "23":
        parts.append(f"{column} < ?")
        params.append(f"{int(end[:2]) + 1:02d}")
    if end:
        parts.append(f"{digits} <= ?")
        params.append(end)
    if start:
        parts.append(f"{digits} >= SUBSTR(?, 1, LENGTH({digits}))")
        params.append(start)
    return " AND ".join(parts), params


@dataclass(frozen=True, slots=True)
class _Equal:
    """Alternatives that are equality with one of these values (folded into one IN)."""

    values: tuple[Any, ...]


def _any_of(
    column: str, alternatives: Sequence[_Equal | tuple[str, list[Any]]]
) -> tuple[str, list[Any]]:
    """One condition true when any alternative is: the equalities as one ``IN``, the rest
    OR-ed as a balanced tree (depth log2(n), far from SQLite's limit of 1000)."""
    equal = list(dict.fromkeys(v for a in alternatives if isinstance(a, _Equal) for v in a.values))
    conditions = [a for a in alternatives if not isinstance(a, _Equal)]
    if len(equal) == 1:
        conditions.insert(0, (f"{column} = ?", equal))
    elif equal:
        marks = ", ".join("?" for _ in equal)
        conditions.insert(0, (f"{column} IN ({marks})", equal))

    def tree(items: Sequence[tuple[str, list[Any]]]) -> str:
        if len(items) == 1:
            return items[0][0]
        middle = len(items) // 2
        return f"(({tree(items[:middle])}) OR ({tree(items[middle:])}))"

    return tree(conditions), [p for _sql, params in conditions for p in params]


class _Compiler:
    """Builds one parameterised WHERE clause."""

    def __init__(self, level: str, fuzzy_names: bool) -> None:
        self.level = level
        self.fuzzy_names = fuzzy_names
        self.clauses: list[str] = []
        self.params: list[Any] = []
        self.aliases: set[str] = set()
        self.study_column = ""  # where StudyInstanceUID is matched, if not the default
        self.value_count = 0  # values of every key so far (MAX_VALUES_PER_QUERY)

    def column(self, attr: _Attribute, *, matching: bool = False) -> str:
        expr = _LOWEST_COLUMN.get((self.level, attr.keyword), attr.column)
        if matching and attr.keyword == "StudyInstanceUID" and self.study_column:
            expr = self.study_column
        self.aliases.update(re.findall(r"\b([psri])\.", expr))
        return expr

    def _count(self, keyword: str, values: list[str]) -> None:
        if len(values) > MAX_VALUES_PER_KEY:
            raise QueryError(
                f"{keyword}: {len(values)} values, at most {MAX_VALUES_PER_KEY} per key"
            )
        self.value_count += len(values)
        if self.value_count > MAX_VALUES_PER_QUERY:
            raise QueryError(f"more than {MAX_VALUES_PER_QUERY} values in one query")

    def add(self, attr: _Attribute, raw: Any, issuer: Any = None) -> None:
        """A condition for one key; ``issuer``: the Issuer of Patient ID value that goes
        with a PatientID key (matched with it, see patient_ids)."""
        if attr.kind == "sequence":
            self._sequence(attr, raw)
            return
        if attr.keyword == "PatientID":
            key_column = "p.patient_key" if self.level == "PATIENT" else "s.patient_key"
            self.aliases.add(key_column[0])
            found = self.patient_ids(key_column, attr.column, raw, issuer)
            if found is not None:
                self.clauses.append(found[0])
                self.params.extend(found[1])
            return
        values = _values(raw)
        if not values:
            return
        if attr.kind == "derived":
            raise QueryError(f"{attr.keyword} can be returned but not matched")
        self._count(attr.keyword, values)
        column = self.column(attr, matching=True)
        if attr.kind == "pn" and self.fuzzy_names:
            column = attr.folded  # same alias as the column: already joined
        sql, params = _any_of(column, [self._one(attr, column, v) for v in values])
        self.clauses.append(sql)
        self.params.extend(params)

    def condition(self, attr: _Attribute, column: str, raw: Any) -> tuple[str, list[Any]] | None:
        """The condition of one key on ``column`` (None: universal matching)."""
        values = _values(raw)
        if not values:
            return None
        self._count(attr.keyword, values)
        return _any_of(column, [self._one(attr, column, v) for v in values])

    def patient_ids(
        self, key_column: str, id_column: str, raw: Any, issuer: Any = None
    ) -> tuple[str, list[Any]] | None:
        """Patient ID matching (with its issuer, if given) over every identifier of a
        patient: ``key_column`` (a patient_key column) in the patients whose own ID,
        HIS identifier or catalogued Other Patient ID matches.  Wildcard values match the
        own Patient ID only (``id_column``: the patients and the HIS's patients); None:
        universal matching."""
        ids = _values(raw)
        if not ids:
            return None
        text = _Attribute("PatientID", "PATIENT", id_column, "text")
        issuer_attr = _Attribute("IssuerOfPatientID", "PATIENT", "", "text")
        exact = [v for v in ids if not _has_wildcard(v)]
        if not exact:  # no identifier lookup: the own Patient ID as any text key
            own = self.condition(text, id_column, ids)
            assert own is not None
            issuer_condition = self.condition(
                issuer_attr, id_column.replace("patient_id", "issuer_of_patient_id"), issuer
            )
            if issuer_condition is None:
                return own
            return f"({own[0]}) AND ({issuer_condition[0]})", own[1] + issuer_condition[1]
        branches: list[str] = []
        params: list[Any] = []
        for table, id_col, issuer_col, extra in (
            ("patients x", "x.patient_id", "x.issuer_of_patient_id", ""),
            # the HIS's patients, those without images too (the worklist's)
            ("his_patients x", "x.patient_id", "x.issuer_of_patient_id", ""),
            ("patient_identifiers x", "x.identifier", "x.issuer", ""),
            ("sequence_items x", "x.v1", "x.v2", "x.sequence = ?"),
        ):
            key = "x.owner" if table.startswith("sequence_items") else "x.patient_key"
            values = ids if table.startswith(("patients", "his_patients")) else exact
            parts: list[str] = []
            part_params: list[Any] = []
            if extra:
                parts.append(extra)
                part_params.append(OTHER_PATIENT_IDS)
            found = self.condition(text, id_col, values)
            assert found is not None
            parts.append(f"({found[0]})")
            part_params += found[1]
            issuer_condition = self.condition(issuer_attr, issuer_col, issuer)
            if issuer_condition is not None:
                parts.append(f"({issuer_condition[0]})")
                part_params += issuer_condition[1]
            branches.append(f"SELECT {key} FROM {table} WHERE {' AND '.join(parts)}")
            params += part_params
        return f"{key_column} IN ({' UNION '.join(branches)})", params

    def _one(self, attr: _Attribute, column: str, value: str) -> _Equal | tuple[str, list[Any]]:
        kind = attr.kind
        if kind == "uid":
            if _has_wildcard(value) or not _UID.match(value):
                raise QueryError(f"{attr.keyword}: {value!r} is not a UID (no wildcards in UIDs)")
            return _Equal((value,))
        if kind in ("int", "count"):
            if not _INT.match(value):
                raise QueryError(f"{attr.keyword}: {value!r} is not an integer")
            # the engines bind 64-bit integers (and int() refuses thousands of digits)
            digits = value.strip().lstrip("+-").lstrip("0")
            number = int(value) if len(digits) <= 19 else _INT64
            if not -_INT64 <= number < _INT64:
                raise QueryError(f"{attr.keyword}: {value[:40]!r} is beyond 64-bit integers")
            return _Equal((number,))
        if kind == "date":
            return self._date(attr.keyword, column, value)
        if kind == "time":
            return self._time(attr.keyword, column, value)
        if kind == "modalities":
            return self._modality(column, value)
        if kind == "pn" and self.fuzzy_names:
            value = fold_name(value)
        if _has_wildcard(value):
            return f"{column} LIKE ? ESCAPE '{_ESCAPE}'", [_like_pattern(value)]
        return _Equal((value,))

    @staticmethod
    def _date(keyword: str, column: str, value: str) -> _Equal | tuple[str, list[Any]]:
        if "-" not in value:
            date = _date(keyword, value)
            return _Equal((date, _dotted_date(date)))
        low, high = _bounds(keyword, value)
        low = _date(keyword, low) if low else ""
        high = _date(keyword, high) if high else ""
        if low and high and low > high:
            raise QueryError(f"{keyword}: range {value!r} starts after it ends")
        return _date_condition(column, low, high)

    @staticmethod
    def _time(keyword: str, column: str, value: str) -> tuple[str, list[Any]]:
        if "-" not in value:
            return _time_condition(column, *_time(keyword, value))
        low, high = _bounds(keyword, value)
        start = _time(keyword, low)[0] if low else ""
        end = _time(keyword, high)[1] if high else ""
        if start and end and start > end:
            raise QueryError(f"{keyword}: range {value!r} starts after it ends")
        return _time_condition(column, start, end)

    def _sequence(self, attr: _Attribute, raw: Any) -> None:
        """Sequence matching: an item of the owner matches every key of the query item."""
        seq = SEQUENCES[attr.keyword]
        item = query_item(seq, raw)
        conditions: list[str] = []
        params: list[Any] = [attr.keyword]
        for keyword, value in item.items():
            values = _values(value)
            if not values:
                continue  # universal within the item: returned, not matched
            self._count(f"{attr.keyword}.{keyword}", values)
            column = f"q.{COLUMNS[seq.items.index(keyword)]}"
            inner = _Attribute(keyword, attr.level, column, "text")
            sql, alt_params = _any_of(column, [self._one(inner, column, v) for v in values])
            conditions.append(f"({sql})")
            params.extend(alt_params)
        if not conditions:
            return  # an empty item: every owner matches (the items are returned)
        owner = self.column(attr)
        clause = (
            f"EXISTS (SELECT 1 FROM sequence_items q WHERE q.owner = {owner} "
            f"AND q.sequence = ? AND {' AND '.join(conditions)})"
        )
        if attr.keyword == OTHER_PATIENT_IDS:  # and the HIS's identifiers of the patient
            clause = (
                f"({clause} OR EXISTS (SELECT 1 FROM {_IDENTIFIER_ITEMS} q "
                f"WHERE q.owner = {owner} AND {' AND '.join(conditions)}))"
            )
            params = params + params[1:]
        self.clauses.append(clause)
        self.params.extend(params)

    def _modality(self, column: str, value: str) -> tuple[str, list[Any]]:
        # modalities_in_study holds 'CT\\MR' (sorted, no duplicates): match one element
        pattern = _like_pattern(value)
        like = f"{column} LIKE ? ESCAPE '{_ESCAPE}'"
        return (
            f"({column} = ? OR {like} OR {like} OR {like})",
            [value, pattern + "\\%", "%\\" + pattern, "%\\" + pattern + "\\%"],
        )


def _from_clause(level: str, aliases: set[str]) -> str:
    base, _key = _BASE_TABLE[level]
    joins: list[str] = [base]
    if level == "PATIENT":
        return base
    if level == "STUDY":
        if "p" in aliases:
            joins.append("JOIN patients p ON p.patient_key = s.patient_key")
        return " ".join(joins)
    if level == "SERIES":
        if "s" in aliases or "p" in aliases:
            joins.append("JOIN studies s ON s.study_uid = r.study_uid")
        if "p" in aliases:
            joins.append("JOIN patients p ON p.patient_key = s.patient_key")
        return " ".join(joins)
    if "r" in aliases:
        joins.append("JOIN series r ON r.series_uid = i.series_uid")
    if "s" in aliases or "p" in aliases:
        joins.append("JOIN studies s ON s.study_uid = i.study_uid")
    if "p" in aliases:
        joins.append("JOIN patients p ON p.patient_key = s.patient_key")
    return " ".join(joins)


def _attribute(keyword: str, level: str) -> _Attribute:
    attr = _ATTRIBUTES.get(keyword)
    if attr is None:
        raise QueryError(f"unsupported attribute {keyword!r}")
    if _level_index(attr.level) > _level_index(level):
        raise QueryError(f"{keyword} is a {attr.level} attribute: not at the {level} level")
    return attr


def _compile(
    level: str, filters: Mapping[str, str | list[str] | None], fuzzy_names: bool
) -> _Compiler:
    compiler = _Compiler(level, fuzzy_names)
    if level == "IMAGE" and _values(filters.get("SeriesInstanceUID")):
        # the series decides: match the study through the series row (its primary key),
        # so the planner walks the series' instances, not every instance of the study
        compiler.study_column = "r.study_uid"
    issuer = filters.get("IssuerOfPatientID") if _values(filters.get("PatientID")) else None
    for keyword, value in filters.items():
        if keyword in IGNORED_KEYS:
            continue
        if keyword == "IssuerOfPatientID" and issuer is not None:
            _attribute(keyword, level)
            continue  # matched with the Patient ID (patient_ids)
        compiler.add(_attribute(keyword, level), value, issuer if keyword == "PatientID" else None)
    return compiler


def find(
    catalog: Catalog,
    level: str,
    filters: Mapping[str, str | list[str] | None],
    *,
    return_keys: Sequence[str] = (),
    model: str = "STUDY",
    fuzzy_names: bool = False,
    limit: int | None = None,
    offset: int = 0,
) -> Iterator[dict[str, Any]]:
    """Matches at ``level`` as dicts keyword -> value, streamed from the catalog.

    ``filters`` keys are DICOM keywords of the level or the levels above; their values use
    C-FIND semantics (empty/None is universal matching: the key is returned).  Results are
    ordered (by the level's unique key) only when ``limit`` or ``offset`` is given, for
    stable pages.  Raises QueryError for unsupported levels, keywords or malformed values
    (before the first result, since the query is compiled eagerly).
    """
    level = _check_level(level)
    model = _check_model(model)
    if (limit is not None and limit < 0) or offset < 0:
        raise QueryError("limit and offset must not be negative")
    if (limit is not None and limit >= _INT64) or offset >= _INT64:
        raise QueryError(f"limit and offset must be below {_INT64}")
    compiler = _compile(level, filters, fuzzy_names)
    wanted: list[str] = []
    for keyword in [*unique_keys(level, model), *filters.keys(), *return_keys]:
        if keyword in IGNORED_KEYS or keyword in wanted:
            continue
        _attribute(keyword, level)
        wanted.append(keyword)
    selected = [k for k in wanted if _ATTRIBUTES[k].kind not in ("derived", "sequence")]
    derived = [k for k in wanted if _ATTRIBUTES[k].kind == "derived"]
    sequences = {
        k: query_item(SEQUENCES[k], filters.get(k))
        for k in wanted
        if _ATTRIBUTES[k].kind == "sequence"
    }
    select = [compiler.column(_ATTRIBUTES[k]) for k in selected]
    study_column = ""
    if derived:
        study_column = compiler.column(_ATTRIBUTES["StudyInstanceUID"])
        select.append(study_column)
    select += [compiler.column(_ATTRIBUTES[k]) for k in sequences]  # their owners
    where = " AND ".join(compiler.clauses) or "1 = 1"
    sql = f"SELECT {', '.join(select)} FROM {_from_clause(level, compiler.aliases)} WHERE {where}"
    params = list(compiler.params)
    if limit is not None or offset:
        sql += f" ORDER BY {_BASE_TABLE[level][1]}"
        sql += " LIMIT ? OFFSET ?"
        params += [limit if limit is not None else -1 if catalog.dialect == "sqlite" else None]
        params.append(offset)
    return _rows(catalog, sql, params, selected, derived, sequences)


def _rows(
    catalog: Catalog,
    sql: str,
    params: list[Any],
    selected: list[str],
    derived: list[str],
    sequences: dict[str, dict[str, str]],
) -> Iterator[dict[str, Any]]:
    cursor = catalog.execute(sql, params)
    while True:
        rows = cursor.fetchmany(256)
        if not rows:
            return
        for row in rows:
            result = {k: ("" if v is None else v) for k, v in zip(selected, row, strict=False)}
            if derived:
                study_uid = row[len(selected)]
                for keyword in derived:
                    result[keyword] = _derived(catalog, keyword, study_uid)
            owners = row[len(selected) + (1 if derived else 0) :]
            for (keyword, item), owner in zip(sequences.items(), owners, strict=True):
                seq = SEQUENCES[keyword]
                stored = _sequence_rows(catalog, str(owner), keyword)
                result[keyword] = matching_items(seq, stored, item)
            yield result


def _sequence_rows(catalog: Catalog, owner: str, keyword: str) -> list[tuple[str, ...]]:
    """The catalogued items of a sequence; for Other Patient IDs also the HIS's
    identifiers of the patient not among them."""
    stored = catalog.sequence_rows(owner, keyword)
    if keyword != OTHER_PATIENT_IDS:
        return stored
    known = {row[:2] for row in stored}
    for identifier, issuer in catalog.fetchall(
        "SELECT identifier, issuer FROM patient_identifiers WHERE patient_key = ? "
        "ORDER BY origin, identifier",
        (owner,),
    ):
        if (identifier, issuer) not in known:
            known.add((identifier, issuer))
            stored.append((identifier, issuer, "TEXT", ""))
    return stored


def patient_condition(
    key_column: str, id_column: str, patient_id: Any, issuer: Any = None
) -> tuple[str, list[Any]] | None:
    """The condition matching a Patient ID (and Issuer of Patient ID) value over every
    identifier of a patient, for other tables holding a patient_key (the worklist):
    ``key_column`` names that column, ``id_column`` the Patient ID to match wildcards on.
    None: universal matching."""
    return _Compiler("STUDY", False).patient_ids(key_column, id_column, patient_id, issuer)


def key_condition(
    keyword: str,
    column: str,
    kind: str,
    value: Any,
    *,
    folded: str = "",
    fuzzy_names: bool = False,
) -> tuple[str, list[Any]] | None:
    """The C-FIND condition of one key on any column (``kind``: text, pn, uid, date,
    time, int), with the engine's value semantics, for other tables (the worklist).
    ``folded``: for pn, the upper-cased column that fuzzy matching compares.  None:
    universal matching; QueryError for a malformed value."""
    compiler = _Compiler("STUDY", fuzzy_names)
    attr = _Attribute(keyword, "STUDY", column, kind, folded)
    if kind == "pn" and fuzzy_names and folded:
        column = folded
    return compiler.condition(attr, column, value)


def _derived(catalog: Catalog, keyword: str, study_uid: str) -> str:
    if keyword == "SOPClassesInStudy":
        rows = catalog.fetchall(
            "SELECT DISTINCT sop_class_uid FROM instances WHERE study_uid = ?", (study_uid,)
        )
        return "\\".join(sorted(r[0] for r in rows))
    raise QueryError(f"no derivation for {keyword}")


def count(
    catalog: Catalog,
    level: str,
    filters: Mapping[str, str | list[str] | None],
    *,
    fuzzy_names: bool = False,
) -> int:
    """How many matches ``find`` would yield (for QIDO-RS paging headers and result caps)."""
    level = _check_level(level)
    compiler = _compile(level, filters, fuzzy_names)
    where = " AND ".join(compiler.clauses) or "1 = 1"
    row = catalog.fetchone(
        f"SELECT count(*) FROM {_from_clause(level, compiler.aliases)} WHERE {where}",
        compiler.params,
    )
    return int(row[0]) if row else 0


def instances(
    catalog: Catalog,
    level: str,
    filters: Mapping[str, str | list[str] | None],
) -> list[InstanceRecord]:
    """The instance records under the matches at ``level`` (for C-MOVE, C-GET, WADO-RS),
    in series then instance number order."""
    level = _check_level(level)
    compiler = _Compiler("IMAGE", False)
    if _values(filters.get("SeriesInstanceUID")):
        compiler.study_column = "r.study_uid"
    for keyword, value in filters.items():
        if keyword in IGNORED_KEYS:
            continue
        # match the given keys at their own level, but select instances under them
        _attribute(keyword, level)
        compiler.add(_attribute(keyword, "IMAGE"), value)
    where = " AND ".join(compiler.clauses) or "1 = 1"
    columns = ", ".join(f"i.{c}" for c in INSTANCE_COLUMNS)
    rows = catalog.fetchall(
        f"SELECT {columns} FROM {_from_clause('IMAGE', compiler.aliases)} WHERE {where} "
        "ORDER BY i.series_uid, i.instance_number, i.sop_uid",
        compiler.params,
    )
    return [InstanceRecord(*r) for r in rows]


def explain(
    catalog: Catalog,
    level: str,
    filters: Mapping[str, str | list[str] | None],
    *,
    return_keys: Sequence[str] = (),
    fuzzy_names: bool = False,
) -> list[str]:
    """SQLite's query plan lines for the query ``find`` would run (benchmarks, tests)."""
    level = _check_level(level)
    compiler = _compile(level, filters, fuzzy_names)
    for keyword in return_keys:
        attr = _attribute(keyword, level)
        if attr.kind != "derived":
            compiler.column(attr)
    where = " AND ".join(compiler.clauses) or "1 = 1"
    sql = f"SELECT 1 FROM {_from_clause(level, compiler.aliases)} WHERE {where}"
    if catalog.dialect != "sqlite":
        rows = catalog.fetchall("EXPLAIN " + sql, compiler.params)
        return [str(r[0]) for r in rows]
    rows = catalog.fetchall("EXPLAIN QUERY PLAN " + sql, compiler.params)
    return [str(r[-1]) for r in rows]
