"""TFLite runtime backends: LiteRT (ai-edge-litert, the default) or the older
tflite-runtime, behind one small interface chosen at start.

Interpreters are not thread-safe: each `LoadedModel` belongs to one worker.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import os
import platform
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh.artifacts.signature import ModelSignature, signature_from_details

log = logging.getLogger(__name__)

# (backend name, module holding Interpreter), in order of preference.
BACKENDS = (("litert", "ai_edge_litert.interpreter"), ("tflite-runtime", "tflite_runtime.interpreter"))
# Names a backend to use when the caller does not (a device with both runtimes
# installed, or the tflite-runtime test venv).
BACKEND_ENV = "MESH_INFERENCE_BACKEND"
# Runtimes that can crash the process on a malformed model (tflite-runtime 2.14
# builds the model without verifying the flatbuffer, so a truncated file reads
# past its buffer, and it segfaults in get_tensor_details() on some real models).
# There the flatbuffer is verified first (`_flatbuffer_verifier`) and the model
# is then loaded once in a child process (`probe_model`).
CRASH_PRONE_BACKENDS = frozenset({"tflite-runtime"})
# tflite-runtime's own verifier, exported by its extension module but not bound
# to Python: static std::unique_ptr<FlatBufferModel> VerifyAndBuildFromBuffer(
#     const char*, size_t, TfLiteVerifier*, ErrorReporter*).
_VERIFY_AND_BUILD = ("_ZN6tflite4impl15FlatBufferModel24VerifyAndBuildFromBuffer"
                     "EPKcmPNS_14TfLiteVerifierEPNS_13ErrorReporterE")
_MODEL_DESTRUCTOR = "_ZN6tflite4impl15FlatBufferModelD1Ev"
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent.parent)


class ModelLoadError(Exception):
    """A file is not a model this runtime can load and run; the message says why."""


class BackendUnavailable(Exception):
    """No TFLite runtime is installed (or the one asked for is missing)."""


@dataclass(frozen=True)
class Backend:
    name: str
    version: str
    _interpreter_class: Any
    # Checks a model's bytes before the runtime sees them (None: the runtime checks them itself).
    _verify: Any = None

    def load(self, model: Path | bytes, *, num_threads: int = 1) -> LoadedModel:
        """Load and allocate a model from a file path (mapped by the runtime) or its bytes."""
        where = str(model) if isinstance(model, Path) else "model bytes"
        if self._verify is not None:
            try:
                content = model.read_bytes() if isinstance(model, Path) else bytes(model)
            except OSError as exc:
                raise ModelLoadError(f"{where}: cannot read: {exc.strerror or exc}") from None
            if not self._verify(content):
                raise ModelLoadError(f"{where}: not a loadable TFLite model: the flatbuffer does not verify "
                                     "(truncated or corrupt file)")
        try:
            if isinstance(model, (bytes, bytearray, memoryview)):
                interpreter = self._interpreter_class(model_content=bytes(model), num_threads=num_threads)
            else:
                interpreter = self._interpreter_class(model_path=str(model), num_threads=num_threads)
            interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"{where}: not a loadable TFLite model: {exc}") from None
        return LoadedModel(interpreter, signature_from_details(interpreter.get_input_details(),
                                                                interpreter.get_output_details()))


class LoadedModel:
    """One allocated interpreter and the signature read from it."""

    def __init__(self, interpreter: Any, signature: ModelSignature) -> None:
        self.interpreter = interpreter
        self.signature = signature
        # get_*_details() builds dicts on every call; a fast model invokes in
        # microseconds, so the indices and current shapes are read once.
        self._input_indices = [d["index"] for d in interpreter.get_input_details()]
        self._input_shapes = [tuple(int(x) for x in d["shape"]) for d in interpreter.get_input_details()]
        self._output_indices = [d["index"] for d in interpreter.get_output_details()]

    def invoke(self, inputs: list[Any]) -> list[Any]:
        """Run once on numpy arrays given in input order; return outputs (copies) in output order."""
        interp = self.interpreter
        resized = False
        for i, (index, array) in enumerate(zip(self._input_indices, inputs, strict=True)):
            if self._input_shapes[i] != tuple(array.shape):
                interp.resize_tensor_input(index, array.shape)
                self._input_shapes[i] = tuple(array.shape)
                resized = True
        if resized:
            interp.allocate_tensors()
        for index, array in zip(self._input_indices, inputs, strict=True):
            interp.set_tensor(index, array)
        interp.invoke()
        return [interp.get_tensor(index).copy() for index in self._output_indices]


def load_backend(name: str | None = None) -> Backend:
    """The named backend, else the one named by $MESH_INFERENCE_BACKEND, else the first installed
    one (LiteRT first)."""
    if name is None:
        name = os.environ.get(BACKEND_ENV) or None
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
        verify = _flatbuffer_verifier(module) if backend_name in CRASH_PRONE_BACKENDS else None
        return Backend(backend_name, version, module.Interpreter, verify)
    if name is not None and not tried:
        raise BackendUnavailable(f"unknown backend {name!r}; choose one of {[b for b, _ in BACKENDS]}")
    raise BackendUnavailable("no TFLite runtime importable: " + "; ".join(tried))


def _flatbuffer_verifier(module: Any) -> Any:
    """A function bytes -> bool running the runtime's own flatbuffer verifier, or None if its
    extension module does not export it (another tflite-runtime build: the child-process probe
    is then the only guard)."""
    unguarded = "the child-process probe is the only guard against a malformed model crashing the node"
    # The unique_ptr comes back through a hidden pointer: the first argument on x86-64 (what the
    # argtypes below say), but register x8 on AArch64, where this call would corrupt memory.
    if platform.machine().lower() not in ("x86_64", "amd64"):
        log.warning("flatbuffer verifier not used on %s (only called on x86-64); %s", platform.machine(),
                    unguarded)
        return None
    extension = getattr(module, "_interpreter_wrapper", None)
    path = getattr(extension, "__file__", None)
    try:
        if path is None:
            raise AttributeError("no extension module path")
        library = ctypes.CDLL(path)
        verify_and_build = getattr(library, _VERIFY_AND_BUILD)
        destroy = getattr(library, _MODEL_DESTRUCTOR)
        free = library._ZdlPv  # operator delete(void*), found through the module's libstdc++
    except (OSError, AttributeError) as exc:
        log.warning("tflite-runtime's flatbuffer verifier is not reachable (%s); %s", exc, unguarded)
        return None
    verify_and_build.restype = None
    verify_and_build.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p, ctypes.c_size_t,
                                 ctypes.c_void_p, ctypes.c_void_p]
    destroy.restype, destroy.argtypes = None, [ctypes.c_void_p]
    free.restype, free.argtypes = None, [ctypes.c_void_p]

    def verify(content: bytes) -> bool:
        model = ctypes.c_void_p()
        verify_and_build(ctypes.byref(model), content, len(content), None, None)
        if not model.value:
            return False
        destroy(model)
        free(model)
        return True

    return verify


def _dist_version(backend_name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    dist = {"litert": "ai-edge-litert", "tflite-runtime": "tflite-runtime"}[backend_name]
    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


def probe_model(content: bytes, backend_name: str, *, timeout_s: float = 60.0) -> None:
    """Load and invoke a model once in a child process; ModelLoadError if that crashes or hangs.

    Keeps a model that crashes the runtime from taking the node down with it.
    Costs a process start (about a second), so it is for activation, not requests.
    """
    pythonpath = os.pathsep.join(filter(None, [_PACKAGE_ROOT, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=pythonpath)
    try:
        proc = subprocess.run([sys.executable, "-m", "mesh.inference._probe", backend_name], input=content,
                              capture_output=True, timeout=timeout_s, env=env, check=False)
    except subprocess.TimeoutExpired:
        raise ModelLoadError(f"the {backend_name} runtime did not finish loading and running the model "
                             f"within {timeout_s:.0f}s") from None
    if proc.returncode < 0:
        try:
            how = signal.Signals(-proc.returncode).name
        except ValueError:
            how = f"signal {-proc.returncode}"
        raise ModelLoadError(f"the {backend_name} runtime crashed ({how}) loading or running the model")
    if proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise ModelLoadError(f"probe of the model failed (exit {proc.returncode}): {tail[0]}")


def inspect_model(path: Path, backend: Backend | None = None) -> ModelSignature:
    """Load a .tflite file once and return its signature; ModelLoadError if it cannot be loaded."""
    return (backend or load_backend()).load(Path(path)).signature
