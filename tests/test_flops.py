"""FLoPS / FLoPS-PA and the pruning baselines: gate math, dual restart, TDR, sparse payload bytes,
per-round sparsity metrics in files and W&B, and bad input."""

import math

import pytest
import torch

from conftest import compose_cfg, make_method, read_jsonl, run_cli
from fedbench.experiment import run_experiment
from fedbench.methods.flops import FLoPS
from fedbench.metrics.comm import SPARSE, SPARSE_GROUP, Payload, payload_bytes, payload_bytes_per_message
from fedbench.metrics.sparsity import support_scores, top_m_mask
from fedbench.models.gates import CLOSED, L0_SHIFT, deterministic_gate, init_log_alpha, prob_nonzero, sample_gate
from fedbench.tracking.wandb_file import read_run

LIN = ["dataset=synthetic_linear", "dataset.d=200", "dataset.n=2000", "backbone=logreg", "clients=5",
       "partition=iid", "participation=1.0", "local_steps=1", "batch_size=32", "logger=local", "progress=false",
       "hardware=cpu", "rounds=30", "method.prune_start=15"]


@pytest.mark.parametrize("log_alpha", [-6.0, -2.0, 0.0, 1.5, 4.0])
def test_prob_nonzero_matches_monte_carlo(log_alpha):
    g = torch.Generator().manual_seed(0)
    u = torch.rand(400_000, generator=g, dtype=torch.float64)
    z = sample_gate(torch.full_like(u, log_alpha), u)
    mc = float((z > 0).double().mean())
    exact = float(prob_nonzero(torch.tensor(log_alpha, dtype=torch.float64)))
    assert abs(mc - exact) < 4 * math.sqrt(exact * (1 - exact) / len(u)) + 1e-4


def test_deterministic_gate():
    la = torch.tensor([-10.0, CLOSED - 1e-3, CLOSED + 1e-3, 0.0, -CLOSED + 1e-3, 10.0], dtype=torch.float64)
    z = deterministic_gate(la)
    assert z[0] == 0 and z[1] == 0 and z[2] > 0
    assert abs(float(z[3]) - 0.5) < 1e-12  # sigmoid(0) * 1.2 - 0.1
    assert z[4] == 1 and z[5] == 1


def test_log_alpha_range_permits_density_0_005():
    # the clamp at -log_alpha_max must leave room below 0.005 (the common 4.6 clamp stops at 0.047)
    assert float(prob_nonzero(torch.tensor(-10.0))) < 0.005
    assert float(prob_nonzero(torch.tensor(-4.6))) > 0.04
    # the log_alpha at which P(z != 0) = 0.005 lies inside the clamp
    target = math.log(0.005 / 0.995) + L0_SHIFT
    assert -10.0 < target < 10.0
    assert abs(float(prob_nonzero(torch.tensor(target, dtype=torch.float64))) - 0.005) < 1e-12
    # rho_init sets sigmoid(log_alpha) at the start (the spec's init), here a sparse start
    la = init_log_alpha(100_000, 0.005, 0.01, torch.Generator().manual_seed(0))
    assert abs(float(torch.sigmoid(la).mean()) - 0.005) < 1e-4


def test_gradients_reach_log_alpha_through_sampled_gates():
    la = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    theta = torch.tensor([1.0, -2.0, 0.5, 3.0, 1.0], dtype=torch.float64)
    u = torch.full((5,), 0.5, dtype=torch.float64)  # mid-range noise: gates strictly inside (0, 1)
    ((theta * sample_gate(la, u)).sum() ** 2).backward()
    assert la.grad is not None and bool((la.grad.abs() > 0).all())


def test_dual_variable_restarts_when_constraint_holds():
    params = {"w": torch.zeros(10, 100)}
    m = make_method(FLoPS, {"target_density": 0.1, "prune_start": None, "eta_lambda": 0.5}, params=params,
                    total_rounds=10)
    lam = torch.tensor(3.0)
    dense = torch.full((1000,), 5.0)  # P ~ 1 > 0.1: violated -> lambda grows
    lam2, c = m.dual_update(lam, dense)
    assert float(c) > 0 and float(lam2) > 3.0
    sparse = torch.full((1000,), -8.0)  # P ~ 0.001 <= 0.1: met -> lambda restarts at 0
    lam3, c = m.dual_update(lam2, sparse)
    assert float(c) <= 0 and float(lam3) == 0.0


@pytest.mark.parametrize("rank_by", ["log_alpha", "saliency"])
def test_gate_scaling_opens_exactly_m(rank_by):
    params = {"w": torch.randn(1, 1000, generator=torch.Generator().manual_seed(2))}
    m = make_method(FLoPS, {"target_density": 0.05, "prune_start": 3, "scale_factor": 0.1, "project": "final",
                            "rank_by": rank_by}, params=params, total_rounds=10)
    la = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    assert torch.equal(m.scale_gates(la, params, 2), la)  # before prune_start: untouched
    mid = m.scale_gates(la, params, 5)                    # gradual: a shift, not yet exact
    assert int((deterministic_gate(mid) > 0).sum()) > 50
    out = m.scale_gates(la, params, 10)                   # the last round: exactly m open
    assert int((deterministic_gate(out) > 0).sum()) == 50 == m.m
    score = m.ranking_score(la, params)
    assert set(torch.topk(out, 50).indices.tolist()) == set(torch.topk(score, 50).indices.tolist())


def test_tdr_recall_on_hand_made_support():
    s = support_scores(torch.tensor([1, 2, 3, 9]), torch.tensor([1, 2, 5]))
    assert s["tdr"] == 0.5 and s["recall"] == pytest.approx(2 / 3) and s["f1"] == pytest.approx(4 / 7)
    assert support_scores(torch.tensor([], dtype=torch.long), torch.tensor([1]))["tdr"] is None


def test_top_m_is_global_across_tensors():
    mask = top_m_mask({"a": torch.tensor([[0.1, 5.0]]), "b": torch.tensor([4.0, -6.0, 0.2])}, 3)
    assert mask["a"].tolist() == [[False, True]] and mask["b"].tolist() == [True, True, False]


def test_sparse_payload_bytes_exact():
    d = 1000
    mask = torch.zeros(d, dtype=torch.bool)
    mask[:10] = True
    group = {"mask": mask, "theta": torch.randn(d).where(mask, torch.tensor(0.0)), "la": torch.randn(d)}
    # 10 active: 2 value tensors x 10 x 4 B + min(10 int32 indices = 40 B, bitmask 125 B)
    assert payload_bytes(Payload({"active": group}, {"active": SPARSE_GROUP})) == 2 * 10 * 4 + 40
    mask[:200] = True  # 200 active: the bitmask (125 B) beats 800 B of indices
    assert payload_bytes(Payload({"active": group}, {"active": SPARSE_GROUP})) == 2 * 200 * 4 + 125
    # stacked over 3 clients with different supports; float64 values + SPARSE encoding
    t = torch.zeros(3, d, dtype=torch.float64)
    t[0, :5] = 1.0
    t[1, :300] = 1.0
    assert payload_bytes_per_message(Payload({"w": t}, {"w": SPARSE}, stacked=True)) == [5 * 8 + 20, 300 * 8 + 125, 0]


def test_flops_batched_equals_sequential(tmp_path):
    outs = {}
    for ex in ("sequential", "batched"):
        run_experiment(compose_cfg(LIN + ["method=flops", "hardware.dtype=float64", "rounds=6",
                                          "method.prune_start=3", f"hardware.executor={ex}"]), tmp_path / ex)
        outs[ex] = torch.load(tmp_path / ex / "checkpoint.pt", weights_only=False)["gstate"]
    torch.testing.assert_close(outs["sequential"]["la"], outs["batched"]["la"], rtol=1e-10, atol=1e-12)
    for k, v in outs["sequential"]["params"].items():
        torch.testing.assert_close(v, outs["batched"]["params"][k], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["flops", "flops_pa", "fedht", "fediterht", "fedavg_prune"])
def test_reaches_target_density_and_logs_sparsity_per_round(tmp_path, method):
    extra = ["local_steps=3"] if method != "flops" else []
    s = run_experiment(compose_cfg(LIN + [f"method={method}", "method.target_density=0.05", "dataset.coef=sign",
                                          "logger=wandb", "logger.wandb.mode=offline"] + extra), tmp_path)
    assert s["sparsity/nnz"] == math.floor(0.05 * 200) and s["sparsity/n_gated"] == 200
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    for r in rows:
        for key in ("sparsity/density", "sparsity/tdr", "sparsity/recall", "comm/bytes_up", "best/round",
                    "global/test_r2"):
            assert key in r, (key, r)
    if method.startswith("flops"):
        assert all("sparsity/expected_density" in r for r in rows)
    run = read_run(next(tmp_path.glob("wandb/offline-run-*/run-*.wandb")))
    hist = [h for h in run["history"] if "sparsity/density" in h]
    assert len(hist) == len(rows)
    assert [h["sparsity/tdr"] for h in hist] == [r["sparsity/tdr"] for r in rows]
    assert run["summary"]["sparsity/tdr"] == s["sparsity/tdr"]


def test_flops_pa_sends_fewer_bytes_than_flops(tmp_path):
    a = run_experiment(compose_cfg(LIN + ["method=flops"]), tmp_path / "a")
    b = run_experiment(compose_cfg(LIN + ["method=flops_pa", "local_steps=3"]), tmp_path / "b")
    assert b["comm/bytes_total"] < a["comm/bytes_total"]


def test_no_tdr_where_support_unknown(tmp_path, tiny):
    run_experiment(compose_cfg(tiny + ["method=fedht"]), tmp_path)
    row = read_jsonl(tmp_path / "metrics.jsonl")[-1]
    assert "sparsity/density" in row and "sparsity/tdr" not in row  # absent, never 0


@pytest.mark.parametrize("args,fragment", [
    (["method.target_density=0"], "method.target_density=0"),
    (["method.target_density=1.5"], "method.target_density=1.5"),
    (["method.prune_start=99"], "method.prune_start=99"),
    (["method.gated=nothing_matches"], "matches no parameter"),
])
def test_bad_flops_input(tmp_path, args, fragment):
    proc = run_cli(LIN + ["method=flops"] + args, tmp_path)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fedbench: error:")]
    assert len(errors) == 1 and fragment in errors[0] and "Traceback" not in proc.stderr, proc.stderr


def test_gallego_posada_gate_and_its_projection():
    """deterministic=gallego_posada: sigmoid(log_alpha / beta) x 1.2 - 0.1, clipped; the final projection
    leaves exactly m gates open under that rule too."""
    from fedbench.models.gates import BETA, closed_below

    la = torch.linspace(-6, 6, 101, dtype=torch.float64)
    want = (torch.sigmoid(la / (2 / 3)) * 1.2 - 0.1).clamp(0, 1)
    assert torch.allclose(deterministic_gate(la, "gallego_posada"), want, atol=1e-15)
    assert torch.equal(deterministic_gate(la), deterministic_gate(la, "louizos"))
    edge = torch.tensor([closed_below("gallego_posada") - 1e-6, closed_below("gallego_posada") + 1e-6],
                        dtype=torch.float64)
    assert deterministic_gate(edge, "gallego_posada").tolist()[0] == 0 < deterministic_gate(edge, "gallego_posada")[1]
    assert closed_below("gallego_posada") == CLOSED * BETA
    params = {"w": torch.randn(1, 1000, generator=torch.Generator().manual_seed(2))}
    m = make_method(FLoPS, {"target_density": 0.05, "prune_start": 3, "scale_factor": 0.1,
                            "deterministic": "gallego_posada"}, params=params, total_rounds=10)
    out = m.scale_gates(torch.randn(1000, generator=torch.Generator().manual_seed(1)), params, 10)
    assert int((deterministic_gate(out, "gallego_posada") > 0).sum()) == 50


def test_multiplicative_scaling_and_scaling_from_the_round_after_prune_start():
    params = {"w": torch.randn(1, 1000, generator=torch.Generator().manual_seed(2))}
    la = torch.randn(1000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    hp = {"target_density": 0.05, "prune_start": 3, "scale_factor": 0.2, "decay": 0.5, "project": "never"}
    add = make_method(FLoPS, hp, params=params, total_rounds=10)
    mult = make_method(FLoPS, {**hp, "scaling": "multiplicative"}, params=params, total_rounds=10)
    after = make_method(FLoPS, {**hp, "scale_from": "after"}, params=params, total_rounds=10)
    top = torch.zeros(1000, dtype=torch.bool)
    top[torch.topk(add.ranking_score(la, params), 50).indices] = True
    step = 0.2 * 0.5 ** (5 - 3)  # round 5: the step decayed twice
    assert torch.allclose(add.scale_gates(la, params, 5), torch.where(top, la + step, la - step))
    assert torch.allclose(mult.scale_gates(la, params, 5), torch.where(top, la + step * la.abs(),
                                                                       la - step * la.abs()))
    assert not torch.equal(add.scale_gates(la, params, 3), la)      # at: prune_start is scaled
    assert torch.equal(after.scale_gates(la, params, 3), la)        # after: it is not ...
    assert torch.equal(after.scale_gates(la, params, 4), add.scale_gates(la, params, 4))  # ... the next is


def test_flops_pa_client_penalty_on_the_servers_scale():
    """client_penalty=server: the clients' penalty gradient per gate equals the server's constraint_grad
    (penalty=sum: p(1 - p)); the default (mean) is that divided by D."""
    from fedbench.methods.flops import FLoPSPA

    params = {"w": torch.zeros(1, 400)}
    la = torch.randn(400, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    grads = {}
    for rule in ("mean", "server"):
        m = make_method(FLoPSPA, {"client_penalty": rule}, params=params, total_rounds=5)
        x = la.clone().requires_grad_(True)
        m.client_penalty(x).backward()
        grads[rule] = x.grad
    assert torch.allclose(grads["server"], m.constraint_grad(la), atol=1e-15)
    assert torch.allclose(grads["mean"] * 400, grads["server"], atol=1e-15)


@pytest.mark.parametrize("option", ["method.scaling=multiplicative", "method.scale_from=after",
                                    "method.deterministic=gallego_posada"])
def test_flops_options_reach_the_target_density(tmp_path, option):
    s = run_experiment(compose_cfg(LIN + ["method=flops", "method.target_density=0.05", option]), tmp_path)
    assert s["sparsity/nnz"] == math.floor(0.05 * 200)
