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

import csv
import gzip
import os
from collections.abc import Iterable, Iterator

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from . import morphometrics as mm

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


#: what each piece of an object (its part in one tile) keeps, summed over the pieces at the end
PIECE_FIELDS = {
    "area": np.int64,
    "sum_x": np.float64,  # sums of the pixels' column and row indices in mask px
    "sum_y": np.float64,
    "mx0": np.int64,  # bounding box in mask px
    "my0": np.int64,
    "mx1": np.int64,
    "my1": np.int64,
    "sxx": np.float64,  # sums of x², y² and xy from the piece's box origin (exact integers)
    "syy": np.float64,
    "sxy": np.float64,
    "perimeter_1": np.int32,  # pixels of each perimeter weight class (morphometrics.PERIMETER_WEIGHTS)
    "perimeter_2": np.int32,
    "perimeter_3": np.int32,
    "convex_area": np.int32,  # of a piece that is the whole object; 0 for pieces cut by the tile's edge
}
COLOUR_FIELDS = ("sum_red", "sum_green", "sum_blue", "sum_hematoxylin_od", "sum_eosin_od")


def _add_at(grow: _Grow, ids: np.ndarray, values=None) -> None:
    """grow[ids] += values (or += 1 per occurrence); ids may repeat."""
    u, inv = np.unique(ids, return_inverse=True)
    grow.a[u] += np.bincount(inv, weights=values, minlength=len(u)).astype(grow.a.dtype)


class _Hulls:
    """The convex hulls' chains of pieces cut by a tile's edge (global doubled coordinates),
    kept until the end, when the pieces of each object are known."""

    def __init__(self):
        self.parts = {True: [], False: []}  # left / right chains: (piece id, y2, x2)

    def add(self, left: bool, gid, y2, x2) -> None:
        if len(gid):
            self.parts[left].append((gid, y2.astype(np.int32), x2.astype(np.int32)))

    def pixels(self, roots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(root, pixel centres in the hull of all its pieces) per object with cut pieces."""
        chains = []
        for left in (True, False):
            gid, y2, x2 = (np.concatenate(a) for a in zip(*self.parts[left])) if self.parts[left] else ([],) * 3
            r = roots[np.asarray(gid, np.int64)]
            o, y, x = mm.extreme_per_row(
                r, np.asarray(y2, np.int64), np.asarray(x2, np.int64), np.minimum if left else np.maximum
            )
            chains.append(mm.chain(o, y, x, left))
        return mm.hull_pixels(*chains)


def _piece_hulls(comp_of, rows, cols, edge: np.ndarray, x: int, y: int, base: int, hulls: _Hulls):
    """Convex hull pixel count of each whole piece of a tile (1..m; 0 where ``edge``); the
    hull chains of the pieces cut by the tile's edge go to ``hulls``."""
    obj, row, xl, xr = mm.row_extremes(comp_of, rows, cols)
    left, right = (mm.chain(*pts, is_left) for pts, is_left in zip(mm.side_points(obj, row, xl, xr), (True, False)))
    convex = np.zeros(len(edge), np.int64)
    whole = [tuple(a[~edge[c[0]]] for a in c) for c in (left, right)]
    objs, n = mm.hull_pixels(*whole)
    convex[objs] = n
    for (o, y2, x2), is_left in zip((left, right), (True, False)):
        cut = edge[o]
        hulls.add(is_left, o[cut] + base - 1, y2[cut] + 2 * y, x2[cut] + 2 * x)
    return convex


def count_objects(
    tiles: Iterable[tuple[int, int, np.ndarray]], width: int, n_classes: int, outlines=None, pixels=None
) -> dict:
    """Per class k >= 1: pixel count, the pixel area of each object and its measurements.

    ``tiles`` are (x, y, tile) in mask px, in raster order (row of tiles by row of tiles, left to right),
    all tiles of a row having the same height.

    ``out[k]["objects"]`` holds one entry per object of class k, in the order objects
    are first met in raster order: ``area`` (px), ``cx``/``cy`` (centroid, px; pixel i
    spans [i, i + 1), so a one-pixel object at column 0 has cx = 0.5) and the bounding
    box ``mx0``/``my0`` (first px) and ``mx1``/``my1`` (one past the last), in mask px,
    ``root``, the object's id in the union-find, and the shape measurements of
    :mod:`wsiseg.morphometrics`, as regionprops gives them on the whole mask (px):
    ``perimeter``, ``convex_area``, ``major_axis``, ``minor_axis``, ``eccentricity``,
    ``orientation_deg``; with ``pixels``, the mean colour: ``mean_red``, ``mean_green``,
    ``mean_blue``, ``mean_hematoxylin_od``, ``mean_eosin_od`` (NaN where some of the
    object's pixels could not be read).

    ``pixels(x, y, w, h)`` (optional) gives the RGB (h, w, 3), 0..255, of a region of the
    mask's grid, or None where the slide cannot be read there (then each object piece's box
    is asked for on its own). ``outlines`` (a :class:`wsiseg.outlines.OutlineCollector`) is
    shown each tile with its components' ids and is given the union-find's roots after each
    row of tiles and at the end.
    """
    uf = _UnionFind()
    cls = _Grow(np.int16)  # class of each component (id 0 = background)
    comp = {f: _Grow(dt) for f, dt in PIECE_FIELDS.items()}
    colour = {f: _Grow(np.float64) for f in COLOUR_FIELDS} if pixels is not None else {}
    if pixels is not None:
        colour["colour_px"] = _Grow(np.int64)
    bands = mm.PerimeterBands(width, n_classes)
    hulls = _Hulls()
    pixels_total = np.zeros(n_classes, np.int64)
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
        pixels_total += np.bincount(t.ravel(), minlength=n_classes)[:n_classes]
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
            rows, cols = nz // w, nz % w
            area = np.bincount(comp_of, minlength=m + 1)[1:]
            comp["area"].extend(area)
            comp["sum_x"].extend(np.bincount(comp_of, weights=cols.astype(np.float64), minlength=m + 1)[1:] + x * area)
            comp["sum_y"].extend(np.bincount(comp_of, weights=rows.astype(np.float64), minlength=m + 1)[1:] + y * area)
            boxes = np.array(
                [(b[1].start, b[0].start, b[1].stop, b[0].stop) for b in ndi.find_objects(local)], np.int64
            ).reshape(-1, 4)
            for f, col, off in (("mx0", 0, x), ("my0", 1, y), ("mx1", 2, x), ("my1", 3, y)):
                comp[f].extend(boxes[:, col] + off)
            bx = (cols - boxes[comp_of - 1, 0]).astype(np.float64)  # from the piece's box origin
            by = (rows - boxes[comp_of - 1, 1]).astype(np.float64)
            for f, wgt in (("sxx", bx * bx), ("syy", by * by), ("sxy", bx * by)):
                comp[f].extend(np.bincount(comp_of, weights=wgt, minlength=m + 1)[1:])
            edge_ids = np.unique(np.concatenate([local[0], local[-1], local[:, 0], local[:, -1]]))
            edge = np.zeros(m + 1, bool)
            edge[edge_ids] = True
            comp["convex_area"].extend(_piece_hulls(comp_of, rows, cols, edge, x, y, base, hulls)[1:])
            for f in ("perimeter_1", "perimeter_2", "perimeter_3"):
                comp[f].extend(np.zeros(m))
            if pixels is not None:
                _colour_sums(pixels, x, y, w, h, nz, comp_of, boxes, m, colour)
            flat[nz] += base - 1
        ids, wc = bands.tile(x, y, t, lab)
        for c in (1, 2, 3):
            if (wc == c).any():
                _add_at(comp[f"perimeter_{c}"], ids[wc == c])
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
    ids, wc = bands.finish()
    for c in (1, 2, 3):
        if (wc == c).any():
            _add_at(comp[f"perimeter_{c}"], ids[wc == c])
    roots = uf.roots()
    if outlines is not None:
        outlines.finish(roots)
    return _per_class(roots, cls.get(), {f: g.get() for f, g in {**comp, **colour}.items()}, hulls, pixels_total)


def _colour_sums(pixels, x, y, w, h, nz, comp_of, boxes, m, colour) -> None:
    """Sums of RGB and stain optical density over each piece's pixels that could be read."""
    img = pixels(x, y, w, h)
    if img is None:  # unreadable somewhere: each piece's box on its own
        img = np.full((h, w, 3), np.nan, np.float32)
        for bx0, by0, bx1, by1 in boxes.tolist():
            part = pixels(x + bx0, y + by0, bx1 - bx0, by1 - by0)
            if part is not None:
                img[by0:by1, bx0:bx1] = part
        read = np.isfinite(img[..., 0]).ravel()[nz]
        nz, comp_of = nz[read], comp_of[read]
    rgb = np.asarray(img).reshape(-1, 3)[nz]
    hem, eos = mm.stain_od(rgb)
    for f, v in zip(COLOUR_FIELDS, (rgb[:, 0], rgb[:, 1], rgb[:, 2], hem, eos)):
        colour[f].extend(np.bincount(comp_of, weights=v, minlength=m + 1)[1:])
    colour["colour_px"].extend(np.bincount(comp_of, minlength=m + 1)[1:])


def _per_class(roots, cls_arr, c, hulls: _Hulls, pixels_total) -> dict:
    """Pieces summed into objects (union-find roots), split by class."""
    n = len(roots)

    def total(v):
        return np.bincount(roots, weights=v, minlength=n)

    area = total(c["area"]).astype(np.int64)
    box = {}
    for f, ufunc, init in (
        ("mx0", np.minimum, np.iinfo(np.int64).max),
        ("my0", np.minimum, np.iinfo(np.int64).max),
        ("mx1", np.maximum, -1),
        ("my1", np.maximum, -1),
    ):
        box[f] = np.full(n, init, np.int64)
        ufunc.at(box[f], roots, c[f])
    # second moments from each object's box origin: shift each piece's sums by its box's offset
    dx = (c["mx0"] - box["mx0"][roots]).astype(np.float64)
    dy = (c["my0"] - box["my0"][roots]).astype(np.float64)
    sx = c["sum_x"] - c["mx0"] * c["area"]  # sums from the piece's box origin
    sy = c["sum_y"] - c["my0"] * c["area"]
    pa = c["area"].astype(np.float64)
    major, minor, ecc, orient = mm.ellipse(
        area,
        total(c["sxx"] + 2 * dx * sx + dx * dx * pa),
        total(c["syy"] + 2 * dy * sy + dy * dy * pa),
        total(c["sxy"] + dx * sy + dy * sx + dx * dy * pa),
        total(sx + dx * pa),
        total(sy + dy * pa),
    )
    del dx, dy, sx, sy, pa
    perimeter = sum(total(c[f"perimeter_{i}"]) * w for i, w in zip((1, 2, 3), mm.PERIMETER_WEIGHTS))
    convex = total(c["convex_area"]).astype(np.int64)
    cut_roots, cut_convex = hulls.pixels(roots)
    convex[cut_roots] = cut_convex
    measured = dict(
        perimeter=perimeter,
        convex_area=convex,
        major_axis=major,
        minor_axis=minor,
        eccentricity=ecc,
        orientation_deg=orient,
    )
    if "colour_px" in c:
        complete = total(c["colour_px"]) == area
        with np.errstate(invalid="ignore", divide="ignore"):
            for f in COLOUR_FIELDS:
                measured["mean_" + f[4:]] = np.where(complete, total(c[f]) / np.maximum(area, 1), np.nan)
    is_root = (roots == np.arange(n)) & (np.arange(n) > 0)
    sum_x, sum_y = total(c["sum_x"]), total(c["sum_y"])
    out = {}
    for k in range(1, len(pixels_total)):
        sel = is_root & (cls_arr == k)
        a = area[sel]
        objects = dict(
            area=a,
            cx=sum_x[sel] / np.maximum(a, 1) + 0.5,
            cy=sum_y[sel] / np.maximum(a, 1) + 0.5,
            **{f: v[sel] for f, v in box.items()},
            root=np.flatnonzero(sel),
            **{f: v[sel] for f, v in measured.items()},
        )
        out[k] = dict(pixels=int(pixels_total[k]), object_areas=a, objects=objects)
    out[0] = dict(pixels=int(pixels_total[0]), object_areas=np.zeros(0, np.int64))
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
    "perimeter_um",
    "major_axis_um",
    "minor_axis_um",
    "eccentricity",
    "orientation_deg",
    "solidity",
    "circularity",
    "mean_hematoxylin_od",
    "mean_eosin_od",
    "mean_red",
    "mean_green",
    "mean_blue",
    "neighbours_25um",
    "nearest_neighbour_um",
]
#: decimals written per float column (2 unless named here): ratios and optical densities need more
DECIMALS = {"eccentricity": 4, "solidity": 4, "circularity": 4, "mean_hematoxylin_od": 4, "mean_eosin_od": 4}
NEIGHBOUR_RADIUS_UM = 25.0  # neighbours_25um


def first_object_ids(counts: dict, n_classes: int) -> dict:
    """object_id of each class's first object: ids count from 1 over all classes >= 1,
    class by class, each in the order objects are first met in raster order."""
    first, next_id = {}, 1
    for k in range(1, n_classes):
        first[k] = next_id
        next_id += len(counts[k]["objects"]["area"])
    return first


def add_neighbours(counts: dict, n_classes: int, mpp: float, radius_um: float = NEIGHBOUR_RADIUS_UM) -> None:
    """Each object's ``neighbours`` (other objects, of any class, whose centroid is within
    ``radius_um`` of its own) and ``nearest_um`` (distance to the nearest other object's
    centroid; NaN when the slide has one object), added to ``counts[k]["objects"]``."""
    objs = [counts[k]["objects"] for k in range(1, n_classes)]
    x = np.concatenate([o["cx"] for o in objs]) * mpp if objs else np.zeros(0)
    y = np.concatenate([o["cy"] for o in objs]) * mpp if objs else np.zeros(0)
    count, nearest = mm.neighbours(x, y, radius_um)
    i = 0
    for o in objs:
        n = len(o["area"])
        o["neighbours"], o["nearest_um"] = count[i : i + n], nearest[i : i + n]
        i += n


def shape_features(o: dict, mpp: float) -> dict:
    """The objects' shape measurements in µm (``o``: one class's objects of :func:`count_objects`)."""
    area = o["area"].astype(np.float64)
    p = o["perimeter"]
    with np.errstate(invalid="ignore", divide="ignore"):
        circularity = np.where(p > 0, 4 * np.pi * area / (p * p), np.nan)
        solidity = area / o["convex_area"]
    return dict(
        perimeter_um=p * mpp,
        major_axis_um=o["major_axis"] * mpp,
        minor_axis_um=o["minor_axis"] * mpp,
        eccentricity=o["eccentricity"],
        orientation_deg=o["orientation_deg"],
        solidity=solidity,
        circularity=circularity,
    )


def object_rows(
    counts: dict, classes: list, mpp: float, scale0: float, slide_id: str, chunk: int = 100_000
) -> Iterator[pd.DataFrame]:
    """The objects of every class >= 1 as tables of ``OBJECT_COLUMNS``, ``chunk`` rows at a time.

    Positions are on the slide: µm from its top-left corner, and level-0 px (the
    coordinates QuPath and OpenSlide use); ``scale0`` = level-0 px per mask px.
    object_id as :func:`first_object_ids` numbers them. Colour columns are empty when
    :func:`count_objects` was not given the slide's pixels; neighbours are counted
    (:func:`add_neighbours`) unless they are already.
    """
    first = first_object_ids(counts, len(classes))
    if len(classes) > 1 and "neighbours" not in counts[1]["objects"]:
        add_neighbours(counts, len(classes), mpp)
    for k, name in enumerate(classes):
        if k == 0:
            continue
        o = counts[k]["objects"]
        next_id = first[k]
        for i in range(0, len(o["area"]), chunk):
            c = {f: v[i : i + chunk] for f, v in o.items()}
            n = len(c["area"])
            area_um2 = c["area"] * mpp * mpp
            nan = np.full(n, np.nan)
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
                    **shape_features(c, mpp),
                    **{f: c.get(f, nan) for f in OBJECT_COLUMNS if f.startswith("mean_")},
                    "neighbours_25um": c["neighbours"],
                    "nearest_neighbour_um": c["nearest_um"],
                },
                columns=OBJECT_COLUMNS,
            )
            next_id += n


def _text(col: pd.Series, decimals: int) -> list:
    """A column as the CSV's text: floats with ``decimals`` (empty for NaN), the rest as str."""
    if col.dtype.kind == "f":
        fmt = f"{{:.{decimals}f}}".format
        return ["" if v != v else fmt(v) for v in col.tolist()]
    return [str(v) for v in col.tolist()]


def write_objects(path: str, tables: Iterable[pd.DataFrame]) -> int:
    """Write object tables to a CSV (gzip when ``path`` ends in .gz), table by table, atomically;
    the header is written even when there is no object. Returns the number of rows.
    Floats have 2 decimals (``DECIMALS`` names the columns with more), as pandas'
    ``to_csv(float_format=...)`` writes them, but formatted column by column (3-4x faster)."""
    opener = gzip.open if path.endswith(".gz") else open
    tmp = path + ".part"
    n = 0
    with opener(tmp, "wt", newline="") as fh:
        out = csv.writer(fh, lineterminator="\n")
        out.writerow(OBJECT_COLUMNS)
        for t in tables:
            for i in range(0, len(t), 5000):  # the text of 5,000 rows at a time (about 8 MB)
                part = t.iloc[i : i + 5000]
                out.writerows(zip(*(_text(part[c], DECIMALS.get(c, 2)) for c in part.columns)))
            n += len(t)
    os.replace(tmp, path)
    return n
