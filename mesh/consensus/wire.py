"""How Raft messages between members are encoded: plain values only, never objects.

pysyncobj's own TCP transport sends ``zlib(pickle(message))``, so whoever can put bytes on a
member's Raft port can run code in it. fleetmesh's transport encodes the same messages with
msgpack, which can only build dict, list, str, bytes, int, float, bool and None (tuples ride
as an extension type so that a message round-trips exactly). A frame holding anything else
cannot be encoded by a member and is refused on receipt (`FrameError`).

Rules of this module:

- Pure: bytes in, message out (or `FrameError` naming what is wrong).
- A frame is at most `MAX_FRAME_BYTES`; containers nest at most `MAX_DEPTH` deep.
- A message is a dict with a str ``type``; its keys are str.
- pysyncobj's chunked "transmission" of a single large entry carries a *pickled* entry that
  the follower unpickles: such messages are refused here (and never sent: the group's batch
  size is above the largest command, see raft.py).
"""

from __future__ import annotations

from typing import Any

import msgpack

MAX_FRAME_BYTES = 8 * 1024 * 1024
MAX_DEPTH = 16
_TUPLE = 1


class FrameError(ValueError):
    """A Raft frame that is not a plain-valued pysyncobj message (names what is wrong)."""


def _default(value: Any) -> Any:
    if isinstance(value, tuple):
        return msgpack.ExtType(_TUPLE, encode_value(list(value)))
    raise FrameError(f"cannot encode a {type(value).__name__} in a Raft frame: only plain values travel")


def encode_value(value: Any) -> bytes:
    try:
        packed: bytes = msgpack.packb(value, use_bin_type=True, strict_types=True, default=_default)
        return packed
    except (TypeError, ValueError, OverflowError) as exc:
        if isinstance(exc, FrameError):
            raise
        raise FrameError(f"cannot encode Raft message: {exc}") from None


def encode_message(message: dict[str, Any]) -> bytes:
    """The frame of a pysyncobj message dict; FrameError if it holds anything but plain values."""
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise FrameError("a Raft message is a dict with a str 'type'")
    if "transmission" in message:
        raise FrameError("chunked 'transmission' messages carry pickled entries and are not sent")
    frame = encode_value(message)
    if len(frame) > MAX_FRAME_BYTES:
        raise FrameError(f"Raft message of {len(frame)} bytes is over the {MAX_FRAME_BYTES}-byte frame limit")
    return frame


def _ext_hook(code: int, data: bytes) -> Any:
    if code != _TUPLE:
        raise FrameError(f"unknown extension type {code} in a Raft frame")
    return tuple(_decode(data))


def _decode(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True, ext_hook=_ext_hook)


def _check_depth(value: Any, depth: int = 0) -> None:
    if depth > MAX_DEPTH:
        raise FrameError(f"Raft frame nests deeper than {MAX_DEPTH} levels")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_depth(key, depth + 1)
            _check_depth(item, depth + 1)
    elif isinstance(value, list | tuple):
        for item in value:
            _check_depth(item, depth + 1)


def decode_message(frame: bytes) -> dict[str, Any]:
    """The message in `frame`; FrameError if it is malformed, too large, or not a plain message."""
    if not isinstance(frame, bytes | bytearray | memoryview):
        raise FrameError(f"a Raft frame is bytes, got {type(frame).__name__}")
    if len(frame) > MAX_FRAME_BYTES:
        raise FrameError(f"Raft frame of {len(frame)} bytes is over the {MAX_FRAME_BYTES}-byte limit")
    try:
        message = _decode(bytes(frame))
    except FrameError:
        raise
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError, TypeError) as exc:
        raise FrameError(f"malformed Raft frame: {exc}") from None
    except RecursionError:
        raise FrameError(f"Raft frame nests deeper than {MAX_DEPTH} levels") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise FrameError("a Raft message is a dict with a str 'type'")
    if "transmission" in message:
        raise FrameError("chunked 'transmission' messages carry pickled entries and are refused")
    _check_depth(message)
    return message
