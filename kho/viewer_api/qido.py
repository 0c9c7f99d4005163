"""QIDO-RS (PS3.18 10.6): search for studies, series and instances.

Query parameters become a call of :func:`kho.archive.query.find` (the matching engine
C-FIND uses too); results become DICOM JSON (PS3.18 F.2) here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request, Response
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

from kho.access.callers import Role
from kho.archive.catalog import Catalog
from kho.archive.query import engine as query
from kho.errors import QueryError
from kho.viewer_api.deps import ArchiveDep, BaseUrlDep
from kho.viewer_api.errors import NotAcceptableError
from kho.viewer_api.media import DICOM_JSON, parse_accept
from kho.viewer_api.paths import checked_uid
from kho.viewer_api.responses import json_response
from kho.viewer_api.security import requires

router = APIRouter(tags=["QIDO-RS"], dependencies=[requires(Role.VIEWER)])

_CONTROL = {"limit", "offset", "fuzzymatching", "includefield", "accept", "charset"}
_TAG = re.compile(r"^([0-9A-Fa-f]{4}),?([0-9A-Fa-f]{4})$")
_INT_VRS = frozenset({"IS", "SL", "SS", "UL", "US", "SV", "UV"})
_FLOAT_VRS = frozenset({"DS", "FL", "FD"})
RETRIEVE_URL = "00081190"


def keyword_of(name: str) -> str:
    """A query parameter name (keyword, ``ggggeeee`` or ``gggg,eeee``) as a DICOM keyword."""
    found = _TAG.match(name.strip())
    if found:
        keyword = keyword_for_tag(int(found.group(1) + found.group(2), 16))
        if not keyword:
            raise QueryError(f"unknown attribute tag {name!r}")
        return str(keyword)
    if tag_for_keyword(name) is None:
        raise QueryError(f"unknown query parameter or attribute {name!r}")
    return name


def _tag_hex(keyword: str) -> str:
    tag = tag_for_keyword(keyword)
    assert tag is not None
    return f"{tag:08X}"


def _element(keyword: str, value: Any) -> dict[str, Any]:
    vr = dictionary_VR(keyword)
    if vr == "SQ":  # sequence matching results: items of keyword -> value
        items = [{_tag_hex(k): _element(k, v) for k, v in i.items()} for i in value or []]
        return {"vr": vr, "Value": [dict(sorted(i.items())) for i in items]}  # by tag
    if value is None or value == "":
        return {"vr": vr}
    if vr == "PN":
        names = []
        for one in str(value).split("\\"):
            groups = one.split("=")
            name = {"Alphabetic": groups[0]}
            if len(groups) > 1 and groups[1]:
                name["Ideographic"] = groups[1]
            if len(groups) > 2 and groups[2]:
                name["Phonetic"] = groups[2]
            names.append(name)
        return {"vr": vr, "Value": names}
    parts = value if isinstance(value, list) else str(value).split("\\")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        parts = [value]
    out: list[Any] = []
    for part in parts:
        if vr in _INT_VRS:
            try:
                out.append(int(part))
            except (TypeError, ValueError):
                out.append(None)
        elif vr in _FLOAT_VRS:
            try:
                out.append(float(part))
            except (TypeError, ValueError):
                out.append(None)
        else:
            out.append(str(part))
    return {"vr": vr, "Value": out}


def result_json(row: dict[str, Any], retrieve_url: str) -> dict[str, Any]:
    out = {_tag_hex(k): _element(k, v) for k, v in row.items()}
    out[RETRIEVE_URL] = {"vr": "UR", "Value": [retrieve_url]}
    return dict(sorted(out.items()))


def _bool(text: str, name: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no", ""):
        return False
    raise QueryError(f"{name} must be true or false, not {text!r}")


def _nonnegative(text: str, name: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise QueryError(f"{name} must be a non-negative integer, not {text!r}") from None
    if value < 0:
        raise QueryError(f"{name} must not be negative")
    return value


def _check_accept(request: Request) -> None:
    ranges = parse_accept(request.headers.get("accept"))
    if ranges and not any(r.matches(DICOM_JSON) or r.matches("application/json") for r in ranges):
        raise NotAcceptableError(
            "QIDO-RS answers application/dicom+json (or application/json) only"
        )


#: a sequence asked for both with a value of its own and with keys of its items
_BOTH_FORMS = "{} is given both as a value and with keys of its items (Sequence.Attribute)"


@dataclass(frozen=True, slots=True)
class SearchParameters:
    """What a QIDO-RS query string asks for, checked: the matching keys (C-FIND value
    semantics; a sequence key's value is its query item), the keys to return, and the
    page (``limit`` None or 0: as many as the archive's cap allows)."""

    level: str
    filters: dict[str, Any]
    return_keys: tuple[str, ...]
    include_all: bool = False
    limit: int | None = None
    offset: int = 0
    fuzzy: bool = False


def parse_search(
    params: Iterable[tuple[str, str]], level: str, path_filters: Mapping[str, str]
) -> SearchParameters:
    """The query parameters of a search at ``level`` (STUDY, SERIES or IMAGE), in their
    order (a key may repeat), plus the UIDs of the resource path.  QueryError for an
    unknown or misplaced key, a malformed value or a bad control parameter
    (BadRequestError for a malformed UID in a UID list); nothing here touches the
    catalog."""
    if level not in _DEFAULTS:
        raise QueryError(f"QIDO-RS searches for STUDY, SERIES or IMAGE, not {level!r}")
    filters: dict[str, Any] = {}
    include: list[str] = []
    include_all = False
    limit: int | None = None
    offset = 0
    fuzzy = False
    supported = query.supported_keywords(level)
    for name, value in params:
        if name == "limit":
            limit = _nonnegative(value, "limit")
        elif name == "offset":
            offset = _nonnegative(value, "offset")
        elif name == "fuzzymatching":
            fuzzy = _bool(value, "fuzzymatching")
        elif name == "includefield":
            for field in value.split(","):
                field = field.strip()
                if field.lower() == "all":
                    include_all = True
                elif field:
                    keyword = keyword_of(field)
                    # attributes the catalog does not hold are simply not returned
                    if keyword in supported:
                        include.append(keyword)
        elif name in _CONTROL:
            continue
        elif "." in name:  # a key inside a sequence (PS3.18 8.3.4.1): Sequence.Attribute
            outer, _, inner = name.partition(".")
            keyword, item_key = keyword_of(outer), keyword_of(inner)
            if keyword not in supported or dictionary_VR(keyword) != "SQ":
                raise QueryError(f"{keyword} is not a matchable sequence at the {level} level")
            item = filters.setdefault(keyword, {})
            if not isinstance(item, dict):
                raise QueryError(_BOTH_FORMS.format(keyword))
            item[item_key] = value
        else:
            keyword = keyword_of(name)
            if keyword not in supported:
                raise QueryError(f"{keyword} is not a matching key at the {level} level")
            values = uid_list(keyword, value) if _is_uid(keyword) else [value]
            previous = filters.get(keyword)
            if isinstance(previous, dict):
                raise QueryError(_BOTH_FORMS.format(keyword))
            if previous is None and len(values) == 1:
                filters[keyword] = values[0]
            else:  # a repeated key or a UID list: any of the values (UID list semantics)
                filters[keyword] = [*_as_list(previous or []), *values]
    for keyword, value in path_filters.items():
        filters[keyword] = value
    if include_all:
        include = sorted(supported)
    include += _default_keys(level)
    return SearchParameters(
        level=level,
        filters=filters,
        return_keys=tuple(_unique(include)),
        include_all=include_all,
        limit=limit,
        offset=offset,
        fuzzy=fuzzy,
    )


def find_page(
    catalog: Catalog, parameters: SearchParameters, cap: int
) -> tuple[list[dict[str, Any]], str | None]:
    """The matches of one page (never more than ``cap``), and the Warning header value
    when the cap cut results the caller did not limit away themselves."""
    limit = parameters.limit
    wanted = cap if limit is None or limit == 0 else min(limit, cap)
    rows = list(
        query.find(
            catalog,
            parameters.level,
            parameters.filters,
            return_keys=parameters.return_keys,
            fuzzy_names=parameters.fuzzy,
            limit=wanted + 1,
            offset=parameters.offset,
        )
    )
    warning = None
    if len(rows) > wanted:
        rows = rows[:wanted]
        if limit is None or limit > wanted:
            warning = (
                f'299 kho "The number of results exceeded the maximum ({cap}); '
                'use limit and offset"'
            )
    return rows, warning


def search(
    request: Request,
    archive: Any,
    base: str,
    level: str,
    path_filters: dict[str, str],
) -> Response:
    _check_accept(request)
    parameters = parse_search(request.query_params.multi_items(), level, path_filters)
    rows, warning = find_page(archive.catalog, parameters, archive.settings.find_result_limit)
    headers = {"Warning": warning} if warning else {}
    body = json.dumps(
        [result_json(row, _retrieve_url(base, level, row)) for row in rows],
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode()
    return json_response(request, body, headers=headers)


def _is_uid(keyword: str) -> bool:
    return bool(dictionary_VR(keyword) == "UI")


def uid_list(keyword: str, value: str) -> list[str]:
    """A UID matching value: one UID or a list (PS3.18 8.3.4.1 ``1#value``: comma-separated;
    the backslash of C-FIND too).  A blank, wildcard or malformed UID is 400, never
    universal matching: it would answer "everything" to a request for one thing."""
    pieces = [p for part in value.split(",") for p in part.split("\\")]
    return [checked_uid(p, f"{keyword} value") for p in pieces]


def _as_list(value: str | list[str]) -> list[str]:
    return value if isinstance(value, list) else [value]


def _unique(items: Iterable[str]) -> list[str]:
    seen: list[str] = []
    for item in items:
        if item not in seen:
            seen.append(item)
    return seen


#: PS3.18 Table 10.6.3-3..5: what each level returns without includefield
_DEFAULTS = {
    "STUDY": [
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "ModalitiesInStudy",
        "ReferringPhysicianName",
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyID",
        "StudyDescription",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
    ],
    "SERIES": [
        "Modality",
        "SeriesDescription",
        "SeriesInstanceUID",
        "SeriesNumber",
        "SeriesDate",
        "SeriesTime",
        "NumberOfSeriesRelatedInstances",
    ],
    "IMAGE": [
        "SOPClassUID",
        "SOPInstanceUID",
        "InstanceNumber",
        "Rows",
        "Columns",
        "BitsAllocated",
        "NumberOfFrames",
        "AvailableTransferSyntaxUID",
    ],
}


def _default_keys(level: str) -> list[str]:
    keys = list(_DEFAULTS[level])
    if level != "STUDY":  # the keys of the levels above identify the result
        keys = ["StudyInstanceUID", *keys]
    if level == "IMAGE":
        keys = ["SeriesInstanceUID", *keys]
    return keys


def _retrieve_url(base: str, level: str, row: dict[str, Any]) -> str:
    url = f"{base}/studies/{row.get('StudyInstanceUID', '')}"
    if level in ("SERIES", "IMAGE"):
        url += f"/series/{row.get('SeriesInstanceUID', '')}"
    if level == "IMAGE":
        url += f"/instances/{row.get('SOPInstanceUID', '')}"
    return url


@router.get("/studies", summary="Search for studies")
def search_studies(request: Request, archive: ArchiveDep, base: BaseUrlDep) -> Response:
    return search(request, archive, base, "STUDY", {})


@router.get("/series", summary="Search for series (all studies)")
def search_all_series(request: Request, archive: ArchiveDep, base: BaseUrlDep) -> Response:
    return search(request, archive, base, "SERIES", {})


@router.get("/studies/{study}/series", summary="Search for series of a study")
def search_series(study: str, request: Request, archive: ArchiveDep, base: BaseUrlDep) -> Response:
    return search(request, archive, base, "SERIES", {"StudyInstanceUID": study})


@router.get("/instances", summary="Search for instances (all studies)")
def search_all_instances(request: Request, archive: ArchiveDep, base: BaseUrlDep) -> Response:
    return search(request, archive, base, "IMAGE", {})


@router.get("/studies/{study}/instances", summary="Search for instances of a study")
def search_study_instances(
    study: str, request: Request, archive: ArchiveDep, base: BaseUrlDep
) -> Response:
    return search(request, archive, base, "IMAGE", {"StudyInstanceUID": study})


@router.get(
    "/studies/{study}/series/{series}/instances", summary="Search for instances of a series"
)
def search_series_instances(
    study: str, series: str, request: Request, archive: ArchiveDep, base: BaseUrlDep
) -> Response:
    filters = {"StudyInstanceUID": study, "SeriesInstanceUID": series}
    return search(request, archive, base, "IMAGE", filters)
