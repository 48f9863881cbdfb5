"""End to end through Snakemake: the README's example, and real slides of every
format (plus bad ones) in one archive run. Outputs are checked, not just present."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime

import numpy as np
import openslide
import pandas as pd
import pytest
import tifffile
import torch
import yaml
from conftest import BAD, CMU, DICOM, NDPI, REPO, SMALL, TCGA, corrupt_slide, needs_data
from e2e import CLASSES, MODEL, check_outlines, check_slide_outputs, snakemake, tiny_model
from helpers import pickle_payload
from PIL import Image
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

import wsiseg
from wsiseg import provenance, report
from wsiseg.aggregate import NO_TISSUE
from wsiseg.content import fingerprint
from wsiseg.models.checkpoint import save_checkpoint
from wsiseg.synthetic import make_example_slide
from wsiseg.unet import UNet

pytestmark = needs_data  # reads ../shared/data


def job_counts(dry_run_output: str) -> dict:
    """{rule: count} from a dry run's 'Job stats' table."""
    m = re.search(r"Job stats:\n.*?\n-+\s+-+\n(.*?)\ntotal", dry_run_output, re.S)
    if not m:
        return {}
    return {line.split()[0]: int(line.split()[1]) for line in m.group(1).splitlines() if line.strip()}


def test_booleans_from_the_command_line(tmp_path):
    """`--config tiling='{cpu_bf16: true}'`: Snakemake hands a nested true/false over as a string;
    the workflow takes it as the boolean the schema asks for, in any case, instead of refusing
    the run. Anything else is still refused, with the schema's message."""
    cfg = yaml.safe_load(open(REPO / "config" / "config.yaml"))
    cfg["model"]["weights"] = str(REPO / cfg["model"]["weights"])
    cfg["slides"] = str(REPO / cfg["slides"])
    cfgfile = tmp_path / "config.yaml"
    cfgfile.write_text(yaml.safe_dump(cfg))
    args = ("tiling={cpu_bf16: true, amp: False}", "model={tta: TRUE}", "stats={outlines: false}")
    assert job_counts(snakemake(tmp_path, cfgfile, "-n", "--config", *args).stdout)["triage"] == 1  # (a checkpoint)
    res = snakemake(tmp_path, cfgfile, "-n", "--config", "tiling={cpu_bf16: maybe}", check=False)
    assert res.returncode != 0 and "'maybe' is not of type 'boolean'" in res.stdout + res.stderr


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
    # tiling 'auto' (the shipped defaults) as the stage resolved it: a CPU job of 2 CPUs (--cores 2)
    # runs 2 network streams of one thread each, batch 1, with no workers, in float32 (tiling.cpu_bf16 is off)
    seg = json.load(open(res / "example" / "work" / "segment.json"))
    settings = seg["settings"]
    want = dict(batch_size=1, streams=2, workers=0, postprocess_workers=0, network_threads=1, amp=False, cpu_bf16=False)
    assert settings == want and seg["precision"] == "float32"
    # where the stage's time went (a stream's, the mean of the 2): the network's calls, waiting for
    # windows (each stream reads its own), the rest
    loop = seg["loop"]
    assert set(loop) == {"network_s", "wait_s", "other_s"} and min(loop.values()) >= 0 and loop["wait_s"] > 0
    assert loop["network_s"] > loop["wait_s"] and sum(loop.values()) <= seg["elapsed_s"] + 0.01
    log = (res / "example" / "logs" / "segment.log").read_text()
    assert "2 network streams of 1 thread each" in log
    assert "the network's loop (the mean of 2 streams): network " in log
    # ... after asking for 8 CPUs (common.smk, SEGMENT_AUTO_CPUS), which --cores lowers
    for cores, want in (("16", 8), ("2", 2)):
        dry = snakemake(tmp_path, cfgfile, "-n", "-R", "segment", cores=cores).stdout
        seg = re.findall(r"rule segment:\n(?:    .*\n)+", dry)
        assert len(seg) == 1 and re.search(rf"threads: {want}\n", seg[0]), (cores, seg)
    plan = json.load(open(res / "example" / "plan.json"))
    assert plan["geometry"]["level"] == 1  # 0.25 µm/px slide, 0.5 µm/px model: level 1, not level 0
    # the shipped nuclei model: separated nuclei, counted one by one
    assert plan["mask_classes"] == ["background", "nucleus"] and plan["postprocess"]
    stain_on = (cfg["model"].get("stain_normalise") or "none") != "none"
    assert ("stain_source" in plan) == stain_on  # stain normalisation: as the shipped config says
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
    # stain normalisation on (off in the shipped config: switched on, one word, the reference is
    # there; only the plan reruns to measure the slide's tissue colour): the plan stage warns, as
    # this synthetic slide's a* spread is far narrower than real H&E's, and says the stretch was
    # clamped to model.stain_max_scale (2 when absent)
    if not stain_on:
        cfg["model"]["stain_normalise"] = "reinhard"
        cfgfile.write_text(yaml.safe_dump(cfg))
        snakemake(tmp_path, cfgfile, str((res / "example" / "plan.json").relative_to(tmp_path)))
    plan = json.load(open(res / "example" / "plan.json"))
    src, bound = plan["stain_source"], cfg["model"].get("stain_max_scale", 2)
    assert src["pixels"] > 100_000 and 20 < src["mean"][0] < 88 and min(src["std"]) > 0
    assert plan["stain_scale"][1] == bound == plan["stain_max_scale"]  # a*: clamped, and the bound recorded
    plan_log = (res / "example" / "logs" / "plan.log").read_text()
    assert re.search(
        r"WARNING: stain normalisation would stretch this slide's tissue colour spread by a\* x\d\.\d\d \(more "
        rf"than 2x\), clamped to a\* x{bound:.2f} \(model\.stain_max_scale {bound:g}\)",
        plan_log,
    ), plan_log
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
OLD = (978307200, 978307200)  # 2001-01-01: an mtime older than any result (cp -p, rsync -t)


def jobs_run(log: str) -> set:
    """{(rule, slide)} of the jobs a run's log shows (slide '' for archive-level jobs)."""
    out = set()
    for rule, block in re.findall(r"^(?:local)?(?:rule|checkpoint) (\w+):\n((?:    .*\n)+)", log, re.M):
        m = re.search(r"wildcards: slide=(\S+)", block)
        out.add((rule, m.group(1) if m else ""))
    return out


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """Real and bad slides in one archive run. One slide ('hopeless') is readable, but every
    tile its segment step reads is damaged: that step fails, the run's exit status says so,
    summary.csv is written for the rest all the same (first-summary.csv keeps it). The slide
    is then re-exported (other bytes, copied with cp -p under an old mtime) and the same
    command run again (rerun.log): it redoes that slide and clears its failure."""
    wd = tmp_path_factory.mktemp("archive run")  # a space in the working directory too
    tiny_model(wd / "tiny.pt")
    corrupt_slide(wd / "corrupt region.tif")  # readable, but one tile deep inside is damaged
    corrupt_slide(wd / "hopeless.tif", every_tile=True)  # every tile segment reads is damaged
    rows = [
        ("corrupt", wd / "corrupt region.tif", ""),
        ("hopeless", wd / "hopeless.tif", ""),
        ("cmu", CMU, ""),
        ("tcga", TCGA, "0.25"),
        ("ndpi_dapi", NDPI, ""),
        ("dicom", DICOM, ""),
        ("blank", SMALL, ""),  # 16 x 16 px: no tissue, an empty mask, a warning
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
    res = snakemake(wd, cfgfile, "--keep-going", check=False)
    (wd / "run.log").write_text(f"exit status {res.returncode}\n" + res.stdout + res.stderr)
    out = wd / "results" / MODEL
    shutil.copyfile(out / "summary.csv", wd / "first-summary.csv")
    shutil.copyfile(out / "hopeless" / "failed.json", wd / "first-failed.json")
    # the slide re-exported: other bytes, copied with cp -p under an mtime older than the results
    make_example_slide(str(wd / "rescan.tif"), width=2048, height=1536, mpp=0.25, seed=4)
    os.utime(wd / "rescan.tif", OLD)
    shutil.copy2(wd / "rescan.tif", wd / "hopeless.tif")
    res = snakemake(wd, cfgfile)  # the same command again
    (wd / "rerun.log").write_text(res.stdout + res.stderr)
    return wd, cfgfile, rows


OK = ["corrupt", "hopeless", "cmu", "tcga", "ndpi_dapi", "dicom", "blank"]


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
        assert summary.loc[sid, "failed_stage"] == "inspect"
    # what deserves a look is flagged: the damaged tiles left as background, the slide
    # without tissue; the finished slides otherwise clean
    n = summary.loc["corrupt", "tiles_unreadable"]
    n = int(n)
    assert n > 0 and summary.loc["corrupt", "warning"].startswith(f"{n} unreadable tile(s) left as background")
    assert summary.loc["blank", "warning"] == NO_TISSUE and summary.loc["blank", "nucleus_pixels"] == 0
    assert summary.loc[["cmu", "tcga", "dicom", "hopeless", "ndpi_dapi"], "warning"].isna().all()
    # and the run itself ends by saying so
    log = (wd / "rerun.log").read_text()
    assert "wsiseg: 12 slides: 7 ok, 5 failed; 2 with a warning" in log
    assert f"wsiseg: WARNING blank: {NO_TISSUE}" in log
    assert "wsiseg: FAILED typo [inspect]: slide 'typo': file not found" in log
    assert f"wsiseg: WARNING corrupt: {n} unreadable tile(s)" in log


def test_a_slide_failing_in_segment_costs_only_itself(archive):
    """The first run: 'hopeless' fails in segment; every other slide is finished and in
    summary.csv, the failed one with its stage, reason and fix; the exit status is not 0."""
    wd, _, rows = archive
    log = (wd / "run.log").read_text()
    assert not log.startswith("exit status 0") and "Error in rule segment" in log
    first = pd.read_csv(wd / "first-summary.csv").set_index("slide_id")
    assert sorted(first.index) == sorted(r[0] for r in rows)
    assert sorted(first.index[first.status == "ok"]) == sorted(set(OK) - {"hopeless"})
    assert (first.loc[sorted(set(OK) - {"hopeless", "blank"}), "n_tiles"] > 0).all()
    row = first.loc["hopeless"]
    assert row.status == "failed" and row.failed_stage == "segment"
    assert re.match(r"slide 'hopeless': \d+ of \d+ tiles could not be decoded", row.error) and "Fix:" in row.error
    assert pd.isna(row.n_tiles)  # no numbers for a slide that has none
    rec = json.load(open(wd / "first-failed.json"))
    assert rec["stage"] == "segment" and rec["kind"] == "slide" and rec["log"].endswith("hopeless/logs/segment.log")
    assert "wsiseg: 12 slides: 6 ok, 6 failed" in log
    assert re.search(r"wsiseg: FAILED hopeless \[segment\]: slide 'hopeless': \d+ of \d+ tiles could not", log)
    assert f"summary written for the slides above: results/{MODEL}/summary.csv" in log


def test_fixed_slide_rerun_alone_and_its_failure_cleared(archive):
    """The re-exported slide (other bytes under an old mtime) is redone from inspection by the
    same command; no other slide is touched; its failure record is gone."""
    wd, cfgfile, _ = archive
    ran = jobs_run((wd / "rerun.log").read_text())
    steps = ("inspect", "tissue", "plan", "segment", "stitch", "stats", "report_histograms", "provenance")
    archive_level = {("triage", ""), ("aggregate", ""), ("report_plots", ""), ("all", "")}
    assert ran == {(r, "hopeless") for r in steps} | archive_level, ran
    assert not (wd / "results" / MODEL / "hopeless" / "failed.json").exists()
    check_slide_outputs(wd, "hopeless", wd / "hopeless.tif")
    slide = json.load(open(wd / "results" / MODEL / "hopeless" / "slide.json"))
    assert slide["fingerprint"] == fingerprint(str(wd / "hopeless.tif"))
    assert "Nothing to be done" in (lambda r: r.stdout + r.stderr)(snakemake(wd, cfgfile, "-n"))


def test_reruns_follow_content_not_mtime(archive, tmp_path):
    """touch, cp -p of the same bytes, and settings that cannot change a mask rerun nothing;
    other weights or another slide under an old mtime rerun what depends on them."""
    wd, cfgfile, _ = archive
    weights, slide = wd / "tiny.pt", wd / "corrupt region.tif"

    def planned(cfg=cfgfile):
        res = snakemake(wd, cfg, "-n")
        return "nothing" if "Nothing to be done" in res.stdout + res.stderr else job_counts(res.stdout)

    kept = {f: f.stat() for f in (weights, slide)}
    later = time.time() + 3600  # touched, even into the future (a scanner PC's clock): newer than every result
    for f in (weights, slide):
        os.utime(f, (later, later))
    try:
        assert planned() == "nothing"
    finally:
        for f, st in kept.items():
            os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    script = REPO / "scripts" / "segment.py"  # a new copy of the workflow: its scripts are newer too
    kept = script.stat()
    os.utime(script, (later, later))
    try:
        assert planned() == "nothing"
    finally:
        os.utime(script, ns=(kept.st_atime_ns, kept.st_mtime_ns))
    # settings that say how, not what: batch size, workers, precision, device, tolerance
    cfg = yaml.safe_load(open(cfgfile))
    cfg["tiling"].update(
        batch_size="auto", workers="auto", postprocess_workers=0, amp=False, max_unreadable_fraction=0.9
    )
    cfg["device"] = "cpu"
    how = tmp_path / "how.yaml"
    how.write_text(yaml.safe_dump(cfg))
    assert planned(how) == "nothing"
    # other weights, copied in under an old mtime: every good slide is re-planned and re-segmented
    for f, make_other in ((weights, lambda p: tiny_model(p, seed=7)), (slide, lambda p: corrupt_slide(p, seed=5))):
        original, stat = f.read_bytes(), f.stat()
        other = tmp_path / f.name
        make_other(other)
        os.utime(other, OLD)
        shutil.copy2(other, f)
        try:
            jobs = planned()
        finally:
            f.write_bytes(original)
            os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        if f == weights:
            assert jobs.get("plan") == jobs.get("segment") == jobs.get("stats") == len(OK), jobs
            assert "inspect" not in jobs and "tissue" not in jobs
        else:  # the slide is inspected again; the rest of it follows once triage has run (rerun.log)
            assert jobs == {"inspect": 1, "triage": 1, "all": 1}, jobs
    assert planned() == "nothing"  # the original bytes back: nothing to redo
    keys = (wd / ".snakemake" / "wsiseg" / "content-keys.tsv").read_text()  # in the run's folder
    assert f"fingerprint\t{slide}\t" in keys and f"sha256\t{weights}\t" in keys


def test_pickle_weights_refused_before_any_job(tmp_path):
    """A .pt that would run code when loaded is refused when the workflow starts, naming the
    file and the fix, before any slide job runs and without running the payload."""
    evil = tmp_path / "nuclei-unet.pt"
    marker = tmp_path / "payload-ran"
    pickle_payload(evil, marker)
    (tmp_path / "slides.tsv").write_text(f"slide_id\tpath\nslide1\t{CMU}\n")
    cfg = yaml.safe_load(open(REPO / "config" / "config.yaml"))
    cfg.update(slides=str(tmp_path / "slides.tsv"))
    cfg["model"]["weights"] = str(evil)
    cfgfile = tmp_path / "config.yaml"
    cfgfile.write_text(yaml.safe_dump(cfg))
    res = snakemake(tmp_path, cfgfile, check=False)
    said = res.stdout + res.stderr
    assert res.returncode != 0 and f"model.weights {evil} is refused" in said, said[-3000:]
    assert "Fix: point model.weights at a checkpoint written by this workflow" in said
    assert "weights_only" not in said and not marker.exists()
    assert not (tmp_path / "results").exists()  # no job ran, nothing written


@pytest.mark.parametrize(
    "sid,path,mpp0", [("cmu", CMU, None), ("tcga", TCGA, 0.25), ("ndpi_dapi", NDPI, None), ("dicom", DICOM, None)]
)
def test_slide_outputs(archive, sid, path, mpp0):
    check_slide_outputs(archive[0], sid, path, mpp0)


def test_corrupt_region_is_counted_not_fatal(archive):
    wd = archive[0]
    st = pd.read_csv(wd / "results" / MODEL / "corrupt" / "stats.csv").iloc[0]
    assert st.status == "ok" and 0 < st.tiles_unreadable < st.n_tiles
    log = (wd / "results" / MODEL / "corrupt" / "logs" / "segment.log").read_text()
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
    # stain normalisation switched on: every good slide is re-planned (the plan measures its stain)
    cfg["model"]["weights"] = cfg["model"]["weights"][: -len(".new")]
    ref = {"mean": [54.0, 31.7, -11.0], "std": [18.0, 10.2, 8.8]}
    cfg["model"].update(stain_normalise="reinhard", stain_reference=ref)
    cfg5 = tmp_path / "c5.yaml"
    cfg5.write_text(yaml.safe_dump(cfg))
    jobs = job_counts(snakemake(wd, cfg5, "-n").stdout)
    print("stain normalisation on:", jobs)
    assert jobs.get("plan") == len(OK) and "inspect" not in jobs and "tissue" not in jobs
    cfg["model"].update(stain_normalise="none")  # and off again: as if never set, nothing to redo
    # instance post-processing asked of a model without a boundary class: refused before any job
    cfg6 = tmp_path / "c6.yaml"
    cfg6.write_text(yaml.safe_dump({**cfg, "model": {**cfg["model"], "postprocess": {"fg_threshold": 0.5}}}))
    res = snakemake(wd, cfg6, "-n", check=False)
    said = res.stdout + res.stderr
    assert res.returncode != 0 and f"this model's classes are {CLASSES}. Fix: remove model.postprocess" in said
    # outlines switched off: nothing to redo (the other outputs are all there)
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
    # (the slide's provenance and object histograms follow its stats records, the archive's plots the summary)
    assert {k: v for k, v in jobs.items() if k not in ("all", "total")} == {
        "stats": 1,
        "aggregate": 1,
        "provenance": 1,
        "report_histograms": 1,
        "report_plots": 1,
    }


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
    assert "tta=8 flips/rotations" in (wd2 / "results" / MODEL / "cmu" / "logs" / "segment.log").read_text()
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


# ------------------------------------------------------ provenance and the report
def test_provenance_of_every_slide(archive):
    """provenance.json of each slide against what ran: this clone's commit, the installed
    packages, this host, the CPU used for the GPU asked for, the slide file's size and mtime,
    each stage's config as the rules passed it, the stages in the order they ran; and
    stats.csv's provenance columns."""
    wd, cfgfile, rows = archive
    cfg = yaml.safe_load(open(cfgfile))
    head = provenance.git_commit(REPO)
    assert head or not (REPO / ".git").exists()
    for sid, path, _ in rows:
        out = wd / "results" / MODEL / sid
        if sid not in OK:  # failed at inspection: slide.json holds the run that said so
            run = json.load(open(out / "slide.json"))["run"]
            assert run["stage"] == "inspect" and run["inputs"][0]["exists"] == os.path.exists(path)
            continue
        prov = json.load(open(out / "provenance.json"))
        st = os.stat(path)
        mtime = datetime.fromtimestamp(st.st_mtime, UTC).isoformat(timespec="milliseconds")
        assert prov["slide_id"] == sid and prov["input"] == dict(
            path=os.path.abspath(path), exists=True, size_bytes=st.st_size, mtime=mtime, fingerprint=fingerprint(path)
        )
        assert prov["wsiseg_version"] == wsiseg.__version__ and prov["git_commit"] == head
        assert prov["host"] == socket.gethostname()
        p = prov["packages"]
        assert (
            p["torch"] == torch.__version__ and p["numpy"] == np.__version__ and p["tifffile"] == tifffile.__version__
        )
        assert p["openslide-python"] == openslide.__version__ and p["openslide"] == openslide.__library_version__
        assert prov["device"] == dict(
            used="cpu", name=provenance.cpu_name(), cuda_version=None, precision="float32", asked="cuda"
        )
        stages = prov["stages"]
        assert list(stages) == list(provenance.STAGES)
        seg = stages["segment"]
        # the settings that change no mask, as the stage used them (not params: they rerun nothing)
        used = {k: seg["settings"][k] for k in ("batch_size", "workers", "postprocess_workers")}
        assert used == {k: cfg["tiling"][k] for k in used} and seg["settings"]["amp"] is False  # no CUDA here
        # threads: the job's, as Snakemake ran it (1 + 1 + 2 asked, --cores 2)
        assert seg["params"]["model"]["weights"] == cfg["model"]["weights"] and seg["threads"] == 2
        assert stages["tissue"]["params"]["cfg"]["method"] == cfg["tissue"]["method"]
        assert stages["stats"]["params"]["classes"] == CLASSES and stages["inspect"]["params"]["path"] == str(path)
        for a, b in zip(provenance.STAGES, provenance.STAGES[1:]):  # each stage needs the one before
            assert stages[a]["finished"] <= stages[b]["started"], (sid, a, b)
        assert prov["started"] == stages["inspect"]["started"]
        assert prov["finished"] == stages[provenance.STAGES[-1]]["finished"]
        row = pd.read_csv(out / "stats.csv").iloc[0]
        assert row.device == "cpu" and row.wsiseg_version == wsiseg.__version__
        assert (row.git_commit if isinstance(row.git_commit, str) else None) == head
    summary = pd.read_csv(wd / "results" / MODEL / "summary.csv")
    assert (summary.loc[summary.status == "ok", "device"] == "cpu").all()


def test_rerun_that_changes_nothing_keeps_provenance(archive):
    """A real run (not a dry run) of the finished archive does nothing: provenance.json is
    not rewritten (the same bytes, the same mtime)."""
    wd, cfgfile, _ = archive
    files = [wd / "results" / MODEL / sid / "provenance.json" for sid in OK]
    before = [(f.read_bytes(), f.stat().st_mtime_ns) for f in files]
    res = snakemake(wd, cfgfile)
    assert "Nothing to be done" in res.stdout + res.stderr
    assert [(f.read_bytes(), f.stat().st_mtime_ns) for f in files] == before


def test_report_shows_the_plots_in_a_browser(archive, tmp_path):
    """`snakemake --report report.html` after the archive run, opened in headless Chromium as a
    person would: the four archive plots and every slide's overlay are listed, and each,
    clicked, shows a picture (not a blank one); the page needs nothing but itself."""
    from browser import check_not_blank, show_category

    wd, cfgfile, _ = archive
    html = tmp_path / "report.html"
    snakemake(wd, cfgfile, "--report", str(html))
    plots = show_category(html, "Archive plots", tmp_path / "plots")
    assert [s.label for s in plots] == ["failed slides", "object shapes", "object sizes", "objects per slide"]
    for s in plots:
        check_not_blank(s)
        assert s.width > 500 and s.height > 150, s
    overlays = show_category(html, "Overlays", tmp_path / "overlays")
    assert sorted(s.label for s in overlays) == sorted(OK)
    for s in overlays:
        if s.label == "blank":  # the 16 x 16 px slide: its overlay is as small (and has no tissue)
            assert s.width <= 16 and s.height <= 16, s
            continue
        check_not_blank(s)
    # the figures drew what the archive has: the shape columns objects.csv.gz has (none
    # before the stats stage measures them), the failed slides
    log = (wd / "results" / MODEL / "logs" / "report_plots.log").read_text()
    header = pd.read_csv(wd / "results" / MODEL / "cmu" / "objects.csv.gz", nrows=0).columns
    shapes = [m.column for m in report.SHAPE_METRICS if m.column in header]
    assert f"shapes: {', '.join(shapes) or '-'} ->" in log and f"({len(archive[2]) - len(OK)} failed)" in log
    assert "sizes: area_um2, equivalent_diameter_um" in log


# ------------------------------------------------------ a run that goes wrong
def mount_tmpfs(path, size):
    """A small real file system for the results (root only); None and why when not possible."""
    if os.geteuid() != 0:
        return "mounting a small tmpfs as the results folder needs root"
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return f"cannot mount a tmpfs here: {res.stderr.decode().strip()}" if res.returncode else None


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """One slide, run as it goes for a workstation user: the run is killed with kill -9 while
    the slide is being segmented; the same command then meets Snakemake's stale lock, and
    after `--unlock` (README, "Where it runs") it goes on. Where a tmpfs can be mounted
    (root), the results live on a small one, which is then filled up: the run fails with a
    clear error, and once space is freed the same command finishes the slide."""
    wd = tmp_path_factory.mktemp("interrupted run")
    results = wd / "results"
    results.mkdir()
    no_tmpfs = mount_tmpfs(results, "64m")
    tiny_model(wd / "tiny.pt")
    (wd / "slides.tsv").write_text(f"slide_id\tpath\tmpp\ncmu\t{CMU}\t\n")
    cfg = yaml.safe_load(open(REPO / "config" / "config.yaml"))
    cfg.update(slides=str(wd / "slides.tsv"), device="cuda")  # no GPU here: the CPU, as the checks expect
    cfg["model"] = dict(name=MODEL, weights=str(wd / "tiny.pt"), classes=CLASSES, mpp=0.5)
    cfg["tiling"].update(tile_size=256, batch_size=4, workers=1)
    cfgfile = wd / "config.yaml"
    cfgfile.write_text(yaml.safe_dump(cfg))
    out = results / MODEL / "cmu"
    logs = {}
    try:
        # killed while segmenting: Snakemake, its jobs and their workers, all at once
        cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(wd)]
        cmd += ["--configfile", str(cfgfile), "--cores", "2"]
        run = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        seg_log = out / "logs" / "segment.log"
        # as soon as the stage has started: on an idle machine the tiny model's first progress
        # line can be its last ("tiles (100%)"), and a kill after it would find segment done
        while run.poll() is None and "segment cmu: start" not in (seg_log.read_text() if seg_log.exists() else ""):
            time.sleep(0.02)
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
        logs["killed during"] = seg_log.read_text() if seg_log.exists() else ""
        locked = snakemake(wd, cfgfile, check=False)
        logs["locked"] = (locked.returncode, locked.stdout + locked.stderr)
        snakemake(wd, cfgfile, "--unlock")
        if not no_tmpfs:  # the results disk fills up: leave 16 kB
            st = os.statvfs(results)
            with open(results / "filler", "wb") as fh:
                fh.truncate(0)
                fh.write(b"\0" * max(0, st.f_bavail * st.f_frsize - (16 << 10)))
            full = snakemake(wd, cfgfile, check=False)
            logs["full"] = (full.returncode, full.stdout + full.stderr)
            summary = results / MODEL / "summary.csv"
            logs["full summary"] = pd.read_csv(summary, keep_default_na=False) if summary.exists() else None
            (results / "filler").unlink()  # space freed
        done = snakemake(wd, cfgfile)
        logs["done"] = done.stdout + done.stderr
        # what a finished slide leaves, copied off the tmpfs before it goes
        check_slide_outputs(wd, "cmu", CMU)
        logs["checked"] = True
        logs["summary"] = pd.read_csv(results / MODEL / "summary.csv", keep_default_na=False)
    finally:
        if not no_tmpfs:
            subprocess.run(["umount", "-l", str(results)], check=False)
    return logs, no_tmpfs


def test_kill_9_then_unlock_and_the_same_command_finishes(interrupted):
    logs, _ = interrupted
    code, said = logs["locked"]
    assert code != 0 and "--unlock" in said and "LockException" in said  # as the README says
    assert logs["checked"] and logs["summary"]["status"].tolist() == ["ok"]
    assert "tiles (100%)" not in logs["killed during"]  # killed before segment was done: it ran again
    print("killed at:", logs["killed during"].strip().splitlines()[-1:])


def test_full_disk_named_then_the_same_command_finishes(interrupted):
    logs, no_tmpfs = interrupted
    if no_tmpfs:
        pytest.skip(no_tmpfs)
    code, said = logs["full"]
    assert code != 0
    m = re.search(r"(\w+) failed: slide 'cmu': no space left on the device while writing (.+?) \(\d+ MB free", said)
    assert m and m.group(1) in ("segment", "stitch", "stats") and "/results/" in m.group(2), said[-4000:]
    assert "Fix: free space on that file system, or set `results:` to a folder on a larger one" in said
    summary = logs["full summary"]
    if summary is not None:  # written when the failed job's outputs freed room for it
        row = summary.set_index("slide_id").loc["cmu"]
        assert row.status == "failed" and row.failed_stage == m.group(1), row.to_dict()
    assert logs["summary"]["status"].tolist() == ["ok"] and logs["summary"]["failed_stage"].tolist() == [""]


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
    # logs and benchmarks under results:, as the slides' are (two results folders never share a file)
    assert "epoch 2: train loss" in (tmp_path / "results/logs/training/tiny.log").read_text()
    assert (tmp_path / "results/benchmarks/training/tiny.tsv").exists()
    assert (tmp_path / "results/logs/evaluation/small/tiny.log").exists()
    assert not (tmp_path / "logs").exists()
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
    cfg["model"]["weights"] = str(REPO / cfg["model"]["weights"])  # checked when the workflow starts
    cfgfile = tmp_path / "config.yaml"
    cfgfile.write_text(yaml.safe_dump(cfg))
    res = snakemake(tmp_path, cfgfile, "-n", "train", check=False)
    assert res.returncode != 0 and "the train target needs train.sheet" in res.stdout + res.stderr
    assert snakemake(tmp_path, cfgfile, "-n").returncode == 0  # inference alone does not need it
