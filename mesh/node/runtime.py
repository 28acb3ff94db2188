"""The node: one asyncio process wiring gRPC servers, peer channels, the
membership loop and the metrics endpoint around the pure cores."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import signal
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from mesh._proto import admin_pb2, admin_pb2_grpc, decisions_pb2, inference_pb2, inference_pb2_grpc, \
    membership_pb2, membership_pb2_grpc, transfer_pb2, transfer_pb2_grpc
from mesh.artifacts.manifest import ArtifactError, Manifest, ManifestError, verify_manifest
from mesh.artifacts.store import ArtifactStore, version_order_key
from mesh.admin.service import AdminServicer
from mesh.identity.ca import Credentials, load_credentials, load_trusted_keys
from mesh.identity.tls import server_credentials
from mesh.membership.core import Membership
from mesh.membership.messages import EventKind, MemberEvent, labels_from_mapping
from mesh.membership.service import MembershipServicer, SwimRunner
from mesh.node.config import NodeConfig, parse_host_port
from mesh.node.decisions import DeathReassigner, RoutedInference, watch_overload
from mesh.node.metrics import NodeMetrics
from mesh.node.interceptors import DecodeInterceptor, FaultInterceptor
from mesh.node.peers import MAX_MESSAGE_BYTES, Faults, PeerChannels
from mesh.consensus import service as decisions_service
from mesh.consensus.group import GroupError, SiteGroup
from mesh.consensus.raft import RaftError
from mesh.inference.backend import load_backend
from mesh.inference.health import HealthCollector
from mesh.inference.runtime import ActivationError, ModelRuntime
from mesh.transfer.client import Distributor, TransferSettings
from mesh.transfer.pacing import Pacer
from mesh.transfer.service import OriginPolicy, TransferServicer

log = logging.getLogger("mesh.node")

SERVICE_NAMES = (
    membership_pb2.DESCRIPTOR.services_by_name["Membership"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
    transfer_pb2.DESCRIPTOR.services_by_name["Transfer"].full_name,
    inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
    decisions_pb2.DESCRIPTOR.services_by_name["Decisions"].full_name,
)


class _NoInference:
    """Stands in for the runtime on a node configured without a model: every call is refused."""

    def submit(self, *args, **kwargs):
        from mesh.inference.runtime import NoActiveModel

        raise NoActiveModel("this node serves no model ([inference] model is not set in its config)")

    active = None
    previous = None


class NodeStartError(Exception):
    """The node could not start (port taken, credentials unreadable, ...)."""


class Node:
    """One fleet node. `await start()`, then `await stop()` (graceful leave by default)."""

    def __init__(self, config: NodeConfig, *, credentials: Credentials | None = None,
                 rng: random.Random | None = None, faults: Faults | None = None,
                 serve_metrics: bool = True) -> None:
        self.config = config
        self.credentials = credentials or load_credentials(config.tls.dir)
        self.faults = faults or Faults()
        self._rng = rng or random.Random()
        self._serve_metrics = serve_metrics
        self.metrics = NodeMetrics(lambda: self.runner)
        self.runner: SwimRunner | None = None
        self.address: str | None = None
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._health = HealthServicer()
        self._channels: PeerChannels | None = None
        self._metrics_http = None
        self._stopped = asyncio.Event()
        self.events: list[MemberEvent] = []  # every membership event, oldest first
        self.store: ArtifactStore | None = None
        self.transfer: TransferServicer | None = None
        self.distributor: Distributor | None = None
        self.inference: ModelRuntime | None = None
        self._refused_versions: set[tuple[str, str]] = set()
        self._activation_task: asyncio.Task | None = None
        self.group: SiteGroup | None = None
        self.reassigner: DeathReassigner | None = None
        self._expiry_task: asyncio.Task | None = None
        self._routes_task: asyncio.Task | None = None
        self._overload_task: asyncio.Task | None = None
        self._reconcile_task: asyncio.Task | None = None

    @property
    def membership(self) -> Membership:
        assert self.runner is not None, "node not started"
        return self.runner.core

    async def start(self) -> None:
        """Bind, wire every capability to the gRPC server, start serving, then join the fleet."""
        config = self.config
        config.data_dir.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        self._server = grpc.aio.server(
            # Interceptors run first to last: cut links refuse before anything is decoded.
            interceptors=[FaultInterceptor(self.faults), DecodeInterceptor()],
            options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                     ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                     ("grpc.so_reuseport", 0)])
        host, port = parse_host_port(config.listen)
        bound = self._server.add_secure_port(config.listen, server_credentials(self.credentials))
        if bound == 0:
            raise NodeStartError(f"cannot listen on {config.listen}: address in use or not available")
        self.address = config.advertise or (config.listen if port else f"{host}:{bound}")
        self._channels = PeerChannels(self.credentials, self.faults, observe=self.metrics.observe_rpc)

        core = self._wire_membership(loop)
        self._wire_transfer(core, loop)
        self._wire_inference()
        self._wire_decisions(core)
        admin_pb2_grpc.add_AdminServicer_to_server(
            AdminServicer(core, loop.time, loop.time(), models=self._model_rows, inference=self._inference_status),
            self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            SERVICE_NAMES + (health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self._server)
        await self._server.start()
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)

        if self._serve_metrics and config.metrics_listen:
            mhost, mport = parse_host_port(config.metrics_listen)
            self._metrics_http, _ = start_http_server(mport, addr=mhost, registry=self.metrics.registry)
            self.metrics_port = self._metrics_http.server_port
        self.runner.start(list(config.seeds))
        self.distributor.start()
        self._start_background(core)
        log.info("node %s listening on %s (site=%s), seeds %s", config.node_id, self.address,
                 config.labels.get("site", "-"), ", ".join(config.seeds) or "none")

    def _wire_membership(self, loop: asyncio.AbstractEventLoop) -> Membership:
        config = self.config
        core = Membership(config.node_id, self.address, labels_from_mapping(config.labels),
                          config.membership.to_core(), self._rng, loop.time(),
                          # Grows across restarts, so our fresh metadata beats our old self's.
                          meta_version=time.time_ns() // 1_000_000)
        self.runner = SwimRunner(core, self._dial, on_events=self._on_member_events)
        membership_pb2_grpc.add_MembershipServicer_to_server(MembershipServicer(self.runner), self._server)
        return core

    def _wire_transfer(self, core: Membership, loop: asyncio.AbstractEventLoop) -> None:
        config, tc = self.config, self.config.transfer
        self.store = ArtifactStore(config.data_dir / "artifacts")
        self.transfer = TransferServicer(self.store, max_uploads=tc.max_uploads,
                                         upload=Pacer(tc.upload_rate_bytes_per_s or None))
        self.distributor = Distributor(
            node_id=config.node_id, site=config.labels.get("site", ""), store=self.store,
            trusted=load_trusted_keys(config.tls.dir), membership=lambda: core, dial=self._dial_transfer,
            settings=TransferSettings(max_in_flight_per_peer=tc.max_in_flight_per_peer,
                                      request_timeout_s=tc.request_timeout_s, ban_s=tc.ban_s,
                                      download_rate_bytes_per_s=tc.download_rate_bytes_per_s or None,
                                      fetch_all=tc.fetch == "all"),
            rng=random.Random(self._rng.random()), now=loop.time)
        self.transfer.origin = OriginPolicy(is_origin=self.distributor.is_origin)
        self.distributor.removed = self.transfer.origin.forget
        self.distributor.uploaded = lambda name, version: \
            self.transfer.counters.bytes_by_version.get((name, version), 0)
        transfer_pb2_grpc.add_TransferServicer_to_server(self.transfer, self._server)

    def _wire_inference(self) -> None:
        ic = self.config.inference
        if not ic.model:
            return
        try:
            self.inference = ModelRuntime(load_backend(ic.backend), workers=ic.workers)
        except Exception as exc:  # BackendUnavailable and friends: the node cannot serve at all
            raise NodeStartError(f"inference: {exc}") from None
        self.metrics.registry.register(HealthCollector(self.inference.health))

    def _wire_decisions(self, core: Membership) -> None:
        """The site's Raft group (with [raft]), and Infer routed by its table. Both services are
        served in any case, so a client gets FAILED_PRECONDITION ("no model active", "no [raft]
        section"), not UNIMPLEMENTED."""
        config = self.config
        if config.raft is not None:
            try:
                self.group = SiteGroup.from_config(config.node_id, config.raft, config.guard,
                                                   site=config.labels.get("site"), node_data_dir=config.data_dir,
                                                   creds_dir=config.tls.dir)
            except (GroupError, RaftError, ValueError) as exc:
                raise NodeStartError(f"raft: {exc}") from None
            self.reassigner = DeathReassigner(node_id=config.node_id, group=self.group, membership=lambda: core,
                                              site=config.labels.get("site", ""))
        self.inference_servicer = RoutedInference(self.inference or _NoInference(), node_id=config.node_id,
                                                  group=lambda: self.group, membership=lambda: core,
                                                  dial=self._dial_inference)
        inference_pb2_grpc.add_InferenceServicer_to_server(self.inference_servicer, self._server)
        decisions_service.add_to_server(self._server, self.group)

    def _start_background(self, core: Membership) -> None:
        config = self.config
        if self.inference is not None:
            self._activation_task = asyncio.create_task(self._activation_loop(), name="activation")
        if self.group is None:
            return
        self._expiry_task = asyncio.create_task(self.group.run_expiry(), name="decision-expiry")
        self._reconcile_task = asyncio.create_task(self.reassigner.reconcile(), name="reassign-reconcile")
        if config.streams:
            self._routes_task = asyncio.create_task(self._claim_streams(), name="claim-streams")
        if self.inference is not None:
            self._overload_task = asyncio.create_task(watch_overload(
                node_id=config.node_id, group=self.group, runtime=self.inference, membership=lambda: core,
                site=config.labels.get("site", "")), name="overload-watch")

    def _dial(self, address: str, peer_id: str | None) -> membership_pb2_grpc.MembershipStub:
        return membership_pb2_grpc.MembershipStub(self._channels.channel(address, peer_id))

    def _dial_transfer(self, address: str, peer_id: str) -> transfer_pb2_grpc.TransferStub:
        return transfer_pb2_grpc.TransferStub(self._channels.channel(address, peer_id))

    def _model_rows(self) -> list[dict]:
        rows = self.distributor.model_status() if self.distributor is not None else []
        runtime = self.inference
        active = runtime.active if runtime else None
        previous = runtime.previous if runtime else None
        for row in rows:
            key = (row["name"], row["version"])
            row["serving"] = active is not None and key == (active.name, active.version)
            row["previous"] = previous is not None and key == (previous.name, previous.version)
        return rows

    def _inference_status(self) -> dict:
        runtime = self.inference
        if runtime is None:
            return {"enabled": False}
        status = runtime.status()
        return {"enabled": True, "backend": status.backend, "backend_version": status.backend_version,
                "workers": status.workers, "model": self.config.inference.model or "",
                "active_version": status.active.version if status.active else "",
                "previous_version": status.previous.version if status.previous else "",
                "last_activation_error": status.last_activation_error or "",
                "signature_json": json.dumps(status.active.signature.to_dict()) if status.active else ""}

    # -- activation -----------------------------------------------------------

    async def _activation_loop(self) -> None:
        """Serve the newest complete version of the configured model: verify, activate, keep
        the previous one for rollback. A version that fails activation is not retried."""
        while True:
            try:
                await self._activate_newest()
            except Exception:  # never let a bad version stop the loop; the runtime keeps serving
                log.exception("activation check failed")
            async with self.distributor.completed:
                try:
                    async with asyncio.timeout(1.0):
                        await self.distributor.completed.wait()
                except TimeoutError:
                    pass

    def _newest_complete(self) -> Manifest | None:
        """Blocking (directory listing, manifest read, signature check): run it in a thread."""
        model = self.config.inference.model
        versions = sorted((v for n, v in self.store.stored_versions() if n == model), key=version_order_key)
        for version in reversed(versions):
            if (model, version) in self._refused_versions:
                continue
            try:
                signed = self.store.load_manifest(model, version)
                manifest = verify_manifest(signed, self.distributor.trusted)  # again, at activation
            except ManifestError as exc:  # bad for good: never activate it
                log.warning("not activating %s %s: %s", model, version, exc)
                self._refused_versions.add((model, version))
                continue
            except (FileNotFoundError, ArtifactError, OSError) as exc:  # maybe transient (GC, I/O): next round
                log.info("skipping %s %s this round: %s", model, version, exc)
                continue
            if self.store.is_complete(manifest):
                return manifest
        return None

    async def _activate_newest(self) -> None:
        manifest = await asyncio.to_thread(self._newest_complete)
        runtime = self.inference
        active = runtime.active
        if manifest is None or (active and (active.name, active.version) == (manifest.name, manifest.version)):
            return
        try:
            info = await asyncio.to_thread(runtime.activate, manifest.name, manifest.version,
                                           self.store.complete_model_path(manifest), manifest.signature,
                                           sha256=manifest.sha256)
        except ActivationError as exc:
            self._refused_versions.add((manifest.name, manifest.version))
            log.error("refused to activate %s %s (%s); still serving %s", manifest.name, manifest.version,
                      exc, f"{active.name} {active.version}" if active else "nothing")
            return
        pinned = {(info.name, info.version)}
        if runtime.previous:
            pinned.add((runtime.previous.name, runtime.previous.version))
        self.distributor.pinned = pinned

    async def _claim_streams(self) -> None:
        """Route this device's own streams to it, once the group has a leader; the ledger
        keeps any stream already routed elsewhere where it is."""
        streams = {stream: self.config.node_id for stream in self.config.streams}
        while True:
            try:
                await self.group.raft.wait_for_leader(30.0)
                result = await self.group.set_routes(streams)
                log.info("claimed streams %s: %s", ", ".join(streams), result.message)
                return
            except (RaftError, GroupError, TimeoutError) as exc:
                log.warning("cannot claim streams yet (%s); retrying", exc)
                await asyncio.sleep(1.0)  # retry pacing while the group has no leader

    def _dial_inference(self, address: str, peer_id: str) -> inference_pb2_grpc.InferenceStub:
        return inference_pb2_grpc.InferenceStub(self._channels.channel(address, peer_id))

    def _on_member_events(self, events: list[MemberEvent]) -> None:
        self.events.extend(events)
        if self.distributor is not None:
            self.distributor.poke()
        if self.reassigner is not None:
            for event in events:
                if event.kind is EventKind.DEAD:
                    self.reassigner.on_dead(event.node_id)

    async def stop(self, *, leave: bool = True, grace_s: float = 1.0) -> None:
        """Leave the cluster (unless `leave=False`, which looks like a crash to peers) and shut down."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self.runner is not None:
            if leave:
                await self._health.enter_graceful_shutdown()
                try:
                    await self.runner.leave()
                except TimeoutError:
                    log.warning("leave not acknowledged by every peer in time; shutting down anyway")
            await self.runner.stop()
        for task in (self._activation_task, self._expiry_task, self._routes_task, self._overload_task,
                     self._reconcile_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self.reassigner is not None:
            await self.reassigner.close()
        if self.group is not None:
            await self.group.close()
        if self.distributor is not None:
            await self.distributor.stop()
        if self._server is not None:
            await self._server.stop(grace_s if leave else 0)
        if self._channels is not None:
            await self._channels.close()
        if self.inference is not None:
            self.inference.close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
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
        await self.stop()
