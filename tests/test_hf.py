"""Hugging Face datasets, natural partitions, flwr-datasets partitioners and Optuna tuning, on small data
the tests write themselves in the real on-disk formats (save_to_disk, parquet); no network."""

import json

import numpy as np
import pytest
import yaml

from conftest import compose_cfg, run_cli
from fedbench.data.partitions import make_partition
from fedbench.registry import lookup

datasets = pytest.importorskip("datasets")
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
RUN = ["backbone=logreg", "clients=4", "rounds=2", "participation=1.0", "batch_size=8", "logger=local",
       "progress=false", "hardware=cpu"]


def image_dataset(n: int, seed: int, classes: int = 3, writers: int = 0):
    """Small 8x8 grayscale images whose mean brightness encodes the class (learnable), as PIL images."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    imgs = [Image.fromarray((rng.random((8, 8)) * 60 + 60 * c).astype(np.uint8), mode="L") for c in y]
    columns = {"image": imgs, "label": y.tolist()}
    features = {"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=classes)}
    if writers:
        columns["writer_id"] = [f"w{int(i)}" for i in rng.integers(0, writers, n)]
        features["writer_id"] = datasets.Value("string")
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    dd = datasets.DatasetDict({"train": image_dataset(240, 0), "test": image_dataset(60, 1)})
    dd.save_to_disk(str(root / "disk"))
    (root / "parquet").mkdir()
    for split, ds in dd.items():
        ds.to_parquet(str(root / "parquet" / f"{split}.parquet"))
    image_dataset(300, 2, classes=4, writers=6).save_to_disk(str(root / "femnist_like"))
    return root, dd


@pytest.mark.parametrize("fmt", ["disk", "parquet"])
def test_image_dataset_in_both_formats_loads_offline_and_trains(saved, tmp_path, fmt):
    root, dd = saved
    cfg = compose_cfg(["dataset=hf", f"dataset.path={root / fmt}", "dataset.val_fraction=0.0"]).dataset
    ds = lookup("dataset", "hf")(cfg)
    assert ds.num_classes == 3 and ds.input_shape == (1, 8, 8) and len(ds.y_test) == 60
    assert sorted(ds.y_train.tolist()) == sorted(dd["train"]["label"])  # every training sample, once
    raw = np.stack([np.asarray(im, dtype=np.float32) / 255 for im in dd["test"]["image"]])
    standardised = ds.x_test[:, 0].numpy()
    corr = np.corrcoef(raw.reshape(60, -1).ravel(), standardised.reshape(60, -1).ravel())[0, 1]
    assert corr > 0.999  # the same pixels, scaled and standardised
    proc = run_cli(["dataset=hf", f"dataset.path={root / fmt}", *RUN, f"hydra.run.dir={tmp_path / 'r'}"], tmp_path,
                   OFFLINE)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["status"] == "completed"


def test_natural_partition_gives_each_writer_exactly_its_samples(saved, tmp_path):
    root, _ = saved
    cfg = compose_cfg(["dataset=hf", f"dataset.path={root / 'femnist_like'}", "dataset.test_split=null",
                       "dataset.val_fraction=0.0", "dataset.test_fraction=0.0", "dataset.keep_columns=[writer_id]",
                       "partition=natural", "partition.key=writer_id"])
    ds = lookup("dataset", "hf")(cfg.dataset)
    writers = ds.columns["writer_id"]
    part = make_partition(ds.y_train.numpy(), 6, cfg.partition, seed=0, columns=ds.columns)
    assert part.num_clients == 6
    seen = set()
    for idx in part.train:
        owner = set(writers[idx])
        assert len(owner) == 1  # one writer per client ...
        (w,) = owner
        assert np.array_equal(idx, np.flatnonzero(writers == w))  # ... with exactly that writer's samples
        seen.add(w)
    assert seen == set(writers)
    sample = make_partition(ds.y_train.numpy(), 3, cfg.partition, seed=0, columns=ds.columns)
    assert len(sample.train) == 3 and len({writers[i[0]] for i in sample.train}) == 3  # a seeded sample
    proc = run_cli(["dataset=hf", f"dataset.path={root / 'femnist_like'}", "dataset.test_split=null",
                    "dataset.keep_columns=[writer_id]", "partition=natural", "partition.client_test_fraction=0.3",
                    *RUN, "clients=5", f"hydra.run.dir={tmp_path / 'r'}"], tmp_path, OFFLINE)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["personal/test_acc"] is not None
    assert len(json.loads((tmp_path / "r" / "partition.json").read_text())["train_sizes"]) == 5


def test_flwr_partitioner_equals_the_library_on_the_same_labels_and_seed():
    from flwr_datasets.partitioner import DirichletPartitioner

    labels = np.random.default_rng(0).integers(0, 10, 2000)
    cfg = compose_cfg(["partition=flwr", "partition.partitioner=DirichletPartitioner", "+partition.kwargs.alpha=0.3",
                       "+partition.kwargs.seed=42", "+partition.kwargs.min_partition_size=5"]).partition
    ours = make_partition(labels, 8, cfg, seed=0)
    ref = DirichletPartitioner(num_partitions=8, partition_by="label", alpha=0.3, seed=42, min_partition_size=5)
    ref.dataset = datasets.Dataset.from_dict({"label": labels, "i": np.arange(len(labels))})
    for k in range(8):
        assert np.array_equal(ours.train[k], np.sort(np.asarray(ref.load_partition(k)["i"])))


@pytest.mark.parametrize("launcher", [[], ["hydra/launcher=fused", "hydra.sweeper.n_jobs=3"]],
                         ids=["basic", "fused"])
def test_optuna_study_of_three_trials_and_its_report(tmp_path, launcher):
    """With the fused launcher the sweeper's batch of 3 trials runs as one group, each trial its objective."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    from fedbench.report import report

    sweep = tmp_path / "study"
    proc = run_cli(["--multirun", "hydra/sweeper=tune", "hydra.sweeper.n_trials=3", "dataset=digits", *RUN,
                    *launcher, f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    res = report(sweep, tmp_path / "out")
    assert len(res["runs"]) == 3 and res["runs"]["override:lr"].nunique() == 3  # the three trials, by lr
    vals = [json.loads((sweep / str(i) / "summary.json").read_text())["best/val_acc"] for i in range(3)]
    assert best["best_value"] == pytest.approx(max(vals))  # tuned on validation, as the runs report it
    assert "Optuna study" in res["markdown"] and "lr=" in res["markdown"]


@pytest.mark.parametrize("args,env,fragment", [
    (["dataset=cifar10_hf"], {"HF_HOME": "EMPTY"}, "dataset.path=uoft-cs/cifar10: not loadable here"),
    (["dataset=hf", "dataset.path=DISK", "dataset.image_key=pixels"], {}, "dataset.image_key=pixels: no such column"),
    (["dataset=hf", "dataset.path=FEM", "dataset.test_split=null", "dataset.keep_columns=[writer_id]",
      "partition=natural", "clients=50"], {}, "partition=natural has only 6 distinct writer_id values"),
    (["partition=flwr", "partition.partitioner=NopePartitioner", "dataset=digits"], {},
     "partition.partitioner=NopePartitioner is unknown"),
])
def test_hf_errors_are_one_line(saved, tmp_path, args, env, fragment):
    root, _ = saved
    args = [a.replace("DISK", str(root / "disk")).replace("FEM", str(root / "femnist_like")) for a in args]
    env = {k: v.replace("EMPTY", str(tmp_path / "empty")) for k, v in {**OFFLINE, **env}.items()}
    proc = run_cli([*RUN, *args], tmp_path, env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fedbench: error:")]
    assert len(errors) == 1 and fragment in errors[0] and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_a_missing_extra_is_one_line_naming_it(tmp_path):
    shadow = tmp_path / "shadow" / "datasets"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named datasets')\n")
    proc = run_cli(["dataset=hf", "dataset.path=x", *RUN], tmp_path, {"PYTHONPATH": str(shadow.parent)})
    assert proc.returncode == 2 and "pip install -e '.[hf]'" in proc.stderr and "Traceback" not in proc.stderr
