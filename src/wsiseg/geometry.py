"""Geometry of one slide on the model's grid: coordinate planes, converters, resampled reads.

Coordinate planes (each name in the code carries its plane's prefix or suffix, as in
openslide-python's ``deepzoom.py``):

    level-0 px  (``*0``, e.g. ``x0``, ``width0``)  -- the slide's full-resolution pixels
    level px    (``level_*``)                       -- pixels of the pyramid level we read
    target px   (``t*``, e.g. ``tx``, ``width``)    -- pixels at the model's mpp; the mask
                                                       is written in target px (mask px)
    tile index  (``row``, ``col``)                  -- a tile of the grid (wsiseg.tiling)

Every region is given as (x, y, w, h), in that order, in one plane. :class:`Geometry`
holds the scales between the planes, computed once per slide, and converts between
them (``target_to_level0``, ``level0_to_target``).

Resampling from level px to target px uses a separable linear (triangle) filter
whose weights depend only on *global* target coordinates, so a pixel's value is
identical in every window that contains it: overlapping windows agree exactly,
which is what makes the stitched output seam-free.

This module imports nothing of ours but :mod:`wsiseg.slide`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from .slide import Slide


@dataclass(frozen=True)
class Geometry:
    """Everything that maps the slide onto the target grid; computed once per slide."""

    width0: int  # level-0 px
    height0: int
    mpp0: float  # µm per level-0 px
    target_mpp: float  # µm per target px
    level: int  # pyramid level read
    level_downsample: float  # level-0 px per level px
    level_width: int  # level px
    level_height: int
    width: int  # target px
    height: int

    @property
    def scale0(self) -> float:
        """level-0 px per target px."""
        return self.target_mpp / self.mpp0

    @property
    def scale(self) -> float:
        """level px per target px (>= 1 up to rounding: we read at or above target resolution)."""
        return self.scale0 / self.level_downsample

    @property
    def needs_resampling(self) -> bool:
        return abs(self.scale - 1.0) > 1e-6

    @classmethod
    def for_slide(cls, slide: Slide, target_mpp: float) -> Geometry:
        mpp0 = slide.require_mpp()
        scale0 = target_mpp / mpp0
        level = slide.best_level_for(scale0)
        lw, lh = slide.level_dimensions[level]
        w0, h0 = slide.dimensions
        return cls(
            width0=w0,
            height0=h0,
            mpp0=mpp0,
            target_mpp=float(target_mpp),
            level=level,
            level_downsample=float(slide.level_downsamples[level]),
            level_width=lw,
            level_height=lh,
            width=max(1, int(round(w0 / scale0))),
            height=max(1, int(round(h0 / scale0))),
        )

    def to_dict(self) -> dict:
        return asdict(self)

    # ---- converters between the planes
    def target_to_level0(self, t: float) -> float:
        """A coordinate or length in target px, in level-0 px."""
        return t * self.scale0

    def level0_to_target(self, v0: float) -> float:
        """A coordinate or length in level-0 px, in target px."""
        return v0 / self.scale0

    def target_to_level(self, t: float) -> float:
        """A coordinate or length in target px, in px of the level read."""
        return t * self.scale


# ------------------------------------------------------------------ resampling
def _taps(t0: int, n: int, scale: float, src_len: int) -> tuple[int, int, np.ndarray, np.ndarray]:
    """Linear-interpolation taps for target px [t0, t0+n) along one axis.

    Each target px is a weighted sum of K source px (a band, not a dense matrix).
    The triangle filter is widened to ``scale`` when downsampling (antialiasing);
    taps outside the level are dropped and the rest renormalised. Taps and
    weights are functions of the global target coordinate only, and are summed
    in a fixed order, so a target px has the same value in every window.
    Returns (first source px, last source px, tap indices relative to the first (n, K), weights (n, K)).
    """
    centres = (np.arange(t0, t0 + n, dtype=np.float64) + 0.5) * scale - 0.5
    support = max(1.0, scale)
    k = int(math.ceil(2 * support)) + 1
    first = np.floor(centres - support).astype(np.int64) + 1
    js = first[:, None] + np.arange(k)[None, :]
    w = np.clip(1.0 - np.abs(centres[:, None] - js) / support, 0.0, None)
    w[(js < 0) | (js >= src_len)] = 0.0
    s = w.sum(axis=1, keepdims=True)
    empty = s[:, 0] == 0  # only beyond the last source px: take the nearest edge px
    if empty.any():
        js[empty, 0] = np.clip(np.round(centres[empty]), 0, src_len - 1).astype(np.int64)
        w[empty, 0], s[empty] = 1.0, 1.0
    w = w / s
    js = np.clip(js, 0, src_len - 1)
    used = w > 0
    lo, hi = int(js[used].min()), int(js[used].max())
    return lo, hi, np.clip(js - lo, 0, hi - lo), w.astype(np.float32)


def read_target(slide: Slide, geom: Geometry, tx: int, ty: int, w: int, h: int) -> np.ndarray:
    """RGB float32 (h, w, 3) in [0, 255] of target px [tx, tx+w) x [ty, ty+h), inside the slide."""
    assert 0 <= tx and 0 <= ty and tx + w <= geom.width and ty + h <= geom.height, (tx, ty, w, h)
    if not geom.needs_resampling:
        w_ok = min(w, geom.level_width - tx)
        h_ok = min(h, geom.level_height - ty)
        img = slide.read_level(geom.level, tx, ty, w_ok, h_ok).astype(np.float32)
        if (w_ok, h_ok) != (w, h):  # rounding of target size: repeat the last px
            img = np.pad(img, ((0, h - h_ok), (0, w - w_ok), (0, 0)), mode="edge")
        return img
    x_lo, x_hi, jx, wx = _taps(tx, w, geom.scale, geom.level_width)
    y_lo, y_hi, jy, wy = _taps(ty, h, geom.scale, geom.level_height)
    src = slide.read_level(geom.level, x_lo, y_lo, x_hi - x_lo + 1, y_hi - y_lo + 1).astype(np.float32)
    rows = np.zeros((h, src.shape[1], 3), np.float32)
    for k in range(jy.shape[1]):  # fixed tap order: identical sums in every window
        rows += wy[:, k, None, None] * src[jy[:, k]]
    out = np.zeros((h, w, 3), np.float32)
    for k in range(jx.shape[1]):
        out += wx[None, :, k, None] * rows[:, jx[:, k]]
    return out


def read_window(slide: Slide, geom: Geometry, wx: int, wy: int, n: int) -> np.ndarray:
    """Square read window (n, n, 3) at target px (wx, wy), reflect-padded outside the slide.

    The mirror is about the first/last pixel without repeating it (numpy 'reflect'),
    as in the U-Net paper's overlap-tile strategy; it repeats for windows wider
    than the slide.
    """
    x0, y0 = max(0, wx), max(0, wy)
    x1, y1 = min(geom.width, wx + n), min(geom.height, wy + n)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"window at {(wx, wy)} size {n} does not overlap the slide")
    img = read_target(slide, geom, x0, y0, x1 - x0, y1 - y0)
    pad = ((y0 - wy, wy + n - y1), (x0 - wx, wx + n - x1), (0, 0))
    if any(p for p in pad[:2] for p in p):
        mode = "reflect" if min(img.shape[:2]) > 1 else "edge"
        img = np.pad(img, pad, mode=mode)
    return img
