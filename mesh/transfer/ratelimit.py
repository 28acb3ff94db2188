"""Bandwidth caps and upload slots for chunk transfer, without clocks.

`TokenBucket` caps a byte rate. It is debt-based: a reservation may exceed the
tokens held (a 256 KiB chunk through a 64 KiB burst), the balance goes
negative, and the caller waits the returned time before (or while) moving the
bytes. Reservations are therefore served in the order they were made, which
is what a node wants for its upload queue: one chunk finishes early and can
be re-shared, instead of all of them finishing late together.

`UploadSlots` caps how many uploads a node serves at once; a request beyond
the cap is refused (the requester backs off and asks elsewhere or later).

Pure: every method takes `now` (monotonic seconds) where time matters.
"""

from __future__ import annotations

import math

__all__ = ["RateLimitError", "TokenBucket", "UploadSlots"]


class RateLimitError(ValueError):
    """A bandwidth cap or slot count is not usable; the text says which value and why."""


def _check_positive(value: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value <= 0:
        raise RateLimitError(f"{what} must be a positive finite number, got {value!r}")
    return float(value)


class TokenBucket:
    """A byte-rate cap: `rate_bytes_per_s` sustained, up to `burst_bytes` at once.

    The bucket starts full. Time that goes backwards is treated as no time
    passing (callers pass a monotonic clock; the bucket does not trust it blindly).
    """

    __slots__ = ("_at", "_tokens", "burst_bytes", "rate_bytes_per_s")

    def __init__(self, rate_bytes_per_s: float, burst_bytes: int, now: float) -> None:
        self.rate_bytes_per_s = _check_positive(rate_bytes_per_s, "rate_bytes_per_s")
        self.burst_bytes = _check_positive(burst_bytes, "burst_bytes")
        self._tokens = self.burst_bytes
        self._at = float(now)

    def _refill(self, now: float) -> None:
        if now > self._at:
            self._tokens = min(self.burst_bytes, self._tokens + (now - self._at) * self.rate_bytes_per_s)
            self._at = now

    def available(self, now: float) -> float:
        """Tokens (bytes) that could be sent right now; negative while a debt is being paid off."""
        self._refill(now)
        return self._tokens

    def reserve(self, n_bytes: int, now: float) -> float:
        """Take `n_bytes` now and return how many seconds until they are paid for (0 if covered).

        Always succeeds: the bucket goes into debt, and later reservations wait
        behind this one.
        """
        if isinstance(n_bytes, bool) or not isinstance(n_bytes, int) or n_bytes < 0:
            raise RateLimitError(f"a reservation is a whole number of bytes >= 0, got {n_bytes!r}")
        self._refill(now)
        self._tokens -= n_bytes
        return self.debt_s(now)

    def debt_s(self, now: float) -> float:
        """Seconds until the balance is back to zero (0 if it is not negative)."""
        self._refill(now)
        return max(0.0, -self._tokens / self.rate_bytes_per_s)

    def __repr__(self) -> str:
        return (f"TokenBucket(rate_bytes_per_s={self.rate_bytes_per_s:g}, burst_bytes={self.burst_bytes:g}, "
                f"tokens={self._tokens:g})")


class UploadSlots:
    """At most `max_concurrent` uploads at once: acquire one before serving, release it after."""

    __slots__ = ("_in_use", "max_concurrent")

    def __init__(self, max_concurrent: int) -> None:
        if isinstance(max_concurrent, bool) or not isinstance(max_concurrent, int) or max_concurrent < 1:
            raise RateLimitError(f"max_concurrent uploads must be an integer >= 1, got {max_concurrent!r}")
        self.max_concurrent = max_concurrent
        self._in_use = 0

    @property
    def in_use(self) -> int:
        return self._in_use

    @property
    def free(self) -> int:
        return self.max_concurrent - self._in_use

    def try_acquire(self) -> bool:
        """Take a slot if one is free; False means refuse the request (the peer retries elsewhere)."""
        if self._in_use >= self.max_concurrent:
            return False
        self._in_use += 1
        return True

    def release(self) -> None:
        if self._in_use == 0:
            raise RateLimitError("release() without a matching try_acquire(): no upload slot is in use")
        self._in_use -= 1

    def __repr__(self) -> str:
        return f"UploadSlots(in_use={self._in_use}, max_concurrent={self.max_concurrent})"
