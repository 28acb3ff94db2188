"""Membership metadata as named sections with budgets."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.membership.sections import MetaError, MetaSections, read_section


class Board:
    meta_limit_bytes = 2048

    def __init__(self) -> None:
        self.meta = b""
        self.writes = 0

    def set_meta(self, meta: bytes) -> None:
        assert len(meta) <= self.meta_limit_bytes
        self.meta = meta
        self.writes += 1


@given(st.binary(max_size=1200), st.binary(max_size=300))
def test_sections_round_trip_within_their_budgets(holdings, health) -> None:
    board = Board()
    sections = MetaSections(board, {"holdings": 1200, "health": 300})
    sections.board("holdings").set_meta(holdings)
    sections.board("health").set_meta(health)
    assert read_section(board.meta, "holdings") == holdings
    assert read_section(board.meta, "health") == health
    assert read_section(board.meta, "rollouts") == b""


def test_a_section_cannot_exceed_its_budget_or_crowd_another_out() -> None:
    board = Board()
    sections = MetaSections(board, {"holdings": 100, "health": 50})
    sections.board("health").set_meta(b"h" * 50)
    with pytest.raises(ValueError, match="'holdings' is 101 bytes, its budget is 100"):
        sections.board("holdings").set_meta(b"x" * 101)
    assert read_section(board.meta, "health") == b"h" * 50
    writes = board.writes
    sections.board("health").set_meta(b"h" * 50)  # unchanged: nothing gossiped again
    assert board.writes == writes
    with pytest.raises(KeyError, match="no metadata section 'rollout'"):
        sections.board("rollout")
    with pytest.raises(ValueError, match="budgets need"):
        MetaSections(board, {"a": 2000, "b": 100})


def test_malformed_metadata_is_named() -> None:
    with pytest.raises(MetaError, match="not a MemberMeta"):
        read_section(b"\xff\xff\xff", "holdings")
