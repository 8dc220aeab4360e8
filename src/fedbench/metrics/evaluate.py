"""Evaluation of a (global) model on a labelled set, in chunks, without gradients."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call

from fedbench.engine.functional import per_sample_loss


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
    for i in range(0, n, batch):
        out = forward(x[i:i + batch]).float()
        yb = y[i:i + batch]
        total_loss += float(per_sample_loss(out, yb, task).sum())
        if task == "classification":
            correct += int((out.argmax(-1) == yb).sum())
    if n == 0:
        return {}
    if task == "regression":
        mse = total_loss / n
        var = float(((y - y.mean()) ** 2).mean())
        return {"mse": mse, "r2": 1.0 - mse / var if var > 0 else float("nan"), "loss": mse}
    return {"acc": correct / n, "loss": total_loss / n}
