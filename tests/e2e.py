"""Helpers shared by the end-to-end tests (local runs in test_workflow.py, SLURM runs in
test_slurm.py): running Snakemake, a tiny model, and the checks of one slide's outputs."""

import json
import subprocess
import sys

import numpy as np
import openslide
import pandas as pd
import pytest
import tifffile
import torch
from conftest import REPO
from PIL import Image
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from wsiseg.models.checkpoint import save_checkpoint
from wsiseg.unet import UNet

MODEL = "tiny-unet"
CLASSES = ["background", "nucleus"]


def snakemake(workdir, configfile, *args, check=True, cores="2", env=None):
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(configfile),
        *(["--cores", cores] if cores else []),
        *args,
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if check and res.returncode != 0:
        raise AssertionError(f"snakemake failed ({res.returncode}):\n{res.stdout[-4000:]}\n{res.stderr[-6000:]}")
    return res


def _rings(rings, scale0):
    """Closed rings (level-0 px) as one array of segments in mask px: (start, end, ring index),
    with each ring's signed (shoelace) area; checks that rings are closed and run along
    pixel edges."""
    pts = [np.asarray(r, np.float64) / scale0 for r in rings]
    for r in pts:
        assert len(r) >= 5 and (r[0] == r[-1]).all()  # closed; a pixel has 4 corners
    cat = np.concatenate(pts)
    assert np.allclose(cat, np.round(cat), atol=0.01)  # on the mask's pixel corners (level-0 px are rounded to 0.01)
    cat = np.round(cat).astype(np.int64)
    n = np.array([len(r) for r in pts])
    ends = np.cumsum(n)
    seg = np.ones(len(cat), bool)
    seg[ends - 1] = False  # no segment from a ring's last vertex to the next ring's first
    a, b = cat[:-1][seg[:-1]], cat[1:][seg[:-1]]
    ring = np.repeat(np.arange(len(pts)), n - 1)
    assert ((a[:, 0] == b[:, 0]) != (a[:, 1] == b[:, 1])).all()  # along pixel edges, no repeats
    area = np.bincount(ring, weights=(a[:, 0] * b[:, 1] - b[:, 0] * a[:, 1]).astype(np.float64), minlength=len(pts)) / 2
    return a, b, ring, area


def _row_marks(a, b):
    """(rows, cols) a scanline fill toggles for the vertical segments a -> b."""
    v = a[:, 0] == b[:, 0]
    x, y0, y1 = a[v, 0], np.minimum(a[v, 1], b[v, 1]), np.maximum(a[v, 1], b[v, 1])
    n = y1 - y0
    return np.repeat(y0, n) + np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n), np.repeat(x, n)


def _parity_fill(a, b, lo, shape):
    """Pixels (of a box from ``lo``) whose centre is inside an odd number of the rings."""
    r, c = _row_marks(a - lo, b - lo)
    marks = np.zeros((shape[0], shape[1] + 1), np.uint8)
    np.bitwise_xor.at(marks, (r, c), 1)
    return np.bitwise_xor.accumulate(marks, axis=1)[:, :-1].astype(bool)


def check_holes_inside(poly, scale0):
    """A polygon's holes lie inside its exterior ring and do not overlap one another (what
    GeoJSON viewers such as QuPath need to draw a polygon with holes)."""
    a, b, ring, area = _rings(poly, scale0)
    ext = ring == 0
    lo, hi = a[ext].min(0), a[ext].max(0)
    assert (a.min(0) >= lo).all() and (a.max(0) <= hi).all(), "a hole outside its polygon's exterior"
    shape = (hi[1] - lo[1], hi[0] - lo[0])
    inside = _parity_fill(a[ext], b[ext], lo, shape)
    holes = _parity_fill(a[~ext], b[~ext], lo, shape)
    assert holes.sum() == -area[1:].sum(), "two holes of a polygon overlap"
    assert not (holes & ~inside).any(), "a hole outside its polygon's exterior"


def outline_labels(path, shape, scale0):
    """outlines.geojson.gz drawn back onto the mask's pixel grid: object_id per pixel.

    A pixel belongs to a feature when its centre is inside an odd number of the
    feature's rings (exterior rings and holes). Drawn by scanlines: every vertical
    segment of a ring marks the rows it spans at its column with the feature's id, and
    XOR-ing the marks from the left gives, at each pixel centre, the id of the one
    feature around it (the marks of a feature not around it cancel in pairs). Features
    must not overlap: their areas (shoelace) must add up to the labelled pixels. Also
    returns the features' properties, in file order, and that total area.
    """
    import gzip

    with gzip.open(path, "rt") as fh:
        data = json.load(fh)
    assert data["type"] == "FeatureCollection"
    h, w = shape
    rows, cols, ids = [], [], []
    props = []
    total_area = 0.0
    for f in data["features"]:
        p = f["properties"]
        props.append(p)
        fid = p["measurements"]["object_id"]
        g = f["geometry"]
        assert g["type"] in ("Polygon", "MultiPolygon")
        polys = [g["coordinates"]] if g["type"] == "Polygon" else g["coordinates"]
        for poly in polys:
            if len(poly) > 1:
                check_holes_inside(poly, scale0)
        a, b, ring, area = _rings([r for poly in polys for r in poly], scale0)
        is_ext = np.concatenate([[True] + [False] * (len(poly) - 1) for poly in polys])
        assert ((area > 0) == is_ext).all()  # exterior counter-clockwise in x/y, holes clockwise (RFC 7946)
        total_area += area.sum()
        r, c = _row_marks(a, b)
        rows.append(r)
        cols.append(c)
        ids.append(np.full(len(r), fid, np.int64))
    marks = np.zeros((h, w + 1), np.int64)
    if rows:
        rows, cols = np.concatenate(rows), np.concatenate(cols)
        assert rows.min() >= 0 and rows.max() < h and cols.min() >= 0 and cols.max() <= w
        np.bitwise_xor.at(marks, (rows, cols), np.concatenate(ids))
    acc = np.bitwise_xor.accumulate(marks, axis=1)
    assert (acc[:, w] == 0).all()  # every row closes
    return acc[:, :w], props, total_area


def check_outlines(path, mask, classes, mpp, scale0, objects=None):
    """Every object of the mask is one feature whose outline, drawn back, is exactly its
    pixels; class, id and area agree with objects.csv.gz (``objects``)."""
    ids, props, total_area = outline_labels(path, mask.shape, scale0)
    assert total_area == (mask > 0).sum(), "outlines overlap (or leave pixels out)"
    n = 0
    for k, _name in enumerate(classes[1:], start=1):
        lab, n_k = ndi.label(mask == k, structure=np.ones((3, 3)))
        n += n_k
        assert ((ids > 0) & (mask == k)).sum() == (mask == k).sum()
        pairs = np.unique(np.stack([lab[mask == k], ids[mask == k]]), axis=1)
        assert pairs.shape[1] == n_k and len(np.unique(pairs[1])) == n_k  # one feature per object
    oids = [p["measurements"]["object_id"] for p in props]
    assert ((ids > 0) == (mask > 0)).all() and len(set(oids)) == n
    # an object has one feature, or (split to bound memory) parts 1..k that together are the object
    parts = pd.Series([p["measurements"].get("part", 0) for p in props]).groupby(oids).agg(list)
    assert all(v == [0] or sorted(v) == list(range(1, len(v) + 1)) for v in parts), "an object outlined twice"
    area = np.bincount(ids.ravel())
    for p in props:
        oid = p["measurements"]["object_id"]
        assert p["measurements"]["area_um2"] == pytest.approx(area[oid] * mpp * mpp, abs=0.01)
        assert p["objectType"] == "detection" and p["classification"]["name"] in classes[1:]
    if objects is not None:
        t = objects.set_index("object_id")
        got = pd.DataFrame(
            [
                (p["measurements"]["object_id"], p["classification"]["name"], p["measurements"]["area_um2"])
                for p in props
            ],
            columns=["object_id", "class", "area_um2"],
        ).drop_duplicates("object_id")
        got = got.set_index("object_id")
        assert sorted(got.index) == sorted(t.index)
        assert (got["class"] == t.loc[got.index, "class"]).all()
        assert np.allclose(got["area_um2"], t.loc[got.index, "area_um2"], atol=0.01)
        # the morphometrics QuPath shows: those of objects.csv.gz (absent where the table's is empty)
        from wsiseg.outlines import MEASUREMENTS

        m = pd.DataFrame([p["measurements"] for p in props]).set_index("object_id")  # every part of split ones
        for f in MEASUREMENTS:
            want = t.loc[m.index, f].to_numpy()
            have = m[f].to_numpy() if f in m else np.full(len(m), np.nan)
            assert np.array_equal(np.isnan(have), np.isnan(want)) and np.allclose(have, want, equal_nan=True), f
    return n


def tiny_model(path, seed=0):
    """A small seeded U-Net checkpoint (fast on a CPU)."""
    torch.manual_seed(seed)
    m = UNet(n_classes=2, depth=3, base_width=4, padding="same", batch_norm=True).eval()
    save_checkpoint(str(path), m, CLASSES, mpp=0.5, name=MODEL)


def check_slide_outputs(wd, sid, path, mpp0=None):
    """One slide's outputs against the slide: mask size at the model's mpp and validity, stats
    recomputed from the mask, tissue/overlay images, logs (the GPU asked for was not there)."""
    out = wd / "results" / MODEL / sid
    with openslide.OpenSlide(str(path)) as s:
        w0, h0 = s.dimensions
        mpp0 = mpp0 or float(s.properties["openslide.mpp-x"])
    want = (round(h0 * mpp0 / 0.5), round(w0 * mpp0 / 0.5))
    # the mask: dimensions at the target mpp, valid in tifffile and OpenSlide
    with tifffile.TiffFile(out / "mask.ome.tif") as tif:
        assert tif.is_ome and tif.is_bigtiff
        lv = tif.series[0].levels
        assert lv[0].shape == want and len(lv) >= 2 and lv[0].keyframe.is_tiled
        mask = lv[0].asarray()
    assert set(np.unique(mask)) <= {0, 1}
    with openslide.OpenSlide(str(out / "mask.ome.tif")) as s:
        assert s.dimensions == want[::-1] and float(s.properties["openslide.mpp-x"]) == pytest.approx(0.5)
    # stats agree with the mask
    st = pd.read_csv(out / "stats.csv").iloc[0]
    n_px = int((mask == 1).sum())
    assert st.nucleus_pixels == n_px
    assert st.nucleus_area_mm2 == pytest.approx(n_px * 0.25 / 1e6)
    lab, n = ndi.label(mask == 1, structure=np.ones((3, 3)))
    assert st.nucleus_count == n
    if n:
        areas = np.bincount(lab.ravel())[1:] * 0.25
        assert st.nucleus_mean_area_um2 == pytest.approx(areas.mean())
        assert st.nucleus_median_area_um2 == pytest.approx(np.median(areas))
    assert st.mpp_used == 0.5 and st.slide_mpp == pytest.approx(mpp0) and st.model == MODEL
    # outlines for QuPath: level-0 px, each nucleus exactly its mask pixels, same ids as objects.csv.gz
    check_outlines(
        out / "outlines.geojson.gz", mask, CLASSES, 0.5, 0.5 / mpp0, objects=pd.read_csv(out / "objects.csv.gz")
    )
    assert len(st.model_sha256) == 64 and st.wall_time_s > 0
    check_morphometrics(out, mask, path, st, mpp0)
    # tissue and overlay: images of the thumbnail's size; nothing labelled off tissue
    tissue = np.asarray(Image.open(out / "tissue.png"))
    overlay = Image.open(out / "overlay.png")
    assert overlay.size == (tissue.shape[1], tissue.shape[0]) and overlay.mode == "RGB"
    assert set(np.unique(tissue)) <= {0, 255}
    tinfo = json.load(open(out / "work" / "tissue.json"))
    assert st.tissue_area_mm2 == pytest.approx((tissue > 0).sum() * tinfo["thumbnail_mpp"] ** 2 / 1e6)
    ys, xs = np.nonzero(mask)
    if len(ys):
        s_t = 0.5 / tinfo["thumbnail_mpp"]
        ty = np.minimum(((ys + 0.5) * s_t).astype(int), tissue.shape[0] - 1)
        tx = np.minimum(((xs + 0.5) * s_t).astype(int), tissue.shape[1] - 1)
        assert (tissue[ty, tx] > 0).all()
    # logs and benchmarks, in the slide's folder (runs with another `results:` never share them)
    seg_log = (out / "logs" / "segment.log").read_text()
    assert "tiles (100%)" in seg_log and "CUDA is not available" in seg_log
    assert (out / "benchmarks" / "segment.tsv").exists()
    assert not (out / "work" / "labels.store").exists()  # temporary intermediate removed
    assert not (out / "failed.json").exists()  # finished: no failure record


def check_morphometrics(out, mask, path, st, mpp0):
    """objects.csv.gz's morphometrics of one slide against its mask and the slide: every
    perimeter weight counted once (their sum is skimage's perimeter of the whole mask),
    colour equal to one read of a region of the slide at the mask's grid with the plan's
    geometry (skimage's rgb2hed for the optical density), and stats.csv's per-mm² count and
    medians equal to the table's."""
    from skimage.color import rgb2hed
    from skimage.measure import perimeter

    from wsiseg.geometry import Geometry, read_target
    from wsiseg.objects import OBJECT_COLUMNS
    from wsiseg.slide import open_slide

    objects = pd.read_csv(out / "objects.csv.gz")
    assert objects.columns.tolist() == OBJECT_COLUMNS
    assert st.nucleus_per_mm2 == pytest.approx(st.nucleus_count / st.tissue_area_mm2)
    for col, src in (
        ("perimeter_um", "perimeter_um"),
        ("circularity", "circularity"),
        ("eccentricity", "eccentricity"),
        ("solidity", "solidity"),
        ("hematoxylin_od", "mean_hematoxylin_od"),
        ("nearest_neighbour_um", "nearest_neighbour_um"),
    ):
        tol = 0.005 if src.endswith("_um") else 0.00005  # the table's rounding
        assert st[f"nucleus_median_{col}"] == pytest.approx(objects[src].median(), abs=tol, nan_ok=True), col
    if not len(objects):
        return
    assert objects["perimeter_um"].sum() == pytest.approx(perimeter(mask == 1, 4) * 0.5, abs=0.005 * len(objects))
    assert ((objects.solidity > 0) & (objects.solidity <= 1)).all() and objects.eccentricity.between(0, 1).all()
    assert objects[["mean_red", "mean_hematoxylin_od"]].notna().all().all()
    # colour: the objects inside a 512 px region around a middle-sized one, from one read of it
    geom = Geometry(**json.load(open(out / "plan.json"))["geometry"])
    if abs(geom.level_downsample - round(geom.level_downsample)) > 1e-9:
        # OpenSlide interpolates a level whose downsample is not an integer (TCGA's level 1,
        # 2.0005x) at the sub-pixel offset of each read's level-0 origin: two reads of the
        # same pixels differ (slide.read_level), so only the table's own reads agree
        return
    lab, n = ndi.label(mask == 1, structure=np.ones((3, 3)))
    com = np.array(ndi.center_of_mass(mask == 1, lab, np.arange(1, n + 1))) + 0.5  # (y, x); pixel i spans [i, i + 1)
    boxes = ndi.find_objects(lab)
    small = np.array([i for i, b in enumerate(boxes) if b[0].stop - b[0].start < 256 and b[1].stop - b[1].start < 256])
    if not len(small):
        return
    area = np.bincount(lab.ravel())[1:]
    cy, cx = com[small[np.argsort(area[small])[len(small) // 2]]].astype(int)
    y0, x0 = max(0, cy - 256), max(0, cx - 256)
    y1, x1 = min(mask.shape[0], y0 + 512), min(mask.shape[1], x0 + 512)
    inside = np.array([b[0].start >= y0 and b[0].stop <= y1 and b[1].start >= x0 and b[1].stop <= x1 for b in boxes])
    with open_slide(str(path), mpp=mpp0) as slide:
        rgb = read_target(slide, geom, int(x0), int(y0), int(x1 - x0), int(y1 - y0)).astype(np.float64)
    sub = np.where(inside[lab[y0:y1, x0:x1] - 1] & (lab[y0:y1, x0:x1] > 0), lab[y0:y1, x0:x1], 0)
    sel = sub > 0
    od = 6 * rgb2hed(rgb[sel][None] / 255)[0]  # base-10 optical density
    dist, label = cKDTree(com[:, ::-1] * 0.5).query(objects[["centroid_x_um", "centroid_y_um"]].to_numpy())
    assert dist.max() < 0.01 and len(set(label.tolist())) == n  # each object its label
    rows = inside[label]
    assert rows.sum() >= 1
    count = np.bincount(sub[sel], minlength=n + 1)[1:]
    for col, v, tol in (
        ("mean_red", rgb[sel][:, 0], 0.006),
        ("mean_blue", rgb[sel][:, 2], 0.006),
        ("mean_hematoxylin_od", od[:, 0], 0.00006),
        ("mean_eosin_od", od[:, 1], 0.00006),
    ):
        want = np.bincount(sub[sel], weights=v, minlength=n + 1)[1:] / np.maximum(count, 1)
        assert np.allclose(objects[col].to_numpy()[rows], want[label[rows]], atol=tol), col
