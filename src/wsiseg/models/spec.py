"""What the stages know about a loaded model: :class:`ModelSpec`.

The defaults fit a segmentation network whose output is per-class logits (the
project's U-Net, a TorchScript model); a format that differs overrides the methods
it needs (e.g. :class:`wsiseg.models.classical.ClassicalSpec`).

No torch at import: the plan stage holds a spec without its network (``module`` None,
:func:`wsiseg.models.load_model` with ``network=False``); what runs a network imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

if TYPE_CHECKING:
    import torch
    from torch import nn

STAIN_SAMPLE_TILES = 64  # tissue tiles whose write regions give a slide's stain statistics


@dataclass(frozen=True)
class TileLabeler:
    """uint8 mask labels of a tile's write region from the output over its read window.

    A background/object/boundary model (``postprocess`` set) is post-processed into
    separated objects over the whole window, then cropped: a clump of nuclei on a tile
    border is seen whole from both sides, so both tiles draw the same dividing lines
    (:func:`wsiseg.postprocess.separated_labels`: the same mask, from less of the window
    where that decides it).
    Otherwise the class of highest score.
    """

    postprocess: dict | None
    mpp: float

    def __call__(self, out: torch.Tensor, keep: slice, th: int, tw: int) -> np.ndarray:
        import torch

        if self.postprocess is not None:
            from ..postprocess import InstanceParams, separated_labels

            prob = torch.softmax(out.float(), 0).cpu().numpy()
            crop = (slice(keep.start, keep.start + th), slice(keep.start, keep.start + tw))
            return separated_labels(prob, self.mpp, InstanceParams(**self.postprocess), crop)
        return out[:, keep, keep].argmax(0).to(torch.uint8).cpu().numpy()[:th, :tw]

    def warm_up(self) -> None:
        """Import what a call needs beyond torch: scipy.ndimage and scikit-image for the
        post-processing, 0.2-0.8 s that a segment job's first tile would otherwise wait for."""
        if self.postprocess is not None:
            from .. import postprocess  # noqa: F401


@dataclass
class ModelSpec:
    """A loaded model plus what the tiler, the segment stage and evaluate need to know."""

    module: nn.Module | None  # input N x 3 x H x W RGB in [0, 1]; output per-class logits N x K x H' x W'
    # (None: loaded for its geometry only, network=False)
    classes: list
    mpp: float
    name: str
    checksum: str  # sha256 of the weights file (or of the settings of a model without one)
    kind: str  # the format it was loaded from (wsiseg.models.FORMATS), for logs and provenance
    align: int  # tile origins must be multiples of this (2**depth)
    border: int | None  # px lost per side ('valid' networks), 0 for 'same' (None: not measured)
    halo: int | None  # receptive-field radius, px (None: not measured)
    postprocess: dict | None = None  # instance post-processing of a background/object/boundary model
    stain: dict | None = None  # test-time stain normalisation (wsiseg.models.stain_settings), None: off

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

        ``opener()`` opens the slide; ``tiles`` is the tile plan. A network needs none,
        unless ``model.stain_normalise`` is on: then the tissue's CIE-Lab statistics
        (``stain_source``, :mod:`wsiseg.stain`) over the write regions of up to
        :data:`STAIN_SAMPLE_TILES` evenly spread tiles (all of them on a small slide).
        """
        if self.stain is None:
            return {}
        from ..stain import far_from_reference, measure_windows, scales  # numpy: no torch in the plan stage
        from .sampling import sample_rows, sampled_windows

        rows = sample_rows(len(tiles), STAIN_SAMPLE_TILES)
        source = measure_windows(sampled_windows(opener, geom, tiles, rows, log, "stain", write_region=True))
        if source is None:
            log("stain normalisation: too little tissue-coloured area in the tiles to measure; not normalised")
            return dict(stain_source=None)
        ref, bound = self.stain["reference"], self.stain["max_scale"]
        scale = scales(source, ref, bound)  # what the segment stage applies: kept in plan.json for provenance
        log(
            f"stain normalisation ({self.stain['method']}): tissue CIE-Lab mean "
            f"{[round(v, 2) for v in source['mean']]}, std {[round(v, 2) for v in source['std']]} over "
            f"{source['pixels']} px of {len(rows)} tiles -> reference mean {ref['mean']}, std {ref['std']}; "
            f"spread x{', x'.join(f'{v:.2f}' for v in scale)} (bound {bound:g})"
        )
        warning = far_from_reference(source, ref, bound)
        if warning:
            log(f"WARNING: {warning}")
        return dict(stain_source=source, stain_scale=scale, stain_max_scale=bound)

    def apply_calibration(self, calibration: dict, log) -> bool:
        """Take what :meth:`calibrate` stored; False: nothing on this slide to segment."""
        if self.stain is not None:
            if "stain_source" not in calibration:
                raise RuntimeError(
                    "model.stain_normalise is on but the tile plan holds no stain statistics: "
                    "it was made with another model block; rerun the plan rule"
                )
            self.module = self.stain_normalised(self.module, calibration["stain_source"], log)
        return True

    def stain_normalised(self, module, source: dict | None, log=None):
        """``module`` with this model's stain normalisation for tissue statistics ``source`` in front."""
        if self.stain is None or source is None:
            return module
        from ..stain_transform import StainNormalised

        if log is not None:
            log(f"stain normalisation ({self.stain['method']}) in front of the network")
        return StainNormalised(module, source, self.stain["reference"], self.stain["max_scale"])

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

        module = self.module
        if self.stain is not None:  # a labeled image stands for a slide: its own statistics
            from ..stain import measure_windows

            module = self.stain_normalised(module, measure_windows([sample.image]))
        prob = predict_probs(module, sample.image, align=self.align, tta=tta, device=device)
        return instances_from_probs(
            resize_probs(prob, sample.native_image.shape[:2]), sample.mpp, InstanceParams(**(self.postprocess or {}))
        )

    def describe(self) -> str:
        return (
            f"model {self.name} ({self.kind}): mpp {self.mpp}, classes {self.classes}, "
            f"post-processing {self.postprocess}"
            + (
                f", stain normalisation {self.stain['method']} (bound {self.stain['max_scale']:g})"
                if self.stain
                else ""
            )
        )
