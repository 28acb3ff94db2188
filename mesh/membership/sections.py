"""A node's membership metadata as named sections, one per capability, each with a budget.

Membership gossips one opaque blob per member (`MetadataBoard.set_meta`), limited to
`meta_limit_bytes`. Several capabilities publish through it (what versions a node holds, its
health counters, the rollouts it knows), so the blob is a `MemberMeta` message of named
sections and each capability writes only its own section through a board of its own
(`MetaSections.board(name)`), whose `meta_limit_bytes` is that section's budget. One
capability can therefore never crowd another out, and readers take the section they need
(`read_section`) from a peer's blob.
"""

from __future__ import annotations

from collections.abc import Mapping

from google.protobuf.message import DecodeError

from mesh._proto import meta_pb2 as pb
from mesh.membership.view import MetadataBoard

# Framing of the sections: map entry tags and lengths, a few bytes per section.
_OVERHEAD_PER_SECTION_BYTES = 8


class MetaError(ValueError):
    """A member's metadata is not a MemberMeta message (names what is wrong)."""


def read_section(meta: bytes, name: str) -> bytes:
    """Section `name` of a member's metadata blob (b"" when it has none); MetaError if malformed."""
    if not meta:
        return b""
    try:
        message = pb.MemberMeta.FromString(meta)
    except DecodeError as exc:
        raise MetaError(f"metadata is not a MemberMeta message: {exc}") from None
    return message.sections.get(name, b"")


class _SectionBoard:
    """One capability's view of the board: its section only, within its budget."""

    def __init__(self, owner: MetaSections, name: str, budget: int) -> None:
        self._owner = owner
        self._name = name
        self.meta_limit_bytes = budget

    def set_meta(self, meta: bytes) -> None:
        if len(meta) > self.meta_limit_bytes:
            raise ValueError(f"metadata section {self._name!r} is {len(meta)} bytes, its budget is "
                             f"{self.meta_limit_bytes}")
        self._owner._set(self._name, meta)


class MetaSections:
    """Splits this node's metadata board into named sections with budgets (bytes each)."""

    @staticmethod
    def needed_bytes(budgets: Mapping[str, int]) -> int:
        """The metadata bytes sections with these budgets may take together (framing included)."""
        return sum(budgets.values()) + _OVERHEAD_PER_SECTION_BYTES * len(budgets) + sum(map(len, budgets))

    def __init__(self, board: MetadataBoard, budgets: Mapping[str, int]) -> None:
        needed = self.needed_bytes(budgets)
        if needed > board.meta_limit_bytes:
            raise ValueError(f"metadata budgets need {needed} bytes, "
                             f"the board holds {board.meta_limit_bytes}")
        self._board = board
        self._budgets = dict(budgets)
        self._sections: dict[str, bytes] = {}

    def board(self, name: str) -> MetadataBoard:
        """The board capability `name` publishes on (its section, its budget)."""
        if name not in self._budgets:
            raise KeyError(f"no metadata section {name!r}; sections: {', '.join(self._budgets)}")
        return _SectionBoard(self, name, self._budgets[name])

    def _set(self, name: str, data: bytes) -> None:
        if self._sections.get(name, b"") == data:
            return
        if data:
            self._sections[name] = data
        else:
            self._sections.pop(name, None)
        self._board.set_meta(pb.MemberMeta(sections=self._sections).SerializeToString(deterministic=True)
                             if self._sections else b"")
