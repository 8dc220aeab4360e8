"""What a GPU run needs, checked on the CPU: collectives on the backend's device (recorded from real gloo
processes) and the device each rank binds; bfloat16 through both executors with BatchNorm; the batched
executor's length buckets (padding <= 1.2x at Dirichlet 0.1, same results as the cohort order)."""

import json

import numpy as np
import pytest
import torch

from conftest import compose_cfg, read_jsonl, run_cli
from fedbench.engine.distributed import place
from fedbench.engine.executors import computed_steps, length_buckets, padding_factor
from fedbench.experiment import run_experiment
from fedbench.metrics import names


def params(run_dir):
    return torch.load(run_dir / "checkpoint.pt", weights_only=False)["gstate"]["params"]


def rel_distance(a: dict, b: dict) -> float:
    num = sum(float((a[k].double() - b[k].double()).norm() ** 2) for k in a)
    return (num / sum(float(b[k].double().norm() ** 2) for k in b)) ** 0.5


@pytest.mark.parametrize("env,rank,size,gpus,want", [
    ({"LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4"}, 7, 8, 4, ("cuda:3", "nccl", "cuda:3")),  # torchrun, node 2
    ({"SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "2"}, 3, 4, 2, ("cuda:1", "nccl", "cuda:1")),
    ({}, 1, 2, 2, ("cuda:1", "nccl", "cuda:1")),              # hardware.workers=2 on a 2-GPU node
    ({}, 3, 4, 1, ("cuda:0", "gloo", "cpu")),                 # 4 ranks filling one GPU: NCCL cannot
    ({"LOCAL_RANK": "1"}, 1, 2, 2, ("cuda:1", "nccl", "cuda:1")),
])
def test_each_rank_binds_its_own_gpu_and_nccl_talks_on_it(env, rank, size, gpus, want):
    p = place(rank, size, torch.device("cuda"), gpus, env)
    assert (str(p.device), p.backend, str(p.comm_device)) == want


def test_a_named_gpu_or_the_cpu_is_kept():
    p = place(1, 2, torch.device("cuda", 0), 4, {"LOCAL_RANK": "1"})  # hardware.device=cuda:0: all on 0
    assert (str(p.device), p.backend, str(p.comm_device)) == ("cuda:0", "gloo", "cpu")
    p = place(1, 2, torch.device("cpu"), 0, {"LOCAL_RANK": "1"})
    assert (str(p.device), p.backend, str(p.comm_device)) == ("cpu", "gloo", "cpu")


@pytest.mark.parametrize("method", ["fedavg", "fedrep"])  # shares all-reduced; uplinks all-gathered
def test_every_collective_gets_tensors_on_the_communication_device(tmp_path, monkeypatch, method):
    log = tmp_path / "collectives"
    log.mkdir()
    monkeypatch.setenv("FEDBENCH_COLLECTIVE_LOG", str(log))  # spawned ranks inherit it
    base = ["dataset=digits", "backbone=mlp", "backbone.hidden=[16]", "clients=6", "participation=0.5",
            "rounds=2", "batch_size=16", "hardware=cpu", "hardware.dtype=float64", "logger=local",
            "progress=false", "checkpoint_every=1", "hardware.executor=batched", f"method={method}"]
    if method == "fedrep":
        base += ["partition=noniid_s", "method.head_epochs=1", "method.body_epochs=1"]
    two = run_experiment(compose_cfg(base + ["hardware.workers=2"]), tmp_path / "two")
    rows = {rank: read_jsonl(log / f"rank{rank}.jsonl") for rank in (0, 1)}
    for rank, recorded in rows.items():
        ops = {r["op"] for r in recorded}
        assert {"all_reduce", "all_gather", "broadcast_object"} <= ops, (rank, ops)
        for r in recorded:
            assert r["backend"] == "gloo" and r["comm_device"] == "cpu"
            assert r["device"] in (None, r["comm_device"]), r
    assert [r["op"] for r in rows[0]] == [r["op"] for r in rows[1]]  # the ranks call them in step
    monkeypatch.delenv("FEDBENCH_COLLECTIVE_LOG")
    one = run_experiment(compose_cfg(base), tmp_path / "one")
    assert one["comm/bytes_total"] == two["comm/bytes_total"]
    a, b = params(tmp_path / "one"), params(tmp_path / "two")
    assert max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-30)) for k in a) <= 1e-10


@pytest.mark.parametrize("backbone", [["backbone=resnet18", "backbone.norm=batch", "backbone.width=8"],
                                      ["backbone=cnn"]])
def test_bfloat16_runs_both_executors_close_to_float32(tmp_path, backbone):
    args = ["--multirun", *backbone, "dataset=digits", "hardware=cpu", "hardware.dtype=bfloat16,float32",
            "hardware.executor=batched,sequential", "rounds=1", "clients=4", "participation=0.5",
            "local_steps=2", "logger=local", "progress=false", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    out = run_cli(args, tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    jobs = {}
    for run_dir in (tmp_path / "sweep").iterdir():
        if run_dir.is_dir():
            cfg = json.loads((run_dir / "summary.json").read_text())
            over = (run_dir / ".hydra" / "overrides.yaml").read_text()
            dtype = "bfloat16" if "dtype=bfloat16" in over else "float32"
            executor = "batched" if "executor=batched" in over else "sequential"
            assert cfg["status"] == "completed"
            jobs[dtype, executor] = params(run_dir)
    assert len(jobs) == 4
    for executor in ("batched", "sequential"):
        low, full = jobs["bfloat16", executor], jobs["float32", executor]
        assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in low.values())
        # two steps of a BatchNorm net at init: bfloat16's 8-bit mantissa moves the weights ~3%
        assert rel_distance(low, full) < 0.1, executor


def test_length_buckets_bound_the_padding_of_every_group():
    rng = np.random.default_rng(0)
    for _ in range(200):
        steps = rng.integers(0, 60, size=rng.integers(1, 80))
        chunk = [None, 3, 16][rng.integers(3)]
        buckets = length_buckets(steps, 1.2, chunk)
        assert sorted(np.concatenate(buckets).tolist()) == list(range(len(steps)))
        for b in buckets:
            assert chunk is None or len(b) <= chunk
            computed, real = computed_steps(steps, [b])
            assert computed <= 1.2 * real or real == 0
        assert padding_factor(*computed_steps(steps, buckets)) <= 1.2
    unsorted = length_buckets(np.array([5, 1, 5, 1]), None, None)  # null: the cohort order, one chunk
    assert [b.tolist() for b in unsorted] == [[0, 1, 2, 3]]


def test_dirichlet_01_padding_is_at_most_1_2_with_the_unbucketed_results(tmp_path, tiny):
    cfg = tiny + ["partition=dirichlet", "partition.alpha=0.1", "clients=20", "participation=0.5",
                  "rounds=3", "backbone=mlp", "backbone.hidden=[16]", "batch_size=8", "local_epochs=2",
                  "hardware.dtype=float64", "hardware.executor=batched", "method=scaffold"]
    run_experiment(compose_cfg(cfg), tmp_path / "buckets")
    run_experiment(compose_cfg(cfg + ["hardware.max_padding=null"]), tmp_path / "order")
    run_experiment(compose_cfg(cfg + ["hardware.executor=sequential"]), tmp_path / "seq")
    factor = {d: [r[names.PADDING_FACTOR] for r in read_jsonl(tmp_path / d / "metrics.jsonl")]
              for d in ("buckets", "order", "seq")}
    assert all(f <= 1.2 for f in factor["buckets"]), factor
    assert all(f > 1.5 for f in factor["order"]), factor  # the whole cohort to its longest client
    assert factor["seq"] == [1.0] * 3
    a, b = params(tmp_path / "buckets"), params(tmp_path / "order")
    assert max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-30)) for k in a) <= 1e-10
    ca = torch.load(tmp_path / "buckets" / "checkpoint.pt", weights_only=False)["cstates"]
    cb = torch.load(tmp_path / "order" / "checkpoint.pt", weights_only=False)["cstates"]
    for k in ca:
        torch.testing.assert_close(ca[k], cb[k], rtol=1e-10, atol=1e-12)
    rows_a, rows_b = (read_jsonl(tmp_path / d / "metrics.jsonl") for d in ("buckets", "order"))
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert ra[names.TRAIN_LOSS] == pytest.approx(rb[names.TRAIN_LOSS], rel=1e-12)
