"""Plans, keys, counters and commands built from plain values, so rollout tests read like their scenario."""

from __future__ import annotations

import hashlib
import itertools

from mesh.identity.signing import KeyRole, SigningKey, TrustedKeys
from mesh.inference.counts import LATENCY_BUCKETS_S
from mesh.rollout.health import ERROR_KINDS, DeviceReport, NodeHealth, VersionCounters
from mesh.rollout.plan import (
    CommandAction,
    DeviceFacts,
    RolloutCommand,
    RolloutPlan,
    Selector,
    SkewRule,
    Wave,
    expiry,
    sign_command,
    sign_plan,
)

PUBLISHER = SigningKey.generate(KeyRole.PUBLISHER)
OPERATOR = SigningKey.generate(KeyRole.OPERATOR)
NODE = SigningKey.generate(KeyRole.NODE)
STRANGER = SigningKey.generate(KeyRole.PUBLISHER)  # a publisher key of some other fleet
ROGUE_OPERATOR = SigningKey.generate(KeyRole.OPERATOR)  # an operator key of some other fleet
TRUSTED = TrustedKeys([PUBLISHER.verify_key, OPERATOR.verify_key, NODE.verify_key])

SIGNATURE = hashlib.sha256(b"okay-nabu signature").hexdigest()
OTHER_SIGNATURE = hashlib.sha256(b"another signature").hexdigest()
T0 = 1_800_000_000.0
_nonces = itertools.count(1)


def waves(
    *shares_ppm: int, soak_s: float = 60, min_requests: int = 100, max_error_rate: float = 0.05, **kw
) -> tuple[Wave, ...]:
    return tuple(
        Wave(s, soak_s=soak_s, min_requests=min_requests, max_error_rate=max_error_rate, **kw)
        for s in shares_ppm
    )


EVERY_DEVICE = Selector()
DEFAULT_WAVES = waves(10_000, 100_000, 1_000_000)


def make_plan(
    rollout_id: str = "okay-nabu-2",
    *,
    model: str = "okay-nabu",
    target: str = "2.0",
    baseline: str = "1.0",
    plan_waves: tuple[Wave, ...] = DEFAULT_WAVES,
    created_at: float = T0,
    ttl_s: float = 7 * 24 * 3600,
    selector: Selector = EVERY_DEVICE,
    key: SigningKey = PUBLISHER,
    min_runtime: str = "2.3.0",
    min_free_disk_bytes: int = 1_000_000,
    **kw,
) -> RolloutPlan:
    return RolloutPlan(
        rollout_id=rollout_id,
        model=model,
        target_version=target,
        target_digest=hashlib.sha256(f"{model} {target}".encode()).hexdigest(),
        baseline_version=baseline,
        baseline_digest=hashlib.sha256(f"{model} {baseline}".encode()).hexdigest(),
        skew=SkewRule(min_runtime, SIGNATURE, min_free_disk_bytes),
        created_at=created_at,
        expires_at=expiry(created_at, ttl_s),
        publisher_key_id=key.key_id,
        waves=plan_waves,
        selector=selector,
        **kw,
    )


def signed(plan: RolloutPlan, key: SigningKey = PUBLISHER):
    return sign_plan(plan, key)


def command(
    plan: RolloutPlan,
    action: CommandAction,
    *,
    now: float = T0 + 100,
    wave: int | None = None,
    key: SigningKey = OPERATOR,
    reason: str = "",
    ttl_s: float = 3600,
    nonce: str | None = None,
) -> RolloutCommand:
    if action is CommandAction.ABORT and not reason:
        reason = "operator saw bad outputs"
    return sign_command(
        key,
        plan,
        action,
        now=now,
        ttl_s=ttl_s,
        wave=wave,
        reason=reason,
        nonce=nonce or f"nonce-{next(_nonces):06d}",
    )


def counters(
    requests: int,
    errors: int = 0,
    *,
    model: str = "okay-nabu",
    version: str = "2.0",
    epoch: int = 1,
    active_s: float = 3600,
    activation_failures: int = 0,
) -> VersionCounters:
    """Counters with every request in the first latency bucket and every error an exception."""
    errs = [0] * len(ERROR_KINDS)
    errs[0] = errors
    errs[-1] = activation_failures
    buckets = [0] * (len(LATENCY_BUCKETS_S) + 1)
    buckets[0] = requests
    return VersionCounters(
        model, version, epoch, requests, tuple(errs), int(active_s * 1000), tuple(buckets), requests
    )


def report(
    node: str,
    target: tuple[int, int] | None = None,
    baseline: tuple[int, int] | None = None,
    *,
    reachable: bool = True,
    active_s: float = 3600,
    activation_failures: int = 0,
    skipped=None,
) -> DeviceReport:
    t = None
    if target is not None or activation_failures:
        requests, errors = target or (0, 0)
        t = counters(requests, errors, active_s=active_s, activation_failures=activation_failures)
    b = counters(*baseline, version="1.0") if baseline is not None else None
    return DeviceReport(node, reachable, t, b, skipped)


def device(
    node_id: str,
    *,
    labels: dict[str, str] | None = None,
    runtime: str = "2.3.0",
    free_disk_bytes: int = 10_000_000,
    signature: str | None = SIGNATURE,
    holds_target: bool = False,
) -> DeviceFacts:
    return DeviceFacts(
        node_id,
        {"device_class": "camera", "site": "a"} if labels is None else labels,
        runtime,
        free_disk_bytes,
        signature,
        holds_target,
    )


def node_health(*entries: VersionCounters) -> NodeHealth:
    return NodeHealth(tuple(entries))
