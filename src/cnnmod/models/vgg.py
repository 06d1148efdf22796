"""CIFAR-style VGG-11/16: 3x3 convolutions (BatchNorm optional), five 2x2 max pools (ceil mode, so 28x28
inputs work too), global average pooling and one linear classifier."""

from __future__ import annotations

import torch
from torch import nn

CONFIGS = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class VGG(nn.Module):
    def __init__(self, depth: int, in_channels: int = 3, num_classes: int = 10, bn: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in CONFIGS[depth]:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            else:
                layers.append(nn.Conv2d(channels, int(item), 3, padding=1, bias=not bn))
                if bn:
                    layers.append(nn.BatchNorm2d(int(item)))
                layers.append(nn.ReLU(inplace=False))
                channels = int(item)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))
