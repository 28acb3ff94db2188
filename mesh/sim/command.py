"""`mesh sim`: the fleet at 10^3-10^6 devices, simulated with the node's own cores.

    mesh sim membership --devices 10000 --sites 100
    mesh sim membership --devices 1000000 --sites 10000 --json
    mesh sim membership --devices 100000 --sites 1000 --loss 0.01 --plot spread.png
    mesh sim validate --devices 1000 --devices 10000 --seeds 8
    mesh sim distribution --devices 100000 --sites 1000 --plot spread.png
    mesh sim rollout --devices 1000000 --sites 10000 --json
    mesh sim fleet --devices 1000000 --sites 10000 --json --plot fleet.png   # all three, one JSON object

Exit codes: 0 done, 1 failed (a simulation did not converge, or the model is
further than the tolerance from the cores), 2 usage error. Also runs as
`python -m mesh.sim`.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import click

from mesh.sim import distribution as dist
from mesh.sim import rollout as roll
from mesh.sim.membership import (
    MembershipResult,
    Scenario,
    ValidationRow,
    peak_rss_mb,
    rounds_bound,
    run,
    validate,
)

EXIT_FAILED = 1
_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
VALIDATION_TOLERANCE = 0.20


def _echo_json(data: dict[str, Any]) -> None:
    click.echo(json.dumps(data, sort_keys=True))


def _progress(message: str) -> None:
    click.echo(message, err=True)


@click.group("sim", context_settings=_CONTEXT)
def sim() -> None:
    """Simulate the fleet at scale with the node's own protocol cores.

    \b
    Up to ~10^4 devices the real membership cores run on an in-memory network;
    above that a model of them, validated against the cores (`mesh sim validate`).
    """


@sim.command(
    "membership",
    context_settings=_CONTEXT,
    epilog="Example: mesh sim membership --devices 1000000 --sites 10000 --json",
)
@click.option("--devices", type=click.IntRange(min=2), required=True, help="Devices in the fleet.")
@click.option("--sites", type=click.IntRange(min=1), required=True, help="Sites (gossip pools) they are in.")
@click.option(
    "--loss",
    type=click.FloatRange(0, 0.5, max_open=True),
    default=0.0,
    show_default=True,
    help="Share of messages lost.",
)
@click.option(
    "--seed", type=int, default=1, show_default=True, help="Seed; the same seed gives the same run."
)
@click.option(
    "--engine",
    type=click.Choice(["auto", "cores", "model"]),
    default="auto",
    show_default=True,
    help="auto: the real cores when they fit (about 10^4 devices), else the model.",
)
@click.option(
    "--trials",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Failure-detection trials in a site.",
)
@click.option(
    "--relay-only",
    is_flag=True,
    help="Devices only relay the publishers' updates instead of publishing what they learned.",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write a PNG: share of devices and of the federation pool that know, per gossip round.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def membership(
    devices: int,
    sites: int,
    loss: float,
    seed: int,
    engine: str,
    trials: int,
    relay_only: bool,
    plot_path: Path | None,
    as_json: bool,
) -> None:
    """How fast a new version reaches every device (a site, then the federation pool,
    then every site), and how fast a site detects a failed device."""
    try:
        scenario = Scenario(
            devices, sites, loss=loss, seed=seed, detection_trials=trials, republish=not relay_only
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    if not as_json:
        _progress(f"simulating {devices:,} devices in {sites:,} sites ({engine} engine, seed {seed})...")
    try:
        result = run(scenario, engine)
    except RuntimeError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_FAILED)
    if plot_path is not None:
        plot_membership(result, plot_path)
    if as_json:
        _echo_json(result.to_json())
    else:
        _print_membership(result, plot_path)


def _print_membership(result: MembershipResult, plot_path: Path | None) -> None:
    data = result.to_json()
    verdict = "within" if result.rounds_known_all <= rounds_bound(result.scenario.devices) else "ABOVE"
    lines = [
        f"engine                      {data['engine']}",
        f"devices / sites             {data['devices']:,} / {data['sites']:,} ({data['site_size']} per site, "
        f"{data['representatives_per_site']} representatives each)",
        f"every device knows after    {data['rounds_known_all']} gossip rounds "
        f"({data['seconds_known_all']} s), "
        f"{verdict} the bound log2 N + ln N + 5 = {data['rounds_bound']}",
        f"failure detection in a site {data['detection_s']} s mean, {data['detection_max_s']} s max; "
        f"{data['detection_over_expected']} x SWIM's expectation ({data['detection_expected_s']} s)",
        f"wall / peak memory          {data['wall_s']} s / {data['peak_rss_mb']} MB",
    ]
    if plot_path is not None:
        lines.append(f"plot                        {plot_path}")
    click.echo("\n".join(lines))


def _pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend, or a usage error that says what to install."""
    try:
        import matplotlib
    except ImportError as exc:
        raise click.UsageError(
            "--plot needs matplotlib, which is not installed: "
            "pip install 'fleetmesh[sim]' (or pip install matplotlib)"
        ) from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_membership(result: MembershipResult, path: Path) -> None:
    """Share of devices (and of the federation pool) that know the version, per gossip round."""
    plt = _pyplot()

    sc = result.scenario
    rounds = range(1, len(result.known_share) + 1)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(rounds, result.known_share, label="devices", linewidth=2)
    ax.plot(rounds, result.federation_share, label="federation pool (site representatives)", linestyle="--")
    bound = rounds_bound(sc.devices)
    ax.axvline(bound, color="grey", linestyle=":", label=f"goal: log2 N + ln N + 5 = {bound:.1f} rounds")
    ax.set_xlim(0, max(len(result.known_share), bound) + 1)
    ax.set_xlabel(f"gossip rounds ({sc.config.gossip_interval_s:g} s)")
    ax.set_ylabel("share that knows the new version")
    ax.set_ylim(0, 1.02)
    ax.set_title(
        f"{sc.devices:,} devices in {sc.sites:,} sites ({result.engine}); "
        f"detection {result.detection_over_expected:.2f} x expected"
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


_FLEET_OPTIONS = [
    click.option("--devices", type=click.IntRange(min=2), required=True, help="Devices in the fleet."),
    click.option(
        "--sites", type=click.IntRange(min=1), required=True, help="Sites (gossip pools) they are in."
    ),
    click.option(
        "--loss",
        type=click.FloatRange(0, 0.5, max_open=True),
        default=0.0,
        show_default=True,
        help="Share of gossip messages lost (chunks travel over TCP streams: not lossy).",
    ),
    click.option(
        "--seed", type=int, default=1, show_default=True, help="Seed; the same seed gives the same run."
    ),
    click.option(
        "--engine",
        type=click.Choice(["auto", "cores", "model"]),
        default="auto",
        show_default=True,
        help="auto: the real cores where they fit, else the validated model.",
    ),
    click.option(
        "--plot",
        "plot_path",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Write a PNG (needs matplotlib: pip install 'fleetmesh[sim]').",
    ),
    click.option("--json", "as_json", is_flag=True, help="Print one JSON object."),
]


def _fleet_options(f: Any) -> Any:
    for option in reversed(_FLEET_OPTIONS):
        f = option(f)
    return f


def _check_plot(plot_path: Path | None) -> None:
    if plot_path is not None:
        _pyplot()  # say what to install before a long run, not after it


def _dissemination(
    devices: int, sites: int, loss: float, seed: int, engine: str, as_json: bool
) -> MembershipResult:
    if not as_json:
        _progress(f"membership: {devices:,} devices in {sites:,} sites...")
    return run(Scenario(devices, sites, loss=loss, seed=seed, detection_trials=1), engine)


@sim.command(
    "distribution",
    context_settings=_CONTEXT,
    epilog="Example: mesh sim distribution --devices 100000 --sites 1000 --plot spread.png",
)
@_fleet_options
@click.option(
    "--model-mb",
    type=click.FloatRange(min=0.1),
    default=5.5,
    show_default=True,
    help="Model size in MB (10^6 bytes).",
)
@click.option(
    "--upload-cap-mb",
    type=click.FloatRange(min=0.01),
    default=1.0,
    show_default=True,
    help="Every node's upload cap in MB/s (the origin's too).",
)
def distribution_command(
    devices: int,
    sites: int,
    loss: float,
    seed: int,
    engine: str,
    plot_path: Path | None,
    as_json: bool,
    model_mb: float,
    upload_cap_mb: float,
) -> None:
    """How a new version reaches every device: one fetcher per site across the boundary
    (the federation swarm), then the site's devices from inside (site swarms)."""
    _check_plot(plot_path)
    try:
        sc = dist.DistributionScenario(
            devices,
            sites,
            seed=seed,
            model_size_bytes=int(model_mb * 1e6),
            upload_cap_bytes_per_s=upload_cap_mb * 1e6,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    if not as_json:
        _progress(f"distribution: {devices:,} devices in {sites:,} sites ({engine} engine, seed {seed})...")
    try:
        result = dist.run(sc, engine)
    except RuntimeError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_FAILED)
    data = result.to_json() | {"wall_s": round(result.wall_s, 2), "peak_rss_mb": round(peak_rss_mb(), 1)}
    if plot_path is not None:
        plot_fleet(plot_path, None, result, None)
    if as_json:
        _echo_json(data)
    else:
        _print_table(data, plot_path)


@sim.command(
    "rollout",
    context_settings=_CONTEXT,
    epilog="Example: mesh sim rollout --devices 1000000 --sites 10000 --json",
)
@_fleet_options
@click.option(
    "--bad-share",
    type=click.FloatRange(0, 1),
    default=0.2,
    show_default=True,
    help="Share of requests the bad version fails.",
)
@click.option(
    "--soak-s", type=click.FloatRange(min=1), default=60.0, show_default=True, help="Soak per wave."
)
@click.option(
    "--rate",
    "rate_per_s",
    type=click.FloatRange(min=0.01),
    default=1.0,
    show_default=True,
    help="Requests per second per device.",
)
def rollout_command(
    devices: int,
    sites: int,
    loss: float,
    seed: int,
    engine: str,
    plot_path: Path | None,
    as_json: bool,
    bad_share: float,
    soak_s: float,
    rate_per_s: float,
) -> None:
    """A canary rollout 1% -> 10% -> 100% of a bad version: devices and requests exposed,
    time to roll back. Abort and evidence travel as fast as `mesh sim membership` says."""
    _check_plot(plot_path)
    try:
        Scenario(devices, sites)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    member = _dissemination(devices, sites, loss, seed, engine, as_json)
    sc = roll.RolloutScenario(
        devices,
        sites,
        seed=seed,
        bad_error_share=bad_share,
        soak_s=soak_s,
        request_rate_per_s=rate_per_s,
        dissemination_s=member.seconds_known_all,
    )
    if not as_json:
        _progress(f"rollout: {devices:,} devices in {sites:,} sites...")
    result = roll.run_cores(sc)
    data = result.to_json() | {
        "model_expected": roll.expected(sc),
        "wall_s": round(result.wall_s, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    if plot_path is not None:
        plot_fleet(plot_path, None, None, result)
    if as_json:
        _echo_json(data)
    else:
        _print_table(data, plot_path)


@sim.command(
    "fleet",
    context_settings=_CONTEXT,
    epilog="Example: mesh sim fleet --devices 1000000 --sites 10000 --json --plot fleet.png",
)
@_fleet_options
def fleet_command(
    devices: int, sites: int, loss: float, seed: int, engine: str, plot_path: Path | None, as_json: bool
) -> None:
    """Membership, distribution and a bad rollout on one fleet; one JSON object with every figure
    (the goals of issue 10 as ratios, wall time and peak memory of the whole run)."""
    _check_plot(plot_path)
    started = time.perf_counter()
    try:
        Scenario(devices, sites)
        dsc = dist.DistributionScenario(devices, sites, seed=seed)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    try:
        member = _dissemination(devices, sites, loss, seed, engine, as_json)
        if not as_json:
            _progress(f"distribution: {devices:,} devices in {sites:,} sites...")
        spread = dist.run(dsc, engine)
        if not as_json:
            _progress(f"rollout: {devices:,} devices in {sites:,} sites...")
        rsc = roll.RolloutScenario(devices, sites, seed=seed, dissemination_s=member.seconds_known_all)
        rollout = roll.run_cores(rsc)
    except RuntimeError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_FAILED)
    data = member.to_json()
    data["membership_engine"] = data.pop("engine")
    data["membership_wall_s"] = data.pop("wall_s")
    data.pop("peak_rss_mb")
    data |= spread.to_json() | rollout.to_json()
    data["goals_met"] = {
        "rounds_known_all": data["rounds_known_all"] <= data["rounds_bound"],
        "origin_copies": data["origin_copies"] <= 1.2,
        "cross_site_copies_per_site": data["cross_site_copies_per_site"] <= 1.2,
        "bad_exposure_share": data["bad_exposure_share"] <= data["first_wave_share"],
        "detection_over_expected": data["detection_over_expected"] <= 2,
    }
    if plot_path is not None:
        plot_fleet(plot_path, member, spread, rollout)
    data["wall_s"] = round(time.perf_counter() - started, 2)
    data["peak_rss_mb"] = round(peak_rss_mb(), 1)
    if as_json:
        _echo_json(data)
    else:
        _print_table(data, plot_path)
    if not all(data["goals_met"].values()):
        sys.exit(EXIT_FAILED)


def _print_table(data: dict[str, Any], plot_path: Path | None) -> None:
    width = max(len(k) for k in data)
    for key, value in data.items():
        shown = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else value
        click.echo(f"{key:<{width}}  {shown}")
    if plot_path is not None:
        click.echo(f"{'plot':<{width}}  {plot_path}")


def plot_fleet(
    path: Path,
    member: MembershipResult | None,
    spread: dist.DistributionResult | None,
    rollout: roll.RolloutResult | None,
) -> None:
    """One panel per part given: who knows (per gossip round), who holds (per tier, over time),
    who serves the bad version (the rollout's waves)."""
    plt = _pyplot()
    panels = [p for p in (member, spread, rollout) if p is not None]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), dpi=90, squeeze=False)
    ax_iter = iter(axes[0])
    if member is not None:
        ax = next(ax_iter)
        seconds = [(i + 1) * member.scenario.config.gossip_interval_s for i in range(len(member.known_share))]
        ax.plot(seconds, member.known_share, label="devices (site pools)", linewidth=2)
        ax.plot(seconds, member.federation_share, label="federation pool", linestyle="--")
        ax.set_title(f"knows the version ({member.engine})")
        ax.set_xlabel("seconds after publication")
    if spread is not None:
        ax = next(ax_iter)
        t, devices_share, fed_share = spread.curves()
        ax.plot(t, fed_share, label="site fetchers (federation swarm)", linestyle="--")
        ax.plot(t, devices_share, label="devices (site swarms)", linewidth=2)
        js = spread.to_json()
        ax.set_title(
            f"holds it: origin {js['origin_copies']:.2f} copies, "
            f"{js['cross_site_copies_per_site']:.2f} per site",
            fontsize=9,
        )
        ax.set_xlabel("seconds after publication")
    if rollout is not None:
        ax = next(ax_iter)
        t_steps = [x for x, _ in rollout.wave_share]
        share = [y for _, y in rollout.wave_share]
        ax.step(t_steps, share, where="post", label="serving the bad version", linewidth=2)
        for wave_share in rollout.scenario.shares_ppm[: rollout.max_wave]:
            ax.axhline(wave_share / 1e6, color="grey", linestyle=":", label=f"wave {wave_share / 1e4:g}%")
        ax.set_ylim(0, max(0.02, max(share) * 1.5))
        ax.set_title(
            f"bad rollout: exposure {rollout.bad_exposure_share:.2%}, rolled back "
            f"at {rollout.all_baseline_s or float('nan'):.0f} s",
            fontsize=9,
        )
        ax.set_xlabel("seconds after wave 1 started")
    for ax in axes[0]:
        ax.set_ylabel("share of devices")
        ax.grid(alpha=0.3)
        ax.legend(
            loc="lower right" if ax is not axes[0][-1] or rollout is None else "upper right", fontsize=7
        )
    n = (member or spread or rollout).scenario.devices  # type: ignore[union-attr]
    s = (member or spread or rollout).scenario.sites  # type: ignore[union-attr]
    fig.suptitle(f"mesh sim: {n:,} devices in {s:,} sites", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@sim.command(
    "validate",
    context_settings=_CONTEXT,
    epilog="Example: mesh sim validate --devices 1000 --devices 10000 --seeds 8",
)
@click.option(
    "--devices",
    "sizes",
    type=click.IntRange(min=2),
    multiple=True,
    default=(1000, 10000),
    show_default=True,
    help="Fleet sizes to compare at (repeat the option).",
)
@click.option(
    "--site-size", type=click.IntRange(min=2), default=100, show_default=True, help="Devices per site."
)
@click.option(
    "--seeds",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Seeds per size (rounds until everyone knows is a maximum: a few seeds are noisy).",
)
@click.option("--loss", type=click.FloatRange(0, 0.5, max_open=True), default=0.0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def validate_command(sizes: tuple[int, ...], site_size: int, seeds: int, loss: float, as_json: bool) -> None:
    """Run the real cores and the model on the same scenarios: they must agree within 20%
    on rounds until every device knows and on failure detection time."""
    rows: list[ValidationRow] = []
    for devices in sizes:
        sites = max(1, math.ceil(devices / site_size))
        try:
            rows.append(
                validate(
                    devices,
                    sites,
                    list(range(1, seeds + 1)),
                    loss=loss,
                    progress=None if as_json else _progress,
                )
            )
        except (RuntimeError, ValueError) as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_FAILED)
    worst = max(max(abs(r.rounds_error), abs(r.detection_error)) for r in rows)
    if as_json:
        _echo_json(
            {
                "rows": [r.to_json() for r in rows],
                "worst_error": round(worst, 3),
                "tolerance": VALIDATION_TOLERANCE,
                "seeds": seeds,
            }
        )
    else:
        click.echo(
            f"{'devices':>9} {'sites':>6} {'rounds cores':>13} {'model':>7} {'error':>7} "
            f"{'detect cores':>13} {'model':>7} {'error':>7} {'wall cores':>11} {'model':>7}"
        )
        for r in rows:
            click.echo(
                f"{r.devices:>9,} {r.sites:>6,} {r.cores_rounds:>13.2f} {r.model_rounds:>7.2f} "
                f"{r.rounds_error:>+7.1%} {r.cores_detection_s:>12.2f}s {r.model_detection_s:>6.2f}s "
                f"{r.detection_error:>+7.1%} {r.cores_wall_s:>10.1f}s {r.model_wall_s:>6.1f}s"
            )
    if worst > VALIDATION_TOLERANCE:
        click.echo(
            f"error: the model is {worst:.0%} from the cores, more than {VALIDATION_TOLERANCE:.0%}", err=True
        )
        sys.exit(EXIT_FAILED)


def main(argv: list[str] | None = None) -> int:
    """`mesh sim` on its own (`python -m mesh.sim`); the exit code as an int."""
    try:
        sim.main(args=argv, prog_name="mesh sim", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return EXIT_FAILED
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0
