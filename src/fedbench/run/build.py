"""Config -> Run: data, partition, client view, model, method, executor and the fresh or restored state.

Each step is one function; `build_run` strings them together in order. Nothing here knows a method by
name: what a method needs from the run reaches it through `RunContext` in `setup`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from fedbench.config import typed_choice
from fedbench.data.availability import build_availability
from fedbench.data.clients import BatchSchedule, ClientView, make_schedule
from fedbench.data.datasets import load_dataset
from fedbench.data.federation import DropoutConfig, Federation, StragglerConfig, departure
from fedbench.data.partitions import Partition, make_partition, partition_stats
from fedbench.engine.distributed import SINGLE, ShardedExecutor, World
from fedbench.engine.executors import Executor, ExecutorOptions, pick_executor, resolve_memory_format
from fedbench.engine.functional import make_loss_fn, split_state
from fedbench.engine.optim import LrSchedule
from fedbench.engine.protocol import RoundContext, RunContext
from fedbench.errors import ConfigError
from fedbench.methods.base import Method, RunSpec
from fedbench.models.backbones import build_model
from fedbench.models.features import extract_features, extractor_config, features_config
from fedbench.models.warmstart import apply_warm_start, pretrain
from fedbench.run.artefacts import write_partition
from fedbench.run.state import RunState, fingerprint
from fedbench.run.validation import DTYPES, method_config, resolve_device, typed_group
from fedbench.settings import HardwareConfig, MetricsConfig, WarmStartConfig
from fedbench.tracking.files import write_json

log = logging.getLogger("fedbench")


@dataclass
class Run:
    """Everything a run is made of; the loop and the callbacks read it, only `state` changes."""

    cfg: DictConfig
    run_dir: Path
    device: torch.device
    dtype: torch.dtype
    fingerprint: str
    dataset: Any
    part: Partition
    part_stats: dict[str, float]
    view: ClientView
    sizes: torch.Tensor            # [N] training-set size of every client
    model: torch.nn.Module | None
    method: Method
    state: RunState
    provenance: dict[str, Any]     # warm start / calibration / frozen features: summary and W&B config
    n_params: int
    executor: Executor | None = None
    sweep_group: str | None = None
    world: World = SINGLE          # the ranks computing this run (rank 0 evaluates and writes)
    lr_schedule: LrSchedule = LrSchedule()  # the client lr of each round
    created: float = dataclasses.field(default_factory=time.perf_counter)  # when the run began (start-up)
    startup_s: float = 0.0         # data, model, warm start, sinks: before the first round of this process
    fused_runs: int = 1            # runs whose clients computed together with this one's (fused sweeps)
    # (round, (val, test) metrics of the global model) when a fused group evaluated it with its peers
    evaluated: tuple[int, tuple[dict, dict]] | None = None
    federation: Federation | None = None  # who takes part in each round (set by build_run)

    @property
    def rounds(self) -> int:
        return int(self.cfg.rounds)

    @property
    def ckpt_path(self) -> Path:
        return self.run_dir / "checkpoint.pt"

    has_local_splits: bool = False  # per-client evaluation applies (set once by build_run)

    def prepare_round(self, r: int) -> tuple[RoundContext, BatchSchedule]:
        """The round's cohort and batch schedule (`schedule_round`), with the method set to the round's
        client learning rate."""
        self.method.lr = self.lr_at(r)  # the round's client learning rate (lr_schedule)
        return self.schedule_round(r)

    def schedule_round(self, r: int) -> tuple[RoundContext, BatchSchedule]:
        """The round's cohort (the clients whose update arrives) and batch schedule, drawn from (seed,
        round, client) and the config only: the loop builds round r+1's while the device still works on
        round r."""
        cfg, seed = self.cfg, int(self.cfg.seed)
        plan = self.federation.plan(r)
        stragglers = plan.step_fraction if (plan.step_fraction < 1).any() else None
        sched = make_schedule(self.view, plan.cohort, seed, r, int(cfg.batch_size),
                              self.method.local_epochs(int(cfg.local_epochs)),
                              cfg.local_steps, self.dtype, self.device, self.method.noise_dim, stragglers)
        cohort = torch.as_tensor(plan.cohort, device=self.device)
        steps = torch.as_tensor(sched.host_mask().sum(1), dtype=self.dtype, device=self.device)
        return RoundContext(r, cohort, self.sizes[cohort], self.federation.eligible, self.rounds, steps,
                            len(plan.sampled) - len(plan.cohort)), sched

    def lr_at(self, r: int) -> float:
        return self.lr_schedule(float(self.cfg.lr), r, self.rounds)

    def wandb_config(self) -> dict[str, Any]:
        out = flatten(OmegaConf.to_container(self.cfg, resolve=True))
        out.update({f"partition_stats.{k}": v for k, v in self.part_stats.items()})
        out.update({"run.executor": self.executor.name, "run.n_params": self.n_params, "run.device": str(self.device),
                    "run.fingerprint": self.fingerprint})
        out.update(self.provenance)
        return out


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def primary_labels(y: np.ndarray) -> np.ndarray:
    """One label per sample of a multilabel task, for label-skew partitions: the most frequent of the
    pool's labels the sample has (a broad topic where labels nest); L for a sample without any."""
    order = np.argsort(-y.sum(0), kind="stable")        # labels, most frequent first
    has = y[:, order] > 0
    return np.where(has.any(1), order[has.argmax(1)], y.shape[1]).astype(np.int64)


def load_data(cfg: DictConfig, run_dir: Path, device: torch.device, dtype: torch.dtype,
              write: bool = True) -> tuple[Any, Partition, dict]:
    """The dataset on the run's device, its partition (written to run_dir), and the partition's statistics.
    Label-skew partitions of a regression task skew the target: 10 quantile bins of y."""
    dataset = load_dataset(cfg.dataset)
    labels = dataset.y_train.numpy()
    if dataset.task == "regression":
        edges = np.quantile(labels, np.linspace(0, 1, 11)[1:-1])
        part_labels, n_classes = np.searchsorted(edges, labels).astype(np.int64), 10
    elif dataset.task == "multilabel":
        part_labels, n_classes = primary_labels(labels), dataset.num_classes + 1
    else:
        part_labels, n_classes = labels, dataset.num_classes
    pcfg = typed_choice("partition", cfg.partition)
    seed = int(cfg.seed) if pcfg.seed is None else pcfg.seed
    part = make_partition(part_labels, int(cfg.clients), pcfg, seed, dataset.columns)
    stats = partition_stats(part, part_labels, n_classes)
    if write:
        write_partition(run_dir, part, part_labels, n_classes, stats, cfg)
    log.info("partition: %s", ", ".join(f"{k}={v:.3g}" for k, v in stats.items()))
    return dataset.to(device, dtype), part, stats


def label_counts(y: torch.Tensor, part: Partition, num_classes: int) -> torch.Tensor:
    """[N, C] training label counts per client, in one bincount."""
    sizes = [len(p) for p in part.train]
    client = np.repeat(np.arange(len(sizes)), sizes)
    labels = y.cpu().numpy()[np.concatenate(part.train)] if sum(sizes) else np.zeros(0, np.int64)
    flat = np.bincount(client * num_classes + labels, minlength=len(sizes) * num_classes)
    return torch.as_tensor(flat.reshape(len(sizes), num_classes), device=y.device)


def run_context(cfg: DictConfig, dataset: Any, part: Partition, device: torch.device) -> RunContext:
    """What the run tells every method, before any model exists."""
    def pooled_train() -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(np.concatenate(part.train), device=device)
        return dataset.x_train[idx], dataset.y_train[idx]

    counts = label_counts(dataset.y_train, part, dataset.num_classes) if dataset.task == "classification" else None
    return RunContext(device=device, task=dataset.task, num_classes=dataset.num_classes,
                      in_features=math.prod(dataset.input_shape), total_rounds=int(cfg.rounds), lr=float(cfg.lr),
                      seed=int(cfg.seed), label_counts=counts, pooled_train=pooled_train,
                      extractors=typed_group(cfg, "metrics", MetricsConfig).extractors)


def warm_start(cfg: DictConfig, model: torch.nn.Module, input_shape: tuple[int, ...]) -> dict[str, Any]:
    """Load the body of a backbone pretrained centrally on `warm_start.source` (cached); its provenance."""
    if typed_group(cfg, "warm_start", WarmStartConfig).source is None:
        return {}
    state, provenance = pretrain(cfg.backbone, cfg.warm_start, input_shape)
    n_loaded = apply_warm_start(model, state)
    log.info("warm start from %s (%d tensors)", provenance["warm_start.checkpoint"], n_loaded)
    return {**provenance, "warm_start.tensors_loaded": n_loaded}


def build_method(cfg: DictConfig, dataset: Any, ctx: RunContext,
                 dtype: torch.dtype) -> tuple[Method, torch.nn.Module | None, dict[str, Any], RunContext]:
    """The method, set up with its context, and the backbone when it uses one (warm-started, then
    prepared by the method). Returns (method, model, provenance, the context the method received)."""
    method_cls, method_cfg = method_config(cfg)
    method = method_cls(method_cfg)
    torch.manual_seed(ctx.seed)
    model, provenance = None, {}
    if method.uses_backbone:
        model = build_model(cfg.backbone, dataset.input_shape, dataset.num_classes).to(device=ctx.device, dtype=dtype)
        model.train()
        provenance = warm_start(cfg, model, dataset.input_shape)
        provenance.update(method.prepare_model(model, dataclasses.replace(ctx, model=model)))
        params, buffers = split_state(model)
        autocast = torch.bfloat16 if str(cfg.hardware.dtype) == "bfloat16" else None
        ctx = dataclasses.replace(ctx, model=model, loss_fn=make_loss_fn(model, dataset.task, autocast),
                                  params=params, buffers=buffers)
    method.setup(ctx)
    method.check_run(RunSpec(int(cfg.rounds), float(cfg.participation), int(cfg.local_epochs), cfg.local_steps,
                             departure(cfg)))
    return method, model, provenance, ctx


def initial_state(cfg: DictConfig, method: Method, ctx: RunContext, n_clients: int,
                  checkpoint: dict[str, Any] | None) -> RunState:
    if checkpoint is not None:
        return RunState.from_checkpoint(checkpoint)
    gstate = method.init_global(ctx.params, ctx.buffers)
    return RunState(gstate=gstate, cstates=method.init_client_states(gstate, n_clients))


def build_run(cfg: DictConfig, run_dir: Path, checkpoint: dict[str, Any] | None = None,
              sweep_group: str | None = None, world: World = SINGLE) -> Run:
    """Every rank builds the same Run (same seeds); only rank 0 writes artefacts."""
    device = run_device(cfg, world)
    if cfg.hardware.threads:
        torch.set_num_threads(int(cfg.hardware.threads))
    configure_backends(typed_group(cfg, "hardware", HardwareConfig), device)
    # bf16 runs as autocast over float32 master weights
    dtype = torch.float64 if DTYPES[str(cfg.hardware.dtype)] == torch.float64 else torch.float32
    dataset, part, stats = load_data(cfg, run_dir, device, dtype, write=world.is_main)
    feature_info = extract_features(cfg, dataset)
    view = ClientView.build(dataset.x_train, dataset.y_train, part.train)
    ctx = run_context(cfg, dataset, part, device)
    method, model, provenance, ctx = build_method(cfg, dataset, ctx, dtype)
    if provenance and world.is_main:
        write_json(run_dir / "warm_start.json", provenance)
    provenance.update({f"features_info.{k}": v for k, v in (feature_info or {}).items()})
    run = Run(cfg, run_dir, device, dtype, fingerprint(cfg), dataset, part, stats, view,
              torch.as_tensor(view.sizes(), dtype=dtype, device=device), model, method,
              initial_state(cfg, method, ctx, view.num_clients, checkpoint), provenance,
              sum(p.numel() for p in ctx.params.values()), sweep_group=sweep_group, world=world,
              lr_schedule=typed_group(cfg, "lr_schedule", LrSchedule))
    # per-client evaluation: a classifier backbone and clients with their own val/test splits
    run.has_local_splits = (dataset.task == "classification" and model is not None
                            and (any(len(t) for t in part.test) or any(len(v) for v in part.val)))
    run.federation = build_federation(cfg, part)
    run.executor = choose_executor(run)
    if world.size > 1:
        run.executor = ShardedExecutor(run.executor, world)
    return run


def build_federation(cfg: DictConfig, part: Partition) -> Federation:
    """Availability, held-out clients, dropouts and stragglers of the run (all seeded by the run)."""
    seed = int(cfg.seed)
    availability = build_availability(cfg.availability, part.num_clients, seed)
    return Federation(part.num_clients, float(cfg.participation), seed, availability, part.holdout,
                      typed_group(cfg, "dropout", DropoutConfig), typed_group(cfg, "straggler", StragglerConfig))


def run_device(cfg: DictConfig, world: World = SINGLE) -> torch.device:
    """hardware.device, or the GPU this rank bound when it joined a multi-process run."""
    return world.device if world.device is not None else resolve_device(str(cfg.hardware.device))


def configure_backends(hw: HardwareConfig, device: torch.device) -> None:
    """CUDA's speed switches (null: on for a CUDA run): TF32 matmuls and convolutions (float32 inputs
    rounded to a 10-bit mantissa inside the tensor cores; hardware.tf32=false keeps full float32) and
    cuDNN's per-shape algorithm search. A CPU run leaves torch's defaults alone."""
    if device.type != "cuda":
        return
    tf32 = True if hw.tf32 is None else hw.tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = True if hw.cudnn_benchmark is None else hw.cudnn_benchmark


def choose_executor(run: Run) -> Executor:
    """The configured executor; `auto` may time one throw-away round of each (hardware.auto_policy=timed)."""
    from fedbench.run.loop import run_round

    hw, state = typed_group(run.cfg, "hardware", HardwareConfig), run.state

    def trial(executor: Executor) -> None:
        ctx, sched = run.prepare_round(state.round + 1)
        run_round(run.method, executor, state.gstate, state.cstates, ctx, run.view, sched)

    layout = resolve_memory_format(hw.memory_format, run.model, run.device, run.dtype)
    options = ExecutorOptions(hw.chunk_size, hw.compile,
                              None if hw.compile_mode == "default" else hw.compile_mode,
                              hw.max_padding, layout)
    executor, why = pick_executor(hw.executor, run.method, run.model, run.device, options,
                                  hw.auto_policy, trial)
    conv_layout = ", conv weights channels_last" if layout is not None and executor.name == "sequential" else ""
    log.info("executor: %s (%s)%s", executor.name, why, conv_layout)
    return executor


def dry_build(cfg: DictConfig) -> None:
    """What `build_run` does before round 1 that can fail on a wrong value, on the CPU and writing
    nothing: the data, the partition, the frozen-feature extractor and the backbone (one forward pass
    each), the method's set-up, the memory several workers need. The CLI runs it for every job before
    Hydra starts any (the warm start, FedSQ's calibration and the feature extraction itself are the
    run's work and are left to it)."""
    dtype = torch.float64 if str(cfg.hardware.dtype) == "float64" else torch.float32
    device = torch.device("cpu")
    dataset, part, _ = load_data(cfg, Path("."), device, dtype, write=False)
    build_federation(cfg, part)
    probe = dataset.x_train[:2]
    if str(OmegaConf.select(cfg, "features.extractor", default="none")) != "none":
        extractor = build_model(extractor_config(features_config(cfg)), dataset.input_shape, dataset.num_classes)
        probe = _probe(extractor.body.to(dtype), probe, f"features.extractor={cfg.features.extractor}", dataset.name)
    ctx = dataclasses.replace(run_context(cfg, dataset, part, device), in_features=math.prod(probe.shape[1:]))
    method_cls, method_cfg = method_config(cfg)
    method = method_cls(method_cfg)
    if method.uses_backbone:
        model = build_model(cfg.backbone, tuple(probe.shape[1:]), dataset.num_classes).to(dtype)
        _probe(model, probe, f"backbone={cfg.backbone.name}", dataset.name)
        params, buffers = split_state(model.train())
        ctx = dataclasses.replace(ctx, model=model, loss_fn=make_loss_fn(model, dataset.task), params=params,
                                  buffers=buffers)
    method.setup(ctx)
    _check_memory(int(cfg.hardware.workers), dataset)


def _probe(net: torch.nn.Module, x: torch.Tensor, what: str, dataset: str) -> torch.Tensor:
    """One forward pass on two samples: a backbone that cannot take the inputs says so in one line."""
    try:
        with torch.no_grad():
            return net.eval()(x)
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{what} cannot take dataset={dataset}'s inputs of shape {list(x.shape[1:])} "
                          f"({first[:160]})") from None


def _check_memory(workers: int, dataset: Any) -> None:
    """Every worker process holds the whole dataset: refuse more than the machine's free memory holds."""
    if workers <= 1:
        return
    held = sum(t.numel() * t.element_size() for t in (dataset.x_train, dataset.x_val, dataset.x_test))
    available = available_memory()
    if available is not None and workers * held > available:
        raise ConfigError(f"hardware.workers={workers}: each worker holds the dataset ({held / 2**30:.1f} GiB), "
                          f"{workers * held / 2**30:.1f} GiB in all, but {available / 2**30:.1f} GiB are free; "
                          f"use fewer workers")


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is no such file)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
