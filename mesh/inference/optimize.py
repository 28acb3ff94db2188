"""Full-integer post-training quantisation of a float32 .tflite model with
LiteRT's own calibrator and quantiser, checked against the float model.

    mesh model optimize IN.tflite OUT.tflite --int8 --calibration DATA.npz

This drives `CalibrationWrapper` (ai-edge-litert's
_pywrap_tensorflow_lite_calibration_wrapper) the way TensorFlow's
`lite/python/optimize/calibrator.py` does: Prepare with the sample shapes,
FeedTensor once per calibration sample (the interpreter records each
tensor's min/max), then QuantizeModel with int8 activations, int32 biases and
no float fallback. The result is run on the same calibration samples; if any
output differs from the float model by more than `tolerance` of that output's
range, the model is refused and nothing is written.

Calibration data (.npz): one array per model input, named like the input (or
arr_0, arr_1, ... in input order, as `np.savez(path, x)` writes them), each of
shape (samples, *input_shape).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mesh.artifacts.signature import ModelSignature, TensorSpec
from mesh.inference.backend import Backend, ModelLoadError, load_backend

# Largest accepted |quantised - float| per output, as a fraction of the float
# output's range over the calibration data. INT8 steps are 1/255 of a tensor's
# range; errors compound over layers, and 5% leaves room for a deep model while
# still catching a broken quantisation (which is typically off by tens of %).
DEFAULT_TOLERANCE = 0.05
IO_DTYPES = ("int8", "float32")


class OptimizeError(Exception):
    """A model could not be quantised; the message says why and what to change."""


class CalibrationDataError(OptimizeError):
    """The calibration file does not fit the model's inputs."""


class QuantizationRejected(OptimizeError):
    """The quantised model's outputs disagree with the float model beyond the tolerance."""

    def __init__(self, report: OptimizeReport) -> None:
        worst = max(report.outputs, key=lambda o: o.relative_error)
        super().__init__(
            f"quantised output {worst.name!r} differs from the float model by up to {worst.max_abs_error:.4g} "
            f"({worst.relative_error:.1%} of its range {worst.range:.4g}), above the tolerance of "
            f"{report.tolerance:.1%}; keep the float model, or calibrate with more representative data")
        self.report = report


@dataclass(frozen=True)
class OutputAgreement:
    name: str
    max_abs_error: float
    mean_abs_error: float
    range: float

    @property
    def relative_error(self) -> float:
        """max |quantised - float| over the float output's range (0 when the range is 0 and they agree)."""
        if self.range > 0:
            return self.max_abs_error / self.range
        return 0.0 if self.max_abs_error == 0 else float("inf")


@dataclass(frozen=True)
class OptimizeReport:
    size_before_bytes: int
    size_after_bytes: int
    samples: int
    tolerance: float
    io_dtype: str
    outputs: tuple[OutputAgreement, ...]

    @property
    def size_ratio(self) -> float:
        return self.size_before_bytes / self.size_after_bytes

    @property
    def within_tolerance(self) -> bool:
        return all(o.relative_error <= self.tolerance for o in self.outputs)

    def to_dict(self) -> dict:
        return {"size_before_bytes": self.size_before_bytes, "size_after_bytes": self.size_after_bytes,
                "size_ratio": round(self.size_ratio, 3), "samples": self.samples, "tolerance": self.tolerance,
                "io_dtype": self.io_dtype, "within_tolerance": self.within_tolerance,
                "outputs": [{"name": o.name, "max_abs_error": o.max_abs_error, "mean_abs_error": o.mean_abs_error,
                             "range": o.range, "relative_error": o.relative_error} for o in self.outputs]}


def load_calibration(path: Path, signature: ModelSignature) -> list[list[np.ndarray]]:
    """Calibration samples from an .npz file: one list of input arrays (input order) per sample."""
    try:
        with np.load(Path(path), allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError) as exc:
        raise CalibrationDataError(f"cannot read calibration data {path}: {exc}") from None
    return calibration_samples(arrays, signature, source=str(path))


def calibration_samples(arrays: dict[str, np.ndarray], signature: ModelSignature,
                        source: str = "calibration data") -> list[list[np.ndarray]]:
    """Split per-input arrays of shape (samples, *input_shape) into per-sample input lists."""
    stacked = []
    for i, spec in enumerate(signature.inputs):
        array = arrays.get(spec.name, arrays.get(f"arr_{i}"))
        if array is None:
            raise CalibrationDataError(f"{source} has no array for input {spec.name!r} (nor arr_{i}); "
                                       f"it has {sorted(arrays)}")
        if array.ndim != len(spec.shape) + 1 or any(want not in (-1, got) for want, got in
                                                    zip(spec.shape, array.shape[1:])):
            raise CalibrationDataError(f"{source}: array for input {spec.name!r} has shape {list(array.shape)}; "
                                       f"expected (samples, {', '.join(map(str, spec.shape))})")
        if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
            raise CalibrationDataError(f"{source}: array for input {spec.name!r} must hold finite floats")
        stacked.append(array.astype(np.float32))
    counts = {a.shape[0] for a in stacked}
    if len(counts) != 1 or 0 in counts:
        raise CalibrationDataError(f"{source}: every input needs the same, non-zero number of samples; "
                                   f"got {sorted(counts)}")
    return [[a[j] for a in stacked] for j in range(counts.pop())]


def quantize_int8(model: bytes, samples: list[list[np.ndarray]], *, io_dtype: str = "int8") -> bytes:
    """Full-integer INT8 model from a float32 model and calibration samples (LiteRT's quantiser)."""
    if io_dtype not in IO_DTYPES:
        raise OptimizeError(f"io_dtype must be one of {IO_DTYPES}, got {io_dtype!r}")
    try:
        from ai_edge_litert import _pywrap_tensorflow_lite_calibration_wrapper as calibration
    except ImportError as exc:
        raise OptimizeError(f"quantisation needs ai-edge-litert (its calibration wrapper): {exc}") from None
    try:
        calibrator = calibration.CalibrationWrapper(bytes(model), [], [])
        calibrator.Prepare([list(a.shape) for a in samples[0]])
        for sample in samples:
            calibrator.FeedTensor(sample)
        io = np.dtype(io_dtype).num
        quantized = calibrator.QuantizeModel(io, io, False, np.dtype(np.int8).num, np.dtype(np.int32).num,
                                             False, False)
    except (ValueError, RuntimeError) as exc:
        raise OptimizeError(f"LiteRT could not quantise the model to full integer: {exc}") from None
    return bytes(quantized)


def _quantize_input(x: np.ndarray, spec: TensorSpec) -> np.ndarray:
    if not spec.quantized:
        return x.astype(spec.dtype)
    info = np.iinfo(spec.dtype)
    return np.clip(np.round(x / spec.scale) + spec.zero_point, info.min, info.max).astype(spec.dtype)


def _dequantize(y: np.ndarray, spec: TensorSpec) -> np.ndarray:
    if not spec.quantized:
        return y.astype(np.float64)
    return (y.astype(np.float64) - spec.zero_point) * spec.scale


def compare_outputs(float_model: bytes, quant_model: bytes, samples: list[list[np.ndarray]],
                    backend: Backend | None = None) -> tuple[OutputAgreement, ...]:
    """Run both models on every sample and measure how far the (dequantised) outputs differ."""
    backend = backend or load_backend()
    reference, candidate = backend.load(float_model), backend.load(quant_model)
    errors = [[] for _ in reference.signature.outputs]
    floats = [[] for _ in reference.signature.outputs]
    for sample in samples:
        want = reference.invoke(sample)
        got = candidate.invoke([_quantize_input(x, s) for x, s in zip(sample, candidate.signature.inputs)])
        for i, (w, g, spec) in enumerate(zip(want, got, candidate.signature.outputs)):
            floats[i].append(w.astype(np.float64).ravel())
            errors[i].append(np.abs(_dequantize(g, spec).ravel() - w.astype(np.float64).ravel()))
    out = []
    for spec, f, e in zip(reference.signature.outputs, floats, errors):
        f_all, e_all = np.concatenate(f), np.concatenate(e)
        out.append(OutputAgreement(name=spec.name, max_abs_error=float(e_all.max()),
                                   mean_abs_error=float(e_all.mean()), range=float(f_all.max() - f_all.min())))
    return tuple(out)


def _require_float(signature: ModelSignature) -> None:
    not_float = [s.name for s in signature.inputs + signature.outputs if s.dtype != "float32"]
    if not_float:
        raise OptimizeError(f"only float32 models can be quantised; tensors {not_float} are not float32 "
                            f"(is the model already quantised?)")


def optimize_model(model: bytes, samples: list[list[np.ndarray]], *, tolerance: float = DEFAULT_TOLERANCE,
                   io_dtype: str = "int8", backend: Backend | None = None) -> tuple[bytes, OptimizeReport]:
    """Quantise and check; raises QuantizationRejected (with the report) when outputs disagree."""
    backend = backend or load_backend()
    try:
        signature = backend.load(model).signature
    except ModelLoadError as exc:
        raise OptimizeError(str(exc)) from None
    _require_float(signature)
    quantized = quantize_int8(model, samples, io_dtype=io_dtype)
    report = OptimizeReport(size_before_bytes=len(model), size_after_bytes=len(quantized), samples=len(samples),
                            tolerance=tolerance, io_dtype=io_dtype,
                            outputs=compare_outputs(model, quantized, samples, backend))
    if not report.within_tolerance:
        raise QuantizationRejected(report)
    return quantized, report


def optimize_file(in_path: Path, out_path: Path, calibration_path: Path, *,
                  tolerance: float = DEFAULT_TOLERANCE, io_dtype: str = "int8",
                  backend: Backend | None = None) -> OptimizeReport:
    """`mesh model optimize IN OUT --int8 --calibration DATA.npz`: writes OUT only if the model passes."""
    backend = backend or load_backend()
    try:
        model = Path(in_path).read_bytes()
    except OSError as exc:
        raise OptimizeError(f"cannot read {in_path}: {exc.strerror or exc}") from None
    try:
        signature = backend.load(model).signature
    except ModelLoadError as exc:
        raise OptimizeError(f"{in_path}: {exc}") from None
    _require_float(signature)
    samples = load_calibration(Path(calibration_path), signature)
    quantized, report = optimize_model(model, samples, tolerance=tolerance, io_dtype=io_dtype, backend=backend)
    tmp = Path(out_path).with_name(Path(out_path).name + ".tmp")
    tmp.write_bytes(quantized)
    tmp.replace(out_path)
    return report
