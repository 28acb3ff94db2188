"""A member's outgoing Raft stream to a peer outlives whatever ends one stream: the peer task dials again.

Seen under load: a leader's stream to a member that stopped ended with a write racing the end of the
call (grpc.aio raises asyncio.InvalidStateError, "RPC already finished"). The exception escaped the
peer's task, which ended for good, silently; the leader never streamed to that member again, and the
member, back from a restart, never caught up (PreVote rightly kept it from deposing the leader).
The call here is a stand-in: what is tested is the link's task, not gRPC.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from mesh._proto import raft_pb2 as pb
from mesh.consensus.transport import RaftLink
from mesh.node.local import wait_for

pytestmark = pytest.mark.asyncio


class _Call:
    """One outgoing stream: a hello, then nothing until cancelled; its writes fail as `write_error` says."""

    def __init__(self, write_error: BaseException | None) -> None:
        self.write_error = write_error
        self.hello_sent = False
        self.cancelled = asyncio.Event()
        self.written = 0

    async def read(self):
        if not self.hello_sent:
            self.hello_sent = True
            return pb.RaftHello(group="g", node_id="b")
        await self.cancelled.wait()
        raise asyncio.CancelledError

    async def write(self, batch) -> None:
        if self.write_error is not None:
            raise self.write_error
        self.written += len(batch.frames)

    def cancel(self) -> bool:
        self.cancelled.set()
        return True


class _Stub:
    def __init__(self, errors: list[BaseException | None]) -> None:
        self.errors = errors
        self.calls: list[_Call] = []

    def Exchange(self, metadata=()):  # noqa: N802 - gRPC's method name
        call = _Call(self.errors[len(self.calls)] if len(self.calls) < len(self.errors) else None)
        self.calls.append(call)
        return call


@pytest.mark.parametrize(
    "error",
    [asyncio.InvalidStateError("RPC already finished."), RuntimeError("anything else")],
    ids=["write-after-the-end", "unexpected"],
)
async def test_a_stream_that_ends_under_a_write_is_dialled_again(error):
    stub = _Stub([error])
    link = RaftLink(group="g", node_id="a", dial=lambda peer: stub, rng=random.Random(1))
    link.members = frozenset({"a", "b"})
    link._add_peer("b")
    try:
        await wait_for(lambda: link.connected().get("b") is True, 5, "the first stream up")
        link._send([("b", b"frame-1")])  # its write fails: that stream is over
        await wait_for(lambda: len(stub.calls) == 2, 5, "a second stream dialled")
        await wait_for(lambda: link.connected().get("b") is True, 5, "the second stream up")
        link._send([("b", b"frame-2")])
        await wait_for(lambda: stub.calls[1].written == 1, 5, "a frame through the second stream")
        assert not link._peers["b"].task.done()
    finally:
        await link.close()
