"""`mesh node`: the node binary (one per device)."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

import click

from mesh.cli.common import CONTEXT, EXIT_USAGE, fail


@click.command("node", context_settings=CONTEXT, epilog="""Example node.toml:

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
        fail(str(exc), EXIT_USAGE)
    logging.basicConfig(level=(log_level or config.log_level).upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(Node(config).run_until_signalled())
    except (NodeStartError, IdentityError) as exc:
        fail(f"{config_path}: {exc}")
