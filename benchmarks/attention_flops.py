"""FLOPs of a user's small ViT and of slim modules of it, as cnnmod counts them (every attention as computed) and
as torch's flop counter sees them under eval and no_grad alone (nn.MultiheadAttention's fused fast path and
``scaled_dot_product_attention``'s fused kernels uncounted, as cnnmod counted before), beside a hand count.

    .venv/bin/python benchmarks/attention_flops.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # families.py, the synthetic bands
from conftest import synthetic_arrays  # noqa: E402
from families import vit_mha  # noqa: E402

import cnnmod  # noqa: E402
from cnnmod.core.cost import count_flops  # noqa: E402
from cnnmod.data.dataset import ImageSet  # noqa: E402

TOKENS, DIM, DEPTH, CLASSES = 17, 32, 2, 4  # vit_mha(width=8) on 16x16 images: 16 patches of 4x4 and a class token


@torch.no_grad()
def uncounted(fn, images) -> int:
    """FLOPs per image as torch's counter sees them with nothing done about attention."""
    with FlopCounterMode(display=False) as counter:
        fn(images)
    return counter.get_total_flops() // images.shape[0]


def by_hand() -> int:
    """Patch embedding, each block's attention (4 N D^2 + 2 N^2 D multiply-adds) and MLP (2 N D 2D), the head."""
    attention = 4 * TOKENS * DIM * DIM + 2 * TOKENS * TOKENS * DIM
    mlp = 2 * TOKENS * DIM * 2 * DIM
    return 2 * (16 * 16 * DIM + DEPTH * (attention + mlp) + DIM * CLASSES)


def main() -> None:
    x, y = synthetic_arrays(40, CLASSES, 16)
    data = ImageSet("bands", "train", torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y),
                    [f"b{c}" for c in range(CLASSES)], (0.3,), (0.3,))
    torch.manual_seed(0)
    model = cnnmod.wrap(vit_mha(1, CLASSES, 8).eval(), data=data, mean=0.3, std=0.3)
    images = data.images[:2]

    def whole(im):
        return model(model.prepare(im))

    modules = cnnmod.decompose(model, data, granularity="channel", size=0.5, samples=20, calibration_samples=0)
    rows = [("model", whole), ("merged pair", cnnmod.compose(modules[:2])),
            (f"vote of {CLASSES}", cnnmod.compose(modules, mode="vote"))]
    before_model, after_model = uncounted(whole, images), count_flops(whole, images)
    print(f"hand count of the model: {by_hand():,} FLOPs")
    for name, fn in rows:
        before, after = uncounted(fn, images), count_flops(fn, images)
        print(f"{name}: {before:,} FLOPs before ({before / before_model:.2f}x the model), {after:,} now "
              f"({after / after_model:.2f}x)")


if __name__ == "__main__":
    main()
