"""The house's import rules (pyproject.toml [tool.importlinter]): front doors above the
archive's services above the foundations, the archive's flows below their composition root,
no import loop in any folder; imports under TYPE_CHECKING count."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


# (file to change, what is appended to it, the contract it breaks)
BREAKS = [
    pytest.param(
        # base imports schema: schema importing base back closes a loop (a type-only one)
        "kho/archive/catalog/schema.py",
        "from kho.archive.catalog.base import Catalog",
        "No import loops among the modules of any folder BROKEN",
        id="loop-in-a-folder",
    ),
    pytest.param(
        "kho/archive/read/pixels.py",
        "from kho.archive.archive import Archive",
        "no flow imports it BROKEN",
        id="flow-imports-the-archive",
    ),
    pytest.param(
        "kho/codecs/base.py",
        "from kho.archive.config import Settings",
        "foundations BROKEN",
        id="foundation-imports-a-service",
    ),
]


@pytest.mark.parametrize(("path", "line", "broken"), BREAKS)
def test_a_forbidden_import_breaks_the_contracts(
    tmp_path: Path, path: str, line: str, broken: str
) -> None:
    root = _copy(tmp_path)
    target = root / path
    target.write_text(
        target.read_text()
        + "\nfrom typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n"
        + f"    {line}  # noqa: F401\n"
    )
    result = lint(root)
    assert result.returncode != 0
    assert broken in result.stdout
