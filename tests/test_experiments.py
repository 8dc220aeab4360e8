"""Paper presets (`fedbench +experiment=NAME`, conf/experiment/): each composes through the real entry
point (`--cfg job`) with its paper record, and runs one round on a small stand-in of the same kind
(embedded data, random frozen features or backbone weights instead of the ImageNet files)."""

import sys
from pathlib import Path

import pytest
import yaml

from conftest import compose_cfg
from fedbench.experiment import run_experiment

PRESETS = sorted(p.stem for p in (Path(__file__).parents[1] / "conf" / "experiment").glob("*.yaml"))
LOCAL = ["logger=local", "progress=false", "hardware=cpu", "rounds=1"]
IMAGE_FEATURES = ["dataset=digits", "features.extractor=cnn", "features.resolution=null",
                  "~dataset.normalize"]  # digits are scaled once: the preset's pixel pipeline does not apply
STAND_INS = {  # preset prefix -> overrides: embedded data and no downloaded weights
    "deepafl": IMAGE_FEATURES + ["method.T=0", "method.h=16", "method.f=8"],
    "afl": IMAGE_FEATURES + ["clients=10"],
    "fedsq_cifar100": ["dataset=digits", "backbone.weights=none", "backbone.resolution=32", "clients=4",
                       "local_steps=1", "batch_size=8"],
    "fedsq_cinic10": ["dataset=digits", "backbone.weights=none", "backbone.resolution=64", "clients=2",
                      "local_steps=1", "batch_size=4"],
    "flops_synthetic": ["method.prune_start=1"],
    # LIBSVM multi-label files the test writes under ./data/rcv1 (the real format, a planted model)
    "flops_rcv1": ["dataset.root=data", "dataset.max_features=50", "method.prune_start=1"],
    "flops_mnist": ["dataset=mnist5k", "method.prune_start=1"],
    "flops_emnist": ["dataset=mnist5k", "method.prune_start=1"],
    "fedpac": ["dataset=mnist5k", "partition.local_size=150", "clients=6", "method.body_epochs=1"],
    "fedecouple": ["dataset=mnist5k", "partition.local_size=150", "clients=6", "local_epochs=1"],
}


def stand_in(name: str) -> list[str]:
    return next(ov for prefix, ov in STAND_INS.items() if name.startswith(prefix))


def test_every_preset_has_a_stand_in_and_a_paper_record():
    assert len(PRESETS) >= 12
    for name in PRESETS:
        stand_in(name)
        cfg = compose_cfg([f"+experiment={name}"])
        assert {"source", "headline", "needs"} <= set(cfg.paper), name


@pytest.mark.parametrize("name", PRESETS)
def test_preset_composes_and_runs_one_round_on_a_stand_in(tmp_path, monkeypatch, capsys, name):
    from fedbench import cli

    monkeypatch.setattr(sys, "argv", ["fedbench", f"+experiment={name}", "--cfg", "job"])
    monkeypatch.chdir(tmp_path)
    try:
        cli.main()
    except SystemExit as stop:
        assert stop.code in (0, None)
    job = yaml.safe_load(capsys.readouterr().out)
    assert job["paper"]["source"] and job["rounds"] >= 1
    if name.startswith("flops_rcv1"):
        from test_rcv1 import planted, write_libsvm

        (tmp_path / "data" / "rcv1").mkdir(parents=True)
        write_libsvm(tmp_path / "data" / "rcv1" / "rcv1_topics_train.svm.bz2", *planted(600, 0), compress=True)
    overrides = [f"+experiment={name}"] + LOCAL + stand_in(name)
    assert cli.preflight(overrides) is None  # what `fedbench` checks before it starts the run
    s = run_experiment(compose_cfg(overrides), tmp_path / "run")
    assert s["status"] == "completed" and s["rounds"] == 1, s.get("reason")
