"""Small models: the dense predecessor's MLP and a compact CNN with a dense hidden layer."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """Flatten, then ``hidden`` ReLU layers, then a linear classifier (the FSE 2020 paper's models: 49 units)."""

    def __init__(self, in_features: int, num_classes: int, hidden: tuple[int, ...] = (49,)) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=False)]
            width = h
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class SmallCNN(nn.Module):
    """conv(16)-ReLU-maxpool, conv(32)-ReLU-maxpool, flatten, dense(hidden)-ReLU, linear classifier."""

    def __init__(self, in_channels: int, num_classes: int, height: int, width: int, hidden: int = 64,
                 bn: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=not bn)
        self.bn1 = nn.BatchNorm2d(16) if bn else nn.Identity()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=not bn)
        self.bn2 = nn.BatchNorm2d(32) if bn else nn.Identity()
        self.pool2 = nn.MaxPool2d(2)
        self.relu = nn.ReLU(inplace=False)
        self.fc1 = nn.Linear(32 * (height // 4) * (width // 4), hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu(self.bn1(self.conv1(x))))
        x = self.pool2(self.relu(self.bn2(self.conv2(x))))
        return self.fc2(self.relu(self.fc1(torch.flatten(x, 1))))
