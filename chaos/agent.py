"""The client agent: every RPC of a chaos run, made from inside the client namespace.

The harness runs in the root namespace, which must never send to the test subnet (the
host's default route would carry it off the machine), and gRPC's C core opens sockets on
its own threads, so a namespace switch on one Python thread would not hold. The harness
therefore starts this agent with `ip netns exec fmc-cl python -m chaos.agent` and talks
to it over its stdin/stdout: one JSON request per line in, one JSON reply per line out,
matched by `id`. Requests run on a thread pool, so a node that hangs delays only the
calls to it.

Only the operator's public clients are used (`mesh.admin`'s AdminClient and
DecisionsClient, approvals signed as `mesh admin approve` signs them) plus the
Inference service with a fleet node certificate, as an application on a device would.

Reply: {"id": n, "ok": true, "result": {...}} or {"id": n, "ok": false, "code": "UNAVAILABLE",
"error": "...", "phase": "..."} where `code` is the gRPC status name ("CLIENT" for a problem
found before any call).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc  # noqa: E402
import numpy as np  # noqa: E402
from google.protobuf.json_format import MessageToDict  # noqa: E402

from mesh._proto import inference_pb2, inference_pb2_grpc  # noqa: E402
from mesh.admin.client import AdminClient, AdminError  # noqa: E402

try:  # the CLI package split moved the Decisions client next to the Admin client
    from mesh.admin.client import DecisionsClient  # noqa: E402
except ImportError:
    from mesh.admin.decisions import DecisionsClient  # noqa: E402
from mesh.admin.format import status_dict  # noqa: E402
from mesh.guard.approval import sign_approval  # noqa: E402
from mesh.guard.core import Decision, DecisionKind, StreamMove  # noqa: E402
from mesh.identity.ca import Role, load_credentials  # noqa: E402
from mesh.identity.signing import KeyRole, load_signing_key  # noqa: E402
from mesh.identity.tls import channel_credentials, secure_channel_options  # noqa: E402

# Codes after which the client cannot know whether a write took effect (and redials the node).
UNCERTAIN_CODES = {"DEADLINE_EXCEEDED", "UNAVAILABLE", "UNKNOWN", "CANCELLED", "INTERNAL"}
# A dropped channel is closed this long after the failure, once the calls in flight on it are over.
RETIRED_CHANNEL_CLOSE_S = 30.0


def _close_quietly(client) -> None:
    with contextlib.suppress(Exception):  # closing a broken channel
        client.close()


class CallFailed(Exception):
    def __init__(self, code: str, message: str, phase: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.phase = phase


def _view(view) -> dict[str, Any]:
    """A group view as a dict with every field the node sends (so a field the node adds later,
    such as a Raft term, reaches the harness without a change here)."""
    doc = MessageToDict(view, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    doc["leader"] = view.leader or None
    for key, value in doc.items():  # the JSON mapping writes 64-bit integers as strings
        if isinstance(value, str) and value.isdigit() and key not in ("group", "node_id", "note", "leader"):
            doc[key] = int(value)
    return doc


class Agent:
    """Holds one channel per (node, service) and drops it after a failure, so a node that
    restarted or a link that healed is not judged through a channel stuck in back-off."""

    def __init__(self, fleet_dir: Path, client_creds: Path, workers: int) -> None:
        self.fleet_dir = fleet_dir
        self.operator = load_credentials(fleet_dir / "operators" / "admin")
        self.operator_key = load_signing_key(fleet_dir / "operator.key", KeyRole.OPERATOR)
        self.client = load_credentials(client_creds)
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="agent")
        self._lock = threading.Lock()
        self._clients: dict[tuple[str, str, float], Any] = {}
        self._signatures: dict[str, list[dict]] = {}
        self._out = threading.Lock()

    # -- channels --

    def _client(self, kind: str, address: str, timeout_s: float):
        key = (kind, address, timeout_s)
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                if kind == "admin":
                    client = AdminClient(address, self.operator, timeout_s=timeout_s)
                elif kind == "decisions":
                    client = DecisionsClient(address, self.operator, timeout_s=timeout_s)
                else:
                    client = grpc.secure_channel(
                        address,
                        channel_credentials(self.client),
                        options=secure_channel_options(Role.NODE, None),
                    )
                self._clients[key] = client
            return client

    def _drop(self, address: str) -> None:
        """Forget the channels to `address` so the next call dials afresh. They are closed a little
        later, not now: closing a channel cancels every call still in flight on it."""
        with self._lock:
            retired = [self._clients.pop(k) for k in [k for k in self._clients if k[1] == address]]
        for client in retired:
            timer = threading.Timer(RETIRED_CHANNEL_CLOSE_S, _close_quietly, args=(client,))
            timer.daemon = True
            timer.start()

    def _call(self, address: str, fn: Callable[[], Any], phase: str) -> Any:
        try:
            return fn()
        except AdminError as exc:
            code = exc.code.name if exc.code is not None else "CLIENT"
            if code in UNCERTAIN_CODES:
                self._drop(address)
            raise CallFailed(code, str(exc), phase) from None
        except grpc.RpcError as exc:
            code = exc.code().name
            if code in UNCERTAIN_CODES:
                self._drop(address)
            raise CallFailed(code, f"{address}: {code}: {exc.details()}", phase) from None

    # -- operations --

    def status(self, address: str, timeout_s: float = 2.0) -> dict:
        resp = self._call(address, lambda: self._client("admin", address, timeout_s).status(), "status")
        return status_dict(resp)

    def inference(self, address: str, timeout_s: float = 2.0) -> dict:
        s = self._call(address, lambda: self._client("admin", address, timeout_s).inference(), "inference")
        return {
            "enabled": s.enabled,
            "model": s.model,
            "active_version": s.active_version,
            "active_sha256": s.active_sha256,
            "previous_version": s.previous_version,
            "last_activation_error": s.last_activation_error,
            "signature_json": s.signature_json,
        }

    def models(self, address: str, timeout_s: float = 2.0) -> dict:
        resp = self._call(address, lambda: self._client("admin", address, timeout_s).models(), "models")
        return {
            "versions": [
                {
                    "name": v.name,
                    "version": v.version,
                    "phase": v.phase,
                    "origin": v.origin,
                    "serving": v.serving,
                    "error": v.error,
                    "manifest_digest": v.manifest_digest,
                }
                for v in resp.versions
            ]
        }

    def routes(self, address: str, timeout_s: float = 3.0) -> dict:
        started = time.monotonic()
        resp = self._call(address, lambda: self._client("decisions", address, timeout_s).routes(), "routes")
        return {
            "group": _view(resp.group),
            "routes": dict(resp.routes),
            "allocations": dict(resp.allocations),
            "elapsed_s": round(time.monotonic() - started, 4),
        }

    def pending(self, address: str, timeout_s: float = 3.0) -> dict:
        resp = self._call(address, lambda: self._client("decisions", address, timeout_s).pending(), "pending")
        return {
            "group": _view(resp.group),
            "held": [
                {
                    "decision_id": h.decision_id,
                    "kind": h.kind,
                    "decision": json.loads(h.decision_json),
                    "expires_at": h.expires_at,
                }
                for h in resp.held
            ],
        }

    def audit(self, address: str, timeout_s: float = 8.0) -> dict:
        client = self._client("decisions", address, timeout_s)
        resp = self._call(address, lambda: client.audit(verify=True, limit=0), "audit")
        v = resp.verdict
        return {
            "node_id": resp.group.node_id,
            "group": resp.group.group,
            "path": resp.path,
            "total_records": resp.total_records,
            "verdict": {
                "ok": v.ok,
                "records": v.records,
                "first_bad_seq": v.first_bad_seq or None,
                "reason": v.reason,
            },
            "records": [
                {"seq": r.seq, "time": r.time, "kind": r.kind, "payload": json.loads(r.payload_json)}
                for r in resp.records
            ],
        }

    def move(
        self,
        address: str,
        streams: list[str],
        to_node: str,
        proposer: str = "chaos",
        reason: str = "chaos workload",
        timeout_s: float = 8.0,
    ) -> dict:
        """As `mesh admin move`: read the routes through the node, then propose the move there."""
        client = self._client("decisions", address, timeout_s)
        current = self._call(address, client.routes, "routes")
        unknown = [s for s in streams if s not in current.routes]
        if unknown:
            raise CallFailed("CLIENT", f"no route for {', '.join(unknown)} on {address}", "routes")
        moves = tuple(
            StreamMove(s, current.routes[s], to_node) for s in streams if current.routes[s] != to_node
        )
        if not moves:
            raise CallFailed("CLIENT", f"{', '.join(streams)} already served by {to_node}", "routes")
        decision = Decision(
            kind=DecisionKind.MOVE_STREAMS,
            group=current.group.group,
            proposer=proposer,
            reason=reason,
            proposed_at=time.time(),
            nonce=secrets.token_hex(8),
            moves=moves,
        )
        base = {
            "decision_id": decision.decision_id,
            "group": decision.group,
            "moves": [m.to_dict() for m in moves],
            "read_current": current.group.current,
        }
        try:
            result = self._call(address, lambda: client.propose(decision.to_dict()), "propose")
        except CallFailed as exc:
            exc.detail = base  # type: ignore[attr-defined]
            raise
        return {
            **base,
            "outcome": result.outcome,
            "message": result.message,
            "refusal_reason": result.refusal_reason or None,
            "view": _view(result.group),
        }

    def approve(
        self,
        address: str,
        pick: int = 0,
        decision_id: str | None = None,
        ttl_s: float = 600.0,
        timeout_s: float = 8.0,
    ) -> dict:
        """As `mesh admin approve`: list what the node holds, sign an approval of one, send it."""
        client = self._client("decisions", address, timeout_s)
        resp = self._call(address, client.pending, "pending")
        held = list(resp.held)
        if decision_id is not None:
            held = [h for h in held if h.decision_id == decision_id]
        if not held:
            return {"outcome": "nothing_held", "decision_id": decision_id}
        chosen = held[pick % len(held)]
        decision = Decision.from_dict(json.loads(chosen.decision_json))
        if decision.decision_id != chosen.decision_id:
            raise CallFailed(
                "CLIENT", f"node sent decision {decision.decision_id} for id {chosen.decision_id}", "pending"
            )
        approval = sign_approval(
            self.operator_key,
            decision,
            now=time.time(),
            ttl_s=ttl_s,
            nonce=secrets.token_urlsafe(18),
            approve=True,
            reason="chaos workload",
        )
        base = {
            "decision_id": decision.decision_id,
            "kind": decision.kind.value,
            "group": decision.group,
            "moves": [m.to_dict() for m in decision.moves],
            "key_id": self.operator_key.key_id,
        }
        try:
            result = self._call(address, lambda: client.approve(approval.to_dict()), "approve")
        except CallFailed as exc:
            exc.detail = base  # type: ignore[attr-defined]
            raise
        return {
            **base,
            "outcome": result.outcome,
            "message": result.message,
            "refusal_reason": result.refusal_reason or None,
        }

    def rollout(
        self,
        address: str,
        action: str,
        rollout_id: str,
        model: str = "",
        version: str = "",
        baseline: str = "",
        wave: int = 0,
        options: list[str] | None = None,
        timeout_s: float = 40.0,
    ) -> dict:
        """`mesh rollout ACTION` as an operator types it, through the real CLI, run in this namespace.

        start signs the plan with the fleet's publisher key; approve, resume and abort sign a command
        with the operator key. The reply is the command's JSON (`outcome` "refused" when the node said
        no). A call that never reached a decision raises with the gRPC code the CLI names."""
        fleet = self.fleet_dir
        if action == "start":
            args = ["start", model, version, "--baseline", baseline, "--id", rollout_id]
            args += ["--key", str(fleet / "publisher.key"), *(options or [])]
        else:
            args = [action, rollout_id, "--key", str(fleet / "operator.key")]
            if action in ("approve", "promote"):
                args += ["--wave", str(wave)]
            if action == "abort":
                args += ["--reason", "chaos workload: not finished after the heal"]
        args += ["--node", address, "--creds", str(fleet / "operators" / "admin"), "--json"]
        try:
            done = subprocess.run(
                [sys.executable, "-m", "mesh", "rollout", *args],
                capture_output=True,
                text=True,
                timeout=timeout_s,
                env={**os.environ, "GRPC_VERBOSITY": "ERROR"},
            )
        except subprocess.TimeoutExpired:
            raise CallFailed(
                "DEADLINE_EXCEEDED", f"mesh rollout {action} ran over {timeout_s:g}s", action
            ) from None
        if done.stdout.strip():
            with contextlib.suppress(ValueError):
                return json.loads(done.stdout)  # refused answers come with JSON and exit 1
        # The CLI's console wraps long messages: look for the gRPC code in all of stderr, not its last line.
        said = " ".join(done.stderr.split()) or f"exit {done.returncode}"
        named = re.search(r": ([A-Z_]{4,}): ", said)
        raise CallFailed(named.group(1) if named else "CLI", said.removeprefix("error: ")[:300], action)

    def rollout_status(self, address: str, rollout_id: str, timeout_s: float = 3.0) -> dict:
        """The rollout's status document as `mesh rollout status --json` prints it."""
        client = self._rollout_client(address, timeout_s)
        return self._call(address, lambda: client.status(rollout_id), "rollout_status")

    def rollout_documents(self, address: str, rollout_id: str, timeout_s: float = 3.0) -> dict:
        """What the node holds of a rollout: its own site's replicated state (with the wave thresholds)
        and its own decision as a device (the version it should serve, and why)."""
        client = self._rollout_client(address, timeout_s)
        docs = self._call(address, lambda: client.documents(rollout_id), "rollout_documents")
        return {
            "node_id": docs.node_id,
            "site": docs.site,
            "has_plan": bool(docs.signed_plan_json),
            "site_state": json.loads(docs.site_state_json) if docs.site_state_json else None,
            "device": json.loads(docs.device_json) if docs.device_json else None,
        }

    def _rollout_client(self, address: str, timeout_s: float):
        from mesh.admin.rollout_client import RolloutClient

        key = ("rollout", address, timeout_s)
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                client = self._clients[key] = RolloutClient(address, self.operator, timeout_s=timeout_s)
            return client

    def infer(self, address: str, stream_id: str, seed: int = 0, timeout_s: float = 3.0) -> dict:
        inputs = self._inputs(address)
        rng = np.random.default_rng(seed)
        tensors = []
        for spec in inputs:
            shape = tuple(d if d > 0 else 1 for d in spec["shape"])
            dtype = np.dtype(spec["dtype"])
            if dtype.kind == "f":
                x = rng.standard_normal(shape).astype(dtype)
            else:
                info = np.iinfo(dtype)
                x = rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
            tensors.append(
                inference_pb2.Tensor(
                    name=spec["name"], dtype=spec["dtype"], shape=list(shape), data=x.tobytes()
                )
            )
        channel = self._client("infer", address, timeout_s)
        stub = inference_pb2_grpc.InferenceStub(channel)
        request = inference_pb2.InferRequest(inputs=tensors, stream_id=stream_id)
        reply = self._call(address, lambda: stub.Infer(request, timeout=timeout_s), "infer")
        return {"model": reply.model, "version": reply.version, "stream_id": reply.stream_id}

    def _inputs(self, address: str) -> list[dict]:
        """The active model's input tensors (name, dtype, shape), from the node's Inference status
        (`signature_json`, as `mesh infer` reads it). Every version of the chaos model has the same
        inputs, so they are asked for once."""
        with self._lock:
            cached = self._signatures.get("inputs")
        if cached is not None:
            return cached
        status = self.inference(address)
        if not status["signature_json"]:
            raise CallFailed(
                "FAILED_PRECONDITION",
                f"{address} serves no model yet ({status['last_activation_error'] or 'nothing activated'})",
                "inference",
            )
        inputs = [
            {"name": t["name"], "dtype": t["dtype"], "shape": [int(d) for d in t["shape"]]}
            for t in json.loads(status["signature_json"])["inputs"]
        ]
        with self._lock:
            self._signatures["inputs"] = inputs
        return inputs

    # -- the loop --

    def handle(self, request: dict) -> dict:
        rid = request.get("id")
        op = request.get("op")
        args = request.get("args", {})
        method = getattr(self, op, None) if op in OPS else None
        if method is None:
            return {"id": rid, "ok": False, "code": "CLIENT", "error": f"unknown op {op!r}", "phase": ""}
        try:
            return {"id": rid, "ok": True, "result": method(**args)}
        except CallFailed as exc:
            reply = {"id": rid, "ok": False, "code": exc.code, "error": str(exc), "phase": exc.phase}
            if hasattr(exc, "detail"):
                reply["detail"] = exc.detail
            return reply
        except Exception as exc:  # noqa: BLE001 - one bad call must not end the agent
            return {
                "id": rid,
                "ok": False,
                "code": "CLIENT",
                "error": f"{type(exc).__name__}: {exc}",
                "phase": op or "",
            }

    def reply(self, message: dict) -> None:
        line = json.dumps(message, separators=(",", ":"))
        with self._out:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def serve(self, stream) -> None:
        self.reply({"id": None, "ok": True, "result": "ready"})
        for line in stream:
            line = line.strip()
            if not line:
                continue
            try:
                request = json.loads(line)
            except ValueError:
                self.reply({"id": None, "ok": False, "code": "CLIENT", "error": f"not JSON: {line[:80]}"})
                continue
            self.pool.submit(lambda r=request: self.reply(self.handle(r)))
        self.pool.shutdown(wait=False, cancel_futures=True)


OPS = {
    "status",
    "inference",
    "models",
    "routes",
    "pending",
    "audit",
    "move",
    "approve",
    "infer",
    "rollout",
    "rollout_status",
    "rollout_documents",
}


def main() -> None:
    parser = argparse.ArgumentParser(description="chaos client agent (run inside the client namespace)")
    parser.add_argument("--fleet", required=True, type=Path, help="fleet directory (mesh fleet init)")
    parser.add_argument("--client-creds", required=True, type=Path, help="node certificate of the client")
    parser.add_argument("--workers", type=int, default=32)
    args = parser.parse_args()
    Agent(args.fleet, args.client_creds, args.workers).serve(sys.stdin)


if __name__ == "__main__":
    main()
