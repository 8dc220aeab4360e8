"""The real `fedbench` command: single runs and Hydra multirun with the basic, joblib and
submitit_local launchers."""

import json
from collections import Counter

import pytest

from conftest import TINY, run_cli, run_dirs
from fedbench.tracking.wandb_file import read_run


def test_fedprox_dirichlet_single_run(tmp_path):
    proc = run_cli(TINY + ["method=fedprox", "partition=dirichlet", "partition.alpha=0.1",
                           f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "best val acc" in proc.stdout and "rounds-to-best" in proc.stdout
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["status"] == "completed" and s["best/round"] in (1, 2)
    assert (tmp_path / "run" / "partition.png").stat().st_size > 1000
    cfg = (tmp_path / "run" / ".hydra" / "config.yaml").read_text()
    assert "alpha: 0.1" in cfg and "name: fedprox" in cfg


def test_python_dash_m_and_console_script_agree(tmp_path):
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    exe = shutil.which("fedbench") or str(Path(sys.executable).parent / "fedbench")
    proc = subprocess.run([exe, *TINY, "rounds=1", f"hydra.run.dir={tmp_path / 'r'}"], cwd=tmp_path,
                          capture_output=True, text=True, env={**__import__("os").environ, "WANDB_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "r" / "summary.json").exists()


LAUNCHERS = {
    "basic": [],
    "joblib": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
    "submitit_local": ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                       "hydra.launcher.cpus_per_task=1"],
}


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_multirun_sweep(tmp_path, launcher):
    """4 jobs on the basic launcher; 2 on the launchers that start a process per job (same checks)."""
    sweep = tmp_path / "sweep"
    alphas = "0.1,1.0" if launcher == "basic" else "0.1"
    proc = run_cli(["--multirun", *TINY, "rounds=1", f"partition.alpha={alphas}", "seed=0,1",
                    "logger=wandb", "logger.wandb.mode=offline", f"hydra.sweep.dir={sweep}",
                    *LAUNCHERS[launcher]], tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dirs = run_dirs(sweep)
    assert len(dirs) == 2 * len(alphas.split(",")), dirs
    combos = Counter()
    groups = set()
    for d in dirs:
        cfg = (d / ".hydra" / "overrides.yaml").read_text()
        alpha = "0.1" if "partition.alpha=0.1" in cfg else "1.0"
        seed = "0" if "seed=0" in cfg else "1"
        combos[(alpha, seed)] += 1
        assert json.loads((d / "summary.json").read_text())["status"] == "completed"
        wb = list(d.glob("wandb/offline-run-*/run-*.wandb"))
        assert len(wb) == 1
        groups.add(read_run(wb[0])["group"])
    assert set(combos) == {(a, s) for a in ("0.1", "1.0") if a in alphas.split(",") for s in ("0", "1")}
    assert len(groups) == 1 and next(iter(groups))  # one shared, non-empty W&B group per sweep
