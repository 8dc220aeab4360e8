"""Benchmark: fixed FedAvg workloads run with every executor and with a reference loop written the way
most FL frameworks do it (a deep-copied model, a DataLoader and torch.optim per client), all on the same
data and the same batch schedule. See the README, Performance.

    fedbench-bench                       # CPU, all workloads, writes benchmarks/results/<device>-<time>.json
    fedbench-bench --device cuda --workloads cnn cifar_pfl
    fedbench-bench --sweeps flops_logistic cnn_mnist5k   # whole sweeps: fused vs basic launcher
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from fedbench.bench_sweep import LAUNCHERS, SWEEPS
from fedbench.bench_sweep import run as run_sweeps
from fedbench.data.clients import BatchSchedule, ClientView, make_schedule, sample_cohort
from fedbench.data.partitions import IidConfig, iid
from fedbench.engine.executors import BatchedExecutor, Executor, SequentialExecutor, resolve_memory_format
from fedbench.engine.functional import make_loss_fn, split_state
from fedbench.engine.protocol import RoundContext, RunContext
from fedbench.methods.fedavg import FedAvg
from fedbench.models.backbones import build_model
from fedbench.run.loop import run_round


@dataclass
class Workload:
    name: str
    backbone: str
    input_shape: tuple[int, ...]
    classes: int
    clients: int
    per_client: int
    cohort: int
    batch: int
    local_epochs: int = 1
    local_steps: int | None = None
    lr: float = 0.05


def workloads(device: str) -> dict[str, Workload]:
    gpu = device.startswith("cuda")
    return {
        # (a) logistic regression p=1000, 100 clients, 20% per round, 20 local steps, batch 32
        "logistic": Workload("logistic", "logreg", (1000,), 2, 100, 200, 20, 32, local_steps=20),
        # (b) FedAvg CNN on 28x28x1, 100 clients, 10 per round, 1 local epoch, batch 10
        #     (600 samples per client as in the FedAvg paper on a GPU; 60 on a 2-core CPU)
        "cnn": Workload("cnn", "cnn", (1, 28, 28), 10, 100, 600 if gpu else 60, 10, 10),
        # (c) pfl-research's CIFAR-10 benchmark: its simple_cnn, 1000 clients x 50 samples, cohort 50,
        #     batch 10, 1 epoch
        "cifar_pfl": Workload("cifar_pfl", "simple_cnn", (3, 32, 32), 10, 1000, 50, 50, 10),
    }


def make_data(w: Workload, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Random inputs labelled by a random linear teacher (learnable, so losses fall)."""
    g = torch.Generator().manual_seed(seed)
    n = w.clients * w.per_client
    x = torch.randn(n, *w.input_shape, generator=g)
    teacher = torch.randn(math.prod(w.input_shape), w.classes, generator=g)
    y = (x.reshape(n, -1) @ teacher).argmax(1)
    parts = iid(y.numpy(), w.clients, IidConfig(name="iid", min_samples=1), np.random.default_rng(seed))
    return ClientView.build(x.to(device, dtype), y.to(device), parts)


def build(w: Workload, device: torch.device, dtype: torch.dtype, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(OmegaConf.create({"name": w.backbone}), w.input_shape, w.classes).to(device=device, dtype=dtype)
    method = FedAvg()
    params, buffers = split_state(model)
    method.setup(RunContext(device=device, task="classification", num_classes=w.classes,
                            in_features=math.prod(w.input_shape), total_rounds=1, lr=w.lr, model=model,
                            loss_fn=make_loss_fn(model, "classification"), params=params, buffers=buffers))
    return model, method


def schedule(w: Workload, view: ClientView, round_: int, dtype: torch.dtype, device: torch.device):
    cohort = sample_cohort(0, round_, w.clients, w.cohort / w.clients)
    sched = make_schedule(view, cohort, 0, round_, w.batch, w.local_epochs, w.local_steps, dtype, device)
    return cohort, sched


def engine_round(method: FedAvg, executor: Executor, gstate: dict, view: ClientView, cohort: np.ndarray,
                 sched: BatchSchedule, sizes: torch.Tensor, round_: int = 1) -> dict:
    """One round through the run loop's own `run_round`; returns the new global state."""
    c = torch.as_tensor(cohort, device=view.x.device)
    ctx = RoundContext(round_, c, sizes[c], view.num_clients, round_)
    return run_round(method, executor, gstate, {}, ctx, view, sched).gstate


def reference_round(model: torch.nn.Module, view: ClientView, cohort: np.ndarray, sched: BatchSchedule,
                    sizes: torch.Tensor, lr: float, prox_mu: float = 0.0) -> None:
    """How most FL frameworks run a round: a model copy, a DataLoader and an optimizer per client
    (`prox_mu` > 0: FedProx's mu/2 ||w - w_global||^2 added to every local loss)."""
    start = [p.detach().clone() for p in model.parameters()]
    dataset = TensorDataset(view.x, view.y)
    states, weights = [], []
    for k in range(len(cohort)):
        local = copy.deepcopy(model)
        opt = torch.optim.SGD(local.parameters(), lr=lr)
        batches = [sched.idx[k, s][sched.weight[k, s] > 0].tolist()
                   for s in range(sched.steps) if bool(sched.step_mask[k, s])]
        for xb, yb in DataLoader(dataset, batch_sampler=batches):
            opt.zero_grad()
            prox = sum(((p - p0) ** 2).sum() for p, p0 in zip(local.parameters(), start, strict=True))
            (torch.nn.functional.cross_entropy(local(xb), yb) + prox_mu / 2 * prox).backward()
            opt.step()
        states.append(local.state_dict())
        weights.append(float(sizes[int(cohort[k])]))
    total = sum(weights)
    avg = {k: sum(w / total * s[k] for w, s in zip(weights, states, strict=True)) for k in states[0]}
    model.load_state_dict(avg)


def step_flops(model: torch.nn.Module, w: Workload, device: torch.device, dtype: torch.dtype) -> int:
    """FLOPs of one client step (forward + backward) on a full batch, from torch's flop counter."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(w.batch, *w.input_shape, device=device, dtype=dtype)
    y = torch.zeros(w.batch, dtype=torch.long, device=device)
    m = copy.deepcopy(model)
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.cross_entropy(m(x), y).backward()
    return int(counter.get_total_flops())


def matmul_ceiling(device: torch.device, dtype: torch.dtype) -> float:
    """GFLOP/s of a large square matmul measured now, on this device."""
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 20 if device.type == "cuda" else 5
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def time_variant(w: Workload, variant: str, device: torch.device, dtype: torch.dtype, rounds: int,
                 chunk_size: int | None) -> dict[str, Any]:
    view = make_data(w, device, dtype)
    sizes = torch.as_tensor(view.sizes(), dtype=dtype, device=device)
    model, method = build(w, device, dtype)
    params, buffers = split_state(model)
    gstate = method.init_global(params, buffers)
    layout = resolve_memory_format("auto", model, device, dtype)  # as the CLI's hardware.memory_format=auto
    executor = {"sequential": SequentialExecutor(memory_format=layout), "batched": BatchedExecutor(chunk_size),
                "batched+compile": BatchedExecutor(chunk_size, compile=True)}.get(variant)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, steps, samples = [], 0, 0
    for r in range(rounds + 1):  # round 0 warms up (and compiles); it is not timed
        cohort, sched = schedule(w, view, r + 1, dtype, device)
        sync(device)
        t0 = time.perf_counter()
        if executor is None:
            reference_round(model, view, cohort, sched, sizes, w.lr)
        else:
            gstate = engine_round(method, executor, gstate, view, cohort, sched, sizes, r + 1)
        sync(device)
        if r > 0:
            times.append(time.perf_counter() - t0)
            steps += int(sched.step_mask.sum())
            samples += int(sched.weight.sum())
    total = sum(times)
    return {"round_s": statistics.median(times), "samples_per_s": samples / total,
            "us_per_client_step": total / steps * 1e6, "client_steps": steps, "samples": samples,
            "total_s": total, "peak_memory_mb": peak_memory_mb(device), "_model": model}


def run(workload_names: list[str], device_name: str, variants: list[str], rounds: int, threads: int | None,
        out_dir: Path, chunk_size: int | None = None) -> dict[str, Any]:
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device_name)
    dtype = torch.float32
    ceiling = matmul_ceiling(device, dtype)
    cpu_name = f"cpu x{os.cpu_count()} ({platform.machine()})"
    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "rounds_timed": rounds,
        "matmul_ceiling_gflops": ceiling, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    rows = []
    all_w = workloads(device_name)
    for name in workload_names:
        w = all_w[name]
        flops = None
        for variant in variants:
            try:
                res = time_variant(w, variant, device, dtype, rounds, chunk_size)
            except Exception as e:  # noqa: BLE001 - report and go on with the other variants
                rows.append({"workload": name, "variant": variant, "error": f"{type(e).__name__}: {e}"[:300]})
                print(f"{name:10s} {variant:16s} failed: {rows[-1]['error']}")
                continue
            model = res.pop("_model")
            if flops is None:
                flops = step_flops(model, w, device, dtype)
            gflops = flops * res["client_steps"] / res["total_s"] / 1e9
            row = {"workload": name, "variant": variant, **res, "gflops": gflops,
                   "fraction_of_matmul_peak": gflops / ceiling, "flops_per_client_step": flops,
                   "workload_spec": {k: v for k, v in w.__dict__.items()}}
            rows.append(row)
            print(f"{name:10s} {variant:16s} round {res['round_s'] * 1e3:9.1f} ms  "
                  f"{res['samples_per_s']:10.0f} samples/s  {res['us_per_client_step']:8.1f} us/client-step  "
                  f"{gflops:7.2f} GFLOP/s ({100 * gflops / ceiling:4.1f}% of matmul)", flush=True)
        ref = next((r for r in rows if r["workload"] == name and r["variant"] == "reference" and "error" not in r),
                   None)
        if ref is not None:
            for r in rows:
                if r["workload"] == name and "error" not in r:
                    r["speedup_vs_reference"] = ref["round_s"] / r["round_s"]
    result = {"meta": meta, "results": rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = "cuda" if device.type == "cuda" else "cpu"
    path = out_dir / f"{tag}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"matmul ceiling {ceiling:.1f} GFLOP/s on {meta['device']}; results in {path}")
    print_table(rows)
    return result


def print_table(rows: list[dict[str, Any]]) -> None:
    print("\n| workload | variant | round (ms) | samples/s | us/client-step | GFLOP/s | % matmul peak | vs reference |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['workload']} | {r['variant']} | failed: {r['error'][:60]} | | | | | |")
            continue
        print(f"| {r['workload']} | {r['variant']} | {r['round_s'] * 1e3:.1f} | {r['samples_per_s']:.0f} | "
              f"{r['us_per_client_step']:.1f} | {r['gflops']:.2f} | {100 * r['fraction_of_matmul_peak']:.1f} | "
              f"{r.get('speedup_vs_reference', float('nan')):.2f}x |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workloads", nargs="+", default=["logistic", "cnn", "cifar_pfl"],
                    choices=["logistic", "cnn", "cifar_pfl"])
    ap.add_argument("--variants", nargs="+", default=["reference", "sequential", "batched", "batched+compile"],
                    choices=["reference", "sequential", "batched", "batched+compile"])
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per variant (after one warm-up round)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--chunk-size", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--sweeps", nargs="+", default=None, choices=sorted(SWEEPS),
                    help="instead: whole sweeps, hydra/launcher=fused vs the basic launcher (fedbench.bench_sweep; "
                         "writes benchmarks/sweeps/)")
    ap.add_argument("--launchers", nargs="+", default=["basic", "fused"], choices=LAUNCHERS)
    a = ap.parse_args(argv)
    if a.sweeps:
        run_sweeps(a.sweeps, a.device, a.launchers, Path("benchmarks/sweeps"))
        return
    run(a.workloads, a.device, a.variants, a.rounds, a.threads, a.out, a.chunk_size)


if __name__ == "__main__":
    main()
