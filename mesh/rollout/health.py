"""Health a node gossips per model version, and the gate that judges a wave by it. Pure.

Counters: each node publishes, per (model, version), compact cumulative
counters (`VersionCounters`: requests, errors by kind including failed
activations, how long the version has been active, a latency histogram) and
the rollouts it skips. `encode_node_health` packs them into a bounded binary
blob for membership metadata (varints: a typical entry is ~40 bytes).
Counters are cumulative and carry an `epoch` (bumped when the node restarts
and its counters start again from zero), so a window is the difference from a
`Mark` taken at its start, and a restart never reads as negative traffic.

The gate (`evaluate_gate`) judges one wave of one rollout from those
counters, given `now`:

- FAIL at once if any cohort device failed to activate the target in the
  window; FAIL when the target's error rate is above the wave's limit (or
  above the baseline's rate plus the margin, with a relative gate) over at
  least `min_requests`, for the whole cohort or for the devices new in this
  wave alone. Errors count wherever they were measured, including the last
  report of a device that has since become unreachable.
- PASS once the soak time is over, when the cohort devices that are reachable
  and have served the target for the whole soak served at least
  `min_requests` with the rate within the limit. An install does not count
  as success before the device has served (hawkbit #3185).
- Otherwise INCONCLUSIVE, with the reason (soaking, too few requests, no
  data). Never a silent pass or fail on missing data (argo-rollouts #1466).
  `deadline_passed` says the wave has been undecided for longer than its
  deadline: the state machine then pauses and asks the operator.

Devices that are dead or unreachable, never reported, skipped the rollout or
failed to activate are listed by name in the verdict; none counts as healthy.
A site whose own cohort for a wave is empty (apportionment gave it no device)
judges by other sites' `SiteEvidence`, gossiped by the federation pool.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from mesh.inference.counts import LATENCY_BUCKETS_S, ErrorKind, VersionHealth
from mesh.rollout._json import expect_object, integer, json_number, number, text
from mesh.rollout.plan import (
    MAX_WAVES,
    ROLLOUT_ID_RE,
    PlanFormatError,
    RolloutError,
    RolloutPlan,
    SkipKind,
    check_name_field,
)

HEALTH_CODEC_VERSION = 1
# A node's health shares the membership metadata budget (at most a quarter of max_gossip_bytes, 2 KiB
# by default) with its holdings; 1 KiB is ~20 entries, far more than the two versions a rollout needs.
MAX_HEALTH_BYTES = 1024
MAX_HEALTH_ENTRIES = 16
MAX_SKIPS = 8
MAX_COUNT = 2**62  # larger than any counter a device reaches; bounds what a peer can make us add up
ACTIVATION_FAILED = "activation_failed"
# Fixed order on the wire; the serving kinds are the inference runtime's.
ERROR_KINDS = tuple(k.value for k in ErrorKind) + (ACTIVATION_FAILED,)
SERVING_ERROR_KINDS = tuple(k.value for k in ErrorKind)
LATENCY_BUCKET_COUNT = len(LATENCY_BUCKETS_S) + 1
# A verdict lists at most this many devices per category by name (the counts are always complete).
MAX_LISTED = 64
MAX_REPORTS = 10_000
_SITE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def covered(soaked_devices: int, silent_devices: int) -> bool:
    """May a gate pass on `soaked_devices` cohort devices that served the target for the whole soak while
    `silent_devices` did not (unreachable, still on the baseline, on the target for less than the soak)?
    Only if at least as many did as did not: enough requests from a few busy devices while most of the
    cohort is silent or never moved is not evidence about the wave (AWS IoT's minNumberOfExecutedThings).
    Skipping devices and devices that serve another model take no part and count on neither side. Of
    other sites, only their unreachable devices are known (their evidence says no more)."""
    return soaked_devices >= silent_devices


class HealthFormatError(RolloutError):
    """A health blob, evidence or verdict document from a peer is malformed (names what is wrong)."""


# --- counters ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mark:
    """Cumulative counters at a moment: where a window starts."""

    epoch: int
    requests: int
    errors: int  # serving errors (exception, non-finite output, deadline exceeded)
    activation_failures: int
    active_ms: int

    def to_list(self) -> list[int]:
        return [self.epoch, self.requests, self.errors, self.activation_failures, self.active_ms]

    @classmethod
    def from_list(cls, doc: object, where: str) -> Mark:
        if not isinstance(doc, list) or len(doc) != 5:
            raise HealthFormatError(
                f"{where}: expected [epoch, requests, errors, activation_failures, active_ms]"
            )
        values = [integer(v, where, HealthFormatError, maximum=MAX_COUNT) for v in doc]
        return cls(*values)


@dataclass(frozen=True)
class Window:
    """Counts accumulated over a window (a `VersionCounters` minus a `Mark`)."""

    requests: int = 0
    errors: int = 0
    activation_failures: int = 0
    active_ms: int = 0


@dataclass(frozen=True)
class VersionCounters:
    """One node's cumulative counters for one model version since `epoch` began."""

    model: str
    version: str
    epoch: int
    requests: int
    errors: tuple[int, ...]  # per kind, in ERROR_KINDS order
    active_ms: int  # how long this version has been the active one on the node (monotonic clock)
    latency_buckets: tuple[int, ...]  # as mesh.inference.health: per LATENCY_BUCKETS_S bucket, then +Inf
    latency_sum_ms: int

    def __post_init__(self) -> None:
        check_name_field(self.model, "health.model")
        check_name_field(self.version, "health.version")
        where = f"health of {self.model} {self.version}"
        for name in ("epoch", "requests", "active_ms", "latency_sum_ms"):
            integer(getattr(self, name), f"{where}: {name}", HealthFormatError, maximum=MAX_COUNT)
        if not isinstance(self.errors, tuple) or len(self.errors) != len(ERROR_KINDS):
            raise HealthFormatError(
                f"{where}: errors must be {len(ERROR_KINDS)} counts ({', '.join(ERROR_KINDS)})"
            )
        if not isinstance(self.latency_buckets, tuple) or len(self.latency_buckets) != LATENCY_BUCKET_COUNT:
            raise HealthFormatError(f"{where}: latency_buckets must be {LATENCY_BUCKET_COUNT} counts")
        for count in self.errors + self.latency_buckets:
            integer(count, f"{where}: a count", HealthFormatError, maximum=MAX_COUNT)
        if self.serving_errors > self.requests:
            raise HealthFormatError(
                f"{where}: {self.serving_errors} serving errors in {self.requests} requests"
            )
        if sum(self.latency_buckets) != self.requests:
            raise HealthFormatError(
                f"{where}: latency buckets hold {sum(self.latency_buckets)} requests, "
                f"requests is {self.requests}"
            )

    @property
    def key(self) -> tuple[str, str]:
        return self.model, self.version

    def errors_by_kind(self) -> dict[str, int]:
        return dict(zip(ERROR_KINDS, self.errors, strict=True))

    @property
    def serving_errors(self) -> int:
        return sum(self.errors[: len(SERVING_ERROR_KINDS)])

    @property
    def activation_failures(self) -> int:
        return self.errors[-1]

    def mark(self) -> Mark:
        return Mark(self.epoch, self.requests, self.serving_errors, self.activation_failures, self.active_ms)

    def since(self, start: Mark | None) -> Window:
        """The counts after `start`; everything since the epoch began if `start` is None, of another
        epoch (the node restarted), or ahead of these counters (which only a restart explains)."""
        now = self.mark()
        if (
            start is None
            or start.epoch != now.epoch
            or any(a < b for a, b in zip(now.to_list()[1:], start.to_list()[1:], strict=True))
        ):
            return Window(now.requests, now.errors, now.activation_failures, now.active_ms)
        return Window(
            now.requests - start.requests,
            now.errors - start.errors,
            now.activation_failures - start.activation_failures,
            now.active_ms - start.active_ms,
        )

    def latency_quantile_s(self, q: float) -> float | None:
        """Upper bound of the latency bucket holding quantile `q` (inf above the last bound), or None."""
        return latency_quantile_s(self.latency_buckets, q)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "epoch": self.epoch,
            "requests": self.requests,
            "errors": self.errors_by_kind(),
            "active_ms": self.active_ms,
            "latency_buckets": list(self.latency_buckets),
            "latency_sum_ms": self.latency_sum_ms,
        }

    @classmethod
    def from_health(
        cls, health: VersionHealth, *, epoch: int, active_s: float, activation_failures: int = 0
    ) -> VersionCounters:
        """From the inference runtime's counters (`HealthCounters.snapshot()`), plus what only the node
        knows: its restart epoch, how long the version has been active, failed activations of it."""
        errors = tuple(int(health.errors.get(kind, 0)) for kind in SERVING_ERROR_KINDS)
        return cls(
            model=health.model,
            version=health.version,
            epoch=epoch,
            requests=health.requests,
            errors=errors + (activation_failures,),
            active_ms=max(0, int(active_s * 1000)),
            latency_buckets=tuple(health.latency_buckets),
            latency_sum_ms=max(0, int(round(health.latency_sum_s * 1000))),
        )


def latency_quantile_s(buckets: tuple[int, ...], q: float) -> float | None:
    total = sum(buckets)
    if total == 0:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for bound, count in zip(LATENCY_BUCKETS_S + (math.inf,), buckets, strict=True):
        seen += count
        if seen >= rank:
            return bound
    return math.inf


@dataclass(frozen=True)
class RolloutSkip:
    """A node sits rollout `rollout_id` out, for a reason of kind `kind`."""

    rollout_id: str
    kind: SkipKind


@dataclass(frozen=True)
class NodeHealth:
    """Everything a node gossips for rollouts: counters per version and the rollouts it skips."""

    versions: tuple[VersionCounters, ...] = ()
    skips: tuple[RolloutSkip, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "versions", tuple(sorted(self.versions, key=lambda c: c.key)))
        object.__setattr__(self, "skips", tuple(sorted(self.skips, key=lambda s: s.rollout_id)))
        if len(self.versions) > MAX_HEALTH_ENTRIES or len(self.skips) > MAX_SKIPS:
            raise HealthFormatError(
                f"node health: at most {MAX_HEALTH_ENTRIES} versions and {MAX_SKIPS} skips"
            )
        if len({c.key for c in self.versions}) != len(self.versions):
            raise HealthFormatError("node health: a model version is listed twice")
        if len({s.rollout_id for s in self.skips}) != len(self.skips):
            raise HealthFormatError("node health: a rollout skip is listed twice")
        for s in self.skips:
            if (
                not isinstance(s.rollout_id, str)
                or not ROLLOUT_ID_RE.fullmatch(s.rollout_id)
                or not isinstance(s.kind, SkipKind)
            ):
                raise HealthFormatError(f"node health: bad skip {s!r}")

    def counters(self, model: str, version: str) -> VersionCounters | None:
        return next((c for c in self.versions if c.key == (model, version)), None)

    def skip(self, rollout_id: str) -> SkipKind | None:
        return next((s.kind for s in self.skips if s.rollout_id == rollout_id), None)


_SKIP_KINDS = tuple(SkipKind)


def encode_node_health(health: NodeHealth) -> bytes:
    """The bounded binary form for membership metadata; raises HealthFormatError if it exceeds the bound."""
    out = bytearray([HEALTH_CODEC_VERSION])
    _put_varint(out, len(health.versions))
    for c in health.versions:
        _put_text(out, c.model)
        _put_text(out, c.version)
        for value in (c.epoch, c.requests, *c.errors, c.active_ms, *c.latency_buckets, c.latency_sum_ms):
            _put_varint(out, value)
    _put_varint(out, len(health.skips))
    for s in health.skips:
        _put_text(out, s.rollout_id)
        out.append(_SKIP_KINDS.index(s.kind))
    if len(out) > MAX_HEALTH_BYTES:
        raise HealthFormatError(
            f"node health is {len(out)} bytes; at most {MAX_HEALTH_BYTES} fit the metadata"
        )
    return bytes(out)


def decode_node_health(data: object) -> NodeHealth:
    """Parse a peer's health blob strictly; any problem raises HealthFormatError (never another error)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise HealthFormatError(f"node health: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > MAX_HEALTH_BYTES:
        raise HealthFormatError(f"node health is {len(data)} bytes; at most {MAX_HEALTH_BYTES} allowed")
    reader = _Reader(data)
    version = reader.byte()
    if version != HEALTH_CODEC_VERSION:
        raise HealthFormatError(
            f"node health codec {version} is not known (this node reads {HEALTH_CODEC_VERSION}); "
            "upgrade the node"
        )
    try:
        entries = []
        count = reader.count(MAX_HEALTH_ENTRIES, "versions")
        for _ in range(count):
            model, version_name = reader.text(), reader.text()
            epoch, requests = reader.varint(), reader.varint()
            errors = tuple(reader.varint() for _ in ERROR_KINDS)
            active_ms = reader.varint()
            buckets = tuple(reader.varint() for _ in range(LATENCY_BUCKET_COUNT))
            entries.append(
                VersionCounters(
                    model, version_name, epoch, requests, errors, active_ms, buckets, reader.varint()
                )
            )
        skips = []
        for _ in range(reader.count(MAX_SKIPS, "skips")):
            rollout_id = reader.text()
            kind = reader.byte()
            if kind >= len(_SKIP_KINDS):
                raise HealthFormatError(f"node health: unknown skip kind {kind}")
            skips.append(RolloutSkip(rollout_id, _SKIP_KINDS[kind]))
        if not reader.done:
            raise HealthFormatError(f"node health: {len(data) - reader.offset} bytes after the last field")
        health = NodeHealth(tuple(entries), tuple(skips))
    except PlanFormatError as exc:
        raise HealthFormatError(f"node health: {exc}") from None
    # With minimal varints, the only other spelling of the same health is another order of its entries.
    if health.versions != tuple(entries) or health.skips != tuple(skips):
        raise HealthFormatError("node health is not in canonical form (entries out of order)")
    return health


def _put_varint(out: bytearray, value: int) -> None:
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return


def _put_text(out: bytearray, value: str) -> None:
    raw = value.encode("utf-8")
    _put_varint(out, len(raw))
    out.extend(raw)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0

    @property
    def done(self) -> bool:
        return self.offset == len(self.data)

    def byte(self) -> int:
        if self.offset >= len(self.data):
            raise HealthFormatError("node health: truncated")
        value = self.data[self.offset]
        self.offset += 1
        return value

    def varint(self) -> int:
        value, shift = 0, 0
        while True:
            b = self.byte()
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                if b == 0 and shift:
                    raise HealthFormatError(
                        "node health is not in canonical form (a number padded with zeros)"
                    )
                break
            shift += 7
            if shift > 63:
                raise HealthFormatError("node health: a number is longer than 64 bits")
        if value > MAX_COUNT:
            raise HealthFormatError(f"node health: a count of {value} is out of range")
        return value

    def count(self, limit: int, what: str) -> int:
        value = self.varint()
        if value > limit:
            raise HealthFormatError(f"node health: {value} {what}, at most {limit}")
        return value

    def text(self) -> str:
        length = self.count(64, "characters in a name")
        if self.offset + length > len(self.data):
            raise HealthFormatError("node health: truncated")
        raw = self.data[self.offset : self.offset + length]
        self.offset += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise HealthFormatError("node health: a name is not UTF-8") from None


# --- the gate ----------------------------------------------------------------------------------------


class GateOutcome(enum.Enum):
    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"


@dataclass(frozen=True)
class DeviceReport:
    """What the gate knows of one device: is it reachable now, its counters for the target and the
    baseline (last reported, even if it is unreachable now), and whether it skips the rollout."""

    node_id: str
    reachable: bool
    target: VersionCounters | None = None
    baseline: VersionCounters | None = None
    skipped: SkipKind | None = None

    @classmethod
    def from_health(
        cls, node_id: str, reachable: bool, health: NodeHealth | None, plan: RolloutPlan
    ) -> DeviceReport:
        if health is None:
            return cls(node_id, reachable)
        return cls(
            node_id,
            reachable,
            health.counters(plan.model, plan.target_version),
            health.counters(plan.model, plan.baseline_version),
            health.skip(plan.rollout_id),
        )


@dataclass(frozen=True)
class DeviceMarks:
    """Where one device's window starts, for the target and for the baseline."""

    target: Mark | None = None
    baseline: Mark | None = None


@dataclass(frozen=True)
class Totals:
    requests: int = 0
    errors: int = 0
    devices: int = 0

    @property
    def rate(self) -> Fraction | None:
        return Fraction(self.errors, self.requests) if self.requests else None

    def __add__(self, other: Totals) -> Totals:
        """Saturating at MAX_COUNT (what a peer's figures may say each): a verdict built from absurd
        figures stays one the ledger can record."""
        requests = min(self.requests + other.requests, MAX_COUNT)
        return Totals(
            requests, min(self.errors + other.errors, requests), min(self.devices + other.devices, MAX_COUNT)
        )

    def describe(self) -> str:
        rate = self.rate
        shown = "no requests" if rate is None else f"{float(rate):.2%} errors in {self.requests} requests"
        return f"{shown} from {self.devices} device{'s' if self.devices != 1 else ''}"

    def to_list(self) -> list[int]:
        return [self.requests, self.errors, self.devices]

    @classmethod
    def from_list(cls, doc: object, where: str) -> Totals:
        if not isinstance(doc, list) or len(doc) != 3:
            raise HealthFormatError(f"{where}: expected [requests, errors, devices]")
        requests, errors, devices = (integer(v, where, HealthFormatError, maximum=MAX_COUNT) for v in doc)
        if errors > requests:
            raise HealthFormatError(f"{where}: {errors} errors in {requests} requests")
        return cls(requests, errors, devices)


@dataclass(frozen=True)
class SiteEvidence:
    """One site's measurement of a wave, for sites that have no cohort device of their own in it."""

    site: str
    rollout_id: str
    wave: int
    measured: Totals  # every cohort device of that site that reported in the window
    soaked: Totals  # reachable ones that have served the target the whole soak
    activation_failures: int = 0
    unreachable: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.site, str) or not _SITE_RE.fullmatch(self.site):
            raise HealthFormatError(f"evidence.site: {self.site!r} is not a site name")
        if not isinstance(self.rollout_id, str) or not ROLLOUT_ID_RE.fullmatch(self.rollout_id):
            raise HealthFormatError(f"evidence.rollout_id: {self.rollout_id!r} is not a rollout id")
        integer(self.wave, "evidence.wave", HealthFormatError, minimum=1, maximum=MAX_WAVES)
        integer(
            self.activation_failures, "evidence.activation_failures", HealthFormatError, maximum=MAX_COUNT
        )
        integer(self.unreachable, "evidence.unreachable", HealthFormatError, maximum=MAX_COUNT)

    def to_dict(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "rollout_id": self.rollout_id,
            "wave": self.wave,
            "measured": self.measured.to_list(),
            "soaked": self.soaked.to_list(),
            "activation_failures": self.activation_failures,
            "unreachable": self.unreachable,
        }

    @classmethod
    def from_dict(cls, doc: object) -> SiteEvidence:
        d = expect_object(doc, "evidence", _EVIDENCE_FIELDS, HealthFormatError)
        return cls(
            d["site"],
            d["rollout_id"],
            d["wave"],
            Totals.from_list(d["measured"], "evidence.measured"),
            Totals.from_list(d["soaked"], "evidence.soaked"),
            d["activation_failures"],
            d["unreachable"],
        )


_EVIDENCE_FIELDS = frozenset(
    {"site", "rollout_id", "wave", "measured", "soaked", "activation_failures", "unreachable"}
)


@dataclass(frozen=True)
class GateVerdict:
    """The gate's answer for one wave at `evaluated_at`, with the evidence behind it.

    `marks` are every reporting device's counters at `evaluated_at`: when a PASS advances the rollout,
    they become the start of the next wave's window (in the replicated state, so a new leader agrees).
    """

    rollout_id: str
    wave: int
    outcome: GateOutcome
    reason: str
    evaluated_at: float
    soak_started_at: float
    measured: Totals = Totals()  # target, every cohort device's window (reachable or not) plus evidence
    soaked: Totals = Totals()  # target, reachable devices that served it the whole soak (what may PASS)
    baseline: Totals = Totals()  # baseline, reachable devices outside the cohort
    # `measured` and `soaked` of this site's own devices, without other sites' evidence: what this site may
    # tell others (relaying what it heard would count every site again at every hop).
    own_measured: Totals = Totals()
    own_soaked: Totals = Totals()
    cohort_size: int = 0
    unreachable: tuple[str, ...] = ()
    failed_activation: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    not_serving: tuple[str, ...] = ()  # reachable cohort devices with no target requests in the window
    deadline_passed: bool = False
    marks: tuple[tuple[str, DeviceMarks], ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.rollout_id, str) or not ROLLOUT_ID_RE.fullmatch(self.rollout_id):
            raise HealthFormatError(f"verdict.rollout_id: {self.rollout_id!r} is not a rollout id")
        integer(self.wave, "verdict.wave", HealthFormatError, minimum=1, maximum=MAX_WAVES)
        if not isinstance(self.outcome, GateOutcome):
            raise HealthFormatError(f"verdict.outcome: expected a GateOutcome, got {self.outcome!r}")
        text(self.reason, "verdict.reason", HealthFormatError, 1024)
        for name in ("evaluated_at", "soak_started_at"):
            object.__setattr__(self, name, number(getattr(self, name), f"verdict.{name}", HealthFormatError))
        integer(self.cohort_size, "verdict.cohort_size", HealthFormatError, maximum=MAX_COUNT)
        for name in ("unreachable", "failed_activation", "skipped", "not_serving"):
            names = getattr(self, name)
            if (
                not isinstance(names, tuple)
                or len(names) > MAX_LISTED
                or not all(isinstance(n, str) and _SITE_RE.fullmatch(n) for n in names)
            ):
                raise HealthFormatError(f"verdict.{name}: expected at most {MAX_LISTED} node ids")
        if len(self.marks) > MAX_REPORTS:
            raise HealthFormatError(f"verdict.marks: at most {MAX_REPORTS} devices")

    @property
    def rate(self) -> Fraction | None:
        return self.measured.rate

    def marks_map(self) -> dict[str, DeviceMarks]:
        return dict(self.marks)

    def evidence(self, site: str, unreachable_count: int | None = None) -> SiteEvidence:
        """This verdict as the evidence a site gossips for other sites."""
        return SiteEvidence(
            site,
            self.rollout_id,
            self.wave,
            self.own_measured,
            self.own_soaked,
            len(self.failed_activation),
            len(self.unreachable) if unreachable_count is None else unreachable_count,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "rollout_id": self.rollout_id,
            "wave": self.wave,
            "outcome": self.outcome.value,
            "reason": self.reason,
            "evaluated_at": json_number(self.evaluated_at),
            "soak_started_at": json_number(self.soak_started_at),
            "measured": self.measured.to_list(),
            "soaked": self.soaked.to_list(),
            "baseline": self.baseline.to_list(),
            "own_measured": self.own_measured.to_list(),
            "own_soaked": self.own_soaked.to_list(),
            "cohort_size": self.cohort_size,
            "unreachable": list(self.unreachable),
            "failed_activation": list(self.failed_activation),
            "skipped": list(self.skipped),
            "not_serving": list(self.not_serving),
            "deadline_passed": self.deadline_passed,
            "marks": {
                node: [
                    None if m.target is None else m.target.to_list(),
                    None if m.baseline is None else m.baseline.to_list(),
                ]
                for node, m in self.marks
            },
        }

    @classmethod
    def from_dict(cls, doc: object) -> GateVerdict:
        d = expect_object(doc, "verdict", _VERDICT_FIELDS, HealthFormatError)
        try:
            outcome = GateOutcome(d["outcome"])
        except (ValueError, TypeError):
            raise HealthFormatError(f"verdict.outcome: unknown outcome {d['outcome']!r}") from None
        if not isinstance(d["deadline_passed"], bool):
            raise HealthFormatError("verdict.deadline_passed: expected true or false")
        lists = {}
        for name in ("unreachable", "failed_activation", "skipped", "not_serving"):
            if not isinstance(d[name], list):
                raise HealthFormatError(f"verdict.{name}: expected a list of node ids")
            lists[name] = tuple(d[name])
        marks_doc = d["marks"]
        if not isinstance(marks_doc, dict) or len(marks_doc) > MAX_REPORTS:
            raise HealthFormatError(f"verdict.marks: expected an object of at most {MAX_REPORTS} devices")
        marks = []
        for node, pair in sorted(marks_doc.items()):
            where = f"verdict.marks.{str(node)[:64]}"
            if not _SITE_RE.fullmatch(node) or not isinstance(pair, list) or len(pair) != 2:
                raise HealthFormatError(f"{where}: expected a node id and [target mark, baseline mark]")
            target, baseline = (None if m is None else Mark.from_list(m, where) for m in pair)
            marks.append((node, DeviceMarks(target, baseline)))
        return cls(
            rollout_id=d["rollout_id"],
            wave=d["wave"],
            outcome=outcome,
            reason=d["reason"],
            evaluated_at=d["evaluated_at"],
            soak_started_at=d["soak_started_at"],
            measured=Totals.from_list(d["measured"], "verdict.measured"),
            soaked=Totals.from_list(d["soaked"], "verdict.soaked"),
            baseline=Totals.from_list(d["baseline"], "verdict.baseline"),
            own_measured=Totals.from_list(d["own_measured"], "verdict.own_measured"),
            own_soaked=Totals.from_list(d["own_soaked"], "verdict.own_soaked"),
            cohort_size=d["cohort_size"],
            deadline_passed=d["deadline_passed"],
            marks=tuple(marks),
            **lists,
        )


_VERDICT_FIELDS = frozenset(
    {
        "rollout_id",
        "wave",
        "outcome",
        "reason",
        "evaluated_at",
        "soak_started_at",
        "measured",
        "soaked",
        "baseline",
        "own_measured",
        "own_soaked",
        "cohort_size",
        "unreachable",
        "failed_activation",
        "skipped",
        "not_serving",
        "deadline_passed",
        "marks",
    }
)


@dataclass(frozen=True)
class FoldedEvidence:
    """Other sites' evidence for one rollout as the gate reads it, folded once (`fold_evidence`): its size
    depends on the plan's waves, never on how many sites there are, so it can be handed to a site leader
    that does not see the other sites itself (sites mode) and the gate's cost does not grow with them.

    `measured` and `activation_failures` sum every entry of every wave (errors count wherever they were
    measured); `vouch[w - 1]` is, for a gate of wave `w`, what other sites' entries of wave `w` or later
    vouch for: the soaked totals of each site's best such entry, summed over the sites, and the sum over
    the sites of their most unreachable devices."""

    rollout_id: str
    measured: Totals = Totals()
    activation_failures: int = 0
    vouch: tuple[tuple[Totals, int], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.rollout_id, str) or not ROLLOUT_ID_RE.fullmatch(self.rollout_id):
            raise HealthFormatError(f"evidence.rollout_id: {self.rollout_id!r} is not a rollout id")
        integer(
            self.activation_failures, "evidence.activation_failures", HealthFormatError, maximum=MAX_COUNT
        )
        if len(self.vouch) > MAX_WAVES:
            raise HealthFormatError(f"evidence.vouch: at most {MAX_WAVES} waves, got {len(self.vouch)}")
        for row in self.vouch:
            if not (isinstance(row, tuple) and len(row) == 2 and isinstance(row[0], Totals)):
                raise HealthFormatError("evidence.vouch: expected (soaked totals, silent devices) per wave")
            integer(row[1], "evidence.vouch.silent", HealthFormatError, maximum=MAX_COUNT)

    def at(self, wave: int) -> tuple[Totals, int]:
        """(soaked, silent) vouched for a gate of `wave`: nothing past the waves folded."""
        return self.vouch[wave - 1] if 1 <= wave <= len(self.vouch) else (Totals(), 0)

    @property
    def empty(self) -> bool:
        return (
            self.measured == Totals()
            and not self.activation_failures
            and not any(soaked != Totals() or silent for soaked, silent in self.vouch)
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "rollout_id": self.rollout_id,
            "measured": self.measured.to_list(),
            "activation_failures": self.activation_failures,
            "vouch": [[soaked.to_list(), silent] for soaked, silent in self.vouch],
        }

    @classmethod
    def from_dict(cls, doc: object) -> FoldedEvidence:
        d = expect_object(doc, "evidence", _FOLDED_FIELDS, HealthFormatError)
        rows = d["vouch"]
        if not isinstance(rows, list) or len(rows) > MAX_WAVES:
            raise HealthFormatError(f"evidence.vouch: expected a list of at most {MAX_WAVES} waves")
        vouch = []
        for k, row in enumerate(rows, 1):
            if not isinstance(row, list) or len(row) != 2:
                raise HealthFormatError(f"evidence.vouch[{k}]: expected [soaked, silent]")
            vouch.append((Totals.from_list(row[0], f"evidence.vouch[{k}].soaked"), row[1]))
        return cls(
            d["rollout_id"],
            Totals.from_list(d["measured"], "evidence.measured"),
            d["activation_failures"],
            tuple(vouch),
        )


_FOLDED_FIELDS = frozenset({"rollout_id", "measured", "activation_failures", "vouch"})


def _saturated(t: Totals) -> Totals:
    """`t` with each count at most MAX_COUNT (errors kept at most requests)."""
    requests = min(t.requests, MAX_COUNT)
    return Totals(requests, min(t.errors, requests), min(t.devices, MAX_COUNT))


def fold_evidence(
    rollout_id: str, remote: Iterable[SiteEvidence], *, besides: str | None = None, waves: int = MAX_WAVES
) -> FoldedEvidence:
    """Fold other sites' evidence for `rollout_id` (entries of other rollouts, and of site `besides`, are
    ignored) as `evaluate_gate` reads it, for gates of waves 1 to `waves`."""
    entries = [e for e in remote if e.rollout_id == rollout_id and e.site != besides]
    measured = Totals()
    failures = 0
    for evidence in entries:
        # Errors count from any wave (a site's entries cover windows that do not overlap).
        measured += evidence.measured
        failures += evidence.activation_failures
    # Sums of peers' counts saturate at MAX_COUNT (each entry may say up to that): a peer's absurd figures
    # still fail the wave, they do not make the fold itself invalid.
    measured, failures = _saturated(measured), min(failures, MAX_COUNT)
    vouch = []
    for wave in range(1, waves + 1):
        # Only evidence of this wave or a later one (more devices on the target) may vouch for this one,
        # and one entry per site: a site announces its last passed wave beside its current one, the same
        # devices in both. Its devices heard from by the entry that heard the most; its silent ones by
        # the entry that misses the most (the current wave's, say, where the passed wave's snapshot is
        # out of date). A site's past never speaks over its present silence: at worst this holds a pass
        # back while a later wave's devices are still soaking (the safe direction).
        best: dict[str, SiteEvidence] = {}
        silent_by_site: dict[str, int] = {}
        for evidence in entries:
            if evidence.wave < wave:
                continue
            held = best.get(evidence.site)
            if held is None or (evidence.soaked.devices, evidence.wave) > (held.soaked.devices, held.wave):
                best[evidence.site] = evidence
            silent_by_site[evidence.site] = max(silent_by_site.get(evidence.site, 0), evidence.unreachable)
        soaked = Totals()
        for evidence in best.values():
            soaked += evidence.soaked
        vouch.append((_saturated(soaked), min(sum(silent_by_site.values()), MAX_COUNT)))
    while vouch and vouch[-1] == (Totals(), 0):
        vouch.pop()
    return FoldedEvidence(rollout_id, measured, failures, tuple(vouch))


def evaluate_gate(
    plan: RolloutPlan,
    wave: int,
    *,
    cohort: Iterable[str],
    reports: Iterable[DeviceReport],
    marks: Mapping[str, DeviceMarks],
    soak_started_at: float,
    now: float,
    remote: Iterable[SiteEvidence] | FoldedEvidence = (),
    site: str | None = None,
    earlier: Iterable[str] = (),
) -> GateVerdict:
    """Judge wave `wave` of `plan` at `now` (see the module rules).

    `cohort` is this site's cohort of the wave (node ids), `reports` what is known of every selected
    device of the site (cohort or not: devices outside it measure the baseline), `marks` where each
    device's window starts (from the replicated state), `remote` other sites' evidence for this rollout
    (entries from `site` itself are ignored, so a site never counts its own evidence twice; or the same
    already folded by `fold_evidence`, which judges exactly alike), `earlier`
    this site's cohort of the wave before (empty for wave 1, or where the site had no device in it).

    The devices new in this wave (in `cohort`, not in `earlier`) are also judged on their own: the
    devices of earlier waves bring the requests they served since the last pass, which after a wave held
    overnight for an approval can outweigh the newcomers' many times over and hide a version that fails
    only on them.
    """
    w = plan.wave(wave)
    members = frozenset(cohort)
    before = frozenset(earlier)
    by_node = {r.node_id: r for r in reports}
    if len(by_node) > MAX_REPORTS:
        raise HealthFormatError(f"gate: {len(by_node)} device reports, at most {MAX_REPORTS}")
    measured = soaked = reachable_target = baseline = newcomers = Totals()
    unreachable: list[str] = []
    failed: list[str] = []
    skipped: list[str] = []
    not_serving: list[str] = []
    erring: list[str] = []  # cohort devices of this site whose window holds errors (named in a FAIL)
    erring_new: list[str] = []  # of them, those new in this wave
    new_marks: list[tuple[str, DeviceMarks]] = []
    waiting = 0  # reachable cohort devices of this model that did not serve the target the whole soak
    soak_ms = int(w.soak_s * 1000)
    for node in sorted(members | by_node.keys()):
        report = by_node.get(node)
        start = marks.get(node, DeviceMarks())
        if report is not None:
            new_marks.append(
                (
                    node,
                    DeviceMarks(
                        report.target.mark() if report.target else None,
                        report.baseline.mark() if report.baseline else None,
                    ),
                )
            )
        if node not in members:
            if (
                report is not None
                and report.reachable
                and report.baseline is not None
                and report.skipped is None
            ):
                got = report.baseline.since(start.baseline)
                baseline += Totals(got.requests, got.errors, 1)
            continue
        if report is None:
            unreachable.append(node)
            continue
        if report.skipped is not None:
            skipped.append(node)
            continue
        window = report.target.since(start.target) if report.target is not None else Window()
        if window.activation_failures:
            failed.append(node)
        if window.requests:
            measured += Totals(window.requests, window.errors, 1)
            if node not in before:
                newcomers += Totals(window.requests, window.errors, 1)
            if window.errors:
                erring.append(node)
                if node not in before:
                    erring_new.append(node)
        if not report.reachable:
            unreachable.append(node)
            continue
        runs_model = report.target is not None or report.baseline is not None
        if window.requests == 0:
            not_serving.append(node)
            waiting += runs_model  # still on the baseline (fetching, activating); another model: not counted
            continue
        reachable_target += Totals(window.requests, window.errors, 1)
        if window.active_ms >= soak_ms:
            soaked += Totals(window.requests, window.errors, 1)
        else:
            waiting += 1  # on the target, but not for the whole soak yet
    own_measured, own_soaked = measured, soaked
    folded = (
        remote
        if isinstance(remote, FoldedEvidence)
        else fold_evidence(plan.rollout_id, remote, besides=site, waves=wave)
    )
    if folded.rollout_id == plan.rollout_id:
        measured += folded.measured
        remote_failures = folded.activation_failures
        vouched, remote_silent = folded.at(wave)
        reachable_target += vouched
        soaked += vouched
    else:
        remote_failures = remote_silent = 0
    soak_left_s = soak_started_at + w.soak_s - now
    deadline_passed = now >= soak_started_at + w.deadline_s  # type: ignore[operator]

    def verdict(outcome: GateOutcome, reason: str) -> GateVerdict:
        return GateVerdict(
            rollout_id=plan.rollout_id,
            wave=wave,
            outcome=outcome,
            reason=reason,
            evaluated_at=now,
            soak_started_at=soak_started_at,
            measured=measured,
            soaked=soaked,
            baseline=baseline,
            own_measured=own_measured,
            own_soaked=own_soaked,
            cohort_size=len(members),
            unreachable=tuple(unreachable[:MAX_LISTED]),
            failed_activation=tuple(failed[:MAX_LISTED]),
            skipped=tuple(skipped[:MAX_LISTED]),
            not_serving=tuple(not_serving[:MAX_LISTED]),
            deadline_passed=deadline_passed and outcome is GateOutcome.INCONCLUSIVE,
            marks=tuple(new_marks),
        )

    limit = Fraction(w.max_error_rate)
    prefix = f"wave {wave} ({w.label})"
    if failed or remote_failures:
        who = ", ".join(failed[:5]) if failed else f"{remote_failures} device(s) in other sites"
        return verdict(GateOutcome.FAIL, f"{prefix}: {who} failed to activate {plan.target_version}")
    # Any of these measurements over enough requests is real evidence: the whole cohort (errors count
    # wherever they were measured), the devices reachable now, and those that served the whole soak.
    # After wave 1, this site's devices new in the wave alone too (all of them, where the site had no
    # device in the wave before: other sites' evidence then brings their earlier devices' requests).
    # (Each check at every gate is one more chance for a good version's noise to cross the limit: a
    # false FAIL rolls back, the safe direction; a check switched off by a rule hides real breaches.)
    fresh = wave > 1
    for totals, whose, named_devices in (
        (measured, "the cohort", erring),
        (reachable_target, "reachable cohort devices", erring),
        (soaked, "devices that served the whole soak", erring),
        *([(newcomers, f"the devices new in wave {wave}", erring_new)] if fresh else []),
    ):
        rate = totals.rate
        if totals.requests >= w.min_requests and rate is not None and rate > limit:
            more = ", ..." if len(named_devices) > 5 else ""
            named = f" (errors on {', '.join(named_devices[:5])}{more})" if named_devices else ""
            return verdict(
                GateOutcome.FAIL,
                f"{prefix}: {whose} measured {totals.describe()}, above the limit of "
                f"{w.max_error_rate:.2%}{named}",
            )
    relative_note = ""
    if w.relative_margin is not None:
        if baseline.requests >= w.min_requests:
            assert baseline.rate is not None
            relative_limit = baseline.rate + Fraction(w.relative_margin)
            for totals in (reachable_target, soaked, *([newcomers] if fresh else [])):
                rate = totals.rate
                if totals.requests >= w.min_requests and rate is not None and rate > relative_limit:
                    return verdict(
                        GateOutcome.FAIL,
                        f"{prefix}: {totals.describe()} is above the baseline's "
                        f"{baseline.describe()} plus {w.relative_margin:.2%}",
                    )
        else:
            relative_note = (
                f"; relative gate not evaluated: the baseline served {baseline.requests} of "
                f"{w.min_requests} requests needed"
            )
    if soak_left_s > 0:
        return verdict(
            GateOutcome.INCONCLUSIVE,
            f"{prefix}: soaking, {soak_left_s:.0f} s of {w.soak_s:g} s left; so far {measured.describe()}",
        )
    missing = []
    if unreachable:
        missing.append(f"{len(unreachable)} unreachable")
    if not_serving:
        missing.append(f"{len(not_serving)} not serving the target")
    if skipped:
        missing.append(f"{len(skipped)} skipped")
    detail = f" ({', '.join(missing)})" if missing else ""
    silent = len(unreachable) + waiting + remote_silent
    if soaked.requests >= w.min_requests and not covered(soaked.devices, silent):
        return verdict(
            GateOutcome.INCONCLUSIVE,
            f"{prefix}: too few devices heard from: {soaked.devices} served the target for the whole "
            f"soak while {silent} cohort devices did not (unreachable, or not on the target for the whole "
            f"soak); the gate passes once at least as many have as have not{detail}",
        )
    if soaked.requests < w.min_requests:
        if not members and soaked.requests == 0:
            reason = (
                f"{prefix}: no data: no device of this site is in the wave's cohort and no other site "
                "reported it"
            )
        elif soaked.requests == 0:
            reason = (
                f"{prefix}: no data: no reachable cohort device has served the target for the whole "
                f"soak{detail}"
            )
        else:
            reason = (
                f"{prefix}: not enough data: {soaked.describe()} after the whole soak, "
                f"{w.min_requests} requests needed{detail}"
            )
        return verdict(GateOutcome.INCONCLUSIVE, reason)
    return verdict(
        GateOutcome.PASS,
        f"{prefix}: {soaked.describe()} over the whole soak, within "
        f"{w.max_error_rate:.2%}{relative_note}{detail}",
    )
