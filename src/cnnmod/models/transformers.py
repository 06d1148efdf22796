"""Vision transformers and ConvNeXt with timm's state-dict keys and shapes (``vit_tiny``/``vit_small`` as timm's
``vit_*_patch16_224`` at any patch and image size; ``convnext_atto`` (1x1-convolution MLP, channel LayerNorm)
and ``convnext_tiny`` (linear MLP on channels-last tokens)), so that a timm checkpoint loads as it is.
``tests/fixtures/timm_1.0.31.json`` records timm's keys, shapes and outputs; the tests compare.

Attention is :class:`cnnmod.core.attention.HeadAttention` (timm's ``qkv``/``proj``): the form slim modules cut heads
of. Every forward is traceable by torch.fx (no shape unpacking, no control flow on values).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.attention import HeadAttention

EPS = 1e-6  # timm's LayerNorm eps for both families


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (timm's ``Mlp``; ``conv``: 1x1 convolutions on (B, C, H, W), timm's ``ConvMlp``)."""

    def __init__(self, dim: int, hidden: int, conv: bool = False) -> None:
        super().__init__()
        layer = (lambda i, o: nn.Conv2d(i, o, 1)) if conv else nn.Linear
        self.fc1, self.act, self.fc2 = layer(dim, hidden), nn.GELU(), layer(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=EPS)
        self.attn = HeadAttention(dim, heads, dim // heads)
        self.norm2 = nn.LayerNorm(dim, eps=EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, in_channels: int, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch, patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """timm's ``VisionTransformer`` with its defaults (class token, learned position embedding over the class
    token and the patches, pre-norm blocks, final LayerNorm, the class token's features to a linear head)."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, dim: int, depth: int, heads: int,
                 patch: int = 16, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        c, h, w = input_shape
        tokens = (h // patch) * (w // patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.patch_embed = PatchEmbed(c, dim, patch)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=EPS)
        self.head = nn.Linear(dim, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.cls_token, std=1e-6)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.norm(self.blocks(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x)[:, 0])


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of (B, C, H, W) (timm's ``LayerNorm2d``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """7x7 depthwise convolution, LayerNorm over channels, MLP (4x, GELU), layer scale ``gamma``, residual. With
    ``conv_mlp`` the MLP is 1x1 convolutions on (B, C, H, W); else linear layers on channels-last tokens."""

    def __init__(self, dim: int, conv_mlp: bool, ls_init: float = 1e-6) -> None:
        super().__init__()
        self.conv_mlp = conv_mlp
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = LayerNorm2d(dim, eps=EPS) if conv_mlp else nn.LayerNorm(dim, eps=EPS)
        self.mlp = Mlp(dim, 4 * dim, conv=conv_mlp)
        self.gamma = nn.Parameter(ls_init * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv_dw(x)
        if self.conv_mlp:
            x = self.mlp(self.norm(x))
        else:
            x = self.mlp(self.norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        return x.mul(self.gamma.reshape(1, -1, 1, 1)) + shortcut


class ConvNeXtStage(nn.Module):
    def __init__(self, cin: int, dim: int, depth: int, conv_mlp: bool, first: bool) -> None:
        super().__init__()
        self.downsample = nn.Identity() if first else nn.Sequential(LayerNorm2d(cin, eps=EPS),
                                                                    nn.Conv2d(cin, dim, 2, 2))
        self.blocks = nn.Sequential(*[ConvNeXtBlock(dim, conv_mlp) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class ClassifierHead(nn.Module):
    """Global average pooling, LayerNorm, linear layer (timm's ``NormMlpClassifierHead`` as ConvNeXt uses it)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=EPS)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x.mean((2, 3))))


class ConvNeXt(nn.Module):
    """ConvNeXt (Liu et al. 2022) as timm writes it: a patch stem (``patch`` x ``patch`` convolution, LayerNorm),
    four stages (the later three start with LayerNorm + a 2x2 stride-2 convolution), the head."""

    def __init__(self, in_channels: int, num_classes: int, depths: tuple[int, ...], dims: tuple[int, ...],
                 conv_mlp: bool, patch: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, dims[0], patch, patch), LayerNorm2d(dims[0], eps=EPS))
        self.stages = nn.Sequential(*[ConvNeXtStage(dims[max(i - 1, 0)], d, n, conv_mlp, i == 0)
                                      for i, (n, d) in enumerate(zip(depths, dims, strict=True))])
        self.head = ClassifierHead(dims[-1], num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


VIT = {"vit_tiny": (192, 3), "vit_small": (384, 6)}  # embedding width, heads (timm's, depth 12)
CONVNEXT = {"convnext_atto": ((2, 2, 6, 2), (40, 80, 160, 320), True),
            "convnext_tiny": ((3, 3, 9, 3), (96, 192, 384, 768), False)}
