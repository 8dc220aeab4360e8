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


def test_a_killed_offline_run_resumed_has_every_round_once(tmp_path, tiny):
    """SIGKILL after 10 rounds (the W&B file keeps only what was flushed), then the same command: the one
    offline run dir read back has every round exactly once, with the values of metrics.jsonl. The run is
    held still in round 11 (a test method waits for a file) so that the kill lands mid-way."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import PLUGIN_CONF, PLUGIN_ENV

    run_dir, gate = tmp_path / "run", tmp_path / "gate"
    args = [a for a in tiny if not a.startswith("logger=")] + [
        "logger=wandb", "logger.wandb.mode=offline", "rounds=20", "method=waiting", "method.wait_round=11",
        f"method.gate={gate}", PLUGIN_CONF, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "WANDB_MODE": "offline", **PLUGIN_ENV}
    proc = subprocess.Popen([sys.executable, "-m", "fedbench", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not (run_dir / "run_state.json").exists()
                                      or json.loads((run_dir / "run_state.json").read_text())["round"] < 10):
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads((run_dir / "run_state.json").read_text())["round"] == 10
    gate.write_text("go")
    resumed = subprocess.run([sys.executable, "-m", "fedbench", *args], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    files = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files  # one offline run dir per run id
    history = [h for h in read_run(files[0])["history"] if "round" in h]
    assert [h["_step"] for h in history] == list(range(1, 21)), resumed.stderr[-3000:]
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [h["global/val_acc"] for h in history] == [r["global/val_acc"] for r in rows]


def test_the_wandb_service_runs_outside_the_jobs_session(tmp_path):
    """A signal to the job's process group (Ctrl-C, `kill -TERM -PGID`) never reaches W&B's service, which
    can then flush what the run logged."""
    import os
    from pathlib import Path

    from fedbench.tracking.wandb_logger import WandbLogger

    logger = WandbLogger("offline", tmp_path, "fedbench", {"a": 1})
    try:
        children = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
                    and (p / "stat").exists() and int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
                    == os.getpid()]
        service = [c for c in children if "wandb" in (Path("/proc") / str(c) / "cmdline").read_text()]
        assert service, "no W&B service process found"
        assert all(os.getsid(c) != os.getsid(0) for c in service)
    finally:
        logger.finish()
