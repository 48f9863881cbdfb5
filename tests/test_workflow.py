"""End to end through Snakemake: the README's example, and real slides of every
format (plus bad ones) in one archive run. Outputs are checked, not just present."""

import json
import re

import numpy as np
import openslide
import pandas as pd
import pytest
import tifffile
import torch
import yaml
from conftest import BAD, CMU, DICOM, NDPI, REPO, TCGA, corrupt_slide, needs_data
from e2e import CLASSES, MODEL, check_outlines, check_slide_outputs, snakemake, tiny_model
from PIL import Image
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from wsiseg.models.checkpoint import save_checkpoint
from wsiseg.unet import UNet

pytestmark = needs_data  # reads ../shared/data


def job_counts(dry_run_output: str) -> dict:
    """{rule: count} from a dry run's 'Job stats' table."""
    m = re.search(r"Job stats:\n.*?\n-+\s+-+\n(.*?)\ntotal", dry_run_output, re.S)
    if not m:
        return {}
    return {line.split()[0]: int(line.split()[1]) for line in m.group(1).splitlines() if line.strip()}


# ------------------------------------------------------------- README example
def test_readme_example_with_shipped_config(tmp_path):
    cfg = yaml.safe_load(open(REPO / "config" / "config.yaml"))
    cfg["model"]["weights"] = str(REPO / cfg["model"]["weights"])
    cfg["slides"] = str(REPO / cfg["slides"])
    cfgfile = tmp_path / "config.yaml"
    cfgfile.write_text(yaml.safe_dump(cfg))
    snakemake(tmp_path, cfgfile)
    res = tmp_path / "results" / cfg["model"]["name"]
    summary = pd.read_csv(res / "summary.csv")
    assert summary["slide_id"].tolist() == ["example"] and summary["status"].tolist() == ["ok"]
    with openslide.OpenSlide(str(tmp_path / "resources/example/synthetic_he.tif")) as s:
        w0, h0 = s.dimensions
        assert s.level_count >= 3
    with tifffile.TiffFile(res / "example" / "mask.ome.tif") as tif:
        assert tif.series[0].levels[0].shape == (round(h0 * 0.25 / 0.5), round(w0 * 0.25 / 0.5))
    plan = json.load(open(res / "example" / "plan.json"))
    assert plan["geometry"]["level"] == 1  # 0.25 µm/px slide, 0.5 µm/px model: level 1, not level 0
    # the shipped nuclei model: separated nuclei, counted one by one
    assert plan["mask_classes"] == ["background", "nucleus"] and plan["postprocess"]
    mask = tifffile.imread(res / "example" / "mask.ome.tif")
    assert set(np.unique(mask)) == {0, 1}
    lab, n = ndi.label(mask == 1, structure=np.ones((3, 3)))
    st = pd.read_csv(res / "example" / "stats.csv").iloc[0]
    assert st["nucleus_count"] == n and "boundary_count" not in st
    # one row per nucleus: its area and where it is on the slide (level-0 px, as QuPath counts)
    objects = pd.read_csv(res / "example" / "objects.csv.gz")
    assert len(objects) == n and set(objects["class"]) == {"nucleus"} and (objects["slide_id"] == "example").all()
    assert objects["object_id"].tolist() == list(range(1, n + 1))
    assert objects["area_um2"].sum() == pytest.approx(st["nucleus_area_mm2"] * 1e6, rel=1e-9)
    com = np.array(ndi.center_of_mass(mask == 1, lab, np.arange(1, n + 1))) + 0.5  # pixel i spans [i, i+1)
    want = com[:, ::-1] * 2  # (x, y); mask px -> level-0 px: 0.5 / 0.25 µm/px
    got = objects[["centroid_x_px", "centroid_y_px"]].to_numpy()
    dist, nearest = cKDTree(want).query(got)
    assert dist.max() < 0.02 and len(set(nearest.tolist())) == n  # each nucleus once, where scipy puts it
    assert np.allclose(objects["centroid_x_um"], objects["centroid_x_px"] * 0.25, atol=0.01)
    check_synthetic_nuclei(tmp_path, mask, n, min_dice=0.75, objects=objects)
    # every nucleus's outline for QuPath, in level-0 px: drawn back, exactly its mask pixels
    assert (
        check_outlines(
            res / "example" / "outlines.geojson.gz", mask, ["background", "nucleus"], 0.5, 2.0, objects=objects
        )
        == n
    )


def check_synthetic_nuclei(wd, mask, n, min_dice, objects=None):
    """The example's mask and nucleus count against the synthetic slide's own nuclei
    (the generator returns their labels); ``objects`` (objects.csv.gz): the level-0
    centroids fall on the generator's nuclei."""
    from wsiseg.labels import resize_labels
    from wsiseg.metrics import pixel_metrics
    from wsiseg.synthetic import make_he_image

    with openslide.OpenSlide(str(wd / "resources/example/synthetic_he.tif")) as s:
        w0, h0 = s.dimensions
    _, truth0 = make_he_image(w0, h0, 0.25, 0)
    if objects is not None:
        x = objects["centroid_x_px"].to_numpy().astype(int)
        y = objects["centroid_y_px"].to_numpy().astype(int)
        assert (truth0[y, x] > 0).mean() > 0.95
    truth = resize_labels(truth0, mask.shape)
    n_true = len(np.unique(truth)) - 1
    # the generator lets nuclei overlap with no visible border: a clump of them is one blob
    _, n_blobs = ndi.label(truth > 0, structure=np.ones((3, 3)))
    assert pixel_metrics(truth > 0, mask > 0)["dice"] > min_dice
    assert 0.9 * n_blobs < n < 1.1 * n_true, (n_blobs, n, n_true)


# ------------------------------------------------------------ real slides run
@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    wd = tmp_path_factory.mktemp("archive run")  # a space in the working directory too
    tiny_model(wd / "tiny.pt")
    corrupt_slide(wd / "corrupt region.tif")  # readable, but one tile deep inside is damaged
    rows = [
        ("corrupt", wd / "corrupt region.tif", ""),
        ("cmu", CMU, ""),
        ("tcga", TCGA, "0.25"),
        ("ndpi_dapi", NDPI, ""),
        ("dicom", DICOM, ""),
        ("tcga_no_mpp", TCGA, ""),
        ("broken", BAD["broken"], ""),
        ("unreadable", BAD["unreadable"], ""),
        ("vectra", BAD["qptiff"], ""),
        ("typo", CMU.parent / "no-such-slide.svs", ""),
    ]
    sheet = wd / "slides.tsv"
    sheet.write_text("slide_id\tpath\tmpp\n" + "".join(f"{a}\t{b}\t{c}\n" for a, b, c in rows))
    cfg = yaml.safe_load(open(REPO / "config" / "config.yaml"))
    cfg.update(slides=str(sheet), device="cuda")  # asks for a GPU: must fall back to CPU here
    cfg["model"] = dict(name=MODEL, weights=str(wd / "tiny.pt"), classes=CLASSES, mpp=0.5)
    # 2 post-processing workers: the pipelined segment stage through Snakemake (masks as with 0)
    cfg["tiling"].update(tile_size=256, batch_size=4, workers=1, max_unreadable_fraction=0.5, postprocess_workers=2)
    cfgfile = wd / "config.yaml"
    cfgfile.write_text(yaml.safe_dump(cfg))
    res = snakemake(wd, cfgfile, "--keep-going")
    (wd / "run.log").write_text(res.stdout + res.stderr)
    return wd, cfgfile, rows


OK = ["corrupt", "cmu", "tcga", "ndpi_dapi", "dicom"]


def test_summary_has_every_slide_and_bad_ones_explained(archive):
    wd, _, rows = archive
    summary = pd.read_csv(wd / "results" / MODEL / "summary.csv").set_index("slide_id")
    assert sorted(summary.index) == sorted(r[0] for r in rows)
    assert sorted(summary.index[summary.status == "ok"]) == sorted(OK)
    for sid, words in [
        ("tcga_no_mpp", "mpp"),
        ("broken", "not a slide"),
        ("unreadable", "decoded"),
        ("vectra", "RGB"),
        ("typo", "file not found"),
    ]:
        err = summary.loc[sid, "error"]
        assert summary.loc[sid, "status"] == "failed" and f"slide '{sid}'" in err and words in err and "Fix:" in err
    # and the run itself ends by saying so
    assert "WARNING: 5 slide(s) could not be processed" in (wd / "run.log").read_text()


@pytest.mark.parametrize(
    "sid,path,mpp0", [("cmu", CMU, None), ("tcga", TCGA, 0.25), ("ndpi_dapi", NDPI, None), ("dicom", DICOM, None)]
)
def test_slide_outputs(archive, sid, path, mpp0):
    check_slide_outputs(archive[0], sid, path, mpp0)


def test_corrupt_region_is_counted_not_fatal(archive):
    wd = archive[0]
    st = pd.read_csv(wd / "results" / MODEL / "corrupt" / "stats.csv").iloc[0]
    assert st.status == "ok" and 0 < st.tiles_unreadable < st.n_tiles
    log = (wd / "logs" / MODEL / "corrupt" / "segment.log").read_text()
    assert log.count("could not be read and is left as background") == st.tiles_unreadable
    for sid in ("cmu", "tcga"):
        assert pd.read_csv(wd / "results" / MODEL / sid / "stats.csv").iloc[0].tiles_unreadable == 0


def test_pyramid_level_read_for_tcga(archive):
    plan = json.load(open(archive[0] / "results" / MODEL / "tcga" / "plan.json"))
    assert plan["geometry"]["level"] == 1  # sheet mpp 0.25 -> 0.5 wanted: level 1 (2.001x), not level 0


def test_rerun_only_what_must_change(archive, tmp_path):
    wd, cfgfile, rows = archive
    res = snakemake(wd, cfgfile, "-n")
    assert "Nothing to be done" in res.stdout + res.stderr
    # a new slide: only its jobs (and the archive-level ones) run
    sheet = wd / "slides.tsv"
    more = tmp_path / "more.tsv"
    more.write_text(sheet.read_text() + f"kidney\t{BAD['broken'].parent / 'kidney-48-5.tif'}\t0.5\n")
    cfg = yaml.safe_load(open(cfgfile))
    cfg["slides"] = str(more)
    cfg2 = tmp_path / "c2.yaml"
    cfg2.write_text(yaml.safe_dump(cfg))
    res = snakemake(wd, cfg2, "-n")
    jobs = job_counts(res.stdout)
    print("new slide:", jobs)
    # the dry run stops at the triage checkpoint; no existing slide is re-planned or re-segmented
    assert jobs.get("inspect") == 1 and jobs.get("triage") == 1
    assert jobs.get("plan", 0) <= 1 and jobs.get("segment", 0) <= 1 and jobs.get("tissue", 0) <= 1
    # new weights: every good slide is re-planned and re-segmented, nothing is re-inspected
    torch.manual_seed(1)
    m = UNet(n_classes=2, depth=3, base_width=4, padding="same", batch_norm=True).eval()
    save_checkpoint(cfg["model"]["weights"] + ".new", m, CLASSES, mpp=0.5, name=MODEL)
    cfg["slides"] = str(sheet)
    cfg["model"]["weights"] = cfg["model"]["weights"] + ".new"
    cfg3 = tmp_path / "c3.yaml"
    cfg3.write_text(yaml.safe_dump(cfg))
    jobs = job_counts(snakemake(wd, cfg3, "-n").stdout)
    print("new weights:", jobs)
    assert jobs.get("plan") == len(OK) and "inspect" not in jobs and "tissue" not in jobs
    # outlines switched off: nothing to redo (the other outputs are all there)
    cfg["model"]["weights"] = cfg["model"]["weights"][: -len(".new")]
    cfg["stats"] = {"outlines": False}
    cfg4 = tmp_path / "c4.yaml"
    cfg4.write_text(yaml.safe_dump(cfg))
    res = snakemake(wd, cfg4, "-n")
    assert "Nothing to be done" in res.stdout + res.stderr
    # and switched on where a slide has none: only that slide's stats step (and the summary) run
    out = wd / "results" / MODEL / "cmu" / "outlines.geojson.gz"
    out.rename(out.with_name("aside.gz"))
    try:
        jobs = job_counts(snakemake(wd, cfgfile, "-n").stdout)
    finally:
        out.with_name("aside.gz").rename(out)
    print("outlines on:", jobs)
    assert {k: v for k, v in jobs.items() if k not in ("all", "total")} == {"stats": 1, "aggregate": 1}


def test_tta_reruns_segmentation_only_and_averages_eight_views(archive, tmp_path):
    """model.tta: off (or absent) changes nothing; on, every slide is re-segmented (not
    re-planned), and a slide run with it gives valid outputs from 8 averaged views."""
    wd, cfgfile, _ = archive
    cfg = yaml.safe_load(open(cfgfile))
    cfg["model"]["tta"] = False
    off = tmp_path / "off.yaml"
    off.write_text(yaml.safe_dump(cfg))
    res = snakemake(wd, off, "-n")
    assert "Nothing to be done" in res.stdout + res.stderr
    cfg["model"]["tta"] = True
    on = tmp_path / "on.yaml"
    on.write_text(yaml.safe_dump(cfg))
    jobs = job_counts(snakemake(wd, on, "-n").stdout)
    assert jobs.get("segment") == len(OK) and jobs.get("stitch") == len(OK), jobs
    assert "plan" not in jobs and "inspect" not in jobs and "tissue" not in jobs
    # one slide for real, in its own working directory
    wd2 = tmp_path / "tta run"
    wd2.mkdir()
    sheet = wd2 / "slides.tsv"
    sheet.write_text(f"slide_id\tpath\tmpp\ncmu\t{CMU}\t\n")
    cfg["slides"] = str(sheet)
    cfg2 = wd2 / "config.yaml"
    cfg2.write_text(yaml.safe_dump(cfg))
    snakemake(wd2, cfg2)
    check_slide_outputs(wd2, "cmu", CMU)
    seg = json.load(open(wd2 / "results" / MODEL / "cmu" / "work" / "segment.json"))
    plain = json.load(open(wd / "results" / MODEL / "cmu" / "work" / "segment.json"))
    assert seg["tta"] is True and plain["tta"] is False and seg["n_tiles"] == plain["n_tiles"]
    st = pd.read_csv(wd2 / "results" / MODEL / "cmu" / "stats.csv").iloc[0]
    assert bool(st.model_tta) and not pd.read_csv(wd / "results" / MODEL / "summary.csv").model_tta.any()
    assert "tta=8 flips/rotations" in (wd2 / "logs" / MODEL / "cmu" / "segment.log").read_text()
    a = tifffile.imread(wd2 / "results" / MODEL / "cmu" / "mask.ome.tif", level=0)
    b = tifffile.imread(wd / "results" / MODEL / "cmu" / "mask.ome.tif", level=0)
    assert a.shape == b.shape and (a != b).any()  # the same slide and model, other predictions


def test_gpu_request_is_declared_to_the_scheduler(archive, tmp_path):
    """device: cuda -> the segment rule asks for gpu=1 (what a cluster executor schedules on);
    device: cpu -> no GPU is asked for; device: auto on a workstation -> none either (the
    default profile's `resources: gpu: 1` would otherwise serialise CPU-only segment jobs).
    auto on a cluster executor asks for one: tests/test_slurm.py."""
    wd, cfgfile, _ = archive
    cfg = yaml.safe_load(open(cfgfile))
    assert cfg["device"] == "cuda"
    res = snakemake(wd, cfgfile, "-n", "-R", "segment")
    seg = re.findall(r"rule segment:\n(?:    .*\n)+", res.stdout)
    assert len(seg) == len(OK) and all(re.search(r"resources: .*gpu=1", b) for b in seg)
    for device in ("cpu", "auto"):
        cfg["device"] = device
        dev_cfg = tmp_path / f"{device}.yaml"
        dev_cfg.write_text(yaml.safe_dump(cfg))
        res = snakemake(wd, dev_cfg, "-n", "-R", "segment")
        seg = re.findall(r"rule segment:\n(?:    .*\n)+", res.stdout)
        assert len(seg) == len(OK) and not any(re.search(r"gpu=1", b) for b in seg), device


# ------------------------------------------------------ train and evaluate targets
def test_train_then_evaluate_targets(tmp_path):
    """`snakemake evaluate` with model.weights pointing at the train output trains first."""
    from conftest import DATA

    miccai = DATA / "labeled" / "miccai2015-nuclei-seg-training"
    small = tmp_path / "small.tsv"  # two small 40x tiles of the training set
    small.write_text(
        "image\tlabels\tmpp\n"
        + "".join(f"{miccai / f'image{i}.png'}\t{miccai / f'image{i}_mask.txt'}\t0.25\n" for i in ("14", "15"))
    )
    cfg = yaml.safe_load(open(REPO / "config" / "config.yaml"))
    cfg["slides"] = str(REPO / cfg["slides"])
    cfg["train"].update(
        sheet=str(REPO / "config/labeled/miccai2015-train.tsv"),
        name="tiny",
        depth=2,
        base_width=8,
        crop=64,
        batch_size=4,
        steps_per_epoch=4,
        max_epochs=2,
        threads=2,
    )
    cfg["model"] = dict(name="tiny", weights="results/training/tiny/best.pt", mpp=0.5)
    cfg["evaluate"] = dict(sets={"small": str(small)}, methods=["model", "baseline"], tta=False)
    cfgfile = tmp_path / "config.yaml"
    cfgfile.write_text(yaml.safe_dump(cfg))
    snakemake(tmp_path, cfgfile, "evaluate")
    assert (tmp_path / "results/training/tiny/best.pt").exists()
    assert len(pd.read_csv(tmp_path / "results/training/tiny/metrics.csv")) == 2
    assert "epoch 2: train loss" in (tmp_path / "logs/training/tiny.log").read_text()
    val = pd.read_csv(tmp_path / "results/training/tiny/validation.csv")
    assert val["image"].tolist() == ["image03", "image10", "image14", "mean"]  # the sheet's val rows
    assert val["n_true"].iloc[2] == 139  # image14's annotated nuclei
    comp = pd.read_csv(tmp_path / "results/evaluation/comparison.csv")
    assert sorted(comp["method"]) == ["classical-baseline", "tiny"] and (comp["images"] == 2).all()
    base = pd.read_csv(tmp_path / "results/evaluation/small/classical-baseline/metrics.csv")
    assert base["image"].tolist() == ["image14", "image15", "mean"]
    assert base["dice"].iloc[-1] == pytest.approx(base["dice"].iloc[:2].mean(), abs=1e-4)
    assert base["dice"].iloc[-1] > 0.6 and base["n_true"].iloc[0] == 139
    for name in ("image14", "image15"):  # overlays at the images' own size
        png = Image.open(tmp_path / f"results/evaluation/small/tiny/overlays/{name}.png")
        assert png.size == Image.open(miccai / f"{name}.png").size
    assert job_counts(snakemake(tmp_path, cfgfile, "evaluate", "-n").stdout) == {}
    # a second configfile adds a set (mappings merge); evaluate.only (a list: replaced) keeps the
    # run to the named set, so the added one is not scored; a name not in evaluate.sets is an error
    extra = tmp_path / "only.yaml"
    extra.write_text(yaml.safe_dump(dict(evaluate=dict(sets={"held-out": str(small)}, only=["small"]))))
    narrowed = snakemake(tmp_path, cfgfile, "evaluate", "-n", "--configfile", str(cfgfile), str(extra))
    assert job_counts(narrowed.stdout) == {} and "held-out" not in narrowed.stdout
    extra.write_text(yaml.safe_dump(dict(evaluate=dict(only=["smal"]))))
    res = snakemake(tmp_path, cfgfile, "evaluate", "-n", "--configfile", str(cfgfile), str(extra), check=False)
    assert res.returncode != 0 and "evaluate.only names ['smal']" in res.stdout + res.stderr


def test_train_without_a_sheet_says_what_to_set(tmp_path):
    cfg = yaml.safe_load(open(REPO / "config" / "config.yaml"))
    cfg["train"].pop("sheet")
    cfg["slides"] = str(REPO / cfg["slides"])
    cfgfile = tmp_path / "config.yaml"
    cfgfile.write_text(yaml.safe_dump(cfg))
    res = snakemake(tmp_path, cfgfile, "-n", "train", check=False)
    assert res.returncode != 0 and "the train target needs train.sheet" in res.stdout + res.stderr
    assert snakemake(tmp_path, cfgfile, "-n").returncode == 0  # inference alone does not need it
