"""Small instances of the architecture families users bring, written here in the shape of the public model
libraries' versions (CIFAR model zoos, torchvision), so that every capability is tested and benchmarked on
every family (docs/coverage.md). They are ordinary user code as far as cnnmod is concerned: reach them by
reference, ``--arch families:densenet``, or through :data:`FAMILIES`.

Every factory takes ``in_channels``, ``num_classes`` and ``width`` (the first stage's channels) and returns a
plain ``nn.Module`` whose forward returns (N, num_classes) logits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: type = nn.ReLU):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                         act(inplace=True) if act in (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU) else act())


# ---------------------------------------------------------------------------------------- residual networks
class PreActBlock(nn.Module):
    """BN-ReLU-conv twice; the shortcut a 1x1 convolution of the pre-activated input where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.drop = nn.Dropout(dropout)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x):
        out = F.relu(self.bn1(x))
        short = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.drop(F.relu(self.bn2(out))))
        return out + short


class PreActResNet(nn.Module):
    def __init__(self, in_channels=1, num_classes=10, width=8, blocks=(1, 1, 1), widen=1, dropout=0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        layers, cin = [], width
        for i, n in enumerate(blocks):
            cout = width * widen * 2 ** i
            for j in range(n):
                layers.append(PreActBlock(cin, cout, 2 if i > 0 and j == 0 else 1, dropout))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = F.relu(self.bn(self.layers(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def preact_resnet(in_channels=1, num_classes=10, width=8):
    return PreActResNet(in_channels, num_classes, width)


def wrn(in_channels=1, num_classes=10, width=8, widen=2, dropout=0.1):
    """Wide ResNet: pre-activation blocks, ``widen`` times wider, dropout between the convolutions."""
    return PreActResNet(in_channels, num_classes, width, (1, 1, 1), widen, dropout)


class SE(nn.Module):
    """Squeeze-and-excitation: x * sigmoid(fc(relu(fc(mean(x)))))."""

    def __init__(self, c: int, r: int = 4, gate: type = nn.Sigmoid, conv: bool = False) -> None:
        super().__init__()
        hidden = max(c // r, 2)
        self.conv = conv
        if conv:  # as MobileNetV3 and EfficientNet write it
            self.fc1, self.fc2 = nn.Conv2d(c, hidden, 1), nn.Conv2d(hidden, c, 1)
        else:
            self.fc1, self.fc2 = nn.Linear(c, hidden), nn.Linear(hidden, c)
        self.gate = gate()

    def forward(self, x):
        if self.conv:
            return x * self.gate(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        s = x.mean((2, 3))
        s = self.gate(self.fc2(F.relu(self.fc1(s))))
        return x * s.view(s.size(0), s.size(1), 1, 1)


class BasicBlock(nn.Module):
    """The CIFAR ResNet block, optionally with squeeze-and-excitation or an attention mask on its branch."""

    def __init__(self, cin: int, cout: int, stride: int, extra: str = "") -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.se = SE(cout) if extra == "se" else None
        self.mask = nn.Conv2d(cout, cout, 1) if extra == "attention" else None
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if self.se is not None:
            out = self.se(out)
        if self.mask is not None:  # residual attention: (1 + mask) * features
            out = (1 + torch.sigmoid(self.mask(out))) * out
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, in_channels=1, num_classes=10, width=8, extra="", long_shortcuts=False) -> None:
        super().__init__()
        self.stem = _conv_bn(in_channels, width)
        self.stages = nn.ModuleList()
        self.long = nn.ModuleList() if long_shortcuts else None
        cin = width
        for i in range(3):
            cout = width * 2 ** i
            stride = 2 if i > 0 else 1
            self.stages.append(nn.Sequential(BasicBlock(cin, cout, stride, extra), BasicBlock(cout, cout, 1, extra)))
            if self.long is not None:  # residual networks of residual networks: a shortcut over every stage
                self.long.append(nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))
            cin = cout
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.stem(x)
        for i, stage in enumerate(self.stages):
            x = stage(x) + self.long[i](x) if self.long is not None else stage(x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def se_resnet(in_channels=1, num_classes=10, width=8):
    return ResNet(in_channels, num_classes, width, "se")


def attention_resnet(in_channels=1, num_classes=10, width=8):
    return ResNet(in_channels, num_classes, width, "attention")


def ror(in_channels=1, num_classes=10, width=8):
    return ResNet(in_channels, num_classes, width, long_shortcuts=True)


class Bottleneck(nn.Module):
    """ResNeXt's block: 1x1, grouped 3x3, 1x1, with the shortcut added before the last ReLU."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int) -> None:
        super().__init__()
        mid = cout // 2
        self.body = nn.Sequential(_conv_bn(cin, mid, 1), _conv_bn(mid, mid, 3, stride, groups),
                                  nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        return F.relu(self.body(x) + self.shortcut(x))


def resnext(in_channels=1, num_classes=10, width=8, groups=4):
    cin, layers = width, [_conv_bn(in_channels, width)]
    for i in range(3):
        layers.append(Bottleneck(cin, width * 2 ** (i + 1), 2 if i else 1, groups))
        cin = width * 2 ** (i + 1)
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))


class PyramidBlock(nn.Module):
    """PyramidNet's block: BN-conv-BN-ReLU-conv-BN; the shortcut average-pooled where it downsamples and zero-padded
    in its new channels."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
                                  nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                                  nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.stride, self.extra = stride, cout - cin

    def forward(self, x):
        short = F.avg_pool2d(x, 2, ceil_mode=True) if self.stride != 1 else x
        return self.body(x) + F.pad(short, (0, 0, 0, 0, 0, self.extra))


def pyramidnet(in_channels=1, num_classes=10, width=8, alpha=12):
    layers, cin, blocks = [_conv_bn(in_channels, width)], width, 3
    for i in range(blocks):
        cout = width + alpha * (i + 1) // blocks
        layers.append(PyramidBlock(cin, cout, 2 if i else 1))
        cin = cout
    return nn.Sequential(*layers, nn.BatchNorm2d(cin), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(cin, num_classes))


# ---------------------------------------------------------------------------------------- dense and fire
class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.Conv2d(cin, 2 * growth, 1, bias=False),
                                  nn.BatchNorm2d(2 * growth), nn.ReLU(inplace=True),
                                  nn.Conv2d(2 * growth, growth, 3, 1, 1, bias=False))

    def forward(self, x):
        return torch.cat([x, self.body(x)], 1)


def densenet(in_channels=1, num_classes=10, width=8, growth=4, layers=2):
    """DenseNet-BC: dense blocks of concatenated pre-activation layers, transitions that halve the channels."""
    parts, c = [nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)], width
    for i in range(2):
        for _ in range(layers):
            parts.append(DenseLayer(c, growth))
            c += growth
        if i == 0:
            parts += [nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2)]
            c //= 2
    return nn.Sequential(*parts, nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(c, num_classes))


class Fire(nn.Module):
    def __init__(self, cin: int, squeeze: int, expand: int) -> None:
        super().__init__()
        self.squeeze = nn.Sequential(nn.Conv2d(cin, squeeze, 1), nn.ReLU(inplace=True))
        self.e1 = nn.Sequential(nn.Conv2d(squeeze, expand, 1), nn.ReLU(inplace=True))
        self.e3 = nn.Sequential(nn.Conv2d(squeeze, expand, 3, padding=1), nn.ReLU(inplace=True))

    def forward(self, x):
        s = self.squeeze(x)
        return torch.cat([self.e1(s), self.e3(s)], 1)


def squeezenet(in_channels=1, num_classes=10, width=8):
    """SqueezeNet: fire modules; the classifier a 1x1 convolution, ReLU and global average pooling."""
    w = width
    return nn.Sequential(nn.Conv2d(in_channels, 2 * w, 3, 1, 1), nn.ReLU(inplace=True), nn.MaxPool2d(2, ceil_mode=True),
                         Fire(2 * w, w // 2, w), Fire(2 * w, w // 2, w), nn.MaxPool2d(2, ceil_mode=True),
                         Fire(2 * w, w, 2 * w), nn.Dropout(0.2), nn.Conv2d(4 * w, num_classes, 1),
                         nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def nin(in_channels=1, num_classes=10, width=8):
    """Network in network: mlpconv blocks; the last block's 1x1 convolution has a map per class, pooled."""
    def block(cin, cout, k):
        return [nn.Conv2d(cin, cout, k, 1, k // 2), nn.ReLU(inplace=True), nn.Conv2d(cout, cout, 1),
                nn.ReLU(inplace=True)]
    w = 2 * width
    return nn.Sequential(*block(in_channels, w, 3), nn.MaxPool2d(2), *block(w, w, 3), nn.MaxPool2d(2),
                         nn.Conv2d(w, w, 3, 1, 1), nn.ReLU(inplace=True), nn.Conv2d(w, num_classes, 1),
                         nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def linear_pool_head(in_channels=1, num_classes=10, width=8):
    """All convolutions, the classifier a 1x1 convolution followed directly by global average pooling."""
    return nn.Sequential(_conv_bn(in_channels, width), _conv_bn(width, 2 * width, stride=2),
                         nn.Conv2d(2 * width, num_classes, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())


# ---------------------------------------------------------------------------------------- mobile networks
def mobilenet_v1(in_channels=1, num_classes=10, width=8):
    """Depthwise-separable convolutions (depthwise 3x3, pointwise 1x1), ReLU."""
    layers, cin = [_conv_bn(in_channels, width)], width
    for cout, stride in ((2 * width, 2), (2 * width, 1), (4 * width, 2)):
        layers += [_conv_bn(cin, cin, 3, stride, groups=cin), _conv_bn(cin, cout, 1)]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))


class InvertedResidual(nn.Module):
    """MobileNetV2/V3 and MnasNet's block: expand 1x1, depthwise, (SE), project 1x1; a shortcut when shapes match."""

    def __init__(self, cin, cout, stride, expand, act=nn.ReLU6, se=False, gate=nn.Hardsigmoid):
        super().__init__()
        mid = cin * expand
        layers = [_conv_bn(cin, mid, 1, act=act)] if expand != 1 else []
        layers.append(_conv_bn(mid, mid, 3, stride, groups=mid, act=act))
        if se:
            layers.append(SE(mid, gate=gate, conv=True))
        layers += [nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.block(x) if self.residual else self.block(x)


def _mobile(in_channels, num_classes, width, act, se, last_act):
    layers, cin = [_conv_bn(in_channels, width, act=act)], width
    for cout, stride, expand in ((width, 1, 1), (2 * width, 2, 4), (2 * width, 1, 4), (3 * width, 2, 4)):
        layers.append(InvertedResidual(cin, cout, stride, expand, act, se))
        cin = cout
    layers += [_conv_bn(cin, 4 * width, 1, act=last_act), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2),
               nn.Linear(4 * width, num_classes)]
    return nn.Sequential(*layers)


def mobilenet_v2(in_channels=1, num_classes=10, width=8):
    return _mobile(in_channels, num_classes, width, nn.ReLU6, False, nn.ReLU6)


def mnasnet(in_channels=1, num_classes=10, width=8):
    return _mobile(in_channels, num_classes, width, nn.ReLU, False, nn.ReLU)


def mobilenet_v3(in_channels=1, num_classes=10, width=8):
    """Hardswish activations and hard-sigmoid squeeze-and-excitation: not ReLU-family (slim modules only)."""
    return _mobile(in_channels, num_classes, width, nn.Hardswish, True, nn.Hardswish)


def efficientnet(in_channels=1, num_classes=10, width=8):
    """SiLU activations and sigmoid squeeze-and-excitation (EfficientNet's MBConv): slim modules only."""
    return _mobile(in_channels, num_classes, width, nn.SiLU, True, nn.SiLU)


def _shuffle(x, groups: int):
    b, c, h, w = x.size()
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous().view(b, c, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2's unit: split the channels in two (or, downsampling, use both for two branches), concatenate,
    shuffle."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride, half = stride, cout // 2
        if stride > 1:
            self.left = nn.Sequential(_conv_bn(cin, cin, 3, stride, groups=cin, act=nn.Identity),
                                      _conv_bn(cin, half, 1))
        src = cin if stride > 1 else half
        self.right = nn.Sequential(_conv_bn(src, half, 1),
                                   _conv_bn(half, half, 3, stride, groups=half, act=nn.Identity),
                                   _conv_bn(half, half, 1))

    def forward(self, x):
        if self.stride == 1:
            a, b = x.chunk(2, dim=1)
            out = torch.cat((a, self.right(b)), 1)
        else:
            out = torch.cat((self.left(x), self.right(x)), 1)
        return self.shuffle(out)

    def shuffle(self, out):
        return _shuffle(out, 2)


def shufflenet_v2(in_channels=1, num_classes=10, width=8):
    layers, cin = [_conv_bn(in_channels, width)], width
    for cout, stride in ((2 * width, 2), (2 * width, 1), (4 * width, 2), (4 * width, 1)):
        layers.append(ShuffleUnit(cin, cout, stride))
        cin = cout
    return nn.Sequential(*layers, _conv_bn(cin, 4 * width, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4 * width, num_classes))


class Ghost(nn.Module):
    """GhostNet's module: a primary convolution and cheap depthwise "ghost" features, concatenated and cut to
    ``cout`` channels."""

    def __init__(self, cin: int, cout: int, relu: bool = True) -> None:
        super().__init__()
        self.cout, init = cout, (cout + 1) // 2
        act = nn.ReLU if relu else nn.Identity
        self.primary = _conv_bn(cin, init, 1, act=act)
        self.cheap = _conv_bn(init, init, 3, groups=init, act=act)

    def forward(self, x):
        a = self.primary(x)
        return torch.cat([a, self.cheap(a)], 1)[:, :self.cout, :, :]


class GhostBottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, stride: int) -> None:
        super().__init__()
        layers = [Ghost(cin, mid)]
        if stride > 1:
            layers.append(_conv_bn(mid, mid, 3, stride, groups=mid, act=nn.Identity))
        layers += [SE(mid, gate=nn.Hardsigmoid, conv=True), Ghost(mid, cout, relu=False)]
        self.body = nn.Sequential(*layers)
        self.shortcut = (nn.Identity() if stride == 1 and cin == cout else
                         nn.Sequential(_conv_bn(cin, cin, 3, stride, groups=cin, act=nn.Identity),
                                       nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x):
        return self.body(x) + self.shortcut(x)


def ghostnet(in_channels=1, num_classes=10, width=8):
    """GhostNet: ghost bottlenecks with SE; the head a 1x1 convolution and ReLU on pooled features, then Linear."""
    return nn.Sequential(_conv_bn(in_channels, width), GhostBottleneck(width, 2 * width, width, 1),
                         GhostBottleneck(width, 3 * width, 2 * width, 2),
                         GhostBottleneck(2 * width, 4 * width, 3 * width, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Conv2d(3 * width, 4 * width, 1), nn.ReLU(inplace=True),
                         nn.Flatten(), nn.Linear(4 * width, num_classes))


def conv_head(in_channels=1, num_classes=10, width=8):
    """MobileNetV2 with its classifier written as a convolution: pool, then a 1x1 convolution, then flatten."""
    body = list(mobilenet_v2(in_channels, num_classes, width))[:-3]  # up to the pooling
    return nn.Sequential(*body, nn.Conv2d(4 * width, num_classes, 1), nn.Flatten())


def conv_hidden_head(in_channels=1, num_classes=10, width=8):
    """GhostNet with MobileNetV3's kind of head: pool, a 1x1 convolution and ReLU (a hidden dense layer), then a
    1x1 convolution to the classes, then flatten."""
    body = list(ghostnet(in_channels, num_classes, width))[:-5]  # up to the pooling
    return nn.Sequential(*body, nn.AdaptiveAvgPool2d(1), nn.Conv2d(3 * width, 4 * width, 1), nn.ReLU(inplace=True),
                         nn.Conv2d(4 * width, num_classes, 1), nn.Flatten())


class FunctionalNet(nn.Module):
    """A network written with functional ops only between its layers: F.relu, F.max_pool2d, x.mean, view."""

    def __init__(self, in_channels=1, num_classes=10, width=8) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(in_channels, width, 3, padding=1), nn.Conv2d(width, 2 * width, 3, padding=1)
        self.c3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(2 * width, 2 * width), nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = F.relu(self.c2(x))
        x = F.adaptive_avg_pool2d(F.relu(self.c3(x) + x), 2)
        x = x.mean((2, 3), keepdim=True)
        x = x.view(x.size(0), -1)
        return self.fc2(torch.relu(self.fc1(x)))


def functional(in_channels=1, num_classes=10, width=8):
    return FunctionalNet(in_channels, num_classes, width)


# ---------------------------------------------------------------------------------------- transformers
class TimmAttention(nn.Module):
    """Attention as timm and most papers' code write it: one qkv layer reshaped to a fixed head count, the heads
    joined back to the input's width C (so heads cannot be cut inside it: cnnmod converts it)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class HFSelfAttention(nn.Module):
    """Hugging Face's layout: separate query/key/value layers, ``num_attention_heads``, a tuple returned; the
    output projection lives in a sibling module."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.num_attention_heads, self.attention_head_size = heads, dim // heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def split(self, x):
        return x.view(x.shape[0], x.shape[1], self.num_attention_heads, self.attention_head_size).transpose(1, 2)

    def forward(self, hidden_states, head_mask=None):
        q, k, v = self.split(self.query(hidden_states)), self.split(self.key(hidden_states)), \
            self.split(self.value(hidden_states))
        probs = (q @ k.transpose(-1, -2) / self.attention_head_size ** 0.5).softmax(-1)
        context = (probs @ v).transpose(1, 2).reshape(hidden_states.shape[0], hidden_states.shape[1], -1)
        return (context,)


class HFAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attention = HFSelfAttention(dim, heads)
        self.output = nn.Sequential()
        self.output.dense, self.output.dropout = nn.Linear(dim, dim), nn.Dropout(0.0)

    def forward(self, x):
        return self.output(self.attention(x)[0])


class MHAWrapper(nn.Module):
    """``nn.MultiheadAttention`` called on the tokens as query, key and value."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x):
        return self.mha(x, x, x, need_weights=False)[0]


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, attention: str) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = {"timm": TimmAttention, "hf": HFAttention, "mha": MHAWrapper}[attention](dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(0.0), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SmallViT(nn.Module):
    """A user's own small ViT: patch embedding, class token, learned positions, pre-norm blocks, final LayerNorm,
    the class token to a linear head."""

    def __init__(self, in_channels=1, num_classes=10, width=8, attention="timm", patch=4, image=16, depth=2):
        super().__init__()
        dim = 4 * width
        self.patch = nn.Conv2d(in_channels, dim, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.1)
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.1)
        self.blocks = nn.Sequential(*[TransformerBlock(dim, 4, attention) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        return self.fc(self.norm(self.blocks(x))[:, 0])


class DistilledViT(SmallViT):
    """DeiT's distilled ViT as timm writes it: a class token and a distillation token, each with its own linear
    head, the logits their mean (in eval mode)."""

    def __init__(self, in_channels=1, num_classes=10, width=8):
        super().__init__(in_channels, num_classes, width, "timm")
        dim = 4 * width
        self.dist = nn.Parameter(torch.randn(1, 1, dim) * 0.1)
        self.pos = nn.Parameter(torch.randn(1, self.pos.shape[1] + 1, dim) * 0.1)
        self.head_dist = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        b = x.shape[0]
        x = self.norm(self.blocks(torch.cat([self.cls.expand(b, -1, -1), self.dist.expand(b, -1, -1), x], 1)
                                  + self.pos))
        return (self.fc(x[:, 0]) + self.head_dist(x[:, 1])) / 2


class NormLinear(nn.Sequential):
    """LeViT's head: BatchNorm1d, dropout, linear."""

    def __init__(self, dim: int, out: int) -> None:
        super().__init__()
        self.bn, self.drop, self.linear = nn.BatchNorm1d(dim), nn.Dropout(0.0), nn.Linear(dim, out)


class LinearNorm(nn.Module):
    """LeViT's linear layer: a BatchNorm1d over its outputs, the tokens folded into the batch."""

    def __init__(self, dim: int, out: int) -> None:
        super().__init__()
        self.linear, self.bn = nn.Linear(dim, out, bias=False), nn.BatchNorm1d(out)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class LevitLike(nn.Module):
    """LeViT as timm writes it, small: a convolution stem, tokens, residual MLPs of ``LinearNorm`` layers with
    Hardswish, the tokens averaged, two heads (BatchNorm + linear) on the same pooled features, their logits
    averaged."""

    def __init__(self, in_channels=1, num_classes=10, width=8):
        super().__init__()
        dim = 2 * width
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 2, 1), nn.BatchNorm2d(width), nn.Hardswish(),
                                  nn.Conv2d(width, dim, 3, 2, 1), nn.BatchNorm2d(dim), nn.Hardswish())
        self.mlps = nn.ModuleList(nn.Sequential(LinearNorm(dim, 2 * dim), nn.Hardswish(), LinearNorm(2 * dim, dim))
                                  for _ in range(2))
        self.head, self.head_dist = NormLinear(dim, num_classes), NormLinear(dim, num_classes)
        for m in self.modules():  # statistics as trained ones are
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)
        for mlp in self.mlps:
            x = x + mlp(x)
        x = x.mean(1)
        return (self.head(x) + self.head_dist(x)) / 2


def vit_distilled(in_channels=1, num_classes=10, width=8):
    return DistilledViT(in_channels, num_classes, width)


def levit_like(in_channels=1, num_classes=10, width=8):
    return LevitLike(in_channels, num_classes, width)


def vit_timm(in_channels=1, num_classes=10, width=8):
    return SmallViT(in_channels, num_classes, width, "timm")


def vit_hf(in_channels=1, num_classes=10, width=8):
    return SmallViT(in_channels, num_classes, width, "hf")


def vit_mha(in_channels=1, num_classes=10, width=8):
    return SmallViT(in_channels, num_classes, width, "mha")


def convnext(in_channels=1, num_classes=10, width=8):
    """ConvNeXt's blocks (depthwise 7x7, channel LayerNorm, GELU MLP on channels-last tokens, layer scale), two
    stages; the zoo's ConvNeXt class, as timm writes it."""
    from cnnmod.models.transformers import ConvNeXt
    net = ConvNeXt(in_channels, num_classes, (1, 1), (width, 2 * width), conv_mlp=False, patch=2)
    for name, q in net.named_parameters():
        if name.endswith("gamma"):  # layer scales as trained ones are, not 1e-6 as they start
            nn.init.uniform_(q, 0.5, 1.5)
    return net


FAMILIES: dict[str, Callable[..., nn.Module]] = {
    "preact_resnet": preact_resnet, "se_resnet": se_resnet, "densenet": densenet, "wrn": wrn, "resnext": resnext,
    "nin": nin, "pyramidnet": pyramidnet, "ror": ror, "attention_resnet": attention_resnet,
    "mobilenet_v1": mobilenet_v1, "mobilenet_v2": mobilenet_v2, "mobilenet_v3": mobilenet_v3,
    "efficientnet": efficientnet, "shufflenet_v2": shufflenet_v2, "squeezenet": squeezenet, "mnasnet": mnasnet,
    "ghostnet": ghostnet, "functional": functional, "linear_pool_head": linear_pool_head,
    "conv_head": conv_head, "conv_hidden_head": conv_hidden_head,
    "vit_timm": vit_timm, "vit_hf": vit_hf, "vit_mha": vit_mha, "convnext": convnext,
    "vit_distilled": vit_distilled, "levit_like": levit_like,
}
# GELU, Hardswish and LayerNorm: slim modules only
TRANSFORMERS = ["vit_timm", "vit_hf", "vit_mha", "convnext", "vit_distilled", "levit_like"]
RELU_FAMILIES = [name for name in FAMILIES if name not in ("mobilenet_v3", "efficientnet", *TRANSFORMERS)]
