"""FedPAC: the simplex QP against a brute-force optimum, the client's statistics and prototypes against
a direct computation, the server's prototypes and classifier combination, bytes, and a run offline."""

import itertools

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_cfg, make_method, read_jsonl
from fedbench.data.clients import ClientView, make_schedule
from fedbench.engine.executors import SequentialExecutor
from fedbench.engine.protocol import RoundContext
from fedbench.experiment import run_experiment
from fedbench.methods.fedpac import FedPAC, simplex_qp
from fedbench.models.backbones import build_model


def brute_force_simplex_qp(p: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Every support S: the equality-constrained optimum on S (KKT), kept if feasible; the best one."""
    k = p.shape[0]
    best = (float("inf"), None)
    for size in range(1, k + 1):
        for support in itertools.combinations(range(k), size):
            s = list(support)
            kkt = np.zeros((size + 1, size + 1))
            kkt[:size, :size] = 2 * p[s][:, s].numpy()
            kkt[:size, size] = kkt[size, :size] = 1.0
            rhs = np.zeros(size + 1)
            rhs[size] = 1.0
            sol = np.linalg.lstsq(kkt, rhs, rcond=None)[0][:size]
            if (sol < -1e-12).any() or abs(sol.sum() - 1) > 1e-9:
                continue
            a = torch.zeros(k, dtype=torch.float64)
            a[s] = torch.from_numpy(sol)
            value = float(a @ p @ a)
            if value < best[0] - 1e-15:
                best = (value, a)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_simplex_qp_equals_the_brute_force_optimum(seed):
    g = torch.Generator().manual_seed(seed)
    k = 2 + seed % 4
    m = torch.randn(k, k + seed % 2 - 1 if seed % 3 == 0 else k, generator=g, dtype=torch.float64)
    p = m @ m.T + torch.diag(torch.rand(k, generator=g, dtype=torch.float64) * (seed % 2))  # PSD, maybe singular
    p[0, 0] += 5.0 * (seed % 3 == 1)  # a dominant client: its weight goes to 0 (a boundary optimum)
    a = simplex_qp(p)
    assert float(a.min()) >= 0.0 and abs(float(a.sum()) - 1.0) < 1e-12
    value, ref = brute_force_simplex_qp(p)
    assert float(a @ p @ a) == pytest.approx(value, rel=1e-9, abs=1e-12)
    if bool((torch.linalg.eigvalsh(p) > 1e-8).all()):  # strictly convex: the minimiser is unique
        assert torch.allclose(a, ref, atol=1e-8)


def one_round(method, x, y, parts, epochs):
    view = ClientView.build(x, y, parts)
    cohort = np.arange(len(parts))
    sched = make_schedule(view, cohort, 0, 1, 8, epochs, None, torch.float64, "cpu")
    gstate = method.init_global(method.ctx.params, method.ctx.buffers)
    cstates = method.init_client_states(gstate, len(parts))
    ctx = RoundContext(1, torch.as_tensor(cohort), torch.as_tensor(view.sizes(), dtype=torch.float64),
                       len(parts), 1)
    res = SequentialExecutor().run(method.client_fns(ctx), method.broadcast(gstate, ctx).tensors, cstates,
                                   ctx.cohort, view, sched)
    return gstate, ctx, res


def test_client_statistics_prototypes_and_server_combination():
    torch.manual_seed(0)
    model = build_model(OmegaConf.create({"name": "mlp", "hidden": [6]}), (5,), 3).double()
    method = make_method(FedPAC, {"body_epochs": 2}, model=model, num_classes=3, lr=0.05)
    x = torch.randn(60, 5, dtype=torch.float64)
    y = torch.arange(60) % 3
    parts = [np.arange(0, 20), np.arange(20, 45), np.r_[45:60, 0:3]]
    parts[2] = parts[2][y[parts[2]].numpy() != 2]  # client 2 lacks class 2
    gstate, ctx, res = one_round(method, x, y, parts, method.local_epochs(1))
    up = res.uplink
    body = {k[5:]: v for k, v in gstate["params"].items() if k.startswith("body.")}
    for i, idx in enumerate(parts):
        xi, yi = x[idx], y[idx]
        n_k = torch.bincount(yi, minlength=3).double()
        assert torch.equal(up["counts"][i], n_k)
        # V_i and H_i from the round's STARTING extractor, as the official statistics_extraction
        f = torch.func.functional_call(model.body, body, (xi,))
        mu = torch.stack([f[yi == c].mean(0) if n_k[c] else torch.zeros(6, dtype=torch.float64) for c in range(3)])
        p_k = n_k / len(idx)
        sq = torch.stack([(f[yi == c] ** 2).sum(1).mean() if n_k[c] else torch.zeros((), dtype=torch.float64)
                          for c in range(3)])
        torch.testing.assert_close(up["h_ref"][i], p_k[:, None] * mu)
        torch.testing.assert_close(up["var"][i], ((p_k * sq - p_k ** 2 * (mu ** 2).sum(1)).sum()) / len(idx))
        # prototypes: class means of the TRAINED extractor's features
        trained = {k[5:]: v[i] for k, v in up["params"].items() if k.startswith("body.")}
        f2 = torch.func.functional_call(model.body, trained, (xi,))
        for c in range(3):
            if n_k[c]:
                torch.testing.assert_close(up["protos"][i, c], f2[yi == c].mean(0))
    new, _ = method.aggregate(gstate, up, ctx)
    for c in range(3):  # size-weighted mean over the clients holding the class
        expect = sum(up["counts"][i, c] * up["protos"][i, c] for i in range(3)) / up["counts"][:, c].sum()
        torch.testing.assert_close(new["protos"][c], expect)
    states, sent = method.personalize(new, res.client_states, up, ctx)
    weights = method.combination_weights(up["var"], up["h_ref"])
    assert torch.allclose(weights.sum(1), torch.ones(3, dtype=torch.float64)) and bool((weights >= 0).all())
    torch.testing.assert_close(states["private"]["head.weight"],
                               torch.einsum("ij,jab->iab", weights, up["head"]["head.weight"]))
    assert sent.stacked and set(sent.tensors) == {"head"}


def test_body_epochs_zero_leaves_the_extractor_and_the_head_moves():
    torch.manual_seed(1)
    model = build_model(OmegaConf.create({"name": "mlp", "hidden": [6]}), (5,), 3).double()
    method = make_method(FedPAC, {"body_epochs": 0}, model=model, num_classes=3)
    x, y = torch.randn(30, 5, dtype=torch.float64), torch.arange(30) % 3
    gstate, _, res = one_round(method, x, y, [np.arange(30)], method.local_epochs(1))
    for k, v in res.uplink["params"].items():
        assert torch.equal(v[0], gstate["params"][k])
    assert not torch.equal(res.uplink["head"]["head.weight"][0], gstate["params"]["head.weight"])


def test_fedpac_runs_offline_on_noniid_s_and_counts_its_payloads(tmp_path):
    cfg = ["dataset=digits", "backbone=mlp", "backbone.hidden=[16]", "clients=6", "rounds=2", "participation=0.5",
           "batch_size=16", "logger=local", "progress=false", "hardware=cpu", "partition=noniid_s",
           "method=fedpac", "method.body_epochs=1"]
    s = run_experiment(compose_cfg(cfg), tmp_path)
    assert s["status"] == "completed" and 0.0 <= s["personal/test_acc"] <= 1.0
    d, h, c, k = 64, 16, 10, 3
    body, head = d * h + h, h * c + c
    up = k * (body + head + c * h + c + 1 + c * h) * 4
    down = k * (body + c * h + c + head) * 4  # model + prototypes + counts, and each one's combined head
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert all(r["comm/bytes_up"] == up and r["comm/bytes_down"] == down for r in rows)
