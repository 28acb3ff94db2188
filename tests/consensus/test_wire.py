"""The Raft frame codec and the plain-value unpickler: nothing but plain values crosses."""

from __future__ import annotations

import contextlib
import os
import pickle

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.consensus import safe_pickle
from mesh.consensus.wire import MAX_FRAME_BYTES, FrameError, decode_message, encode_message

plain = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=20) | st.binary(max_size=40),
    lambda inner: (st.lists(inner, max_size=4) | st.tuples(inner, inner)
                   | st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=20)


@given(st.dictionaries(st.text(max_size=10), plain, max_size=5),
       st.sampled_from(["append_entries", "request_vote"]))
def test_plain_messages_round_trip_exactly(fields, kind) -> None:
    fields.pop("transmission", None)
    message = {**fields, "type": kind}
    assert decode_message(encode_message(message)) == message


def test_pysyncobj_message_shapes_round_trip_with_tuples_kept() -> None:
    message = {"type": "append_entries", "term": 3, "commit_index": 7, "prevLogIdx": 6, "prevLogTerm": 3,
               "entries": [(b"\x01cmd", 7, 3), (b"\x01cmd2", 8, 3)]}
    decoded = decode_message(encode_message(message))
    assert decoded == message and isinstance(decoded["entries"][0], tuple)
    serialized = {"type": "append_entries", "term": 3, "commit_index": 7,
                  "serialized": (b"data", True, False)}
    assert decode_message(encode_message(serialized)) == serialized


class Gadget:
    def __reduce__(self):
        return (os.system, ("touch /tmp/should-not-exist",))


def test_objects_cannot_be_encoded_and_foreign_frames_are_refused() -> None:
    with pytest.raises(FrameError, match="Gadget"):
        encode_message({"type": "append_entries", "x": Gadget()})
    with pytest.raises(FrameError):
        decode_message(pickle.dumps({"type": "append_entries"}))  # a pickle is not a frame
    with pytest.raises(FrameError, match="extension"):
        decode_message(msgpack.packb({"type": "x", "y": msgpack.ExtType(42, b"")}))
    with pytest.raises(FrameError, match="transmission"):
        decode_message(msgpack.packb({"type": "append_entries", "transmission": "start", "data": b""}))
    with pytest.raises(FrameError, match="type"):
        decode_message(msgpack.packb([1, 2, 3]))
    with pytest.raises(FrameError, match="limit"):
        decode_message(b"\x00" * (MAX_FRAME_BYTES + 1))


@given(st.binary(max_size=200))
def test_any_bytes_decode_or_raise_frame_error(data) -> None:
    with contextlib.suppress(FrameError):
        decode_message(data)


def test_plain_pickles_load_and_gadgets_are_refused(tmp_path) -> None:
    command = (3, (b"\x00command bytes",), {})
    assert safe_pickle.loads(pickle.dumps(command, protocol=2)) == command
    marker = tmp_path / "pwned"

    class FileGadget:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with pytest.raises(safe_pickle.UnsafePickle, match=r"(builtins|io)\.open"):
        safe_pickle.loads(pickle.dumps((3, (FileGadget(),), {}), protocol=2))
    assert not marker.exists()
    with pytest.raises(safe_pickle.UnsafePickle, match="posix.system|os.system"):
        safe_pickle.loads(pickle.dumps(Gadget(), protocol=2))


class Member:
    def __init__(self, node_id: str) -> None:
        self.node_id = node_id


def test_allowed_classes_are_built_from_their_state_only() -> None:
    data = pickle.dumps(["add", "n1", Member("n1")], protocol=2)
    with pytest.raises(safe_pickle.UnsafePickle):
        safe_pickle.loads(data)
    kind, node_id, member = safe_pickle.loads(data, allow=[(__name__, "Member")])
    assert (kind, node_id, member.node_id) == ("add", "n1", "n1") and isinstance(member, Member)
