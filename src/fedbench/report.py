"""Turn a sweep dir (Hydra multirun output) into one table and a few plots.

    fedbench-report multirun/2026-11-22/10-00-00            # or: python -m fedbench.report DIR
    fedbench-report DIR --out report/ --by method.name partition.alpha

Every run's summary.json + .hydra/overrides.yaml become a row; rows are aggregated over seeds (mean and
std, and the number of seeds) by the swept keys (every override key with more than one value, except
`seed`). Writes report.csv (all runs), summary.csv and summary.md (aggregated) and PNG plots.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from fedbench.tracking.files import read_rows

# summary keys that describe the run rather than measure it (left out of the metric columns)
NOT_METRICS = ("rounds", "n_params", "metrics.target")
NOT_METRIC_PREFIXES = ("memory/", "warm_start.", "calibration.", "features_info.", "override:")
# column order: headline results first, then the rest by name
ORDER = ("best/", "final/", "rounds_to_target", "personal/", "sparsity/", "comm/", "time/", "throughput/")


def metric_columns(df: pd.DataFrame, summary_keys: set[str]) -> list[str]:
    """The metrics the runs actually logged: numeric summary keys, headline ones first."""
    found = [k for k in summary_keys if k in df.columns and k not in NOT_METRICS
             and not k.startswith(NOT_METRIC_PREFIXES) and pd.to_numeric(df[k], errors="coerce").notna().any()]

    def rank(k: str) -> tuple[int, str]:
        return next((i for i, p in enumerate(ORDER) if k.startswith(p)), len(ORDER)), k

    return sorted(found, key=rank)


def _value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def collect(sweep_dir: str | Path) -> pd.DataFrame:
    """One row per run: its overrides (columns named by key), key config values, and its summary."""
    rows, summary_keys = [], set()
    for summary_file in sorted(Path(sweep_dir).glob("**/summary.json")):
        run = summary_file.parent
        row: dict[str, Any] = {"run_dir": str(run)}
        ov_file = run / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(ov_file.read_text()) if ov_file.exists() else []
        for item in overrides or []:
            key, _, val = str(item).lstrip("+~").partition("=")
            row[f"override:{key}"] = _value(val)
        cfg_file = run / ".hydra" / "config.yaml"
        if cfg_file.exists():
            cfg = _flatten(yaml.safe_load(cfg_file.read_text()) or {})
            for k in ("method.name", "dataset.name", "partition.name", "partition.alpha", "seed",
                      "method.target_density", "method.prune_start", "clients", "rounds"):
                if k in cfg:
                    row[k] = cfg[k]
        summary = json.loads(summary_file.read_text())
        row.update(summary)
        rows.append(row)
        summary_keys.update(summary)
    df = pd.DataFrame(rows)
    df.attrs["summary_keys"] = sorted(summary_keys)
    return df


def swept_keys(df: pd.DataFrame) -> list[str]:
    keys = []
    for col in df.columns:
        if col.startswith("override:") and col != "override:seed" and df[col].astype(str).nunique() > 1:
            keys.append(col)
    return keys


def completed(df: pd.DataFrame) -> pd.Series:
    """Runs that count in means and plots: status completed (failed / diverged / preempted ones do not)."""
    if "status" not in df:
        return pd.Series(True, index=df.index)
    return df["status"].fillna("completed") == "completed"


def aggregate(df: pd.DataFrame, by: list[str] | None = None) -> pd.DataFrame:
    """Mean and std per configuration over its COMPLETED runs; `runs ok` = completed / all runs."""
    by = by or swept_keys(df) or ["method.name"]
    by = [b if b in df.columns else f"override:{b}" for b in by]
    metrics = metric_columns(df, set(df.attrs.get("summary_keys", df.columns)))
    num = df[by + metrics].copy()
    for m in metrics:
        num[m] = pd.to_numeric(num[m], errors="coerce")
    for b in by:
        num[b] = num[b].astype(str)
    ok = completed(df)
    total = num.groupby(by, sort=True, dropna=False).size()
    grouped = num[ok].groupby(by, sort=True, dropna=False)
    out = grouped[metrics].agg(["mean", "std"]).reindex(total.index)
    out.columns = [f"{m} {stat}" for m, stat in out.columns]
    n_ok = grouped.size().reindex(total.index).fillna(0).astype(int)
    out.insert(0, "seeds", n_ok)
    out.insert(1, "runs ok", [f"{a}/{b}" for a, b in zip(n_ok, total, strict=True)])
    return out.reset_index().rename(columns=lambda c: c.replace("override:", ""))


def excluded(df: pd.DataFrame) -> pd.DataFrame:
    """The runs left out of the means, with how they ended."""
    cols = [c for c in ("run_dir", "status", "reason") if c in df]
    return df.loc[~completed(df), cols]


def to_markdown(agg: pd.DataFrame, left_out: pd.DataFrame | None = None) -> str:
    """mean +- std cells (std omitted for a single seed); the runs left out of the means, if any."""
    keys = [c for c in agg.columns if not c.endswith((" mean", " std"))]
    metrics = [c[:-5] for c in agg.columns if c.endswith(" mean")]
    head = "| " + " | ".join(keys + metrics) + " |"
    sep = "|" + "---|" * len(keys) + "---:|" * len(metrics)
    lines = [head, sep]
    for _, r in agg.iterrows():
        cells = [str(r[k]) for k in keys]
        for m in metrics:
            mean, std = r[f"{m} mean"], r[f"{m} std"]
            if mean is None or (isinstance(mean, float) and math.isnan(mean)):
                cells.append("n/a")
                continue
            big = abs(mean) >= 1000
            f = (lambda v: f"{v:,.0f}") if big else (lambda v: f"{v:.4g}")
            cells.append(f(mean) if std is None or math.isnan(std) else f"{f(mean)} ± {f(std)}")
        lines.append("| " + " | ".join(cells) + " |")
    if left_out is not None and len(left_out):
        lines += ["", f"Left out of the means and plots ({len(left_out)} runs):", ""]
        lines += [f"- {r.get('status')}: {r.get('run_dir')} ({r.get('reason') or 'no reason recorded'})"
                  for _, r in left_out.iterrows()]
    return "\n".join(lines) + "\n"


def _short(key: str) -> str:
    """'override:method.target_density' -> 'target_density' (legends stay readable)."""
    return key.replace("override:", "").split(".")[-1]


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _curves(df: pd.DataFrame, label_cols: list[str], x: str, y: str) -> dict[str, pd.DataFrame]:
    """Per label: metrics.jsonl rows of every run with that label, averaged over seeds by x."""
    out: dict[str, list[pd.DataFrame]] = {}
    for _, run in df.iterrows():
        path = Path(run["run_dir"]) / "metrics.jsonl"
        if not path.exists():
            continue
        rows = pd.DataFrame(read_rows(path))
        if x not in rows or y not in rows:
            continue
        parts = [f"{_short(c)}={run[c]}" for c in label_cols if not _missing(run[c])]
        label = ", ".join(parts) or str(run.get("method.name"))
        out.setdefault(label, []).append(rows[[x, y]].dropna())
    return {k: pd.concat(v).groupby(x)[y].agg(["mean", "std", "count"]).reset_index() for k, v in out.items()}


def _save(fig: Any, ax: Any, path: Path, title: str, logx: bool = True, integer_x: bool = False) -> Path:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if logx:
        ax.set_xscale("log")
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    ax.grid(alpha=0.3)
    if len(ax.get_legend_handles_labels()[0]) > 4:  # many series: legend beside the plot, not on it
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    else:
        ax.legend(fontsize=8, loc="best")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


AXIS_LABELS = {"global/val_acc": "validation accuracy", "global/val_r2": "validation R^2",
               "global/val_f1": "validation micro-F1",
               "personal/val_acc": "personal validation accuracy (mean over clients)",
               "comm/bytes_total": "cumulative bytes sent (up + down)", "round": "round"}


def _curve_plot(df: pd.DataFrame, labels: list[str], x: str, y: str, path: Path, note: str) -> list[Path]:
    """One line per configuration (its own colour; line style by its first key, usually the method):
    the mean over seeds, with a band of +- one standard deviation where there are several seeds."""
    import matplotlib.pyplot as plt

    curves = _curves(df, labels, x, y)
    if not curves:
        return []
    fig, ax = plt.subplots(figsize=(10, 5))
    styles = ["-", "--", ":", "-."]
    heads = sorted({label.split(", ")[0] for label in curves})
    palette = plt.cm.tab10 if len(curves) <= 10 else plt.cm.tab20
    for i, (label, c) in enumerate(sorted(curves.items())):
        colour = palette(i % palette.N)
        style = styles[heads.index(label.split(", ")[0]) % len(styles)]
        ax.plot(c[x], c["mean"], label=label, linewidth=1.8, linestyle=style, color=colour)
        spread = c["std"].fillna(0.0)
        if (c["count"] > 1).any():
            ax.fill_between(c[x], c["mean"] - spread, c["mean"] + spread, color=colour, alpha=0.15, linewidth=0)
    ax.set_xlabel(AXIS_LABELS.get(x, x))
    ax.set_ylabel(f"{AXIS_LABELS.get(y, y)}\n(mean over seeds, band: ± 1 std)")
    title = f"{AXIS_LABELS.get(y, y)} vs {AXIS_LABELS.get(x, x)}{note}"
    return [_save(fig, ax, path, title, logx=x != "round", integer_x=x == "round")]


def _sparsity_plot(df: pd.DataFrame, out: Path) -> list[Path]:
    """Achieved density and TDR vs target density, one line per setting of every OTHER swept key (e.g.
    prune_start, method); the target itself as a visible reference line. The series go to a CSV too."""
    import matplotlib.pyplot as plt

    others = [k for k in swept_keys(df) if not k.endswith("target_density")]
    cols = [c for c in ("sparsity/density", "sparsity/tdr") if c in df]
    keys = ["method.target_density", *others]
    series = df.groupby([k for k in keys], dropna=False)[cols].mean().reset_index()
    series["label"] = series[others].astype(str).apply(
        lambda r: ", ".join(f"{_short(k)}={v}" for k, v in r.items()), axis=1) if others else "all runs"
    series.to_csv(out / "density_tdr_vs_target.csv", index=False)
    fig, ax = plt.subplots(figsize=(8, 5))
    targets = sorted(series["method.target_density"].unique())
    # the target as a wide grey band UNDER the series plus a thin dashed line OVER them, and hollow markers
    # for the achieved density: where a method hits the target exactly, both stay visible
    ax.plot(targets, targets, color="0.8", linewidth=7, solid_capstyle="round", zorder=1)
    ax.plot(targets, targets, color="black", linestyle="--", linewidth=1, label="target (density = target)",
            zorder=6)
    for i, (label, g) in enumerate(series.groupby("label")):
        g = g.sort_values("method.target_density")
        colour = plt.cm.tab10(i % 10)
        ax.plot(g["method.target_density"], g["sparsity/density"], "o-", color=colour, mfc="none", mew=1.5,
                markersize=8, zorder=3, label=f"density, {label}")
        if "sparsity/tdr" in g and g["sparsity/tdr"].notna().any():
            ax.plot(g["method.target_density"], g["sparsity/tdr"], "s:", color=colour, label=f"TDR, {label}")
    ax.set_xlabel("target density (fraction of gated entries kept)")
    ax.set_ylabel("achieved density / TDR (fraction)")
    ax.set_xticks(targets)
    return [_save(fig, ax, out / "density_tdr_vs_target.png", "density and TDR vs target density", logx=False)]


def plots(df: pd.DataFrame, out: Path) -> list[Path]:
    """PNG plots of the completed runs (the title says how many others were left out)."""
    import matplotlib

    matplotlib.use("Agg")

    ok = completed(df)
    note = f" ({int((~ok).sum())} failed/diverged runs left out)" if (~ok).any() else ""
    df = df[ok]
    written = []
    labels = [c for c in swept_keys(df)] or ["method.name"]
    scored = [s for s in ("acc", "f1") if f"best/val_{s}" in df and df[f"best/val_{s}"].notna().any()]
    y_key = f"global/val_{scored[0]}" if scored else "global/val_r2"
    for x, fname in (("round", "val_vs_round.png"), ("comm/bytes_total", "val_vs_bytes.png")):
        written += _curve_plot(df, labels, x, y_key, out / fname, note)
    no_global = df["best/val_acc"].isna() if "best/val_acc" in df else pd.Series(True, index=df.index)
    personal_sweep = ("partition.name" in df and (df["partition.name"] == "noniid_s").any()) or (
        "personal/test_acc" in df and (df["personal/test_acc"].notna() & no_global).any())
    if personal_sweep:
        # personalized methods: each client's own model on its own validation split, averaged over clients
        written += _curve_plot(df, labels, "round", "personal/val_acc", out / "personal_val_vs_round.png", note)
    if "method.target_density" in df and "sparsity/density" in df and df["sparsity/density"].notna().any():
        written += _sparsity_plot(df, out)
    if "partition.alpha" in df and df["partition.alpha"].nunique() > 1 and "best/round" in df:
        written.append(_rounds_to_best_plot(df, out, note))
    if "clients/sampled" in df and df["clients/sampled"].notna().any():  # a federation with availability etc.
        written += _participation_plot(df, labels, out)
    return written


def _participation_plot(df: pd.DataFrame, labels: list[str], out: Path) -> list[Path]:
    """Histogram of rounds each client was sampled (participation.json), pooled over the seeds of each
    setting: how unequal participation was."""
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = 0
    for name, group in df.groupby([c for c in labels if c in df], dropna=False, sort=True):
        counts = []
        for run_dir in group["run_dir"]:
            path = Path(run_dir) / "participation.json"
            if path.exists():
                record = json.loads(path.read_text())
                held = set(record.get("holdout", []))
                counts += [c for k, c in enumerate(record["sampled"]) if k not in held]
        if counts:
            label = ", ".join(f"{_short(c)}={v}" for c, v in zip(labels, np.atleast_1d(name), strict=False))
            ax.hist(counts, bins=range(0, max(counts) + 2), alpha=0.5, label=label)
            drawn += 1
    if not drawn:
        plt.close(fig)
        return []
    ax.set_xlabel("rounds a client was sampled")
    ax.set_ylabel("clients (all seeds)")
    ax.legend(fontsize=7)
    ax.set_title("participation per client")
    fig.tight_layout()
    fig.savefig(out / "participation.png", dpi=110)
    plt.close(fig)
    return [out / "participation.png"]


def _rounds_to_best_plot(df: pd.DataFrame, out: Path, note: str) -> Path:
    """Rounds-to-best vs Dirichlet alpha: one line per method AND per setting of every other swept key, so
    each point is a mean over seeds only (the label says what else was fixed)."""
    import matplotlib.pyplot as plt

    others = [k for k in swept_keys(df) if k not in ("override:partition.alpha", "override:method",
                                                     "override:method.name")]
    keys = ["method.name", *others]
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for i, (values, g) in enumerate(df.groupby(keys, dropna=False)):  # coinciding lines stay visible
        values = values if isinstance(values, tuple) else (values,)
        label = ", ".join([str(values[0])] + [f"{_short(k)}={v}" for k, v in zip(others, values[1:], strict=True)])
        a = g.groupby("partition.alpha")["best/round"].agg(["mean", "std", "count"]).reset_index()
        low, high = int(a["count"].min()), int(a["count"].max())
        seeds = f"n={low} seed{'s' if high > 1 else ''}" if low == high else f"n={low}-{high} seeds"
        ax.errorbar(a["partition.alpha"], a["mean"], yerr=a["std"].fillna(0), marker="osD^v"[i % 5], capsize=3,
                    linestyle=["-", "--", ":", "-."][i % 4], markersize=8 - i % 4, label=f"{label} ({seeds})")
    ax.set_xlabel("Dirichlet alpha (small = more label skew)")
    ax.set_ylabel("rounds-to-best\n(mean ± std over seeds; other keys fixed per line)")
    ax.set_xscale("log")
    alphas = sorted(df["partition.alpha"].dropna().unique())
    ax.set_xticks(alphas, [f"{a:g}" for a in alphas])  # the swept values, not log-scale decades
    ax.minorticks_off()
    return _save(fig, ax, out / "rounds_to_best_vs_alpha.png", f"rounds-to-best vs alpha{note}", logx=False)


def optuna_best(sweep_dir: Path) -> str:
    """The best trial of an Optuna sweep (hydra/sweeper=tune), from its optimization_results.yaml."""
    path = sweep_dir / "optimization_results.yaml"
    if not path.exists():
        return ""
    res = yaml.safe_load(path.read_text()) or {}
    params = " ".join(f"{k}={v}" for k, v in (res.get("best_params") or {}).items())
    return (f"\nOptuna study ({res.get('name', 'optuna')}): best validation value {res.get('best_value')} with "
            f"{params}; run seeds at these values for the final table.\n")


def report(sweep_dir: str | Path, out: str | Path | None = None, by: list[str] | None = None) -> dict[str, Any]:
    sweep_dir = Path(sweep_dir)
    df = collect(sweep_dir)
    if df.empty:
        raise SystemExit(f"fedbench-report: no summary.json under {sweep_dir}")
    out = Path(out) if out else sweep_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    agg = aggregate(df, by)
    df.to_csv(out / "report.csv", index=False)
    agg.to_csv(out / "summary.csv", index=False)
    md = to_markdown(agg, excluded(df)) + optuna_best(sweep_dir)
    (out / "summary.md").write_text(md)
    pngs = plots(df, out)
    return {"runs": df, "summary": agg, "markdown": md, "plots": pngs, "out": out}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep_dir")
    ap.add_argument("--out", default=None, help="output dir (default: SWEEP_DIR/report)")
    ap.add_argument("--by", nargs="*", default=None, help="group by these keys (default: the swept keys)")
    a = ap.parse_args(argv)
    res = report(a.sweep_dir, a.out, a.by)
    print(res["markdown"])
    print(f"{len(res['runs'])} runs; tables and {len(res['plots'])} plots in {res['out']}")


if __name__ == "__main__":
    main()
