"""The study's table: per method x setting the mean test score over the final seeds with a 95%
t-interval, the chosen hyperparameters, the budget spent, rounds-to-best and bytes; the best method
per setting and the methods not significantly worse than it marked (one-sided paired t-test over
the seeds both completed, scipy.stats.ttest_rel)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from fedbench.metrics import names
from fedbench.study.phases import RunRecord
from fedbench.study.spec import StudySpec
from fedbench.study.tuning import TrialResult

# the test score of a run: the global model at its best-validation round, else the clients' own models
TEST_KEYS = (
    names.best_test("classification"),
    names.best_test("regression"),
    names.BEST_PERSONAL_TEST_ACC,
)
OWN_MODELS = names.PERSONAL_TEST_ACC  # each client's own model on its own test split (final round)


def test_score(summary: dict[str, Any]) -> tuple[str | None, float | None]:
    for key in TEST_KEYS:
        if summary.get(key) is not None:
            return key, float(summary[key])
    return None, None


def t_interval(values: list[float], level: float = 0.95) -> float | None:
    """Half-width of the t confidence interval of the mean (None below two values)."""
    from scipy import stats

    n = len(values)
    if n < 2:
        return None
    sd = float(np.std(values, ddof=1))
    return float(stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n))


def paired_p(best: dict[int, float], other: dict[int, float]) -> tuple[float | None, int]:
    """(p of the one-sided paired t-test 'best > other' over the seeds both have, pairs); p None
    below two pairs; 1.0 when the pairs do not differ at all."""
    from scipy import stats

    seeds = sorted(set(best) & set(other))
    if len(seeds) < 2:
        return None, len(seeds)
    a = np.array([best[s] for s in seeds])
    b = np.array([other[s] for s in seeds])
    if np.allclose(a - b, (a - b)[0]):  # constant differences: the t statistic is undefined
        return (0.0 if (a - b)[0] > 0 else 1.0), len(seeds)
    return float(stats.ttest_rel(a, b, alternative="greater").pvalue), len(seeds)


@dataclass
class Row:
    setting: str
    method: str
    metric: str | None
    n: int
    n_planned: int
    mean: float | None
    ci95: float | None
    std: float | None
    per_seed: dict[int, float]
    failed_seeds: dict[int, str]
    params: dict[str, Any]
    val_objective: float | None
    trials: int
    trials_failed: int
    tune_rounds: int
    tune_client_steps: int
    final_rounds: int
    final_client_steps: int
    rounds_to_best: float | None
    bytes_total: float | None
    own_models: float | None = None  # personal/test_acc: each client's own model (or the global
    own_models_ci95: float | None = None  # model on each client's split for a method without one)
    best: bool = False
    not_worse: bool = False
    p_value: float | None = None
    note: str = ""
    trial_objectives: list[float | None] = field(default_factory=list)


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def build_rows(
    spec: StudySpec,
    tuned: dict[str, dict[str, list[TrialResult]]],
    plans: dict[str, dict[str, Any]],
    finals: dict[str, dict[tuple[str, int], RunRecord]],
) -> list[Row]:
    rows: list[Row] = []
    for setting in spec.settings:
        for m in spec.methods:
            trials = tuned[setting.name][m.name]
            plan = plans[setting.name].get(m.name)
            runs = [finals[setting.name][(plan["file"], s)] for s in spec.seeds] if plan else []
            scores, failed, own = {}, {}, {}
            metric = None
            for r in runs:
                if r.status != "completed":
                    failed[r.seed] = f"{r.status}: {r.summary.get('reason', '')}".rstrip(": ")
                    continue
                key, value = test_score(r.summary)
                if value is None or not math.isfinite(value):
                    failed[r.seed] = "no test score"
                    continue
                metric, scores[r.seed] = key, value
                if r.summary.get(OWN_MODELS) is not None:
                    own[r.seed] = float(r.summary[OWN_MODELS])
            ok = [r for r in runs if r.seed in scores]
            values = list(scores.values())
            row = Row(
                setting=setting.name,
                method=m.name,
                metric=metric,
                n=len(values),
                n_planned=len(spec.seeds),
                mean=_mean(values),
                ci95=t_interval(values),
                std=float(np.std(values, ddof=1)) if len(values) > 1 else None,
                per_seed=scores,
                failed_seeds=failed,
                params=dict(plan["params"]) if plan else {},
                val_objective=plan["objective"] if plan else None,
                trials=len(trials),
                trials_failed=sum(t.objective is None for t in trials),
                tune_rounds=sum(
                    int(v.get("rounds_done") or 0) for t in trials for v in t.runs.values()
                ),
                tune_client_steps=sum(
                    int(v.get(names.CLIENT_STEPS_TOTAL) or 0)
                    for t in trials
                    for v in t.runs.values()
                ),
                final_rounds=sum(int(r.summary.get("rounds_done") or 0) for r in runs),
                final_client_steps=sum(
                    int(r.summary.get(names.CLIENT_STEPS_TOTAL) or 0) for r in runs
                ),
                rounds_to_best=_mean(
                    [
                        float(r.summary[names.BEST_ROUND])
                        for r in ok
                        if r.summary.get(names.BEST_ROUND) is not None
                    ]
                ),
                bytes_total=_mean(
                    [
                        float(r.summary[names.BYTES_TOTAL])
                        for r in ok
                        if r.summary.get(names.BYTES_TOTAL) is not None
                    ]
                ),
                own_models=_mean(list(own.values())),
                own_models_ci95=t_interval(list(own.values())),
                trial_objectives=[t.objective for t in trials],
            )
            if not plan:
                row.note = f"all {len(trials)} trials failed: no final runs"
            elif failed:
                row.note = f"mean over {len(values)} of {len(spec.seeds)} seeds ({len(failed)} did not complete)"
            rows.append(row)
    mark(rows, spec.alpha)
    return rows


def mark(rows: list[Row], alpha: float) -> None:
    """Per setting: the best mean, and every method whose paired test against it is not significant."""
    for setting in dict.fromkeys(r.setting for r in rows):
        group = [r for r in rows if r.setting == setting and r.mean is not None]
        if not group:
            continue
        best = max(group, key=lambda r: r.mean)
        best.best = True
        for r in group:
            if r is best:
                continue
            p, _ = paired_p(best.per_seed, r.per_seed)
            r.p_value = p
            r.not_worse = p is None or p >= alpha


def budget_check(spec: StudySpec, rows: list[Row]) -> dict[str, Any]:
    """The budget each method was given (equal by construction) and what each spent, per setting."""
    given = {
        "trials": spec.trials,
        "runs_per_trial": len(spec.tune_seeds),
        "rounds_per_run": spec.rounds,
        "tune_rounds": spec.trials * len(spec.tune_seeds) * spec.rounds,
        "final_runs": len(spec.seeds),
    }
    out: dict[str, Any] = {"given_per_method": given, "settings": {}}
    for setting in spec.settings:
        group = [r for r in rows if r.setting == setting.name]
        rounds = {r.method: r.tune_rounds for r in group}
        steps = {r.method: r.tune_client_steps for r in group}
        out["settings"][setting.name] = {
            "tune_rounds": rounds,
            "tune_client_steps": steps,
            "equal_rounds": len(set(rounds.values())) == 1,
            "equal_client_steps": len(set(steps.values())) == 1,
        }
    out["equal"] = all(
        s["equal_rounds"] and s["equal_client_steps"] for s in out["settings"].values()
    )
    return out


def noise_floor(rows: list[Row]) -> float | None:
    """The seed-to-seed spread of a repeated configuration: the median, over rows, of the standard
    deviation of the test score over the final seeds (each row repeats one configuration)."""
    spreads = [r.std for r in rows if r.std is not None]
    return float(np.median(spreads)) if spreads else None


def as_dicts(rows: list[Row]) -> list[dict[str, Any]]:
    return [
        {
            **asdict(r),
            "per_seed": {str(k): v for k, v in r.per_seed.items()},
            "failed_seeds": {str(k): v for k, v in r.failed_seeds.items()},
        }
        for r in rows
    ]


def _fmt(v: float | None, big: bool = False) -> str:
    if v is None:
        return "n/a"
    if big:
        return f"{v / 1e6:,.2f} MB" if v >= 1e5 else f"{v:,.0f} B"
    return f"{v:.4f}"


def _params(params: dict[str, Any]) -> str:
    return (
        ", ".join(
            f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
            for k, v in params.items()
        )
        or "defaults"
    )


def to_markdown(spec: StudySpec, rows: list[Row], budget: dict[str, Any]) -> str:
    metric = next((r.metric for r in rows if r.metric), "best/test_acc")
    has_own = any(r.own_models is not None for r in rows)
    lines = [
        f"# Study {spec.name}",
        "",
        f"Test score: `{metric}` (the test score at the round of the best validation score), mean ± "
        f"95% t-interval over the final seeds {list(spec.seeds)}; n = seeds that completed. Each "
        f"method was tuned on validation only (mean of the best validation score over tuning seeds "
        f"{list(spec.tune_seeds)}), then rerun at its best configuration.",
        "",
    ]
    head = ["setting", "method", "test (mean ± 95% CI)", "n"]
    if has_own:
        head.append("own models on own splits")
    head += [
        "hyperparameters",
        "val (tuning)",
        "trials (failed)",
        "tune rounds",
        "tune client-steps",
        "rounds-to-best",
        "bytes total",
    ]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for r in rows:
        if r.mean is None:
            cell = "—"
        else:
            cell = _fmt(r.mean) + (f" ± {r.ci95:.4f}" if r.ci95 is not None else "")
            cell = f"**{cell}**" if r.best else cell + (" ≈" if r.not_worse else "")
        n = f"{r.n}" if r.n == r.n_planned else f"{r.n} of {r.n_planned}"
        cells = [r.setting, r.method, cell, n]
        if has_own:
            cells.append(
                "n/a"
                if r.own_models is None
                else _fmt(r.own_models)
                + (f" ± {r.own_models_ci95:.4f}" if r.own_models_ci95 is not None else "")
            )
        cells += [
            _params(r.params),
            _fmt(r.val_objective),
            f"{r.trials} ({r.trials_failed})",
            f"{r.tune_rounds:,}",
            f"{r.tune_client_steps:,}",
            "n/a" if r.rounds_to_best is None else f"{r.rounds_to_best:.1f}",
            _fmt(r.bytes_total, big=True),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"**bold**: the best mean of the setting; ≈: not significantly worse than it (one-sided "
        f"paired t-test over the seeds both completed, α = {spec.alpha}, no correction for multiple "
        f"comparisons; with fewer than 2 paired seeds a method is not tested and gets ≈).",
    ]
    g = budget["given_per_method"]
    lines += [
        "",
        f"Budget per method and setting: {g['trials']} trials × {g['runs_per_trial']} tuning seeds × "
        f"{g['rounds_per_run']} rounds = {g['tune_rounds']:,} tuning rounds, then {g['final_runs']} "
        f"final runs. Spent: "
        + (
            "equal across methods in rounds and client-steps (checked)."
            if budget["equal"]
            else "NOT equal across methods:"
        ),
    ]
    for name, s in budget["settings"].items():
        if not (s["equal_rounds"] and s["equal_client_steps"]):
            spent = ", ".join(
                f"{m} {s['tune_rounds'][m]:,} rounds / {s['tune_client_steps'][m]:,} client-steps"
                for m in s["tune_rounds"]
            )
            lines.append(
                f"- {name}: {spent} (failed or stopped runs spend less; methods with other local work "
                f"spend other client-steps)"
            )
    floor = noise_floor(rows)
    if floor is not None:
        lines += [
            "",
            f"Noise floor: the seed-to-seed standard deviation of a repeated configuration is "
            f"{floor:.4f} (median over rows); differences below it are not results.",
        ]
    notes = [
        f"- {r.setting} / {r.method}: {r.note}"
        + (
            "; " + "; ".join(f"seed {s} {why}" for s, why in r.failed_seeds.items())
            if r.failed_seeds
            else ""
        )
        for r in rows
        if r.note
    ]
    failed_trials = [
        f"- {r.setting} / {r.method}: {r.trials_failed} of {r.trials} trials failed or diverged "
        f"(counted, never averaged)"
        for r in rows
        if r.trials_failed
    ]
    if notes or failed_trials:
        lines += ["", "Failures:", "", *notes, *failed_trials]
    if has_own:
        lines += [
            "",
            "Own models on own splits: `personal/test_acc`, each client's own model on its own test "
            "split (methods without personal models: the global model on each client's split).",
        ]
        for setting in spec.settings:
            group = [
                r
                for r in rows
                if r.setting == setting.name and r.mean is not None and r.own_models is not None
            ]
            by_global = [r.method for r in sorted(group, key=lambda r: -r.mean)]
            by_own = [r.method for r in sorted(group, key=lambda r: -r.own_models)]
            same = "the same" if by_global == by_own else "DIFFERENT"
            lines.append(
                f"- {setting.name}: ranking by the test score {by_global}, by own models {by_own}: "
                f"{same}."
            )
    return "\n".join(lines) + "\n"
