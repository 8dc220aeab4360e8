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

import os
import socket
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils._pytree import tree_flatten, tree_unflatten

from fedbench.data.clients import BatchSchedule, ClientView
from fedbench.engine.functional import Tree, tree_index
from fedbench.engine.protocol import ClientFns


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank r of `size` processes (size 1: no torch.distributed)."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on any (e.g. a stop request seen by one process)."""
        if self.size == 1:
            return flag
        t = torch.tensor([1 if flag else 0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


SINGLE = World()


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
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=init_method, rank=rank,
                                world_size=size)
    return World(rank, size)


def leave(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def broadcast(value: Any, world: World) -> Any:
    """Rank 0's value on every rank (e.g. the run dir under torchrun, where each rank's Hydra made its own)."""
    if world.size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


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
        parts = [torch.empty((most, *leaf.shape[1:]), dtype=leaf.dtype, device=leaf.device) for _ in counts]
        dist.all_gather(parts, torch.cat([leaf, pad]).contiguous())
        out.append(torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)]))
    return tree_unflatten(out, spec)


def all_sum(tree: Tree, world: World) -> Tree:
    """Element-wise sum over the ranks of every leaf, one all-reduce per dtype (leaves flattened together)."""
    leaves, spec = tree_flatten(tree)
    out: list[torch.Tensor | None] = [None] * len(leaves)
    for dtype in {t.dtype for t in leaves}:
        idx = [i for i, t in enumerate(leaves) if t.dtype == dtype]
        flat = torch.cat([leaves[i].reshape(-1) for i in idx])
        dist.all_reduce(flat)
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
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t)
        return int(t.item())


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
        return RoundResult(kept["up"], full["cs"], full["loss"], samples, shard)
