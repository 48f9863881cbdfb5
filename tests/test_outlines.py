"""Outlines (outlines.geojson.gz): every object's polygon, traced tile by tile and merged
across tile borders, drawn back onto the mask must give exactly the object's pixels."""

import gzip
import json

import numpy as np
import pandas as pd
import pytest
from conftest import DATA, needs_data
from e2e import check_outlines
from helpers import array_tiles
from scipy import ndimage as ndi

from wsiseg.labels import read_text_mask
from wsiseg.objects import count_objects, object_rows, write_objects
from wsiseg.outlines import OutlineCollector, boundary_edges, trace, write_geojson


def outlines_of(tmp_path, a, tile, classes, mpp=0.5, scale0=1.0, **kw):
    col = OutlineCollector(str(tmp_path / "pieces.tmp"), scale0, **kw)
    counts = count_objects(array_tiles(a, tile), a.shape[1], len(classes), outlines=col)
    path = tmp_path / "outlines.geojson.gz"
    n = write_geojson(str(path), col, counts, classes, mpp, "s1")
    objects = tmp_path / "objects.csv.gz"
    write_objects(str(objects), object_rows(counts, classes, mpp, scale0, "s1"))
    assert not (tmp_path / "pieces.tmp").exists() and not (tmp_path / "outlines.geojson.gz.part").exists()
    return path, n, pd.read_csv(objects)


def features(path):
    with gzip.open(path, "rt") as fh:
        return json.load(fh)["features"]


def canon(ring):
    """A closed ring from its smallest (x, y) vertex, same direction (rings may start anywhere)."""
    pts = [tuple(p) for p in ring[:-1]]
    i = pts.index(min(pts))
    pts = pts[i:] + pts[:i]
    return [list(p) for p in pts + pts[:1]]


def test_one_pixel_and_a_square_with_a_hole(tmp_path):
    a = np.zeros((8, 9), np.uint8)
    a[1, 1] = 1
    a[3:8, 3:8] = 1
    a[5, 5] = 0  # a one-pixel hole
    path, n, _ = outlines_of(tmp_path, a, 4, ["background", "nucleus"], scale0=2.0)
    f = features(path)
    assert n == 2 and [x["geometry"]["type"] for x in f] == ["Polygon", "Polygon"]
    by_area = {x["properties"]["measurements"]["area_um2"]: x["geometry"]["coordinates"] for x in f}
    # level-0 px = 2 x mask px; rings closed, exterior counter-clockwise in x/y, corners only
    assert [canon(r) for r in by_area[0.25]] == [[[2, 2], [4, 2], [4, 4], [2, 4], [2, 2]]]
    square = [canon(r) for r in by_area[24 * 0.25]]  # crossed tile borders at 4: merged, traced again
    assert square == [[[6, 6], [16, 6], [16, 16], [6, 16], [6, 6]], [[10, 10], [10, 12], [12, 12], [12, 10], [10, 10]]]


def test_corner_contact_is_one_object_of_two_parts(tmp_path):
    """8-connected pixels touching only at a corner (here across the corner of four
    tiles) are one object, as the counts say: one MultiPolygon, not a self-crossing ring."""
    a = np.zeros((8, 8), np.uint8)
    a[3, 3] = a[4, 4] = 1
    path, n, objects = outlines_of(tmp_path, a, 4, ["background", "nucleus"])
    (f,) = features(path)
    assert n == 1 and len(objects) == 1 and f["geometry"]["type"] == "MultiPolygon"
    assert sorted([canon(r) for r in p] for p in f["geometry"]["coordinates"]) == [
        [[[3, 3], [4, 3], [4, 4], [3, 4], [3, 3]]],
        [[[4, 4], [5, 4], [5, 5], [4, 5], [4, 4]]],
    ]


def test_rings_of_random_masks_give_back_every_region():
    """trace() alone: per label, the signed ring areas sum to the pixel count."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        lab = rng.integers(0, 4, tuple(rng.integers(1, 30, 2)))
        ring_label, ring_area, offsets, corners, _ = trace(*boundary_edges(lab))
        got = np.bincount(ring_label, weights=ring_area, minlength=4)[1:]
        assert got.tolist() == np.bincount(lab.ravel(), minlength=4)[1:].tolist()
        assert (np.diff(offsets) >= 4).all()


@pytest.mark.parametrize("tile", [1, 3, 16, 64])
def test_random_masks_with_holes_islands_and_corner_contacts(tmp_path, tile):
    rng = np.random.default_rng(tile)
    f = ndi.gaussian_filter(rng.random((90, 110)), 2)
    f = (f - f.mean()) / f.std()
    a = np.zeros(f.shape, np.uint8)
    a[f > 0.2] = 1
    a[f > 1.0] = 2  # class-2 islands inside class-1 objects: holes in them
    a[rng.random(a.shape) < 0.05] = 0  # speckle: holes, corner contacts
    a[rng.random(a.shape) < 0.02] = 1
    classes = ["background", "tumour", "necrosis"]
    path, n, objects = outlines_of(tmp_path, a, tile, classes)
    assert n > 50 and check_outlines(path, a, classes, 0.5, 1.0, objects=objects) == n
    geoms = [x["geometry"] for x in features(path)]
    assert any(g["type"] == "MultiPolygon" for g in geoms)
    assert any(len(p) > 1 for g in geoms for p in ([g["coordinates"]] if g["type"] == "Polygon" else g["coordinates"]))


@needs_data
@pytest.mark.parametrize("tile", [37, 128, 4096])
def test_miccai_nuclei_outlines_match_the_mask(tmp_path, tile):
    """The MICCAI image05 nuclei (135 objects once touching nuclei merge; many cut by tile borders), with a second class
    touching the first, on a slide at 0.25 µm/px (2 level-0 px per mask px)."""
    ids = read_text_mask(str(DATA / "labeled" / "miccai2015-nuclei-seg-training" / "image05_mask.txt"))
    a = (ids > 0).astype(np.uint8)
    a[(ids > 0) & (ids % 5 == 0)] = 2
    classes = ["background", "nucleus", "mitosis"]
    path, n, objects = outlines_of(tmp_path, a, tile, classes, scale0=2.0)
    assert n == len(objects) > 100
    assert check_outlines(path, a, classes, 0.5, 2.0, objects=objects) == n
    p = features(path)[0]["properties"]
    assert p["name"] == f"{p['classification']['name']} {p['measurements']['object_id']}"
    assert len({x["id"] for x in features(path)}) == n  # one UUID per object


def test_no_objects_gives_an_empty_collection(tmp_path):
    path, n, _ = outlines_of(tmp_path, np.zeros((20, 20), np.uint8), 8, ["background", "nucleus"])
    assert n == 0 and features(path) == []


def test_a_failed_write_leaves_no_partial_files(tmp_path):
    """Outlines that do not match the counts (here: another mask's) fail loudly, and leave
    neither a half-written GeoJSON nor the temporary pieces behind."""
    a = np.zeros((16, 16), np.uint8)
    a[2:5, 2:5] = a[9:12, 9:12] = 1
    col = OutlineCollector(str(tmp_path / "pieces.tmp"), 1.0)
    count_objects(array_tiles(a, 8), 16, 2, outlines=col)
    b = np.zeros_like(a)
    b[2:5, 2:5] = 1  # one object, not two
    counts = count_objects(array_tiles(b, 8), 16, 2)
    with pytest.raises(AssertionError, match="outlines for 2 of 1 objects|an outline without its object"):
        write_geojson(str(tmp_path / "o.geojson.gz"), col, counts, ["background", "nucleus"], 0.5, "s1")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_large_speckled_object_with_thousands_of_holes(tmp_path):
    """What an untrained model makes: one object over most of the mask, riddled with
    one-pixel holes and islands touching it at corners, cut by every tile border. Its
    holes each go to the part around them (checked by drawing each polygon), in one
    feature per object."""
    rng = np.random.default_rng(7)
    a = (rng.random((600, 700)) < 0.8).astype(np.uint8)
    a[:, :5] = 0
    path, n, objects = outlines_of(tmp_path, a, 128, ["background", "tissue"])
    assert check_outlines(path, a, ["background", "tissue"], 0.5, 1.0, objects=objects) == n
    big = max(features(path), key=lambda f: f["properties"]["measurements"]["area_um2"])
    polys = (
        big["geometry"]["coordinates"]
        if big["geometry"]["type"] == "MultiPolygon"
        else [big["geometry"]["coordinates"]]
    )
    assert sum(len(p) - 1 for p in polys) > 10000  # holes


@pytest.mark.parametrize("tile", [64, 128])
def test_objects_beyond_the_memory_budget_are_written_in_parts(tmp_path, tile):
    """With a budget of 20,000 open boundary edges, the speckled object is written tile
    piece by tile piece (parts 1..k, same object_id, together exactly its pixels), the
    small objects whole as usual; the counts do not change."""
    rng = np.random.default_rng(8)
    a = (rng.random((500, 600)) < 0.8).astype(np.uint8)
    a[:, 300:310] = 0  # two big objects, left and right
    a[:40, 350:] = 0
    a[10:14, 360:364] = 1  # a small one, whole in one tile
    classes = ["background", "tissue"]
    path, n, objects = outlines_of(tmp_path, a, tile, classes, max_open_edges=20_000)
    assert check_outlines(path, a, classes, 0.5, 1.0, objects=objects) == len(objects)
    feats = features(path)
    by_object = pd.Series([f["properties"]["measurements"]["object_id"] for f in feats]).value_counts()
    assert n == len(feats) > len(objects) and by_object.max() > 10  # the big ones in parts
    parts = [f["properties"] for f in feats if "part" in f["properties"]["measurements"]]
    assert parts and all(p["name"].endswith(f"part {p['measurements']['part']}") for p in parts)
    assert len({f["id"] for f in feats}) == n
    # the same mask with the default budget: one feature per object
    (tmp_path / "whole").mkdir()
    _, n_whole, _ = outlines_of(tmp_path / "whole", a, tile, classes)
    assert n_whole == len(objects)
