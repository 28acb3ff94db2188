"""The node: one asyncio process that wires each capability's shell to the gRPC server,
peer channels, membership events and the metrics endpoint, and does nothing else.

`Node.start` builds every part once, in dependency order, each with everything it needs
(no attribute filled in later, no callback assigned from outside):

    server, channels -> membership core, its read-only view
      -> transfer: store, origin policy, Transfer service
      -> inference: runtime, activator (told by the distributor when a version completes)
      -> decisions: site group, stream reassigner
      -> rollouts: the shell that steers the activator and tells the distributor what to pin
      -> distributor (pinned versions from the activator and the rollouts)
      -> routed Infer (on a version its stream's site is on)
      -> SWIM runner (membership events fanned out to the distributor and the reassigner)
      -> admin, health, reflection, metrics

and starts the background tasks each part asks for. A capability plugs in by getting its
shell built here with what it needs, subscribing to membership events through the fan-out,
and handing its tasks to `_spawn`.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import json
import logging
import random
import signal
import time
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from mesh._proto import (
    admin_pb2,
    admin_pb2_grpc,
    decisions_pb2,
    inference_pb2,
    inference_pb2_grpc,
    membership_pb2,
    membership_pb2_grpc,
    raft_pb2,
    raft_pb2_grpc,
    rollout_pb2,
    rollout_pb2_grpc,
    transfer_pb2,
    transfer_pb2_grpc,
    trust_pb2,
    trust_pb2_grpc,
)
from mesh.admin.service import AdminServicer
from mesh.artifacts.store import ArtifactStore, StoreError
from mesh.consensus import service as decisions_service
from mesh.consensus.group import GroupError, SiteGroup
from mesh.consensus.raft import RaftError
from mesh.consensus.transport import RaftLink, RaftServicer
from mesh.identity.ca import LEGACY_GROUP_SECRET_FILE, Credentials, Role, load_credentials, load_trusted_keys
from mesh.identity.revocation import RevocationError
from mesh.identity.tls import server_credentials
from mesh.identity.trust import TrustServicer, TrustStore
from mesh.inference.activation import Activator, Steering
from mesh.inference.backend import load_backend
from mesh.inference.health import HealthCollector
from mesh.inference.runtime import ModelRuntime, NoActiveModel
from mesh.membership.config import SITE_POOL
from mesh.membership.core import Membership
from mesh.membership.messages import MemberEvent, labels_from_mapping
from mesh.membership.sections import MetaSections
from mesh.membership.service import MembershipServicer, SwimRunner
from mesh.membership.view import CoreView, MemberEventHandler, MembershipView, MetadataBoard, fan_out
from mesh.node.config import NodeConfig, parse_host_port
from mesh.node.federation import (
    FEDERATION_SECTION,
    ROLLOUTS_CAPABLE_SECTION,
    FederationMember,
    MirroredBoard,
    PoolsView,
)
from mesh.node.interceptors import DecodeInterceptor, FaultInterceptor, TrustInterceptor
from mesh.node.metrics import NodeMetrics
from mesh.node.peers import MAX_MESSAGE_BYTES, SERVER_KEEPALIVE_OPTIONS, Faults, PeerChannels
from mesh.node.probes import Heartbeat, ProbeBindError, ProbeServer, sd_notify, watchdog_pinger
from mesh.node.reflection import enable_reflection
from mesh.node.revocations import REVOCATIONS_SECTION, RevocationGossip
from mesh.node.rollouts import (
    HEALTH_SECTION,
    ROLLOUTS_SECTION,
    RolloutCollector,
    RolloutServicer,
    RolloutSettings,
    RolloutShell,
    SitesHooks,
    SiteVersionRouting,
)
from mesh.node.startup import data_dir_error, listen_error
from mesh.node.streams import StreamReassigner, claim_streams, watch_overload
from mesh.retry import Backoff
from mesh.transfer.distributor import HOLDINGS_SECTION, Distributor, TransferSettings
from mesh.transfer.pacing import Pacer
from mesh.transfer.service import OriginPolicy, TransferServicer

log = logging.getLogger("mesh.node")

SERVICE_NAMES = (
    membership_pb2.DESCRIPTOR.services_by_name["Membership"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
    transfer_pb2.DESCRIPTOR.services_by_name["Transfer"].full_name,
    inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
    decisions_pb2.DESCRIPTOR.services_by_name["Decisions"].full_name,
    raft_pb2.DESCRIPTOR.services_by_name["Raft"].full_name,
    trust_pb2.DESCRIPTOR.services_by_name["Trust"].full_name,
    rollout_pb2.DESCRIPTOR.services_by_name["Rollouts"].full_name,
)


# Bytes of membership metadata per capability (the whole blob is at most 2 KiB with the default
# gossip budget): what versions this node holds takes most of it.
META_BUDGETS = {HOLDINGS_SECTION: 1400, HEALTH_SECTION: 256, ROLLOUTS_SECTION: 256, REVOCATIONS_SECTION: 24}


class _NoInference:
    """Stands in for the runtime on a node configured without a model: every call is refused."""

    def submit(self, *args: Any, **kwargs: Any) -> Any:
        raise NoActiveModel("this node serves no model ([inference] model is not set in its config)")

    active = None
    previous = None


class NodeStartError(Exception):
    """The node could not start (port taken, credentials unreadable, ...)."""


@dataclass
class _Parts:
    """Everything a started node runs, built at once by `Node.start`."""

    server: grpc.aio.Server
    address: str
    channels: PeerChannels
    health: HealthServicer
    runner: SwimRunner
    view: MembershipView
    store: ArtifactStore
    transfer: TransferServicer
    distributor: Distributor
    inference: ModelRuntime | None
    activator: Activator | None
    group: SiteGroup | None
    reassigner: StreamReassigner | None
    rollouts: RolloutShell | None
    routed_inference: SiteVersionRouting
    trust: TrustStore
    revocations: RevocationGossip
    heartbeat: Heartbeat
    federation: FederationMember | None = None
    probes: ProbeServer | None = None
    metrics_port: int | None = None


class Node:
    """One fleet node. `await start()`, then `await stop()` (graceful leave by default)."""

    def __init__(self, config: NodeConfig, *, credentials: Credentials | None = None,
                 rng: random.Random | None = None, faults: Faults | None = None,
                 serve_metrics: bool = True, rollout_settings: RolloutSettings | None = None) -> None:
        """`rollout_settings`: the rollout shell's timings (gate interval; tests and the demo shorten it)."""
        self.config = config
        self.rollout_settings = rollout_settings or RolloutSettings()
        self.credentials = credentials or load_credentials(config.tls.dir)
        check_identity(config, self.credentials)
        self.faults = faults or Faults()
        self.metrics = NodeMetrics()
        self.events: list[MemberEvent] = []  # every membership event, oldest first
        self._rng = rng or random.Random()
        self._serve_metrics = serve_metrics
        self._parts: _Parts | None = None
        self._tasks: list[asyncio.Task] = []
        self._stopped = False

    # -- what a started node exposes (tests, the demo, benchmarks) ---------------------------

    @property
    def _started(self) -> _Parts:
        if self._parts is None:
            raise RuntimeError(f"node {self.config.node_id} is not started: await node.start() first")
        return self._parts

    @property
    def address(self) -> str:
        return self._started.address

    @property
    def metrics_port(self) -> int | None:
        return self._started.metrics_port

    @property
    def runner(self) -> SwimRunner:
        return self._started.runner

    @property
    def federation(self) -> FederationMember | None:
        """Sites mode: this node's place in the federation pool (None in flat mode)."""
        return self._started.federation

    @property
    def membership(self) -> MembershipView:
        return self._started.view

    @property
    def store(self) -> ArtifactStore:
        return self._started.store

    @property
    def transfer(self) -> TransferServicer:
        return self._started.transfer

    @property
    def distributor(self) -> Distributor:
        return self._started.distributor

    @property
    def inference(self) -> ModelRuntime | None:
        return self._started.inference

    @property
    def activator(self) -> Activator | None:
        return self._started.activator

    @property
    def group(self) -> SiteGroup | None:
        return self._started.group

    @property
    def reassigner(self) -> StreamReassigner | None:
        return self._started.reassigner

    @property
    def rollouts(self) -> RolloutShell | None:
        return self._started.rollouts

    @property
    def inference_servicer(self) -> SiteVersionRouting:
        return self._started.routed_inference

    @property
    def trust(self) -> TrustStore:
        return self._started.trust

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind, build every capability on the gRPC server, start serving, then join the fleet."""
        config = self.config
        try:
            config.data_dir.mkdir(parents=True, exist_ok=True)
            store = ArtifactStore(config.data_dir / "artifacts")
        except OSError as exc:
            raise NodeStartError(data_dir_error(config.data_dir, exc)) from None
        except StoreError as exc:
            raise NodeStartError(f"data_dir: {exc}") from None
        loop = asyncio.get_running_loop()
        trusted = load_trusted_keys(config.tls.dir)
        # Whom this node trusts right now: revocations it enforces, certificate expiry.
        try:
            trust = TrustStore(config.data_dir, trusted)
        except RevocationError as exc:
            raise NodeStartError(str(exc)) from None
        server = grpc.aio.server(
            # Interceptors run first to last: revoked or expired certificates and cut links are
            # refused before anything is decoded.
            interceptors=[TrustInterceptor(trust.refusal), FaultInterceptor(self.faults),
                          DecodeInterceptor()],
            options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                     ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                     ("grpc.so_reuseport", 0), *SERVER_KEEPALIVE_OPTIONS])
        host, port = parse_host_port(config.listen)
        try:  # checked first too: gRPC's own bind failure adds a line of C-core log without the cause
            bound = 0 if port and listen_error(config.listen, host, port) else \
                server.add_secure_port(config.listen, server_credentials(self.credentials))
        except RuntimeError:  # gRPC >= 1.6x raises where older ones returned 0
            bound = 0
        if bound == 0:
            why = listen_error(config.listen, host, port) or f"cannot serve gRPC on {config.listen}"
            raise NodeStartError(why)
        address = config.advertise or (config.listen if port else f"{host}:{bound}")
        channels = PeerChannels(self.credentials, self.faults, observe=self.metrics.observe_rpc,
                                refuse=trust.is_revoked_id)
        site = config.labels.get("site", "")

        # Membership core first: every other part sees the fleet through its read-only view.
        core = Membership(config.node_id, address, labels_from_mapping(config.labels),
                          config.membership.to_core(), self._rng, loop.time(),
                          # Grows across restarts, so our fresh metadata beats our old self's.
                          meta_version=time.time_ns() // 1_000_000)
        site_view = CoreView(core, revoked=trust.is_revoked_id)
        # Membership event handlers of the shells built below (added as they are built).
        handlers: list[MemberEventHandler] = [self.events.extend]

        def shell_events(events: Sequence[MemberEvent]) -> None:
            for handler in handlers:
                handler(events)

        federation: FederationMember | None = None
        # A federation join that reaches this node while it is no representative is told its site's.
        membership_service = MembershipServicer(
            {}, redirect=lambda pool: federation.redirect(pool) if federation is not None else [])
        view: MembershipView
        if config.membership.pools == "sites":
            # Sites mode: the shells see this site, and (on a representative) other sites' representatives;
            # this node's metadata goes to both pools.
            board = MirroredBoard(site_view)
            meta = _meta_sections(board, META_BUDGETS | {FEDERATION_SECTION: 16, ROLLOUTS_CAPABLE_SECTION: 1},
                                  config.membership.max_gossip_bytes)
            federation = FederationMember(
                node_id=config.node_id, address=address, labels=labels_from_mapping(config.labels), site=site,
                site_view=site_view, config=config.membership.federation_core(),
                representatives=config.membership.representatives, seeds=config.membership.federation_seeds,
                servicer=membership_service,
                dial=lambda peer_address, peer_id: membership_pb2_grpc.MembershipStub(
                    channels.channel(peer_address, peer_id)),
                board=board, rep_board=meta.board(FEDERATION_SECTION), on_events=shell_events,
                rng=random.Random(self._rng.random()), revoked=trust.is_revoked_id,
                runs_rollouts=config.raft is not None, capable_board=meta.board(ROLLOUTS_CAPABLE_SECTION))
            view = PoolsView(site_view, site, federation.view)
        else:
            view = site_view
            # What this node gossips about itself, one section per capability within its own budget.
            meta = _meta_sections(view, META_BUDGETS, config.membership.max_gossip_bytes)

        # Transfer: the store, the origin's egress policy and the service that serves chunks.
        tc = config.transfer
        origin = OriginPolicy(is_origin=store.is_origin, max_refusals=tc.origin_refusals)
        # GetHave answers with what the distributor (built below, before the server starts) holds.
        transfer = TransferServicer(store, max_uploads=tc.max_uploads, origin=origin,
                                    upload=Pacer(tc.upload_rate_bytes_per_s or None),
                                    have_source=lambda *version_of: distributor.have_of(*version_of))

        # Inference: the runtime and the activator that keeps it on the right version. A member of a site
        # group takes part in rollouts: it activates nothing until its rollout state is known.
        inference, activator = self._build_inference(store, trusted, Steering(wait=config.raft is not None))

        # Local decisions: the site's Raft group (with [raft]), over this node's gRPC port.
        raft_service = RaftServicer()
        try:
            group, reassigner = self._build_decisions(view, site, channels, raft_service, trust)
        except BaseException:
            if inference is not None:
                inference.close()
            raise

        # Rollouts: decided in the site group, steering the activator; the distributor keeps what they pin.
        rollouts = None
        if group is not None:
            rollouts = RolloutShell(
                node_id=config.node_id, site=site, labels=dict(config.labels), model=config.inference.model,
                group=group, view=view, health_board=meta.board(HEALTH_SECTION),
                notes_board=meta.board(ROLLOUTS_SECTION), runtime=inference,
                steer=activator.steer if activator else _ignore_steering,
                refused=(lambda: activator.refused) if activator else frozenset,
                history=(lambda: tuple(activator.history)) if activator else tuple,
                store=store, data_dir=config.data_dir, trusted=trusted,
                dial=lambda address, peer_id: rollout_pb2_grpc.RolloutsStub(
                    channels.channel(address, peer_id)),
                settings=self.rollout_settings,
                sites=None if federation is None else SitesHooks(
                    active=lambda: federation is not None and federation.active,
                    representatives=lambda: [] if federation is None else [
                        r for r in federation.representatives if r in federation.advertised()]))
            self.metrics.registry.register(RolloutCollector(rollouts))

        def pinned() -> set[tuple[str, str]]:
            return set(activator.pinned() if activator else ()) | set(rollouts.pinned() if rollouts else ())

        distributor = Distributor(
            node_id=config.node_id, site=site, store=store, trusted=trusted, view=view,
            board=meta.board(HOLDINGS_SECTION),
            dial=lambda address, peer_id: transfer_pb2_grpc.TransferStub(channels.channel(address, peer_id)),
            settings=TransferSettings(max_in_flight_per_peer=tc.max_in_flight_per_peer,
                                      request_timeout_s=tc.request_timeout_s, ban_s=tc.ban_s,
                                      download_rate_bytes_per_s=tc.download_rate_bytes_per_s or None,
                                      fetch_all=tc.fetch == "all", origin_only=tc.sources == "origin",
                                      cross_fallback_s=tc.cross_fallback_s,
                                      origin_fallback_s=tc.origin_fallback_s,
                                      stepped_holdings=tc.stepped_holdings, have_peers=tc.have_peers),
            rng=random.Random(self._rng.random()), now=loop.time,
            pinned=pinned, unwanted=rollouts.unwanted if rollouts else frozenset,
            background=rollouts.background if rollouts else frozenset,
            on_complete=activator.poke if activator else _ignore_version,
            on_removed=self._removed_hook(origin, activator),
            uploaded=transfer.counters.uploaded_bytes,
            crosses=federation.crosses if federation is not None else None)

        # Infer routed by the site's table, on a device that runs a version the stream's site is on.
        routed = SiteVersionRouting(
            inference or _NoInference(), node_id=config.node_id, group=group, view=view, rollouts=rollouts,
            dial=lambda address, peer_id: inference_pb2_grpc.InferenceStub(
                channels.channel(address, peer_id)))

        revocations = RevocationGossip(
            trust, view=view, board=meta.board(REVOCATIONS_SECTION), trusted=trusted, now=loop.time,
            dial=lambda address, peer_id: trust_pb2_grpc.TrustStub(channels.channel(address, peer_id)))
        handlers += [distributor.on_member_events, revocations.on_member_events]
        if reassigner is not None:
            handlers.append(reassigner.on_member_events)
        if rollouts is not None:
            handlers.append(rollouts.on_member_events)
        runner = SwimRunner(
            core,
            lambda address, peer_id: membership_pb2_grpc.MembershipStub(channels.channel(address, peer_id)),
            on_events=shell_events if federation is None else fan_out(shell_events,
                                                                      federation.on_member_events))
        membership_service.serve(SITE_POOL, runner)

        health = HealthServicer()
        membership_pb2_grpc.add_MembershipServicer_to_server(membership_service, server)
        transfer_pb2_grpc.add_TransferServicer_to_server(transfer, server)
        inference_pb2_grpc.add_InferenceServicer_to_server(routed, server)
        raft_pb2_grpc.add_RaftServicer_to_server(raft_service, server)
        trust_pb2_grpc.add_TrustServicer_to_server(TrustServicer(trust, announce=revocations.announce),
                                                   server)
        # Served in any case, so a client gets FAILED_PRECONDITION ("no [raft] section"), not UNIMPLEMENTED.
        decisions_service.add_to_server(server, group)
        rollout_pb2_grpc.add_RolloutsServicer_to_server(RolloutServicer(rollouts, store, inference), server)
        admin_pb2_grpc.add_AdminServicer_to_server(
            AdminServicer(core, loop.time, loop.time(), models=self._model_rows,
                          inference=self._inference_status,
                          audit=(lambda: (group.audit_path, group.audit_check)) if group else None,
                          federation=federation), server)
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        enable_reflection((*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name),
                          server)
        # The loop's heartbeat: /healthz reads it, and it pings systemd's watchdog when there is one.
        heartbeat = Heartbeat(loop, on_beat=watchdog_pinger())
        self.metrics.register_parts(runner=runner, heartbeat=heartbeat, readiness=self.readiness,
                                    credentials=self.credentials, transfer=transfer, distributor=distributor,
                                    store_root=store.root, now=loop.time, group=group, site=site,
                                    inference=inference)
        self._parts = _Parts(server=server, address=address, channels=channels, health=health, runner=runner,
                             view=view, store=store, transfer=transfer, distributor=distributor,
                             inference=inference, activator=activator, group=group, reassigner=reassigner,
                             rollouts=rollouts, routed_inference=routed, trust=trust, revocations=revocations,
                             heartbeat=heartbeat, federation=federation)
        try:
            await server.start()
            for name in ("", *SERVICE_NAMES):
                await health.set(name, health_pb2.HealthCheckResponse.SERVING)
            heartbeat.start()
            if self._serve_metrics and config.metrics_listen:
                mhost, mport = parse_host_port(config.metrics_listen)
                probes = ProbeServer(self.metrics.registry, readiness=self.readiness, heartbeat=heartbeat)
                try:
                    self._parts.metrics_port = probes.start(mhost, mport)
                except ProbeBindError as exc:
                    raise NodeStartError(str(exc)) from None
                self._parts.probes = probes
        except BaseException:
            await self.stop(leave=False)  # nothing joined yet: release the port, the group, the threads
            raise
        sd_notify("READY=1")  # serving; joining the fleet is what /readyz reports

        revocations.announce()
        runner.start(list(config.seeds))
        if federation is not None:
            federation.start(has_seeds=bool(config.seeds),
                             wait_s=max(10.0, 5 * config.membership.to_core().push_pull_interval_s))
        distributor.start()
        self._start_tasks(self._parts)
        log.info("node %s listening on %s (site=%s), seeds %s", config.node_id, address, site or "-",
                 ", ".join(config.seeds) or "none")

    def _build_inference(self, store: ArtifactStore, trusted: Any,
                         steering: Steering) -> tuple[ModelRuntime | None, Activator | None]:
        ic = self.config.inference
        if not ic.model:
            return None, None
        try:
            runtime = ModelRuntime(load_backend(ic.backend), workers=ic.workers)
        except Exception as exc:  # BackendUnavailable and friends: the node cannot serve at all
            raise NodeStartError(f"inference: {exc}") from None
        self.metrics.registry.register(HealthCollector(runtime.health))
        activator = Activator(model=ic.model, store=store, trusted=trusted, runtime=runtime,
                              rng=random.Random(self._rng.random()), steering=steering,
                              state_path=self.config.data_dir / "active-model.json")
        return runtime, activator

    def _build_decisions(self, view: MembershipView, site: str, channels: PeerChannels,
                         raft_service: RaftServicer,
                         trust: TrustStore) -> tuple[SiteGroup | None, StreamReassigner | None]:
        config = self.config
        if config.raft is None:
            return None, None

        def dial(peer_id: str) -> raft_pb2_grpc.RaftStub | None:
            member = view.member(peer_id)  # its address as membership knows it, whatever its state
            if member is None:
                return None
            return raft_pb2_grpc.RaftStub(channels.channel(member.address, peer_id))

        try:
            link = RaftLink(group=config.raft.group_id(config.labels.get("site")), node_id=config.node_id,
                            dial=dial, rng=random.Random(self._rng.random()),
                            accept=lambda node_id: raft_refusal(node_id, trust, self.faults))
            group = SiteGroup.from_config(config.node_id, config.raft, config.guard,
                                          site=config.labels.get("site"), node_data_dir=config.data_dir,
                                          creds_dir=config.tls.dir, link=link)
        except (GroupError, RaftError, ValueError) as exc:
            raise NodeStartError(f"raft: {exc}") from None
        raft_service.add(link)
        return group, StreamReassigner(node_id=config.node_id, group=group, view=view, site=site,
                                       rng=random.Random(self._rng.random()),
                                       return_after_s=StreamReassigner.settle_period_s(
                                           config.membership.to_core(), len(config.raft.members)))

    @staticmethod
    def _removed_hook(origin: OriginPolicy, activator: Activator | None):
        def removed(name: str, version: str) -> None:
            origin.forget(name, version)
            if activator is not None:
                activator.poke(name, version)

        return removed

    def _start_tasks(self, parts: _Parts) -> None:
        config = self.config
        self._spawn(watch_certificate_expiry(self.credentials), "certificate-expiry")
        if parts.activator is not None:
            self._spawn(parts.activator.run(), "activation")
        group = parts.group
        if group is None:
            return
        assert parts.reassigner is not None
        self._spawn(group.run_expiry(), "decision-expiry")
        self._spawn(group.run_member_removal(parts.trust.revocation_of), "revoked-member-removal")
        if parts.rollouts is not None:
            self._spawn(parts.rollouts.run(), "rollouts")
        self._spawn(parts.reassigner.reconcile(), "reassign-reconcile")
        if config.streams:
            backoff = Backoff(first_s=0.5, max_s=5.0, rng=random.Random(self._rng.random()))
            self._spawn(claim_streams(group, {stream: config.node_id for stream in config.streams},
                                      backoff=backoff),
                        "claim-streams")
        if parts.inference is not None:
            self._spawn(watch_overload(node_id=config.node_id, group=group, runtime=parts.inference,
                                       view=parts.view, site=config.labels.get("site", ""),
                                       rng=random.Random(self._rng.random())), "overload-watch")

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        task = asyncio.create_task(coro, name=f"{name}-{self.config.node_id}")
        task.add_done_callback(_report_task_death)
        self._tasks.append(task)

    def readiness(self) -> tuple[bool, list[str]]:
        """Whether this node is ready for traffic, and why not: it has joined the fleet (sees a
        live peer, unless it is the only node configured), a model is active when one is
        configured, and its site group has a leader when it has [raft]. Runs on the loop."""
        parts = self._parts
        if parts is None or self._stopped:
            return False, ["the node is not running"]
        reasons = []
        if self.config.seeds and parts.view.live_count() < 2:
            reasons.append(f"not joined: no live peer seen yet (seeds {', '.join(self.config.seeds)})")
        if parts.activator is not None and parts.inference is not None and parts.inference.active is None:
            reasons.append(f"no version of model {parts.activator.model} is active yet")
        if parts.group is not None and parts.group.raft.leader_id is None:
            reasons.append(f"Raft group {parts.group.group} has no leader known to this node")
        return not reasons, reasons

    # -- admin rows ---------------------------------------------------------------------------

    def _model_rows(self) -> list[dict]:
        parts = self._started
        rows = parts.distributor.model_status()
        runtime = parts.inference
        active = runtime.active if runtime else None
        previous = runtime.previous if runtime else None
        for row in rows:
            key = (row["name"], row["version"])
            row["serving"] = active is not None and key == (active.name, active.version)
            row["previous"] = previous is not None and key == (previous.name, previous.version)
        return rows

    def _inference_status(self) -> dict:
        runtime = self._started.inference
        if runtime is None:
            return {"enabled": False}
        status = runtime.status()
        return {"enabled": True, "backend": status.backend, "backend_version": status.backend_version,
                "workers": status.workers, "model": self.config.inference.model or "",
                "active_version": status.active.version if status.active else "",
                "active_sha256": status.active.sha256 if status.active else "",
                "previous_version": status.previous.version if status.previous else "",
                "last_activation_error": status.last_activation_error or "",
                "signature_json": json.dumps(status.active.signature.to_dict()) if status.active else ""}

    async def stop(self, *, leave: bool = True, grace_s: float = 1.0) -> None:
        """Leave the cluster (unless `leave=False`, which looks like a crash to peers) and shut down."""
        if self._stopped or self._parts is None:
            return
        self._stopped = True
        parts = self._parts
        sd_notify("STOPPING=1")
        if parts.federation is not None:
            with _slow_step("federation stop"):
                await parts.federation.stop(leave=leave)
        if leave:
            await parts.health.enter_graceful_shutdown()
            try:
                await parts.runner.leave()
            except TimeoutError:
                log.warning("leave not acknowledged by every peer in time; shutting down anyway")
        with _slow_step("membership stop"):
            await parts.runner.stop()  # harmless when it never started
        with _slow_step("background tasks"):
            await _cancel_all(self._tasks)
        if parts.activator is not None:
            parts.activator.close()
        if parts.reassigner is not None:
            with _slow_step("reassigner close"):
                await parts.reassigner.close()
        if parts.rollouts is not None:
            with _slow_step("rollouts close"):
                await parts.rollouts.close()
        if parts.group is not None:
            with _slow_step("site group close"):
                await parts.group.close()
        with _slow_step("distributor stop"):
            await parts.distributor.stop()
        with _slow_step("revocations close"):
            await parts.revocations.close()
        with _slow_step("gRPC server stop"):
            await parts.server.stop(grace_s if leave else 0)
        with _slow_step("channels close"):
            await parts.channels.close()
        if parts.inference is not None:
            with _slow_step("inference close"):
                parts.inference.close()
        if parts.probes is not None:
            parts.probes.stop()
        parts.heartbeat.stop()
        log.info("node %s stopped", self.config.node_id)

    async def run_until_signalled(self) -> None:
        """Serve until SIGTERM or SIGINT, then leave gracefully."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        await stop.wait()
        log.info("signal received: leaving the cluster")
        # A stop that hangs is otherwise silent until a supervisor kills the node: dump every thread's stack
        # to stderr (the node's log under systemd) if it takes longer than STOP_STACKS_AFTER_S.
        faulthandler.dump_traceback_later(STOP_STACKS_AFTER_S, exit=False)
        try:
            await self.stop()
        finally:
            faulthandler.cancel_dump_traceback_later()


async def _cancel_all(tasks: list[asyncio.Task], recancel_s: float = 1.0, attempts: int = 5) -> None:
    """Cancel `tasks` and wait until all have ended. A task still running `recancel_s` after its
    cancellation is cancelled again, and named: Python 3.11's `asyncio.wait_for` swallows a cancellation
    that arrives in the same loop turn as the end of its wait, and a loop around it then runs on. After
    `attempts` cancellations a task is left running, with where it stands in the log: the stop goes on."""
    for task in reversed(tasks):
        task.cancel()
    pending = {t for t in tasks if not t.done()}
    for attempt in range(1, attempts + 1):
        if not pending:
            return
        _, pending = await asyncio.wait(pending, timeout=recancel_s)
        for task in pending:
            if attempt < attempts:
                log.warning("stopping: task %s did not end when cancelled; cancelling it again",
                            task.get_name())
                task.cancel()
            else:
                frames = task.get_stack(limit=3)
                where = " <- ".join(f"{f.f_code.co_filename}:{f.f_lineno} {f.f_code.co_name}" for f in frames)
                log.error("stopping: task %s still runs after %d cancellations (at %s); not waiting for it",
                          task.get_name(), attempts, where or "?")


# Seconds after SIGTERM at which a node still stopping writes every thread's stack to stderr.
STOP_STACKS_AFTER_S = 10.0


@contextlib.contextmanager
def _slow_step(what: str, slow_s: float = 2.0) -> Iterator[None]:
    """Name a shutdown step that takes longer than `slow_s`, so a node that is slow to stop says where."""
    began = time.monotonic()
    try:
        yield
    finally:
        took = time.monotonic() - began
        if took > slow_s:
            log.warning("stopping: %s took %.1f s", what, took)


def _report_task_death(task: asyncio.Task) -> None:
    """A background task of the node ended by an exception: say so (it stops doing its work until the
    node restarts), rather than leave it to asyncio's garbage-collection warning."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("background task %s stopped: %s: %s; restart the node to resume it", task.get_name(),
                  type(exc).__name__, exc, exc_info=exc)


def _ignore_version(name: str, version: str) -> None:
    return None


# Warn this long before the node's own certificate expires (and again every CERT_CHECK_INTERVAL_S).
CERT_WARN_BEFORE_S = 14 * 86400
CERT_CHECK_INTERVAL_S = 6 * 3600


def certificate_expiry(credentials: Credentials) -> float:
    """When this node's certificate stops being valid (seconds since the epoch)."""
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(credentials.cert_path.read_bytes())
    return cert.not_valid_after_utc.timestamp()


async def watch_certificate_expiry(credentials: Credentials) -> None:
    """Log a warning while the node's certificate is within CERT_WARN_BEFORE_S of expiring: peers
    refuse an expired certificate, so an unrenewed device drops out of the fleet on that day."""
    while True:
        left_s = certificate_expiry(credentials) - time.time()
        if left_s < CERT_WARN_BEFORE_S:
            log.warning("this node's certificate %s expires in %.1f days; peers refuse it from then on: "
                        "renew it with `mesh fleet renew %s` and install the new cert.pem and key.pem",
                        credentials.cert_path, max(left_s, 0) / 86400, credentials.name)
        await asyncio.sleep(CERT_CHECK_INTERVAL_S)  # a check period, not synchronisation


def _meta_sections(board: MetadataBoard, budgets: Mapping[str, int], max_gossip_bytes: int) -> MetaSections:
    """This node's metadata sections, or a NodeStartError naming the setting when gossip messages are
    too small for them (a member's metadata may take a quarter of `max_gossip_bytes`)."""
    needed = MetaSections.needed_bytes(budgets)
    if needed > board.meta_limit_bytes:
        raise NodeStartError(
            f"membership.max_gossip_bytes = {max_gossip_bytes} leaves {board.meta_limit_bytes} bytes for "
            f"this node's metadata, and what it publishes needs {needed}: set max_gossip_bytes to at least "
            f"{4 * needed} (the default is 8192), the same on every node")
    return MetaSections(board, budgets)


def raft_refusal(node_id: str, trust: TrustStore, faults: Faults) -> str | None:
    """Why this node exchanges no Raft messages with member `node_id` now: its certificate is revoked
    (for good), or fault injection cut the link (until healed)."""
    if trust.is_revoked_id(node_id):
        return f"{node_id}'s certificate is revoked"
    if faults.is_blocked(node_id):
        return f"the link to {node_id} is cut by fault injection"
    return None


def check_identity(config: NodeConfig, credentials: Credentials) -> None:
    """Refuse to start a node whose certificate does not name it, or whose secrets others can read.

    A node_id that differs from its certificate's name would start and never join (peers drop
    its messages because the sender does not match the caller); a private key readable by
    group or others is a key anyone on the device can take."""
    if credentials.role is not Role.NODE:
        raise NodeStartError(f"{credentials.cert_path} is an {credentials.role.value} certificate; "
                             f"a node needs its own node certificate (mesh fleet enroll {config.node_id})")
    if credentials.name != config.node_id:
        raise NodeStartError(
            f"node_id is {config.node_id!r} but {credentials.cert_path} is the certificate of "
            f"{credentials.name!r}: set node_id = \"{credentials.name}\" or point [tls] dir at "
            f"{config.node_id}'s credentials (mesh fleet enroll {config.node_id})")
    for path in (credentials.key_path, credentials.directory / LEGACY_GROUP_SECRET_FILE):
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            continue
        if mode & 0o077:
            raise NodeStartError(f"{path} is readable by group or others (mode {mode & 0o777:o}); "
                                 f"it is a secret: run `chmod 600 {path}` and start again")


def _ignore_steering(steering: Steering) -> None:
    return None
