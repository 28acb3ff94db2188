"""Request tensor validation: every malformed tensor is a TensorError naming the tensor; nothing huge is
allocated."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.artifacts.signature import DTYPES, ModelSignature, SignatureError, TensorSpec
from mesh.inference.tensors import (
    MAX_MESSAGE_BYTES,
    MESSAGE_OVERHEAD_BYTES,
    NonFiniteInput,
    RequestTooLarge,
    TensorError,
    TensorLimits,
    WireTensor,
    all_finite,
    decode_inputs,
    encode_tensor,
)

SIG = ModelSignature(inputs=(TensorSpec("image", "float32", (1, 4, 4, 3)),
                             TensorSpec("mask", "int8", (-1, 2))),
                     outputs=(TensorSpec("score", "float32", (1, 1)),))


def wire(name, array):
    return WireTensor(name=name, dtype=array.dtype.name, shape=array.shape, data=array.tobytes())


def valid():
    return [wire("image", np.arange(48, dtype=np.float32).reshape(1, 4, 4, 3)),
            wire("mask", np.array([[1, -2], [3, 4], [5, 6]], dtype=np.int8))]


def test_valid_request_decodes_in_signature_order():
    image, mask = decode_inputs(list(reversed(valid())), SIG)
    assert image.shape == (1, 4, 4, 3) and image.dtype == np.float32 and image[0, 0, 0, 2] == 2.0
    assert mask.shape == (3, 2) and mask[0, 1] == -2
    assert image.flags.c_contiguous


@pytest.mark.parametrize("mutate, words", [
    (lambda t: [WireTensor("image", "float64", t[0].shape, t[0].data * 2), t[1]], ["'image'", "float64"]),
    (lambda t: [WireTensor("image", "complex64", t[0].shape, t[0].data), t[1]],
     ["'image'", "not a supported"]),
    (lambda t: [WireTensor("image", "float32", (1, 4, 3, 4), t[0].data), t[1]], ["'image'", "[1, 4, 3, 4]"]),
    (lambda t: [WireTensor("image", "float32", t[0].shape, t[0].data[:-1]), t[1]], ["'image'", "191 bytes"]),
    (lambda t: [WireTensor("image", "float32", t[0].shape, t[0].data + b"x"), t[1]],
     ["'image'", "exactly 192"]),
    (lambda t: [t[0], WireTensor("mask", "int8", (1 << 40, 2), b"")], ["'mask'", "dimension"]),
    (lambda t: [t[0], WireTensor("mask", "int8", (1 << 23, 1 << 23), b"")], ["'mask'", "shape"]),
    (lambda t: [t[0], WireTensor("mask", "int8", (-3, 2), b"")], ["'mask'", "-3"]),
    (lambda t: [t[0]], ["missing", "mask"]),
    (lambda t: t + [t[1]], ["'mask'", "more than once"]),
    (lambda t: t + [WireTensor("extra", "int8", (1,), b"\0")], ["'extra'", "not an input"]),
])
def test_malformed_tensor_is_refused_with_its_name(mutate, words):
    with pytest.raises(TensorError) as info:
        decode_inputs(mutate(valid()), SIG)
    for word in words:
        assert word in str(info.value)


def test_size_limit_is_checked_before_allocation():
    limits = TensorLimits(max_tensor_bytes=100)
    with pytest.raises(TensorError, match="more than the limit of 100"):
        decode_inputs([valid()[0], WireTensor("mask", "int8", (1000, 2), b"")], SIG, limits)


def test_encode_round_trips_and_finite_check():
    array = np.array([[1.5, -2.0]], dtype=np.float32)
    t = encode_tensor("score", array)
    assert (t.dtype, t.shape) == ("float32", (1, 2))
    assert np.array_equal(np.frombuffer(t.data, np.float32).reshape(t.shape), array)
    assert all_finite([array, np.array([1], np.int8)])
    assert not all_finite([np.array([np.inf], np.float16)])


names = st.sampled_from(["image", "mask", "", "images", "x" * 300])
shapes = st.lists(st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1), max_size=10)
any_tensor = st.builds(WireTensor, name=names, dtype=st.sampled_from(DTYPES + ("float64", "", "f4", "<f4")),
                       shape=shapes.map(tuple), data=st.binary(max_size=256))


@settings(max_examples=300, deadline=None)
@given(st.lists(any_tensor, max_size=4))
def test_arbitrary_tensors_decode_or_raise_tensor_error(tensors):
    """Whatever arrives, the decoder either returns arrays that fit the signature or raises TensorError."""
    try:
        arrays = decode_inputs(tensors, SIG, TensorLimits(max_tensor_bytes=1 << 16))
    except TensorError as exc:
        assert str(exc)
        return
    assert [a.dtype.name for a in arrays] == ["float32", "int8"]
    assert arrays[0].shape == (1, 4, 4, 3) and arrays[1].shape[1] == 2


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_non_finite_float_input_is_refused_naming_the_tensor(value, dtype):
    signature = ModelSignature(inputs=(TensorSpec("image", dtype, (1, 4)),
                                       TensorSpec("mask", "int8", (1, 2))),
                               outputs=(TensorSpec("score", "float32", (1, 1)),))
    image = np.array([[0.5, value, 1.0, value]], dtype=dtype)
    tensors = [wire("image", image), wire("mask", np.array([[1, 2]], np.int8))]
    with pytest.raises(NonFiniteInput) as info:
        decode_inputs(tensors, signature)
    assert "'image'" in str(info.value) and "2 NaN or infinite value(s) of 4" in str(info.value)
    assert info.value.reason == "non_finite" and isinstance(info.value, TensorError)
    allowed = dataclasses.replace(signature, allow_non_finite_inputs=True)
    decoded, _ = decode_inputs(tensors, allowed)
    np.testing.assert_array_equal(decoded, image)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=4, max_size=4))
def test_a_float_input_is_refused_exactly_when_it_holds_a_non_finite_value(values):
    signature = ModelSignature(inputs=(TensorSpec("x", "float32", (1, 4)),), outputs=SIG.outputs)
    array = np.array([values], dtype=np.float32)
    if np.isfinite(array).all():
        np.testing.assert_array_equal(decode_inputs([wire("x", array)], signature)[0], array)
    else:
        with pytest.raises(NonFiniteInput, match="'x'"):
            decode_inputs([wire("x", array)], signature)


def test_request_limits_fit_in_one_message():
    limits = TensorLimits()
    assert limits.max_request_bytes + MESSAGE_OVERHEAD_BYTES <= MAX_MESSAGE_BYTES
    assert limits.max_tensor_bytes <= limits.max_request_bytes


def test_a_request_whose_tensors_together_exceed_the_limit_is_refused():
    limits = TensorLimits(max_tensor_bytes=200, max_request_bytes=197)
    with pytest.raises(RequestTooLarge) as info:
        decode_inputs(valid(), SIG, limits)  # 192 + 6 bytes fit alone, not together
    message = str(info.value)
    assert "198 bytes" in message and "'image' 192" in message and "197 bytes one request" in message
    assert info.value.reason == "too_large"
    with pytest.raises(RequestTooLarge, match="'image'.*more than the limit of 100"):
        decode_inputs(valid(), SIG, TensorLimits(max_tensor_bytes=100))


def test_signature_policy_flag_round_trips_and_is_written_only_when_set():
    assert "allow_non_finite_inputs" not in SIG.to_dict()
    assert ModelSignature.from_dict(SIG.to_dict()) == SIG
    allowed = dataclasses.replace(SIG, allow_non_finite_inputs=True)
    assert allowed.to_dict()["allow_non_finite_inputs"] is True
    assert ModelSignature.from_dict(allowed.to_dict()) == allowed
    # The file never carries the flag: a loaded model matches a manifest either way.
    assert allowed.mismatch(SIG) is None and SIG.mismatch(allowed) is None
    for bad in ({**SIG.to_dict(), "allow_non_finite_inputs": "yes"}, {**SIG.to_dict(), "allow_nan": True}):
        with pytest.raises(SignatureError):
            ModelSignature.from_dict(bad)


@pytest.mark.parametrize("mutate, reason", [
    (lambda t: [t[0]], "name"),
    (lambda t: t + [t[1]], "name"),
    (lambda t: t + [WireTensor("extra", "int8", (1,), b"\0")], "name"),
    (lambda t: [WireTensor("image", "float64", t[0].shape, t[0].data * 2), t[1]], "dtype"),
    (lambda t: [WireTensor("image", "float32", (1, 4, 3, 4), t[0].data), t[1]], "shape"),
    (lambda t: [WireTensor("image", "float32", t[0].shape, t[0].data[:-1]), t[1]], "shape"),
    (lambda t: [t[0], WireTensor("mask", "int8", (1 << 23, 2), b"")], "too_large"),
])
def test_each_refusal_says_its_reason_for_the_counters(mutate, reason):
    with pytest.raises(TensorError) as info:
        decode_inputs(mutate(valid()), SIG)
    assert info.value.reason == reason
