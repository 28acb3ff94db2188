"""The model runtime of one node: the active model version, a worker pool that
runs it, activation with validation, atomic hot swap and rollback.

Activation of a version, in order (any failure leaves the active version
serving and raises `ActivationError` naming the step):

1. read the file once (and check its sha256 when the caller gives one, so the
   bytes loaded are the bytes that were verified);
2. load them into a fresh interpreter, apart from the serving ones (on a
   runtime that can crash on a bad model, first in a child process);
3. check its signature against the manifest's (names, dtypes, shapes,
   quantisation), and that a request and a response fit in one message
   (tensors.MAX_MESSAGE_BYTES): a model whose inputs or outputs cannot is
   refused here rather than failing every request;
4. invoke once on a deterministic validation input; every float output must
   be finite;
5. load one interpreter per worker from the same bytes and swap the active
   version in one reference assignment.

Interpreters are not thread-safe, so each version holds one interpreter per
worker thread in a queue: a worker takes one, invokes, and puts it back. A
request is bound to the version that was active when it was accepted; a swap
never changes the interpreters under a running request, and the result names
the version that produced it. The replaced version stays on disk (its path is
remembered); `rollback()` is activation of it again, with the same checks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mesh.artifacts.signature import ModelSignature, TensorSpec
from mesh.inference.backend import (
    CRASH_PRONE_BACKENDS,
    Backend,
    LoadedModel,
    ModelLoadError,
    load_backend,
    probe_model,
)
from mesh.inference.health import ErrorKind, HealthCounters
from mesh.inference.tensors import (
    MAX_MESSAGE_BYTES,
    TensorError,
    TensorLimits,
    WireTensor,
    all_finite,
    decode_inputs,
)

log = logging.getLogger("mesh.inference")

# Per-worker queue allowance before requests are refused with Overloaded: deep
# enough to absorb bursts, short enough that a queued request still meets a
# typical deadline.
PENDING_PER_WORKER = 32
VALIDATION_SEED = 20240611


class InferenceError(Exception):
    """Base of the runtime's errors."""


class ActivationError(InferenceError):
    """A model version was not activated; `stage` says which check it failed."""

    def __init__(self, model: str, version: str, stage: str, reason: str) -> None:
        super().__init__(f"model {model} {version} not activated ({stage}): {reason}; "
                         f"the previously active version keeps serving")
        self.model, self.version, self.stage, self.reason = model, version, stage, reason


class NoActiveModel(InferenceError):
    """No model version is active yet (or the request names a model this node does not serve)."""


class Overloaded(InferenceError):
    """The worker queue is full; the caller should back off or try another node."""


class DeadlineExceeded(InferenceError):
    """The request's deadline passed before its result was ready."""


class InvokeFailed(InferenceError):
    """The interpreter raised while running a request."""


@dataclass(frozen=True)
class ModelVersion:
    """An activated (or once activated) model version and where its file is."""

    name: str
    version: str
    path: Path
    signature: ModelSignature
    sha256: str
    size_bytes: int

    def to_dict(self) -> dict:
        return {"name": self.name, "version": self.version, "path": str(self.path), "sha256": self.sha256,
                "size_bytes": self.size_bytes}


@dataclass(frozen=True)
class InferResult:
    model: str
    version: str
    outputs: list[tuple[str, np.ndarray]]
    latency_s: float
    finite: bool


@dataclass(frozen=True)
class RuntimeStatus:
    backend: str
    backend_version: str
    workers: int
    active: ModelVersion | None
    previous: ModelVersion | None
    pending: int
    last_activation_error: str | None

    def to_dict(self) -> dict:
        return {"backend": self.backend, "backend_version": self.backend_version, "workers": self.workers,
                "active": self.active.to_dict() if self.active else None,
                "previous": self.previous.to_dict() if self.previous else None,
                "pending": self.pending, "last_activation_error": self.last_activation_error}


class _VersionPool:
    """One interpreter per worker for one activated version."""

    def __init__(self, info: ModelVersion, models: list[LoadedModel]) -> None:
        self.info = info
        self._idle: queue.SimpleQueue[LoadedModel] = queue.SimpleQueue()
        for model in models:
            self._idle.put(model)

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        # Never waits: there are as many interpreters as worker threads.
        model = self._idle.get()
        try:
            return model.invoke(inputs)
        finally:
            self._idle.put(model)


def _min_bytes(spec: TensorSpec) -> int:
    size = np.dtype(spec.dtype).itemsize
    for dim in spec.shape:
        size *= max(dim, 1)
    return size


def default_workers() -> int:
    """One worker per CPU this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def validation_input(spec: TensorSpec, rng: np.random.Generator) -> np.ndarray:
    """A deterministic input for `spec`: uniform [0, 1) floats, full-range integers; open dims -> 1."""
    shape = tuple(1 if d == -1 else d for d in spec.shape)
    dtype = np.dtype(spec.dtype)
    if np.issubdtype(dtype, np.floating):
        return rng.random(shape).astype(dtype)
    if dtype == np.bool_:
        return np.zeros(shape, dtype=dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)


class ModelRuntime:
    """Serves one model (by name) at a time; thread-safe.

    `activate`/`rollback` block while loading and validating (call them with
    `asyncio.to_thread` from a loop); `submit` validates a request at once
    and returns a future of its result.
    """

    def __init__(self, backend: Backend | None = None, *, workers: int | None = None,
                 threads_per_interpreter: int = 1, max_pending: int | None = None,
                 limits: TensorLimits | None = None, health: HealthCounters | None = None,
                 isolate_load: bool | None = None) -> None:
        self.backend = backend or load_backend()
        # Probe new models in a child process first (see backend.probe_model); by default only on
        # runtimes known to crash on bad models.
        self.isolate_load = (self.backend.name in CRASH_PRONE_BACKENDS if isolate_load is None
                             else isolate_load)
        self.workers = workers or default_workers()
        self.threads_per_interpreter = threads_per_interpreter
        self.max_pending = max_pending or PENDING_PER_WORKER * self.workers
        self.limits = limits or TensorLimits()
        self.health = health or HealthCounters()
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="inference")
        self._active: _VersionPool | None = None
        self._previous: ModelVersion | None = None
        self._last_error: str | None = None
        self._activation_lock = threading.Lock()
        self._pending_lock = threading.Lock()
        self._pending = 0

    # --- versions -------------------------------------------------------------------------------

    @property
    def active(self) -> ModelVersion | None:
        pool = self._active
        return pool.info if pool else None

    @property
    def previous(self) -> ModelVersion | None:
        return self._previous

    def status(self) -> RuntimeStatus:
        return RuntimeStatus(backend=self.backend.name, backend_version=self.backend.version,
                             workers=self.workers, active=self.active, previous=self._previous,
                             pending=self._pending, last_activation_error=self._last_error)

    def activate(self, name: str, version: str, model_path: Path, expected: ModelSignature, *,
                 sha256: str | None = None) -> ModelVersion:
        """Load, check and validate a version, then make it the active one (see the module doc).

        Raises ActivationError (the active version is unchanged). On success the
        replaced version becomes `previous`, the target of `rollback()`.
        """
        with self._activation_lock:
            try:
                pool = self._prepare(name, version, Path(model_path), expected, sha256)
            except ActivationError as exc:
                self._last_error = str(exc)
                log.warning("%s", exc)
                raise
            replaced = self._active
            self._active = pool  # the swap: requests accepted from here on use the new interpreters
            if replaced is not None and replaced.info != pool.info:
                self._previous = replaced.info
            self._last_error = None
            log.info("activated model %s %s (%s, %d bytes, %d workers, %s %s); previous: %s",
                     name, version, pool.info.sha256[:12], pool.info.size_bytes, self.workers,
                     self.backend.name, self.backend.version,
                     f"{self._previous.name} {self._previous.version}" if self._previous else "none")
            return pool.info

    def rollback(self) -> ModelVersion:
        """Activate the previous version again (same checks); the version rolled back from becomes
        previous."""
        target = self._previous
        if target is None:
            raise NoActiveModel("no previous model version to roll back to")
        log.info("rolling back model %s to %s", target.name, target.version)
        return self.activate(target.name, target.version, target.path, target.signature, sha256=target.sha256)

    def _prepare(self, name: str, version: str, path: Path, expected: ModelSignature,
                 sha256: str | None) -> _VersionPool:
        def fail(stage: str, reason: str) -> ActivationError:
            return ActivationError(name, version, stage, reason)

        try:
            content = path.read_bytes()
        except OSError as exc:
            raise fail("read", f"cannot read {path}: {exc.strerror or exc}") from None
        digest = hashlib.sha256(content).hexdigest()
        if sha256 is not None and digest != sha256.lower():
            raise fail("hash", f"{path} has sha256 {digest}, the manifest says {sha256}")
        if self.isolate_load:
            try:
                probe_model(content, self.backend.name)
            except ModelLoadError as exc:
                raise fail("load", f"{path}: {exc}") from None
        try:
            candidate = self.backend.load(content, num_threads=self.threads_per_interpreter)
        except ModelLoadError as exc:
            raise fail("load", f"{path}: {exc}") from None
        problem = expected.mismatch(candidate.signature)
        if problem:
            raise fail("signature", f"{path} does not match its manifest signature: {problem}")
        too_large = self._beyond_limits(candidate.signature)
        if too_large:
            raise fail("limits", too_large)
        # The file's tensors, the manifest's request policy.
        signature = dataclasses.replace(candidate.signature,
                                        allow_non_finite_inputs=expected.allow_non_finite_inputs)
        rng = np.random.default_rng(VALIDATION_SEED)
        inputs = [validation_input(spec, rng) for spec in candidate.signature.inputs]
        try:
            outputs = candidate.invoke(inputs)
        except (ValueError, RuntimeError) as exc:
            raise fail("validation", f"validation invoke raised: {exc}") from None
        for spec, out in zip(candidate.signature.outputs, outputs, strict=True):
            if not all_finite([out]):
                raise fail("validation", f"output {spec.name!r} is not finite on the validation input "
                                         f"({int(np.size(out) - np.isfinite(out).sum())} of {np.size(out)} "
                                         f"values are NaN or infinite)")
        # Serving interpreters start fresh: the validation invoke may have moved
        # the state of a streaming model.
        try:
            models = [self.backend.load(content, num_threads=self.threads_per_interpreter)
                      for _ in range(self.workers)]
        except ModelLoadError as exc:
            raise fail("load", f"{path}: {exc}") from None
        info = ModelVersion(name=name, version=version, path=path, signature=signature,
                            sha256=digest, size_bytes=len(content))
        return _VersionPool(info, models)

    def _beyond_limits(self, signature: ModelSignature) -> str | None:
        """Why requests to a model with `signature` could never be served within the request limits
        (open dimensions counted as 1: the smallest request), or None."""
        for kind, specs, limit in (("inputs", signature.inputs, self.limits.max_request_bytes),
                                   ("outputs", signature.outputs, self.limits.max_request_bytes)):
            sizes = {spec.name: _min_bytes(spec) for spec in specs}
            largest = max(sizes.values(), default=0)
            if sum(sizes.values()) > limit or largest > self.limits.max_tensor_bytes:
                listed = ", ".join(f"{name!r} {size}" for name, size in sizes.items())
                return (f"its {kind} take at least {sum(sizes.values())} bytes per request ({listed}), more "
                        f"than one message carries ({limit} bytes of tensors in a "
                        f"{MAX_MESSAGE_BYTES}-byte gRPC message, mesh.inference.tensors.MAX_MESSAGE_BYTES)")
        return None

    # --- requests -------------------------------------------------------------------------------

    def submit(self, tensors: list[WireTensor], *, model: str = "",
               deadline: float | None = None) -> Future[InferResult]:
        """Check a request against the active version and queue it on the worker pool.

        `deadline` is a time.monotonic() value. Raises TensorError (malformed
        input), NoActiveModel or Overloaded at once; the future raises
        DeadlineExceeded or InvokeFailed.
        """
        pool = self._active
        if pool is None:
            raise NoActiveModel("no model version is active on this node yet")
        if model and model != pool.info.name:
            raise NoActiveModel(f"this node serves model {pool.info.name!r}, not {model!r}")
        try:
            arrays = decode_inputs(tensors, pool.info.signature, self.limits)
        except TensorError as exc:
            self.health.refuse(pool.info.name, pool.info.version, exc.reason)
            raise
        with self._pending_lock:
            if self._pending >= self.max_pending:
                raise Overloaded(f"{self._pending} requests already queued for {self.workers} workers "
                                 f"(limit {self.max_pending}); retry later or on another node")
            self._pending += 1
        accepted = time.monotonic()
        try:
            future = self._executor.submit(self._run, pool, arrays, accepted, deadline)
        except RuntimeError:  # executor shut down
            self._finished(None)
            raise NoActiveModel("the inference runtime is shutting down") from None
        future.add_done_callback(self._finished)  # also runs if the future is cancelled while queued
        return future

    def _finished(self, _future: Future | None) -> None:
        with self._pending_lock:
            self._pending -= 1

    def infer(self, tensors: list[WireTensor], *, model: str = "",
              timeout_s: float | None = None) -> InferResult:
        """Blocking `submit(...).result()`."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        return self.submit(tensors, model=model, deadline=deadline).result()

    def _run(self, pool: _VersionPool, arrays: list[np.ndarray], accepted: float,
             deadline: float | None) -> InferResult:
        info = pool.info
        if deadline is not None and time.monotonic() > deadline:
            self.health.record(info.name, info.version, time.monotonic() - accepted,
                               ErrorKind.DEADLINE_EXCEEDED)
            raise DeadlineExceeded(f"request waited {time.monotonic() - accepted:.3f}s in the queue "
                                   f"and missed its deadline")
        try:
            outputs = pool.run(arrays)
        except (ValueError, RuntimeError) as exc:
            self.health.record(info.name, info.version, time.monotonic() - accepted, ErrorKind.EXCEPTION)
            log.warning("model %s %s failed on a request: %s", info.name, info.version, exc)
            raise InvokeFailed(f"model {info.name} {info.version} failed: {exc}") from None
        latency_s = time.monotonic() - accepted
        finite = all_finite(outputs)
        error = None
        if not finite:
            error = ErrorKind.NON_FINITE
        elif deadline is not None and time.monotonic() > deadline:
            error = ErrorKind.DEADLINE_EXCEEDED
        self.health.record(info.name, info.version, latency_s, error)
        return InferResult(model=info.name, version=info.version, latency_s=latency_s, finite=finite,
                           outputs=[(spec.name, out)
                                    for spec, out in zip(info.signature.outputs, outputs, strict=True)])

    def close(self) -> None:
        """Finish queued requests and stop the workers."""
        self._executor.shutdown(wait=True)
