"""ModelRuntime on real models: activation checks, refusal of bad models, rollback, health counters."""

from __future__ import annotations

import time

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from mesh.artifacts.signature import ModelSignature, TensorSpec
from mesh.inference.backend import BACKEND_ENV, ModelLoadError, load_backend, probe_model
from mesh.inference.fixtures import (
    PARTLY_NAN_LAYERS,
    mlp_layers,
    mlp_model,
    mlp_reference,
    mlp_signature,
    partly_nan_input,
    partly_nan_model,
)
from mesh.inference.health import HealthCollector
from mesh.inference.runtime import ActivationError, DeadlineExceeded, NoActiveModel, Overloaded
from mesh.inference.tensors import TensorError, encode_tensor
from tests.inference.conftest import mediapipe_paths, model_input, signature_of
from tests.models import mediapipe_model, wakeword_model, wakeword_models


def wire_inputs(signature, arrays):
    return [encode_tensor(spec.name, a) for spec, a in zip(signature.inputs, arrays, strict=True)]


def direct(backend, path, arrays):
    return backend.load(path).invoke(arrays)


@pytest.mark.parametrize("path", wakeword_models() + mediapipe_paths(), ids=lambda p: p.stem)
def test_real_model_activates_and_matches_a_direct_run(make_runtime, backend, path):
    runtime = make_runtime()
    signature = signature_of(path)
    info = runtime.activate(path.stem, "1.0.0", path, signature)
    assert (info.name, info.version, info.size_bytes) == (path.stem, "1.0.0", path.stat().st_size)
    arrays = model_input(signature, seed=3)
    result = runtime.infer(wire_inputs(signature, arrays), timeout_s=30)
    assert (result.model, result.version, result.finite) == (path.stem, "1.0.0", True)
    want = direct(backend, path, arrays)
    assert [name for name, _ in result.outputs] == [s.name for s in signature.outputs]
    for (_, got), expected in zip(result.outputs, want, strict=True):
        np.testing.assert_array_equal(got, expected)


def test_status_reports_backend_versions_and_workers(make_runtime, backend):
    runtime = make_runtime(workers=3)
    status = runtime.status()
    assert (status.backend, status.backend_version, status.workers) == (backend.name, backend.version, 3)
    assert status.active is None and status.previous is None
    a, b = wakeword_model("alexa"), wakeword_model("hey_jarvis")
    runtime.activate("wakeword", "1", a, signature_of(a))
    runtime.activate("wakeword", "2", b, signature_of(b))
    status = runtime.status().to_dict()
    assert status["active"]["version"] == "2" and status["previous"]["version"] == "1"
    assert status["last_activation_error"] is None


def test_rollback_is_activation_in_reverse(make_runtime):
    runtime = make_runtime()
    lite, full = mediapipe_model("hand_landmark_lite"), mediapipe_model("hand_landmark_full")
    runtime.activate("hand", "1", lite, signature_of(lite))
    runtime.activate("hand", "2", full, signature_of(full))
    back = runtime.rollback()
    assert (back.version, back.path) == ("1", lite)
    assert runtime.previous.version == "2"
    assert runtime.rollback().version == "2"


def test_rollback_without_previous_is_refused(make_runtime):
    with pytest.raises(NoActiveModel, match="no previous"):
        make_runtime().rollback()


def test_nan_model_is_refused_and_previous_keeps_serving(make_runtime, tmp_path):
    runtime = make_runtime()
    good, bad = tmp_path / "good.tflite", tmp_path / "nan.tflite"
    good.write_bytes(mlp_model(seed=1))
    bad.write_bytes(mlp_model(seed=2, nan_bias=True))
    runtime.activate("mlp", "1", good, mlp_signature())
    with pytest.raises(ActivationError) as info:
        runtime.activate("mlp", "2", bad, mlp_signature())
    assert info.value.stage == "validation" and "'output' is not finite" in str(info.value)
    assert runtime.active.version == "1" and runtime.previous is None
    assert "not finite" in runtime.status().last_activation_error
    x = np.random.default_rng(0).standard_normal((1, 128)).astype(np.float32)
    result = runtime.infer(wire_inputs(mlp_signature(), [x]), timeout_s=30)
    assert result.version == "1"
    np.testing.assert_allclose(result.outputs[0][1], mlp_reference(mlp_layers(seed=1), x),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("manifest, words", [
    (mlp_signature(input_name="x"), ["named 'input'", "expected 'x'"]),
    (mlp_signature((128, 768, 768, 10)), ["'output'", "[1, 64]", "[1, 10]"]),
    (ModelSignature(inputs=(TensorSpec("input", "int8", (1, 128), scale=0.1),),
                    outputs=mlp_signature().outputs), ["'input'", "dtype float32", "int8"]),
    (ModelSignature(inputs=mlp_signature().inputs, outputs=mlp_signature().outputs * 2),
     ["1 outputs", "says 2"]),
])
def test_signature_mismatch_is_refused(make_runtime, tmp_path, manifest, words):
    runtime = make_runtime()
    path = tmp_path / "mlp.tflite"
    path.write_bytes(mlp_model())
    lite = mediapipe_model("hand_landmark_lite")
    runtime.activate("hand", "1", lite, signature_of(lite))
    with pytest.raises(ActivationError) as info:
        runtime.activate("mlp", "2", path, manifest)
    assert info.value.stage == "signature"
    for word in words:
        assert word in str(info.value)
    assert runtime.active.version == "1"


def test_real_model_against_another_models_manifest_is_refused(make_runtime):
    face, hand = mediapipe_model("face_detection_short_range"), mediapipe_model("hand_landmark_lite")
    with pytest.raises(ActivationError, match="signature"):
        make_runtime().activate("hand", "1", hand, signature_of(face))


def test_unreadable_corrupt_or_tampered_files_are_refused(make_runtime, tmp_path):
    runtime = make_runtime()
    path = wakeword_model("alexa")
    signature = signature_of(path)
    with pytest.raises(ActivationError) as info:
        runtime.activate("w", "1", tmp_path / "missing.tflite", signature)
    assert info.value.stage == "read"
    corrupt = tmp_path / "corrupt.tflite"
    corrupt.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ActivationError) as info:
        runtime.activate("w", "1", corrupt, signature)
    assert info.value.stage == "load"
    with pytest.raises(ActivationError) as info:
        runtime.activate("w", "1", path, signature, sha256="0" * 64)
    assert info.value.stage == "hash"
    assert runtime.active is None


def test_requests_are_checked_against_the_active_signature(make_runtime):
    runtime = make_runtime()
    with pytest.raises(NoActiveModel, match="no model version is active"):
        runtime.submit([])
    path = wakeword_model("okay_nabu")
    signature = signature_of(path)
    runtime.activate("okay_nabu", "1", path, signature)
    with pytest.raises(NoActiveModel, match="serves model 'okay_nabu', not 'face'"):
        runtime.submit([], model="face")
    wrong = np.zeros((1, 3, 40), dtype=np.float32)
    with pytest.raises(TensorError, match="serving_default_input_audio:0.*float32.*int8"):
        runtime.submit(wire_inputs(signature, [wrong]))


def test_health_counts_requests_errors_and_latency(make_runtime, tmp_path):
    runtime = make_runtime()
    path = tmp_path / "partly-nan.tflite"
    path.write_bytes(partly_nan_model())
    signature = mlp_signature(PARTLY_NAN_LAYERS)
    runtime.activate("mlp", "1", path, signature)
    rng = np.random.default_rng(0)
    for _ in range(5):
        runtime.infer(wire_inputs(signature, [partly_nan_input(bad=False, rng=rng)]))
    # An input the model answers with NaN: served, but counted as an error of this version.
    nan = runtime.infer(wire_inputs(signature, [partly_nan_input(bad=True, rng=rng)]))
    assert not nan.finite
    with pytest.raises(DeadlineExceeded):
        runtime.submit(wire_inputs(signature, [partly_nan_input(bad=False, rng=rng)]),
                       deadline=time.monotonic() - 1).result()
    # Requests refused before the model (the client's fault) are counted apart, not as errors.
    with pytest.raises(TensorError):
        runtime.submit(wire_inputs(signature, [np.full((1, 8), np.nan, np.float32)]))
    health = runtime.health.version("mlp", "1")
    assert health.requests == 7
    assert health.errors == {"exception": 0, "non_finite": 1, "deadline_exceeded": 1}
    assert sum(health.latency_buckets) == 7 and health.latency_sum_s > 0
    assert health.error_rate == pytest.approx(2 / 7)
    assert runtime.health.refusals() == {("mlp", "1", "non_finite"): 1}
    later = runtime.health.version("mlp", "1")
    runtime.infer(wire_inputs(signature, [partly_nan_input(bad=False, rng=rng)]))
    window = runtime.health.version("mlp", "1").since(later)
    assert (window.requests, window.error_count) == (1, 0)
    assert runtime.health.snapshot()[0].to_dict()["requests"] == 8

    registry = CollectorRegistry()
    registry.register(HealthCollector(runtime.health))
    text = generate_latest(registry).decode()
    assert 'fleetmesh_inference_requests_total{model="mlp",version="1"} 8.0' in text
    assert 'fleetmesh_inference_errors_total{kind="non_finite",model="mlp",version="1"} 1.0' in text
    assert 'fleetmesh_inference_latency_seconds_count{model="mlp",version="1"} 8.0' in text
    assert 'fleetmesh_inference_refused_inputs_total{model="mlp",reason="non_finite",version="1"} 1.0' in text


def test_full_queue_is_refused_not_buffered(make_runtime):
    runtime = make_runtime(workers=1, max_pending=2)
    path = mediapipe_model("hand_landmark_full")
    signature = signature_of(path)
    runtime.activate("hand", "1", path, signature)
    tensors = wire_inputs(signature, model_input(signature))
    futures = []
    with pytest.raises(Overloaded, match="limit 2"):
        for _ in range(50):
            futures.append(runtime.submit(tensors))
    assert all(f.result(timeout=30).version == "1" for f in futures)


def test_backend_can_be_forced_by_environment(monkeypatch, backend):
    monkeypatch.setenv(BACKEND_ENV, backend.name)
    assert load_backend().name == backend.name
    monkeypatch.setenv(BACKEND_ENV, "no-such-runtime")
    with pytest.raises(Exception, match="unknown backend"):
        load_backend()


def test_isolated_load_refuses_corrupt_models_and_accepts_good_ones(make_runtime, tmp_path):
    runtime = make_runtime(isolate_load=True)
    path = wakeword_model("alexa")
    corrupt = tmp_path / "corrupt.tflite"
    corrupt.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ActivationError) as info:
        runtime.activate("w", "1", corrupt, signature_of(path))
    assert info.value.stage == "load"
    assert runtime.activate("w", "1", path, signature_of(path)).version == "1"


def test_model_that_would_crash_the_runtime_is_refused_not_fatal(make_runtime, backend, tmp_path):
    """A truncated model reads past its buffer in tflite-runtime 2.14 (a segfault, or not, depending on
    what memory follows it); its own flatbuffer verifier, and LiteRT's, refuse it: activation fails at
    the load step and the node, and its active version, live on."""
    runtime = make_runtime()
    lite = mediapipe_model("hand_landmark_lite")
    runtime.activate("hand", "1", lite, signature_of(lite))
    truncated = tmp_path / "truncated.tflite"
    truncated.write_bytes(lite.read_bytes()[:4096])
    with pytest.raises(ActivationError) as info:
        runtime.activate("hand", "2", truncated, signature_of(lite))
    assert info.value.stage == "load"
    if backend.name == "tflite-runtime":
        assert "flatbuffer does not verify" in str(info.value)
    signature = signature_of(lite)
    assert runtime.infer(wire_inputs(signature, model_input(signature)), timeout_s=30).version == "1"


@pytest.mark.parametrize("model", ["alexa", "face_detection_short_range"])
def test_every_truncation_of_a_real_model_is_refused_in_process(backend, model):
    """Cut a real model at 48 places: each cut is refused with ModelLoadError, and this process (which
    loads them in-process, no child) survives to count them."""
    if backend.name == "tflite-runtime":
        assert backend._verify is not None, \
            "tflite-runtime's verifier was not found: the cuts below would crash"
    path = wakeword_model(model) if model == "alexa" else mediapipe_model(model)
    content = path.read_bytes()
    for cut in sorted({int(len(content) * i / 48) for i in range(48)}):
        with pytest.raises(ModelLoadError):
            backend.load(content[:cut])
    assert backend.load(content).signature == signature_of(path)


def test_a_crash_in_the_probe_child_is_a_load_error(monkeypatch, tmp_path):
    """The child-process probe is the second guard (for a model that verifies but still crashes the
    runtime). Here the child is a stand-in that dies of SIGSEGV: what is under test is the parent's
    handling of that death, not the runtime."""
    import mesh.inference.backend as backend_module

    crasher = tmp_path / "crasher"
    crasher.write_text("#!/bin/sh\ncat >/dev/null\nkill -SEGV $$\n")
    crasher.chmod(0o755)
    monkeypatch.setattr(backend_module.sys, "executable", str(crasher))
    with pytest.raises(ModelLoadError, match=r"tflite-runtime runtime crashed \(SIGSEGV\)"):
        probe_model(wakeword_model("alexa").read_bytes(), "tflite-runtime")
