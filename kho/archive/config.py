"""Settings: one object, from a TOML file and ``KHO_*`` environment variables.

Precedence (highest first): explicit keyword arguments, environment, TOML file, defaults.
The TOML file is named by ``KHO_CONFIG`` or ``--config``; its keys are the field names below
(``[move_destinations]`` is a table of AE title -> "host:port").
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from contextvars import ContextVar
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from kho.archive.forwarding import DeidProject, ForwardDestination, ForwardRule
from kho.errors import ConfigError


class DuplicatePolicy(StrEnum):
    """What a second, different instance under a stored SOP Instance UID does."""

    REPLACE = "replace"  # keep the newer, record the replacement (default)
    KEEP = "keep"  # keep the first; answer success with a warning
    REJECT = "reject"  # refuse the newcomer (DIMSE 0x0111, HTTP 409)


class MissingUidPolicy(StrEnum):
    """What an instance without a Study or Series Instance UID (Type 1) gets."""

    # accepted under a deterministic 2.25 UID; the answer says so: DIMSE Warning 0xB000
    # (coercion) naming the UID, STOW-RS a WarningReason in the Referenced SOP item
    COERCE = "coerce"
    REJECT = "reject"  # refused: DIMSE 0xA900, STOW-RS failure 0xA900


class AuthMode(StrEnum):
    """Whether callers must prove who they are (kho.access)."""

    # on as soon as an identity source is configured (oidc_issuer, dicom_peers); else off,
    # which kho serve accepts on a loopback address only
    AUTO = "auto"
    ON = "on"  # every HTTP request needs a token or API key; every DICOM peer a registry entry
    OFF = "off"  # every caller is a platform admin: loopback only, or insecure_open_network


#: the DIMSE services a registered peer may be allowed
DIMSE_SERVICES = ("echo", "store", "find", "get", "move", "worklist", "mpps")
#: tenant (hospital) names: short, lower-case, safe in paths, keys and schema names
TENANT_NAME = r"^[a-z0-9][a-z0-9_-]{0,39}$"
#: a grant's tenant naming the whole platform
PLATFORM = "*"


class DicomPeer(BaseModel):
    """One known DICOM application entity (the AE registry, ``[dicom_peers.<AE title>]``)."""

    model_config = ConfigDict(extra="forbid")

    tenant: str = Field("", description="the hospital it belongs to (empty: default_tenant)")
    services: list[str] = Field(
        default_factory=lambda: ["echo"],
        description="DIMSE services it may use: echo, store, find, get, move",
    )
    network: str = Field(
        "",
        description="address or CIDR network its associations must come from (empty: the "
        "host below when set, else any)",
    )
    host: str = Field("", description="where kho connects to it (C-MOVE destination)")
    port: int = Field(0, ge=0, le=65535, description="its port (0: not a C-MOVE destination)")
    tls: bool = Field(False, description="kho's associations to it use TLS (BCP 195)")
    tls_subject: str = Field(
        "",
        description="the Common Name its client certificate must carry: its associations "
        "must then come over TLS with that certificate (mutual TLS)",
    )

    @field_validator("services")
    @classmethod
    def _check_services(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(DIMSE_SERVICES))
        if unknown:
            raise ValueError(f"unknown DIMSE services {unknown}; known: {list(DIMSE_SERVICES)}")
        return value


class SpoolMode(StrEnum):
    """Where an instance received for background finishing is kept until it is finished."""

    # the spool where every host can read it: a filesystem store, or S3 with peer reads
    # (peer_url and peer_token); else the object store itself
    AUTO = "auto"
    ON = "on"  # always the local spool (one host: its processes share the data directory)
    OFF = "off"  # the object store: one object per instance before the acknowledgement


class Settings(BaseSettings):
    """Everything `kho serve`, `kho import` and the tests configure."""

    model_config = SettingsConfigDict(env_prefix="KHO_", extra="forbid")

    data_dir: Path = Field(Path("./kho-data"), description="data directory (catalog, objects)")
    catalog_url: str = Field(
        "", description="catalog database: empty = SQLite in data_dir, or postgresql://..."
    )
    storage_url: str = Field(
        "", description="object store: empty = data_dir/objects, a path, or s3://..."
    )
    ae_title: str = Field("KHO", description="the archive's AE title")
    host: str = Field("127.0.0.1", description="address the DICOM and HTTP servers bind")
    dicom_port: int = Field(11112, description="DICOM (DIMSE) port")
    http_port: int = Field(8080, description="HTTP (DICOMweb) port")
    duplicate_policy: DuplicatePolicy = Field(
        DuplicatePolicy.REPLACE,
        description="a second, different instance under a stored SOP Instance UID: "
        "replace (keep the newer, record it), keep (keep the first) or reject",
    )
    missing_uids: MissingUidPolicy = Field(
        MissingUidPolicy.COERCE,
        description="an instance without Study or Series Instance UID: coerce (catalogue it "
        "under a 2.25 UID and answer with a coercion warning naming it) or reject",
    )
    max_pdu_size: int = Field(
        4 * 1024 * 1024, description="largest P-DATA PDU the archive accepts (0 = unlimited)"
    )
    max_associations: int = Field(64, description="concurrent associations")
    artim_timeout: float = Field(
        10.0,
        description="seconds a DICOM connection may stay silent before its A-ASSOCIATE-RQ "
        "(the ARTIM timer, PS3.8 9.1.5); it holds no association slot meanwhile",
        gt=0,
    )
    at_rest_codec: bool = Field(
        True, description="store native pixel data as JPEG-LS lossless (else as received)"
    )
    finish_in_background: bool = Field(
        True,
        description="acknowledge an instance once it is durable as received, then encode "
        "it (at-rest codec) and make its thumbnail and metadata in background threads; "
        "false: all of that before the acknowledgement",
    )
    finish_threads: int = Field(
        0, description="background finisher threads (0 = one per core)", ge=0
    )
    tune_allocator: bool = Field(
        True,
        description="kho serve sets glibc malloc for a long-running server (2 arenas per "
        "core, pixel buffers of 256 KiB and more mapped on their own, a fixed 1 MiB trim "
        "threshold) and trims its heap every 10 seconds, so that resident memory stays near "
        "what is in use under sustained load; glibc's own MALLOC_* variables still win "
        "(kho.archive.memory)",
    )
    rejected_purge_delay_s: float = Field(
        86400.0,
        ge=0,
        description="how long instances a rejection note (Key Object Selection: rejected "
        "for quality or patient safety reasons, incorrect worklist entry) hides stay "
        "stored before they are deleted; data-retention notes and admin deletions delete "
        "at once (kho.archive.corrections)",
    )
    spool: SpoolMode = Field(
        SpoolMode.AUTO,
        description="with finish_in_background, acknowledge once appended to a local "
        "fsync'd spool in data_dir/spool (on), or once written to the object store (off); "
        "auto: on for a filesystem store; for S3 on only with peer reads (peer_url, "
        "peer_token), since the archive's other hosts must read at once what one acknowledged",
    )
    peer_url: str = Field(
        "",
        description="the URL the archive's other hosts reach this host's HTTP server at "
        "(e.g. http://10.0.0.5:8080): they read instances still in its spool from it",
    )
    peer_token: SecretStr = Field(
        SecretStr(""),
        description="a secret the archive's hosts share, required with every read of one "
        "host's spool by another; empty: no peer reads",
    )
    tile_pyramid: bool = Field(
        True, description="store a JPEG tile pyramid of images over 1024 pixels a side"
    )
    fsync: bool = Field(True, description="fsync objects and catalog commits (durability)")
    garbage_delay_s: float = Field(
        60.0,
        ge=0,
        description="how long a received copy the finisher replaced stays readable (reads "
        "already under way) before it is deleted and its space freed",
    )
    catalog_group_commit: bool = Field(
        True,
        description="SQLite: instance commits arriving together share one transaction and "
        "one flush (each still answered only after it)",
    )
    require_called_ae: bool = Field(False, description="refuse associations to another AE title")
    find_result_limit: int = Field(10000, description="C-FIND / QIDO-RS result cap")
    fuzzy_names: bool = Field(False, description="C-FIND matches person names case-insensitively")
    move_destinations: dict[str, str] = Field(
        default_factory=dict, description="C-MOVE destinations: AE title -> host:port"
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="origins a browser viewer on another site may call DICOMweb from "
        '(["*"] for any); none by default',
    )
    stow_max_bytes: int = Field(
        2 * 1024 * 1024 * 1024, description="largest STOW-RS request body (else 413)", ge=1
    )
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR")

    # --- forwarding (kho.routing): README "Forwarding and de-identification" --------
    forward_destinations: dict[str, ForwardDestination] = Field(
        default_factory=dict,
        description="where instances may be sent: name -> url (dicom://AE@host:port, "
        "dicoms://..., dicom://AE from dicom_peers, stow+https://.../dicom-web), token, "
        "tenants, concurrency, retries, dead_after_s, storage commitment",
    )
    forward_rules: list[ForwardRule] = Field(
        default_factory=list,
        description="which received instances go where: conditions on calling AE, modality, "
        "SOP class, body part, series/study description, tenant; trigger instance, series "
        "or study (once stable); optional de-identification project",
    )
    deid_projects: dict[str, DeidProject] = Field(
        default_factory=dict,
        description="de-identification projects (PS3.15 Annex E Basic Profile and options), "
        "each with its own secret: UIDs, pseudonyms and date shifts consistent within it",
    )
    forward_threads: int = Field(4, ge=1, le=64, description="forwarding worker threads")

    # --- the viewer and the start page (kho.viewer_api): README "Viewing" -----------
    public_url: str = Field(
        "",
        description="the address people reach kho at through a reverse proxy (e.g. "
        "https://pacs.example.org/pacs): every URL kho writes names it",
    )
    trusted_proxies: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="addresses or networks whose Forwarded / X-Forwarded-* headers are "
        "believed (comma-separated); nobody else's",
    )
    viewer_dir: str = Field("", description="where OHIF is installed (default data_dir/viewer)")
    viewer_auto_install: bool = Field(
        True, description="kho serve installs the pinned OHIF build on first start if missing"
    )
    viewer_registry: str = Field(
        "https://registry.npmjs.org", description="npm registry (or a hospital's mirror)"
    )
    viewer_oidc_client_id: str = Field(
        "", description="OHIF's own OIDC sign-in (code flow with PKCE) with this client"
    )
    viewer_oidc_scope: str = Field("openid profile", description="scopes OHIF asks for")
    viewer_decoded_frame_max_bytes: int = Field(
        0,
        ge=0,
        description="frames asked for with transfer-syntax=* in application/octet-stream "
        "(OHIF's Cornerstone) go out decoded (Explicit VR Little Endian) when stored "
        "losslessly compressed and at most this many bytes decoded, sparing the browser "
        "its WebAssembly decode (0, the default: as stored; benchmarks/viewer.py found no "
        "gain on one machine)",
    )

    # --- HIS integration (kho.hl7): README "HIS integration" --------------------------
    hl7_port: int = Field(2575, ge=0, le=65535, description="HL7 v2 MLLP port (0: off)")
    hl7_tls_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="HL7 v2 MLLP over TLS (kho's tls_cert_file and tls_key_file; client "
        "certificates as for DICOM TLS); 0: off",
    )
    hl7_senders: dict[str, str] = Field(
        default_factory=dict,
        description='HL7 senders ("APP^FACILITY" or "APP") -> tenant; with auth on, other '
        "senders are refused (AR)",
    )
    hl7_networks: list[str] = Field(
        default_factory=list, description="networks (CIDR) HL7 connections may come from"
    )
    citizen_id_issuer: str = Field(
        "CCCD", description="the issuer the 12-digit citizen ID is kept under"
    )
    hl7_patient_id_issuer: str = Field(
        "", description="the issuer the HIS's local patient IDs are filed under"
    )
    hl7_application: str = Field(
        "KHO", description="MSH-3 of ACKs when a message names no receiving application"
    )
    hl7_max_connections: int = Field(64, ge=1, description="concurrent MLLP connections")
    hl7_idle_timeout_s: float = Field(300.0, gt=0, description="an idle MLLP connection")
    hl7_max_message_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="largest HL7 message accepted"
    )
    hl7_housekeeping_interval_s: float = Field(
        10.0, gt=0, description="worklist completion by arrived studies, merge follow-up"
    )

    # --- TLS (PS3.15 BCP 195: TLS 1.2 and 1.3 only) ----------------------------------
    tls_cert_file: str = Field(
        "", description="the archive's certificate chain (PEM) for DICOM TLS and HTTPS"
    )
    tls_key_file: str = Field("", description="its private key (PEM)")
    tls_ca_file: str = Field(
        "",
        description="CA certificates (PEM) that client certificates are checked against and "
        "that peers' certificates are checked against on kho's own TLS associations",
    )
    tls_require_client_cert: bool = Field(
        False,
        description="DICOM TLS only (not HTTPS): refuse a handshake without a client certificate",
    )
    dicom_tls_port: int = Field(
        2762, ge=0, le=65535, description="DICOM TLS port (used when tls_cert_file is set)"
    )
    dicom_plain: bool = Field(
        True, description="serve DICOM without TLS on dicom_port as well (false: TLS only)"
    )
    http_tls: bool = Field(
        False,
        description="serve HTTP as HTTPS only on http_port (tls_cert_file), with HSTS",
    )

    # --- audit trail (kho.audit): PS3.15 A.5 records, hash-chained in each catalog ----
    audit: bool = Field(
        True,
        description="record every access to patient data and every security event "
        "(a store's record commits with the instance; reads within a second)",
    )
    audit_read_window_s: float = Field(
        60.0, gt=0, description="one Instances Accessed record per caller and study per window"
    )
    audit_chain_key: SecretStr = Field(
        SecretStr(""),
        description="a secret that makes the chain's hashes HMAC-SHA-256 (someone with "
        "write access to the database alone cannot recompute them); empty: SHA-256",
    )
    audit_syslog_host: str = Field(
        "", description="forward records to this audit repository (syslog over TLS)"
    )
    audit_syslog_port: int = Field(6514, ge=1, le=65535, description="its port (RFC 5425)")
    audit_syslog_ca_file: str = Field("", description="CA to check the repository against")
    audit_syslog_cert_file: str = Field("", description="kho's client certificate (mutual TLS)")
    audit_syslog_key_file: str = Field("", description="its private key")

    # --- access (kho.access): README "Securing kho" ----------------------------------
    auth: AuthMode = Field(
        AuthMode.AUTO,
        description="auto: on when oidc_issuer or dicom_peers is configured; on: every "
        "caller proves who it is (deny by default); off: every caller is a platform admin "
        "(loopback addresses only, unless insecure_open_network)",
    )
    insecure_open_network: bool = Field(
        False,
        description="let kho serve bind a non-loopback address with auth off: anyone who "
        "reaches the ports reads and writes every patient (logged loudly at start)",
    )
    default_tenant: str = Field(
        "default",
        description="the hospital of callers and instances that name none (an archive from "
        "before tenants holds only this one)",
    )
    tenants: list[str] = Field(
        default_factory=list,
        description="the other hospitals of a shared archive; each has its own catalog "
        "and object keys, and a grant naming an undeclared one grants nothing",
    )
    dicom_peers: dict[str, DicomPeer] = Field(
        default_factory=dict,
        description="the AE registry: AE title -> tenant, services, network, host, port "
        "(with auth on, only these may associate; C-MOVE goes only to those with a port)",
    )
    oidc_issuer: str = Field(
        "", description="OpenID Connect issuer whose bearer tokens (JWT) are accepted (iss)"
    )
    oidc_audience: str = Field("", description="the audience (aud) a token must name")
    oidc_jwks_url: str = Field(
        "",
        description="the issuer's JWKS URL (empty: jwks_uri from the issuer's "
        "/.well-known/openid-configuration)",
    )
    oidc_jwks_file: str = Field(
        "", description="a JWKS file to read the issuer's keys from instead of a URL"
    )
    oidc_algorithms: list[str] = Field(
        default_factory=lambda: ["RS256", "PS256", "ES256"],
        description="signature algorithms accepted (asymmetric only; never none or HS*)",
    )
    oidc_leeway_s: float = Field(
        30.0, ge=0, le=300, description="clock skew tolerated on exp, nbf and iat"
    )
    oidc_roles_claim: str = Field(
        "roles",
        description="the claim (dotted path, e.g. realm_access.roles) listing roles: "
        "'viewer', 'uploader', 'admin' (for the token's tenant), 'viewer@<tenant>', "
        "'admin@*' (the whole platform)",
    )
    oidc_tenant_claim: str = Field(
        "tenant", description="the claim naming the caller's hospital (tenant)"
    )
    oidc_user_claim: str = Field(
        "preferred_username", description="the claim naming the person (audit, logs)"
    )

    @field_validator("cors_origins", "trusted_proxies", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        # KHO_CORS_ORIGINS=https://emr.example,https://viewer.example (or a JSON list)
        if isinstance(value, str):
            if value.strip().startswith("["):
                return json.loads(value)
            return [o.strip() for o in value.split(",") if o.strip()]
        return value

    @field_validator("peer_token")
    @classmethod
    def _check_peer_token(cls, value: SecretStr) -> SecretStr:
        if 0 < len(value.get_secret_value()) < 16:
            raise ValueError("peer_token must be at least 16 characters (or empty: no peer reads)")
        return value

    @field_validator("peer_url")
    @classmethod
    def _check_peer_url(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("peer_url must be an http:// or https:// URL")
        return value.rstrip("/")

    @field_validator("ae_title")
    @classmethod
    def _check_ae(cls, value: str) -> str:
        value = value.strip()
        if not value or len(value) > 16 or "\\" in value:
            raise ValueError("AE title must be 1-16 characters without backslash")
        return value

    @field_validator("oidc_algorithms")
    @classmethod
    def _check_algorithms(cls, value: list[str]) -> list[str]:
        allowed = {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}
        allowed |= {"ES256", "ES384", "ES512", "EdDSA"}
        bad = [a for a in value if a not in allowed]
        if bad or not value:
            raise ValueError(f"oidc_algorithms must be asymmetric JWS algorithms, not {bad}")
        return value

    @model_validator(mode="after")
    def _check_tenants(self) -> Settings:
        names = [self.default_tenant, *self.tenants]
        for name in names:
            if not re.match(TENANT_NAME, name):
                raise ValueError(f"tenant name {name!r} must match {TENANT_NAME}")
        for title, peer in self.dicom_peers.items():
            if not 0 < len(title.strip()) <= 16 or "\\" in title:
                raise ValueError(f"dicom_peers: AE title {title!r} must be 1-16 characters")
            if peer.tenant and peer.tenant not in names:
                raise ValueError(f"dicom_peers.{title}: tenant {peer.tenant!r} is not declared")
        if self.http_tls and not (self.tls_cert_file and self.tls_key_file):
            raise ValueError("http_tls needs tls_cert_file and tls_key_file")
        if not self.dicom_plain and not self.dicom_tls:
            raise ValueError(
                "dicom_plain = false needs a DICOM TLS port (tls_cert_file, tls_key_file, "
                "dicom_tls_port)"
            )
        if self.tls_require_client_cert and not self.tls_ca_file:
            raise ValueError("tls_require_client_cert needs tls_ca_file (to check them against)")
        if self.hl7_tls_port and not (self.tls_cert_file and self.tls_key_file):
            raise ValueError("hl7_tls_port needs tls_cert_file and tls_key_file")
        bound = [t for t, p in self.dicom_peers.items() if p.tls_subject]
        if bound and not (self.dicom_tls and self.tls_ca_file):
            raise ValueError(
                f"dicom_peers {bound} name a tls_subject: that needs a DICOM TLS port and "
                "tls_ca_file"
            )
        if self.oidc_issuer and not self.oidc_audience:
            raise ValueError("oidc_audience is required with oidc_issuer")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _TomlSource(settings_cls)

    # --- derived ---------------------------------------------------------------------

    @property
    def sqlite_path(self) -> Path:
        return self.data_dir / "catalog.sqlite3"

    @property
    def objects_dir(self) -> Path:
        return self.data_dir / "objects"

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def auth_on(self) -> bool:
        """Whether callers must authenticate (the auth setting resolved)."""
        if self.auth == AuthMode.AUTO:
            return bool(self.oidc_issuer or self.dicom_peers)
        return self.auth == AuthMode.ON

    @property
    def dicom_tls(self) -> bool:
        """Whether a DICOM TLS port is served."""
        return bool(self.tls_cert_file and self.tls_key_file and self.dicom_tls_port)

    @property
    def hl7_tls(self) -> bool:
        """Whether an MLLP-over-TLS port is served."""
        return bool(self.tls_cert_file and self.tls_key_file and self.hl7_tls_port)

    @property
    def tenant_names(self) -> list[str]:
        """Every hospital of the archive, the default one first."""
        return [self.default_tenant, *(t for t in self.tenants if t != self.default_tenant)]

    @property
    def peer_reads(self) -> bool:
        """Whether this host reads other hosts' spools and serves its own to them."""
        return bool(self.peer_token.get_secret_value())

    @property
    def uses_spool(self) -> bool:
        if self.spool == SpoolMode.AUTO:
            return not self.storage_url.startswith("s3://") or (
                self.peer_reads and bool(self.peer_url)
            )
        return self.spool == SpoolMode.ON

    def move_destination(self, ae_title: str) -> tuple[str, int] | None:
        """(host, port) of a configured C-MOVE destination, or None."""
        target = self.move_destinations.get(ae_title.strip())
        if target is None:
            return None
        host, _, port = target.rpartition(":")
        return host, int(port)


_CONFIG_FILE: ContextVar[str | None] = ContextVar("kho_config_file", default=None)


class _TomlSource(PydanticBaseSettingsSource):
    """Reads the TOML file named by KHO_CONFIG (set by ``kho --config`` too)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = _CONFIG_FILE.get() or os.environ.get("KHO_CONFIG")
        if not path:
            return {}
        try:
            with open(path, "rb") as fh:
                return tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read settings file {path}: {exc}") from exc


def load_settings(config_file: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Settings from the file (or KHO_CONFIG), the environment and ``overrides``."""
    token = _CONFIG_FILE.set(str(config_file) if config_file is not None else None)
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    finally:
        _CONFIG_FILE.reset(token)
