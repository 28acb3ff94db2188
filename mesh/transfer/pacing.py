"""Byte-rate caps on the event loop: the asyncio side of the pure TokenBucket."""

from __future__ import annotations

import asyncio

from mesh.transfer.ratelimit import TokenBucket


class Pacer:
    """`await pace(n)` before moving n bytes; with no rate set it never waits.

    The wait is the pacing itself (the bucket says how long until n bytes are
    allowed), not synchronisation with another task.
    """

    def __init__(self, rate_bytes_per_s: float | None, burst_bytes: int | None = None) -> None:
        self.rate_bytes_per_s = rate_bytes_per_s
        self._bucket: TokenBucket | None = None
        if rate_bytes_per_s:
            loop_time = asyncio.get_running_loop().time
            self._now = loop_time
            # A burst of a quarter second's worth (at least one piece) keeps the
            # stream smooth without letting a whole chunk through unpaced.
            burst = burst_bytes or max(64 * 1024, int(rate_bytes_per_s / 4))
            self._bucket = TokenBucket(rate_bytes_per_s, burst, loop_time())

    async def pace(self, n_bytes: int) -> None:
        if self._bucket is None:
            return
        wait_s = self._bucket.reserve(n_bytes, self._now())
        if wait_s > 0:
            await asyncio.sleep(wait_s)
