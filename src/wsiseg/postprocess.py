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


#: context around a tile's write region in which :func:`separated_labels` first tries to decide
#: its objects (µm; 32 px at 0.5 µm/px): a nucleus and its neighbours. Any value gives the same
#: mask; a larger one decides more tiles there and costs more on each.
CONTEXT_UM = 16.0


def separated_labels(prob: np.ndarray, mpp: float, params: InstanceParams, crop: tuple[slice, slice]) -> np.ndarray:
    """``separated_mask(instances_from_probs(prob, mpp, params), crop)``, equal bit for bit.

    The segment stage's per-tile work: only objects that reach the write region (``crop``) or
    its 1-px surround matter, and on most tiles they, and everything that decides them, lie
    within :data:`CONTEXT_UM` of it. Those tiles are computed on that part of the window alone
    (about 60 % of its area for the shipped model); a tile where that cannot be shown is
    computed over the whole window (:func:`_separated_in_context` says when).
    """
    margin = int(np.ceil(CONTEXT_UM / mpp))
    mask, _ = _separated_in_context(prob, mpp, params, crop, margin)
    if mask is None:
        mask = separated_mask(instances_from_probs(prob, mpp, params), crop)
    return mask


def _separated_in_context(prob, mpp, params, crop, margin) -> tuple[np.ndarray | None, str]:
    """(the mask of :func:`separated_labels`, "context") computed on C, the crop's 1-px surround
    R grown by ``margin`` px within the window; (None, why) when C cannot decide it.

    Why the result is the whole window's: the output depends only on the objects of the
    4-connected foreground components that touch R (the relevant ones), and every step after
    the hole filling works per component: seeds and objects lie inside one; the watershed
    floods each component from its own seeds; the leftover components and the small-object
    filter are per component; renumbering does not change which px share an object. So C gives
    the window's result when (1) its relevant components are the window's, and (2) the
    watershed orders each component's px as it does over the window. The checks:

    - "reach": no relevant component touches a side of C inside the window. A component that
      does may go on outside C.
    - "unsure": holes (background regions of at most MAX_HOLE_UM2 not touching the window's
      edge) are the window's inside C, except a small background region cut by a side of C
      inside the window: C cannot tell whether it is closed further out. None of those may
      lie in R or touch a relevant component; then filling it or not changes no relevant
      component. With "reach", (1) follows.
    - "tie": scikit-image's watershed pops px by (value, order of entry). All seed px enter
      at order 0, so two seed px of one component with equal values leave in an order that
      depends on the heap's other contents, which differ between C and the window. Only seed
      px with a neighbour to flood act when they leave; if no two of those in one component
      have equal values, each component's px leave in the same relative order in both, so
      (2) holds.
    """
    h, w = prob.shape[1:]
    (cy0, cy1), (cx0, cx1) = ((s.start, s.stop) for s in crop)
    ry0, ry1, rx0, rx1 = max(cy0 - 1, 0), min(cy1 + 1, h), max(cx0 - 1, 0), min(cx1 + 1, w)
    y0, y1, x0, x1 = max(ry0 - margin, 0), min(ry1 + margin, h), max(rx0 - margin, 0), min(rx1 + margin, w)
    if (y0, y1, x0, x1) == (0, h, 0, w):
        return None, "window"  # C is the window: nothing to save
    inner = (y0 > 0, y1 < h, x0 > 0, x1 < w)  # which of C's sides (top, bottom, left, right) lie inside the window
    r = (slice(ry0 - y0, ry1 - y0), slice(rx0 - x0, rx1 - x0))

    fg = prob[0, y0:y1, x0:x1] < 1.0 - params.fg_threshold
    # filling holes only grows components: one that reaches out before it does after (a cheap
    # first test: a third of CMU-1-Small-Region's tiles go to the whole window here)
    comp, n = ndi.label(fg)
    relevant = _relevant(comp, n, r, inner)
    if relevant is None:
        return None, "reach"
    bg, n_bg = ndi.label(~fg)
    unsure = None
    if n_bg:
        small = np.bincount(bg.ravel()) <= MAX_HOLE_UM2 / (mpp * mpp)
        small[0] = False
        sides = (bg[0], bg[-1], bg[:, 0], bg[:, -1])
        cut = np.unique(np.concatenate([s for s, i in zip(sides, inner) if i]))
        unsure = np.zeros(n_bg + 1, bool)
        unsure[cut] = small[cut]
        unsure[0] = False
        small[np.unique(np.concatenate(sides))] = False
        if small.any():  # holes filled: components may have grown or merged
            fg = fg | small[bg]
            comp, n = ndi.label(fg)
            relevant = _relevant(comp, n, r, inner)
            if relevant is None:
                return None, "reach"
    mask = relevant[comp]
    if unsure is not None and unsure.any():
        pocket = unsure[bg]
        if pocket[r].any() or _touches(pocket, mask):
            return None, "unsure"

    p1 = prob[1, y0:y1, x0:x1]
    seeds, _ = ndi.label((p1 > params.seed_threshold) & mask)
    px = 1.0 / (mpp * mpp)
    seeds = remove_small(seeds, int(round(params.min_seed_um2 * px)))
    image = -p1
    if _seed_ties(seeds, mask, comp, image):
        return None, "tie"
    ids = watershed(image, markers=seeds, mask=mask)
    seeded = np.zeros(n + 1, bool)
    seeded[comp[seeds > 0]] = True
    alone = relevant & ~seeded  # components no seed reached: objects of their own
    if alone.any():
        ids = np.where(alone[comp], comp + ids.max(), ids)
    ids = remove_small(ids.astype(np.int32), int(round(params.min_object_um2 * px)))
    return separated_mask(ids, (slice(cy0 - y0, cy1 - y0), slice(cx0 - x0, cx1 - x0))), "context"


def _relevant(comp: np.ndarray, n: int, r: tuple, inner: tuple) -> np.ndarray | None:
    """Which of the ``n`` components of ``comp`` touch the region ``r`` (a bool lookup table by
    label); None when one of them touches a side of ``comp`` flagged in ``inner`` (top,
    bottom, left, right)."""
    relevant = np.zeros(n + 1, bool)
    relevant[comp[r]] = True
    relevant[0] = False
    for side, is_inner in zip((comp[0], comp[-1], comp[:, 0], comp[:, -1]), inner):
        if is_inner and relevant[side].any():
            return None
    return relevant


def _grow4(a: np.ndarray) -> np.ndarray:
    """``a`` (bool) and its 4-neighbours."""
    g = a.copy()
    g[1:] |= a[:-1]
    g[:-1] |= a[1:]
    g[:, 1:] |= a[:, :-1]
    g[:, :-1] |= a[:, 1:]
    return g


def _touches(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether a px of ``a`` is in ``b`` or 4-adjacent to one."""
    return bool((_grow4(a) & b).any())


def _seed_ties(seeds: np.ndarray, mask: np.ndarray, comp: np.ndarray, image: np.ndarray) -> bool:
    """Whether two seed px of one component, each with a 4-neighbour in ``mask`` that is no
    seed px (the ones that flood when they leave the watershed's heap), have equal values."""
    s = seeds > 0
    front = s & _grow4(mask & ~s)
    v, c = image[front], comp[front]
    order = np.lexsort((v, c))
    v, c = v[order], c[order]
    return bool(np.any((v[1:] == v[:-1]) & (c[1:] == c[:-1])))


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
