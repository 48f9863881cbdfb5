"""Classical nuclei model: the haematoxylin baseline as a no-GPU, no-weights ``model:``.

``model: {format: classical, name: ..., mpp: 0.5}`` segments nuclei with the same
pipeline that ``snakemake evaluate`` scores as the classical baseline (colour
deconvolution to haematoxylin, threshold, opening, hole filling,
distance-transform watershed; :func:`wsiseg.postprocess.classical_instances`),
but tile by tile over a whole slide:

* **one threshold per slide**: Otsu's threshold of the smoothed haematoxylin
  channel is computed once, in the plan stage, from a sample of the slide's
  tissue tiles (:func:`slide_threshold`), and stored in plan.json. A per-tile
  Otsu would move with each tile's content and leave seams; a tile with no
  nuclei would get nuclei anyway.
* **no seams**: every step is local within :func:`halo_px` (smoothing within
  4 sigma, opening, and per-nucleus steps for nuclei up to ``MAX_NUCLEUS_UM``
  across), so with ``margin: auto`` every object in a tile's write region is
  seen whole in its read window and comes out as in a one-pass run.

:class:`ClassicalNuclei` is a ``torch.nn.Module`` so that it runs through the
same splitter/merger as the U-Net: its "logits" are the one-hot separated
nucleus mask (background / nucleus), computed on the CPU.
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import torch
from skimage.filters import threshold_otsu

from .postprocess import BaselineParams, classical_instances, haematoxylin, separated_mask

CLASSES = ["background", "nucleus"]
GLASS_RGB = 215  # a pixel with every channel at or above this is glass
MAX_NUCLEUS_UM = 16.0  # largest nucleus (µm across) guaranteed to be segmented as in one pass
VERSION = 1  # bump when the algorithm changes, so that tile plans and masks are remade


def params_from_cfg(model_cfg: dict) -> BaselineParams:
    return BaselineParams(**(model_cfg.get("classical") or {}))


def checksum(params: BaselineParams) -> str:
    """Stands in for the weights' sha256: changes with the settings and the algorithm."""
    blob = json.dumps(dict(kind="classical", version=VERSION, **params.as_dict()), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def halo_px(params: BaselineParams, mpp: float) -> int:
    """Context per side (px at ``mpp``) that makes tiles agree with a one-pass run."""
    return int(math.ceil((4 * params.smooth_um + 2 * params.opening_um + MAX_NUCLEUS_UM) / mpp))


def to_uint8(rgb: np.ndarray) -> np.ndarray:
    """Windows as read (float 0..255) to the 8-bit RGB that the pipeline expects, rounded
    as in :class:`ClassicalNuclei`."""
    return rgb if rgb.dtype == np.uint8 else np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def slide_threshold(windows, mpp: float, params: BaselineParams, margin: int) -> float:
    """Otsu threshold of the smoothed haematoxylin over sampled windows (RGB, 0..255).

    Only each window's write region (inside ``margin``) counts, so that the
    smoothing's edge effects at the window border do not bias the histogram, and
    only pixels darker than glass. Otsu's threshold of haematoxylin moves with
    the mix of tissue in the sample (on CMU-1 at 0.5 µm/px: 0.003 to 0.091 for
    single 256 px tiles, 0.056 to 0.080 pooled over 16 random ones, 0.063 to
    0.070 over 64), so the plan stage pools many tiles spread over the slide.
    """
    values = []
    for rgb in windows:
        rgb = to_uint8(rgb)
        h = haematoxylin(rgb, mpp, params)
        inner = (slice(margin, h.shape[0] - margin), slice(margin, h.shape[1] - margin))
        # glass would only add a spike at 0; float32 keeps 64 tiles of 512 px under 70 MB
        values.append(h[inner][rgb[inner].min(-1) < GLASS_RGB].astype(np.float32))
    values = np.concatenate(values) if values else np.zeros(0)
    if values.size == 0 or np.ptp(values) == 0:
        raise ValueError("no tissue pixels to pick the haematoxylin threshold from")
    return float(threshold_otsu(values))


class ClassicalNuclei(torch.nn.Module):
    """(B, 3, n, n) RGB in [0, 1] -> (B, 2, n, n) one-hot 'logits' of the separated nucleus mask."""

    def __init__(self, mpp: float, params: BaselineParams, threshold: float | None = None):
        super().__init__()
        self.mpp, self.params, self.threshold = float(mpp), params, threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rgb = (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        out = np.empty((rgb.shape[0], 2) + rgb.shape[1:3], np.float32)
        for i, im in enumerate(rgb):
            m = separated_mask(classical_instances(im, self.mpp, self.params, threshold=self.threshold))
            out[i, 1] = m
            out[i, 0] = 1 - m
        return torch.from_numpy(out * 10.0).to(x.device)
