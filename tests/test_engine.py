"""Executor oracle (batched == sequential in float64), determinism, resume, byte accounting."""

import json

import pytest
import torch

from conftest import compose_cfg, read_jsonl
from fedbench.experiment import Preempted, run_experiment


def final_params(run_dir):
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    return ckpt["gstate"]["params"], ckpt


@pytest.mark.parametrize("method", ["fedavg", "fedprox", "scaffold"])
@pytest.mark.parametrize("backbone", ["mlp", "cnn"])
def test_batched_equals_sequential_float64(tmp_path, tiny, method, backbone):
    extra = [f"method={method}", f"backbone={backbone}", "hardware.dtype=float64", "rounds=2",
             "local_epochs=2", "partition.alpha=0.3", "partition.min_samples=5", "method.momentum=0.5"]
    if method == "fedprox":
        extra.append("method.mu=0.1")
    out = {}
    for ex in ("sequential", "batched"):
        run_experiment(compose_cfg(tiny + extra + [f"hardware.executor={ex}"]), tmp_path / ex)
        out[ex] = final_params(tmp_path / ex)[0]
    worst = 0.0
    for k, a in out["sequential"].items():
        b = out["batched"][k]
        assert a.dtype == torch.float64
        worst = max(worst, float((a - b).abs().max() / a.abs().max().clamp_min(1e-30)))
    assert worst <= 1e-10, worst


def test_unequal_client_sizes_and_chunking_match(tmp_path, tiny):
    base = tiny + ["method=scaffold", "hardware.dtype=float64", "partition=iid", "partition.quantity_skew=1.0",
                   "batch_size=7"]
    run_experiment(compose_cfg(base + ["hardware.executor=sequential"]), tmp_path / "s")
    run_experiment(compose_cfg(base + ["hardware.executor=batched", "hardware.chunk_size=2"]), tmp_path / "b")
    a, ca = final_params(tmp_path / "s")
    b, cb = final_params(tmp_path / "b")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-10, atol=1e-12)
    for k in ca["cstates"]:
        torch.testing.assert_close(ca["cstates"][k], cb["cstates"][k], rtol=1e-10, atol=1e-12)


def strip_time(rows):
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))} for r in rows]


def test_same_config_same_metrics(tmp_path, tiny):
    cfg = tiny + ["rounds=3", "method=scaffold"]
    run_experiment(compose_cfg(cfg), tmp_path / "a")
    run_experiment(compose_cfg(cfg), tmp_path / "b")
    a, b = read_jsonl(tmp_path / "a" / "metrics.jsonl"), read_jsonl(tmp_path / "b" / "metrics.jsonl")
    assert len(a) == 3 and strip_time(a) == strip_time(b)
    c = read_jsonl(run_experiment(compose_cfg(cfg + ["seed=1"]), tmp_path / "c") and
                   tmp_path / "c" / "metrics.jsonl")
    assert strip_time(c) != strip_time(a)


@pytest.mark.parametrize("method", ["fedavg", "scaffold"])
def test_resume_gives_the_uninterrupted_result(tmp_path, tiny, method):
    full = tiny + [f"method={method}", "rounds=6", "checkpoint_every=2", "method.server_momentum=0.5"]
    run_experiment(compose_cfg(full), tmp_path / "full")
    part = tmp_path / "part"
    with pytest.raises(Preempted):
        run_experiment(compose_cfg(full), part, stop_after=3)  # preempted after round 3
    assert json.loads((part / "summary.json").read_text())["status"] == "preempted"
    with open(part / "metrics.jsonl", "a") as f:  # a half-written row after the checkpoint
        f.write(json.dumps({"round": 4, "train/loss": 123.0}) + "\n")
    run_experiment(compose_cfg(full), part)  # the same command continues
    a, _ = final_params(tmp_path / "full")
    b, _ = final_params(part)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra, rb = read_jsonl(tmp_path / "full" / "metrics.jsonl"), read_jsonl(part / "metrics.jsonl")
    assert [r["round"] for r in rb] == list(range(1, 7))
    assert strip_time(ra) == strip_time(rb)
    sa = json.loads((tmp_path / "full" / "summary.json").read_text())
    sb = json.loads((part / "summary.json").read_text())
    for k in ("status", "best/val_acc", "best/round", "best/test_acc", "comm/bytes_total"):
        assert sa[k] == sb[k]


def test_resume_true_finds_the_unfinished_run(tmp_path, tiny):
    cfg = tiny + ["rounds=4", f"output_root={tmp_path}"]
    first = tmp_path / "2026-01-01" / "00-00-00"
    with pytest.raises(Preempted):
        run_experiment(compose_cfg(cfg), first, stop_after=2)
    second = tmp_path / "2026-01-01" / "00-00-01"
    summary = run_experiment(compose_cfg(cfg + ["resume=true"]), second)
    assert summary["run_dir"] == str(first) and summary["status"] == "completed"
    assert (second / "RESUMED_IN.txt").read_text().strip() == str(first)
    run_experiment(compose_cfg(cfg), tmp_path / "ref")
    a, _ = final_params(tmp_path / "ref")
    b, _ = final_params(first)
    for k in a:
        assert torch.equal(a[k], b[k])
    # resume=false ignores the checkpoint and starts over
    fresh = run_experiment(compose_cfg(cfg + ["resume=false"]), first)
    assert fresh["status"] == "completed"


def test_fedavg_bytes_are_4PK_each_way(tmp_path, tiny):
    cfg = compose_cfg(tiny + ["rounds=2", "clients=10", "participation=0.3"])
    s = run_experiment(cfg, tmp_path)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    P = 64 * 10 + 10  # logreg on 8x8 digits, 10 classes
    K = 3
    assert s["n_params"] == P
    for r in rows:
        assert r["clients/participants"] == K
        assert r["comm/bytes_up"] == 4 * P * K
        assert r["comm/bytes_down"] == 4 * P * K
    assert s["comm/bytes_total"] == 2 * 2 * 4 * P * K


def test_scaffold_bytes_count_control_variates(tmp_path, tiny):
    run_experiment(compose_cfg(tiny + ["method=scaffold", "participation=0.3", "hardware.dtype=float64"]), tmp_path)
    P, K = 64 * 10 + 10, 3
    for r in read_jsonl(tmp_path / "metrics.jsonl"):
        assert r["comm/bytes_up"] == 2 * 8 * P * K      # model delta + control-variate delta, float64
        assert r["comm/bytes_down"] == 2 * 8 * P * K    # model + server control variate


def test_rounds_to_best_is_first_max_on_validation(tmp_path, tiny):
    s = run_experiment(compose_cfg(tiny + ["rounds=5", "eval_every=2"]), tmp_path)
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "global/val_acc" in r]
    assert [r["round"] for r in rows] == [2, 4, 5]  # eval_every=2 plus the last round
    best = max(r["global/val_acc"] for r in rows)
    first = next(r for r in rows if r["global/val_acc"] == best)
    assert s["best/val_acc"] == best and s["best/round"] == first["round"]
    assert s["best/test_acc"] == first["global/test_acc"]


def test_rerunning_a_finished_run_keeps_its_results(tmp_path, tiny):
    first = run_experiment(compose_cfg(tiny + ["rounds=3"]), tmp_path)
    rows = (tmp_path / "metrics.jsonl").read_text()
    again = run_experiment(compose_cfg(tiny + ["rounds=3"]), tmp_path)  # e.g. a restarted sweep
    assert again == first and (tmp_path / "metrics.jsonl").read_text() == rows
    assert again["final/test_acc"] is not None


@pytest.mark.parametrize("weighting", ["uniform", "samples"])
def test_scaffold_is_algorithm_1_on_unequal_clients(tmp_path, tiny, weighting):
    """SCAFFOLD (Karimireddy et al. 2020, Algorithm 1, option II) written here on the run's own data,
    split and starting model: full-batch local steps (batch >= every client), 3 rounds, 5 of 10 clients."""
    import torch.nn.functional as F

    from fedbench.data.clients import sample_cohort
    from fedbench.run.build import build_run

    cfg = compose_cfg(tiny + ["method=scaffold", f"method.weighting={weighting}", "hardware.dtype=float64",
                              "partition=iid", "partition.quantity_skew=1.0", "batch_size=1797", "local_epochs=3",
                              "rounds=3", "lr=0.2"])
    (tmp_path / "oracle").mkdir()
    run = build_run(cfg, tmp_path / "oracle")
    x_all, y_all = run.view.x, run.view.y
    data = [(x_all[torch.as_tensor(run.view.ids[run.view.offsets[i]:run.view.offsets[i + 1]])],
             y_all[torch.as_tensor(run.view.ids[run.view.offsets[i]:run.view.offsets[i + 1]])])
            for i in range(10)]
    sizes = torch.tensor([len(d[1]) for d in data], dtype=torch.float64)
    assert sizes.max() > 2 * sizes.min()  # unequal clients
    x = {k: v.clone() for k, v in run.state.gstate["params"].items()}
    c = {k: torch.zeros_like(v) for k, v in x.items()}
    c_i = [{k: torch.zeros_like(v) for k, v in x.items()} for _ in range(10)]
    eta, steps = 0.2, 3

    def grad_of(params, xb, yb):
        p = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        loss = F.cross_entropy(torch.func.functional_call(run.model, (p, run.state.gstate["buffers"]), (xb,)), yb)
        return dict(zip(p, torch.autograd.grad(loss, list(p.values())), strict=True))

    for r in range(1, 4):
        cohort = sample_cohort(0, r, 10, 0.5)
        dys, dcs = [], []
        for i in cohort:
            y = {k: v.clone() for k, v in x.items()}
            for _ in range(steps):
                g = grad_of(y, *data[i])
                y = {k: y[k] - eta * (g[k] - c_i[i][k] + c[k]) for k in y}
            new_ci = {k: c_i[i][k] - c[k] + (x[k] - y[k]) / (steps * eta) for k in x}
            dys.append({k: y[k] - x[k] for k in x})
            dcs.append({k: new_ci[k] - c_i[i][k] for k in x})
            c_i[i] = new_ci
        w = torch.ones(len(cohort), dtype=torch.float64) if weighting == "uniform" else sizes[cohort]
        w = w / w.sum()
        x = {k: x[k] + sum(w[j] * dys[j][k] for j in range(len(cohort))) for k in x}
        c = {k: c[k] + len(cohort) / 10 * sum(d[k] for d in dcs) / len(cohort) for k in c}
    run_experiment(cfg, tmp_path / "run")
    got, ckpt = final_params(tmp_path / "run")
    for k in x:
        torch.testing.assert_close(got[k], x[k], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ckpt["gstate"]["c"][k], c[k], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["fedavg", "fedprox"])
def test_bn_frozen_keeps_the_starting_statistics_for_any_gradient_method(tmp_path, method):
    """The FedSQ control: `method.bn=frozen` trains with the starting BatchNorm statistics and never
    updates them (FedSQ's default); `batch` (the default elsewhere) uses and updates batch statistics."""
    base = ["dataset=digits", "backbone=resnet18", "backbone.norm=batch", "clients=4", "rounds=1",
            "participation=1.0", "local_steps=2", "batch_size=8", "logger=local", "progress=false",
            "hardware=cpu", f"method={method}"]
    out = {}
    for bn in ("frozen", "batch"):
        run_experiment(compose_cfg(base + [f"method.bn={bn}"]), tmp_path / bn)
        out[bn] = torch.load(tmp_path / bn / "checkpoint.pt", weights_only=True)["gstate"]
    mean = "body.1.running_mean"
    assert torch.equal(out["frozen"]["buffers"][mean], torch.zeros_like(out["frozen"]["buffers"][mean]))
    assert not torch.equal(out["batch"]["buffers"][mean], out["frozen"]["buffers"][mean])
    assert not torch.equal(out["frozen"]["params"]["head.weight"], out["batch"]["params"]["head.weight"])


def test_client_state_blocks_rewrite_only_trained_clients_and_resume_exactly(tmp_path, tiny):
    """A large federation's client state lives in client_state/ blocks of 64 clients; a checkpoint
    rewrites only the blocks of clients that trained since the previous one; resume is exact."""
    from torch.utils._pytree import tree_leaves

    from fedbench.data.clients import sample_cohort
    from fedbench.run.state import BLOCK_CLIENTS, load_checkpoint

    cfg = tiny + ["method=scaffold", "clients=300", "participation=0.01", "partition=iid", "rounds=4",
                  "hardware.dtype=float64", "checkpoint_every=1"]
    blocks = cfg + ["checkpoint_inline_mb=0"]
    run_experiment(compose_cfg(cfg), tmp_path / "inline")
    with pytest.raises(Preempted):
        run_experiment(compose_cfg(blocks), tmp_path / "blocks", stop_after=2)
    ckpt = torch.load(tmp_path / "blocks" / "checkpoint.pt", weights_only=False)
    assert ckpt["cstates"] == {} and sorted(ckpt["client_blocks"]) == [0, 1, 2, 3, 4]
    rewritten = {b for b, name in ckpt["client_blocks"].items() if name.endswith("r000002.pt")}
    trained = {int(c) // BLOCK_CLIENTS for c in sample_cohort(0, 2, 300, 0.01)}
    assert rewritten == trained and len(rewritten) <= 3  # round 2 rewrote its cohort's blocks only
    files = {p.name for p in (tmp_path / "blocks" / "client_state").glob("block*.pt")}
    prev = torch.load(tmp_path / "blocks" / "checkpoint.prev.pt", weights_only=False)["client_blocks"]
    assert files == set(ckpt["client_blocks"].values()) | set(prev.values())  # older ones pruned
    run_experiment(compose_cfg(blocks), tmp_path / "blocks")  # resumes from round 2
    a = final_params(tmp_path / "inline")[1]
    b = load_checkpoint(tmp_path / "blocks" / "checkpoint.pt", torch.device("cpu"))
    for x, y in zip(tree_leaves([a["gstate"], a["cstates"]]), tree_leaves([b["gstate"], b["cstates"]]),
                    strict=True):
        assert torch.equal(x, y)
