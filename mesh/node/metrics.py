"""Prometheus metrics of one node, in a registry of its own.

A registry per node (not the process-global one) lets tests and benchmarks run
many nodes in one process. Values a capability already counts are read at scrape
time by a collector instead of being mirrored into counters: the membership core's
stats, the Transfer service's `UploadCounters`, the distributor's `DownloadCounters`
and progress, the site group's Raft status and `GroupCounts`, the inference runtime.
`deploy/prometheus/METRICS.md` lists every name with its labels and meaning.

Scrapes run on the probe server's threads, not on the event loop: a stalled loop
must not stall /metrics, which is when its heartbeat age matters most. Collectors
only read (copies of dicts, plain attributes); the one read that needs the loop,
readiness, is run on it with a short timeout.
"""

from __future__ import annotations

import logging
import os
from collections import Counter as Tally
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from cryptography import x509
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client import Counter as PromCounter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mesh import __version__
from mesh.consensus.counts import APPROVAL_OUTCOMES, PROPOSAL_KINDS, PROPOSAL_OUTCOMES, VERDICTS
from mesh.guard.core import DecisionKind
from mesh.membership.messages import State
from mesh.membership.service import SwimRunner
from mesh.node.probes import Heartbeat, LoopUnavailable, call_on_loop

if TYPE_CHECKING:
    from mesh.consensus.group import SiteGroup
    from mesh.identity.ca import Credentials
    from mesh.inference.runtime import ModelRuntime
    from mesh.transfer.distributor import Distributor
    from mesh.transfer.service import TransferServicer

log = logging.getLogger("mesh.node.metrics")

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
        yield CounterMetricFamily("fleetmesh_gossip_push_pull_bytes_out",
                                  "Of the membership bytes out, push-pull pages (they grow with the fleet)",
                                  value=runner.counters.push_pull_bytes_out)
        yield CounterMetricFamily("fleetmesh_membership_replies_dropped",
                                  "Membership replies not sent because the caller had given up",
                                  value=runner.counters.replies_dropped)
        yield GaugeMetricFamily("fleetmesh_incarnation", "This node's incarnation number",
                                value=core.incarnation)


class NodeCollector:
    """The node itself: its build, whether it is ready (as /readyz says), its loop's heartbeat age."""

    def __init__(self, heartbeat: Heartbeat, readiness: Callable[[], tuple[bool, Iterable[str]]], *,
                 readiness_timeout_s: float = 1.0) -> None:
        self._heartbeat = heartbeat
        self._readiness = readiness
        self._timeout_s = readiness_timeout_s

    def _ready(self) -> bool:
        try:
            return bool(call_on_loop(self._heartbeat.loop, self._readiness, self._timeout_s,
                                     what="the readiness check")[0])
        except LoopUnavailable:
            return False
        except Exception:  # the gauge reads 0; /readyz logs the failure with its traceback
            return False

    def collect(self) -> Iterable[Metric]:
        info = GaugeMetricFamily("fleetmesh_build_info", "Always 1; version is the package version",
                                 labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        yield GaugeMetricFamily("fleetmesh_ready", "1 while /readyz answers 200", value=int(self._ready()))
        yield GaugeMetricFamily("fleetmesh_event_loop_heartbeat_age_seconds",
                                "Seconds since the event loop last stamped its heartbeat",
                                value=self._heartbeat.age_s())


class CertificateCollector:
    """When the certificates this node runs with expire. Read once: the node holds them until it
    restarts, whatever is written over the files meanwhile."""

    def __init__(self, credentials: Credentials) -> None:
        self._expiry: dict[str, float] = {}
        for label, path in (("node", credentials.cert_path), ("ca", credentials.ca_path)):
            try:
                cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
            except (OSError, ValueError) as exc:  # the node already loaded them to serve TLS
                log.warning("no expiry metric for the %s certificate %s: %s", label, path, exc)
                continue
            self._expiry[label] = cert.not_valid_after_utc.timestamp()

    def collect(self) -> Iterable[Metric]:
        expiry = GaugeMetricFamily("fleetmesh_certificate_expiry_timestamp_seconds",
                                   "When a certificate this node holds expires (Unix time)",
                                   labels=["certificate"])
        for label, timestamp in self._expiry.items():
            expiry.add_metric([label], timestamp)
        yield expiry


class ActiveModelCollector:
    """Which model version the inference runtime serves."""

    def __init__(self, runtime: ModelRuntime) -> None:
        self._runtime = runtime

    def collect(self) -> Iterable[Metric]:
        active = self._runtime.active
        info = GaugeMetricFamily("fleetmesh_inference_active_info", "1 for the model version being served",
                                 labels=["model", "version"])
        if active is not None:
            info.add_metric([active.name, active.version], 1)
        yield info


class DistributionCollector:
    """Model distribution: chunk bytes by direction and peer class, chunks verified and refused,
    bans, downloads by phase, and the bytes the artifact store holds."""

    def __init__(self, transfer: TransferServicer, distributor: Distributor, store_root: Path,
                 now: Callable[[], float]) -> None:
        """`now`: the clock the distributor's bans are timed on (the loop's)."""
        self._transfer = transfer
        self._distributor = distributor
        self._store_root = Path(store_root)
        self._now = now

    def collect(self) -> Iterable[Metric]:
        uploads = self._transfer.counters
        downloads = self._distributor.counters
        transfer = CounterMetricFamily("fleetmesh_transfer_bytes", "Model chunk bytes received (in) and "
                                       "served (out), by peer class", labels=["direction", "peer_class"])
        transfer.add_metric(["in", "origin"], downloads.bytes_from_origin)
        transfer.add_metric(["in", "peer"], downloads.bytes_from_peers)
        served, as_origin = uploads.bytes_served, uploads.bytes_served_as_origin
        transfer.add_metric(["out", "origin"], as_origin)
        transfer.add_metric(["out", "peer"], served - as_origin)
        yield transfer
        yield CounterMetricFamily("fleetmesh_transfer_bytes_from_other_sites", "Model chunk bytes received "
                                  "from a node of another site (label `site`)",
                                  value=downloads.bytes_from_other_sites)
        yield CounterMetricFamily("fleetmesh_transfer_chunks_verified", "Chunks received whose SHA-256 "
                                  "matched the manifest", value=downloads.chunks_verified)
        yield CounterMetricFamily("fleetmesh_transfer_holdings_updates", "Times what this node gossips of "
                                  "the versions it holds changed", value=downloads.holdings_updates)
        lists = CounterMetricFamily("fleetmesh_transfer_chunk_lists", "GetHave asks from transfer peers this "
                                    "node answered or refused (asked too often)", labels=["result"])
        lists.add_metric(["served"], uploads.haves_served)
        lists.add_metric(["refused"], uploads.haves_refused)
        yield lists
        refused = CounterMetricFamily("fleetmesh_transfer_chunks_refused", "Chunks received and thrown away",
                                      labels=["reason"])
        for reason, count in dict(downloads.chunks_refused).items():
            refused.add_metric([reason], count)
        yield refused
        bans = CounterMetricFamily("fleetmesh_transfer_peer_bans", "Peers banned for serving bad bytes or "
                                   "misbehaving", labels=["reason"])
        for reason, count in dict(downloads.bans).items():
            bans.add_metric([reason], count)
        yield bans
        yield GaugeMetricFamily("fleetmesh_transfer_banned_peers", "Peers banned right now",
                                value=downloads.banned_now(self._now()))
        yield CounterMetricFamily("fleetmesh_transfer_peers_benched", "Times a peer's chunk claims were set "
                                  "aside: it failed request after request without delivering a chunk",
                                  value=downloads.benched)
        phases = GaugeMetricFamily("fleetmesh_transfer_downloads", "Model versions by download phase",
                                   labels=["phase"])
        for phase, count in self._distributor.phase_counts().items():
            phases.add_metric([phase], count)
        yield phases
        yield GaugeMetricFamily("fleetmesh_store_bytes", "Bytes the artifact store holds on disk",
                                value=_tree_bytes(self._store_root))


def _tree_bytes(root: Path) -> int:
    """Bytes of the regular files under `root`; files removed while it walks are skipped."""
    total, stack = 0, [str(root)]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
            except OSError:
                continue
    return total


class ConsensusCollector:
    """This member's view of its site's Raft group, what it proposed, and the guard's verdicts and
    approvals on the entries it applied. Every series carries the group's `site`."""

    def __init__(self, group: SiteGroup, site: str) -> None:
        self._group = group
        self._site = site

    def collect(self) -> Iterable[Metric]:
        group, site = self._group, self._site
        raft = group.status()  # the Raft member's status, with the audit log's head
        leader = raft["leader"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=["site"])
            family.add_metric([site], value)
            return family

        yield gauge("fleetmesh_raft_is_leader", "1 while this member leads its site group",
                    int(raft["state"] == "leader"))
        yield gauge("fleetmesh_raft_leader_known", "1 while this member knows a leader",
                    int(leader is not None))
        yield gauge("fleetmesh_raft_term", "Current Raft term", raft["term"])
        yield gauge("fleetmesh_raft_commit_index", "Index of the last committed log entry",
                    raft["commit_index"])
        yield gauge("fleetmesh_raft_apply_lag_entries", "Committed entries not yet applied here",
                    max(0, raft["commit_index"] - raft["applied_index"]))
        yield gauge("fleetmesh_raft_reachable_members",
                    "Other members of the group this member's streams reach", len(raft["reachable"]))
        contact = raft.get("leader_contact_s")
        yield gauge("fleetmesh_raft_leader_contact_age_seconds",
                    "Seconds since this member last heard from a leader (0 while it leads; -1 never)",
                    -1.0 if contact is None else contact)
        counts = group.counts.snapshot()
        proposals = CounterMetricFamily("fleetmesh_raft_proposals", "Decisions this member proposed, by kind "
                                        "and outcome", labels=["site", "kind", "outcome"])
        for kind in PROPOSAL_KINDS:
            for outcome in PROPOSAL_OUTCOMES:
                proposals.add_metric([site, kind, outcome], counts.proposals.get((kind, outcome), 0))
        yield proposals
        pending = group.pending()
        held = GaugeMetricFamily("fleetmesh_decisions_held", "Decisions held for an operator's approval",
                                 labels=["site", "kind"])
        by_kind = Tally(h.decision.kind.value for h in pending)
        for decision_kind in DecisionKind:
            held.add_metric([site, decision_kind.value], by_kind.get(decision_kind.value, 0))
        yield held
        oldest = GaugeMetricFamily("fleetmesh_decisions_oldest_held_timestamp_seconds",
                                   "When the oldest decision still held was proposed (Unix time)",
                                   labels=["site"])
        if pending:
            oldest.add_metric([site], min(h.decision.proposed_at for h in pending))
        yield oldest
        audit = CounterMetricFamily("fleetmesh_audit_entries", "Entries in this member's audit log",
                                    labels=["site"])
        audit.add_metric([site], raft["audit_head"]["seq"])
        yield audit
        failures = CounterMetricFamily("fleetmesh_audit_write_failures", "Audit log appends that failed",
                                       labels=["site"])
        failures.add_metric([site], counts.audit_failures)
        yield failures
        verdicts = CounterMetricFamily("fleetmesh_guard_verdicts", "Guard verdicts on decisions applied by "
                                       "this replica", labels=["site", "kind", "verdict"])
        for decision_kind in DecisionKind:
            for verdict in VERDICTS:
                count = counts.verdicts.get((decision_kind.value, verdict), 0)
                verdicts.add_metric([site, decision_kind.value, verdict], count)
        yield verdicts
        approvals = CounterMetricFamily("fleetmesh_guard_approvals", "Approvals and denials checked, by "
                                        "outcome", labels=["site", "outcome"])
        for outcome in dict.fromkeys([*APPROVAL_OUTCOMES, *sorted(counts.approvals)]):
            approvals.add_metric([site, outcome], counts.approvals.get(outcome, 0))
        yield approvals


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

    def register_parts(self, *, runner: SwimRunner, heartbeat: Heartbeat,
                       readiness: Callable[[], tuple[bool, Iterable[str]]], credentials: Credentials,
                       transfer: TransferServicer, distributor: Distributor, store_root: Path,
                       now: Callable[[], float], group: SiteGroup | None, site: str,
                       inference: ModelRuntime | None) -> None:
        """Register a collector for each part the node built (`group`/`inference` None: not configured)."""
        collectors: list[Collector] = [
            NodeCollector(heartbeat, readiness), MembershipCollector(runner),
            CertificateCollector(credentials),
            DistributionCollector(transfer, distributor, store_root, now)]
        if group is not None:
            collectors.append(ConsensusCollector(group, site or group.group))
        if inference is not None:
            collectors.append(ActiveModelCollector(inference))
        for collector in collectors:
            self.registry.register(collector)
