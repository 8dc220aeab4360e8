"""Correctness side of the benchmark (speed itself is measured by scripts/bench.py, never asserted)."""

import json

import pytest
import torch

from conftest import compose_cfg, run_cli
from fedbench.bench import build, engine_round, make_data, reference_round, schedule, workloads
from fedbench.engine.executors import BatchedExecutor, SequentialExecutor
from fedbench.engine.functional import split_state
from fedbench.experiment import run_experiment


def test_batched_equals_reference_loop_float64():
    """The logistic benchmark workload: the vmap executor and a framework-style loop (model copy,
    DataLoader, torch.optim per client) end with the same parameters after 2 rounds."""
    w = workloads("cpu")["logistic"]
    w.clients, w.per_client, w.cohort = 20, 60, 5
    dev, dt = torch.device("cpu"), torch.float64
    view = make_data(w, dev, dt)
    sizes = torch.as_tensor(view.sizes(), dtype=dt)
    model, method = build(w, dev, dt)
    ref_model, _ = build(w, dev, dt)
    gstate = method.init_global(*split_state(model))
    for r in (1, 2):
        cohort, sched = schedule(w, view, r, dt, dev)
        gstate = engine_round(method, BatchedExecutor(chunk_size=3), gstate, view, cohort, sched, sizes)
        reference_round(ref_model, view, cohort, sched, sizes, w.lr)
    for k, v in ref_model.named_parameters():
        torch.testing.assert_close(gstate["params"][k], v.detach(), rtol=1e-10, atol=1e-13)


def test_compiled_batched_matches_sequential():
    w = workloads("cpu")["logistic"]
    w.clients, w.per_client, w.cohort, w.local_steps = 10, 40, 4, 3
    dev, dt = torch.device("cpu"), torch.float64
    view = make_data(w, dev, dt)
    sizes = torch.as_tensor(view.sizes(), dtype=dt)
    out = []
    for ex in (SequentialExecutor(), BatchedExecutor(compile=True)):
        model, method = build(w, dev, dt)
        g = method.init_global(*split_state(model))
        cohort, sched = schedule(w, view, 1, dt, dev)
        out.append(engine_round(method, ex, g, view, cohort, sched, sizes)["params"])
    for k in out[0]:
        torch.testing.assert_close(out[0][k], out[1][k], rtol=1e-10, atol=1e-13)


def test_timed_auto_policy_picks_and_logs_an_executor(tmp_path, tiny):
    s = run_experiment(compose_cfg(tiny + ["hardware.auto_policy=timed"]), tmp_path)
    assert s["executor"] in ("sequential", "batched")


@pytest.mark.parametrize("workers", [1, 2])
def test_memory_flat_in_number_of_clients(tmp_path, workers):
    """10,000 clients (100 per round) vs 100 clients (100 per round) on the same data: peak memory
    within 2x, in one process and with 2 workers sharding each round. Per-client state is stacked
    tensors and index sets, never a model per client."""
    common = ["dataset=synthetic_logistic", "dataset.n=25000", "dataset.d=200", "backbone=logreg",
              "rounds=2", "local_steps=5", "batch_size=4", "logger=local", "progress=false", "hardware=cpu",
              "hardware.executor=batched", "partition=iid", "partition.min_samples=1", f"hardware.workers={workers}"]
    peaks = {}
    for n_clients, part in ((100, 1.0), (10000, 0.01)):
        d = tmp_path / str(n_clients)
        proc = run_cli(common + [f"clients={n_clients}", f"participation={part}", f"hydra.run.dir={d}"], tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        s = json.loads((d / "summary.json").read_text())
        assert s["status"] == "completed"
        peaks[n_clients] = s["memory/peak_rss_mb"]
    assert peaks[10000] <= 2 * peaks[100], peaks
