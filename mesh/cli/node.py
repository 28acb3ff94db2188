"""`mesh node`: the node binary (one per device).

Exit codes: 0 after SIGTERM/SIGINT (the node left the fleet), 1 when it cannot start (a port
in use, data_dir not a directory, credentials unreadable: one `error:` line says which and
what to do), 2 when the configuration file is wrong.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import NoReturn

import click

from mesh.cli.common import CONTEXT, EXIT_FAILED, EXIT_USAGE, err_console


@click.command("node", context_settings=CONTEXT, epilog="""Example node.toml:

\b
  node_id = "cam-01"
  listen = "0.0.0.0:7000"
  advertise = "10.0.4.17:7000"
  seeds = ["10.0.4.1:7000"]
  data_dir = "/var/lib/fleetmesh"
  metrics_listen = "0.0.0.0:9100"
  log_format = "json"
  [labels]
  site = "berlin-1"
  [tls]
  dir = "/etc/fleetmesh/node"

Then: mesh node --config node.toml""")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The node's TOML configuration file.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              help="Overrides log_level from the config file.")
@click.option("--log-format", type=click.Choice(["text", "json"]),
              help="Overrides log_format from the config file (json: one JSON object a line).")
def node(config_path: Path, log_level: str | None, log_format: str | None) -> None:
    """Run a fleet node until SIGTERM/SIGINT, then leave the cluster gracefully."""
    from mesh.identity.signing import IdentityError
    from mesh.node.config import ConfigError, load_config
    from mesh.node.logs import setup_logging
    from mesh.node.runtime import Node, NodeStartError

    try:
        config = load_config(config_path)
    except ConfigError as exc:
        _exit(str(exc), EXIT_USAGE)
    log_format = log_format or config.log_format
    setup_logging(level=log_level or config.log_level, log_format=log_format, node_id=config.node_id)
    try:
        asyncio.run(Node(config).run_until_signalled())
    except (NodeStartError, IdentityError) as exc:
        _fail_start(f"{config_path}: {exc}", json_lines=log_format == "json")


def _fail_start(message: str, *, json_lines: bool) -> NoReturn:
    """Exit 1 with one line: `error: ...`, or with log_format json a JSON log line a shipper keeps."""
    if not json_lines:
        _exit(message, EXIT_FAILED)
    logging.getLogger("mesh.node").critical("cannot start: %s", message)
    raise SystemExit(EXIT_FAILED)


def _exit(message: str, code: int) -> NoReturn:
    """`error: message` on stderr, never wrapped: journald and kubectl logs keep one line as one entry."""
    err_console.print(f"[red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise SystemExit(code)
