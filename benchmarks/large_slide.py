"""The whole workflow on a large slide: peak memory of every rule vs the slide's size.

Renders a procedural H&E-like pyramidal slide of W x H level-0 px tile by tile
(nothing whole in memory; default 50000 x 40000 px at 0.25 µm/px, i.e. 6 GB of
RGB at level 0, 10% tissue), runs the workflow on it with a small U-Net, and
prints time and peak RSS per rule from Snakemake's benchmark files.

    python benchmarks/large_slide.py [--width 50000 --height 40000] [--workdir DIR]
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(REPO, "src"))

GLASS = np.array([242, 242, 244], np.float32)
EOSIN = np.array([232, 160, 205], np.float32)
HEMA = np.array([85, 55, 140], np.float32)


def _hash(i, j, salt):
    h = (i * 73856093) ^ (j * 19349663) ^ (salt * 83492791)
    return (h % 100003) / 100003.0


def render(x0, y0, w, h, d, W, H, mpp):
    """RGB of level px [x0, x0+w) x [y0, y0+h) of the level with downsample d."""
    X = (x0 + np.arange(w) + 0.5) * d
    Y = (y0 + np.arange(h) + 0.5) * d
    XX, YY = np.meshgrid(X, Y)
    # tissue: three ellipses covering about 10% of the slide
    tissue = np.zeros(XX.shape, bool)
    for cx, cy, rx, ry in ((0.3, 0.35, 0.14, 0.2), (0.7, 0.6, 0.12, 0.15), (0.45, 0.8, 0.1, 0.07)):
        tissue |= ((XX / W - cx) / rx) ** 2 + ((YY / H - cy) / ry) ** 2 <= 1
    img = np.where(tissue[..., None], EOSIN, GLASS)
    if tissue.any():
        c = 12.0 / mpp  # one nucleus per 12 µm cell
        ci, cj = np.floor(XX / c).astype(np.int64), np.floor(YY / c).astype(np.int64)
        ncx = (ci + 0.25 + 0.5 * _hash(ci, cj, 1)) * c
        ncy = (cj + 0.25 + 0.5 * _hash(ci, cj, 2)) * c
        r = (3.0 + 1.5 * _hash(ci, cj, 3)) / mpp
        nuc = tissue & ((XX - ncx) ** 2 + (YY - ncy) ** 2 <= r * r) & (_hash(ci, cj, 4) > 0.35)
        img = np.where(nuc[..., None], HEMA, img)
    return img.astype(np.uint8)


def write_slide(path, W, H, mpp, tile=512):
    import tifffile

    levels = []
    d = 1
    while max(W // d, H // d) >= 1024 or d == 1:
        levels.append(d)
        d *= 4
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for d in levels:
            lw, lh = W // d, H // d

            def tiles(d=d, lw=lw, lh=lh):
                for y in range(0, lh, tile):
                    for x in range(0, lw, tile):
                        t = np.full((tile, tile, 3), 242, np.uint8)
                        ww, hh = min(tile, lw - x), min(tile, lh - y)
                        t[:hh, :ww] = render(x, y, ww, hh, d, W, H, mpp)
                        yield t

            tif.write(
                tiles(),
                shape=(lh, lw, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="rgb",
                compression="jpeg",
                resolution=(1e4 / (mpp * d), 1e4 / (mpp * d)),
                resolutionunit="CENTIMETER",
                subfiletype=0 if d == 1 else 1,
            )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=50000)
    ap.add_argument("--height", type=int, default=40000)
    ap.add_argument("--mpp", type=float, default=0.25)
    ap.add_argument("--workdir")
    args = ap.parse_args()
    import torch
    import yaml

    from wsiseg.models.checkpoint import save_checkpoint
    from wsiseg.unet import UNet

    wd = args.workdir or tempfile.mkdtemp(prefix="wsiseg-large-")
    os.makedirs(wd, exist_ok=True)
    slide = os.path.join(wd, "large.tif")
    t0 = time.monotonic()
    if not os.path.exists(slide):
        write_slide(slide, args.width, args.height, args.mpp)
    t_write = time.monotonic() - t0
    torch.manual_seed(0)
    save_checkpoint(
        os.path.join(wd, "small.pt"),
        UNet(n_classes=2, depth=3, base_width=4).eval(),
        ["background", "nucleus"],
        mpp=0.5,
        name="bench-small",
    )
    with open(os.path.join(REPO, "config", "config.yaml")) as fh:
        cfg = yaml.safe_load(fh)
    cfg["model"] = dict(
        name="bench-small", weights=os.path.join(wd, "small.pt"), classes=["background", "nucleus"], mpp=0.5
    )
    cfg["slides"] = os.path.join(wd, "slides.tsv")
    cfg["tiling"].update(batch_size=1, workers=0)
    with open(cfg["slides"], "w") as fh:
        fh.write(f"slide_id\tpath\tmpp\nlarge\t{slide}\t\n")
    with open(os.path.join(wd, "config.yaml"), "w") as fh:
        yaml.safe_dump(cfg, fh)
    t0 = time.monotonic()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "-s",
            os.path.join(REPO, "Snakefile"),
            "--directory",
            wd,
            "--configfile",
            os.path.join(wd, "config.yaml"),
            "--cores",
            "2",
            "-q",
        ],
        check=True,
    )
    t_run = time.monotonic() - t0
    import pandas as pd

    stats = pd.read_csv(os.path.join(wd, "results", "bench-small", "large", "stats.csv")).iloc[0]
    print(f"command: python {' '.join(sys.argv)}")
    print(
        f"slide {args.width}x{args.height} level-0 px at {args.mpp} µm/px ({args.width * args.height * 3 / 1e9:.1f} GB "
        f"as RGB; written in {t_write:.0f} s, {os.path.getsize(slide) / 1e6:.0f} MB JPEG); "
        f"mask {stats.mask_width_px}x{stats.mask_height_px} px ({stats.mask_width_px * stats.mask_height_px / 1e6:.0f} "
        f"Mpx); {stats.n_tiles} tiles; tissue {stats.tissue_area_mm2:.1f} mm²; nuclei counted {stats.nucleus_count}"
    )
    print(f"workflow wall time {t_run:.0f} s")
    print(f"{'rule':>10} {'seconds':>9} {'peak RSS MB':>12}")
    bdir = os.path.join(wd, "results", "bench-small", "large", "benchmarks")  # in the slide's folder
    for rule in ("tissue", "segment", "stitch", "stats"):
        b = pd.read_csv(os.path.join(bdir, f"{rule}.tsv"), sep="\t").iloc[0]
        print(f"{rule:>10} {b.s:>9.1f} {b.max_rss:>12.0f}")


if __name__ == "__main__":
    main()
