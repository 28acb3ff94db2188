"""A canary rollout of a bad version (1% -> 10% -> 100%) through a two-level fleet.

Two engines:

- `cores`: the node's rollout cores. Each site's leader holds a `SiteRollout`
  moved only by `state.apply`; wave sizes come from `site_wave_sizes`
  (Sainte-Lague over the sites), cohorts from `cohort_thresholds` and each
  device's `cohort_score`; every `interval_s` each live site's leader runs
  `evaluate_gate` on its cohort devices' `VersionCounters` and the evidence of
  other sites, and proposes what `state.proposals` says. A site that aborts
  publishes it; other sites apply `PeerAborted` when they hear. Tractable at
  10^6 devices: a site's gate reads only its own cohort (about one device per
  site in wave 1) and the other sites' evidence summed (the gate only sums it).
- `model`: closed-form expectations of the same protocol (`expected`), to check
  the cores against; `validate_rollout` compares them at 10^3 and 10^4.

What the adapter assumes. Devices serve `request_rate_per_s` requests a second
(Poisson); on the target a share `bad_error_share` fail. The target is
prefetched (`prefetch = low`), so a device in a started wave serves it from its
next step (uniform within `interval_s`) and goes back to the baseline at its
next step after its site aborts. A site's evidence reaches other sites'
leaders, and an abort reaches other sites, `dissemination_s` after it is
published: the time a fact takes to reach every device through a site pool and
the federation pool (from `mesh sim membership` for the same fleet). The plan's
autonomous scope is 100% so that no operator approval is in the timings (the
bad version never gets past wave 1 anyway).
"""

from __future__ import annotations

import bisect
import hashlib
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from mesh.identity.signing import TrustedKeys
from mesh.inference.counts import LATENCY_BUCKETS_S
from mesh.rollout.cohort import cohort_score, site_wave_sizes
from mesh.rollout.health import (
    ERROR_KINDS,
    DeviceReport,
    GateVerdict,
    SiteEvidence,
    Totals,
    VersionCounters,
    evaluate_gate,
)
from mesh.rollout.plan import PPM, AutonomousScope, RolloutPlan, SkewRule, Wave
from mesh.rollout.state import (
    PeerAborted,
    RolloutState,
    SiteRollout,
    Start,
    apply,
    new_rollout,
    proposals,
)
from mesh.sim.membership import peak_rss_mb, site_sizes
from mesh.sim.validation import ModelVsCores

__all__ = [
    "RolloutResult",
    "RolloutScenario",
    "RolloutValidationRow",
    "expected",
    "run_cores",
    "sim_plan",
    "validate_rollout",
]

_MODEL, _BASELINE, _TARGET = "hand-landmark", "1.4", "1.5"
_TRUSTED = TrustedKeys()
_ERROR_KINDS = len(ERROR_KINDS) - 1  # the other kinds, activation failures last


@dataclass(frozen=True)
class RolloutScenario:
    devices: int
    sites: int
    seed: int = 1
    bad_error_share: float = 0.2
    request_rate_per_s: float = 1.0
    soak_s: float = 60.0
    min_requests: int = 100
    max_error_rate: float = 0.05
    interval_s: float = 1.0
    dissemination_s: float = 2.0
    shares_ppm: tuple[int, ...] = (10_000, 100_000, PPM)
    time_limit_s: float = 3600.0

    def __post_init__(self) -> None:
        if not 1 <= self.sites <= self.devices // 2:
            raise ValueError(f"sites must be between 1 and devices/2 ({self.devices // 2}), not {self.sites}")
        if not 0 <= self.bad_error_share <= 1:
            raise ValueError(f"bad_error_share must be in [0, 1], not {self.bad_error_share}")

    @property
    def first_wave_share(self) -> float:
        return self.shares_ppm[0] / PPM


def sim_plan(sc: RolloutScenario) -> RolloutPlan:
    """The plan the simulated publisher signs (the signature itself is not simulated)."""
    waves = tuple(
        Wave(s, soak_s=sc.soak_s, min_requests=sc.min_requests, max_error_rate=sc.max_error_rate)
        for s in sc.shares_ppm
    )
    return RolloutPlan(
        rollout_id="hand-landmark-1.5-sim",
        model=_MODEL,
        target_version=_TARGET,
        target_digest=hashlib.sha256(b"target").hexdigest(),
        baseline_version=_BASELINE,
        baseline_digest=hashlib.sha256(b"baseline").hexdigest(),
        skew=SkewRule("2.3.0", hashlib.sha256(b"signature").hexdigest()),
        created_at=0.0,
        expires_at=7 * 24 * 3600.0,
        publisher_key_id="0" * 16,
        waves=waves,
        autonomous_scope=AutonomousScope(PPM),
    )


@dataclass
class RolloutResult:
    scenario: RolloutScenario
    engine: str
    exposed_devices: int
    target_requests: int
    total_requests: int
    first_failing_s: float | None  # first gate FAIL anywhere (seconds from the start of wave 1)
    all_aborted_s: float | None  # every site's state is ABORTED
    all_baseline_s: float | None  # every device serves the baseline again
    final_states: dict[str, int]
    wave_share: list[tuple[float, float]]  # (seconds, share of devices serving the target)
    max_wave: int
    wall_s: float = 0.0
    peak_rss_mb: float = 0.0

    @property
    def bad_exposure_share(self) -> float:
        return self.exposed_devices / self.scenario.devices

    @property
    def bad_request_share(self) -> float:
        return self.target_requests / self.total_requests if self.total_requests else 0.0

    def to_json(self) -> dict[str, Any]:
        sc = self.scenario

        def r(x: float | None, n: int = 2) -> float | None:
            return None if x is None else round(x, n)

        return {
            "devices": sc.devices,
            "sites": sc.sites,
            "rollout_engine": self.engine,
            "bad_error_share": sc.bad_error_share,
            "first_wave_share": sc.first_wave_share,
            "bad_exposure_share": round(self.bad_exposure_share, 6),
            "exposed_devices": self.exposed_devices,
            "bad_requests": self.target_requests,
            "bad_request_share": round(self.bad_request_share, 6),
            "furthest_wave": self.max_wave,
            "seconds_to_first_fail": r(self.first_failing_s),
            "seconds_to_all_aborted": r(self.all_aborted_s),
            "seconds_to_rollback": r(self.all_baseline_s),
            "rollback_after_fail_s": r(
                None
                if self.all_baseline_s is None or self.first_failing_s is None
                else self.all_baseline_s - self.first_failing_s
            ),
            "dissemination_s": round(sc.dissemination_s, 3),
            "final_states": self.final_states,
            "rollout_wall_s": round(self.wall_s, 2),
        }


def _counters(requests: int, errors: int, active_ms: int) -> VersionCounters:
    buckets = (requests,) + (0,) * len(LATENCY_BUCKETS_S)
    return VersionCounters(
        _MODEL, _TARGET, 1, requests, (errors,) + (0,) * _ERROR_KINDS, active_ms, buckets, 0
    )


def _cohort_size(scores: list[int], state: SiteRollout, wave: int) -> int:
    """How many of a site's devices (`scores` sorted) are in `wave`'s cohort (none in wave 0)."""
    return bisect.bisect_right(scores, state.threshold(wave) or -1)


def run_cores(sc: RolloutScenario) -> RolloutResult:
    """The rollout cores on every site (see the module docstring)."""
    started = time.perf_counter()
    plan = sim_plan(sc)
    rng = np.random.default_rng([sc.seed, 29])
    sizes = site_sizes(sc.devices, sc.sites)
    names = [f"site-{j:05d}" for j in range(sc.sites)]
    per_site = site_wave_sizes(list(sc.shares_ppm), dict(zip(names, sizes, strict=True)))
    states: list[SiteRollout] = []
    cohort_ids: list[list[str]] = []  # per site: devices in the last wave, sorted by score
    cohort_scores: list[list[int]] = []
    for j, name in enumerate(names):
        ids = [f"s{j:05d}-d{i:05d}" for i in range(sizes[j])]
        scores = sorted((cohort_score(plan.rollout_id, d), d) for d in ids)
        start = Start(0.0, tuple(ids), per_site[name], fleet_eligible=sum(sizes))
        transition = apply(plan, new_rollout(plan), start, trusted=_TRUSTED)
        states.append(transition.after)
        cohort_ids.append([d for _, d in scores])
        cohort_scores.append([s for s, _ in scores])
    # Device state, for cohort devices only (the others serve the baseline throughout): indexed per site by
    # rank. on_at: when it started serving the target (inf: not yet); off_at: when it went back.
    on_at = [np.full(len(ids), np.inf) for ids in cohort_ids]
    off_at = [np.full(len(ids), np.inf) for ids in cohort_ids]
    requests = [np.zeros(len(ids), dtype=np.int64) for ids in cohort_ids]
    errors = [np.zeros(len(ids), dtype=np.int64) for ids in cohort_ids]
    step = [rng.random(len(ids)) * sc.interval_s for ids in cohort_ids]  # each device's step phase
    evidence: dict[int, list[tuple[float, SiteEvidence]]] = {}  # per site: (published at, evidence)
    aborted_at: dict[int, float] = {}
    first_fail: float | None = None
    max_wave = 1
    wave_share: list[tuple[float, float]] = [(0.0, 0.0)]
    target_requests = 0
    now = 0.0
    reached = [0] * sc.sites  # per site: devices of the furthest wave started (a prefix by score)
    while now < sc.time_limit_s:
        now += sc.interval_s
        # Devices: in their site's current wave and not rolled back, they serve the target from their
        # next step; after the site aborts they go back at their next step.
        serving_target = 0
        for j, state in enumerate(states):
            if state.state in (RolloutState.SOAKING, RolloutState.COMPLETED):
                count = bisect.bisect_right(cohort_scores[j], state.threshold(state.wave) or -1)
                if count > reached[j]:
                    began = state.soak_started_at or 0.0
                    phase = step[j][reached[j] : count]
                    on_at[j][reached[j] : count] = began + np.mod(phase - began, sc.interval_s)
                    reached[j] = count
            n = reached[j]
            if not n:
                continue
            on, off = on_at[j][:n], off_at[j][:n]
            if j in aborted_at and not np.isfinite(off).all():
                t = aborted_at[j]
                off[:] = np.maximum(on, t + np.mod(step[j][:n] - t, sc.interval_s))
            # Requests served on the target in (now - interval, now].
            span = np.clip(np.minimum(off, now) - np.maximum(on, now - sc.interval_s), 0.0, None)
            served = rng.poisson(sc.request_rate_per_s * span)
            requests[j][:n] += served
            errors[j][:n] += rng.binomial(served, sc.bad_error_share)
            target_requests += int(served.sum())
            serving_target += int(((on <= now) & (off > now)).sum())
        wave_share.append((now, serving_target / sc.devices))
        # What each site's leader has heard: per other site, its newest evidence published at least
        # dissemination_s ago.
        heard: dict[int, SiteEvidence] = {}
        for k, items in evidence.items():
            delivered = [i for i, (at, _) in enumerate(items) if at + sc.dissemination_s <= now]
            if delivered:
                heard[k] = items[delivered[-1]][1]
                del items[: delivered[-1]]
        known_aborts = sorted(k for k, at in aborted_at.items() if at + sc.dissemination_s <= now)
        for j, state in enumerate(states):
            if state.state.final:
                continue
            if any(k != j for k in known_aborts):
                k = next(k for k in known_aborts if k != j)
                states[j] = apply(
                    plan, state, PeerAborted(now, names[k], "gate failed"), trusted=_TRUSTED
                ).after
                aborted_at[j] = now
                continue
            remote = _summed(plan, [e for k, e in heard.items() if k != j])
            ids = cohort_ids[j]
            members = _cohort_size(cohort_scores[j], state, state.wave)
            reports = [
                DeviceReport(
                    ids[i],
                    True,
                    _counters(
                        int(requests[j][i]), int(errors[j][i]), int(max(0.0, now - on_at[j][i]) * 1000)
                    ),
                )
                for i in range(members)
                if on_at[j][i] <= now
            ]
            verdict: GateVerdict = evaluate_gate(
                plan,
                state.wave,
                cohort=ids[:members],
                reports=reports,
                marks=state.marks_map(),
                soak_started_at=state.soak_started_at or 0.0,
                now=now,
                remote=remote,
                site=names[j],
                earlier=ids[: _cohort_size(cohort_scores[j], state, state.wave - 1)],
            )
            if verdict.own_measured.requests:
                evidence.setdefault(j, []).append((now, verdict.evidence(names[j])))
            for step_input in proposals(plan, state, verdict, now):
                after = apply(plan, state, step_input, trusted=_TRUSTED).after
                if after.state is RolloutState.ABORTED:
                    aborted_at[j] = now
                    first_fail = now if first_fail is None else first_fail
                state = states[j] = after
                max_wave = max(max_wave, state.wave)
        if all(s.state.final for s in states) and serving_target == 0:
            break
    exposed = sum(int(np.isfinite(on).sum()) for on in on_at)
    all_aborted = max(aborted_at.values()) if len(aborted_at) == sc.sites else None
    last_off = max(
        (
            float(off[np.isfinite(on)].max())
            for on, off in zip(on_at, off_at, strict=True)
            if np.isfinite(on).any()
        ),
        default=0.0,
    )
    final: dict[str, int] = {}
    for s in states:
        final[s.state.value] = final.get(s.state.value, 0) + 1
    total = int(round(sc.devices * sc.request_rate_per_s * now))
    return RolloutResult(
        sc,
        "cores",
        exposed,
        target_requests,
        total,
        first_fail,
        all_aborted,
        last_off if all_aborted is not None else None,
        final,
        wave_share,
        max_wave,
        wall_s=time.perf_counter() - started,
        peak_rss_mb=peak_rss_mb(),
    )


def _summed(plan: RolloutPlan, heard: list[SiteEvidence]) -> list[SiteEvidence]:
    """Other sites' evidence as one entry: the gate only adds them up."""
    if not heard:
        return []
    measured = sum((e.measured for e in heard), Totals())
    soaked = sum((e.soaked for e in heard), Totals())
    return [
        SiteEvidence(
            "other-sites",
            plan.rollout_id,
            min(e.wave for e in heard),
            measured,
            soaked,
            sum(e.activation_failures for e in heard),
        )
    ]


# -- the model ------------------------------------------------------------------------------------


def expected(sc: RolloutScenario) -> dict[str, float]:
    """Closed-form expectations for a bad version (error share above the limit) under the same
    assumptions as the cores engine:

    - exposure: exactly wave 1's cohort (the wave's devices, `site_wave_sizes` total);
    - first failing gate: wave 1's devices start within one step (mean half an interval); the first
      site to fail is the one whose own + heard evidence first holds `min_requests`: other sites'
      evidence arrives `dissemination_s` after it is measured, and the gate runs each interval, so
      the fail comes at the first step at or after max(own, others) reach min_requests;
    - rollback: the aborting site's devices step back within one interval; every other site hears the
      abort `dissemination_s` later at its next gate step, and its devices step back within one more.
    """
    w1 = max(1, round(sc.first_wave_share * sc.devices))
    rate, step = sc.request_rate_per_s, sc.interval_s

    def next_step(t: float) -> float:
        return math.ceil(t / step - 1e-9) * step

    start_s = step / 2
    # Own route: a site's own wave-1 devices alone; heard route: everyone's, measured at a step and
    # heard dissemination_s later, at the next gate step. Every site hears the same sum, so by the
    # heard route all sites fail at the same step; by the own route the others learn of the abort.
    own_s = next_step(start_s + sc.min_requests * sc.sites / (rate * w1))
    heard_s = next_step(next_step(start_s + sc.min_requests / (rate * w1)) + sc.dissemination_s)
    fail_s = min(own_s, heard_s)
    all_fail_s = fail_s if heard_s <= own_s or sc.sites == 1 else next_step(fail_s + sc.dissemination_s)
    # The last exposed device steps back within an interval: the max of w1 uniform phases.
    rollback_s = all_fail_s + step * w1 / (w1 + 1)
    bad_requests = w1 * rate * (fail_s - start_s + step / 2)
    return {
        "bad_exposure_share": w1 / sc.devices,
        "seconds_to_first_fail": fail_s,
        "seconds_to_rollback": rollback_s,
        "bad_requests": bad_requests,
    }


@dataclass(frozen=True)
class RolloutValidationRow(ModelVsCores):
    devices: int
    sites: int
    cores: dict[str, float]
    model: dict[str, float]

    FIGURES = ("bad_exposure_share", "seconds_to_first_fail", "seconds_to_rollback")

    def to_json(self) -> dict[str, Any]:
        return self.figures_json(4)


def validate_rollout(
    devices: int,
    sites: int,
    seeds: list[int],
    *,
    dissemination_s: float = 2.0,
    progress: Callable[[str], None] | None = None,
) -> RolloutValidationRow:
    cores: dict[str, list[float]] = {}
    model: dict[str, float] = {}
    for seed in seeds:
        sc = RolloutScenario(devices, sites, seed=seed, dissemination_s=dissemination_s)
        if progress:
            progress(f"rollout: {devices} devices, {sites} sites, seed {seed}")
        data = run_cores(sc).to_json()
        for f in RolloutValidationRow.FIGURES:
            cores.setdefault(f, []).append(float(data[f] or 0.0))
        model = expected(sc)
    return RolloutValidationRow(
        devices,
        sites,
        {f: statistics.mean(v) for f, v in cores.items()},
        {f: model[f] for f in RolloutValidationRow.FIGURES},
    )
