"""What a run has done so far: the loss history, the validation entries and the running totals
(samples, tokens, regret work, skipped steps). It goes into every checkpoint manifest, comes back
with ``--resume`` and a recovery, and is what report.json sums up."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def _zero_totals() -> dict[str, Any]:
    return {
        "samples": 0,
        "tokens": 0,
        "regret_computations": 0,
        "bentham_evaluations": 0,
        "skipped_steps": 0,
        "step_seconds": 0.0,
    }


@dataclass
class RunTally:
    history: list[dict[str, Any]] = field(default_factory=list)
    validation: list[dict[str, Any]] = field(default_factory=list)
    totals: dict[str, Any] = field(default_factory=_zero_totals)
    regret_sum: float = 0.0
    regret_n: int = 0  # steps that computed regrets

    def record(self, outcome) -> None:
        """Add one optimizer step's outcome (a StepOutcome)."""
        self.totals["samples"] += outcome.samples
        self.totals["tokens"] += outcome.tokens
        self.totals["regret_computations"] += outcome.regret_computations
        self.totals["bentham_evaluations"] += outcome.bentham_evaluations
        self.totals["skipped_steps"] += int(outcome.skipped)
        self.totals["step_seconds"] += outcome.seconds
        if outcome.regret_computations:
            self.regret_sum += outcome.regret_mean
            self.regret_n += 1

    def regret_mean(self) -> float | None:
        """The mean regret target of the steps so far; None before any computed one."""
        return self.regret_sum / self.regret_n if self.regret_n else None

    def manifest_fields(self) -> dict[str, Any]:
        return {
            "history": self.history,
            "validation": self.validation,
            "totals": self.totals,
            "regret_sum": self.regret_sum,
            "regret_n": self.regret_n,
        }

    def load(self, manifest: dict[str, Any]) -> None:
        """Back to what a checkpoint's manifest says (totals missing from an older one stay)."""
        self.history = list(manifest.get("history", []))
        self.validation = list(manifest.get("validation", []))
        self.totals.update(manifest.get("totals", {}))
        self.regret_sum = float(manifest.get("regret_sum", 0.0))
        self.regret_n = int(manifest.get("regret_n", 0))
