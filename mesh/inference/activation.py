"""Which version of its model a node serves, and the shell that makes it so.

`choose_active` is the decision, pure: from the versions complete and verified on this
node, those that failed activation before, the active one and (when a rollout says so)
the version this device should serve, it returns the version to activate or None.
`Steering` is what the node's rollouts ask of it: follow a version, keep the active one
(never move to a newer one on its own), or activate nothing yet (while the site's
rollout state is not known after a restart); without rollouts, the newest version.

`Activator` is the shell: woken when a version completes or is collected (the
distributor's `on_complete`), never on a timer, it lists what the store holds, verifies
each candidate's manifest again (signature by a fleet publisher key), asks
`choose_active`, and activates through the runtime (load, hash, validation invoke, atomic
swap). A version that fails activation or verification is never retried; a transient
failure (a version collected while it was read) is retried with back-off.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import threading
import time
from collections.abc import Iterable, Set
from dataclasses import dataclass
from pathlib import Path

from mesh.artifacts.manifest import ArtifactError, Manifest, ManifestError, verify_manifest
from mesh.artifacts.store import ArtifactStore, version_order_key
from mesh.durable import write_file_atomic
from mesh.identity.signing import TrustedKeys
from mesh.inference import crashloop
from mesh.inference.crashloop import ActiveState
from mesh.inference.runtime import ActivationError, ModelRuntime
from mesh.retry import Backoff

log = logging.getLogger("mesh.inference.activation")

VersionKey = tuple[str, str]


@dataclass(frozen=True)
class Activate:
    """Make `version` of `model` the active one."""

    model: str
    version: str


@dataclass(frozen=True)
class Steering:
    """What the node's rollouts ask of its active version (the default: the newest version).

    `desired`: serve exactly this version once it is complete (a rollout's target, or the
    baseline to roll back to). Otherwise, with `keep`, keep the active version (a new one moves
    only by a rollout) and, when nothing is active yet, start with the newest version not in
    `blocked` (targets of rollouts that do not put this device on them). `wait`: activate
    nothing for now (the site's rollout state is not known yet after a restart).
    """

    desired: str | None = None
    keep: bool = False
    blocked: frozenset[str] = frozenset()
    wait: bool = False


def choose_active(model: str, complete: Iterable[str], *, refused: Set[str], active: str | None,
                  desired: str | None = None, keep: bool = False,
                  blocked: Set[str] = frozenset(), resume: str | None = None) -> Activate | None:
    """The version of `model` to activate now, or None to keep serving what is active.

    Without `desired`, the newest complete version that never failed here (and is not `blocked`);
    with `keep`, only when nothing is active. With `desired` (a rollout's verdict for this device:
    its target, or the baseline to roll back to), that version once it is complete and has not
    failed, and nothing else meanwhile (but a node that serves nothing serves the newest allowed
    version until the desired one is here). With `keep`, a node that serves nothing resumes the
    version it served before it stopped (`resume`), when that one is usable: a restart must not
    move a device to a version its site is not on.
    """
    usable = sorted((v for v in set(complete) if v not in refused), key=version_order_key)
    allowed = [v for v in usable if v not in blocked]
    if desired is not None and (desired in usable or active is not None):
        choice = desired if desired in usable else None
    elif keep and active is not None:
        choice = None
    elif keep and resume is not None and resume in allowed:
        choice = resume
    else:  # no rollout says otherwise, or nothing is served while the desired version is not here yet
        choice = allowed[-1] if allowed else None
    if choice is None or choice == active:
        return None
    return Activate(model, choice)


class Activator:
    """Keeps the runtime serving what `choose_active` says, on events."""

    def __init__(self, *, model: str, store: ArtifactStore, trusted: TrustedKeys, runtime: ModelRuntime,
                 rng: random.Random, steering: Steering | None = None,
                 state_path: Path | None = None) -> None:
        """`steering`: what to do until a rollout says otherwise (`steer`); default the newest version.
        `state_path`: where the version served last is kept across restarts (see `choose_active`), with
        what the node needs to notice a crash loop on a new version (`mesh.inference.crashloop`)."""
        self.model = model
        self._state_path = state_path
        self._save_lock = threading.Lock()
        self._saves = 0  # sequence of state snapshots handed to writers
        self._saved = 0  # the newest snapshot written: an older one in flight is dropped
        self._state, given_up = crashloop.after_restart(self._read_state())
        if given_up is not None:
            log.error("refusing %s %s: the node stopped without a clean shutdown %d times while that version "
                      "was new here (less than %.0f s of serving in a run); serving what it replaced",
                      model, given_up, crashloop.CRASH_LIMIT, crashloop.STABLE_AFTER_S)
        if state_path is not None and self._state.live is None:
            self._save_now(self._state)
        self._resume = self._state.version
        self._stable_timer: asyncio.TimerHandle | None = None
        self._steering = steering or Steering()
        self._store = store
        self._trusted = trusted
        self._runtime = runtime
        self._wake = asyncio.Event()
        self._wake.set()  # look once at start: versions may already be on disk
        self._refused: set[str] = set(self._state.refused)
        self._verified: dict[tuple[str, str], Manifest] = {}  # (version, manifest digest) -> manifest
        self._backoff = Backoff(first_s=0.5, max_s=10.0, rng=rng)
        self._retry: asyncio.TimerHandle | None = None
        # Versions activated here, oldest first (for rollout status and counters): (monotonic time, version).
        self.history: collections.deque[tuple[float, str]] = collections.deque(maxlen=64)

    @property
    def refused(self) -> frozenset[str]:
        """Versions of the model that failed verification or activation here (never retried)."""
        return frozenset(self._refused)

    def poke(self, name: str = "", version: str = "") -> None:
        """A version completed or was removed (distributor hook): look again."""
        self._wake.set()

    @property
    def steering(self) -> Steering:
        return self._steering

    def steer(self, steering: Steering) -> None:
        """What the node's rollouts ask now (the rollout shell calls this); looks again if it changed."""
        if steering != self._steering:
            self._steering = steering
            self._wake.set()

    def pinned(self) -> Set[VersionKey]:
        """The active and previous versions: never collected while they are needed for rollback."""
        out = set()
        for info in (self._runtime.active, self._runtime.previous):
            if info is not None:
                out.add((info.name, info.version))
        return out

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._activate_once()
            except Exception:  # never let one bad round stop serving; the runtime keeps its model
                log.exception("activation check failed")

    def close(self) -> None:
        """Stop retrying, and record that this run stopped cleanly (not a crash on its version)."""
        if self._retry is not None:
            self._retry.cancel()
        if self._stable_timer is not None:
            self._stable_timer.cancel()
        self._state = crashloop.clean_stop(self._state)
        self._save_now(self._state)

    async def _activate_once(self) -> None:
        complete, transient = await asyncio.to_thread(self._complete_versions)
        if transient:
            delay_s = self._backoff.next_delay_s()
            self._retry = asyncio.get_running_loop().call_later(delay_s, self._wake.set)
        active = self._runtime.active
        steering = self._steering
        if steering.wait:
            return
        serving = active.version if active is not None and active.name == self.model else None
        choice = choose_active(self.model, complete, refused=self._refused, active=serving,
                               desired=steering.desired, keep=steering.keep, blocked=steering.blocked,
                               resume=self._resume)
        if choice is None:
            return
        manifest = complete[choice.version]
        # Live on the new version before touching it: if the process dies from here on, the next run
        # counts a crash on it (a crash inside the interpreter's load is the likeliest of all).
        await self._save(crashloop.activating(self._state, choice.version, serving))
        try:
            await asyncio.to_thread(self._runtime.activate, manifest.name, manifest.version,
                                    self._store.complete_model_path(manifest), manifest.signature,
                                    sha256=manifest.sha256)
        except ActivationError as exc:
            await self._save(crashloop.clean_stop(self._state) if serving is None
                             else crashloop.activated(self._state, serving))
            self._refused.add(choice.version)
            log.error("refused to activate %s %s (%s); still serving %s", manifest.name, manifest.version,
                      exc, f"{active.name} {active.version}" if active else "nothing")
            return
        except (FileNotFoundError, ArtifactError, OSError) as exc:  # collected or unreadable meanwhile
            await self._save(crashloop.clean_stop(self._state) if serving is None
                             else crashloop.activated(self._state, serving))
            log.info("could not activate %s %s this round: %s", manifest.name, manifest.version, exc)
            self._retry = asyncio.get_running_loop().call_later(self._backoff.next_delay_s(), self._wake.set)
            return
        self.history.append((time.monotonic(), manifest.version))
        self._backoff.reset()
        self._resume = manifest.version
        await self._save(crashloop.activated(self._state, manifest.version))
        if self._stable_timer is not None:
            self._stable_timer.cancel()
        self._stable_timer = asyncio.get_running_loop().call_later(
            crashloop.STABLE_AFTER_S, self._served_long_enough, manifest.version)

    def _served_long_enough(self, version: str) -> None:
        active = self._runtime.active
        if active is not None and active.version == version and self._state.trial is not None:
            asyncio.get_running_loop().create_task(self._save(crashloop.stable(self._state, version)))

    def _read_state(self) -> ActiveState:
        if self._state_path is None:
            return ActiveState(self.model)
        try:
            data = self._state_path.read_bytes()
        except OSError:
            return ActiveState(self.model)
        return ActiveState.from_json(data, self.model)

    async def _save(self, state: ActiveState) -> None:
        """Make `state` the node's state and write it (in a thread); a write failure is logged, and
        serving goes on (only a restart or a crash count would miss it)."""
        self._state = state
        if self._state_path is not None:
            await asyncio.to_thread(self._write, state.to_json(), self._next_seq())

    def _save_now(self, state: ActiveState) -> None:
        if self._state_path is not None:
            self._write(state.to_json(), self._next_seq())

    def _next_seq(self) -> int:
        with self._save_lock:
            self._saves += 1
            return self._saves

    def _write(self, data: bytes, seq: int) -> None:
        """Write one snapshot; writes are serialised, and one older than the last written is dropped
        (a write still in its thread when the node stops must not undo the clean stop)."""
        assert self._state_path is not None
        with self._save_lock:
            if seq < self._saved:
                return
            try:
                write_file_atomic(self._state_path, data, 0o644)
            except OSError as exc:
                log.warning("could not record the active version in %s: %s", self._state_path, exc)
                return
            self._saved = seq

    def _complete_versions(self) -> tuple[dict[str, Manifest], bool]:
        """Blocking (directory listing, manifest reads, signature checks): run it in a thread.
        Returns the complete, verified versions of the model, and whether any was skipped for a
        reason that may pass (I/O, a version being collected)."""
        out: dict[str, Manifest] = {}
        transient = False
        for name, version in self._store.stored_versions():
            if name != self.model or version in self._refused:
                continue
            try:
                signed = self._store.load_manifest(name, version)
                key = (version, signed.digest)
                manifest = self._verified.get(key)
                if manifest is None:
                    manifest = verify_manifest(signed, self._trusted)  # again, at activation
                    self._verified[key] = manifest
            except ManifestError as exc:  # bad for good: never activate it
                log.warning("not activating %s %s: %s", name, version, exc)
                self._refused.add(version)
                continue
            except (FileNotFoundError, ArtifactError, OSError) as exc:
                log.info("skipping %s %s this round: %s", name, version, exc)
                transient = True
                continue
            if self._store.is_complete(manifest):
                out[version] = manifest
        return out, transient
