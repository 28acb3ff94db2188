"""Which devices are in which wave, decided by every device alone and agreed on by all. Pure.

Each device's place in a rollout is `cohort_score(rollout_id, node_id)`, a
256-bit hash: devices are ranked by it and wave k takes the lowest-ranked
`wave_size(share_k, eligible)` devices. Because every wave is a prefix of one
ranking, waves are nested (a device in wave 1 stays in wave 2) and monotone,
and no coordination is needed beyond agreeing on the eligible set.

The arithmetic is exact: shares are integer parts per million and sizes are
computed with `Fraction` (flagger #190 shipped a float bug where the last step
fell short). A wave's size is the target share of the eligible count rounded
half up, at least one device (a wave nobody is in tests nothing) and at most
all of them: always within one device of the target.

A fleet split into sites, where a device knows only its own site, splits each
wave's size over the sites with `apportion` (Sainte-Lague/Webster, a divisor
method) from the per-site eligible counts, then ranks within the site. A
divisor method is house-monotone: one more seat never takes a seat from any
site, so a site's share of wave k+1 is never below its share of wave k and
nesting survives the split. Largest remainder (Hamilton) is not: the Alabama
paradox would drop a device from a later wave.

The replicated rollout state records, per wave, a *threshold*: the score of the
last device in the wave. A device is in wave k when its score is at most the
threshold; a device that joins later falls on one side or the other without
moving anyone else, so nobody is ever taken out of a wave it entered.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Iterable, Mapping, Sequence
from fractions import Fraction

from mesh.rollout.plan import PPM, RolloutError

SCORE_BITS = 256
MAX_SCORE = (1 << SCORE_BITS) - 1
_SCORE_CONTEXT = b"fleetmesh cohort v1\x00"
# Priorities p / (a + 1/2) are compared as integers (2p << _SCALE_BITS) // (2a + 1). Two different
# priorities with denominators below 2^40 differ by more than 2^-80, so with 120 bits of scale the integer
# keys order exactly as the fractions do (and equal fractions get equal keys).
_SCALE_BITS = 120
MAX_SITE_DEVICES = 1 << 38


class CohortError(RolloutError):
    """Cohort arithmetic was asked something impossible (more seats than devices, a negative count)."""


def cohort_score(rollout_id: str, node_id: str) -> int:
    """A device's rank key in one rollout: sha256 of the rollout id and node id, as an integer."""
    digest = hashlib.sha256(_SCORE_CONTEXT + rollout_id.encode() + b"\x00" + node_id.encode()).digest()
    return int.from_bytes(digest, "big")


def wave_size(share_ppm: int, eligible: int) -> int:
    """How many of `eligible` devices a wave of `share_ppm` takes: the exact share rounded half up,
    at least 1 and at most `eligible` (0 only when nobody is eligible)."""
    if type(share_ppm) is not int or not 0 < share_ppm <= PPM:
        raise CohortError(f"a wave share is 1..{PPM} parts per million, got {share_ppm!r}")
    if type(eligible) is not int or eligible < 0:
        raise CohortError(f"eligible device count must be a whole number >= 0, got {eligible!r}")
    if eligible == 0:
        return 0
    exact = Fraction(share_ppm * eligible, PPM)
    rounded = int(exact + Fraction(1, 2))  # floor(x + 1/2): half up, exact
    return min(eligible, max(1, rounded))


def wave_over_scope(share_ppm: int, scope_ppm: int, eligible: int) -> bool:
    """Does a wave of `share_ppm` put the target on more than `scope_ppm` of `eligible` devices? Judged by
    the plan's share and by the wave's real size. Both are rounded to the nearest device (half up), so a
    wave within the scope's share stays within it, but the one-device minimum gets no such pass: a 1% wave
    of 4 devices is one device, 25%, above a 10% scope (which is 0.4 devices, rounded to none)."""
    if share_ppm > scope_ppm:
        return True
    if eligible <= 0:
        return False
    allowed = int(Fraction(scope_ppm * eligible, PPM) + Fraction(1, 2))
    return wave_size(share_ppm, eligible) > allowed


def wave_sizes(shares_ppm: Sequence[int], eligible: int) -> tuple[int, ...]:
    """`wave_size` of every wave; nondecreasing whenever the shares are."""
    return tuple(wave_size(share, eligible) for share in shares_ppm)


def rank(rollout_id: str, node_ids: Iterable[str]) -> list[str]:
    """`node_ids` in rollout order: lowest score first (ties, which sha256 makes absurd, by node id)."""
    return sorted(set(node_ids), key=lambda node: (cohort_score(rollout_id, node), node))


def rank_cohorts(
    rollout_id: str, eligible: Iterable[str], shares_ppm: Sequence[int]
) -> tuple[frozenset[str], ...]:
    """The cohort of every wave over a known eligible set: prefixes of one ranking."""
    ranked = rank(rollout_id, eligible)
    return tuple(frozenset(ranked[:size]) for size in wave_sizes(shares_ppm, len(ranked)))


def apportion(seats: int, populations: Mapping[str, int]) -> dict[str, int]:
    """Split `seats` over sites in proportion to `populations` (eligible devices per site), by the
    Sainte-Lague/Webster divisor method, never giving a site more seats than it has devices.

    Seats are handed out one at a time to the site with the highest priority p / (a + 1/2) (p its
    devices, a its seats so far; ties to the site whose name sorts first), so the allocation for
    s + 1 seats is the allocation for s plus one seat: house-monotone by construction.
    """
    return apportion_waves((seats,), populations)[0]


def apportion_waves(seats: Sequence[int], populations: Mapping[str, int]) -> tuple[dict[str, int], ...]:
    """`apportion` for each entry of a nondecreasing `seats` sequence, in one pass."""
    for site, population in populations.items():
        if (
            not isinstance(site, str)
            or type(population) is not int
            or not 0 <= population <= MAX_SITE_DEVICES
        ):
            raise CohortError(
                f"site {site!r}: eligible count must be a whole number 0..{MAX_SITE_DEVICES}, "
                f"got {population!r}"
            )
    total = sum(populations.values())
    previous = 0
    for s in seats:
        if type(s) is not int or s < previous:
            raise CohortError(f"seats must be nondecreasing whole numbers >= 0, got {list(seats)!r}")
        previous = s
    if seats and seats[-1] > total:
        raise CohortError(f"cannot place {seats[-1]} devices in sites with {total} eligible devices")
    allocation = dict.fromkeys(populations, 0)
    heap = [(-_priority(p, 0), site) for site, p in populations.items() if p > 0]
    heapq.heapify(heap)
    out = []
    given = 0
    for target in seats:
        if target == total:  # every eligible device (a 100% wave): no need to hand out seats one by one
            allocation, given = dict(populations), total
            out.append(dict(allocation))
            continue
        while given < target:
            _, site = heapq.heappop(heap)
            allocation[site] += 1
            given += 1
            if allocation[site] < populations[site]:
                heapq.heappush(heap, (-_priority(populations[site], allocation[site]), site))
        out.append(dict(allocation))
    return tuple(out)


def _priority(population: int, seats: int) -> int:
    return (2 * population << _SCALE_BITS) // (2 * seats + 1)


def site_wave_sizes(shares_ppm: Sequence[int], populations: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
    """Per site, how many of its devices each wave takes, so that the fleet-wide total of wave k is
    exactly `wave_size(share_k, all eligible)` and every site's sizes are nondecreasing."""
    totals = wave_sizes(shares_ppm, sum(populations.values()))
    per_wave = apportion_waves(totals, populations)
    return {site: tuple(a[site] for a in per_wave) for site in populations}


def cohort_thresholds(
    rollout_id: str, eligible: Iterable[str], sizes: Sequence[int], shares_ppm: Sequence[int]
) -> tuple[int | None, ...]:
    """Per wave, the highest score in it: the `sizes[k]`-th lowest score of `eligible` (None: nobody).

    A wave of 100% gets MAX_SCORE, so devices that become eligible later join it as well.
    """
    if len(sizes) != len(shares_ppm):
        raise CohortError("one size per wave share is needed")
    scores = sorted(cohort_score(rollout_id, node) for node in set(eligible))
    out: list[int | None] = []
    for size, share in zip(sizes, shares_ppm, strict=True):
        if type(size) is not int or not 0 <= size <= len(scores):
            raise CohortError(f"a wave of {size!r} devices does not fit {len(scores)} eligible devices")
        if share == PPM:
            out.append(MAX_SCORE)
        else:
            out.append(scores[size - 1] if size else None)
    for before, after in zip(out, out[1:], strict=False):
        if before is not None and (after is None or after < before):
            raise CohortError(f"wave sizes {list(sizes)!r} shrink; waves must be nested")
    return tuple(out)


def in_wave(score: int, threshold: int | None) -> bool:
    return threshold is not None and score <= threshold


def first_wave(score: int, thresholds: Sequence[int | None]) -> int | None:
    """The first wave (counted from 1) whose cohort holds a device of this score, or None."""
    for number, threshold in enumerate(thresholds, start=1):
        if in_wave(score, threshold):
            return number
    return None
