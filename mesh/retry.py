"""One back-off policy for every retry a shell makes (joining a group, claiming streams, a
transient read), so retry pacing is decided in one place and tested once.

`Backoff` is pure: it takes an injected `random.Random` for jitter and says how long to wait
before the next attempt. `retry` is the asyncio driver that shells use.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")


@dataclass
class Backoff:
    """Exponential back-off with jitter: first_s, then doubling up to max_s.

    Jitter spreads retries of nodes that failed together (a group that lost its leader) so
    they do not come back in lockstep: each delay is drawn from [delay * (1 - jitter), delay].
    """

    first_s: float = 0.1
    max_s: float = 5.0
    factor: float = 2.0
    jitter: float = 0.5
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    _next_s: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        if not 0 < self.first_s <= self.max_s:
            raise ValueError(f"back-off needs 0 < first_s ({self.first_s}) <= max_s ({self.max_s})")
        if self.factor < 1 or not 0 <= self.jitter < 1:
            raise ValueError(f"back-off needs factor >= 1 and 0 <= jitter < 1, "
                             f"got {self.factor}, {self.jitter}")
        self._next_s = self.first_s

    def next_delay_s(self) -> float:
        """The wait before the next attempt; each call doubles the following one (up to max_s)."""
        delay = self._next_s
        self._next_s = min(self.max_s, self._next_s * self.factor)
        return delay * (1 - self.jitter * self.rng.random())

    def reset(self) -> None:
        """The operation succeeded: the next failure starts again from first_s."""
        self._next_s = self.first_s


async def retry(attempt: Callable[[], Awaitable[T]], *, retry_on: tuple[type[BaseException], ...],
                backoff: Backoff, what: str, log: logging.Logger) -> T:
    """Run `attempt` until it returns; exceptions in `retry_on` are logged and retried after the
    back-off's delay, anything else propagates. Cancel the calling task to give up."""
    while True:
        try:
            return await attempt()
        except retry_on as exc:
            delay_s = backoff.next_delay_s()
            log.warning("%s failed (%s); retrying in %.1fs", what, exc, delay_s)
            await asyncio.sleep(delay_s)  # the back-off's pacing, not synchronisation
