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


def test_channels_last_changes_the_layout_not_the_result():
    """hardware.memory_format: the sequential executor hands the CNN channels_last conv weights, so
    convolutions and max-pooling run on NHWC tensors (checked on the pooling inputs), and the round ends
    with the same parameters as in the default layout (float32 rounding apart)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from fedbench.engine.executors import resolve_memory_format

    class PoolLayouts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.max_pool2d_with_indices.default:
                x = args[0]
                self.seen.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
            return func(*args, **(kwargs or {}))

    w = workloads("cpu")["cnn"]
    w.clients, w.per_client, w.cohort, w.local_steps = 6, 20, 3, 2
    dev, dt = torch.device("cpu"), torch.float32
    view = make_data(w, dev, dt)
    sizes = torch.as_tensor(view.sizes(), dtype=dt)
    model, _ = build(w, dev, dt)
    assert resolve_memory_format("auto", model, dev, torch.float32) == torch.channels_last
    assert resolve_memory_format("auto", model, dev, torch.float64) is None  # no oneDNN conv in float64
    assert resolve_memory_format("contiguous", model, dev, torch.float32) is None
    assert resolve_memory_format("auto", torch.nn.Linear(3, 2), dev, torch.float32) is None
    out, layouts = [], []
    for fmt in (None, torch.channels_last):
        model, method = build(w, dev, dt)
        g = method.init_global(*split_state(model))
        cohort, sched = schedule(w, view, 1, dt, dev)
        with PoolLayouts() as mode:
            out.append(engine_round(method, SequentialExecutor(memory_format=fmt), g, view, cohort, sched, sizes))
        layouts.append(mode.seen)
    assert layouts[0] and not any(layouts[0])
    assert layouts[1] and all(layouts[1])
    for k in out[0]["params"]:
        torch.testing.assert_close(out[1]["params"][k], out[0]["params"][k], rtol=1e-4, atol=1e-5)


def test_simple_cnn_has_pfl_researchs_parameter_count():
    """The peer benchmark's model (pfl-research's simple_cnn, written from its architecture): 1,626,442
    parameters at 3x32x32 with 10 classes, pfl's count."""
    from omegaconf import OmegaConf

    from fedbench.models.backbones import build_model

    model = build_model(OmegaConf.create({"name": "simple_cnn"}), (3, 32, 32), 10)
    assert sum(p.numel() for p in model.parameters()) == 1_626_442
