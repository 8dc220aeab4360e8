"""Fused sweeps (hydra/launcher=fused): several runs of a sweep as one computation give every job exactly
what it gets as a separate run (float64), keep diverged jobs apart, and resume exactly after SIGTERM."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch

from conftest import TINY, compose_cfg
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
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
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
