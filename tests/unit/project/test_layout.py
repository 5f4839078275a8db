"""The house rules of the tests and the import contract, checked (CONTRIBUTING.md, "Layout"):

- unit tests never sleep: no ``time.sleep`` / ``asyncio.sleep`` with an argument other than
  the literal 0 anywhere in tests/unit (time moves on a fake clock: tests/fakes/clock.py, or
  on the loop's virtual time: tests/fakes/looptime.py);
- no test file imports another test file (shared helpers live in tests/fakes/, a
  ``*_rig.py`` module or a conftest.py);
- tests mirror the tree: every module under cp_token/ and sidecar/ has
  tests/unit/<package>/test_<module>.py, but for the short list below, each with its reason;
  and every unit test file outside project/ and fakes/ is named after a module
  (``test_<module>.py``, or ``test_<module>_<aspect>.py``);
- the import contract is live: ``lint-imports`` with the project's configuration fails on a
  copy of the packages given one forbidden import (the sidecar importing the CP's app);
- no stale path: every path of the repository named in its text files exists.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
UNIT = ROOT / "tests" / "unit"
PACKAGES = ("cp_token", "sidecar")

# Modules without a unit test file of their own, and why. Keep it short: an entry whose module
# is gone, or that now has its test file, fails test_the_allow_list_is_not_stale.
NO_TEST_FILE = {
    "cp_token/__init__.py": "the version string only (tests/unit/project/test_release.py)",
    "cp_token/authn/__init__.py": "Protocols only: no code runs",
    "cp_token/minters/__init__.py": "Protocols and frozen dataclasses only: no code runs",
    "cp_token/commands/__init__.py": "a docstring",
    "cp_token/http/__init__.py": "a docstring",
    "cp_token/inject/__init__.py": "a docstring",
    "cp_token/kube/__init__.py": "a docstring",
    "cp_token/runtime/__init__.py": "a docstring",
    "cp_token/settings/__init__.py": "a docstring (it imports nothing on purpose)",
    "sidecar/__init__.py": "a docstring",
}

# Test files that may still sleep, and why; remove an entry once its file is fixed.
MAY_SLEEP: dict[str, str] = {}


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def modules() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def test_file_of(module: Path) -> Path:
    """cp_token/x.py -> tests/unit/test_x.py; cp_token/pkg/_x.py -> tests/unit/pkg/test_x.py;
    sidecar/x.py -> tests/unit/sidecar/test_x.py; a package's __init__ -> test_init.py,
    __main__ -> test_main.py."""
    parts = module.relative_to(ROOT).parts
    folder = parts[1:-1] if parts[0] == "cp_token" else parts[:-1]
    name = Path(parts[-1]).stem.strip("_")
    return UNIT.joinpath(*folder, f"test_{name}.py")


test_file_of.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


# --- no sleeping ------------------------------------------------------------------------------


def sleeps(path: Path) -> list[str]:
    """``time.sleep`` / ``asyncio.sleep`` calls (also imported by name) whose argument is not
    the literal 0, as ``line: call``."""
    tree = ast.parse(path.read_text(), str(path))
    by_name = {
        alias.asname or alias.name: node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module in ("time", "asyncio")
        for alias in node.names
        if alias.name == "sleep"
    }
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr == "sleep":
            if not (isinstance(func.value, ast.Name) and func.value.id in ("time", "asyncio")):
                continue
        elif not (isinstance(func, ast.Name) and func.id in by_name):
            continue
        args = [*node.args, *(k.value for k in node.keywords)]
        literal_zero = (
            len(args) == 1
            and isinstance(args[0], ast.Constant)
            and type(args[0].value) in (int, float)
            and args[0].value == 0
        )
        if not literal_zero:
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_the_sleep_finder_finds_sleeps(tmp_path: Path) -> None:
    sample = tmp_path / "test_sample.py"
    sample.write_text(
        "import asyncio, time\n"
        "from asyncio import sleep as nap\n"
        "async def f(clock, x):\n"
        "    await asyncio.sleep(0)\n"
        "    await asyncio.sleep(0.0)\n"
        "    await clock.sleep(30)\n"  # the fake clock's: fine
        "    time.sleep(0.01)\n"
        "    await asyncio.sleep(x)\n"
        "    await nap(1)\n"
        "    await asyncio.sleep(delay=2)\n"
    )
    assert sleeps(sample) == [
        "7: time.sleep(0.01)",
        "8: asyncio.sleep(x)",
        "9: nap(1)",
        "10: asyncio.sleep(delay=2)",
    ]


def test_unit_tests_never_sleep() -> None:
    found = {
        rel(p): hits
        for p in sorted(UNIT.rglob("*.py"))
        if rel(p) not in MAY_SLEEP and (hits := sleeps(p))
    }
    assert found == {}, "let time pass on a fake clock or on tests/fakes/looptime.py"


# --- no test file imports another ---------------------------------------------------------------


def imported_test_modules(path: Path) -> list[str]:
    """The test modules (``test_*``) that ``path`` imports, by dotted name."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ("." * node.level) + (node.module or "")
            sep = "" if base.endswith(".") else "."
            names = [base] + [f"{base}{sep}{alias.name}" for alias in node.names]
        else:
            continue
        found += [n for n in names if re.search(r"(^|\.)test_[^.]*$", n)]
    return sorted(set(found))


def test_the_import_finder_finds_test_modules(tmp_path: Path) -> None:
    sample = tmp_path / "test_sample.py"
    sample.write_text(
        "from tests.unit.test_app import build\n"
        "from tests.integration import test_jwks\n"
        "import tests.unit.sidecar.test_holder\n"
        "from . import test_other\n"
        "from tests.fakes.cp_app import build as b\n"
        "from tests.integration.cp_rig import good\n"
    )
    assert imported_test_modules(sample) == [
        ".test_other",
        "tests.integration.test_jwks",
        "tests.unit.sidecar.test_holder",
        "tests.unit.test_app",
    ]


def test_no_test_file_imports_another() -> None:
    found = {
        rel(p): hits
        for p in sorted((ROOT / "tests").rglob("*.py"))
        if (hits := imported_test_modules(p))
    }
    assert found == {}, "move shared helpers to tests/fakes/, a *_rig.py module or a conftest.py"


# --- tests mirror the tree -------------------------------------------------------------------


def test_the_mapping() -> None:
    assert test_file_of(ROOT / "cp_token/app.py") == UNIT / "test_app.py"
    assert test_file_of(ROOT / "cp_token/kube/objects.py") == UNIT / "kube/test_objects.py"
    assert test_file_of(ROOT / "cp_token/client/_source.py") == UNIT / "client/test_source.py"
    assert test_file_of(ROOT / "cp_token/client/__init__.py") == UNIT / "client/test_init.py"
    assert test_file_of(ROOT / "cp_token/__main__.py") == UNIT / "test_main.py"
    assert test_file_of(ROOT / "sidecar/holder.py") == UNIT / "sidecar/test_holder.py"


def test_every_module_has_its_unit_test_file() -> None:
    missing = [
        f"{rel(m)} -> {rel(test_file_of(m))}"
        for m in modules()
        if rel(m) not in NO_TEST_FILE and not test_file_of(m).exists()
    ]
    assert missing == []


def test_the_allow_list_is_not_stale() -> None:
    assert [m for m in NO_TEST_FILE if not (ROOT / m).exists()] == []
    assert [m for m in NO_TEST_FILE if test_file_of(ROOT / m).exists()] == []
    assert [m for m in MAY_SLEEP if not (ROOT / m).exists()] == []


def test_every_unit_test_file_is_named_after_a_module() -> None:
    """``test_<module>.py`` or ``test_<module>_<aspect>.py`` (a module's tests split by
    aspect) beside where that module's own file goes; project/ and fakes/ test the
    repository and the test doubles."""
    named = {test_file_of(m) for m in modules()}
    strays = []
    for path in sorted(UNIT.rglob("test_*.py")):
        if path.relative_to(UNIT).parts[0] in ("project", "fakes"):
            continue
        stem = path.stem
        if not any(
            path == own or (path.parent == own.parent and stem.startswith(own.stem + "_"))
            for own in named
        ):
            strays.append(rel(path))
    assert strays == []


# --- the import contract is live ---------------------------------------------------------------


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` with the project's configuration, on the packages under ``tree``."""
    command = Path(sys.executable).with_name("lint-imports")
    return subprocess.run(
        [str(command), "--config", str(tree / "pyproject.toml"), "--no-cache"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tree,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
    )


@pytest.fixture
def packages_copy(tmp_path: Path) -> Path:
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_lint_imports_fails_on_a_forbidden_import(packages_copy: Path) -> None:
    clean = lint_imports(packages_copy)
    assert clean.returncode == 0, clean.stdout + clean.stderr  # the copy itself is kept
    holder = packages_copy / "sidecar" / "holder.py"
    holder.write_text(holder.read_text() + "\nimport cp_token.app  # forbidden\n")
    broken = lint_imports(packages_copy)
    assert broken.returncode != 0
    assert "The client library and the sidecar never import the CP BROKEN" in broken.stdout
    assert "sidecar.holder -> cp_token.app" in broken.stdout  # the copy was analysed


# --- no stale path ---------------------------------------------------------------------------

PATH_NAMED = re.compile(
    r"(?<![\w/.-])(?:cp_token|sidecar|tests|bench|k8s|docs|examples)/[\w./-]*\w"
    r"\.(?:py|md|yaml|yml|json|sh|toml)\b"
)
# history names old paths on purpose; this file names made-up ones in its examples
NOT_CHECKED = {"CHANGELOG.md", "tests/unit/project/test_layout.py"}


def test_every_path_named_in_the_repository_exists() -> None:
    """A moved module leaves no stale path behind in the docs, comments or docstrings."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    stale = []
    for name in listed:
        path = ROOT / name
        if name in NOT_CHECKED or not path.is_file() or path.suffix in (".lock", ".png"):
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            stale += [
                f"{name}:{number}: {found}"
                for found in PATH_NAMED.findall(line)
                if not (ROOT / found).exists()
            ]
    assert stale == []
