"""Tissue: a boolean tissue mask from a low-resolution thumbnail.

Brightfield (H&E, IHC): Otsu threshold on HSV saturation, since glass is white
and unsaturated whatever the stain. Fluorescence (dark background): Otsu on
log brightness. The feature is smoothed at cell scale (8 µm; 25 µm for
fluorescence, where tissue is a field of bright nuclei) before the threshold. Then
morphology: closing with a disk, hole filling, removal of specks smaller than
``min_area_um2``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

METHODS = ("auto", "saturation", "brightness", "all")


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a 1-D sample (values in [0, 1])."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1e-12)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1e-12)
    between = w0 * w1 * (mu0 - mu1) ** 2
    # empty bins between the modes make a plateau of equal variance: take its middle
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))
    return float((centres[best[0]] + centres[best[-1]]) / 2)


def detect_tissue(
    rgb: np.ndarray,
    px_um: float,
    method: str = "auto",
    min_area_um2: float = 10000.0,
    closing_um: float = 20.0,
    smooth_um: float = 8.0,
) -> tuple[np.ndarray, str]:
    """Tissue mask for an RGB uint8 thumbnail whose pixels are ``px_um`` µm wide.

    Returns (mask, method actually used).
    """
    if method not in METHODS:
        raise ValueError(f"tissue.method must be one of {METHODS}, not {method!r}")
    if method == "all":
        return np.ones(rgb.shape[:2], bool), "all"
    from scipy import ndimage as ndi  # here: plan, segment, stitch and stats read tissue masks without it

    mx8 = rgb.max(axis=-1)  # uint8 temporaries: the thumbnail may be large
    if method == "auto":
        method = "brightness" if float(np.median(mx8)) < 60 else "saturation"
    mx = mx8.astype(np.float32) / 255.0
    if method == "saturation":
        spread = (mx8 - rgb.min(axis=-1)).astype(np.float32) / 255.0
        feature = spread / np.maximum(mx, 1e-6)
        del spread
        # black borders and very dark pen strokes are not tissue
        valid = mx > 0.1
    else:
        # fluorescence: nuclei are bright dots at any density; on a log scale and
        # smoothed over a few cells, sparse tissue stands clear of the dark background
        feature = np.log1p(mx8.astype(np.float32)) / np.log(256.0)
        valid = np.ones_like(mx, bool)
        smooth_um = max(smooth_um, 25.0)
    # smooth at cell scale first: a field of nuclei (fluorescence) or of stained
    # cells is one piece of tissue, not a set of dots
    feature = ndi.gaussian_filter(feature, sigma=max(0.5, smooth_um / px_um))
    sample = feature[valid]
    if sample.size == 0 or float(sample.max() - sample.min()) < 0.02:
        return np.zeros(rgb.shape[:2], bool), method
    thr = otsu_threshold(sample)
    if method == "saturation":
        thr = max(thr, 0.05)  # glass is never more saturated than this
    mask = (feature > thr) & valid
    r = max(1, int(round(closing_um / px_um)))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    disk = xx * xx + yy * yy <= r * r  # a disk, not an iterated cross: no diamond-shaped artefacts
    mask = ndi.binary_closing(np.pad(mask, r), structure=disk)[r:-r, r:-r]
    mask = ndi.binary_fill_holes(mask)
    min_px = min_area_um2 / (px_um * px_um)
    lab, n = ndi.label(mask)
    if n:
        sizes = np.bincount(lab.ravel())
        keep = sizes >= min_px
        keep[0] = False
        mask = keep[lab]
    return mask, method


def run(
    *,
    slide_path: str,
    slide_id: str,
    mpp,
    out_png: str,
    out_thumb: str,
    out_json: str,
    method: str = "auto",
    tissue_mpp: float = 4.0,
    min_area_um2: float = 10000.0,
    log=print,
) -> dict:
    """Tissue stage: thumbnail.png, tissue.png (0/255) and tissue.json (scale, area)."""
    import time

    from PIL import Image

    from .runner import write_json
    from .slide import open_slide

    t0 = time.monotonic()
    with open_slide(slide_path, slide_id, mpp) as slide:
        mpp0 = slide.require_mpp()
        thumb, ds0 = slide.thumbnail(tissue_mpp / mpp0)
    px_um = ds0 * mpp0
    mask, used = detect_tissue(thumb, px_um, method, min_area_um2)
    if used != method:
        log(
            f"tissue method '{method}' -> '{used}'"
            + (" (dark background: fluorescence)" if used == "brightness" else "")
        )
    area_mm2 = float(mask.sum()) * px_um * px_um / 1e6
    log(
        f"thumbnail {thumb.shape[1]}x{thumb.shape[0]} px at {px_um:.3f} µm/px; "
        f"tissue {100 * mask.mean():.1f}% = {area_mm2:.3f} mm²"
    )
    if not mask.any():
        log(
            f"WARNING: no tissue found on slide '{slide_id}'; its mask will be empty "
            "(set tissue.method: all to segment everything)"
        )
    Image.fromarray(thumb).save(out_thumb)
    Image.fromarray((mask * 255).astype(np.uint8)).save(out_png)
    info = dict(
        slide_id=slide_id,
        method=used,
        thumbnail_downsample=ds0,
        thumbnail_mpp=px_um,
        tissue_area_mm2=area_mm2,
        tissue_fraction=float(mask.mean()),
        elapsed_s=time.monotonic() - t0,
    )
    write_json(out_json, info)
    return info


@dataclass(frozen=True)
class TissueInfo:
    """tissue.json: the tissue stage's result for one slide (its one reader)."""

    slide_id: str
    method: str  # the method used ('auto' resolved)
    downsample: float  # level-0 px per tissue-mask (thumbnail) px; stored as thumbnail_downsample
    mpp: float  # µm per tissue-mask px; stored as thumbnail_mpp
    tissue_area_mm2: float
    tissue_fraction: float
    elapsed_s: float = 0.0

    @classmethod
    def read(cls, path: str) -> TissueInfo:
        with open(path) as fh:
            d = json.load(fh)
        return cls(
            slide_id=d["slide_id"],
            method=d["method"],
            downsample=d["thumbnail_downsample"],
            mpp=d["thumbnail_mpp"],
            tissue_area_mm2=d["tissue_area_mm2"],
            tissue_fraction=d["tissue_fraction"],
            elapsed_s=d.get("elapsed_s", 0.0),
        )


def load_mask(png_path: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(png_path)) > 127
