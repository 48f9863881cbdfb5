"""Stats: per-class areas and object counts of a label mask, streamed tile by tile.

Objects are 8-connected components of one class. Each tile is labelled on its
own; components that touch across tile borders are merged with a union-find,
so an object crossing tile borders counts once. Memory: one tile, one row of
labels the width of the mask, and one entry per object.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import tifffile
from scipy import ndimage as ndi

S8 = np.ones((3, 3), bool)


class _UnionFind:
    def __init__(self):
        self.parent = np.zeros(1, np.int64)  # id 0 = background

    def add(self, n: int) -> None:
        start = len(self.parent)
        self.parent = np.concatenate([self.parent, np.arange(start, start + n, dtype=np.int64)])

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


def mask_tiles(path: str) -> Iterator[tuple[int, int, np.ndarray]]:
    """(y, x, tile) of level 0 of a tiled mask TIFF, in raster order, cropped to the image."""
    with tifffile.TiffFile(path) as tif:
        page = tif.series[0].levels[0].keyframe
        h, w = page.imagelength, page.imagewidth
        for seg, idx, _ in page.segments(sort=True, maxworkers=1):
            y, x = idx[2], idx[3]
            tile = seg[0, :, :, 0] if seg.ndim == 4 else seg[0]
            yield y, x, tile[: h - y, : w - x]


def array_tiles(arr: np.ndarray, tile: int) -> Iterator[tuple[int, int, np.ndarray]]:
    for y in range(0, arr.shape[0], tile):
        for x in range(0, arr.shape[1], tile):
            yield y, x, arr[y : y + tile, x : x + tile]


def count_objects(tiles: Iterable[tuple[int, int, np.ndarray]], width: int, n_classes: int) -> dict:
    """Per class k >= 1: pixel count and the pixel area of each object.

    ``tiles`` must come in raster order (row of tiles by row of tiles, left to right),
    all tiles of a row having the same height.
    """
    uf = _UnionFind()
    cls = [0]  # class of each global id
    area = [0]
    pixels = np.zeros(n_classes, np.int64)
    prev_row = np.zeros(width, np.int64)  # ids of the last pixel row of the previous tile row
    cur_row = np.zeros(width, np.int64)
    left_col = None
    row_y = None
    for y, x, t in tiles:
        if y != row_y:  # new row of tiles
            if row_y is not None:
                prev_row, cur_row = cur_row, np.zeros(width, np.int64)
            row_y, left_col = y, None
        t = np.asarray(t)
        h, w = t.shape
        pixels += np.bincount(t.ravel(), minlength=n_classes)[:n_classes]
        lab = np.zeros(t.shape, np.int64)
        for k in range(1, n_classes):
            sel = t == k
            if not sel.any():
                continue
            lk, nk = ndi.label(sel, structure=S8)
            base = len(cls)
            lab[sel] = lk[sel] + (base - 1)
            uf.add(nk)
            cls.extend([k] * nk)
            area.extend(np.bincount(lk.ravel(), minlength=nk + 1)[1:].tolist())
        cls_arr = np.asarray(cls)
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
        left_col = lab[:, -1]
        cur_row[x : x + w] = lab[-1, :]
    roots = uf.roots()
    area_arr = np.asarray(area, np.int64)
    total = np.bincount(roots, weights=area_arr, minlength=len(roots)).astype(np.int64)
    cls_arr = np.asarray(cls)
    is_root = (roots == np.arange(len(roots))) & (np.arange(len(roots)) > 0)
    out = {}
    for k in range(1, n_classes):
        sel = is_root & (cls_arr == k)
        out[k] = dict(pixels=int(pixels[k]), object_areas=total[sel])
    out[0] = dict(pixels=int(pixels[0]), object_areas=np.zeros(0, np.int64))
    return out


def slide_stats(mask_path: str, classes: list, mpp: float) -> dict:
    """Stats columns for each class of a mask OME-TIFF at ``mpp`` µm/px."""
    with tifffile.TiffFile(mask_path) as tif:
        h, w = tif.series[0].levels[0].shape[-2:]
    counts = count_objects(mask_tiles(mask_path), w, len(classes))
    px_um2 = mpp * mpp
    row = {"mask_width_px": w, "mask_height_px": h}
    for k, name in enumerate(classes):
        if k == 0:
            continue
        c = counts[k]
        areas = c["object_areas"] * px_um2
        row[f"{name}_area_mm2"] = c["pixels"] * px_um2 / 1e6
        row[f"{name}_pixels"] = c["pixels"]
        row[f"{name}_count"] = int(len(areas))
        row[f"{name}_mean_area_um2"] = float(areas.mean()) if len(areas) else float("nan")
        row[f"{name}_median_area_um2"] = float(np.median(areas)) if len(areas) else float("nan")
    return row


def run(mask_path: str, slide_json: str, tissue_json: str, plan_json: str, timing_jsons: list, classes: list,
        out_csv: str, log=print) -> dict:
    """Stats stage: one-row stats.csv for a slide."""
    import time

    import pandas as pd

    from .runner import read_json

    t0 = time.monotonic()
    sl, ti, pl = read_json(slide_json), read_json(tissue_json), read_json(plan_json)
    geom = pl["geometry"]
    mpp = geom["target_mpp"]
    classes = pl.get("mask_classes") or classes  # the plan knows the model's mask classes
    row = dict(
        slide_id=sl["slide_id"], path=sl["path"], status="ok", error="",
        vendor=sl["vendor"], width_px=sl["width"], height_px=sl["height"],
        slide_mpp=sl["mpp"], mpp_source=sl["mpp_source"], mpp_used=mpp,
        level_read=geom["level"], tissue_method=ti["method"], tissue_area_mm2=ti["tissue_area_mm2"],
        n_tiles=pl["n_tiles"],
    )
    cls_row = slide_stats(mask_path, classes, mpp)
    if (cls_row["mask_width_px"], cls_row["mask_height_px"]) != (geom["width"], geom["height"]):
        raise RuntimeError("mask size differs from the tile plan's target size")
    row.update(cls_row)
    tissue = row["tissue_area_mm2"]
    for name in classes[1:]:
        row[f"{name}_fraction_of_tissue"] = row[f"{name}_area_mm2"] / tissue if tissue > 0 else float("nan")
    row["model"] = pl["model"]
    row["model_sha256"] = pl["model_checksum"]
    stage_info = [read_json(p) for p in timing_jsons]
    row["tiles_unreadable"] = sum(int(i.get("tiles_unreadable", 0)) for i in stage_info)
    timings = [i.get("elapsed_s", 0.0) for i in stage_info]
    row["wall_time_s"] = round(sum(timings) + pl.get("elapsed_s", 0.0) + ti.get("elapsed_s", 0.0)
                               + time.monotonic() - t0, 2)
    # stable column order: identity, slide, tissue, per class, model, time
    cols = list(row)
    pd.DataFrame([row], columns=cols).to_csv(out_csv, index=False)
    log(f"{row['slide_id']}: " + ", ".join(f"{c}={row[c]}" for c in cols if c.endswith(("_count", "_area_mm2"))))
    return row
