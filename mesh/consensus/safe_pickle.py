"""A pickle reader that builds plain values and nothing else.

pysyncobj stores every Raft log entry as a pickle: ``(method id, args, kwargs)`` for a
replicated call, ``['add'|'rem', node id, node]`` for a membership change, an int for a
code-version change. Every replica unpickles each committed entry when it applies it, and a
follower unpickles the snapshot metadata it installs from its leader. A member with a valid
certificate could therefore put a pickle gadget (an object whose ``__reduce__`` runs a
command) into the log through the leader. `loads` refuses every global: dict, list, tuple,
set, str, bytes, int, float, bool and None need none (bytes at pickle protocol 2 need
``_codecs.encode(text, "latin1")``, which is answered by a function that does only that),
so fleetmesh's own entries (one replicated method whose argument is the command's bytes)
read back unchanged, and anything
that would construct an object (or call a function) raises `UnsafePickle` instead.

The one class pysyncobj legitimately pickles into the log is its node class, inside
membership-change entries; `allow` names such classes (by module and name) and they are
built with ``cls.__new__(cls)`` and their attributes set, without calling any other code.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Iterable
from typing import Any


class UnsafePickle(pickle.UnpicklingError):
    """A pickle that would construct an object or call a function (names the global it asked for)."""


def _latin1_bytes(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """What pickle protocol 2 stores bytes as: ``_codecs.encode(text, "latin1")``. Only that."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise UnsafePickle(f"refused _codecs.encode with encoding {encoding!r}: "
                           "only latin1 bytes are accepted")
    return text.encode("latin1", errors)


class _PlainUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, allowed: frozenset[tuple[str, str]]) -> None:
        super().__init__(io.BytesIO(data))
        self._allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        # pysyncobj pickles with protocol 2: an instance is NEWOBJ (cls.__new__(cls)) then BUILD
        # (its attributes), so an allowed class needs no other global.
        if (module, name) in self._allowed:
            return super().find_class(module, name)
        if (module, name) == ("_codecs", "encode"):  # bytes at protocol 2
            return _latin1_bytes
        raise UnsafePickle(f"refused to unpickle global {module}.{name}: only plain values are accepted")


def loads(data: bytes | bytearray | memoryview, *, allow: Iterable[tuple[str, str]] = ()) -> Any:
    """Unpickle `data` if it holds only plain values (and instances of the `allow`ed classes)."""
    return _PlainUnpickler(bytes(data), frozenset(allow)).load()
