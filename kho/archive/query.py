"""The matching engine shared by C-FIND (dicom_scp) and QIDO-RS (viewer_api).

Filters use C-FIND value semantics (PS3.4 C.2.2.2): single value, universal (empty or
``*``), wildcard (``*`` ``?``), date and time ranges (``A-``, ``-B``, ``A-B``), lists of
values (``a\\b`` or a Python list; the list matching of UIDs, and any-of for the other
keys, since a backslash cannot occur inside one DICOM value).  Every value becomes a bound
parameter; the SQL is the same for SQLite and PostgreSQL.

Results are dicts keyword -> value ('' for empty, int for counts and numbers): the return
keys asked for plus the unique keys of the level and, as the information model requires,
of the levels above.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kho.archive.catalog import INSTANCE_COLUMNS, Catalog, InstanceRecord, fold_name
from kho.archive.sequences import COLUMNS, SEQUENCES, matching_items, query_item
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

_ESCAPE = "!"  # LIKE escape character: ASCII so SQLite's LIKE optimisation still applies
_DATE = re.compile(r"^\d{8}$")
_TIME = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")
_INT = re.compile(r"^[+-]?\d+$")
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
        # sequences (kho.archive.sequences); the column is the items' owner
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
    """The alternatives of one filter value; [] means universal matching."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            item = str(item)
        out.extend(part.strip() for part in item.split("\\"))
    out = [v for v in out if v != ""]
    # a lone '*' is universal matching (PS3.4 C.2.2.2.4)
    if not out or any(v == "*" for v in out):
        return []
    return out


def _like_pattern(value: str) -> str:
    escaped = (
        value.replace(_ESCAPE, _ESCAPE * 2).replace("%", _ESCAPE + "%").replace("_", _ESCAPE + "_")
    )
    return escaped.replace("*", "%").replace("?", "_")


def _has_wildcard(value: str) -> bool:
    return "*" in value or "?" in value


def _time_upper(value: str) -> str:
    """The latest time a (possibly truncated) time value stands for: '1015' -> '101559.999999'."""
    whole, _, fraction = value.partition(".")
    whole = whole + "5959"[: max(0, 6 - len(whole))]
    return f"{whole}.{fraction.ljust(6, '9')}"


class _Compiler:
    """Builds one parameterised WHERE clause."""

    def __init__(self, level: str, fuzzy_names: bool) -> None:
        self.level = level
        self.fuzzy_names = fuzzy_names
        self.clauses: list[str] = []
        self.params: list[Any] = []
        self.aliases: set[str] = set()
        self.study_column = ""  # where StudyInstanceUID is matched, if not the default

    def column(self, attr: _Attribute, *, matching: bool = False) -> str:
        expr = _LOWEST_COLUMN.get((self.level, attr.keyword), attr.column)
        if matching and attr.keyword == "StudyInstanceUID" and self.study_column:
            expr = self.study_column
        self.aliases.update(re.findall(r"\b([psri])\.", expr))
        return expr

    def add(self, attr: _Attribute, raw: Any) -> None:
        if attr.kind == "sequence":
            self._sequence(attr, raw)
            return
        values = _values(raw)
        if not values:
            return
        if attr.kind == "derived":
            raise QueryError(f"{attr.keyword} can be returned but not matched")
        column = self.column(attr, matching=True)
        alternatives = [self._one(attr, column, v) for v in values]
        if attr.kind == "uid" and all(a[0] == f"{column} = ?" for a in alternatives):
            # list of UID matching: one IN, which uses the index once
            marks = ", ".join("?" for _ in alternatives)
            self.clauses.append(f"{column} IN ({marks})" if len(values) > 1 else f"{column} = ?")
            self.params.extend(p for a in alternatives for p in a[1])
            return
        if len(alternatives) == 1:
            self.clauses.append(alternatives[0][0])
        else:
            self.clauses.append("(" + " OR ".join(f"({a[0]})" for a in alternatives) + ")")
        for _sql, params in alternatives:
            self.params.extend(params)

    def _one(self, attr: _Attribute, column: str, value: str) -> tuple[str, list[Any]]:
        kind = attr.kind
        if kind == "uid":
            if _has_wildcard(value) or not _UID.match(value):
                raise QueryError(f"{attr.keyword}: {value!r} is not a UID (no wildcards in UIDs)")
            return f"{column} = ?", [value]
        if kind in ("int", "count"):
            if not _INT.match(value):
                raise QueryError(f"{attr.keyword}: {value!r} is not an integer")
            return f"{column} = ?", [int(value)]
        if kind == "date":
            return self._range(attr, column, value, _DATE, lambda hi: hi, exact_single=True)
        if kind == "time":
            value = value.replace(":", "")
            return self._range(attr, column, value, _TIME, _time_upper, exact_single=False)
        if kind == "modalities":
            return self._modality(column, value)
        if kind == "pn" and self.fuzzy_names:
            column = attr.folded
            value = fold_name(value)
        if _has_wildcard(value):
            return f"{column} LIKE ? ESCAPE '{_ESCAPE}'", [_like_pattern(value)]
        return f"{column} = ?", [value]

    def _range(
        self,
        attr: _Attribute,
        column: str,
        value: str,
        pattern: re.Pattern[str],
        upper: Any,
        *,
        exact_single: bool,
    ) -> tuple[str, list[Any]]:
        if "-" not in value:
            if not pattern.match(value):
                raise QueryError(f"{attr.keyword}: malformed value {value!r}")
            if exact_single:
                return f"{column} = ?", [value]
            return f"{column} >= ? AND {column} <= ?", [value, upper(value)]
        low, _, high = value.partition("-")
        if (not low and not high) or "-" in high:
            raise QueryError(f"{attr.keyword}: malformed range {value!r}")
        for bound in (low, high):
            if bound and not pattern.match(bound):
                raise QueryError(f"{attr.keyword}: malformed range {value!r}")
        parts = [f"{column} <> ''"]  # an empty value is in no range
        params: list[Any] = []
        if low:
            parts.append(f"{column} >= ?")
            params.append(low)
        if high:
            parts.append(f"{column} <= ?")
            params.append(upper(high))
        return " AND ".join(parts), params

    def _sequence(self, attr: _Attribute, raw: Any) -> None:
        """Sequence matching: an item of the owner matches every key of the query item."""
        seq = SEQUENCES[attr.keyword]
        item = query_item(seq, raw)
        conditions: list[str] = []
        params: list[Any] = [attr.keyword]
        for keyword, value in item.items():
            column = f"q.{COLUMNS[seq.items.index(keyword)]}"
            alternatives = [
                self._one(_Attribute(keyword, attr.level, column, "text"), column, v)
                for v in _values(value)
            ]
            if not alternatives:
                continue  # universal within the item: returned, not matched
            conditions.append("(" + " OR ".join(f"({a[0]})" for a in alternatives) + ")")
            for _sql, alt_params in alternatives:
                params.extend(alt_params)
        if not conditions:
            return  # an empty item: every owner matches (the items are returned)
        owner = self.column(attr)
        self.clauses.append(
            f"EXISTS (SELECT 1 FROM sequence_items q WHERE q.owner = {owner} "
            f"AND q.sequence = ? AND {' AND '.join(conditions)})"
        )
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
    for keyword, value in filters.items():
        if keyword in IGNORED_KEYS:
            continue
        compiler.add(_attribute(keyword, level), value)
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
                stored = catalog.sequence_rows(str(owner), keyword)
                result[keyword] = matching_items(seq, stored, item)
            yield result


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
