"""Which chunks of a manifest a node holds, as one bit per chunk.

Peers tell each other what they hold with this encoding (a 5.5 MB model in
~20 chunks is 3 bytes), never with lists of hashes. Bit i is chunk i of the
manifest; bits are packed most significant first, as BitTorrent does, so
chunk 0 is the high bit of byte 0. Unused bits of the last byte are zero, and
a decoder refuses anything else: a peer cannot claim chunks past the end.

Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from mesh.artifacts.manifest import ArtifactError

# Far more chunks than any manifest within MAX_MANIFEST_BYTES can list; bounds what a decoder allocates.
MAX_BITS = 1 << 20


class BitfieldError(ArtifactError):
    """A bitfield encoding does not fit the manifest it claims to describe."""


def _byte_len(n: int) -> int:
    return (n + 7) // 8


class Bitfield:
    """A fixed-length set of chunk indices 0..n-1, mutable, compared by value."""

    __slots__ = ("_bits", "_n")
    __hash__ = None  # type: ignore[assignment]  # mutable

    def __init__(self, n: int, present: Iterable[int] = ()) -> None:
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= MAX_BITS:
            raise BitfieldError(f"a bitfield holds 0..{MAX_BITS} chunks, got {n!r}")
        self._n = n
        self._bits = bytearray(_byte_len(n))
        for i in present:
            self.set(i)

    @classmethod
    def full(cls, n: int) -> Bitfield:
        return cls(n, range(n))

    @classmethod
    def from_bytes(cls, n: int, data: bytes) -> Bitfield:
        """Decode a peer's bitfield for a manifest of `n` chunks; BitfieldError if it does not fit."""
        field = cls(n)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise BitfieldError(f"a bitfield is bytes, got {type(data).__name__}")
        data = bytes(data)
        if len(data) != len(field._bits):
            raise BitfieldError(
                f"a bitfield for {n} chunks is {len(field._bits)} bytes, got {len(data)}"
            )
        spare = len(data) * 8 - n
        if spare and data[-1] & ((1 << spare) - 1):
            raise BitfieldError(f"bitfield for {n} chunks has bits set past the last chunk")
        field._bits[:] = data
        return field

    def to_bytes(self) -> bytes:
        return bytes(self._bits)

    def __len__(self) -> int:
        """Number of chunks described (not the number present; see `count`)."""
        return self._n

    def _check(self, index: int) -> None:
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < self._n:
            raise IndexError(f"chunk index {index!r} is outside 0..{self._n - 1}")

    def get(self, index: int) -> bool:
        self._check(index)
        return bool(self._bits[index >> 3] & (0x80 >> (index & 7)))

    def __contains__(self, index: object) -> bool:
        return isinstance(index, int) and not isinstance(index, bool) and 0 <= index < self._n \
            and self.get(index)

    def set(self, index: int) -> None:
        self._check(index)
        self._bits[index >> 3] |= 0x80 >> (index & 7)

    def clear(self, index: int) -> None:
        self._check(index)
        self._bits[index >> 3] &= ~(0x80 >> (index & 7)) & 0xFF

    def count(self) -> int:
        """Number of chunks present."""
        return sum(b.bit_count() for b in self._bits)

    @property
    def complete(self) -> bool:
        return self.count() == self._n

    def present(self) -> Iterator[int]:
        return (i for i in range(self._n) if self.get(i))

    def missing(self) -> Iterator[int]:
        return (i for i in range(self._n) if not self.get(i))

    def copy(self) -> Bitfield:
        return Bitfield.from_bytes(self._n, bytes(self._bits))

    def _combine(self, other: Bitfield, op: Callable[[int, int], int]) -> Bitfield:
        if not isinstance(other, Bitfield) or other._n != self._n:
            raise BitfieldError("bitfields describe manifests of different lengths")
        return Bitfield.from_bytes(self._n, bytes(op(a, b) & 0xFF for a, b in zip(self._bits, other._bits,
                                                                                  strict=True)))

    def __and__(self, other: Bitfield) -> Bitfield:
        return self._combine(other, lambda a, b: a & b)

    def __or__(self, other: Bitfield) -> Bitfield:
        return self._combine(other, lambda a, b: a | b)

    def __sub__(self, other: Bitfield) -> Bitfield:
        """Chunks in self and not in other: `peer - mine` is what a peer can give me."""
        return self._combine(other, lambda a, b: a & ~b)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Bitfield) and other._n == self._n and other._bits == self._bits

    def __repr__(self) -> str:
        return f"Bitfield({self._n}, {self.count()} present)"
