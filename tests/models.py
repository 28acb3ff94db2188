"""Where the real models for tests live.

Wake-word models ship inside the pymicro-wakeword package (a test extra);
mediapipe's models are unzipped from its 0.10.21 wheel by `make models`
into .cache/models/mediapipe (the Makefile runs it before the tests).
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MEDIAPIPE_DIR = REPO / ".cache" / "models" / "mediapipe"
WAKEWORD_NAMES = ("alexa", "hey_jarvis", "hey_mycroft", "okay_nabu")


def wakeword_model(name: str = "okay_nabu") -> Path:
    import pymicro_wakeword

    path = Path(pymicro_wakeword.__file__).parent / "models" / f"{name}.tflite"
    if not path.exists():
        raise FileNotFoundError(f"{path}: pymicro-wakeword is installed without its {name} model")
    return path


def wakeword_models() -> list[Path]:
    return [wakeword_model(name) for name in WAKEWORD_NAMES]


def mediapipe_model(name: str) -> Path:
    """e.g. mediapipe_model("hand_landmark_full") -> .cache/models/mediapipe/hand_landmark_full.tflite"""
    path = MEDIAPIPE_DIR / f"{name}.tflite"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `make models` (the Makefile does before tests)")
    return path
