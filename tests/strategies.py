"""Hypothesis strategies several test modules share."""

from __future__ import annotations

from hypothesis import strategies as st


def json_values(*, max_size: int = 4, text_size: int = 20, key_size: int = 12, max_leaves: int = 20):
    """Arbitrary JSON documents (no NaN), nested lists and objects: input for parsers that must
    refuse what they do not understand rather than crash."""
    return st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=text_size),
        lambda children: (
            st.lists(children, max_size=max_size)
            | st.dictionaries(st.text(max_size=key_size), children, max_size=max_size)
        ),
        max_leaves=max_leaves,
    )
