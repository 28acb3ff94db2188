"""The node configuration's [raft] section and [guard] table, validated strictly.

Example (node.toml)::

    [raft]
    members = ["cam-01", "cam-02", "cam-03"]   # node ids of the whole group, this node included
    # group = "berlin-1"                       # default: the node's site label

Members talk over each other's node gRPC port under mTLS (no Raft port of its own); each
member's address comes from membership.

    [guard]
    hold_ttl_s = 3600
    [guard.move_streams]
    max_nodes = 2
    max_fraction = 0.5
    max_streams = 5

The node config adds ``raft: RaftSection | None = None`` and ``guard: GuardTable = {}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from mesh.consensus.raft import RaftConfigError, RaftTimings
from mesh.guard.core import NODE_ID_RE, Policy, PolicyError

MAX_GROUP_MEMBERS = 31
_DEFAULTS = RaftTimings()


class RaftSectionError(ValueError):
    """The [raft] section cannot be used (names the field)."""


class RaftSection(BaseModel):
    """This node's membership in its site's Raft group (absent: the node takes no local decisions)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    members: list[str] = Field(min_length=1, max_length=MAX_GROUP_MEMBERS)
    # Gone: Raft runs on the node's gRPC port. Accepted only to say so (see _no_listen).
    listen: str | None = Field(default=None, exclude=True)
    group: str | None = None
    election_min_s: float = Field(default=_DEFAULTS.election_min_s, gt=0)
    election_max_s: float = Field(default=_DEFAULTS.election_max_s, gt=0)
    append_period_s: float = Field(default=_DEFAULTS.append_period_s, gt=0)
    leader_fallback_s: float = Field(default=_DEFAULTS.leader_fallback_s, gt=0)
    tick_period_s: float = Field(default=_DEFAULTS.tick_period_s, gt=0, le=1.0)
    batch_appends: bool = _DEFAULTS.batch_appends
    compaction_min_entries: int = Field(default=_DEFAULTS.compaction_min_entries, ge=10)
    compaction_min_interval_s: float = Field(default=_DEFAULTS.compaction_min_interval_s, gt=0)
    pre_vote: bool = _DEFAULTS.pre_vote

    @field_validator("listen")
    @classmethod
    def _no_listen(cls, value: str | None) -> None:
        if value is not None:
            raise ValueError(
                "raft.listen is no longer used: Raft runs on the node's own gRPC port under mTLS. Remove "
                "raft.listen and list the group's members by node id in raft.members"
            )
        return None

    @field_validator("members")
    @classmethod
    def _members(cls, value: list[str]) -> list[str]:
        for i, member in enumerate(value):
            if not isinstance(member, str) or not NODE_ID_RE.fullmatch(member):
                hint = " (an address: list node ids now, not Raft addresses)" if ":" in str(member) else ""
                raise ValueError(f"raft.members[{i}] = {member!r} is not a node id{hint}; node ids are 1-63 "
                                 "letters, digits, '.', '_' or '-'")
        twice = sorted({m for m in value if value.count(m) > 1})
        if twice:
            raise ValueError(f"raft.members lists {', '.join(twice)} more than once")
        return value

    @field_validator("group")
    @classmethod
    def _group(cls, value: str | None) -> str | None:
        if value is not None and not NODE_ID_RE.fullmatch(value):
            raise ValueError(f"raft.group {value!r} must be 1-63 letters, digits, '.', '_' or '-'")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> RaftSection:
        try:
            self.timings().validate()
        except RaftConfigError as exc:
            raise ValueError(f"raft timings: {exc}") from None
        return self

    def timings(self) -> RaftTimings:
        return RaftTimings(**{name: getattr(self, name) for name in RaftTimings.__dataclass_fields__})

    def group_id(self, site: str | None) -> str:
        """The group's name: `group`, else the node's site label; raise RaftSectionError if neither."""
        group = self.group or site
        if not group:
            raise RaftSectionError(
                "raft.group is not set and the node has no `site` label: set [labels] site = \"...\" "
                "(the nodes of one site form one group) or raft.group"
            )
        if not NODE_ID_RE.fullmatch(group):
            raise RaftSectionError(
                f"site label {group!r} cannot name a Raft group (1-63 letters, digits, '.', '_' or '-'); "
                "set raft.group"
            )
        return group


def policy_from_table(table: Mapping[str, Any] | None) -> Policy:
    """The guard policy from the [guard] table (`Policy.from_mapping`); ValueError naming the field."""
    try:
        return Policy.from_mapping(table or {})
    except PolicyError as exc:
        raise ValueError(str(exc)) from None


def _check_guard(table: dict[str, Any]) -> dict[str, Any]:
    policy_from_table(table)
    return table


#: The [guard] table as NodeConfig holds it: a plain dict, checked with Policy.from_mapping at load time.
GuardTable = Annotated[dict[str, Any], AfterValidator(_check_guard)]
