"""Fused sweeps (hydra/launcher=fused): several runs of a sweep as one computation give every job exactly
what it gets as a separate run (float64), keep diverged jobs apart, and resume exactly after SIGTERM."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY, compose_cfg, run_cli
from fedbench.experiment import run_experiment
from fedbench.run.fused import open_run, run_group

F64 = [*TINY, "hardware.dtype=float64", "hardware.executor=batched", "partition=dirichlet", "rounds=3"]
TIME_KEYS = ("time/", "throughput/", "memory/")


def rows(run_dir: Path) -> list[dict]:
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        out.append({k: v for k, v in row.items() if not k.startswith(TIME_KEYS)})
    return out


def final_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    flat: dict[str, torch.Tensor] = {}

    def walk(prefix: str, tree: object) -> None:
        if isinstance(tree, dict):
            for k, v in tree.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(tree, torch.Tensor):
            flat[prefix] = tree

    walk("g", ckpt["gstate"])
    walk("c", ckpt["cstates"])
    return flat


def assert_close_rows(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys()
        for k, va in ra.items():
            vb = rb[k]
            if isinstance(va, float) and isinstance(vb, float):
                assert va == pytest.approx(vb, rel=1e-10, abs=1e-12), k
            else:
                assert va == vb, k


def run_fused(jobs: list[list[str]], root: Path) -> list:
    cfgs = [compose_cfg(job) for job in jobs]
    with contextlib.ExitStack() as locks:
        runs = [open_run(cfg, root / str(i), None, locks) for i, cfg in enumerate(cfgs)]
        return run_group(runs)


def check_fused_equals_separate(jobs: list[list[str]], tmp_path: Path) -> None:
    outcomes = run_fused(jobs, tmp_path / "fused")
    assert all(o.error is None for o in outcomes), [o.summary.get("reason") for o in outcomes]
    assert all(o.summary["fused_runs"] == len(jobs) for o in outcomes)
    for i, job in enumerate(jobs):
        alone = tmp_path / "alone" / str(i)
        summary = run_experiment(compose_cfg(job), alone)
        fused = tmp_path / "fused" / str(i)
        assert_close_rows(rows(fused), rows(alone))
        a, b = final_tensors(fused), final_tensors(alone)
        assert a.keys() == b.keys()
        for k in a:
            scale = b[k].abs().max().clamp_min(1e-30)
            assert float((a[k] - b[k]).abs().max() / scale) <= 1e-10, k
        for key in ("comm/bytes_up_total", "comm/bytes_down_total"):
            assert outcomes[i].summary[key] == summary[key]


@pytest.mark.parametrize("method", ["fedavg", "scaffold"])
def test_fused_equals_separate_runs_over_seeds_alphas_and_lr(method: str, tmp_path: Path) -> None:
    jobs = [[*F64, f"method={method}", f"seed={seed}", f"partition.alpha={alpha}", f"lr={lr}"]
            for seed, lr in ((0, 0.05), (1, 0.2)) for alpha in (0.1, 0.5, 5.0)]
    check_fused_equals_separate(jobs, tmp_path)


def test_fused_flops_over_target_density_and_prune_start(tmp_path: Path) -> None:
    """Gates, lambda, density and TDR per job equal separate runs' (FLoPS's control flow on
    prune_start stays each run's own: the server side is per run)."""
    base = ["+experiment=flops_synthetic_logistic", "rounds=4", "dataset.n=700", "dataset.d=60",
            "logger=local", "progress=false", "hardware=cpu", "hardware.dtype=float64",
            "hardware.executor=batched", "checkpoint_every=1"]
    jobs = [[*base, f"method.target_density={rho}", f"method.prune_start={start}"]
            for rho in (0.05, 0.2) for start in (1, 3)]
    check_fused_equals_separate(jobs, tmp_path)
    for i in range(len(jobs)):
        s = json.loads((tmp_path / "fused" / str(i) / "summary.json").read_text())
        t = json.loads((tmp_path / "alone" / str(i) / "summary.json").read_text())
        assert s["fused_runs"] == 4 and t["fused_runs"] == 1
        for key in ("sparsity/density", "sparsity/tdr", "flops/lambda", "sparsity/expected_density"):
            assert s[key] == pytest.approx(t[key], rel=1e-10), key


def test_fused_personalized_method(tmp_path: Path) -> None:
    jobs = [[*F64, "method=fedper", "backbone=mlp", "partition.client_test_fraction=0.2", f"seed={seed}",
             f"lr={lr}"]
            for seed, lr in ((0, 0.05), (1, 0.1), (2, 0.2))]
    check_fused_equals_separate(jobs, tmp_path)


UNSTABLE = ["dataset=synthetic_linear", "dataset.d=20", "dataset.n=400", "backbone=logreg", "clients=4",
            "rounds=6", "logger=local", "progress=false", "hardware=cpu", "hardware.dtype=float64"]


def test_a_diverged_job_leaves_its_fused_group_and_the_others_match_separate_runs(tmp_path: Path) -> None:
    from fedbench.report import report

    sweep = ["--multirun", *UNSTABLE, "lr=1e8,0.01", "seed=0,1"]
    fused = run_cli([*sweep, "hydra/launcher=fused", f"hydra.sweep.dir={tmp_path / 'fused'}"], tmp_path)
    assert fused.returncode == 1 and "2 completed, 2 diverged" in fused.stderr, fused.stderr[-2000:]
    assert "fused launcher: 4 jobs in 1 group(s)" in fused.stdout + fused.stderr
    for i, (lr, seed) in enumerate((lr, seed) for lr in ("1e8", "0.01") for seed in (0, 1)):
        a = json.loads((tmp_path / "fused" / str(i) / "summary.json").read_text())
        assert a["fused_runs"] == 4 and a["status"] == ("diverged" if lr == "1e8" else "completed")
        if a["status"] == "completed":  # the same numbers as the job run on its own
            alone = tmp_path / "alone" / str(i)
            run_experiment(compose_cfg([*UNSTABLE, f"lr={lr}", f"seed={seed}"]), alone)
            assert_close_rows(rows(tmp_path / "fused" / str(i)), rows(alone))
        else:
            assert "training loss is" in a["reason"]
    res = report(tmp_path / "fused", tmp_path / "out")
    agg = res["summary"].set_index("lr")
    assert agg.loc["100000000.0", "runs ok"] == "0/2" and agg.loc["0.01", "runs ok"] == "2/2"


def test_sigterm_stops_a_fused_group_and_the_same_command_resumes_every_job_exactly(tmp_path: Path) -> None:
    jobs = [*TINY, "rounds=40", "eval_every=20", "checkpoint_every=20", "hardware.dtype=float64",
            "hardware.executor=batched",
            "seed=0,1", "lr=0.05,0.1"]
    cmd = [sys.executable, "-m", "fedbench", "--multirun", *jobs, "hydra/launcher=fused"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    stopped = tmp_path / "stopped"
    proc = subprocess.Popen([*cmd, f"hydra.sweep.dir={stopped}"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (stopped / "3" / "metrics.jsonl").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 4, err[-2000:]
    states = [json.loads((stopped / str(i) / "summary.json").read_text()) for i in range(4)]
    assert {s["status"] for s in states} == {"preempted"} and all(s["rounds_done"] < 40 for s in states)
    again = subprocess.run([*cmd, f"hydra.sweep.dir={stopped}"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0 and "4 completed" in again.stderr, again.stderr[-2000:]
    fixed = [j for j in jobs if not j.startswith(("seed=", "lr="))]
    whole = tmp_path / "whole"  # the same group, uninterrupted, in this process
    run_fused([[*fixed, f"seed={seed}", f"lr={lr}"] for seed in (0, 1) for lr in (0.05, 0.1)], whole)
    for i in range(4):
        a, b = final_tensors(stopped / str(i)), final_tensors(whole / str(i))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert rows(stopped / str(i))[-1] == rows(whole / str(i))[-1]


def test_plan_groups_fuses_what_may_differ_and_says_why_a_job_runs_alone() -> None:
    from fedbench.run.fused_sweep import plan_groups

    base = [*TINY, "method=fedavg"]
    cfgs = [compose_cfg([*base, "seed=0", "lr=0.1"]), compose_cfg([*base, "seed=1", "partition.alpha=0.1"]),
            compose_cfg([*base, "batch_size=32"]), compose_cfg([*base, "method=ditto"]),
            compose_cfg([*base, "method=fediterht", "method.target_density=0.1"]),
            compose_cfg([*base, "method=fediterht", "method.target_density=0.2"]),
            compose_cfg([*base, "method=fedprox", "method.mu=0.1"]),
            compose_cfg([*base, "method=fedprox", "method.mu=1.0"])]
    plan = plan_groups(cfgs, max_fused=64)
    groups = {tuple(g): why for g, why in plan}
    assert groups[(0, 1)] is None and groups[(6, 7)] is None
    assert "batch_size" in groups[(2,)]
    assert "does not declare itself fusable" in groups[(3,)]
    assert "method.target_density" in groups[(4,)] and "method.target_density" in groups[(5,)]
    assert [g for g, _ in plan_groups(cfgs[:2] + cfgs[6:], max_fused=1)] == [[0], [1], [2], [3]]


def test_shared_composition_gives_hydras_own_configs() -> None:
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from fedbench.composition import shared_composition

    jobs = [["+experiment=flops_synthetic_logistic", f"seed={s}", f"method.target_density={d}"]
            for s in (0, 1) for d in (0.05, 0.1)]
    jobs += [["method=scaffold", "partition=iid", "lr=0.2"], ["method=fedper", "+callbacks=[early_stop]"],
             ["hydra/launcher=fused", "seed=3"]]
    with initialize_config_module(config_module="fedbench.conf", version_base="1.3"):
        plain = [OmegaConf.to_yaml(compose("config", overrides=j, return_hydra_config=True)) for j in jobs]
        with shared_composition():
            shared = [OmegaConf.to_yaml(compose("config", overrides=j, return_hydra_config=True)) for j in jobs]
            again = [OmegaConf.to_yaml(compose("config", overrides=j, return_hydra_config=True)) for j in jobs]
    assert shared == plain and again == plain


def test_each_fused_job_has_its_own_wandb_run(tmp_path: Path) -> None:
    from fedbench.tracking.wandb_file import read_run

    jobs = [[*F64, "rounds=2", "logger=wandb", "logger.wandb.mode=offline", "logger.wandb.group=g",
             f"seed={seed}"] for seed in (0, 1, 2)]
    outcomes = run_fused(jobs, tmp_path)
    assert all(o.error is None and o.summary["fused_runs"] == 3 for o in outcomes)
    for i in range(3):
        files = list((tmp_path / str(i)).glob("wandb/offline-run-*/run-*.wandb"))
        assert len(files) == 1
        run = read_run(files[0])
        hist = [h for h in run["history"] if "global/val_acc" in h]
        assert [h["global/val_acc"] for h in hist] == [r["global/val_acc"] for r in rows(tmp_path / str(i))]
        assert run["group"] == "g" and run["config"]["seed"] == i
        assert run["summary"]["best/val_acc"] == outcomes[i].summary["best/val_acc"]


@pytest.mark.parametrize("method,key,values", [("fedprox", "mu", (0.01, 1.0)),
                                               ("flops_pa", "eta_phi_local", (0.01, 0.2))])
def test_keys_the_clients_read_are_per_run_in_a_fused_group(method: str, key: str, values: tuple,
                                                            tmp_path: Path) -> None:
    extra = ["method.prune_start=1", "dataset=synthetic_logistic", "dataset.d=30", "dataset.n=400"] \
        if method == "flops_pa" else []
    jobs = [[*F64, f"method={method}", *extra, f"method.{key}={v}", f"lr={lr}"]
            for v, lr in zip(values, (0.05, 0.1), strict=True)]
    check_fused_equals_separate(jobs, tmp_path)
