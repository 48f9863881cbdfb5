"""What the stages know about a loaded model: :class:`ModelSpec`.

The defaults fit a segmentation network whose output is per-class logits (the
project's U-Net, a TorchScript model); a format that differs overrides the methods
it needs (e.g. :class:`wsiseg.models.classical.ClassicalSpec`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class TileLabeler:
    """uint8 mask labels of a tile's write region from the output over its read window.

    A background/object/boundary model (``postprocess`` set) is post-processed into
    separated objects over the whole window, then cropped: a clump of nuclei on a tile
    border is seen whole from both sides, so both tiles draw the same dividing lines.
    Otherwise the class of highest score.
    """

    postprocess: dict | None
    mpp: float

    def __call__(self, out: torch.Tensor, keep: slice, th: int, tw: int) -> np.ndarray:
        if self.postprocess is not None:
            from ..postprocess import InstanceParams, instances_from_probs, separated_mask

            prob = torch.softmax(out.float(), 0).cpu().numpy()
            ids = instances_from_probs(prob, self.mpp, InstanceParams(**self.postprocess))
            return separated_mask(ids, (slice(keep.start, keep.start + th), slice(keep.start, keep.start + tw)))
        return out[:, keep, keep].argmax(0).to(torch.uint8).cpu().numpy()[:th, :tw]


@dataclass
class ModelSpec:
    """A loaded model plus what the tiler, the segment stage and evaluate need to know."""

    module: nn.Module  # input N x 3 x H x W RGB in [0, 1]; output per-class logits N x K x H' x W'
    classes: list
    mpp: float
    name: str
    checksum: str  # sha256 of the weights file (or of the settings of a model without one)
    kind: str  # the format it was loaded from (wsiseg.models.FORMATS), for logs and provenance
    align: int  # tile origins must be multiples of this (2**depth)
    border: int | None  # px lost per side ('valid' networks), 0 for 'same' (None: not measured)
    halo: int | None  # receptive-field radius, px (None: not measured)
    postprocess: dict | None = None  # instance post-processing of a background/object/boundary model

    wants_gpu: ClassVar[bool] = True  # the segment stage runs it on the job's device
    supports_tta: ClassVar[bool] = True  # model.tta may average it over flips/rotations

    # ---- geometry
    @property
    def mask_classes(self) -> list:
        """Classes of the written mask: a boundary class is resolved into separated objects."""
        return self.classes[:-1] if self.postprocess else list(self.classes)

    def output_size(self, n: int) -> int | None:
        """Output side for input side ``n`` (None: ``n`` is not a legal input)."""
        from .probe import probe

        out = probe(self.module, n)
        return out if out == n - 2 * self.border else None

    # ---- per-slide calibration (plan stage) and its use (segment stage)
    def calibrate(self, opener, geom, spec, tiles, log) -> dict:
        """Settings measured once per slide in the plan stage, stored in plan.json.

        ``opener()`` opens the slide; ``tiles`` is the tile plan. Most models need none.
        """
        return {}

    def apply_calibration(self, calibration: dict, log) -> bool:
        """Take what :meth:`calibrate` stored; False: nothing on this slide to segment."""
        return True

    # ---- per-tile post-processing (segment stage)
    def labeler(self) -> TileLabeler:
        """The per-tile post-processing as a small callable without the network (it runs in the segment
        stage's worker processes, which do not get the network)."""
        return TileLabeler(self.postprocess, self.mpp)

    # ---- labeled images (evaluate target, validation)
    @property
    def evaluate_mpp(self) -> float | None:
        """The mpp labeled images are brought to for :meth:`predict_instances` (None: their own)."""
        return self.mpp

    def predict_instances(self, sample, tta: bool, device="cpu") -> np.ndarray:
        """Instance ids of a labeled image (:class:`wsiseg.labels.Sample`) at its own resolution:
        predicted at the model's mpp, probabilities resized, then post-processed."""
        from ..postprocess import InstanceParams, instances_from_probs
        from ..predict import predict_probs, resize_probs

        prob = predict_probs(self.module, sample.image, align=self.align, tta=tta, device=device)
        return instances_from_probs(
            resize_probs(prob, sample.native_image.shape[:2]), sample.mpp, InstanceParams(**(self.postprocess or {}))
        )

    def describe(self) -> str:
        return (
            f"model {self.name} ({self.kind}): mpp {self.mpp}, classes {self.classes}, "
            f"post-processing {self.postprocess}"
        )
