"""Small backbones for federated simulation. All are `Split(body, head)`; no in-place activations
so the same module works under torch.func transforms."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedbench.config import GroupConfig, spec, typed_choice
from fedbench.errors import ConfigError
from fedbench.registry import lookup, register

# ---- typed configs (the keys of conf/backbone/*.yaml, checked before any work) -----------------

@dataclass(frozen=True)
class BackboneConfig(GroupConfig):
    name: str = ""
    input: str = spec("any", choices=("image", "any"))   # the inputs this backbone takes
    norm: str = spec("none", choices=("none",))          # no normalisation layers to choose


@dataclass(frozen=True)
class ImageBackboneConfig(BackboneConfig):
    input: str = spec("image", choices=("image",))


@dataclass(frozen=True)
class MLPConfig(BackboneConfig):
    hidden: tuple[int, ...] = spec((200, 200), ge=1)     # widths of the hidden layers


@dataclass(frozen=True)
class PacCNNConfig(GroupConfig):
    name: str = ""
    input: str = spec("image", choices=("image",))
    third_conv: bool | None = None   # null: a third conv block for colour images (CifarCNN)


RESNET_WIDTH = 64  # channels of the first stage: GroupNorm groups must divide it (and so every stage)


@dataclass(frozen=True)
class ResNetConfig(ImageBackboneConfig):
    norm: str = spec("group", choices=("group", "batch", "none"))
    groups: int = spec(2, ge=1, le=RESNET_WIDTH)
    width: int = spec(RESNET_WIDTH, ge=1)   # channels of the first stage (doubling per stage)

    def __post_init__(self) -> None:
        if self.width % self.groups:
            allowed = [g for g in range(1, self.width + 1) if self.width % g == 0]
            raise ConfigError(f"backbone.groups={self.groups}: must divide backbone.width={self.width} (the "
                              f"channels of the first stage); allowed: {', '.join(map(str, allowed))}")


class Split(nn.Module):
    """A model as a feature extractor (`body`) followed by a classifier (`head`)."""

    def __init__(self, body: nn.Module, head: nn.Module):
        super().__init__()
        self.body = body
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _feature_dim(body: nn.Module, input_shape: tuple[int, ...]) -> int:
    with torch.no_grad():
        return int(body(torch.zeros(1, *input_shape)).shape[-1])


@register("backbone", "logreg", config=BackboneConfig)
def logreg(cfg: Any, input_shape: tuple[int, ...], num_classes: int) -> Split:
    return Split(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))


@register("backbone", "mlp", config=MLPConfig)
def mlp(cfg: Any, input_shape: tuple[int, ...], num_classes: int) -> Split:
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for h in cfg.hidden:
        layers += [nn.Linear(width, int(h)), nn.ReLU()]
        width = int(h)
    return Split(nn.Sequential(*layers), nn.Linear(width, num_classes))


def _pool_if_large(size: int) -> nn.Module:
    # tiny inputs (8x8 digits) cannot be pooled twice to a useful size
    return nn.MaxPool2d(2) if size >= 4 else nn.Identity()


@register("backbone", "cnn", config=ImageBackboneConfig)
def cnn(cfg: Any, input_shape: tuple[int, ...], num_classes: int) -> Split:
    """The CNN of McMahan et al. 2017 (conv5x5-32, pool, conv5x5-64, pool, fc512, fc)."""
    c, h = input_shape[0], input_shape[-1]
    body = nn.Sequential(
        nn.Conv2d(c, 32, 5, padding=2), nn.ReLU(), _pool_if_large(h),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), _pool_if_large(h // 2),
        nn.Flatten(),
    )
    flat = _feature_dim(body, input_shape)
    body.append(nn.Linear(flat, 512))
    body.append(nn.ReLU())
    return Split(body, nn.Linear(512, num_classes))


@register("backbone", "simple_cnn", config=ImageBackboneConfig)
def simple_cnn(cfg: Any, input_shape: tuple[int, ...], num_classes: int) -> Split:
    """pfl-research's benchmark CNN (`simple_cnn` of its CIFAR-10 benchmark): conv3x3-32, conv3x3-64
    (no padding), pool, fc128, fc; Glorot-uniform weights. pfl's two dropout layers are left out: the
    executors' steps are deterministic functions of the seeded schedule (docs/fidelity.md)."""
    c = input_shape[0]
    body = nn.Sequential(nn.Conv2d(c, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten())
    body.append(nn.Linear(_feature_dim(body, input_shape), 128))
    body.append(nn.ReLU())
    model = Split(body, nn.Linear(128, num_classes))
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
    return model


@register("backbone", "pac_cnn", config=PacCNNConfig)
def pac_cnn(cfg: Any, input_shape: tuple[int, ...], num_classes: int) -> Split:
    """The CNNs of FedPAC's official code (models/cnn.py): conv5x5-16, pool, conv5x5-32 (padding 1), pool,
    [conv3x3-64 (padding 1), pool: colour images, CifarCNN], fc128, leaky ReLU; a linear classifier."""
    c = input_shape[0]
    layers: list[nn.Module] = [nn.Conv2d(c, 16, 5), nn.LeakyReLU(), nn.MaxPool2d(2),
                               nn.Conv2d(16, 32, 5, padding=1), nn.LeakyReLU(), nn.MaxPool2d(2)]
    third = cfg.third_conv
    if third if third is not None else c == 3:
        layers += [nn.Conv2d(32, 64, 3, padding=1), nn.LeakyReLU(), nn.MaxPool2d(2)]
    body = nn.Sequential(*layers, nn.Flatten())
    body.append(nn.Linear(_feature_dim(body, input_shape), 128))
    body.append(nn.LeakyReLU())
    return Split(body, nn.Linear(128, num_classes))


@register("backbone", "lenet5", config=ImageBackboneConfig)
def lenet5(cfg: Any, input_shape: tuple[int, ...], num_classes: int) -> Split:
    c, h = input_shape[0], input_shape[-1]
    body = nn.Sequential(
        nn.Conv2d(c, 6, 5, padding=2), nn.ReLU(), _pool_if_large(h),
        # small inputs (8x8 digits) keep their size through the second conv
        nn.Conv2d(6, 16, 5, padding=0 if h // 2 >= 10 else 2), nn.ReLU(), _pool_if_large(4),
        nn.Flatten(),
    )
    flat = _feature_dim(body, input_shape)
    body.append(nn.Linear(flat, 120))
    body.append(nn.ReLU())
    body.append(nn.Linear(120, 84))
    body.append(nn.ReLU())
    return Split(body, nn.Linear(84, num_classes))


def _norm(kind: str, channels: int, groups: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(groups, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ConfigError(f"backbone.norm={kind!r} is unknown; allowed: batch, group, none")


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: str, groups: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.n1 = _norm(norm, cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.n2 = _norm(norm, cout, groups)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _norm(norm, cout, groups))
        # activations are modules so FedSQ can turn them into gates (the second one sees the sum)
        self.act1 = nn.ReLU()
        self.act2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.n1(self.conv1(x)))
        out = self.n2(self.conv2(out))
        return self.act2(out + self.short(x))


@register("backbone", "resnet18", config=ResNetConfig)
def resnet18(cfg: Any, input_shape: tuple[int, ...], num_classes: int) -> Split:
    """ResNet-18 with a 3x3 stride-1 stem (CIFAR-style); BatchNorm or GroupNorm."""
    norm, groups, w = cfg.norm, cfg.groups, cfg.width
    layers: list[nn.Module] = [nn.Conv2d(input_shape[0], w, 3, 1, 1, bias=False), _norm(norm, w, groups),
                               nn.ReLU()]
    cin = w
    for cout, stride in [(w, 1), (2 * w, 2), (4 * w, 2), (8 * w, 2)]:
        layers += [BasicBlock(cin, cout, stride, norm, groups), BasicBlock(cout, cout, 1, norm, groups)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return Split(nn.Sequential(*layers), nn.Linear(8 * w, num_classes))


def build_model(cfg: Any, input_shape: tuple[int, ...], num_classes: int) -> Split:
    import fedbench.models.pretrained  # noqa: F401  (registers the pretrained backbones)

    builder = lookup("backbone", str(cfg.name))
    return builder(typed_choice("backbone", cfg), input_shape, num_classes)
