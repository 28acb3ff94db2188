"""The purpose-built fixture models on the session's runtime (LiteRT, or
tflite-runtime under scripts/test-tflite-runtime.sh): a model that passes
activation but answers NaN for a chosen share of inputs."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from mesh.inference import fixtures
from mesh.inference.fixtures import (
    PARTLY_NAN_LAYERS,
    mlp_layers,
    mlp_reference,
    mlp_signature,
    partly_nan_input,
    partly_nan_model,
)
from mesh.inference.tensors import encode_tensor


def test_schema_bindings_come_from_litert_where_it_is_installed():
    litert = importlib.util.find_spec("ai_edge_litert") is not None
    expected = "ai_edge_litert.schema_py_generated" if litert else "tflite"
    assert fixtures.schema.__name__ == expected


@pytest.mark.parametrize("threshold", [-1.0, 0.0, -7.5])
def test_partly_nan_model_is_finite_above_the_threshold_and_nan_below(backend, threshold):
    seed = 11
    model = backend.load(partly_nan_model(seed=3, threshold=threshold))
    assert model.signature == mlp_signature(PARTLY_NAN_LAYERS)
    layers = mlp_layers(PARTLY_NAN_LAYERS, seed=3)
    rng = np.random.default_rng(seed)
    for i in range(40):
        bad = i % 2 == 1
        x = partly_nan_input(bad=bad, rng=rng, threshold=threshold)
        (y,) = model.invoke([x])
        assert (x[0, 0] < threshold) == bad, f"seed {seed}: input {x} on the wrong side of {threshold}"
        if bad:
            assert np.isnan(y).all(), f"seed {seed}: input {x} should give NaN, got {y}"
        else:
            np.testing.assert_allclose(y, mlp_reference(layers, x), rtol=1e-5, atol=1e-5,
                                       err_msg=f"seed {seed}")


def test_the_boundary_is_exactly_the_threshold(backend):
    model = backend.load(partly_nan_model(threshold=-1.0))
    x = np.full((1, PARTLY_NAN_LAYERS[0]), 0.5, dtype=np.float32)
    just_below = np.nextafter(np.float32(-1.0), np.float32(-2.0))
    for first, nan in [(-1.0, False), (just_below, True), (-0.999, False)]:
        x[0, 0] = first
        (y,) = model.invoke([x])
        assert np.isnan(y).all() == nan and (np.isfinite(y).all() != nan), (first, y)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_partly_nan_model_activates_and_serves_both_kinds_of_request(make_runtime, tmp_path, seed):
    path = tmp_path / "partly-nan.tflite"
    path.write_bytes(partly_nan_model(seed=seed))
    runtime = make_runtime()
    info = runtime.activate("bad", "2.0.0", path, mlp_signature(PARTLY_NAN_LAYERS))
    assert info.version == "2.0.0"
    rng = np.random.default_rng(seed)
    good = runtime.infer([encode_tensor("input", partly_nan_input(bad=False, rng=rng))], timeout_s=30)
    bad = runtime.infer([encode_tensor("input", partly_nan_input(bad=True, rng=rng))], timeout_s=30)
    assert good.finite and not bad.finite


def test_an_error_share_is_chosen_by_the_caller(backend):
    seed, share = 5, 0.3
    model = backend.load(partly_nan_model())
    rng = np.random.default_rng(seed)
    nan = sum(not np.isfinite(model.invoke([partly_nan_input(bad=rng.random() < share, rng=rng)])[0]).all()
              for _ in range(400))
    assert abs(nan / 400 - share) < 0.08, f"seed {seed}: {nan}/400 non-finite for a share of {share}"


@pytest.mark.parametrize("threshold", [0.01, 1.0, float("nan"), float("inf")])
def test_a_threshold_that_validation_inputs_could_cross_is_refused(threshold):
    with pytest.raises(ValueError, match="threshold"):
        partly_nan_model(threshold=threshold)
