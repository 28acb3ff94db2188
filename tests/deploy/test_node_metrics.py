"""What a busy node serves on /metrics: promtool accepts the scrape, and the values match what
the node did (chunks moved, versions held, Raft state, decisions allowed and held, approvals
checked, audit failures, certificates)."""

from __future__ import annotations

import asyncio
import os
import random
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from mesh import __version__
from mesh._proto import inference_pb2, inference_pb2_grpc
from mesh.artifacts.publish import publish
from mesh.consensus.config import RaftSection
from mesh.consensus.ledger import Outcome
from mesh.guard.approval import sign_approval
from mesh.guard.core import Decision, DecisionKind, StreamMove
from mesh.identity.signing import KeyRole, load_signing_key
from mesh.identity.tls import channel_credentials, secure_channel_options
from mesh.inference.fixtures import mlp_model
from mesh.node.local import SITES, wait_for
from mesh.node.runtime import Node
from tests.deploy.test_monitoring import catalogue, needs_promtool, promtool
from tests.models import mediapipe_model

pytestmark = pytest.mark.asyncio

LAYERS = (16, 32, 4)
SITE = SITES[0]
MEMBERS = ["node-00", "node-01", "node-02"]


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """(sample name, its labels) -> value, from an exposition."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(scraped: dict, name: str, **labels: str) -> float:
    return scraped[(name, frozenset(labels.items()))]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


async def start_nodes(c, n: int, *, metrics_on: str) -> list[Node]:
    """Start n nodes into cluster `c`, `metrics_on` serving /metrics on a free port."""
    nodes = []
    for i in range(n):
        node_id = f"node-{i:02d}"
        config = c.config(node_id, site=SITE, seeds=[nodes[0].address] if nodes else [])
        if node_id == metrics_on:
            config = config.model_copy(update={"metrics_listen": "127.0.0.1:0"})
        node = Node(config, rng=random.Random(i), serve_metrics=node_id == metrics_on)
        await node.start()
        c.nodes[node_id] = node
        nodes.append(node)
    return nodes


def decision(*moves: tuple[str, str, str], nonce: str) -> Decision:
    return Decision(kind=DecisionKind.MOVE_STREAMS, group=SITE, proposer="node-00", reason="test",
                    proposed_at=time.time(), nonce=nonce, moves=tuple(StreamMove(*m) for m in moves))


async def infer(node: Node, fleet, x: np.ndarray) -> None:
    creds = channel_credentials(fleet.node_credentials("client-1"))
    options = secure_channel_options(peer_id=node.config.node_id)
    async with grpc.aio.secure_channel(node.address, creds, options=options) as channel:
        await inference_pb2_grpc.InferenceStub(channel).Infer(inference_pb2.InferRequest(inputs=[
            inference_pb2.Tensor(name="input", dtype="float32", shape=list(x.shape), data=x.tobytes())]),
            timeout=10)


@needs_promtool
async def test_a_busy_nodes_scrape_passes_promtool_and_counts_what_it_did(cluster, fleet, tmp_path):
    # A move touching two of the three members is within scope; one touching all three is not.
    c = await cluster(0, inference={"model": "mlp", "workers": 1}, raft=RaftSection(members=MEMBERS),
                      guard={"move_streams": {"max_nodes": 2, "max_fraction": 1.0, "max_streams": 5}})
    origin, *followers = await start_nodes(c, 3, metrics_on="node-00")
    await wait_for(c.converged, 15.0, what="convergence")
    await origin.group.raft.wait_for_leader(30.0)

    # Distribution and inference: a release from node-00 reaches every node, which serves it.
    key = load_signing_key(fleet.directory / "publisher.key", KeyRole.PUBLISHER)
    model = tmp_path / "mlp.tflite"
    model.write_bytes(mlp_model(LAYERS, seed=1))
    signed = publish(model, name="mlp", version="1", key=key, store=origin.store)
    origin.distributor.add_published(signed)
    await wait_for(lambda: all(n.inference.active is not None for n in c.nodes.values()), 30.0,
                   what="every node serves mlp 1")
    x = np.random.default_rng(7).standard_normal((1, LAYERS[0])).astype(np.float32)
    for _ in range(5):
        await infer(origin, fleet, x)

    # Decisions: routes, one move within scope (allowed), one above it (held), an approval of the
    # held one signed with the publisher's key (refused: not an operator key), then the operator's.
    group = origin.group
    assert (await group.set_routes({f"cam-{i}": "node-01" for i in range(6)})).outcome is Outcome.APPLIED
    allowed = decision(("cam-0", "node-01", "node-02"), nonce="allow-0001")
    assert (await group.propose(allowed)).outcome is Outcome.APPLIED
    held = decision(*((f"cam-{i}", "node-01", "node-00") for i in range(1, 6)),
                    ("cam-0", "node-02", "node-00"),
                    nonce="hold-00001")
    assert (await group.propose(held)).outcome is Outcome.HELD
    publisher = load_signing_key(fleet.directory / "publisher.key", KeyRole.PUBLISHER)
    forged = sign_approval(publisher, held, now=time.time(), ttl_s=600, nonce="forged-0001")
    assert (await group.approve(forged)).outcome is Outcome.REFUSED
    # The hold is visible before the operator answers.
    before = samples(await asyncio.to_thread(scrape, origin.metrics_port))
    assert value(before, "fleetmesh_decisions_held", site=SITE, kind="move_streams") == 1
    assert value(before, "fleetmesh_decisions_oldest_held_timestamp_seconds", site=SITE) == \
        pytest.approx(held.proposed_at)
    operator = load_signing_key(fleet.directory / "operator.key", KeyRole.OPERATOR)
    approval = sign_approval(operator, held, now=time.time(), ttl_s=600, nonce="approve-001")
    assert (await group.approve(approval)).outcome is Outcome.APPLIED

    text = await asyncio.to_thread(scrape, origin.metrics_port)
    done = promtool("check", "metrics", stdin=text)
    assert (done.returncode, done.stdout + done.stderr) == (0, ""), text

    m = samples(text)
    size = signed.manifest.size_bytes
    # What node-00 served as the origin, and what the others received (from it or from each other).
    assert value(m, "fleetmesh_transfer_bytes_total", direction="out", peer_class="origin") == \
        origin.transfer.counters.bytes_served > 0
    assert value(m, "fleetmesh_transfer_bytes_total", direction="out", peer_class="peer") == 0
    for follower in followers:
        received = samples(generate(follower))
        assert value(received, "fleetmesh_transfer_bytes_total", direction="in", peer_class="origin") + \
            value(received, "fleetmesh_transfer_bytes_total", direction="in", peer_class="peer") >= size
        assert value(received, "fleetmesh_transfer_chunks_verified_total") >= len(signed.manifest.chunks)
        assert value(received, "fleetmesh_transfer_downloads", phase="complete") == 1
    assert value(m, "fleetmesh_transfer_downloads", phase="complete") == 1
    assert value(m, "fleetmesh_transfer_chunks_refused_total", reason="hash_mismatch") == 0
    assert value(m, "fleetmesh_store_bytes") >= size  # the model (its chunks are read from it), manifest
    assert value(m, "fleetmesh_inference_active_info", model="mlp", version="1") == 1
    # Raft: one leader among the three, known to this member; commits counted and applied.
    leading = [value(samples(generate(n)), "fleetmesh_raft_is_leader", site=SITE) for n in c.nodes.values()]
    assert sorted(leading) == [0, 0, 1]
    assert value(m, "fleetmesh_raft_leader_known", site=SITE) == 1
    assert value(m, "fleetmesh_raft_commit_index", site=SITE) >= 5
    assert value(m, "fleetmesh_raft_term", site=SITE) >= 1
    assert value(m, "fleetmesh_raft_apply_lag_entries", site=SITE) >= 0
    assert value(m, "fleetmesh_raft_proposals_total", site=SITE, kind="set_routes", outcome="committed") == 1
    for outcome in ("committed", "held"):
        assert value(m, "fleetmesh_raft_proposals_total", site=SITE, kind="move_streams",
                     outcome=outcome) == 1
    assert value(m, "fleetmesh_guard_verdicts_total", site=SITE, kind="move_streams", verdict="allow") == 1
    assert value(m, "fleetmesh_guard_verdicts_total", site=SITE, kind="move_streams", verdict="hold") == 1
    assert value(m, "fleetmesh_guard_approvals_total", site=SITE, outcome="not_operator_key") == 1
    assert value(m, "fleetmesh_guard_approvals_total", site=SITE, outcome="approved") == 1
    assert value(m, "fleetmesh_decisions_held", site=SITE, kind="move_streams") == 0
    assert not [k for k in m if k[0] == "fleetmesh_decisions_oldest_held_timestamp_seconds"]
    assert value(m, "fleetmesh_audit_entries_total", site=SITE) == group.status()["audit_head"]["seq"] >= 7
    assert value(m, "fleetmesh_audit_write_failures_total", site=SITE) == 0
    # The node itself.
    assert value(m, "fleetmesh_build_info", version=__version__) == 1
    assert value(m, "fleetmesh_ready") == 1
    assert 0 <= value(m, "fleetmesh_event_loop_heartbeat_age_seconds") < 10
    cert = x509.load_pem_x509_certificate(origin.credentials.cert_path.read_bytes())
    assert value(m, "fleetmesh_certificate_expiry_timestamp_seconds", certificate="node") == \
        cert.not_valid_after_utc.timestamp()
    assert value(m, "fleetmesh_certificate_expiry_timestamp_seconds", certificate="ca") > time.time()
    # Every catalogued family with samples here is listed with the labels METRICS.md gives it.
    entries = catalogue()
    for family in text_string_to_metric_families(text):
        if family.name.endswith("_created"):  # prometheus_client's creation times of its own counters
            continue
        name = family.name + ("_total" if family.type == "counter" else "")
        assert name in entries, f"{name} is served but not in METRICS.md"
        for s in family.samples:
            if not s.name.endswith("_created"):
                assert set(s.labels) - {"le"} == entries[name].labels, (s.name, s.labels)


async def test_a_peer_serving_bad_bytes_shows_as_refused_chunks_and_a_ban(cluster, fleet):
    c = await cluster(3)
    await wait_for(c.converged, 10.0, what="convergence")
    origin, liar, fetcher = (c.nodes[f"node-0{i}"] for i in range(3))
    key = load_signing_key(fleet.directory / "publisher.key", KeyRole.PUBLISHER)
    signed = publish(mediapipe_model("face_detection_short_range"), name="face", version="1",
                     key=key, store=origin.store)
    # The liar holds a copy and serves it corrupted; peers are asked before the origin.
    for ref in signed.manifest.chunks:
        liar.store.put_chunk(ref.sha256, origin.store.read_chunk(ref.sha256))
    liar.store.save_manifest(signed, trusted=liar.distributor.trusted)
    liar.store.assemble(signed.manifest)
    liar.transfer.faults.corrupt_chunks = True
    liar.distributor.add_local(signed, origin=False)
    origin.distributor.add_published(signed)
    await wait_for(lambda: fetcher.store.is_complete(signed.manifest), 60.0,
                   what="face 1 complete at node-02")

    counted = samples(generate(fetcher))
    refused = value(counted, "fleetmesh_transfer_chunks_refused_total", reason="hash_mismatch")
    bans = value(counted, "fleetmesh_transfer_peer_bans_total", reason="hash_mismatch")
    assert refused >= 1 and bans >= 1, "node-02 never asked the liar, or did not refuse its bytes"
    assert value(counted, "fleetmesh_transfer_peer_bans_total", reason="protocol") == 0
    assert value(counted, "fleetmesh_transfer_banned_peers") == 1  # the ban (300 s) is still on
    assert value(counted, "fleetmesh_transfer_chunks_verified_total") >= len(signed.manifest.chunks)
    assert value(counted, "fleetmesh_transfer_bytes_total", direction="in", peer_class="peer") > 0
    liar_counted = samples(generate(liar))
    assert value(liar_counted, "fleetmesh_transfer_bytes_total", direction="out", peer_class="peer") > 0


async def test_a_failed_audit_write_is_counted(cluster, fleet):
    c = await cluster(1, raft=RaftSection(members=["node-00"]))
    node = c.nodes["node-00"]
    await node.group.raft.wait_for_leader(30.0)
    # The disk fills up under the open audit log: its descriptor now writes to /dev/full (ENOSPC).
    real = os.path.realpath(node.group.audit_path)
    (fd,) = [int(f.name) for f in Path("/proc/self/fd").iterdir() if os.path.realpath(f) == real]
    full = os.open("/dev/full", os.O_WRONLY)
    try:
        os.dup2(full, fd)
    finally:
        os.close(full)
    assert (await node.group.set_routes({"cam-9": "node-00"})).outcome is Outcome.APPLIED
    counted = samples(generate(node))
    assert value(counted, "fleetmesh_audit_write_failures_total", site=SITE) == 1
    assert value(counted, "fleetmesh_raft_proposals_total", site=SITE, kind="set_routes",
                 outcome="committed") == 1


def generate(node: Node) -> str:
    """The exposition /metrics would serve for `node` (nodes of the cluster fixture serve none)."""
    from prometheus_client import generate_latest

    return generate_latest(node.metrics.registry).decode()
