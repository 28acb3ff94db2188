"""Request tensors: check named (dtype, shape, bytes) triples against a model's
signature and decode them into numpy arrays, refusing anything that would
make the runtime allocate or read more than a stated limit.

Pure: no gRPC, no interpreter. Every refusal is a `TensorError` whose message
names the tensor and says what was wrong, so a client can fix its request.
Wire bytes are little-endian, C order (numpy's `tobytes()` on x86 and ARM).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mesh.artifacts.signature import DTYPES, ModelSignature, TensorSpec

MAX_RANK = 8


class TensorError(ValueError):
    """A request tensor does not fit the active model's signature or the request limits."""


@dataclass(frozen=True)
class TensorLimits:
    """Bounds on one request, checked before any buffer is allocated."""

    max_tensor_bytes: int = 64 * 1024 * 1024
    max_dim: int = 1 << 24


@dataclass(frozen=True)
class WireTensor:
    """A tensor as it travels: name, numpy dtype name, shape, raw little-endian bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: bytes


def decode_inputs(tensors: list[WireTensor], signature: ModelSignature,
                  limits: TensorLimits = TensorLimits()) -> list[np.ndarray]:
    """Arrays in the signature's input order, each checked against its spec.

    Every input must be given exactly once, by name; a dimension the signature
    leaves open (-1) may take any size within `limits`.
    """
    specs = {spec.name: spec for spec in signature.inputs}
    given: dict[str, WireTensor] = {}
    for tensor in tensors:
        if tensor.name not in specs:
            raise TensorError(f"tensor {tensor.name!r} is not an input of the active model; "
                              f"its inputs are {sorted(specs)}")
        if tensor.name in given:
            raise TensorError(f"tensor {tensor.name!r} is given more than once")
        given[tensor.name] = tensor
    missing = [name for name in specs if name not in given]
    if missing:
        raise TensorError(f"input tensor(s) {missing} missing from the request")
    return [decode_tensor(given[spec.name], spec, limits) for spec in signature.inputs]


def decode_tensor(tensor: WireTensor, spec: TensorSpec, limits: TensorLimits = TensorLimits()) -> np.ndarray:
    """One array from its wire form, checked against `spec` and `limits`; TensorError if it does not fit."""
    name = spec.name
    if tensor.dtype != spec.dtype:
        known = "" if tensor.dtype in DTYPES else f" (not a supported dtype; supported: {', '.join(DTYPES)})"
        raise TensorError(f"tensor {name!r} has dtype {tensor.dtype!r}{known}, the model expects {spec.dtype}")
    shape = tuple(tensor.shape)
    if len(shape) > MAX_RANK:
        raise TensorError(f"tensor {name!r} has rank {len(shape)}, more than the limit of {MAX_RANK}")
    for dim in shape:
        if dim < 0 or dim > limits.max_dim:
            raise TensorError(f"tensor {name!r} has dimension {dim} in shape {list(shape)}; "
                              f"dimensions must be 0..{limits.max_dim}")
    if len(shape) != len(spec.shape) or any(want not in (-1, got) for want, got in zip(spec.shape, shape)):
        raise TensorError(f"tensor {name!r} has shape {list(shape)}, the model expects {list(spec.shape)}"
                          + (" (-1: any size)" if -1 in spec.shape else ""))
    dtype = np.dtype(spec.dtype).newbyteorder("<")
    # Python ints: a hostile shape cannot overflow the size check.
    expected_bytes = dtype.itemsize
    for dim in shape:
        expected_bytes *= dim
    if expected_bytes > limits.max_tensor_bytes:
        raise TensorError(f"tensor {name!r} with shape {list(shape)} would take {expected_bytes} bytes, "
                          f"more than the limit of {limits.max_tensor_bytes}")
    if len(tensor.data) != expected_bytes:
        raise TensorError(f"tensor {name!r} carries {len(tensor.data)} bytes; {spec.dtype} with shape "
                          f"{list(shape)} needs exactly {expected_bytes}")
    array = np.frombuffer(tensor.data, dtype=dtype).reshape(shape)
    # Native byte order and C-contiguous, as interpreters want; on little-endian hosts a
    # read-only view of the request bytes, not a copy.
    return np.ascontiguousarray(array, dtype=np.dtype(spec.dtype))


def encode_tensor(name: str, array: np.ndarray) -> WireTensor:
    """The wire form of an output array."""
    little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return WireTensor(name=name, dtype=array.dtype.name, shape=tuple(int(d) for d in array.shape),
                      data=little.tobytes())


def all_finite(arrays: list[np.ndarray]) -> bool:
    """False when any floating-point array holds NaN or infinity."""
    return all(not np.issubdtype(a.dtype, np.floating) or bool(np.isfinite(a).all()) for a in arrays)
