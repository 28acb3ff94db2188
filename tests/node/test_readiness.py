"""A node's /healthz and /readyz through its lifecycle: starting (not joined, no model), joined with
a model active (ready), leaving (not ready). Real node, real HTTP on its metrics port."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request

import pytest

from mesh.artifacts.publish import publish
from mesh.identity.signing import KeyRole, load_signing_key
from mesh.inference.fixtures import mlp_model
from mesh.node.local import FAST_TIMINGS, LocalCluster, free_address, wait_for
from mesh.node.runtime import Node

pytestmark = pytest.mark.asyncio


async def get(port: int, path: str) -> tuple[int, str]:
    def fetch() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    return await asyncio.to_thread(fetch)


async def test_readyz_follows_join_and_model_and_healthz_the_loop(fleet, tmp_path):
    c = LocalCluster(fleet, tmp_path, FAST_TIMINGS, sections={"inference": {"model": "mlp", "workers": 1}})
    lonely_seed = free_address()  # nobody answers there: the node cannot join yet
    config = c.config("node-00", site="berlin", seeds=[lonely_seed]).model_copy(
        update={"metrics_listen": "127.0.0.1:0"})
    node = Node(config)
    await node.start()
    try:
        port = node.metrics_port
        assert (await get(port, "/healthz"))[0] == 200
        status, body = await get(port, "/readyz")
        assert status == 503 and f"not joined: no live peer seen yet (seeds {lonely_seed})" in body
        assert "no version of model mlp is active yet" in body

        # A peer joins through this node (its seed): joined, but still no model.
        peer = await c.add("node-01", site="berlin", seeds=[node.address])
        await wait_for(lambda: node.readiness()[1] == ["no version of model mlp is active yet"], 10.0,
                       "joined")
        path = tmp_path / "mlp.tflite"
        path.write_bytes(mlp_model((8, 16, 2), seed=1))
        key = load_signing_key(fleet.directory / "publisher.key", KeyRole.PUBLISHER)
        node.distributor.add_published(publish(path, name="mlp", version="1", key=key, store=node.store))
        await wait_for(lambda: node.readiness()[0], 20.0, "ready")
        assert await get(port, "/readyz") == (200, "ready\n")
        assert (await get(port, "/healthz"))[0] == 200
        assert peer.readiness()[0] is False or peer.inference.active is not None  # not ready without a model
    finally:
        await node.stop()
    assert node.readiness() == (False, ["the node is not running"])
    await c.close()


async def test_admin_status_shows_the_raft_group(cluster, fleet):
    """`mesh admin status` shows the node's Raft state (leader, term, indexes, reachable members,
    last contact with a leader), in the table and as JSON."""
    import json

    from click.testing import CliRunner

    from mesh.cli import main
    from mesh.consensus.config import RaftSection

    c = await cluster(1, raft=RaftSection(members=["node-00"]))
    node = c.nodes["node-00"]
    await node.group.raft.wait_for_leader(10.0)
    args = ["admin", "status", "--node", node.address, "--creds", str(fleet.operator.directory)]
    human = await asyncio.to_thread(CliRunner().invoke, main, args)
    assert human.exit_code == 0, human.output
    assert "raft group amsterdam: node-00 is leader; leader node-00, term" in " ".join(human.output.split())
    doc = json.loads((await asyncio.to_thread(CliRunner().invoke, main, [*args, "--json"])).output)
    assert doc["raft"]["leader"] == "node-00" and doc["raft"]["raft_state"] == "leader"
    assert {"term", "commit_index", "applied_index", "reachable", "leader_contact_s"} <= set(doc["raft"])
