"""Who takes part in a round: availability, the sampled cohort, dropouts and stragglers.

`Federation.plan(round)` is a pure function of the run's seed, the round and the config (every draw
from its own seeded stream), so the executors agree, the ranks of a multi-process run agree and a
resumed run replays exactly; the participation record (`record`) is rebuilt from the same plans.

A round: the available clients (the availability model, never a held-out client) -> K of them sampled
uniformly (K = round(participation x the clients that may train), fewer when fewer are available) ->
each sampled client receives the model (downlink counted); with probability `dropout.rate` its update
never arrives (uplink not counted, not aggregated, its client state unchanged: it is as if it had
never trained); with probability `straggler.rate` it completes only a fraction ~ U(min_fraction,
max_fraction) of its local steps (at least one) and the server aggregates what it sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fedbench.config import GroupConfig, spec
from fedbench.data.availability import Availability
from fedbench.errors import ConfigError

_COHORT, _DROPOUT, _STRAGGLER = 0xC0407, 0xD809, 0x5769  # stream tags (the cohort's is fedbench's original)


@dataclass(frozen=True)
class DropoutConfig(GroupConfig):
    rate: float = spec(0.0, ge=0, lt=1)          # P(a sampled client's update never arrives), per round


@dataclass(frozen=True)
class StragglerConfig(GroupConfig):
    rate: float = spec(0.0, ge=0, le=1)          # P(a sampled client is a straggler), per round
    min_fraction: float = spec(0.1, gt=0, le=1)  # a straggler completes U(min, max) of its local steps
    max_fraction: float = spec(0.9, gt=0, le=1)

    def __post_init__(self) -> None:
        if self.min_fraction > self.max_fraction:
            raise ConfigError(f"straggler.min_fraction={self.min_fraction} exceeds straggler.max_fraction="
                              f"{self.max_fraction}")


def departure(cfg: Any) -> str | None:
    """What makes a run's federation differ from the idealised one (everyone available, nobody held
    out, drops or straggles), as `key=value`; None for the idealised one."""
    checks = (("availability", str(cfg.availability.name), "always"),
              ("partition.holdout_clients", float(cfg.partition.get("holdout_clients") or 0.0), 0.0),
              ("dropout.rate", float(cfg.dropout.rate), 0.0), ("straggler.rate", float(cfg.straggler.rate), 0.0))
    return next((f"{key}={value}" for key, value, ideal in checks if value != ideal), None)


@dataclass(frozen=True)
class RoundPlan:
    round: int
    available: np.ndarray      # [N] bool
    sampled: np.ndarray        # sorted ids that received the model
    cohort: np.ndarray         # sorted ids whose update arrives (sampled minus dropped)
    step_fraction: np.ndarray  # [len(cohort)] share of its local steps each completes (1.0: all)

    @property
    def dropped(self) -> np.ndarray:
        return np.setdiff1d(self.sampled, self.cohort)

    @property
    def stragglers(self) -> np.ndarray:
        return self.cohort[self.step_fraction < 1.0]


class Federation:
    """The run's population: availability, held-out clients, participation, dropouts, stragglers."""

    def __init__(self, n_clients: int, participation: float, seed: int, availability: Availability,
                 holdout: np.ndarray, dropout: DropoutConfig, straggler: StragglerConfig):
        self.n, self.participation, self.seed = int(n_clients), float(participation), int(seed)
        self.availability, self.dropout, self.straggler = availability, dropout, straggler
        self.holdout = np.asarray(holdout, dtype=np.int64)
        self.trainable = np.ones(self.n, dtype=bool)
        self.trainable[self.holdout] = False
        if not self.trainable.any():
            raise ConfigError("partition.holdout_clients leaves no client to train; lower it")

    @property
    def eligible(self) -> int:
        """Clients that may ever train (N minus the held-out ones)."""
        return int(self.trainable.sum())

    @property
    def cohort_size(self) -> int:
        """K: the cohort when enough clients are available."""
        return min(self.eligible, max(1, int(round(self.participation * self.eligible))))

    def plan(self, round_: int) -> RoundPlan:
        r = int(round_)
        available = self.availability.mask(r) & self.trainable
        ids = np.flatnonzero(available)
        rng = np.random.default_rng([self.seed, r, _COHORT])
        # with everyone available this is fedbench's original draw, bit for bit
        sampled = np.sort(rng.choice(ids, size=min(self.cohort_size, len(ids)), replace=False))
        arrives = np.random.default_rng([self.seed, r, _DROPOUT]).random(len(sampled)) >= self.dropout.rate
        s = self.straggler
        rng_s = np.random.default_rng([self.seed, r, _STRAGGLER])
        straggles = rng_s.random(len(sampled)) < s.rate
        fraction = np.where(straggles, rng_s.uniform(s.min_fraction, s.max_fraction, len(sampled)), 1.0)
        return RoundPlan(r, available, sampled, sampled[arrives], fraction[arrives])

    def record(self, rounds_done: int) -> dict[str, list[int]]:
        """Per client, over rounds 1..rounds_done: rounds available, sampled, dropped, straggled."""
        counts = {key: np.zeros(self.n, dtype=np.int64) for key in ("available", "sampled", "dropped",
                                                                     "straggled")}
        for r in range(1, int(rounds_done) + 1):
            p = self.plan(r)
            counts["available"] += p.available
            for key, ids in (("sampled", p.sampled), ("dropped", p.dropped), ("straggled", p.stragglers)):
                counts[key][ids] += 1
        return {key: v.tolist() for key, v in counts.items()}
