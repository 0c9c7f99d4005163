"""Settings: one object, from a TOML file and ``KHO_*`` environment variables.

Precedence (highest first): explicit keyword arguments, environment, TOML file, defaults.
The TOML file is named by ``KHO_CONFIG`` or ``--config``; its keys are the field names below
(``[move_destinations]`` is a table of AE title -> "host:port").
"""

from __future__ import annotations

import json
import os
import tomllib
from contextvars import ContextVar
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

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

    @field_validator("cors_origins", mode="before")
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
