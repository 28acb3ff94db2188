#!/usr/bin/env bash
# Run tests/inference on the tflite-runtime backend (the older runtime many
# devices still ship) instead of LiteRT.
#
# tflite-runtime 2.14 needs numpy<2 and has no wheels past Python 3.11, so it
# gets a venv of its own (.venv-tflite) with numpy<2 and ml_dtypes<0.6 pinned.
# LiteRT is not installed there: the run shows the runtime works on a device
# that has only tflite-runtime (the quantisation tests, which need LiteRT's
# calibrator, are skipped). MESH_INFERENCE_BACKEND forces the backend anyway.
# Without LiteRT's schema bindings, mesh/inference/fixtures.py writes its models
# with the `tflite` package's (the same flatc-generated API), installed here only.
#
#     scripts/test-tflite-runtime.sh            # build .venv-tflite if needed, run the tests
#     scripts/test-tflite-runtime.sh -k swap    # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-$(command -v python3.11 || true)}"
VENV=.venv-tflite
STAMP="$VENV/.installed-stamp"

if [ -z "$PYTHON" ]; then
    echo "tflite-runtime has wheels only up to Python 3.11; install python3.11 or set PYTHON" >&2
    exit 1
fi
"$PYTHON" -c 'import sys; assert sys.version_info[:2] <= (3, 11), "tflite-runtime needs Python <= 3.11"'

if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] || [ "$0" -nt "$STAMP" ]; then
    test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    # The project's runtime dependencies read from pyproject.toml, except numpy>=2 and ai-edge-litert
    # (tests/inference imports mesh.node.local for wait_for, which needs most of them); the test
    # tools tests/inference uses; then the package itself without dependencies.
    mapfile -t RUNTIME_DEPS < <("$PYTHON" -c 'import re, tomllib
for dep in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    if re.split(r"[<>=!~ \[;]", dep)[0].lower() not in ("numpy", "ai-edge-litert"):
        print(dep)')
    "$VENV/bin/python" -m pip install --quiet \
        "numpy<2" "ml_dtypes<0.6" "tflite-runtime==2.14.0" "${RUNTIME_DEPS[@]}" \
        "pytest>=8.3" "pytest-asyncio>=1.0" "pytest-timeout>=2.3" "hypothesis>=6.100" \
        "pymicro-wakeword>=2.5.0" "tflite>=2.18.0" "flatbuffers>=25.0"
    "$VENV/bin/python" -m pip install --quiet --no-deps -e .
    touch "$STAMP"
fi

test -f .cache/models/mediapipe/hand_landmark_full.tflite || {
    echo "mediapipe models missing: run \`make models\` first" >&2
    exit 1
}

export MESH_INFERENCE_BACKEND=tflite-runtime
"$VENV/bin/python" -c 'from mesh.inference.backend import load_backend; b = load_backend(); print("backend:", b.name, b.version)'
# --confcutdir: tests/inference does not need tests/conftest.py's clusters.
exec "$VENV/bin/python" -m pytest tests/inference -q -p no:cacheprovider --confcutdir=tests/inference "$@"
