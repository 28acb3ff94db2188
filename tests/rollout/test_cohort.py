"""Cohort arithmetic: exact wave sizes, nested waves, house-monotone apportionment over sites.

Every size is checked against the exact target with `Fraction`, never a float (flagger #190).
"""

from __future__ import annotations

import random
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.rollout.cohort import (
    MAX_SCORE,
    CohortError,
    apportion,
    apportion_waves,
    cohort_score,
    cohort_thresholds,
    first_wave,
    in_wave,
    rank,
    rank_cohorts,
    site_wave_sizes,
    wave_over_scope,
    wave_size,
    wave_sizes,
)
from mesh.rollout.plan import PPM, parse_share

DEFAULT = (10_000, 100_000, PPM)
# Shares whose products with N round in every direction; 1/3 and 2/3 are not whole in ppm either.
AWKWARD = (
    DEFAULT,
    (333_333, 666_667, PPM),
    (1, 2, 3, PPM),
    (5_000, 15_000, 45_000, 135_000, 405_000, PPM),  # an exponential schedule, as AWS IoT Jobs
    (999_999, PPM),
    (parse_share("0.5"), parse_share("12.5"), parse_share("50"), PPM),
)

share_lists = st.lists(st.integers(1, PPM), min_size=1, max_size=10, unique=True).map(
    lambda s: tuple(sorted(s))
)


def within_one(size: int, share_ppm: int, n: int) -> bool:
    return abs(Fraction(size) - Fraction(share_ppm * n, PPM)) <= 1


def nearest(size: int, share_ppm: int, n: int) -> bool:
    """The exact share rounded to the nearest device, unless that is nobody (then one device)."""
    exact = Fraction(share_ppm * n, PPM)
    return abs(size - exact) <= Fraction(1, 2) or (size == 1 and exact < Fraction(1, 2))


@pytest.mark.parametrize("shares", AWKWARD)
def test_sizes_are_exact_within_one_device_for_every_fleet_size_up_to_10000(shares):
    previous = None
    for n in range(1, 10_001):
        sizes = wave_sizes(shares, n)
        for size, share in zip(sizes, shares, strict=True):
            assert 1 <= size <= n, (shares, n, sizes)
            assert within_one(size, share, n) and nearest(size, share, n), (shares, n, sizes)
        assert list(sizes) == sorted(sizes), (shares, n, sizes)
        if shares[-1] == PPM:
            assert sizes[-1] == n  # a 100% wave is everyone, exactly (flagger #190)
        if previous is not None:  # one more device never shrinks a wave
            assert all(a <= b for a, b in zip(previous, sizes, strict=True))
        previous = sizes


@settings(max_examples=500)
@given(share_lists, st.integers(1, 10_000))
def test_any_share_list_is_exact_nested_and_nonempty(shares, n):
    sizes = wave_sizes(shares, n)
    assert all(
        1 <= s <= n and within_one(s, share, n) and nearest(s, share, n)
        for s, share in zip(sizes, shares, strict=True)
    )
    assert list(sizes) == sorted(sizes)


def test_nobody_eligible_means_empty_waves_and_bad_input_is_refused():
    assert wave_sizes(DEFAULT, 0) == (0, 0, 0)
    for share in (0, PPM + 1, 0.5):
        with pytest.raises(CohortError):
            wave_size(share, 10)  # type: ignore[arg-type]
    with pytest.raises(CohortError):
        wave_size(10_000, -1)


@settings(max_examples=200)
@given(
    share_lists,
    st.sets(st.from_regex(r"node-[0-9]{1,5}", fullmatch=True), min_size=1, max_size=300),
    st.from_regex(r"[a-z0-9-]{1,12}", fullmatch=True),
)
def test_rank_cohorts_are_nested_exact_and_deterministic(shares, nodes, rollout_id):
    cohorts = rank_cohorts(rollout_id, nodes, shares)
    for cohort, size in zip(cohorts, wave_sizes(shares, len(nodes)), strict=True):
        assert len(cohort) == size and cohort <= nodes
    for before, after in zip(cohorts, cohorts[1:], strict=False):
        assert before <= after  # a device in wave k stays in wave k+1
    shuffled = list(nodes)
    random.Random(len(nodes)).shuffle(shuffled)
    assert rank_cohorts(rollout_id, shuffled, shares) == cohorts
    # Each device decides alone: its own score against the wave's threshold says the same.
    thresholds = cohort_thresholds(rollout_id, nodes, wave_sizes(shares, len(nodes)), shares)
    for k, cohort in enumerate(cohorts):
        mine = {n for n in nodes if in_wave(cohort_score(rollout_id, n), thresholds[k])}
        assert mine == cohort or (shares[k] == PPM and mine == set(nodes))


def test_different_rollouts_pick_different_canaries():
    nodes = [f"node-{i}" for i in range(1000)]
    first = rank_cohorts("face-1.4", nodes, DEFAULT)[0]
    second = rank_cohorts("face-1.5", nodes, DEFAULT)[0]
    assert len(first) == len(second) == 10 and first != second


def test_a_device_that_joins_later_never_moves_anyone_out_of_a_wave():
    nodes = [f"node-{i}" for i in range(200)]
    thresholds = cohort_thresholds("r", nodes, wave_sizes(DEFAULT, len(nodes)), DEFAULT)
    before = {n: first_wave(cohort_score("r", n), thresholds) for n in nodes}
    joined = [f"late-{i}" for i in range(50)]
    after = {n: first_wave(cohort_score("r", n), thresholds) for n in nodes + joined}
    assert all(after[n] == before[n] for n in nodes)
    assert all(after[n] is not None for n in joined)  # the 100% wave takes everyone, latecomers too
    assert thresholds[-1] == MAX_SCORE


def test_thresholds_refuse_sizes_that_shrink_or_overflow():
    nodes = [f"n{i}" for i in range(10)]
    with pytest.raises(CohortError, match="nested"):
        cohort_thresholds("r", nodes, (5, 3, 10), (100_000, 200_000, 300_000))
    with pytest.raises(CohortError, match="does not fit"):
        cohort_thresholds("r", nodes, (11,), (500_000,))


# --- apportionment over sites ------------------------------------------------------------------------


def webster_reference(seats: int, populations: dict[str, int]) -> dict[str, int]:
    """Sainte-Lague by its definition, with exact fractions: seat by seat to the highest p / (a + 1/2)."""
    out = dict.fromkeys(populations, 0)
    for _ in range(seats):
        site = min(
            (s for s, p in populations.items() if out[s] < p),
            key=lambda s: (-Fraction(populations[s], 1) / (out[s] + Fraction(1, 2)), s),
        )
        out[site] += 1
    return out


def hamilton(seats: int, populations: dict[str, int]) -> dict[str, int]:
    """Largest remainder: what we must not use (the Alabama paradox)."""
    total = sum(populations.values())
    quotas = {s: Fraction(seats * p, total) for s, p in populations.items()}
    out = {s: int(q) for s, q in quotas.items()}
    for s in sorted(quotas, key=lambda s: (-(quotas[s] - out[s]), s))[: seats - sum(out.values())]:
        out[s] += 1
    return out


populations_st = st.dictionaries(
    st.from_regex(r"site-[a-z]{1,3}", fullmatch=True), st.integers(0, 400), min_size=1, max_size=8
).filter(lambda p: sum(p.values()) > 0)


@settings(max_examples=300)
@given(populations_st, st.data())
def test_apportionment_matches_the_definition_and_is_house_monotone(populations, data):
    total = sum(populations.values())
    seats = data.draw(st.integers(0, total))
    got = apportion(seats, populations)
    assert got == webster_reference(seats, populations)
    assert sum(got.values()) == seats
    assert all(0 <= got[s] <= populations[s] for s in populations)
    if seats < total:
        more = apportion(seats + 1, populations)
        assert all(more[s] >= got[s] for s in populations)  # no Alabama paradox


def test_largest_remainder_would_break_nesting_and_the_divisor_method_does_not():
    # The textbook Alabama paradox: with one more seat, Hamilton takes a seat from site c.
    populations = {"a": 6, "b": 6, "c": 2}
    assert hamilton(10, populations)["c"] > hamilton(11, populations)["c"]
    for seats in range(sum(populations.values())):
        now, more = apportion(seats, populations), apportion(seats + 1, populations)
        assert all(more[s] >= now[s] for s in populations)


@settings(max_examples=300)
@given(share_lists, populations_st)
def test_site_wave_sizes_sum_to_the_exact_fleet_size_and_nest_in_every_site(shares, populations):
    per_site = site_wave_sizes(shares, populations)
    fleet = wave_sizes(shares, sum(populations.values()))
    for k, total in enumerate(fleet):
        assert sum(sizes[k] for sizes in per_site.values()) == total
    for site, sizes in per_site.items():
        assert list(sizes) == sorted(sizes) and sizes[-1] <= populations[site]
        if shares[-1] == PPM:
            assert sizes[-1] == populations[site]


@settings(max_examples=100)
@given(share_lists, st.integers(1, 8), st.integers(1, 600), st.randoms(use_true_random=False))
def test_sites_ranking_alone_make_one_fleet_cohort_with_no_device_twice(shares, site_count, n, rnd):
    nodes = [f"node-{i}" for i in range(n)]
    site_of = {node: f"site-{rnd.randrange(site_count)}" for node in nodes}
    members: dict[str, list[str]] = {}
    for node, site in site_of.items():
        members.setdefault(site, []).append(node)
    per_site = site_wave_sizes(shares, {s: len(m) for s, m in members.items()})
    fleet_sizes = wave_sizes(shares, n)
    previous: set[str] = set()
    for k in range(len(shares)):
        cohort_by_site = {s: set(rank("r", m)[: per_site[s][k]]) for s, m in members.items()}
        everyone = [node for c in cohort_by_site.values() for node in c]
        assert len(everyone) == len(set(everyone)) == fleet_sizes[k]  # no device in two cohorts of one wave
        assert within_one(len(everyone), shares[k], n)
        assert previous <= set(everyone)
        previous = set(everyone)


def test_apportionment_of_a_large_fleet_in_one_pass():
    rnd = random.Random(7)
    populations = {f"site-{i}": rnd.randrange(1, 4_000) for i in range(50)}
    total = sum(populations.values())
    per_wave = apportion_waves(wave_sizes(DEFAULT, total), populations)
    assert sum(per_wave[-1].values()) == total


def test_apportionment_refuses_impossible_requests():
    with pytest.raises(CohortError, match="cannot place"):
        apportion(11, {"a": 5, "b": 5})
    with pytest.raises(CohortError, match="nondecreasing"):
        apportion_waves((3, 2), {"a": 5})
    with pytest.raises(CohortError, match="eligible count"):
        apportion(1, {"a": -1})


def test_apportionment_reference_agrees_with_heap_on_ties():
    # Equal populations tie at every step: the site whose name sorts first takes the seat first.
    populations = {"b": 3, "a": 3, "c": 3}
    assert [apportion(s, populations) for s in range(4)] == [
        {"b": 0, "a": 0, "c": 0},
        {"b": 0, "a": 1, "c": 0},
        {"b": 1, "a": 1, "c": 0},
        {"b": 1, "a": 1, "c": 1},
    ]


def test_a_wave_is_over_scope_by_its_share_or_by_its_real_size():
    ten = 100_000
    assert wave_over_scope(200_000, ten, 1000)  # the plan's share alone
    assert not wave_over_scope(10_000, ten, 1000)  # 1% of 1000: 10 devices, 1%
    assert wave_over_scope(10_000, ten, 4)  # 1% of 4 rounds up to 1 device: 25%; 10% of 4 is none
    assert not wave_over_scope(10_000, ten, 5)  # 10% of 5 is half a device: one, like every wave's size
    assert not wave_over_scope(ten, ten, 19)  # 10% of 19: 2 devices, the scope's nearest count too
    assert not wave_over_scope(ten, ten, 1005)  # 100.5 rounds to 101 on both sides
    assert not wave_over_scope(ten, ten, 0)  # nobody eligible: nothing reaches past anything
    for eligible in range(1, 300):  # never held by rounding alone once the scope is a device or more
        for share in (10_000, 50_000, ten):
            over = wave_over_scope(share, ten, eligible)
            assert over == (wave_size(share, eligible) == 1 and eligible * ten * 2 < 10**6), (share, eligible)
