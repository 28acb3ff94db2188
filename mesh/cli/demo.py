"""`mesh demo`: the command; the narrated run itself is `mesh.demo`."""

from __future__ import annotations

from pathlib import Path

import click

from mesh.cli.common import CONTEXT, console, fail


@click.command("demo", context_settings=CONTEXT, epilog="Example:\n\n  mesh demo --nodes 12 --sites 3")
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
        fail(str(exc))
