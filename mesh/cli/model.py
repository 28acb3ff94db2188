"""`mesh model`: publish versions at an origin, see what a store or a running node holds, optimise."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from mesh.cli.common import (
    CONTEXT,
    EXIT_FAILED,
    admin_options,
    console,
    emit_json,
    err_console,
    fail,
    operator_client,
)

if TYPE_CHECKING:
    from mesh.identity.signing import SigningKey

# A watched version is finished in these phases; every other phase is still moving.
_DONE_PHASES = ("complete", "failed", "refused")
_WATCH_POLL_S = 0.5  # polling a remote node for a progress display

_PUBLISH_EPILOG = """Example:

  mesh model publish hand.tflite --name hand-landmark --version 1.4 \\
      --key fleet/publisher.key --data-dir /var/lib/fleetmesh

The node using that data dir (the origin) announces the version within a second; peers fetch it from \
each other."""
_STATUS_EPILOG = """Examples:

  mesh model status --node 127.0.0.1:7000

  mesh model status --node 127.0.0.1:7000 --watch   # progress bars until done

  mesh model status --node 127.0.0.1:7000 --watch --version 1.4   # right after a publish"""
_OPTIMIZE_EPILOG = """Example:

  mesh model optimize detector.tflite detector-int8.tflite --int8 --calibration samples.npz

samples.npz holds one array per input name (or arr_0, arr_1, ...) shaped (samples, *input_shape), \
taken from real inputs."""


@click.group(context_settings=CONTEXT)
def model() -> None:
    """Publish model versions and see what a node holds."""


@model.command("publish", epilog=_PUBLISH_EPILOG)
@click.argument("model_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", required=True, help="Model name (letters, digits, '.', '_', '-').")
@click.option("--version", "version", required=True, help="Version; a published version is immutable.")
@click.option("--key", "key_path", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The fleet's publisher signing key (publisher.key from `mesh fleet init`).")
@click.option("--data-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The origin node's data_dir (its store is DATA_DIR/artifacts).")
@click.option("--fleet", "fleet_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the fleet's publisher.pub is, to check --key against before anything is "
                   "written: the fleet folder or any node's credentials folder. Default: the key's own "
                   "folder, else $MESH_FLEET or ./fleet.")
@click.option("--chunk-kib", type=click.Choice(["64", "128", "256", "512", "1024"]), default=None,
              callback=lambda ctx, param, value: None if value is None else int(value),
              help="Average content-defined chunk size (KiB). Default: as the newest version of this model "
                   "published here (same cuts, so peers fetch only changed chunks), else 256.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest summary as JSON.")
def model_publish(model_file: Path, name: str, version: str, key_path: Path, data_dir: Path,
                  fleet_dir: Path | None, chunk_kib: int | None, as_json: bool) -> None:
    """Check MODEL_FILE loads, chunk it, sign its manifest and store it at the origin node."""
    from mesh.artifacts.chunking import ChunkParams
    from mesh.artifacts.manifest import ArtifactError
    from mesh.artifacts.publish import chunking_for, publish
    from mesh.artifacts.store import ArtifactStore
    from mesh.identity.signing import IdentityError, KeyRole, load_signing_key

    try:
        key = load_signing_key(key_path, KeyRole.PUBLISHER)
        _refuse_foreign_publisher_key(key, key_path, fleet_dir)
        store = ArtifactStore(data_dir / "artifacts")
        if chunk_kib is None:
            params, like = chunking_for(store, name)
        else:
            params, like = ChunkParams(avg_size_bytes=chunk_kib * 1024), None
        signed = publish(model_file, name=name, version=version, key=key, store=store, params=params)
    except (ArtifactError, IdentityError, OSError) as exc:
        fail(str(exc))
    m = signed.manifest
    summary = {"name": m.name, "version": m.version, "size_bytes": m.size_bytes, "sha256": m.sha256,
               "chunks": len(m.chunks), "chunk_avg_bytes": params.avg_size_bytes, "chunking_from": like,
               "manifest_digest": m.digest, "publisher_key_id": m.publisher_key_id}
    if as_json:
        emit_json(summary)
    else:
        how = (f"chunked like {m.name} {like}" if like
               else f"{params.avg_size_bytes // 1024} KiB average chunks")
        console.print(f"published [bold]{m.name} {m.version}[/]: {m.size_bytes} bytes in {len(m.chunks)} "
                      f"chunks ({how}), manifest {m.digest[:16]}..., signed by publisher key "
                      f"{m.publisher_key_id}")


def _refuse_foreign_publisher_key(key: SigningKey, key_path: Path, fleet_dir: Path | None) -> None:
    """Exit 1, before anything is written, unless `key` is the fleet's publisher key: every
    node would refuse a version signed by any other key (the operator's, say)."""
    from mesh.identity.ca import OPERATOR_PUB_FILE, PUBLISHER_PUB_FILE, load_publisher_key
    from mesh.identity.signing import KeyFileError, KeyRole, load_verify_key

    if fleet_dir is not None:
        places = [fleet_dir]
    else:
        places = [key_path.parent, Path(os.environ.get("MESH_FLEET", "fleet"))]
    found = next((p for p in places if (p / PUBLISHER_PUB_FILE).exists()), None)
    if found is None:
        looked = " or ".join(str(p) for p in dict.fromkeys(places))
        fail(f"cannot check that {key_path} is the fleet's publisher key: no {PUBLISHER_PUB_FILE} in "
             f"{looked}; pass --fleet with the fleet folder or a node's credentials folder (both hold it)")
    fleet_key = load_publisher_key(found)
    if key.key_id == fleet_key.key_id:
        return
    what = ""
    try:
        if load_verify_key(found / OPERATOR_PUB_FILE, KeyRole.OPERATOR).key_id == key.key_id:
            what = " (the fleet's operator key)"
    except KeyFileError:
        pass  # no operator.pub beside it: the key is simply not the publisher's
    fail(f"{key_path} holds key {key.key_id}{what}, not the fleet's publisher key {fleet_key.key_id} "
         f"(from {found / PUBLISHER_PUB_FILE}); every node would refuse a version it signs. Nothing was "
         "written; sign with the fleet's publisher.key")


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
        store = ArtifactStore(data_dir / "artifacts")
        rows = [dict(asdict(v), phase="complete" if v.complete else "partial",
                     origin=store.is_origin(v.name, v.version)) for v in store.versions()]
    except (ArtifactError, OSError) as exc:
        fail(str(exc))
    if as_json:
        emit_json(rows)
    else:
        console.print(versions_table(rows, title=f"models in {data_dir}"))


@model.command("status", epilog=_STATUS_EPILOG)
@admin_options
@click.option("--watch", is_flag=True, help="Show progress bars until every version (or VERSION) is complete "
                                            "or failed; while the node knows of none, say so and wait.")
@click.option("--version", "version", default=None, metavar="VERSION",
              help="Only this version (of any model). With --watch: wait until the node has heard of it and "
                   "holds it complete (or it failed).")
@click.option("--timeout-s", type=click.FloatRange(0.0, min_open=True), default=None,
              help="With --watch: give up after this many seconds (exit 1). Default: wait until done.")
def model_status(address: str, creds_dir: Path, as_json: bool, watch: bool, version: str | None,
                 timeout_s: float | None) -> None:
    """Per-version progress on a running node (chunks held, bytes, phase, errors)."""
    from google.protobuf.json_format import MessageToDict

    from mesh.admin.client import AdminError
    from mesh.admin.format import versions_table

    with operator_client(address, creds_dir) as client:
        try:
            resp = client.models()
            if watch:
                _watch_models(client, resp, address=address, version=version, bars=not as_json,
                              timeout_s=timeout_s)
                resp = client.models()
        except AdminError as exc:
            fail(str(exc))
    rows = [MessageToDict(v, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
            for v in _selected(resp.versions, version)]
    if as_json:
        emit_json(rows)
    else:
        console.print(versions_table(rows, title=f"models on {address}"))
    if any(r["phase"] == "failed" for r in rows):
        sys.exit(EXIT_FAILED)


def _selected(versions: Any, version: str | None) -> list[Any]:
    return [v for v in versions if version is None or v.version == version]


def _watch_models(client: Any, resp: Any, *, address: str, version: str | None, bars: bool,
                  timeout_s: float | None) -> None:
    """Poll `client` until the watched versions exist and are complete or failed, with progress bars
    (`bars`) or silently; say once that it waits while the node has heard of none of them."""
    from contextlib import nullcontext

    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                        TextColumn("{task.fields[phase]}"), TimeElapsedColumn(), console=console)
    said_waiting = False
    with progress if bars else nullcontext():
        tasks: dict[tuple[str, str], Any] = {}
        while True:
            watched = _selected(resp.versions, version)
            for v in watched if bars else ():
                key = (v.name, v.version)
                if key not in tasks:
                    tasks[key] = progress.add_task(f"{v.name} {v.version}", total=v.size_bytes or None,
                                                   phase=v.phase)
                progress.update(tasks[key], completed=v.bytes_have, total=v.size_bytes or None, phase=v.phase)
            if watched and all(v.phase in _DONE_PHASES for v in watched):
                return
            if not watched and not said_waiting:
                said_waiting = True
                waiting = (f"waiting for version {version}: {address} has not heard of it yet" if version else
                           f"waiting: {address} holds no model versions yet "
                           "(--version VERSION waits for one)")
                (progress.console if bars else err_console).print(waiting, highlight=False)
            if deadline is not None and time.monotonic() > deadline:
                if not watched:
                    state = (f"{address} has not heard of version {version}" if version
                             else f"{address} holds no model versions")
                else:
                    state = f"{'version ' + version if version else 'not every version'} is not complete"
                fail(f"gave up after {timeout_s:g} s: {state}")
            time.sleep(_WATCH_POLL_S)
            resp = client.models()


@model.command("optimize", epilog=_OPTIMIZE_EPILOG)
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
            emit_json(exc.report.to_dict())
        fail(f"{exc} ({out_file} not written)")
    except OptimizeError as exc:
        fail(str(exc))
    if as_json:
        emit_json(report.to_dict())
        return
    console.print(f"[green]wrote[/] {out_file}: {report.size_before_bytes:,} -> "
                  f"{report.size_after_bytes:,} bytes ({report.size_ratio:.2f}x smaller), "
                  f"{report.samples} calibration samples")
    for out in report.outputs:
        console.print(f"  output {out.name}: max error {out.max_abs_error:.4g} = {out.relative_error:.2%} "
                      f"of its range (tolerance {tolerance:.0%})")
