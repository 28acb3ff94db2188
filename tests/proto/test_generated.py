"""The committed mesh/_proto must be what protos/generate.py makes from protos/ now."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_fresh(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "protos" / "generate.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    committed = ROOT / "mesh" / "_proto"
    fresh = {p.name: p.read_text() for p in tmp_path.iterdir() if p.is_file()}
    current = {p.name: p.read_text() for p in committed.iterdir() if p.is_file()}
    assert sorted(fresh) == sorted(current), "generated file set differs: run `make protos` and commit"
    stale = [name for name in fresh if fresh[name] != current[name]]
    assert not stale, f"stale generated code {stale}: run `make protos` and commit mesh/_proto"


def test_generated_modules_import_as_a_package():
    for name in ("membership_pb2", "membership_pb2_grpc", "admin_pb2", "admin_pb2_grpc"):
        module = importlib.import_module(f"mesh._proto.{name}")
        source = Path(module.__file__).read_text()
        assert "\nimport membership_pb2" not in source and "from mesh.v1 import" not in source
