"""Prometheus metrics of one node, in a registry of its own.

A registry per node (not the process-global one) lets tests and benchmarks run
many nodes in one process. Values the membership core already counts are read
at scrape time by a collector instead of being mirrored into counters.
"""

from __future__ import annotations

from collections import Counter as Tally

import grpc
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client import Counter as PromCounter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from mesh.membership.messages import State
from mesh.membership.service import SwimRunner

RPC_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class MembershipCollector:
    """Membership figures read from the SWIM runner at scrape time."""

    def __init__(self, runner: SwimRunner) -> None:
        self._runner = runner

    def collect(self):
        runner = self._runner
        core = runner.core
        by_state = Tally(m.state for m in core.members())
        members = GaugeMetricFamily("fleetmesh_members", "Members in this node's view, by state",
                                    labels=["state"])
        for state in State:
            members.add_metric([state.name.lower()], by_state.get(state, 0))
        yield members
        stats = core.stats
        yield CounterMetricFamily("fleetmesh_probes_sent", "Direct probes sent", value=stats.probes_sent)
        yield CounterMetricFamily("fleetmesh_probes_failed",
                                  "Probe cycles that ended without an ack (target suspected)",
                                  value=stats.probes_failed)
        yield CounterMetricFamily("fleetmesh_indirect_probes_sent", "Indirect probe requests sent",
                                  value=stats.indirect_probes_sent)
        gossip = CounterMetricFamily("fleetmesh_gossip_bytes", "Membership protocol bytes",
                                     labels=["direction"])
        gossip.add_metric(["in"], runner.counters.bytes_in)
        gossip.add_metric(["out"], runner.counters.bytes_out)
        yield gossip
        yield GaugeMetricFamily("fleetmesh_incarnation", "This node's incarnation number",
                                value=core.incarnation)


class NodeMetrics:
    """The node's registry and the metrics observed by its RPC clients. Each capability's
    collector is registered by the node once that capability is built."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.rpc_seconds = Histogram("fleetmesh_rpc_client_seconds", "Latency of outgoing RPCs",
                                     ["method"], registry=self.registry, buckets=RPC_BUCKETS_S)
        self.rpc_errors = PromCounter("fleetmesh_rpc_client_errors", "Outgoing RPCs that failed",
                                      ["method", "code"], registry=self.registry)

    def observe_rpc(self, method: str, seconds: float, code: grpc.StatusCode) -> None:
        self.rpc_seconds.labels(method).observe(seconds)
        if code is not grpc.StatusCode.OK:
            self.rpc_errors.labels(method, code.name).inc()
