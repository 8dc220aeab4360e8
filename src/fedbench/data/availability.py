"""Which clients can be reached in a round: the `availability` config group.

Each model answers `mask(round)` ([N] bool) from the run's seed and the round alone, so every executor,
every worker of a multi-process run and a resumed run see the same clients. `expected()` is each
client's long-run probability of being available (what the statistics tests compare against).

- always     every client every round (fedbench's uniform sampling, bit for bit)
- bernoulli  client k is available with its own probability p_k, drawn once per run (heterogeneous
             participation): Beta with the given mean and concentration, lognormal around the mean, or
             the mean itself for everyone
- cyclic     clients in `blocks` groups, one group available at a time for `period` rounds, in turn
             (diurnal patterns; each client is available 1 / blocks of the time)
- markov     each client an on/off chain with geometric on and off spells of the given mean lengths,
             started from its stationary law (available mean_on / (mean_on + mean_off) of the time)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fedbench.config import GroupConfig, spec
from fedbench.errors import ConfigError
from fedbench.registry import register

_TAG = 0xA7A1  # the availability streams' own tag: independent of cohorts, batches and partitions


@dataclass(frozen=True)
class AvailabilityConfig(GroupConfig):
    name: str = ""
    seed: int | None = spec(None, ge=0)   # null: the run seed


@dataclass(frozen=True)
class BernoulliConfig(AvailabilityConfig):
    mean: float = spec(0.5, gt=0, le=1)         # mean participation probability over clients
    distribution: str = spec("beta", choices=("beta", "lognormal", "fixed"))
    concentration: float = spec(2.0, gt=0)      # beta: a + b (small = more heterogeneous)
    sigma: float = spec(1.0, gt=0)              # lognormal: sigma of log p (then capped at 1)
    min_probability: float = spec(0.01, ge=0, le=1)  # every client is reachable now and then

    def __post_init__(self) -> None:
        if self.min_probability > self.mean:
            raise ConfigError(f"availability.min_probability={self.min_probability}: must not exceed "
                              f"availability.mean={self.mean}")


@dataclass(frozen=True)
class CyclicConfig(AvailabilityConfig):
    blocks: int = spec(4, ge=1)                 # groups of clients, available in turn
    period: int = spec(1, ge=1)                 # rounds each group stays available
    assignment: str = spec("random", choices=("random", "contiguous"))  # client -> group


@dataclass(frozen=True)
class MarkovConfig(AvailabilityConfig):
    mean_on: float = spec(5.0, ge=1)            # mean length of an available spell, in rounds
    mean_off: float = spec(5.0, ge=1)           # mean length of an unavailable spell, in rounds


class Availability:
    """Base: `mask(round)` and `expected()`; `always` is the base itself."""

    def __init__(self, cfg: Any, n_clients: int, seed: int):
        self.cfg, self.n, self.seed = cfg, int(n_clients), int(seed)

    def mask(self, round_: int) -> np.ndarray:
        return np.ones(self.n, dtype=bool)

    def expected(self) -> np.ndarray:
        return np.ones(self.n)

    def rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *key, _TAG])


@register("availability", "always", config=AvailabilityConfig)
class Always(Availability):
    pass


@register("availability", "bernoulli", config=BernoulliConfig)
class Bernoulli(Availability):
    def __init__(self, cfg: BernoulliConfig, n_clients: int, seed: int):
        super().__init__(cfg, n_clients, seed)
        rng = self.rng(0)
        if cfg.distribution == "beta" and cfg.mean < 1:
            p = rng.beta(cfg.mean * cfg.concentration, (1 - cfg.mean) * cfg.concentration, self.n)
        elif cfg.distribution == "lognormal":
            # median scaled so that the mean of the uncapped law is `mean`
            p = cfg.mean * np.exp(rng.normal(-cfg.sigma ** 2 / 2, cfg.sigma, self.n))
        else:
            p = np.full(self.n, cfg.mean)
        self.p = np.clip(p, cfg.min_probability, 1.0)

    def mask(self, round_: int) -> np.ndarray:
        return self.rng(int(round_)).random(self.n) < self.p

    def expected(self) -> np.ndarray:
        return self.p.copy()


@register("availability", "cyclic", config=CyclicConfig)
class Cyclic(Availability):
    def __init__(self, cfg: CyclicConfig, n_clients: int, seed: int):
        super().__init__(cfg, n_clients, seed)
        if cfg.blocks > self.n:
            raise ConfigError(f"availability.blocks={cfg.blocks}: more groups than the {self.n} clients; "
                              f"use at most {self.n}")
        order = np.arange(self.n) if cfg.assignment == "contiguous" else self.rng(0).permutation(self.n)
        self.block = np.empty(self.n, dtype=np.int64)
        self.block[order] = np.arange(self.n) * cfg.blocks // self.n  # groups as equal as they can be

    def mask(self, round_: int) -> np.ndarray:
        return self.block == ((int(round_) - 1) // self.cfg.period) % self.cfg.blocks

    def expected(self) -> np.ndarray:
        return np.full(self.n, 1.0 / self.cfg.blocks)


@register("availability", "markov", config=MarkovConfig)
class Markov(Availability):
    """On -> off with probability 1 / mean_on per round, off -> on with 1 / mean_off; round r's
    transitions come from (seed, r), so the chain at round r is the same however it is reached."""

    KEEP = 4  # recent rounds kept: the loop asks for round r + 1's plan before it logs round r's

    def __init__(self, cfg: MarkovConfig, n_clients: int, seed: int):
        super().__init__(cfg, n_clients, seed)
        self.stationary = cfg.mean_on / (cfg.mean_on + cfg.mean_off)
        self.at, self.state = 0, np.zeros(self.n, dtype=bool)
        self.recent: dict[int, np.ndarray] = {}

    def mask(self, round_: int) -> np.ndarray:
        r = int(round_)
        if r in self.recent:
            return self.recent[r].copy()
        if r < self.at or self.at == 0:  # (re)start the chain at round 1
            self.at, self.state = 1, self.rng(0).random(self.n) < self.stationary
        while self.at < r:
            self.at += 1
            u = self.rng(self.at).random(self.n)
            self.state = np.where(self.state, u >= 1 / self.cfg.mean_on, u < 1 / self.cfg.mean_off)
        self.recent = {k: v for k, v in self.recent.items() if k > r - self.KEEP}
        self.recent[r] = self.state.copy()
        return self.state.copy()

    def expected(self) -> np.ndarray:
        return np.full(self.n, self.stationary)


def build_availability(cfg: Any, n_clients: int, run_seed: int) -> Availability:
    """The availability model of `cfg.availability` (a typed config or its composed node)."""
    from fedbench.config import typed_choice
    from fedbench.registry import lookup

    typed = typed_choice("availability", cfg)
    cls = lookup("availability", str(typed.name))
    return cls(typed, n_clients, run_seed if typed.seed is None else typed.seed)
