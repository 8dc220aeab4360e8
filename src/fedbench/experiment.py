"""Build a run from a resolved config and drive the round loop.

Owns: validation of values, device/dtype, data + partition, model, method, executor, loggers,
checkpoint/resume and the progress bar. Knows nothing of Hydra beyond receiving a DictConfig.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

import fedbench.methods  # noqa: F401  (registers methods)
from fedbench.data import datasets as _datasets  # noqa: F401  (registers datasets)
from fedbench.data.clients import ClientView, make_schedule, sample_cohort
from fedbench.data.partitions import Partition, make_partition, partition_stats
from fedbench.engine.executors import pick_executor
from fedbench.engine.functional import make_loss_fn, split_state
from fedbench.errors import ConfigError
from fedbench.metrics.comm import payload_bytes
from fedbench.metrics.evaluate import evaluate, evaluate_fn
from fedbench.metrics.sparsity import density, feature_support, support_scores
from fedbench.metrics.tracker import BestTracker
from fedbench.models.backbones import build_model
from fedbench.models.warmstart import apply_warm_start, calibrate, pretrain
from fedbench.registry import lookup
from fedbench.tracking.files import MetricsFile, write_json
from fedbench.tracking.wandb_logger import MODES, WandbLogger

log = logging.getLogger("fedbench")

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
EXECUTORS = ("sequential", "batched", "auto")
# keys that do not change what a run computes (ignored when matching a checkpoint to a config)
_NON_SEMANTIC = ("resume", "logger", "progress", "output_root", "checkpoint_every")


class DivergedError(RuntimeError):
    """Training produced a non-finite loss; the metrics logged so far are kept."""


class Preempted(RuntimeError):
    """The run stopped at a round boundary after writing its checkpoint; rerun to continue."""


class StopFlag:
    """Set (e.g. by a signal handler) to stop at the end of the current round with a checkpoint."""

    requested = False




# ---- validation ---------------------------------------------------------------------------

def _positive_int(cfg: DictConfig, key: str, minimum: int = 1) -> None:
    v = OmegaConf.select(cfg, key)
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise ConfigError(f"{key}={v}: must be an integer >= {minimum}")


def validate(cfg: DictConfig) -> None:
    """Check values before any work; each failure is one line naming the key and what is allowed."""
    import fedbench.models.pretrained  # noqa: F401  (registers the pretrained backbones)

    for kind in ("method", "backbone", "dataset", "partition"):
        lookup(kind, str(cfg[kind].name))
    for key in ("rounds", "clients", "batch_size", "local_epochs", "eval_every", "checkpoint_every"):
        _positive_int(cfg, key)
    if cfg.local_steps is not None:
        _positive_int(cfg, "local_steps")
    p = cfg.participation
    if not isinstance(p, (int, float)) or not 0 < p <= 1:
        raise ConfigError(f"participation={p}: must be a fraction in (0, 1]")
    if not isinstance(cfg.lr, (int, float)) or not cfg.lr > 0:
        raise ConfigError(f"lr={cfg.lr}: must be > 0")
    if cfg.partition.name == "dirichlet":
        a = cfg.partition.alpha
        if not isinstance(a, (int, float)) or isinstance(a, bool) or not a > 0:
            raise ConfigError(f"partition.alpha={a}: must be a float > 0 (small alpha = more label skew)")
    if str(cfg.hardware.dtype) not in DTYPES:
        raise ConfigError(f"hardware.dtype={cfg.hardware.dtype}: allowed: {', '.join(DTYPES)}")
    if str(cfg.hardware.get("auto_policy", "heuristic")) not in ("heuristic", "timed"):
        raise ConfigError(f"hardware.auto_policy={cfg.hardware.auto_policy}: allowed: heuristic, timed")
    if str(cfg.hardware.executor) not in EXECUTORS:
        raise ConfigError(f"hardware.executor={cfg.hardware.executor}: allowed: {', '.join(EXECUTORS)}")
    if str(cfg.logger.wandb.mode) not in MODES:
        raise ConfigError(f"logger.wandb.mode={cfg.logger.wandb.mode}: allowed: {', '.join(MODES)}")
    if cfg.resume not in (True, False, "auto"):
        raise ConfigError(f"resume={cfg.resume}: allowed: auto, true, false")
    resolve_device(str(cfg.hardware.device))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"hardware.device={name}: CUDA is not available on this machine; "
                              f"use hardware=cpu or hardware=auto")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"hardware.device={name}: allowed: auto, cpu, cuda, cuda:N")


def fingerprint(cfg: DictConfig) -> str:
    data = OmegaConf.to_container(cfg, resolve=True)
    for k in _NON_SEMANTIC:
        data.pop(k, None)
    data.get("hardware", {}).pop("threads", None)
    return hashlib.sha1(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


# ---- partition artefacts ------------------------------------------------------------------

def write_partition(run_dir: Path, part: Partition, labels: np.ndarray, num_classes: int,
                    stats: dict[str, float], cfg: DictConfig) -> None:
    counts = part.class_counts(labels, num_classes)
    write_json(run_dir / "partition.json", {
        "partition": OmegaConf.to_container(cfg.partition, resolve=True),
        "clients": part.num_clients,
        "class_counts": counts.tolist(),
        "train_sizes": part.sizes().tolist(),
        "val_sizes": [len(v) for v in part.val],
        "test_sizes": [len(t) for t in part.test],
        "stats": stats,
    })
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(min(2 + 0.35 * num_classes, 12), min(2 + 0.12 * part.num_clients, 14)))
        im = ax.imshow(counts, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xlabel("class")
        ax.set_ylabel("client")
        ax.set_title(f"{cfg.partition.name} samples per client and class\n"
                     f"(mean label entropy {stats['label_entropy_mean']:.2f} nats)")
        fig.colorbar(im, ax=ax, label="samples")
        fig.tight_layout()
        fig.savefig(run_dir / "partition.png", dpi=80)
        plt.close(fig)
    except Exception as e:  # noqa: BLE001 - a plot must never stop a run
        log.warning("partition heatmap not written: %s", e)


# ---- checkpoint ---------------------------------------------------------------------------

def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    write_json(path.with_name("run_state.json"), {k: state[k] for k in ("round", "fingerprint", "finished")})


def find_resumable(root: Path, fp: str, exclude: Path) -> Path | None:
    best: tuple[float, Path] | None = None
    for state_file in root.glob("**/run_state.json"):
        try:
            st = json.loads(state_file.read_text())
        except (OSError, ValueError):
            continue
        if st.get("fingerprint") == fp and not st.get("finished") and state_file.parent != exclude:
            mtime = state_file.stat().st_mtime
            if best is None or mtime > best[0]:
                best = (mtime, state_file.parent)
    return best[1] if best else None


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def evaluate_global(method: Any, gstate: dict[str, Any], model: torch.nn.Module, dataset: Any):
    """(val, test) metrics of the global model: the method's own `predict` or the backbone module."""
    if hasattr(method, "predict"):
        def forward(x: torch.Tensor) -> torch.Tensor:
            return method.predict(gstate, x)

        return tuple(evaluate_fn(forward, x, y, dataset.task)
                     for x, y in ((dataset.x_val, dataset.y_val), (dataset.x_test, dataset.y_test)))
    p_eval, b_eval = method.eval_state(gstate)
    return tuple(evaluate(model, p_eval, b_eval, x, y, dataset.task)
                 for x, y in ((dataset.x_val, dataset.y_val), (dataset.x_test, dataset.y_test)))


def evaluate_personal(method: Any, gstate: dict[str, Any], cstates: dict[str, torch.Tensor],
                      model: torch.nn.Module, dataset: Any, part: Partition) -> dict[str, float]:
    """Each client's own model on its own local validation / test split (personal/*).

    Methods without personal state (FedAvg ...) are scored with the global model on the same splits,
    so global and personalized methods compare on equal terms."""
    if dataset.task != "classification" or model is None:
        return {}
    out: dict[str, float] = {}
    shared = None if hasattr(method, "personal_params") else method.eval_state(gstate)
    for split, index_sets in (("val", part.val), ("test", part.test)):
        accs, counts = [], []
        for k, idx in enumerate(index_sets):
            if len(idx) == 0:
                continue
            if shared is None:
                train = torch.as_tensor(part.train[k], device=dataset.x_train.device)
                params, buffers = method.personal_params(gstate, {n: v[k] for n, v in cstates.items()},
                                                         dataset.x_train[train], dataset.y_train[train])
            else:
                params, buffers = shared
            ix = torch.as_tensor(idx, device=dataset.x_train.device)
            scores = evaluate(model, params, buffers, dataset.x_train[ix], dataset.y_train[ix], "classification")
            accs.append(scores["acc"])
            counts.append(len(idx))
        if accs:
            a, n = np.array(accs), np.array(counts)
            out[f"personal/{split}_acc"] = float((a * n).sum() / n.sum())  # weighted by client split size
            out[f"personal/{split}_acc_std"] = float(a.std())                # spread over clients
            out[f"personal/{split}_acc_min"] = float(a.min())
    return out


@torch.no_grad()
def extract_features(cfg: DictConfig, dataset: Any, seed: int) -> dict[str, Any] | None:
    """Replace every split's inputs by the features of a frozen backbone body, computed once.

    `features.extractor=none` keeps the raw inputs. The extractor's weights come from
    `features.weights` (a state dict of the whole backbone) or its seeded random init."""
    fcfg = cfg.get("features")
    if fcfg is None or str(fcfg.get("extractor", "none")) == "none":
        return None
    name = str(fcfg.extractor)
    torch.manual_seed(int(fcfg.get("seed", seed)))
    extra = {k: v for k, v in fcfg.items() if k not in ("extractor", "weights", "seed", "batch") and v is not None}
    net = build_model(OmegaConf.create({"name": name, **extra}), dataset.input_shape, dataset.num_classes)
    source = "random init (seed)"
    if str(fcfg.get("weights")) == "warm_start":  # the backbone pretrained centrally on warm_start.source
        state, provenance = pretrain(OmegaConf.create({"name": name, **extra}), cfg.warm_start, dataset.input_shape)
        apply_warm_start(net, state)
        source = f"warm start on {cfg.warm_start.source} ({provenance['warm_start.checkpoint']})"
    elif fcfg.get("weights"):
        path = Path(str(fcfg.weights))
        if not path.exists():
            raise ConfigError(f"features.weights={path}: no such file")
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        source = str(path)
    body = net.body.to(device=dataset.x_train.device, dtype=dataset.x_train.dtype).eval()
    batch = int(fcfg.get("batch", 1024))
    for split in ("train", "val", "test"):
        x = getattr(dataset, f"x_{split}")
        setattr(dataset, f"x_{split}", torch.cat([body(x[i:i + batch]) for i in range(0, len(x), batch)])
                if len(x) else x)
    info = {"extractor": name, "weights": source, "dim": int(dataset.x_train.shape[1])}
    log.info("frozen features: %s (%s), %d dims", name, source, info["dim"])
    return info


def sparsity_metrics(method: Any, gstate: dict[str, Any], dataset: Any) -> dict[str, Any]:
    """density / expected_density / n_gated of methods that sparsify, and TDR, recall, F1 where the
    true support is known (never logged as 0 where it is not)."""
    if not hasattr(method, "gated_final"):
        return {}
    gated = method.gated_final(gstate)
    dens, n_gated = density(gated)
    out: dict[str, Any] = {"sparsity/density": dens, "sparsity/n_gated": n_gated,
                           "sparsity/nnz": int(round(dens * n_gated))}
    if hasattr(method, "expected_density"):
        out["sparsity/expected_density"] = method.expected_density(gstate)
    if dataset.true_support is not None:
        selected = feature_support(gated, int(dataset.x_train.shape[-1]))
        if selected is not None:
            out.update({f"sparsity/{k}": v for k, v in support_scores(selected, dataset.true_support).items()})
    return out


# ---- the run ------------------------------------------------------------------------------

def run_experiment(cfg: DictConfig, run_dir: str | Path, sweep_group: str | None = None,
                   stop_after: int | None = None) -> dict[str, Any]:
    """Run (or continue) one experiment in `run_dir`; returns the summary.

    `stop_after=k` stops after round k as a preemption would (checkpoint, then `Preempted`)."""
    validate(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(str(cfg.hardware.device))
    if cfg.hardware.threads:
        torch.set_num_threads(int(cfg.hardware.threads))
    dtype_name = str(cfg.hardware.dtype)
    # bf16 runs as autocast over float32 master weights
    param_dtype = torch.float64 if dtype_name == "float64" else torch.float32
    autocast = torch.bfloat16 if dtype_name == "bfloat16" else None
    seed = int(cfg.seed)
    fp = fingerprint(cfg)

    # resume: where does this run continue from?
    ckpt_path = run_dir / "checkpoint.pt"
    resume = cfg.resume
    if resume is True and not ckpt_path.exists():
        found = find_resumable(Path(str(cfg.output_root)), fp, run_dir)
        if found is not None:
            log.info("resume=true: continuing the unfinished run in %s", found)
            (run_dir / "RESUMED_IN.txt").write_text(f"{found}\n")
            run_dir = found
            ckpt_path = run_dir / "checkpoint.pt"
    checkpoint = None
    if resume in (True, "auto") and ckpt_path.exists():
        checkpoint = torch.load(ckpt_path, map_location=device, weights_only=False)
        if checkpoint["fingerprint"] != fp:
            raise ConfigError(f"resume: {ckpt_path} was written by a different config; use resume=false "
                              f"or another run dir")
        if checkpoint.get("finished") and (run_dir / "summary.json").exists():
            # the same command again (e.g. a sweep restarted after one job failed): keep the result
            log.info("the run in %s already finished; keeping its summary (resume=false runs it again)", run_dir)
            return json.loads((run_dir / "summary.json").read_text())

    # data and partition
    data_cfg = cfg.dataset
    dataset = lookup("dataset", str(data_cfg.name))(data_cfg)
    labels = dataset.y_train.numpy()
    part_seed = seed if cfg.partition.get("seed") is None else int(cfg.partition.seed)
    if dataset.task == "regression":
        # label-skew partitions of a regression task skew the target: 10 quantile bins of y
        edges = np.quantile(labels, np.linspace(0, 1, 11)[1:-1])
        part_labels = np.searchsorted(edges, labels).astype(np.int64)
        n_classes_for_stats = 10
    else:
        part_labels, n_classes_for_stats = labels, dataset.num_classes
    part = make_partition(part_labels, int(cfg.clients), cfg.partition, part_seed)
    stats = partition_stats(part, part_labels, n_classes_for_stats)
    write_partition(run_dir, part, part_labels, n_classes_for_stats, stats, cfg)
    dataset = dataset.to(device, param_dtype)
    feature_info = extract_features(cfg, dataset, seed)
    view = ClientView.build(dataset.x_train, dataset.y_train, part.train)
    sizes = torch.as_tensor(view.sizes(), dtype=param_dtype, device=device)

    # method, model, executor
    hp = OmegaConf.to_container(cfg.method, resolve=True)
    method_cls = lookup("method", str(cfg.method.name))
    torch.manual_seed(seed)
    model: torch.nn.Module | None = None
    warm_info: dict[str, Any] = {}
    params: dict[str, torch.Tensor] = {}
    buffers: dict[str, torch.Tensor] = {}
    loss_fn = None
    if method_cls.uses_backbone:
        model = build_model(cfg.backbone, dataset.input_shape, dataset.num_classes).to(device=device,
                                                                                        dtype=param_dtype)
        model.train()
        if cfg.get("warm_start") is not None and cfg.warm_start.get("source"):
            state, provenance = pretrain(cfg.backbone, cfg.warm_start, dataset.input_shape)
            n_loaded = apply_warm_start(model, state)
            warm_info = {**provenance, "warm_start.tensors_loaded": n_loaded}
            log.info("warm start from %s (%d tensors)", provenance["warm_start.checkpoint"], n_loaded)
        if int(hp.get("calibration_epochs", 0) or 0) > 0:
            # also on resume: the structural copy is taken from these weights (deterministic on CPU)
            pooled = torch.as_tensor(np.concatenate(part.train), device=device)
            cal = calibrate(model, dataset.x_train[pooled], dataset.y_train[pooled], hp, seed)
            warm_info.update(cal)
            log.info("central calibration: %d epoch(s) on %d server-held samples", cal["calibration.epochs"],
                     cal["calibration.samples"])
        params, buffers = split_state(model)
        loss_fn = make_loss_fn(model, dataset.task, autocast)
    n_params = sum(p.numel() for p in params.values())
    method = method_cls(hp, loss_fn, float(cfg.lr), num_classes=dataset.num_classes,
                        in_features=math.prod(dataset.input_shape))
    method.device = device
    method.model, method.task = model, dataset.task
    method.setup(params, buffers, int(cfg.rounds))
    if hasattr(method, "check_run"):
        method.check_run(int(cfg.rounds), float(cfg.participation), int(cfg.local_epochs), cfg.local_steps)
    if checkpoint is not None:
        gstate, cstates = checkpoint["gstate"], checkpoint["cstates"]
        start_round = int(checkpoint["round"])
    else:
        gstate = method.init_global(params, buffers)
        if getattr(method, "needs_label_counts", False):  # e.g. FedRoD's balanced softmax: each client's prior
            method.label_counts = torch.stack([
                torch.bincount(dataset.y_train[torch.as_tensor(ix, device=device)].long(),
                               minlength=dataset.num_classes) for ix in part.train])
        cstates = method.init_client_states(gstate, view.num_clients)
        start_round = 0

    def prepare_round(r: int) -> tuple[np.ndarray, torch.Tensor, Any]:
        """The round's cohort and batch schedule, drawn from (seed, round, client) only."""
        cohort_np = sample_cohort(seed, r, view.num_clients, float(cfg.participation))
        sched = make_schedule(view, cohort_np, seed, r, int(cfg.batch_size), int(cfg.local_epochs),
                              cfg.local_steps, param_dtype, device, method.noise_dim)
        return cohort_np, torch.as_tensor(cohort_np, device=device), sched

    def trial_round(ex: Any) -> None:
        """Round `start_round + 1` run for timing only; its result is discarded."""
        r = start_round + 1
        _, cohort, sched = prepare_round(r)
        ex.run(method, method.broadcast(gstate, r).tensors, {k: v[cohort] for k, v in cstates.items()}, cohort,
               view, sched)

    executor, why = pick_executor(str(cfg.hardware.executor), method, model, device, cfg.hardware.chunk_size,
                                  bool(cfg.hardware.get("compile", False)),
                                  str(cfg.hardware.get("auto_policy", "heuristic")), trial_round)
    log.info("executor: %s (%s)", executor.name, why)
    tracker = BestTracker(target=cfg.metrics.get("target"))
    ptracker = BestTracker(target=cfg.metrics.get("target"))  # on personal/* (clients' own splits)
    has_global = getattr(method, "has_global_model", True)
    has_local_splits = any(len(t) for t in part.test) or any(len(v) for v in part.val)
    totals = {"bytes_up": 0, "bytes_down": 0, "samples": 0, "time_s": 0.0}
    if checkpoint is not None:
        tracker.load_state_dict(checkpoint["tracker"])
        ptracker.load_state_dict(checkpoint.get("ptracker", {}))
        totals = dict(checkpoint["totals"])

    # sinks
    metrics_file = MetricsFile(run_dir / "metrics.jsonl")
    if checkpoint is not None:
        metrics_file.truncate_after(start_round)
    elif metrics_file.path.exists():
        metrics_file.path.unlink()
    resolved = OmegaConf.to_container(cfg, resolve=True)
    wb_cfg = cfg.logger.wandb
    wandb_config = flatten(resolved)
    wandb_config.update({f"partition_stats.{k}": v for k, v in stats.items()})
    wandb_config.update({"run.executor": executor.name, "run.n_params": n_params, "run.device": str(device),
                         "run.fingerprint": fp})
    if feature_info:
        wandb_config.update({f"features_info.{k}": v for k, v in feature_info.items()})
    wandb_config.update(warm_info)
    if warm_info:
        write_json(run_dir / "warm_start.json", warm_info)
    default_tags = [str(cfg.method.name), str(cfg.partition.name), str(cfg.dataset.name)]
    wandb = WandbLogger(
        str(wb_cfg.mode), run_dir, str(wb_cfg.project), wandb_config, entity=wb_cfg.entity,
        group=wb_cfg.group or sweep_group, tags=list(wb_cfg.tags) or default_tags,
        job_type=wb_cfg.job_type or str(cfg.method.name),
        run_id=checkpoint.get("wandb_id") if checkpoint is not None else None,
    )
    log.info("partition: %s", ", ".join(f"{k}={v:.3g}" for k, v in stats.items()))

    def ckpt_state(round_: int, finished: bool) -> dict[str, Any]:
        return {"round": round_, "gstate": gstate, "cstates": cstates, "tracker": tracker.state_dict(),
                "ptracker": ptracker.state_dict(),
                "totals": totals, "fingerprint": fp, "wandb_id": wandb.run_id, "finished": finished}

    rounds = int(cfg.rounds)
    last_eval: dict[str, float] = {}
    status = "completed"
    from tqdm import tqdm

    bar = tqdm(range(start_round + 1, rounds + 1), initial=start_round, total=rounds, desc="rounds",
               disable=None if cfg.progress else True, file=sys.stderr, dynamic_ncols=True)
    try:
        for r in bar:
            t0 = time.perf_counter()
            cohort_np, cohort, sched = prepare_round(r)
            down = method.broadcast(gstate, r)
            cs_cohort = {k: v[cohort] for k, v in cstates.items()}
            result = executor.run(method, down.tensors, cs_cohort, cohort, view, sched)
            for k, v in result.client_states.items():
                cstates[k][cohort] = v
            gstate = method.aggregate(gstate, result.uplink, sizes[cohort], r, cohort, view.num_clients)
            bytes_down = payload_bytes(down) * len(cohort_np)
            bytes_up = payload_bytes(method.uplink(result.uplink))
            round_s = time.perf_counter() - t0
            totals["bytes_up"] += bytes_up
            totals["bytes_down"] += bytes_down
            totals["samples"] += result.samples
            totals["time_s"] += round_s
            totals["rounds_done"] = r
            train_loss = float(result.loss.mean()) if method.reports_train_loss else 0.0
            row: dict[str, Any] = {
                "round": r, "clients/participants": len(cohort_np),
                "comm/bytes_up": bytes_up, "comm/bytes_down": bytes_down,
                "comm/bytes_up_total": totals["bytes_up"], "comm/bytes_down_total": totals["bytes_down"],
                "comm/bytes_total": totals["bytes_up"] + totals["bytes_down"],
            }
            if method.reports_train_loss:
                row["train/loss"] = train_loss
            if hasattr(method, "round_metrics"):
                row.update(method.round_metrics(gstate, r))
            due = r % int(cfg.eval_every) == 0 or r == rounds
            if hasattr(method, "should_evaluate"):
                due = method.should_evaluate(r)
            if due:
                if has_global:
                    val, test = evaluate_global(method, gstate, model, dataset)
                    for name, d in (("val", val), ("test", test)):
                        for k, v in d.items():
                            row[f"global/{name}_{k}"] = v
                    row.update(sparsity_metrics(method, gstate, dataset))
                    key = "acc" if dataset.task == "classification" else "r2"
                    tracker.update(r, val[key], test.get(key))
                    row.update({"best/val_acc": tracker.best_val, "best/round": tracker.best_round})
                    bar.set_postfix(val_acc=f"{val[key]:.4f}", best=f"{tracker.best_val:.4f}@{tracker.best_round}")
                if has_local_splits:
                    personal = evaluate_personal(method, gstate, cstates, model, dataset, part)
                    row.update(personal)
                    if personal:
                        select = personal.get("personal/val_acc", personal.get("personal/test_acc"))
                        ptracker.update(r, select, personal.get("personal/test_acc"))
                        row.update({"best/personal_val_acc": ptracker.best_val,
                                    "best/personal_round": ptracker.best_round})
                        if not has_global:
                            bar.set_postfix(personal_test_acc=f"{personal.get('personal/test_acc', 0):.4f}")
                last_eval = row
            row["time/round_s"] = round_s
            row["time/total_s"] = totals["time_s"]
            row["throughput/samples_per_s"] = result.samples / round_s if round_s > 0 else None
            metrics_file.append(row)
            wandb.log(row, step=r)
            if not math.isfinite(train_loss):
                status = "diverged"
                raise DivergedError(f"round {r}: training loss is {train_loss}; lower lr (now {cfg.lr}). "
                                    f"Metrics up to round {r} are in {metrics_file.path}")
            if r < rounds and (StopFlag.requested or (stop_after is not None and r >= stop_after)):
                save_checkpoint(ckpt_path, ckpt_state(r, False))
                status = "preempted"
                raise Preempted(f"stopped after round {r}; checkpoint in {ckpt_path}")
            if r % int(cfg.checkpoint_every) == 0 and r < rounds:
                save_checkpoint(ckpt_path, ckpt_state(r, False))
        save_checkpoint(ckpt_path, ckpt_state(rounds, True))
    except BaseException:
        if status == "completed":
            status = "interrupted"
        raise
    finally:
        bar.close()
        summary = {
            "status": status,
            "best/val_acc": tracker.best_val, "best/round": tracker.best_round,
            "best/test_acc": tracker.test_at_best, "rounds_to_target": tracker.rounds_to_target,
            "metrics.target": tracker.target,
            "final/val_acc": last_eval.get("global/val_acc"), "final/test_acc": last_eval.get("global/test_acc"),
            "final/test_loss": last_eval.get("global/test_loss"),
            "comm/bytes_up_total": totals["bytes_up"], "comm/bytes_down_total": totals["bytes_down"],
            "comm/bytes_total": totals["bytes_up"] + totals["bytes_down"],
            "comm/bytes_per_round": (totals["bytes_up"] + totals["bytes_down"]) / max(totals.get("rounds_done", 0), 1),
            "time/total_s": totals["time_s"],
            "throughput/samples_per_s": totals["samples"] / totals["time_s"] if totals["time_s"] else None,
            "memory/peak_rss_mb": peak_rss_mb(),
            "memory/peak_device_mb": (torch.cuda.max_memory_allocated(device) / 2**20
                                      if device.type == "cuda" else None),
            "rounds": rounds,
            "n_params": (sum(t.numel() for t in method.model_tensors(gstate).values())
                         if hasattr(method, "model_tensors") else n_params),
            "executor": executor.name, "device": str(device),
            "run_dir": str(run_dir),
        }
        summary.update({k: v for k, v in last_eval.items() if k.startswith(("sparsity/", "personal/"))})
        if ptracker.best_round is not None:
            summary.update({"best/personal_val_acc": ptracker.best_val, "best/personal_round": ptracker.best_round,
                            "best/personal_test_acc": ptracker.test_at_best})
        summary.update(warm_info)
        if dataset.task == "regression":
            summary.update({"best/val_r2": summary.pop("best/val_acc"), "best/test_r2": summary.pop("best/test_acc"),
                            "final/test_mse": last_eval.get("global/test_mse"),
                            "final/test_r2": last_eval.get("global/test_r2")})
        write_json(run_dir / "summary.json", summary)
        wandb.summary(summary)
        wandb.finish(exit_code=0 if status == "completed" else 1)
    return summary


def format_summary(s: dict[str, Any]) -> str:
    def num(v: Any, fmt: str) -> str:
        return "n/a" if v is None else format(v, fmt)

    lines = ["fedbench summary"]
    if s.get("best/round") is not None:  # a method with a global model
        lines += [
            f"  best val acc      {num(s.get('best/val_acc'), '.4f')} (rounds-to-best: {s.get('best/round')})",
            f"  test acc at best  {num(s.get('best/test_acc'), '.4f')}",
            f"  final test acc    {num(s.get('final/test_acc'), '.4f')}",
            f"  rounds-to-target  {s.get('rounds_to_target')} (target {s.get('metrics.target')})",
        ]
    if s.get("personal/test_acc") is not None:  # clients' own models on their own test splits
        lines += [
            f"  personal test acc {num(s.get('personal/test_acc'), '.4f')} "
            f"± {num(s.get('personal/test_acc_std'), '.4f')} over clients (final)",
            f"  at best personal  {num(s.get('best/personal_test_acc'), '.4f')} "
            f"(round {s.get('best/personal_round')}, chosen on the clients' validation splits)",
        ]
    return "\n".join(lines + [
        f"  bytes up / down   {s.get('comm/bytes_up_total'):,} / {s.get('comm/bytes_down_total'):,}",
        f"  wall time         {num(s.get('time/total_s'), '.1f')} s ({s.get('executor')} on {s.get('device')})",
        f"  run dir           {s.get('run_dir')}",
    ])
