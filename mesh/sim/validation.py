"""The model-versus-cores comparison every `mesh sim ... validate` row makes, once."""

from __future__ import annotations

from typing import Any, ClassVar


class ModelVsCores:
    """A row of figures measured both by the pure cores (`cores`) and by the fast model (`model`);
    subclasses name their `FIGURES` and are dataclasses with `devices`, `sites`, `cores`, `model`."""

    FIGURES: ClassVar[tuple[str, ...]] = ()
    devices: int
    sites: int
    cores: dict[str, float]
    model: dict[str, float]

    def error(self, figure: str) -> float:
        """The model's relative error on `figure` (0 when the cores measured 0)."""
        return self.model[figure] / self.cores[figure] - 1 if self.cores[figure] else 0.0

    @property
    def worst_error(self) -> float:
        return max(abs(self.error(f)) for f in self.FIGURES)

    def figures_json(self, digits: int) -> dict[str, Any]:
        out: dict[str, Any] = {"devices": self.devices, "sites": self.sites}
        for f in self.FIGURES:
            out[f"cores_{f}"] = round(self.cores[f], digits)
            out[f"model_{f}"] = round(self.model[f], digits)
            out[f"{f}_error"] = round(self.error(f), 3)
        return out
