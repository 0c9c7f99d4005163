"""Rule matching and the routing settings' validation."""

from __future__ import annotations

import io
from dataclasses import replace

import pytest
from pydicom import dcmread

from kho.archive.dataset.attributes import extract_attributes
from kho.bench.phantom import ct_series_datasets
from kho.errors import ConfigError
from kho.routing.config import ForwardDestination, ForwardRule, RoutingConfig, parse_dicom_url
from kho.routing.rules import matches_any, rule_selects


@pytest.fixture(scope="module")
def ct() -> object:
    data = ct_series_datasets(1, rows=8, cols=8)[0]
    return extract_attributes(dcmread(io.BytesIO(data)))


def rule(**conditions: object) -> ForwardRule:
    return ForwardRule(name="r", destination="d", **conditions)  # type: ignore[arg-type]


def test_patterns_globs_regexes_and_exclusions() -> None:
    assert matches_any([], "anything")
    assert matches_any(["CT"], "ct")  # case ignored
    assert not matches_any(["CT"], "CTA")  # a glob is the whole value
    assert matches_any(["CT*"], "CTA")
    assert matches_any(["re:^AX"], "AXIAL 1.0")
    assert matches_any(["re:1\\.0$"], "AXIAL 1.0")
    assert not matches_any(["re:^COR"], "AXIAL 1.0")
    assert not matches_any(["!SR"], "SR")
    assert matches_any(["!SR"], "CT")  # only exclusions: everything else passes
    assert not matches_any(["CT", "MR"], "US")
    assert matches_any(["CT", "MR"], "MR")


def test_rule_conditions(ct: object) -> None:
    attrs = ct
    tenant = "default"
    assert rule_selects(rule(), attrs, calling_ae="CT1", tenant=tenant)  # type: ignore[arg-type]
    cases = [
        (rule(modality=["CT"]), True),
        (rule(modality=["MR", "US"]), False),
        (rule(calling_ae=["CT*"]), True),
        (rule(calling_ae=["MR1"]), False),
        (rule(sop_class=["CTImageStorage"]), True),  # a keyword
        (rule(sop_class=["1.2.840.10008.5.1.4.1.1.2"]), True),  # a UID
        (rule(sop_class=["!CTImageStorage"]), False),
        (rule(body_part=["CHEST", "HEAD"]), True),
        (rule(body_part=["HEAD"]), False),
        (rule(series_description=["AXIAL*"]), True),
        (rule(series_description=["re:cor|sag"]), False),
        (rule(study_description=["*chest*"]), True),
        (rule(tenants=["hosp-a"]), False),
        (rule(modality=["CT"], enabled=False), False),
        (rule(modality=["CT"], body_part=["CHEST"], series_description=["re:^AXIAL"]), True),
        (rule(modality=["CT"], body_part=["HEAD"]), False),  # every condition must pass
    ]
    for candidate, expected in cases:
        got = rule_selects(candidate, attrs, calling_ae="CT1", tenant=tenant)  # type: ignore[arg-type]
        assert got is expected, candidate


def test_a_stow_upload_has_no_calling_ae(ct: object) -> None:
    selected = rule(calling_ae=["CT1"])
    assert not rule_selects(selected, ct, calling_ae="", tenant="default")  # type: ignore[arg-type]
    other = replace(ct, body_part_examined="")  # type: ignore[type-var]
    assert not rule_selects(rule(body_part=["CHEST"]), other, calling_ae="", tenant="default")


def test_a_single_pattern_may_be_a_string() -> None:
    assert rule(modality="CT").modality == ["CT"]


def test_config_refuses_what_cannot_work() -> None:
    with pytest.raises(ConfigError, match="no destination"):
        RoutingConfig(rules=[rule()], destinations={})
    destinations = {"d": ForwardDestination(url="dicom://PACS@10.0.0.1:104")}
    with pytest.raises(ConfigError, match="no project"):
        RoutingConfig(rules=[rule(deidentify="trial")], destinations=destinations)
    with pytest.raises(ConfigError, match="unique"):
        RoutingConfig(rules=[rule(), rule()], destinations=destinations)
    with pytest.raises(ValueError, match="scheme"):
        ForwardDestination(url="ftp://somewhere")
    with pytest.raises(ValueError, match="AE title"):
        ForwardDestination(url="dicom://@host:104")
    with pytest.raises(ValueError, match="secret"):
        RoutingConfig(projects={"p": {"secret": "short"}})
    with pytest.raises(ValueError, match="re:"):
        rule(series_description=["re:("])


def test_config_from_settings_objects() -> None:
    class Settings:  # what kho's Settings will carry (forward_* and deid_projects)
        forward_rules = [{"name": "all", "destination": "pacs", "trigger": "study"}]
        forward_destinations = {"pacs": {"url": "dicoms://PACS@pacs.example:2762"}}
        deid_projects = {"trial": {"secret": "0123456789abcdef"}}
        forward_threads = 2

    config = RoutingConfig.from_settings(Settings())
    assert config.rules[0].trigger == "study"
    assert config.destinations["pacs"].scheme == "dicoms"
    assert config.threads == 2
    assert RoutingConfig.from_settings(object()).rules == []


def test_dicom_urls() -> None:
    assert parse_dicom_url("dicom://PACS@10.1.2.3:104") == ("PACS", "10.1.2.3", 104)
    assert parse_dicom_url("dicoms://AI_NODE@ai.example.org:2762/") == (
        "AI_NODE",
        "ai.example.org",
        2762,
    )
    assert parse_dicom_url("dicom://REGISTERED") == ("REGISTERED", "", 0)
    assert parse_dicom_url("dicom://V6@[::1]:11112") == ("V6", "::1", 11112)
