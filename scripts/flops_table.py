#!/usr/bin/env python
"""FLoPS / FLoPS-PA against the magnitude-pruning baselines (issue: FLoPS and FLoPS-PA).

Part A, the paper's first experiment shape: sparse linear regression, d = 1000 features, 10 clients x 500
samples, SNR 20, feature correlation 0.2, true density = target density = 0.05, iid and heterogeneous
clients (Dirichlet 0.1 over target quantiles). Part B: the FedAvg CNN on mnist5k at target densities 0.05
and 0.005, FLoPS next to FedAvg-then-prune. Writes Markdown + JSON tables under benchmarks/flops/.

    python scripts/flops_table.py                 # both parts (about 15 minutes on 2 CPU cores)
    python scripts/flops_table.py --parts A
"""

from __future__ import annotations

import argparse
import json
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


def run(tag: str, overrides: list[str], out: Path) -> dict:
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["A", "B"], choices=["A", "B"])
    ap.add_argument("--coefs", nargs="+", default=["sign", "normal"])
    ap.add_argument("--densities", nargs="+", type=float, default=[0.05, 0.005])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/flops"))
    a = ap.parse_args()
    lines = [f"Command: `python scripts/flops_table.py --parts {' '.join(a.parts)}`", ""]
    if "A" in a.parts:
        lines += part_a(a.out, a.coefs) + [""]
    if "B" in a.parts:
        lines += part_b(a.out, a.densities)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"table-{''.join(a.parts)}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
