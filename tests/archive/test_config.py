"""Settings from a TOML file, KHO_* environment variables and keyword overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from kho.archive.config import DuplicatePolicy, load_settings
from kho.errors import ConfigError


def test_toml_then_environment_then_overrides(tmp_path: Path, monkeypatch) -> None:
    toml = tmp_path / "kho.toml"
    toml.write_text(
        'ae_title = "FROM_TOML"\ndicom_port = 4242\nduplicate_policy = "reject"\n'
        '[move_destinations]\nWS1 = "127.0.0.1:11113"\n'
    )
    monkeypatch.delenv("KHO_CONFIG", raising=False)
    monkeypatch.setenv("KHO_DICOM_PORT", "5151")
    settings = load_settings(toml)
    assert settings.ae_title == "FROM_TOML"
    assert settings.dicom_port == 5151  # the environment wins over the file
    assert settings.duplicate_policy is DuplicatePolicy.REJECT
    assert settings.move_destination("WS1") == ("127.0.0.1", 11113)
    assert settings.move_destination("NOPE") is None
    assert load_settings(toml, dicom_port=6161).dicom_port == 6161  # options win over both


@pytest.mark.parametrize(
    "content",
    ['ae_title = "THIS_AE_TITLE_IS_FAR_TOO_LONG"', "unknown_setting = 1", "not toml ["],
)
def test_bad_settings_are_refused_with_a_message(tmp_path: Path, monkeypatch, content) -> None:
    monkeypatch.delenv("KHO_CONFIG", raising=False)
    toml = tmp_path / "kho.toml"
    toml.write_text(content)
    with pytest.raises(ConfigError):
        load_settings(toml)


def test_cors_origins_from_the_environment_comma_separated_or_json(monkeypatch) -> None:
    monkeypatch.delenv("KHO_CONFIG", raising=False)
    monkeypatch.setenv("KHO_CORS_ORIGINS", "https://emr.example, https://viewer.example")
    assert load_settings().cors_origins == ["https://emr.example", "https://viewer.example"]
    monkeypatch.setenv("KHO_CORS_ORIGINS", '["*"]')
    assert load_settings().cors_origins == ["*"]
    monkeypatch.setenv("KHO_STOW_MAX_BYTES", "1000")
    assert load_settings().stow_max_bytes == 1000


def test_spool_auto_is_on_where_every_host_can_read_it(monkeypatch) -> None:
    """auto: the spool with a filesystem store; with S3 only when peer reads let the
    archive's other hosts read what this one acknowledged from its spool."""
    monkeypatch.delenv("KHO_CONFIG", raising=False)
    s3 = "s3://key:secret@127.0.0.1:9000/bucket"
    assert load_settings().uses_spool
    assert not load_settings(storage_url=s3).uses_spool
    # no URL to be read at
    assert not load_settings(storage_url=s3, peer_token="t" * 16).uses_spool
    with pytest.raises(ConfigError, match="16 characters"):
        load_settings(peer_token="short")
    with pytest.raises(ConfigError, match="http"):
        load_settings(peer_url="10.0.0.5:8080")
    monkeypatch.setenv("KHO_PEER_TOKEN", "shared-secret-of-the-archive")
    monkeypatch.setenv("KHO_PEER_URL", "http://10.0.0.5:8080")
    settings = load_settings(storage_url=s3)
    assert settings.uses_spool and settings.peer_reads
    assert "shared-secret-of-the-archive" not in repr(settings)  # kept out of logs
    assert not load_settings(storage_url=s3, spool="off").uses_spool
