"""`mesh infer`: smoke-test a node's inference with random inputs shaped like its model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from mesh.cli.common import (
    ADMIN_CREDS_ENV,
    CONTEXT,
    DEFAULT_ADMIN_CREDS,
    call_or_exit,
    console,
    emit_json,
    fail,
)


@click.command("infer", context_settings=CONTEXT,
               epilog="Examples:\n\n  mesh infer --node 127.0.0.1:7000 --creds fleet/nodes/cam-01\n\n"
                      "  mesh infer --node 127.0.0.1:7000 --creds fleet/nodes/cam-01 --count 20 --json")
@click.option("--node", "address", required=True, metavar="HOST:PORT", help="A node's gRPC address.")
@click.option("--creds", "creds_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="A fleet certificate folder (node or operator).")
@click.option("--admin-creds", "admin_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              show_default=f"${ADMIN_CREDS_ENV}, else --creds if it is an operator's, "
                           f"else ./{DEFAULT_ADMIN_CREDS}",
              help="Operator certificate, to read the active model's input signature.")
@click.option("--count", type=click.IntRange(1, 10_000), default=1, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random inputs.")
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON.")
def infer_command(address: str, creds_dir: Path, admin_dir: Path | None, count: int, seed: int,
                  as_json: bool) -> None:
    """Smoke-test a node's inference: send random inputs shaped like its active model's signature."""
    import time

    import grpc
    import numpy as np

    from mesh._proto import inference_pb2, inference_pb2_grpc
    from mesh.artifacts.signature import ModelSignature
    from mesh.identity.ca import Role, load_credentials
    from mesh.identity.signing import IdentityError
    from mesh.identity.tls import channel_credentials, secure_channel_options

    try:
        creds = load_credentials(creds_dir)
    except IdentityError as exc:
        fail(str(exc))
    if admin_dir is None:
        # An operator's folder in --creds serves both calls, wherever the command runs from.
        env = os.environ.get(ADMIN_CREDS_ENV)
        if env:
            admin_dir = Path(env)
        else:
            admin_dir = creds_dir if creds.role is Role.OPERATOR else Path(DEFAULT_ADMIN_CREDS)
    status = call_or_exit(address, admin_dir, lambda client: client.inference(), flag="--admin-creds")
    if not status.enabled or not status.signature_json:
        fail(f"{address} serves no model yet" + (f" ({status.last_activation_error})"
                                                  if status.last_activation_error else ""))
    signature = ModelSignature.from_dict(json.loads(status.signature_json))
    rng = np.random.default_rng(seed)
    results = []
    channel = grpc.secure_channel(address, channel_credentials(creds),
                                  options=secure_channel_options(Role.NODE, None))
    stub = inference_pb2_grpc.InferenceStub(channel)
    try:
        for _ in range(count):
            tensors = []
            for spec in signature.inputs:
                shape = tuple(d if d > 0 else 1 for d in spec.shape)
                dtype = np.dtype(spec.dtype)
                if dtype.kind == "f":
                    x = rng.standard_normal(shape).astype(dtype)
                else:
                    info = np.iinfo(dtype) if dtype.kind in "iu" else None
                    x = rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True) if info \
                        else rng.integers(0, 2, size=shape).astype(dtype)
                tensors.append(inference_pb2.Tensor(name=spec.name, dtype=spec.dtype, shape=list(shape),
                                                    data=x.tobytes()))
            start = time.perf_counter()
            try:
                reply = stub.Infer(inference_pb2.InferRequest(inputs=tensors), timeout=10)
            except grpc.RpcError as exc:
                fail(f"{address}: {exc.code().name}: {exc.details()}")
            results.append({"model": reply.model, "version": reply.version,
                            "latency_ms": round((time.perf_counter() - start) * 1000, 2),
                            "outputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)}
                                        for t in reply.outputs]})
    finally:
        channel.close()
    if as_json:
        emit_json(results)
        return
    last = results[-1]
    latencies = sorted(r["latency_ms"] for r in results)
    outputs = ", ".join(f"{o['name']} {o['dtype']}{o['shape']}" for o in last["outputs"])
    console.print(f"{address}: {count} requests answered by {last['model']} {last['version']} "
                  f"({status.backend} {status.backend_version}); median {latencies[len(latencies) // 2]} ms; "
                  f"outputs {outputs}")
