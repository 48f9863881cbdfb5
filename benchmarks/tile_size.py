"""Tile size through the whole workflow: the segment job's time with tiles of 512, 1024, ... px.

Bigger tiles waste less margin per tile (512 + 2 x 112 px computes 2.07x the written area,
1024 + 2 x 112 1.49x), but the tile plan keeps only the tiles that touch tissue, so bigger
tiles also compute more of the slide's background, and every tile size is a new window shape
for the network's first call. This runs the whole workflow on one slide (``vs_monai.workflow``:
Snakemake, the default config and shipped model block, ``device`` as given, the segment job
given every core) with each ``--tiles`` size in turn, the order reversed round after round
(``--rounds``), and prints per size the medians of the whole workflow's wall time and of the
segment job's (Snakemake's benchmark file), the tiles planned and the window Mpx the network
computed; then how many px of the level-0 mask differ from the first size's, compared tile by
tile of the mask OME-TIFF.

    python benchmarks/tile_size.py [slide] [--tiles 512 1024] [--rounds 2] [--cores 2] [--device cpu]
        [--workdir DIR [--reuse]]
    (default slide: CMU-1-Small-Region from ../shared/data)
"""

import argparse
import os
import statistics
import sys
import tempfile

import pandas as pd
import tifffile
import yaml
from vs_monai import CMU, REPO, WEIGHTS, workflow


def mask_diff(a: str, b: str) -> tuple[int, int]:
    """(px that differ, px) between the level-0 pages of two mask OME-TIFFs on the same tile grid,
    one tile of each in memory at a time."""
    with tifffile.TiffFile(a) as ta, tifffile.TiffFile(b) as tb:
        pa, pb = ta.pages[0], tb.pages[0]
        assert pa.shape == pb.shape and pa.tilewidth == pb.tilewidth and pa.tilelength == pb.tilelength
        differ = 0
        for (sa, *_), (sb, *_) in zip(pa.segments(), pb.segments()):  # (decoded tile, index, shape)
            differ += int((sa != sb).sum())
        return differ, pa.shape[0] * pa.shape[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("slide", nargs="?", default=CMU)
    ap.add_argument("--tiles", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cores", type=int, default=os.cpu_count())
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workdir", help="where the runs go (default: a temporary folder)")
    ap.add_argument("--reuse", action="store_true", help="take the runs already in --workdir")
    args = ap.parse_args()
    print(f"command: python {' '.join(sys.argv)}")
    with open(os.path.join(REPO, "config", "config.yaml")) as fh:
        model = dict(yaml.safe_load(fh)["model"], weights=WEIGHTS)  # the shipped model block as it is
    base = args.workdir or tempfile.mkdtemp(prefix="tile_size_")
    # the plan's halo cache: warm after the first run, as on a machine's later slides
    cache = os.path.join(base, "cache")
    runs = {t: [] for t in args.tiles}  # size -> [(wall s, segment job s)]
    plans = {}
    for r in range(args.rounds):
        for t in args.tiles if r % 2 == 0 else args.tiles[::-1]:
            wd = os.path.join(base, f"t{t}-r{r}")
            wall, rules = workflow(wd, args.slide, model, {"tile_size": t}, args.cores, cache, args.reuse, args.device)
            runs[t].append((wall, rules["segment"]))
            plans[t] = os.path.join(wd, "results", model["name"], "slide")
            print(f"  round {r + 1} tile {t}: workflow {wall:.1f} s, segment job {rules['segment']:.1f} s", flush=True)
    print(
        f"\nslide {os.path.basename(args.slide)}, device {args.device}, {args.cores} cores, "
        f"{args.rounds} rounds (medians)"
    )
    print(
        f"{'tile':>5} {'window':>6} {'tiles':>5} {'window Mpx':>10} {'workflow s':>10} {'segment job s':>13} "
        f"{'mask px differ':>14}"
    )
    first = args.tiles[0]
    for t, rows in runs.items():
        plan = pd.read_csv(os.path.join(plans[t], "plan.tsv"), sep="\t")
        differ, px = mask_diff(os.path.join(plans[first], "mask.ome.tif"), os.path.join(plans[t], "mask.ome.tif"))
        print(
            f"{t:>5} {int(plan.n.iloc[0]):>6} {len(plan):>5} {plan.n.pow(2).sum() / 1e6:>10.1f} "
            f"{statistics.median(w for w, _ in rows):>10.1f} {statistics.median(s for _, s in rows):>13.1f} "
            f"{f'{differ} of {px}':>14}"
        )
    print(f"(mask px differ: level 0 against tiles of {first}; runs in {base})")


if __name__ == "__main__":
    main()
