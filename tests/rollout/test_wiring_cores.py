"""The pure parts of the rollout wiring: the gossiped notes codec, the document store, how a node reads the
fleet (apportionment, start, evidence, aborts), how a device steers its activator, the status report, the
activation choice under steering, a first wave above scope, and the CLI's parsers. No clock, no network."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.cli.rollout import parse_duration_s, parse_selector
from mesh.inference.activation import Activate, choose_active
from mesh.rollout import announce
from mesh.rollout.announce import (
    MAX_NOTES,
    AnnounceFormatError,
    RolloutNote,
    Serving,
    WaveEvidence,
    decode_notes,
    digest_commands,
    encode_notes,
)
from mesh.rollout.cohort import wave_size
from mesh.rollout.docs import DocumentRefused, RolloutDocs
from mesh.rollout.fleet import (
    DEAD_PRESENT_GRACE_S,
    MAX_FLEET_VIEW_BYTES,
    FleetView,
    FleetViewError,
    PeerView,
    aborted_elsewhere,
    acceptable_versions,
    cautious_start,
    fleet_start_ready,
    fleet_view,
    member_present,
    prefer,
    remote_evidence,
    site_population,
    site_populations,
    sites_verdict,
    start_input,
    start_ready,
    steer_device,
    stream_server,
)
from mesh.rollout.health import (
    FoldedEvidence,
    GateOutcome,
    GateVerdict,
    NodeHealth,
    SiteEvidence,
    Totals,
    fold_evidence,
)
from mesh.rollout.plan import AutonomousScope, CommandAction, PrefetchPolicy, Selector, SkipKind
from mesh.rollout.report import rollout_report
from mesh.rollout.state import (
    OperatorInput,
    Outcome,
    RolloutLedger,
    RolloutState,
    SiteRollout,
    Tombstone,
    encode_input,
    new_rollout,
    plan_command,
)
from tests.rollout.builders import (
    OPERATOR,
    ROGUE_OPERATOR,
    STRANGER,
    T0,
    TRUSTED,
    command,
    counters,
    device,
    make_plan,
    signed,
    waves,
)
from tests.strategies import json_values

PLAN = make_plan()
DIGEST = PLAN.digest


# --- notes codec -----------------------------------------------------------------------------------

totals = st.builds(
    lambda r, e, d: Totals(r, min(e, r), d),
    st.integers(0, 10**9),
    st.integers(0, 10**9),
    st.integers(0, 10**5),
)
evidence = st.builds(
    WaveEvidence, st.integers(1, 10), totals, totals, st.integers(0, 100), st.integers(0, 100)
)
notes = st.builds(
    RolloutNote,
    rollout_id=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,30}", fullmatch=True),
    plan_digest=st.text("0123456789abcdef", min_size=16, max_size=16),
    commands=st.integers(0, 1000),
    commands_digest=st.text("0123456789abcdef", min_size=12, max_size=12),
    state=st.none() | st.sampled_from(RolloutState),
    wave=st.integers(0, 10),
    first_wave=st.integers(0, 10),
    serving=st.sampled_from(Serving),
    skip=st.none() | st.sampled_from(SkipKind),
    verdict=st.none() | st.sampled_from(GateOutcome),
    evidence=st.lists(evidence, max_size=2).map(tuple),
    population=st.none() | st.none() | st.integers(0, 10**6),
)


@given(st.lists(notes, max_size=MAX_NOTES, unique_by=lambda n: n.rollout_id))
def test_notes_round_trip_through_their_one_canonical_encoding(items):
    blob = encode_notes(items)
    decoded = decode_notes(blob)
    assert decoded == tuple(sorted(items, key=lambda n: n.rollout_id))
    assert encode_notes(list(decoded)) == blob


@given(st.binary(max_size=400))
@settings(max_examples=300)
def test_a_peers_notes_blob_parses_or_is_refused_with_one_error(blob):
    try:
        parsed = decode_notes(blob)
    except AnnounceFormatError:
        return
    assert encode_notes(list(parsed)) == blob  # whatever parses is canonical


def test_notes_keep_the_first_that_fit_the_budget():
    items = [RolloutNote(f"rollout-{i:02d}", DIGEST) for i in range(6)]
    one = len(encode_notes(items[:1]))
    blob = encode_notes(items, limit_bytes=one + 40)
    assert [n.rollout_id for n in decode_notes(blob)] == ["rollout-00", "rollout-01"]
    assert encode_notes([], 256) == b"" and decode_notes(b"") == ()
    with pytest.raises(AnnounceFormatError, match="not a rollout id"):
        RolloutNote("bad id!", DIGEST)


def test_a_population_is_bounded():
    RolloutNote("rollout-00", DIGEST, population=announce.MAX_SITE_POPULATION)
    with pytest.raises(AnnounceFormatError, match="population"):
        RolloutNote("rollout-00", DIGEST, population=announce.MAX_SITE_POPULATION + 1)


def test_populations_travel_in_codec_2_and_a_flat_fleet_keeps_codec_1():
    plain = [RolloutNote("rollout-00", DIGEST, wave=1), RolloutNote("rollout-01", DIGEST)]
    blob = encode_notes(plain)
    assert blob[0] == 1 and decode_notes(blob) == tuple(plain)
    counted = [plain[0], dataclasses.replace(plain[1], population=12_000)]
    blob2 = encode_notes(counted)
    assert blob2[0] == 2 and decode_notes(blob2) == tuple(counted)
    assert len(blob2) == len(blob) + 1 + 2  # one byte for "unknown", two for 12,001
    # The one note with a population does not fit: what fits is written as codec 1.
    budget = len(encode_notes(plain[:1])) + 3
    assert encode_notes([plain[0], counted[1]], limit_bytes=budget)[0] == 1
    # Codec 2 without any population would be a second spelling of a codec 1 blob.
    unsaid = bytes([2, 2]) + b"".join(announce._encode_note(n, with_population=True) for n in plain)
    with pytest.raises(AnnounceFormatError, match="canonical"):
        decode_notes(unsaid)
    with pytest.raises(AnnounceFormatError, match="codec 3 is not known"):
        decode_notes(bytes([3]) + blob[1:])


def test_the_commands_digest_does_not_depend_on_order():
    assert digest_commands(["a", "b"]) == digest_commands(["b", "a", "a"]) != digest_commands(["a"])


# --- documents ---------------------------------------------------------------------------------------


def test_documents_are_held_only_once_verified_and_a_forgery_is_remembered():
    docs = RolloutDocs(TRUSTED)
    plan = docs.add_plan(signed(PLAN), now=T0)
    assert docs.plan(PLAN.rollout_id) == plan and docs.note_digests(PLAN.rollout_id)[0] == 0
    forged = signed(make_plan("forged", key=STRANGER), STRANGER)
    with pytest.raises(DocumentRefused) as info:
        docs.add_plan(forged, now=T0)
    assert info.value.reason == "unknown_key" and docs.refused(forged.digest) == "unknown_key"
    assert docs.refused(forged.digest[:16]) == "unknown_key"  # as a note names it
    with pytest.raises(DocumentRefused, match="already names plan"):
        docs.add_plan(signed(make_plan(target="3.0")), now=T0)
    approve = command(PLAN, CommandAction.APPROVE, wave=2)
    assert (
        docs.add_command(approve, now=T0 + 100) is True and docs.add_command(approve, now=T0 + 100) is False
    )
    count, digest = docs.note_digests(PLAN.rollout_id)
    assert count == 1 and digest != digest_commands(())
    with pytest.raises(DocumentRefused) as info:
        docs.add_command(command(PLAN, CommandAction.ABORT, key=ROGUE_OPERATOR), now=T0 + 100)
    assert info.value.reason == "unknown_key"
    late = command(PLAN, CommandAction.PAUSE, now=T0, ttl_s=10)
    with pytest.raises(DocumentRefused):
        docs.add_command(late, now=T0 + 100)
    assert docs.refused(late.signature) is None  # a genuine command that expired is not a forgery
    assert docs.abort_of(PLAN.rollout_id) is None
    docs.add_command(command(PLAN, CommandAction.ABORT, reason="bad outputs"), now=T0 + 100)
    assert docs.abort_of(PLAN.rollout_id).reason == "bad outputs"
    docs.forget_expired(PLAN.expires_at + 25 * 3600)
    assert docs.plans() == []


# --- reading the fleet -------------------------------------------------------------------------------


def peer(
    node: str,
    site: str,
    *,
    note: RolloutNote | None = None,
    reachable: bool = True,
    present: bool | None = None,
    labels: dict[str, str] | None = None,
    health: NodeHealth | None = None,
) -> PeerView:
    return PeerView(
        node,
        site,
        tuple(sorted({"site": site, **(labels or {"device_class": "camera"})}.items())),
        reachable,
        health,
        (note,) if note is not None else (),
        present,
    )


def note(**kw) -> RolloutNote:
    return RolloutNote(PLAN.rollout_id, DIGEST, **{"serving": Serving.BASELINE, **kw})


@given(
    st.dictionaries(st.sampled_from(["a", "b", "c", "d", "e"]), st.integers(0, 60), min_size=1),
    st.integers(0, 2**32),
)
def test_sites_that_see_the_same_fleet_apportion_every_wave_exactly(sizes, seed):
    rng = random.Random(seed)
    peers = [
        peer(
            f"{s}-{i:03d}",
            s,
            note=note() if rng.random() < 0.7 else None,
            reachable=rng.random() < 0.9,
            present=True,
        )
        for s, n in sizes.items()
        for i in range(n)
    ]
    total = len(peers)
    starts = {s: start_input(PLAN, s, peers, T0) for s in sizes}
    for k, w in enumerate(PLAN.waves):
        assert sum(st_.sizes[k] for st_ in starts.values()) == wave_size(w.share_ppm, total), f"seed {seed}"
    for s, start in starts.items():
        assert len(start.eligible) == start.sizes[-1] == sizes[s]
        assert all(a <= b for a, b in zip(start.sizes, start.sizes[1:], strict=False))


def test_who_counts_for_a_start_and_when_a_leader_starts():
    peers = [
        peer("a1", "a", note=note()),
        peer("a2", "a", note=None),  # not announced yet: counts by its labels
        peer("a3", "a", note=note(skip=SkipKind.OLD_RUNTIME)),
        peer("a4", "a", note=note(serving=Serving.NONE)),  # serves another model
        peer("a5", "a", note=note(), reachable=False, present=True),  # suspect: still a member
        peer("a6", "a", note=note(), reachable=False, present=False),  # dead
        peer("a7", "a", note=note(), labels={"device_class": "gateway"}),
    ]
    assert site_populations(PLAN, peers) == {"a": ["a1", "a2", "a5", "a7"]}
    cameras = make_plan(selector=Selector.of(device_class="camera"))
    assert site_populations(cameras, [dataclasses.replace(p, notes=()) for p in peers]) == {
        "a": ["a1", "a2", "a3", "a4", "a5"]
    }
    assert not start_ready(PLAN, peers, registered_at=T0, now=T0 + 1, grace_s=5)  # a2 has not announced
    assert start_ready(PLAN, peers, registered_at=T0, now=T0 + 5, grace_s=5)
    assert start_ready(PLAN, [p for p in peers if p.node_id != "a2"], registered_at=T0, now=T0, grace_s=5)
    start = start_input(
        PLAN, "a", [peer("a1", "a", note=note(), health=NodeHealth((counters(7, 1, version="1.0"),)))], T0
    )
    assert start.eligible == ("a1",) and dict(start.marks)["a1"].baseline.requests == 7


def test_evidence_comes_from_each_other_site_s_furthest_announcer_and_aborts_are_noticed():
    e1 = WaveEvidence(1, Totals(100, 1, 1), Totals(90, 1, 1))
    e2 = WaveEvidence(2, Totals(10, 0, 2), Totals(0, 0, 0))
    peers = [
        peer(
            "b1",
            "b",
            note=note(state=RolloutState.SOAKING, wave=2, verdict=GateOutcome.PASS, evidence=(e1, e2)),
        ),
        peer(
            "b2", "b", note=note(state=RolloutState.SOAKING, wave=1, verdict=GateOutcome.PASS, evidence=(e1,))
        ),
        peer("a1", "a", note=note(state=RolloutState.SOAKING, wave=1, evidence=(e2,))),
        peer("c1", "c", note=note(state=RolloutState.ABORTED, wave=1), reachable=False),
        peer(
            "c2", "c", note=RolloutNote(PLAN.rollout_id, "0" * 16, state=RolloutState.ABORTED)
        ),  # other plan
    ]
    found = remote_evidence(PLAN, "a", peers)
    assert [(e.site, e.wave) for e in found] == [("b", 1), ("b", 2)]
    assert aborted_elsewhere(PLAN, "a", peers).node_id == "c1"
    assert aborted_elsewhere(PLAN, "c", peers) is None


# --- sites mode: the fleet through representatives ---------------------------------------------------


def _sites_fleet(sizes: dict[str, int], rng: random.Random, representatives: int = 3):
    """Every site's members (as its pool shows them), and per site the federation members a representative
    of it sees: the other sites' representatives, announcing their site's population."""
    members = {
        s: [
            peer(
                f"{s}-{i:03d}",
                s,
                note=note() if rng.random() < 0.7 else None,
                reachable=rng.random() < 0.9,
                present=True,
            )
            for i in range(n)
        ]
        for s, n in sizes.items()
    }
    reps = {
        s: [
            dataclasses.replace(
                m, notes=(note(population=site_population(PLAN, None, s, members[s])),), reachable=True
            )
            for m in members[s][:representatives]
        ]
        for s in sizes
    }
    return members, reps


@given(
    st.dictionaries(st.sampled_from(["a", "b", "c", "d", "e"]), st.integers(0, 60), min_size=1),
    st.integers(0, 2**32),
)
def test_site_leaders_that_see_only_their_site_apportion_every_wave_exactly_through_representatives(
    sizes, seed
):
    """Sites mode: a leader sees its own site; a representative's view of the others (their populations,
    from their representatives' notes) gives the same fleet-wide wave sizes as flat mode's one pool."""
    rng = random.Random(seed)
    members, reps = _sites_fleet(sizes, rng)
    starts = {}
    for s in sizes:
        seen = members[s] + [r for o in sizes if o != s for r in reps[o]]
        own = site_population(PLAN, None, s, members[s])
        view = fleet_view(PLAN, s, seen, site_eligible=own)
        others = [o for o in sizes if o != s and reps[o]]
        assert view.counted == view.sites == len(others) and view.complete == bool(others)
        starts[s] = start_input(PLAN, s, seen, T0, fleet=view)
    total = sum(sizes.values())
    for k, w in enumerate(PLAN.waves):
        assert sum(st_.sizes[k] for st_ in starts.values()) == wave_size(w.share_ppm, total), f"seed {seed}"
    flat = [m for ms in members.values() for m in ms]
    for s, start in starts.items():
        assert start == start_input(PLAN, s, flat, T0), s  # exactly what one pool would have started with
        assert start.fleet_eligible == total


def test_a_fleet_view_counts_sites_folds_their_evidence_and_notices_an_abort():
    e1 = WaveEvidence(1, Totals(100, 1, 1), Totals(90, 1, 1))
    seen = [
        peer("a1", "a", note=note()),
        peer("a2", "a", note=note(evidence=(WaveEvidence(1, Totals(5, 5, 1), Totals(5, 5, 1)),))),  # own site
        peer("b1", "b", note=note(population=40, state=RolloutState.SOAKING, wave=1, evidence=(e1,))),
        peer("b2", "b", note=note(population=41)),  # a site's representatives may differ: the most counts
        peer("c1", "c", note=note()),  # has not said its population yet
        peer(
            "d1", "d", note=note(population=9), reachable=False, present=False
        ),  # gone: neither seen nor counted
    ]
    view = fleet_view(PLAN, "a", seen, site_eligible=10)
    assert (view.sites, view.counted, view.complete) == (2, 1, False)
    assert (
        view.fleet_eligible == 51
        and view.sizes
        == start_input(
            PLAN,
            "a",
            [
                *[peer(f"a{i}", "a", note=note()) for i in range(10)],
                *[peer(f"b{i}", "b", note=note()) for i in range(41)],
            ],
            T0,
        ).sizes
    )
    assert view.evidence == fold_evidence(
        PLAN.rollout_id, [SiteEvidence("b", PLAN.rollout_id, 1, e1.measured, e1.soaked)]
    )
    assert view.aborted_site is None and view.for_plan(PLAN, "a") and not view.for_plan(PLAN, "b")
    aborted = [*seen, peer("c2", "c", note=note(state=RolloutState.ABORTED, wave=1))]
    assert fleet_view(PLAN, "a", aborted).aborted_site == "c"
    assert fleet_view(PLAN, "a", aborted).sizes is None  # no count asked: no sizes
    # A start waits for every site seen to be counted, or the grace; never without a view at all.
    assert not fleet_start_ready(view, registered_at=T0, now=T0 + 1, grace_s=30)
    assert fleet_start_ready(view, registered_at=T0, now=T0 + 30, grace_s=30)
    assert not fleet_start_ready(None, registered_at=T0, now=T0 + 10**6, grace_s=30)
    complete = dataclasses.replace(view, counted=2)
    assert fleet_start_ready(complete, registered_at=T0, now=T0, grace_s=30)
    twin = dataclasses.replace(view, aborted_reason="the twin")
    assert prefer({"b-rep": twin, "a-rep": view}) is view and prefer({}) is None
    assert prefer({"x": view, "y": complete}) is complete
    # A view asked for another count is not a start for this one.
    with pytest.raises(ValueError, match="10 eligible devices; this site has 2"):
        start_input(PLAN, "a", seen, T0, fleet=view)


def test_a_representative_that_sees_no_other_site_cannot_start_its_site_alone():
    """Cut off from the federation (or not joined yet), a representative sees no other site: that is no
    proof of a fleet of one site, so the start waits for the grace time instead of sizing every wave for
    this site alone."""
    alone = fleet_view(PLAN, "a", [peer(f"a{i}", "a", note=note()) for i in range(50)], site_eligible=50)
    assert (alone.sites, alone.counted, alone.complete) == (0, 0, False)
    assert not fleet_start_ready(alone, registered_at=T0, now=T0 + 29, grace_s=30)
    assert fleet_start_ready(alone, registered_at=T0, now=T0 + 30, grace_s=30)


def test_a_start_takes_the_most_cautious_of_the_views():
    honest = fleet_view(PLAN, "a", [peer("b1", "b", note=note(population=990))], site_eligible=10)
    assert honest.sizes == (0, 1, 10) and honest.fleet_eligible == 1000
    # A view that claims a huge fleet and a big share for this site, within what parses.
    liar = dataclasses.replace(honest, sizes=(10, 10, 10), fleet_eligible=2**38, counted=1, sites=1)
    assert FleetView.from_json(liar.to_json()) == liar
    both = cautious_start(PLAN, [liar, honest], 10)
    assert both.sizes == (0, 1, 10) and both.fleet_eligible == 1000
    # Alone, the largest any wave of it may be is the plan's share of the fleet it counts.
    assert cautious_start(PLAN, [liar], 10).sizes == (10, 10, 10)
    small = dataclasses.replace(honest, sizes=(5, 5, 10), fleet_eligible=20)
    assert cautious_start(PLAN, [small], 10).sizes == (1, 2, 10)  # 1% and 10% of 20, rounded up
    assert cautious_start(PLAN, [honest], 9) is None  # asked for another count


def test_a_site_says_the_population_it_started_with():
    members = [peer(f"a{i}", "a", note=note()) for i in range(5)]
    assert site_population(PLAN, None, "a", members) == 5
    started = SiteRollout(
        PLAN.rollout_id, DIGEST, RolloutState.SOAKING, wave=1, eligible_count=7, thresholds=(1, 2, 2**64)
    )
    assert site_population(PLAN, started, "a", members) == 7
    held = SiteRollout(
        PLAN.rollout_id,
        DIGEST,
        RolloutState.WAITING_APPROVAL,
        wave=0,
        eligible_count=6,
        thresholds=(None, None, 2**64),
    )  # started, wave 1 held for an operator
    assert site_population(PLAN, held, "a", members) == 6
    pending = SiteRollout(PLAN.rollout_id, DIGEST)
    assert site_population(PLAN, pending, "a", members + [peer("b1", "b", note=note())]) == 5


def test_a_fleet_view_stays_small_whatever_the_number_of_sites():
    evidence = (WaveEvidence(1, Totals(100, 1, 2), Totals(100, 1, 2), 0, 1),)
    seen = [
        peer(
            f"s{k:05d}-r{j}",
            f"s{k:05d}",
            note=note(population=100, state=RolloutState.SOAKING, wave=1, evidence=evidence),
        )
        for k in range(10_000)
        for j in range(3)
    ]
    view = fleet_view(PLAN, "a", seen, site_eligible=100)
    blob = view.to_json()
    assert len(blob) < 1024 and view.fleet_eligible == 1_000_100 and view.sites == view.counted == 10_000
    assert FleetView.from_json(blob) == view


def _verdict(outcome: GateOutcome, reason: str = "r", now: float = T0 + 10) -> GateVerdict:
    return GateVerdict(PLAN.rollout_id, 1, outcome, reason, evaluated_at=now, soak_started_at=T0)


def test_a_sites_mode_gate_needs_a_view_to_pass_and_fails_through_any():
    seen = fold_evidence(
        PLAN.rollout_id, [SiteEvidence("b", PLAN.rollout_id, 1, Totals(9, 0, 1), Totals(9, 0, 1))]
    )
    view = FleetView("a", DIGEST[:16], seen, sites=1, counted=1)
    blind = FleetView("a", DIGEST[:16], FoldedEvidence(PLAN.rollout_id), sites=0)  # cut off from the others
    stale = FleetView("a", DIGEST[:16], FoldedEvidence(PLAN.rollout_id), sites=1, counted=1)
    outcome_by_evidence = {seen: GateOutcome.PASS}

    def judge(remote):
        if not isinstance(remote, FoldedEvidence):
            return _verdict(GateOutcome.PASS, "own devices pass")
        return _verdict(outcome_by_evidence.get(remote, GateOutcome.INCONCLUSIVE))

    # No view: what the site's own devices say, but never a pass (others' errors may be missing).
    alone = sites_verdict(PLAN, judge, {})
    assert alone.outcome is GateOutcome.INCONCLUSIVE and "waiting for a representative's view" in alone.reason
    assert not alone.deadline_passed
    late = sites_verdict(PLAN, lambda r: _verdict(GateOutcome.PASS, now=T0 + 10**6), {})
    assert late.outcome is GateOutcome.INCONCLUSIVE and late.deadline_passed
    assert sites_verdict(PLAN, judge, {"r1": view}).outcome is GateOutcome.PASS
    # A view that sees no other site does not hold back one that does; alone, it is what there is.
    assert sites_verdict(PLAN, judge, {"r1": view, "r2": blind}).outcome is GateOutcome.PASS
    assert sites_verdict(PLAN, judge, {"r2": blind}).outcome is GateOutcome.INCONCLUSIVE
    # Every view that sees other sites must pass; a failure through any fails.
    assert sites_verdict(PLAN, judge, {"r1": view, "r3": stale}).outcome is GateOutcome.INCONCLUSIVE
    outcome_by_evidence[blind.evidence] = GateOutcome.FAIL
    assert sites_verdict(PLAN, judge, {"r1": view, "r2": blind}).outcome is GateOutcome.FAIL


def _valid_view_doc() -> dict:
    view = fleet_view(PLAN, "a", [peer("b1", "b", note=note(population=7))], site_eligible=3)
    return json.loads(view.to_json())


@settings(max_examples=300)
@given(st.data())
def test_any_field_of_a_fleet_view_replaced_is_refused_or_parses_coherently(data):
    doc = _valid_view_doc()
    key = data.draw(st.sampled_from(sorted(doc)))
    doc[key] = data.draw(json_values(max_leaves=5) | st.integers(-3, 2**40) | st.none())
    try:
        view = FleetView.from_json(json.dumps(doc).encode())
    except FleetViewError:
        return
    assert FleetView.from_json(view.to_json()) == view
    assert view.counted <= view.sites
    if view.sizes is not None:
        assert view.sizes[-1] == view.site_eligible <= view.fleet_eligible <= 2**38
        assert list(view.sizes) == sorted(view.sizes)


@settings(max_examples=300)
@given(json_values())
def test_any_json_is_refused_as_a_fleet_view_or_parses(doc):
    blob = json.dumps(doc).encode()
    try:
        view = FleetView.from_json(blob)
    except FleetViewError:
        return
    assert FleetView.from_json(view.to_json()) == view


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"sizes": [1] * 11}, "sizes"),
        ({"sites": -1}, "sites"),
        ({"aborted_reason": "x" * 401}, "aborted_reason"),
        ({"evidence": {"rollout_id": "bad id!"}}, "evidence"),
        ({"extra": 1}, "extra"),
        ({"plan_digest": ""}, "hex characters"),
        ({"counted": 5, "sites": 4}, "5 sites counted of 4"),
        ({"fleet_eligible": None}, "come together"),
        ({"sizes": [1, 0, 3]}, "nondecreasing"),
        ({"sizes": [0, 1, 2]}, "share of 3"),
        ({"fleet_eligible": 2}, "3 eligible here but 2"),
        ({"fleet_eligible": 2**38 + 1}, "at most"),
    ],
)
def test_a_fleet_view_parses_strictly(change, fragment):
    doc = json.loads(fleet_view(PLAN, "a", [], site_eligible=3).to_json())
    doc.update(change)
    with pytest.raises(FleetViewError, match=fragment):
        FleetView.from_json(json.dumps(doc).encode())
    with pytest.raises(FleetViewError, match="at most"):
        FleetView.from_json(b" " * (MAX_FLEET_VIEW_BYTES + 1))


def test_routing_keeps_streams_on_the_versions_a_site_is_on():
    assert acceptable_versions(PLAN, RolloutState.ABORTED) == {"1.0"}
    assert acceptable_versions(PLAN, RolloutState.COMPLETED) == {"2.0"}
    assert acceptable_versions(PLAN, RolloutState.SOAKING) == {"1.0", "2.0"}
    assert stream_server("cam-1", ["n2", "n1"]) == stream_server("cam-1", ["n1", "n2"])
    assert stream_server("cam-1", []) is None


# --- a device's steering -----------------------------------------------------------------------------


def registered(plan=PLAN, **state) -> tuple:
    ledger = RolloutLedger(site="a", trusted=TRUSTED)
    ledger.apply(plan_command(signed(plan), now=T0))
    rollout = dataclasses.replace(ledger.get(plan.rollout_id)[1], **state)
    return plan, rollout


def everyone_in(rollout: SiteRollout, wave: int) -> SiteRollout:
    return dataclasses.replace(rollout, wave=wave, thresholds=(2**256 - 1,) * 3, state=RolloutState.SOAKING)


def test_the_newest_rollout_decides_and_unfinished_targets_are_never_chosen_by_default():
    me = device("dev-1")
    plan, pending = registered()
    steer = steer_device(
        "okay-nabu",
        [(plan, pending)],
        [],
        me,
        complete={"1.0", "2.0"},
        serving="1.0",
        aborted={},
        now=T0 + 10,
    )
    assert steer.desired is None and steer.blocked == {"2.0"}
    assert steer.pinned == {("okay-nabu", "1.0"), ("okay-nabu", "2.0")} and not steer.unwanted
    assert plan.prefetch is PrefetchPolicy.LOW and steer.background == {("okay-nabu", "2.0")}  # prefetched
    in_wave = everyone_in(pending, 1)
    steer = steer_device(
        "okay-nabu", [(plan, in_wave)], [], me, complete={"1.0"}, serving="1.0", aborted={}, now=T0 + 10
    )
    assert steer.desired == "2.0" and "2.0" not in steer.blocked
    assert not steer.background  # to serve now: fetched at normal priority
    # An abort known from elsewhere wins, even before this site applied it.
    steer = steer_device(
        "okay-nabu",
        [(plan, in_wave)],
        [],
        me,
        complete={"1.0", "2.0"},
        serving="2.0",
        aborted={plan.rollout_id: "site b aborted it"},
        now=T0 + 10,
    )
    assert steer.desired == "1.0" and steer.blocked == {"2.0"} and ("okay-nabu", "2.0") in steer.unwanted
    assert not steer.background
    # Safe only (no leader reachable since a restart): back to a baseline, never onto a target.
    steer = steer_device(
        "okay-nabu",
        [(plan, in_wave)],
        [],
        me,
        complete={"1.0", "2.0"},
        serving="1.0",
        aborted={},
        now=T0 + 10,
        safe_only=True,
    )
    assert steer.desired is None and "2.0" in steer.blocked
    # ... nor after a restart that left it serving nothing: the target is neither resumed nor taken as newest.
    for resume in ("2.0", None):
        steer = steer_device(
            "okay-nabu",
            [(plan, in_wave)],
            [],
            me,
            complete={"1.0", "2.0"},
            serving=None,
            aborted={},
            now=T0 + 10,
            safe_only=True,
        )
        choice = choose_active(
            "okay-nabu",
            complete={"1.0", "2.0"},
            refused=set(),
            active=None,
            desired=steer.desired,
            blocked=steer.blocked,
            keep=True,
            resume=resume,
        )
        assert choice == Activate("okay-nabu", "1.0"), (resume, choice)
    # A plan held but not registered by this site yet: its target is blocked and pinned, nothing more.
    later = make_plan("okay-nabu-3", target="3.0", baseline="2.0", created_at=T0 + 50)
    steer = steer_device(
        "okay-nabu", [(plan, pending)], [later], me, complete={"3.0"}, serving=None, aborted={}, now=T0 + 60
    )
    assert {"2.0", "3.0"} <= steer.blocked and ("okay-nabu", "3.0") in steer.pinned
    # An abort the site has forgotten (its plan expired long ago): a device back from far away that still
    # serves the target goes back to the baseline, and the target is never taken as the newest.
    tomb = Tombstone("okay-nabu", "2.0", "1.0", "aborted", T0 + 5, plan.rollout_id, "gate failed")
    steer = steer_device(
        "okay-nabu",
        [],
        [],
        me,
        complete={"1.0", "2.0"},
        serving="2.0",
        aborted={},
        now=T0 + 10**7,
        tombstones=(tomb,),
    )
    assert steer.desired == "1.0" and steer.blocked == {"2.0"}
    choice = choose_active(
        "okay-nabu",
        complete={"1.0", "2.0"},
        refused=set(),
        active=None,
        desired=None,
        blocked=steer.blocked,
        keep=True,
        resume=None,
    )
    assert choice == Activate("okay-nabu", "1.0")
    # ... unless a rollout the site holds targets that version again.
    again = make_plan("okay-nabu-9", target="2.0", baseline="1.0", created_at=T0 + 10**6)
    steer = steer_device(
        "okay-nabu",
        [(again, everyone_in(new_rollout(again), 1))],
        [],
        me,
        complete={"1.0", "2.0"},
        serving="1.0",
        aborted={},
        now=T0 + 10**6 + 10,
        tombstones=(tomb,),
    )
    assert steer.desired == "2.0" and "2.0" not in steer.blocked
    # ... or names it as the baseline it falls back to.
    onwards = make_plan("okay-nabu-10", target="3.0", baseline="2.0", created_at=T0 + 10**6)
    steer = steer_device(
        "okay-nabu",
        [(onwards, registered(onwards)[1])],
        [],
        me,
        complete={"1.0", "2.0", "3.0"},
        serving="2.0",
        aborted={},
        now=T0 + 10**6 + 10,
        tombstones=(tomb,),
    )
    assert steer.desired is None and "2.0" not in steer.blocked  # pending: it keeps its baseline 2.0
    # A completed word on the version is no block at all.
    lifted = dataclasses.replace(tomb, outcome="completed")
    steer = steer_device(
        "okay-nabu",
        [],
        [],
        me,
        complete={"1.0", "2.0"},
        serving="2.0",
        aborted={},
        now=T0 + 10**7,
        tombstones=(lifted,),
    )
    assert steer.desired is None and not steer.blocked
    # Another model's rollouts ask nothing of this device.
    assert (
        steer_device(
            "other", [(plan, in_wave)], [], me, complete=(), serving=None, aborted={}, now=T0
        ).desired
        is None
    )


def test_a_device_the_skew_rule_excludes_keeps_the_baseline_and_does_not_fetch_the_target():
    plan, rollout = registered()
    old = device("dev-1", runtime="2.2.0")
    steer = steer_device(
        "okay-nabu",
        [(plan, everyone_in(rollout, 3))],
        [],
        old,
        complete={"1.0"},
        serving="1.0",
        aborted={},
        now=T0 + 10,
    )
    decision = steer.decisions[plan.rollout_id]
    assert steer.desired == "1.0" and decision.skip.kind is SkipKind.OLD_RUNTIME
    assert "runtime 2.2.0 is older than 2.3.0" in decision.reason
    assert ("okay-nabu", "2.0") in steer.unwanted


@pytest.mark.parametrize(
    ("desired", "keep", "blocked", "active", "complete", "expected"),
    [
        (None, False, set(), "1", {"1", "2"}, "2"),  # no rollout: the newest
        (None, True, set(), "1", {"1", "2"}, None),  # a site group member keeps what it serves
        (None, True, {"2"}, None, {"1", "2"}, "1"),  # ...starts with the newest allowed
        ("2", True, set(), "1", {"1"}, None),  # the target is not here yet: keep serving
        ("2", True, {"3"}, None, {"1", "3"}, "1"),  # serving nothing meanwhile: the newest allowed
        ("1", True, {"2"}, "2", {"1", "2"}, "1"),  # roll back
    ],
)
def test_activation_follows_the_steering(desired, keep, blocked, active, complete, expected):
    choice = choose_active(
        "m", complete, refused=set(), active=active, desired=desired, keep=keep, blocked=blocked
    )
    assert choice == (None if expected is None else Activate("m", expected))


# --- the first wave above the autonomous scope ---------------------------------------------------


def test_a_first_wave_above_scope_draws_its_cohort_and_waits_for_an_operator():
    plan = make_plan(plan_waves=waves(500_000, 1_000_000), autonomous_scope=AutonomousScope(100_000))
    ledger = RolloutLedger(site="a", trusted=TRUSTED)
    ledger.apply(plan_command(signed(plan), now=T0))
    nodes = [f"dev-{i}" for i in range(10)]
    from mesh.rollout.state import Start

    result = ledger.apply(encode_input(plan.rollout_id, Start(T0 + 1, tuple(nodes))))
    rollout = ledger.get(plan.rollout_id)[1]
    assert result.outcome is Outcome.APPLIED and (rollout.state, rollout.wave) == (
        RolloutState.WAITING_APPROVAL,
        0,
    )
    assert "mesh rollout approve okay-nabu-2 --wave 1" in rollout.reason
    assert (
        steer_device(
            "okay-nabu",
            [(plan, rollout)],
            [],
            device("dev-1"),
            complete={"1.0", "2.0"},
            serving="1.0",
            aborted={},
            now=T0 + 2,
        ).desired
        == "1.0"
    )
    approve = command(plan, CommandAction.APPROVE, wave=1, now=T0 + 2)
    ledger.apply(encode_input(plan.rollout_id, OperatorInput(T0 + 2, approve)))
    rollout = ledger.get(plan.rollout_id)[1]
    assert (rollout.state, rollout.wave) == (RolloutState.SOAKING, 1) and len(rollout.cohort(nodes)) == 5
    assert OPERATOR.key_id in {k for _, k in rollout.approved}


# --- the status report -------------------------------------------------------------------------------


def test_the_report_shows_each_wave_across_sites_and_what_it_waits_for():
    peers = [
        peer(
            "a1",
            "a",
            note=note(
                state=RolloutState.WAITING_APPROVAL,
                wave=2,
                first_wave=1,
                serving=Serving.TARGET,
                verdict=GateOutcome.PASS,
            ),
            health=NodeHealth((counters(40, 1),)),
        ),
        peer(
            "a2",
            "a",
            note=note(state=RolloutState.WAITING_APPROVAL, wave=2, first_wave=3),
            health=NodeHealth((counters(50, 0, version="1.0"),)),
        ),
        peer("b1", "b", note=note(state=RolloutState.SOAKING, wave=2, first_wave=2, serving=Serving.TARGET)),
        peer("b2", "b", note=note(state=RolloutState.SOAKING, wave=2, skip=SkipKind.LOW_DISK)),
        peer("b3", "b", note=note(first_wave=3), reachable=False),
    ]
    own = SiteRollout(PLAN.rollout_id, DIGEST, state=RolloutState.WAITING_APPROVAL, wave=2, reason="held")
    report = rollout_report(
        PLAN, site="a", node_id="a1", own=own, own_verdict=None, peers=peers, site_views={}, now=T0
    )
    assert report["state"] == "waiting_approval"
    assert [w["status"] for w in report["waves"]] == ["passed", "soaking", "held"]
    first, _, third = report["waves"]
    assert (first["eligible"], first["in_cohort"], first["on_target"]) == (3, 1, 1)
    assert (first["requests"], first["errors"], first["baseline_requests"]) == (40, 1, 50)
    assert "mesh rollout approve okay-nabu-2 --wave 3" in third["waiting_for"]
    assert report["skipped"] == [{"node_id": "b2", "kind": "low_disk"}] and report["unreachable"] == ["b3"]
    assert [s["source"] for s in report["sites"]] == ["this node's replica", "announced by b1"]


def test_the_report_marks_the_waves_the_site_ledger_holds():
    """ "Needs approval" as the ledger judges it: the fleet count recorded at the start (1% of 4 devices
    is one device, 25%: held) and the site's own [guard] rollout_max_share (5% narrows "up to 10%")."""
    soaking = note(state=RolloutState.SOAKING, wave=1, first_wave=1)
    peers = [peer(f"a{i}", "a", note=soaking) for i in range(4)]
    small = SiteRollout(PLAN.rollout_id, DIGEST, state=RolloutState.SOAKING, wave=1, fleet_eligible_count=4)
    big = SiteRollout(PLAN.rollout_id, DIGEST, state=RolloutState.SOAKING, wave=1, fleet_eligible_count=1000)

    def marks(own, max_share_ppm=None):
        report = rollout_report(
            PLAN,
            site="a",
            node_id="a0",
            own=own,
            own_verdict=None,
            peers=peers,
            site_views={},
            now=T0,
            max_share_ppm=max_share_ppm,
        )
        return [w["needs_approval"] for w in report["waves"]]

    assert marks(big) == [False, False, True]
    assert marks(small) == [True, True, True]
    assert marks(big, max_share_ppm=50_000) == [False, True, True]
    assert marks(None, max_share_ppm=50_000) == [True, True, True]  # not started: the 4 devices seen here


# --- the CLI's parsers ----------------------------------------------------------------------------------


@given(st.floats(0.001, 10**6), st.sampled_from(["", "s", "m", "h", "d"]))
def test_durations_parse_in_their_unit(value, unit):
    seconds = parse_duration_s(f"{value!r}{unit}")
    assert seconds == pytest.approx(value * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[unit])


@given(st.text(max_size=12))
def test_a_duration_is_positive_or_a_value_error(text):
    with contextlib.suppress(ValueError):
        assert parse_duration_s(text) > 0


def test_selectors_parse_and_name_the_mistake():
    assert parse_selector(("device_class=camera", "site=a,b")) == {
        "device_class": ("camera",),
        "site": ("a", "b"),
    }
    for bad, message in (("camera", "LABEL=VALUE"), ("=x", "LABEL=VALUE")):
        with pytest.raises(ValueError, match=message):
            parse_selector((bad,))
    with pytest.raises(ValueError, match="twice"):
        parse_selector(("site=a", "site=b"))


def test_a_member_falsely_declared_dead_does_not_make_site_leaders_apportion_differently():
    """Four sites of five; a 1% wave has one device. Seen alive, one leader of the four would seat it
    in one site; seen dead a moment ago by another leader, the seat would move: each leader would
    leave it to another site and no site would take it (a `make test` run under load paused a
    rollout that way). Counted as present for DEAD_PRESENT_GRACE_S, both apportion alike."""
    sizes = {"amsterdam": 5, "berlin": 5, "chicago": 5, "denver": 5}

    def view(dead_for_s):
        out = []
        for s, n in sizes.items():
            for i in range(n):
                gone = s == "berlin" and i == 0
                live = not gone or dead_for_s is None
                out.append(
                    peer(
                        f"{s}-{i}",
                        s,
                        note=note(),
                        reachable=live,
                        present=member_present(live, dead_for_s if gone else None),
                    )
                )
        return out

    healthy, flapped = view(None), view(2.0)
    for site in sizes:
        assert start_input(PLAN, site, healthy, T0).sizes == start_input(PLAN, site, flapped, T0).sizes, site
    seats = [start_input(PLAN, s, flapped, T0).sizes[0] for s in sizes]
    assert sum(seats) == wave_size(PLAN.waves[0].share_ppm, 20)
    # Dead for longer: a departed device, no longer counted.
    assert not member_present(False, DEAD_PRESENT_GRACE_S + 1)
    gone = view(DEAD_PRESENT_GRACE_S + 1)
    assert sum(len(v) for v in site_populations(PLAN, gone).values()) == 19
