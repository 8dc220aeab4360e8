"""The steps of scripts/gpu_check.sh, each timed and recorded, none stopping the others:

1. the device tests (tests/test_device.py with FEDBENCH_TEST_DEVICE set; the GPU-readiness tests too
   when not --quick);
2. a short run of each paper method (FedSQ, DeepAFL, FLoPS, FLoPS-PA, FedPAC, FedeCouple) on embedded
   data with hardware.device=DEVICE, plus bfloat16 and two ranks sharing the device;
3. `fedbench-bench --device DEVICE` (every executor on the fixed workloads);
4. the peer benchmark's W3 (pfl-research's CIFAR-10 shape with its simple_cnn) on DEVICE: fedbench, and
   pfl when a venv with pfl is at .venv-pfl (the check never installs anything).
5. (not --quick) fused sweeps on DEVICE: the FLoPS 16-job and CNN 16-job sweeps and a 64-job one,
   hydra/launcher=fused vs the basic launcher (fedbench.bench_sweep; JSON next to the others).

Writes benchmarks/results/gpu_check-<device>-<time>.json (and the bench JSON next to it); exit 1 when a
step failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

# method -> overrides of a short run on embedded data (quick: fewer rounds, smaller models)
PAPER_METHODS = {
    "fedsq": ["method=fedsq", "dataset=digits", "backbone=resnet18", "backbone.width=16", "warm_start.epochs=1",
              "clients=10", "rounds=4"],
    "deepafl": ["method=deepafl", "dataset=digits", "clients=10", "method.T=3", "rounds=7"],
    "flops": ["method=flops", "dataset=synthetic_logistic", "backbone=logreg", "clients=20", "rounds=20",
              "method.prune_start=5"],
    "flops_pa": ["method=flops_pa", "dataset=synthetic_logistic", "backbone=logreg", "clients=20", "rounds=20",
                 "method.prune_start=5"],
    "fedpac": ["method=fedpac", "dataset=mnist5k", "backbone=pac_cnn", "partition=noniid_s", "clients=10",
               "rounds=4"],
    "fedecouple": ["method=fedecouple", "dataset=mnist5k", "backbone=pac_cnn", "partition=noniid_s",
                   "clients=10", "rounds=4"],
    "fedavg_bf16": ["method=fedavg", "dataset=mnist5k", "backbone=cnn", "hardware.dtype=bfloat16",
                    "hardware.executor=batched", "clients=20", "rounds=4"],
    "fedavg_2_ranks": ["method=fedavg", "dataset=mnist5k", "backbone=cnn", "hardware.workers=2", "clients=20",
                       "rounds=4"],
}
QUICK = {"deepafl": ["method.T=1", "rounds=3", "method.h=64", "method.f=32"],
         "flops": ["rounds=3", "method.prune_start=1", "local_steps=2"],
         "flops_pa": ["rounds=3", "method.prune_start=1", "local_steps=2"],
         # bfloat16 is emulated (slow) on a CPU: a small conv net on 8x8 digits
         "fedavg_bf16": ["rounds=1", "local_steps=2", "dataset=digits", "backbone=lenet5"],
         "fedavg_2_ranks": ["rounds=2", "local_steps=2", "dataset=digits", "backbone=lenet5"]}
QUICK_DEFAULT = ["rounds=2", "local_steps=2"]
SUMMARY_KEYS = ("status", "executor", "best/val_acc", "final/test_acc", "best/personal_test_acc",
                "time/total_s", "throughput/samples_per_s", "comm/bytes_total", "sparsity/density")


def step(results: list[dict], name: str, cmd: list[str], env: dict[str, str] | None = None,
         timeout: int = 600) -> subprocess.CompletedProcess | None:
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                             timeout=timeout)
        ok, tail = out.returncode == 0, (out.stdout + out.stderr)[-1500:]
    except subprocess.TimeoutExpired:
        out, ok, tail = None, False, f"timed out after {timeout} s"
    seconds = time.perf_counter() - t0
    results.append({"step": name, "ok": ok, "seconds": round(seconds, 2), "command": " ".join(cmd),
                    **({} if ok else {"output_tail": tail})})
    print(f"   {'ok' if ok else 'FAILED'} in {seconds:.1f} s", flush=True)
    if not ok:
        print(tail, flush=True)
    return out


def paper_runs(results: list[dict], device: str, quick: bool, work: Path) -> None:
    for name, overrides in PAPER_METHODS.items():
        run_dir = work / name
        cmd = [PY, "-m", "fedbench", *overrides, f"hardware.device={device}", "logger=local",
               "progress=false", f"hydra.run.dir={run_dir}",
               *(QUICK.get(name, QUICK_DEFAULT) if quick else [])]
        step(results, f"run {name}", cmd, {"WANDB_MODE": "disabled"})
        summary = run_dir / "summary.json"
        if summary.exists():
            s = json.loads(summary.read_text())
            results[-1]["summary"] = {k: s[k] for k in SUMMARY_KEYS if k in s}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="the smallest version of every step (CI, on a CPU)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--work", type=Path, default=None, help="run dirs (default outputs/gpu_check-<time>)")
    a = ap.parse_args(argv)
    import torch

    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: --device cuda but torch sees no GPU; use --device cpu --quick", file=sys.stderr)
        return 2
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = a.work or ROOT / "outputs" / f"gpu_check-{stamp}"
    a.out.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    started = time.perf_counter()
    # quick: the suite runs tests/test_device.py on its own; here one test shows the step works
    tests = ["tests/test_device.py", "-k", "bfloat16"] if a.quick else \
        ["tests/test_device.py", "tests/test_gpu_ready.py"]
    step(results, "device tests", [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
         {"FEDBENCH_TEST_DEVICE": a.device})
    paper_runs(results, a.device, a.quick, work)
    bench = ["--workloads", "logistic", "cnn", "--rounds", "1", "--variants", "sequential", "batched"] if a.quick \
        else ["--rounds", "3"]
    step(results, "fedbench-bench", [PY, "-m", "fedbench.bench", "--device", a.device, "--out", str(a.out), *bench])
    # quick: W1 (seconds) proves the peer script runs; W3 builds 50,000 CIFAR-shaped images
    peers = ["--workloads", "W1" if a.quick else "W3", "--device", a.device, "--repeat", "1", "--processes", "1",
             "--out", str(work / "peers"), "--rounds", "2" if a.quick else "6"]
    pfl_venv = ROOT / ".venv-pfl" / "bin" / "python"
    frameworks = ["fedbench", "pfl"] if pfl_venv.exists() and not a.quick else ["fedbench"]
    if a.quick:
        peers += ["--no-compile"]
    step(results, "peer benchmark", [PY, "scripts/bench_peers.py", *peers, "--frameworks", *frameworks])
    peer_json = sorted((work / "peers").glob("peers-*.json"))
    if peer_json:
        results[-1]["results"] = json.loads(peer_json[-1].read_text())["results"]
    if not a.quick:
        step(results, "fused sweeps", [PY, "-m", "fedbench.bench_sweep", "--device", a.device, "--out", str(a.out),
                                       "--sweeps", "flops_logistic", "cnn_mnist5k", "flops_logistic_64"])
    meta = {"time": stamp, "device": torch.cuda.get_device_name(0) if a.device.startswith("cuda") else "cpu",
            "torch": torch.__version__, "quick": a.quick, "total_s": round(time.perf_counter() - started, 1),
            "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                  text=True).stdout.strip()}
    path = a.out / f"gpu_check-{a.device.replace(':', '')}-{stamp}.json"
    path.write_text(json.dumps({"meta": meta, "steps": results}, indent=2, default=str) + "\n")
    failed = [r["step"] for r in results if not r["ok"]]
    print(f"gpu_check: {len(results) - len(failed)}/{len(results)} steps ok in {meta['total_s']} s; {path}")
    if failed:
        print("failed: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
