"""Personalized FL: the noniid_s split, per-client evaluation on each client's own split, FedeCouple's
anchors (never sent), personal classifiers that persist, fair aggregation weights, the batched executor
oracle, and a 500-client run with stacked client state."""

import dataclasses

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils._pytree import tree_map

from conftest import compose_cfg, make_method, read_jsonl
from fedbench.data.partitions import Partition, make_partition
from fedbench.engine.executors import SequentialExecutor
from fedbench.engine.functional import split_state, tree_assign, tree_index
from fedbench.engine.protocol import RoundContext
from fedbench.errors import ConfigError
from fedbench.experiment import evaluate_personal, run_experiment
from fedbench.methods.fedecouple import FedeCouple, fair_weights
from fedbench.methods.fedrod import FedRoD
from fedbench.metrics.comm import payload_bytes
from fedbench.models.backbones import build_model

PERSONAL = ["dataset=digits", "backbone=mlp", "backbone.hidden=[32]", "clients=8", "rounds=2", "participation=0.5",
            "batch_size=16", "logger=local", "progress=false", "hardware=cpu", "partition=noniid_s"]
METHODS = ["local", "fedper", "lgfedavg", "fedrep", "fedbabu", "ditto", "fedproto", "fedrod", "fedecouple", "fedpac"]


def noniid_cfg(**kw):
    base = {"name": "noniid_s", "rule": "disjoint", "s": 0.2, "groups": 5, "local_size": None, "min_samples": 1,
            "client_val_fraction": 0.0, "client_test_fraction": 0.3}
    return OmegaConf.create({**base, **kw})


def test_noniid_s_mix_sizes_and_determinism():
    labels = np.repeat(np.arange(10), 500)  # 5,000 samples, 10 classes
    part = make_partition(labels, 20, noniid_cfg(local_size=200), seed=0)
    again = make_partition(labels, 20, noniid_cfg(local_size=200), seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(part.train, again.train, strict=True))
    used = np.concatenate(part.train + part.test)
    assert len(used) == len(np.unique(used)) == 20 * 200  # disjoint clients, local_size each
    for k in range(20):
        group = {2 * (k % 5), 2 * (k % 5) + 1}
        for split in (part.train[k], part.test[k]):
            dominant = np.isin(labels[split], list(group)).mean()
            # (1 - s) from the dominant group plus its share (1/5) of the iid fraction s = 0.84
            assert 0.70 <= dominant <= 0.97, (k, dominant)
        assert len(part.test[k]) == 60  # the test split comes from the same mix (30%)


def test_noniid_s_default_is_fedpacs_split():
    # FedPAC's data_loader with s = 20%, 600 train + 300 test: 180 iid samples = 18 per class, 720 over the
    # dominant group = 240 per class; groups [0,1,2], [2,3,4], [4,5,6], [6,7,8], [8,9,0], client k -> k mod 5
    labels = np.repeat(np.arange(10), 5000)
    cfg = noniid_cfg(rule="fedpac", group_size=3, group_stride=2, client_test_fraction=1 / 3)
    part = make_partition(labels, 20, cfg, seed=0)
    groups = [[0, 1, 2], [2, 3, 4], [4, 5, 6], [6, 7, 8], [8, 9, 0]]
    used = np.concatenate(part.train + part.test)
    assert len(used) == len(np.unique(used)) == 20 * 900  # disjoint clients, FedPAC's 900 each by default
    for k in range(20):
        assert len(part.train[k]) == 600 and len(part.test[k]) == 300
        counts = np.bincount(labels[np.concatenate([part.train[k], part.test[k]])], minlength=10)
        expected = np.full(10, 18)
        expected[groups[k % 5]] += 240
        assert np.array_equal(counts, expected), (k, counts)
    # a pool too small for 900 each: the largest size that fits, same rule
    small = make_partition(np.repeat(np.arange(10), 500), 20, noniid_cfg(rule="fedpac", client_test_fraction=0), 0)
    size = len(small.train[0])
    assert all(len(t) == size for t in small.train) and 150 <= size < 900


def test_noniid_s_impossible_requests_fail_clearly():
    labels = np.repeat(np.arange(10), 100)
    with pytest.raises(ConfigError, match="local_size"):
        make_partition(labels, 20, noniid_cfg(local_size=60), seed=0)
    with pytest.raises(ConfigError, match="partition.s"):
        make_partition(labels, 5, noniid_cfg(s=1.5), seed=0)


def test_personal_evaluation_uses_each_clients_own_split():
    # client k's test split holds only class k; the personal model of client k predicts class k only
    # from its own bias, so accuracy is 1 on every client iff each one is scored on its own split
    model = build_model(OmegaConf.create({"name": "logreg"}), (2,), 3)
    x = torch.zeros(9, 2)
    y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    part = Partition(train=[np.array([0]), np.array([3]), np.array([6])], val=[np.array([], int)] * 3,
                     test=[np.array([1, 2]), np.array([4, 5]), np.array([7, 8])])

    class OwnBias:
        def personal_params(self, gstate, cstate, x_train, y_train):
            params = {k: torch.zeros_like(v) for k, v in split_state(model)[0].items()}
            params["head.bias"] = torch.nn.functional.one_hot(cstate["k"], 3).float()
            return params, {}

    data = type("D", (), {"task": "classification", "x_train": x, "y_train": y})()
    cstates = {"k": torch.arange(3)}
    out = evaluate_personal(OwnBias(), {}, cstates, model, data, part)
    assert out["personal/test_acc"] == 1.0 and out["personal/test_acc_std"] == 0.0
    out = evaluate_personal(OwnBias(), {}, {"k": torch.tensor([1, 2, 0])}, model, data, part)
    assert out["personal/test_acc"] == 0.0


def test_fair_weights_sum_to_one_and_are_clipped():
    gen = torch.Generator().manual_seed(0)
    for k in (2, 5, 20, 100):
        sizes = torch.rand(k, generator=gen, dtype=torch.float64) * 100 + 1
        sims = torch.rand(k, generator=gen, dtype=torch.float64) * 2 - 1
        for temperature in (0.05, 1.0):
            w = fair_weights(sizes, sims, temperature, 0.5, 2.0)
            assert abs(float(w.sum()) - 1.0) < 1e-12
            assert float(w.min()) >= 0.5 / k - 1e-12 and float(w.max()) <= 2.0 / k + 1e-12
    # one very similar, very large client cannot dominate
    w = fair_weights(torch.tensor([1e6, 1.0, 1.0, 1.0]), torch.tensor([1.0, -1.0, -1.0, -1.0]), 0.1, 0.5, 2.0)
    assert float(w[0]) == pytest.approx(0.5) and float(w[1:].min()) >= 0.125 - 1e-12


def fedecouple_round(cstates=None, rounds=1, **hp):
    """A FedeCouple method on a small MLP with 6 clients of digits-like random data, run for `rounds`."""
    torch.manual_seed(0)
    from fedbench.data.clients import ClientView, make_schedule

    model = build_model(OmegaConf.create({"name": "mlp", "hidden": [16]}), (1, 8, 8), 10).double()
    params, buffers = split_state(model)
    hp = {"anchors": "ema", "anchor_weight": 1.0, **hp}
    method = make_method(FedeCouple, hp, model=model, total_rounds=5)
    x = torch.randn(120, 1, 8, 8, dtype=torch.float64)
    y = torch.arange(120) % 10
    view = ClientView.build(x, y, [np.arange(i * 20, (i + 1) * 20) for i in range(6)])
    gstate = method.init_global(params, buffers)
    cstates = method.init_client_states(gstate, 6) if cstates is None else cstates
    log = []
    for r in range(1, rounds + 1):
        cohort = torch.tensor([0, 2, 4]) if r % 2 else torch.tensor([1, 2, 3])
        sched = make_schedule(view, cohort.numpy(), 0, r, 8, 1, None, torch.float64, "cpu")
        ctx = RoundContext(r, cohort, torch.full((3,), 20.0, dtype=torch.float64), 6, 5)
        down = method.broadcast(gstate, ctx)
        before = tree_map(torch.clone, cstates)
        res = SequentialExecutor().run(method.client_fns(ctx), down.tensors, tree_index(cstates, cohort), cohort,
                                       view, sched)
        tree_assign(cstates, cohort, res.client_states)
        gstate, _ = method.aggregate(gstate, res.uplink, ctx)
        log.append({"down": down, "up": res.uplink, "cohort": cohort, "before": before,
                    "after": tree_map(torch.clone, cstates), "gstate": gstate, "x": x, "y": y})
    return method, params, log


def test_fedecouple_anchors_are_never_sent_and_cost_zero_bytes():
    method, params, log = fedecouple_round()
    rec = log[0]
    p = sum(v.numel() for v in params.values())
    keys = set(rec["up"]) | set(rec["up"]["params"]) | set(rec["down"].tensors)
    assert not any("anchor" in k for k in keys)
    # uplink = theta_i + phi_i of every participant: exactly FedAvg's 8 bytes (float64) per parameter
    assert payload_bytes(method.uplink(rec["up"])) == 8 * p * 3
    assert payload_bytes(rec["down"]) == 8 * p + 8  # the model and this round's kappa
    # the anchors were used and updated locally: they changed, for the participants only
    moved = (rec["after"]["anchors"] - rec["before"]["anchors"]).abs().flatten(1).sum(1)
    assert bool((moved[rec["cohort"]] > 0).all()) and float(moved[[1, 3, 5]].sum()) == 0.0


def test_fedecouple_personal_classifier_persists_and_is_not_overwritten():
    method, _, log = fedecouple_round(rounds=2)
    head = list(log[0]["after"]["private"])
    assert head == ["head.weight", "head.bias"]
    r1, r2 = log
    key = "head.weight"
    a1, b1, a2, b2 = (r["private"] for r in (r1["after"], r1["before"], r2["after"], r2["before"]))
    # round 1 (clients 0, 2, 4): their heads trained, differ from each other and from the global head
    assert not torch.equal(a1[key][0], b1[key][0])
    assert not torch.equal(a1[key][0], a1[key][2])
    assert not torch.equal(a1[key][0], r1["gstate"]["params"]["head.weight"])
    # round 2 (clients 1, 2, 3): client 0's head is exactly what it kept after round 1, although the
    # server aggregated again; client 2 continued from its own round-1 head
    assert torch.equal(a2[key][0], a1[key][0])
    assert torch.equal(b2[key][2], a1[key][2])
    assert not torch.equal(a2[key][2], a1[key][2])


def test_fedecouple_clients_predict_with_their_own_extractor():
    method, _, log = fedecouple_round()
    rec = log[0]
    g = rec["gstate"]
    body = [k for k in g["params"] if k.startswith("body.")]

    def personal(k, state):
        return method.personal_params(g, tree_index(state, k), None, None)[0]

    for slot, k in enumerate(rec["cohort"].tolist()):  # trained: theta_k as uploaded, not the average
        mine = personal(k, rec["after"])
        assert all(torch.equal(mine[n], rec["up"]["params"][n][slot]) for n in body)
        assert not torch.equal(mine[body[0]], g["params"][body[0]])
        assert torch.equal(mine["head.weight"], rec["after"]["private"]["head.weight"][k])
    never = personal(1, rec["after"])  # not sampled yet: the global extractor
    assert all(torch.equal(never[n], g["params"][n]) for n in body)
    method.cfg = dataclasses.replace(method.cfg, eval_extractor="global")
    assert torch.equal(personal(0, rec["after"])[body[0]], g["params"][body[0]])


@pytest.mark.parametrize("method", ["fedrep", "ditto", "fedproto", "fedrod", "fedecouple", "fedpac",
                                    "fedecouple-global"])
def test_batched_equals_sequential_float64(tmp_path, method):
    name = method.split("-")[0]
    cfg = PERSONAL + [f"method={name}", "hardware.dtype=float64", "local_epochs=2", "method.momentum=0.5"]
    own_epochs = {"fedrep": ["method.head_epochs=2", "method.body_epochs=1"], "fedpac": ["method.body_epochs=1"],
                  "fedecouple-global": ["method.anchors=global", "method.phase_epochs=[1,1,1]",
                                        "metrics.extractors=both"]}
    cfg += own_epochs.get(method, [])
    out = {}
    for ex in ("sequential", "batched"):
        run_experiment(compose_cfg(cfg + [f"hardware.executor={ex}"]), tmp_path / ex)
        out[ex] = torch.load(tmp_path / ex / "checkpoint.pt", weights_only=False)
    for part in ("gstate", "cstates"):
        a, b = out["sequential"][part], out["batched"][part]
        a = a["params"] if part == "gstate" else a
        b = b["params"] if part == "gstate" else b
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_every_personalized_method_runs_and_logs_personal_metrics(tmp_path, method):
    s = run_experiment(compose_cfg(PERSONAL + [f"method={method}"]), tmp_path)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert all("personal/test_acc" in r and "personal/test_acc_std" in r for r in rows)
    assert 0.0 <= s["personal/test_acc"] <= 1.0 and s["best/personal_round"] in (1, 2)
    if method == "local":
        assert s["comm/bytes_total"] == 0
    both = method in ("ditto", "fedrod", "fedecouple")  # a global model AND personal models
    assert (s["best/val_acc"] is not None) == both
    # both protocols: the global model on the same client splits, next to each client's own model
    assert all(("clients/global_test_acc" in r) == both for r in rows)
    if both:
        assert 0.0 <= s["clients/global_test_acc"] <= 1.0 and "clients/global_val_acc_std" in s


def test_global_methods_are_scored_on_the_clients_splits_too(tmp_path):
    s = run_experiment(compose_cfg(PERSONAL + ["method=fedavg"]), tmp_path)
    assert s["best/val_acc"] is not None and 0.0 <= s["personal/test_acc"] <= 1.0
    assert "clients/global_test_acc" not in s  # personal/* IS the global model on the clients' splits


def test_the_global_model_on_the_clients_splits_is_the_global_model_scored_there(tmp_path):
    """clients/global_test_acc of a personalized method equals its global model evaluated by hand on
    every client's test split (weighted by split size)."""
    from fedbench.run.build import build_run
    from fedbench.run.evaluation import evaluate_global_on_clients

    cfg = compose_cfg(PERSONAL + ["method=ditto", "hardware.dtype=float64"])
    s = run_experiment(cfg, tmp_path / "run")
    (tmp_path / "again").mkdir()
    run = build_run(cfg, tmp_path / "again")  # the initial state: the hand check needs no rounds
    got = evaluate_global_on_clients(run.method, run.state.gstate, run.model, run.dataset, run.part)
    params, buffers = run.method.eval_state(run.state.gstate)
    hits = n = 0
    for k in range(run.part.num_clients):
        idx = torch.as_tensor(run.part.test[k])
        if len(idx):
            logits = torch.func.functional_call(run.model, (params, buffers), (run.dataset.x_train[idx],))
            hits += int((logits.argmax(-1) == run.dataset.y_train[idx]).sum())
            n += len(idx)
    assert got["clients/global_test_acc"] == pytest.approx(hits / n, abs=1e-12)
    assert 0.0 <= s["clients/global_test_acc"] <= 1.0


def test_fedrod_personal_head_stays_private_and_adds_to_the_generic_logits(tmp_path):
    rod = run_experiment(compose_cfg(PERSONAL + ["method=fedrod"]), tmp_path / "rod")
    avg = run_experiment(compose_cfg(PERSONAL + ["method=fedavg"]), tmp_path / "avg")
    assert rod["comm/bytes_total"] == avg["comm/bytes_total"]  # the personal heads never leave
    ckpt = torch.load(tmp_path / "rod" / "checkpoint.pt", weights_only=False)
    g, cs = ckpt["gstate"], ckpt["cstates"]
    trained = cs["personal_head"]["head.weight"].flatten(1).abs().sum(1) > 0
    assert 0 < int(trained.sum()) < 8  # half participation, 2 rounds: some clients trained, not all
    model = build_model(OmegaConf.create({"name": "mlp", "hidden": [32]}), (1, 8, 8), 10)
    method = make_method(FedRoD, model=model, params=g["params"], buffers=g["buffers"], total_rounds=2)
    k = int(torch.nonzero(trained)[0])
    params, _ = method.personal_params(g, tree_index(cs, k), None, None)
    x = torch.randn(5, 1, 8, 8)
    h = method.features(g["params"], g["buffers"], x)
    generic = method.classify(g["params"], h)
    own = method.classify({n: v[k] for n, v in cs["personal_head"].items()}, h)
    merged = torch.func.functional_call(model, params, (x,))
    assert torch.allclose(merged, generic + own, atol=1e-5)


def test_fedrod_balanced_loss_does_not_push_down_classes_a_client_lacks():
    torch.manual_seed(0)
    model = build_model(OmegaConf.create({"name": "mlp", "hidden": [16]}), (1, 8, 8), 10).double()
    params, buffers = split_state(model)
    counts = torch.zeros(1, 10, dtype=torch.float64)
    counts[0, :2] = 10.0  # this client holds classes 0 and 1 only
    method = make_method(FedRoD, model=model, lr=0.5, label_counts=counts)
    g = method.init_global(params, buffers)
    cs = method.init_client_states(g, 1)
    down = method.broadcast(g, RoundContext(1, torch.tensor([0]), torch.ones(1), 1, 1)).tensors
    local = method.client_init(down, tree_index(cs, 0), torch.tensor(0))
    batch = {"x": torch.randn(8, 1, 8, 8, dtype=torch.float64), "y": torch.arange(8) % 2,
             "w": torch.ones(8, dtype=torch.float64)}
    new, _ = method.client_step(local, down, batch)
    moved = (new["params"]["head.bias"] - params["head.bias"]).abs()
    assert float(moved[2:].max()) < 1e-9 < float(moved[:2].min())  # generic head: absent classes untouched
    pmoved = (new["phead"]["head.bias"] - local["phead"]["head.bias"]).abs()
    assert float(pmoved[2:].max()) > 1e-4  # the personal head (plain CE) does learn the local skew


@pytest.mark.parametrize("method", ["fedproto", "fedrod", "fedecouple"])
def test_batchnorm_statistics_are_carried_and_kept_where_they_belong(tmp_path, method):
    base = [c for c in PERSONAL if not c.startswith("backbone")]
    cfg = base + [f"method={method}", "backbone=resnet18", "backbone.norm=batch", "clients=4", "rounds=1",
                  "participation=1.0", "local_steps=2"]
    s = run_experiment(compose_cfg(cfg), tmp_path)
    assert s["status"] == "completed"
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    if method == "fedproto":  # nothing shared: each client keeps its own statistics
        mean = ckpt["cstates"]["private_buffers"]["body.1.running_mean"]
        assert mean.shape[0] == 4 and not torch.equal(mean[0], mean[1])
    else:
        mean = ckpt["gstate"]["buffers"]["body.1.running_mean"]
    assert not torch.equal(mean, torch.zeros_like(mean))  # the clients' BatchNorm statistics came back


def test_report_of_a_personalized_sweep(tmp_path):
    from conftest import run_cli
    from fedbench.report import report

    proc = run_cli(["--multirun", *PERSONAL, "method=local,fedper", "seed=0,1", f"hydra.sweep.dir={tmp_path / 's'}"],
                   tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = report(tmp_path / "s", tmp_path / "out")
    agg = res["summary"]
    assert len(res["runs"]) == 4 and len(agg) == 2
    for method, g in res["runs"].groupby("method.name"):
        row = agg[agg["method"] == method].iloc[0]
        assert row["personal/test_acc mean"] == pytest.approx(g["personal/test_acc"].mean())
    assert "personal_val_vs_round.png" in {p.name for p in res["plots"]}


def test_500_clients_with_stacked_personal_state(tmp_path):
    cfg = ["dataset=mnist5k", "backbone=mlp", "backbone.hidden=[32]", "clients=500", "participation=0.02",
           "rounds=1", "batch_size=8", "logger=local", "progress=false", "hardware=cpu", "partition=noniid_s",
           "method=fedecouple"]
    s = run_experiment(compose_cfg(cfg), tmp_path)
    cstates = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["cstates"]
    # one stacked tensor per piece of personal state, [500, ...]; no per-client objects
    assert cstates["anchors"].shape[:2] == (500, 10) and cstates["private"]["head.weight"].shape[0] == 500
    assert s["status"] == "completed" and 0.0 <= s["personal/test_acc"] <= 1.0


@pytest.mark.parametrize("override, match", [
    (["backbone=logreg", "method=fedper"], "split into body and head"),
    (["method=fedecouple", "method.phase_fractions=[0.5,0.6,0.3]"], "phase_fractions"),
    (["method=fedecouple", "method.anchors=random"], "method.anchors"),
    (["method=fedecouple", "method.eval_extractor=mine"], "method.eval_extractor"),
    (["method=fedecouple", "method.phase_epochs=[3,1]"], "method.phase_epochs"),
    (["method=fedper", "metrics.extractors=all"], "metrics.extractors"),
    (["method=fedecouple", "partition.s=2"], "partition.s"),
])
def test_bad_personalized_overrides_fail_clearly(tmp_path, override, match):
    with pytest.raises(ConfigError, match=match):
        base = [c for c in PERSONAL if not c.startswith("backbone") or "backbone=logreg" not in override]
        run_experiment(compose_cfg(base + override), tmp_path)


@pytest.mark.parametrize("method", ["fedavg", "fedrep", "ditto"])
def test_batched_personal_evaluation_equals_the_per_client_loop(tmp_path, method):
    """personal/* batched over clients (one pass for a shared model, vmap for own models, chunked) ==
    every client's model evaluated on its own splits one after the other."""
    from fedbench.metrics.evaluate import evaluate
    from fedbench.run.build import build_run

    cfg = compose_cfg(["dataset=digits", "backbone=mlp", "backbone.hidden=[16]", "partition=noniid_s",
                       "clients=7", "rounds=2", "hardware=cpu", "hardware.dtype=float64", "logger=local",
                       "progress=false", f"method={method}"])
    run_experiment(cfg, tmp_path / "run")
    run = build_run(cfg, tmp_path / "run", torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False))
    for chunk in (64, 3):
        got = evaluate_personal(run.method, run.state.gstate, run.state.cstates, run.model, run.dataset,
                                run.part, chunk=chunk)
        for split, index_sets in (("val", run.part.val), ("test", run.part.test)):
            accs, counts = [], []
            for k, idx in enumerate(index_sets):
                if len(idx):
                    train = torch.as_tensor(run.part.train[k])
                    params, buffers = run.method.personal_params(run.state.gstate, tree_index(run.state.cstates, k),
                                                                 run.dataset.x_train[train],
                                                                 run.dataset.y_train[train])
                    ix = torch.as_tensor(idx)
                    accs.append(evaluate(run.model, params, buffers, run.dataset.x_train[ix],
                                         run.dataset.y_train[ix], "classification")["acc"])
                    counts.append(len(idx))
            a, n = np.array(accs), np.array(counts)
            assert got[f"personal/{split}_acc"] == pytest.approx(float((a * n).sum() / n.sum()), abs=1e-12)
            assert got[f"personal/{split}_acc_min"] == pytest.approx(float(a.min()), abs=1e-12)


def test_fedecouple_global_anchors_are_the_received_extractors_class_centroids():
    """anchors=global: after a round of one epoch, a participant's anchors are the class means of the
    features the round's global extractor gives its own samples (float64); they are never sent."""
    method, params, log = fedecouple_round(anchors="global")
    rec = log[0]
    body = {k: v for k, v in params.items() if not k.startswith("head.")}
    x, y = rec["x"], rec["y"]
    for k in rec["cohort"].tolist():
        idx = slice(k * 20, (k + 1) * 20)
        h = method.features(body, {}, x[idx])
        centroids = torch.stack([h[y[idx] == c].mean(0) for c in range(10)])
        torch.testing.assert_close(rec["after"]["anchors"][k], centroids, rtol=0, atol=1e-12)
    ema = fedecouple_round(anchors="ema")[2][0]["after"]["anchors"]
    assert float((ema[0] - rec["after"]["anchors"][0]).abs().max()) > 1e-3
    assert not any("anchor" in k for k in set(rec["up"]) | set(rec["down"].tensors))


def test_fedecouple_phase_epochs_put_each_phase_on_whole_epochs():
    """phase_epochs [3, 1, 2]: FedPAC's budget (1 classifier + 5 extractor epochs) as whole epochs: the
    step at position s of E x m steps is in the phase of epoch s // m, for any m (no rounding slips)."""
    model = build_model(OmegaConf.create({"name": "mlp", "hidden": [16]}), (1, 8, 8), 10)
    method = make_method(FedeCouple, {"phase_epochs": [3, 1, 2]}, model=model)
    assert method.local_epochs(5) == 6
    owner = ["glf_global"] * 3 + ["gpc"] + ["glf_local"] * 2
    for per_epoch in range(1, 40):
        steps = 6 * per_epoch
        progress = torch.arange(steps, dtype=torch.float32) / steps
        for phase in ("glf_global", "gpc", "glf_local"):
            got = method._in_phase(phase, progress).bool().tolist()
            assert got == [owner[s // per_epoch] == phase for s in range(steps)], (phase, per_epoch)


def test_fedecouple_and_fedpac_get_the_same_local_budget(tmp_path):
    """method.phase_epochs=[3,1,2] gives FedeCouple FedPAC's local steps, round by round."""
    steps = {}
    for method, extra in (("fedecouple", ["method.phase_epochs=[3,1,2]"]), ("fedpac", [])):
        run_experiment(compose_cfg(PERSONAL + [f"method={method}", "local_epochs=1"] + extra), tmp_path / method)
        steps[method] = [r["train/client_steps"] for r in read_jsonl(tmp_path / method / "metrics.jsonl")]
    # FedPAC's 1 + 5 training epochs and one prototype pass; FedeCouple trains in all of its 6 epochs
    assert [s * 7 for s in steps["fedecouple"]] == [s * 6 for s in steps["fedpac"]]


@pytest.mark.parametrize("method", ["fedper", "fedecouple", "ditto"])
def test_both_extractors_score_the_global_and_each_clients_own_extractor(tmp_path, method):
    """metrics.extractors=both: personal_global/* and personal_own/* for methods that train a shared
    extractor under a personal head; personal/* is the method's own convention (FedPer: global;
    FedeCouple: own). personal_own/test_acc equals a hand evaluation of the checkpoint's kept
    extractors; without the option no extractor is kept."""
    from fedbench.run.build import build_run

    cfg = compose_cfg(PERSONAL + [f"method={method}", "hardware.dtype=float64", "metrics.extractors=both"])
    s = run_experiment(cfg, tmp_path / "run")
    if method == "ditto":  # a whole personal model: one convention, nothing kept
        assert not any(k.startswith(("personal_own/", "personal_global/")) for k in s)
        return
    default = {"fedper": "global", "fedecouple": "own"}[method]
    for stat in ("test_acc", "val_acc", "test_acc_std", "test_acc_min"):
        assert s[f"personal/{stat}"] == s[f"personal_{default}/{stat}"]
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    g, cs = ck["gstate"], ck["cstates"]
    assert 0 < int(cs["x_trained"].sum()) < 8  # participation 0.5 over 2 rounds: some never trained
    (tmp_path / "again").mkdir()
    run = build_run(cfg, tmp_path / "again")
    head = cs["private"]  # FedPer's private head; FedeCouple's personal classifier phi_i
    hits = n = 0
    for k in range(8):
        idx = torch.as_tensor(run.part.test[k])
        params = dict(g["params"])
        if bool(cs["x_trained"][k] > 0):
            params.update({n_: v[k] for n_, v in cs["extractor"].items() if n_ in params})
        params.update({n_: v[k] for n_, v in head.items()})
        logits = torch.func.functional_call(run.model, (params, g["buffers"]), (run.dataset.x_train[idx],))
        hits += int((logits.argmax(-1) == run.dataset.y_train[idx]).sum())
        n += len(idx)
    assert s["personal_own/test_acc"] == pytest.approx(hits / n, abs=1e-12)
    plain = compose_cfg(PERSONAL + [f"method={method}", "hardware.dtype=float64"])
    s2 = run_experiment(plain, tmp_path / "plain")
    kept = set(torch.load(tmp_path / "plain" / "checkpoint.pt", weights_only=False)["cstates"])
    assert ("extractor" in kept) == (method == "fedecouple")  # its own convention needs them
    assert s2["personal/test_acc"] == s["personal/test_acc"]  # scoring more changes nothing trained
