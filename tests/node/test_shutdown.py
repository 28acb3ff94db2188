"""A node's stop ends every background task, even one whose cancellation Python 3.11's
`asyncio.wait_for` swallowed (it returns normally when its wait ends in the same loop turn as the
cancellation); a loop around such a wait then runs on, and the stop hung on it (seen in a loaded run:
"stopping: background tasks took 265.8 s", and the demo's "node did not stop cleanly")."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import types

import pytest

from mesh.node.runtime import _cancel_all
from mesh.node.streams import StreamReassigner

pytestmark = pytest.mark.asyncio


async def _woken_and_cancelled_in_one_turn(task: asyncio.Task, wake: asyncio.Event) -> None:
    await asyncio.sleep(0.01)  # the task waits on `wake`
    wake.set()
    task.cancel()  # same loop turn as the wake-up


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="3.12 rebuilt wait_for on asyncio.timeout")
async def test_wait_for_in_this_python_swallows_a_cancellation_that_meets_the_end_of_its_wait():
    wake = asyncio.Event()
    rounds = 0

    async def loop_around_wait_for() -> None:
        nonlocal rounds
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), 5.0)
            wake.clear()
            rounds += 1

    task = asyncio.create_task(loop_around_wait_for())
    await _woken_and_cancelled_in_one_turn(task, wake)
    await asyncio.sleep(0.05)
    assert not task.done() and rounds == 1, "the cancellation was not swallowed: this guard is moot"
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_the_stream_reconcile_loop_ends_when_cancelled_as_it_wakes():
    rounds = []

    async def reconcile_once() -> None:
        rounds.append(1)

    shell = types.SimpleNamespace(_wake=asyncio.Event(), _next_return_at=None, reconcile_once=reconcile_once)
    task = asyncio.create_task(StreamReassigner.reconcile(shell, interval_s=5.0))  # type: ignore[arg-type]
    try:
        await _woken_and_cancelled_in_one_turn(task, shell._wake)
        done, _ = await asyncio.wait({task}, timeout=1.0)
        assert task in done and task.cancelled(), f"still running after {len(rounds)} rounds"
    finally:
        task.cancel()  # a failure must not leave it running on the session's loop
        await asyncio.gather(task, return_exceptions=True)


async def test_a_task_that_swallows_its_cancellation_is_cancelled_again_and_named(caplog):
    caplog.set_level(logging.WARNING, logger="mesh.node")

    async def stubborn() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(60)
        await asyncio.sleep(60)  # carries on as if nothing happened

    polite = asyncio.create_task(asyncio.sleep(60), name="polite")
    task = asyncio.create_task(stubborn(), name="stubborn")
    await asyncio.sleep(0.01)
    await asyncio.wait_for(_cancel_all([polite, task], recancel_s=0.05), 5.0)
    assert polite.cancelled() and task.cancelled()
    assert "task stubborn did not end when cancelled; cancelling it again" in caplog.text
    assert "polite" not in caplog.text


async def test_a_task_that_never_ends_is_left_behind_with_where_it_stands(caplog):
    caplog.set_level(logging.WARNING, logger="mesh.node")
    listening = False

    async def deaf() -> None:
        while not listening:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(60)

    task = asyncio.create_task(deaf(), name="deaf")
    done = asyncio.create_task(asyncio.sleep(0), name="done")
    await asyncio.sleep(0.01)
    try:
        await asyncio.wait_for(_cancel_all([task, done], recancel_s=0.02, attempts=3), 5.0)
        assert "task deaf still runs after 3 cancellations (at " in caplog.text
        assert caplog.text.count("cancelling it again") == 2 and not task.done()
    finally:
        listening = True  # end it for good: the next cancellation is heard
        task.cancel()
        await asyncio.wait({task}, timeout=1.0)
