"""`mesh rollout`: canary rollouts of a published model version, and the operator's word on them.

`start` signs a plan with the publisher key (the digests, signature and runtime a version needs come from
the manifests the node holds) and hands it to one node; it spreads to every site from there. `status`
shows per wave how many devices are eligible, in the cohort and on the target, their requests and error
rate against the baseline's, the gate's verdict and what the rollout waits for. `approve`, `promote`,
`pause`, `resume` and `abort` are signed here with the operator key; the node only sees the signed
command, and every site verifies it.
"""

from __future__ import annotations

import json
import secrets
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from mesh.cli.common import (
    CONTEXT,
    EXIT_FAILED,
    EXIT_USAGE,
    admin_options,
    call_or_exit,
    console,
    emit_json,
    err_console,
    fail,
)

if TYPE_CHECKING:
    from mesh.rollout.plan import RolloutPlan

DEFAULT_COMMAND_TTL_S = 600.0
_WATCH_POLL_S = 1.0
_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration_s(text: str) -> float:
    """`90`, `90s`, `10m`, `1.5h`, `7d` -> seconds; ValueError naming the text otherwise."""
    value = text.strip().lower()
    unit = 1.0
    if value and value[-1] in _DURATION_UNITS:
        unit, value = _DURATION_UNITS[value[-1]], value[:-1]
    try:
        seconds = float(value) * unit
    except ValueError:
        raise ValueError(f"{text!r} is not a duration like 90s, 10m, 1h or 7d") from None
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"{text!r} is not a positive duration")
    return seconds


def parse_selector(items: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """`("device_class=camera", "site=a,b")` -> {"device_class": ("camera",), "site": ("a", "b")}."""
    out: dict[str, tuple[str, ...]] = {}
    for item in items:
        label, sep, values = item.partition("=")
        if not sep or not label or not values:
            raise ValueError(f"selector {item!r} is not LABEL=VALUE[,VALUE...] (e.g. device_class=camera)")
        if label in out:
            raise ValueError(f"selector label {label!r} is given twice; list its values as {label}=a,b")
        out[label] = tuple(v.strip() for v in values.split(","))
    return out


def _client_class():
    from mesh.admin.rollout_client import RolloutClient

    return RolloutClient


def rollout_call(address: str, creds_dir: Path, call: Any) -> Any:
    return call_or_exit(address, creds_dir, call, _client_class())


@click.group(context_settings=CONTEXT)
def rollout() -> None:
    """Canary rollouts: start one, watch it, approve, promote, pause, resume or abort it."""


# --- start ----------------------------------------------------------------------------------------

_START_EPILOG = """Example:

  mesh rollout start hand-landmark 1.4 --waves 1,10,100 --soak 10m --max-error-rate 0.05 \\
      --selector device_class=camera --key fleet/publisher.key --node 127.0.0.1:7000

The version must be published (`mesh model publish`) and held by the node asked; the baseline (what devices
fall back to) is the version that node serves unless --baseline names one. Waves above --autonomous-share
of the selected devices wait for `mesh rollout approve`."""


@rollout.command("start", epilog=_START_EPILOG)
@click.argument("model_name", metavar="MODEL")
@click.argument("version")
@click.option("--baseline", default=None, help="Version devices fall back to (default: what NODE serves).")
@click.option(
    "--waves",
    default="1,10,100",
    show_default=True,
    help="Shares of the selected devices, in percent, growing to 100.",
)
@click.option(
    "--soak", "soak", default="10m", show_default=True, help="Soak time of each wave (90s, 10m, 1h)."
)
@click.option(
    "--max-error-rate",
    type=click.FloatRange(0.0, 1.0),
    default=0.05,
    show_default=True,
    help="A wave fails above this error rate.",
)
@click.option(
    "--relative-margin",
    type=click.FloatRange(0.0, 1.0),
    default=None,
    help="Also fail a wave whose error rate is above the baseline's (the devices still on it) by more "
    "than this many points, e.g. 0.01 for one point (default: the absolute limit only; a wave that "
    "leaves too few requests on the baseline is judged by the absolute limit alone).",
)
@click.option(
    "--min-requests",
    type=click.IntRange(1),
    default=100,
    show_default=True,
    help="Requests a wave's cohort must serve before its gate may pass.",
)
@click.option(
    "--deadline",
    default=None,
    help="Pause for an operator when a wave is undecided this long "
    "after its soak began (default: twice the soak).",
)
@click.option(
    "--selector",
    "selectors",
    multiple=True,
    metavar="LABEL=VALUE[,VALUE]",
    help="Only devices with these labels (repeat for more labels).",
)
@click.option(
    "--autonomous-share",
    default="10",
    show_default=True,
    help="Percent of the selected devices a wave may reach without an operator's approval.",
)
@click.option(
    "--prefetch",
    type=click.Choice(["low", "off"]),
    default="low",
    show_default=True,
    help="May devices outside the current wave fetch the version ahead of their wave?",
)
@click.option("--ttl", default="7d", show_default=True, help="How long the plan stays valid.")
@click.option("--id", "rollout_id", default=None, help="Rollout id (default: MODEL-VERSION-random).")
@click.option(
    "--key",
    "key_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The fleet's publisher signing key (publisher.key).",
)
@admin_options
def start(
    model_name: str,
    version: str,
    baseline: str | None,
    waves: str,
    soak: str,
    max_error_rate: float,
    relative_margin: float | None,
    min_requests: int,
    deadline: str | None,
    selectors: tuple[str, ...],
    autonomous_share: str,
    prefetch: str,
    ttl: str,
    rollout_id: str | None,
    key_path: Path,
    address: str,
    creds_dir: Path,
    as_json: bool,
) -> None:
    """Sign a rollout plan for MODEL VERSION with the publisher key and start it through NODE."""
    from mesh.identity.signing import IdentityError, KeyRole, load_signing_key
    from mesh.rollout.plan import RolloutError, sign_plan

    try:
        key = load_signing_key(key_path, KeyRole.PUBLISHER)
    except IdentityError as exc:
        fail(str(exc))
    try:
        shape = _plan_shape(
            waves,
            soak,
            max_error_rate,
            min_requests,
            deadline,
            selectors,
            autonomous_share,
            prefetch,
            ttl,
            relative_margin=relative_margin,
        )
    except (ValueError, RolloutError) as exc:
        fail(str(exc), EXIT_USAGE)

    def submit(client) -> tuple[Any, Any]:
        held = client.manifests(model_name, [version])
        base = baseline or held.active_version
        if not base:
            fail(
                f"{client.address} serves no version of {model_name}; name the baseline with --baseline",
                EXIT_USAGE,
            )
        if base == version:
            fail(
                f"{client.address} already serves {model_name} {version}; name the baseline with --baseline",
                EXIT_USAGE,
            )
        both = client.manifests(model_name, [version, base])
        try:
            plan = _build_plan(model_name, version, base, both.signed_manifest_json, key, shape, rollout_id)
            signed = sign_plan(plan, key)
        except PermissionError as exc:
            fail(str(exc))
        except (ValueError, RolloutError) as exc:
            fail(str(exc), EXIT_USAGE)
        return signed, client.start(signed.to_json().decode())

    signed, result = rollout_call(address, creds_dir, submit)
    plan = signed.plan
    if as_json:
        emit_json(
            {
                "rollout_id": plan.rollout_id,
                "plan_digest": plan.digest,
                "outcome": result.outcome,
                "message": result.message,
                "refusal_reason": result.refusal_reason,
                "plan": plan.to_dict(),
            }
        )
    elif result.outcome == "refused":
        err_console.print(
            f"[red]refused:[/] {result.message} (reason: {result.refusal_reason})", highlight=False
        )
    else:
        console.print(
            f"[green]started[/] rollout [bold]{plan.rollout_id}[/]: {plan.model} {plan.baseline_version} "
            f"-> {plan.target_version}, waves {', '.join(w.label for w in plan.waves)}, soak "
            f"{plan.waves[0].soak_s:g} s, error limit {plan.waves[0].max_error_rate:.0%}, selector "
            f"{plan.selector.describe()}; plan {plan.digest[:16]}... signed by publisher key "
            f"{plan.publisher_key_id}",
            highlight=False,
        )
        console.print(
            f"  follow it: mesh rollout status {plan.rollout_id} --watch --node {address}",
            highlight=False,
            soft_wrap=True,
        )
    if result.outcome == "refused":
        sys.exit(EXIT_FAILED)


def _plan_shape(
    waves: str,
    soak: str,
    max_error_rate: float,
    min_requests: int,
    deadline: str | None,
    selectors: tuple[str, ...],
    autonomous_share: str,
    prefetch: str,
    ttl: str,
    *,
    relative_margin: float | None = None,
) -> dict[str, Any]:
    from mesh.rollout.plan import AutonomousScope, PrefetchPolicy, Selector, Wave, parse_share

    soak_s = parse_duration_s(soak)
    deadline_s = parse_duration_s(deadline) if deadline else None
    shares = [parse_share(s) for s in waves.split(",") if s.strip()]
    if not shares:
        raise ValueError("--waves names no wave")
    return {
        "waves": tuple(
            Wave(
                s,
                soak_s=soak_s,
                min_requests=min_requests,
                max_error_rate=max_error_rate,
                relative_margin=relative_margin,
                deadline_s=deadline_s,
            )
            for s in shares
        ),
        "selector": Selector.of(**parse_selector(selectors)),
        "autonomous_scope": AutonomousScope(parse_share(autonomous_share)),
        "prefetch": PrefetchPolicy(prefetch),
        "ttl_s": parse_duration_s(ttl),
    }


def _build_plan(
    model: str,
    version: str,
    baseline: str,
    manifests: Any,
    key: Any,
    shape: dict[str, Any],
    rollout_id: str | None,
) -> RolloutPlan:
    from mesh.artifacts.manifest import ManifestError, SignedManifest, verify_manifest
    from mesh.identity.signing import TrustedKeys
    from mesh.rollout.plan import RolloutPlan, SkewRule, expiry, signature_digest

    own = TrustedKeys([key.verify_key])
    found = []
    for text in manifests:
        try:
            signed = SignedManifest.from_json(text.encode())
        except ManifestError as exc:
            raise ValueError(
                f"the node sent a manifest that does not parse ({exc}); not signing a plan"
            ) from None
        try:
            verify_manifest(signed, own)
        except ManifestError:
            raise PermissionError(
                f"{signed.manifest.label} is signed by publisher key {signed.manifest.publisher_key_id}, "
                f"not by the key given ({key.key_id}); sign the plan with the fleet's publisher key "
                "(publisher.key)"
            ) from None
        found.append(signed)
    target, base = found
    if (target.manifest.name, target.manifest.version) != (
        model,
        version,
    ) or base.manifest.version != baseline:
        raise ValueError("the node sent manifests of other versions than asked; not signing a plan")
    now = time.time()
    return RolloutPlan(
        rollout_id=rollout_id or f"{model}-{version}-{secrets.token_hex(2)}"[:64],
        model=model,
        target_version=version,
        target_digest=target.digest,
        baseline_version=baseline,
        baseline_digest=base.digest,
        skew=SkewRule(
            target.manifest.min_runtime_version,
            signature_digest(target.manifest.signature),
            target.manifest.size_bytes,
        ),
        created_at=now,
        expires_at=expiry(now, shape["ttl_s"]),
        publisher_key_id=key.key_id,
        waves=shape["waves"],
        selector=shape["selector"],
        autonomous_scope=shape["autonomous_scope"],
        prefetch=shape["prefetch"],
    )


# --- status and ls -----------------------------------------------------------------------------------

_STATUS_EPILOG = """Examples:

  mesh rollout status --node 127.0.0.1:7000                 the newest rollout

  mesh rollout status hand-1.4-3f9a --watch --node 127.0.0.1:7000

  mesh rollout status hand-1.4-3f9a --json --node 127.0.0.1:7000 | jq '.waves[].status'

With --watch: exits 0 once the rollout completed, 1 once it was aborted."""


@rollout.command("status", epilog=_STATUS_EPILOG)
@click.argument("rollout_id", required=False, default="")
@click.option("--watch", is_flag=True, help="Refresh until the rollout completes or is aborted.")
@admin_options
def status(rollout_id: str, watch: bool, address: str, creds_dir: Path, as_json: bool) -> None:
    """Where a rollout stands, per wave and per site (the newest rollout without ROLLOUT_ID)."""
    from mesh.admin.client import AdminError
    from mesh.cli.common import operator_client

    if not watch:
        report = rollout_call(address, creds_dir, lambda c: c.status(rollout_id))
        emit_json(report) if as_json else console.print(status_view(report, address))
        return
    from rich.live import Live

    with operator_client(address, creds_dir, _client_class()) as client:
        try:
            report = client.status(rollout_id)
            rid = report["rollout_id"]
            if as_json or not console.is_terminal:
                seen = None
                while True:
                    key = json.dumps(
                        [report["state"], report["sites"], [w["on_target"] for w in report["waves"]]]
                    )
                    if key != seen:
                        emit_json(report) if as_json else console.print(status_view(report, address))
                        seen = key
                    if report["state"] in ("completed", "aborted"):
                        break
                    time.sleep(_WATCH_POLL_S)
                    report = client.status(rid)
            else:
                with Live(status_view(report, address), console=console, refresh_per_second=2) as live:
                    while report["state"] not in ("completed", "aborted"):
                        time.sleep(_WATCH_POLL_S)
                        report = client.status(rid)
                        live.update(status_view(report, address))
        except AdminError as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            sys.exit(EXIT_FAILED)
    if report["state"] == "aborted":
        sys.exit(EXIT_FAILED)


def _bar(done: int, total: int, width: int = 12) -> str:
    if total <= 0:
        return " " * width + "   -"
    filled = round(width * done / total)
    return "█" * filled + "░" * (width - filled) + f" {done * 100 // total:3d}%"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def status_view(report: dict[str, Any], address: str = "NODE") -> Any:
    """The human form of a status report: per wave, per site, skipped and unreachable devices."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    style = {"completed": "green", "aborted": "red", "paused": "yellow", "waiting_approval": "yellow"}
    head = Text.assemble(
        (f"rollout {report['rollout_id']}", "bold"),
        f": {report['model']} {report['baseline_version']} -> ",
        (report["target_version"], "bold"),
        "  state: ",
        (report["state"], style.get(report["state"], "cyan")),
        f"  ({report['serving_target']} devices on the target; asked {report['asked']['node_id']} of "
        f"{report['asked']['site']})",
    )
    waves = Table(title="waves", title_justify="left", show_edge=False)
    for column in (
        "wave",
        "share",
        "eligible",
        "in cohort",
        "on target",
        "progress",
        "requests",
        "errors",
        "baseline",
        "status",
        "waits for",
    ):
        waves.add_column(column, no_wrap=column not in ("waits for",))
    for w in report["waves"]:
        share = w["share"] + (" *" if w["needs_approval"] else "")
        waves.add_row(
            str(w["wave"]),
            share,
            str(w["eligible"]),
            str(w["in_cohort"]),
            str(w["on_target"]),
            _bar(w["on_target"], w["in_cohort"]),
            "-" if w["requests"] is None else str(w["requests"]),
            _pct(w["error_rate"]),
            _pct(w["baseline_error_rate"]),
            Text(w["status"], style=_STATUS_STYLE.get(w["status"], "")),
            w["waiting_for"],
        )
    sites = Table(title="sites", title_justify="left", show_edge=False)
    for column in ("site", "state", "wave", "gate", "reason / waits for"):
        sites.add_column(column, no_wrap=column != "reason / waits for")
    for s in report["sites"]:
        verdict = s["verdict"]["outcome"] if s["verdict"] else "-"
        why = s["reason"] or s["waiting_for"]
        sites.add_row(
            s["site"], Text(s["state"], style=style.get(s["state"], "")), str(s["wave"]), verdict, why
        )
    parts: list[Any] = [head, waves, sites]
    notes = []
    if report["skipped"]:
        notes.append(
            f"skipped ({report['skipped_count']}): "
            + ", ".join(f"{s['node_id']} ({s['kind']})" for s in report["skipped"])
        )
    if report["unreachable"]:
        notes.append(f"unreachable ({report['unreachable_count']}): " + ", ".join(report["unreachable"]))
    fleet_views = report.get("fleet_views")  # sites mode
    if fleet_views and fleet_views["note"]:
        notes.append(f"sites mode: {fleet_views['note']}")
    if any(w["needs_approval"] for w in report["waves"]):
        notes.append(
            f"* above the autonomous scope of {report['autonomous_share']}: waits for "
            f"`mesh rollout approve {report['rollout_id']} --wave N --key KEY --node {address}`"
        )
    parts += [Text(n) for n in notes]
    return Group(*parts)


_STATUS_STYLE = {"passed": "green", "failed": "red", "held": "yellow", "paused": "yellow", "soaking": "cyan"}


@rollout.command("ls", epilog="Example:\n\n  mesh rollout ls --node 127.0.0.1:7000")
@admin_options
def ls(address: str, creds_dir: Path, as_json: bool) -> None:
    """The rollouts NODE knows, newest first, with each site's state."""
    from rich.table import Table

    rows = rollout_call(address, creds_dir, lambda c: c.list())
    if as_json:
        emit_json(rows)
        return
    table = Table(show_edge=False)
    for column in ("rollout", "model", "versions", "waves", "state", "sites"):
        table.add_column(column)
    for r in rows:
        sites = ", ".join(
            f"{s} {v['state']}" + (f" w{v['wave']}" if v["wave"] else "") for s, v in r["sites"].items()
        )
        table.add_row(
            r["rollout_id"],
            r["model"],
            f"{r['baseline_version']} -> {r['target_version']}",
            ", ".join(r["waves"]),
            r["state"],
            sites or "-",
        )
    console.print(table if rows else "no rollouts known to this node")


# --- operator commands -------------------------------------------------------------------------------


def _send_command(
    action_name: str,
    rollout_id: str,
    wave: int | None,
    reason: str,
    key_path: Path,
    ttl_s: float,
    address: str,
    creds_dir: Path,
    as_json: bool,
) -> None:
    from mesh.identity.signing import IdentityError, KeyRole, load_signing_key
    from mesh.rollout.plan import CommandAction, PlanFormatError, RolloutError, SignedPlan, sign_command

    try:
        key = load_signing_key(key_path, KeyRole.OPERATOR)
    except IdentityError as exc:
        fail(str(exc))
    action = CommandAction(action_name)

    def submit(client) -> Any:
        docs = client.documents(rollout_id)
        if not docs.signed_plan_json:
            fail(
                f"{client.address} holds no plan of rollout {rollout_id}; `mesh rollout ls --node "
                f"{client.address}` lists the rollouts it knows"
            )
        try:
            plan = SignedPlan.from_json(docs.signed_plan_json.encode()).plan
            command = sign_command(
                key,
                plan,
                action,
                now=time.time(),
                ttl_s=ttl_s,
                nonce=secrets.token_urlsafe(18),
                wave=wave,
                reason=reason,
            )
        except (PlanFormatError, RolloutError) as exc:
            fail(str(exc), EXIT_USAGE)
        return client.command(command.to_json().decode())

    result = rollout_call(address, creds_dir, submit)
    if as_json:
        emit_json(
            {
                "outcome": result.outcome,
                "rollout_id": result.rollout_id,
                "message": result.message,
                "refusal_reason": result.refusal_reason,
                "group": result.group,
                "node_id": result.node_id,
            }
        )
    elif result.outcome == "refused":
        err_console.print(
            f"[red]refused:[/] {result.message} (reason: {result.refusal_reason}); the refusal is "
            "in every replica's audit log",
            highlight=False,
        )
    else:
        console.print(
            f"[green]{result.outcome}[/]: {result.message} (site {result.group}, asked "
            f"{result.node_id}); it reaches the other sites by gossip",
            highlight=False,
        )
    if result.outcome == "refused":
        sys.exit(EXIT_FAILED)


def _command(action: str, summary: str, *, needs_wave: bool, needs_reason: bool, example: str):
    reason_default: dict[str, Any] = {} if needs_reason else {"default": ""}

    @click.argument("rollout_id")
    @click.option(
        "--key",
        "key_path",
        required=True,
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="The operator signing key (operator.key from `mesh fleet init`).",
    )
    # Click counts an explicit default, even None, as given: a required option gets none.
    @click.option(
        "--reason",
        required=needs_reason,
        **reason_default,
        help="Why (goes to every site's audit log).",
    )
    @click.option(
        "--ttl-s",
        type=click.FloatRange(1.0, 7 * 24 * 3600.0),
        default=DEFAULT_COMMAND_TTL_S,
        show_default=True,
        help="How long the signed command stays valid.",
    )
    @admin_options
    def run(
        rollout_id: str,
        key_path: Path,
        reason: str,
        ttl_s: float,
        address: str,
        creds_dir: Path,
        as_json: bool,
        wave: int | None = None,
    ) -> None:
        _send_command(action, rollout_id, wave, reason, key_path, ttl_s, address, creds_dir, as_json)

    run.__doc__ = summary
    if needs_wave:
        run = click.option(
            "--wave",
            type=click.IntRange(1, 10),
            required=True,
            help="The wave (from 1) the command lets start.",
        )(run)
    return rollout.command(action, epilog=f"Example:\n\n  {example}")(run)


approve = _command(
    "approve",
    "Approve wave WAVE of ROLLOUT_ID: it starts once the wave before it passes its gate.",
    needs_wave=True,
    needs_reason=False,
    example="mesh rollout approve hand-1.4-3f9a --wave 3 --key fleet/operator.key --node 127.0.0.1:7000",
)
promote = _command(
    "promote",
    "Start wave WAVE of ROLLOUT_ID now, without waiting for the gate of the wave before.",
    needs_wave=True,
    needs_reason=False,
    example="mesh rollout promote hand-1.4-3f9a --wave 2 --key fleet/operator.key --node 127.0.0.1:7000",
)
pause = _command(
    "pause",
    "Pause ROLLOUT_ID where it stands: no device changes version for it.",
    needs_wave=False,
    needs_reason=False,
    example="mesh rollout pause hand-1.4-3f9a --key fleet/operator.key --node 127.0.0.1:7000",
)
resume = _command(
    "resume",
    "Resume ROLLOUT_ID from where it was paused (its wave's soak starts again).",
    needs_wave=False,
    needs_reason=False,
    example="mesh rollout resume hand-1.4-3f9a --key fleet/operator.key --node 127.0.0.1:7000",
)
abort = _command(
    "abort",
    "Abort ROLLOUT_ID: every device rolls back to the baseline, in every site.",
    needs_wave=False,
    needs_reason=True,
    example="mesh rollout abort hand-1.4-3f9a --reason 'bad outputs' --key fleet/operator.key "
    "--node 127.0.0.1:7000",
)
