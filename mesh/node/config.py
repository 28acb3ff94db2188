"""The node's configuration file (TOML), validated with pydantic.

A mistake in the file must tell the operator which file, which field and what
is wrong, so `load_config` turns every parse or validation failure into one
`ConfigError` whose message lists them all.
"""

from __future__ import annotations

import difflib
import re
import tomllib
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mesh.consensus.config import GuardTable, RaftSection
from mesh.membership.config import FEDERATION_POOL, MembershipConfig
from mesh.membership.federation import DEFAULT_REPRESENTATIVES

NODE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
_HOST_PORT = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")


class ConfigError(Exception):
    """The configuration file cannot be used; the message names file, field and problem."""


def parse_host_port(value: str) -> tuple[str, int]:
    """Split "host:port" (IPv6 as "[::1]:7000"), checking the port range."""
    match = _HOST_PORT.match(value)
    if not match or not 0 <= int(match.group(2)) <= 65535:
        raise ValueError(f"expected host:port (for example 127.0.0.1:7000), got {value!r}")
    return match.group(1).strip("[]"), int(match.group(2))


def _check_address(value: str) -> str:
    parse_host_port(value)
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsSection(_Strict):
    """Where this node's fleet credentials are: the folder `mesh fleet enroll` wrote
    (cert.pem, key.pem, ca.pem)."""

    dir: Path


_POOL_FIELDS = {"pools", "representatives", "federation_seeds", "federation_timings"}

# The federation pool's timings with `federation_timings = "wan"`: hashicorp/memberlist's DefaultWANConfig,
# which Consul's WAN pool of servers uses: sites are far apart, and a representative's link crosses the
# internet. The other settings (Lifeguard, budgets) are the site pool's.
WAN_TIMINGS = {"probe_interval_s": 5.0, "probe_timeout_s": 3.0, "suspicion_mult": 6, "gossip_interval_s": 0.5,
               "gossip_nodes": 4, "push_pull_interval_s": 60.0, "gossip_to_dead_s": 60.0}


class MembershipSection(_Strict):
    """SWIM timings; defaults are memberlist's LAN defaults (see MembershipConfig)."""

    probe_interval_s: float = Field(default=MembershipConfig.probe_interval_s, gt=0)
    probe_timeout_s: float = Field(default=MembershipConfig.probe_timeout_s, gt=0)
    indirect_checks: int = Field(default=MembershipConfig.indirect_checks, ge=0, le=16)
    gossip_interval_s: float = Field(default=MembershipConfig.gossip_interval_s, gt=0)
    gossip_nodes: int = Field(default=MembershipConfig.gossip_nodes, ge=1, le=16)
    suspicion_mult: int = Field(default=MembershipConfig.suspicion_mult, ge=1)
    retransmit_mult: int = Field(default=MembershipConfig.retransmit_mult, ge=1)
    push_pull_interval_s: float = Field(default=MembershipConfig.push_pull_interval_s, gt=0)
    gossip_to_dead_s: float = Field(default=MembershipConfig.gossip_to_dead_s, ge=0)
    max_gossip_bytes: int = Field(default=MembershipConfig.max_gossip_bytes, ge=512, le=1 << 20)
    # Lifeguard: on by default, as in memberlist; off gives plain SWIM (bench/scale.py compares both).
    lifeguard: bool = MembershipConfig.lifeguard
    suspicion_max_timeout_mult: int = Field(default=MembershipConfig.suspicion_max_timeout_mult, ge=1)
    awareness_max_multiplier: int = Field(default=MembershipConfig.awareness_max_multiplier, ge=1)
    # "flat": one gossip pool for the whole fleet (every node holds every member; fine to a few
    # hundred). "sites": each site (label `site`) is its own pool, and `representatives` members
    # of each site also join the federation pool, found through `federation_seeds` (addresses of
    # other sites' nodes), as Consul's LAN and WAN pools. `seeds` must then be of the node's site.
    pools: str = Field(default="flat", pattern="^(flat|sites)$")
    representatives: int = Field(default=DEFAULT_REPRESENTATIVES, ge=1, le=16)
    federation_seeds: list[str] = Field(default_factory=list, max_length=64)
    # The federation pool's timings: "wan" (memberlist's WAN defaults, as Consul's WAN pool: probe 5 s,
    # timeout 3 s, suspicion x6, gossip 0.5 s to 4, push-pull 60 s) or "site" (the same as the site pool,
    # for sites on one LAN, and for tests).
    federation_timings: Literal["wan", "site"] = "wan"

    @field_validator("federation_seeds")
    @classmethod
    def _federation_seeds(cls, value: list[str]) -> list[str]:
        return [_check_address(v) for v in value]

    @model_validator(mode="after")
    def _timeout_below_interval(self) -> MembershipSection:
        if self.probe_timeout_s >= self.probe_interval_s:
            raise ValueError(
                f"probe_timeout_s ({self.probe_timeout_s}) must be below probe_interval_s "
                f"({self.probe_interval_s}): indirect probes need the rest of the interval")
        return self

    @classmethod
    def timing_fields(cls) -> list[str]:
        """The fields that are SWIM core settings (not the pool layout)."""
        return [f for f in cls.model_fields if f not in _POOL_FIELDS]

    @classmethod
    def from_core(cls, timings: MembershipConfig, **pools: Any) -> MembershipSection:
        """A section with the timings of `timings` (tests and benchmarks) for both pools, plus pool
        settings."""
        if pools.get("pools") == "sites":
            pools.setdefault("federation_timings", "site")
        return cls(**{f: getattr(timings, f) for f in cls.timing_fields()}, **pools)

    def to_core(self) -> MembershipConfig:
        """The site pool's core settings (in sites mode it admits this node's site only)."""
        timings = self.model_dump(exclude=_POOL_FIELDS)
        return MembershipConfig(**timings, site_only=self.pools == "sites")

    def federation_core(self) -> MembershipConfig:
        """The federation pool's core settings: all sites admitted; WAN timings or the site pool's."""
        timings = self.model_dump(exclude=_POOL_FIELDS)
        if self.federation_timings == "wan":
            timings.update(WAN_TIMINGS)
        return MembershipConfig(**timings, pool=FEDERATION_POOL)


class TransferSection(_Strict):
    """Peer-to-peer model distribution: caps and scheduling. 0 means no cap."""

    upload_rate_bytes_per_s: int = Field(default=0, ge=0)
    download_rate_bytes_per_s: int = Field(default=0, ge=0)
    max_uploads: int = Field(default=4, ge=1, le=256)
    max_in_flight_per_peer: int = Field(default=2, ge=1, le=64)
    request_timeout_s: float = Field(default=30.0, gt=0)
    ban_s: float = Field(default=300.0, ge=0)
    # "all": fetch every version peers announce (until rollouts say what is wanted); "none": only serve.
    fetch: str = Field(default="all", pattern="^(all|none)$")
    # "swarm": fetch chunks from any peer that holds them, the origin only for what no peer has.
    # "origin": fetch only from the origin, as every device would from a registry (a baseline for
    # bench/distribution.py; it multiplies the origin's egress by the fleet size).
    sources: str = Field(default="swarm", pattern="^(swarm|origin)$")
    # How many times the origin refuses a chunk it already sent to each other requester ("fetch it
    # from a peer") before serving it anyway; 0 serves whoever asks (see OriginPolicy).
    origin_refusals: int = Field(default=4, ge=0, le=64)
    # How long a download that gets nowhere waits before asking the origin for chunks the origin
    # rendezvous gave another node (stuck, or failing every request): about how long a peer that claims
    # chunks and never serves them can delay a download.
    origin_fallback_s: float = Field(default=60.0, gt=0)
    # Sites mode: how long a site may make no progress on a version other sites offer before any of its
    # representatives fetches it across sites (the site's fetcher does not want it or cannot reach
    # them). Longer than a chunk request's timeout, so a slow but working fetcher is not doubled.
    cross_fallback_s: float = Field(default=60.0, gt=0)
    # Chunk progress between transfer peers (as BitTorrent's HAVE messages): gossip says a downloading
    # version's progress in eighths, and a downloader asks up to `have_peers` partial holders for their
    # chunk lists. false: every stored chunk changes the gossiped bitfield (as nodes before this did).
    stepped_holdings: bool = True
    have_peers: int = Field(default=8, ge=1, le=64)


class InferenceSection(_Strict):
    """On-device inference. With `model` set, the node serves the Inference service and
    activates the newest complete version of that model it holds (verified first)."""

    model: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    backend: str | None = Field(default=None, pattern="^(litert|tflite-runtime)$")  # default: first installed
    workers: int | None = Field(default=None, ge=1, le=64)  # default: one per CPU


Address = Annotated[str, Field(min_length=3)]


class NodeConfig(_Strict):
    node_id: str = Field(pattern=NODE_ID_PATTERN)
    listen: Address
    advertise: Address | None = None
    seeds: list[Address] = Field(default_factory=list)
    labels: dict[str, str] = Field(default_factory=dict)
    data_dir: Path
    metrics_listen: Address | None = None
    log_level: str = Field(default="info", pattern="^(debug|info|warning|error)$")
    # "json": one JSON object a line (time, level, logger, message, node_id), for log shippers.
    log_format: str = Field(default="text", pattern="^(text|json)$")
    tls: TlsSection
    membership: MembershipSection = Field(default_factory=MembershipSection)
    transfer: TransferSection = Field(default_factory=TransferSection)
    inference: InferenceSection = Field(default_factory=InferenceSection)
    # The site's Raft group for local decisions (absent: this node takes no local decisions),
    # and the guard's autonomous scope per decision kind.
    raft: RaftSection | None = None
    guard: GuardTable = Field(default_factory=dict)
    # Streams (camera feeds) attached to this device: the site group routes them here unless
    # it already routes them elsewhere (moving a routed stream is a decision).
    streams: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")]] = \
        Field(default_factory=list, max_length=1024)

    @field_validator("listen", "advertise", "metrics_listen")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        return None if value is None else _check_address(value)

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: list[str]) -> list[str]:
        return [_check_address(v) for v in value]

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > 32:
            raise ValueError(f"at most 32 labels, got {len(value)}")
        for key, val in value.items():
            if not re.match(r"^[a-z][a-z0-9_.-]{0,62}$", key):
                raise ValueError(f"label key {key!r} must be lowercase letters, digits, '_', '.', '-'")
            if len(val) > 255:
                raise ValueError(f"label {key!r} value longer than 255 characters")
        return value

    @model_validator(mode="after")
    def _sites_need_a_site(self) -> NodeConfig:
        if self.membership.pools == "flat":
            if self.membership.federation_seeds:
                raise ValueError('[membership] federation_seeds apply only with pools = "sites"; remove '
                                 'them or set pools = "sites"')
            return self
        if not self.labels.get("site"):
            raise ValueError('[membership] pools = "sites" needs a `site` label in [labels] (the pool this '
                             'node gossips in), or pools = "flat"')
        if self.transfer.sources == "origin":
            raise ValueError('[transfer] sources = "origin" cannot work with [membership] pools = "sites": '
                             "devices outside the origin's site never see it; use sources = \"swarm\"")
        return self

    @property
    def advertised_address(self) -> str:
        return self.advertise or self.listen


def _resolve_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """Relative paths in the file are relative to the file, not to the working directory."""
    out = dict(raw)
    if isinstance(out.get("data_dir"), str):
        out["data_dir"] = str(base / out["data_dir"])
    tls = out.get("tls")
    if isinstance(tls, dict) and isinstance(tls.get("dir"), str):
        out["tls"] = {**tls, "dir": str(base / tls["dir"])}
    return out


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model an annotation holds (`RaftSection | None` -> RaftSection), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        model = _model_in(arg)
        if model is not None:
            return model
    return None


def _table_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The section (model) whose fields `loc` is among: NodeConfig for a top-level key."""
    model: type[BaseModel] | None = NodeConfig
    for part in loc:
        field = model.model_fields.get(str(part)) if model is not None else None
        model = _model_in(field.annotation) if field is not None else None
        if model is None:
            return None
    return model


def _unknown_field(loc: tuple[int | str, ...]) -> str:
    """Why key `loc` is refused and what the operator probably meant."""
    name, table = str(loc[-1]), loc[:-1]
    model = _table_at(table)
    where = f"[{'.'.join(str(p) for p in table)}]" if table else "the top level"
    if table and name in NodeConfig.model_fields:
        return (f"{name} is a top-level field, but it comes after the {where} header, and TOML reads every "
                f"key after a [table] header as part of that table: move `{name} = ...` above the first "
                "[table] of the file")
    # Fields kept only to explain that they are gone (raft.listen) are not suggested.
    known = sorted(n for n, f in model.model_fields.items() if not f.exclude) if model is not None else []
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else f"; the fields of {where} are {', '.join(known)}"
    return f"unknown {'field in ' + where if table else 'top-level field'}{hint}"


def _format_errors(path: Path, error: ValidationError) -> str:
    lines = [f"{path}: invalid configuration"]
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"  {field}: {_unknown_field(item['loc'])}")
            continue
        message = item["msg"].removeprefix("Value error, ")
        got = f" (got {item['input']!r})" if item["type"] not in ("missing", "model_type") \
            and not isinstance(item.get("input"), dict) else ""
        lines.append(f"  {field}: {message}{got}")
    return "\n".join(lines)


def load_config(path: Path) -> NodeConfig:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        return NodeConfig.model_validate(_resolve_paths(raw, path.resolve().parent))
    except ValidationError as exc:
        raise ConfigError(_format_errors(path, exc)) from None
