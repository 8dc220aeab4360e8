"""Rounds-to-best and rounds-to-target, chosen on validation only (no peeking at test)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class BestTracker:
    target: float | None = None
    higher_is_better: bool = True
    best_val: float | None = None
    best_round: int | None = None
    test_at_best: float | None = None
    rounds_to_target: int | None = None

    def update(self, round_: int, val: float, test: float | None) -> None:
        better = self.best_val is None or (val > self.best_val if self.higher_is_better else val < self.best_val)
        if better:  # strict: the FIRST round that reaches the maximum keeps it
            self.best_val, self.best_round, self.test_at_best = val, round_, test
        if self.rounds_to_target is None and self.target is not None:
            hit = val >= self.target if self.higher_is_better else val <= self.target
            if hit:
                self.rounds_to_target = round_

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)
