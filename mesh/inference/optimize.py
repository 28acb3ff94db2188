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

Models whose weights are stored as float16 behind DEQUANTIZE operators (as
TensorFlow's float16 post-training option writes them: every mediapipe model
but two) are first rewritten with those weights as float32 constants
(`float32_weights`), sparse ones (DENSIFY before DEQUANTIZE) densified too.
LiteRT's calibrator cannot run them as they are: its recording interpreter
corrupts other constant tensors (PAD paddings, MEAN axes) once the
DEQUANTIZE of a constant has run, so the second calibration sample fails
("Pad value has to be greater than equal to 0") or the process crashes. The
float16 -> float32 conversion is exact, so the rewritten model computes what
the original computes. Standalone RELUs are folded into the ADD or
convolution before them in the same pass (exact in float): LiteRT's XNNPACK
delegate takes no standalone int8 RELU, and each one would split the INT8
graph into another partition (face_detection_short_range ran ~9x slower).
It takes no int8 PRELU either, which cannot be folded: models full of PRELU
(iris_landmark, face_landmark, palm_detection) come out smaller but slower
than their float versions on LiteRT's CPU path. bench/inference.py measures it.

Calibration data (.npz): one array per model input, named like the input (or
arr_0, arr_1, ... in input order, as `np.savez(path, x)` writes them), each of
shape (samples, *input_shape). Without real data, `generated_samples` makes
inputs within what a signature allows (images with the 1/f spectrum of
natural images, other tensors uniform) for benchmarks and tests.

With `io_dtype="float32"` the quantised model keeps the float model's
signature (it quantises inputs and dequantises outputs itself), so it is a
drop-in new version that a rollout can send to some devices only; with
"int8" (the default) clients must send quantised inputs.
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
            f"quantised output {worst.name!r} differs from the float model by up to "
            f"{worst.max_abs_error:.4g} "
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
        return _relative(self.max_abs_error, self.range)

    @property
    def mean_relative_error(self) -> float:
        """mean |quantised - float| over the float output's range (reported; the tolerance is on the max)."""
        return _relative(self.mean_abs_error, self.range)


def _relative(error: float, value_range: float) -> float:
    if value_range > 0:
        return error / value_range
    return 0.0 if error == 0 else float("inf")


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
                "outputs": [{"name": o.name, "max_abs_error": o.max_abs_error,
                             "mean_abs_error": o.mean_abs_error, "range": o.range,
                             "relative_error": o.relative_error,
                             "mean_relative_error": o.mean_relative_error} for o in self.outputs]}


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
                                                    zip(spec.shape, array.shape[1:], strict=True)):
            raise CalibrationDataError(f"{source}: array for input {spec.name!r} has shape "
                                       f"{list(array.shape)}; expected "
                                       f"(samples, {', '.join(map(str, spec.shape))})")
        if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
            raise CalibrationDataError(f"{source}: array for input {spec.name!r} must hold finite floats")
        stacked.append(array.astype(np.float32))
    counts = {a.shape[0] for a in stacked}
    if len(counts) != 1 or 0 in counts:
        raise CalibrationDataError(f"{source}: every input needs the same, non-zero number of samples; "
                                   f"got {sorted(counts)}")
    return [[a[j] for a in stacked] for j in range(counts.pop())]


def float32_weights(model: bytes) -> tuple[bytes, int]:
    """`model` with its constant float16 weights stored as float32 constants, and how many were folded.

    Each DEQUANTIZE whose input is a constant float16 tensor (or the output of
    a DENSIFY of one) is removed and its output becomes a constant holding the
    same values in float32; tensors, operator codes and buffers nothing uses
    any more are dropped. A model without such weights comes back unchanged
    (the same bytes, 0).
    """
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    tree = flatbuffer_utils.read_model_from_bytearray(bytearray(model))
    codes = [flatbuffer_utils.get_builtin_code_from_operator_code(c) for c in tree.operatorCodes]
    folded = 0
    for graph in tree.subgraphs:
        tensors = graph.tensors
        producers = {int(out): op for op in graph.operators for out in op.outputs}
        removed: set[int] = set()
        for i, op in enumerate(graph.operators):
            if codes[op.opcodeIndex] != schema.BuiltinOperator.DEQUANTIZE:
                continue
            source = int(op.inputs[0])
            densify = producers.get(source)
            if densify is not None and codes[densify.opcodeIndex] == schema.BuiltinOperator.DENSIFY:
                values = _dense_values(tree, tensors[int(densify.inputs[0])], schema)
                dense_op = graph.operators.index(densify)
            else:
                values = _dense_values(tree, tensors[source], schema)
                dense_op = None
            if values is None:
                continue
            buffer = schema.BufferT()
            buffer.data = np.frombuffer(values.astype("<f4").tobytes(), dtype=np.uint8)
            tree.buffers.append(buffer)
            tensors[int(op.outputs[0])].buffer = len(tree.buffers) - 1
            removed.add(i)
            if dense_op is not None:
                removed.add(dense_op)
            folded += 1
        graph.operators = [op for i, op in enumerate(graph.operators) if i not in removed]
        folded += _fuse_relus(graph, codes, schema)
    if not folded:
        return model, 0
    _drop_unused(tree)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(tree)), folded


def _fuse_relus(graph, codes: list[int], schema) -> int:
    """Fold each standalone RELU / RELU6 into the ADD or convolution before it (as the converter
    does when it can), and return how many. Exact in float; in INT8 it spares a requantisation and
    keeps the graph in one XNNPACK partition (the delegate does not take a standalone int8 RELU, so
    each one splits the graph and the int8 model runs slower than the float one)."""
    ops = schema.BuiltinOperator
    activation = {ops.RELU: schema.ActivationFunctionType.RELU,
                  ops.RELU6: schema.ActivationFunctionType.RELU6}
    options_class = {ops.ADD: schema.AddOptionsT, ops.CONV_2D: schema.Conv2DOptionsT,
                     ops.DEPTHWISE_CONV_2D: schema.DepthwiseConv2DOptionsT,
                     ops.FULLY_CONNECTED: schema.FullyConnectedOptionsT}
    options_type = {ops.ADD: schema.BuiltinOptions.AddOptions,
                    ops.CONV_2D: schema.BuiltinOptions.Conv2DOptions,
                    ops.DEPTHWISE_CONV_2D: schema.BuiltinOptions.DepthwiseConv2DOptions,
                    ops.FULLY_CONNECTED: schema.BuiltinOptions.FullyConnectedOptions}
    producers = {int(out): op for op in graph.operators for out in op.outputs}
    readers: dict[int, int] = {}
    for op in graph.operators:
        for i in op.inputs:
            readers[int(i)] = readers.get(int(i), 0) + 1
    graph_outputs = {int(i) for i in graph.outputs}
    fused = []
    for relu in graph.operators:
        kind = codes[relu.opcodeIndex]
        if kind not in activation:
            continue
        between = int(relu.inputs[0])
        producer = producers.get(between)
        if (producer is None or codes[producer.opcodeIndex] not in options_class or readers.get(between) != 1
                or between in graph_outputs or len(producer.outputs) != 1):
            continue
        options = producer.builtinOptions
        if options is None:
            options = options_class[codes[producer.opcodeIndex]]()
            producer.builtinOptionsType = options_type[codes[producer.opcodeIndex]]
            producer.builtinOptions = options
        if options.fusedActivationFunction != schema.ActivationFunctionType.NONE:
            continue
        options.fusedActivationFunction = activation[kind]
        producer.outputs = list(relu.outputs)
        producers[int(relu.outputs[0])] = producer
        fused.append(relu)
    graph.operators = [op for op in graph.operators if all(op is not f for f in fused)]
    return len(fused)


def _dense_values(tree, tensor, schema) -> np.ndarray | None:
    """A constant float16 tensor's values as a dense array of its shape, or None if it is not one
    (not constant, not float16, or sparse in a layout this does not read)."""
    if tensor.type != schema.TensorType.FLOAT16 or tensor.buffer <= 0:
        return None
    data = tree.buffers[tensor.buffer].data
    if data is None or len(data) == 0:
        return None
    values = np.frombuffer(np.asarray(data, dtype=np.uint8).tobytes(), dtype="<f2")
    shape = [int(d) for d in tensor.shape]
    if tensor.sparsity is None:
        return values.reshape(shape)
    return _densify(values, tensor.sparsity, shape)


def _densify(values: np.ndarray, sparsity, shape: list[int]) -> np.ndarray | None:
    """TFLite's sparse layout (dense / CSR dimensions in storage order) to a dense array.

    Only the layout without blocks and in natural dimension order (what the
    converter writes for pruned convolution weights) is read; None otherwise.
    """
    order = list(sparsity.traversalOrder) if sparsity.traversalOrder is not None else list(range(len(shape)))
    if order != list(range(len(shape))) or sparsity.blockMap is not None and len(sparsity.blockMap):
        return None
    # Walk the levels keeping, per stored position, its flat dense index so far.
    position_index = np.zeros(1, dtype=np.int64)   # one root position
    for level, meta in enumerate(sparsity.dimMetadata):
        size = shape[level]
        if meta.format == 0:  # DENSE
            position_index = (position_index[:, None] * size + np.arange(size)[None, :]).ravel()
        else:  # SPARSE_CSR: positions segments[p]..segments[p+1] of `indices` belong to parent p
            segments = np.asarray(meta.arraySegments.values, dtype=np.int64)
            indices = np.asarray(meta.arrayIndices.values, dtype=np.int64)
            counts = np.diff(segments)
            if len(counts) != len(position_index) or segments[-1] != len(indices):
                return None
            position_index = np.repeat(position_index, counts) * size + indices
    if len(position_index) != len(values):
        return None
    dense = np.zeros(int(np.prod(shape)), dtype=np.float16)
    dense[position_index] = values
    return dense.reshape(shape)


def _drop_unused(tree) -> None:
    """Remove tensors no operator or subgraph uses, then operator codes no operator uses; empty the
    buffers of removed tensors (buffer indices stay: metadata refers to buffers by index)."""
    for graph in tree.subgraphs:
        used = {int(i) for i in graph.inputs} | {int(i) for i in graph.outputs}
        for op in graph.operators:
            used |= {int(i) for i in op.inputs if i >= 0} | {int(i) for i in op.outputs}
            if op.intermediates is not None:
                used |= {int(i) for i in op.intermediates}
        kept = sorted(used)
        new_index = {old: new for new, old in enumerate(kept)}
        for i, tensor in enumerate(graph.tensors):
            if i not in new_index and tensor.buffer > 0:
                tree.buffers[tensor.buffer].data = None
        graph.tensors = [graph.tensors[i] for i in kept]
        graph.inputs = [new_index[int(i)] for i in graph.inputs]
        graph.outputs = [new_index[int(i)] for i in graph.outputs]
        for op in graph.operators:
            op.inputs = [new_index[int(i)] if i >= 0 else -1 for i in op.inputs]
            op.outputs = [new_index[int(i)] for i in op.outputs]
            if op.intermediates is not None:
                op.intermediates = [new_index[int(i)] for i in op.intermediates]
    used_codes = sorted({op.opcodeIndex for graph in tree.subgraphs for op in graph.operators})
    new_code = {old: new for new, old in enumerate(used_codes)}
    tree.operatorCodes = [tree.operatorCodes[i] for i in used_codes]
    for graph in tree.subgraphs:
        for op in graph.operators:
            op.opcodeIndex = new_code[op.opcodeIndex]


def generated_samples(signature: ModelSignature, count: int, *, seed: int = 0,
                      value_range: tuple[float, float] = (0.0, 1.0)) -> list[list[np.ndarray]]:
    """`count` float32 input lists for `signature`, drawn from `seed`, each value within `value_range`.

    An image-like input ([1, H, W, C], C <= 4) gets pink noise: per channel, random phases
    under a 1/f amplitude spectrum (the statistics of natural images), scaled to fill the
    range, so activations spread as they do on camera frames rather than on white noise.
    Any other float input is uniform in the range. Open dimensions (-1) become 1.
    """
    _require_float_inputs(signature)
    low, high = value_range
    if not (np.isfinite(low) and np.isfinite(high) and low < high):
        raise OptimizeError(f"value_range must be two finite numbers, low < high; got {value_range}")
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(count):
        sample = []
        for spec in signature.inputs:
            shape = tuple(1 if d == -1 else d for d in spec.shape)
            unit = _pink_image(rng, shape) if _image_like(shape) else rng.random(shape)
            sample.append((low + (high - low) * unit).astype(np.float32))
        samples.append(sample)
    return samples


def _image_like(shape: tuple[int, ...]) -> bool:
    return len(shape) == 4 and shape[0] == 1 and shape[1] >= 8 and shape[2] >= 8 and 1 <= shape[3] <= 4


def _pink_image(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    _, height, width, channels = shape
    frequency = np.hypot(np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :])
    frequency[0, 0] = 1.0  # the mean: any finite weight, the result is rescaled anyway
    image = np.empty(shape, dtype=np.float64)
    for channel in range(channels):
        phases = rng.standard_normal(frequency.shape) + 1j * rng.standard_normal(frequency.shape)
        spectrum = phases / frequency
        plane = np.fft.irfft2(spectrum, s=(height, width))
        image[0, :, :, channel] = (plane - plane.min()) / max(float(np.ptp(plane)), 1e-12)
    return image


def quantize_int8(model: bytes, samples: list[list[np.ndarray]], *, io_dtype: str = "int8") -> bytes:
    """Full-integer INT8 model from a float32 model and calibration samples (LiteRT's quantiser)."""
    if io_dtype not in IO_DTYPES:
        raise OptimizeError(f"io_dtype must be one of {IO_DTYPES}, got {io_dtype!r}")
    try:
        from ai_edge_litert import _pywrap_tensorflow_lite_calibration_wrapper as calibration
    except ImportError as exc:
        raise OptimizeError(f"quantisation needs ai-edge-litert (its calibration wrapper): {exc}") from None
    model, _ = float32_weights(model)
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
    errors: list[list[np.ndarray]] = [[] for _ in reference.signature.outputs]
    floats: list[list[np.ndarray]] = [[] for _ in reference.signature.outputs]
    for sample in samples:
        want = reference.invoke(sample)
        got = candidate.invoke([_quantize_input(x, s)
                                for x, s in zip(sample, candidate.signature.inputs, strict=True)])
        for i, (w, g, spec) in enumerate(zip(want, got, candidate.signature.outputs, strict=True)):
            floats[i].append(w.astype(np.float64).ravel())
            errors[i].append(np.abs(_dequantize(g, spec).ravel() - w.astype(np.float64).ravel()))
    out = []
    for spec, f, e in zip(reference.signature.outputs, floats, errors, strict=True):
        f_all, e_all = np.concatenate(f), np.concatenate(e)
        out.append(OutputAgreement(name=spec.name, max_abs_error=float(e_all.max()),
                                   mean_abs_error=float(e_all.mean()),
                                   range=float(f_all.max() - f_all.min())))
    return tuple(out)


def _require_float_inputs(signature: ModelSignature) -> None:
    not_float = [s.name for s in signature.inputs if s.dtype != "float32"]
    if not_float:
        raise OptimizeError(f"inputs can be generated for float32 tensors only; {not_float} are not float32")


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
    report = OptimizeReport(size_before_bytes=len(model), size_after_bytes=len(quantized),
                            samples=len(samples), tolerance=tolerance, io_dtype=io_dtype,
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
    quantized, report = optimize_model(model, samples, tolerance=tolerance, io_dtype=io_dtype,
                                       backend=backend)
    tmp = Path(out_path).with_name(Path(out_path).name + ".tmp")
    tmp.write_bytes(quantized)
    tmp.replace(out_path)
    return report
