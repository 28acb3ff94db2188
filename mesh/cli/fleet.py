"""`mesh fleet`: create a fleet's CA and signing keys, enroll nodes and operators."""

from __future__ import annotations

import os
from pathlib import Path

import click

from mesh.cli.common import CONTEXT, console, emit_json, fail


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
                                "  mesh fleet enroll alice --role operator --fleet ./fleet")
@click.argument("name")
@click.option("--fleet", "fleet_dir", type=click.Path(file_okay=False, path_type=Path),
              default=lambda: os.environ.get("MESH_FLEET", "fleet"), show_default="$MESH_FLEET or ./fleet",
              help="The fleet directory made by `mesh fleet init`.")
@click.option("--role", type=click.Choice(["node", "operator"]), default="node", show_default=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where to write cert.pem, key.pem, ca.pem "
                   "(default: FLEET/nodes/NAME or FLEET/operators/NAME).")
@click.option("--days", type=click.IntRange(1, 3650), default=90, show_default=True,
              help="Validity in days; renew before it ends with `mesh fleet renew`.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def fleet_enroll(name: str, fleet_dir: Path, role: str, out_dir: Path | None, days: int,
                 as_json: bool) -> None:
    """Issue a certificate for node (or operator) NAME, signed by the fleet CA."""
    from mesh.identity.ca import Role, enroll
    from mesh.identity.signing import IdentityError

    try:
        creds = enroll(fleet_dir, name, role=Role(role), out_dir=out_dir, validity_days=days)
    except IdentityError as exc:
        fail(str(exc))
    if as_json:
        emit_json({"name": name, "role": role, "directory": str(creds.directory)})
    else:
        console.print(f"{role} [bold]{name}[/] enrolled: {creds.directory}")


_FLEET_OPTION = click.option(
    "--fleet", "fleet_dir", type=click.Path(file_okay=False, path_type=Path),
    default=lambda: os.environ.get("MESH_FLEET", "fleet"), show_default="$MESH_FLEET or ./fleet",
    help="The fleet directory made by `mesh fleet init` (its operator.key signs).")


@fleet.command("revoke", epilog="""Examples:

  mesh fleet revoke cam-07 --reason "stolen from site berlin-1" --fleet ./fleet --node 10.0.4.17:7000

  mesh fleet revoke cam-07 --reason "key leaked" --serial 4d16884146 --fleet ./fleet

Every node enforces a revocation once it has it: it refuses that node's certificate on every
service, stops dialling it, and sees it as dead. Nodes pass revocations on to each other (also
to nodes that were offline), so submitting it to one reachable node is enough. A replacement
device enrolled under the same name afterwards is trusted again.""")
@click.argument("node_id")
@click.option("--reason", required=True, help="Why (kept in the revocation and in every node's log).")
@click.option("--serial", default="", help="Revoke only this certificate (hex serial); default: every "
                                           "certificate of NODE_ID issued until now.")
@_FLEET_OPTION
@click.option("--node", "address", metavar="HOST:PORT", help="Submit the revocation to this node now.")
@click.option("--creds", "creds_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Operator certificate folder for --node "
                   "(default: $MESH_ADMIN_CREDS or FLEET/operators/admin).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def fleet_revoke(node_id: str, reason: str, serial: str, fleet_dir: Path, address: str | None,
                 creds_dir: Path | None, as_json: bool) -> None:
    """Revoke NODE_ID's certificates, signed with the fleet's operator key; write it under
    FLEET/revocations/ and, with --node, submit it to a running node."""
    import time

    from mesh.admin.client import TrustClient
    from mesh.cli.common import call_or_exit
    from mesh.identity.revocation import RevocationError, sign_revocation
    from mesh.identity.signing import IdentityError, KeyRole, load_signing_key

    try:
        key = load_signing_key(Path(fleet_dir) / "operator.key", KeyRole.OPERATOR)
        revocation = sign_revocation(key, node_id, reason=reason, now=time.time(), serial=serial)
    except (IdentityError, RevocationError) as exc:
        fail(f"{exc}")
    out = Path(fleet_dir) / "revocations" / f"{node_id}-{int(revocation.revoked_at)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(revocation.to_json() + b"\n")
    result = {"node_id": node_id, "file": str(out), "description": revocation.describe(),
              "submitted_to": None}
    if address:
        creds = creds_dir or Path(os.environ.get("MESH_ADMIN_CREDS", Path(fleet_dir) / "operators" / "admin"))
        reply = call_or_exit(address, creds, lambda client: client.revoke(revocation.to_json()), TrustClient)
        result.update(submitted_to=address, known_by_that_node=reply.known, new_to_that_node=reply.added)
    if as_json:
        emit_json(result)
        return
    console.print(f"revoked: {revocation.describe()}\n  written to {out}")
    if address:
        console.print(f"  submitted to {address}; it now enforces {result['known_by_that_node']} "
                      "revocation(s) and passes this one on to every node")
    else:
        console.print(f"  submit it: mesh fleet revoke ... --node ADDR, or keep {out} for later")


@fleet.command("renew", epilog="""Example:

  mesh fleet renew cam-01 --fleet ./fleet

Copy the new cert.pem and key.pem to the device and restart its node. No other node needs a
restart: they trust the fleet CA, not one certificate.""")
@click.argument("name")
@_FLEET_OPTION
@click.option("--days", type=click.IntRange(1, 3650), default=90, show_default=True, help="Validity in days.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where to write the new credentials (default: FLEET/nodes/NAME).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def fleet_renew(name: str, fleet_dir: Path, days: int, out_dir: Path | None, as_json: bool) -> None:
    """Issue node NAME a new certificate and key (the old certificate stays valid until it expires;
    revoke it with `mesh fleet revoke NAME --serial OLD` if it may be compromised)."""
    from cryptography import x509

    from mesh.identity.ca import Role, enroll
    from mesh.identity.signing import IdentityError

    try:
        creds = enroll(fleet_dir, name, role=Role.NODE, out_dir=out_dir, validity_days=days, force=True)
        cert = x509.load_pem_x509_certificate(creds.cert_path.read_bytes())
    except IdentityError as exc:
        fail(str(exc))
    not_after = cert.not_valid_after_utc.isoformat(timespec="seconds")
    if as_json:
        emit_json({"name": name, "directory": str(creds.directory), "serial": f"{cert.serial_number:x}",
                   "not_after": not_after})
        return
    console.print(f"node [bold]{name}[/] renewed: {creds.directory} (serial {cert.serial_number:x}, valid "
                  f"until {not_after}); copy cert.pem and key.pem to the device and restart its node")


@fleet.command("revocations", epilog="Example:\n\n  mesh fleet revocations --node 10.0.4.17:7000")
@click.option("--node", "address", required=True, metavar="HOST:PORT", help="A node's gRPC address.")
@click.option("--creds", "creds_dir", type=click.Path(file_okay=False, path_type=Path),
              default=lambda: os.environ.get("MESH_ADMIN_CREDS", "fleet/operators/admin"),
              show_default="$MESH_ADMIN_CREDS or fleet/operators/admin", help="Operator certificate folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def fleet_revocations(address: str, creds_dir: Path, as_json: bool) -> None:
    """The revocations a node enforces (revoked nodes are refused on every service)."""
    import json

    from mesh.admin.client import TrustClient
    from mesh.cli.common import call_or_exit

    reply = call_or_exit(address, creds_dir, lambda client: client.revocations(), TrustClient)
    docs = json.loads(reply.revocations_json or b"[]")
    if as_json:
        emit_json({"digest": reply.digest, "revocations": docs})
        return
    if not docs:
        console.print(f"{address} enforces no revocation")
        return
    for doc in docs:
        which = f"certificate {doc['serial']}" if doc["serial"] else "all certificates issued before then"
        console.print(f"{doc['node_id']}: {which}, by operator key {doc['key_id']}: {doc['reason']}")
