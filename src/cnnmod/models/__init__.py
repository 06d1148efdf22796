"""The model zoo: CIFAR ResNets, torchvision-compatible ResNet-18/34, VGG, MLP and a small CNN."""

from .registry import ARCHITECTURES, arch_options, build

__all__ = ["ARCHITECTURES", "arch_options", "build"]
