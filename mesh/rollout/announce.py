"""What a node gossips about rollouts: a few bytes per rollout in its membership metadata. Pure.

Signed plans (~1.1 KB) and operator commands (~0.6 KB) are too big for the
metadata every member carries of every other, so a node announces only a
`RolloutNote` per rollout it holds verified documents of: the rollout id, a
prefix of the plan digest, how many operator commands it holds and a digest of
them (a peer whose count or digest differs fetches the documents from it: the
anti-entropy that lets a node returning from offline learn plans and commands
again), its site's state and wave as its replica applied them (how an abort
reaches every site, unsigned: rolling back is the safe direction), its own part
(first wave it is in, which version it serves, why it skips), and, from a site
leader, the gate's latest verdict and the site's evidence for sites without a
cohort device of their own in a wave.

`encode_notes` packs notes into a bounded binary blob (varints, ~40-80 bytes a
rollout) and keeps the first notes that fit the budget (the caller orders them
by importance); `decode_notes` parses a peer's blob strictly, raising only
`AnnounceFormatError`, and accepts only the one canonical encoding.
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar, overload

from mesh.rollout.health import MAX_COUNT, GateOutcome, HealthFormatError, SiteEvidence, Totals
from mesh.rollout.plan import MAX_WAVES, ROLLOUT_ID_RE, RolloutError, SkipKind
from mesh.rollout.state import RolloutState

# Codec versions read. Version 2 adds each note's `population` (sites mode); it is written only when a
# note kept has one, so a flat fleet's blobs stay version 1 byte for byte.
ANNOUNCE_CODEC_VERSIONS = (1, 2)
MAX_ANNOUNCE_BYTES = 1024
# A site's population as a representative may announce it: a site is one gossip pool (meant for up to
# ~10^4 members); a bound keeps a peer's number from costing others more than a real site would.
MAX_SITE_POPULATION = 1_000_000
MAX_NOTES = 8
MAX_EVIDENCE = 2  # the current wave's, and the last passed wave's (so a lagging site still sees it)
PLAN_DIGEST_HEX = 16  # 8 bytes: enough to tell two plans apart; the signature is what is trusted
COMMANDS_DIGEST_HEX = 12
MAX_COMMANDS = 1000
_HEX_RE = re.compile(r"[0-9a-f]*")


class AnnounceFormatError(RolloutError):
    """A peer's rollout announcement is malformed (names what is wrong)."""


class Serving(enum.Enum):
    """Which version of a rollout's model a node serves, relative to the rollout."""

    NONE = "none"  # the node serves another model, or none is configured: not a device of this rollout
    INACTIVE = "inactive"  # it is configured for the model but serves no version yet
    BASELINE = "baseline"
    TARGET = "target"
    OTHER = "other"  # another version of the model


_T = TypeVar("_T")

_STATES = tuple(RolloutState)
_SERVING = tuple(Serving)
_SKIPS = tuple(SkipKind)
_OUTCOMES = tuple(GateOutcome)


def digest_commands(command_digests: Iterable[str]) -> str:
    """The digest a node announces of the operator commands it holds (order does not matter)."""
    h = hashlib.sha256(b"fleetmesh rollout commands v1\n")
    for digest in sorted(set(command_digests)):
        h.update(digest.encode() + b"\n")
    return h.hexdigest()[:COMMANDS_DIGEST_HEX]


@dataclass(frozen=True)
class WaveEvidence:
    """A site's measurement of one wave (`SiteEvidence` without the names the announcement gives)."""

    wave: int
    measured: Totals
    soaked: Totals
    activation_failures: int = 0
    unreachable: int = 0

    def __post_init__(self) -> None:
        if type(self.wave) is not int or not 1 <= self.wave <= MAX_WAVES:
            raise AnnounceFormatError(f"evidence wave {self.wave!r} is not 1..{MAX_WAVES}")
        for name in ("activation_failures", "unreachable"):
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value <= MAX_COUNT:
                raise AnnounceFormatError(f"evidence {name} {value!r} is out of range")
        for totals in (self.measured, self.soaked):
            if not isinstance(totals, Totals) or totals.errors > totals.requests:
                raise AnnounceFormatError(f"evidence totals {totals!r} are not consistent")

    @classmethod
    def of(cls, evidence: SiteEvidence) -> WaveEvidence:
        return cls(
            evidence.wave,
            evidence.measured,
            evidence.soaked,
            evidence.activation_failures,
            evidence.unreachable,
        )

    def for_site(self, site: str, rollout_id: str) -> SiteEvidence:
        return SiteEvidence(
            site,
            rollout_id,
            self.wave,
            self.measured,
            self.soaked,
            self.activation_failures,
            self.unreachable,
        )


@dataclass(frozen=True)
class RolloutNote:
    """One node's word about one rollout (see the module doc)."""

    rollout_id: str
    plan_digest: str  # the first PLAN_DIGEST_HEX hex characters of the plan digest
    commands: int = 0
    commands_digest: str = digest_commands(())
    state: RolloutState | None = None  # its site's state as its replica applied it; None: not registered
    wave: int = 0
    first_wave: int = 0  # the first wave whose cohort holds this node in its site; 0: none (yet)
    serving: Serving = Serving.NONE
    skip: SkipKind | None = None
    verdict: GateOutcome | None = None  # its site's latest gate verdict (site leaders only)
    evidence: tuple[WaveEvidence, ...] = ()  # its site's evidence (site leaders only)
    # Sites mode, from a site's representatives: how many devices of the site the plan selects (what
    # other sites apportion waves by, as flat mode counts members). None: not said.
    population: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.rollout_id, str) or not ROLLOUT_ID_RE.fullmatch(self.rollout_id):
            raise AnnounceFormatError(f"note: {str(self.rollout_id)[:80]!r} is not a rollout id")
        if isinstance(self.plan_digest, str):
            object.__setattr__(self, "plan_digest", self.plan_digest[:PLAN_DIGEST_HEX])
        for name, size in (("plan_digest", PLAN_DIGEST_HEX), ("commands_digest", COMMANDS_DIGEST_HEX)):
            value = getattr(self, name)
            if not isinstance(value, str) or len(value) != size or not _HEX_RE.fullmatch(value):
                raise AnnounceFormatError(f"note {self.rollout_id}: {name} must be {size} hex characters")
        for name, top in (("commands", MAX_COMMANDS), ("wave", MAX_WAVES), ("first_wave", MAX_WAVES)):
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value <= top:
                raise AnnounceFormatError(f"note {self.rollout_id}: {name} {value!r} is not 0..{top}")
        checks = (
            (self.state, RolloutState, True),
            (self.serving, Serving, False),
            (self.skip, SkipKind, True),
            (self.verdict, GateOutcome, True),
        )
        for value, kind, optional in checks:
            if not (isinstance(value, kind) or (optional and value is None)):
                raise AnnounceFormatError(f"note {self.rollout_id}: {value!r} is not a {kind.__name__}")
        if (
            not isinstance(self.evidence, tuple)
            or len(self.evidence) > MAX_EVIDENCE
            or not all(isinstance(e, WaveEvidence) for e in self.evidence)
        ):
            raise AnnounceFormatError(f"note {self.rollout_id}: at most {MAX_EVIDENCE} evidence entries")
        if self.population is not None and (
            type(self.population) is not int or not 0 <= self.population <= MAX_SITE_POPULATION
        ):
            raise AnnounceFormatError(
                f"note {self.rollout_id}: population {self.population!r} is out of range"
            )

    def matches(self, plan_digest: str) -> bool:
        """Is this note about the plan with (full) digest `plan_digest`?"""
        return plan_digest.startswith(self.plan_digest)


def encode_notes(notes: Sequence[RolloutNote], limit_bytes: int = MAX_ANNOUNCE_BYTES) -> bytes:
    """The canonical blob of the first of `notes` (in the caller's order of importance) that fit in
    `limit_bytes`; b"" when there is nothing to say. A rollout id given twice keeps its first note.
    Codec version 2 (notes with their populations) only where a note kept has one."""
    blob, kept = _pack(notes, limit_bytes, with_population=True)
    if not any(note.population is not None for note in kept):
        blob, _ = _pack(notes, limit_bytes, with_population=False)
    return blob


def _pack(
    notes: Sequence[RolloutNote], limit_bytes: int, *, with_population: bool
) -> tuple[bytes, list[RolloutNote]]:
    kept: dict[str, tuple[bytes, RolloutNote]] = {}
    size = 2
    for note in notes[:MAX_NOTES]:
        if note.rollout_id in kept:
            continue
        entry = _encode_note(note, with_population=with_population)
        if size + len(entry) > min(limit_bytes, MAX_ANNOUNCE_BYTES):
            continue
        kept[note.rollout_id] = (entry, note)
        size += len(entry)
    if not kept:
        return b"", []
    out = bytearray([2 if with_population else 1])
    _put_varint(out, len(kept))
    for rollout_id in sorted(kept):
        out += kept[rollout_id][0]
    return bytes(out), [note for _, note in kept.values()]


def decode_notes(data: object) -> tuple[RolloutNote, ...]:
    """Parse a peer's blob strictly (sorted by rollout id); any problem raises AnnounceFormatError."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise AnnounceFormatError(f"rollout notes: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        return ()
    if len(data) > MAX_ANNOUNCE_BYTES:
        raise AnnounceFormatError(f"rollout notes are {len(data)} bytes, at most {MAX_ANNOUNCE_BYTES}")
    reader = _Reader(data)
    version = reader.byte()
    if version not in ANNOUNCE_CODEC_VERSIONS:
        raise AnnounceFormatError(
            f"rollout notes codec {version} is not known (this node reads "
            f"{', '.join(map(str, ANNOUNCE_CODEC_VERSIONS))}); upgrade the node"
        )
    count = reader.varint()
    if not 1 <= count <= MAX_NOTES:
        raise AnnounceFormatError(f"rollout notes: {count} notes, expected 1 to {MAX_NOTES}")
    notes = []
    try:
        for _ in range(count):
            notes.append(_decode_note(reader, with_population=version == 2))
    except HealthFormatError as exc:
        raise AnnounceFormatError(f"rollout notes: {exc}") from None
    if not reader.done:
        raise AnnounceFormatError(f"rollout notes: {len(data) - reader.offset} bytes after the last note")
    ids = [n.rollout_id for n in notes]
    if version == 2 and all(n.population is None for n in notes):
        raise AnnounceFormatError("rollout notes are not in canonical form (codec 2 without a population)")
    if ids != sorted(set(ids)):
        raise AnnounceFormatError("rollout notes are not in canonical form (out of order or repeated)")
    return tuple(notes)


def _encode_note(note: RolloutNote, *, with_population: bool = False) -> bytes:
    out = bytearray()
    _put_text(out, note.rollout_id)
    out += bytes.fromhex(note.plan_digest)
    _put_varint(out, note.commands)
    out += bytes.fromhex(note.commands_digest)
    out.append(0 if note.state is None else 1 + _STATES.index(note.state))
    _put_varint(out, note.wave)
    _put_varint(out, note.first_wave)
    out.append(_SERVING.index(note.serving))
    out.append(0 if note.skip is None else 1 + _SKIPS.index(note.skip))
    out.append(0 if note.verdict is None else 1 + _OUTCOMES.index(note.verdict))
    out.append(len(note.evidence))
    for e in note.evidence:
        for value in (
            e.wave,
            *e.measured.to_list(),
            *e.soaked.to_list(),
            e.activation_failures,
            e.unreachable,
        ):
            _put_varint(out, value)
    if with_population:
        _put_varint(out, 0 if note.population is None else 1 + note.population)
    return bytes(out)


def _decode_note(r: _Reader, *, with_population: bool = False) -> RolloutNote:
    rollout_id = r.text()
    plan_digest = r.raw(PLAN_DIGEST_HEX // 2).hex()
    commands = r.varint()
    digest = r.raw(COMMANDS_DIGEST_HEX // 2).hex()
    state = r.choice(_STATES, "state", optional=True)
    wave, first_wave = r.varint(), r.varint()
    serving = r.choice(_SERVING, "serving", optional=False)
    skip = r.choice(_SKIPS, "skip", optional=True)
    verdict = r.choice(_OUTCOMES, "verdict", optional=True)
    evidence = []
    count = r.byte()
    if count > MAX_EVIDENCE:
        raise AnnounceFormatError(
            f"rollout note {rollout_id}: {count} evidence entries, at most {MAX_EVIDENCE}"
        )
    for _ in range(count):
        wave_e = r.varint()
        measured = Totals.from_list([r.varint() for _ in range(3)], "evidence.measured")
        soaked = Totals.from_list([r.varint() for _ in range(3)], "evidence.soaked")
        evidence.append(WaveEvidence(wave_e, measured, soaked, r.varint(), r.varint()))
    population = r.varint() - 1 if with_population else -1
    return RolloutNote(
        rollout_id,
        plan_digest,
        commands,
        digest,
        state,
        wave,
        first_wave,
        serving,
        skip,
        verdict,
        tuple(evidence),
        None if population < 0 else population,
    )


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
    out += raw


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0

    @property
    def done(self) -> bool:
        return self.offset == len(self.data)

    def raw(self, size: int) -> bytes:
        if self.offset + size > len(self.data):
            raise AnnounceFormatError("rollout notes: truncated")
        chunk = self.data[self.offset : self.offset + size]
        self.offset += size
        return chunk

    def byte(self) -> int:
        return self.raw(1)[0]

    def varint(self) -> int:
        value, shift = 0, 0
        while True:
            b = self.byte()
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                if b == 0 and shift:
                    raise AnnounceFormatError("rollout notes are not in canonical form (a padded number)")
                break
            shift += 7
            if shift > 63:
                raise AnnounceFormatError("rollout notes: a number is longer than 64 bits")
        if value > MAX_COUNT:
            raise AnnounceFormatError(f"rollout notes: a count of {value} is out of range")
        return value

    def text(self) -> str:
        length = self.varint()
        if length > 64:
            raise AnnounceFormatError(f"rollout notes: a name of {length} bytes (at most 64)")
        try:
            return self.raw(length).decode("utf-8")
        except UnicodeDecodeError:
            raise AnnounceFormatError("rollout notes: a name is not UTF-8") from None

    @overload
    def choice(self, options: tuple[_T, ...], what: str, *, optional: Literal[False]) -> _T: ...

    @overload
    def choice(self, options: tuple[_T, ...], what: str, *, optional: Literal[True]) -> _T | None: ...

    def choice(self, options: tuple[_T, ...], what: str, *, optional: bool) -> _T | None:
        code = self.byte()
        if optional:
            if code == 0:
                return None
            code -= 1
        if code >= len(options):
            raise AnnounceFormatError(f"rollout notes: unknown {what} code {code}")
        return options[code]
