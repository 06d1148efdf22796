"""Build models by name: ``build("resnet20", input_shape=(1, 28, 28), num_classes=10, bn=False)``."""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from .imagenet import VGG16BN, DenseNet121, MobileNetV2, ResNet50
from .reference import REGISTERED, call, callable_for, check_output, complete_args, is_reference
from .resnet import CifarResNet, ResNet
from .small import MLP, SmallCNN
from .transformers import CONVNEXT, VIT, ConvNeXt, VisionTransformer
from .vgg import VGG

Shape = tuple[int, int, int]


def _resnet_cifar(depth: int):
    def make(input_shape: Shape, num_classes: int, bn: bool = True, width: int = 16) -> nn.Module:
        return CifarResNet(depth, input_shape[0], num_classes, bn=bn, width=width)
    return make


def _resnet(blocks: tuple[int, int, int, int]):
    def make(input_shape: Shape, num_classes: int, bn: bool = True, stem: str = "imagenet") -> nn.Module:
        return ResNet(blocks, input_shape[0], num_classes, bn=bn, stem=stem)
    return make


def _vgg(depth: int):
    def make(input_shape: Shape, num_classes: int, bn: bool = True) -> nn.Module:
        return VGG(depth, input_shape[0], num_classes, bn=bn)
    return make


def _mlp(input_shape: Shape, num_classes: int, hidden: list[int] | tuple[int, ...] = (49,)) -> nn.Module:
    c, h, w = input_shape
    return MLP(c * h * w, num_classes, tuple(int(v) for v in hidden))


def _cnn(input_shape: Shape, num_classes: int, hidden: int = 64, bn: bool = False) -> nn.Module:
    c, h, w = input_shape
    return SmallCNN(c, num_classes, h, w, hidden=hidden, bn=bn)


def _resnet50(input_shape: Shape, num_classes: int) -> nn.Module:
    return ResNet50(input_shape[0], num_classes)


def _mobilenet_v2(input_shape: Shape, num_classes: int, width_mult: float = 1.0) -> nn.Module:
    return MobileNetV2(input_shape[0], num_classes, float(width_mult))


def _vgg16_bn(input_shape: Shape, num_classes: int) -> nn.Module:
    return VGG16BN(input_shape[0], num_classes)


def _densenet121(input_shape: Shape, num_classes: int) -> nn.Module:
    return DenseNet121(input_shape[0], num_classes)


def _vit(name: str):
    width, heads = VIT[name]

    def make(input_shape: Shape, num_classes: int, patch: int = 16, depth: int = 12, dim: int = width,
             heads: int = heads) -> nn.Module:
        c, h, w = input_shape
        if h % patch or w % patch:
            raise UserError(f"{name} cuts {h}x{w} images into {patch}x{patch} patches: give patch=N with N dividing "
                            "both sides (--arch-arg patch=4 for 28x28)")
        if dim % heads:
            raise UserError(f"{name}'s width {dim} does not split into {heads} heads; give dim and heads with dim "
                            "a multiple of heads")
        return VisionTransformer(input_shape, num_classes, dim, depth, heads, patch)
    return make


def _convnext(name: str):
    depths, dims, conv_mlp = CONVNEXT[name]

    def make(input_shape: Shape, num_classes: int, patch: int = 4) -> nn.Module:
        side = min(input_shape[1:]) // patch // 8
        if side < 1:
            raise UserError(f"{name} halves its {patch}x{patch} stem's output three times: a "
                            f"{input_shape[1]}x{input_shape[2]} image is too small for patch={patch} (give "
                            f"--arch-arg patch=2 for 28x28)")
        return ConvNeXt(input_shape[0], num_classes, depths, dims, conv_mlp, patch)
    return make


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "resnet20": _resnet_cifar(20), "resnet32": _resnet_cifar(32), "resnet56": _resnet_cifar(56),
    "resnet18": _resnet((2, 2, 2, 2)), "resnet34": _resnet((3, 4, 6, 3)),
    "vgg11": _vgg(11), "vgg16": _vgg(16), "mlp": _mlp, "cnn": _cnn,
    # torchvision's layouts: its checkpoints load as they are
    "resnet50": _resnet50, "mobilenet_v2": _mobilenet_v2, "vgg16_bn": _vgg16_bn, "densenet121": _densenet121,
    # timm's layouts: its checkpoints load as they are
    **{name: _vit(name) for name in VIT}, **{name: _convnext(name) for name in CONVNEXT},
}


def arch_options(name: str) -> list[str]:
    """The keyword arguments an architecture accepts besides input shape and class count."""
    return [p for p in inspect.signature(ARCHITECTURES[name]).parameters if p not in ("input_shape", "num_classes")]


def resolve_arch(name: str, args: dict, input_shape: Shape, num_classes: int) -> tuple[str, dict]:
    """What a new model records of its architecture: a zoo name as given; a registered name or a reference as
    the reference, with ``num_classes`` and ``in_channels`` filled in where the callable takes them."""
    if name in ARCHITECTURES:
        return name, dict(args)
    if name not in REGISTERED and not is_reference(name):
        module, _, attr = name.rpartition(".")
        hint = f" (did you mean {module}:{attr}?)" if module else ""
        raise UserError(f"unknown architecture {name!r}{hint}; known: {', '.join(sorted(ARCHITECTURES))}, a name "
                        "registered with @cnnmod.register_arch, or a reference package.module:callable")
    fn, ref = callable_for(name)
    return ref, complete_args(fn, args, num_classes, input_shape[0])


def create(name: str, args: dict, input_shape: Shape, num_classes: int) -> tuple[str, dict, nn.Module]:
    """A new model's network with what its artifact records (:func:`resolve_arch`), checked on one image of its
    input: a size the architecture cannot take is one line, not a traceback from deep inside it."""
    recorded, recorded_args = resolve_arch(name, args, input_shape, num_classes)
    net = build(recorded, input_shape, num_classes, **recorded_args)
    check_output(net, recorded, tuple(input_shape), num_classes)
    return recorded, recorded_args, net


def build(name: str, input_shape: Shape, num_classes: int, /, **kwargs) -> nn.Module:
    """A network: a zoo name with its options, or (as :func:`resolve_arch` records it) a reference called with
    exactly ``kwargs``, its output checked to be (N, num_classes)."""
    if name not in ARCHITECTURES and (name in REGISTERED or is_reference(name)):
        fn, ref = callable_for(name)
        net = call(fn, ref, kwargs)
        check_output(net, ref, tuple(input_shape), num_classes)
        return net
    if name not in ARCHITECTURES:
        raise UserError(f"unknown architecture {name!r}; known: {', '.join(sorted(ARCHITECTURES))}, a name "
                        "registered with @cnnmod.register_arch, or a reference package.module:callable")
    allowed = arch_options(name)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise UserError(f"{name} takes no option {', '.join(unknown)}; it takes {', '.join(allowed) or 'none'}")
    if num_classes < 2:
        raise UserError(f"a classifier needs at least 2 classes, got {num_classes}")
    return ARCHITECTURES[name](tuple(input_shape), num_classes, **kwargs)


def load_weights(net: nn.Module, tensors: dict[str, torch.Tensor], arch: str, source: Path | str) -> None:
    """Load a state dict strictly; a mismatch is a user error naming what does not fit."""
    # the prefixes DataParallel ("module.") and torch.compile ("_orig_mod.") put before every name
    tensors = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in tensors.items()}
    expected = net.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [k for k in expected if k in tensors and tuple(expected[k].shape) != tuple(tensors[k].shape)]  # in
    # the network's order: the first that does not fit is the first layer to check
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}")
        if wrong:
            k = wrong[0]
            parts.append(f"{k} is {tuple(tensors[k].shape)} but {arch} needs {tuple(expected[k].shape)}")
        raise UserError(f"the weights in {source} are not a {arch} for this input and class count "
                        f"({'; '.join(parts)}); check --arch, --data and the architecture options")
    loadable = OrderedDict(tensors)  # with the layers' versions of the code that built ``net`` (a plain dict
    if hasattr(expected, "_metadata"):  # has none: torchvision's MNASNet refuses weights of no version)
        loadable._metadata = expected._metadata
    net.load_state_dict(loadable, strict=True)
