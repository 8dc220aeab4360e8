"""Hydra composition: every config group choice composes, and the fixed key names exist."""

import pytest

from conftest import compose_cfg
from fedbench.cli import GROUPS, available, check_group_overrides
from fedbench.experiment import validate
from fedbench.registry import lookup


def test_default_composition_has_the_documented_keys():
    cfg = compose_cfg([])
    for key in ("seed", "rounds", "clients", "participation", "local_epochs", "local_steps", "batch_size",
                "lr", "eval_every", "resume"):
        assert key in cfg, key
    assert cfg.method.name == "fedavg" and cfg.backbone.name == "cnn"
    assert cfg.dataset.name == "mnist5k" and cfg.partition.name == "dirichlet"
    assert cfg.partition.alpha == 0.5 and cfg.clients >= 20
    for key in ("device", "threads", "dtype", "executor"):
        assert key in cfg.hardware
    assert cfg.logger.wandb.mode in ("offline", "online", "disabled")
    validate(cfg)


@pytest.mark.parametrize("group", [g for g in GROUPS if g != "experiment"])  # presets: test_experiments.py
def test_every_choice_composes_and_validates(group):
    for choice in available(group):
        required = ["dataset.path=uoft-cs/cifar10"] if (group, choice) == ("dataset", "hf") else []
        if group == "method" and not lookup("method", str(compose_cfg([f"method={choice}"]).method.name)) \
                .has_global_model:
            required = ["partition=noniid_s"]  # scored on the clients' own test splits
        cfg = compose_cfg([f"{group}={choice}", *required])
        assert cfg[group] is not None
        if group == "hardware" and choice == "cuda":
            continue  # validated in test_errors (needs CUDA)
        validate(cfg)


def test_expected_choices_are_shipped():
    assert {"fedavg", "fedprox", "scaffold"} <= set(available("method"))
    assert {"logreg", "mlp", "cnn", "lenet5", "resnet18"} <= set(available("backbone"))
    assert {"mnist5k", "digits", "synthetic_logistic", "mnist", "fashion_mnist", "cifar10",
            "cifar100"} <= set(available("dataset"))
    assert {"iid", "dirichlet", "shards"} <= set(available("partition"))
    assert {"cpu", "cuda", "auto"} <= set(available("hardware"))


def test_group_override_precheck():
    assert check_group_overrides(["method=fedprox", "partition.alpha=0.1"]) is None
    assert check_group_overrides(["method=fedavg,scaffold"]) is None
    msg = check_group_overrides(["method=fedfoo"])
    assert "method='fedfoo' is unknown" in msg and "fedavg" in msg
    assert "unknown" in check_group_overrides(["--multirun", "partition=iid,nope"])
