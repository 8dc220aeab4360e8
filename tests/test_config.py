"""Hydra composition: every config group choice composes, and the fixed key names exist."""

import pytest

from conftest import compose_cfg
from fedbench.cli import GROUPS, available, check_group_overrides
from fedbench.experiment import validate
from fedbench.preflight import ADDED_GROUPS
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
        required = {("dataset", "hf"): ["dataset.path=uoft-cs/cifar10"],
                    ("partition", "file"): ["partition.path=partition.json"]}.get((group, choice), [])
        if group == "method" and not lookup("method", str(compose_cfg([f"method={choice}"]).method.name)) \
                .has_global_model:
            required = ["partition=noniid_s"]  # scored on the clients' own test splits
        plus = "+" if group in ADDED_GROUPS else ""  # +callbacks=NAME adds to the defaults list
        cfg = compose_cfg([f"{plus}{group}={choice}", *required])
        assert cfg[group] is not None
        if group == "hardware" and choice == "cuda":
            continue  # validated in test_errors (needs CUDA)
        validate(cfg)


def test_expected_choices_are_shipped():
    assert {"fedavg", "fedprox", "scaffold"} <= set(available("method"))
    assert {"logreg", "mlp", "cnn", "lenet5", "resnet18"} <= set(available("backbone"))
    assert {"mnist5k", "digits", "synthetic_logistic", "mnist", "fashion_mnist", "cifar10",
            "cifar100"} <= set(available("dataset"))
    assert {"iid", "dirichlet", "shards", "file"} <= set(available("partition"))
    assert {"always", "bernoulli", "cyclic", "markov"} <= set(available("availability"))
    assert {"cpu", "cuda", "auto"} <= set(available("hardware"))


def test_group_override_precheck():
    assert check_group_overrides(["method=fedprox", "partition.alpha=0.1"]) is None
    assert check_group_overrides(["method=fedavg,scaffold"]) is None
    msg = check_group_overrides(["method=fedfoo"])
    assert "method='fedfoo' is unknown" in msg and "fedavg" in msg
    assert "unknown" in check_group_overrides(["--multirun", "partition=iid,nope"])


# hf presets name their dataset's place and columns: the only values a group YAML sets away from its defaults
HF_PRESET_KEYS = {"path", "image_key", "label_key", "test_split", "keep_columns"}


def test_every_group_yaml_agrees_with_its_typed_defaults():
    """Defaults are written once, in the dataclasses: a group YAML repeats them for the reader (equal, as
    this test checks) or leaves them out; builders read only the typed config."""
    from omegaconf import OmegaConf

    from fedbench.config import defaults_of, typed_choice
    from fedbench.engine.optim import LrSchedule
    from fedbench.registry import config_class
    from fedbench.settings import (
        FeaturesConfig,
        HardwareConfig,
        MetricsConfig,
        RunSettings,
        WandbConfig,
        WarmStartConfig,
    )

    for kind in ("dataset", "partition", "availability", "backbone"):
        for choice in available(kind):
            cfg = compose_cfg([f"{kind}={choice}"] + (["dataset.path=x"] if choice == "hf" else [])
                              + (["partition.path=x"] if choice == "file" else []))
            node = OmegaConf.to_container(cfg[kind], resolve=True)
            defaults = defaults_of(config_class(kind, node["name"]))
            differ = {k for k, v in node.items() if k != "name" and defaults[k] != v}
            allowed = HF_PRESET_KEYS if choice.endswith("hf") else {"path"} if choice == "file" else set()
            assert differ <= allowed, (kind, choice, differ)
            assert typed_choice(kind, cfg[kind]) == typed_choice(kind, typed_choice(kind, cfg[kind]))
    cfg = compose_cfg(["logger=wandb"])
    for key, cls in (("hardware", HardwareConfig), ("logger.wandb", WandbConfig), ("warm_start", WarmStartConfig),
                     ("features", FeaturesConfig), ("metrics", MetricsConfig), ("lr_schedule", LrSchedule)):
        node = OmegaConf.to_container(OmegaConf.select(cfg, key), resolve=True)
        defaults = defaults_of(cls)
        if key == "logger.wandb":
            node["mode"] = defaults["mode"]  # the YAML reads WANDB_MODE first
        assert node == {k: defaults[k] for k in node}, key
    assert {k: cfg[k] for k in RunSettings.__dataclass_fields__} == defaults_of(RunSettings)
