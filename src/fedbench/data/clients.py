"""Device-resident client view: the data once as tensors, clients as CSR index sets, and seeded
per-round batch schedules [K, steps, B] that the executors turn into gathers X[idx]."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class ClientView:
    x: torch.Tensor          # [n_train, ...] training pool on the run's device
    y: torch.Tensor          # [n_train]
    offsets: np.ndarray      # [N + 1] CSR offsets into ids
    ids: np.ndarray          # concatenated per-client training indices

    @classmethod
    def build(cls, x: torch.Tensor, y: torch.Tensor, parts: list[np.ndarray]) -> ClientView:
        sizes = np.array([len(p) for p in parts], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        ids = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
        return cls(x, y, offsets, ids)

    @property
    def num_clients(self) -> int:
        return len(self.offsets) - 1

    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)


@dataclass
class BatchSchedule:
    """Which samples each cohort client uses at each local step.

    idx[k, s, b] is a global index into the training pool; weight[k, s, b] is 1 for a real sample and
    0 for padding (short last batch, or a client with fewer steps than the longest one).
    """

    idx: torch.Tensor        # [K, S, B] long
    weight: torch.Tensor     # [K, S, B] float
    step_mask: torch.Tensor  # [K, S] bool: step s of client k is real
    step_mask_host: np.ndarray | None = None  # the same on the host, so executors branch without a sync
    noise: torch.Tensor | None = None  # [K, S, D] uniform(0, 1) per step, for methods with noise_dim > 0

    def host_mask(self) -> np.ndarray:
        if self.step_mask_host is None:
            self.step_mask_host = self.step_mask.cpu().numpy()
        return self.step_mask_host

    @property
    def steps(self) -> int:
        return int(self.idx.shape[1])


def client_rng(seed: int, round_: int, client: int) -> np.random.Generator:
    """The generator of one client in one round; a resumed run redraws exactly the same numbers."""
    return np.random.default_rng([int(seed), int(round_), int(client), 0xBA7C])


def sample_cohort(seed: int, round_: int, n_clients: int, participation: float) -> np.ndarray:
    k = min(n_clients, max(1, int(round(participation * n_clients))))
    rng = np.random.default_rng([int(seed), int(round_), 0xC0407])
    return np.sort(rng.choice(n_clients, size=k, replace=False))


def make_schedule(view: ClientView, cohort: np.ndarray, seed: int, round_: int, batch_size: int,
                  local_epochs: int, local_steps: int | None, dtype: torch.dtype,
                  device: torch.device | str, noise_dim: int = 0,
                  step_fraction: np.ndarray | None = None) -> BatchSchedule:
    """`step_fraction` [K]: stragglers complete only the first max(1, floor(f x steps)) of their steps
    with data (the rest masked out, as padding is); the indices drawn are those of the full schedule."""
    sizes = view.sizes()[cohort]
    b = int(batch_size)
    if local_steps is not None:
        steps = np.full(len(cohort), int(local_steps))
    else:
        steps = local_epochs * np.ceil(sizes / b).astype(np.int64)
    s_max = int(steps.max()) if len(steps) else 0
    idx = np.zeros((len(cohort), s_max, b), dtype=np.int64)
    weight = np.zeros((len(cohort), s_max, b), dtype=np.float64)
    noise = np.zeros((len(cohort), s_max, noise_dim)) if noise_dim else None
    for row, (client, n_k, s_k) in enumerate(zip(cohort, sizes, steps, strict=True)):
        rng = client_rng(seed, round_, int(client))
        if local_steps is not None:
            # consecutive epochs of fresh permutations, cut into s_k full batches
            reps = math.ceil(s_k * b / n_k)
            local = np.concatenate([rng.permutation(n_k) for _ in range(reps)])[: s_k * b]
            idx[row, :s_k] = local.reshape(s_k, b)
            weight[row, :s_k] = 1.0
        else:
            per_epoch = math.ceil(n_k / b)
            for e in range(local_epochs):
                padded = np.zeros(per_epoch * b, dtype=np.int64)
                padded[:n_k] = rng.permutation(n_k)
                mask = np.zeros(per_epoch * b)
                mask[:n_k] = 1.0
                idx[row, e * per_epoch:(e + 1) * per_epoch] = padded.reshape(per_epoch, b)
                weight[row, e * per_epoch:(e + 1) * per_epoch] = mask.reshape(per_epoch, b)
        idx[row] = view.ids[view.offsets[client] + idx[row]]
        if noise is not None:  # drawn after the indices, from the same client generator
            noise[row] = rng.random((s_max, noise_dim))
    if step_fraction is not None:
        for row, f in enumerate(step_fraction):
            done = int((weight[row].sum(-1) > 0).sum())
            weight[row, max(1, int(math.floor(f * done))):] = 0.0
    step_mask = weight.sum(-1) > 0
    return BatchSchedule(torch.from_numpy(idx).to(device), torch.from_numpy(weight).to(device, dtype),
                         torch.from_numpy(step_mask).to(device), step_mask,
                         None if noise is None else torch.from_numpy(noise).to(device, dtype))
