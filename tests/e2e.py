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

from wsiseg.unet import UNet, save_checkpoint

MODEL = "tiny-unet"
CLASSES = ["background", "nucleus"]


def snakemake(workdir, configfile, *args, check=True, cores="2", env=None):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(configfile), *(["--cores", cores] if cores else []), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if check and res.returncode != 0:
        raise AssertionError(f"snakemake failed ({res.returncode}):\n{res.stdout[-4000:]}\n{res.stderr[-6000:]}")
    return res


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
    assert len(st.model_sha256) == 64 and st.wall_time_s > 0
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
    # logs and benchmarks
    seg_log = (wd / "logs" / MODEL / sid / "segment.log").read_text()
    assert "tiles (100%)" in seg_log and "CUDA is not available" in seg_log
    assert (wd / "benchmarks" / MODEL / sid / "segment.tsv").exists()
    assert not (out / "work" / "labels.store").exists()  # temporary intermediate removed

