"""Building blocks shared by the convolutional models: a bias-free conv followed by BatchNorm."""

from __future__ import annotations

from torch import nn


def conv_bn(in_planes: int, out_planes: int, kernel_size: int, stride: int = 1, groups: int = 1,
            relu: bool = False) -> nn.Sequential:
    """``kernel_size`` conv ("same" padding, no bias) + BatchNorm, optionally followed by ReLU."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_planes, out_planes, kernel_size, stride=stride, padding=kernel_size // 2,
                  groups=groups, bias=False),
        nn.BatchNorm2d(out_planes),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)
