"""AFL / DeepAFL: exact invariance to the partition, equality with a centralised solve written here
independently, bytes from the real statistics, and singular systems."""

import pytest
import torch
import torch.nn.functional as F

from conftest import compose_cfg, make_method, read_jsonl
from fedbench.data.datasets import load_digits
from fedbench.errors import ConfigError
from fedbench.experiment import run_experiment
from fedbench.methods.deepafl import DeepAFL

SMALL = ["dataset=digits", "logger=local", "progress=false", "hardware=cpu", "hardware.dtype=float64",
         "batch_size=37", "method.payload_dtype=float64"]  # a float64 payload: the invariances are exact
DEEP = ["method=deepafl_small", "method.T=2", "method.h=24", "method.f=20", "rounds=5"]

PARTITIONS = {
    "iid-10": ["partition=iid", "clients=10"],
    "dir0.1-10": ["partition=dirichlet", "partition.alpha=0.1", "clients=10", "partition.min_samples=1"],
    "dir0.01-10": ["partition=dirichlet", "partition.alpha=0.01", "clients=10", "partition.min_samples=1",
                   "partition.balance=true"],
    "iid-1": ["partition=iid", "clients=1"],
    "iid-100": ["partition=iid", "clients=100"],
}


def final_model(tmp_path, overrides):
    run_experiment(compose_cfg(SMALL + overrides), tmp_path)
    g = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["gstate"]
    return g


def centralised_deepafl(T, h, f, ridge, gamma, seed):
    """Layer-wise closed form on ALL training data, written without the method's solvers:
    Omega from vec(G Omega S) + gamma vec(Omega) = vec(F^T R W^T) with a Kronecker product."""
    ds = load_digits(compose_cfg(["dataset=digits"]).dataset)
    x = ds.x_train.reshape(len(ds.x_train), -1).double()
    y = F.one_hot(ds.y_train, 10).double()
    m = make_method(DeepAFL, {"T": T, "h": h, "f": f, "random_seed": seed}, in_features=x.shape[1])
    maps = m.random_maps("cpu")
    phi = torch.tanh(x @ maps["A0"] + maps["a0"])
    Ws, Omegas = [], []
    for t in range(T + 1):
        W = torch.linalg.solve(phi.T @ phi + ridge * torch.eye(h, dtype=torch.float64), phi.T @ y)
        Ws.append(W)
        if t == T:
            break
        feat = F.gelu(phi @ maps[f"B{t}"] + maps[f"b{t}"])
        R = y - phi @ W
        G, S = feat.T @ feat, W @ W.T
        # column-major vec: vec(G Om S) = (S^T kron G) vec(Om)
        A = torch.kron(S.T.contiguous(), G) + gamma * torch.eye(f * h, dtype=torch.float64)
        rhs = (feat.T @ R @ W.T).T.reshape(-1)  # column-major vec of an f x h matrix
        Om = torch.linalg.solve(A, rhs).reshape(h, f).T
        Omegas.append(Om)
        phi = phi + feat @ Om
    return Ws, Omegas


def test_deepafl_identical_for_any_partition_and_equal_to_centralised(tmp_path):
    models = {name: final_model(tmp_path / name, DEEP + ov) for name, ov in PARTITIONS.items()}
    ref = models["iid-10"]
    for name, g in models.items():
        for n in range(3):
            assert (g["W"][n] - ref["W"][n]).abs().max() <= 1e-8, (name, n)
        for k in ("1", "2"):
            assert (g["Omega"][k] - ref["Omega"][k]).abs().max() <= 1e-8, (name, k)
    Ws, Omegas = centralised_deepafl(2, 24, 20, 1.0, 0.05, 0)
    for n in range(3):
        assert (ref["W"][n] - Ws[n]).abs().max() <= 1e-8
    for t in range(2):
        assert (ref["Omega"][str(t + 1)] - Omegas[t]).abs().max() <= 1e-8


def test_afl_identical_for_any_partition_and_equal_to_centralised(tmp_path):
    models = {name: final_model(tmp_path / name, ["method=afl", "method.ridge=0.5", "method.ri=false"] + ov)
              for name, ov in PARTITIONS.items()}
    ds = load_digits(compose_cfg(["dataset=digits"]).dataset)
    x = ds.x_train.reshape(len(ds.x_train), -1).double()
    y = F.one_hot(ds.y_train, 10).double()
    W = torch.linalg.solve(x.T @ x + 0.5 * torch.eye(64, dtype=torch.float64), x.T @ y)
    for name, g in models.items():
        assert (g["W"] - W).abs().max() <= 1e-8, name


def test_batched_executor_gives_the_same_deepafl(tmp_path):
    a = final_model(tmp_path / "s", DEEP + PARTITIONS["dir0.1-10"] + ["hardware.executor=sequential"])
    b = final_model(tmp_path / "b", DEEP + PARTITIONS["dir0.1-10"] + ["hardware.executor=batched"])
    for n in range(3):
        assert (a["W"][n] - b["W"][n]).abs().max() <= 1e-8


def test_afl_ri_is_the_unregularised_joint_least_squares(tmp_path):
    # ri (default): the ridge clients use is removed after aggregation -> argmin ||Y - X W||, min-norm
    g = final_model(tmp_path, ["method=afl", "method.ridge=5", "partition=dirichlet", "partition.alpha=0.1",
                               "clients=10", "partition.min_samples=1"])
    ds = load_digits(compose_cfg(["dataset=digits"]).dataset)
    x = ds.x_train.reshape(len(ds.x_train), -1).double()
    y = F.one_hot(ds.y_train, 10).double()
    W = torch.linalg.pinv(x) @ y  # some pixels are always 0: X^T X is singular, the pseudo-inverse is min-norm
    assert (g["W"] - W).abs().max() <= 1e-8
    assert (g["W"] - torch.linalg.solve(x.T @ x + 5 * torch.eye(64, dtype=torch.float64), x.T @ y)).abs().max() > 1e-3


def test_deepafl_random_maps_are_nn_linear_layers():
    m = make_method(DeepAFL, {"T": 2, "h": 24, "f": 20, "random_seed": 7}, in_features=64)
    maps = m.random_maps("cpu")
    torch.manual_seed(7)  # the official code's layers: nn.Linear, default init, in this order
    layers = [torch.nn.Linear(64, 24), torch.nn.Linear(24, 20), torch.nn.Linear(24, 20)]
    for (w, b), layer in zip([("A0", "a0"), ("B0", "b0"), ("B1", "b1")], layers, strict=True):
        assert torch.equal(maps[w], layer.weight.detach().T.double())
        assert torch.equal(maps[b], layer.bias.detach().double())
    bound = 1 / 64 ** 0.5
    assert maps["A0"].abs().max() <= bound and abs(float(maps["A0"].var()) - bound ** 2 / 3) < 0.05 * bound ** 2 / 3


@pytest.mark.parametrize("dtype,size", [("float64", 8), ("float32", 4)])
def test_deepafl_rounds_and_bytes(tmp_path, dtype, size):
    h, f, C, K = 24, 20, 10, 10
    s = run_experiment(compose_cfg(SMALL + DEEP + PARTITIONS["iid-10"] + [f"method.payload_dtype={dtype}"]), tmp_path)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert len(rows) == 2 * 2 + 1 == s["rounds"]
    classifier = [r for r in rows if r["analytic/phase"] == "classifier"]
    residual = [r for r in rows if r["analytic/phase"] == "residual"]
    assert [r["analytic/layer"] for r in classifier] == [0, 1, 2]
    for r in classifier:
        assert r["comm/bytes_up"] == K * (h * h + h * C) * size
        assert "global/val_acc" in r  # per-layer accuracy
    for r in residual:
        assert r["comm/bytes_up"] == K * (f * f + h * f) * size
        assert r["comm/bytes_down"] == K * h * C * size          # the broadcast W_n only
    assert classifier[0]["comm/bytes_down"] == 0                  # random layers: shared seed, 0 bytes
    assert classifier[1]["comm/bytes_down"] == K * f * h * size   # only the newest Omega travels


def test_upper_triangle_encoding(tmp_path):
    h, C, K = 24, 10, 10
    run_experiment(compose_cfg(SMALL + DEEP + PARTITIONS["iid-10"] + ["method.upper_triangle=true"]), tmp_path)
    first = read_jsonl(tmp_path / "metrics.jsonl")[0]
    assert first["comm/bytes_up"] == K * (h * (h + 1) // 2 + h * C) * 8


def test_near_singular_systems_work_or_fail_clearly(tmp_path):
    # ridge 0 on raw 8x8 digits: several pixels are always 0, so X^T X is singular -> least squares
    s = run_experiment(compose_cfg(SMALL + ["method=afl", "method.ridge=0", "clients=10"]), tmp_path / "afl")
    assert 0.8 < s["best/val_acc"] <= 1.0
    # more features than samples (h = 400 > ~125 samples per client and ridge 0): still solved
    s = run_experiment(compose_cfg(SMALL + ["method=deepafl_small", "method.T=1", "method.h=400", "method.f=16",
                                            "rounds=3", "method.ridge=0", "clients=10"]), tmp_path / "deep")
    assert s["best/val_acc"] is not None and s["best/val_acc"] > 0.5
    # no residual ridge with a rank-deficient W W^T: a clear error, never silent NaN
    with pytest.raises(ConfigError, match="residual_ridge"):
        run_experiment(compose_cfg(SMALL + ["method=deepafl_small", "method.T=1", "method.h=400", "method.f=16",
                                            "rounds=3", "method.residual_ridge=0", "clients=10"]), tmp_path / "s")


def test_analytic_methods_reject_partial_participation(tmp_path):
    with pytest.raises(ConfigError, match="participation"):
        run_experiment(compose_cfg(SMALL + ["method=afl", "participation=0.5"]), tmp_path)
    with pytest.raises(ConfigError, match="rounds=41"):
        run_experiment(compose_cfg(SMALL + ["method=deepafl", "rounds=10"]), tmp_path)


def test_per_layer_accuracy_in_metrics_and_wandb(tmp_path):
    from fedbench.tracking.wandb_file import read_run

    run_experiment(compose_cfg(SMALL + DEEP + PARTITIONS["iid-10"] + ["logger=wandb", "logger.wandb.mode=offline"]),
                   tmp_path)
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "global/test_acc" in r]
    run = read_run(next(tmp_path.glob("wandb/offline-run-*/run-*.wandb")))
    hist = [h for h in run["history"] if "global/test_acc" in h]
    assert [r["analytic/layer"] for r in rows] == [h["analytic/layer"] for h in hist] == [0, 1, 2]
    assert [r["global/test_acc"] for r in rows] == [h["global/test_acc"] for h in hist]


def test_frozen_features_from_the_warm_start_cnn(tmp_path):
    s = run_experiment(compose_cfg(SMALL + ["method=afl", "clients=5", "features.extractor=cnn",
                                            "features.weights=warm_start", "warm_start.source=mnist5k",
                                            "warm_start.epochs=1"]), tmp_path)
    assert s["n_params"] == 512 * 10  # AFL on the CNN's 512-d frozen features
    assert s["best/val_acc"] > 0.6


def test_afl_official_payload_counts_the_official_bytes_and_gives_the_same_model(tmp_path):
    """method.payload=official: W_k, R_k and R_k^-1 in float64, 8 (d C + 2 d^2) bytes per client."""
    d, C, K = 64, 10, 10
    base = ["method=afl", "method.ridge=1", "method.ri=false"] + PARTITIONS["dir0.1-10"]
    stats = final_model(tmp_path / "stats", base)
    official = final_model(tmp_path / "official", base + ["method.payload=official",
                                                          "method.payload_dtype=float32"])
    assert (official["W"] - stats["W"]).abs().max() <= 1e-8
    row = read_jsonl(tmp_path / "official" / "metrics.jsonl")[0]
    assert row["comm/bytes_up"] == K * 8 * (d * C + 2 * d * d)
    assert read_jsonl(tmp_path / "stats" / "metrics.jsonl")[0]["comm/bytes_up"] == K * 8 * (d * d + d * C)
    ri = final_model(tmp_path / "ri", base[:2] + PARTITIONS["dir0.1-10"] + ["method.payload=official"])
    assert (ri["W"] - final_model(tmp_path / "ri-stats", base[:2] + PARTITIONS["dir0.1-10"])["W"]).abs().max() \
        <= 1e-6  # the ridge removed after aggregation: a singular system, solved to least squares


def test_deepafl_residual_payloads_give_the_same_omega_and_their_bytes(tmp_path):
    h, f, C, K = 24, 20, 10, 10
    models, rows = {}, {}
    for kind in ("code", "paper"):
        models[kind] = final_model(tmp_path / kind, DEEP + PARTITIONS["iid-10"] + [f"method.residual_payload={kind}"])
        rows[kind] = [r for r in read_jsonl(tmp_path / kind / "metrics.jsonl") if r["analytic/phase"] == "residual"]
    for k in models["code"]["Omega"]:
        assert (models["code"]["Omega"][k] - models["paper"]["Omega"][k]).abs().max() <= 1e-10
    assert all(r["comm/bytes_up"] == K * (f * f + h * f) * 8 for r in rows["code"])
    assert all(r["comm/bytes_up"] == K * (f * f + f * C) * 8 for r in rows["paper"])


def test_deepafl_preset_pipeline_is_resize_224_then_normalize_half(tmp_path):
    """The deepafl_cifar10 preset's inputs, on small CIFAR pickle batches written here: every training
    image (no validation hold-out), equal to torchvision's Resize(224) + Normalize(0.5, 0.5) of the same
    images (what the extractor receives; its first module is the resize)."""
    import pickle

    import numpy as np
    from torchvision.transforms import v2

    from fedbench.data.datasets import load_dataset
    from fedbench.models.pretrained import InputAdapter

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    raw = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        raw[name] = rng.integers(0, 256, (4, 3072)).astype(np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": raw[name], "labels": [0, 1, 2, 3]}, f)
    cfg = compose_cfg(["+experiment=deepafl_cifar10", "dataset=cifar10", f"dataset.root={tmp_path}"])
    assert cfg.dataset.normalize == "half" and cfg.dataset.val_fraction == 0 and cfg.features.resolution == 224
    assert "86.43" in cfg.paper.headline and "64.02" in cfg.paper.headline
    ds = load_dataset(cfg.dataset)
    assert len(ds.y_train) == 20 and len(ds.y_val) == 0
    images = torch.as_tensor(np.concatenate([raw[f"data_batch_{i}"] for i in range(1, 6)])).view(-1, 3, 32, 32)
    official = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Resize(224),
                           v2.Normalize([0.5] * 3, [0.5] * 3)])
    want = torch.stack([official(img) for img in images])
    with torch.no_grad():
        got = InputAdapter(int(cfg.features.resolution))(ds.x_train)
    assert got.shape == want.shape == (20, 3, 224, 224)
    assert (got - want).abs().max() < 1e-5  # float32 rounding only: resize and normalise commute
