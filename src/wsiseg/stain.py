"""Test-time stain normalisation (``model.stain_normalise: reinhard``).

Reinhard et al. (2001) colour transfer in CIE-Lab: every pixel of a slide goes through
one affine map per Lab channel,

    lab' = (lab - source.mean) / source.std * reference.std + reference.mean,

which gives the slide's tissue the Lab mean and standard deviation of the tissue the
model was trained on (``model.stain_reference``). *Tissue* is every pixel darker than
white background, L* < :data:`TISSUE_L`. The factor ``reference.std / source.std`` of
each channel is clamped to [1 / ``model.stain_max_scale``, ``model.stain_max_scale``]
(the shift follows, so the tissue mean still goes to the reference's): a slide far from
the reference is moved towards it without its noise being stretched without bound. With
``model.stain_max_scale: 1`` only the mean moves: lab' = lab - source.mean + reference.mean.

Why this keeps seams exact: the map is the same for the whole slide and acts on each
pixel alone, so it commutes with cutting windows, with mirroring at the slide's borders
and with flips/rotations (TTA). The source statistics are measured once per slide by the
plan stage (:meth:`wsiseg.models.spec.ModelSpec.calibrate`, stored in plan.json); the segment stage puts
:class:`wsiseg.stain_transform.StainNormalised` in front of the network, on the network's device.

The statistics are sums (pixel count, sum, sum of squares per channel: :class:`LabStats`),
so tiles add up in any order and memory stays one window. This module measures and checks
them with numpy alone: the plan stage imports no torch for them (1.5-2 s of every plan job);
the transform itself, in torch, is :mod:`wsiseg.stain_transform`.

``python -m wsiseg.stain SHEET [--mpp 0.5] [--within-tile]`` prints the
``model.stain_reference`` of a labeled-set sheet (its rows other than ``split`` = val/test,
at the model's mpp): the statistics of all their tissue pixels pooled, or with
``--within-tile`` the mean of each tile's own mean and std (a spread within one tile, as
a slide's is, without the differences between tiles).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError

#: model.stain_max_scale's default (each channel's stretch clamped to [1/2, 2]); the config check
#: in wsiseg.models holds the same number as STAIN_MAX_SCALE (this module must not import models,
#: which reads the config when the DAG is built: tests/test_models.py asserts they agree)
MAX_SCALE = 2.0

TISSUE_L = 88.0  # CIE-Lab lightness below which a pixel is tissue, not white background
MIN_TISSUE_PX = 1000  # fewer tissue pixels than this on a slide: no statistics, no normalisation
MIN_STD = 1e-3  # a channel whose tissue is (nearly) uniform keeps its spread (scale 1)
WARN_SCALE = 2.0  # a channel stretched or squeezed more than this: the slide is far from the reference

# sRGB (D65) -> CIE XYZ and the D65 white point, as scikit-image's rgb2lab / lab2rgb (observer 2°)
XYZ_FROM_RGB = np.array(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]]
)
WHITE = np.array([0.95047, 1.0, 1.08883])


@dataclass
class LabStats:
    """Sums over tissue pixels (L* < TISSUE_L): count, per-channel sum and sum of squares."""

    n: int = 0
    s: tuple = (0.0, 0.0, 0.0)
    ss: tuple = (0.0, 0.0, 0.0)

    def add_rgb(self, rgb: np.ndarray) -> LabStats:
        """Add the tissue pixels of an (H, W, 3) RGB image in [0, 255] (uint8, or float as resampled
        windows are). In float64 with numpy, the formula of :func:`wsiseg.stain_transform.rgb_to_lab`:
        the plan stage needs no torch for it; the same values to rounding (tested)."""
        if rgb.size == 0:
            return self
        x = rgb.reshape(-1, 3).astype(np.float64) / 255
        lin = np.where(x > 0.04045, ((x + 0.055) / 1.055) ** 2.4, x / 12.92)
        xyz = lin @ XYZ_FROM_RGB.T
        xyz /= WHITE
        f = np.where(xyz > 0.008856, np.maximum(xyz, 0) ** (1 / 3), xyz * 7.787 + 16 / 116)
        lightness = f[:, 1] * 116 - 16
        tissue = lightness < TISSUE_L
        f = f[tissue]
        px = np.stack((lightness[tissue], (f[:, 0] - f[:, 1]) * 500, (f[:, 1] - f[:, 2]) * 200))
        self.n += int(px.shape[1])
        self.s = tuple(a + float(b) for a, b in zip(self.s, px.sum(1)))
        self.ss = tuple(a + float(b) for a, b in zip(self.ss, (px * px).sum(1)))
        return self

    def moments(self) -> dict | None:
        """{'mean', 'std', 'pixels'} of the tissue (population std), or None: too few pixels."""
        if self.n < MIN_TISSUE_PX:
            return None
        mean = [a / self.n for a in self.s]
        std = [math.sqrt(max(b / self.n - m * m, 0.0)) for b, m in zip(self.ss, mean)]
        return dict(mean=mean, std=std, pixels=self.n)


def scales(source: dict, reference: dict, max_scale: float = math.inf) -> list:
    """Per-channel factor by which the transform stretches the slide's tissue colour spread,
    clamped to [1 / ``max_scale``, ``max_scale``] (``model.stain_max_scale``; inf: unclamped)."""
    k = [1.0 if s <= MIN_STD else r / s for s, r in zip(source["std"], reference["std"])]
    return [min(max(v, 1 / max_scale), max_scale) for v in k]


def far_from_reference(source: dict, reference: dict, max_scale: float = MAX_SCALE) -> str:
    """'' or a warning: a channel's spread would change by more than :data:`WARN_SCALE` times (or
    the bound, if lower), which amplifies noise (the example's synthetic slide: a* x3.8 to the
    pooled reference, a quarter of its 'nuclei' false); says what the bound clamped it to."""
    shift_only = max_scale <= 1  # nothing is stretched: warn as the unbounded transform would
    warn = WARN_SCALE if shift_only else min(WARN_SCALE, max_scale)
    names = ("L*", "a*", "b*")
    raw, used = scales(source, reference), scales(source, reference, max_scale)
    far = [i for i, v in enumerate(raw) if not 1 / warn <= v <= warn]
    if not far:
        return ""
    clamped = [f"{names[i]} x{used[i]:.2f}" for i in far if used[i] != raw[i]]
    return (
        f"stain normalisation would stretch this slide's tissue colour spread by "
        f"{', '.join(f'{names[i]} x{raw[i]:.2f}' for i in far)} (more than {warn:g}x)"
        + (f", clamped to {', '.join(clamped)} (model.stain_max_scale {max_scale:g})" if clamped else "")
        + (
            ": its stain is far from the model's reference (only its mean is moved); "
            if shift_only
            else ": its stain is far from the model's reference and the transform amplifies noise; "
        )
        + "check the mask, or set model.stain_normalise: none"
    )


def measure_windows(windows) -> dict | None:
    """Tissue Lab moments over an iterable of (H, W, 3) uint8 images (None: too little tissue)."""
    stats = LabStats()
    for img in windows:
        stats.add_rgb(img)
    return stats.moments()


def reference_of(images, within_tile: bool = False) -> dict | None:
    """``model.stain_reference`` of training images ((H, W, 3) uint8 at the model's mpp): their
    tissue's Lab mean and std, rounded to 4 decimals (None: too little tissue). Pooled over all
    their tissue pixels, or ``within_tile``: the mean of each image's own mean and of its own std
    (an image with too little tissue left out), every image weighing the same."""
    if within_tile:
        tiles = [m for m in (measure_windows([img]) for img in images) if m is not None]
        m = {k: np.mean([t[k] for t in tiles], 0) for k in ("mean", "std")} if tiles else None
    else:
        m = measure_windows(images)
    if m is None:
        return None
    return dict(mean=[round(float(v), 4) for v in m["mean"]], std=[round(float(v), 4) for v in m["std"]])


def reference_from_sheet(sheet: str, mpp: float, within_tile: bool = False) -> dict:
    """``model.stain_reference`` of a labeled-set sheet: its training rows (split other than
    val/test) at ``mpp``, pooled or ``within_tile`` (:func:`reference_of`)."""
    from . import labels as L

    samples = [s for s in L.load_set(sheet, mpp) if s.split not in ("val", "test")]
    if not samples:
        raise ConfigError(f"labeled-set sheet {sheet} has no training rows (split other than val/test)")
    ref = reference_of((s.image for s in samples), within_tile)
    if ref is None:
        raise ConfigError(f"labeled-set sheet {sheet}: its training tiles have almost no tissue pixels")
    return ref


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m wsiseg.stain", description=__doc__.split("\n\n")[0])
    ap.add_argument("sheet", help="labeled-set sheet (image, labels, mpp[, split])")
    ap.add_argument("--mpp", type=float, default=0.5, help="the model's µm/px (default 0.5)")
    ap.add_argument(
        "--within-tile",
        action="store_true",
        help="the mean of each training tile's own tissue mean and std (default: all their tissue pooled)",
    )
    args = ap.parse_args(argv)
    ref = reference_from_sheet(args.sheet, args.mpp, args.within_tile)
    how = "mean of each tile's own statistics" if args.within_tile else "all tissue pixels pooled"
    print("model:")
    print("  stain_normalise: reinhard")
    print(f"  stain_reference:  # CIE-Lab of the tissue of {args.sheet}'s training rows at {args.mpp} µm/px ({how})")
    print(f"    mean: {ref['mean']}")
    print(f"    std: {ref['std']}")
    print(f"  stain_max_scale: {MAX_SCALE:g}  # each channel's stretch clamped to [1/this, this]")


if __name__ == "__main__":
    main()
