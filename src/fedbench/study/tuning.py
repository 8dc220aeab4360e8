"""The tuner: Optuna's ask/tell, rebuilt from the trials on disk before every batch of asks.

Rebuilding (instead of keeping an Optuna storage) makes a resumed study ask exactly what an
uninterrupted one asks: a batch's trials depend only on the trials before it and on a sampler seeded
by (study seed, setting, method, batch). The tuner is told the VALIDATION view of each trial's runs
(`validation_view`: every key that names a test split removed) and nothing else."""

from __future__ import annotations

import math
import re
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Any

from fedbench.metrics import names
from fedbench.study.spec import Param

# a key naming a test split: global/test_acc, best/test_acc, personal/test_acc_std,
# final/test_loss, ...
TEST_KEY = re.compile(r"(^|/)(test_|[a-z_]*_test_)|unseen/")


def validation_view(summary: dict[str, Any]) -> dict[str, Any]:
    """The part of a run's summary a tuner may see: no test metric, ever."""
    return {k: v for k, v in summary.items() if not TEST_KEY.search(k)}


def objective_of(summary: dict[str, Any]) -> float | None:
    """The run's best validation score (accuracy, R^2, or the clients' own models' accuracy)."""
    for key in names.BEST_VALIDATION_KEYS:
        if summary.get(key) is not None:
            return float(summary[key])
    return None


@dataclass
class TrialResult:
    """What the tuner learns of a trial: per tuning seed its run's validation view and status."""

    number: int
    params: dict[str, Any]
    runs: dict[int, dict[str, Any]] = field(
        default_factory=dict
    )  # seed -> validation view of the summary

    @property
    def failures(self) -> dict[int, str]:
        """seed -> how its run ended, for the runs that did not complete."""
        return {
            s: f"{r.get('status', 'missing')}: {r.get('reason', '')}".rstrip(": ")
            for s, r in self.runs.items()
            if r.get("status") != "completed"
        }

    @property
    def objective(self) -> float | None:
        """The mean over the tuning seeds of the best validation score; None when a run did not
        complete (a trial is judged on all its seeds or not at all)."""
        if not self.runs or self.failures:
            return None
        values = [objective_of(r) for r in self.runs.values()]
        if any(v is None or not math.isfinite(v) for v in values):
            return None
        return sum(values) / len(values)


def _optuna():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # create_trial / add_trial are stable in use but flagged experimental in Optuna 2
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def _suggest(trial: Any, space: tuple[Param, ...]) -> dict[str, Any]:
    out = {}
    for p in space:
        if p.kind == "categorical":
            out[p.key] = trial.suggest_categorical(p.key, list(p.choices))
        elif p.kind == "int":
            out[p.key] = trial.suggest_int(p.key, int(p.low), int(p.high), log=p.log)
        else:
            out[p.key] = trial.suggest_float(p.key, float(p.low), float(p.high), log=p.log)
    return out


def distributions(space: tuple[Param, ...]) -> dict[str, Any]:
    """Optuna's distribution objects of a space (built by Optuna itself: the same code for Optuna 2
    and later versions, whose distribution classes differ)."""
    optuna = _optuna()
    trial = optuna.create_study().ask()
    _suggest(trial, space)
    return dict(trial.distributions)


def sampler_seed(seed: int, setting: str, method: str, batch: int) -> int:
    return (seed * 1_000_003 + zlib.crc32(f"{setting}/{method}/{batch}".encode())) % (2**31 - 1)


class Tuner:
    """Asks a batch of trials given the finished ones (maximising the objective)."""

    def __init__(self, method: str, space: tuple[Param, ...], sampler: str, startup_trials: int):
        self.method, self.space, self.sampler, self.startup_trials = (
            method,
            space,
            sampler,
            startup_trials,
        )
        self.history: list[TrialResult] = []

    def tell(self, result: TrialResult) -> None:
        """Learn a finished trial (its validation view only)."""
        self.history.append(result)

    def ask(self, n: int, seed: int) -> list[dict[str, Any]]:
        if not self.space:  # nothing to tune: one configuration, the method's defaults
            return [{} for _ in range(n)]
        optuna = _optuna()
        sampler = (
            optuna.samplers.RandomSampler(seed=seed)
            if self.sampler == "random"
            else optuna.samplers.TPESampler(seed=seed, n_startup_trials=self.startup_trials)
        )
        study = optuna.create_study(direction="maximize", sampler=sampler)
        dists = distributions(self.space)
        state = optuna.trial.TrialState
        for r in self.history:
            value = r.objective
            study.add_trial(
                optuna.trial.create_trial(
                    params=r.params,
                    distributions=dists,
                    value=value,
                    state=state.COMPLETE if value is not None else state.FAIL,
                )
            )
        asked = []
        for _ in range(n):
            trial = study.ask()
            asked.append(_suggest(trial, self.space))
        return asked
