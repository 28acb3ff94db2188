"""`make lint` enforces what pyproject.toml says: ruff's rules, and mypy strict on the pure cores only.

The venv's ruff and mypy run on small files in a temporary folder with the project's pyproject.toml.
The mypy check lays out a throwaway `mesh` package whose modules are named like a strict core
(`mesh.guard.*`) and a shell (`mesh.node.*`): the same unannotated function is an error in the first
and passes in the second. (`strict = true` in a per-module override once made every module strict.)
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
BIN = Path(sys.executable).parent
UNANNOTATED = "def double(x):\n    return x * 2\n"


def _tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.skip(f"no {path}: {name} is not installed in this environment (pip install -e '.[test]')")
    return str(path)


def _strict_modules() -> list[str]:
    """The module patterns of the override that makes the pure cores strict."""
    overrides = tomllib.loads(PYPROJECT.read_text())["tool"]["mypy"]["overrides"]
    strict = [o for o in overrides if o.get("disallow_untyped_defs")]
    assert len(strict) == 1, f"expected one override with disallow_untyped_defs, found {len(strict)}"
    assert "strict" not in strict[0], \
        "`strict` in an override sets mypy's global flags: every module turns strict"
    return list(strict[0]["module"])


def test_ruff_flags_an_unused_import(tmp_path):
    ruff = _tool("ruff")
    (tmp_path / "unused.py").write_text("import os\n")
    (tmp_path / "clean.py").write_text('"""Nothing to flag."""\n')
    base = [ruff, "check", "--config", str(PYPROJECT), "--no-cache", "--output-format", "concise"]
    flagged = subprocess.run([*base, "unused.py"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert flagged.returncode == 1 and "F401" in flagged.stdout, flagged.stdout + flagged.stderr
    clean = subprocess.run([*base, "clean.py"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert clean.returncode == 0, clean.stdout + clean.stderr


def test_mypy_is_strict_on_the_cores_and_default_on_the_shells(tmp_path):
    mypy = _tool("mypy")
    assert "mesh.guard.*" in _strict_modules()
    for package in ("mesh", "mesh/guard", "mesh/node"):
        (tmp_path / package).mkdir(parents=True, exist_ok=True)
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "mesh/guard/probe.py").write_text(UNANNOTATED)
    (tmp_path / "mesh/node/probe.py").write_text(UNANNOTATED)
    done = subprocess.run(
        [mypy, "--config-file", str(PYPROJECT), "--cache-dir", str(tmp_path / ".mypy_cache"),
         "--no-error-summary", "mesh"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120)
    errors = [line for line in done.stdout.splitlines() if ": error:" in line]
    assert done.returncode == 1, done.stdout + done.stderr
    assert [e.split(":")[0] for e in errors] == [str(Path("mesh/guard/probe.py"))], done.stdout
    assert "[no-untyped-def]" in errors[0], done.stdout
