"""TFLite runtime backends: LiteRT (ai-edge-litert, the default) or the older
tflite-runtime, behind one small interface chosen at start.

Interpreters are not thread-safe: each `LoadedModel` belongs to one worker.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh.inference.signature import ModelSignature, signature_from_details

# (backend name, module holding Interpreter), in order of preference.
BACKENDS = (("litert", "ai_edge_litert.interpreter"), ("tflite-runtime", "tflite_runtime.interpreter"))


class ModelLoadError(Exception):
    """A file is not a model this runtime can load and run; the message says why."""


class BackendUnavailable(Exception):
    """No TFLite runtime is installed (or the one asked for is missing)."""


@dataclass(frozen=True)
class Backend:
    name: str
    version: str
    _interpreter_class: Any

    def load(self, model: Path | bytes, *, num_threads: int = 1) -> LoadedModel:
        """Load and allocate a model from a file path or its bytes."""
        try:
            if isinstance(model, (bytes, bytearray, memoryview)):
                interpreter = self._interpreter_class(model_content=bytes(model), num_threads=num_threads)
            else:
                interpreter = self._interpreter_class(model_path=str(model), num_threads=num_threads)
            interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            where = "model bytes" if not isinstance(model, Path) else str(model)
            raise ModelLoadError(f"{where}: not a loadable TFLite model: {exc}") from None
        return LoadedModel(interpreter, signature_from_details(interpreter.get_input_details(),
                                                                interpreter.get_output_details()))


class LoadedModel:
    """One allocated interpreter and the signature read from it."""

    def __init__(self, interpreter: Any, signature: ModelSignature) -> None:
        self.interpreter = interpreter
        self.signature = signature

    def invoke(self, inputs: list[Any]) -> list[Any]:
        """Run once on numpy arrays given in input order; return outputs (copies) in output order."""
        interp = self.interpreter
        for detail, array in zip(interp.get_input_details(), inputs):
            if tuple(detail["shape"]) != tuple(array.shape):
                interp.resize_tensor_input(detail["index"], array.shape)
                interp.allocate_tensors()
            interp.set_tensor(detail["index"], array)
        interp.invoke()
        return [interp.get_tensor(d["index"]).copy() for d in interp.get_output_details()]


def load_backend(name: str | None = None) -> Backend:
    """The named backend, or the first installed one (LiteRT first)."""
    tried = []
    for backend_name, module_name in BACKENDS:
        if name is not None and backend_name != name:
            continue
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            tried.append(f"{backend_name} ({module_name}: {exc})")
            continue
        top = importlib.import_module(module_name.split(".")[0])
        version = getattr(top, "__version__", None) or _dist_version(backend_name)
        return Backend(backend_name, version, module.Interpreter)
    if name is not None and not tried:
        raise BackendUnavailable(f"unknown backend {name!r}; choose one of {[b for b, _ in BACKENDS]}")
    raise BackendUnavailable("no TFLite runtime importable: " + "; ".join(tried))


def _dist_version(backend_name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    dist = {"litert": "ai-edge-litert", "tflite-runtime": "tflite-runtime"}[backend_name]
    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


def inspect_model(path: Path, backend: Backend | None = None) -> ModelSignature:
    """Load a .tflite file once and return its signature; ModelLoadError if it cannot be loaded."""
    return (backend or load_backend()).load(Path(path)).signature
