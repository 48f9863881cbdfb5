"""Training augmentation, applied identically to an image and its targets.

One coordinate map per crop combines a small scale change, an elastic deformation
(random displacements on a coarse grid, smoothly interpolated with cubic splines, as
in the U-Net paper), a 90-degree rotation and flips. The image is sampled with
linear interpolation, label maps with nearest neighbour, float maps (weights)
linearly, all from the same map, so image and target cannot drift apart.
Colour: stain jitter in HED space (Ruifrok & Johnston) plus brightness/contrast.
Optics and sensor (off by default): Gaussian blur of random strength before the
colour jitter, Gaussian pixel noise after it, the "morphology" augmentation that
Tellez et al. (2019, Med Image Anal 58:101544) found to help most across scanners
and labs together with strong HED jitter. They touch the image only, never the
targets; with ``blur`` and ``noise`` at 0 no random numbers are drawn for them, so
older runs reproduce exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

# Ruifrok & Johnston H&E-DAB stain vectors (rows: H, E, DAB), as in skimage.color
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], np.float64)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)


@dataclass
class AugmentConfig:
    scale: float = 0.1  # scale drawn from [1 - scale, 1 + scale]
    elastic_sigma: float = 6.0  # px std of the coarse displacements
    elastic_grid: int = 3  # coarse grid points per side
    flips: bool = True
    rot90: bool = True
    hed_sigma: float = 0.04  # multiplicative jitter per stain channel
    hed_bias: float = 0.01  # additive jitter per stain channel (optical density)
    brightness: float = 0.06
    contrast: float = 0.08
    blur: float = 0.0  # Gaussian blur, sigma (px) drawn from [0, blur]
    noise: float = 0.0  # Gaussian pixel noise, std (of the 0-1 range) drawn from [0, noise]


def elastic_field(shape, grid: int, sigma: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Smooth displacement field (dy, dx) of ``shape``: coarse normal grid, cubic-upsampled."""
    h, w = shape
    if sigma <= 0:
        return np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    out = []
    for _ in range(2):
        coarse = rng.normal(0.0, sigma, (grid, grid))
        zy, zx = h / grid, w / grid
        # cubic spline through the coarse points, sampled at every pixel
        ys = (np.arange(h) + 0.5) / zy - 0.5
        xs = (np.arange(w) + 0.5) / zx - 0.5
        yy, xx = np.meshgrid(ys, xs, indexing="ij")
        out.append(ndi.map_coordinates(coarse, [yy, xx], order=3, mode="nearest").astype(np.float32))
    return out[0], out[1]


def sample_coords(src_shape, out: int, cfg: AugmentConfig, rng: np.random.Generator, centre=None):
    """Source coordinates (2, out, out) of an augmented ``out`` x ``out`` crop."""
    h, w = src_shape
    s = 1.0 + rng.uniform(-cfg.scale, cfg.scale) if cfg.scale > 0 else 1.0
    if centre is None:
        centre = (rng.uniform(0, h), rng.uniform(0, w))
    g = (np.arange(out, dtype=np.float32) - (out - 1) / 2) / s
    yy, xx = np.meshgrid(g, g, indexing="ij")
    if cfg.rot90:
        k = int(rng.integers(4))
        yy, xx = np.rot90(yy, k), np.rot90(xx, k)
    if cfg.flips and rng.random() < 0.5:
        xx = xx[:, ::-1]
        yy = yy[:, ::-1]
    dy, dx = elastic_field((out, out), cfg.elastic_grid, cfg.elastic_sigma, rng)
    return np.stack([yy + centre[0] + dy, xx + centre[1] + dx])


def warp(arr: np.ndarray, coords: np.ndarray, order: int) -> np.ndarray:
    """Sample ``arr`` (H, W[, C]) at ``coords`` with mirrored borders."""
    if arr.ndim == 2:
        return ndi.map_coordinates(arr, coords, order=order, mode="mirror").astype(arr.dtype, copy=False)
    return np.stack([warp(arr[..., c], coords, order) for c in range(arr.shape[-1])], axis=-1)


def hed_jitter(img: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Perturb haematoxylin/eosin/DAB amounts, then brightness and contrast."""
    rgb = np.maximum(img.astype(np.float32), 1.0) / 255.0
    od = -np.log(rgb)
    hed = od.reshape(-1, 3) @ HED_FROM_RGB
    a = 1.0 + rng.normal(0, cfg.hed_sigma, 3)
    b = rng.normal(0, cfg.hed_bias, 3)
    hed = hed * a + b
    rgb = np.exp(-(hed @ RGB_FROM_HED)).reshape(img.shape)
    rgb = (rgb - 0.5) * (1 + rng.uniform(-cfg.contrast, cfg.contrast)) + 0.5
    rgb = rgb + rng.uniform(-cfg.brightness, cfg.brightness)
    return (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8)


def blur_image(img: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of each channel (sigma in px), mirrored at the crop's edges."""
    if sigma <= 0:
        return img
    out = ndi.gaussian_filter(img.astype(np.float32), (sigma, sigma, 0), mode="mirror")
    return (np.clip(out, 0, 255) + 0.5).astype(np.uint8)


def add_noise(img: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """Independent Gaussian noise per pixel and channel (std of the 0-1 range)."""
    if std <= 0:
        return img
    out = img.astype(np.float32) + rng.normal(0.0, std * 255.0, img.shape).astype(np.float32)
    return (np.clip(out, 0, 255) + 0.5).astype(np.uint8)


def augment(
    image: np.ndarray,
    labels: list[np.ndarray],
    out: int,
    cfg: AugmentConfig,
    rng,
    centre=None,
    float_maps: list[np.ndarray] = (),
):
    """One augmented crop: (image, [label maps], [float maps])."""
    coords = sample_coords(image.shape[:2], out, cfg, rng, centre)
    img = warp(image, coords, 1)
    if cfg.blur > 0:
        img = blur_image(img, rng.uniform(0.0, cfg.blur))
    img = hed_jitter(img, cfg, rng)
    if cfg.noise > 0:
        img = add_noise(img, rng.uniform(0.0, cfg.noise), rng)
    labs = [warp(lab, coords, 0) for lab in labels]
    floats = [warp(f, coords, 1) for f in float_maps]
    return img, labs, floats
