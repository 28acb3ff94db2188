"""Which model versions a node keeps on disk and fetches: a pure policy.

A node keeps the newest `keep_per_model` versions of each model it knows of (the active
one and the previous one, for rollback), plus whatever it must not lose whatever its age:
versions being downloaded, and versions pinned by the node (the active and previous model,
a rollout's baseline and target). Everything else is neither fetched nor kept.
"""

from __future__ import annotations

from collections.abc import Iterable

from mesh.artifacts.store import version_order_key

VersionKey = tuple[str, str]


def newest_versions(known: Iterable[VersionKey], per_model: int) -> set[VersionKey]:
    """Of `known` (name, version) pairs, the newest `per_model` versions of each model."""
    by_name: dict[str, list[str]] = {}
    for name, version in known:
        by_name.setdefault(name, []).append(version)
    if per_model <= 0:
        return set()
    return {(name, v) for name, versions in by_name.items()
            for v in sorted(versions, key=version_order_key)[-per_model:]}


def kept_versions(known: Iterable[VersionKey], *, keep_per_model: int, pinned: Iterable[VersionKey] = (),
                  downloading: Iterable[VersionKey] = ()) -> set[VersionKey]:
    """The versions to keep (and to fetch, among those not held yet): the newest of each model,
    plus running downloads and pinned versions."""
    return newest_versions(known, keep_per_model) | set(downloading) | set(pinned)
