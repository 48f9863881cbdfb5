"""Annotated images: loaders, rasterising, training targets, augmentation alignment."""

import json

import numpy as np
import pytest
from conftest import DATA, REPO, needs_data
from scipy import ndimage as ndi

from wsiseg import labels as L
from wsiseg.augment import AugmentConfig, augment, elastic_field, warp
from wsiseg.errors import ConfigError

MICCAI = DATA / "labeled" / "miccai2015-nuclei-seg-training"
MONUSEG = DATA / "labeled" / "monuseg2018-testset"


@needs_data
def test_text_mask_is_read_with_its_header():
    ids = L.read_text_mask(str(MICCAI / "image01_mask.txt"))
    assert ids.shape == (488, 643)  # header says 643 488 (width height)
    assert ids.max() == len(np.unique(ids)) - 1 == 351  # 351 nuclei, ids 1..351


@needs_data
def test_swapped_masks_are_detected_and_the_shipped_sheet_pairs_them(tmp_path):
    sheet = tmp_path / "pairs.tsv"
    sheet.write_text(f"image\tlabels\tmpp\n{MICCAI / 'image04.png'}\t{MICCAI / 'image04_mask.txt'}\t0.5\n")
    with pytest.raises(ConfigError, match=r"image04.*623x493.*863x597.*swapped"):
        L.load_set(str(sheet), 0.5)
    samples = L.load_set(str(REPO / "config/labeled/miccai2015-train.tsv"), 0.5)
    assert len(samples) == 15
    by = {s.name: s for s in samples}
    assert by["image04"].image.shape[:2] == by["image04"].instances.shape == (493, 623)
    # 40x tiles (0.25 µm/px) are halved to the model's 0.5 µm/px
    assert by["image08"].image.shape[:2] == (298, 399) and by["image08"].instances.shape == (298, 399)
    # nuclei are darker than background under the right pairing (image04 with image05's mask)
    grey = by["image04"].image.mean(-1)
    assert grey[by["image04"].instances > 0].mean() < grey[by["image04"].instances == 0].mean() - 50


@needs_data
def test_imagescope_xml_rasterised_at_model_mpp():
    xml = MONUSEG / "TCGA-2Z-A9J9-01A-01-TS1.xml"
    text = xml.read_text()
    n_regions = text.count("<Region ")
    ids, mpp = L.read_instances(str(xml), (1000, 1000), 1.0)
    assert mpp == pytest.approx(0.2527)
    assert ids.max() == n_regions  # one id per polygon
    # total area against the areas ImageScope reports for the regions (px²)
    areas = [float(a.split('"')[0]) for a in text.split(' Area="')[1:]]
    assert (ids > 0).sum() == pytest.approx(sum(areas), rel=0.05)
    # at half the resolution the same objects cover a quarter of the pixels
    half, _ = L.read_instances(str(xml), (500, 500), 0.5)
    assert half.max() == n_regions
    assert (half > 0).sum() == pytest.approx((ids > 0).sum() / 4, rel=0.03)


def test_qupath_geojson_polygons_with_holes(tmp_path):
    fc = {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [
                        [[10, 10], [30, 10], [30, 30], [10, 30], [10, 10]],  # 20 x 20 px square
                        [[15, 15], [25, 15], [25, 25], [15, 25], [15, 15]],  # 10 x 10 px hole
                    ],
                },
                "properties": {"objectType": "annotation"},
            },
            {
                "type": "Feature",
                "geometry": {
                    "type": "MultiPolygon",
                    "coordinates": [
                        [[[40, 40], [50, 40], [50, 50], [40, 50], [40, 40]]],
                        [[[60, 40], [70, 40], [70, 50], [60, 50], [60, 40]]],
                    ],
                },
            },
        ],
    }
    p = tmp_path / "cells.geojson"
    p.write_text(json.dumps(fc))
    ids, _ = L.read_instances(str(p), (80, 80), 1.0)
    assert ids.max() == 3
    assert (ids == 1).sum() == 400 - 100  # pixel (i, j) covers [j, j+1) x [i, i+1)
    assert (ids == 2).sum() == (ids == 3).sum() == 100


def test_three_class_target_separates_touching_objects():
    ids = np.zeros((20, 30), np.int32)
    ids[5:15, 3:14] = 1
    ids[5:15, 14:25] = 2  # touches object 1 along a vertical line
    t = L.three_class_target(ids)
    assert set(np.unique(t)) == {0, 1, 2}
    assert (t[:, 13] == 2)[5:15].all() and (t[:, 14] == 2)[5:15].all()  # 2-px line between them
    _, n = ndi.label(t == 1)
    assert n == 2  # interiors come apart
    assert ((t > 0) == (ids > 0)).all()


def test_border_weight_map_is_high_between_close_objects():
    ids = np.zeros((40, 60), np.int32)
    ids[10:30, 5:25] = 1
    ids[10:30, 27:47] = 2  # 2-px gap at columns 25, 26
    w = L.border_weight_map(ids, w0=10, sigma=5)
    fg = ids > 0
    wc_bg = 0.5 / (1 - fg.mean())
    assert w[20, 25] == pytest.approx(wc_bg + 10 * np.exp(-((1 + 2) ** 2) / 50), rel=1e-4)  # d1=1, d2=2
    assert w[0, 59] < wc_bg + 0.01  # far from both objects: class weight only
    assert w[20, 15] == pytest.approx(0.5 / fg.mean())


def paper_weight_map(ids, w0=10.0, sigma=5.0):
    """The formula as written, every object's distance over the whole image (slow reference)."""
    fg = ids > 0
    f = fg.mean()
    wc = np.where(fg, 0.5 / f, 0.5 / (1 - f))
    dists = np.sort(np.stack([ndi.distance_transform_edt(ids != k) for k in np.unique(ids[fg])]), axis=0)
    d1, d2 = dists[0], dists[1]
    return wc + np.where(fg, 0.0, w0 * np.exp(-((d1 + d2) ** 2) / (2 * sigma**2)))


@needs_data
def test_border_weight_map_equals_the_formula_on_a_real_tile():
    """The windowed distance maps give the paper's weights on MICCAI image14 (139 nuclei at
    0.5 um/px, 230 x 249 px): nowhere off by more than w0 * exp(-18) (the cut-off at 6 sigma)."""
    ids = L.read_text_mask(str(MICCAI / "image14_mask.txt"))[::2, ::2]  # 40x -> 20x, ids kept
    ids[:, :3] = 7  # an object on the border, cut by the window's edge
    want = paper_weight_map(ids)
    got = L.border_weight_map(ids)
    assert got.dtype == np.float32 and got.shape == ids.shape
    assert np.abs(got - want).max() < 1e-4
    assert (want > 5).sum() > 500  # the gaps between touching nuclei are there to get right


def test_elastic_deformation_keeps_image_and_mask_aligned():
    """A synthetic pattern whose image encodes its own labels must still do so after warping."""
    rng = np.random.default_rng(1)
    ids = np.zeros((200, 200), np.int32)
    k = 0
    for y in range(10, 190, 30):
        for x in range(10, 190, 30):
            k += 1
            ids[y : y + 18, x : x + 18] = k
    img = np.stack([np.where(ids > 0, 40, 230)] * 3, -1).astype(np.uint8)
    cfg = AugmentConfig(scale=0.1, elastic_sigma=8.0, hed_sigma=0, hed_bias=0, brightness=0, contrast=0)
    for _ in range(5):
        a_img, (a_ids,), _ = augment(img, [ids], 128, cfg, rng)
        dark = a_img[..., 0] < 135
        agree = (dark == (a_ids > 0)).mean()
        assert agree > 0.99, agree
        # and it really deforms: squares no longer have straight edges everywhere
    dy, dx = elastic_field((128, 128), 3, 8.0, np.random.default_rng(2))
    assert 2 < np.abs(dy).max() < 40 and np.abs(np.diff(dy, axis=0)).max() < 1.0  # smooth
    # nearest-neighbour warping never invents label ids
    coords = (
        np.stack(np.meshgrid(np.arange(64) + 0.3, np.arange(64) + 0.7, indexing="ij")) + np.stack([dy, dx])[:, :64, :64]
    )
    assert set(np.unique(warp(ids, coords, 0))) <= set(np.unique(ids))


@needs_data
def test_stain_jitter_changes_colour_not_geometry():
    rng = np.random.default_rng(0)
    s = L.load_set(str(REPO / "config/labeled/miccai2015-train.tsv"), 0.5)[13]
    cfg = AugmentConfig(scale=0, elastic_sigma=0, rot90=False, flips=False, hed_sigma=0.1, hed_bias=0.02)
    h, w = s.image.shape[:2]
    y0, x0 = h // 2 - 48, w // 2 - 48
    a_img, (a_ids,), _ = augment(s.image, [s.instances], 96, cfg, rng, centre=(y0 + 47.5, x0 + 47.5))
    assert (a_ids == s.instances[y0 : y0 + 96, x0 : x0 + 96]).all()
    diff = np.abs(a_img.astype(int) - s.image[y0 : y0 + 96, x0 : x0 + 96]).mean()
    assert 1 < diff < 40


@needs_data
def test_blur_and_noise_change_the_image_only_and_keep_it_aligned():
    """Optics/sensor augmentation: targets untouched, nuclei stay where their labels are."""
    s = L.load_set(str(REPO / "config/labeled/miccai2015-train.tsv"), 0.5)[13]
    h, w = s.image.shape[:2]
    y0, x0 = h // 2 - 64, w // 2 - 64
    crop_ids = s.instances[y0 : y0 + 128, x0 : x0 + 128]
    crop_img = s.image[y0 : y0 + 128, x0 : x0 + 128]
    plain = AugmentConfig(
        scale=0, elastic_sigma=0, rot90=False, flips=False, hed_sigma=0, hed_bias=0, brightness=0, contrast=0
    )
    # with blur and noise off, the crop is the image itself (no colour drift from the HED round trip >1 level)
    img0, (ids0,), _ = augment(
        s.image, [s.instances], 128, plain, np.random.default_rng(0), centre=(y0 + 63.5, x0 + 63.5)
    )
    assert (ids0 == crop_ids).all() and np.abs(img0.astype(int) - crop_img).max() <= 1
    grey = lambda im: im.astype(np.float32).mean(-1)  # noqa: E731
    for kw in ({"blur": 2.0}, {"noise": 0.05}, {"blur": 1.5, "noise": 0.03}):
        cfg = AugmentConfig(**{**plain.__dict__, **kw})
        changed = []
        for seed in range(6):  # strengths are drawn from [0, max]: look at several draws
            img, (ids,), _ = augment(
                s.image, [s.instances], 128, cfg, np.random.default_rng(seed), centre=(y0 + 63.5, x0 + 63.5)
            )
            assert (ids == crop_ids).all(), kw  # targets never change
            assert img.dtype == np.uint8 and img.shape == crop_img.shape
            changed.append(np.abs(img.astype(int) - crop_img).mean())
            # nuclei stay darker than background by about as much as before: nothing shifted
            nuc, bg = ids > 0, ids == 0
            before = grey(crop_img)[bg].mean() - grey(crop_img)[nuc].mean()
            after = grey(img)[bg].mean() - grey(img)[nuc].mean()
            assert 0.75 * before < after <= 1.05 * before, (kw, seed, before, after)
            if "noise" not in kw:  # blur alone keeps the mean intensity
                assert abs(grey(img).mean() - grey(crop_img).mean()) < 1.0
        assert max(changed) > 2, (kw, changed)  # it does something
        assert len(set(np.round(changed, 3))) > 1, (kw, changed)  # with a random strength
    # a fixed blur lowers the gradient energy; noise is zero-mean with the std asked for
    g = lambda im: np.abs(np.diff(grey(im), axis=1)).mean()  # noqa: E731
    from wsiseg.augment import add_noise, blur_image

    assert g(blur_image(crop_img, 1.5)) < 0.7 * g(crop_img)
    resid = add_noise(crop_img, 0.05, np.random.default_rng(0)).astype(float) - crop_img
    inside = (crop_img > 40) & (crop_img < 215)  # not clipped at 0 or 255
    assert abs(resid[inside].mean()) < 0.3 and abs(resid[inside].std() - 0.05 * 255) < 0.3
    # blur is centred: a single bright pixel spreads symmetrically around itself
    dot = np.zeros((33, 33, 3), np.uint8)
    dot[16, 16] = 255
    b = blur_image(dot, 1.5)[..., 0].astype(float)
    yy, xx = np.mgrid[:33, :33]
    assert abs((b * yy).sum() / b.sum() - 16) < 1e-6 and abs((b * xx).sum() / b.sum() - 16) < 1e-6


@needs_data
def test_qupath_geojson_on_a_slide_gives_one_sample_per_annotated_region(tmp_path):
    """Annotations exported from a slide (level-0 px) are read at the model's mpp, region by region."""
    from conftest import CMU

    from wsiseg.geometry import Geometry, read_target
    from wsiseg.slide import open_slide

    def square(x, y, side):
        return {
            "type": "Feature",
            "geometry": {
                "type": "Polygon",
                "coordinates": [[[x, y], [x + side, y], [x + side, y + side], [x, y + side], [x, y]]],
            },
        }

    # two annotated areas far apart: 3 nuclei-sized squares near (500, 600), 1 near (1800, 2500)
    feats = [square(500, 600, 20), square(530, 600, 20), square(500, 640, 30), square(1800, 2500, 40)]
    gj = tmp_path / "cmu.geojson"
    gj.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    sheet = tmp_path / "slides.tsv"
    sheet.write_text(f"name\timage\tlabels\tmpp\ncmu\t{CMU}\t{gj}\t\n")
    samples = L.load_set(str(sheet), 1.0, keep_native=True)  # 1 µm/px: level 0 (0.499) resampled x0.5
    assert [s.name for s in samples] == ["cmu-r1", "cmu-r2"]
    a, b = samples
    assert a.instances.max() == 3 and b.instances.max() == 1
    s0 = 1.0 / 0.499
    assert (b.instances == 1).sum() == pytest.approx((40 / s0) ** 2, rel=0.15)
    # the image is exactly what inference reads there (same resampling)
    with open_slide(str(CMU)) as slide:
        geom = Geometry.for_slide(slide, 1.0)
        tx, ty = int((1800 - 16 / 0.499) / s0), int((2500 - 16 / 0.499) / s0)
        ref = np.clip(read_target(slide, geom, tx, ty, *b.image.shape[1::-1]) + 0.5, 0, 255).astype(np.uint8)
    assert (ref == b.image).all()
    # a region too large for memory is refused with a clear message
    big = tmp_path / "big.geojson"
    big.write_text(json.dumps({"type": "FeatureCollection", "features": [square(0, 0, 2200)]}))
    monkey = L.MAX_REGION_PX
    try:
        L.MAX_REGION_PX = 500 * 500
        sheet.write_text(f"name\timage\tlabels\tmpp\ncmu\t{CMU}\t{big}\t\n")
        with pytest.raises(ConfigError, match="cmu.*annotate smaller regions"):
            L.load_set(str(sheet), 1.0)
    finally:
        L.MAX_REGION_PX = monkey


@needs_data
def test_nuclei_training_sheet_mixes_sources_and_resolutions():
    """config/labeled/nuclei-train.tsv: MICCAI text masks and MoNuSeg 16-bit label PNGs, 20x and
    40x tiles, all brought to the model's 0.5 µm/px; validation = four tissue source sites."""
    df = L.read_sheet(str(REPO / "config" / "labeled" / "nuclei-train.tsv"))
    assert len(df) == 45 and (df["split"] == "val").sum() == 8
    val_sites = {n.split("-")[1] for n in df[df["split"] == "val"]["name"]}
    train_sites = {n.split("-")[1] for n in df[df["split"] == "train"]["name"] if n.startswith("TCGA")}
    assert val_sites == {"21", "B0", "E2", "G2"} and not val_sites & train_sites
    rows = df.set_index("name")
    s40, s20 = (
        L.load_sample(dict(rows.loc[n], name=n), 0.5, keep_native=True)
        for n in ("TCGA-21-5784-01Z-00-DX1", "TCGA-HE-7128-01Z-00-DX1")
    )
    assert s40.native_instances.dtype.kind in "iu" and s40.native_instances.max() == 398  # 16-bit ids, 398 nuclei
    assert s40.image.shape[:2] == (505, 505) and s40.mpp == 0.2527  # 1000 px at 0.2527 -> 0.5 µm/px
    assert s20.image.shape[:2] == (1001, 1001) and s20.native_instances.max() == 1073
    # nuclei keep their size in µm: median area at the model's mpp agrees between 20x and 40x sources
    for s in (s40, s20):
        areas = np.bincount(s.instances.ravel())[1:]
        assert 10 < np.median(areas[areas > 0]) * 0.25 < 80  # µm² of a nucleus
    assert len(np.unique(s40.instances)) - 1 >= 0.95 * 398  # nearest-neighbour resampling keeps the nuclei


def test_relabel_equals_the_sort_based_relabelling():
    """The lookup-table relabelling gives exactly np.unique's ranks, with and without
    background, for sparse and dense ids, and falls back to the sort for other ids."""

    def by_sort(ids):
        u, inv = np.unique(ids, return_inverse=True)
        out = inv.reshape(ids.shape).astype(np.int32)
        return out + 1 if u[0] != 0 else out

    rng = np.random.default_rng(0)
    cases = [
        rng.integers(0, 50, (64, 80)),
        rng.integers(3, 9, (30, 30)),
        rng.integers(0, 10**6, (40, 40)),
        np.zeros((5, 5), np.int64),
        rng.integers(-5, 5, (20, 20)),
        rng.integers(0, 2**20, (300, 300)).astype(np.int32),
        np.array([[7]], np.uint16),
    ]
    for ids in cases:
        got = L.relabel(ids)
        assert got.dtype == np.int32 and np.array_equal(got, by_sort(ids)), ids.dtype
