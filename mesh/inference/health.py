"""Health counters per model version: requests, errors by kind, latency histogram.

The counters are what a rollout's health gate reads: `snapshot()` gives plain
data for gossip, `HealthSnapshot.since(earlier)` the counts over a window and
its error rate. Requests refused before they reach the model (a malformed,
oversize or non-finite input: the client's fault, not the version's) are
counted apart, by reason (`refuse`, `refusals()`), and never enter the error
rate. `HealthCollector` exports all of them to Prometheus at scrape time, into
a registry the caller owns.

Workers record from their own threads; one lock guards all counters (an
increment is far cheaper than an invoke, so it is never contended for long).
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field

from mesh.inference.counts import LATENCY_BUCKETS_S, ErrorKind, VersionHealth


@dataclass
class _Counts:
    requests: int = 0
    errors: dict[str, int] = field(default_factory=lambda: {k.value: 0 for k in ErrorKind})
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))
    latency_sum_s: float = 0.0


class HealthCounters:
    """Thread-safe counters keyed by (model name, version)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], _Counts] = {}
        self._refused: dict[tuple[str, str, str], int] = {}

    def record(self, model: str, version: str, latency_s: float, error: ErrorKind | None = None) -> None:
        """One finished request (successful or not) and how long it took."""
        bucket = bisect.bisect_left(LATENCY_BUCKETS_S, latency_s)
        with self._lock:
            counts = self._counts.get((model, version))
            if counts is None:
                counts = self._counts[(model, version)] = _Counts()
            counts.requests += 1
            counts.buckets[bucket] += 1
            counts.latency_sum_s += latency_s
            if error is not None:
                counts.errors[error.value] += 1

    def refuse(self, model: str, version: str, reason: str) -> None:
        """One request refused before it reached the model (`reason`: a TensorError's reason)."""
        with self._lock:
            key = (model, version, reason)
            self._refused[key] = self._refused.get(key, 0) + 1

    def refusals(self) -> dict[tuple[str, str, str], int]:
        """Refused requests by (model, version, reason)."""
        with self._lock:
            return dict(sorted(self._refused.items()))

    def snapshot(self) -> list[VersionHealth]:
        """Plain copies of every version's counters, in a stable order."""
        with self._lock:
            return [VersionHealth(model=m, version=v, requests=c.requests, errors=dict(c.errors),
                                  latency_buckets=tuple(c.buckets), latency_sum_s=c.latency_sum_s)
                    for (m, v), c in sorted(self._counts.items())]

    def version(self, model: str, version: str) -> VersionHealth | None:
        return next((h for h in self.snapshot() if (h.model, h.version) == (model, version)), None)


class HealthCollector:
    """Prometheus collector reading `HealthCounters` at scrape time.

    Register it into the node's own registry: `registry.register(HealthCollector(counters))`.
    """

    def __init__(self, counters: HealthCounters) -> None:
        self._counters = counters

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        labels = ["model", "version"]
        requests = CounterMetricFamily("fleetmesh_inference_requests", "Inference requests served, by model "
                                       "version", labels=labels)
        errors = CounterMetricFamily("fleetmesh_inference_errors", "Failed inference requests (exception, "
                                     "non-finite output, deadline exceeded)", labels=labels + ["kind"])
        latency = HistogramMetricFamily("fleetmesh_inference_latency_seconds", "Inference latency in the "
                                        "runtime (queue wait plus invoke)", labels=labels)
        refused = CounterMetricFamily("fleetmesh_inference_refused_inputs", "Inference requests refused "
                                      "before invoking the model, apart from model errors (name, dtype, "
                                      "shape, too_large, non_finite)", labels=labels + ["reason"])
        for (model, version, reason), count in self._counters.refusals().items():
            refused.add_metric([model, version, reason], count)
        for h in self._counters.snapshot():
            key = [h.model, h.version]
            requests.add_metric(key, h.requests)
            for kind, count in h.errors.items():
                errors.add_metric(key + [kind], count)
            cumulative, buckets = 0, []
            for bound, count in zip(list(LATENCY_BUCKETS_S) + [float("inf")], h.latency_buckets, strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            latency.add_metric(key, buckets, h.latency_sum_s)
        yield requests
        yield errors
        yield latency
        yield refused
