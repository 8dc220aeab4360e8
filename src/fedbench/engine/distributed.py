"""One run over several processes: the round's cohort is sharded over the ranks (torch.distributed, gloo on
CPU, NCCL on GPU); each rank runs its share with the same per-client code and executor. Client states and
losses are all-gathered in cohort order; the uplinks are all-reduced as additive shares of what the server
reduces them to (one model-sized message per rank, where the method aggregates by weighted means) or else
all-gathered, and every rank then runs the identical server step. Results equal one process's (same seeds
per (seed, round, client)); rank 0 alone evaluates, logs and checkpoints.

Started by `hardware.workers=N` (fedbench spawns ranks 1..N-1 itself), by `torchrun`, or by SLURM with
several tasks per job (`hydra/launcher=slurm hydra.launcher.tasks_per_node=N`).
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils._pytree import tree_flatten, tree_unflatten

from fedbench.data.clients import BatchSchedule, ClientView
from fedbench.engine.functional import Tree, tree_index
from fedbench.engine.protocol import ClientFns


@dataclass(frozen=True)
class Placement:
    """Where one rank computes and communicates."""

    device: torch.device        # the rank's compute device (cuda:LOCAL_RANK on a GPU node)
    backend: str                # nccl | gloo
    comm_device: torch.device   # where every tensor handed to a collective must live


def local_rank(rank: int, env: Mapping[str, str] = os.environ) -> int:
    """This process's index on its node: torchrun's LOCAL_RANK, SLURM's SLURM_LOCALID, else the global
    rank (ranks spawned by hardware.workers all live on this node)."""
    for key in ("LOCAL_RANK", "SLURM_LOCALID"):
        if key in env:
            return int(env[key])
    return rank


def ranks_per_node(size: int, env: Mapping[str, str] = os.environ) -> int:
    """Processes of the run on this node: torchrun's LOCAL_WORLD_SIZE, SLURM's tasks per node, else all."""
    if "LOCAL_WORLD_SIZE" in env:
        return int(env["LOCAL_WORLD_SIZE"])
    if "SLURM_NTASKS_PER_NODE" in env:
        return int(env["SLURM_NTASKS_PER_NODE"].split("(")[0])
    return size


def place(rank: int, size: int, requested: torch.device, gpu_count: int,
          env: Mapping[str, str] = os.environ) -> Placement:
    """The device and backend of rank `rank` of `size`, for a run asked to compute on `requested`.

    CPU: gloo, collectives on the CPU. CUDA: rank r computes on cuda:(LOCAL_RANK % gpus), or on the
    GPU named by hardware.device=cuda:N; with one GPU per rank the backend is NCCL and collectives take
    tensors on that GPU. More ranks on a node than GPUs (several small-model ranks filling one device):
    NCCL refuses two ranks on one GPU, so they talk over gloo through the CPU."""
    if requested.type != "cuda":
        return Placement(requested, "gloo", torch.device("cpu"))
    here = local_rank(rank, env)
    index = requested.index if requested.index is not None else here % max(gpu_count, 1)
    device = torch.device("cuda", index)
    shared = requested.index is not None or ranks_per_node(size, env) > gpu_count
    if shared and size > 1:
        return Placement(device, "gloo", torch.device("cpu"))
    return Placement(device, "nccl", device)


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank r of `size` processes (size 1: no torch.distributed).
    Every collective of a run goes through its methods: they hand torch.distributed tensors on the
    backend's communication device and give results back on the device the caller's tensors were on."""

    rank: int = 0
    size: int = 1
    device: torch.device | None = None          # None: hardware.device as configured (one process)
    comm_device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on any (e.g. a stop request seen by one process)."""
        if self.size == 1:
            return flag
        t = self.all_reduce(torch.tensor([1 if flag else 0]), dist.ReduceOp.MAX)
        return bool(t.item())

    def all_reduce(self, t: torch.Tensor, op: Any = dist.ReduceOp.SUM) -> torch.Tensor:
        """The element-wise reduction of `t` over the ranks (a new tensor on t's device)."""
        wire = t.to(self.comm_device)
        wire = wire.clone() if wire is t else wire  # the caller's tensor stays as it was
        _record("all_reduce", wire, self)
        dist.all_reduce(wire, op=op)
        return wire.to(t.device)

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `t` (same shape on every rank), in rank order, on t's device."""
        wire = t.to(self.comm_device).contiguous()
        parts = [torch.empty_like(wire) for _ in range(self.size)]
        _record("all_gather", wire, self)
        dist.all_gather(parts, wire)
        return [p.to(t.device) for p in parts]

    def broadcast_object(self, value: Any) -> Any:
        box = [value]
        _record("broadcast_object", None, self)
        dist.broadcast_object_list(box, src=0, device=self.comm_device)
        return box[0]


SINGLE = World()


def _record(op: str, wire: torch.Tensor | None, world: World) -> None:
    """With FEDBENCH_COLLECTIVE_LOG=DIR every collective is appended to DIR/rank<r>.jsonl (op, device of
    the tensor handed over, the backend's device): how the tests check what reaches the backend."""
    where = os.environ.get("FEDBENCH_COLLECTIVE_LOG")
    if not where:
        return
    row = {"op": op, "backend": dist.get_backend(), "comm_device": str(world.comm_device),
           "device": None if wire is None else str(wire.device),
           "dtype": None if wire is None else str(wire.dtype)}
    with open(Path(where) / f"rank{world.rank}.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def world_from_env() -> tuple[int, int, str] | None:
    """(rank, size, init_method) when an outside launcher started several processes (torchrun, SLURM)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), "env://"
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
        host = os.environ.get("SLURM_LAUNCH_NODE_IPADDR") or "127.0.0.1"
        port = 20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000
        return int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"]), f"tcp://{host}:{port}"
    return None


def join(rank: int, size: int, init_method: str, device: torch.device) -> World:
    """Join the run's process group; a CUDA rank first binds its own GPU (NCCL needs it)."""
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    placement = place(rank, size, device, gpus)
    if placement.device.type == "cuda":
        torch.cuda.set_device(placement.device)
    if not dist.is_initialized():
        dist.init_process_group(placement.backend, init_method=init_method, rank=rank, world_size=size)
    return World(rank, size, placement.device, placement.comm_device)


def leave(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def broadcast(value: Any, world: World) -> Any:
    """Rank 0's value on every rank (e.g. the run dir under torchrun, where each rank's Hydra made its own)."""
    if world.size == 1:
        return value
    return world.broadcast_object(value)


def shard_rows(n: int, world: World) -> slice:
    """This rank's contiguous rows of an n-client cohort (np.array_split sizes)."""
    bounds = np.cumsum([0] + [len(a) for a in np.array_split(np.arange(n), world.size)])
    return slice(int(bounds[world.rank]), int(bounds[world.rank + 1]))


def slice_schedule(sched: BatchSchedule, rows: slice) -> BatchSchedule:
    return replace(sched, idx=sched.idx[rows], weight=sched.weight[rows], step_mask=sched.step_mask[rows],
                   step_mask_host=sched.host_mask()[rows], noise=None if sched.noise is None else sched.noise[rows])


def all_gather_rows(tree: Tree, counts: list[int], world: World) -> Tree:
    """Concatenate every rank's [k_r, ...] leaves in rank order (padded to the largest share for the wire)."""
    leaves, spec = tree_flatten(tree)
    most = max(counts)
    out = []
    for leaf in leaves:
        pad = leaf.new_zeros((most - leaf.shape[0], *leaf.shape[1:]))
        parts = world.all_gather(torch.cat([leaf, pad]))
        out.append(torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)]))
    return tree_unflatten(out, spec)


def all_sum(tree: Tree, world: World) -> Tree:
    """Element-wise sum over the ranks of every leaf, one all-reduce per dtype (leaves flattened together)."""
    leaves, spec = tree_flatten(tree)
    out: list[torch.Tensor | None] = [None] * len(leaves)
    for dtype in {t.dtype for t in leaves}:
        idx = [i for i, t in enumerate(leaves) if t.dtype == dtype]
        flat = world.all_reduce(torch.cat([leaves[i].reshape(-1) for i in idx]))
        for i, part in zip(idx, flat.split([leaves[i].numel() for i in idx]), strict=True):
            out[i] = part.view(leaves[i].shape)
    return tree_unflatten(out, spec)


@dataclass(frozen=True)
class Shard:
    """This rank's rows of the round's cohort, and how to combine per-rank values."""

    rows: slice
    counts: tuple[int, ...]
    world: World

    def gather(self, tree: Tree) -> Tree:
        return all_gather_rows(tree, list(self.counts), self.world)

    def sum(self, tree: Tree) -> Tree:
        return all_sum(tree, self.world)

    def sum_int(self, value: int) -> int:
        return int(self.world.all_reduce(torch.tensor([value], dtype=torch.int64)).item())


class ShardedExecutor:
    """Runs this rank's share of the cohort with `inner`; gathers the cohort's client states and losses and
    returns this rank's uplinks with the Shard that combines them (`run_round` reduces or gathers them)."""

    def __init__(self, inner: Any, world: World):
        self.inner, self.world = inner, world
        self.name = f"{inner.name} x{world.size} workers"

    def run(self, fns: ClientFns, down: Tree, cstates: Tree, client_ids: torch.Tensor, view: ClientView,
            sched: BatchSchedule) -> Any:
        from fedbench.engine.executors import RoundResult

        n = len(client_ids)
        counts = tuple(len(range(*shard_rows(n, World(r, self.world.size)).indices(n)))
                       for r in range(self.world.size))
        rows = shard_rows(n, self.world)
        keep = counts[self.world.rank]
        run_rows = rows if keep else slice(0, 1)  # more ranks than clients: compute client 0, send nothing
        res = self.inner.run(fns, down, tree_index(cstates, run_rows), client_ids[run_rows], view,
                             slice_schedule(sched, run_rows))
        kept = {k: tree_index(v, slice(0, keep)) for k, v in (("up", res.uplink), ("cs", res.client_states),
                                                               ("loss", res.loss))}
        shard = Shard(rows, counts, self.world)
        full = shard.gather({"cs": kept["cs"], "loss": kept["loss"]})
        samples = int(sched.weight.sum().item())
        # the whole cohort's padding, from every rank's rows of the schedule (no communication)
        steps = [self.inner.client_steps(slice_schedule(sched, shard_rows(n, World(r, self.world.size))))
                 for r in range(self.world.size) if counts[r]]
        padding = sum(c for c, _ in steps) / max(sum(r for _, r in steps), 1)
        return RoundResult(kept["up"], full["cs"], full["loss"], samples, shard, padding,
                           client_steps=sum(r for _, r in steps))
