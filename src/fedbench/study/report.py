"""Write the study's table (study.md, study.csv, study.json), its plots, and its W&B summary run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from fedbench.study import plots, table
from fedbench.study.phases import RunRecord
from fedbench.study.spec import StudySpec
from fedbench.study.tuning import TrialResult
from fedbench.tracking.files import write_json


def write_table(
    spec: StudySpec,
    root: Path,
    tuned: dict[str, dict[str, list[TrialResult]]],
    plans: dict[str, dict[str, Any]],
    finals: dict[str, dict[tuple[str, int], RunRecord]],
) -> dict[str, Any]:
    out = root / "table"
    out.mkdir(parents=True, exist_ok=True)
    rows = table.build_rows(spec, tuned, plans, finals)
    budget = table.budget_check(spec, rows)
    markdown = table.to_markdown(spec, rows, budget)
    written = [
        p for p in (plots.curves(spec, finals, plans, out), plots.tuning(spec, tuned, out)) if p
    ]
    markdown += "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in written) + "\n"
    (out / "study.md").write_text(markdown)
    records = table.as_dicts(rows)
    flat = pd.DataFrame(
        [
            {
                **{k: v for k, v in r.items() if not isinstance(v, (dict, list))},
                **{f"param:{k}": v for k, v in r["params"].items()},
            }
            for r in records
        ]
    )
    flat.to_csv(out / "study.csv", index=False)
    write_json(
        out / "study.json",
        {
            "study": spec.name,
            "alpha": spec.alpha,
            "seeds": list(spec.seeds),
            "tune_seeds": list(spec.tune_seeds),
            "rows": records,
            "budget": budget,
            "noise_floor": table.noise_floor(rows),
            "test": "one-sided paired t-test (scipy.stats.ttest_rel) against the "
            "best mean of the setting, over the seeds both completed",
        },
    )
    log_wandb(spec, out, records, flat)
    return {"dir": out, "rows": rows, "markdown": markdown, "plots": written, "budget": budget}


def log_wandb(
    spec: StudySpec, out: Path, records: list[dict[str, Any]], flat: pd.DataFrame
) -> None:
    """One W&B run in the study's group (job_type study): the table, and per row its headline
    numbers in the summary (`SETTING/METHOD/test_mean` ...)."""
    from fedbench.tracking.wandb_logger import WandbLogger

    mode = str(spec.wandb.get("mode", "offline"))
    if mode == "disabled":
        return
    logger = WandbLogger(
        mode,
        out,
        str(spec.wandb.get("project", "fedbench")),
        spec.source,
        entity=spec.wandb.get("entity"),
        group=f"study-{spec.name}",
        job_type="study",
        name=f"study-{spec.name}",
    )
    if logger.run is None:
        return
    import wandb

    logger.log({"study_table": wandb.Table(dataframe=flat.astype(str))}, step=0)
    summary: dict[str, Any] = {}
    for r in records:
        key = f"{r['setting']}/{r['method']}"
        summary.update(
            {
                f"{key}/test_mean": r["mean"],
                f"{key}/test_ci95": r["ci95"],
                f"{key}/n": r["n"],
                f"{key}/trials_failed": r["trials_failed"],
                f"{key}/best": r["best"],
                f"{key}/not_worse": r["not_worse"],
            }
        )
    logger.summary(summary)
    logger.finish()
