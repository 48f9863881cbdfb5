"""From class probabilities to object instances, and the classical baseline.

U-Net (3-class: background / interior / boundary): the object mask is where the
background probability is low; seeds are connected interiors; a marker watershed
on the interior probability grows each seed to fill its object, so touching
objects come apart along the predicted boundary.

Classical baseline (no GPU, no training): colour deconvolution to the
haematoxylin channel, Otsu threshold, morphological opening, hole filling, then a
distance-transform watershed to split touching nuclei.

Sizes are in µm² so that the same settings work at any mpp.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.color import rgb2hed
from skimage.feature import peak_local_max
from skimage.filters import threshold_otsu
from skimage.morphology import disk
from skimage.segmentation import watershed

from .labels import relabel
from .postparams import InstanceParams  # its settings, kept apart: the plan stage needs no scikit-image

MAX_HOLE_UM2 = 100.0  # holes up to this area are filled: inside a nucleus, not a ring of nuclei


def fill_small_holes(mask: np.ndarray, mpp: float, max_um2: float = MAX_HOLE_UM2) -> np.ndarray:
    """Fill holes of at most ``max_um2``. Unbounded filling would turn a ring of touching
    nuclei (around a gland's lumen, say) into one object, and would depend on how much of
    the slide is in view, which differs between a tile and the whole slide."""
    holes, n = ndi.label(~mask)
    if n == 0:
        return mask
    sizes = np.bincount(holes.ravel())
    small = sizes <= max_um2 / (mpp * mpp)
    small[0] = False
    # a background region that touches the image edge is not a hole
    edge = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
    small[edge] = False
    return mask | small[holes]


def remove_small(ids: np.ndarray, min_px: int) -> np.ndarray:
    """Objects of fewer than ``min_px`` px removed, the rest renumbered 1..N in the order of
    their ids (as :func:`wsiseg.labels.relabel` numbers them), in one lookup."""
    if min_px <= 1 or ids.max() == 0:
        return ids
    keep = np.bincount(ids.ravel()) >= min_px
    keep[0] = False
    lut = np.cumsum(keep, dtype=np.int32)  # rank of each kept id
    lut[~keep] = 0
    return lut[ids]


def instances_from_probs(prob: np.ndarray, mpp: float, params: InstanceParams | None = None) -> np.ndarray:
    """Instance ids (H, W) from softmax probabilities (3, H, W) at ``mpp`` µm/px."""
    params = params or InstanceParams()
    px = 1.0 / (mpp * mpp)  # px per µm²
    fg = prob[0] < 1.0 - params.fg_threshold
    fg = fill_small_holes(fg, mpp)
    seeds, _ = ndi.label((prob[1] > params.seed_threshold) & fg)
    seeds = remove_small(seeds, int(round(params.min_seed_um2 * px)))
    ids = watershed(-prob[1], markers=seeds, mask=fg)
    # object pixels no seed reached (e.g. small or boundary-only blobs) become objects of their own
    rest, n = ndi.label(fg & (ids == 0))
    if n:
        ids = np.where(rest > 0, rest + ids.max(), ids)
    return remove_small(ids.astype(np.int32), int(round(params.min_object_um2 * px)))


def separated_mask(ids: np.ndarray, crop: tuple[slice, slice] | None = None) -> np.ndarray:
    """Binary object mask (uint8) in which different objects never touch, not even diagonally.

    Pixels with an 8-neighbour of another object are cleared, so that counting
    8-connected components of the mask counts the objects. ``crop`` (two slices): only
    that part of the mask, computed from it and its 1-px surround (the same pixels as
    cropping the whole mask).
    """
    if crop is not None:
        h, w = ids.shape
        ys, xs = (s.indices(n) for s, n in zip(crop, (h, w)))
        y0, y1, x0, x1 = max(ys[0] - 1, 0), min(ys[1] + 1, h), max(xs[0] - 1, 0), min(xs[1] + 1, w)
        return separated_mask(ids[y0:y1, x0:x1])[ys[0] - y0 : ys[1] - y0, xs[0] - x0 : xs[1] - x0]
    obj = ids > 0
    clash = np.zeros(ids.shape, bool)
    # each of the 4 forward directions, pair by pair: two touching pixels of different objects both clash
    for a, b in (
        ((slice(None), slice(None, -1)), (slice(None), slice(1, None))),  # right
        ((slice(None, -1), slice(None)), (slice(1, None), slice(None))),  # down
        ((slice(None, -1), slice(None, -1)), (slice(1, None), slice(1, None))),  # down-right
        ((slice(None, -1), slice(1, None)), (slice(1, None), slice(None, -1))),  # down-left
    ):
        pair = obj[a] & obj[b] & (ids[a] != ids[b])
        clash[a] |= pair
        clash[b] |= pair
    return (obj & ~clash).astype(np.uint8)


@dataclass
class BaselineParams:
    """Defaults chosen on the MICCAI 2015 training images (mean AJI), never on a test set."""

    smooth_um: float = 1.0  # Gaussian sigma on the haematoxylin channel
    opening_um: float = 0.5  # radius of the opening disk
    min_object_um2: float = 10.0
    min_distance_um: float = 2.5  # between watershed markers (distance-transform maxima)

    def as_dict(self) -> dict:
        return asdict(self)


def haematoxylin(rgb: np.ndarray, mpp: float, params: BaselineParams) -> np.ndarray:
    """Haematoxylin optical density (colour deconvolution), Gaussian-smoothed."""
    return ndi.gaussian_filter(rgb2hed(rgb)[..., 0], params.smooth_um / mpp)


def classical_instances(
    rgb: np.ndarray, mpp: float, params: BaselineParams | None = None, threshold: float | None = None
) -> np.ndarray:
    """Haematoxylin + Otsu + opening + distance-transform watershed (instance ids).

    ``threshold`` on the smoothed haematoxylin channel; None = Otsu's threshold of
    this image (right for a labeled tile; a whole slide uses one threshold for all
    its tiles, see :mod:`wsiseg.classical`).
    """
    params = params or BaselineParams()
    h = haematoxylin(rgb, mpp, params)
    mask = h > (threshold_otsu(h) if threshold is None else threshold)
    r = max(1, int(round(params.opening_um / mpp)))
    mask = ndi.binary_opening(mask, structure=disk(r))
    mask = fill_small_holes(mask, mpp)
    blobs, _ = ndi.label(mask)
    blobs = remove_small(blobs, int(round(params.min_object_um2 / (mpp * mpp))))
    mask = blobs > 0
    dist = ndi.distance_transform_edt(mask)
    peaks = peak_local_max(
        dist, min_distance=max(1, int(round(params.min_distance_um / mpp))), labels=blobs, exclude_border=False
    )
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    ids = watershed(-dist, markers=markers, mask=mask)
    return relabel(ids.astype(np.int32))
