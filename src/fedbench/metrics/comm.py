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
SPARSE = "sparse"      # values + (int32 indices or bitmask, whichever is smaller)
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
    raise ValueError(f"unknown payload encoding {encoding!r}")


def _leaves(p: Payload):
    """(encoding, tensor) for every tensor; the encoding is set per top-level name."""
    for name, value in p.tensors.items():
        for t in tree_leaves(value):
            yield p.encoding(name), t


def payload_bytes_per_message(p: Payload) -> list[int]:
    """Bytes of each message (one per client for a stacked payload, else a single one)."""
    if not p.stacked:
        return [sum(tensor_bytes(t, enc) for enc, t in _leaves(p))]
    counts: list[int] | None = None
    for enc, t in _leaves(p):
        if enc == DENSE:
            per = [t[0].numel() * t.element_size()] * t.shape[0]
        else:
            per = [tensor_bytes(t[k], enc) for k in range(t.shape[0])]
        counts = per if counts is None else [a + b for a, b in zip(counts, per, strict=True)]
    return counts or []


def payload_bytes(p: Payload) -> int:
    return int(sum(payload_bytes_per_message(p)))
