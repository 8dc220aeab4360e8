"""Nothing on disk is ever damaged: who may write into a run dir or a sweep dir is decided before Hydra
writes anything, and a refused command leaves every byte of the existing dirs as it was."""

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import PLUGIN_CONF, PLUGIN_ENV, TINY, run_cli
from test_errors import assert_one_line_error


def refused(args: list[str], cwd: Path, monkeypatch, capsys) -> subprocess.CompletedProcess:
    """The real entry point in this process (a refusal needs no job, so no new process): exit code, stderr."""
    from fedbench import cli

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["fedbench", *args])
    with pytest.raises(SystemExit) as stop:
        cli.main()
    return subprocess.CompletedProcess(args, stop.value.code, "", capsys.readouterr().err)


def tree(root: Path) -> dict[str, str]:
    """Every file under `root` with the hash of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_changed_config_in_a_finished_run_dir_is_refused_and_touches_nothing(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    assert run_cli(TINY + [f"hydra.run.dir={run}"], tmp_path).returncode == 0
    before = tree(run)
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    proc = refused(TINY + ["lr=0.1", f"hydra.run.dir={run}"], tmp_path, monkeypatch, capsys)
    assert proc.returncode == 2
    assert_one_line_error(proc, "hydra.run.dir=", "different config", "lr 0.05 -> 0.1")
    assert tree(run) == before  # summary still `completed`, .hydra/ still the finished run's
    # the same command again keeps the finished result (and may write: the dir is its own)
    again = run_cli(TINY + [f"hydra.run.dir={run}"], tmp_path)
    assert again.returncode == 0 and json.loads((run / "summary.json").read_text())["status"] == "completed"


def test_a_second_sweep_into_a_finished_sweep_dir_is_refused_and_touches_nothing(tmp_path, monkeypatch, capsys):
    sweep = tmp_path / "sweep"
    first = run_cli(["--multirun", *TINY, "seed=0,1", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    before = tree(sweep)
    for other, why in ((["seed=0,1", "lr=0.1"], "differs in lr (unset) -> 0.1"), (["seed=0"], "this one has 1")):
        proc = refused(["--multirun", *TINY, *other, f"hydra.sweep.dir={sweep}"], tmp_path, monkeypatch, capsys)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert_one_line_error(proc, f"hydra.sweep.dir={sweep}", "holds another sweep", why)
        assert tree(sweep) == before
    # the same jobs followed by new ones (one more seed) are allowed: each finished job keeps its result
    more = run_cli(["--multirun", *TINY, "seed=0,1,2", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert more.returncode == 0 and "3 completed" in more.stderr
    assert all(tree(sweep)[k] == v for k, v in before.items() if k.startswith(("0/metrics", "1/metrics",
                                                                               "0/summary", "1/summary")))


def test_a_second_sweep_into_a_busy_sweep_dir_is_refused_and_touches_nothing(tmp_path, monkeypatch, capsys):
    """Sweep A is held still in its first job (a test method waits for a file); sweep B into the same dir
    is refused with one line naming hydra.sweep.dir, and A's dirs keep every byte; A then completes with
    its own results, labelled with its own overrides."""
    sweep, gate = tmp_path / "sweep", tmp_path / "gate"
    held = ["method=waiting", f"method.gate={gate}", "rounds=3", PLUGIN_CONF]
    env = {**os.environ, "WANDB_MODE": "disabled", **PLUGIN_ENV}
    first = subprocess.Popen([sys.executable, "-m", "fedbench", "--multirun", *TINY, *held, "seed=0,1",
                              f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (sweep / "0" / "metrics.jsonl").exists():
            time.sleep(0.2)
        time.sleep(0.5)  # round 1's rows are written; the job now waits in round 2
        before = tree(sweep)
        for other in (["seed=0,1", "lr=0.1"], ["seed=0,1"]):  # another sweep, or the same jobs
            proc = refused(["--multirun", *TINY, *other, f"hydra.sweep.dir={sweep}"], tmp_path, monkeypatch, capsys)
            assert proc.returncode == 2, proc.stderr[-2000:]
            assert_one_line_error(proc, f"hydra.sweep.dir={sweep}", "in use by another fedbench sweep")
            assert tree(sweep) == before
    finally:
        gate.write_text("go")
        out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    for job, seed in (("0", 0), ("1", 1)):
        assert json.loads((sweep / job / "summary.json").read_text())["status"] == "completed"
        assert f"seed={seed}" in (sweep / job / ".hydra" / "overrides.yaml").read_text()
        assert "lr=0.1" not in (sweep / job / ".hydra" / "overrides.yaml").read_text()


def test_an_unwritable_run_dir_is_one_line(tmp_path, monkeypatch, capsys):
    proc = refused(TINY + ["output_root=/proc/fedbench"], tmp_path, monkeypatch, capsys)  # not even for root
    assert proc.returncode == 2
    assert_one_line_error(proc, "hydra.run.dir=/proc/fedbench/", "cannot write there")
    proc = refused(["--multirun", *TINY, "seed=0,1", f"hydra.sweep.dir={Path('/etc/hostname') / 'sweep'}"],
                   tmp_path, monkeypatch, capsys)  # a file in the way
    assert proc.returncode == 2
    assert_one_line_error(proc, "hydra.sweep.dir=/etc/hostname/sweep", "cannot write there")
