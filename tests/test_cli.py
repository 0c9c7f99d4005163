"""The `kho` command: import (with its summary and rejections), verify, stats (per tenant),
keys, and serve's refusal to open the network without authentication."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kho.access.api_keys import ApiKeys
from kho.archive.archive import Archive
from kho.archive.config import Settings, load_settings
from kho.cli import _log_security_posture, check_bind_security, is_loopback, main
from kho.errors import AuthenticationError
from tests.conftest import sample_files
from tests.helpers.dcmtk import free_port
from tests.helpers.server import kho_serve


def kho(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kho.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_import_stores_folder_and_reports_duplicates_and_rejections(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.dcm").write_bytes(b"")
    (bad / "garbage.dcm").write_bytes(b"not dicom at all" * 20)
    samples = Path(sample_files()[0]).parent

    first = kho("import", "--data-dir", str(data_dir), "--json", str(samples), str(bad))
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout)
    others = [p for p in samples.iterdir() if p.suffix != ".dcm"]  # README, licence
    assert summary["files"] == len(sample_files()) + len(others) + 2
    reasons = {Path(r["path"]).name: r["reason"] for r in summary["rejections"]}
    assert set(reasons) == {"empty.dcm", "garbage.dcm", *(p.name for p in others)}
    assert "0 bytes" in reasons["empty.dcm"]
    assert "not a DICOM" in reasons["garbage.dcm"] or "truncated" in reasons["garbage.dcm"]
    assert summary["stored"] + summary["duplicates"] + summary["replaced"] == len(sample_files())

    again = json.loads(kho("import", "--data-dir", str(data_dir), "--json", str(samples)).stdout)
    # nothing new; files that share a SOP Instance UID with another sample replace each other
    # again (policy replace), every other file is an identical duplicate
    assert again["stored"] == 0
    assert again["duplicates"] + again["replaced"] == len(sample_files())
    assert again["duplicates"] >= 30

    verify = kho("verify", "--data-dir", str(data_dir))
    assert verify.returncode == 0
    assert "0 damaged" in verify.stdout

    stats = json.loads(kho("stats", "--data-dir", str(data_dir), "--json").stdout)
    assert stats["instances"] == summary["stored"]
    assert stats["received_bytes"] > 0
    assert {row["modality"] for row in stats["by_modality"]} >= {"CT", "MR", "US"}


def test_verify_finds_a_damaged_object(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    kho("import", "--data-dir", str(data_dir), "--quiet", str(sample_files()[0]))
    with Archive(Settings(data_dir=data_dir)) as archive:
        record = next(archive.catalog.iter_instances())
        key = record.header_key
        header = bytearray(archive.store.get(key))
        header[-1] ^= 0xFF  # one flipped bit on disk
        archive.store.put(key, bytes(header))
    verify = kho("verify", "--data-dir", str(data_dir))
    assert verify.returncode == 1
    # an uncompressed object reads back different bytes; a compressed one fails to inflate
    assert f"BAD {record.sop_uid}: " in verify.stdout


# --- kho keys ---------------------------------------------------------------------------


def test_keys_create_list_revoke_as_real_commands(tmp_path: Path) -> None:
    data_dir = str(tmp_path / "data")
    env = {**os.environ, "KHO_TENANTS": '["hosp-a"]'}

    def keys(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "kho.cli", "keys", *args, "--data-dir", data_dir]
        return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)

    made = keys(
        "create", "--name", "emr-backend", "--grant", "viewer@hosp-a", "--grant", "uploader@hosp-a"
    )
    assert made.returncode == 0, made.stderr
    text = made.stdout.strip()  # the key alone on stdout
    key_id = text.split("_")[1]
    assert text.startswith(f"kho_{key_id}_") and "\n" not in text
    assert "not shown again" in made.stderr
    assert text not in made.stderr

    listed = keys("list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [(r["id"], r["name"], r["grants"], r["revoked"]) for r in rows] == [
        (key_id, "emr-backend", ["viewer@hosp-a", "uploader@hosp-a"], None)
    ]
    assert text.split("_", 2)[2] not in listed.stdout
    table = keys("list").stdout
    assert key_id in table and "emr-backend" in table and "viewer@hosp-a" in table

    settings = Settings(data_dir=Path(data_dir), tenants=["hosp-a"])
    with Archive(settings) as archive:
        api_keys = ApiKeys(archive.catalog, settings.tenant_names)
        caller = api_keys.verify(text)
        assert (caller.name, caller.home_tenant) == ("emr-backend", "hosp-a")

        revoked = keys("revoke", key_id)  # another process: this one's next check refuses
        assert revoked.returncode == 0, revoked.stderr
        assert f"revoked API key {key_id}" in revoked.stdout
        with pytest.raises(AuthenticationError):
            api_keys.verify(text)

    again = keys("revoke", key_id)
    assert again.returncode == 1 and "no valid API key" in again.stderr
    assert json.loads(keys("list", "--json").stdout)[0]["revoked"]


def test_keys_create_refuses_a_grant_that_grants_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = str(tmp_path / "data")
    for grant in ("viewer", "viewer@hosp-z", "root@*"):
        code = main(["keys", "create", "--data-dir", data_dir, "--name", "x", "--grant", grant])
        assert code != 0
        assert "grants nothing" in capsys.readouterr().err
    assert main(["keys", "list", "--data-dir", data_dir, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_keys_create_json_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data_dir = str(tmp_path / "data")
    args = ["keys", "create", "--data-dir", data_dir, "--name", "ops", "--grant", "admin@*"]
    assert main([*args, "--json"]) == 0
    captured = capsys.readouterr()
    made = json.loads(captured.out)
    assert made["grants"] == ["admin@*"] and made["name"] == "ops"
    assert made["key"].startswith(f"kho_{made['id']}_")
    assert "not shown again" in captured.err


# --- kho serve: secure defaults -----------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_serve_refuses_a_network_address_without_authentication(tmp_path: Path, host: str) -> None:
    data_dir = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KHO_")}
    port = free_port()
    command = [sys.executable, "-m", "kho.cli", "serve", "--data-dir", str(data_dir)]
    command += ["--host", host, "--port", str(port), "--http-port", "0"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode != 0
    for advice in ("oidc_issuer", "kho keys create", "dicom_peers", "insecure_open_network"):
        assert advice in done.stderr
    assert f"refusing to serve on {host}" in done.stderr
    assert "kho: DICOM" not in done.stdout  # no server was started ...
    assert not data_dir.exists()  # ... nor even the archive opened


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("localhost", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("10.1.2.3", False),
        ("fe80::1", False),
        ("pacs.hospital.example", False),
    ],
)
def test_only_loopback_binds_may_run_without_authentication(
    tmp_path: Path, host: str, loopback: bool
) -> None:
    assert is_loopback(host) is loopback
    off = Settings(data_dir=tmp_path)
    refusal = check_bind_security(off, host)
    assert (refusal is None) is loopback
    if refusal:
        assert "insecure_open_network" in refusal and "oidc_issuer" in refusal
    # any identity source turns authentication on; the opt-out accepts the risk
    for secured in (
        Settings(data_dir=tmp_path, auth="on"),
        Settings(data_dir=tmp_path, oidc_issuer="https://id.example/realms/k", oidc_audience="kho"),
        Settings(data_dir=tmp_path, dicom_peers={"CT1": {"services": ["store"]}}),
        Settings(data_dir=tmp_path, insecure_open_network=True),
    ):
        assert check_bind_security(secured, host) is None
    # auth off said explicitly still needs the opt-out off loopback
    assert (check_bind_security(Settings(data_dir=tmp_path, auth="off"), host) is None) is loopback


def test_insecure_open_network_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KHO_INSECURE_OPEN_NETWORK", "true")
    settings = load_settings(None, data_dir=tmp_path, host="0.0.0.0")
    assert settings.insecure_open_network and not settings.auth_on
    assert check_bind_security(settings, settings.host) is None


def test_posture_is_logged_and_the_opt_out_loudly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # the decision and the log lines of an open-network start, without binding 0.0.0.0
    settings = Settings(
        data_dir=tmp_path / "data", host="0.0.0.0", insecure_open_network=True, tenants=["hosp-a"]
    )
    with Archive(settings) as archive, caplog.at_level(logging.INFO, logger="kho"):
        _log_security_posture(settings, archive, 11112, 8080)
    lines = [r.getMessage() for r in caplog.records]
    assert any("auth OFF" in m and "tenants default, hosp-a" in m for m in lines)
    assert any("0.0.0.0:11112" in m and "0.0.0.0:8080" in m for m in lines)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("INSECURE" in m and "every patient" in m for m in warnings)

    caplog.clear()
    secured = Settings(
        data_dir=tmp_path / "data",
        oidc_issuer="https://id.example/realms/kho",
        oidc_audience="kho",
        dicom_peers={"CT1": {"services": ["store"]}, "WS1": {"services": ["find"]}},
    )
    with Archive(secured) as archive, caplog.at_level(logging.INFO, logger="kho"):
        ApiKeys(archive.catalog, secured.tenant_names).create("emr", ["viewer@default"])
        _log_security_posture(secured, archive, 11112, 8080)
    first = caplog.records[0].getMessage()
    assert "auth on" in first and "https://id.example/realms/kho" in first
    assert "API keys 1" in first and "registered AEs 2" in first
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_serve_on_loopback_logs_its_security_posture(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with kho_serve(data_dir) as (_proc, port):
        log_file = tmp_path / f"serve-{port}.log"
        deadline = time.monotonic() + 30
        while "security: DICOM" not in log_file.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
    text = log_file.read_text()
    assert "security: auth OFF" in text and "API keys 0" in text
    assert f"security: DICOM KHO on 127.0.0.1:{port}" in text
    assert "INSECURE" not in text


# --- kho stats per tenant -------------------------------------------------------------------


def test_stats_of_the_default_tenant_and_of_every_tenant(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "data"
    with Archive(Settings(data_dir=data_dir)) as archive:
        archive.ingest_part10(sample_files()[0].read_bytes(), defer=False)
    base = ["stats", "--data-dir", str(data_dir)]
    assert main(base) == 0
    default_text = capsys.readouterr().out
    assert "instances 1" in default_text
    assert main([*base, "--tenant", "default"]) == 0
    assert capsys.readouterr().out == f"tenant default\n{default_text}"
    assert main([*base, "--all-tenants", "--json"]) == 0
    per_tenant = json.loads(capsys.readouterr().out)["tenants"]
    assert list(per_tenant) == ["default"] and per_tenant["default"]["instances"] == 1
    assert main([*base, "--all-tenants"]) == 0
    assert "all 1 tenants: patients 1  studies 1  instances 1" in capsys.readouterr().out
    assert main([*base, "--tenant", "hosp-z"]) != 0
    assert "no tenant 'hosp-z'" in capsys.readouterr().err


def test_stats_keep_hospitals_apart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / "data"
    settings = Settings(data_dir=data_dir, tenants=["hosp-a"])
    files = sample_files()
    with Archive(settings) as archive:
        archive.ingest_part10(files[0].read_bytes(), defer=False)
        hosp_a = archive.for_tenant("hosp-a")
        for path in files[:3]:  # the same first file too: another hospital's own copy
            hosp_a.ingest_part10(path.read_bytes(), defer=False)
        expected = {
            name: archive.for_tenant(name).stats()["instances"] for name in ("default", "hosp-a")
        }
    assert expected["default"] == 1 and expected["hosp-a"] >= 2
    env_args = ["--data-dir", str(data_dir)]
    monkeypatch.setenv("KHO_TENANTS", '["hosp-a"]')
    assert main(["stats", *env_args, "--tenant", "hosp-a", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["instances"] == expected["hosp-a"]
    assert main(["stats", *env_args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["instances"] == 1
    assert main(["stats", *env_args, "--all-tenants", "--json"]) == 0
    both = json.loads(capsys.readouterr().out)["tenants"]
    assert {name: s["instances"] for name, s in both.items()} == expected
