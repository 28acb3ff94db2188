"""Crash loops on a new version, counted across restarts by the device itself. Pure.

A version that kills the node process (a segfault in the interpreter on its ops, the OOM killer, a
watchdog reboot) leaves no error in the health counters: they restart from zero with each run, so
the rollout's gate sees the device only as silent for a while. A few silent devices in a large
cohort can let such a wave pass. The device therefore remembers, in the file that already holds the
version it served last (`active-model.json`), whether its last run stopped cleanly:

- before activating a version, the node writes that it is `live` on that version;
- a clean stop (`NodeRuntime.stop`) clears `live`;
- at start, a `live` version means the last run died on it (or while activating it).

A version is *on trial* from when it replaces another active version until it has served
`STABLE_AFTER_S` in one run. Each run that dies on a version on trial counts one crash. At
`CRASH_LIMIT` crashes the node refuses the version for good (kept in the file), falls back
to what it served before, and reports the refusal like any failed activation: the rollout's
gate fails the wave ("failed to activate") and the site rolls back.

Only a version on trial is ever refused this way: a device that loses power while serving a
version it has run for a while, or the only version it has, keeps serving it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

CRASH_LIMIT = 3
STABLE_AFTER_S = 600.0
MAX_REFUSED = 64  # the oldest crash-refused versions are forgotten beyond this


@dataclass(frozen=True)
class Trial:
    """`version` replaced `previous` and has not yet served `STABLE_AFTER_S` in one run."""

    version: str
    previous: str
    crashes: int = 0


@dataclass(frozen=True)
class ActiveState:
    """What `active-model.json` holds about the node's model."""

    model: str
    version: str | None = None  # the version served last: resumed after a restart
    live: str | None = None  # active or being activated in a run that has not stopped cleanly
    trial: Trial | None = None
    refused: tuple[str, ...] = ()  # versions given up after crash loops, oldest first

    def to_json(self) -> bytes:
        doc: dict[str, Any] = {"model": self.model, "version": self.version, "live": self.live}
        if self.trial is not None:
            doc["trial"] = {
                "version": self.trial.version,
                "previous": self.trial.previous,
                "crashes": self.trial.crashes,
            }
        if self.refused:
            doc["crash_refused"] = list(self.refused)
        return json.dumps(doc, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, model: str) -> ActiveState:
        """The state of `model` in `data`; a fresh state when the file is of another model or does not
        parse (an older node wrote only model and version: that reads as a run that stopped cleanly)."""
        try:
            doc = json.loads(data)
        except ValueError:
            return cls(model)
        if not isinstance(doc, dict) or doc.get("model") != model:
            return cls(model)
        trial = None
        raw = doc.get("trial")
        if (
            isinstance(raw, dict)
            and isinstance(raw.get("version"), str)
            and isinstance(raw.get("previous"), str)
            and type(raw.get("crashes")) is int
            and raw["crashes"] >= 0
        ):
            trial = Trial(raw["version"], raw["previous"], raw["crashes"])
        refused = doc.get("crash_refused")
        return cls(
            model,
            version=_text(doc.get("version")),
            live=_text(doc.get("live")),
            trial=trial,
            refused=tuple(v for v in refused if isinstance(v, str))[-MAX_REFUSED:]
            if isinstance(refused, list)
            else (),
        )


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def after_restart(state: ActiveState) -> tuple[ActiveState, str | None]:
    """The state at the start of a run, and the version refused now because the last run was its
    `CRASH_LIMIT`-th to die on it while on trial (None when nothing is refused now)."""
    if state.live is None:
        return state, None
    trial = state.trial
    if trial is None or trial.version != state.live:
        return replace(state, live=None), None  # it died on a version that is not on trial
    trial = replace(trial, crashes=trial.crashes + 1)
    if trial.crashes < CRASH_LIMIT:
        return replace(state, live=None, trial=trial), None
    refused = tuple(v for v in state.refused if v != trial.version) + (trial.version,)
    return replace(state, live=None, trial=None, refused=refused[-MAX_REFUSED:]), trial.version


def activating(state: ActiveState, version: str, active: str | None) -> ActiveState:
    """About to activate `version` while `active` serves: the run is live on `version` from now on.
    Replacing another active version puts `version` on trial. A version already on trial keeps its
    count (the node restarted and takes it up again); going back to the version a trial replaced (a
    rollback) ends the trial and starts none."""
    trial = state.trial
    if trial is not None and trial.version == version:
        pass
    elif trial is not None and trial.previous == version:
        trial = None
    elif active is not None and active != version:
        trial = Trial(version, active)
    return replace(state, live=version, trial=trial)


def activated(state: ActiveState, version: str) -> ActiveState:
    return replace(state, version=version, live=version)


def stable(state: ActiveState, version: str) -> ActiveState:
    """`version` served `STABLE_AFTER_S` in this run: it is off trial."""
    if state.trial is not None and state.trial.version == version:
        return replace(state, trial=None)
    return state


def clean_stop(state: ActiveState) -> ActiveState:
    return replace(state, live=None)
