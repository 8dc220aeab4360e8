"""The W&B offline run file is read back and holds what summary.json and metrics.jsonl hold."""

import json

from conftest import compose_cfg, read_jsonl
from fedbench.experiment import run_experiment
from fedbench.tracking.wandb_file import read_run


def test_offline_run_file_matches_local_files(tmp_path, tiny):
    cfg = compose_cfg(tiny + ["rounds=3", "logger=wandb", "logger.wandb.mode=offline",
                              "logger.wandb.tags=[t1,t2]", "logger.wandb.group=g1"])
    summary = run_experiment(cfg, tmp_path)
    files = list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1
    run = read_run(files[0])
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    hist = [h for h in run["history"] if "global/val_acc" in h]
    assert [h["_step"] for h in hist] == [1, 2, 3]
    for h, r in zip(hist, rows, strict=True):
        assert h["global/val_acc"] == r["global/val_acc"]
        assert h["comm/bytes_up"] == r["comm/bytes_up"]
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert run["summary"]["best/round"] == on_disk["best/round"] == summary["best/round"]
    assert run["summary"]["best/val_acc"] == on_disk["best/val_acc"]
    assert run["group"] == "g1" and run["tags"] == ["t1", "t2"]
    assert run["config"]["method.name"] == "fedavg" and run["config"]["partition.alpha"] == 0.5
    assert "partition_stats.label_entropy_mean" in run["config"]


def test_disabled_writes_no_wandb_files(tmp_path, tiny):
    run_experiment(compose_cfg(tiny + ["logger=wandb", "logger.wandb.mode=disabled"]), tmp_path)
    assert not (tmp_path / "wandb").exists()
    assert (tmp_path / "summary.json").exists()


def test_online_without_network_or_key_falls_back_to_offline(tmp_path, tiny):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_MODE="online", WANDB_BASE_URL="http://127.0.0.1:9", WANDB_API_KEY="", HOME=str(tmp_path))
    args = [a for a in tiny if not a.startswith("logger=")] + ["logger=wandb", f"hydra.run.dir={tmp_path / 'r'}"]
    proc = subprocess.run([sys.executable, "-m", "fedbench", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["status"] == "completed"
    assert (proc.stdout + proc.stderr).count("logging offline instead") == 1  # said once
    assert list((tmp_path / "r").glob("wandb/offline-run-*/run-*.wandb"))  # and logged locally
