"""ResNets: the CIFAR-style v1 family (ResNet-20/32/56) and the ImageNet-style ResNet-18/34.

CIFAR ResNets (He et al. 2016, section 4.2): a 3x3 stem of 16 channels, three stages of 16/32/64 channels
with n basic blocks each (n = 3, 5, 9), global average pooling and a linear classifier. Where a block
changes shape the shortcut is a 1x1 convolution (with BatchNorm when the model has it), the Keras
ResNet v1 example the paper used. ``bn=False`` gives the paper's BatchNorm-free models (convolutions then
carry biases).

ResNet-18/34 use torchvision's layer names (conv1, bn1, layer1..4, downsample.0/1, fc), so a torchvision
state dict loads. ``stem="cifar"`` swaps the 7x7/2 stem and max pool for a 3x3/1 stem, for small images.
"""

from __future__ import annotations

import torch
from torch import nn


def _norm(channels: int, bn: bool) -> nn.Module:
    return nn.BatchNorm2d(channels) if bn else nn.Identity()


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, bn: bool = True,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=not bn)
        self.bn1 = _norm(planes, bn)
        self.relu = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=not bn)
        self.bn2 = _norm(planes, bn)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


def _downsample(in_planes: int, planes: int, stride: int, bn: bool) -> nn.Module | None:
    if stride == 1 and in_planes == planes:
        return None
    layers = [nn.Conv2d(in_planes, planes, 1, stride, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm2d(planes))
    return nn.Sequential(*layers)


def _stage(in_planes: int, planes: int, blocks: int, stride: int, bn: bool) -> nn.Sequential:
    layers = [BasicBlock(in_planes, planes, stride, bn, _downsample(in_planes, planes, stride, bn))]
    layers += [BasicBlock(planes, planes, 1, bn) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class CifarResNet(nn.Module):
    def __init__(self, depth: int, in_channels: int = 3, num_classes: int = 10, bn: bool = True,
                 width: int = 16) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=not bn)
        self.bn1 = _norm(width, bn)
        self.relu = nn.ReLU(inplace=False)
        self.layer1 = _stage(width, width, n, 1, bn)
        self.layer2 = _stage(width, 2 * width, n, 2, bn)
        self.layer3 = _stage(2 * width, 4 * width, n, 2, bn)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ResNet(nn.Module):
    """torchvision-compatible ResNet with basic blocks (ResNet-18/34)."""

    def __init__(self, blocks: tuple[int, int, int, int], in_channels: int = 3, num_classes: int = 1000,
                 bn: bool = True, stem: str = "imagenet") -> None:
        super().__init__()
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, 2, 1)
        elif stem == "cifar":
            self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        else:
            raise ValueError(f"stem must be 'imagenet' or 'cifar', not {stem!r}")
        self.bn1 = _norm(64, bn)
        self.relu = nn.ReLU(inplace=False)
        self.layer1 = _stage(64, 64, blocks[0], 1, bn)
        self.layer2 = _stage(64, 128, blocks[1], 2, bn)
        self.layer3 = _stage(128, 256, blocks[2], 2, bn)
        self.layer4 = _stage(256, 512, blocks[3], 2, bn)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _init(model: nn.Module) -> None:
    """He initialisation; without BatchNorm, Fixup's scaling (Zhang et al. 2019) keeps deep ResNets trainable:
    each residual branch's last convolution is scaled by L^-1/2 (L blocks) and the classifier starts at zero.
    Plain He initialisation makes a BatchNorm-free ResNet-56 diverge at the first steps."""
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out" if has_bn else "fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if not has_bn and blocks:
        with torch.no_grad():
            for b in blocks:
                b.conv2.weight.mul_(len(blocks) ** -0.5)
            nn.init.zeros_(model.fc.weight)
            nn.init.zeros_(model.fc.bias)
