"""The package as devices get it: a wheel from `python -m build`, installed into a fresh venv.

Builds from exactly what deploy/Dockerfile copies into its build stage, so a file the
package needs but the image leaves out fails here. Needs the package registry (the build
backend and the dependencies; pip's cache makes repeat runs quick): without it the test is
skipped, saying so.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

import mesh

REPO = Path(__file__).resolve().parents[2]


def run(argv: list[str], timeout_s: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)


@pytest.fixture(scope="module")
def registry_reachable() -> None:
    done = run([sys.executable, "-m", "pip", "index", "versions", "setuptools"], timeout_s=120)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"package registry unreachable (pip index versions setuptools: {last})")


def dockerfile_build_sources() -> list[str]:
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    build_stage = re.split(r"^FROM ", dockerfile, flags=re.M)[1]
    sources = re.findall(r"^COPY (?!--)(.+) \S+$", build_stage, re.M)
    return [name for source in sources for name in source.split()]


def test_wheel_installs_into_a_fresh_venv_and_runs(registry_reachable, tmp_path):
    started = time.monotonic()
    src = tmp_path / "src"
    src.mkdir()
    for name in dockerfile_build_sources():
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(path, src / name)

    built = run([sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp_path / "dist"), str(src)])
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    wheel = tmp_path / "dist" / f"fleetmesh-{mesh.__version__}-py3-none-any.whl"
    assert wheel.exists(), sorted(p.name for p in (tmp_path / "dist").iterdir())
    names = zipfile.ZipFile(wheel).namelist()
    assert "mesh/_proto/membership_pb2.py" in names and "mesh/identity/k8s.py" in names
    assert not [n for n in names if n.startswith("tests/")]
    built_s = time.monotonic() - started

    venv = tmp_path / "venv"
    assert run([sys.executable, "-m", "venv", str(venv)]).returncode == 0
    installed = run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(wheel)])
    assert installed.returncode == 0, installed.stderr[-3000:]
    installed_s = time.monotonic() - started - built_s

    version = run([str(venv / "bin" / "mesh"), "--version"], timeout_s=120)
    assert (version.returncode, version.stdout.strip()) == (0, f"mesh, version {mesh.__version__}"), \
        version.stderr
    node_help = run([str(venv / "bin" / "mesh"), "node", "--help"], timeout_s=120)
    assert node_help.returncode == 0, node_help.stderr
    assert "--config" in node_help.stdout
    # The DaemonSet's init step runs from the same install.
    init_help = run([str(venv / "bin" / "python"), "-m", "mesh.identity.k8s", "select-cert", "--help"],
                    timeout_s=120)
    assert init_help.returncode == 0, init_help.stderr
    print(f"wheel: built in {built_s:.1f} s, installed in {installed_s:.1f} s, "
          f"total {time.monotonic() - started:.1f} s")
