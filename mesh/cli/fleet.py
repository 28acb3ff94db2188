"""`mesh fleet`: create a fleet's CA and signing keys, enroll nodes and operators."""

from __future__ import annotations

import os
from pathlib import Path

import click

from mesh.cli.common import CONTEXT, console, emit_json, err_console, fail


@click.group(context_settings=CONTEXT)
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
        fail(str(exc))
    if as_json:
        emit_json({"fleet_id": made.fleet_id, "directory": str(directory),
                   "publisher_key_id": made.publisher_key_id, "operator_key_id": made.operator_key_id})
        return
    console.print(f"fleet [bold]{made.fleet_id}[/] created in {directory}")
    console.print(f"  publisher key {made.publisher_key_id}, operator key {made.operator_key_id}")
    console.print(f"  operator certificate: {directory / 'operators' / 'admin'}")
    console.print(f"next: mesh fleet enroll NODE_ID --fleet {directory}")


@fleet.command("enroll", epilog="Examples:\n\n  mesh fleet enroll cam-01 --fleet ./fleet\n\n"
                                "  mesh fleet enroll alice --role operator --fleet ./fleet\n\n"
                                "  mesh fleet enroll edge-07 --k8s-secret | kubectl apply -f -")
@click.argument("name")
@click.option("--fleet", "fleet_dir", type=click.Path(file_okay=False, path_type=Path),
              default=lambda: os.environ.get("MESH_FLEET", "fleet"), show_default="$MESH_FLEET or ./fleet",
              help="The fleet directory made by `mesh fleet init`.")
@click.option("--role", type=click.Choice(["node", "operator"]), default="node", show_default=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where to write cert.pem, key.pem, ca.pem "
                   "(default: FLEET/nodes/NAME or FLEET/operators/NAME).")
@click.option("--days", type=click.IntRange(1, 3650), default=365, show_default=True, help="Validity.")
@click.option("--force", is_flag=True, help="Re-issue NAME's credentials if they exist (before they expire).")
@click.option("--k8s-secret", "k8s_secret", is_flag=True,
              help="Print the Kubernetes Secret fleetmesh-cert-NAME holding the node's folder, as JSON for "
                   "`kubectl apply -f -` (credentials enrolled before are printed, not re-issued, unless "
                   "--force).")
@click.option("--namespace", default="fleetmesh", show_default=True, help="The Secret's namespace.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def fleet_enroll(name: str, fleet_dir: Path, role: str, out_dir: Path | None, days: int, force: bool,
                 k8s_secret: bool, namespace: str, as_json: bool) -> None:
    """Issue a certificate for node (or operator) NAME, signed by the fleet CA."""
    from mesh.identity.ca import CredentialsExistError, Role, enroll, load_fleet
    from mesh.identity.signing import IdentityError

    if k8s_secret and role != "node":
        fail("--k8s-secret is for nodes (a DaemonSet pod's credentials); operators keep their folder", 2)
    if k8s_secret and as_json:
        fail("--k8s-secret already prints JSON (the Secret); drop --json", 2)
    if k8s_secret:
        from mesh.identity.k8s import secret_name

        try:
            secret_name(name)  # before anything is written: Kubernetes must accept the name
        except IdentityError as exc:
            fail(str(exc))
    try:
        creds = enroll(fleet_dir, name, role=Role(role), out_dir=out_dir, validity_days=days, force=force)
    except CredentialsExistError as exc:
        if not k8s_secret:
            fail(str(exc))
        # Applying the Secret again is harmless: print the existing folder's, as kubectl apply expects.
        folder = out_dir or load_fleet(fleet_dir).credentials_dir(Role.NODE, name)
        err_console.print(f"node {name} is enrolled already: the Secret holds {folder} as it is "
                          "(add --force to issue new credentials)", highlight=False, soft_wrap=True)
        _print_secret(folder, namespace)
        return
    except IdentityError as exc:
        fail(str(exc))
    if k8s_secret:
        err_console.print(f"node {name} enrolled: {creds.directory}; its Secret follows on stdout",
                          highlight=False, soft_wrap=True)
        _print_secret(creds.directory, namespace)
        return
    if as_json:
        emit_json({"name": name, "role": role, "directory": str(creds.directory)})
    else:
        console.print(f"{role} [bold]{name}[/] enrolled: {creds.directory}")


def _print_secret(folder: Path, namespace: str) -> None:
    """The Secret manifest of an enrolled node folder on stdout (JSON: `kubectl apply -f -` reads it)."""
    from mesh.identity.k8s import node_secret_manifest
    from mesh.identity.signing import IdentityError

    try:
        emit_json(node_secret_manifest(folder, namespace=namespace))
    except IdentityError as exc:
        fail(str(exc))
