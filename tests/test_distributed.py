"""One run over several processes (torch.distributed, gloo on CPU): the cohort is sharded over the ranks
and the result is the one-process result, in float64, with the same bytes; a preempted multi-process run
resumes exactly; torchrun starts it too."""

import os
import subprocess
import sys

import pytest
import torch
from torch.utils._pytree import tree_leaves

from conftest import compose_cfg, read_jsonl
from fedbench.errors import Preempted
from fedbench.experiment import run_experiment

BASE = ["dataset=digits", "backbone=mlp", "backbone.hidden=[16]", "clients=10", "participation=0.5", "rounds=3",
        "batch_size=16", "hardware=cpu", "hardware.dtype=float64", "logger=local", "progress=false",
        "checkpoint_every=1", "local_epochs=2", "method.momentum=0.5"]


def states(run_dir):
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    return tree_leaves([ckpt["gstate"], ckpt["cstates"]])


def assert_same(a_dir, b_dir):
    for x, y in zip(states(a_dir), states(b_dir), strict=True):
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            assert float((x - y).abs().max() / x.abs().max().clamp_min(1e-30)) <= 1e-10
        elif isinstance(x, torch.Tensor):
            assert torch.equal(x, y)
        else:
            assert x == y
    rows_a, rows_b = (read_jsonl(d / "metrics.jsonl") for d in (a_dir, b_dir))
    assert len(rows_a) == len(rows_b)
    for ra, rb in zip(rows_a, rows_b, strict=True):  # same bytes exactly; loss and accuracy to float64 rounding
        keys = {k for k in ra if not k.startswith(("time/", "throughput/"))}
        assert keys == {k for k in rb if not k.startswith(("time/", "throughput/"))}
        for k in keys:
            if isinstance(ra[k], float):
                assert ra[k] == pytest.approx(rb[k], rel=1e-10, abs=1e-12), k
            else:
                assert ra[k] == rb[k], k


@pytest.mark.parametrize("method,executor", [("fedavg", "batched"), ("scaffold", "sequential"),
                                             ("fedrep", "batched"), ("fediterht", "batched")])
def test_two_workers_equal_one_process(tmp_path, method, executor):
    cfg = BASE + [f"method={method}", f"hardware.executor={executor}"]
    if method == "fedrep":
        cfg += ["partition=noniid_s", "clients=5", "method.head_epochs=1", "method.body_epochs=1"]
    one = run_experiment(compose_cfg(cfg), tmp_path / "one")
    two = run_experiment(compose_cfg(cfg + ["hardware.workers=2"]), tmp_path / "two")
    assert two["executor"] == f"{executor} x2 workers"
    assert one["comm/bytes_total"] == two["comm/bytes_total"]
    assert_same(tmp_path / "one", tmp_path / "two")


def test_a_preempted_two_worker_run_resumes_exactly(tmp_path):
    cfg = BASE + ["method=scaffold", "rounds=4"]
    run_experiment(compose_cfg(cfg), tmp_path / "one")
    with pytest.raises(Preempted):
        run_experiment(compose_cfg(cfg + ["hardware.workers=2"]), tmp_path / "two", stop_after=2)
    run_experiment(compose_cfg(cfg + ["hardware.workers=2"]), tmp_path / "two")
    assert_same(tmp_path / "one", tmp_path / "two")


def test_torchrun_starts_the_same_run(tmp_path):
    cfg = BASE + ["method=fedavg"]
    run_experiment(compose_cfg(cfg), tmp_path / "one")
    from fedbench.engine.distributed import free_port

    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={free_port()}",
                           "-m", "fedbench", *cfg, f"hydra.run.dir={tmp_path / 'tr'}"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "WANDB_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("fedbench summary") == 1  # rank 0 alone reports
    assert_same(tmp_path / "one", tmp_path / "tr")


def test_spawned_ranks_exit_within_seconds_when_rank_0_dies(tmp_path):
    """SIGKILL of rank 0 (out of memory, a cancelled job): the rank it started ends within seconds instead
    of waiting torch.distributed's 30-minute timeout as an orphan."""
    import signal
    import time
    from pathlib import Path

    from conftest import TINY, read_jsonl

    run_dir = tmp_path / "run"
    args = [*TINY, "backbone=mlp", "rounds=2000", "hardware.workers=2", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen([sys.executable, "-m", "fedbench", *args], cwd=tmp_path,
                            env={**os.environ, "WANDB_MODE": "disabled"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not (run_dir / "metrics.jsonl").exists()
                                      or len(read_jsonl(run_dir / "metrics.jsonl")) < 3):
        time.sleep(0.2)

    def children(pid: int) -> list[int]:
        return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and (p / "stat").exists()
                and int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid]

    ranks = [c for c in children(proc.pid) if "spawn" in (Path("/proc") / str(c) / "cmdline").read_text()]
    assert ranks, "rank 1 was not found"
    def alive(pid: int) -> bool:  # a zombie (ended, not yet reaped by init) counts as gone
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(alive(r) for r in ranks):
        time.sleep(0.2)
    assert not any(alive(r) for r in ranks), "rank 1 outlived rank 0 by 10 s"
