"""Child process of `backend.probe_model`: load a model from stdin and invoke it once.

Only a crash matters here (the parent reads the exit signal); Python-level errors
are left for the parent to meet again in-process, where they become precise
activation errors.
"""

from __future__ import annotations

import sys


def main() -> int:
    content = sys.stdin.buffer.read()
    try:
        import numpy as np

        from mesh.inference.backend import load_backend
        from mesh.inference.runtime import VALIDATION_SEED, validation_input

        model = load_backend(sys.argv[1]).load(content)
        rng = np.random.default_rng(VALIDATION_SEED)
        model.invoke([validation_input(spec, rng) for spec in model.signature.inputs])
    except Exception:  # noqa: BLE001 - the parent meets it again in-process, see above
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
