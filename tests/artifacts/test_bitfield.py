"""The compact have-chunks bitfield peers exchange."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.artifacts.bitfield import MAX_BITS, Bitfield, BitfieldError


@st.composite
def fields(draw, n=None):
    n = draw(st.integers(0, 300)) if n is None else n
    present = draw(st.sets(st.integers(0, n - 1))) if n else set()
    return n, present


@given(fields())
def test_round_trip(case):
    n, present = case
    field = Bitfield(n, present)
    encoded = field.to_bytes()
    assert len(encoded) == (n + 7) // 8
    decoded = Bitfield.from_bytes(n, encoded)
    assert decoded == field
    assert set(decoded.present()) == present
    assert set(decoded.missing()) == set(range(n)) - present
    assert decoded.count() == len(present)
    assert decoded.complete == (len(present) == n)
    assert all((i in decoded) == (i in present) for i in range(n))


@given(st.integers(0, 200), st.binary(max_size=40))
def test_decoding_any_bytes_is_a_bitfield_or_a_bitfield_error(n, data):
    try:
        field = Bitfield.from_bytes(n, data)
    except BitfieldError:
        return
    assert field.to_bytes() == data and len(field) == n


@given(st.integers(1, 200).flatmap(lambda n: st.tuples(fields(n), fields(n))))
def test_set_operations(pair):
    (n, a), (_, b) = pair
    fa, fb = Bitfield(n, a), Bitfield(n, b)
    assert set((fa & fb).present()) == a & b
    assert set((fa | fb).present()) == a | b
    assert set((fa - fb).present()) == a - b


def test_bit_order_is_msb_first():
    assert Bitfield(10, [0]).to_bytes() == b"\x80\x00"
    assert Bitfield(10, [9]).to_bytes() == b"\x00\x40"
    assert Bitfield.full(10).to_bytes() == b"\xff\xc0"


def test_decoder_refuses_wrong_length_and_bits_past_the_end():
    with pytest.raises(BitfieldError, match="is 2 bytes, got 1"):
        Bitfield.from_bytes(10, b"\xff")
    with pytest.raises(BitfieldError, match="past the last chunk"):
        Bitfield.from_bytes(10, b"\xff\xe0")
    with pytest.raises(BitfieldError):
        Bitfield.from_bytes(MAX_BITS + 1, b"")


def test_set_clear_and_bounds():
    field = Bitfield(3)
    field.set(2)
    assert field.get(2) and not field.get(0)
    field.clear(2)
    assert field.count() == 0
    copy = field.copy()
    copy.set(0)
    assert field.count() == 0 and copy.count() == 1
    with pytest.raises(IndexError):
        field.set(3)
    with pytest.raises(IndexError):
        field.get(-1)
    assert 3 not in field and "x" not in field
    with pytest.raises(BitfieldError, match="different lengths"):
        _ = Bitfield(3) | Bitfield(4)
