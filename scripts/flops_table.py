#!/usr/bin/env python
"""FLoPS / FLoPS-PA against the magnitude-pruning baselines (issue: FLoPS and FLoPS-PA).

Part A, the paper's first experiment shape: sparse linear regression, d = 1000 features, 10 clients x 500
samples, SNR 20, feature correlation 0.2, true density = target density = 0.05, iid and heterogeneous
clients (Dirichlet 0.1 over target quantiles). Part B: the FedAvg CNN on mnist5k at target densities 0.05
and 0.005, FLoPS next to FedAvg-then-prune. Part C: ablations of FLoPS's reconstructed rules on sparse
linear and logistic regression (d = 1000, iid and heterogeneous, 3 seeds, densities 0.05 and 0.01):
rank_by {saliency, log_alpha} x project {final, never} x gate scaling {from round 100, none}, next to
Fed-HT and FedIter-HT; mean +- std over seeds. Part D: client participation heterogeneity (the paper's
"data and client participation heterogeneity") on sparse logistic regression, heterogeneous clients:
uniform partial participation 0.5, 0.2 and 0.1 and heterogeneous availability (each client available with its
own Beta-drawn probability, mean 0.3), next to full participation; FLoPS, FLoPS-PA, Fed-HT, FedIter-HT.
Writes Markdown tables under benchmarks/flops/.

    python scripts/flops_table.py                 # parts A and B (about 15 minutes on 2 CPU cores)
    python scripts/flops_table.py --parts C       # the ablation table (about 25 minutes)
    python scripts/flops_table.py --parts D       # participation heterogeneity (about 40 minutes)
    python scripts/flops_table.py --parts E       # the rule options x participation (about 25 minutes)

Part E: FLoPS's reconstructed rules that a new read of the sources proposed, each next to the default,
under full and partial (0.3) participation on heterogeneous sparse logistic regression: the mean-form
Lagrangian with a dual step 1/|theta| (`penalty=mean eta_lambda=null`), multiplicative gate scaling with
a decay factor (`scaling=multiplicative scale_factor=0.1 decay=0.99`), scaling from the round after
prune_start, Gallego-Posada's deterministic gate, and FLoPS-PA with the clients' penalty on the
server's scale; FedIter-HT as the baseline.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

from hydra import compose, initialize_config_module

from fedbench.experiment import run_experiment

COMMON = ["logger=local", "progress=false", "hardware=cpu", "participation=1.0"]
LINEAR = ["dataset=synthetic_linear", "backbone=logreg", "clients=10", "rounds=300", "batch_size=64",
          "method.target_density=0.05"]
PARTITIONS = {"iid": ["partition=iid"],
              "heterogeneous (Dirichlet 0.1 on y)": ["partition=dirichlet", "partition.alpha=0.1",
                                                     "partition.min_samples=50", "partition.balance=true"]}
LINEAR_METHODS = {
    "FLoPS (FedSGD)": ["method=flops", "local_steps=1", "method.prune_start=100"],
    "FLoPS-PA (10 local steps)": ["method=flops_pa", "local_steps=10", "lr=0.01", "method.prune_start=100"],
    "Fed-HT": ["method=fedht", "local_steps=10", "lr=0.01"],
    "FedIter-HT": ["method=fediterht", "local_steps=10", "lr=0.01"],
    "FedAvg, then prune": ["method=fedavg_prune", "local_steps=10", "lr=0.01"],
}
CNN = ["dataset=mnist5k", "backbone=cnn", "clients=10", "partition=dirichlet", "partition.alpha=0.5"]
CNN_METHODS = {
    "FLoPS (FedSGD)": ["method=flops", "local_steps=1", "batch_size=64", "rounds=300", "method.prune_start=150",
                       "method.eta_theta=0.1", "hardware.executor=sequential"],
    "FedAvg, then prune": ["method=fedavg_prune", "rounds=30", "batch_size=20", "lr=0.05"],
}


REUSE = {"on": False}  # --reuse: a run whose summary.json exists is read back, not run again


def run(tag: str, overrides: list[str], out: Path) -> dict:
    done = out / tag / "summary.json"
    if REUSE["on"] and done.exists():
        return {"wall_s": None, **json.loads(done.read_text())}
    with initialize_config_module(config_module="fedbench.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    t0 = time.perf_counter()
    s = run_experiment(cfg, out / tag)
    s["wall_s"] = time.perf_counter() - t0
    print(tag, json.dumps({k: v for k, v in s.items() if k.startswith(("sparsity", "final", "comm/bytes_total"))}),
          flush=True)
    return s


def fmt(v, spec=".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def part_a(out: Path, coefs: list[str]) -> list[str]:
    lines = ["## A. Sparse linear regression (d=1000, 10 clients x 500, SNR 20, corr 0.2, rho = true density = 0.05)",
             "", "| coefficients | clients | method | nnz (target 50) | density | TDR | recall | test R^2 | "
             "bytes up+down | wall s |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for coef in coefs:
        for pname, pov in PARTITIONS.items():
            for mname, mov in LINEAR_METHODS.items():
                tag = f"linear-{coef}-{pov[-1] if len(pov) > 1 else pov[0]}-{mov[0].split('=')[1]}"
                s = run(tag, COMMON + LINEAR + pov + mov + [f"dataset.coef={coef}"], out)
                lines.append(
                    f"| {coef} | {pname} | {mname} | {s['sparsity/nnz']} | {fmt(s['sparsity/density'], '.4f')} | "
                    f"{fmt(s.get('sparsity/tdr'))} | {fmt(s.get('sparsity/recall'))} | {fmt(s.get('final/test_r2'))} | "
                    f"{s['comm/bytes_total'] / 1e6:,.1f} MB | {s['wall_s']:.1f} |")
    return lines


def part_b(out: Path, densities: list[float]) -> list[str]:
    lines = ["## B. mnist5k, FedAvg CNN (10 clients, Dirichlet 0.5, full participation)", "",
             "| target density | method | achieved density | nnz / gated | final test acc | rounds | "
             "bytes up+down | wall s |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for rho in densities:
        for mname, mov in CNN_METHODS.items():
            tag = f"cnn-{rho}-{mov[0].split('=')[1]}"
            s = run(tag, COMMON + CNN + mov + [f"method.target_density={rho}"], out)
            lines.append(f"| {rho} | {mname} | {s['sparsity/density']:.5f} | {s['sparsity/nnz']:,} / "
                         f"{s['sparsity/n_gated']:,} | {fmt(s['final/test_acc'], '.4f')} | {s['rounds']} | "
                         f"{s['comm/bytes_total'] / 1e6:,.0f} MB | {s['wall_s']:.0f} |")
    return lines


ABLATION_DATA = {
    "linear": ["dataset=synthetic_linear", "rounds=300", "batch_size=64"],
    "logistic": ["dataset=synthetic_logistic", "dataset.d=1000", "dataset.n=7143", "rounds=300", "batch_size=64"],
}
ABLATION_PARTITIONS = {"iid": ["partition=iid"],
                       "heterogeneous": ["partition=dirichlet", "partition.balance=true"]}
# Dirichlet over 10 target-quantile bins (linear) or the 2 classes (logistic: alpha 0.1 leaves some client
# with 5 samples, so 0.3)
HETEROGENEITY = {"linear": ["partition.alpha=0.1", "partition.min_samples=50"],
                 "logistic": ["partition.alpha=0.3", "partition.min_samples=20"]}
BASELINES = {"Fed-HT": ["method=fedht", "local_steps=10", "lr=0.01"],
             "FedIter-HT": ["method=fediterht", "local_steps=10", "lr=0.01"]}


def ablation_variants() -> dict[str, list[str]]:
    out = {}
    for rank_by, project, scaling in itertools.product(("saliency", "log_alpha"), ("final", "never"),
                                                       ("scale from 100", "no scaling")):
        start = "method.prune_start=100" if scaling == "scale from 100" else "method.prune_start=null"
        out[f"FLoPS rank_by={rank_by} project={project} {scaling}"] = [
            "method=flops", "local_steps=1", start, f"method.rank_by={rank_by}", f"method.project={project}"]
    return {**out, **BASELINES}


def mean_std(values: list[float | None], spec: str = ".3f") -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "n/a"
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{format(statistics.mean(vals), spec)} ± {format(sd, spec)}"


ABLATION_HEADER = ["| data | clients | density | variant | TDR | density reached | test R^2 / acc | runs ok |",
                   "|---|---|---:|---|---:|---:|---:|---:|"]


def ablation_row(dname: str, pname: str, rho: float, vname: str, runs: list[dict]) -> dict:
    ok = [r for r in runs if r.get("status") == "completed"]
    metric = "final/test_r2" if dname == "linear" else "final/test_acc"
    # TDR of an empty support is undefined (every gate closed): n/a, not 0
    return {"data": dname, "clients": pname, "density": rho, "variant": vname,
            "tdr": [r.get("sparsity/tdr") if r.get("sparsity/nnz") else None for r in ok],
            "density_reached": [r.get("sparsity/density") for r in ok],
            "quality": [r.get(metric) for r in ok], "ok": len(ok), "n": len(runs)}


def ablation_lines(rows: list[dict], seeds: list[int]) -> list[str]:
    lines = ["## C. FLoPS ablations (d=1000, 10 clients, true density = target density, 300 rounds; "
             f"mean ± std over seeds {seeds})", "", *ABLATION_HEADER]
    for row in rows:
        lines.append(f"| {row['data']} | {row['clients']} | {row['density']} | {row['variant']} | "
                     f"{mean_std(row['tdr'])} | {mean_std(row['density_reached'], '.4f')} | "
                     f"{mean_std(row['quality'])} | {row['ok']}/{row['n']} |")
    return lines


def part_c(out: Path, seeds: list[int], densities: list[float]) -> list[str]:
    """The ablation grid; a run that fails counts in `runs ok` instead of stopping the table."""
    rows = []
    for (dname, dov), (pname, pov), rho in itertools.product(ABLATION_DATA.items(), ABLATION_PARTITIONS.items(),
                                                              densities):
        for vname, vov in ablation_variants().items():
            runs = []
            for seed in seeds:
                tag = f"C-{dname}-{pname}-{rho}-{vname.replace(' ', '_').replace('=', '-')}-s{seed}"
                het = HETEROGENEITY[dname] if pname == "heterogeneous" else []
                ov = COMMON + ["backbone=logreg", "clients=10"] + dov + pov + het + vov + [
                    f"method.target_density={rho}", f"dataset.true_density={rho}", f"seed={seed}",
                    f"dataset.generator_seed={seed}"]
                try:
                    runs.append(run(tag, ov, out / "ablation-runs"))
                except Exception as e:  # noqa: BLE001 - recorded in the table
                    runs.append({"status": "failed", "reason": str(e).splitlines()[0]})
            rows.append(ablation_row(dname, pname, rho, vname, runs))
    (out / "ablation.json").write_text(json.dumps(rows, indent=1) + "\n")
    return ablation_lines(rows, seeds)


PARTICIPATION = {
    "full (10 of 10)": ["participation=1.0"],
    "uniform 0.5 (5 of 10)": ["participation=0.5"],
    "uniform 0.2 (2 of 10)": ["participation=0.2"],
    "uniform 0.1 (1 of 10)": ["participation=0.1"],
    "heterogeneous availability (Beta, mean 0.3)": ["participation=1.0", "availability=bernoulli",
                                                     "availability.mean=0.3", "availability.concentration=2"],
}
PARTICIPATION_METHODS = {
    "FLoPS (FedSGD)": ["method=flops", "local_steps=1", "method.prune_start=100"],
    "FLoPS-PA (10 local steps)": ["method=flops_pa", "local_steps=10", "lr=0.01", "method.prune_start=100"],
    **BASELINES,
}


def hetero_logistic_runs(tag: str, overrides: list[str], seeds: list[int], rho: float, where: Path) -> list[dict]:
    """One run per seed of heterogeneous sparse logistic regression (tables D and E); a run that fails
    counts in `runs ok` instead of stopping the table."""
    runs = []
    for seed in seeds:
        ov = (COMMON + ["backbone=logreg", "clients=10"] + ABLATION_DATA["logistic"]
              + ABLATION_PARTITIONS["heterogeneous"] + HETEROGENEITY["logistic"] + overrides
              + [f"method.target_density={rho}", f"dataset.true_density={rho}", f"seed={seed}",
                 f"dataset.generator_seed={seed}"])
        try:
            runs.append(run(f"{tag}-s{seed}", ov, where))
        except Exception as e:  # noqa: BLE001 - recorded in the table
            runs.append({"status": "failed", "reason": str(e).splitlines()[0]})
    return runs


def part_d(out: Path, seeds: list[int], rho: float = 0.05) -> list[str]:
    """Sparse logistic regression, heterogeneous clients, under the participation settings above."""
    lines = [f"## D. Client participation heterogeneity (sparse logistic regression, d=1000, 10 clients, "
             f"Dirichlet 0.3 over the classes, density {rho}, 300 rounds; mean ± std over seeds {seeds})", "",
             "| participation | method | TDR | density reached | test acc | rounds sampled per client "
             "(min-max) | runs ok |", "|---|---|---:|---:|---:|---|---:|"]
    rows = []
    for (pname, pov), (mname, mov) in itertools.product(PARTICIPATION.items(), PARTICIPATION_METHODS.items()):
        runs = hetero_logistic_runs(f"D-{pname.split(' (')[0].replace(' ', '_')}-{mov[0].split('=')[1]}",
                                    mov + pov, seeds, rho, out / "participation-runs")
        for r in runs:
            if r.get("status") == "completed":
                record = json.loads((Path(r["run_dir"]) / "participation.json").read_text())
                r["sampled_range"] = (min(record["sampled"]), max(record["sampled"]))
        row = ablation_row("logistic", pname, rho, mname, runs)
        ranges = [r["sampled_range"] for r in runs if "sampled_range" in r]
        row["sampled"] = [min(a for a, _ in ranges), max(b for _, b in ranges)] if ranges else None
        rows.append(row)
        sampled = f"{row['sampled'][0]}-{row['sampled'][1]}" if row["sampled"] else "n/a"
        lines.append(f"| {pname} | {mname} | {mean_std(row['tdr'])} | {mean_std(row['density_reached'], '.4f')} | "
                     f"{mean_std(row['quality'])} | {sampled} | {row['ok']}/{row['n']} |")
    (out / "participation.json").write_text(json.dumps(rows, indent=1) + "\n")
    return lines


RULE_VARIANTS = {
    "FLoPS (defaults)": ["method=flops", "local_steps=1", "method.prune_start=100"],
    "FLoPS mean Lagrangian, dual step 1/|theta|": ["method=flops", "local_steps=1", "method.prune_start=100",
                                                    "method.penalty=mean", "method.eta_lambda=null"],
    "FLoPS multiplicative scaling (0.1, r=0.99)": ["method=flops", "local_steps=1", "method.prune_start=100",
                                                   "method.scaling=multiplicative", "method.scale_factor=0.1",
                                                   "method.decay=0.99"],
    "FLoPS scaling after prune_start": ["method=flops", "local_steps=1", "method.prune_start=100",
                                        "method.scale_from=after"],
    "FLoPS Gallego-Posada gate": ["method=flops", "local_steps=1", "method.prune_start=100",
                                  "method.deterministic=gallego_posada"],
    "FLoPS-PA (defaults)": PARTICIPATION_METHODS["FLoPS-PA (10 local steps)"],
    "FLoPS-PA client penalty on the server's scale": [*PARTICIPATION_METHODS["FLoPS-PA (10 local steps)"],
                                                      "method.client_penalty=server"],
    "FedIter-HT": BASELINES["FedIter-HT"],
}


def part_e(out: Path, seeds: list[int], rho: float = 0.05) -> list[str]:
    """The rule options above under full and partial participation (heterogeneous logistic regression)."""
    lines = [f"## E. FLoPS rule options x participation (sparse logistic regression, d=1000, 10 clients, "
             f"Dirichlet 0.3, density {rho}, 300 rounds; mean ± std over seeds {seeds})", "",
             "| participation | variant | TDR | density reached | test acc | runs ok |",
             "|---|---|---:|---:|---:|---:|"]
    rows = []
    for (pname, pov), (vname, vov) in itertools.product({"full": ["participation=1.0"],
                                                          "0.3": ["participation=0.3"]}.items(),
                                                         RULE_VARIANTS.items()):
        runs = hetero_logistic_runs(f"E-{pname}-{vname.replace(' ', '_').replace('/', '').replace(',', '')}",
                                    vov + pov, seeds, rho, out / "rules-runs")
        row = ablation_row("logistic", pname, rho, vname, runs)
        rows.append(row)
        shown = vname.replace("|", "\\|")  # a Markdown cell
        lines.append(f"| {pname} | {shown} | {mean_std(row['tdr'])} | {mean_std(row['density_reached'], '.4f')} | "
                     f"{mean_std(row['quality'])} | {row['ok']}/{row['n']} |")
    (out / "rules.json").write_text(json.dumps(rows, indent=1) + "\n")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["A", "B"], choices=["A", "B", "C", "D", "E"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--ablation-densities", nargs="+", type=float, default=[0.05, 0.01])
    ap.add_argument("--coefs", nargs="+", default=["sign", "normal"])
    ap.add_argument("--densities", nargs="+", type=float, default=[0.05, 0.005])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/flops"))
    ap.add_argument("--reuse", action="store_true", help="read back runs already in --out instead of rerunning")
    a = ap.parse_args()
    REUSE["on"] = a.reuse
    lines = [f"Command: `python scripts/flops_table.py --parts {' '.join(a.parts)}`", ""]
    if "A" in a.parts:
        lines += part_a(a.out, a.coefs) + [""]
    if "B" in a.parts:
        lines += part_b(a.out, a.densities) + [""]
    if "C" in a.parts:
        lines += part_c(a.out, a.seeds, a.ablation_densities)
    if "D" in a.parts:
        lines += part_d(a.out, a.seeds)
    if "E" in a.parts:
        lines += part_e(a.out, a.seeds)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"table-{''.join(a.parts)}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
