"""Request tensors: check named (dtype, shape, bytes) triples against a model's
signature and decode them into numpy arrays, refusing anything that would
make the runtime allocate or read more than a stated limit.

Pure: no gRPC, no interpreter. Every refusal is a `TensorError` whose message
names the tensor and says what was wrong, so a client can fix its request;
its `reason` says which sort of refusal it is, for the refusal counters (kept
apart from model errors: a client's bad request says nothing about a model
version's health). Wire bytes are little-endian, C order (numpy's `tobytes()`
on x86 and ARM).

Size limits are one setting: `MAX_MESSAGE_BYTES` is the largest gRPC message
a node sends or receives (every service; mesh.node.peers and the node's server
use it), and a request's tensors may fill it up to `MESSAGE_OVERHEAD_BYTES`
(names, shapes, ids, framing). The tensor limit is capped at the message size,
not the other way round: the cap bounds what any peer can make a small device
allocate per message, for every service, and a model whose requests could
not fit is refused at activation instead of failing every request.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mesh.artifacts.signature import DTYPES, ModelSignature, TensorSpec

MAX_RANK = 8
# The largest gRPC message a node sends or receives, on every service (see the module doc).
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# What a request or response carries besides tensor bytes; 64 KiB covers hundreds of named tensors.
MESSAGE_OVERHEAD_BYTES = 64 * 1024
MAX_TENSOR_BYTES_PER_MESSAGE = MAX_MESSAGE_BYTES - MESSAGE_OVERHEAD_BYTES


class TensorError(ValueError):
    """A request tensor does not fit the active model's signature or the request limits.

    `reason` labels the refusal counter: "name" (unknown, missing or repeated tensor),
    "dtype", "shape" (rank, dimensions, byte count), "too_large", "non_finite".
    """

    default_reason = "shape"

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or self.default_reason


class RequestTooLarge(TensorError):
    """A request's tensors are larger than one message may carry."""

    default_reason = "too_large"


class NonFiniteInput(TensorError):
    """A float input holds NaN or infinity and the model's signature does not allow it."""

    default_reason = "non_finite"


@dataclass(frozen=True)
class TensorLimits:
    """Bounds on one request, checked before any buffer is allocated: one tensor, and all of a
    request's tensors together, within what one gRPC message carries."""

    max_tensor_bytes: int = MAX_TENSOR_BYTES_PER_MESSAGE
    max_request_bytes: int = MAX_TENSOR_BYTES_PER_MESSAGE
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
    leaves open (-1) may take any size within `limits`. Float inputs must be
    finite unless the signature allows otherwise.
    """
    specs = {spec.name: spec for spec in signature.inputs}
    given: dict[str, WireTensor] = {}
    for tensor in tensors:
        if tensor.name not in specs:
            raise TensorError(f"tensor {tensor.name!r} is not an input of the active model; "
                              f"its inputs are {sorted(specs)}", "name")
        if tensor.name in given:
            raise TensorError(f"tensor {tensor.name!r} is given more than once", "name")
        given[tensor.name] = tensor
    missing = [name for name in specs if name not in given]
    if missing:
        raise TensorError(f"input tensor(s) {missing} missing from the request", "name")
    total_bytes = sum(len(t.data) for t in given.values())
    if total_bytes > limits.max_request_bytes:
        sizes = ", ".join(f"{t.name!r} {len(t.data)}" for t in given.values())
        raise RequestTooLarge(f"the request's tensors take {total_bytes} bytes ({sizes}), more than the "
                              f"{limits.max_request_bytes} bytes one request may carry; send smaller inputs")
    return [decode_tensor(given[spec.name], spec, limits,
                          allow_non_finite=signature.allow_non_finite_inputs) for spec in signature.inputs]


def decode_tensor(tensor: WireTensor, spec: TensorSpec, limits: TensorLimits = TensorLimits(), *,
                  allow_non_finite: bool = False) -> np.ndarray:
    """One array from its wire form, checked against `spec` and `limits`; TensorError if it does not fit."""
    name = spec.name
    if tensor.dtype != spec.dtype:
        known = "" if tensor.dtype in DTYPES else f" (not a supported dtype; supported: {', '.join(DTYPES)})"
        raise TensorError(f"tensor {name!r} has dtype {tensor.dtype!r}{known}, "
                          f"the model expects {spec.dtype}", "dtype")
    shape = tuple(tensor.shape)
    if len(shape) > MAX_RANK:
        raise TensorError(f"tensor {name!r} has rank {len(shape)}, more than the limit of {MAX_RANK}")
    for dim in shape:
        if dim < 0 or dim > limits.max_dim:
            raise TensorError(f"tensor {name!r} has dimension {dim} in shape {list(shape)}; "
                              f"dimensions must be 0..{limits.max_dim}")
    if len(shape) != len(spec.shape) or any(want not in (-1, got)
                                            for want, got in zip(spec.shape, shape, strict=True)):
        raise TensorError(f"tensor {name!r} has shape {list(shape)}, the model expects {list(spec.shape)}"
                          + (" (-1: any size)" if -1 in spec.shape else ""))
    dtype = np.dtype(spec.dtype).newbyteorder("<")
    # Python ints: a hostile shape cannot overflow the size check.
    expected_bytes = dtype.itemsize
    for dim in shape:
        expected_bytes *= dim
    if expected_bytes > limits.max_tensor_bytes:
        raise RequestTooLarge(f"tensor {name!r} with shape {list(shape)} would take {expected_bytes} bytes, "
                              f"more than the limit of {limits.max_tensor_bytes}")
    if len(tensor.data) != expected_bytes:
        raise TensorError(f"tensor {name!r} carries {len(tensor.data)} bytes; {spec.dtype} with shape "
                          f"{list(shape)} needs exactly {expected_bytes}")
    array = np.frombuffer(tensor.data, dtype=dtype).reshape(shape)
    if not allow_non_finite and np.issubdtype(dtype, np.floating):
        finite = np.isfinite(array)
        if not finite.all():
            bad = int(finite.size - np.count_nonzero(finite))
            raise NonFiniteInput(f"tensor {name!r} holds {bad} NaN or infinite value(s) of {finite.size}; "
                                 f"the model's signature does not allow non-finite inputs")
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
