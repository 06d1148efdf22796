"""The study's presets: ``quick`` (minutes on 2 CPU cores, smaller models, labelled as such) and ``full``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..errors import UserError


@dataclass(frozen=True)
class Preset:
    name: str
    arch: str                      # the main (strong) model, its weak twin, the second data set's model, TMAs
    arch_args: dict = field(default_factory=dict)
    epochs: int = 15               # main model
    subset: int | None = None
    weak_epochs: int = 2           # the weak model of intra-data-set replacement: fewer epochs, less data
    weak_subset: int = 6000
    second_epochs: int = 30        # the second data set's model (small data: more epochs)
    tma_epochs: int = 15           # models trained from scratch on a scenario's classes
    tma_subset: int | None = None
    optimizer: str = "sgd"
    ci_samples: int = 1000
    test_per_class: int | None = None   # evaluate on the first N test images of each class (None: all)
    reuse_classes: int = 4         # classes drawn (with the seed) from each data set for reuse / replacement
    dense_epochs: int = 10
    variants: tuple[str, ...] = ("mc", "mc-bln", "mc-bi")

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS = {
    "quick": Preset(name="quick", arch="cnn", epochs=3, subset=12000, weak_epochs=1, weak_subset=1500,
                    second_epochs=8, tma_epochs=2, tma_subset=4000, optimizer="adam", ci_samples=200,
                    test_per_class=200, dense_epochs=2),
    "full": Preset(name="full", arch="resnet20", epochs=15, weak_epochs=2, weak_subset=6000, second_epochs=30,
                   tma_epochs=15),
}


def preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose {' or '.join(PRESETS)}")
    return PRESETS[name]
