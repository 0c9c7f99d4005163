"""The forwarding part of the settings (kho.routing reads it): destinations, rules and
de-identification projects as pydantic models, fields of kho.archive.config.Settings
(``forward_destinations``, ``forward_rules``, ``deid_projects``).

Destinations are URIs, the sender picked by scheme (dcm4chee's ExporterFactory):

- ``dicom://AE@host:port``: C-STORE over DICOM; ``dicoms://AE@host:port``: over TLS
  (kho.access.tls's client context).  ``dicom://AE`` alone: the host and port of the AE
  registry's entry ``dicom_peers.AE``, which may also say ``tls = true``.
- ``stow+http://host:port/path`` or ``stow+https://...``: DICOMweb STOW-RS to
  ``http(s)://host:port/path/studies`` (``path`` ending in ``/studies`` is taken as is),
  with a bearer token when ``token`` is set.
"""

from __future__ import annotations

import re
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

#: URI schemes of the destinations kho can send to
SCHEMES = ("dicom", "dicoms", "stow+http", "stow+https")

Trigger = Literal["instance", "series", "study"]
DateHandling = Literal["remove", "shift", "keep"]


class ForwardDestination(BaseModel):
    """One place instances are sent to (``[forward_destinations.<name>]``)."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(
        description="dicom://AE@host:port (C-STORE), dicoms://AE@host:port (over TLS), "
        "dicom://AE (host and port from dicom_peers), stow+http(s)://host:port/path (STOW-RS)"
    )
    calling_ae: str = Field("", description="kho's AE title toward it (empty: ae_title)")
    token: SecretStr = Field(
        SecretStr(""), description="STOW-RS: the bearer token sent with every request"
    )
    tenants: list[str] = Field(
        default_factory=list,
        description="the hospitals that may send to it (empty: every tenant)",
    )
    concurrency: int = Field(2, ge=1, le=64, description="associations or requests at once")
    batch: int = Field(
        100, ge=1, le=10000, description="instances sent per association (DICOM) or claim"
    )
    stow_batch_bytes: int = Field(
        32 * 1024 * 1024, ge=1, description="STOW-RS: largest request body (bytes)"
    )
    retry_base_s: float = Field(2.0, gt=0, description="first retry delay; doubles per failure")
    retry_max_s: float = Field(300.0, gt=0, description="longest retry delay")
    dead_after_s: float = Field(
        86400.0,
        gt=0,
        description="an instance not delivered this long after it was queued goes to the "
        "dead letters (kho routes retry sends them again)",
    )
    timeout_s: float = Field(60.0, gt=0, description="network timeout of one exchange")
    commitment: bool = Field(
        False,
        description="DICOM: ask for storage commitment (N-ACTION) and count an instance "
        "delivered only when the destination's N-EVENT-REPORT says it is committed",
    )
    commitment_wait_s: float = Field(
        30.0, ge=0, description="how long kho waits on the association for the report"
    )
    commitment_timeout_s: float = Field(
        3600.0,
        gt=0,
        description="an instance with no commitment report after this long is sent again",
    )

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        scheme = value.split("://", 1)[0].lower() if "://" in value else ""
        if scheme not in SCHEMES:
            raise ValueError(f"destination URL {value!r}: the scheme must be one of {SCHEMES}")
        if scheme.startswith("dicom"):
            parse_dicom_url(value)
        return value

    @property
    def scheme(self) -> str:
        return self.url.split("://", 1)[0].lower()


def parse_dicom_url(url: str) -> tuple[str, str, int]:
    """(called AE title, host, port) of ``dicom[s]://AE@host:port``; host "" and port 0
    for ``dicom://AE`` (the AE registry says where)."""
    rest = url.split("://", 1)[1].rstrip("/")
    title, at, address = rest.partition("@")
    if not at:
        title, address = rest, ""
    if not 0 < len(title) <= 16 or "\\" in title:
        raise ValueError(f"destination URL {url!r}: the AE title must be 1-16 characters")
    if not address:
        return title, "", 0
    parts = urlsplit(f"//{address}")
    if not parts.hostname or parts.port is None:
        raise ValueError(f"destination URL {url!r}: expected dicom://AE@host:port")
    return title, parts.hostname, parts.port


class ForwardRule(BaseModel):
    """Which received instances go where (``[[forward_rules]]``).  Each condition is a
    list of patterns, any of which may match (empty: anything): shell-style globs, case
    ignored; ``re:`` starts a regular expression (searched, case ignored); ``!`` in front
    excludes what it matches."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="the rule's name (queue rows and status name it)")
    destination: str = Field(description="a name in forward_destinations")
    trigger: Trigger = Field(
        "instance",
        description="instance: each instance as soon as it is stored; series / study: "
        "once no instance of it has arrived for stable_s seconds",
    )
    stable_s: float = Field(30.0, ge=0, description="the quiet period of series/study triggers")
    tenants: list[str] = Field(default_factory=list, description="the hospitals it applies to")
    calling_ae: list[str] = Field(
        default_factory=list,
        description="the sender's AE title (DICOM; STOW-RS and imports have none: '')",
    )
    modality: list[str] = Field(default_factory=list, description="e.g. CT, MR")
    sop_class: list[str] = Field(
        default_factory=list, description="SOP Class UIDs or keywords (CTImageStorage)"
    )
    body_part: list[str] = Field(default_factory=list, description="Body Part Examined")
    series_description: list[str] = Field(default_factory=list)
    study_description: list[str] = Field(default_factory=list)
    deidentify: str = Field(
        "", description="a name in deid_projects: send de-identified (empty: as received)"
    )
    allow_burned_in: bool = Field(
        False,
        description="de-identified routes: also send instances whose Burned In Annotation "
        "or Recognizable Visual Features is YES (withheld otherwise)",
    )
    enabled: bool = True

    @field_validator(
        "calling_ae",
        "modality",
        "sop_class",
        "body_part",
        "series_description",
        "study_description",
        mode="before",
    )
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_patterns(self) -> ForwardRule:
        for name in (
            "calling_ae",
            "modality",
            "sop_class",
            "body_part",
            "series_description",
            "study_description",
        ):
            for pattern in getattr(self, name):
                body = pattern[1:] if pattern.startswith("!") else pattern
                if body.startswith("re:"):
                    try:
                        re.compile(body[3:])
                    except re.error as exc:
                        raise ValueError(f"rule {self.name}: {name} {pattern!r}: {exc}") from exc
        return self


class DeidProject(BaseModel):
    """A de-identification project (``[deid_projects.<name>]``): PS3.15 Annex E's Basic
    Application Level Confidentiality Profile and the Options chosen.  Everything sent
    under one project maps a UID, a patient and a date the same way (an HMAC with its
    secret), so studies stay linked inside the project and nowhere else."""

    model_config = ConfigDict(extra="forbid")

    secret: SecretStr = Field(
        description="the project's key (at least 16 characters): UIDs, pseudonyms and date "
        "shifts are HMAC-SHA-256 of the originals with it; never share it with the recipient"
    )
    dates: DateHandling = Field(
        "remove",
        description="remove (Basic Profile), shift (Retain Longitudinal Temporal "
        "Information with Modified Dates: every date of a patient moved by one offset), keep "
        "(with Full Dates)",
    )
    date_shift_days: int | None = Field(
        None,
        description="with dates = shift: this many days for everyone (negative: earlier); "
        "default: an offset per patient between 1 and 10 years back, from the secret",
    )
    patient_pseudonym: bool = Field(
        True,
        description="Patient ID and Patient's Name become one pseudonym per patient "
        "(ANON-<12 hex>, the same across the project); false: empty",
    )
    retain_uids: bool = Field(False, description="Retain UIDs Option (not recommended)")
    retain_device_identity: bool = Field(False, description="Retain Device Identity Option")
    retain_institution_identity: bool = Field(
        False, description="Retain Institution Identity Option"
    )
    retain_patient_characteristics: bool = Field(
        False, description="Retain Patient Characteristics Option (age, sex, size, weight...)"
    )
    clean_descriptors: bool = Field(
        False,
        description="Clean Descriptors Option: keep descriptions and comments with the "
        "instance's own identifiers (names, IDs, accession number, dates) taken out",
    )
    clean_structured_content: bool = Field(
        False,
        description="Clean Structured Content Option: keep SR content trees, their text "
        "cleaned as descriptors are and their person names replaced",
    )

    @field_validator("secret")
    @classmethod
    def _check_secret(cls, value: SecretStr) -> SecretStr:
        if len(value.get_secret_value()) < 16:
            raise ValueError("a de-identification project's secret must be 16 characters or more")
        return value
