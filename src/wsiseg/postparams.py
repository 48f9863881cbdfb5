"""Settings of the U-Net's instance post-processing (:mod:`wsiseg.postprocess`), without its
dependencies: the plan stage writes a checkpoint's settings, or these defaults, into
plan.json without importing scikit-image."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class InstanceParams:
    # defaults: typical of models trained by `snakemake train`; training stores its own choice
    fg_threshold: float = 0.7  # object where P(background) < 1 - fg_threshold
    seed_threshold: float = 0.9  # seed where P(interior) > seed_threshold
    min_seed_um2: float = 2.0
    min_object_um2: float = 6.0

    def as_dict(self) -> dict:
        return asdict(self)
