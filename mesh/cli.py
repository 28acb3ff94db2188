"""The `mesh` command: fleet setup, the node binary, the admin client, the demo.

Exit codes: 0 done, 1 failed, 2 usage error (bad flags, bad config file).
Human output by default; `--json` where scripts want to read the result.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from pathlib import Path

import click
from rich.console import Console

from mesh import __version__

# Piped output (CI logs, `make demo | tee`) has no terminal width; rich would
# fall back to 80 columns and truncate addresses in tables.
_PIPE_WIDTH = None if sys.stdout.isatty() else 120
console = Console(width=_PIPE_WIDTH)
err_console = Console(stderr=True, width=_PIPE_WIDTH)

EXIT_FAILED = 1
EXIT_USAGE = 2

_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _fail(message: str, code: int = EXIT_FAILED) -> "NoReturn":  # noqa: F821
    err_console.print(f"[red]error:[/] {message}", highlight=False)
    sys.exit(code)


def _emit_json(data) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


@click.group(context_settings=_CONTEXT)
@click.version_option(__version__, prog_name="mesh")
def main() -> None:
    """fleetmesh: a peer-to-peer coordination mesh for edge-AI fleets.

    \b
    Start here:
      mesh fleet init ./fleet                 make a fleet CA and signing keys
      mesh fleet enroll cam-01 --fleet ./fleet
      mesh node --config node.toml            run a node (see README for the config)
      mesh admin status --node 127.0.0.1:7000 the node's view of the fleet
      mesh demo                               a 12-node cluster on loopback
    """


# -- fleet -----------------------------------------------------------------

@main.group(context_settings=_CONTEXT)
def fleet() -> None:
    """Create a fleet's CA and keys, and enroll nodes and operators."""


@fleet.command("init", epilog="Example:\n\n  mesh fleet init ./fleet")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--fleet-id", help="Name of the fleet (default: random).")
@click.option("--force", is_flag=True, help="Overwrite a fleet that already exists in DIRECTORY.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def fleet_init(directory: Path, fleet_id: str | None, force: bool, as_json: bool) -> None:
    """Create a fleet in DIRECTORY: CA, publisher and operator signing keys, an operator certificate.

    Keep ca.key, publisher.key and operator.key off the devices: nodes only
    need their own certificate folder from `mesh fleet enroll`.
    """
    from mesh.identity.ca import init_fleet
    from mesh.identity.signing import IdentityError

    try:
        made = init_fleet(directory, fleet_id=fleet_id, force=force)
    except IdentityError as exc:
        _fail(str(exc))
    if as_json:
        _emit_json({"fleet_id": made.fleet_id, "directory": str(directory),
                    "publisher_key_id": made.publisher_key_id, "operator_key_id": made.operator_key_id})
        return
    console.print(f"fleet [bold]{made.fleet_id}[/] created in {directory}")
    console.print(f"  publisher key {made.publisher_key_id}, operator key {made.operator_key_id}")
    console.print(f"  operator certificate: {directory / 'operators' / 'admin'}")
    console.print(f"next: mesh fleet enroll NODE_ID --fleet {directory}")


@fleet.command("enroll", epilog="Examples:\n\n  mesh fleet enroll cam-01 --fleet ./fleet\n\n"
                                "  mesh fleet enroll alice --role operator --fleet ./fleet")
@click.argument("name")
@click.option("--fleet", "fleet_dir", type=click.Path(file_okay=False, path_type=Path),
              default=lambda: os.environ.get("MESH_FLEET", "fleet"), show_default="$MESH_FLEET or ./fleet",
              help="The fleet directory made by `mesh fleet init`.")
@click.option("--role", type=click.Choice(["node", "operator"]), default="node", show_default=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where to write cert.pem, key.pem, ca.pem (default: FLEET/nodes/NAME or FLEET/operators/NAME).")
@click.option("--days", type=click.IntRange(1, 3650), default=365, show_default=True, help="Validity.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def fleet_enroll(name: str, fleet_dir: Path, role: str, out_dir: Path | None, days: int, as_json: bool) -> None:
    """Issue a certificate for node (or operator) NAME, signed by the fleet CA."""
    from mesh.identity.ca import Role, enroll
    from mesh.identity.signing import IdentityError

    try:
        creds = enroll(fleet_dir, name, role=Role(role), out_dir=out_dir, validity_days=days)
    except IdentityError as exc:
        _fail(str(exc))
    if as_json:
        _emit_json({"name": name, "role": role, "directory": str(creds.directory)})
    else:
        console.print(f"{role} [bold]{name}[/] enrolled: {creds.directory}")


# -- node ------------------------------------------------------------------

@main.command(context_settings=_CONTEXT, epilog="""Example node.toml:

\b
  node_id = "cam-01"
  listen = "0.0.0.0:7000"
  advertise = "10.0.4.17:7000"
  seeds = ["10.0.4.1:7000"]
  data_dir = "/var/lib/fleetmesh"
  metrics_listen = "0.0.0.0:9100"
  [labels]
  site = "berlin-1"
  [tls]
  dir = "/etc/fleetmesh/node"

Then: mesh node --config node.toml""")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The node's TOML configuration file.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              help="Overrides log_level from the config file.")
def node(config_path: Path, log_level: str | None) -> None:
    """Run a fleet node until SIGTERM/SIGINT, then leave the cluster gracefully."""
    from mesh.identity.signing import IdentityError
    from mesh.node.config import ConfigError, load_config
    from mesh.node.runtime import Node, NodeStartError

    try:
        config = load_config(config_path)
    except ConfigError as exc:
        _fail(str(exc), EXIT_USAGE)
    logging.basicConfig(level=(log_level or config.log_level).upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(Node(config).run_until_signalled())
    except (NodeStartError, IdentityError) as exc:
        _fail(f"{config_path}: {exc}")


# -- admin -----------------------------------------------------------------

@main.group(context_settings=_CONTEXT)
def admin() -> None:
    """Operator commands against a running node (need an operator certificate)."""


def _admin_options(fn):
    fn = click.option("--node", "address", required=True, metavar="HOST:PORT", help="A node's gRPC address.")(fn)
    fn = click.option("--creds", "creds_dir", type=click.Path(file_okay=False, path_type=Path),
                      default=lambda: os.environ.get("MESH_ADMIN_CREDS", "fleet/operators/admin"),
                      show_default="$MESH_ADMIN_CREDS or ./fleet/operators/admin",
                      help="Operator certificate folder (cert.pem, key.pem, ca.pem).")(fn)
    fn = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")(fn)
    return fn


def _admin_client(address: str, creds_dir: Path, client_class=None):
    """An operator client (AdminClient unless told) for NODE; exit 1 saying why if it cannot be made."""
    from mesh.admin.client import AdminClient, AdminError
    from mesh.identity.ca import load_credentials
    from mesh.identity.signing import IdentityError

    try:
        return (client_class or AdminClient)(address, load_credentials(creds_dir))
    except (AdminError, IdentityError) as exc:
        _fail(str(exc))


def _admin_call(address: str, creds_dir: Path, call, client_class=None):
    """`call(client)` on a fresh operator client, closed after; exit 1 with the error if it fails."""
    from mesh.admin.client import AdminError

    with _admin_client(address, creds_dir, client_class) as client:
        try:
            return call(client)
        except AdminError as exc:
            _fail(str(exc))


@admin.command("status", epilog="Examples:\n\n  mesh admin status --node 127.0.0.1:7000\n\n"
                                "  mesh admin status --node 127.0.0.1:7000 --json | jq '.members[].state'")
@_admin_options
def admin_status(address: str, creds_dir: Path, as_json: bool) -> None:
    """Show NODE's view of the fleet: id, address, site, state, incarnation, last heard."""
    from mesh.admin.format import status_dict, status_table

    resp = _admin_call(address, creds_dir, lambda client: client.status())
    if as_json:
        _emit_json(status_dict(resp))
    else:
        console.print(status_table(resp))


# -- model -----------------------------------------------------------------

@main.group(context_settings=_CONTEXT)
def model() -> None:
    """Publish model versions and see what a node holds."""


@model.command("publish", epilog="Example:\n\n  mesh model publish hand.tflite --name hand-landmark --version 1.4 "
                                  "\\\n      --key fleet/publisher.key --data-dir /var/lib/fleetmesh\n\n"
                                  "The node using that data dir (the origin) announces the version within a "
                                  "second; peers fetch it from each other.")
@click.argument("model_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", required=True, help="Model name (letters, digits, '.', '_', '-').")
@click.option("--version", "version", required=True, help="Version; a published version is immutable.")
@click.option("--key", "key_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The fleet's publisher signing key (publisher.key from `mesh fleet init`).")
@click.option("--data-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The origin node's data_dir (its store is DATA_DIR/artifacts).")
@click.option("--chunk-kib", type=click.Choice(["64", "128", "256", "512", "1024"]), default=None,
              callback=lambda ctx, param, value: None if value is None else int(value),
              help="Average content-defined chunk size (KiB). Default: as the newest version of this model "
                   "published here (same cuts, so peers fetch only changed chunks), else 256.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest summary as JSON.")
def model_publish(model_file: Path, name: str, version: str, key_path: Path, data_dir: Path,
                  chunk_kib: int | None, as_json: bool) -> None:
    """Check MODEL_FILE loads, chunk it, sign its manifest and store it at the origin node."""
    from mesh.artifacts.chunking import ChunkParams
    from mesh.artifacts.manifest import ArtifactError
    from mesh.artifacts.publish import chunking_for, publish
    from mesh.artifacts.store import ArtifactStore
    from mesh.identity.signing import IdentityError, KeyRole, load_signing_key

    try:
        key = load_signing_key(key_path, KeyRole.PUBLISHER)
        store = ArtifactStore(data_dir / "artifacts")
        if chunk_kib is None:
            params, like = chunking_for(store, name)
        else:
            params, like = ChunkParams(avg_size_bytes=chunk_kib * 1024), None
        signed = publish(model_file, name=name, version=version, key=key, store=store, params=params)
    except (ArtifactError, IdentityError, OSError) as exc:
        _fail(str(exc))
    m = signed.manifest
    summary = {"name": m.name, "version": m.version, "size_bytes": m.size_bytes, "sha256": m.sha256,
               "chunks": len(m.chunks), "chunk_avg_bytes": params.avg_size_bytes, "chunking_from": like,
               "manifest_digest": m.digest, "publisher_key_id": m.publisher_key_id}
    if as_json:
        _emit_json(summary)
    else:
        how = f"chunked like {m.name} {like}" if like else f"{params.avg_size_bytes // 1024} KiB average chunks"
        console.print(f"published [bold]{m.name} {m.version}[/]: {m.size_bytes} bytes in {len(m.chunks)} chunks "
                      f"({how}), manifest {m.digest[:16]}..., signed by publisher key {m.publisher_key_id}")


@model.command("ls", epilog="Example:\n\n  mesh model ls --data-dir /var/lib/fleetmesh")
@click.option("--data-dir", required=True, type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="A node's data_dir.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def model_ls(data_dir: Path, as_json: bool) -> None:
    """List the model versions in a node's store and whether each is complete."""
    from dataclasses import asdict

    from mesh.admin.format import versions_table
    from mesh.artifacts.manifest import ArtifactError
    from mesh.artifacts.store import ArtifactStore

    try:
        versions = ArtifactStore(data_dir / "artifacts").versions()
    except (ArtifactError, OSError) as exc:
        _fail(str(exc))
    rows = [dict(asdict(v), phase="complete" if v.complete else "partial") for v in versions]
    if as_json:
        _emit_json(rows)
    else:
        console.print(versions_table(rows, title=f"models in {data_dir}"))


@model.command("status", epilog="Examples:\n\n  mesh model status --node 127.0.0.1:7000\n\n"
                                 "  mesh model status --node 127.0.0.1:7000 --watch   # progress bars until done")
@_admin_options
@click.option("--watch", is_flag=True, help="Show progress bars until every version is complete or failed.")
def model_status(address: str, creds_dir: Path, as_json: bool, watch: bool) -> None:
    """Per-version progress on a running node (chunks held, bytes, phase, errors)."""
    from google.protobuf.json_format import MessageToDict

    from mesh.admin.client import AdminError
    from mesh.admin.format import versions_table

    with _admin_client(address, creds_dir) as client:
        try:
            resp = client.models()
            if watch and not as_json:
                _watch_models(client, resp)
                resp = client.models()
        except AdminError as exc:
            _fail(str(exc))
    rows = [MessageToDict(v, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
            for v in resp.versions]
    if as_json:
        _emit_json(rows)
    else:
        console.print(versions_table(rows, title=f"models on {address}"))
    if any(r["phase"] == "failed" for r in rows):
        sys.exit(EXIT_FAILED)


def _watch_models(client, resp) -> None:
    import time

    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TextColumn("{task.fields[phase]}"),
                  TimeElapsedColumn(), console=console) as bars:
        tasks = {}
        while True:
            for v in resp.versions:
                key = (v.name, v.version)
                if key not in tasks:
                    tasks[key] = bars.add_task(f"{v.name} {v.version}", total=v.size_bytes or None, phase=v.phase)
                bars.update(tasks[key], completed=v.bytes_have, total=v.size_bytes or None, phase=v.phase)
            if all(v.phase in ("complete", "failed") for v in resp.versions):
                return
            time.sleep(0.5)  # polling a remote node for a progress display
            resp = client.models()


@model.command("optimize", epilog="Example:\n\n  mesh model optimize detector.tflite detector-int8.tflite --int8 "
                                   "--calibration samples.npz\n\n"
                                   "samples.npz holds one array per input name (or arr_0, arr_1, ...) shaped "
                                   "(samples, *input_shape), taken from real inputs.")
@click.argument("in_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("out_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--int8", "int8", is_flag=True, required=True,
              help="Full-integer post-training quantisation (the only optimisation so far).")
@click.option("--calibration", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Representative inputs (.npz) for calibration and for the agreement check.")
@click.option("--tolerance", type=click.FloatRange(0.0, 1.0, min_open=True), default=0.05, show_default=True,
              help="Largest allowed output error, as a fraction of each float output's range.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def model_optimize(in_file: Path, out_file: Path, int8: bool, calibration: Path, tolerance: float,
                   as_json: bool) -> None:
    """Quantise a float32 model to INT8 with LiteRT's calibrator; refuse it if outputs disagree."""
    from mesh.inference.optimize import OptimizeError, QuantizationRejected, optimize_file

    try:
        report = optimize_file(in_file, out_file, calibration, tolerance=tolerance)
    except QuantizationRejected as exc:
        if as_json:
            _emit_json(exc.report.to_dict())
        _fail(f"{exc} ({out_file} not written)")
    except OptimizeError as exc:
        _fail(str(exc))
    if as_json:
        _emit_json(report.to_dict())
        return
    console.print(f"[green]wrote[/] {out_file}: {report.size_before_bytes:,} -> {report.size_after_bytes:,} bytes "
                  f"({report.size_ratio:.2f}x smaller), {report.samples} calibration samples")
    for out in report.outputs:
        console.print(f"  output {out.name}: max error {out.max_abs_error:.4g} = {out.relative_error:.2%} of its "
                      f"range (tolerance {tolerance:.0%})")


@main.command("infer", context_settings=_CONTEXT,
              epilog="Examples:\n\n  mesh infer --node 127.0.0.1:7000 --creds fleet/nodes/cam-01\n\n"
                     "  mesh infer --node 127.0.0.1:7000 --creds fleet/nodes/cam-01 --count 20 --json")
@click.option("--node", "address", required=True, metavar="HOST:PORT", help="A node's gRPC address.")
@click.option("--creds", "creds_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="A fleet certificate folder (node or operator).")
@click.option("--admin-creds", "admin_dir", type=click.Path(file_okay=False, path_type=Path),
              default=lambda: os.environ.get("MESH_ADMIN_CREDS", "fleet/operators/admin"),
              show_default="$MESH_ADMIN_CREDS or ./fleet/operators/admin",
              help="Operator certificate, to read the active model's input signature.")
@click.option("--count", type=click.IntRange(1, 10_000), default=1, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random inputs.")
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON.")
def infer_command(address: str, creds_dir: Path, admin_dir: Path, count: int, seed: int, as_json: bool) -> None:
    """Smoke-test a node's inference: send random inputs shaped like its active model's signature."""
    import time

    import grpc
    import numpy as np

    from mesh._proto import inference_pb2, inference_pb2_grpc
    from mesh.identity.ca import Role, load_credentials
    from mesh.identity.signing import IdentityError
    from mesh.identity.tls import channel_credentials, secure_channel_options
    from mesh.artifacts.signature import ModelSignature

    status = _admin_call(address, admin_dir, lambda client: client.inference())
    if not status.enabled or not status.signature_json:
        _fail(f"{address} serves no model yet" + (f" ({status.last_activation_error})"
                                                   if status.last_activation_error else ""))
    signature = ModelSignature.from_dict(json.loads(status.signature_json))
    try:
        creds = load_credentials(creds_dir)
    except IdentityError as exc:
        _fail(str(exc))
    rng = np.random.default_rng(seed)
    results = []
    channel = grpc.secure_channel(address, channel_credentials(creds), options=secure_channel_options(Role.NODE, None))
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
                _fail(f"{address}: {exc.code().name}: {exc.details()}")
            results.append({"model": reply.model, "version": reply.version,
                            "latency_ms": round((time.perf_counter() - start) * 1000, 2),
                            "outputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)}
                                        for t in reply.outputs]})
    finally:
        channel.close()
    if as_json:
        _emit_json(results)
        return
    last = results[-1]
    latencies = sorted(r["latency_ms"] for r in results)
    outputs = ", ".join(f"{o['name']} {o['dtype']}{o['shape']}" for o in last["outputs"])
    console.print(f"{address}: {count} requests answered by {last['model']} {last['version']} "
                  f"({status.backend} {status.backend_version}); median {latencies[len(latencies) // 2]} ms; "
                  f"outputs {outputs}")


# -- demo ------------------------------------------------------------------

@main.command(context_settings=_CONTEXT, epilog="Example:\n\n  mesh demo --nodes 12 --sites 3")
@click.option("--nodes", type=click.IntRange(3, 64), default=12, show_default=True)
@click.option("--sites", type=click.IntRange(1, 16), default=3, show_default=True)
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-run"),
              show_default=True, help="Where the fleet, configs and node logs go (replaced on each run).")
@click.option("--base-port", type=click.IntRange(1024, 65000), default=17400, show_default=True)
@click.option("--model", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="The .tflite model to spread peer to peer (default: mediapipe's hand landmark model "
                   "from `make models`).")
def demo(nodes: int, sites: int, workdir: Path, base_port: int, model: Path | None) -> None:
    """Run a local fleet on loopback (mTLS on): membership converges, a real model spreads peer to
    peer, a killed node is detected, everyone leaves cleanly."""
    from mesh.demo import DemoFailed, run_demo

    try:
        run_demo(nodes=nodes, sites=sites, workdir=workdir, base_port=base_port, console=console, model=model)
    except DemoFailed as exc:
        _fail(str(exc))


def _register_decision_commands() -> None:
    # After `admin` and its option helpers exist: the decision commands reuse them.
    from mesh.admin.decisions import register

    register(admin)


_register_decision_commands()

if __name__ == "__main__":
    main()
