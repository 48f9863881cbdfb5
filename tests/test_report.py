"""Report plots: per-slide histograms against numpy over the whole table (read in chunks),
with and without the shape columns; the archive figures' bars, distributions and failure
groups against the numbers they show, on real objects (MICCAI nuclei through the
objects.csv.gz writer) and real slides' error messages; the figures' fixed layout (no text
cut off or over another, no panel over another) on random archives of 1, 40 and 200 slides.
The report opened in Chromium: tests/test_workflow.py (archive run)."""

import xml.etree.ElementTree as ET

import numpy as np
import pandas as pd
import pytest
from conftest import BAD, CMU, DATA, TCGA, needs_data
from helpers import array_tiles
from matplotlib.markers import TICKDOWN
from scipy import ndimage as ndi
from scipy.spatial import cKDTree
from skimage.measure import regionprops_table

from wsiseg import report
from wsiseg.errors import SlideError
from wsiseg.labels import read_text_mask
from wsiseg.objects import count_objects, object_rows, write_objects
from wsiseg.runner import write_json
from wsiseg.slide import inspect_slide

CLASSES = ["background", "nucleus", "mitosis"]
SHAPES = ("eccentricity", "solidity", "orientation")


def miccai_objects(path, slide_id, half=None, shapes=False):
    """objects.csv.gz of the MICCAI image05 nuclei (a second class: every fifth nucleus),
    as the stats stage writes it, at 0.25 µm/px; ``half`` 0/1: the left/right half of the
    image only (another 'slide'); ``shapes``: with eccentricity, solidity and orientation
    columns measured by scikit-image on the same objects (as the stats stage may add)."""
    ids = read_text_mask(str(DATA / "labeled" / "miccai2015-nuclei-seg-training" / "image05_mask.txt"))
    a = (ids > 0).astype(np.uint8)
    a[(ids > 0) & (ids % 5 == 0)] = 2
    if half is not None:
        w = a.shape[1] // 2
        a = a[:, :w] if half == 0 else a[:, w:]
    n = write_objects(path, object_rows(count_objects(array_tiles(a, 128), a.shape[1], 3), CLASSES, 0.25, 1, slide_id))
    if shapes:
        t = pd.read_csv(path)
        props = []
        for k in (1, 2):
            lab, _ = ndi.label(a == k, structure=np.ones((3, 3)))
            props.append(pd.DataFrame(regionprops_table(lab, properties=("area", "centroid", *SHAPES))))
        p = pd.concat(props, ignore_index=True)
        # the same objects: matched by centroid (pixel i spans [i, i + 1))
        dist, idx = cKDTree(p[["centroid-1", "centroid-0"]].to_numpy() + 0.5).query(
            t[["centroid_x_px", "centroid_y_px"]].to_numpy()
        )
        p = p.iloc[idx].reset_index(drop=True)
        assert dist.max() < 0.01 and np.allclose(p["area"] * 0.0625, t["area_um2"], atol=0.01)
        t["eccentricity"], t["solidity"] = p["eccentricity"], p["solidity"]
        t["orientation_deg"] = np.degrees(p["orientation"])
        t.to_csv(path, index=False)
    return n


@needs_data
def test_histograms_read_in_chunks_equal_numpy_on_the_whole_table(tmp_path):
    path = str(tmp_path / "objects.csv.gz")
    n = miccai_objects(path, "s1", shapes=True)
    t = pd.read_csv(path)
    h = report.object_histograms(path, chunk_rows=37)  # many chunks, classes mixed within them
    assert h == report.object_histograms(path)
    assert h["objects"] == t["class"].value_counts().to_dict() and sum(h["objects"].values()) == n > 100
    # every column of the table the report knows (the stats stage writes shape, stain and spacing columns)
    assert set(h["metrics"]) == set(report.METRICS) & set(t.columns)
    assert {"area_um2", "equivalent_diameter_um", "eccentricity", "solidity", "circularity"} <= set(h["metrics"])
    for col, v in h["metrics"].items():
        m = report.METRICS[col]
        assert v["bins"] == m.spec()
        for cls, g in t.groupby("class"):
            e = m.edges()
            want = np.histogram(np.clip(g[col], e[0], e[-1]), e)[0]
            assert v["counts"][cls] == want.tolist() and sum(v["counts"][cls]) == g[col].notna().sum()
    # a table written before the morphometrics (results of an older version): sizes only
    plain = str(tmp_path / "plain.csv.gz")
    miccai_objects(plain, "s1")
    old = pd.read_csv(plain)
    morph = set(report.METRICS) - {"area_um2", "equivalent_diameter_um"}
    old.drop(columns=[c for c in old.columns if c in morph]).to_csv(plain, index=False)
    assert set(report.object_histograms(plain)["metrics"]) == {"area_um2", "equivalent_diameter_um"}


def test_bins_count_values_beyond_the_axis_at_its_ends():
    m = report.METRICS["area_um2"]
    h = m.histogram([0.001, 1e9, np.nan, np.inf, 5.0])
    assert h.sum() == 3 and h[0] == 1 and h[-1] == 1  # NaN and inf left out
    assert report.METRICS["neighbours_25um"].histogram([0, 1, 1, 50, 80]).tolist()[:2] == [1, 2]


def summary_of(tmp_path, rows):
    """summary.csv as aggregate writes it: rows of stats columns, and failed rows."""
    df = pd.DataFrame(rows)
    path = tmp_path / "summary.csv"
    df.to_csv(path, index=False)
    return pd.read_csv(path, dtype={"slide_id": str})


def ok_row(sid, tissue, counts, fractions):
    r = dict(slide_id=sid, path=f"/a/{sid}.svs", status="ok", error="", tissue_area_mm2=tissue)
    for c, n, f in zip(("nucleus", "mitosis"), counts, fractions):
        r.update({f"{c}_count": n, f"{c}_fraction_of_tissue": f, f"{c}_area_mm2": f * tissue})
    return r


def failed_rows():
    """Failed rows with the messages real bad slides get from inspection."""
    out = []
    for sid, path, mpp in [
        ("typo", CMU.parent / "no-such-slide.svs", None),
        ("typo2", CMU.parent / "another-missing.svs", None),
        ("broken", BAD["broken"], None),
        ("no_mpp", TCGA, None),
        ("vectra", BAD["qptiff"], None),
    ]:
        with pytest.raises(SlideError) as exc:
            inspect_slide(str(path), sid, mpp)
        out.append(dict(slide_id=sid, path=str(path), status="failed", failed_stage="inspect", error=str(exc.value)))
    return out


@needs_data
def test_slides_figure_shows_each_slide(tmp_path):
    rows = [ok_row("b", 2.0, (900, 30), (0.3, 0.02)), ok_row("a", 0.5, (100, 0), (0.1, 0.0))] + failed_rows()
    summary = summary_of(tmp_path, rows)
    fig = report.plot_slides(summary)
    dens_n, dens_m, frac = fig.axes[:3]
    assert [t.get_text() for t in dens_n.get_yticklabels()] == summary["slide_id"].tolist()
    widths = [p.get_width() for p in dens_n.patches]
    assert widths == pytest.approx([450, 200, 0, 0, 0, 0, 0])  # count / tissue mm²; failed slides: no bar
    assert [p.get_width() for p in dens_m.patches] == pytest.approx([15, 0, 0, 0, 0, 0, 0])
    # stacked class areas, % of tissue: nucleus bars, then mitosis bars from their ends
    assert [p.get_width() for p in frac.patches][:2] == pytest.approx([30, 10])
    assert [p.get_x() for p in frac.patches][7:9] == pytest.approx([30, 10])
    assert sum(t.get_text().strip() == "failed" for t in dens_n.texts) == 5
    assert "2 slides processed, 5 failed" in fig.get_suptitle()
    # <class>_per_mm2, where the stats stage writes it, is taken as it is
    summary["nucleus_per_mm2"] = [1.5, 2.5] + [np.nan] * 5
    assert [p.get_width() for p in report.plot_slides(summary).axes[0].patches][:2] == pytest.approx([1.5, 2.5])
    # many slides: the distribution of the per-slide values
    many = summary_of(tmp_path, [ok_row(f"s{i:03d}", 1.0, (i, 1), (0.01, 0.001)) for i in range(60)])
    fig = report.plot_slides(many)
    assert sum(p.get_height() for p in fig.axes[0].patches) == 60


@needs_data
def test_distributions_pooled_and_per_slide(tmp_path):
    paths = []
    for i in (0, 1):
        objects = str(tmp_path / f"o{i}.csv.gz")
        miccai_objects(objects, f"half{i}", half=i, shapes=True)
        paths.append(str(tmp_path / f"h{i}.json"))
        report.run_histograms(objects_csv=objects, slide_id=f"half{i}", out_json=paths[-1])
    # a slide without objects: a row of its own, marked
    empty = str(tmp_path / "none.csv.gz")
    write_objects(
        empty, object_rows(count_objects(array_tiles(np.zeros((9, 9), np.uint8), 4), 9, 3), CLASSES, 1, 1, "e")
    )
    paths.append(str(tmp_path / "h2.json"))
    report.run_histograms(objects_csv=empty, slide_id="empty", out_json=paths[-1])
    dist = report.Distributions.read(paths)
    assert dist.rows == [
        ("half0", "nucleus"),
        ("half0", "mitosis"),
        ("half1", "nucleus"),
        ("half1", "mitosis"),
        ("empty", ""),
    ]
    fig = report.plot_distributions(dist, report.SHAPE_METRICS, "Object shapes", "none")
    # the columns with values (the colour ones stay empty: these tables were made without a slide)
    assert [m.column for m in dist.drawn(report.SHAPE_METRICS)] == [
        "circularity",
        "eccentricity",
        "solidity",
        "orientation_deg",
        "nearest_neighbour_um",
        "neighbours_25um",
    ]
    k = [m.column for m in dist.drawn(report.SHAPE_METRICS)].index("eccentricity")
    pooled, per_slide = fig.axes[2 * k], fig.axes[2 * k + 1]  # a row of two panels per metric
    whole = str(tmp_path / "whole.csv.gz")
    miccai_objects(whole, "whole", shapes=True)
    t = pd.read_csv(whole)
    e = report.METRICS["eccentricity"].edges()
    for step, cls in zip(pooled.patches, ("nucleus", "mitosis")):
        values, edges, _ = step.get_data()
        # the two halves cut some nuclei in two: pooled counts equal the halves' tables, close to the whole's
        halves = pd.concat([pd.read_csv(tmp_path / f"o{i}.csv.gz") for i in (0, 1)])
        want = np.histogram(halves.loc[halves["class"] == cls, "eccentricity"], e)[0]
        assert values == pytest.approx(100 * want / want.sum()) and np.allclose(edges, e)
        assert abs(len(halves[halves["class"] == cls]) - (t["class"] == cls).sum()) < 10
    mesh = per_slide.collections[0].get_array().reshape(5, -1)
    assert (
        list(mesh[:4].sum(1)) == pytest.approx([100] * 4) and mesh[4].sum() == 0
    )  # each row: % of the slide's objects
    labels = [x.get_text() for x in per_slide.get_yticklabels()]
    assert labels == ["half0 · nucleus", "half0 · mitosis", "half1 · nucleus", "half1 · mitosis", "empty (no objects)"]
    # histograms with other bins (another version) are left out and said so
    other = report.read_json(paths[0])
    other["metrics"]["area_um2"]["bins"]["bins"] = 7
    write_json(str(tmp_path / "old.json"), other)
    said = []
    dist = report.Distributions.read([str(tmp_path / "old.json"), paths[1]], log=said.append)
    assert dist.left_out == ["half0"] and "other bins" in said[0] and {s for s, _ in dist.rows} == {"half1"}
    # no shape columns: a figure that says so
    fig = report.plot_distributions(report.Distributions([], {}, []), report.SHAPE_METRICS, "Object shapes", "no shape")
    assert "no shape" in " ".join(t.get_text() for t in fig.texts) and not fig.axes


@needs_data
def test_failed_slides_grouped_by_reason_with_the_fix(tmp_path):
    summary = summary_of(tmp_path, [ok_row("a", 1.0, (5, 1), (0.1, 0.01))] + failed_rows())
    groups, fixes = report.failure_groups(summary)
    assert groups == {  # led by the stage that failed (summary.csv's failed_stage)
        "inspect: file not found": ["typo", "typo2"],  # two paths, one reason
        "inspect: not a slide format OpenSlide or tifffile can read": ["broken"],
        "inspect: the file has no resolution (mpp) in its metadata": ["no_mpp"],
        "inspect: a 3-channel image, not an 8-bit RGB brightfield slide": ["vectra"],  # details in parentheses out
    }
    most = ["inspect: file not found", "inspect: a 3-channel image, not an 8-bit RGB brightfield slide"]
    assert list(groups)[:2] == most  # most first
    assert fixes["inspect: file not found"] == "correct the 'path' column of the sample sheet"
    fig = report.plot_failed(summary)
    bars, text = fig.axes
    assert [p.get_width() for p in bars.patches] == [2, 1, 1, 1]
    shown = " ".join(t.get_text() for t in text.texts)
    assert all(r in shown for r in groups) and "typo, typo2" in shown and "fix: correct the 'path'" in shown
    assert "5 of 6" in fig.get_suptitle()
    # a failure after inspection: its own stage leads the reason, apart from the same words at inspection
    summary["failed_stage"] = [None, "inspect", "inspect", "inspect", "segment", "inspect"]
    assert "segment: the file has no resolution (mpp) in its metadata" in report.failure_groups(summary)[0]
    fig = report.plot_failed(summary_of(tmp_path, [ok_row("a", 1.0, (5, 1), (0.1, 0.01))]))
    assert "None: all 1 slides" in " ".join(t.get_text() for t in fig.texts)


@needs_data
def test_archive_figures_are_svg_and_reproducible(tmp_path):
    objects = str(tmp_path / "o.csv.gz")
    miccai_objects(objects, "a")
    report.run_histograms(objects_csv=objects, slide_id="a", out_json=str(tmp_path / "h.json"))
    summary_of(tmp_path, [ok_row("a", 1.0, (5, 1), (0.1, 0.01))] + failed_rows())
    said = []
    outs = []
    for run in ("1", "2"):
        out = {k: str(tmp_path / f"{k}{run}.svg") for k in ("slides", "sizes", "shapes", "failed")}
        report.run_plots(
            summary_csv=str(tmp_path / "summary.csv"), histograms=[str(tmp_path / "h.json")], out=out, log=said.append
        )
        outs.append(out)
    for k in outs[0]:
        a, b = (open(o[k], "rb").read() for o in outs)
        assert a == b, k  # no date, fixed ids: the same inputs give the same bytes
        root = ET.fromstring(a)
        assert root.tag.endswith("svg") and float(root.get("width").rstrip("pt")) > 300
    sizes = "sizes: area_um2, equivalent_diameter_um, perimeter_um, major_axis_um, minor_axis_um"
    shapes = "shapes: circularity, eccentricity, solidity, orientation_deg, nearest_neighbour_um, neighbours_25um"
    assert f"{sizes}; {shapes}" in said[0] and "(5 failed)" in said[0]


def archive(n, classes=("nucleus",), failed_every=20, seed=0):
    """summary.csv rows and per-slide histograms of n slides (random counts; ids of 6 to 47
    characters; every ``failed_every``-th slide failed), the haematoxylin OD within one decade."""
    rng = np.random.default_rng(seed)
    rows, hist_rows, counts = [], [], {c: [] for c in report.METRICS}
    for i in range(n):
        sid = f"s{i:04d}" + "-TCGA-A1-A0SB-01Z" * int(rng.integers(0, 3)) + "-DX1" * (i % 3)
        if failed_every and i % failed_every == failed_every - 1:
            error = f"slide '{sid}': file not found: /archive/{sid}.svs. Fix: correct the 'path' column of the sheet"
            rows.append(dict(slide_id=sid, status="failed", error=error))
            continue
        rows.append(ok_row(sid, rng.uniform(0.5, 50), rng.integers(10, 10**5, 2), rng.uniform(0, 0.3, 2)))
        for cls in classes:
            hist_rows.append((sid, cls))
            for col, m in report.METRICS.items():
                h = rng.poisson(50 * np.exp(-0.5 * ((np.arange(m.bins) - m.bins / 2) / (m.bins / 8)) ** 2))
                if col == "mean_hematoxylin_od":  # bins of 1/10 decade: 0.3 to 1.6
                    h[:25], h[32:] = 0, 0
                counts[col].append(h)
    summary = pd.DataFrame(rows)
    if "mitosis" not in classes:
        summary = summary.drop(columns=[c for c in summary if c.startswith("mitosis")])
    return summary, report.Distributions(hist_rows, {c: np.array(v) for c, v in counts.items()}, [])


def drawn_texts(fig):
    """(text, bbox in points) of every text the SVG writer draws, with the SVG's glyph metrics."""
    import io
    from unittest import mock

    from matplotlib.text import Text

    seen, draw = {}, Text.draw

    def record(self, renderer):
        draw(self, renderer)
        if self.get_visible() and self.get_text().strip():
            seen[self] = self.get_window_extent(renderer)

    with mock.patch.object(Text, "draw", record):
        report._save(fig, io.BytesIO())
    return list(seen.items())


@pytest.mark.parametrize(
    "n, classes", [(1, ("nucleus",)), (40, ("nucleus",)), (200, ("nucleus", "mitosis"))], ids=["1", "40", "200"]
)
def test_figures_laid_out_without_overlaps(n, classes):
    """The fixed layout (panels placed from their measured tick labels, no layout engine): every
    text inside the figure, no text over another or over another panel, no panel over another;
    one slide, as many as are labelled (long ids, failed ones), and many (two classes)."""
    summary, dist = archive(n, classes)
    figures = [
        report.plot_slides(summary),
        report.plot_distributions(dist, report.SIZE_METRICS, "Object sizes", "none"),
        report.plot_distributions(dist, report.SHAPE_METRICS, "Object shapes", "none"),
        report.plot_failed(summary) if n > 1 else None,
    ]
    for fig in filter(None, figures):
        assert fig.get_layout_engine() is None  # drawn once: no layout pass before the SVG's
        texts = drawn_texts(fig)
        w, h = fig.get_size_inches() * 72
        boxes = np.array([b.extents for _, b in texts])  # x0, y0, x1, y1
        out = (boxes[:, :2] < -0.5).any(1) | (boxes[:, 2] > w + 0.5) | (boxes[:, 3] > h + 0.5)
        assert not out.any(), [t.get_text() for (t, _), o in zip(texts, out) if o]

        def overlap(a, b):
            return (np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]) > 0.5) & (
                np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]) > 0.5
            )

        hit = np.triu(overlap(boxes, boxes), 1)
        assert not hit.any(), [(texts[i][0].get_text(), texts[j][0].get_text()) for i, j in zip(*np.nonzero(hit))]
        panels = np.array([ax.get_position().extents * [w, h, w, h] for ax in fig.axes])
        assert not np.triu(overlap(panels, panels), 1).any()
        owner = np.array([[t.axes is ax for ax in fig.axes] for t, _ in texts])
        over = overlap(boxes, panels) & ~owner
        assert not over.any(), [(texts[i][0].get_text(), j) for i, j in zip(*np.nonzero(over))]
    # the haematoxylin OD within one decade (0.25 to 2): ticks at 0.5 and 1 labelled so, not matplotlib's
    # minor tick labels 3×10⁻¹, 4×10⁻¹ ... (which overlapped); its minor ticks where matplotlib puts them
    k = [m.column for m in dist.drawn(report.SHAPE_METRICS)].index("mean_hematoxylin_od")
    for ax in figures[2].axes[2 * k : 2 * k + 2]:
        lo, hi = ax.get_xlim()
        assert [t.get_text() for t in ax.get_xticklabels() if lo <= t.get_position()[0] <= hi] == ["0.5", "1"]
        (marks,) = [a for a in ax.lines if a.get_marker() == TICKDOWN]
        assert marks.get_xdata() == pytest.approx([0.3, 0.4, 0.6, 0.7, 0.8, 0.9])
