"""The processes of one run: ranks started by an outside launcher (torchrun, SLURM tasks) are joined;
`hardware.workers=N` starts ranks 1..N-1 here (spawned, each with cores // N threads unless
hardware.threads is set), and this process is rank 0."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from fedbench.engine.distributed import SINGLE, World, free_port, join, leave, world_from_env
from fedbench.run.validation import resolve_device

log = logging.getLogger("fedbench")


def _threads(cfg: DictConfig, size: int) -> None:
    if not cfg.hardware.threads and size > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))


def start_workers(cfg: DictConfig, run_dir: Path, stop_after: int | None) -> tuple[World, list[Any]]:
    """(this process's World, the worker processes it started)."""
    device = resolve_device(str(cfg.hardware.device))
    outside = world_from_env()
    if outside is not None:
        rank, size, init = outside
        _threads(cfg, size)
        return join(rank, size, init, device), []
    size = int(cfg.hardware.workers)
    if size == 1:
        return SINGLE, []
    port = free_port()
    ctx = torch.multiprocessing.get_context("spawn")
    container = OmegaConf.to_container(cfg, resolve=True)
    children = [ctx.Process(target=worker_main, args=(container, str(run_dir), r, size, port, stop_after,
                                                      os.getpid()), daemon=True) for r in range(1, size)]
    for p in children:
        p.start()
    _threads(cfg, size)
    world = join(0, size, f"tcp://127.0.0.1:{port}", device)
    log.info("%d workers share each round's cohort (torch.distributed %s; rank 0 on %s)", size,
             torch.distributed.get_backend(), world.device)
    return world, children


def finish_workers(world: World, children: list[Any]) -> None:
    leave(world)
    for p in children:
        p.join(timeout=60)
        if p.is_alive():
            p.terminate()


def exit_with_parent(parent: int, every_s: float = 0.5) -> None:
    """A spawned rank ends within a second of rank 0's death (killed, out of memory): it would otherwise
    wait in a collective for torch.distributed's timeout (30 minutes) as an orphan."""
    def watch() -> None:
        while True:
            time.sleep(every_s)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="fedbench-parent-watch", daemon=True).start()


def worker_main(container: dict, run_dir: str, rank: int, size: int, port: int, stop_after: int | None,
                parent: int | None = None) -> None:
    """Entry of a spawned rank: the same config, no Hydra, no logging of its own."""
    from fedbench.errors import Preempted
    from fedbench.experiment import follow

    exit_with_parent(parent if parent is not None else os.getppid())
    cfg = OmegaConf.create(container)
    _threads(cfg, size)
    world = join(rank, size, f"tcp://127.0.0.1:{port}", resolve_device(str(cfg.hardware.device)))
    try:
        follow(cfg, world, stop_after)
    except Preempted:
        pass
    finally:
        leave(world)
