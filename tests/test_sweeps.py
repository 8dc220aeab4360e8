"""Sweeps that never hang, never lie and never lose a run (local launchers; SLURM in test_slurm.py):
every job is validated before any starts; a job that fails is recorded and the rest go on; the command
ends with an account and exit != 0; the report leaves failed runs out of the means; checkpoints survive
a torn file; a run dir has one writer."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import PLUGIN_CONF, PLUGIN_ENV, TINY, compose_cfg, read_jsonl, run_cli
from fedbench.errors import Preempted
from fedbench.experiment import run_experiment
from fedbench.report import report

LAUNCHERS = {"basic": [], "joblib": ["hydra/launcher=local_parallel", "hydra.launcher.n_jobs=2"]}


def jobs_in(sweep):
    return sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()) if sweep.exists() else []


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_an_invalid_combination_launches_nothing(tmp_path, launcher):
    sweep = tmp_path / "sweep"
    proc = run_cli(["--multirun", *TINY, "partition.alpha=0,0.5", "seed=0,1", *LAUNCHERS[launcher],
                    f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fedbench: error:")]
    assert len(errors) == 1 and "partition.alpha=0" in errors[0] and "seed=0" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr and jobs_in(sweep) == []  # nothing ran


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_a_failing_job_is_recorded_and_the_others_complete(tmp_path, launcher):
    sweep = tmp_path / "sweep"
    proc = run_cli(["--multirun", *TINY, "rounds=3", "method=failing", "method.fail_seed=2", "seed=0,1,2,3",
                    PLUGIN_CONF, *LAUNCHERS[launcher], f"hydra.sweep.dir={sweep}"], tmp_path, PLUGIN_ENV)
    assert proc.returncode == 1, proc.stderr[-3000:]
    status = {p.name: json.loads((p / "summary.json").read_text()) for p in jobs_in(sweep)}
    assert [s["status"] for _, s in sorted(status.items())] == ["completed", "completed", "failed", "completed"]
    assert "planned failure at round 2" in status["2"]["reason"]
    assert [r["round"] for r in read_jsonl(sweep / "2" / "metrics.jsonl")] == [1]  # its round 1 is kept
    assert "fedbench sweep: 4 jobs" in proc.stderr and "3 completed, 1 failed" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_report_leaves_diverged_runs_out_of_the_means(tmp_path):
    unstable = ["dataset=synthetic_linear", "dataset.d=20", "dataset.n=400", "backbone=logreg", "clients=4",
                "rounds=6", "logger=local", "progress=false", "hardware=cpu"]
    sweep = tmp_path / "sweep"
    proc = run_cli(["--multirun", *unstable, "lr=10,0.01", "seed=0,1", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]  # two runs diverged: the sweep says so
    assert "2 completed, 2 diverged" in proc.stderr
    res = report(sweep, tmp_path / "out")
    agg = res["summary"].set_index("lr")
    assert agg.loc["10.0", "runs ok"] == "0/2" and agg.loc["0.01", "runs ok"] == "2/2"
    ok = [json.loads((d / "summary.json").read_text()) for d in jobs_in(sweep)]
    ok = [s["best/val_r2"] for s in ok if s["status"] == "completed"]
    assert agg.loc["0.01", "best/val_r2 mean"] == pytest.approx(sum(ok) / 2)
    assert agg.loc["10.0"].filter(like="best/val_r2 mean").isna().all()  # nothing averaged for the diverged
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "Left out of the means and plots (2 runs)" in md and md.count("- diverged:") == 2


def test_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path, tiny):
    cfg = tiny + ["rounds=6", "checkpoint_every=1", "method=scaffold"]
    run_experiment(compose_cfg(cfg), tmp_path / "full")
    part = tmp_path / "part"
    with pytest.raises(Preempted):
        run_experiment(compose_cfg(cfg), part, stop_after=4)
    assert (part / "checkpoint.prev.pt").exists()
    with open(part / "checkpoint.pt", "r+b") as f:
        f.truncate(100)  # torn newest file: resume from round 3's
    run_experiment(compose_cfg(cfg), part)
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    b = torch.load(part / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(a["gstate"]["params"][k], b["gstate"]["params"][k]) for k in a["gstate"]["params"])
    assert [r["round"] for r in read_jsonl(part / "metrics.jsonl")] == list(range(1, 7))
    # both unreadable: one line, exit 2
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (part / name).write_bytes(b"not a checkpoint")
    (part / "summary.json").unlink()
    proc = run_cli(cfg + [f"hydra.run.dir={part}"], tmp_path)
    assert proc.returncode == 2 and "no readable checkpoint" in proc.stderr and "resume=false" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_no_checkpoint_is_loaded_with_weights_only_false():
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "src"
    assert not [p for p in src.rglob("*.py") if "weights_only=False" in p.read_text()]


def test_a_second_run_into_a_busy_run_dir_stops_with_one_line(tmp_path, tiny):
    """The first run is held still in round 2 (a test method waits for a file) while the second starts."""
    run_dir, gate = tmp_path / "run", tmp_path / "gate"
    args = tiny + ["rounds=4", "method=waiting", f"method.gate={gate}", PLUGIN_CONF, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "WANDB_MODE": "disabled", **PLUGIN_ENV}
    first = subprocess.Popen([sys.executable, "-m", "fedbench", *args], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run_dir / "metrics.jsonl").exists():
        time.sleep(0.2)
    second = run_cli(args, tmp_path, PLUGIN_ENV)
    gate.write_text("go")
    assert second.returncode == 2, second.stderr[-2000:]
    errors = [line for line in second.stderr.splitlines() if line.startswith("fedbench: error:")]
    assert len(errors) == 1 and "is in use by another fedbench run" in errors[0] and "Traceback" not in second.stderr
    first.communicate(timeout=600)
    assert first.returncode == 0
    assert [r["round"] for r in read_jsonl(run_dir / "metrics.jsonl")] == list(range(1, 5))  # each round once
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


def test_vector_datasets_get_the_logistic_backbone_by_default(tmp_path):
    assert compose_cfg(["method=flops", "dataset=synthetic_linear"]).backbone.name == "logreg"
    assert compose_cfg(["dataset=synthetic_linear", "backbone=mlp"]).backbone.name == "mlp"  # asked otherwise
    proc = run_cli(["method=flops", "dataset=synthetic_linear", "rounds=2", "method.prune_start=1", "logger=local",
                    f"hydra.run.dir={tmp_path / 'r'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_without_a_terminal_every_round_is_a_line_and_the_summary_fits_the_task(tmp_path):
    proc = run_cli(["method=flops", "dataset=synthetic_linear", "dataset.d=100", "dataset.n=1500", "rounds=5",
                    "method.prune_start=2", "logger=local", f"hydra.run.dir={tmp_path / 'r'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    assert [int(line.split("round ")[1].split("/")[0]) for line in out.splitlines() if "] - round " in line] == \
           [1, 2, 3, 4, 5]
    for line in ("best val R^2", "final test MSE", "density           0.05000", "TDR ", "s start-up"):
        assert line in proc.stdout, proc.stdout
    assert "n/a" not in proc.stdout and "acc" not in proc.stdout.split("fedbench summary")[1]


def test_report_keeps_every_swept_key_apart_in_the_sparsity_plot(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(["--multirun", "method=fedht", "dataset=synthetic_linear", "dataset.d=50", "dataset.n=800",
                    "clients=4", "rounds=4", "logger=local", "progress=false", "method.target_density=0.1,0.2",
                    "method.prune_start=1,3", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = report(sweep, tmp_path / "out")
    import pandas as pd

    series = pd.read_csv(tmp_path / "out" / "density_tdr_vs_target.csv")
    assert len(series) == 4 and sorted(series["label"].unique()) == ["prune_start=1", "prune_start=3"]
    assert "density_tdr_vs_target.png" in {p.name for p in res["plots"]}
