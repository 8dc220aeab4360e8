"""Callbacks v2: chosen from config, returning (stop, metrics), told why the run ended, their state
in the checkpoint; the shipped early stopping, CSV and TensorBoard sinks; a class outside fedbench
by _target_."""

import csv
import json
import sys

import pytest

from conftest import PLUGINS, compose_cfg, read_jsonl, run_cli
from fedbench.errors import Preempted
from fedbench.experiment import run_experiment

EARLY = ["rounds=30", "+callbacks=early_stop", "callbacks.early_stop.patience=2", "lr=0.02"]


def strip_time(rows):
    return [
        {k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))} for r in rows
    ]


def test_early_stop_ends_the_run_and_the_same_command_trains_no_extra_round(tmp_path, tiny):
    cfg = compose_cfg(tiny + EARLY)
    summary = run_experiment(cfg, tmp_path)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    done = summary["rounds_done"]
    assert summary["status"] == "completed" and summary["stopped_by"] == "early_stop"
    assert 3 <= done < 30 and len(rows) == done
    assert summary["reason"].startswith("early_stop: global/val_acc did not improve")
    # the stop is where the metric last improved + patience evaluations
    vals = [r["global/val_acc"] for r in rows]
    best_round = max(range(done), key=lambda i: (vals[i], -i)) + 1
    assert done == best_round + 2 and f"at round {best_round})" in summary["reason"]
    assert [r["early_stop/waited"] for r in rows][-2:] == [1, 2]
    ckpt_before = (tmp_path / "checkpoint.pt").stat().st_mtime_ns
    again = run_experiment(cfg, tmp_path)  # the same command: the run is finished
    assert again == json.loads((tmp_path / "summary.json").read_text())
    assert again["rounds_done"] == done and len(read_jsonl(tmp_path / "metrics.jsonl")) == done
    assert (tmp_path / "checkpoint.pt").stat().st_mtime_ns == ckpt_before


def test_early_stop_state_survives_a_preemption(tmp_path, tiny):
    """Preempted mid-way, then resumed: the counter of evaluations without improvement continues
    from the checkpoint, so the run stops at the same round with the same rows as an uninterrupted
    one."""
    cfg = compose_cfg(tiny + EARLY + ["checkpoint_every=1"])
    whole = run_experiment(cfg, tmp_path / "whole")
    stop_at = whole["rounds_done"] - 1  # one round before the stop: the counter is 1 there
    with pytest.raises(Preempted):
        run_experiment(cfg, tmp_path / "part", stop_after=stop_at)
    resumed = run_experiment(cfg, tmp_path / "part")
    assert resumed["rounds_done"] == whole["rounds_done"] and resumed["reason"] == whole["reason"]
    assert strip_time(read_jsonl(tmp_path / "part" / "metrics.jsonl")) == strip_time(
        read_jsonl(tmp_path / "whole" / "metrics.jsonl")
    )


def test_csv_sink_from_the_logger_group_has_the_rows_of_metrics_jsonl(tmp_path, tiny):
    args = [a for a in tiny if not a.startswith("logger=")] + [
        "logger=csv",
        "rounds=3",
        "eval_every=2",
        f"hydra.run.dir={tmp_path / 'r'}",
    ]
    proc = run_cli(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = tmp_path / "r"
    with open(run / "metrics.csv", newline="") as f:
        table = list(csv.DictReader(f))
    rows = read_jsonl(run / "metrics.jsonl")
    assert len(table) == len(rows) == 3
    for got, want in zip(table, rows, strict=True):
        for k, v in want.items():
            assert got[k] == "" if v is None else float(got[k]) == pytest.approx(v, rel=1e-12), k
    assert table[0]["global/val_acc"] == ""  # round 1 not evaluated (eval_every=2): an empty cell
    assert not (run / "wandb").exists()


def test_tensorboard_sink_scalars_are_the_rows_of_metrics_jsonl(tmp_path, tiny):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_experiment(compose_cfg(tiny + ["rounds=3", "+callbacks=tensorboard"]), tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    for key in ("global/val_acc", "train/loss", "comm/bytes_total"):
        scalars = events.Scalars(key)
        assert [s.step for s in scalars] == [1, 2, 3]
        assert [s.value for s in scalars] == pytest.approx([r[key] for r in rows], rel=1e-6)


def test_a_callback_outside_fedbench_by_target_adds_metrics_that_reach_the_summary(
    tmp_path, tiny, monkeypatch
):
    monkeypatch.syspath_prepend(str(PLUGINS))
    cfg = compose_cfg(
        tiny
        + [
            "rounds=3",
            "+callbacks.mine._target_=fedbench_test_callbacks.RoundSquare",
            "+callbacks.mine.offset=10",
        ]
    )
    summary = run_experiment(cfg, tmp_path)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["mine/round_sq"] for r in rows] == [11, 14, 19]
    assert summary["mine/round_sq"] == 19  # every metric's last value is in the summary
    assert summary["mine/ended"] is None  # on_end ran after the summary was made
    assert json.loads((tmp_path / "ended.json").read_text()) == {
        "status": "completed",
        "stopped_by": None,
    }
    sys.modules.pop("fedbench_test_callbacks", None)


def test_regression_never_writes_an_acc_name(tmp_path, tiny):
    cfg = compose_cfg(
        [a for a in tiny if not a.startswith("backbone=")]
        + ["dataset=synthetic_linear", "dataset.n=400", "dataset.d=20", "rounds=2"]
    )
    summary = run_experiment(cfg, tmp_path)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    names = set(summary) | {k for r in rows for k in r}
    assert "best/val_r2" in names and "global/val_r2" in names and "final/test_r2" in names
    assert not [k for k in names if "_acc" in k]


def test_the_summary_carries_the_methods_own_metrics_and_the_report_shows_them(tmp_path, tiny):
    from fedbench.report import collect, metric_columns

    run = tmp_path / "0"
    summary = run_experiment(
        compose_cfg(tiny + ["method=flops", "rounds=2", "method.prune_start=1"]), run
    )
    rows = read_jsonl(run / "metrics.jsonl")
    assert summary["flops/lambda"] == rows[-1]["flops/lambda"] > 0
    df = collect(tmp_path)
    assert "flops/lambda" in metric_columns(df, set(df.attrs["summary_keys"]))


def test_every_default_callback_has_a_registered_name_and_the_list_is_sorted_by_stage():
    from fedbench.run.callbacks import BUILT_IN, STAGES, build_callbacks

    cfg = compose_cfg(["logger=wandb", "+callbacks=[tensorboard,early_stop]"])
    names = [cb.name for cb in build_callbacks(cfg)]
    assert names == [
        "evaluation",
        "participation",
        "early_stop",
        "progress",
        "files",
        "wandb",
        "tensorboard",
        "divergence",
        "checkpoint",
    ]
    stages = [cb.stage for cb in build_callbacks(cfg)]
    assert stages == sorted(stages, key=STAGES.index) and set(BUILT_IN) <= set(names)


def test_sinks_do_not_change_the_fingerprint_but_early_stopping_does(tiny):
    from fedbench.run.state import fingerprint

    base = fingerprint(compose_cfg(tiny))
    assert fingerprint(compose_cfg(tiny + ["logger=csv"])) == base
    assert fingerprint(compose_cfg(tiny + ["+callbacks=tensorboard"])) == base
    assert fingerprint(compose_cfg(tiny + ["+callbacks=early_stop"])) != base
