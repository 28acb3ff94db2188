"""`mesh model`: publish versions at an origin, see what a store or a running node holds, optimise."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click

from mesh.cli.common import (
    CONTEXT,
    EXIT_FAILED,
    admin_options,
    console,
    emit_json,
    fail,
    operator_client,
)

_WATCH_POLL_S = 0.5  # polling a remote node for a progress display

_PUBLISH_EPILOG = """Example:

  mesh model publish hand.tflite --name hand-landmark --version 1.4 \\
      --key fleet/publisher.key --data-dir /var/lib/fleetmesh

The node using that data dir (the origin) announces the version within a second; peers fetch it from \
each other."""
_STATUS_EPILOG = """Examples:

  mesh model status --node 127.0.0.1:7000

  mesh model status --node 127.0.0.1:7000 --watch   # progress bars until done"""
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
        fail(str(exc))
    rows = [dict(asdict(v), phase="complete" if v.complete else "partial") for v in versions]
    if as_json:
        emit_json(rows)
    else:
        console.print(versions_table(rows, title=f"models in {data_dir}"))


@model.command("status", epilog=_STATUS_EPILOG)
@admin_options
@click.option("--watch", is_flag=True, help="Show progress bars until every version is complete or failed.")
def model_status(address: str, creds_dir: Path, as_json: bool, watch: bool) -> None:
    """Per-version progress on a running node (chunks held, bytes, phase, errors)."""
    from google.protobuf.json_format import MessageToDict

    from mesh.admin.client import AdminError
    from mesh.admin.format import versions_table

    with operator_client(address, creds_dir) as client:
        try:
            resp = client.models()
            if watch and not as_json:
                _watch_models(client, resp)
                resp = client.models()
        except AdminError as exc:
            fail(str(exc))
    rows = [MessageToDict(v, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
            for v in resp.versions]
    if as_json:
        emit_json(rows)
    else:
        console.print(versions_table(rows, title=f"models on {address}"))
    if any(r["phase"] == "failed" for r in rows):
        sys.exit(EXIT_FAILED)


def _watch_models(client: Any, resp: Any) -> None:
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                  TextColumn("{task.fields[phase]}"), TimeElapsedColumn(), console=console) as bars:
        tasks: dict[tuple[str, str], Any] = {}
        while True:
            for v in resp.versions:
                key = (v.name, v.version)
                if key not in tasks:
                    tasks[key] = bars.add_task(f"{v.name} {v.version}", total=v.size_bytes or None,
                                               phase=v.phase)
                bars.update(tasks[key], completed=v.bytes_have, total=v.size_bytes or None, phase=v.phase)
            if all(v.phase in ("complete", "failed") for v in resp.versions):
                return
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
