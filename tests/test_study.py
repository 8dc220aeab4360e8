"""fedbench-study: tuning on validation only, equal budgets, final seeded runs, the table,
resume."""

from __future__ import annotations

import importlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats

from conftest import PLUGIN_CONF, PLUGIN_ENV, PLUGINS

# runs of about a second: real digits data, logistic regression, float64 (resume is exact)
BASE = [
    "dataset=digits",
    "backbone=logreg",
    "clients=10",
    "participation=0.5",
    "batch_size=16",
    "logger=local",
    "progress=false",
    "hardware=cpu",
    "hardware.dtype=float64",
    "checkpoint_every=1",
    PLUGIN_CONF,
]


# linear regression: lr=1e8 diverges (NaN) within a round
REGRESSION = [
    "dataset=synthetic_linear",
    "dataset.d=20",
    "dataset.n=400",
    "backbone=logreg",
    "clients=4",
    "logger=local",
    "progress=false",
    "hardware=cpu",
    "hardware.dtype=float64",
    PLUGIN_CONF,
]


def study_file(tmp: Path, **changes) -> Path:
    spec = {
        "name": "t",
        "base": BASE,
        "settings": [
            {"name": "a0.5", "overrides": ["partition=dirichlet", "partition.alpha=0.5"]}
        ],
        "methods": [{"name": "fedavg", "overrides": ["method=fedavg"]}],
        "space": {"lr": "tag(log, interval(0.01, 0.5))"},
        "budget": {"trials": 2, "rounds": 4},
        "tune_seeds": [100, 101],
        "seeds": [0, 1, 2],
        "parallel_trials": 2,
        "launcher": "basic",
        "sampler": {"name": "random", "seed": 3},
        "wandb": {"mode": "disabled"},
    }
    spec.update(changes)
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture
def plugins(monkeypatch):
    """The test-only methods (failing, waiting) here and in the study's child processes."""
    for k, v in PLUGIN_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.syspath_prepend(str(PLUGINS))
    importlib.import_module("fedbench_test_methods")
    from fedbench.config import register_schemas

    register_schemas()  # their Hydra schemas, in case fedbench.conf was imported before them


def summaries(sweep_dir: Path) -> dict[tuple[str, int], dict]:
    """(trial file, seed) -> summary.json of every job of a study batch."""
    out = {}
    for ov_file in sweep_dir.glob("*/.hydra/overrides.yaml"):
        ov = dict(o.lstrip("+").split("=", 1) for o in yaml.safe_load(ov_file.read_text()))
        out[(ov["study_trial"], int(ov["seed"]))] = json.loads(
            (ov_file.parent.parent / "summary.json").read_text()
        )
    return out


def test_tuner_sees_validation_only_objective_is_the_mean_over_tune_seeds_and_failures_are_counted(
    tmp_path, plugins, monkeypatch
):
    """Acceptance 2 and 4: every trial's objective is the mean over tune_seeds of the best
    validation score its runs wrote; the tuner never sees a */test_* key and no final run exists
    while it tunes; a method whose trials diverge (lr=1e30) is shown with its failure count, one
    whose final run fails on seed 1 is averaged over the completed seeds with n reduced and said."""
    from fedbench.study import run_study
    from fedbench.study.spec import load_study
    from fedbench.study.tuning import TEST_KEY, Tuner

    told = []
    real_tell = Tuner.tell

    def spy(self, result):
        assert not (tmp_path / "s" / "final").exists(), (
            "the tuner was told something after a final run started"
        )
        for seed, view in result.runs.items():
            leaked = [k for k in view if TEST_KEY.search(k)]
            assert not leaked, f"the tuner saw test keys {leaked} (seed {seed})"
        told.append((self.method, result))
        real_tell(self, result)

    monkeypatch.setattr(Tuner, "tell", spy)
    path = study_file(
        tmp_path,
        budget={"trials": 4, "rounds": 3},
        parallel_trials=4,
        base=REGRESSION,
        settings=[{"name": "iid", "overrides": ["partition=iid"]}],
        methods=[
            {"name": "fedavg", "overrides": ["method=fedavg"]},
            {
                "name": "flaky",
                "overrides": ["method=failing", "method.fail_seed=1", "method.fail_round=2"],
                "space": {"lr": "choice(0.05, 1.0e+30)"},
            },
        ],
    )
    out = run_study(load_study(str(path)), tmp_path / "s", quiet=True)

    # the objective: mean over the tuning seeds of best/val_r2, as each trial's runs wrote it
    runs = summaries(tmp_path / "s" / "tune" / "iid" / "batch-000")
    assert len(told) == 8 and len(runs) == 16
    for method, r in told:
        got = [runs[(f"s0-{method}-t{r.number:03d}", s)] for s in (100, 101)]
        if all(g["status"] == "completed" for g in got):
            assert r.objective == pytest.approx(
                np.mean([g["best/val_r2"] for g in got]), abs=1e-15
            )
            assert all(
                "best/test_r2" in g for g in got
            )  # the runs have test scores: the tuner did not see them
        else:
            assert r.objective is None and any(g["status"] == "diverged" for g in got)
    flaky_trials = [r for method, r in told if method == "flaky"]
    diverged = sum(r.params["lr"] == 1e30 for r in flaky_trials)
    assert 0 < diverged < 4, "the sampler seed should give both values"

    rows = {r.method: r for r in out["rows"]}
    assert rows["flaky"].trials == 4 and rows["flaky"].trials_failed == diverged
    assert rows["flaky"].params == {"lr": 0.05}
    # the final run of seed 1 fails: mean, CI and n over seeds 0 and 2 only, and said so
    finals = summaries(tmp_path / "s" / "final" / "iid")
    assert finals[("s0-flaky-best", 1)]["status"] == "failed"
    kept = [finals[("s0-flaky-best", s)]["best/test_r2"] for s in (0, 2)]
    assert rows["flaky"].n == 2 and rows["flaky"].mean == pytest.approx(np.mean(kept), abs=1e-15)
    low, high = stats.t.interval(0.95, 1, loc=np.mean(kept), scale=stats.sem(kept))
    assert rows["flaky"].ci95 == pytest.approx((high - low) / 2, rel=1e-12)
    fedavg = [finals[("s0-fedavg-best", s)]["best/test_r2"] for s in (0, 1, 2)]
    assert rows["fedavg"].n == 3 and rows["fedavg"].mean == pytest.approx(
        np.mean(fedavg), abs=1e-15
    )
    md = (tmp_path / "s" / "table" / "study.md").read_text()
    assert "| 2 of 3 |" in md and "mean over 2 of 3 seeds (1 did not complete)" in md
    assert f"flaky: {diverged} of 4 trials failed or diverged" in md
    # one row per method x setting, the hyperparameters, equal budgets, one best and the marks
    table = json.loads((tmp_path / "s" / "table" / "study.json").read_text())
    assert [(r["setting"], r["method"]) for r in table["rows"]] == [
        ("iid", "fedavg"),
        ("iid", "flaky"),
    ]
    assert sum(r["best"] for r in table["rows"]) == 1
    assert table["budget"]["given_per_method"]["tune_rounds"] == 4 * 2 * 3
    assert rows["fedavg"].tune_rounds == 4 * 2 * 3  # every fedavg trial completed its rounds
    assert not table["budget"]["equal"]  # diverged trials stopped early: said, not hidden
    assert "NOT equal across methods" in md and (tmp_path / "s" / "table" / "study.csv").exists()
    assert {p.name for p in out["plots"]} == {"curves.png", "tuning.png"}


def _wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 240.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        if proc.poll() is not None:
            pytest.fail(
                f"the study ended (exit {proc.returncode}) before {what}: {proc.stderr.read()}"
            )
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


def _held_run(sweep_dir: Path):
    """The dir of a `held` (waiting) run of this batch that logged round 1 (it then waits in round
    2)."""
    for ov in sweep_dir.glob("*/.hydra/overrides.yaml"):
        rows = ov.parent.parent / "metrics.jsonl"
        if "-held-" in ov.read_text() and rows.exists() and rows.read_text().strip():
            return ov.parent.parent
    return None


def test_a_study_stopped_in_tuning_and_in_its_final_runs_resumes_to_the_uninterrupted_table(
    tmp_path, plugins
):
    """Acceptance 3: SIGTERM while a tuning batch runs, rerun; SIGTERM while the final runs run,
    rerun: the study completes, no finished run is run again (its summary untouched, every run's
    rows hold each round once), and the table equals an uninterrupted study's. Runs are held still
    by the test-only `waiting` method (its round 2 waits for a gate file), so each stop hits a
    known run."""
    from fedbench.study import run_study
    from fedbench.study.spec import load_study
    from fedbench.tracking.wandb_file import read_run

    gate = tmp_path / "gate"
    methods = [
        {"name": "fedavg", "overrides": ["method=fedavg"]},
        {
            "name": "held",
            "overrides": ["method=waiting", "method.wait_round=2", f"method.gate={gate}"],
        },
    ]
    path = study_file(tmp_path, methods=methods, seeds=[0, 1])
    gate.touch()
    reference = run_study(load_study(str(path)), tmp_path / "ref", quiet=True)
    gate.unlink()

    root = tmp_path / "s"
    cmd = [
        sys.executable,
        "-m",
        "fedbench.study",
        str(path),
        "wandb.mode=offline",
        "--dir",
        str(root),
    ]
    env = {**os.environ, **PLUGIN_ENV}

    def start():
        return subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    batch0 = root / "tune" / "a0.5" / "batch-000"
    proc = start()  # 1: stopped while the tuning runs run (fedavg's are done, a `held` one waits)
    _wait_for(lambda: _held_run(batch0), proc, "a tuning run to be held")
    done_before = {p: p.stat().st_mtime_ns for p in batch0.glob("*/summary.json")}
    assert len(done_before) == 4  # fedavg's two trials x two tuning seeds
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 4 and "rerun the same command to continue" in err
    assert not (root / "final").exists()

    gate.touch()  # 2: the tuning runs go on; stopped again while the final runs run
    proc = start()
    final = root / "final" / "a0.5"
    _wait_for(lambda: (final / "plan.json").exists(), proc, "the final phase")
    gate.unlink()  # before the final multirun has started any run (its start-up takes seconds)
    _wait_for(lambda: _held_run(final), proc, "a final run to be held")
    final_done = {p: p.stat().st_mtime_ns for p in final.glob("*/summary.json")}
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 4, err

    gate.touch()  # 3: to the end
    proc = start()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    # nothing finished was run again
    assert {p: p.stat().st_mtime_ns for p in done_before} == done_before
    assert {p: p.stat().st_mtime_ns for p in final_done} == final_done
    launches = {
        d.relative_to(root).as_posix(): (d / "study.log").read_text().count("\n$ ")
        for d in (batch0, final)
    }
    assert launches == {"tune/a0.5/batch-000": 2, "final/a0.5": 2}
    runs = sorted(root.glob("*/a0.5/**/summary.json"))
    assert (
        len(runs) == 2 * 2 * 2 + 2 * 2
    )  # 2 methods x 2 trials x 2 tuning seeds, 2 methods x 2 seeds
    for s in runs:
        rounds = [
            json.loads(line)["round"]
            for line in (s.parent / "metrics.jsonl").read_text().splitlines()
        ]
        assert rounds == [1, 2, 3, 4], s  # a resumed run continued; no round ran twice
    # the same table as the study that was never stopped
    got = json.loads((root / "table" / "study.json").read_text())
    want = json.loads((tmp_path / "ref" / "table" / "study.json").read_text())
    assert got["rows"] == want["rows"] and got["budget"] == want["budget"]
    assert (root / "table" / "study.md").read_text() == reference["markdown"]
    assert "study.md" in out or "Study t" in out
    # the study's W&B run: in its group, the table's numbers in its summary
    (run_file,) = (root / "table" / "wandb").glob("offline-run-*/run-*.wandb")
    wb = read_run(run_file)
    assert wb["group"] == "study-t" and wb["job_type"] == "study"
    for row in got["rows"]:
        assert wb["summary"][f"a0.5/{row['method']}/test_mean"] == pytest.approx(
            row["mean"], abs=1e-12
        )
        assert wb["summary"][f"a0.5/{row['method']}/n"] == row["n"]


@pytest.mark.parametrize(
    "changes, words",
    [
        (["budget.rounds=0"], ["study.budget.rounds=0", ">= 1"]),
        (["seeds=[0,100]"], ["seed 100 is also a tuning seed"]),
        (["launcher=mpi"], ["study.launcher=mpi", "basic, local_parallel, slurm, fused"]),
        (["base=[dataset=digits,lr=0.1]"], ["study.base", "lr is tuned"]),
        (["space={lr: 'tag(log, interval(0, 1))'}"], ["lr=tag(log, interval(0, 1))", "LOW > 0"]),
        (["space={lr: 0.1}"], ["lr=0.1", "a search space, not a fixed value"]),
        (["settings=[{name: a, overrides: ['partition.alpha=0.1,1.0']}]"], ["is a sweep"]),
        (["budgett.trials=3"], ["no key 'budgett.trials'"]),
        (["base=[dataset=digits,backbone=mlpp]"], ["backbone='mlpp' is unknown"]),
        (
            ["methods=[{name: fedavg, overrides: [method=fedavg, method.mu=0.1]}]"],
            ["method fedavg", "method.mu"],
        ),
    ],
)
def test_a_wrong_study_is_one_line_and_exit_2_before_any_run(
    tmp_path, monkeypatch, capsys, changes, words
):
    from fedbench.study import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["quick", *changes])
    err = capsys.readouterr().err.strip()
    assert (
        e.value.code == 2
        and len(err.splitlines()) == 1
        and err.startswith("fedbench-study: error:")
    ), err
    assert all(w in err for w in words), err
    assert not (tmp_path / "studies").exists()  # nothing started, nothing written


def test_a_study_dir_refuses_another_study(tmp_path, monkeypatch, capsys):
    from fedbench.study import claim_dir
    from fedbench.study.spec import StudyError, as_yaml, load_study

    spec = load_study("quick")
    (tmp_path / "study.yaml").write_text(as_yaml(load_study("quick", ["budget.trials=9"])))
    with pytest.raises(StudyError, match="holds a different study"):
        claim_dir(spec, tmp_path)
    (tmp_path / "study.yaml").write_text(as_yaml(spec))
    assert claim_dir(spec, tmp_path) is True  # the same study: resumed


def test_the_shipped_quick_study_compares_three_methods_on_two_alphas_with_equal_budgets():
    from fedbench.study.spec import load_study

    spec = load_study("quick")
    assert [m.name for m in spec.methods] == ["fedavg", "fedprox", "scaffold"]
    assert [s.name for s in spec.settings] == ["alpha0.1", "alpha1"]
    assert {p.key for p in spec.methods[1].space} == {"lr", "method.mu"}
    assert all(p.log for m in spec.methods for p in m.space)
    assert not set(spec.seeds) & set(spec.tune_seeds)


def test_t_interval_and_paired_test_match_scipy():
    from fedbench.study.table import paired_p, t_interval

    x = [0.81, 0.84, 0.79, 0.86]
    low, high = stats.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=stats.sem(x))
    assert (
        t_interval(x) == pytest.approx((high - low) / 2, rel=1e-12) and t_interval([0.8]) is None
    )
    best, other = (
        {0: 0.9, 1: 0.85, 2: 0.88},
        {0: 0.8, 1: 0.84, 2: 0.83, 3: 0.99},
    )  # seed 3 has no pair
    p, pairs = paired_p(best, other)
    assert pairs == 3 and p == pytest.approx(
        stats.ttest_rel([0.9, 0.85, 0.88], [0.8, 0.84, 0.83], alternative="greater").pvalue
    )
    assert paired_p({0: 0.9}, {0: 0.8}) == (None, 1)
    assert math.isclose(
        paired_p({0: 0.9, 1: 0.8}, {0: 0.9, 1: 0.8})[0], 1.0
    )  # identical: not worse
