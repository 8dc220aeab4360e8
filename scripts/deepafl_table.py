#!/usr/bin/env python
"""DeepAFL vs AFL vs gradient baselines on the SAME frozen features (issue: DeepAFL and AFL).

Runs every (dataset, partition, method) cell through fedbench's runner and writes a Markdown table
with best/final test accuracy, the per-layer accuracy curve of DeepAFL, bytes and wall time.

    python scripts/deepafl_table.py                                  # mnist5k + digits, raw pixels
    python scripts/deepafl_table.py --features efficientnet_lite0 --resolution 64 --datasets mnist5k
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from hydra import compose, initialize_config_module

from fedbench.experiment import run_experiment

PARTITIONS = {"iid": ["partition=iid"], "dir0.1": ["partition=dirichlet", "partition.alpha=0.1"]}
METHODS = {
    "AFL (analytic, 1 round)": ["method=afl"],
    "DeepAFL small (T=5, h=f=256)": ["method=deepafl_small"],
    "DeepAFL paper preset (T=20, h=f=1024)": ["method=deepafl"],
    "FedAvg linear head (gradient)": ["method=fedavg", "backbone=logreg", "rounds=50", "participation=1.0",
                                      "local_epochs=1", "batch_size=32", "lr=0.05"],
    "FedAvg MLP head (gradient)": ["method=fedavg", "backbone=mlp", "rounds=50", "participation=1.0",
                                   "local_epochs=1", "batch_size=32", "lr=0.05"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["mnist5k", "digits"])
    ap.add_argument("--features", default="none", help="frozen extractor (features.extractor)")
    ap.add_argument("--resolution", type=int, default=None)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/deepafl"))
    a = ap.parse_args()
    common = [f"clients={a.clients}", "partition.min_samples=1", "logger=local", "progress=false",
              "hardware=cpu", f"features.extractor={a.features}"]
    if a.resolution:
        common.append(f"features.resolution={a.resolution}")
    rows = []
    for ds in a.datasets:
        for pname, pov in PARTITIONS.items():
            for mname, mov in METHODS.items():
                tag = f"{ds}-{a.features}-{pname}-{mname.split(' (')[0].replace(' ', '_')}"
                with initialize_config_module(config_module="fedbench.conf", version_base="1.3"):
                    cfg = compose(config_name="config", overrides=[f"dataset={ds}", *common, *pov, *mov])
                t0 = time.perf_counter()
                s = run_experiment(cfg, a.out / tag)
                wall = time.perf_counter() - t0
                layers = [json.loads(line) for line in (a.out / tag / "metrics.jsonl").read_text().splitlines()]
                curve = [round(r["global/test_acc"], 3) for r in layers if "analytic/layer" in r and
                         "global/test_acc" in r]
                rows.append({"dataset": ds, "partition": pname, "method": mname, "best_val": s["best/val_acc"],
                             "test_at_best": s["best/test_acc"], "final_test": s["final/test_acc"],
                             "rounds": s["rounds"], "bytes": s["comm/bytes_total"], "wall_s": wall,
                             "curve": curve})
                print(json.dumps(rows[-1]), flush=True)
    lines = [f"Frozen features: `{a.features}`{f' at {a.resolution}px' if a.resolution else ''}; "
             f"{a.clients} clients; every client every round. Command: `python scripts/deepafl_table.py "
             f"--datasets {' '.join(a.datasets)} --features {a.features}"
             f"{f' --resolution {a.resolution}' if a.resolution else ''}`.", "",
             "| dataset | partition | method | final test acc | best val acc (test at best) | rounds | "
             "bytes (up+down) | wall s | DeepAFL test acc per layer 0..T |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        curve = " ".join(f"{c:.3f}" for c in r["curve"]) if len(r["curve"]) > 1 else ""
        lines.append(f"| {r['dataset']} | {r['partition']} | {r['method']} | {r['final_test']:.4f} | "
                     f"{r['best_val']:.4f} ({r['test_at_best']:.4f}) | {r['rounds']} | {r['bytes'] / 1e6:,.1f} MB | "
                     f"{r['wall_s']:.1f} | {curve} |")
    a.out.mkdir(parents=True, exist_ok=True)
    table = a.out / f"table-{a.features}.md"
    table.write_text("\n".join(lines) + "\n")
    (a.out / f"table-{a.features}.json").write_text(json.dumps(rows, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
