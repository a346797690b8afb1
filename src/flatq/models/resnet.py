"""CIFAR-form ResNets (He et al. 2016) with the layout of kuangliu/pytorch-cifar.

3x3 stride-1 stem without max-pool, BasicBlock/Bottleneck stages with 1x1-conv+BN projection
shortcuts, global average pool and a Linear classifier named ``linear``. PyTorch default init.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .blocks import conv_bn
from .registry import register_model


class _ResidualBlock(nn.Module):
    """Residual branch plus identity or 1x1-conv+BN projection shortcut, then ReLU."""

    def __init__(self, residual: nn.Sequential, in_planes: int, out_planes: int,
                 stride: int) -> None:
        super().__init__()
        self.residual = residual
        if stride != 1 or in_planes != out_planes:
            self.shortcut: nn.Module = conv_bn(in_planes, out_planes, 1, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.residual(x) + self.shortcut(x))


class BasicBlock(_ResidualBlock):
    """Two 3x3 convs (the first strided)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        residual = nn.Sequential(conv_bn(in_planes, planes, 3, stride, relu=True),
                                 conv_bn(planes, planes, 3))
        super().__init__(residual, in_planes, planes * self.expansion, stride)


class Bottleneck(_ResidualBlock):
    """1x1 reduce, strided 3x3, 1x1 expand by ``expansion``."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        residual = nn.Sequential(conv_bn(in_planes, planes, 1, relu=True),
                                 conv_bn(planes, planes, 3, stride, relu=True),
                                 conv_bn(planes, planes * self.expansion, 1))
        super().__init__(residual, in_planes, planes * self.expansion, stride)


class ResNet(nn.Module):
    """Stem, a stage per entry of ``num_blocks``/``widths``/``strides``, avg pool, ``linear``."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], num_blocks: Sequence[int],
                 widths: Sequence[int] = (64, 128, 256, 512), strides: Sequence[int] = (1, 2, 2, 2),
                 num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if not len(num_blocks) == len(widths) == len(strides):
            raise ValueError("num_blocks, widths and strides must have the same length")
        self.stem = conv_bn(in_channels, widths[0], 3, relu=True)
        stages: list[nn.Module] = []
        in_planes = widths[0]
        for blocks, planes, stride in zip(num_blocks, widths, strides):
            layers = []
            for block_stride in [stride] + [1] * (blocks - 1):
                layers.append(block(in_planes, planes, block_stride))
                in_planes = planes * block.expansion
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stages(self.stem(x)))
        return self.linear(torch.flatten(x, 1))


@register_model("resnet8")
def resnet8(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """Three one-BasicBlock stages of width 16/32/64 (about 78k parameters) for quick CPU runs."""
    return ResNet(BasicBlock, [1, 1, 1], widths=(16, 32, 64), strides=(1, 2, 2),
                  num_classes=num_classes, in_channels=in_channels)


@register_model("resnet18")
def resnet18(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """ResNet-18: BasicBlock stages [2, 2, 2, 2] of width 64..512."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, in_channels=in_channels)


@register_model("resnet50")
def resnet50(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """ResNet-50: Bottleneck stages [3, 4, 6, 3] of width 64..512, expanded 4x."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, in_channels=in_channels)
