"""The retention policy alone: which versions a node keeps and fetches."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mesh.artifacts.store import version_order_key
from mesh.transfer.retention import kept_versions, newest_versions

names = st.sampled_from(["a", "b", "c"])
versions = st.sampled_from(["1.0", "1.2", "1.10", "2.0", "2.0.1", "10.0"])
keys = st.sets(st.tuples(names, versions), max_size=12)


def test_natural_version_order() -> None:
    known = {("m", "1.2"), ("m", "1.10"), ("m", "1.9"), ("n", "3")}
    assert newest_versions(known, 2) == {("m", "1.10"), ("m", "1.9"), ("n", "3")}


@given(keys, st.integers(0, 4), keys, keys)
def test_kept_is_newest_per_model_plus_pinned_and_downloading(known, per_model, pinned, downloading) -> None:
    kept = kept_versions(known, keep_per_model=per_model, pinned=pinned, downloading=downloading)
    assert pinned <= kept and downloading <= kept
    for name in {n for n, _ in known}:
        mine = sorted((v for n, v in known if n == name), key=version_order_key)
        assert {(name, v) for v in mine[-per_model:]} if per_model else set() <= kept
        # nothing older than the newest `per_model` is kept unless pinned or downloading
        for v in mine[:-per_model] if per_model else mine:
            assert ((name, v) in kept) == ((name, v) in pinned or (name, v) in downloading)
