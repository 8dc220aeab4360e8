"""Sweep benchmark: the same multirun command with `hydra/launcher=fused` and with Hydra's basic launcher
(optionally also one `fedbench` process per job, as a shell loop or a process-per-job launcher does it),
side by side in one invocation, wall time of the whole command. Every job must complete under every
launcher, and the launchers' best validation scores are compared job by job.

    fedbench-bench --sweeps flops_logistic cnn_mnist5k          # CPU; writes benchmarks/sweeps/
    python -m fedbench.bench_sweep --device cuda --sweeps flops_logistic flops_logistic_64
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SWEEPS: dict[str, list[str]] = {
    # FLoPS on sparse logistic regression (p = 1000): 4 seeds x 4 target densities, 60 rounds
    "flops_logistic": ["+experiment=flops_synthetic_logistic", "rounds=60", "method.prune_start=20",
                       "seed=0,1,2,3", "method.target_density=0.02,0.05,0.1,0.2"],
    # the default experiment (FedAvg, CNN, mnist5k): 4 seeds x 4 client learning rates, 10 rounds
    "cnn_mnist5k": ["rounds=10", "seed=0,1,2,3", "lr=0.02,0.05,0.1,0.2"],
    # 64 jobs: 4 seeds x 4 target densities x 4 prune-starts (a GPU's sweep)
    "flops_logistic_64": ["+experiment=flops_synthetic_logistic", "rounds=60", "seed=0,1,2,3",
                          "method.target_density=0.02,0.05,0.1,0.2", "method.prune_start=10,20,30,40"],
}
LAUNCHERS = ("basic", "fused", "processes")
COMMON = ["logger.wandb.mode=disabled", "progress=false"]


def expand(args: list[str]) -> list[list[str]]:
    """The jobs of a basic sweep (comma lists, no sweep functions): their cartesian product."""
    fixed = [a for a in args if "," not in a.split("=", 1)[1]]
    swept = [[f"{a.split('=', 1)[0]}={v}" for v in a.split("=", 1)[1].split(",")] for a in args
             if "," in a.split("=", 1)[1]]
    return [fixed + list(combo) for combo in itertools.product(*swept)]


def fedbench_cmd() -> list[str]:
    return [sys.executable, "-m", "fedbench"]


def run_launcher(launcher: str, args: list[str], device: str, where: Path) -> dict[str, Any]:
    """One launcher's whole sweep; its wall time and every job's status and best validation score."""
    extra = [*COMMON, f"hardware.device={device}"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    t0 = time.perf_counter()
    if launcher == "processes":
        codes = []
        for i, job in enumerate(expand(args)):
            proc = subprocess.run([*fedbench_cmd(), *job, *extra, f"hydra.run.dir={where / str(i)}"],
                                  capture_output=True, text=True, env=env)
            codes.append(proc.returncode)
        rc, tail = max(codes), ""
    else:
        chosen = ["hydra/launcher=fused"] if launcher == "fused" else []
        proc = subprocess.run([*fedbench_cmd(), "--multirun", *args, *extra, *chosen, f"hydra.sweep.dir={where}"],
                              capture_output=True, text=True, env=env)
        rc, tail = proc.returncode, proc.stderr[-600:]
    wall = time.perf_counter() - t0
    jobs = sorted((p for p in where.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    summaries = [json.loads((p / "summary.json").read_text()) if (p / "summary.json").exists() else {}
                 for p in jobs]
    return {"wall_s": wall, "exit_code": rc, "jobs": len(jobs), "stderr_tail": tail,
            "status": [s.get("status", "no result") for s in summaries],
            "best_val": [next((s[k] for k in ("best/val_acc", "best/val_r2") if s.get(k) is not None), None)
                         for s in summaries],
            "rounds_s": sum(s.get("time/total_s") or 0.0 for s in summaries)}


def run(sweeps: list[str], device: str, launchers: list[str], out_dir: Path) -> dict[str, Any]:
    rows = []
    for name in sweeps:
        args = SWEEPS[name]
        results: dict[str, Any] = {}
        with tempfile.TemporaryDirectory(prefix=f"fedbench-sweep-{name}-") as tmp:
            for launcher in launchers:
                results[launcher] = run_launcher(launcher, args, device, Path(tmp) / launcher)
                r = results[launcher]
                print(f"{name:18s} {launcher:9s} {r['wall_s']:7.1f} s  exit {r['exit_code']}  "
                      f"{r['status'].count('completed')}/{len(expand(args))} completed", flush=True)
                shutil.rmtree(Path(tmp) / launcher, ignore_errors=True)
        row: dict[str, Any] = {"sweep": name, "args": args, "jobs": len(expand(args)), "launchers": results}
        if "basic" in results and "fused" in results:
            basic, fused = results["basic"], results["fused"]
            row["fused_speedup_vs_basic"] = basic["wall_s"] / fused["wall_s"]
            diffs = [abs(a - b) for a, b in zip(basic["best_val"], fused["best_val"], strict=False)
                     if a is not None and b is not None]
            row["max_best_val_diff_fused_vs_basic"] = max(diffs) if diffs else None
        if "processes" in results and "fused" in results:
            row["fused_speedup_vs_processes"] = results["processes"]["wall_s"] / results["fused"]["wall_s"]
        rows.append(row)
    import torch

    meta = {"device": device if device == "cpu" else torch.cuda.get_device_name(0), "cpus": os.cpu_count(),
            "torch": torch.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    result = {"meta": meta, "results": rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"sweeps-{'cuda' if device.startswith('cuda') else 'cpu'}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print_table(rows)
    print(f"results in {path}")
    return result


def print_table(rows: list[dict[str, Any]]) -> None:
    print("\n| sweep | jobs | launcher | wall (s) | completed | fused speed-up |")
    print("|---|---:|---|---:|---:|---:|")
    for row in rows:
        for launcher, r in row["launchers"].items():
            ratio = ""
            if launcher != "fused" and "fused" in row["launchers"]:
                ratio = f"{r['wall_s'] / row['launchers']['fused']['wall_s']:.2f}x"
            print(f"| {row['sweep']} | {row['jobs']} | {launcher} | {r['wall_s']:.1f} | "
                  f"{r['status'].count('completed')}/{row['jobs']} | {ratio} |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sweeps", nargs="+", default=["flops_logistic", "cnn_mnist5k"], choices=sorted(SWEEPS))
    ap.add_argument("--launchers", nargs="+", default=["basic", "fused"], choices=LAUNCHERS)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/sweeps"))
    a = ap.parse_args(argv)
    run(a.sweeps, a.device, a.launchers, a.out)


if __name__ == "__main__":
    main()
