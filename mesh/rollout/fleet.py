"""How a node reads the fleet for its rollouts, from what membership carries. Pure.

A node sees every member as a `PeerView`: its site and labels, whether it is reachable, the health
counters it gossips (`health.NodeHealth`) and its rollout notes (`announce.RolloutNote`). From those,
for one plan:

- a site leader finds who takes part (`site_populations`: reachable, selected, announcing the plan,
  serving its model, not skipping), when to start (`start_ready`: every selected member has
  announced the plan, or a grace time has passed), what to start with (`start_input`: this site's
  eligible devices, its share of every wave apportioned over the sites, and where each device's
  window begins), what the gate reads (`gate_reports`, `remote_evidence`) and whether another site
  has aborted (`aborted_elsewhere`);
- a device decides what to serve across every rollout of its model (`steer_device`): the latest
  rollout of the model decides (`state.desired_version`), targets that no rollout puts this device
  on are never chosen by default, the versions any live rollout needs stay pinned on disk, and a
  target the plan says not to prefetch (or an aborted one) is not fetched;
- routed inference keeps a stream on a version its site is on (`acceptable_versions`,
  `stream_server`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from mesh.rollout._json import expect_object, integer, strict_json, text
from mesh.rollout.announce import PLAN_DIGEST_HEX, RolloutNote, Serving
from mesh.rollout.cohort import cohort_score, first_wave, site_wave_sizes, wave_size
from mesh.rollout.health import (
    MAX_COUNT,
    DeviceMarks,
    DeviceReport,
    FoldedEvidence,
    GateOutcome,
    GateVerdict,
    NodeHealth,
    SiteEvidence,
    fold_evidence,
)
from mesh.rollout.plan import MAX_WAVES, DeviceFacts, RolloutError, RolloutPlan
from mesh.rollout.state import (
    MAX_FLEET_ELIGIBLE,
    Desired,
    Prefetch,
    RolloutState,
    SiteRollout,
    Start,
    Tombstone,
    desired_version,
)

VersionKey = tuple[str, str]


@dataclass(frozen=True)
class PeerView:
    """One member as this node knows it (itself included)."""

    node_id: str
    site: str
    labels: tuple[tuple[str, str], ...]
    reachable: bool  # alive as far as this node knows
    health: NodeHealth | None = None
    notes: tuple[RolloutNote, ...] = ()
    present: bool | None = None  # a member of the fleet now (alive or suspect); None: as `reachable`

    def __post_init__(self) -> None:
        if self.present is None:
            object.__setattr__(self, "present", self.reachable)

    def note(self, plan: RolloutPlan) -> RolloutNote | None:
        """Its note about exactly `plan` (same id and digest), if it announces one."""
        return next(
            (n for n in self.notes if n.rollout_id == plan.rollout_id and n.matches(plan.digest)), None
        )

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)


def selected(plan: RolloutPlan, peer: PeerView) -> bool:
    return plan.selector.mismatch(peer.label_map) is None


def participates(plan: RolloutPlan, peer: PeerView) -> bool:
    """Does `peer` take part in `plan` as far as it says: selected, serving the model, not skipping?"""
    note = peer.note(plan)
    return (
        note is not None and selected(plan, peer) and note.serving is not Serving.NONE and note.skip is None
    )


DEAD_PRESENT_GRACE_S = 60.0
"""How long a member declared dead still counts as present in its site's population."""


def member_present(live: bool, dead_for_s: float | None) -> bool:
    """Whether a member counts as present for `site_populations`: alive or suspect (`live`), or declared
    dead less than DEAD_PRESENT_GRACE_S ago (`dead_for_s`; None: not dead). On a loaded machine a
    false death is common and brief, and site leaders that count a population differently apportion
    the waves differently: a 1% wave of one device could then go to no site at all."""
    return live or (dead_for_s is not None and dead_for_s < DEAD_PRESENT_GRACE_S)


def site_populations(plan: RolloutPlan, peers: Iterable[PeerView]) -> dict[str, list[str]]:
    """Per site, the reachable selected devices that take part in `plan` (sorted node ids).

    Leaders of different sites start at different moments and must apportion the waves alike, so the
    count is as stable as membership allows: a member that has not announced the plan yet counts (its
    labels are selected), and so does a suspect one (a busy device is not a departed one). One that
    announced it serves another model, or skips, does not.
    """
    out: dict[str, list[str]] = {}
    for peer in peers:
        if not peer.present or not selected(plan, peer):
            continue
        note = peer.note(plan)
        if note is not None and (note.serving is Serving.NONE or note.skip is not None):
            continue
        out.setdefault(peer.site, []).append(peer.node_id)
    return {site: sorted(nodes) for site, nodes in out.items()}


def start_ready(
    plan: RolloutPlan, peers: Iterable[PeerView], *, registered_at: float, now: float, grace_s: float
) -> bool:
    """May a site leader start `plan`: has every reachable selected member announced it (so its skips and
    what it serves are known), or has `grace_s` passed since the site registered it?"""
    if now >= registered_at + grace_s:
        return True
    return all(peer.note(plan) is not None for peer in peers if peer.present and selected(plan, peer))


def start_input(
    plan: RolloutPlan, site: str, peers: Sequence[PeerView], now: float, *, fleet: FleetView | None = None
) -> Start:
    """Wave 1's start in `site`: its eligible devices, its share of every wave (apportioned over the
    sites by their eligible counts, so the fleet-wide wave sizes are exact), and each device's mark.
    In sites mode `fleet` (a representative's view, asked with this site's eligible count) gives the
    share and the fleet's count, and only this site's members in `peers` are read."""
    if fleet is not None:
        peers = [p for p in peers if p.site == site]
    populations = site_populations(plan, peers)
    eligible = populations.get(site, [])
    counts = {s: len(nodes) for s, nodes in populations.items()}
    counts.setdefault(site, 0)
    if fleet is not None:
        if fleet.sizes is None or fleet.fleet_eligible is None or fleet.site_eligible != len(eligible):
            raise ValueError(
                f"a fleet view for {fleet.site_eligible} eligible devices; this site has {len(eligible)}"
            )
        counts = {site: len(eligible)}
        sizes = fleet.sizes
    else:
        sizes = site_wave_sizes([w.share_ppm for w in plan.waves], counts)[site]
    health = {p.node_id: p.health for p in peers}
    marks = []
    for node in eligible:
        h = health.get(node)
        if h is None:
            continue
        target = h.counters(plan.model, plan.target_version)
        baseline = h.counters(plan.model, plan.baseline_version)
        marks.append(
            (node, DeviceMarks(target.mark() if target else None, baseline.mark() if baseline else None))
        )
    fleet_eligible = sum(counts.values()) if fleet is None else fleet.fleet_eligible
    return Start(now, tuple(eligible), sizes, tuple(marks), fleet_eligible)


def gate_reports(plan: RolloutPlan, site: str, peers: Iterable[PeerView]) -> list[DeviceReport]:
    """What the gate knows of every selected device of `site` (the cohort measures the target, the
    others the baseline); an unreachable device's last report still counts its errors."""
    return [
        DeviceReport.from_health(p.node_id, p.reachable, p.health, plan)
        for p in peers
        if p.site == site and selected(plan, p)
    ]


def remote_evidence(plan: RolloutPlan, site: str, peers: Iterable[PeerView]) -> list[SiteEvidence]:
    """Other sites' evidence for `plan`: per site, the entries of the member announcing the furthest
    wave (its leader; a deposed leader's older word loses)."""
    best: dict[str, tuple[tuple[int, int], RolloutNote]] = {}
    for peer in peers:
        note = peer.note(plan)
        if peer.site == site or note is None or not note.evidence:
            continue
        key = (max(e.wave for e in note.evidence), sum(e.measured.requests for e in note.evidence))
        if peer.site not in best or key > best[peer.site][0]:
            best[peer.site] = (key, note)
    return [e.for_site(s, plan.rollout_id) for s, (_, note) in sorted(best.items()) for e in note.evidence]


def aborted_elsewhere(plan: RolloutPlan, site: str, peers: Iterable[PeerView]) -> PeerView | None:
    """A member of another site whose replica holds `plan` aborted, if any (reachable ones first)."""
    found = [
        p
        for p in peers
        if p.site != site and (n := p.note(plan)) is not None and n.state is RolloutState.ABORTED
    ]
    return min(found, key=lambda p: (not p.reachable, p.node_id)) if found else None


# --- sites mode: the rest of the fleet, through a site's representatives ----------------------------

MAX_FLEET_VIEW_BYTES = 4096
MAX_ABORT_REASON = 400


class FleetViewError(RolloutError):
    """A fleet view from a representative is malformed (names what is wrong)."""


@dataclass(frozen=True)
class FleetView:
    """The rest of the fleet for one plan, as one representative of `site` sees it in the federation pool
    (sites mode, where a site leader sees only its own site): what `start_input`, the gate and the abort
    check read of other sites. Its size depends on the plan's waves, never on how many sites there are.

    `sites` other sites have a present member in the representative's federation view, `counted` of
    them said their population for the plan; `sizes` is this site's share of every wave and
    `fleet_eligible` the fleet's eligible count, both apportioned with `site_eligible` devices here (None
    when the asker gave no count); `evidence` folds the other sites' evidence; `aborted_site` is a site
    whose replica aborted the plan (with its reason, where the representative could learn it)."""

    site: str
    plan_digest: str
    evidence: FoldedEvidence
    sites: int = 0
    counted: int = 0
    site_eligible: int | None = None
    fleet_eligible: int | None = None
    sizes: tuple[int, ...] | None = None
    aborted_site: str | None = None
    aborted_reason: str = ""

    @property
    def complete(self) -> bool:
        """Has every other site the representative sees said its population? Not when it sees none: a
        representative cut off from the federation (or not joined yet) cannot tell a fleet of one site
        from a partition, so such a start waits for the grace time."""
        return self.sites > 0 and self.counted >= self.sites

    def for_plan(self, plan: RolloutPlan, site: str) -> bool:
        """Is this a view of `plan` for `site` (a reply to another question is not used)?"""
        return (
            self.site == site
            and len(self.plan_digest) == PLAN_DIGEST_HEX
            and plan.digest.startswith(self.plan_digest)
            and self.evidence.rollout_id == plan.rollout_id
            and (self.sizes is None or len(self.sizes) == len(plan.waves))
        )

    def to_json(self) -> bytes:
        doc = {
            "site": self.site,
            "plan_digest": self.plan_digest,
            "evidence": self.evidence.to_dict(),
            "sites": self.sites,
            "counted": self.counted,
            "site_eligible": self.site_eligible,
            "fleet_eligible": self.fleet_eligible,
            "sizes": None if self.sizes is None else list(self.sizes),
            "aborted_site": self.aborted_site,
            "aborted_reason": self.aborted_reason,
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: object) -> FleetView:
        d = expect_object(
            strict_json(data, "fleet view", FleetViewError, MAX_FLEET_VIEW_BYTES),
            "fleet view",
            _FLEET_VIEW_FIELDS,
            FleetViewError,
        )
        err = FleetViewError
        site = text(d["site"], "fleet view.site", err, 63)
        digest = text(d["plan_digest"], "fleet view.plan_digest", err, PLAN_DIGEST_HEX)
        if len(digest) != PLAN_DIGEST_HEX or not all(c in "0123456789abcdef" for c in digest):
            raise err(f"fleet view.plan_digest: expected {PLAN_DIGEST_HEX} hex characters")
        sites, counted = (
            integer(d[n], f"fleet view.{n}", err, maximum=MAX_COUNT) for n in ("sites", "counted")
        )
        site_eligible, fleet_eligible = (
            None if d[n] is None else integer(d[n], f"fleet view.{n}", err, maximum=MAX_COUNT)
            for n in ("site_eligible", "fleet_eligible")
        )
        sizes = d["sizes"]
        if sizes is not None:
            if not isinstance(sizes, list) or not 1 <= len(sizes) <= MAX_WAVES:
                raise err(f"fleet view.sizes: expected a list of 1 to {MAX_WAVES} wave sizes")
            sizes = tuple(integer(v, "fleet view.sizes", err, maximum=MAX_COUNT) for v in sizes)
        aborted = d["aborted_site"]
        if aborted is not None:
            aborted = text(aborted, "fleet view.aborted_site", err, 63)
        try:
            evidence = FoldedEvidence.from_dict(d["evidence"])
        except RolloutError as exc:
            raise err(f"fleet view: {exc}") from None
        if counted > sites:
            raise err(f"fleet view: {counted} sites counted of {sites} seen")
        if (site_eligible is None) != (fleet_eligible is None) or (site_eligible is None) != (sizes is None):
            raise err("fleet view: site_eligible, fleet_eligible and sizes come together or not at all")
        if sizes is not None:
            assert site_eligible is not None and fleet_eligible is not None
            if any(a > b for a, b in zip(sizes, sizes[1:], strict=False)) or sizes[-1] != site_eligible:
                raise err(f"fleet view.sizes: {list(sizes)} is not a nondecreasing share of {site_eligible}")
            if site_eligible > fleet_eligible:
                raise err(f"fleet view: {site_eligible} eligible here but {fleet_eligible} in the fleet")
            if fleet_eligible > MAX_FLEET_ELIGIBLE:
                raise err(f"fleet view: a fleet of {fleet_eligible} devices, at most {MAX_FLEET_ELIGIBLE}")
        return cls(
            site,
            digest,
            evidence,
            sizes=sizes,
            aborted_site=aborted,
            aborted_reason=text(d["aborted_reason"], "fleet view.aborted_reason", err, MAX_ABORT_REASON),
            sites=sites,
            counted=counted,
            site_eligible=site_eligible,
            fleet_eligible=fleet_eligible,
        )


_FLEET_VIEW_FIELDS = frozenset(
    {
        "site",
        "plan_digest",
        "evidence",
        "sites",
        "counted",
        "site_eligible",
        "fleet_eligible",
        "sizes",
        "aborted_site",
        "aborted_reason",
    }
)


def site_population(
    plan: RolloutPlan, rollout: SiteRollout | None, site: str, peers: Iterable[PeerView]
) -> int:
    """What a representative says of its site's population for `plan`: the count the site started with
    (replicated, so every representative says the same and a site starting later apportions as this one
    did), or before the start the count `site_populations` gives now."""
    if rollout is not None and rollout.thresholds:  # started (wave 1 may be held for an operator)
        return rollout.eligible_count
    return len(site_populations(plan, [p for p in peers if p.site == site]).get(site, []))


def fleet_view(
    plan: RolloutPlan, site: str, peers: Iterable[PeerView], *, site_eligible: int | None = None
) -> FleetView:
    """The rest of the fleet for `plan` as a representative of `site` sees it in `peers` (its site's
    members and the other sites' federation members); with `site_eligible` (the asking leader's own
    count), this site's wave sizes apportioned over every site that said its population."""
    others = [p for p in peers if p.site != site]
    sites = {p.site for p in others if p.present}
    populations: dict[str, int] = {}
    for peer in others:
        note = peer.note(plan)
        if note is not None and note.population is not None and peer.site in sites:
            populations[peer.site] = max(populations.get(peer.site, 0), note.population)
    evidence = fold_evidence(
        plan.rollout_id, remote_evidence(plan, site, others), besides=site, waves=len(plan.waves)
    )
    aborted = aborted_elsewhere(plan, site, others)
    sizes = fleet_eligible = None
    if site_eligible is not None:
        counts = {**populations, site: site_eligible}
        sizes = site_wave_sizes([w.share_ppm for w in plan.waves], counts)[site]
        fleet_eligible = sum(counts.values())
    return FleetView(
        site,
        plan.digest[:PLAN_DIGEST_HEX],
        evidence,
        sites=len(sites),
        counted=len(populations),
        site_eligible=site_eligible,
        fleet_eligible=fleet_eligible,
        sizes=sizes,
        aborted_site=None if aborted is None else aborted.site,
    )


def prefer(views: Mapping[str, FleetView]) -> FleetView | None:
    """Of the views a site leader holds (by representative), the one that sees the most of the fleet:
    most sites counted, then most sites seen, then the lowest representative id."""
    if not views:
        return None
    best = min(views, key=lambda rep: (-views[rep].counted, -views[rep].sites, rep))
    return views[best]


def cautious_start(plan: RolloutPlan, views: Iterable[FleetView], site_eligible: int) -> FleetView | None:
    """What a site starts with when its representatives' views (each asked with `site_eligible`) differ:
    per wave the fewest devices any of them gives this site, and the smallest fleet any of them counts
    (so the guard judges each wave's share as the largest any view implies), each wave kept within the
    plan's share of that fleet; the last wave keeps what the views give it (all of the site's eligible
    devices at 100%). None without a view asked with this count. Beside honest views, one that lies can
    only make this site's waves smaller, or ask for approvals sooner (a site's representatives are trusted
    as far as their own view goes, as any member's gossiped evidence is in flat mode)."""
    usable = [
        v
        for v in views
        if v.site_eligible == site_eligible and v.sizes is not None and len(v.sizes) == len(plan.waves)
    ]
    if not usable:
        return None
    fleet_eligible = min(v.fleet_eligible or 0 for v in usable)
    fleet_eligible = max(fleet_eligible, site_eligible)
    sizes = [min(column) for column in zip(*(v.sizes or () for v in usable), strict=True)]
    sizes[-1] = site_eligible  # a plan's last wave is 100%: all of this site's eligible devices
    for k, w in enumerate(plan.waves[:-1]):
        sizes[k] = min(sizes[k], wave_size(w.share_ppm, fleet_eligible))
    base = prefer({str(i): v for i, v in enumerate(usable)})
    assert base is not None
    return replace(base, sizes=tuple(sizes), fleet_eligible=fleet_eligible)


def sites_verdict(
    plan: RolloutPlan,
    judge: Callable[[FoldedEvidence | Sequence[SiteEvidence]], GateVerdict],
    views: Mapping[str, FleetView],
) -> GateVerdict:
    """A sites-mode leader's gate over its representatives' fresh views (`judge` evaluates the gate with
    the given remote evidence). A failure through any view fails the wave (the safe direction). A pass
    needs every view that sees other sites to pass (a view that sees none, from a representative cut off
    from the federation, weighs only when no other is held): a stale view that passes does not outvote a
    fresher one still waiting. Without any view the site's own devices are judged, and a pass they would
    give waits: errors other sites measured may be missing, as the site cannot see them itself."""
    if not views:
        own = judge(())
        if own.outcome is not GateOutcome.PASS:
            return own
        w = plan.wave(own.wave)
        assert w.deadline_s is not None
        note = "; waiting for a representative's view of the other sites before passing"
        return replace(
            own,
            outcome=GateOutcome.INCONCLUSIVE,
            reason=(own.reason[: 1024 - len(note)] + note),
            deadline_passed=own.evaluated_at >= own.soak_started_at + w.deadline_s,
        )
    verdicts = {rep: judge(view.evidence) for rep, view in sorted(views.items())}
    failed = next((v for v in verdicts.values() if v.outcome is GateOutcome.FAIL), None)
    if failed is not None:
        return failed
    informative = {rep: view for rep, view in views.items() if view.sites > 0} or dict(views)
    best = prefer(informative)
    preferred = next(verdicts[rep] for rep, view in informative.items() if view is best)
    if preferred.outcome is not GateOutcome.PASS:
        return preferred
    waiting = [verdicts[rep] for rep in sorted(informative) if verdicts[rep].outcome is not GateOutcome.PASS]
    return waiting[0] if waiting else preferred


def fleet_start_ready(view: FleetView | None, *, registered_at: float, now: float, grace_s: float) -> bool:
    """May a site leader in sites mode start, as far as other sites go: a view has counted every site it
    sees, or `grace_s` has passed since the site registered the plan (uncounted sites are then left out,
    as flat mode leaves out absent members). Never without a view: sizing the waves for this site alone
    would put far more devices in the first wave than the plan allows fleet-wide."""
    return view is not None and (view.complete or now >= registered_at + grace_s)


def cohort_wave(rollout: SiteRollout, node_id: str) -> int:
    """The first wave whose cohort in its site holds `node_id`; 0 for none (or not started)."""
    return first_wave(cohort_score(rollout.rollout_id, node_id), rollout.thresholds) or 0


def serving_of(plan: RolloutPlan, model: str | None, version: str | None) -> Serving:
    """What a node configured for `model` and serving `version` serves, relative to `plan`."""
    if model != plan.model:
        return Serving.NONE
    if version is None:
        return Serving.INACTIVE
    if version == plan.baseline_version:
        return Serving.BASELINE
    if version == plan.target_version:
        return Serving.TARGET
    return Serving.OTHER


def acceptable_versions(plan: RolloutPlan, state: RolloutState) -> frozenset[str]:
    """The versions a site runs under `plan` in `state`: a routed stream belongs on one of them."""
    if state is RolloutState.ABORTED:
        return frozenset({plan.baseline_version})
    if state is RolloutState.COMPLETED:
        return frozenset({plan.target_version})
    return frozenset({plan.baseline_version, plan.target_version})


def stream_server(stream_id: str, candidates: Iterable[str]) -> str | None:
    """The candidate that serves `stream_id` instead of its owner (rendezvous hashing: a stream stays on
    the same substitute while the candidates stay the same)."""

    def weight(node: str) -> bytes:
        return hashlib.sha256(f"{stream_id}\x00{node}".encode()).digest()

    pool = sorted(set(candidates))
    return max(pool, key=weight) if pool else None


@dataclass(frozen=True)
class DeviceSteering:
    """What a device does about its model's rollouts (the shell hands it to the activator and the
    distributor): serve `desired` (None: keep what is active; with nothing active, the newest version
    not `blocked`), keep `pinned` on disk, do not fetch `unwanted`, fetch `background` only when nothing
    else is being fetched (a target prefetched outside this device's wave)."""

    desired: str | None = None
    blocked: frozenset[str] = frozenset()
    pinned: frozenset[VersionKey] = frozenset()
    unwanted: frozenset[VersionKey] = frozenset()
    background: frozenset[VersionKey] = frozenset()
    decisions: Mapping[str, Desired] = field(default_factory=dict)  # rollout id -> what it asks of us
    governing: str | None = None  # the rollout whose word decides (the newest of the model)


def steer_device(
    model: str,
    rollouts: Sequence[tuple[RolloutPlan, SiteRollout]],
    unregistered: Sequence[RolloutPlan],
    facts: DeviceFacts,
    *,
    complete: Iterable[str],
    serving: str | None,
    aborted: Mapping[str, str],
    now: float,
    safe_only: bool = False,
    tombstones: Sequence[Tombstone] = (),
) -> DeviceSteering:
    """What this device (`facts`, serving `serving`, with `complete` versions on disk) does about the
    rollouts of `model`: `rollouts` as its site holds them, `unregistered` plans it holds that its site
    has not registered yet (their targets are blocked and pinned, nothing more), `aborted` rollout id ->
    reason for aborts known from elsewhere. `safe_only` (the site's state may be stale: no leader was
    reachable since a restart) never moves this device onto a target, only back to a baseline.
    `tombstones` are aborted rollouts the site has forgotten: their targets stay blocked (unless a rollout
    the site still holds targets the same version), and a device serving one goes back to its baseline
    when no rollout governs the model."""
    held = frozenset(complete)
    mine = sorted(
        ((p, r) for p, r in rollouts if p.model == model), key=lambda pr: (pr[0].created_at, pr[0].rollout_id)
    )
    decisions: dict[str, Desired] = {}
    blocked: set[str] = set()
    pinned: set[VersionKey] = set()
    unwanted: set[VersionKey] = set()
    background: set[VersionKey] = set()
    for plan, rollout in mine:
        device = replace(facts, holds_target=plan.target_version in held)
        decision = desired_version(
            plan, rollout, device, serving=serving, aborted_elsewhere=aborted.get(plan.rollout_id), now=now
        )
        decisions[plan.rollout_id] = decision
        if decision.version == plan.target_version:
            blocked.discard(plan.target_version)
        else:
            blocked.add(plan.target_version)
        if not plan.expired(now) or rollout.state is RolloutState.COMPLETED:
            pinned.update((model, v) for v in decision.pinned)
        if decision.prefetch is Prefetch.NONE and decision.version != plan.target_version:
            unwanted.add((model, plan.target_version))
        elif decision.prefetch is Prefetch.LOW and decision.version != plan.target_version:
            background.add((model, plan.target_version))
    registered = {p.rollout_id for p, _ in mine}
    for plan in unregistered:
        if plan.model != model or plan.rollout_id in registered or plan.expired(now):
            continue
        blocked.add(plan.target_version)
        pinned.update({(model, plan.baseline_version), (model, plan.target_version)})
    # A version a rollout the site holds names (as target or baseline) is that rollout's to decide.
    wanted = {v for p, _ in mine for v in (p.target_version, p.baseline_version)}
    buried = [t for t in tombstones if t.model == model and t.aborted and t.target_version not in wanted]
    blocked.update(t.target_version for t in buried)
    desired = None
    governing = mine[-1][0] if mine else None
    if governing is not None:
        desired = decisions[governing.rollout_id].version
        if safe_only and desired == governing.target_version and serving != desired:
            desired = None
            blocked.add(governing.target_version)  # nor as the newest version, nor resumed after a restart
    if desired is None:
        # Serving the target of a forgotten abort, and nothing the site holds says what to serve: back to
        # that rollout's baseline.
        back = [t for t in buried if t.target_version == serving]
        if back:
            desired = max(back, key=lambda t: (t.at, t.rollout_id)).baseline_version
    return DeviceSteering(
        desired=desired,
        blocked=frozenset(blocked),
        pinned=frozenset(pinned),
        unwanted=frozenset(unwanted),
        # What some rollout has this device serve (or fetch now) is never background for another.
        background=frozenset(background - {(model, d.version) for d in decisions.values() if d.version}),
        decisions=decisions,
        governing=None if governing is None else governing.rollout_id,
    )
