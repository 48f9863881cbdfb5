"""Shape and stain measurements of objects, computed tile by tile as scikit-image's
``regionprops`` computes them on a labelling of the whole mask.

Every measurement here is either a sum over an object's pixels, so that the pieces of an
object cut by tile borders add up (area, second moments, stain), or is made exactly
mergeable (perimeter, convex hull):

* **perimeter**: ``skimage.measure.perimeter(image, 4)``: each pixel on the object's
  4-connected border adds 1, √2 or (1 + √2)/2 by the border pixels around it. A pixel's
  weight depends on the object within 2 px of it, and within that distance every pixel
  of the object's class *is* the object (8-connected), so it is a function of the
  class mask alone. :class:`PerimeterBands` gives each pixel its weight once, with its
  full neighbourhood, lagging 2 px behind the tiles it is shown (rows of the previous
  row of tiles and columns of the previous tile are kept); weights are counted per
  weight class (integers), so the sum does not depend on how the mask was tiled.
* **convex hull** (solidity): ``skimage.morphology.convex_hull_image``: the hull of the
  diamonds of the object's pixels (pixel centre ± 0.5 along each axis), and the pixel
  centres inside it or on its border. The hull of a union is the hull of the pieces'
  hulls, so a piece cut by a tile border keeps only its hull's vertices. Computed
  without a per-object Python loop: the hull between its top and bottom is bounded on
  the left by the convex minorant of the pixels' leftmost diamond vertices, on the
  right by the concave majorant of the rightmost ones (:func:`chain`), and the pixel
  centres inside are counted row by row in exact integer arithmetic (:func:`hull_pixels`).
* **ellipse** (major/minor axis, eccentricity, orientation): from the second central
  moments, as regionprops' inertia tensor.
* **stain**: haematoxylin and eosin optical density by colour deconvolution with the
  classical model's stain matrix (:func:`stain_od`).

Coordinates are (y, x) pixel indices; doubled integer coordinates (``y2 = 2 y``) make
the diamonds' vertices (half-integers) exact. This module imports nothing of ours.
"""

from __future__ import annotations

import math

import numpy as np

# ---------------------------------------------------------------- perimeter
#: weight class of each value of the convolved border image (skimage.measure.perimeter's table):
#: 1 -> 1, 2 -> √2, 3 -> (1 + √2) / 2; 0 for pixels that add nothing
WEIGHT_CLASS = np.zeros(50, np.uint8)
WEIGHT_CLASS[[5, 7, 15, 17, 25, 27]] = 1
WEIGHT_CLASS[[21, 33]] = 2
WEIGHT_CLASS[[13, 23]] = 3
PERIMETER_WEIGHTS = np.array([1.0, math.sqrt(2), (1 + math.sqrt(2)) / 2])  # of weight classes 1, 2, 3
HALO = 2  # a pixel's perimeter weight depends on the object within this many px


def perimeter_weights(ext: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The pixels of ``ext[2:-2, 2:-2]`` that add to the perimeter of their class's objects
    (flat indices into that part) and their weight classes (1-3); ``ext`` holds class
    indices, 0 = background, with a 2 px frame around.

    As ``skimage.measure.perimeter``: a pixel is on the border when one of its 4 neighbours
    is not of the object; a border pixel's weight class is :data:`WEIGHT_CLASS` of
    1 + 2 x (4-neighbours on the border) + 10 x (diagonal neighbours on the border).
    """
    idxs, wcs = [np.zeros(0, np.int64)], [np.zeros(0, np.uint8)]
    for k in range(1, n_classes):
        image = ext == k
        if not image[HALO:-HALO, HALO:-HALO].any():
            continue
        c = image[1:-1, 1:-1]  # 1 px in from ext's edge: its 4 neighbours are in ext
        border = c & ~(image[:-2, 1:-1] & image[2:, 1:-1] & image[1:-1, :-2] & image[1:-1, 2:])
        bw = border.shape[1]
        flat = border.ravel()
        idx = np.flatnonzero(border[1:-1, 1:-1])  # border pixels of the inner part
        r, q = np.divmod(idx, bw - 2)
        at = (r + 1) * bw + q + 1  # the same pixels in ``border``'s flat index
        four = flat[at - bw].astype(np.uint8) + flat[at + bw] + flat[at - 1] + flat[at + 1]
        diag = flat[at - bw - 1].astype(np.uint8) + flat[at - bw + 1] + flat[at + bw - 1] + flat[at + bw + 1]
        wc = WEIGHT_CLASS[1 + 2 * four + 10 * diag]
        adds = wc > 0
        idxs.append(idx[adds])
        wcs.append(wc[adds])
    return np.concatenate(idxs), np.concatenate(wcs)


class PerimeterBands:
    """Perimeter weight classes of every pixel of a mask shown tile by tile in raster order.

    The tile at (x, y) settles the pixels of rows [y - 2, y + h - 2) x columns
    [x - 2, x + w - 2) (to the mask's right edge for the last tile of a row): their
    neighbourhood, 2 px further on every side, is then known. The last 2 rows of the mask
    are settled by :meth:`finish`. Memory: 4 rows of the mask's width and one tile.
    """

    def __init__(self, width: int, n_classes: int):
        self.width, self.n_classes = width, n_classes
        self.row_y = None
        # the last rows seen of each column: classes of 4 (context), piece ids of 2 (settled later)
        self.next_cls, self.next_ids = np.zeros((4, width), np.uint8), np.zeros((2, width), np.int64)

    def tile(self, x: int, y: int, t: np.ndarray, lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``t``: the tile's class indices; ``lab``: its pixels' piece ids (0 = none).
        Returns (piece id, weight class) of the settled pixels that add to a perimeter."""
        h, w = t.shape
        if y != self.row_y:  # a new row of tiles: the previous one's last rows are above
            self.row_y = y
            self.above_cls, self.above_ids = self.next_cls, self.next_ids
            self.next_cls, self.next_ids = np.zeros_like(self.above_cls), np.zeros_like(self.above_ids)
            self.left_cls, self.left_ids = np.zeros((h + 4, 4), np.uint8), np.zeros((h, 2), np.int64)
        col_cls = np.vstack([self.above_cls[:, x : x + w], t])  # rows y - 4 .. y + h
        ext = np.hstack([self.left_cls, col_cls])  # columns x - 4 .. x + w
        left_ids = self.left_ids  # the previous tile's last 2 columns (rows y .. y + h)
        self.left_cls = ext[:, -4:]
        self.left_ids = lab[:, -2:] if w >= 2 else np.hstack([left_ids, lab])[:, -2:]
        self.next_cls[:, x : x + w] = col_cls[-4:]
        self.next_ids[:, x : x + w] = lab[-2:] if h >= 2 else np.vstack([self.above_ids[:, x : x + w], lab])[-2:]
        if not ext.any():
            return np.zeros(0, np.int64), np.zeros(0, np.uint8)
        if x + w >= self.width:  # the last tile of its row: settle the mask's last 2 columns too
            ext = np.pad(ext, ((0, 0), (0, 2)))
        idx, wc = perimeter_weights(ext, self.n_classes)
        i, j = np.divmod(idx, ext.shape[1] - 4)  # in the settled block: rows y - 2 + i, columns x - 2 + j
        ids = np.empty(len(idx), np.int64)
        top = i < 2  # rows of the previous row of tiles
        ids[top] = self.above_ids[i[top], x - 2 + j[top]]
        left = ~top & (j < 2)  # columns of the previous tile
        ids[left] = left_ids[i[left] - 2, j[left]]
        rest = ~top & ~left
        ids[rest] = lab[i[rest] - 2, j[rest] - 2]
        return ids, wc

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """The mask's last 2 rows (after the last tile)."""
        idx, wc = perimeter_weights(np.pad(self.next_cls, ((0, 2), (2, 2))), self.n_classes)
        return self.next_ids.ravel()[idx], wc


# ---------------------------------------------------------------- convex hull
def _starts(*keys) -> np.ndarray:
    """Where each run of equal (sorted) keys starts."""
    new = np.ones(len(keys[0]), bool)
    if len(new) > 1:
        new[1:] = np.logical_or.reduce([k[1:] != k[:-1] for k in keys])
    return np.flatnonzero(new)


def row_extremes(obj: np.ndarray, row: np.ndarray, col: np.ndarray):
    """(obj, row, leftmost col, rightmost col) for each row of each object, sorted by
    object then row; the input are an object's pixels in raster order (row, then col)."""
    key = obj.astype(np.int64) * (int(row.max()) + 1) + row
    order = np.argsort(key, kind="stable")  # stable: columns stay increasing within a group
    sk = key[order]
    first = _starts(sk)
    last = np.append(first[1:], len(sk)) - 1
    return obj[order[first]], row[order[first]], col[order[first]], col[order[last]]


def side_points(obj, row, xl, xr):
    """The diamonds' leftmost and rightmost vertices per doubled row ``y2``: left (obj, y2,
    x2 = min) and right (obj, y2, x2 = max), each sorted by object then y2. Rows as
    :func:`row_extremes` gives them (several pieces may give the same object's row)."""
    y2 = np.concatenate([2 * row - 1, 2 * row, 2 * row + 1])
    o3 = np.concatenate([obj, obj, obj])
    left = np.concatenate([2 * xl, 2 * xl - 1, 2 * xl])
    right = np.concatenate([2 * xr, 2 * xr + 1, 2 * xr])
    return extreme_per_row(o3, y2, left, np.minimum), extreme_per_row(o3, y2, right, np.maximum)


def extreme_per_row(obj, y2, x2, ufunc):
    """One point per object and doubled row: the smallest x2 (``ufunc`` np.minimum) or the
    largest (np.maximum); sorted by object, then y2."""
    if not len(obj):
        return obj, y2, x2
    order = np.lexsort((y2, obj))
    obj, y2, x2 = obj[order], y2[order], x2[order]
    first = _starts(obj, y2)
    return obj[first], y2[first], ufunc.reduceat(x2, first)


def chain(obj, y2, x2, left: bool):
    """Vertices of the hull's left chain (the convex minorant of x over y: ``left``) or right
    chain (concave majorant) of each object's points, sorted by object then y2 (one point per
    y2). Points that lie on or beyond the chord of their two neighbours are not vertices;
    all such are dropped at once, over all objects, until none is left."""
    s = 1 if left else -1
    obj, y2, x2 = (np.asarray(a, np.int64) for a in (obj, y2, x2))
    while True:
        if len(obj) < 3:
            return obj, y2, x2
        same = (obj[:-2] == obj[1:-1]) & (obj[1:-1] == obj[2:])
        p, i, n = slice(0, -2), slice(1, -1), slice(2, None)
        # x_i on or beyond the chord from p to n (for the left chain: >= the chord)
        beyond = s * ((x2[i] - x2[p]) * (y2[n] - y2[p]) - (y2[i] - y2[p]) * (x2[n] - x2[p])) >= 0
        drop = same & beyond
        if not drop.any():
            return obj, y2, x2
        keep = np.concatenate([[True], ~drop, [True]])
        obj, y2, x2 = obj[keep], y2[keep], x2[keep]


def chain_x_at(obj, y2, x2, q_obj, q_y2, left: bool) -> np.ndarray:
    """Along each object's chain (:func:`chain`), the pixel columns inside at doubled row
    ``q_y2`` (even): for the left chain the first column at or right of it, for the right
    chain the last at or left of it. Exact (integer arithmetic)."""
    span = int(max(y2.max(), q_y2.max()) - min(y2.min(), q_y2.min())) + 2 if len(y2) else 1
    base = int(min(y2.min(), q_y2.min())) if len(y2) else 0
    key = obj * span + (y2 - base)
    # the chain's segment [j, j + 1] with y2[j] <= q < y2[j + 1] (q lies strictly between the
    # chain's ends: the top and bottom rows' diamond tips)
    j = np.searchsorted(key, q_obj * span + (q_y2 - base), side="right") - 1
    y0, x0, y1, x1 = y2[j], x2[j], y2[j + 1], x2[j + 1]
    d = y1 - y0  # > 0
    num = x0 * d + (q_y2 - y0) * (x1 - x0)  # x2 at q_y2 = num / d; the column c has x2 = 2c
    return -((-num) // (2 * d)) if left else num // (2 * d)


def hull_pixels(left, right) -> tuple[np.ndarray, np.ndarray]:
    """(object, pixel centres inside or on the convex hull) from each object's left and right
    chains (:func:`chain`), as ``convex_hull_image(...).sum()`` counts them."""
    lo, ly, lx = left
    ro, ry, rx = right
    if not len(lo):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    first = _starts(lo)
    objs = lo[first]
    top, bottom = ly[first], ly[np.append(first[1:], len(lo)) - 1]  # odd: the top / bottom rows' diamond tips
    n_rows = (bottom - top) // 2
    q_obj = np.repeat(objs, n_rows)
    q_y2 = np.repeat(top + 1, n_rows) + 2 * (np.arange(n_rows.sum()) - np.repeat(np.cumsum(n_rows) - n_rows, n_rows))
    c0 = chain_x_at(lo, ly, lx, q_obj, q_y2, left=True)
    c1 = chain_x_at(ro, ry, rx, q_obj, q_y2, left=False)
    return objs, np.bincount(np.repeat(np.arange(len(objs)), n_rows), weights=c1 - c0 + 1, minlength=len(objs)).astype(
        np.int64
    )


# ---------------------------------------------------------------- ellipse
def ellipse(n, sxx, syy, sxy, sx, sy):
    """(major axis, minor axis, eccentricity, orientation in degrees) from each object's pixel
    count and sums of x², y², xy, x and y (any origin), as regionprops computes them from
    its inertia tensor; lengths in px. Orientation: counter-clockwise from the x axis as the
    image is shown (y down), in (-90, 90]: regionprops' ``orientation`` (from the row axis)
    minus 90°. An isotropic object (equal variances) follows regionprops' rule: 45°, or
    -45° when x and y covary positively."""
    n, sxx, syy, sxy, sx, sy = (np.asarray(v, np.float64) for v in (n, sxx, syy, sxy, sx, sy))
    # n² x the central moments: exact while the sums are exact integers below 2**53
    cxx, cyy, cxy = n * sxx - sx * sx, n * syy - sy * sy, n * sxy - sx * sy
    n2 = np.maximum(n * n, 1)
    a, c, b = cxx / n2, cyy / n2, -cxy / n2  # regionprops' inertia tensor [[a, b], [b, c]]
    half_tr = (a + c) / 2
    root = np.hypot((a - c) / 2, b)
    l1 = np.maximum(half_tr + root, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        l2 = np.where(l1 > 0, np.maximum((a * c - b * b) / l1, 0), 0.0)
        ecc = np.where(l1 > 0, np.sqrt(np.maximum(1 - l2 / l1, 0)), 0.0)
    theta = np.where(cxx == cyy, np.where(b < 0, math.pi / 4, -math.pi / 4), 0.5 * np.arctan2(-2 * b, c - a))
    deg = np.degrees(theta)
    return 4 * np.sqrt(l1), 4 * np.sqrt(l2), ecc, np.where(deg > 0, deg - 90, deg + 90)


# ---------------------------------------------------------------- stain
def hed_from_rgb() -> np.ndarray:
    """The stain matrix the classical model deconvolves with (scikit-image's ``hed_from_rgb``:
    Ruifrok and Johnston's haematoxylin, eosin and DAB vectors)."""
    from skimage.color import hed_from_rgb as m

    return np.asarray(m, np.float64)


def stain_od(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(haematoxylin, eosin) optical density of RGB pixels (n, 3) in 0..255: the base-10
    optical density of each channel, -log10(max(I / 255, 1e-6)), deconvolved with
    :func:`hed_from_rgb`, negative values set to 0. This is 6 x ``skimage.color.rgb2hed(rgb / 255)``,
    the channel the classical model thresholds (rgb2hed divides by -log10(1e-6) = 6).
    Whole-number pixels (a slide read without resampling) take the same values from a table."""
    planes = np.ascontiguousarray(np.asarray(rgb).reshape(-1, 3).T)  # (3, n): one channel after the other
    if planes.dtype == np.uint8 or (
        planes.size and planes.min() >= 0 and planes.max() <= 255 and np.array_equal(planes, np.floor(planes))
    ):
        od = _od_table()[planes.astype(np.uint8)]
    else:
        od = -np.log10(np.maximum(planes.astype(np.float64) / 255.0, 1e-6))
    stains = hed_from_rgb()[:, :2].T @ od  # (2, n); far faster than (n, 3) @ (3, 2)
    np.maximum(stains, 0, out=stains)
    return stains[0], stains[1]


def _od_table() -> np.ndarray:
    """-log10(max(I / 255, 1e-6)) of I = 0..255, as :func:`stain_od` computes it."""
    return -np.log10(np.maximum(np.arange(256, dtype=np.float64) / 255.0, 1e-6))


# ---------------------------------------------------------------- neighbours
def neighbours(x, y, radius: float, chunk: int = 100_000) -> tuple[np.ndarray, np.ndarray]:
    """(number of other points within ``radius``, inclusive; distance to the nearest other
    point, NaN when there is none) for points (x, y): a KD-tree, queried ``chunk`` points at
    a time (memory linear in the points)."""
    from scipy.spatial import cKDTree

    pts = np.column_stack([x, y]).astype(np.float64)
    count = np.zeros(len(pts), np.int64)
    nearest = np.full(len(pts), np.nan)
    if len(pts) < 2:
        return count, nearest
    tree = cKDTree(pts)
    for i in range(0, len(pts), chunk):
        q = pts[i : i + chunk]
        count[i : i + chunk] = tree.query_ball_point(q, radius, return_length=True) - 1  # less itself
        nearest[i : i + chunk] = tree.query(q, k=2)[0][:, 1]
    return count, nearest
