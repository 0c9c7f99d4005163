"""Write kho.routing.deid.table from the DICOM standard's own text: Table E.1-1 of PS3.15
("Application Level Confidentiality Profile Attributes") in the standard's DocBook source.

    python -m kho.routing.deid.generate part15.xml > kho/routing/deid/table.py

``part15.xml`` is published by NEMA with every edition of the standard
(https://dicom.nema.org/medical/dicom/current/source/docbook/part15/part15.xml).  Nothing
is typed by hand: each row's name, tag and action codes are the table's cells, the edition
is the book's subtitle.  Run it again with a newer edition to follow the standard.
"""

from __future__ import annotations

import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

_DOCBOOK = "{http://docbook.org/ns/docbook}"
_XML_ID = "{http://www.w3.org/XML/1998/namespace}id"
TABLE_ID = "table_E.1-1"

#: the table's columns after name, tag, retired and "in standard composite IOD", as the
#: option names kho.routing.deid.profile uses (in the table's order)
ACTION_COLUMNS = {
    "Basic Prof.": "basic",
    "Rtn. Safe Priv. Opt.": "safe_private",
    "Rtn. UIDs Opt.": "uids",
    "Rtn. Dev. Id. Opt.": "device",
    "Rtn. Inst. Id. Opt.": "institution",
    "Rtn. Pat. Chars. Opt.": "patient_characteristics",
    "Rtn. Long. Full Dates Opt.": "full_dates",
    "Rtn. Long. Modif. Dates Opt.": "modified_dates",
    "Clean Desc. Opt.": "clean_descriptors",
    "Clean Struct. Cont. Opt.": "clean_structured_content",
    "Clean Graph. Opt.": "clean_graphics",
}
#: the one row whose tag is a sentence
PRIVATE_ROW = "(gggg,eeee) where gggg is odd"


def _text(element: ET.Element) -> str:
    return " ".join("".join(element.itertext()).split())


def read_table(path: Path) -> tuple[str, list[tuple[str, str, str, dict[str, str]]]]:
    """(edition, rows) of Table E.1-1: each row (tag, name, basic action, {option:
    action}); tag as 8 lower-case hex digits with ``x`` for the table's wildcards, or
    ``private`` for the private attributes row."""
    root = ET.parse(path).getroot()
    subtitle = root.find(f"{_DOCBOOK}subtitle")
    found = re.search(r"PS3\.15 (\d{4}[a-z]?)", _text(subtitle) if subtitle is not None else "")
    edition = found.group(1) if found else "unknown"
    table = next(
        (t for t in root.iter(f"{_DOCBOOK}table") if t.get(_XML_ID) == TABLE_ID),
        None,
    )
    if table is None:
        raise SystemExit(f"{path}: no table {TABLE_ID}")
    heads = [_text(th) for th in table.iter(f"{_DOCBOOK}th")]
    columns = {i: ACTION_COLUMNS[h] for i, h in enumerate(heads) if h in ACTION_COLUMNS}
    if len(columns) != len(ACTION_COLUMNS):
        raise SystemExit(f"{path}: unexpected columns {heads}")
    rows = []
    body = table.find(f"{_DOCBOOK}tbody")
    assert body is not None
    for tr in body.findall(f"{_DOCBOOK}tr"):
        cells = [_text(td) for td in tr.findall(f"{_DOCBOOK}td")]
        name, tag_text = cells[0], cells[1]
        if tag_text == PRIVATE_ROW:
            tag = "private"
        else:
            match = re.fullmatch(r"\(([0-9A-Fa-fx]{4}),([0-9A-Fa-fx]{4})\)", tag_text)
            if match is None:
                raise SystemExit(f"{path}: row {name!r} has an unreadable tag {tag_text!r}")
            tag = (match.group(1) + match.group(2)).lower()
        actions = {columns[i]: cells[i] for i in columns if cells[i]}
        basic = actions.pop("basic")
        rows.append((tag, name, basic, actions))
    return edition, rows


def render(edition: str, rows: list[tuple[str, str, str, dict[str, str]]], source: str) -> str:
    lines = [
        f'"""PS3.15 Table E.1-1 (DICOM {edition}): the Basic Application Level Confidentiality',
        "Profile and its Options, one row per attribute.  Generated from the standard's DocBook",
        f"source ({source}) by kho.routing.deid.generate: do not edit, generate again.",
        '"""',
        "",
        "# ruff: noqa: E501",
        "",
        f'EDITION = "{edition}"',
        "",
        "#: (tag: 8 hex digits, x = any; or 'private'), attribute name, Basic Profile action,",
        "#: {option: action} for the Options that change it",
        "# fmt: off",
        "ROWS: tuple[tuple[str, str, str, dict[str, str]], ...] = (",
    ]
    for tag, name, basic, actions in rows:
        options = ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in actions.items())
        row = ", ".join(json.dumps(text) for text in (tag, name, basic))
        lines.append(f"    ({row}, {{{options}}}),")
    lines += [")", "# fmt: on"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    path = Path(args[0])
    edition, rows = read_table(path)
    sys.stdout.write(render(edition, rows, f"PS3.15 {edition} part15.xml"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
