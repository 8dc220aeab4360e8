"""The study's plots: the test score vs round of the final runs (mean over seeds with a 95% t-band)
and the tuning curves (each trial's objective and the best so far), one panel per setting."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from fedbench.study.phases import RunRecord
from fedbench.study.spec import StudySpec
from fedbench.study.tuning import TrialResult
from fedbench.tracking.files import read_rows

CURVE_KEYS = ("global/test_acc", "global/test_r2", "personal/test_acc")


def _panels(n: int):
    import matplotlib.pyplot as plt

    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(max(5.2 * cols, 7.0), 3.8 * rows + 0.6), squeeze=False
    )
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _finish(fig, axes, path: Path, title: str) -> Path:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(
            MaxNLocator(integer=True)
        )  # rounds and trials are whole numbers
    seen: dict[str, object] = {}
    for ax in axes:  # every series once, whichever panel it appears in
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, h)
    ncol = min(len(seen), 3 if len(axes) == 1 else 5)
    fig.legend(
        list(seen.values()),
        list(seen),
        loc="lower center",
        ncol=max(ncol, 1),
        frameon=False,
        bbox_to_anchor=(0.5, 0.0),
        fontsize=9,
    )
    fig.suptitle(title)
    legend_rows = math.ceil(len(seen) / max(ncol, 1))
    fig.tight_layout(rect=(0, min(0.06 * legend_rows + 0.02, 0.4), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def curves(
    spec: StudySpec,
    finals: dict[str, dict[tuple[str, int], RunRecord]],
    plans: dict[str, dict],
    out: Path,
) -> Path | None:
    """Test score vs round, one line per method (mean over its completed seeds), band: 95%
    t-interval."""
    import matplotlib

    matplotlib.use("Agg")
    from scipy import stats

    fig, axes = _panels(len(spec.settings))
    drawn = False
    ylabel = None
    for ax, setting in zip(axes, spec.settings, strict=True):
        for i, m in enumerate(spec.methods):
            plan = plans[setting.name].get(m.name)
            if not plan:
                continue
            frames = []
            for s in spec.seeds:
                r = finals[setting.name].get((plan["file"], s))
                if r is None or r.status != "completed" or r.run_dir is None:
                    continue
                rows = pd.DataFrame(read_rows(r.run_dir / "metrics.jsonl"))
                key = next((k for k in CURVE_KEYS if k in rows), None)
                if key is None:
                    continue
                ylabel = key
                frames.append(rows[["round", key]].dropna().rename(columns={key: "y"}))
            if not frames:
                continue
            g = pd.concat(frames).groupby("round")["y"].agg(["mean", "std", "count"]).reset_index()
            colour = f"C{i % 10}"
            ax.plot(
                g["round"],
                g["mean"],
                color=colour,
                linewidth=1.8,
                label=f"{m.name} (n={len(frames)})",
            )
            width = [
                stats.t.ppf(0.975, c - 1) * sd / math.sqrt(c) if c > 1 else 0.0
                for sd, c in zip(g["std"].fillna(0.0), g["count"], strict=True)
            ]
            low, high = g["mean"] - np.array(width), g["mean"] + np.array(width)
            if ylabel.endswith("_acc"):  # an accuracy's interval stays within [0, 1]
                low, high = low.clip(0.0, 1.0), high.clip(0.0, 1.0)
            ax.fill_between(g["round"], low, high, color=colour, alpha=0.18, linewidth=0)
            drawn = True
        ax.set_title(setting.name)
        ax.set_xlabel("round")
        ax.set_ylabel(f"{ylabel or 'test score'}\n(mean over seeds, band: 95% CI)")
        ax.grid(alpha=0.3)
    if not drawn:
        import matplotlib.pyplot as plt

        plt.close(fig)
        return None
    return _finish(
        fig, axes, out / "curves.png", f"study {spec.name}: test score vs round of the final runs"
    )


def tuning(spec: StudySpec, tuned: dict[str, dict[str, list[TrialResult]]], out: Path) -> Path:
    """Objective (mean validation over the tuning seeds) of each trial and the best so far, per
    method; failed trials as crosses on the panel's floor. A curve still rising at the end says:
    more budget."""
    import matplotlib

    matplotlib.use("Agg")
    fig, axes = _panels(len(spec.settings))
    for ax, setting in zip(axes, spec.settings, strict=True):
        values = [
            t.objective
            for m in spec.methods
            for t in tuned[setting.name][m.name]
            if t.objective is not None
        ]
        floor = min(values) if values else 0.0
        for i, m in enumerate(spec.methods):
            trials = sorted(tuned[setting.name][m.name], key=lambda t: t.number)
            colour = f"C{i % 10}"
            xs = [t.number + 1 for t in trials if t.objective is not None]
            ys = [t.objective for t in trials if t.objective is not None]
            ax.plot(xs, ys, "o", color=colour, alpha=0.45, markersize=5)
            best, running = [], -math.inf
            for t in trials:
                if t.objective is not None:
                    running = max(running, t.objective)
                best.append(running if math.isfinite(running) else np.nan)
            ax.step(
                [t.number + 1 for t in trials],
                best,
                where="post",
                color=colour,
                linewidth=1.8,
                label=f"{m.name}: best so far",
            )
            failed = [t.number + 1 for t in trials if t.objective is None]
            if failed:
                ax.plot(
                    failed,
                    [floor] * len(failed),
                    "x",
                    color=colour,
                    markersize=8,
                    mew=2,
                    label=f"{m.name}: failed trial",
                )
        ax.set_title(setting.name)
        ax.set_xlabel("trial")
        ax.set_ylabel("objective: best validation score\n(mean over tuning seeds)")
        ax.grid(alpha=0.3)
    return _finish(
        fig, axes, out / "tuning.png", f"study {spec.name}: tuning curves (dots: trials)"
    )
