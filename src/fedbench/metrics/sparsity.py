"""Density of the gated parameters and, where the true support is known, TDR / recall / F1."""

from __future__ import annotations

import torch


def density(gated: dict[str, torch.Tensor]) -> tuple[float, int]:
    """(fraction of non-zero entries, number of gated entries)."""
    n = sum(t.numel() for t in gated.values())
    nnz = sum(int(torch.count_nonzero(t)) for t in gated.values())
    return (nnz / n if n else float("nan")), n


def feature_support(gated: dict[str, torch.Tensor], n_features: int) -> torch.Tensor | None:
    """Selected input features: the one gated matrix whose last dim is the feature dim; a feature is
    selected when any output's weight on it is non-zero. None where that is ambiguous."""
    cands = [t for t in gated.values() if t.dim() >= 1 and t.shape[-1] == n_features]
    if len(cands) != 1:
        return None
    w = cands[0].reshape(-1, n_features)
    return torch.nonzero((w != 0).any(0)).flatten().cpu()


def support_scores(selected: torch.Tensor, true_support: torch.Tensor) -> dict[str, float | None]:
    s_hat = set(selected.tolist())
    s_true = set(true_support.tolist())
    hit = len(s_hat & s_true)
    tdr = hit / len(s_hat) if s_hat else None
    recall = hit / len(s_true) if s_true else None
    f1 = 2 * tdr * recall / (tdr + recall) if tdr and recall else 0.0
    return {"tdr": tdr, "recall": recall, "f1": f1}


def top_m_mask(gated: dict[str, torch.Tensor], m: int) -> dict[str, torch.Tensor]:
    """Global top-m by magnitude across all gated tensors (ties broken by position)."""
    flat = torch.cat([t.reshape(-1).abs() for t in gated.values()])
    keep = torch.zeros_like(flat, dtype=torch.bool)
    if m > 0:
        keep[torch.topk(flat, min(m, flat.numel())).indices] = True
    out, start = {}, 0
    for name, t in gated.items():
        out[name] = keep[start:start + t.numel()].reshape(t.shape)
        start += t.numel()
    return out
