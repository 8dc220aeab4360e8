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

# the test score of a run: the global model at its best-validation round, else the clients' own
# models
TEST_KEYS = (*dict.fromkeys(names.best_test(t) for t in names.TASKS), names.BEST_PERSONAL_TEST_ACC)
OWN_MODELS = names.PERSONAL_TEST_ACC  # each client's own model on its own test split (final round)
GLOBAL_ON_CLIENTS = names.global_on_clients("test")  # the global model on the same splits


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
    global_on_clients: float | None = None  # the global model on each client's split (n/a: none)
    global_on_clients_ci95: float | None = None
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
    rows = [
        _row(
            spec,
            setting.name,
            m.name,
            tuned[setting.name][m.name],
            plans[setting.name].get(m.name),
            finals[setting.name],
        )
        for setting in spec.settings
        for m in spec.methods
    ]
    mark(rows, spec.alpha)
    return rows


def _final_scores(runs: list[RunRecord]) -> dict[str, Any]:
    """Per seed of the completed final runs: the test score, and both personalized protocols."""
    out: dict[str, Any] = {"metric": None, "scores": {}, "failed": {}, "own": {}, "glob": {}}
    for r in runs:
        key, value = test_score(r.summary) if r.status == "completed" else (None, None)
        if value is None or not math.isfinite(value):
            why = (
                "no test score"
                if r.status == "completed"
                else f"{r.status}: {r.summary.get('reason', '')}"
            )
            out["failed"][r.seed] = why.rstrip(": ")
            continue
        out["metric"], out["scores"][r.seed] = key, value
        if r.summary.get(OWN_MODELS) is not None:
            out["own"][r.seed] = float(r.summary[OWN_MODELS])
        # the global model on the clients' splits: its own key, or personal/* itself for a method
        # without personal models (none for a method without a global model)
        on_clients = r.summary.get(GLOBAL_ON_CLIENTS)
        if on_clients is None and key in TEST_KEYS[:2]:
            on_clients = r.summary.get(OWN_MODELS)
        if on_clients is not None:
            out["glob"][r.seed] = float(on_clients)
    return out


def _row(
    spec: StudySpec,
    setting: str,
    method: str,
    trials: list[TrialResult],
    plan: dict[str, Any] | None,
    finals: dict[tuple[str, int], RunRecord],
) -> Row:
    runs = [finals[(plan["file"], s)] for s in spec.seeds] if plan else []
    f = _final_scores(runs)
    ok = [r for r in runs if r.seed in f["scores"]]
    values, own, glob = (
        list(f["scores"].values()),
        list(f["own"].values()),
        list(f["glob"].values()),
    )
    tuning = [v for t in trials for v in t.runs.values()]

    def mean_of(key: str, among: list[RunRecord]) -> float | None:
        return _mean([float(r.summary[key]) for r in among if r.summary.get(key) is not None])

    row = Row(
        setting=setting,
        method=method,
        metric=f["metric"],
        n=len(values),
        n_planned=len(spec.seeds),
        mean=_mean(values),
        ci95=t_interval(values),
        std=float(np.std(values, ddof=1)) if len(values) > 1 else None,
        per_seed=f["scores"],
        failed_seeds=f["failed"],
        params=dict(plan["params"]) if plan else {},
        val_objective=plan["objective"] if plan else None,
        trials=len(trials),
        trials_failed=sum(t.objective is None for t in trials),
        tune_rounds=sum(int(v.get("rounds_done") or 0) for v in tuning),
        tune_client_steps=sum(int(v.get(names.CLIENT_STEPS_TOTAL) or 0) for v in tuning),
        final_rounds=sum(int(r.summary.get("rounds_done") or 0) for r in runs),
        final_client_steps=sum(int(r.summary.get(names.CLIENT_STEPS_TOTAL) or 0) for r in runs),
        rounds_to_best=mean_of(names.BEST_ROUND, ok),
        bytes_total=mean_of(names.BYTES_TOTAL, ok),
        own_models=_mean(own),
        own_models_ci95=t_interval(own),
        global_on_clients=_mean(glob),
        global_on_clients_ci95=t_interval(glob),
        trial_objectives=[t.objective for t in trials],
    )
    if not plan:
        row.note = f"all {len(trials)} trials failed: no final runs"
    elif f["failed"]:
        row.note = (f"mean over {len(values)} of {len(spec.seeds)} seeds ({len(f['failed'])} did "
                    f"not complete)")
    return row


def mark(rows: list[Row], alpha: float) -> None:
    """Per setting: the best mean, and every method whose paired test against it is not
    significant."""
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
        return f"{v / 1e6:,.4g}"  # one unit (MB, in the header) for the whole column
    return f"{v:.4f}"


def _params(params: dict[str, Any]) -> str:
    return (
        ", ".join(
            f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
            for k, v in params.items()
        )
        or "defaults"
    )


def _cell(mean: float | None, ci: float | None) -> str:
    return "n/a" if mean is None else _fmt(mean) + (f" ± {ci:.4f}" if ci is not None else "")


def to_markdown(spec: StudySpec, rows: list[Row], budget: dict[str, Any]) -> str:
    metric = next((r.metric for r in rows if r.metric), "best/test_acc")
    lines = [
        f"# Study {spec.name}",
        "",
        f"Test score: `{metric}` (the test score at the round of the best validation score), mean "
        f"± 95% t-interval over the final seeds {list(spec.seeds)}; n = seeds that completed. "
        f"Each method was tuned on validation only (mean of the best validation score over "
        f"tuning seeds {list(spec.tune_seeds)}), then rerun at its best configuration.",
        "",
    ]
    lines += _table(rows) + [
        "",
        f"**bold**: the best mean of the setting; ≈: not significantly worse "
        f"than it (one-sided paired t-test over the seeds both completed, α = "
        f"{spec.alpha}, no correction for multiple comparisons; with fewer than "
        f"2 paired seeds a method is not tested and gets ≈).",
    ]
    lines += _budget_lines(budget)
    floor = noise_floor(rows)
    if floor is not None:
        lines += [
            "",
            f"Noise floor: the seed-to-seed standard deviation of a repeated configuration "
            f"is {floor:.4f} (median over rows); differences below it are not results.",
        ]
    notes = [
        f"- {r.setting} / {r.method}: {r.note}"
        + "".join(f"; seed {s} {why}" for s, why in r.failed_seeds.items())
        for r in rows
        if r.note
    ]
    notes += [
        f"- {r.setting} / {r.method}: {r.trials_failed} of {r.trials} trials failed or "
        f"diverged (counted, never averaged)"
        for r in rows
        if r.trials_failed
    ]
    if notes:
        lines += ["", "Failures:", "", *notes]
    if any(r.own_models is not None for r in rows):
        lines += ["", *_protocol_lines(spec, rows)]
    return "\n".join(lines) + "\n"


def _table(rows: list[Row]) -> list[str]:
    protocols = any(r.own_models is not None for r in rows)
    head = ["setting", "method", "test (mean ± 95% CI)", "n"]
    head += ["global model on own splits", "own models on own splits"] if protocols else []
    head += [
        "hyperparameters",
        "val objective (tuning)",
        "trials (failed)",
        "tune rounds",
        "tune client-steps",
        "rounds-to-best",
        "MB sent (up + down)",
    ]
    align = ["---" if h in ("setting", "method", "hyperparameters") else "---:" for h in head]
    # text columns left, numbers right
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    for r in rows:
        cell = "—" if r.mean is None else _cell(r.mean, r.ci95)
        cell = f"**{cell}**" if r.best else cell + (" ≈" if r.not_worse else "")
        cells = [
            r.setting,
            r.method,
            cell,
            f"{r.n}" if r.n == r.n_planned else f"{r.n} of {r.n_planned}",
        ]
        if protocols:
            cells += [
                _cell(r.global_on_clients, r.global_on_clients_ci95),
                _cell(r.own_models, r.own_models_ci95),
            ]
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
    return lines


def _budget_lines(budget: dict[str, Any]) -> list[str]:
    g = budget["given_per_method"]
    spent = (
        "equal across methods in rounds and client-steps (checked)."
        if budget["equal"]
        else "NOT equal across methods:"
    )
    lines = [
        "",
        f"Budget per method and setting: {g['trials']} trials × {g['runs_per_trial']} tuning "
        f"seeds × {g['rounds_per_run']} rounds = {g['tune_rounds']:,} tuning rounds, then "
        f"{g['final_runs']} final runs. Spent: {spent}",
    ]
    for name, s in budget["settings"].items():
        if not (s["equal_rounds"] and s["equal_client_steps"]):
            each = ", ".join(
                f"{m} {s['tune_rounds'][m]:,} rounds / {s['tune_client_steps'][m]:,} client-steps"
                for m in s["tune_rounds"]
            )
            lines.append(
                f"- {name}: {each} (failed or stopped runs spend less; methods with other "
                f"local work spend other client-steps)"
            )
    return lines


def _protocol_lines(spec: StudySpec, rows: list[Row]) -> list[str]:
    """Both personalized protocols, and whether they rank the methods alike."""
    lines = [
        "Global model on own splits: `clients/global_test_acc` (methods without personal models: "
        "`personal/test_acc`, the same thing); own models on own splits: `personal/test_acc`, "
        "each client's own model on its own test split; both weighted by split size, final "
        "round; n/a: the method has no such model."
    ]
    for setting in spec.settings:
        group = [
            r
            for r in rows
            if r.setting == setting.name
            and r.own_models is not None
            and r.global_on_clients is not None
        ]
        by_global = [r.method for r in sorted(group, key=lambda r: -r.global_on_clients)]
        by_own = [r.method for r in sorted(group, key=lambda r: -r.own_models)]
        same = "the same" if by_global == by_own else "DIFFERENT"
        lines.append(
            f"- {setting.name}: ranking by the global model {by_global}, by own models "
            f"{by_own}: {same}."
        )
    return lines
