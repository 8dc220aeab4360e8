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


def aggregate(df: pd.DataFrame, by: list[str] | None = None) -> pd.DataFrame:
    by = by or swept_keys(df) or ["method.name"]
    by = [b if b in df.columns else f"override:{b}" for b in by]
    metrics = metric_columns(df, set(df.attrs.get("summary_keys", df.columns)))
    num = df[by + metrics].copy()
    for m in metrics:
        num[m] = pd.to_numeric(num[m], errors="coerce")
    for b in by:
        num[b] = num[b].astype(str)
    grouped = num.groupby(by, sort=True, dropna=False)
    out = grouped[metrics].agg(["mean", "std"])
    out.columns = [f"{m} {stat}" for m, stat in out.columns]
    out.insert(0, "seeds", grouped.size())
    return out.reset_index().rename(columns=lambda c: c.replace("override:", ""))


def to_markdown(agg: pd.DataFrame) -> str:
    """mean +- std cells (std omitted for a single seed)."""
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
        rows = pd.DataFrame([json.loads(line) for line in path.read_text().splitlines() if line.strip()])
        if x not in rows or y not in rows:
            continue
        parts = [f"{_short(c)}={run[c]}" for c in label_cols if not _missing(run[c])]
        label = ", ".join(parts) or str(run.get("method.name"))
        out.setdefault(label, []).append(rows[[x, y]].dropna())
    return {k: pd.concat(v).groupby(x, as_index=False)[y].mean() for k, v in out.items()}


def _save(fig: Any, ax: Any, path: Path, title: str, logx: bool = True) -> Path:
    import matplotlib.pyplot as plt

    if logx:
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    if len(ax.get_legend_handles_labels()[0]) > 4:  # many series: legend beside the plot, not on it
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    else:
        ax.legend(fontsize=8, loc="best")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _curve_plot(df: pd.DataFrame, labels: list[str], x: str, y: str, path: Path, xlabel: str) -> list[Path]:
    import matplotlib.pyplot as plt

    curves = _curves(df, labels, x, y)
    if not curves:
        return []
    fig, ax = plt.subplots(figsize=(10, 5))
    # the first swept key (usually the method) and the rest of the label get one visual channel each:
    # up to 4 methods by line style and the rest by colour (methods that nearly coincide stay
    # distinguishable); more methods by colour and the rest by line style
    styles = ["-", "--", ":", "-."]
    heads = sorted({label.split(", ")[0] for label in curves})
    tails = sorted({", ".join(label.split(", ")[1:]) for label in curves})
    heads_by_style = len(heads) <= len(styles)
    for label, c in sorted(curves.items()):
        h = heads.index(label.split(", ")[0])
        t = tails.index(", ".join(label.split(", ")[1:]))
        style, colour = (h, t) if heads_by_style else (t, h)
        ax.plot(c[x], c[y], label=label, linewidth=1.8, linestyle=styles[style % len(styles)],
                color=plt.cm.tab10(colour % 10))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{y} (mean over seeds)")
    return [_save(fig, ax, path, f"{y} vs {xlabel}", logx=x != "round")]


def plots(df: pd.DataFrame, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    labels = [c for c in swept_keys(df)] or ["method.name"]
    y_key = "global/val_acc" if "best/val_acc" in df and df["best/val_acc"].notna().any() else "global/val_r2"
    for x, fname, xlabel in (("round", "val_vs_round.png", "round"),
                             ("comm/bytes_total", "val_vs_bytes.png", "cumulative bytes (up + down)")):
        written += _curve_plot(df, labels, x, y_key, out / fname, xlabel)
    no_global = df["best/val_acc"].isna() if "best/val_acc" in df else pd.Series(True, index=df.index)
    personal_sweep = ("partition.name" in df and (df["partition.name"] == "noniid_s").any()) or (
        "personal/test_acc" in df and (df["personal/test_acc"].notna() & no_global).any())
    if personal_sweep:
        # personalized methods: each client's own model on its own validation split, averaged over clients
        written += _curve_plot(df, labels, "round", "personal/val_acc", out / "personal_val_vs_round.png", "round")
    if "method.target_density" in df and "sparsity/density" in df and df["sparsity/density"].notna().any():
        fig, ax = plt.subplots(figsize=(6, 4.5))
        agg = df.groupby("method.target_density")[[c for c in ("sparsity/density", "sparsity/tdr") if c in df]].mean()
        ax.plot(agg.index, agg["sparsity/density"], "o-", label="achieved density")
        ax.plot(agg.index, agg.index, "k--", linewidth=0.8, label="target")
        if "sparsity/tdr" in agg and agg["sparsity/tdr"].notna().any():
            ax.plot(agg.index, agg["sparsity/tdr"], "s-", label="TDR")
        ax.set_xlabel("target density")
        written.append(_save(fig, ax, out / "density_tdr_vs_target.png", "density and TDR vs target density"))
    if "partition.alpha" in df and df["partition.alpha"].nunique() > 1 and "best/round" in df:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for method, g in df.groupby("method.name"):
            a = g.groupby("partition.alpha")["best/round"].agg(["mean", "std"]).reset_index()
            ax.errorbar(a["partition.alpha"], a["mean"], yerr=a["std"].fillna(0), marker="o", capsize=3, label=method)
        ax.set_xlabel("Dirichlet alpha (small = more skew)")
        ax.set_ylabel("rounds-to-best (mean ± std over seeds)")
        written.append(_save(fig, ax, out / "rounds_to_best_vs_alpha.png", "rounds-to-best vs alpha"))
    return written


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
    md = to_markdown(agg)
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
