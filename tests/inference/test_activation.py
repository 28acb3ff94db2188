"""The activation choice alone: which version of its model a node serves."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mesh.artifacts.store import version_order_key
from mesh.inference.activation import Activate, choose_active

versions = st.sets(st.sampled_from(["1", "1.1", "1.10", "1.2", "2.0", "2.0.1", "10"]), max_size=7)


def test_newest_complete_version_that_never_failed() -> None:
    assert choose_active("m", ["1", "1.10", "1.9"], refused=set(), active="1") == Activate("m", "1.10")
    assert choose_active("m", ["1", "1.10", "1.9"], refused={"1.10"}, active="1") == Activate("m", "1.9")
    assert choose_active("m", ["1", "1.10"], refused=set(), active="1.10") is None
    assert choose_active("m", [], refused=set(), active=None) is None


def test_a_desired_version_is_the_only_choice_once_complete() -> None:
    # A rollout rolling back to the baseline: older than what is active, and chosen all the same.
    assert choose_active("m", ["1", "2"], refused=set(), active="2", desired="1") == Activate("m", "1")
    # Not complete yet: keep serving what is active, never something else meanwhile.
    assert choose_active("m", ["1", "2"], refused=set(), active="1", desired="3") is None
    # Failed here before: never again, even if desired.
    assert choose_active("m", ["1", "2"], refused={"2"}, active="1", desired="2") is None


@given(versions, versions, st.one_of(st.none(), st.sampled_from(["1", "2.0", "10"])))
def test_choice_is_usable_and_never_the_active_one(complete, refused, active) -> None:
    choice = choose_active("m", complete, refused=refused, active=active)
    usable = sorted(complete - refused, key=version_order_key)
    if choice is None:
        assert not usable or usable[-1] == active
    else:
        assert choice.version == usable[-1] and choice.version != active and choice.model == "m"


def test_a_restarted_node_that_keeps_its_version_resumes_it_not_the_newest() -> None:
    # In a site that moves versions only by rollouts, a restart must not jump to the newest on disk.
    assert choose_active("m", ["1", "2"], refused=set(), active=None, keep=True,
                         resume="1") == Activate("m", "1")
    # Nothing to resume (a new device), or it is gone: the newest allowed one.
    assert choose_active("m", ["1", "2"], refused=set(), active=None, keep=True,
                         resume=None) == Activate("m", "2")
    assert choose_active("m", ["2"], refused=set(), active=None, keep=True, resume="1") == Activate("m", "2")
    # Without keep (no site group), the newest wins as before.
    assert choose_active("m", ["1", "2"], refused=set(), active=None, resume="1") == Activate("m", "2")
