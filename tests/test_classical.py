"""The classical (haematoxylin) model as a whole-slide `model:`: one threshold per
slide, tiles that agree with one pass over the whole image, and the workflow run
with no weights and no GPU."""

import json
import re

import numpy as np
import pandas as pd
import tifffile
import torch
import yaml
from conftest import CMU, REPO, corrupt_slide, needs_data
from e2e import snakemake
from helpers import ArrayMerger, all_tissue
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu

from wsiseg import classical, plan
from wsiseg import labels as L
from wsiseg.geometry import Geometry, read_target
from wsiseg.models import load_model
from wsiseg.postprocess import BaselineParams, classical_instances, haematoxylin, separated_mask
from wsiseg.segment import run_segmentation
from wsiseg.slide import open_slide
from wsiseg.tiling import plan_margin, plan_tiles, tile_spec_for

pytestmark = needs_data  # reads ../shared/data

CFG = dict(name="classical-nuclei", format="classical", mpp=0.5)


def test_load_model_needs_no_weights():
    spec = load_model(dict(CFG))
    assert spec.kind == "classical" and spec.classes == ["background", "nucleus"] and spec.mpp == 0.5
    assert spec.postprocess is None and spec.border == 0
    # the halo covers smoothing, opening and a whole nucleus, in px at the model's mpp
    assert spec.halo == classical.halo_px(BaselineParams(), 0.5) == 42
    # the checksum stands in for the weights: it follows the settings, so plans are remade
    other = load_model(dict(CFG, classical=dict(smooth_um=0.5)))
    assert len(spec.checksum) == 64 and other.checksum != spec.checksum
    assert other.module.params.smooth_um == 0.5


def test_tiles_equal_one_pass_with_the_slide_threshold():
    """Stitched tiles == the classical pipeline once over the whole (mirror-padded) image,
    with the one threshold that the plan stage picks for the slide."""
    spec = load_model(dict(CFG))
    with open_slide(str(CMU)) as s:
        geom = Geometry.for_slide(s, 0.5)
        img = classical.to_uint8(read_target(s, geom, 0, 0, geom.width, geom.height))
        margin = plan_margin(spec, "auto", False)
        tiles = tile_spec_for(spec, 256, margin)
        plan = plan_tiles(geom, tiles, None, 1)
        thr = spec.calibrate(lambda: open_slide(str(CMU)), geom, tiles, plan, print)
        thr = thr["classical_threshold"]
    # the sampled threshold is close to Otsu's over the whole region's tissue pixels
    h = haematoxylin(img, 0.5, BaselineParams())
    full = threshold_otsu(h[img.min(-1) < classical.GLASS_RGB])
    assert abs(thr - full) < 0.15 * full, (thr, full)
    spec.module.threshold = thr
    logits = run_segmentation(
        str(CMU), "cmu", None, geom, tiles, plan, spec.module, ArrayMerger(geom, 2), torch.device("cpu"), batch_size=2
    )
    tiled = logits.argmax(0)
    # one pass: the same pipeline over the whole image, mirror-padded like the windows
    padded = np.pad(img, ((margin, margin), (margin, margin), (0, 0)), mode="reflect")
    ids = classical_instances(padded, 0.5, BaselineParams(), threshold=thr)[margin:-margin, margin:-margin]
    ref = separated_mask(ids)
    n_nuclei = ndi.label(ref, structure=np.ones((3, 3)))[1]
    assert n_nuclei > 1000  # CMU-1's region is full of nuclei
    diff = tiled != ref
    # the same nuclei: every step is local within the margin; only where the watershed
    # meets a tie inside a clump (equal distance values) may a dividing line move by a pixel
    assert diff.sum() < 0.005 * ref.sum(), (diff.sum(), ref.sum())
    n_tiled = ndi.label(tiled, structure=np.ones((3, 3)))[1]
    assert abs(n_tiled - n_nuclei) <= 0.005 * n_nuclei, (n_tiled, n_nuclei)
    assert ((tiled > 0) & (ids == 0)).sum() == 0  # nothing outside the one-pass objects
    # the threshold matters: Otsu per tile would give another mask (why the slide gets one threshold)
    tile_thr = threshold_otsu(haematoxylin(img[:256, :256], 0.5, BaselineParams()))
    assert abs(tile_thr - thr) > 0.1 * thr


def test_plan_stage_stores_the_threshold(tmp_path):
    plan.run(
        slide_path=str(CMU),
        slide_id="cmu",
        mpp=None,
        **all_tissue(tmp_path, CMU),
        model_cfg=dict(CFG),
        tiling_cfg=dict(tile_size=512, margin="auto"),
        out_tsv=str(tmp_path / "plan.tsv"),
        out_json=str(tmp_path / "plan.json"),
    )
    meta = json.load(open(tmp_path / "plan.json"))
    assert meta["classical_threshold"] > 0 and meta["mask_classes"] == ["background", "nucleus"]
    assert meta["model"] == "classical-nuclei" and meta["tiles"]["margin"] == 42


def test_a_corrupt_sampled_tile_is_skipped(tmp_path):
    path = tmp_path / "damaged.tif"
    corrupt_slide(path)
    spec = load_model(dict(CFG))
    with open_slide(str(path)) as s:
        geom = Geometry.for_slide(s, 0.5)
    tiles = tile_spec_for(spec, 128, plan_margin(spec, "auto", False))
    plan = plan_tiles(geom, tiles, None, 1)
    msgs = []
    out = spec.calibrate(lambda: open_slide(str(path)), geom, tiles, plan, msgs.append)
    assert any("skipped" in m for m in msgs), msgs
    assert out["classical_threshold"] > 0


def test_workflow_with_the_classical_model(tmp_path):
    """The README example with `model: {format: classical}`: no weights, no GPU asked for,
    real nuclei masks and counts."""
    cfg = yaml.safe_load(open(REPO / "config" / "config.yaml"))
    cfg["model"] = dict(CFG)
    cfg["slides"] = str(REPO / cfg["slides"])
    cfg["device"] = "cuda"
    cfgfile = tmp_path / "config.yaml"
    cfgfile.write_text(yaml.safe_dump(cfg))
    snakemake(tmp_path, cfgfile)
    dry = snakemake(tmp_path, cfgfile, "-n", "-R", "segment").stdout
    seg = re.findall(r"rule segment:\n(?:    .*\n)+", dry)
    assert len(seg) == 1 and "gpu=1" not in seg[0]  # device: cuda, but the classical model runs on the CPU
    res = tmp_path / "results" / "classical-nuclei"
    assert pd.read_csv(res / "summary.csv")["status"].tolist() == ["ok"]
    plan = json.load(open(res / "example" / "plan.json"))
    assert plan["classical_threshold"] > 0
    log = (res / "example" / "logs" / "segment.log").read_text()
    assert "classical model (no GPU)" in log and "CUDA is not available" not in log
    mask = tifffile.imread(res / "example" / "mask.ome.tif")
    assert set(np.unique(mask)) == {0, 1}
    n = ndi.label(mask == 1, structure=np.ones((3, 3)))[1]
    st = pd.read_csv(res / "example" / "stats.csv").iloc[0]
    assert st["nucleus_count"] == n and st["model"] == "classical-nuclei"
    from test_workflow import check_synthetic_nuclei

    objects = pd.read_csv(res / "example" / "objects.csv.gz")
    assert len(objects) == n
    check_synthetic_nuclei(tmp_path, mask, n, min_dice=0.7, objects=objects)
    from e2e import check_outlines

    assert (
        check_outlines(
            res / "example" / "outlines.geojson.gz", mask, ["background", "nucleus"], 0.5, 2.0, objects=objects
        )
        == n
    )


def test_evaluate_scores_the_classical_model_with_its_settings(tmp_path):
    """`snakemake evaluate --configfile config/classical.yaml`: the classical model needs no
    weights; with the default settings it scores exactly as the classical baseline."""
    sheet = tmp_path / "one.tsv"
    rows = L.read_sheet(str(REPO / "config/labeled/miccai2015-train.tsv")).iloc[:1]  # image01, 20x
    rows.to_csv(sheet, sep="\t", index=False)
    cfg = yaml.safe_load(open(REPO / "config" / "config.yaml"))
    cfg["model"] = yaml.safe_load(open(REPO / "config" / "classical.yaml"))["model"]
    cfg["slides"] = str(REPO / cfg["slides"])
    cfg["evaluate"] = dict(sets={"one": str(sheet)}, methods=["model", "baseline"], tta=False)
    cfgfile = tmp_path / "config.yaml"
    cfgfile.write_text(yaml.safe_dump(cfg))
    snakemake(tmp_path, cfgfile, "evaluate")
    comp = pd.read_csv(tmp_path / "results" / "evaluation" / "comparison.csv").set_index("method")
    assert list(comp.index) == ["classical-nuclei", "classical-baseline"]
    assert comp.loc["classical-nuclei", "dice"] > 0.6
    assert comp.loc["classical-nuclei", "aji"] == comp.loc["classical-baseline", "aji"]
