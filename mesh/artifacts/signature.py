"""A model's input/output signature: what a manifest promises and what the
runtime checks a loaded model and every request against.

Pure data and codec. It lives with the artifacts because a manifest carries it;
the inference package imports it from here (never the other way round), and
its backends build one from a loaded interpreter with `signature_from_details`.
The dict form is what goes into a signed manifest, so it is stable and
canonical-JSON friendly (ints, strings, lists; floats only for quantisation
scales).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# dtype names as numpy spells them; the runtime supports these tensor types.
DTYPES = ("float32", "float16", "int8", "uint8", "int16", "int32", "int64", "bool")


_SIGNATURE_FIELDS = frozenset({"inputs", "outputs", "allow_non_finite_inputs"})


class SignatureError(ValueError):
    """A signature document is malformed, or a model does not match its signature."""


@dataclass(frozen=True)
class TensorSpec:
    """One input or output tensor: name, dtype, shape and (for quantised tensors)
    scale and zero point. A shape entry of -1 means any size in that dimension."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    scale: float = 0.0
    zero_point: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise SignatureError(f"tensor name must be a non-empty string, got {self.name!r}")
        if self.dtype not in DTYPES:
            raise SignatureError(f"tensor {self.name!r}: unsupported dtype {self.dtype!r} "
                                 f"(supported: {', '.join(DTYPES)})")
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= -1 for d in self.shape):
            raise SignatureError(f"tensor {self.name!r}: shape must be integers >= -1, got {self.shape!r}")

    @property
    def quantized(self) -> bool:
        return self.scale != 0.0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.quantized:
            out["scale"] = self.scale
            out["zero_point"] = self.zero_point
        return out

    @classmethod
    def from_dict(cls, raw: Any) -> TensorSpec:
        if not isinstance(raw, dict):
            raise SignatureError(f"tensor spec must be an object, got {type(raw).__name__}")
        unknown = set(raw) - {"name", "dtype", "shape", "scale", "zero_point"}
        if unknown:
            raise SignatureError(f"tensor spec has unknown fields {sorted(unknown)}")
        try:
            shape = raw["shape"]
            if not isinstance(shape, list):
                raise SignatureError(f"tensor {raw.get('name')!r}: shape must be a list")
            return cls(name=raw["name"], dtype=raw["dtype"], shape=tuple(shape),
                       scale=float(raw.get("scale", 0.0)), zero_point=int(raw.get("zero_point", 0)))
        except KeyError as exc:
            raise SignatureError(f"tensor spec is missing {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            if isinstance(exc, SignatureError):
                raise
            raise SignatureError(f"tensor spec {raw.get('name')!r}: {exc}") from None

    def matches(self, other: TensorSpec) -> str | None:
        """None when `other` (what a loaded model has) fits this spec, else why not."""
        if other.name != self.name:
            return f"tensor is named {other.name!r}, expected {self.name!r}"
        if other.dtype != self.dtype:
            return f"tensor {self.name!r} has dtype {other.dtype}, expected {self.dtype}"
        if len(other.shape) != len(self.shape) or any(
                want != -1 and got != -1 and want != got
                for want, got in zip(self.shape, other.shape, strict=True)):
            return f"tensor {self.name!r} has shape {list(other.shape)}, expected {list(self.shape)}"
        if self.quantized and (abs(other.scale - self.scale) > 1e-9 * max(1.0, abs(self.scale))
                               or other.zero_point != self.zero_point):
            return (f"tensor {self.name!r} is quantised with scale {other.scale} zero point "
                    f"{other.zero_point}, expected scale {self.scale} zero point {self.zero_point}")
        return None


@dataclass(frozen=True)
class ModelSignature:
    """A model's tensors and the publisher's policy for requests to it.

    `allow_non_finite_inputs`: whether a request may carry NaN or infinity in a
    float input (a model that reads NaN as "missing"). Off by default: nodes then
    refuse such requests as invalid input before they reach the model. The model
    file does not carry this (only the manifest does), so `mismatch` ignores it.
    """

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    allow_non_finite_inputs: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.allow_non_finite_inputs, bool):
            raise SignatureError(f"allow_non_finite_inputs must be true or false, "
                                 f"got {self.allow_non_finite_inputs!r}")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"inputs": [t.to_dict() for t in self.inputs],
                               "outputs": [t.to_dict() for t in self.outputs]}
        # Written only when set, so the signed form of every existing manifest is unchanged.
        if self.allow_non_finite_inputs:
            out["allow_non_finite_inputs"] = True
        return out

    @classmethod
    def from_dict(cls, raw: Any) -> ModelSignature:
        if not isinstance(raw, dict) or not {"inputs", "outputs"} <= set(raw) <= _SIGNATURE_FIELDS:
            raise SignatureError("signature must be an object with 'inputs' and 'outputs' "
                                 "(and optionally 'allow_non_finite_inputs'), nothing else")
        if not isinstance(raw["inputs"], list) or not isinstance(raw["outputs"], list):
            raise SignatureError("signature inputs and outputs must be lists")
        return cls(inputs=tuple(TensorSpec.from_dict(t) for t in raw["inputs"]),
                   outputs=tuple(TensorSpec.from_dict(t) for t in raw["outputs"]),
                   allow_non_finite_inputs=raw.get("allow_non_finite_inputs", False))

    def mismatch(self, loaded: ModelSignature) -> str | None:
        """None when a loaded model's tensors fit this signature's, else the first difference."""
        for kind, want, got in (("inputs", self.inputs, loaded.inputs),
                                ("outputs", self.outputs, loaded.outputs)):
            if len(want) != len(got):
                return f"model has {len(got)} {kind}, signature says {len(want)}"
            for w, g in zip(want, got, strict=True):
                problem = w.matches(g)
                if problem:
                    return problem
        return None


def signature_from_details(inputs: list[dict], outputs: list[dict]) -> ModelSignature:
    """Build a signature from a TFLite interpreter's get_input_details()/get_output_details()."""

    def spec(detail: dict) -> TensorSpec:
        import numpy as np  # local: the signature codec itself must not need numpy

        scale, zero_point = detail.get("quantization", (0.0, 0))
        shape = detail.get("shape_signature", detail["shape"])
        return TensorSpec(name=str(detail["name"]), dtype=np.dtype(detail["dtype"]).name,
                          shape=tuple(int(d) for d in shape), scale=float(scale), zero_point=int(zero_point))

    return ModelSignature(inputs=tuple(spec(d) for d in inputs), outputs=tuple(spec(d) for d in outputs))
