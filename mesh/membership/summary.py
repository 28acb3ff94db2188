"""What one site tells the others through the federation pool: its summary (pure).

A device gossips only inside its site's pool; the site's representatives (see
`federation`) carry one `SiteSummary` per site across the federation pool, as
Consul's servers carry a datacenter's state over the WAN pool. A summary holds
version-level facts only, so its size depends on what the site runs, never on
how many devices it has:

- `members`: live members of the site;
- `versions`: per (model, version), how many of the site's devices hold it
  complete (the federation learns a version exists and where to fetch it);
- `rollouts`: per rollout, the site's replicated state and wave;
- `health`: per (model, version), requests and errors summed over the site's
  devices (what a rollout's gate in another site reads instead of every
  device's counters);
- `representatives`: the site's representatives and their addresses (where
  another site's representatives fetch from).

Rules of this module:

- `summarize` builds a site's summary from its members' facts; every
  representative of the site computes it from its own view.
- Summaries are ordered by `(seq, author, bytes)`: a representative whose
  summary changes writes `seq` one past the newest it has seen for its site;
  the author's node id, then the canonical bytes, break ties, so every member
  of the federation keeps the same newest summary of each site whatever order
  gossip brings them in (`merge` is commutative, associative and idempotent).
- `accept` refuses a summary signed by a member of another site (a member of
  site A with a valid certificate cannot speak for site B), by a member the
  receiver's federation view does not list as a representative of its site,
  one numbered more than MAX_SEQ_STEP past the held one, and anything
  malformed; the table keeps what it had. A representative keeps in its own
  table what the others decode (`publish`).
- `encode` is canonical and bounded: a summary that would pass `limit_bytes`
  drops its least important entries first (health, then versions held by
  fewest devices, then rollouts), never its site, seq, author or
  representatives, and says how many it dropped.

No clock, socket, thread or randomness: the node, the simulator and the tests
drive the same functions.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from mesh.identity.signing import canonical_json
from mesh.rollout._json import strict_json

__all__ = [
    "MAX_SUMMARY_BYTES",
    "MemberFacts",
    "SiteSummary",
    "SummaryError",
    "accept",
    "decode",
    "encode",
    "fleet_health",
    "fleet_holders",
    "merge",
    "next_seq",
    "publish",
    "summarize",
]

SUMMARY_FORMAT = 1
MAX_SUMMARY_BYTES = 16 * 1024
MAX_COUNT = 1 << 40
MAX_SEQ_STEP = 1 << 12  # how far past the held summary of a site an accepted one may number itself
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/+-]{0,127}")
_ADDRESS_RE = re.compile(r"[A-Za-z0-9\[][A-Za-z0-9.:\[\]_-]{0,254}")
_FIELDS = frozenset(
    {
        "format",
        "site",
        "seq",
        "author",
        "members",
        "versions",
        "rollouts",
        "health",
        "representatives",
        "dropped",
    }
)


class SummaryError(ValueError):
    """A summary is malformed, too big, or not its sender's to give."""


@dataclass(frozen=True)
class MemberFacts:
    """What a site's summary needs from one live member (from its gossip metadata)."""

    node_id: str
    complete: frozenset[tuple[str, str]] = frozenset()  # (model, version) held complete
    health: Mapping[tuple[str, str], tuple[int, int]] = dataclasses.field(
        default_factory=dict
    )  # requests, errors


@dataclass(frozen=True)
class SiteSummary:
    site: str
    seq: int
    author: str
    members: int
    versions: tuple[tuple[str, str, int], ...] = ()  # (model, version, devices holding it complete)
    rollouts: tuple[tuple[str, str, int], ...] = ()  # (rollout id, state, wave)
    health: tuple[tuple[str, str, int, int], ...] = ()  # (model, version, requests, errors)
    representatives: tuple[tuple[str, str], ...] = ()  # (node id, address)
    dropped: int = 0  # entries left out to stay within the size limit

    def __post_init__(self) -> None:
        _check(self)

    @property
    def order(self) -> tuple[int, str, bytes]:
        """Newest wins: by seq, then author, then the bytes themselves (an author that lost its seq in a
        restart may write two summaries under one number; every member must still keep the same one)."""
        return (self.seq, self.author, self.canonical())

    def canonical(self) -> bytes:
        """The canonical bytes of this summary (computed once)."""
        cached = self.__dict__.get("_canonical")
        if cached is None:
            cached = canonical_json(_doc(self))
            object.__setattr__(self, "_canonical", cached)
        return cached

    def newer_than(self, other: SiteSummary) -> bool:
        if (self.seq, self.author) != (other.seq, other.author):
            return (self.seq, self.author) > (other.seq, other.author)
        return self.canonical() > other.canonical()

    def same_content(self, other: SiteSummary) -> bool:
        """Does `other` say the same things (whatever its seq and author)?"""
        return dataclasses.replace(self, seq=0, author=self.author) == dataclasses.replace(
            other, seq=0, author=self.author
        )

    def holders(self, model: str, version: str) -> int:
        return next((n for m, v, n in self.versions if (m, v) == (model, version)), 0)


def summarize(
    site: str,
    members: Iterable[MemberFacts],
    *,
    author: str,
    seq: int,
    representatives: Iterable[tuple[str, str]],
    rollouts: Iterable[tuple[str, str, int]] = (),
) -> SiteSummary:
    """The summary of `site` from its live members' facts, written by `author` as number `seq`."""
    holders: dict[tuple[str, str], int] = {}
    health: dict[tuple[str, str], tuple[int, int]] = {}
    count = 0
    for facts in members:
        count += 1
        for key in facts.complete:
            holders[key] = holders.get(key, 0) + 1
        for key, (requests, errors) in facts.health.items():
            if not 0 <= errors <= requests:
                continue  # one device's impossible counters must not keep its site from summing up
            r, e = health.get(key, (0, 0))
            health[key] = (min(MAX_COUNT, r + requests), min(MAX_COUNT, e + errors))
    return SiteSummary(
        site=site,
        seq=seq,
        author=author,
        members=count,
        versions=tuple(sorted((m, v, n) for (m, v), n in holders.items())),
        rollouts=tuple(sorted(rollouts)),
        health=tuple(sorted((m, v, r, e) for (m, v), (r, e) in health.items())),
        representatives=tuple(sorted(representatives)),
    )


def next_seq(table: Mapping[str, SiteSummary], site: str) -> int:
    """The seq a representative of `site` writes a changed summary under."""
    held = table.get(site)
    return 1 if held is None else min(MAX_COUNT, held.seq + 1)


def merge(table: Mapping[str, SiteSummary], incoming: SiteSummary) -> dict[str, SiteSummary]:
    """`table` with `incoming` in it if it is the newest of its site; commutative, idempotent."""
    held = table.get(incoming.site)
    out = dict(table)
    if held is None or incoming.newer_than(held):
        out[incoming.site] = incoming
    return out


def publish(
    table: Mapping[str, SiteSummary], summary: SiteSummary, limit_bytes: int = MAX_SUMMARY_BYTES
) -> tuple[bytes, dict[str, SiteSummary]]:
    """What a representative sends, and its own table after: it keeps what the others will decode (a
    trimmed summary if `encode` had to drop entries), so its table and theirs hold the same bytes."""
    data = encode(summary, limit_bytes)
    return data, merge(table, decode(data, limit_bytes))


def accept(
    table: Mapping[str, SiteSummary],
    data: bytes,
    *,
    signed_by: str,
    signer_site: str,
    representatives: Collection[str],
) -> dict[str, SiteSummary]:
    """Merge a summary whose signature the shell verified as `signed_by`'s, a node whose certificate says
    it is of `signer_site`, which the receiver's federation view lists among that site's
    `representatives` (summaries are relayed by gossip, so whoever handed it over does not matter).

    Raise SummaryError naming what is wrong, `table` unchanged, if it is not the signer's to give: a
    member of one site, however valid its certificate, cannot speak for another site; a member that is
    not a representative cannot speak at all; and no summary may jump more than MAX_SEQ_STEP past the
    one held, so a captured representative cannot take its site's numbering out of reach of the genuine
    ones. (A captured representative can still misreport its own site, as a captured device can misreport
    its own counters: summaries are as honest as the site's representatives.)"""
    summary = decode(data)
    if summary.author != signed_by:
        raise SummaryError(
            f"summary of {summary.site} #{summary.seq} names author {summary.author} but is signed by "
            f"{signed_by}"
        )
    if summary.site != signer_site:
        raise SummaryError(
            f"{signed_by} of site {signer_site} signed a summary of site {summary.site}; a site speaks only "
            "for itself"
        )
    if signed_by not in representatives:
        raise SummaryError(
            f"{signed_by} is not a representative of site {summary.site} in this member's federation view "
            f"({', '.join(sorted(representatives)) or 'none known'}); its summary #{summary.seq} is ignored"
        )
    held = table.get(summary.site)
    if held is not None and summary.seq > held.seq + MAX_SEQ_STEP:
        raise SummaryError(
            f"summary of {summary.site} #{summary.seq} by {signed_by} jumps more than {MAX_SEQ_STEP} past "
            f"#{held.seq}; ignored"
        )
    return merge(table, summary)


def fleet_holders(table: Mapping[str, SiteSummary], model: str, version: str) -> dict[str, int]:
    """Per site, devices holding `model` `version` complete (sites holding none left out)."""
    return {site: n for site, s in sorted(table.items()) if (n := s.holders(model, version))}


def fleet_health(
    table: Mapping[str, SiteSummary], model: str, version: str, *, besides: str | None = None
) -> tuple[int, int]:
    """(requests, errors) of `model` `version` summed over every site but `besides`."""
    requests = errors = 0
    for site, s in table.items():
        if site == besides:
            continue
        for m, v, r, e in s.health:
            if (m, v) == (model, version):
                requests, errors = requests + r, errors + e
    return requests, errors


# --- codec -------------------------------------------------------------------------------------------


def _doc(s: SiteSummary) -> dict:
    return {
        "format": SUMMARY_FORMAT,
        "site": s.site,
        "seq": s.seq,
        "author": s.author,
        "members": s.members,
        "versions": [list(x) for x in s.versions],
        "rollouts": [list(x) for x in s.rollouts],
        "health": [list(x) for x in s.health],
        "representatives": [list(x) for x in s.representatives],
        "dropped": s.dropped,
    }


def encode(summary: SiteSummary, limit_bytes: int = MAX_SUMMARY_BYTES) -> bytes:
    """Canonical bytes of `summary` within `limit_bytes`, least important entries dropped first; raise
    SummaryError if even the site, its representatives and no entries do not fit."""
    data = canonical_json(_doc(summary))
    if len(data) <= limit_bytes:
        return data
    # Least important last in this list: health, then the versions fewest devices hold, then rollouts.
    ranked = [
        *(("h", x) for x in reversed(summary.health)),
        *(("v", x) for x in sorted(summary.versions, key=lambda x: (x[2], x[0], x[1]))),
        *(("r", x) for x in reversed(summary.rollouts)),
    ]

    def without(n: int) -> bytes:
        gone = set(ranked[:n])
        trimmed = dataclasses.replace(
            summary,
            health=tuple(x for x in summary.health if ("h", x) not in gone),
            versions=tuple(x for x in summary.versions if ("v", x) not in gone),
            rollouts=tuple(x for x in summary.rollouts if ("r", x) not in gone),
            dropped=min(MAX_COUNT, summary.dropped + n),
        )
        return canonical_json(_doc(trimmed))

    if len(without(len(ranked))) > limit_bytes:
        raise SummaryError(
            f"the summary of site {summary.site} does not fit in {limit_bytes} bytes even without entries"
        )
    low, high = 1, len(ranked)  # the fewest drops that fit lie in [low, high]; dropping more never grows it
    while low < high:
        middle = (low + high) // 2
        if len(without(middle)) <= limit_bytes:
            high = middle
        else:
            low = middle + 1
    return without(low)


def decode(data: object, limit_bytes: int = MAX_SUMMARY_BYTES) -> SiteSummary:
    """Parse strictly; raise SummaryError naming the problem."""
    doc = strict_json(data, "site summary", SummaryError, limit_bytes)
    if not isinstance(doc, dict):
        raise SummaryError("site summary: expected an object")
    if doc.get("format") != SUMMARY_FORMAT or type(doc.get("format")) is not int:
        raise SummaryError(
            f"site summary format {str(doc.get('format'))[:20]!r} is not known (this node reads "
            f"{SUMMARY_FORMAT}); upgrade the node"
        )
    if set(doc) != _FIELDS:
        missing, extra = sorted(_FIELDS - set(doc)), sorted(set(doc) - _FIELDS)
        raise SummaryError(f"site summary: fields missing {missing}, unknown {extra[:5]}")
    try:
        summary = SiteSummary(
            site=doc["site"],
            seq=doc["seq"],
            author=doc["author"],
            members=doc["members"],
            versions=_rows(doc["versions"], "versions", (str, str, int)),
            rollouts=_rows(doc["rollouts"], "rollouts", (str, str, int)),
            health=_rows(doc["health"], "health", (str, str, int, int)),
            representatives=_rows(doc["representatives"], "representatives", (str, str)),
            dropped=doc["dropped"],
        )
    except TypeError as exc:
        raise SummaryError(f"site summary: {exc}") from None
    assert isinstance(data, (bytes, bytearray, memoryview))  # strict_json refused anything else
    if canonical_json(_doc(summary)) != bytes(data):
        raise SummaryError("site summary: not in canonical form (entries out of order, or spelt differently)")
    return summary


def _rows(value: object, what: str, shape: tuple[type, ...]) -> tuple:
    if not isinstance(value, list):
        raise SummaryError(f"site summary.{what}: expected a list")
    rows = []
    for row in value:
        if not isinstance(row, list) or len(row) != len(shape):
            raise SummaryError(f"site summary.{what}: each entry is a list of {len(shape)}")
        for item, kind in zip(row, shape, strict=True):
            if type(item) is not kind:
                raise SummaryError(f"site summary.{what}: {str(item)[:40]!r} is not a {kind.__name__}")
        rows.append(tuple(row))
    return tuple(rows)


def _check(s: SiteSummary) -> None:
    for name in ("site", "author"):
        value = getattr(s, name)
        if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
            raise SummaryError(f"site summary.{name}: {str(value)[:40]!r} is not a name")
    for name in ("seq", "members", "dropped"):
        value = getattr(s, name)
        if type(value) is not int or not 0 <= value <= MAX_COUNT:
            raise SummaryError(
                f"site summary.{name}: expected a whole number 0..{MAX_COUNT}, got {str(value)[:20]}"
            )
    for what, rows, texts in (
        ("versions", s.versions, 2),
        ("rollouts", s.rollouts, 2),
        ("health", s.health, 2),
        ("representatives", s.representatives, 2),
    ):
        if list(rows) != sorted(set(rows)):
            raise SummaryError(f"site summary.{what}: entries must be sorted and distinct")
        keys = [row[:1] if what in ("rollouts", "representatives") else row[:2] for row in rows]
        if len(keys) != len(set(keys)):
            raise SummaryError(f"site summary.{what}: one entry per key")
        for row in rows:
            for i, text in enumerate(row[:texts]):
                pattern = _ADDRESS_RE if (what, i) == ("representatives", 1) else _NAME_RE
                if not isinstance(text, str) or not pattern.fullmatch(text):
                    raise SummaryError(f"site summary.{what}: {str(text)[:40]!r} is not a name")
            for number in row[texts:]:
                if type(number) is not int or not 0 <= number <= MAX_COUNT:
                    raise SummaryError(f"site summary.{what}: {str(number)[:20]!r} is not a count")
    for model, version, holders in s.versions:
        if holders > s.members:
            raise SummaryError(
                f"site summary.versions: {holders} devices hold {model} {version} of {s.members}"
            )
    for _, _, requests, errors in s.health:
        if errors > requests:
            raise SummaryError(f"site summary.health: {errors} errors in {requests} requests")
    if not s.representatives:
        raise SummaryError(f"site summary of {s.site}: no representative named")
