"""A small synthetic H&E-like pyramidal slide, made by the project itself.

Pink eosin-stained tissue islands with purple hematoxylin nuclei on white glass,
written as a tiled, JPEG-compressed pyramidal TIFF that OpenSlide reads as a
generic tiled TIFF, with its mpp in the TIFF resolution tags. Deterministic
for a given seed. No third-party pixels are involved.
"""

from __future__ import annotations

import numpy as np
import tifffile
from scipy import ndimage as ndi

GLASS = np.array([242, 242, 244], np.float32)
EOSIN = np.array([232, 160, 205], np.float32)
HEMATOXYLIN = np.array([85, 55, 140], np.float32)


def make_he_image(width: int, height: int, mpp: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 image, nuclei label mask) of a synthetic H&E field at ``mpp`` µm/px."""
    rng = np.random.default_rng(seed)
    # tissue islands: smoothed noise, thresholded
    coarse = rng.random((max(4, height // 256), max(4, width // 256)))
    field = ndi.zoom(coarse, (height / coarse.shape[0], width / coarse.shape[1]), order=3)[:height, :width]
    field = ndi.gaussian_filter(field, 8)
    tissue = field > np.quantile(field, 0.45)
    # keep a band of glass around the border, like a real section
    b = max(8, min(width, height) // 20)
    tissue[:b] = tissue[-b:] = False
    tissue[:, :b] = tissue[:, -b:] = False
    texture = ndi.gaussian_filter(rng.standard_normal((height, width)).astype(np.float32), 2) * 40
    img = np.where(tissue[..., None], EOSIN + texture[..., None] * np.array([0.3, 1.0, 0.5]), GLASS)
    # nuclei: ellipses of 6-9 µm diameter, only inside tissue
    labels = np.zeros((height, width), np.int32)
    area_um2 = float(tissue.sum()) * mpp * mpp
    n = int(area_um2 / 150)  # about one nucleus per 12 x 12 µm of tissue
    ys, xs = np.nonzero(tissue)
    pick = rng.choice(len(ys), size=min(n, len(ys)), replace=False) if len(ys) else []
    for i, j in enumerate(pick, start=1):
        cy, cx = ys[j], xs[j]
        ry = rng.uniform(3, 4.5) / mpp
        rx = rng.uniform(3, 4.5) / mpp
        y0, y1 = int(max(0, cy - ry - 1)), int(min(height, cy + ry + 2))
        x0, x1 = int(max(0, cx - rx - 1)), int(min(width, cx + rx + 2))
        yy, xx = np.mgrid[y0:y1, x0:x1]
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        labels[y0:y1, x0:x1][inside & (labels[y0:y1, x0:x1] == 0)] = i
    nuc = labels > 0
    chrom = 0.8 + 0.2 * rng.random(height * width).reshape(height, width).astype(np.float32)
    img = np.where(nuc[..., None], HEMATOXYLIN * chrom[..., None] + texture[..., None] * 0.3, img)
    img = ndi.gaussian_filter(img, (0.7, 0.7, 0))
    return np.clip(img, 0, 255).astype(np.uint8), labels


def write_pyramid_tiff(
    path: str, img: np.ndarray, mpp: float, tile: int = 256, min_size: int = 256, compression: str = "jpeg"
) -> None:
    """Tiled pyramidal RGB TIFF, levels downsampled by 2 (box filter) as successive IFDs."""
    levels = [img]
    while max(levels[-1].shape[:2]) > min_size * 2:
        a = levels[-1].astype(np.float32)
        h, w = (a.shape[0] // 2) * 2, (a.shape[1] // 2) * 2
        a = a[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3))
        levels.append(np.round(a).astype(np.uint8))
    with tifffile.TiffWriter(path, bigtiff=False) as tif:
        for i, lvl in enumerate(levels):
            lvl_mpp = mpp * img.shape[1] / lvl.shape[1]
            tif.write(
                lvl,
                tile=(tile, tile),
                photometric="rgb",
                compression=compression,
                resolution=(1e4 / lvl_mpp, 1e4 / lvl_mpp),
                resolutionunit="CENTIMETER",
                subfiletype=0 if i == 0 else 1,
                description="wsiseg synthetic H&E example slide" if i == 0 else None,
            )


def make_example_slide(path: str, width: int = 4096, height: int = 3072, mpp: float = 0.25, seed: int = 0) -> None:
    img, _ = make_he_image(width, height, mpp, seed)
    write_pyramid_tiff(path, img, mpp)
