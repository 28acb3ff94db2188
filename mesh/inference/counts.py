"""What a node counts per model version while it serves, as plain values: the latency buckets,
the kinds of error, and `VersionHealth` (counts, error rate, the window between two snapshots).
Pure: the rollout gate and the simulator read these; `health.HealthCounters` fills them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

# Upper bounds of the latency buckets, seconds; a final +Inf bucket is implied.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ErrorKind(StrEnum):
    EXCEPTION = "exception"
    NON_FINITE = "non_finite"
    DEADLINE_EXCEEDED = "deadline_exceeded"


@dataclass(frozen=True)
class VersionHealth:
    """Counts for one model version. `latency_buckets[i]` counts requests with latency <=
    LATENCY_BUCKETS_S[i] and above the bucket before it; the last entry is everything above."""

    model: str
    version: str
    requests: int
    errors: dict[str, int]
    latency_buckets: tuple[int, ...]
    latency_sum_s: float

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def error_rate(self) -> float:
        """Errors per request; 0.0 when there were no requests."""
        return self.error_count / self.requests if self.requests else 0.0

    def since(self, earlier: VersionHealth | None) -> VersionHealth:
        """The counts accumulated after `earlier` (a snapshot of the same version), for a window."""
        if earlier is None:
            return self
        return VersionHealth(
            model=self.model, version=self.version, requests=self.requests - earlier.requests,
            errors={k: v - earlier.errors.get(k, 0) for k, v in self.errors.items()},
            latency_buckets=tuple(a - b for a, b in zip(self.latency_buckets, earlier.latency_buckets,
                                                        strict=True)),
            latency_sum_s=self.latency_sum_s - earlier.latency_sum_s)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "version": self.version, "requests": self.requests,
                "errors": dict(self.errors), "latency_buckets": list(self.latency_buckets),
                "latency_sum_s": self.latency_sum_s}
