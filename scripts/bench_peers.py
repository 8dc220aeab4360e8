"""fedbench vs pfl-research on the same FedAvg workloads, measured one after the other on this machine.

    python scripts/bench_peers.py                    # W1 and W2; installs pfl into .venv-pfl if missing
    python scripts/bench_peers.py --workloads W2 --rounds 8

W1: multinomial logistic regression, p=1000, 10 classes, 100 clients x 500, 20 per round, 1 epoch, batch 32,
lr 0.1. W2: the FedAvg CNN on 28x28x1, 100 clients x 100, 10 per round, 1 epoch, batch 10, lr 0.05. W3:
pfl's CIFAR-10 benchmark shape, its simple_cnn on 3x32x32, 1000 clients x 50, 50 per round, batch 10. Both
frameworks read the same data (random inputs labelled by a random linear teacher) and the same client
split; pfl runs its own FedAvg (benchmarks/peers/pfl_harness.py, set up as pfl's own benchmarks: every
user's tensors made once, FederatedDataset.from_slices) with 1 process x all threads and with
torchrun over 2 processes x 1 thread; fedbench runs its executors with 1 process and with 2 workers.
Reported: steady seconds per round (median of rounds >= 2) and training samples/s; start-up apart. Each
variant runs --repeat times, interleaved with the others; a row is its median run, with the range.
Writes benchmarks/peers/peers-<time>.json and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "benchmarks" / "peers" / "pfl_harness.py"
WORKLOADS = {
    "W1": {"model": "logreg", "shape": (1000,), "classes": 10, "clients": 100, "per_client": 500, "cohort": 20,
           "batch": 32, "lr": 0.1},
    "W2": {"model": "cnn", "shape": (1, 28, 28), "classes": 10, "clients": 100, "per_client": 100, "cohort": 10,
           "batch": 10, "lr": 0.05},
    # pfl-research's CIFAR-10 benchmark shape with its simple_cnn (fedbench backbone simple_cnn)
    "W3": {"model": "simple_cnn", "shape": (3, 32, 32), "classes": 10, "clients": 1000, "per_client": 50,
           "cohort": 50, "batch": 10, "lr": 0.05},
}


def write_data(name: str, w: dict, out: Path) -> Path:
    rng = np.random.default_rng(0)
    n = w["clients"] * w["per_client"]
    x = rng.standard_normal((n, *w["shape"])).astype(np.float32)
    teacher = rng.standard_normal((int(np.prod(w["shape"])), w["classes"])).astype(np.float32)
    y = (x.reshape(n, -1) @ teacher).argmax(1).astype(np.int64)
    owner = np.repeat(np.arange(w["clients"]), w["per_client"])
    path = out / f"{name}.npz"
    np.savez(path, x=x, y=y, owner=owner, classes=w["classes"])
    return path


def pfl_python(venv: Path) -> Path:
    """pfl-research 0.6.0 in its own venv, with this torch version (installed once)."""
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        torch_version = torch.__version__.split("+")[0]
        subprocess.run([str(py), "-m", "pip", "install", "-q", f"torch=={torch_version}", "pfl==0.6.0"], check=True)
    return py


def run_plain_torch(data: Path, w: dict, rounds: int, out: Path) -> dict:
    """The floor of any eager framework, in this process: FedAvg as a plain PyTorch loop (one module,
    torch.optim.SGD per client, contiguous batches of the client's own tensors, a weighted average);
    no framework code at all. Same model as the harness's, same cohort sizes."""
    sys.path.insert(0, str(HARNESS.parent))
    from pfl_harness import Net

    torch.set_num_threads(os.cpu_count() or 1)
    blob = np.load(data)
    x, y, owner = torch.from_numpy(blob["x"]), torch.from_numpy(blob["y"]), blob["owner"]
    users = {u: (x[owner == u].contiguous(), y[owner == u].contiguous()) for u in range(w["clients"])}
    torch.manual_seed(0)
    net = Net(w["model"], tuple(w["shape"]), w["classes"])
    global_state = {k: v.clone() for k, v in net.state_dict().items()}
    rng = np.random.default_rng(0)
    marks = [time.perf_counter()]
    for _ in range(rounds):
        total = {k: torch.zeros_like(v) for k, v in global_state.items()}
        for u in rng.choice(w["clients"], size=w["cohort"], replace=False):
            net.load_state_dict(global_state)
            opt = torch.optim.SGD(net.parameters(), lr=w["lr"])
            xu, yu = users[int(u)]
            for i in range(0, len(yu), w["batch"]):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(net(xu[i:i + w["batch"]]), yu[i:i + w["batch"]]).backward()
                opt.step()
            for k, v in net.state_dict().items():
                total[k] += v * (len(yu) / (w["cohort"] * w["per_client"]))
        global_state = total
        marks.append(time.perf_counter())
    rounds_s = np.diff(marks).tolist()
    steady = statistics.median(rounds_s[1:])
    return {"round_s": rounds_s, "steady_round_s": steady,
            "samples_per_s": w["cohort"] * w["per_client"] / steady, "startup_s": 0.0,
            "threads": torch.get_num_threads(), "processes": 1}


def run_pfl(py: Path, data: Path, w: dict, rounds: int, procs: int, out: Path) -> dict:
    result = out / f"pfl-{data.stem}-{procs}.json"
    args = [str(HARNESS), str(data), str(result), "--model", w["model"], "--rounds", str(rounds), "--cohort",
            str(w["cohort"]), "--batch", str(w["batch"]), "--lr", str(w["lr"])]
    cores = os.cpu_count() or 1
    if procs == 1:
        cmd = [str(py), *args, "--threads", str(cores)]
    else:
        from fedbench.engine.distributed import free_port

        cmd = [str(py), "-m", "torch.distributed.run", f"--nproc_per_node={procs}", f"--master_port={free_port()}",
               *args,
               "--threads", str(max(1, cores // procs))]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // procs))}
    subprocess.run(cmd, check=True, env=env, cwd=out, capture_output=True, text=True)
    return json.loads(result.read_text())


def fedbench_rank(rank: int, size: int, port: int, data: str, w: dict, rounds: int, executor: str,
                  threads: int, compile_: bool, result: str, device_name: str = "cpu") -> None:
    """One rank of a fedbench run of the workload through run_round (bench.engine_round)."""
    from fedbench.bench import Workload, build, engine_round
    from fedbench.data.clients import ClientView, make_schedule, sample_cohort
    from fedbench.engine.distributed import ShardedExecutor, World, join, leave
    from fedbench.engine.executors import BatchedExecutor, SequentialExecutor, resolve_memory_format
    from fedbench.engine.functional import split_state
    from fedbench.run.loop import synchronize

    started = time.perf_counter()
    torch.set_num_threads(threads)
    device = torch.device(device_name)
    world = join(rank, size, f"tcp://127.0.0.1:{port}", device) if size > 1 else World()
    device = world.device or device  # a CUDA rank computes on the GPU it bound
    blob = np.load(data)
    owner = blob["owner"]
    parts = [np.flatnonzero(owner == u) for u in range(w["clients"])]
    view = ClientView.build(torch.from_numpy(blob["x"]).to(device), torch.from_numpy(blob["y"]).to(device),
                            parts)
    spec = Workload(w["model"], w["model"], tuple(w["shape"]), w["classes"], w["clients"], w["per_client"],
                    w["cohort"], w["batch"], lr=w["lr"])
    model, method = build(spec, device, torch.float32)
    gstate = method.init_global(*split_state(model))
    # hardware.memory_format=auto, as the CLI runs it (channels_last conv weights for float32 conv nets)
    layout = resolve_memory_format("auto", model, device, torch.float32)
    inner = SequentialExecutor(compile_, layout) if executor == "sequential" else BatchedExecutor(compile=compile_)
    ex = ShardedExecutor(inner, world) if size > 1 else inner
    sizes = torch.as_tensor(view.sizes(), dtype=torch.float32, device=device)
    marks = [time.perf_counter()]
    for r in range(1, rounds + 1):
        cohort = sample_cohort(0, r, w["clients"], w["cohort"] / w["clients"])
        sched = make_schedule(view, cohort, 0, r, w["batch"], 1, None, torch.float32, device)
        gstate = engine_round(method, ex, gstate, view, cohort, sched, sizes, r)
        synchronize(device)
        marks.append(time.perf_counter())
    if world.is_main:
        per_round = w["cohort"] * w["per_client"]
        rounds_s = np.diff(marks).tolist()
        steady = statistics.median(rounds_s[1:])
        Path(result).write_text(json.dumps({"round_s": rounds_s, "steady_round_s": steady,
                                            "samples_per_s": per_round / steady, "startup_s": marks[0] - started,
                                            "threads": threads, "processes": size}))
    leave(world)


def run_fedbench(data: Path, w: dict, rounds: int, executor: str, procs: int, compile_: bool, out: Path,
                 device: str = "cpu") -> dict:
    from fedbench.engine.distributed import free_port

    result = out / f"fedbench-{data.stem}-{executor}-{procs}-{int(compile_)}.json"
    cores = os.cpu_count() or 1
    port = free_port()
    ctx = torch.multiprocessing.get_context("spawn")
    ps = [ctx.Process(target=fedbench_rank, args=(r, procs, port, str(data), w, rounds, executor,
                                                  max(1, cores // procs), compile_, str(result), device))
          for r in range(procs)]
    for p in ps:
        p.start()
    for p in ps:
        p.join()
    return json.loads(result.read_text())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", nargs="+", default=["W1", "W2"], choices=list(WORKLOADS))
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--pfl-venv", type=Path, default=ROOT / ".venv-pfl")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "peers")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each variant, interleaved; the table "
                    "reports the median run (by samples/s) and the range")
    ap.add_argument("--frameworks", nargs="+", default=["pfl", "fedbench", "torch"],
                    choices=["pfl", "fedbench", "torch"],
                    help="torch: a plain PyTorch FedAvg loop, the floor of an eager framework (CPU)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda: fedbench's device; pfl runs on its own "
                    "default device (CUDA when torch sees one)")
    ap.add_argument("--processes", nargs="+", type=int, default=[1, 2],
                    help="process counts to run each framework with")
    ap.add_argument("--no-compile", action="store_true", help="leave out fedbench's compiled variants")
    a = ap.parse_args(argv)
    work = a.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    py = pfl_python(a.pfl_venv) if "pfl" in a.frameworks else None
    rows = []
    for name in a.workloads:
        w = WORKLOADS[name]
        data = write_data(name, w, work)
        procs_list = a.processes
        variants = [("pfl", "own FedAvg", p, False) for p in procs_list]
        if a.device == "cpu":
            variants.append(("torch", "plain loop", 1, False))
        execs = ["batched"] if w["model"] == "logreg" else ["sequential", "batched"]
        variants += [("fedbench", e, p, False) for e in execs for p in procs_list]
        if not a.no_compile:  # compiled steps: faster steady rounds; start-up pays the compilation
            variants += [("fedbench", e, p, True) for e in execs for p in procs_list]
        variants = [v for v in variants if v[0] in a.frameworks]
        # every variant once, then again (a.repeat times): slow drifts of a shared machine hit all alike
        runs: dict[tuple, list[dict]] = {v: [] for v in variants}
        for rep in range(a.repeat):
            for framework, executor, procs, compile_ in variants:
                if framework == "pfl":
                    res = run_pfl(py, data, w, a.rounds, procs, work)
                elif framework == "torch":
                    res = run_plain_torch(data, w, a.rounds, work)
                else:
                    res = run_fedbench(data, w, a.rounds, executor, procs, compile_, work, a.device)
                runs[(framework, executor, procs, compile_)].append(res)
                label = executor + (" + compile" if compile_ else "")
                print(f"{name} [{rep + 1}/{a.repeat}] {framework:8s} {label:18s} x{procs}: "
                      f"{res['steady_round_s']:.3f} s/round, {res['samples_per_s']:.0f} samples/s "
                      f"(start-up {res['startup_s']:.1f} s)", flush=True)
        for (framework, executor, procs, compile_), results in runs.items():
            rows.append(summarise(name, framework, executor + (" + compile" if compile_ else ""), procs, results))
    write_results(rows, a.out, a.rounds, a.device)


def summarise(workload: str, framework: str, variant: str, procs: int, results: list[dict]) -> dict:
    """The median run of a variant's repeats (by steady samples/s), with every repeat's figure kept."""
    ordered = sorted(results, key=lambda r: r["samples_per_s"])
    median = ordered[(len(ordered) - 1) // 2]
    return {"workload": workload, "framework": framework, "variant": variant, "processes": procs, **median,
            "first_round_s": median["round_s"][0],  # includes any compilation
            "repeats_samples_per_s": [r["samples_per_s"] for r in results]}


def write_results(rows: list[dict], out: Path, rounds: int, device: str = "cpu") -> None:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    meta = {"time": stamp, "cpu": f"{os.cpu_count()} cores", "torch": torch.__version__, "rounds": rounds,
            "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu",
            "steady": "median of rounds >= 2; each row the median of its interleaved repeats"}
    (out / f"peers-{stamp}.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    lines = ["| workload | framework | variant | processes | steady s/round | samples/s | start-up s | first round s |"
             " repeats' samples/s | vs pfl best |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in sorted({r["workload"] for r in rows}):
        best_pfl = max((r["samples_per_s"] for r in rows if r["workload"] == name and r["framework"] == "pfl"),
                       default=float("nan"))
        for r in (r for r in rows if r["workload"] == name):
            lines.append(f"| {name} | {r['framework']} | {r['variant']} | {r['processes']} | "
                         f"{r['steady_round_s']:.3f} | {r['samples_per_s']:,.0f} | {r['startup_s']:.1f} | "
                         f"{r['first_round_s']:.1f} | {spread(r['repeats_samples_per_s'])} | "
                         f"{r['samples_per_s'] / best_pfl:.2f}x |")
    table = "\n".join(lines) + "\n"
    (out / f"peers-{stamp}.md").write_text(table)
    print(table)


def spread(values: list[float]) -> str:
    return f"{min(values):,.0f}-{max(values):,.0f}" if len(values) > 1 else f"{values[0]:,.0f}"


if __name__ == "__main__":
    main()
