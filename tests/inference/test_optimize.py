"""INT8 post-training quantisation with LiteRT's calibrator, checked against the float model."""

from __future__ import annotations

import numpy as np
import pytest

from mesh.inference.fixtures import mlp_model, mlp_signature
from mesh.inference.optimize import (
    DEFAULT_TOLERANCE,
    CalibrationDataError,
    OptimizeError,
    QuantizationRejected,
    optimize_file,
)
from tests.models import wakeword_model

pytest.importorskip("ai_edge_litert._pywrap_tensorflow_lite_calibration_wrapper",
                    reason="quantisation uses LiteRT's calibration wrapper")


@pytest.fixture
def float_model(tmp_path):
    path = tmp_path / "mlp.tflite"
    path.write_bytes(mlp_model(seed=5))
    return path


@pytest.fixture
def calibration(tmp_path):
    path = tmp_path / "calib.npz"
    rng = np.random.default_rng(9)
    np.savez(path, input=rng.standard_normal((48, 1, 128)).astype(np.float32))
    return path


@pytest.mark.parametrize("io_dtype", ["int8", "float32"])
def test_int8_model_is_smaller_and_agrees_with_float(backend, float_model, calibration, tmp_path, io_dtype):
    out = tmp_path / "mlp-int8.tflite"
    report = optimize_file(float_model, out, calibration, io_dtype=io_dtype, backend=backend)
    assert report.size_before_bytes == float_model.stat().st_size
    assert report.size_after_bytes == out.stat().st_size
    assert report.size_ratio >= 3.5, report.to_dict()
    assert report.samples == 48 and report.within_tolerance
    assert all(o.relative_error <= DEFAULT_TOLERANCE for o in report.outputs), report.to_dict()
    signature = backend.load(out).signature
    assert signature.inputs[0].dtype == io_dtype and signature.outputs[0].dtype == io_dtype
    # The quantised model is a new version of the same model: same names and shapes.
    assert [(t.name, t.shape) for t in signature.inputs + signature.outputs] == \
        [(t.name, t.shape) for t in mlp_signature().inputs + mlp_signature().outputs]


def test_disagreement_beyond_tolerance_is_refused_and_nothing_written(backend, float_model, calibration,
                                                                      tmp_path):
    out = tmp_path / "mlp-int8.tflite"
    with pytest.raises(QuantizationRejected) as info:
        optimize_file(float_model, out, calibration, tolerance=1e-4, backend=backend)
    assert "above the tolerance of 0.0%" in str(info.value) and "'output'" in str(info.value)
    assert not info.value.report.within_tolerance
    assert not out.exists()


def test_calibration_data_must_fit_the_inputs(backend, float_model, tmp_path):
    bad_shape = tmp_path / "bad.npz"
    np.savez(bad_shape, input=np.zeros((4, 1, 127), np.float32))
    with pytest.raises(CalibrationDataError, match=r"expected \(samples, 1, 128\)"):
        optimize_file(float_model, tmp_path / "o.tflite", bad_shape, backend=backend)
    wrong_name = tmp_path / "name.npz"
    np.savez(wrong_name, pixels=np.zeros((4, 1, 128), np.float32))
    with pytest.raises(CalibrationDataError, match="no array for input 'input'"):
        optimize_file(float_model, tmp_path / "o.tflite", wrong_name, backend=backend)
    positional = tmp_path / "positional.npz"
    np.savez(positional, np.random.default_rng(0).standard_normal((8, 1, 128)).astype(np.float32))
    assert optimize_file(float_model, tmp_path / "o.tflite", positional, backend=backend).samples == 8


def test_already_quantised_model_is_refused(backend, tmp_path, calibration):
    with pytest.raises(OptimizeError, match="only float32 models"):
        optimize_file(wakeword_model("alexa"), tmp_path / "o.tflite", calibration, backend=backend)
