"""The `mesh` command: fleet setup, the node binary, the admin client, the demo.

Exit codes: 0 done, 1 failed, 2 usage error (bad flags, bad config file).
Human output by default; `--json` where scripts want to read the result.

One module per command group (`fleet`, `node`, `admin`, `model`, `rollout`, `infer`, `demo`), each
importing only `common` (consoles, exit codes, options, the operator-client factory);
this module puts them under `main`, the `mesh` entry point.
"""

from __future__ import annotations

import click

from mesh import __version__
from mesh.cli.admin import admin
from mesh.cli.common import CONTEXT
from mesh.cli.demo import demo
from mesh.cli.fleet import fleet
from mesh.cli.infer import infer_command
from mesh.cli.model import model
from mesh.cli.node import node
from mesh.cli.rollout import rollout
from mesh.sim.command import sim

__all__ = ["main"]


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, prog_name="mesh")
def main() -> None:
    """fleetmesh: a peer-to-peer coordination mesh for edge-AI fleets.

    \b
    Start here:
      mesh fleet init ./fleet                 make a fleet CA and signing keys
      mesh fleet enroll cam-01 --fleet ./fleet
      mesh node --config node.toml            run a node (see README for the config)
      mesh admin status --node 127.0.0.1:7000 the node's view of the fleet
      mesh rollout start MODEL VERSION ...    a canary rollout (1% -> 10% -> 100%)
      mesh demo                               a 12-node cluster on loopback
      mesh sim membership --devices 1000000   the fleet at scale, simulated
    """


for _command in (fleet, node, admin, model, rollout, infer_command, demo, sim):
    main.add_command(_command)

if __name__ == "__main__":
    main()
