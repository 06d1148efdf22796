"""FLOPs as computed: every attention layout counted against a count worked out by hand."""

import pytest
import torch
import torch.nn.functional as F
from families import HFAttention, MHAWrapper, TimmAttention

from cnnmod.core.attention import HeadAttention
from cnnmod.core.cost import count_flops

N, D, H = 17, 32, 4  # tokens (16 patches and a class token), width, heads


def by_hand(tokens: int, dim: int) -> int:
    """One self-attention layer on one sequence, a multiply-add counted two: q, k, v and the output projection
    (4 N D^2), then q k^T and the weights times v over every head (2 N^2 D)."""
    return 2 * (4 * tokens * dim * dim + 2 * tokens * tokens * dim)


class FusedTimmAttention(TimmAttention):
    """timm's attention with ``fused_attn``: the heads through ``F.scaled_dot_product_attention``."""

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))


@pytest.mark.parametrize("layer", [lambda: MHAWrapper(D, H), lambda: TimmAttention(D, H),
                                   lambda: FusedTimmAttention(D, H), lambda: HFAttention(D, H),
                                   lambda: HeadAttention(D, H, D // H)],
                         ids=["nn.MultiheadAttention", "timm", "timm-fused", "hugging-face", "canonical"])
def test_attention_flops_match_a_hand_count(layer):
    net = layer().eval()  # eval and no_grad: nn.MultiheadAttention's fused fast path would be taken
    x = torch.randn(2, N, D)
    assert count_flops(net, x) == pytest.approx(by_hand(N, D), rel=0.01)
    assert torch.backends.mha.get_fastpath_enabled()  # the fast path is on again after counting


def test_a_vit_counts_every_block():
    """A ViT's FLOPs: patch embedding, each block's attention and MLP, the head, with nothing left out."""
    from families import vit_mha

    net = vit_mha(1, 10, 8).eval()  # width 32, 4 heads, patch 4 on 16x16: 16 patches + a class token
    patch = 2 * 16 * (1 * 4 * 4) * D
    block = by_hand(N, D) + 2 * N * (D * 2 * D) * 2
    head = 2 * D * 10
    assert count_flops(net, torch.randn(3, 1, 16, 16)) == pytest.approx(patch + 2 * block + head, rel=0.01)
