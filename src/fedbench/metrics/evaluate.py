"""Evaluation of a (global) model on a labelled set, in chunks, without gradients."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call

from fedbench.engine.functional import per_sample_loss


def multilabel_counts(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[..., 3]: true positives, false positives, false negatives of the decisions logit > 0 against
    the 0/1 labels, summed over samples and labels (leading dims of `out` kept: stacked runs)."""
    pred, truth = out > 0, y.bool()
    tp = (pred & truth).sum((-2, -1))
    fp = (pred & ~truth).sum((-2, -1))
    fn = (~pred & truth).sum((-2, -1))
    return torch.stack([tp, fp, fn], -1)


def multilabel_scores(counts: list[int], loss_sum: float, n: int, n_labels: int) -> dict[str, float]:
    """micro-F1 over every (sample, label) decision, Hamming accuracy (the share of right decisions)
    and the mean loss per sample (its logistic losses summed over labels)."""
    tp, fp, fn = counts
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
    return {"f1": f1, "hamming_acc": 1.0 - (fp + fn) / (n * n_labels), "loss": loss_sum / n}


@torch.no_grad()
def evaluate(model: nn.Module, params: dict, buffers: dict, x: torch.Tensor, y: torch.Tensor, task: str,
             batch: int = 2048) -> dict[str, float]:
    was_training = model.training
    model.eval()
    try:
        return evaluate_fn(lambda xb: functional_call(model, (params, buffers), (xb,)), x, y, task, batch)
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate_fn(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, task: str,
                batch: int = 2048) -> dict[str, float]:
    """Accuracy/loss (or MSE/R^2) of any `forward(x) -> outputs` on a labelled set."""
    total_loss, correct, n = 0.0, 0, len(y)
    counts = torch.zeros(3, dtype=torch.long)
    for i in range(0, n, batch):
        out = forward(x[i:i + batch]).float()
        yb = y[i:i + batch]
        total_loss += float(per_sample_loss(out, yb, task).sum())
        if task == "classification":
            correct += int((out.argmax(-1) == yb).sum())
        if task == "multilabel":
            counts += multilabel_counts(out, yb).cpu()
    if n == 0:
        return {}
    if task == "multilabel":
        return multilabel_scores(counts.tolist(), total_loss, n, int(y.shape[-1]))
    if task == "regression":
        mse = total_loss / n
        var = float(((y - y.mean()) ** 2).mean())
        return {"mse": mse, "r2": 1.0 - mse / var if var > 0 else float("nan"), "loss": mse}
    return {"acc": correct / n, "loss": total_loss / n}
