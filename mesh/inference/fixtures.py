"""Purpose-built .tflite models for tests, benchmarks and the demo, written
without TensorFlow (the `tflite` flatbuffer bindings and `flatbuffers`).

`mlp_model` is a float32 stack of FULLY_CONNECTED layers: big enough that INT8
quantisation shrinks it ~4x, and (with `nan_bias=True`) a deliberately bad model
whose every output is NaN. Both TFLite runtimes run these models.

`tflite` and `flatbuffers` are test extras: import this module only where they
are installed.
"""

from __future__ import annotations

from itertools import pairwise

import flatbuffers
import numpy as np
import tflite

from mesh.artifacts.signature import ModelSignature, TensorSpec

# Constant buffers aligned as the TFLite converter aligns them, so kernels may
# read weights in place.
_BUFFER_ALIGNMENT = 16
# ~740k weights (2.9 MB as float32): large enough that the fixed cost of
# per-channel scales leaves INT8 ~3.7x smaller.
DEFAULT_LAYERS = (128, 768, 768, 64)


def mlp_model(layer_sizes: tuple[int, ...] = DEFAULT_LAYERS, *, seed: int = 0, input_name: str = "input",
              output_name: str = "output", nan_bias: bool = False) -> bytes:
    """A float32 multi-layer perceptron: input [1, sizes[0]] -> ... -> output [1, sizes[-1]].

    Hidden layers use a fused RELU. Weights are drawn from `seed`, so two seeds
    give two versions of "the same model" (same signature, different outputs).
    With `nan_bias` the last layer's bias is NaN: the model loads and runs but
    every output is NaN.
    """
    if len(layer_sizes) < 2 or any(s < 1 for s in layer_sizes):
        raise ValueError(f"layer_sizes needs at least two positive sizes, got {layer_sizes}")
    layers = mlp_layers(layer_sizes, seed=seed)
    if nan_bias:
        layers[-1][1][:] = np.nan
    return _build(layer_sizes, layers, input_name, output_name)


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
    """The signature `mlp_model` with the same arguments has (what its manifest would say)."""
    return ModelSignature(inputs=(TensorSpec(input_name, "float32", (1, layer_sizes[0])),),
                          outputs=(TensorSpec(output_name, "float32", (1, layer_sizes[-1])),))


def mlp_reference(layers: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray) -> np.ndarray:
    """numpy forward pass of `mlp_layers(...)` (for checking a runtime)."""
    for i, (w, b) in enumerate(layers):
        x = x @ w.T + b
        if i < len(layers) - 1:
            x = np.maximum(x, 0)
    return x


def _aligned_bytes_vector(builder: flatbuffers.Builder, data: bytes) -> int:
    builder.StartVector(1, len(data), _BUFFER_ALIGNMENT)
    builder.head = builder.head - len(data)
    builder.Bytes[builder.head:builder.head + len(data)] = data
    builder.vectorNumElems = len(data)
    return builder.EndVector()


def _int_vector(builder: flatbuffers.Builder, values: list[int]) -> int:
    return builder.CreateNumpyVector(np.asarray(values, dtype=np.int32))


def _build(sizes, layers, input_name: str, output_name: str) -> bytes:
    b = flatbuffers.Builder(1024 + sum(w.nbytes + bias.nbytes for w, bias in layers) * 2)

    # Buffers: 0 is the conventional empty buffer for non-constant tensors.
    buffer_data = [None]
    for w, bias in layers:
        buffer_data += [w.tobytes(), bias.tobytes()]
    buffer_offsets = []
    for data in buffer_data:
        data_off = _aligned_bytes_vector(b, data) if data is not None else None
        tflite.BufferStart(b)
        if data_off is not None:
            tflite.BufferAddData(b, data_off)
        buffer_offsets.append(tflite.BufferEnd(b))

    # Tensors: activations 0, 3, 6, ...; layer i has weights 3i+1, bias 3i+2, output 3i+3.
    tensor_specs = [(input_name, [1, sizes[0]], 0)]
    for i, (w, bias) in enumerate(layers):
        out_name = output_name if i == len(layers) - 1 else f"dense_{i}/Relu"
        tensor_specs += [(f"dense_{i}/weights", list(w.shape), 1 + 2 * i),
                         (f"dense_{i}/bias", list(bias.shape), 2 + 2 * i),
                         (out_name, [1, sizes[i + 1]], 0)]
    tensor_offsets = []
    for name, shape, buffer_index in tensor_specs:
        name_off = b.CreateString(name)
        shape_off = _int_vector(b, shape)
        tflite.TensorStart(b)
        tflite.TensorAddShape(b, shape_off)
        tflite.TensorAddType(b, tflite.TensorType.FLOAT32)
        tflite.TensorAddBuffer(b, buffer_index)
        tflite.TensorAddName(b, name_off)
        tensor_offsets.append(tflite.TensorEnd(b))

    operator_offsets = []
    for i in range(len(layers)):
        last = i == len(layers) - 1
        tflite.FullyConnectedOptionsStart(b)
        tflite.FullyConnectedOptionsAddFusedActivationFunction(
            b, tflite.ActivationFunctionType.NONE if last else tflite.ActivationFunctionType.RELU)
        options_off = tflite.FullyConnectedOptionsEnd(b)
        inputs_off = _int_vector(b, [3 * i, 3 * i + 1, 3 * i + 2])
        outputs_off = _int_vector(b, [3 * i + 3])
        tflite.OperatorStart(b)
        tflite.OperatorAddOpcodeIndex(b, 0)
        tflite.OperatorAddInputs(b, inputs_off)
        tflite.OperatorAddOutputs(b, outputs_off)
        tflite.OperatorAddBuiltinOptionsType(b, tflite.BuiltinOptions.FullyConnectedOptions)
        tflite.OperatorAddBuiltinOptions(b, options_off)
        operator_offsets.append(tflite.OperatorEnd(b))

    tflite.OperatorCodeStart(b)
    tflite.OperatorCodeAddDeprecatedBuiltinCode(b, tflite.BuiltinOperator.FULLY_CONNECTED)
    tflite.OperatorCodeAddBuiltinCode(b, tflite.BuiltinOperator.FULLY_CONNECTED)
    tflite.OperatorCodeAddVersion(b, 1)
    opcode_off = tflite.OperatorCodeEnd(b)

    def offsets_vector(start, offsets):
        start(b, len(offsets))
        for off in reversed(offsets):
            b.PrependUOffsetTRelative(off)
        return b.EndVector()

    tensors_vec = offsets_vector(tflite.SubGraphStartTensorsVector, tensor_offsets)
    operators_vec = offsets_vector(tflite.SubGraphStartOperatorsVector, operator_offsets)
    sg_inputs = _int_vector(b, [0])
    sg_outputs = _int_vector(b, [3 * len(layers)])
    sg_name = b.CreateString("main")
    tflite.SubGraphStart(b)
    tflite.SubGraphAddTensors(b, tensors_vec)
    tflite.SubGraphAddInputs(b, sg_inputs)
    tflite.SubGraphAddOutputs(b, sg_outputs)
    tflite.SubGraphAddOperators(b, operators_vec)
    tflite.SubGraphAddName(b, sg_name)
    subgraph_off = tflite.SubGraphEnd(b)

    subgraphs_vec = offsets_vector(tflite.ModelStartSubgraphsVector, [subgraph_off])
    opcodes_vec = offsets_vector(tflite.ModelStartOperatorCodesVector, [opcode_off])
    buffers_vec = offsets_vector(tflite.ModelStartBuffersVector, buffer_offsets)
    description = b.CreateString("fleetmesh fixture mlp")
    tflite.ModelStart(b)
    tflite.ModelAddVersion(b, 3)
    tflite.ModelAddOperatorCodes(b, opcodes_vec)
    tflite.ModelAddSubgraphs(b, subgraphs_vec)
    tflite.ModelAddDescription(b, description)
    tflite.ModelAddBuffers(b, buffers_vec)
    model_off = tflite.ModelEnd(b)
    b.Finish(model_off, file_identifier=b"TFL3")
    return bytes(b.Output())
