"""Signed rollout plans and operator-signed rollout commands: codec, signing, verification. Pure.

A `RolloutPlan` says which model version goes where and how carefully: the
target and the baseline (each named by its manifest digest), the waves (share
of the selected devices, soak time, minimum requests, error-rate limit, an
optional relative gate against the baseline), the selector, the version-skew
rule, the autonomous scope (a wave above it waits for an operator), the
prefetch policy and the plan's lifetime. The publisher signs the canonical
JSON of the plan with its Ed25519 key; `verify_plan` refuses any other key or
role with a `PlanSignatureError` naming the key id.

A `RolloutCommand` is an operator's signed word about one plan (approve wave
k, promote to wave k, pause, resume, abort with a reason). Like a guard
approval it names the plan digest, expires and carries a nonce; an expired
command, or another command under a spent nonce, is refused. `verify_command`
does not remember nonces: the replicated rollout state does, so "accepted
once" holds on every replica (and answers the same command sent again with
what became of it, see `mesh.rollout.state`).

Rules of the codecs (as in `mesh.artifacts.manifest` and `mesh.guard.approval`):
bounded documents, every field checked, unknown fields refused, numbers in
one canonical spelling (a whole number is an integer), shares as integer
parts per million (exact arithmetic: flagger #190 shipped a float bug), and
every signature is domain-separated so it cannot be replayed as a signature
over another kind of fleet document.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import math
import re
from collections.abc import Container, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from mesh.artifacts.manifest import ArtifactError, check_name
from mesh.artifacts.signature import ModelSignature
from mesh.identity.signing import (
    KEY_ID_HEX_CHARS,
    SIGNATURE_BYTES,
    KeyRole,
    KeyRoleError,
    SignatureError,
    SigningKey,
    TrustedKeys,
    UnknownKeyError,
    VerifyKey,
    canonical_json,
)
from mesh.rollout._json import expect_object, integer, json_number, number, strict_json, text

PLAN_FORMAT = 1
COMMAND_FORMAT = 1
PPM = 1_000_000  # shares are integer parts per million of the selected devices
MAX_WAVES = 10
MAX_SELECTOR_LABELS = 8
MAX_SELECTOR_VALUES = 16
MAX_REASON_CHARS = 512
# A maximal plan (10 waves, 8 labels x 16 values of 63 chars) is ~11 KB; gossip carries only its id and
# digest, and the document itself travels by anti-entropy, so 16 KiB bounds what a peer can make us parse.
MAX_PLAN_BYTES = 16 * 1024
MAX_COMMAND_BYTES = 4 * 1024
MAX_PLAN_TTL_S = 90 * 24 * 3600.0
MAX_COMMAND_TTL_S = 7 * 24 * 3600.0
MAX_SOAK_S = 7 * 24 * 3600.0

DEFAULT_WAVE_SHARES_PPM = (10_000, 100_000, PPM)  # 1%, 10%, 100%
DEFAULT_SOAK_S = 600.0
DEFAULT_MIN_REQUESTS = 100
DEFAULT_MAX_ERROR_RATE = 0.05
DEFAULT_AUTONOMOUS_SHARE_PPM = 100_000  # a wave above 10% of the selected devices needs an operator

ROLLOUT_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
LABEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_KEY_ID_RE = re.compile(rf"[0-9a-f]{{{KEY_ID_HEX_CHARS}}}")
_SIGNATURE_HEX_RE = re.compile(rf"[0-9a-f]{{{2 * SIGNATURE_BYTES}}}")
_NONCE_RE = re.compile(r"[A-Za-z0-9_-]{8,64}")
_RUNTIME_VERSION_RE = re.compile(r"[0-9]{1,6}(\.[0-9]{1,6}){0,3}")

# Domain separation: a publisher signature over a plan is never a signature over a manifest (which signs
# bare canonical JSON) and an operator command is never a guard approval, and vice versa.
_PLAN_CONTEXT = b"fleetmesh rollout plan v1\n"
_COMMAND_CONTEXT = b"fleetmesh rollout command v1\n"


class RolloutError(Exception):
    """Root of every error raised by `mesh.rollout`."""


class PlanFormatError(RolloutError):
    """A plan document is malformed, too large, of an unknown format or inconsistent (names the field)."""


class PlanSignatureError(RolloutError):
    """A plan is not signed by a trusted fleet publisher key; `.key_id` names the key, `.reason` the code."""

    def __init__(self, message: str, *, key_id: str, reason: str) -> None:
        super().__init__(message)
        self.key_id = key_id
        self.reason = reason  # unknown_key, not_publisher_key, forged


class PlanExpiredError(RolloutError):
    """A plan's lifetime is over; nothing may start or advance under it."""


class CommandRefused(RolloutError):
    """A rollout command was refused; `.reason` is the stable code written to the audit log."""

    reason = "refused"


class MalformedCommand(CommandRefused):
    reason = "malformed"


class WrongRollout(CommandRefused):
    reason = "wrong_rollout"


class UnknownCommandKey(CommandRefused):
    reason = "unknown_key"


class NotOperatorKey(CommandRefused):
    reason = "not_operator_key"


class ForgedCommand(CommandRefused):
    reason = "forged"


class ExpiredCommand(CommandRefused):
    reason = "expired"


class ReplayedCommand(CommandRefused):
    reason = "replayed"


def format_share(share_ppm: int) -> str:
    """`10000` -> `1%`, `12500` -> `1.25%`: a share as people write it."""
    whole, rest = divmod(share_ppm, PPM // 100)
    return f"{whole}%" if rest == 0 else f"{whole}.{rest:04d}".rstrip("0") + "%"


def parse_share(value: str) -> int:
    """`"1"`, `"1%"`, `"0.5"` (percent) -> parts per million, exactly; for the CLI's `--waves 1,10,100`."""
    literal = value.strip().removesuffix("%")
    try:
        ppm = Fraction(literal) * (PPM // 100)
    except (ValueError, ZeroDivisionError):
        raise PlanFormatError(f"wave share {value!r} is not a percentage like 1, 10 or 0.5") from None
    if ppm.denominator != 1 or not 0 < ppm <= PPM:
        raise PlanFormatError(
            f"wave share {value!r} must be a percentage in (0, 100] with at most 4 decimals"
        )
    return int(ppm)


def runtime_version_key(version: str) -> tuple[int, ...]:
    """`"2.3"` -> (2, 3, 0, 0): versions compare numerically, missing parts are zero."""
    parts = [int(p) for p in version.split(".")]
    return tuple(parts + [0] * (4 - len(parts)))


def signature_digest(signature: ModelSignature) -> str:
    """sha256 hex of a model's input/output signature, as a plan's skew rule names it."""
    return hashlib.sha256(canonical_json(signature.to_dict())).hexdigest()


def _sha256(value: object, where: str) -> str:
    if not isinstance(value, str) or not _SHA256_RE.fullmatch(value):
        raise PlanFormatError(f"{where}: expected 64 lowercase hex characters (SHA-256), got {value!r}")
    return value


def check_name_field(value: object, where: str) -> str:
    """`value` if it is a safe model name or version, else PlanFormatError naming `where`."""
    try:
        return check_name(value, where)
    except ArtifactError as exc:
        raise PlanFormatError(str(exc)) from None


# --- plan parts --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Wave:
    """One step of a rollout: the target on `share_ppm` of the selected devices, judged over `soak_s`.

    The gate passes when the wave's cohort served at least `min_requests` with an error rate at most
    `max_error_rate` for the whole soak (and, with `relative_margin`, at most the baseline's rate plus
    the margin); a wave still undecided `deadline_s` after its soak began pauses for an operator.
    """

    share_ppm: int
    soak_s: float = DEFAULT_SOAK_S
    min_requests: int = DEFAULT_MIN_REQUESTS
    max_error_rate: float = DEFAULT_MAX_ERROR_RATE
    relative_margin: float | None = None
    deadline_s: float | None = None  # None: twice the soak

    def __post_init__(self) -> None:
        label = f"wave {self.label}" if type(self.share_ppm) is int else "wave"
        integer(self.share_ppm, f"{label}: share_ppm", PlanFormatError, minimum=1, maximum=PPM)
        soak_s = number(self.soak_s, f"{label}: soak_s", PlanFormatError, minimum=1.0, maximum=MAX_SOAK_S)
        object.__setattr__(self, "soak_s", soak_s)
        integer(self.min_requests, f"{label}: min_requests", PlanFormatError, minimum=1)
        rate = number(self.max_error_rate, f"{label}: max_error_rate", PlanFormatError, maximum=1.0)
        object.__setattr__(self, "max_error_rate", rate)
        if self.relative_margin is not None:
            margin = number(self.relative_margin, f"{label}: relative_margin", PlanFormatError, maximum=1.0)
            object.__setattr__(self, "relative_margin", margin)
        deadline_s = 2 * soak_s if self.deadline_s is None else self.deadline_s
        deadline_s = number(deadline_s, f"{label}: deadline_s", PlanFormatError, maximum=2 * MAX_SOAK_S)
        if deadline_s < soak_s:
            raise PlanFormatError(
                f"{label}: deadline_s {deadline_s:g} is shorter than soak_s {soak_s:g}; "
                "a wave cannot be decided before its soak ends"
            )
        object.__setattr__(self, "deadline_s", deadline_s)

    @property
    def label(self) -> str:
        return format_share(self.share_ppm)

    @property
    def share(self) -> Fraction:
        return Fraction(self.share_ppm, PPM)

    def to_dict(self) -> dict[str, Any]:
        assert self.deadline_s is not None
        return {
            "share_ppm": self.share_ppm,
            "soak_s": json_number(self.soak_s),
            "min_requests": self.min_requests,
            "max_error_rate": json_number(self.max_error_rate),
            "relative_margin": None if self.relative_margin is None else json_number(self.relative_margin),
            "deadline_s": json_number(self.deadline_s),
        }

    @classmethod
    def from_dict(cls, doc: object, where: str) -> Wave:
        d = expect_object(doc, where, _WAVE_FIELDS, PlanFormatError)
        return cls(
            share_ppm=integer(d["share_ppm"], f"{where}.share_ppm", PlanFormatError, minimum=1, maximum=PPM),
            soak_s=number(d["soak_s"], f"{where}.soak_s", PlanFormatError, minimum=1.0, maximum=MAX_SOAK_S),
            min_requests=integer(d["min_requests"], f"{where}.min_requests", PlanFormatError, minimum=1),
            max_error_rate=number(
                d["max_error_rate"], f"{where}.max_error_rate", PlanFormatError, maximum=1.0
            ),
            relative_margin=None
            if d["relative_margin"] is None
            else number(d["relative_margin"], f"{where}.relative_margin", PlanFormatError, maximum=1.0),
            deadline_s=number(
                d["deadline_s"], f"{where}.deadline_s", PlanFormatError, maximum=2 * MAX_SOAK_S
            ),
        )


_WAVE_FIELDS = frozenset(
    {"share_ppm", "soak_s", "min_requests", "max_error_rate", "relative_margin", "deadline_s"}
)


def default_waves(
    *,
    soak_s: float = DEFAULT_SOAK_S,
    min_requests: int = DEFAULT_MIN_REQUESTS,
    max_error_rate: float = DEFAULT_MAX_ERROR_RATE,
    shares_ppm: tuple[int, ...] = DEFAULT_WAVE_SHARES_PPM,
) -> tuple[Wave, ...]:
    return tuple(
        Wave(s, soak_s=soak_s, min_requests=min_requests, max_error_rate=max_error_rate) for s in shares_ppm
    )


@dataclass(frozen=True)
class Selector:
    """Which devices a rollout is for: for every label, the device's value must be one of the listed
    values (OR within a label, AND across labels). No labels: every device."""

    labels: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.labels, tuple):
            raise PlanFormatError("selector: labels must be a tuple of (label, values) pairs")
        if len(self.labels) > MAX_SELECTOR_LABELS:
            raise PlanFormatError(f"selector: {len(self.labels)} labels, at most {MAX_SELECTOR_LABELS}")
        normalised = []
        for entry in self.labels:
            if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], (tuple, list))):
                raise PlanFormatError(f"selector: expected (label, values) pairs, got {entry!r}")
            label, values = entry
            if not isinstance(label, str) or not LABEL_RE.fullmatch(label):
                raise PlanFormatError(
                    f"selector: {label!r} is not a label name (expected {LABEL_RE.pattern})"
                )
            if not values or len(values) > MAX_SELECTOR_VALUES:
                raise PlanFormatError(
                    f"selector.{label}: expected 1 to {MAX_SELECTOR_VALUES} values, got {len(values)}"
                )
            for v in values:
                if not isinstance(v, str) or not LABEL_RE.fullmatch(v):
                    raise PlanFormatError(
                        f"selector.{label}: {v!r} is not a label value (expected {LABEL_RE.pattern})"
                    )
            if len(set(values)) != len(values):
                raise PlanFormatError(f"selector.{label}: a value is listed twice")
            normalised.append((label, tuple(sorted(values))))
        if len({label for label, _ in normalised}) != len(normalised):
            raise PlanFormatError("selector: a label is listed twice")
        object.__setattr__(self, "labels", tuple(sorted(normalised)))

    @classmethod
    def of(cls, **labels: str | tuple[str, ...] | list[str]) -> Selector:
        """`Selector.of(device_class="camera", site=("a", "b"))`."""
        return cls(tuple((k, (v,) if isinstance(v, str) else tuple(v)) for k, v in labels.items()))

    def mismatch(self, device_labels: Mapping[str, str]) -> str | None:
        """None when a device with `device_labels` is selected, else why not (one line)."""
        for label, values in self.labels:
            have = device_labels.get(label)
            if have not in values:
                shown = "no " + label if have is None else f"{label}={have}"
                return f"{shown}, the plan selects {label} in [{', '.join(values)}]"
        return None

    def describe(self) -> str:
        return ", ".join(f"{k} in [{', '.join(v)}]" for k, v in self.labels) or "every device"

    def to_dict(self) -> dict[str, list[str]]:
        return {label: list(values) for label, values in self.labels}

    @classmethod
    def from_dict(cls, doc: object) -> Selector:
        if not isinstance(doc, dict):
            raise PlanFormatError(f"plan.selector: expected an object, got {type(doc).__name__}")
        pairs = []
        for label, values in doc.items():
            if not isinstance(values, list):
                raise PlanFormatError(f"plan.selector.{label}: expected a list of values")
            pairs.append((label, tuple(values)))
        return cls(tuple(pairs))


@dataclass(frozen=True)
class SkewRule:
    """What a device needs to run the target: a runtime at least this new, the same input/output
    signature as the model it serves now (its callers feed that), and room on disk for the target."""

    min_runtime_version: str
    signature_digest: str
    min_free_disk_bytes: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.min_runtime_version, str) or not _RUNTIME_VERSION_RE.fullmatch(
            self.min_runtime_version
        ):
            raise PlanFormatError(
                f"plan.skew.min_runtime_version must look like 2.3.0, got {self.min_runtime_version!r}"
            )
        _sha256(self.signature_digest, "plan.skew.signature_digest")
        integer(self.min_free_disk_bytes, "plan.skew.min_free_disk_bytes", PlanFormatError)

    def to_dict(self) -> dict[str, Any]:
        return {
            "min_runtime_version": self.min_runtime_version,
            "signature_digest": self.signature_digest,
            "min_free_disk_bytes": self.min_free_disk_bytes,
        }

    @classmethod
    def from_dict(cls, doc: object) -> SkewRule:
        d = expect_object(doc, "plan.skew", _SKEW_FIELDS, PlanFormatError)
        return cls(d["min_runtime_version"], d["signature_digest"], d["min_free_disk_bytes"])


_SKEW_FIELDS = frozenset({"min_runtime_version", "signature_digest", "min_free_disk_bytes"})


@dataclass(frozen=True)
class AutonomousScope:
    """How far the mesh may take a rollout on its own: a wave putting the target on more than
    `max_share_ppm` of the selected devices waits for an operator's signed approval."""

    max_share_ppm: int = DEFAULT_AUTONOMOUS_SHARE_PPM

    def __post_init__(self) -> None:
        integer(self.max_share_ppm, "plan.autonomous_scope.max_share_ppm", PlanFormatError, maximum=PPM)

    def to_dict(self) -> dict[str, Any]:
        return {"max_share_ppm": self.max_share_ppm}

    @classmethod
    def from_dict(cls, doc: object) -> AutonomousScope:
        d = expect_object(doc, "plan.autonomous_scope", frozenset({"max_share_ppm"}), PlanFormatError)
        return cls(d["max_share_ppm"])


class PrefetchPolicy(enum.Enum):
    """May devices outside the current wave fetch the target's chunks ahead of their wave?"""

    LOW = "low"  # yes, at low priority, so the last wave does not spike the network
    OFF = "off"  # no: only devices whose wave has come fetch the target


# --- the plan ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RolloutPlan:
    """What a rollout is. Immutable; its identity is `digest` (what operator commands name)."""

    rollout_id: str
    model: str
    target_version: str
    target_digest: str  # manifest digest of the target version
    baseline_version: str
    baseline_digest: str  # manifest digest of the version devices fall back to
    skew: SkewRule
    created_at: float  # seconds since the epoch
    expires_at: float
    publisher_key_id: str
    waves: tuple[Wave, ...] = field(default_factory=default_waves)
    selector: Selector = field(default_factory=Selector)
    autonomous_scope: AutonomousScope = field(default_factory=AutonomousScope)
    prefetch: PrefetchPolicy = PrefetchPolicy.LOW
    format: int = PLAN_FORMAT

    def __post_init__(self) -> None:
        if self.format != PLAN_FORMAT or type(self.format) is not int:
            raise PlanFormatError(_format_message("plan", self.format, PLAN_FORMAT))
        if not isinstance(self.rollout_id, str) or not ROLLOUT_ID_RE.fullmatch(self.rollout_id):
            raise PlanFormatError(
                f"plan.rollout_id: {self.rollout_id!r} is not a rollout id (expected {ROLLOUT_ID_RE.pattern})"
            )
        check_name_field(self.model, "plan.model")
        check_name_field(self.target_version, "plan.target_version")
        check_name_field(self.baseline_version, "plan.baseline_version")
        if self.target_version == self.baseline_version:
            raise PlanFormatError(
                f"plan: target and baseline are both version {self.target_version}; "
                "a rollout changes versions"
            )
        _sha256(self.target_digest, "plan.target_digest")
        _sha256(self.baseline_digest, "plan.baseline_digest")
        if self.target_digest == self.baseline_digest:
            raise PlanFormatError("plan: target and baseline name the same manifest digest")
        for name, cls in (
            ("skew", SkewRule),
            ("selector", Selector),
            ("autonomous_scope", AutonomousScope),
            ("prefetch", PrefetchPolicy),
        ):
            if not isinstance(getattr(self, name), cls):
                raise PlanFormatError(f"plan.{name}: expected a {cls.__name__}")
        created = number(self.created_at, "plan.created_at", PlanFormatError)
        expires = number(self.expires_at, "plan.expires_at", PlanFormatError)
        object.__setattr__(self, "created_at", created)
        object.__setattr__(self, "expires_at", expires)
        if not 0 < expires - created <= MAX_PLAN_TTL_S:
            raise PlanFormatError(
                f"plan: expires_at - created_at is {expires - created:.0f} s; "
                f"it must be positive and at most {MAX_PLAN_TTL_S:.0f} s"
            )
        if not isinstance(self.publisher_key_id, str) or not _KEY_ID_RE.fullmatch(self.publisher_key_id):
            raise PlanFormatError(
                f"plan.publisher_key_id must be {KEY_ID_HEX_CHARS} lowercase hex characters, "
                f"got {self.publisher_key_id!r}"
            )
        if not isinstance(self.waves, tuple) or not all(isinstance(w, Wave) for w in self.waves):
            raise PlanFormatError("plan.waves: expected a tuple of Wave")
        if not 1 <= len(self.waves) <= MAX_WAVES:
            raise PlanFormatError(f"plan.waves: {len(self.waves)} waves; a plan has 1 to {MAX_WAVES}")
        for before, after in zip(self.waves, self.waves[1:], strict=False):
            if after.share_ppm <= before.share_ppm:
                raise PlanFormatError(
                    f"plan.waves: wave {after.label} follows wave {before.label}; shares must grow"
                )
        if self.waves[-1].share_ppm != PPM:
            # flagger #190: a last step short of 100% reported success while the old version stayed.
            raise PlanFormatError(
                f"plan.waves: the last wave is {self.waves[-1].label}; it must be 100% so that a "
                "completed rollout means every selected device runs the target"
            )

    # --- views ---

    @property
    def label(self) -> str:
        return f"rollout {self.rollout_id} ({self.model} {self.baseline_version} -> {self.target_version})"

    @property
    def wave_count(self) -> int:
        return len(self.waves)

    def wave(self, number_: int) -> Wave:
        """Wave `number_`, counted from 1 as people count them."""
        if not 1 <= number_ <= len(self.waves):
            raise PlanFormatError(f"{self.label} has waves 1 to {len(self.waves)}, not {number_}")
        return self.waves[number_ - 1]

    def scope_ppm(self, max_share_ppm: int | None = None) -> int:
        """The autonomous scope in a site: the plan's, narrowed by `max_share_ppm`, a stricter limit the
        site's own guard may set (the publisher can narrow the scope, never widen the operator's)."""
        limit = self.autonomous_scope.max_share_ppm
        return limit if max_share_ppm is None else min(limit, max_share_ppm)

    def needs_approval(self, number_: int, *, max_share_ppm: int | None = None) -> bool:
        """Does wave `number_` reach past the autonomous scope (`scope_ppm`)?"""
        return self.wave(number_).share_ppm > self.scope_ppm(max_share_ppm)

    def expired(self, now: float) -> bool:
        return now >= self.expires_at

    # --- codec ---

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "rollout_id": self.rollout_id,
            "model": self.model,
            "target_version": self.target_version,
            "target_digest": self.target_digest,
            "baseline_version": self.baseline_version,
            "baseline_digest": self.baseline_digest,
            "waves": [w.to_dict() for w in self.waves],
            "selector": self.selector.to_dict(),
            "skew": self.skew.to_dict(),
            "autonomous_scope": self.autonomous_scope.to_dict(),
            "prefetch": self.prefetch.value,
            "created_at": json_number(self.created_at),
            "expires_at": json_number(self.expires_at),
            "publisher_key_id": self.publisher_key_id,
        }

    @classmethod
    def from_dict(cls, doc: object) -> RolloutPlan:
        if (
            isinstance(doc, dict)
            and "format" in doc
            and (type(doc["format"]) is not int or doc["format"] != PLAN_FORMAT)
        ):
            raise PlanFormatError(_format_message("plan", doc["format"], PLAN_FORMAT))
        d = expect_object(doc, "plan", _PLAN_FIELDS, PlanFormatError)
        waves_doc = d["waves"]
        if not isinstance(waves_doc, list) or not 1 <= len(waves_doc) <= MAX_WAVES:
            raise PlanFormatError(f"plan.waves: expected a list of 1 to {MAX_WAVES} waves")
        try:
            prefetch = PrefetchPolicy(d["prefetch"])
        except (ValueError, TypeError):
            raise PlanFormatError(f"plan.prefetch: expected 'low' or 'off', got {d['prefetch']!r}") from None
        return cls(
            format=d["format"],
            rollout_id=d["rollout_id"],
            model=d["model"],
            target_version=d["target_version"],
            target_digest=d["target_digest"],
            baseline_version=d["baseline_version"],
            baseline_digest=d["baseline_digest"],
            waves=tuple(Wave.from_dict(w, f"plan.waves[{i}]") for i, w in enumerate(waves_doc)),
            selector=Selector.from_dict(d["selector"]),
            skew=SkewRule.from_dict(d["skew"]),
            autonomous_scope=AutonomousScope.from_dict(d["autonomous_scope"]),
            prefetch=prefetch,
            created_at=number(d["created_at"], "plan.created_at", PlanFormatError),
            expires_at=number(d["expires_at"], "plan.expires_at", PlanFormatError),
            publisher_key_id=d["publisher_key_id"],
        )

    def canonical_bytes(self) -> bytes:
        return canonical_json(self.to_dict())

    def signed_bytes(self) -> bytes:
        """The exact bytes the publisher signs."""
        return _PLAN_CONTEXT + self.canonical_bytes()

    @functools.cached_property
    def digest(self) -> str:
        """sha256 hex of the signed bytes: names this plan in gossip and in operator commands."""
        return hashlib.sha256(self.signed_bytes()).hexdigest()


_PLAN_FIELDS = frozenset(
    {
        "format",
        "rollout_id",
        "model",
        "target_version",
        "target_digest",
        "baseline_version",
        "baseline_digest",
        "waves",
        "selector",
        "skew",
        "autonomous_scope",
        "prefetch",
        "created_at",
        "expires_at",
        "publisher_key_id",
    }
)


@dataclass(frozen=True)
class SignedPlan:
    """A plan and the publisher's Ed25519 signature over `plan.signed_bytes()`.

    Holding one proves nothing: call `verify_plan` before trusting it.
    """

    plan: RolloutPlan
    publisher_signature: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.plan, RolloutPlan):
            raise PlanFormatError("signed plan: expected a RolloutPlan")
        sig = self.publisher_signature
        if not isinstance(sig, bytes) or len(sig) != SIGNATURE_BYTES:
            raise PlanFormatError(f"{self.plan.label}: publisher_signature must be {SIGNATURE_BYTES} bytes")

    @property
    def digest(self) -> str:
        return self.plan.digest

    def to_json(self) -> bytes:
        return canonical_json(
            {"plan": self.plan.to_dict(), "publisher_signature": self.publisher_signature.hex()}
        )

    @classmethod
    def from_json(cls, data: object) -> SignedPlan:
        """Parse a signed plan document; any problem raises PlanFormatError (never another error).

        The signature is not checked here; see `verify_plan`.
        """
        doc = strict_json(data, "plan document", PlanFormatError, MAX_PLAN_BYTES)
        d = expect_object(doc, "plan document", frozenset({"plan", "publisher_signature"}), PlanFormatError)
        plan = RolloutPlan.from_dict(d["plan"])
        sig_hex = d["publisher_signature"]
        if not isinstance(sig_hex, str) or not _SIGNATURE_HEX_RE.fullmatch(sig_hex):
            raise PlanFormatError(
                f"{plan.label}: publisher_signature must be {2 * SIGNATURE_BYTES} lowercase hex characters"
            )
        if canonical_json(d["plan"]) != plan.canonical_bytes():
            raise PlanFormatError(
                f"{plan.label} is not in canonical form (a field is spelled differently from what was "
                "signed, e.g. 600.0 for 600, or a selector value out of order)"
            )
        return cls(plan, bytes.fromhex(sig_hex))


def sign_plan(plan: RolloutPlan, key: SigningKey) -> SignedPlan:
    """Sign `plan` with the fleet publisher key it names."""
    if key.role is not KeyRole.PUBLISHER:
        raise PlanSignatureError(
            f"cannot sign {plan.label} with {key.role.value} key {key.key_id}: "
            "rollout plans are signed with the fleet publisher key",
            key_id=key.key_id,
            reason="not_publisher_key",
        )
    if key.key_id != plan.publisher_key_id:
        raise PlanSignatureError(
            f"{plan.label} names publisher key {plan.publisher_key_id}, but the signing key is {key.key_id}",
            key_id=key.key_id,
            reason="forged",
        )
    return SignedPlan(plan, key.sign(plan.signed_bytes()))


def verify_plan(signed: SignedPlan, trusted: TrustedKeys, *, now: float | None = None) -> RolloutPlan:
    """Return the plan if a trusted fleet publisher key signed exactly these bytes (and, given `now`,
    the plan has not expired). Raises PlanSignatureError naming the key, or PlanExpiredError."""
    plan = signed.plan
    kid = plan.publisher_key_id
    try:
        trusted.verify(KeyRole.PUBLISHER, plan.signed_bytes(), signed.publisher_signature, kid)
    except UnknownKeyError:
        raise PlanSignatureError(
            f"{plan.label} is signed by key {kid}, which is not a fleet publisher key "
            "(this node does not trust that key at all)",
            key_id=kid,
            reason="unknown_key",
        ) from None
    except KeyRoleError:
        role = next((k.role.value for k in trusted if k.key_id == kid), "different")
        raise PlanSignatureError(
            f"{plan.label} is signed by key {kid}, which is not a fleet publisher key "
            f"(it is {'an' if role[0] in 'aeiou' else 'a'} {role} key)",
            key_id=kid,
            reason="not_publisher_key",
        ) from None
    except SignatureError:
        raise PlanSignatureError(
            f"{plan.label} does not match its signature by publisher key {kid}: it was changed after signing",
            key_id=kid,
            reason="forged",
        ) from None
    if now is not None and plan.expired(now):
        raise PlanExpiredError(
            f"{plan.label} expired at {plan.expires_at:.0f} (now {now:.0f}); start a new rollout"
        )
    return plan


# --- version skew: who can run the target ------------------------------------------------------------


class SkipKind(enum.Enum):
    """Why a device sits a rollout out. A skip is not a failure: the device keeps the baseline."""

    NOT_SELECTED = "not_selected"  # its labels are outside the plan's selector
    OLD_RUNTIME = "old_runtime"  # its inference runtime is older than the target needs
    SIGNATURE_MISMATCH = "signature_mismatch"  # its callers feed a different input/output signature
    LOW_DISK = "low_disk"  # no room for the target beside the pinned baseline


@dataclass(frozen=True)
class Skip:
    kind: SkipKind
    reason: str  # one line naming the device's value and what the plan needs


@dataclass(frozen=True)
class DeviceFacts:
    """What a device knows about itself that decides whether it can take part in a rollout."""

    node_id: str
    labels: tuple[tuple[str, str], ...]
    runtime_version: str
    free_disk_bytes: int
    serving_signature_digest: str | None = None  # of the model version it serves now; None: serves none
    holds_target: bool = False  # the target is already complete on disk (no room needed)

    def __post_init__(self) -> None:
        labels = self.labels.items() if isinstance(self.labels, Mapping) else self.labels
        object.__setattr__(self, "labels", tuple(sorted((str(k), str(v)) for k, v in labels)))

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)


def skew_check(plan: RolloutPlan, device: DeviceFacts) -> Skip | None:
    """None when `device` can take part in `plan`, else the first reason it cannot."""
    mismatch = plan.selector.mismatch(device.label_map)
    if mismatch is not None:
        return Skip(SkipKind.NOT_SELECTED, f"not selected: {mismatch}")
    rule = plan.skew
    try:
        old = runtime_version_key(device.runtime_version) < runtime_version_key(rule.min_runtime_version)
    except ValueError:
        old = True
    if old:
        return Skip(
            SkipKind.OLD_RUNTIME,
            f"runtime {device.runtime_version} is older than "
            f"{rule.min_runtime_version}, which {plan.target_version} needs",
        )
    if (
        device.serving_signature_digest is not None
        and device.serving_signature_digest != rule.signature_digest
    ):
        return Skip(
            SkipKind.SIGNATURE_MISMATCH,
            f"serves {plan.model} with input/output signature {device.serving_signature_digest[:12]}, "
            f"{plan.target_version} has signature {rule.signature_digest[:12]}",
        )
    if not device.holds_target and device.free_disk_bytes < rule.min_free_disk_bytes:
        return Skip(
            SkipKind.LOW_DISK,
            f"{device.free_disk_bytes} bytes free, {plan.target_version} needs {rule.min_free_disk_bytes}",
        )
    return None


# --- operator commands --------------------------------------------------------------------------------


class CommandAction(enum.Enum):
    """What an operator says about a rollout."""

    APPROVE = "approve"  # wave k may start once its predecessor's gate passes (needed above scope)
    PROMOTE = "promote"  # start wave k now, without waiting for the gate of wave k-1 (implies approve)
    PAUSE = "pause"  # hold where it stands: no device changes version for this rollout
    RESUME = "resume"  # continue from where it was paused; the current wave's soak starts again
    ABORT = "abort"  # roll every device back to the baseline; final

    @property
    def needs_wave(self) -> bool:
        return self in (CommandAction.APPROVE, CommandAction.PROMOTE)


@dataclass(frozen=True)
class RolloutCommand:
    """An operator's signed command about exactly one plan (by digest). Verify before acting on it."""

    rollout_id: str
    plan_digest: str
    action: CommandAction
    wave: int | None  # for approve and promote: the wave (from 1) the command lets start
    reason: str
    issued_at: float
    expires_at: float
    nonce: str
    key_id: str
    signature: str  # hex of the Ed25519 signature over `signed_bytes()`

    def __post_init__(self) -> None:
        _validate_command(self)

    @property
    def label(self) -> str:
        wave = f" wave {self.wave}" if self.wave is not None else ""
        return f"{self.action.value}{wave} of rollout {self.rollout_id}"

    def body(self) -> dict[str, Any]:
        """Every field but the signature: what is signed."""
        return {
            "format": COMMAND_FORMAT,
            "rollout_id": self.rollout_id,
            "plan_digest": self.plan_digest,
            "action": self.action.value,
            "wave": self.wave,
            "reason": self.reason,
            "issued_at": json_number(self.issued_at),
            "expires_at": json_number(self.expires_at),
            "nonce": self.nonce,
            "key_id": self.key_id,
        }

    def signed_bytes(self) -> bytes:
        return _COMMAND_CONTEXT + canonical_json(self.body())

    def to_dict(self) -> dict[str, Any]:
        return {**self.body(), "signature": self.signature}

    def to_json(self) -> bytes:
        return canonical_json(self.to_dict())

    @classmethod
    def from_dict(cls, doc: object) -> RolloutCommand:
        """Parse strictly; raise MalformedCommand naming the bad field."""
        if (
            isinstance(doc, dict)
            and "format" in doc
            and (type(doc["format"]) is not int or doc["format"] != COMMAND_FORMAT)
        ):
            raise MalformedCommand(_format_message("rollout command", doc["format"], COMMAND_FORMAT))
        d = expect_object(doc, "rollout command", _COMMAND_FIELDS, MalformedCommand)
        try:
            action = CommandAction(d["action"])
        except (ValueError, TypeError):
            names = ", ".join(a.value for a in CommandAction)
            raise MalformedCommand(
                f"rollout command.action: unknown action {d['action']!r}; expected one of {names}"
            ) from None
        return cls(
            rollout_id=d["rollout_id"],
            plan_digest=d["plan_digest"],
            action=action,
            wave=d["wave"],
            reason=d["reason"],
            issued_at=number(d["issued_at"], "rollout command.issued_at", MalformedCommand),
            expires_at=number(d["expires_at"], "rollout command.expires_at", MalformedCommand),
            nonce=d["nonce"],
            key_id=d["key_id"],
            signature=d["signature"],
        )

    @classmethod
    def from_json(cls, data: object) -> RolloutCommand:
        doc = strict_json(data, "rollout command", MalformedCommand, MAX_COMMAND_BYTES)
        command = cls.from_dict(doc)
        if canonical_json(doc) != command.to_json():
            raise MalformedCommand(f"{command.label}: not in canonical form (e.g. 600.0 written for 600)")
        return command


_COMMAND_FIELDS = frozenset(
    {
        "format",
        "rollout_id",
        "plan_digest",
        "action",
        "wave",
        "reason",
        "issued_at",
        "expires_at",
        "nonce",
        "key_id",
        "signature",
    }
)


def _validate_command(c: RolloutCommand) -> None:
    def check(name: str, pattern: re.Pattern[str], what: str) -> None:
        value = getattr(c, name)
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise MalformedCommand(f"rollout command.{name}: {value!r} is not {what}")

    check("rollout_id", ROLLOUT_ID_RE, "a rollout id")
    check("plan_digest", _SHA256_RE, "a plan digest (64 hex chars)")
    check("nonce", _NONCE_RE, "a nonce (8-64 of A-Z a-z 0-9 _ -)")
    check("key_id", _KEY_ID_RE, f"a key id ({KEY_ID_HEX_CHARS} hex chars)")
    check("signature", _SIGNATURE_HEX_RE, f"a hex Ed25519 signature ({2 * SIGNATURE_BYTES} hex chars)")
    if not isinstance(c.action, CommandAction):
        raise MalformedCommand(f"rollout command.action: expected a CommandAction, got {c.action!r}")
    if c.action.needs_wave:
        integer(c.wave, "rollout command.wave", MalformedCommand, minimum=1, maximum=MAX_WAVES)
    elif c.wave is not None:
        raise MalformedCommand(f"rollout command.wave: {c.action.value} names no wave; use null")
    text(c.reason, "rollout command.reason", MalformedCommand, MAX_REASON_CHARS)
    if c.action is CommandAction.ABORT and not c.reason.strip():
        raise MalformedCommand("rollout command.reason: an abort needs a reason (it goes in the audit log)")
    issued = number(c.issued_at, "rollout command.issued_at", MalformedCommand)
    expires = number(c.expires_at, "rollout command.expires_at", MalformedCommand)
    object.__setattr__(c, "issued_at", issued)
    object.__setattr__(c, "expires_at", expires)
    if not 0 < expires - issued <= MAX_COMMAND_TTL_S:
        raise MalformedCommand(
            f"rollout command: expires_at - issued_at is {expires - issued:.0f} s; "
            f"it must be positive and at most {MAX_COMMAND_TTL_S:.0f} s"
        )


def expiry(start: float, ttl_s: float) -> float:
    """`start + ttl_s`, rounded down where floating point would make `expiry - start` exceed `ttl_s`:
    a plan or command made with the longest lifetime must not be refused for a rounding error (a
    plan's check said "7776000 s ... at most 7776000 s"). The check itself is unchanged, so every
    replica judges a document as it always did."""
    expires = start + ttl_s
    while expires - start > ttl_s:
        expires = math.nextafter(expires, -math.inf)
    return expires


def sign_command(
    key: SigningKey,
    plan: RolloutPlan,
    action: CommandAction,
    *,
    now: float,
    ttl_s: float,
    nonce: str,
    wave: int | None = None,
    reason: str = "",
) -> RolloutCommand:
    """Sign `action` about exactly `plan`, valid for `ttl_s`. Any key can sign; only a trusted OPERATOR
    key passes `verify_command`. `nonce` must be fresh (the admin client draws it from `secrets`)."""
    unsigned = RolloutCommand(
        rollout_id=plan.rollout_id,
        plan_digest=plan.digest,
        action=action,
        wave=wave,
        reason=reason,
        issued_at=float(now),
        expires_at=expiry(float(now), float(ttl_s)),
        nonce=nonce,
        key_id=key.key_id,
        signature="0" * (2 * SIGNATURE_BYTES),
    )
    return dataclasses.replace(unsigned, signature=key.sign(unsigned.signed_bytes()).hex())


def verify_command(
    command: RolloutCommand,
    plan: RolloutPlan,
    trusted: TrustedKeys,
    *,
    now: float,
    used_nonces: Container[str],
) -> VerifyKey:
    """Return the operator key that validly signed `command` about exactly `plan` at `now`.

    Checks run in this order, so a forged command is reported as forged, not as expired or replayed:
    names this plan (id and digest, wave in range), trusted OPERATOR key, signature, expiry, nonce.
    """
    if not isinstance(command, RolloutCommand):
        raise MalformedCommand(f"expected a RolloutCommand, got {type(command).__name__}")
    if command.rollout_id != plan.rollout_id or command.plan_digest != plan.digest:
        raise WrongRollout(
            f"{command.label} names plan {command.plan_digest[:16]}, not {plan.label} "
            f"(plan {plan.digest[:16]}); sign a command for this plan"
        )
    if command.wave is not None and not 1 <= command.wave <= plan.wave_count:
        raise WrongRollout(f"{command.label}: {plan.label} has waves 1 to {plan.wave_count}")
    try:
        key = trusted.verify(
            KeyRole.OPERATOR, command.signed_bytes(), bytes.fromhex(command.signature), command.key_id
        )
    except UnknownKeyError as exc:
        raise UnknownCommandKey(f"{command.label} refused: {exc}") from None
    except KeyRoleError as exc:
        raise NotOperatorKey(f"{command.label} refused: {exc}") from None
    except SignatureError as exc:
        raise ForgedCommand(f"{command.label} refused: {exc}") from None
    if now >= command.expires_at:
        raise ExpiredCommand(
            f"{command.label} by key {command.key_id} expired at {command.expires_at:.0f} "
            f"(now {now:.0f}); sign a new one"
        )
    if command.nonce in used_nonces:
        raise ReplayedCommand(
            f"{command.label} with nonce {command.nonce} was already used; a command is accepted once"
        )
    return key


def _format_message(what: str, fmt: object, known: int) -> str:
    if type(fmt) is int and fmt > known:
        return f"{what} format {fmt} is newer than this node understands (format {known}); upgrade the node"
    return f"{what} format {str(fmt)[:40]!r} is not known (this node reads format {known})"
