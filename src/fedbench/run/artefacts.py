"""Artefacts of a run next to its metrics: partition.json and the clients x classes heatmap."""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from fedbench.data.partition_file import portable_fields
from fedbench.data.partitions import Partition
from fedbench.tracking.files import write_json

log = logging.getLogger("fedbench")
_HEATMAPS: dict[str, Path] = {}  # partition heatmaps drawn by this process, by content


def write_partition(run_dir: Path, part: Partition, labels: np.ndarray, num_classes: int,
                    stats: dict[str, float], cfg: DictConfig) -> None:
    """partition.json: the portable split (indices, hash; data/partition_file.py) and what describes it."""
    counts = part.class_counts(labels, num_classes)
    write_json(run_dir / "partition.json", {
        "partition": OmegaConf.to_container(cfg.partition, resolve=True),
        "clients": part.num_clients,
        "class_counts": counts.tolist(),
        "train_sizes": part.sizes().tolist(),
        "val_sizes": [len(v) for v in part.val],
        "test_sizes": [len(t) for t in part.test],
        "stats": stats,
        **portable_fields(part, labels, str(cfg.dataset.name)),
    }, indent=None)  # compact: it holds every sample's index
    # jobs of one sweep often share a partition (they differ in lr or a method's key): drawn once
    key = hashlib.sha1(counts.tobytes() + repr((counts.shape, str(cfg.partition.name),
                                                 round(stats["label_entropy_mean"], 6))).encode()).hexdigest()
    drawn, target = _HEATMAPS.get(key), run_dir / "partition.png"
    if drawn is not None and drawn.exists():
        if drawn.resolve() != target.resolve():  # (a resumed run finds its own)
            shutil.copyfile(drawn, target)
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        fig, ax = plt.subplots(figsize=(min(4 + 0.4 * num_classes, 14), min(3.5 + 0.15 * part.num_clients, 16)))
        im = ax.imshow(counts, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xlabel("class")
        ax.set_ylabel("client")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # clients and classes are whole numbers
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{cfg.partition.name} samples per client and class\n"
                     f"(mean label entropy {stats['label_entropy_mean']:.2f} nats)")
        fig.colorbar(im, ax=ax, label="samples")
        fig.tight_layout()
        fig.savefig(run_dir / "partition.png", dpi=110)
        plt.close(fig)
        _HEATMAPS[key] = run_dir / "partition.png"
    except Exception as e:  # noqa: BLE001 - a plot must never stop a run
        log.warning("partition heatmap not written: %s", e)
