"""Objects of a label mask: counted tile by tile, merged across tile borders, numbered, tabled.

Objects are 8-connected components of one class. Each tile is labelled on its
own; components that touch across tile borders are merged with a union-find,
so an object crossing tile borders counts once, and its area, centroid and
bounding box are summed over its pieces (the per-object table, objects.csv.gz).
Memory: one tile, one row of labels the width of the mask, and one entry per
object. Positions here are in mask px (target px, :mod:`wsiseg.geometry`):
``mx0``/``my0`` is a bounding box's first px, ``mx1``/``my1`` one past its last.

Used by the stats stage (:mod:`wsiseg.stats`) and the outlines (:mod:`wsiseg.outlines`).
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterable, Iterator

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

S8 = np.ones((3, 3), bool)


class _Grow:
    """A growable 1-d numpy array (amortised appends; no Python object per entry)."""

    def __init__(self, dtype, first=0):
        self.a = np.zeros(1024, dtype)
        self.a[0] = first
        self.n = 1

    def extend(self, v) -> None:
        v = np.asarray(v, self.a.dtype)
        need = self.n + len(v)
        if need > len(self.a):
            self.a = np.concatenate([self.a, np.zeros(max(need, 2 * len(self.a)) - len(self.a), self.a.dtype)])
        self.a[self.n : need] = v
        self.n = need

    def get(self) -> np.ndarray:
        return self.a[: self.n]


class _UnionFind:
    def __init__(self):
        self._ids = _Grow(np.int64)  # parent of each id; id 0 = background

    @property
    def parent(self) -> np.ndarray:
        return self._ids.get()

    def add(self, n: int) -> None:
        start = self._ids.n
        self._ids.extend(np.arange(start, start + n, dtype=np.int64))

    def find(self, a: int) -> int:
        p = self.parent
        root = a
        while p[root] != root:
            root = p[root]
        while p[a] != root:
            p[a], a = root, p[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def roots(self) -> np.ndarray:
        p = self.parent
        while True:
            q = p[p]
            if np.array_equal(q, p):
                return p
            p = q


OBJECT_FIELDS = ("area", "sum_x", "sum_y", "mx0", "my0", "mx1", "my1")  # box in mask px


def count_objects(tiles: Iterable[tuple[int, int, np.ndarray]], width: int, n_classes: int, outlines=None) -> dict:
    """Per class k >= 1: pixel count, the pixel area of each object and its geometry.

    ``tiles`` are (x, y, tile) in mask px, in raster order (row of tiles by row of tiles, left to right),
    all tiles of a row having the same height.

    ``out[k]["objects"]`` holds one entry per object of class k, in the order objects
    are first met in raster order: ``area`` (px), ``cx``/``cy`` (centroid, px; pixel i
    spans [i, i + 1), so a one-pixel object at column 0 has cx = 0.5) and the bounding
    box ``mx0``/``my0`` (first px) and ``mx1``/``my1`` (one past the last), in mask px, and
    ``root``, the object's id in the union-find.

    ``outlines`` (a :class:`wsiseg.outlines.OutlineCollector`) is shown each tile with its
    components' ids and is given the union-find's roots after each row of tiles and at the end.
    """
    uf = _UnionFind()
    cls = _Grow(np.int16)  # class of each component (id 0 = background)
    comp = {f: _Grow(np.int64 if f in ("area", "mx0", "my0", "mx1", "my1") else np.float64) for f in OBJECT_FIELDS}
    pixels = np.zeros(n_classes, np.int64)
    prev_row = np.zeros(width, np.int64)  # ids of the last pixel row of the previous tile row
    cur_row = np.zeros(width, np.int64)
    left_col = None
    row_y = None
    for x, y, t in tiles:
        if y != row_y:  # new row of tiles
            if row_y is not None:
                if outlines is not None:
                    outlines.row_done(uf.roots(), cur_row)
                prev_row, cur_row = cur_row, np.zeros(width, np.int64)
            row_y, left_col = y, None
        t = np.asarray(t)
        h, w = t.shape
        pixels += np.bincount(t.ravel(), minlength=n_classes)[:n_classes]
        local = np.zeros(t.shape, np.int64)  # this tile's components, 1..m over all classes
        m = 0
        for k in range(1, n_classes):
            sel = t == k
            if not sel.any():
                continue
            lk, nk = ndi.label(sel, structure=S8)
            local[sel] = lk[sel] + m
            m += nk
            cls.extend(np.full(nk, k))
        base = cls.n - m  # global id of local component 1
        uf.add(m)
        lab = local  # -> global ids, in place
        if m:
            flat = local.reshape(-1)  # a view: writing to it updates lab
            nz = np.flatnonzero(flat)
            comp_of = flat[nz]
            area = np.bincount(comp_of, minlength=m + 1)[1:]
            comp["area"].extend(area)
            comp["sum_x"].extend(
                np.bincount(comp_of, weights=(nz % w).astype(np.float64), minlength=m + 1)[1:] + x * area
            )
            comp["sum_y"].extend(
                np.bincount(comp_of, weights=(nz // w).astype(np.float64), minlength=m + 1)[1:] + y * area
            )
            boxes = np.array(
                [(b[1].start, b[0].start, b[1].stop, b[0].stop) for b in ndi.find_objects(local)], np.int64
            ).reshape(-1, 4)
            for f, col, off in (("mx0", 0, x), ("my0", 1, y), ("mx1", 2, x), ("my1", 3, y)):
                comp[f].extend(boxes[:, col] + off)
            flat[nz] += base - 1
        cls_arr = cls.get()
        pairs = []
        if left_col is not None:  # vertical border with the tile on the left
            a, b = left_col, lab[:, 0]
            pairs += [(a, b), (a[:-1], b[1:]), (a[1:], b[:-1])]
        if y > 0:  # horizontal border with the row above (diagonals included)
            above = prev_row
            b = lab[0, :]
            pairs.append((above[x : x + w], b))
            if x > 0:
                pairs.append((above[x - 1 : x - 1 + w], b))
            else:
                pairs.append((above[: w - 1], b[1:]))
            right = above[x + 1 : x + 1 + w]
            pairs.append((right, b[: len(right)]))
        for a, b in pairs:
            ok = (a > 0) & (b > 0)
            if ok.any():
                a, b = a[ok], b[ok]
                same = cls_arr[a] == cls_arr[b]
                for u, v in set(zip(a[same].tolist(), b[same].tolist())):
                    uf.union(u, v)
        if outlines is not None:
            outlines.tile(x, y, lab, roots=uf.roots)
        left_col = lab[:, -1]
        cur_row[x : x + w] = lab[-1, :]
    roots = uf.roots()
    if outlines is not None:
        outlines.finish(roots)
    n = len(roots)
    c = {f: g.get() for f, g in comp.items()}
    total = np.bincount(roots, weights=c["area"], minlength=n).astype(np.int64)
    sum_x = np.bincount(roots, weights=c["sum_x"], minlength=n)
    sum_y = np.bincount(roots, weights=c["sum_y"], minlength=n)
    box = {}
    for f, ufunc, init in (
        ("mx0", np.minimum, np.iinfo(np.int64).max),
        ("my0", np.minimum, np.iinfo(np.int64).max),
        ("mx1", np.maximum, -1),
        ("my1", np.maximum, -1),
    ):
        box[f] = np.full(n, init, np.int64)
        ufunc.at(box[f], roots, c[f])
    cls_arr = cls.get()
    is_root = (roots == np.arange(n)) & (np.arange(n) > 0)
    out = {}
    for k in range(1, n_classes):
        sel = is_root & (cls_arr == k)
        area = total[sel]
        objects = dict(
            area=area,
            cx=sum_x[sel] / np.maximum(area, 1) + 0.5,
            cy=sum_y[sel] / np.maximum(area, 1) + 0.5,
            **{f: v[sel] for f, v in box.items()},
            root=np.flatnonzero(sel),
        )
        out[k] = dict(pixels=int(pixels[k]), object_areas=area, objects=objects)
    out[0] = dict(pixels=int(pixels[0]), object_areas=np.zeros(0, np.int64))
    return out


OBJECT_COLUMNS = [
    "slide_id",
    "object_id",
    "class",
    "area_um2",
    "equivalent_diameter_um",
    "centroid_x_um",
    "centroid_y_um",
    "centroid_x_px",
    "centroid_y_px",
    "bbox_x_px",
    "bbox_y_px",
    "bbox_width_px",
    "bbox_height_px",
]


def first_object_ids(counts: dict, n_classes: int) -> dict:
    """object_id of each class's first object: ids count from 1 over all classes >= 1,
    class by class, each in the order objects are first met in raster order."""
    first, next_id = {}, 1
    for k in range(1, n_classes):
        first[k] = next_id
        next_id += len(counts[k]["objects"]["area"])
    return first


def object_rows(
    counts: dict, classes: list, mpp: float, scale0: float, slide_id: str, chunk: int = 100_000
) -> Iterator[pd.DataFrame]:
    """The objects of every class >= 1 as tables of ``OBJECT_COLUMNS``, ``chunk`` rows at a time.

    Positions are on the slide: µm from its top-left corner, and level-0 px (the
    coordinates QuPath and OpenSlide use); ``scale0`` = level-0 px per mask px.
    object_id as :func:`first_object_ids` numbers them.
    """
    first = first_object_ids(counts, len(classes))
    for k, name in enumerate(classes):
        if k == 0:
            continue
        o = counts[k]["objects"]
        next_id = first[k]
        for i in range(0, len(o["area"]), chunk):
            c = {f: v[i : i + chunk] for f, v in o.items()}
            n = len(c["area"])
            area_um2 = c["area"] * mpp * mpp
            yield pd.DataFrame(
                {
                    "slide_id": slide_id,
                    "object_id": np.arange(next_id, next_id + n),
                    "class": name,
                    "area_um2": area_um2,
                    "equivalent_diameter_um": 2 * np.sqrt(area_um2 / np.pi),
                    "centroid_x_um": c["cx"] * mpp,
                    "centroid_y_um": c["cy"] * mpp,
                    "centroid_x_px": c["cx"] * scale0,
                    "centroid_y_px": c["cy"] * scale0,
                    "bbox_x_px": c["mx0"] * scale0,
                    "bbox_y_px": c["my0"] * scale0,
                    "bbox_width_px": (c["mx1"] - c["mx0"]) * scale0,
                    "bbox_height_px": (c["my1"] - c["my0"]) * scale0,
                },
                columns=OBJECT_COLUMNS,
            )
            next_id += n


def write_objects(path: str, tables: Iterable[pd.DataFrame]) -> int:
    """Write object tables to a CSV (gzip when ``path`` ends in .gz), table by table, atomically;
    the header is written even when there is no object. Returns the number of rows."""
    opener = gzip.open if path.endswith(".gz") else open
    tmp = path + ".part"
    n = 0
    with opener(tmp, "wt", newline="") as fh:
        pd.DataFrame(columns=OBJECT_COLUMNS).to_csv(fh, index=False)
        for t in tables:
            t.to_csv(fh, index=False, header=False, float_format="%.2f")
            n += len(t)
    os.replace(tmp, path)
    return n
