"""Annotated training and evaluation images: loading, rasterising, targets.

A labeled set is a TSV sheet with one row per image:

    image    labels    mpp    [split]

``image`` is an RGB(A) PNG/TIFF/JPEG tile; ``labels`` is one of

* an instance label image (PNG/TIFF, 0 = background, 1..N = object id),
* a MICCAI-2015-style ASCII mask (``.txt``: ``width height`` then one id per pixel),
* Aperio ImageScope XML (``.xml``, one ``<Region>`` polygon per object, as MoNuSeg),
* QuPath GeoJSON (``.geojson``/``.json``, Polygon/MultiPolygon features in image px).

``image`` may also be a whole slide (any format the workflow reads) with polygon
labels in its level-0 px, as QuPath exports them: each cluster of annotations
becomes one training region, read at the model's mpp.

``mpp`` is the image's µm per pixel (an XML's ``MicronsPerPixel`` is used when the
column is empty). Relative paths are relative to the sheet's folder.

Everything is brought to the model's mpp here, once: images with area-averaging
(Lanczos for upsampling), instance labels by nearest neighbour. Polygons are
rasterised directly at the model's mpp, so no label is resampled twice.
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from .errors import ConfigError

if TYPE_CHECKING:  # pandas only for the sheets: the segment job's post-processing imports this module
    import pandas as pd


@dataclass
class Sample:
    """One annotated image at the model's mpp."""

    name: str
    image: np.ndarray  # (H, W, 3) uint8, at the model's mpp
    instances: np.ndarray  # (H, W) int32 instance ids at the model's mpp
    mpp: float  # the image's own mpp
    split: str = ""
    native_instances: np.ndarray | None = None  # instance ids at the image's own mpp (evaluation)
    native_shape: tuple | None = None
    native_image: np.ndarray | None = None  # the image at its own mpp (evaluation)


# ------------------------------------------------------------------ sheets
def read_sheet(path: str) -> pd.DataFrame:
    """Read a labeled-set sheet; paths resolved against the sheet's folder."""
    from .sheet import read_tsv

    if not os.path.exists(path):
        raise ConfigError(f"labeled-set sheet {path} does not exist")
    df = read_tsv(path, dtype=str).fillna("")
    missing = {"image", "labels"} - set(df.columns)
    if missing:
        raise ConfigError(f"labeled-set sheet {path} lacks column(s) {sorted(missing)}; need image, labels, mpp")
    base = os.path.dirname(os.path.abspath(path))
    for col in ("image", "labels"):
        df[col] = [p if os.path.isabs(p) else os.path.normpath(os.path.join(base, p)) for p in df[col]]
    if "mpp" not in df.columns:
        df["mpp"] = ""
    if "split" not in df.columns:
        df["split"] = ""
    if "name" not in df.columns:
        df["name"] = [os.path.splitext(os.path.basename(p))[0] for p in df["image"]]
    return df


# ------------------------------------------------------------------ readers
def read_image(path: str) -> np.ndarray:
    """RGB uint8; alpha composited on white (as slides are)."""
    with Image.open(path) as im:
        if im.mode in ("RGBA", "LA", "P"):
            im = im.convert("RGBA")
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, im)
        return np.asarray(im.convert("RGB"))


def read_text_mask(path: str) -> np.ndarray:
    """MICCAI 2015 ASCII mask: header ``width height`` then w*h ids, row-major."""
    with open(path) as fh:
        header = fh.readline().split()
        w, h = int(header[0]), int(header[1])
        vals = np.loadtxt(fh, dtype=np.int64)
    if vals.size != w * h:
        raise ConfigError(f"label file {path}: header says {w}x{h} but holds {vals.size} values")
    return vals.reshape(h, w).astype(np.int32)


def _xml_polygons(path: str):
    root = ET.parse(path).getroot()
    mpp = root.get("MicronsPerPixel")
    polys = []
    for region in root.iter("Region"):
        pts = [(float(v.get("X")), float(v.get("Y"))) for v in region.iter("Vertex")]
        if len(pts) >= 3:
            polys.append([pts])
    return polys, (float(mpp) if mpp else None)


def _geojson_polygons(path: str):
    with open(path) as fh:
        data = json.load(fh)
    feats = data.get("features", [data] if data.get("type") == "Feature" else data if isinstance(data, list) else [])
    polys = []
    for f in feats:
        g = f.get("geometry") or {}
        if g.get("type") == "Polygon":
            polys.append(g["coordinates"])
        elif g.get("type") == "MultiPolygon":
            polys.extend(g["coordinates"])  # each part is an object of its own
    return polys, None


def rasterise(polys, shape, scale: float = 1.0) -> np.ndarray:
    """Instance label image of ``shape`` from polygons given in px of the source image.

    Coordinates are continuous image coordinates (pixel (i, j) covers
    [j, j+1) x [i, i+1), as in QuPath and OpenSlide); ``scale`` maps source to output
    coordinates. A pixel belongs to a polygon when its centre is inside, so areas do
    not depend on the output resolution. Each polygon (outer ring, optional holes)
    gets its own id, in order; later ones overwrite.
    """
    from skimage.draw import polygon as fill

    out = np.zeros(shape, np.int32)
    for i, rings in enumerate(polys, start=1):
        for j, ring in enumerate(rings):
            if len(ring) < 3:
                continue
            # to pixel-centre indices; the tiny shift makes pixels on an edge count on one side
            # only (half-open, like the pixel squares), so integer vertices cause no bias
            xy = np.asarray(ring, np.float64) * scale - 0.5 - 1e-6
            rr, cc = fill(xy[:, 1], xy[:, 0], shape)
            out[rr, cc] = i if j == 0 else 0
    return out


def read_instances(path: str, shape: tuple[int, int] | None = None, scale: float = 1.0):
    """Instance ids from any supported label file; returns (ids, mpp_from_file or None).

    For polygons, ``shape`` is the output shape and ``scale`` output px per source px.
    """
    ext = os.path.splitext(path)[1].lower()
    if ext == ".txt":
        return read_text_mask(path), None
    if ext in (".xml", ".geojson", ".json"):
        polys, mpp = _xml_polygons(path) if ext == ".xml" else _geojson_polygons(path)
        if shape is None:
            raise ValueError("rasterising polygons needs the output shape")
        return rasterise(polys, shape, scale), mpp
    with Image.open(path) as im:
        arr = np.asarray(im)
    if arr.ndim == 3:  # RGB-coded instance ids
        arr = arr[..., 0].astype(np.int64) * 65536 + arr[..., 1].astype(np.int64) * 256 + arr[..., 2]
    return relabel(arr), None


def relabel(ids: np.ndarray) -> np.ndarray:
    """Consecutive ids 1..N in the order of the old ids (0 stays background); an id covering
    separate blobs stays one object.

    For non-negative ids up to a few times the pixel count (every label image the
    workflow makes) a lookup table over the ids replaces ``np.unique``'s sort: the same
    result, about 20 times faster on a 736 px window (the sort was 90 % of the per-tile
    instance post-processing).
    """
    ids = np.asarray(ids)
    if ids.size and ids.dtype.kind in "iu":
        lo, hi = int(ids.min()), int(ids.max())
        if lo >= 0 and hi <= 4 * ids.size + 1024:
            present = np.zeros(hi + 1, bool)
            present[ids.ravel()] = True
            lut = (np.cumsum(present) - 1).astype(np.int32)  # rank of each present id
            out = lut[ids]
            if not present[0]:
                out += 1
            return out
    u, inv = np.unique(ids, return_inverse=True)
    out = inv.reshape(ids.shape).astype(np.int32)
    if u[0] != 0:
        out += 1
    return out


# ------------------------------------------------------------------ resampling
def resize_image(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    h, w = shape
    if img.shape[:2] == (h, w):
        return img
    method = Image.Resampling.BOX if h < img.shape[0] else Image.Resampling.LANCZOS
    return np.asarray(Image.fromarray(img).resize((w, h), method))


def resize_labels(ids: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest neighbour at pixel centres."""
    h, w = shape
    if ids.shape == (h, w):
        return ids
    ys = np.minimum(((np.arange(h) + 0.5) * ids.shape[0] / h).astype(np.int64), ids.shape[0] - 1)
    xs = np.minimum(((np.arange(w) + 0.5) * ids.shape[1] / w).astype(np.int64), ids.shape[1] - 1)
    return ids[np.ix_(ys, xs)]


def target_shape(native_shape, mpp: float, model_mpp: float) -> tuple[int, int]:
    s = mpp / model_mpp
    return max(1, round(native_shape[0] * s)), max(1, round(native_shape[1] * s))


IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp")
POLYGON_EXTS = (".xml", ".geojson", ".json")


def is_tile_image(path: str) -> bool:
    """A plain image tile (read whole), as opposed to a slide (read region by region)."""
    ext = os.path.splitext(path)[1].lower()
    if ext in IMAGE_EXTS:
        return True
    if ext in (".tif", ".tiff"):
        import tifffile

        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            return not page.is_tiled and len(tif.series[0].levels) == 1 and page.shape[0] * page.shape[1] <= 8192**2
    return False


SLIDE_REGION_MPP = 0.5  # µm/px at which annotated slide regions are read when no model mpp is given


def load_samples(row, model_mpp: float | None, keep_native: bool = False) -> list[Sample]:
    """Samples of one sheet row: the tile itself, or the annotated regions of a slide.
    ``model_mpp`` None: tiles at their own resolution (nothing resampled), slide regions
    at :data:`SLIDE_REGION_MPP`."""
    img_path, lab_path = row["image"], row["labels"]
    if (
        os.path.exists(img_path)
        and os.path.splitext(lab_path)[1].lower() in POLYGON_EXTS
        and not is_tile_image(img_path)
    ):
        return slide_samples(row, model_mpp or SLIDE_REGION_MPP, keep_native)
    return [load_sample(row, model_mpp, keep_native)]


def load_sample(row, model_mpp: float | None, keep_native: bool = False) -> Sample:
    """One sheet row at the model's mpp (None: at its own). Image/label size mismatches are errors."""
    name, img_path, lab_path = row["name"], row["image"], row["labels"]
    for p in (img_path, lab_path):
        if not os.path.exists(p):
            raise ConfigError(f"labeled image '{name}': {p} does not exist; fix the path in the sheet")
    img = read_image(img_path)
    ext = os.path.splitext(lab_path)[1].lower()
    mpp = float(row["mpp"]) if str(row.get("mpp", "")).strip() else None
    if ext in (".xml", ".geojson", ".json"):
        native, file_mpp = read_instances(lab_path, img.shape[:2], 1.0)
        mpp = mpp or file_mpp
    else:
        native, _ = read_instances(lab_path)
        if native.shape != img.shape[:2]:
            raise ConfigError(
                f"labeled image '{name}': the image is {img.shape[1]}x{img.shape[0]} px but its labels "
                f"{os.path.basename(lab_path)} are {native.shape[1]}x{native.shape[0]} px; the pair is "
                "mismatched (in the MICCAI 2015 set image04/image05 masks are swapped): pair each image "
                "with the label file of the same size in the sheet"
            )
    if not mpp:
        raise ConfigError(f"labeled image '{name}': no mpp; add it to the sheet's mpp column")
    shape = target_shape(img.shape[:2], mpp, model_mpp or mpp)
    if shape == img.shape[:2]:
        inst = native
    elif ext in (".xml", ".geojson", ".json"):  # rasterise at the model's mpp directly
        scale = shape[1] / img.shape[1]
        polys = (_xml_polygons if ext == ".xml" else _geojson_polygons)(lab_path)[0]
        inst = rasterise(polys, shape, scale)
    else:
        inst = resize_labels(native, shape)
    return Sample(
        name=name,
        image=resize_image(img, shape),
        instances=inst,
        mpp=mpp,
        split=row.get("split", ""),
        native_instances=native if keep_native else None,
        native_shape=img.shape[:2],
        native_image=img if keep_native else None,
    )


def _regions(boxes: np.ndarray, cell: float) -> list[np.ndarray]:
    """Group boxes (x0, y0, x1, y1) lying within about ``cell`` of each other; indices per group.

    Boxes are marked on a grid of ``cell``-sized squares and grouped by 8-connected
    occupied cells, so memory grows with the annotated extent / cell², never with
    the number of annotations squared (a QuPath export can hold 100,000 nuclei).
    """
    cells = np.floor(boxes / cell).astype(np.int64)
    cells -= np.concatenate([cells[:, :2].min(0)] * 2)
    occ = np.zeros((cells[:, 3].max() + 1, cells[:, 2].max() + 1), bool)
    for cx0, cy0, cx1, cy1 in cells:
        occ[cy0 : cy1 + 1, cx0 : cx1 + 1] = True
    lab, n = ndi.label(occ, structure=np.ones((3, 3)))
    group = lab[cells[:, 1], cells[:, 0]]
    return [np.flatnonzero(group == k) for k in range(1, n + 1) if (group == k).any()]


MAX_REGION_PX = 8192 * 8192  # target px per annotated region: memory stays bounded


def slide_samples(row, model_mpp: float, keep_native: bool = False, margin_um: float = 16.0) -> list[Sample]:
    """Annotated regions of a slide (QuPath GeoJSON / ImageScope XML in level-0 px).

    Polygons closer than twice the margin are one region; each region (its
    polygons' bounding box plus ``margin_um``) is read at the model's mpp with the
    same resampling as inference, and its polygons are rasterised there.
    """
    from .errors import SlideError
    from .geometry import Geometry, read_target
    from .slide import open_slide

    name, lab_path = row["name"], row["labels"]
    ext = os.path.splitext(lab_path)[1].lower()
    polys = (_xml_polygons if ext == ".xml" else _geojson_polygons)(lab_path)[0]
    if not polys:
        raise ConfigError(f"labeled slide '{name}': no polygons in {lab_path}")
    sheet_mpp = float(row["mpp"]) if str(row.get("mpp", "")).strip() else None
    try:
        with open_slide(row["image"], name, sheet_mpp) as slide:
            geom = Geometry.for_slide(slide, model_mpp)
            s0 = geom.scale0  # level-0 px per target px
            boxes = np.array([[*np.min(r[0], 0), *np.max(r[0], 0)] for r in polys], np.float64)
            m0 = margin_um / geom.mpp0
            out = []
            for k, idx in enumerate(_regions(boxes, 2 * m0)):
                x0, y0 = boxes[idx, :2].min(0) - m0
                x1, y1 = boxes[idx, 2:].max(0) + m0
                tx, ty = max(0, int(x0 / s0)), max(0, int(y0 / s0))
                tw = min(geom.width, int(np.ceil(x1 / s0))) - tx
                th = min(geom.height, int(np.ceil(y1 / s0))) - ty
                if tw * th > MAX_REGION_PX:
                    raise ConfigError(
                        f"labeled slide '{name}': an annotated region is {tw}x{th} px at {model_mpp} µm/px; "
                        "annotate smaller regions (objects far apart become separate regions)"
                    )
                img = np.clip(read_target(slide, geom, tx, ty, tw, th) + 0.5, 0, 255).astype(np.uint8)
                shifted = [[[(x / s0 - tx, y / s0 - ty) for x, y in ring] for ring in polys[i]] for i in idx]
                inst = rasterise(shifted, (th, tw), 1.0)
                out.append(
                    Sample(
                        name=f"{name}-r{k + 1}",
                        image=img,
                        instances=inst,
                        mpp=model_mpp,
                        split=row.get("split", ""),
                        native_instances=inst if keep_native else None,
                        native_shape=(th, tw),
                        native_image=img if keep_native else None,
                    )
                )
            return out
    except SlideError as exc:
        raise ConfigError(str(exc)) from None


def load_set(sheet: str, model_mpp: float | None, keep_native: bool = False) -> list[Sample]:
    return [s for _, r in read_sheet(sheet).iterrows() for s in load_samples(r, model_mpp, keep_native)]


# ------------------------------------------------------------------ targets
def instance_boundaries(ids: np.ndarray) -> np.ndarray:
    """Pixels of an object with a 4-neighbour outside that object (inner boundary).

    Where two objects touch, both sides are marked: a 2-px line separates them.
    """
    pad = np.pad(ids, 1, mode="edge")
    c = pad[1:-1, 1:-1]
    diff = (pad[:-2, 1:-1] != c) | (pad[2:, 1:-1] != c) | (pad[1:-1, :-2] != c) | (pad[1:-1, 2:] != c)
    return diff & (ids > 0)


def three_class_target(ids: np.ndarray) -> np.ndarray:
    """0 background, 1 object interior, 2 object boundary (uint8)."""
    t = (ids > 0).astype(np.uint8)
    t[instance_boundaries(ids)] = 2
    return t


def border_weight_map(ids: np.ndarray, w0: float = 10.0, sigma: float = 5.0, class_balance: bool = True) -> np.ndarray:
    """The U-Net paper's weight map: w_c(x) + w0 * exp(-(d1 + d2)^2 / (2 sigma^2)).

    d1, d2: distances to the nearest and second-nearest object; the term applies
    to background pixels (the gaps between touching objects). w_c balances the
    class frequencies (background vs object).

    Each object's distance map is computed only within its bounding box grown by
    ``6 sigma``: farther out d1 + d2 > 6 sigma, where the term is below
    ``w0 * exp(-18)`` (1.5e-7 for w0 = 10), so it is left out. Cost grows with
    the objects' area, not with (objects x crop area).
    """
    ids = np.asarray(ids)
    fg = ids > 0
    w = np.ones(ids.shape, np.float32)
    if class_balance and fg.any() and (~fg).any():
        f = fg.mean()
        w[fg] = 0.5 / f
        w[~fg] = 0.5 / (1 - f)
    objs, lab = np.unique(np.where(fg, ids, 0), return_inverse=True)
    lab = lab.reshape(ids.shape)
    if objs[0] != 0:  # no background pixel: ids 1.. are objects 1..
        lab = lab + 1
    n_obj = int(lab.max())
    if n_obj >= 2:
        reach = int(np.ceil(6 * sigma))
        d1 = np.full(ids.shape, np.inf, np.float32)
        d2 = np.full(ids.shape, np.inf, np.float32)
        for k, box in enumerate(ndi.find_objects(lab), start=1):
            if box is None:
                continue
            win = tuple(slice(max(0, s.start - reach), min(n, s.stop + reach)) for s, n in zip(box, ids.shape))
            d = ndi.distance_transform_edt(lab[win] != k).astype(np.float32)
            D1, D2 = d1[win], d2[win]  # views: written back in place
            np.minimum(D2, np.maximum(D1, d), out=D2)
            np.minimum(D1, d, out=D1)
        gap = np.where(fg, np.inf, d1 + d2)
        w += (w0 * np.exp(-(gap**2) / (2 * sigma**2))).astype(np.float32)
    return w
