"""Sweeps through a REAL one-node SLURM (scripts/slurm_local.sh; .ci/run starts it as root).
Skipped, with the reason, only where SLURM cannot be started."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import PLUGIN_CONF, PLUGIN_ENV, TINY, compose_cfg, read_jsonl, run_cli
from fedbench.experiment import run_experiment

ROOT = Path(__file__).resolve().parents[1]


def slurm_up() -> bool:
    if not shutil.which("sinfo"):
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True)
    return out.returncode == 0 and any(s in out.stdout for s in ("idle", "mix", "alloc"))


def ensure_slurm() -> str | None:
    """None when SLURM is usable, else why not."""
    if slurm_up():
        return None
    if os.geteuid() != 0:
        return "SLURM is not running and starting it needs root (run scripts/slurm_local.sh start as root)"
    subprocess.run(["bash", str(ROOT / "scripts" / "slurm_local.sh"), "start"], capture_output=True, timeout=600)
    return None if slurm_up() else "scripts/slurm_local.sh could not start SLURM here (see /tmp/slurm_install.log)"


_reason = ensure_slurm()
# `make test` runs these after the rest, alone: they wait on a 2-CPU cluster and read `squeue`
pytestmark = [pytest.mark.skipif(_reason is not None, reason=_reason or ""), pytest.mark.slurm]

SLURM = ["hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
         "hydra.launcher.timeout_min=20"]


def test_four_job_sweep_through_sbatch(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(["--multirun", *TINY, "partition.alpha=0.1,1.0", "seed=0,1", *SLURM,
                    f"hydra.sweep.dir={sweep}"], tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = sorted(sweep.glob("*/summary.json"))
    assert len(summaries) == 4
    assert all(json.loads(p.read_text())["status"] == "completed" for p in summaries)
    # one SLURM array job with 4 tasks: they went through sbatch
    tasks = sorted(p.name for p in (sweep / ".submitit").iterdir() if p.is_dir() and "_" in p.name)
    assert len(tasks) == 4 and len({t.split("_")[0] for t in tasks}) == 1
    assert list((sweep / ".submitit").glob("*/*_submission.sh"))
    assert all(list((sweep / ".submitit" / t).glob("*_log.out")) for t in tasks)


def test_requeued_job_resumes_and_matches_uninterrupted(tmp_path):
    job = [*TINY, "backbone=mlp", "rounds=300", "checkpoint_every=10", "clients=10", "participation=0.5"]
    sweep = tmp_path / "sweep"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "fedbench", "--multirun", *job, *SLURM, f"hydra.sweep.dir={sweep}"], cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    metrics = sweep / "0" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.exists() or len(read_jsonl(metrics)) < 40):
        time.sleep(0.5)
    rows_before = len(read_jsonl(metrics))
    assert rows_before < 300, "the job finished before it could be requeued; make it longer"
    job_id = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()[0]
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    # a requeued job is held ~2 minutes (BeginTime); release it to keep CI short. An update sent while the
    # job is still completing is overwritten by the requeue, so wait until it is pending on BeginTime.
    for _ in range(60):
        time.sleep(0.5)
        state = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T %r"], capture_output=True,
                               text=True).stdout.split()
        if state[:2] == ["PENDING", "BeginTime"]:
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True)
        elif state[:1] == ["RUNNING"]:
            break
    out, _ = launcher.communicate(timeout=900)
    assert launcher.returncode == 0, out[-3000:]
    restarts = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    assert "Restarts=1" in restarts, restarts
    resumed = json.loads((sweep / "0" / "summary.json").read_text())
    rows = read_jsonl(metrics)
    assert [r["round"] for r in rows] == list(range(1, 301))  # no round lost or doubled
    # the same experiment, uninterrupted, in this process
    ref = run_experiment(compose_cfg(job), tmp_path / "ref")
    for key in ("status", "best/val_acc", "best/round", "best/test_acc", "final/test_acc", "comm/bytes_total"):
        assert resumed[key] == ref[key], key
    a = torch.load(sweep / "0" / "checkpoint.pt", weights_only=False)["gstate"]["params"]
    b = torch.load(tmp_path / "ref" / "checkpoint.pt", weights_only=False)["gstate"]["params"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_invalid_combination_submits_nothing(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(["--multirun", *TINY, "partition.alpha=0,0.5", "seed=0,1", *SLURM, f"hydra.sweep.dir={sweep}"],
                   tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fedbench: error:")]
    assert len(errors) == 1 and "partition.alpha=0" in errors[0], proc.stderr
    assert not (sweep / ".submitit").exists()  # nothing went to sbatch


def test_a_failing_job_does_not_hang_the_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(["--multirun", *TINY, "rounds=3", "method=failing", "method.fail_seed=2", "seed=0,1,2,3",
                    PLUGIN_CONF, *SLURM, f"hydra.sweep.dir={sweep}"], tmp_path, PLUGIN_ENV, timeout=900)
    returned = time.time()
    assert proc.returncode == 1, proc.stderr[-3000:]
    summaries = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/summary.json")}
    assert [summaries[str(i)]["status"] for i in range(4)] == ["completed", "completed", "failed", "completed"]
    assert "planned failure at round 2" in summaries["2"]["reason"]
    last_job_end = max(p.stat().st_mtime for p in sweep.glob("*/summary.json"))
    assert returned - last_job_end < 60, returned - last_job_end  # no waiting on accounting that is not there
    assert "3 completed, 1 failed" in proc.stderr


def test_an_unschedulable_request_is_refused_before_submitting(tmp_path):
    """2 tasks x 2 CPUs on a partition of 2-CPU nodes would stay PENDING forever: one line naming the keys,
    exit 2, nothing submitted."""
    sweep = tmp_path / "sweep"
    proc = run_cli(["--multirun", *TINY, "seed=0,1", "hydra/launcher=slurm", "hydra.launcher.tasks_per_node=2",
                    f"hydra.launcher.cpus_per_task={os.cpu_count()}", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fedbench: error:")]
    assert len(errors) == 1 and "hydra.launcher.cpus_per_task" in errors[0] and "CPUs per node" in errors[0]
    assert not sweep.exists()


def _queue() -> list[str]:
    return subprocess.run(["squeue", "-h", "-o", "%i %T %r"], capture_output=True, text=True).stdout.split("\n")


def test_a_job_that_can_never_be_scheduled_ends_the_sweep_with_the_reason(tmp_path):
    """Past the pre-check (FEDBENCH_SLURM_PRECHECK=0, as on a cluster whose sinfo misleads), SLURM keeps the
    job PENDING (PartitionConfig): the launching command cancels it and ends with the account naming the
    reason, within a minute, exit != 0."""
    sweep = tmp_path / "sweep"
    started = time.time()
    proc = run_cli(["--multirun", *TINY, "seed=0", *SLURM, "hydra.launcher.tasks_per_node=2",
                    f"hydra.launcher.cpus_per_task={os.cpu_count()}", f"hydra.sweep.dir={sweep}"], tmp_path,
                   {"FEDBENCH_SLURM_PRECHECK": "0"}, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert time.time() - started < 60
    assert "1 failed" in proc.stderr and "never scheduled" in proc.stderr and "PartitionConfig" in proc.stderr
    summary = json.loads((sweep / "0" / "summary.json").read_text())
    assert summary["status"] == "failed" and "PartitionConfig" in summary["reason"]
    assert not [line for line in _queue() if line.strip()]  # the job was cancelled, not left pending


def test_a_cancelled_task_ends_the_sweep_with_the_account(tmp_path):
    """scancel of one task (no accounting to learn it from): the launching command ends within 60 s of the
    last job's end, with the account (the cancelled job is preempted: its checkpoint resumes it), exit 1.
    Job 0 is held still in round 3 (a test method waits for a file that never comes); job 1 runs through."""
    sweep = tmp_path / "sweep"
    job = [*TINY, "rounds=4", "method=waiting", "method.wait_round=3",
           f"method.gate={tmp_path / 'never'},''", PLUGIN_CONF]
    launcher = subprocess.Popen(
        [sys.executable, "-m", "fedbench", "--multirun", *job, *SLURM, f"hydra.sweep.dir={sweep}"], cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "WANDB_MODE": "disabled", "FEDBENCH_SLURM_GRACE_S": "3", **PLUGIN_ENV})
    metrics = sweep / "0" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.exists() or len(read_jsonl(metrics)) < 2):
        time.sleep(0.5)
    task = next(line.split()[0] for line in _queue() if line.strip().endswith(("RUNNING None", "RUNNING")) and
                line.split()[0].endswith("_0"))
    subprocess.run(["scancel", task], check=True)
    out, _ = launcher.communicate(timeout=600)
    returned = time.time()
    assert launcher.returncode == 1, out[-3000:]
    last_job_end = max(p.stat().st_mtime for p in sweep.glob("*/summary.json"))
    assert returned - last_job_end < 60, returned - last_job_end
    assert "1 completed, 1 preempted" in out and "rerun the same command to resume it" in out, out[-2000:]
    assert json.loads((sweep / "0" / "summary.json").read_text())["status"] == "preempted"
    assert json.loads((sweep / "1" / "summary.json").read_text())["status"] == "completed"


def test_a_study_runs_its_batches_through_sbatch(tmp_path):
    """fedbench-study with launcher=slurm: each batch is one SLURM array; the table comes back."""
    import yaml

    base = [o for o in TINY if not o.startswith("rounds=")]  # the study sets the rounds
    spec = {"name": "on_slurm", "base": base, "wandb": {"mode": "disabled"},
            "settings": [{"name": "a1", "overrides": ["partition.alpha=1.0"]}],
            "methods": [{"name": "fedavg", "overrides": ["method=fedavg"]}],
            "space": {"lr": "tag(log, interval(0.01, 0.5))"}, "budget": {"trials": 2, "rounds": 2},
            "tune_seeds": [100], "seeds": [0, 1], "parallel_trials": 2, "launcher": "slurm",
            "launcher_overrides": [o for o in SLURM if o != "hydra/launcher=slurm"]}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "fedbench.study", str(path), "--dir", str(tmp_path / "s")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for batch in (tmp_path / "s" / "tune" / "a1" / "batch-000", tmp_path / "s" / "final" / "a1"):
        tasks = [p.name for p in (batch / ".submitit").iterdir() if p.is_dir() and "_" in p.name]
        assert len(tasks) == 2 and len({t.split("_")[0] for t in tasks}) == 1  # one array of 2 tasks
    table = json.loads((tmp_path / "s" / "table" / "study.json").read_text())
    (row,) = table["rows"]
    assert row["n"] == 2 and row["trials"] == 2 and row["trials_failed"] == 0 and row["best"]
