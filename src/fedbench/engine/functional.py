"""The model as a pure function of (params, buffers), and small pytree helpers."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

Tree = Any
LossFn = Callable[[dict, dict, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, tuple]]


def plain_eager() -> bool:
    """True outside functorch transforms (vmap) and torch.compile: code may then use autograd and
    update tensors it owns in place (the sequential executor); under them it must stay functional."""
    # is_compiling() first: under torch.compile it folds to True and the functorch query is never traced
    return not torch.compiler.is_compiling() and torch._C._functorch.maybe_current_level() is None


def grad(f: Callable[..., Any], argnums: int | tuple[int, ...] = 0, has_aux: bool = False) -> Callable[..., Any]:
    """`torch.func.grad` with its signature and results. Under a functorch transform (the batched
    executor's vmap) or torch.compile it IS torch.func.grad; in plain eager code (the sequential
    executor) the same gradients come from torch.autograd.grad, without functorch's per-call overhead
    (about 15% of a small CNN's step on a CPU). Arguments not differentiated stay constants either way."""
    transformed = torch.func.grad(f, argnums=argnums, has_aux=has_aux)

    def eager(*args: Any) -> Any:
        if not plain_eager():
            return transformed(*args)
        which = (argnums,) if isinstance(argnums, int) else tuple(argnums)
        args = list(args)
        flats = []
        for i in which:
            leaves, spec = tree_flatten(args[i])
            leaves = [t.detach().requires_grad_(True) for t in leaves]
            args[i] = tree_unflatten(leaves, spec)
            flats.append((leaves, spec))
        with torch.enable_grad():
            out = f(*args)
        loss, aux = out if has_aux else (out, None)
        every = [t for leaves, _ in flats for t in leaves]
        found = torch.autograd.grad(loss, every, allow_unused=True)
        found = [torch.zeros_like(t) if g is None else g for t, g in zip(every, found, strict=True)]
        grads, at = [], 0
        for leaves, spec in flats:
            grads.append(tree_unflatten(found[at:at + len(leaves)], spec))
            at += len(leaves)
        result = grads[0] if isinstance(argnums, int) else tuple(grads)
        if not has_aux:
            return result
        return result, tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, aux)

    return eager


def split_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    return params, buffers


def per_sample_loss(out: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    if task == "regression":
        return (out.reshape(y.shape) - y) ** 2
    if task == "multilabel":  # one logistic loss per label, summed: a sparse logistic model per label
        out = out.float() if out.dtype == torch.bfloat16 else out
        return F.binary_cross_entropy_with_logits(out, y.to(out.dtype), reduction="none").sum(-1)
    return F.cross_entropy(out.float() if out.dtype == torch.bfloat16 else out, y, reduction="none")


def _norm_input_in_float32(module: nn.Module, args: tuple) -> tuple | None:
    x = args[0]
    return (x.float(), *args[1:]) if x.dtype in (torch.bfloat16, torch.float16) else None


def norms_in_float32(model: nn.Module) -> None:
    """Mixed precision keeps normalisation in float32: every BatchNorm gets its input cast up (its
    weights and running statistics are float32 master copies). Besides being the usual recipe, this is
    what makes BatchNorm run under vmap at all: its batching rule refuses a bfloat16 input with float32
    statistics ("expected scalar type BFloat16 but found Float"). Idempotent."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m not in _FLOAT32_NORMS:
            m.register_forward_pre_hook(_norm_input_in_float32)
            _FLOAT32_NORMS.add(m)


_FLOAT32_NORMS: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def make_loss_fn(model: nn.Module, task: str, autocast_dtype: torch.dtype | None = None) -> LossFn:
    """loss(params, buffers, x, y, w) -> (weighted mean loss, (loss, updated buffers)).

    `w` weights every sample (0 for padding), so short batches are exact. Buffers (BatchNorm running
    statistics) are cloned before the call because train-mode BatchNorm updates them in place. With
    `autocast_dtype` (bfloat16) the forward pass runs under autocast over float32 parameters, BatchNorm
    in float32 (`norms_in_float32`).
    """
    if autocast_dtype is not None:
        norms_in_float32(model)

    def loss_fn(params: dict, buffers: dict, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor):
        bufs = {k: v.clone() for k, v in buffers.items()}
        if autocast_dtype is not None:
            with torch.autocast(x.device.type, dtype=autocast_dtype):
                out = functional_call(model, (params, bufs), (x,))
        else:
            out = functional_call(model, (params, bufs), (x,))
        per = per_sample_loss(out, y, task).to(w.dtype)
        loss = (per * w).sum() / w.sum().clamp_min(1.0)
        return loss, (loss.detach(), bufs)

    return loss_fn


def tree_where(mask: torch.Tensor, new: Tree, old: Tree) -> Tree:
    """Per-row select: mask [K] (or [R, K]: runs x clients) picks `new` where True, else `old` (both
    stacked [K, ...] or [R, K, ...])."""

    def pick(n: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        return torch.where(mask.view(*mask.shape, *([1] * (n.dim() - mask.dim()))), n, o)

    return tree_map(pick, new, old)


def weighted_mean(stacked: Tree, weights: torch.Tensor) -> Tree:
    """Weighted mean over the leading client dim; weights need not be normalised."""
    return mean_share(stacked, weights, weights.sum(), first=True)


def mean_share(stacked: Tree, weights: torch.Tensor, total: torch.Tensor, first: bool) -> Tree:
    """One shard's additive share of a weighted mean over the whole cohort: sum_k (w_k / total) x_k over
    the shard's clients, so the shares of disjoint shards sum to the mean. Non-float leaves (counters) are
    taken from the cohort's first client: the shard holding it (`first`) carries them, the others 0."""
    w = weights / total

    def share(t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point():
            return t[0] if first else t.new_zeros(t.shape[1:])
        # a GEMV over the client dim: one pass, no [K, ...] temporary
        return torch.tensordot(w.to(t.dtype), t, dims=1)

    return tree_map(share, stacked)


def tree_stack(trees: list[Tree]) -> Tree:
    from torch.utils._pytree import tree_flatten, tree_unflatten

    flats = [tree_flatten(t) for t in trees]
    spec = flats[0][1]
    leaves = [torch.stack([f[0][i] for f in flats]) for i in range(len(flats[0][0]))]
    return tree_unflatten(leaves, spec)


def tree_index(tree: Tree, i: int | slice | torch.Tensor) -> Tree:
    return tree_map(lambda t: t[i], tree)


def tree_assign(dst: Tree, index: torch.Tensor, src: Tree) -> None:
    """dst[leaf][index] = src[leaf] for every leaf, in place (client state rows of the cohort)."""
    from torch.utils._pytree import tree_leaves

    for d, s in zip(tree_leaves(dst), tree_leaves(src), strict=True):
        d[index] = s


def tree_is_empty(tree: Tree) -> bool:
    from torch.utils._pytree import tree_leaves

    return not tree_leaves(tree)


def tree_cat(trees: list[Tree]) -> Tree:
    from torch.utils._pytree import tree_flatten, tree_unflatten

    flats = [tree_flatten(t) for t in trees]
    leaves = [torch.cat([f[0][i] for f in flats]) for i in range(len(flats[0][0]))]
    return tree_unflatten(leaves, flats[0][1])
