"""Site summaries for the federation pool (pure core), with hypothesis: what a site tells the others,
the newest-wins table every federation member converges on, the bounded codec, and a member of one
site that tries to speak for another."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.membership.summary import (
    MAX_SEQ_STEP,
    MemberFacts,
    SiteSummary,
    SummaryError,
    accept,
    decode,
    encode,
    fleet_health,
    fleet_holders,
    merge,
    next_seq,
    publish,
    summarize,
)

REPS = (("cam-01", "10.0.0.1:7000"), ("cam-02", "[fd00::2]:7000"))


def summary(site="amsterdam", seq=1, author="cam-01", **kw) -> SiteSummary:
    return SiteSummary(site=site, seq=seq, author=author, members=kw.pop("members", 3),
                       representatives=kw.pop("representatives", REPS), **kw)


def test_a_site_is_summed_up_from_its_members_facts():
    members = [
        MemberFacts("cam-01", frozenset({("hand", "1.0"), ("hand", "2.0")}), {("hand", "2.0"): (100, 3)}),
        MemberFacts("cam-02", frozenset({("hand", "1.0")}), {("hand", "1.0"): (50, 0)}),
        MemberFacts("cam-03", frozenset({("hand", "1.0")}), {("hand", "2.0"): (20, 1)}),
    ]
    s = summarize("amsterdam", members, author="cam-01", seq=4, representatives=REPS,
                  rollouts=[("hand-2", "soaking", 1)])
    assert s.members == 3 and s.versions == (("hand", "1.0", 3), ("hand", "2.0", 1))
    assert s.health == (("hand", "1.0", 50, 0), ("hand", "2.0", 120, 4))
    assert decode(encode(s)) == s
    other = summarize("berlin", members[:1], author="b-1", seq=1, representatives=[("b-1", "10.1.0.1:7000")])
    table = merge(merge({}, s), other)
    assert fleet_holders(table, "hand", "2.0") == {"amsterdam": 1, "berlin": 1}
    assert fleet_health(table, "hand", "2.0") == (220, 7)
    assert fleet_health(table, "hand", "2.0", besides="amsterdam") == (100, 3)
    assert next_seq(table, "amsterdam") == 5 and next_seq(table, "chicago") == 1


names = st.text("abcdefgh0123456789", min_size=1, max_size=6)
counts = st.integers(0, 1 << 20)


@st.composite
def summaries(draw, site=None) -> SiteSummary:
    reps = sorted(draw(st.dictionaries(names, st.sampled_from(["10.0.0.1:7000", "[::1]:7001"]), min_size=1,
                                       max_size=3)).items())
    health = []
    for (m, v), r in sorted(draw(st.dictionaries(st.tuples(names, names), counts, max_size=5)).items()):
        health.append((m, v, r, draw(st.integers(0, r))))
    versions = tuple(sorted((m, v, n) for (m, v), n in draw(st.dictionaries(st.tuples(names, names), counts,
                                                                             max_size=5)).items()))
    return SiteSummary(
        site=site or draw(st.sampled_from(["amsterdam", "berlin", "chicago"])),
        seq=draw(st.integers(0, 50)),
        author=draw(st.sampled_from([n for n, _ in reps])),
        members=max([draw(counts), *(n for _, _, n in versions)]),
        versions=versions,
        rollouts=tuple(sorted((r, s, w) for r, (s, w) in draw(st.dictionaries(
            names, st.tuples(st.sampled_from(["soaking", "paused", "aborted"]), st.integers(0, 9)), max_size=3
        )).items())),
        health=tuple(health),
        representatives=tuple(reps),
    )


@settings(max_examples=200, deadline=None)
@given(st.lists(summaries(), max_size=8), st.randoms(use_true_random=False))
def test_every_member_keeps_the_same_newest_summary_whatever_order_gossip_brings(items, rng):
    def fold(order):
        table: dict = {}
        for s in order:
            table = merge(table, s)
        return table

    shuffled = list(items) * 2  # duplicates: idempotent
    rng.shuffle(shuffled)
    expected = fold(items)
    assert fold(shuffled) == expected
    for site, kept in expected.items():
        assert kept.order == max(s.order for s in items if s.site == site)
        assert kept.order[:2] == max(s.order[:2] for s in items if s.site == site)


@settings(max_examples=200, deadline=None)
@given(summaries(), st.integers(300, 4000))
def test_the_codec_is_canonical_and_bounded(s, limit):
    data = encode(s)
    assert decode(data) == s and encode(decode(data)) == data
    try:
        small = encode(s, limit)
    except SummaryError as exc:
        assert "does not fit" in str(exc)
        return
    assert len(small) <= limit
    kept = decode(small, limit)
    # Only entries are ever dropped, and it says how many; the site and who speaks for it stay.
    assert (kept.site, kept.seq, kept.author, kept.representatives) == (
        s.site, s.seq, s.author, s.representatives
    )
    dropped = (len(s.health) - len(kept.health) + len(s.versions) - len(kept.versions)
               + len(s.rollouts) - len(kept.rollouts))
    assert kept.dropped == s.dropped + dropped
    assert set(kept.health) <= set(s.health) and set(kept.versions) <= set(s.versions)
    if kept.versions != s.versions:
        assert not kept.health, "versions went before health"


def test_health_goes_first_then_the_versions_fewest_devices_hold():
    s = summary(
        members=40,
        versions=tuple(sorted((f"m{i}", "1.0", i) for i in range(1, 40))),
        health=tuple(sorted((f"m{i}", "1.0", 10, 1) for i in range(1, 40))),
        rollouts=(("m1-2", "soaking", 1),),
    )
    full = len(encode(s))
    kept = decode(encode(s, full - 200), full)
    assert kept.versions == s.versions and len(kept.health) < len(s.health)
    kept = decode(encode(s, 700), 700)
    assert kept.health == () and kept.rollouts == s.rollouts and len(kept.versions) < len(s.versions)
    assert {n for _, _, n in kept.versions} == set(range(40 - len(kept.versions), 40)), "the most held stay"


@given(st.binary(max_size=600))
def test_any_bytes_decode_or_are_refused_with_a_summary_error(data):
    with contextlib.suppress(SummaryError):
        decode(data)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(format=2), "format '2' is not known"),
        (lambda d: d.update(extra=1), "unknown ['extra']"),
        (lambda d: d.update(seq=-1), "site summary.seq"),
        (lambda d: d.update(seq=1.0), "site summary.seq"),
        (lambda d: d.update(health=[["hand", "1.0", 1, 2]]), "2 errors in 1 requests"),
        (lambda d: d.update(versions=[["hand", "2.0", 1], ["hand", "1.0", 1]]), "sorted and distinct"),
        (lambda d: d.update(representatives=[]), "no representative"),
        (lambda d: d.update(site="../etc"), "is not a name"),
        (lambda d: d.update(rollouts=[["r", "paused", 2], ["r", "soaking", 1]]), "one entry per key"),
    ],
)
def test_malformed_summaries_are_refused_naming_the_field(change, message):
    doc = json.loads(encode(summary(health=(("hand", "1.0", 5, 0),))))
    change(doc)
    with pytest.raises(SummaryError, match=re.escape(message)):
        decode(json.dumps(doc, separators=(",", ":"), sort_keys=True).encode())


def test_a_summary_spelt_differently_is_refused():
    data = encode(summary())
    spaced = json.dumps(json.loads(data), indent=1).encode()
    with pytest.raises(SummaryError, match="canonical"):
        decode(spaced)


def test_a_member_of_one_site_cannot_speak_for_another():
    table = merge({}, summary(seq=3))
    reps = {"cam-01", "cam-02"}  # who this member's federation view lists for amsterdam
    forged = encode(summary(site="amsterdam", seq=99, author="b-1",
                            representatives=(("b-1", "10.1.0.1:7000"),), members=1))
    with pytest.raises(SummaryError, match="b-1 of site berlin signed a summary of site amsterdam"):
        accept(table, forged, signed_by="b-1", signer_site="berlin", representatives={"b-1"})
    with pytest.raises(SummaryError, match="names author cam-01 but is signed by cam-02"):
        accept(table, encode(summary(seq=9)), signed_by="cam-02", signer_site="amsterdam",
               representatives=reps)
    # A member of the site that names itself a representative is not one for that.
    self_named = encode(summary(seq=9, author="cam-09", representatives=REPS + (("cam-09", "10.0.0.9:1"),)))
    with pytest.raises(SummaryError, match="cam-09 is not a representative of site amsterdam"):
        accept(table, self_named, signed_by="cam-09", signer_site="amsterdam", representatives=reps)
    # Nor may a representative number its summary out of the others' reach.
    far = encode(summary(seq=3 + MAX_SEQ_STEP + 1, author="cam-02"))
    with pytest.raises(SummaryError, match="jumps more than"):
        accept(table, far, signed_by="cam-02", signer_site="amsterdam", representatives=reps)
    assert table["amsterdam"].seq == 3  # nothing taken
    mine = encode(summary(seq=4, author="cam-02"))
    newer = accept(table, mine, signed_by="cam-02", signer_site="amsterdam", representatives=reps)
    assert newer["amsterdam"].order[:2] == (4, "cam-02")


def test_a_representative_keeps_what_the_others_decode():
    big = summary(health=tuple(sorted((f"m{i}", "1.0", 10, 1) for i in range(60))))
    data, mine = publish({}, big, 800)
    theirs = accept({}, data, signed_by="cam-01", signer_site="amsterdam", representatives={"cam-01"})
    assert mine == theirs and mine["amsterdam"].dropped > 0
    odd = MemberFacts("cam-01", health={("m", "1"): (1, 5)})
    assert summarize("amsterdam", [odd], author="cam-01", seq=1, representatives=REPS).health == (), (
        "one device's impossible counters are left out"
    )


def test_two_representatives_writing_at_once_agree_on_one():
    a = summary(seq=5, author="cam-01", members=3)
    b = summary(seq=5, author="cam-02", members=4)
    for first, second in itertools.permutations([a, b]):
        assert merge(merge({}, first), second)["amsterdam"] == b
    assert a.same_content(dataclasses.replace(a, seq=7)) and not a.same_content(b)
    # One author, one seq, two contents (it restarted and lost count): still one choice everywhere.
    c = dataclasses.replace(b, members=9)
    assert merge(merge({}, b), c) == merge(merge({}, c), b)
