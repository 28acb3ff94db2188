"""Purpose-built .tflite models for tests, benchmarks and the demo, written
without TensorFlow.

`mlp_model` is a float32 stack of FULLY_CONNECTED layers: big enough that INT8
quantisation shrinks it ~4x, and (with `nan_bias=True`) a deliberately bad model
whose every output is NaN. `partly_nan_model` is a bad version of the subtler
kind a rollout must catch: it passes activation and answers most requests, but
its outputs are NaN for the inputs `partly_nan_input(..., bad=True)` makes.
Both TFLite runtimes run these models.

Only runtime dependencies are needed: the flatbuffer schema bindings shipped
in ai-edge-litert (`ai_edge_litert.schema_py_generated`, which needs
`flatbuffers`, a dependency of ai-edge-litert). Where LiteRT is absent (a
device or venv with only tflite-runtime, such as scripts/test-tflite-runtime.sh
builds), the same generated API from the `tflite` package is used instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise
from types import ModuleType

import flatbuffers
import numpy as np

from mesh.artifacts.signature import ModelSignature, TensorSpec


def _schema_module() -> ModuleType:
    """The flatbuffer bindings of the TFLite schema: LiteRT's own, else the `tflite` package's
    (both are generated from schema.fbs by flatc and have the same functions)."""
    try:
        from ai_edge_litert import schema_py_generated
    except ImportError:
        try:
            import tflite
        except ImportError:
            raise ImportError("mesh.inference.fixtures writes .tflite files with the schema bindings of "
                              "ai-edge-litert (or of the `tflite` package where LiteRT is absent); "
                              "install one of them") from None
        return tflite
    return schema_py_generated


schema = _schema_module()

# Constant buffers aligned as the TFLite converter aligns them, so kernels may
# read weights in place.
_BUFFER_ALIGNMENT = 16
# ~740k weights (2.9 MB as float32): large enough that the fixed cost of
# per-channel scales leaves INT8 ~3.7x smaller.
DEFAULT_LAYERS = (128, 768, 768, 64)
PARTLY_NAN_LAYERS = (8, 16, 2)
# Activation validates on inputs uniform in [0, 1) (runtime.validation_input), so a
# threshold at or below 0 keeps every validation input on the finite side.
_VALIDATION_INPUT_MIN = 0.0


def mlp_model(layer_sizes: tuple[int, ...] = DEFAULT_LAYERS, *, seed: int = 0, input_name: str = "input",
              output_name: str = "output", nan_bias: bool = False) -> bytes:
    """A float32 multi-layer perceptron: input [1, sizes[0]] -> ... -> output [1, sizes[-1]].

    Hidden layers use a fused RELU. Weights are drawn from `seed`, so two seeds
    give two versions of "the same model" (same signature, different outputs).
    With `nan_bias` the last layer's bias is NaN: the model loads and runs but
    every output is NaN.
    """
    _check_sizes(layer_sizes)
    layers = mlp_layers(layer_sizes, seed=seed)
    if nan_bias:
        layers[-1][1][:] = np.nan
    graph = _Graph()
    x = graph.tensor(input_name, [1, layer_sizes[0]])
    y = _mlp_ops(graph, x, layers, output_name)
    return graph.serialize(inputs=[x], outputs=[y], description="fleetmesh fixture mlp")


def partly_nan_model(layer_sizes: tuple[int, ...] = PARTLY_NAN_LAYERS, *, seed: int = 0,
                     threshold: float = -1.0, input_name: str = "input",
                     output_name: str = "output") -> bytes:
    """An MLP like `mlp_model` whose outputs are all NaN exactly when input[0, 0] < `threshold`.

    A side branch computes g = sqrt(x[0] - threshold) (a FULLY_CONNECTED that
    picks the first element and subtracts the threshold, then SQRT), turns it
    into g - g (0, or NaN when g is NaN) and adds that to every output. Inputs
    at or above the threshold give the plain MLP's outputs (`mlp_reference` with
    `mlp_layers(layer_sizes, seed=seed)`); its signature is `mlp_signature`'s.

    `threshold` must be <= 0: activation validates on inputs in [0, 1), which
    then always land on the finite side, so this model always activates.
    """
    _check_sizes(layer_sizes)
    if not np.isfinite(threshold) or threshold > _VALIDATION_INPUT_MIN:
        raise ValueError(f"threshold must be finite and <= {_VALIDATION_INPUT_MIN} so that activation's "
                         f"validation inputs (uniform in [0, 1)) stay finite; got {threshold}")
    layers = mlp_layers(layer_sizes, seed=seed)
    graph = _Graph()
    x = graph.tensor(input_name, [1, layer_sizes[0]])
    y = _mlp_ops(graph, x, layers, "mlp/output")
    pick = np.zeros((1, layer_sizes[0]), dtype=np.float32)
    pick[0, 0] = 1.0
    shift = graph.tensor("gate/pick_weights", [1, layer_sizes[0]], pick)
    shift_bias = graph.tensor("gate/minus_threshold", [1], np.asarray([-threshold], dtype=np.float32))
    shifted = graph.tensor("gate/shifted", [1, 1])
    graph.fully_connected(x, shift, shift_bias, shifted, relu=False)
    root = graph.tensor("gate/sqrt", [1, 1])
    graph.op(schema.BuiltinOperator.SQRT, [shifted], [root])
    nan_or_zero = graph.tensor("gate/nan_or_zero", [1, 1])
    graph.op(schema.BuiltinOperator.SUB, [root, root], [nan_or_zero])
    out = graph.tensor(output_name, [1, layer_sizes[-1]])
    graph.op(schema.BuiltinOperator.ADD, [y, nan_or_zero], [out])  # broadcasts [1, 1] over [1, n]
    return graph.serialize(inputs=[x], outputs=[out], description="fleetmesh fixture partly-nan mlp")


def partly_nan_input(input_size: int = PARTLY_NAN_LAYERS[0], *, bad: bool, rng: np.random.Generator,
                     threshold: float = -1.0) -> np.ndarray:
    """A float32 input [1, input_size] for `partly_nan_model`: NaN outputs when `bad`, finite otherwise.

    Values are uniform in [0, 1) (like activation's validation inputs); a bad
    input has its first element moved below `threshold`. A traffic generator
    picks the error share: `partly_nan_input(bad=rng.random() < share, rng=rng)`.
    """
    x = rng.random((1, input_size)).astype(np.float32)
    if bad:
        x[0, 0] = np.float32(threshold - 1.0 - rng.random())
    else:
        x[0, 0] = np.float32(max(threshold, _VALIDATION_INPUT_MIN) + rng.random())
    return x


def mlp_layers(layer_sizes: tuple[int, ...] = DEFAULT_LAYERS, *, seed: int = 0
               ) -> list[tuple[np.ndarray, np.ndarray]]:
    """(weights [out, in], bias [out]) per layer, as `mlp_model` with the same seed writes them."""
    rng = np.random.default_rng(seed)
    layers = []
    for fan_in, fan_out in pairwise(layer_sizes):
        weights = (rng.standard_normal((fan_out, fan_in)) / np.sqrt(fan_in)).astype(np.float32)
        bias = (rng.standard_normal(fan_out) * 0.1).astype(np.float32)
        layers.append((weights, bias))
    return layers


def mlp_signature(layer_sizes: tuple[int, ...] = DEFAULT_LAYERS, *, input_name: str = "input",
                  output_name: str = "output") -> ModelSignature:
    """The signature `mlp_model` (or `partly_nan_model`) with the same arguments has."""
    return ModelSignature(inputs=(TensorSpec(input_name, "float32", (1, layer_sizes[0])),),
                          outputs=(TensorSpec(output_name, "float32", (1, layer_sizes[-1])),))


def mlp_reference(layers: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray) -> np.ndarray:
    """numpy forward pass of `mlp_layers(...)` (for checking a runtime)."""
    for i, (w, b) in enumerate(layers):
        x = x @ w.T + b
        if i < len(layers) - 1:
            x = np.maximum(x, 0)
    return x


def _check_sizes(layer_sizes: tuple[int, ...]) -> None:
    if len(layer_sizes) < 2 or any(s < 1 for s in layer_sizes):
        raise ValueError(f"layer_sizes needs at least two positive sizes, got {layer_sizes}")


def _mlp_ops(graph: _Graph, x: int, layers: list[tuple[np.ndarray, np.ndarray]], output_name: str) -> int:
    """FULLY_CONNECTED layers (RELU on all but the last) from tensor `x`; returns the output tensor."""
    for i, (w, bias) in enumerate(layers):
        last = i == len(layers) - 1
        weights = graph.tensor(f"dense_{i}/weights", list(w.shape), w)
        b = graph.tensor(f"dense_{i}/bias", list(bias.shape), bias)
        out = graph.tensor(output_name if last else f"dense_{i}/Relu", [1, w.shape[0]])
        graph.fully_connected(x, weights, b, out, relu=not last)
        x = out
    return x


@dataclass
class _Operator:
    opcode: int
    inputs: list[int]
    outputs: list[int]
    fully_connected_relu: bool | None = None  # None: no builtin options


@dataclass
class _Graph:
    """One float32 subgraph, collected first and serialised in one pass."""

    tensors: list[tuple[str, list[int], np.ndarray | None]] = field(default_factory=list)
    operators: list[_Operator] = field(default_factory=list)

    def tensor(self, name: str, shape: list[int], data: np.ndarray | None = None) -> int:
        self.tensors.append((name, shape, None if data is None else np.ascontiguousarray(data, np.float32)))
        return len(self.tensors) - 1

    def op(self, opcode: int, inputs: list[int], outputs: list[int]) -> None:
        self.operators.append(_Operator(opcode, inputs, outputs))

    def fully_connected(self, x: int, weights: int, bias: int, out: int, *, relu: bool) -> None:
        self.operators.append(_Operator(schema.BuiltinOperator.FULLY_CONNECTED, [x, weights, bias], [out],
                                        fully_connected_relu=relu))

    def serialize(self, *, inputs: list[int], outputs: list[int], description: str) -> bytes:
        constants = [data for _, _, data in self.tensors if data is not None]
        b = flatbuffers.Builder(1024 + sum(c.nbytes for c in constants) * 2)

        # Buffer 0 is the conventional empty buffer for non-constant tensors.
        buffer_offsets = [_buffer(b, None)]
        tensor_buffers = []
        for _, _, data in self.tensors:
            if data is None:
                tensor_buffers.append(0)
            else:
                tensor_buffers.append(len(buffer_offsets))
                buffer_offsets.append(_buffer(b, data.tobytes()))

        tensor_offsets = []
        for (name, shape, _), buffer_index in zip(self.tensors, tensor_buffers, strict=True):
            name_off = b.CreateString(name)
            shape_off = _int_vector(b, shape)
            schema.TensorStart(b)
            schema.TensorAddShape(b, shape_off)
            schema.TensorAddType(b, schema.TensorType.FLOAT32)
            schema.TensorAddBuffer(b, buffer_index)
            schema.TensorAddName(b, name_off)
            tensor_offsets.append(schema.TensorEnd(b))

        opcodes = list(dict.fromkeys(op.opcode for op in self.operators))
        operator_offsets = []
        for op in self.operators:
            options_off = None
            if op.fully_connected_relu is not None:
                schema.FullyConnectedOptionsStart(b)
                schema.FullyConnectedOptionsAddFusedActivationFunction(
                    b, schema.ActivationFunctionType.RELU if op.fully_connected_relu
                    else schema.ActivationFunctionType.NONE)
                options_off = schema.FullyConnectedOptionsEnd(b)
            inputs_off, outputs_off = _int_vector(b, op.inputs), _int_vector(b, op.outputs)
            schema.OperatorStart(b)
            schema.OperatorAddOpcodeIndex(b, opcodes.index(op.opcode))
            schema.OperatorAddInputs(b, inputs_off)
            schema.OperatorAddOutputs(b, outputs_off)
            if options_off is not None:
                schema.OperatorAddBuiltinOptionsType(b, schema.BuiltinOptions.FullyConnectedOptions)
                schema.OperatorAddBuiltinOptions(b, options_off)
            operator_offsets.append(schema.OperatorEnd(b))

        opcode_offsets = []
        for opcode in opcodes:
            schema.OperatorCodeStart(b)
            # Every opcode used here is below 127, so old runtimes that read only the deprecated field agree.
            schema.OperatorCodeAddDeprecatedBuiltinCode(b, opcode)
            schema.OperatorCodeAddBuiltinCode(b, opcode)
            schema.OperatorCodeAddVersion(b, 1)
            opcode_offsets.append(schema.OperatorCodeEnd(b))

        tensors_vec = _offsets_vector(b, schema.SubGraphStartTensorsVector, tensor_offsets)
        operators_vec = _offsets_vector(b, schema.SubGraphStartOperatorsVector, operator_offsets)
        sg_inputs, sg_outputs = _int_vector(b, inputs), _int_vector(b, outputs)
        sg_name = b.CreateString("main")
        schema.SubGraphStart(b)
        schema.SubGraphAddTensors(b, tensors_vec)
        schema.SubGraphAddInputs(b, sg_inputs)
        schema.SubGraphAddOutputs(b, sg_outputs)
        schema.SubGraphAddOperators(b, operators_vec)
        schema.SubGraphAddName(b, sg_name)
        subgraph_off = schema.SubGraphEnd(b)

        subgraphs_vec = _offsets_vector(b, schema.ModelStartSubgraphsVector, [subgraph_off])
        opcodes_vec = _offsets_vector(b, schema.ModelStartOperatorCodesVector, opcode_offsets)
        buffers_vec = _offsets_vector(b, schema.ModelStartBuffersVector, buffer_offsets)
        description_off = b.CreateString(description)
        schema.ModelStart(b)
        schema.ModelAddVersion(b, 3)
        schema.ModelAddOperatorCodes(b, opcodes_vec)
        schema.ModelAddSubgraphs(b, subgraphs_vec)
        schema.ModelAddDescription(b, description_off)
        schema.ModelAddBuffers(b, buffers_vec)
        model_off = schema.ModelEnd(b)
        b.Finish(model_off, file_identifier=b"TFL3")
        return bytes(b.Output())


def _buffer(builder: flatbuffers.Builder, data: bytes | None) -> int:
    data_off = _aligned_bytes_vector(builder, data) if data is not None else None
    schema.BufferStart(builder)
    if data_off is not None:
        schema.BufferAddData(builder, data_off)
    return schema.BufferEnd(builder)


def _aligned_bytes_vector(builder: flatbuffers.Builder, data: bytes) -> int:
    builder.StartVector(1, len(data), _BUFFER_ALIGNMENT)
    builder.head = builder.head - len(data)
    builder.Bytes[builder.head:builder.head + len(data)] = data
    builder.vectorNumElems = len(data)
    return builder.EndVector()


def _int_vector(builder: flatbuffers.Builder, values: list[int]) -> int:
    return builder.CreateNumpyVector(np.asarray(values, dtype=np.int32))


def _offsets_vector(builder: flatbuffers.Builder, start, offsets: list[int]) -> int:
    start(builder, len(offsets))
    for off in reversed(offsets):
        builder.PrependUOffsetTRelative(off)
    return builder.EndVector()
