"""Strict JSON helpers shared by the rollout codecs: bounded parsing, exact numbers, canonical spelling.

Every document a peer can hand us goes through `strict_json`: bounded in size,
UTF-8, no NaN/Infinity, no duplicate keys (one signature must never cover two
readings of one document). Numbers a rollout document carries are written by
`json_number`: a whole value as an integer, anything else as a float, so each
value has exactly one canonical spelling.
"""

from __future__ import annotations

import json
import math
from typing import Any


def strict_json(data: object, what: str, error: type[Exception], limit_bytes: int) -> Any:
    """Parse `data` (bytes) as one JSON value, or raise `error` saying what is wrong."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise error(f"{what}: expected bytes, got {type(data).__name__}")
    if len(data) > limit_bytes:
        raise error(f"{what}: {len(data)} bytes, at most {limit_bytes} allowed")
    try:
        return json.loads(
            bytes(data).decode("utf-8"),
            parse_constant=_refuse_constant,
            parse_float=_finite_float,
            object_pairs_hook=_no_duplicate_keys,
        )
    except UnicodeDecodeError:
        raise error(f"{what}: not UTF-8") from None
    except (ValueError, RecursionError) as exc:
        raise error(f"{what}: not valid JSON ({_short(exc)})") from None


def expect_object(
    doc: object,
    where: str,
    required: frozenset[str],
    error: type[Exception],
    optional: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """`doc` as a dict holding every `required` key, perhaps some `optional` ones, and nothing else."""
    if not isinstance(doc, dict):
        raise error(f"{where}: expected an object, got {type(doc).__name__}")
    missing = sorted(required - doc.keys())
    if missing:
        raise error(f"{where}: missing field(s) {', '.join(missing)}")
    unknown = sorted(str(k) for k in doc.keys() - required - optional)
    if unknown:
        allowed = ", ".join(sorted(required | optional))
        raise error(f"{where}: unknown field(s) {', '.join(unknown)}; expected only {allowed}")
    return doc


def json_number(value: float | int) -> float | int:
    """The one canonical spelling of a number: an int when whole, else a float."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


def number(
    value: object, where: str, error: type[Exception], *, minimum: float = 0.0, maximum: float = math.inf
) -> float:
    """`value` as a finite float in [minimum, maximum] (ints accepted, bools refused)."""
    if type(value) not in (int, float):
        raise error(f"{where}: expected a number, got {value!r}")
    try:
        result = float(value)  # type: ignore[arg-type]
    except OverflowError:
        raise error(f"{where}: {value!r} is out of range") from None
    if not math.isfinite(result) or not minimum <= result <= maximum:
        bound = f"<= {maximum:g}" if math.isfinite(maximum) else ""
        raise error(f"{where}: expected a number >= {minimum:g} {bound}, got {value!r}".replace("  ", " "))
    return result


def integer(
    value: object, where: str, error: type[Exception], *, minimum: int = 0, maximum: int = 2**63 - 1
) -> int:
    if type(value) is not int or not minimum <= value <= maximum:
        raise error(f"{where}: expected a whole number in [{minimum}, {maximum}], got {value!r}")
    return value


def text(value: object, where: str, error: type[Exception], max_chars: int) -> str:
    """A string of at most `max_chars` that UTF-8 can encode (JSON lets a lone surrogate through)."""
    if not isinstance(value, str) or len(value) > max_chars:
        raise error(f"{where}: expected text of at most {max_chars} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise error(f"{where}: text that UTF-8 cannot encode") from None
    return value


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise ValueError(f"number {literal[:40]} is out of range")
    return value


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _short(exc: BaseException) -> str:
    message = str(exc) or type(exc).__name__
    return message if len(message) <= 200 else message[:200] + "..."
