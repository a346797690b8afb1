"""CIFAR-form MobileNetV1 (Howard et al. 2017) and MobileNetV2 (Sandler et al. 2018).

Layouts follow kuangliu/pytorch-cifar: stride-1 3x3 stem, CIFAR strides, global average pool and a
Linear classifier named ``linear``. MobileNetV2 uses ReLU (not ReLU6), as kuangliu does.
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import conv_bn
from .registry import register_model

# Output width, or (width, stride), of each depthwise-separable block.
V1_CFG: list[int | tuple[int, int]] = [64, (128, 2), 128, (256, 2), 256, (512, 2), 512, 512, 512,
                                      512, 512, (1024, 2), 1024]

# (expansion, out_planes, num_blocks, stride) of each inverted-residual stage; the stride of the
# second stage is 1 instead of ImageNet's 2, for 32x32 inputs.
V2_CFG: list[tuple[int, int, int, int]] = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2),
                                           (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                                           (6, 320, 1, 1)]


class _Classifier(nn.Module):
    """Features, global average pool, then the Linear ``linear``."""

    def __init__(self, features: nn.Sequential, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.flatten(self.pool(self.features(x)), 1))


@register_model("mobilenet_v1")
class MobileNetV1(_Classifier):
    """32-channel stem, then 3x3 depthwise + 1x1 pointwise blocks (each conv with BN + ReLU)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        layers: list[nn.Module] = [conv_bn(in_channels, 32, 3, relu=True)]
        in_planes = 32
        for entry in V1_CFG:
            out_planes, stride = entry if isinstance(entry, tuple) else (entry, 1)
            layers += [conv_bn(in_planes, in_planes, 3, stride, groups=in_planes, relu=True),
                       conv_bn(in_planes, out_planes, 1, relu=True)]
            in_planes = out_planes
        super().__init__(nn.Sequential(*layers), in_planes, num_classes)


class InvertedResidual(nn.Module):
    """1x1 expand, 3x3 depthwise (strided), linear 1x1 project; residual when stride is 1.

    As in kuangliu, a stride-1 block that changes width gets a 1x1-conv+BN projection shortcut.
    """

    def __init__(self, in_planes: int, out_planes: int, expansion: int, stride: int) -> None:
        super().__init__()
        planes = expansion * in_planes
        self.residual = nn.Sequential(conv_bn(in_planes, planes, 1, relu=True),
                                      conv_bn(planes, planes, 3, stride, groups=planes, relu=True),
                                      conv_bn(planes, out_planes, 1))
        self.shortcut: nn.Module | None = None
        if stride == 1:
            self.shortcut = (nn.Identity() if in_planes == out_planes
                             else conv_bn(in_planes, out_planes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.residual(x)
        return out if self.shortcut is None else out + self.shortcut(x)


@register_model("mobilenet_v2")
class MobileNetV2(_Classifier):
    """32-channel stem, inverted-residual stages of ``V2_CFG``, 1x1 conv to 1280 channels."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        layers: list[nn.Module] = [conv_bn(in_channels, 32, 3, relu=True)]
        in_planes = 32
        for expansion, out_planes, num_blocks, stride in V2_CFG:
            for block_stride in [stride] + [1] * (num_blocks - 1):
                layers.append(InvertedResidual(in_planes, out_planes, expansion, block_stride))
                in_planes = out_planes
        layers.append(conv_bn(in_planes, 1280, 1, relu=True))
        super().__init__(nn.Sequential(*layers), 1280, num_classes)
