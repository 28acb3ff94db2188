"""`transport.coalesce`: the messages of one release, fewer of them, with the same effect on every peer;
`transport.NoticeHolder`: a leader's commit notices held for the next frame to the same member."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pysyncobj.poller import createPoller

from mesh.consensus.transport import GrpcTransport, MemberNode, NoticeHolder, RaftLink, coalesce
from mesh.consensus.wire import decode_message


def append(prev: int, prev_term: int, entries: list[tuple[int, int]], commit: int, term: int = 2) -> dict:
    return {
        "type": "append_entries",
        "term": term,
        "commit_index": commit,
        "prevLogIdx": prev,
        "prevLogTerm": prev_term,
        "entries": [(b"cmd-%d" % i, i, t) for i, t in entries],
    }


def ack(next_idx: int, success: bool = True, reset: bool = False) -> dict:
    return {"type": "next_node_idx", "next_node_idx": next_idx, "success": success, "reset": reset}


def test_single_entry_appends_to_one_follower_become_one_message():
    sent = [("b", append(9 + i, 2, [(10 + i, 2)], commit=8 + i)) for i in range(16)]
    [(node, merged)] = coalesce(sent, max_entries=16)
    assert node == "b" and merged["prevLogIdx"] == 9 and merged["prevLogTerm"] == 2
    assert [e[1] for e in merged["entries"]] == list(range(10, 26)) and merged["commit_index"] == 23
    assert sent[0][1]["entries"] == [(b"cmd-10", 10, 2)]  # the messages pysyncobj built are left alone


def test_each_peer_keeps_its_order_and_other_messages_stay_where_they_are():
    sent = [
        ("b", append(9, 2, [(10, 2)], 8)),
        ("c", append(9, 2, [(10, 2)], 8)),
        ("b", {"type": "apply_command_response", "request_id": 1, "log_idx": 10, "log_term": 2}),
        ("b", append(10, 2, [(11, 2)], 9)),
        ("c", append(10, 2, [(11, 2)], 9)),
    ]
    out = coalesce(sent)
    assert [(n, m["type"]) for n, m in out] == [
        ("b", "append_entries"),
        ("c", "append_entries"),
        ("b", "apply_command_response"),
        ("b", "append_entries"),
    ]
    assert [e[1] for e in out[1][1]["entries"]] == [10, 11]


def test_a_heartbeat_merges_with_the_append_that_continues_it():
    out = coalesce(
        [("b", append(9, 2, [], 7)), ("b", append(9, 2, [(10, 2)], 8)), ("b", append(10, 2, [], 10))]
    )
    assert len(out) == 1 and out[0][1]["prevLogIdx"] == 9 and out[0][1]["commit_index"] == 10
    assert [e[1] for e in out[0][1]["entries"]] == [10]


def test_what_does_not_continue_is_not_merged():
    cases = [
        [append(9, 2, [(10, 2)], 8), append(12, 2, [(13, 2)], 8)],  # a gap
        [append(9, 2, [(10, 2), (11, 2)], 8), append(10, 2, [(11, 2)], 8)],  # resent overlap
        [append(9, 2, [(10, 2)], 8), append(10, 1, [(11, 2)], 8)],  # prevLogTerm differs
        [append(9, 2, [(10, 2)], 8, term=2), append(10, 2, [(11, 3)], 8, term=3)],  # a new term
        [append(9, 2, [(10, 2)], 8), {**append(10, 2, [], 8), "transmission": "start", "data": b"x"}],
        [
            append(9, 2, [(10, 2)], 8),
            {"type": "append_entries", "term": 2, "commit_index": 8, "serialized": None},
        ],
        [ack(11, success=False, reset=True), ack(12)],
        [ack(12), ack(11)],
    ]
    for messages in cases:
        assert len(coalesce([("b", m) for m in messages])) == 2, messages


def test_successful_acks_become_the_last_one():
    assert coalesce([("a", ack(11)), ("a", ack(12)), ("a", ack(14))]) == [("a", ack(14))]


def test_a_merged_append_holds_at_most_max_entries():
    sent = [("b", append(9 + i, 2, [(10 + i, 2)], 8)) for i in range(10)]
    assert [len(m["entries"]) for _, m in coalesce(sent, max_entries=4)] == [4, 4, 2]


def test_merging_stops_at_the_byte_budget():
    sent = [("b", append(9 + i, 2, [(10 + i, 2)], 8)) for i in range(10)]
    out = coalesce(sent, max_entry_bytes=3 * len(b"cmd-10"))
    assert [len(m["entries"]) for _, m in out] == [3, 3, 3, 1]


# --- the property: a follower ends in the same state ----------------------------------------------------


def follower(messages: list[dict]) -> tuple[dict[int, int], int, list[bool]]:
    """Raft's receiver of append_entries (log index -> term, commit index, and the reply to each)."""
    log: dict[int, int] = {}
    commit = 0
    replies = []
    for m in messages:
        if m["prevLogIdx"] > 0 and log.get(m["prevLogIdx"]) != m["prevLogTerm"]:
            replies.append(False)
            continue
        for _, idx, term in m["entries"]:
            if log.get(idx, term) != term:
                for stale in [i for i in log if i >= idx]:
                    del log[stale]
            log[idx] = term
        last_new = m["entries"][-1][1] if m["entries"] else m["prevLogIdx"]
        commit = max(commit, min(m["commit_index"], last_new))
        replies.append(True)
    return log, commit, replies


@st.composite
def appends(draw) -> list[dict]:
    """Slices of a leader's log (terms non-decreasing), in the order a leader might send them, with its
    commit index (which never goes back)."""
    terms = draw(st.lists(st.integers(1, 3), min_size=1, max_size=30).map(sorted))
    count_messages = draw(st.integers(1, 25))
    commits = sorted(
        draw(st.lists(st.integers(0, len(terms)), min_size=count_messages, max_size=count_messages))
    )
    out = []
    for commit in commits:
        start = draw(st.integers(0, len(terms)))
        count = draw(st.integers(0, len(terms) - start))
        prev_term = terms[start - 1] if start else 0
        entries = [(i + 1, terms[i]) for i in range(start, start + count)]
        out.append(append(start, prev_term, entries, commit=commit, term=max(terms)))
    return out


@settings(max_examples=300, deadline=None)
@given(appends())
def test_a_follower_reaches_the_same_log_and_commit_index(messages):
    merged = [m for _, m in coalesce([("b", m) for m in messages])]
    log, commit, replies = follower(messages)
    log_merged, commit_merged, replies_merged = follower(merged)
    assert (log_merged, commit_merged) == (log, commit)
    assert len(merged) <= len(messages)
    # The last reply (what the leader ends up knowing) is the same.
    assert replies_merged[-1] == replies[-1]


# --- commit notices held for the next frame -----------------------------------------------------------------

HOLD = 0.01


def notice(prev: int, commit: int, term: int = 2) -> dict:
    """What a pysyncobj leader sends each follower once it applies `commit`: no entries, the commit index."""
    return append(prev, 2, [], commit=commit, term=term)


def test_a_notice_right_after_an_append_goes_out_with_the_next_append():
    holder = NoticeHolder(HOLD)
    assert holder.release([("b", append(9, 2, [(10, 2)], 9))], now=1.0) == [("b", append(9, 2, [(10, 2)], 9))]
    assert holder.release([("b", notice(10, 10))], now=1.003) == []  # held
    [(node, sent)] = holder.release([("b", append(10, 2, [(11, 2)], 10))], now=1.005)
    assert node == "b" and sent["prevLogIdx"] == 10 and sent["commit_index"] == 10
    assert [e[1] for e in sent["entries"]] == [11]  # one frame, one answer, where there were two of each
    assert holder.held == []


def test_a_held_notice_leaves_alone_once_the_hold_has_passed():
    holder = NoticeHolder(HOLD)
    holder.release([("b", append(9, 2, [(10, 2)], 9))], now=1.0)
    assert holder.release([("b", notice(10, 10))], now=1.002) == []
    assert holder.release([], now=1.009) == []  # a tick with nothing to send: still within the hold
    assert holder.release([], now=1.0101) == [("b", notice(10, 10))]
    assert holder.held == []


def test_a_heartbeat_after_silence_and_a_first_notice_leave_at_once():
    holder = NoticeHolder(HOLD)
    assert holder.release([("b", notice(10, 10))], now=1.0) == [("b", notice(10, 10))]  # nothing sent before
    assert holder.release([("b", notice(10, 10))], now=1.06) == [("b", notice(10, 10))]  # a heartbeat


def test_members_are_held_apart_and_other_messages_are_never_held():
    holder = NoticeHolder(HOLD)
    holder.release([("b", append(9, 2, [(10, 2)], 9)), ("c", append(9, 2, [(10, 2)], 9))], now=1.0)
    vote = {"type": "response_vote", "term": 2}
    out = holder.release([("b", notice(10, 10)), ("c", notice(10, 10)), ("c", vote)], now=1.001)
    # c's notice shares the release with another frame to c: it costs no write of its own, it leaves.
    assert out == [("c", notice(10, 10)), ("c", vote)] and holder.held == [("b", notice(10, 10))]
    # b's held notice leaves in front of what is sent to b next, and merges with it.
    assert holder.release([("b", vote)], now=1.002) == [("b", notice(10, 10)), ("b", vote)]
    assert holder.release([("b", {"type": "next_node_idx", "next_node_idx": 5, "success": True,
                                  "reset": False})], now=1.003)[0][1]["type"] == "next_node_idx"


def test_a_member_that_forwarded_a_command_hears_of_its_commit_at_once():
    holder = NoticeHolder(HOLD)
    holder.release([("b", append(9, 2, [(10, 2)], 9))], now=1.0)
    holder.forwarded("b", 10)  # b forwarded the command the leader appended at 10: b's caller waits
    assert holder.release([("b", notice(10, 10))], now=1.002) == [("b", notice(10, 10))]
    # Told: b's next notices may be held again.
    assert holder.release([("b", notice(10, 11))], now=1.003) == []
    # Another forwarded command, not yet committed by the notice: sent anyway until b is told.
    holder.forwarded("b", 12)
    holder.release([("b", append(10, 2, [(11, 2), (12, 2)], 11))], now=1.004)
    assert holder.release([("b", notice(12, 12))], now=1.005) == [("b", notice(12, 12))]


def test_without_a_hold_nothing_is_held():
    holder = NoticeHolder(0.0)
    holder.release([("b", append(9, 2, [(10, 2)], 9))], now=1.0)
    assert holder.release([("b", notice(10, 10))], now=1.0) == [("b", notice(10, 10))]


@settings(max_examples=300, deadline=None)
@given(appends(), st.lists(st.floats(0.0, 0.03), min_size=25, max_size=25), st.data())
def test_held_notices_change_no_follower_state_and_are_never_held_past_the_hold(messages, gaps, data):
    """Releases of the same messages at random times: the follower ends where it would without holding,
    and at every release a held notice is for a member sent a frame within the hold."""
    holder = NoticeHolder(HOLD)
    sent: list[dict] = []
    now = 1.0
    last_sent = -1.0
    queue = list(messages)
    for gap in gaps:
        take = data.draw(st.integers(0, len(queue)))
        batch, queue = queue[:take], queue[take:]
        now += gap
        out = holder.release([("b", m) for m in batch], now)
        if out:
            last_sent = now
        sent += [m for _, m in out]
        assert not holder.held or now - last_sent < HOLD  # held only right after a frame went out
    sent += [m for _, m in holder.release([("b", m) for m in queue], now + 1.0)]
    sent += [m for _, m in holder.release([], now + 2.0)]
    assert holder.held == []
    log, commit, _ = follower(messages)
    assert follower(sent)[:2] == (log, commit)
    assert len(sent) <= len(messages)


class _StandInSyncObj:
    """What GrpcTransport asks of a SyncObj (a poller for its wake-up pipe, tick callbacks): this test is
    about the transport's wiring, not pysyncobj."""

    def __init__(self) -> None:
        self._poller = createPoller("auto")
        self.callbacks: list = []

    def addOnTickCallback(self, callback) -> None:  # noqa: N802 - pysyncobj's name
        self.callbacks.append(callback)

    def removeOnTickCallback(self, callback) -> None:  # noqa: N802 - pysyncobj's name
        self.callbacks.remove(callback)


@pytest.mark.asyncio
async def test_the_transport_holds_notices_by_its_clock_and_never_for_a_member_that_forwarded():
    """GrpcTransport's wiring of NoticeHolder: the clock it was built with, and apply_command_response
    with a log index (a command that member forwarded) noted as it is sent."""
    link = RaftLink(group="g", node_id="a", dial=lambda peer: None)
    sent: list[tuple[str, dict]] = []
    link._send = lambda batch: sent.extend((n, decode_message(f)) for n, f in batch)  # type: ignore[method-assign]
    now = [1.0]
    b = MemberNode("b")
    transport = GrpcTransport(_StandInSyncObj(), MemberNode("a"), [b], link=link, hold_s=HOLD,
                              clock=lambda: now[0])
    transport._connected.add("b")  # as if its stream were up

    async def release(at: float) -> list[dict]:
        now[0] = at
        transport._release()
        await asyncio.sleep(0)  # the batch reaches the link through the loop
        out = [m for _, m in sent]
        sent.clear()
        return out

    try:
        transport.send(b, append(9, 2, [(10, 2)], 9))
        assert [m["entries"] for m in await release(1.0)] == [[(b"cmd-10", 10, 2)]]
        transport.send(b, notice(10, 10))
        assert await release(1.002) == []  # held
        assert await release(1.011) == [notice(10, 10)]  # by the transport's clock, not the wall's

        # b forwards a command; the leader appends it at 11 and answers b with the index.
        transport.send(b, {"type": "apply_command_response", "request_id": 1, "log_idx": 11, "log_term": 2})
        transport.send(b, append(10, 2, [(11, 2)], 10))
        assert len(await release(1.012)) == 2
        transport.send(b, notice(11, 11))
        assert await release(1.013) == [notice(11, 11)]  # b waits for this commit: it leaves at once
        transport.send(b, notice(11, 11))
        assert await release(1.014) == []  # told: held again
    finally:
        transport.destroy()
        await link.close()
