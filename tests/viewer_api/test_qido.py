"""QIDO-RS with dicomweb-client: every level, includefield, limit/offset, bad parameters."""

from __future__ import annotations

import pytest
import requests
from requests import HTTPError

from kho.errors import KhoError, QueryError
from kho.viewer_api.qido import parse_search
from tests.viewer_api.conftest import SAMPLES, Served


def values(result: dict, tag: str) -> list:
    return result.get(tag, {}).get("Value", [])


def test_search_for_studies_lists_every_study(served: Served) -> None:
    studies = served.client.search_for_studies()
    found = {values(s, "0020000D")[0] for s in studies}
    assert found == {s.study for s in served.samples.values()}
    mr = next(
        s for s in studies if values(s, "0020000D")[0] == served.samples["MR2_J2KR.dcm"].study
    )
    assert values(mr, "00080061") == ["MR"]
    assert values(mr, "00201208") == [1]  # NumberOfStudyRelatedInstances
    assert mr["00100010"]["vr"] == "PN"
    assert values(mr, "00081190")[0].endswith(f"/studies/{values(mr, '0020000D')[0]}")


def test_study_matching_by_keyword_and_tag(served: Served) -> None:
    ds = served.samples["US1_UNCR.dcm"].dataset()
    by_keyword = served.client.search_for_studies(search_filters={"PatientID": ds.PatientID})
    by_tag = served.client.search_for_studies(search_filters={"00100020": ds.PatientID})
    assert by_keyword and by_keyword == by_tag
    assert all(values(s, "00100020") == [ds.PatientID] for s in by_keyword)
    modality = served.client.search_for_studies(search_filters={"ModalitiesInStudy": "CR"})
    assert {values(s, "0020000D")[0] for s in modality} == {served.samples["RG3_J2KR.dcm"].study}


def test_wildcard_and_percent_encoded_values(served: Served) -> None:
    ds = served.samples["MR2_J2KR.dcm"].dataset()
    name = str(ds.PatientName)
    prefix = name[:3]
    r = requests.get(served.url("/studies"), params={"PatientName": f"{prefix}*"})
    assert r.status_code == 200
    assert served.samples["MR2_J2KR.dcm"].study in {values(s, "0020000D")[0] for s in r.json()}
    # '%2A' is '*': decoded before matching
    raw = requests.get(served.url(f"/studies?PatientName={prefix}%2A"))
    assert raw.json() == r.json()


def test_series_and_instances_at_every_level(served: Served) -> None:
    s = served.samples["emri_small_jpeg_ls_lossless.dcm"]
    series = served.client.search_for_series(s.study)
    assert [values(x, "0020000E")[0] for x in series] == [s.series]
    assert values(series[0], "00201209") == [1]
    all_series = served.client.search_for_series()
    assert len(all_series) == len({x.series for x in served.samples.values()})
    in_series = served.client.search_for_instances(s.study, s.series)
    in_study = served.client.search_for_instances(s.study)
    everywhere = served.client.search_for_instances()
    assert [values(i, "00080018")[0] for i in in_series] == [s.sop]
    assert in_series == in_study
    assert len(everywhere) == len(SAMPLES)
    assert values(in_series[0], "00280008") == [10]  # NumberOfFrames
    assert values(in_series[0], "00280010") == [64]


def test_includefield_and_all(served: Served) -> None:
    s = served.samples["MR2_J2KR.dcm"]
    plain = served.client.search_for_studies(search_filters={"StudyInstanceUID": s.study})
    assert "00080062" not in plain[0]  # SOPClassesInStudy is not a default key
    extra = served.client.search_for_studies(
        search_filters={"StudyInstanceUID": s.study}, fields=["SOPClassesInStudy", "00100030"]
    )
    assert values(extra[0], "00080062") == [served.samples["MR2_J2KR.dcm"].dataset().SOPClassUID]
    assert "00100030" in extra[0]
    everything = requests.get(
        served.url("/studies"), params={"StudyInstanceUID": s.study, "includefield": "all"}
    ).json()[0]
    assert {"00080062", "00201206", "00100030", "00200010"} <= set(everything)


def test_limit_and_offset_page_through_results(served: Served) -> None:
    everything = served.client.search_for_instances()
    uids = sorted(values(i, "00080018")[0] for i in everything)
    pages = []
    for offset in range(0, len(uids), 4):
        page = served.client.search_for_instances(limit=4, offset=offset)
        assert len(page) <= 4
        pages += [values(i, "00080018")[0] for i in page]
    assert pages == uids
    assert served.client.search_for_instances(limit=2, offset=len(uids)) == []


def test_fuzzymatching_is_accepted(served: Served) -> None:
    ds = served.samples["US1_UNCR.dcm"].dataset()
    folded = str(ds.PatientName).lower()  # kho's fuzzy matching ignores case
    found = served.client.search_for_studies(
        search_filters={"PatientName": folded}, fuzzymatching=True
    )
    assert served.samples["US1_UNCR.dcm"].study in {values(s, "0020000D")[0] for s in found}


@pytest.mark.parametrize(
    "query",
    [
        "limit=-1",
        "offset=abc",
        "fuzzymatching=perhaps",
        "NoSuchKeyword=1",
        "includefield=NotAKeyword",
        "99999999=1",
        "StudyDate=2020-13-45x",
        "PixelSpacing=1",  # a real attribute that is no matching key
    ],
)
def test_bad_parameters_are_400_with_a_message(served: Served, query: str) -> None:
    r = requests.get(served.url(f"/studies?{query}"))
    assert r.status_code == 400, r.text
    assert r.text
    with pytest.raises(HTTPError):
        served.client.search_for_studies(additional_params=dict([query.split("=", 1)]))


def test_a_sequence_given_a_value_and_item_keys_is_400(served: Served) -> None:
    query = "ProcedureCodeSequence=x&ProcedureCodeSequence.CodeValue=y"
    r = requests.get(served.url(f"/studies?{query}"))
    assert r.status_code == 400, r.text
    assert "ProcedureCodeSequence" in r.text


def test_unknown_study_gives_an_empty_result(served: Served) -> None:
    assert served.client.search_for_series("1.2.3.4.5.6.7") == []


def test_qido_refuses_xml(served: Served) -> None:
    r = requests.get(
        served.url("/studies"),
        headers={"Accept": 'multipart/related; type="application/dicom+xml"'},
    )
    assert r.status_code == 406


def test_parse_search_reads_every_kind_of_parameter_without_a_catalog() -> None:
    parameters = parse_search(
        [
            ("PatientName", "SMI*"),
            ("0020000D", "1.2.3,1.2.4\\1.2.5"),  # a UID list: comma and backslash
            ("Modality", "CT"),
            ("Modality", "MR"),  # a repeated key: any of the values
            ("RequestAttributesSequence.RequestedProcedureID", "RP1"),
            ("includefield", "00100030, StudyID"),
            ("limit", "5"),
            ("offset", "10"),
            ("fuzzymatching", "true"),
            ("charset", "utf-8"),  # control parameters kho ignores
        ],
        "SERIES",
        {"StudyInstanceUID": "1.2.9"},  # the resource path's UID wins
    )
    assert parameters.filters == {
        "PatientName": "SMI*",
        "StudyInstanceUID": "1.2.9",
        "Modality": ["CT", "MR"],
        "RequestAttributesSequence": {"RequestedProcedureID": "RP1"},
    }
    assert parameters.return_keys[:2] == ("PatientBirthDate", "StudyID")
    assert "SeriesInstanceUID" in parameters.return_keys
    assert (parameters.limit, parameters.offset, parameters.fuzzy) == (5, 10, True)
    everything = parse_search([("includefield", "all")], "STUDY", {})
    assert everything.include_all and "SOPClassesInStudy" in everything.return_keys


@pytest.mark.parametrize(
    ("params", "level"),
    [
        ([("limit", "-1")], "STUDY"),
        ([("SOPInstanceUID", "1.2")], "STUDY"),  # an instance key at the study level
        ([("StudyDescription.CodeValue", "x")], "STUDY"),  # not a sequence
        ([("StudyInstanceUID", "1.2.*")], "STUDY"),  # no wildcards in UIDs
        ([], "PATIENT"),  # QIDO-RS has no patient level
        # a sequence with a value of its own and keys of its items, either order (found by
        # the qido fuzz target: an AssertionError, a 500)
        ([("ProcedureCodeSequence", "x"), ("ProcedureCodeSequence.CodeValue", "y")], "STUDY"),
        ([("ProcedureCodeSequence.CodeValue", "y"), ("ProcedureCodeSequence", "x")], "STUDY"),
    ],
)
def test_parse_search_refuses_with_kho_errors(params: list[tuple[str, str]], level: str) -> None:
    with pytest.raises(KhoError):
        parse_search(params, level, {})
    if level == "PATIENT":
        with pytest.raises(QueryError):
            parse_search(params, level, {})
