"""Every third-party module kho imports at run time is a declared dependency.

A plain `pip install .` gets only [project].dependencies; an import satisfied by a test extra
(or by a package that happens to be pulled in by another one) works in CI and fails for users.
So every import in kho/ — at module top, inside functions, and string literals given to
importlib.import_module — must name a distribution listed directly in [project].dependencies.
Imports under ``if TYPE_CHECKING:`` never run and are not counted.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib.metadata import packages_distributions
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "kho"
OWN_TOP_LEVEL = "kho"


@dataclass(frozen=True)
class UndeclaredImport:
    filename: str
    line: int
    module: str
    distributions: tuple[str, ...]  # the distributions that provide it here; () if none

    def __str__(self) -> str:
        provided = ", ".join(self.distributions) or "no installed distribution"
        return f"{self.filename}:{self.line}: import {self.module} ({provided})"


def normalize(name: str) -> str:
    """PEP 503 name: case and runs of -_. do not matter."""
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_dependencies(pyproject: Path = ROOT / "pyproject.toml") -> set[str]:
    """Normalized names of the distributions in [project].dependencies (extras not included)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    return {normalize(Requirement(spec).name) for spec in project.get("dependencies", [])}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def runtime_imports(source: str, filename: str = "<source>") -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import that can run: top-level, lazy (in
    functions, methods, try blocks), and importlib.import_module("literal"); relative imports
    and ``if TYPE_CHECKING:`` bodies are skipped."""
    skipped: set[int] = set()
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            skipped.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id)
            == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and not node.args[0].value.startswith(".")
        ):
            yield node.lineno, node.args[0].value


def undeclared_imports(
    source: str,
    filename: str,
    declared: set[str],
    provided_by: Mapping[str, list[str]],
) -> list[UndeclaredImport]:
    """The imports in ``source`` of third-party modules that no declared distribution
    provides.  ``provided_by`` maps top-level import names to distribution names (as
    importlib.metadata.packages_distributions() does); the stdlib and kho itself are exempt."""
    found = []
    for line, module in runtime_imports(source, filename):
        top = module.partition(".")[0]
        if top == OWN_TOP_LEVEL or top in sys.stdlib_module_names:
            continue
        distributions = tuple(provided_by.get(top, ()))
        if not any(normalize(d) in declared for d in distributions):
            found.append(UndeclaredImport(filename, line, module, distributions))
    return found


def test_every_runtime_import_of_kho_is_a_declared_dependency() -> None:
    declared = declared_dependencies()
    provided_by = packages_distributions()
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20, "kho/ sources not found"
    undeclared = [
        problem
        for path in files
        for problem in undeclared_imports(
            path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)), declared, provided_by
        )
    ]
    assert not undeclared, (
        "kho imports modules that [project].dependencies does not provide (a plain "
        "`pip install .` lacks them):\n" + "\n".join(map(str, undeclared))
    )


def test_the_rendering_encoder_is_a_declared_dependency() -> None:
    """The regression this test exists for: rendered images answered 500 on a plain install."""
    source = (PACKAGE / "archive" / "read" / "rendering.py").read_text(encoding="utf-8")
    imported = {module.partition(".")[0] for _, module in runtime_imports(source)}
    encoders = imported & {"imagecodecs", "PIL"}
    assert encoders, "rendering.py no longer imports an image encoder: update this test"
    provided_by = packages_distributions()
    declared = declared_dependencies()
    for encoder in encoders:
        assert any(normalize(d) in declared for d in provided_by[encoder]), encoder


SYNTHETIC = """
from __future__ import annotations

import json
import numpy as np
from typing import TYPE_CHECKING

from kho.errors import KhoError
from . import sibling

if TYPE_CHECKING:
    import only_for_mypy


def encode(img):
    import imagecodecs

    return imagecodecs.jpeg8_encode(img)


def plugin():
    import importlib

    return importlib.import_module("some_plugin.sub")
"""
SYNTHETIC_PROVIDERS = {
    "numpy": ["numpy"],
    "imagecodecs": ["imagecodecs"],
    "only_for_mypy": ["only-for-mypy"],
    "some_plugin": ["Some_Plugin"],
}


def test_checker_catches_a_lazy_import_missing_from_the_dependencies() -> None:
    found = undeclared_imports(SYNTHETIC, "synthetic.py", {"numpy"}, SYNTHETIC_PROVIDERS)
    assert [(p.module, p.line, p.distributions) for p in found] == [
        ("imagecodecs", 16, ("imagecodecs",)),
        ("some_plugin.sub", 24, ("Some_Plugin",)),
    ]
    assert "synthetic.py:16: import imagecodecs (imagecodecs)" in [str(p) for p in found]


def test_checker_accepts_the_same_source_once_declared() -> None:
    declared = {"numpy", "imagecodecs", normalize("some.plugin")}
    assert undeclared_imports(SYNTHETIC, "synthetic.py", declared, SYNTHETIC_PROVIDERS) == []


def test_checker_flags_a_module_no_distribution_provides() -> None:
    found = undeclared_imports("import not_installed_anywhere\n", "x.py", {"numpy"}, {})
    assert [(p.module, p.distributions) for p in found] == [("not_installed_anywhere", ())]
    assert str(found[0]) == "x.py:1: import not_installed_anywhere (no installed distribution)"


def test_declared_dependencies_reads_names_without_versions_or_extras(tmp_path: Path) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[project]\nname = "x"\ndependencies = ["psycopg[binary]>=3.1", "Pydantic_Settings>=2"]\n'
        '[project.optional-dependencies]\ntest = ["imagecodecs"]\n'
    )
    assert declared_dependencies(pyproject) == {"psycopg", "pydantic-settings"}
