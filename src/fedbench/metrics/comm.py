"""Communication bytes, counted from the payload objects that methods actually exchange.

These are payload (tensor) bytes, not serialized wire bytes: a dense tensor costs numel x element
size; a sparse one costs its non-zero values plus int32 indices or a bitmask, whichever is smaller.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch.utils._pytree import tree_leaves

DENSE = "dense"
SPARSE = "sparse"        # values + (int32 indices or bitmask, whichever is smaller)
SYMMETRIC = "symmetric"  # a symmetric matrix sent as its upper triangle: n(n+1)/2 values
CACHED = "cached"        # already held by the receiver from an earlier round: 0 bytes
SPARSE_GROUP = "sparse_group"  # {"mask": bool [D], name: values [D], ...}: the values at the mask's positions
                               # for every value tensor, plus the positions once (int32 indices or bitmask)
INDEX_BYTES = 4


@dataclass
class Payload:
    """What one side sends. With `stacked=True` every tensor has a leading client dimension and the
    payload stands for one message per client."""

    tensors: dict[str, torch.Tensor]
    encodings: dict[str, str] = field(default_factory=dict)
    stacked: bool = False

    def encoding(self, name: str) -> str:
        return self.encodings.get(name, DENSE)


def sparse_bytes(nnz: int, numel: int, element_size: int) -> int:
    return nnz * element_size + min(nnz * INDEX_BYTES, math.ceil(numel / 8))


def tensor_bytes(t: torch.Tensor, encoding: str = DENSE) -> int:
    """Bytes of one (unstacked) tensor message."""
    if encoding == DENSE:
        return t.numel() * t.element_size()
    if encoding == SPARSE:
        return sparse_bytes(int(torch.count_nonzero(t)), t.numel(), t.element_size())
    if encoding == SYMMETRIC:
        n = t.shape[-1]
        return (t.numel() // (n * n)) * n * (n + 1) // 2 * t.element_size()
    if encoding == CACHED:
        return 0
    raise ValueError(f"unknown payload encoding {encoding!r}")


def sparse_group_bytes(group: dict[str, torch.Tensor]) -> int:
    """Bytes of one (unstacked) sparse group message."""
    mask = group["mask"]
    nnz = int(torch.count_nonzero(mask))
    values = sum(nnz * t.element_size() for k, t in group.items() if k != "mask")
    return values + min(nnz * INDEX_BYTES, math.ceil(mask.numel() / 8))


def _leaves(p: Payload):
    """(encoding, tensor) for every tensor; the encoding is set per top-level name."""
    for name, value in p.tensors.items():
        if p.encoding(name) == SPARSE_GROUP:
            continue
        for t in tree_leaves(value):
            yield p.encoding(name), t


def _groups(p: Payload):
    return [v for n, v in p.tensors.items() if p.encoding(n) == SPARSE_GROUP]


def payload_bytes_per_message(p: Payload) -> list[int]:
    """Bytes of each message (one per client for a stacked payload, else a single one)."""
    if not p.stacked:
        return [sum(tensor_bytes(t, enc) for enc, t in _leaves(p)) + sum(sparse_group_bytes(g) for g in _groups(p))]
    counts: list[int] | None = None
    for g in _groups(p):
        per = [sparse_group_bytes({k: v[i] for k, v in g.items()}) for i in range(g["mask"].shape[0])]
        counts = per if counts is None else [a + b for a, b in zip(counts, per, strict=True)]
    for enc, t in _leaves(p):
        if enc == DENSE:
            per = [t[0].numel() * t.element_size()] * t.shape[0]
        else:
            per = [tensor_bytes(t[k], enc) for k in range(t.shape[0])]
        counts = per if counts is None else [a + b for a, b in zip(counts, per, strict=True)]
    return counts or []


def payload_bytes(p: Payload) -> int:
    return int(sum(payload_bytes_per_message(p)))
