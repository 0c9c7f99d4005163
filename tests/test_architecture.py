"""The house's import rules (pyproject.toml [tool.importlinter]): front doors above the
archive's services above the foundations, the archive's flows below their composition root,
no import loop in any folder; imports under TYPE_CHECKING count."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
        "sys.exit(lint_imports_command())", "--no-cache"]  # fmt: skip


def lint(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        LINT, cwd=root, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def test_the_import_contracts_hold() -> None:
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


def _copy(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "kho", tmp_path / "kho", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_a_loop_inside_a_folder_breaks_the_contracts(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    schema = root / "kho/archive/catalog/schema.py"
    # base imports schema; schema importing base back closes a loop (a type-only one)
    schema.write_text(
        schema.read_text()
        + "\nfrom typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n"
        + "    from kho.archive.catalog.base import Catalog  # noqa: F401\n"
    )
    result = lint(root)
    assert result.returncode != 0
    assert "No import loops among the modules of any folder BROKEN" in result.stdout


def test_a_flow_importing_the_archive_breaks_the_contracts(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    pixels = root / "kho/archive/read/pixels.py"
    pixels.write_text(
        pixels.read_text()
        + "\nfrom typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n"
        + "    from kho.archive.archive import Archive  # noqa: F401\n"
    )
    result = lint(root)
    assert result.returncode != 0
    assert "no flow imports it BROKEN" in result.stdout


def test_a_foundation_importing_a_service_breaks_the_contracts(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    codecs = root / "kho/codecs/base.py"
    codecs.write_text(codecs.read_text() + "\nimport kho.archive.config  # noqa: F401\n")
    result = lint(root)
    assert result.returncode != 0
    assert "foundations BROKEN" in result.stdout
