"""Training throughput of `snakemake train`: seconds per optimizer step, split into
building the augmented crops (CPU) and the network's forward/backward/Adam step.

Uses the training code itself (wsiseg.train.CropSampler, train_step, UNet) on the
MICCAI 2015 training tiles of the shipped model's sheet, for a list of U-Net
widths, and projects the time of the shipped model's schedule (24 epochs of 40
steps). Validation and threshold search are not included (a few seconds per
epoch and a minute at the end on 2 CPU cores).

    python benchmarks/train_throughput.py [--base-width 16 32] [--crop 256] [--batch 8] [--steps 6]
"""

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from wsiseg import labels as L  # noqa: E402
from wsiseg import train  # noqa: E402
from wsiseg.segment import pick_device  # noqa: E402
from wsiseg.unet import UNet  # noqa: E402

SHEET = os.path.join(HERE, "..", "config", "labeled", "miccai2015-train.tsv")
SHIPPED_STEPS = 24 * 40  # config/config.yaml train: max_epochs x steps_per_epoch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-width", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per width (after one warm-up step)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = pick_device(args.device, lambda m: None)
    samples = [s for s in L.load_set(SHEET, 0.5) if s.split != "val"]
    print(
        f"command: python benchmarks/train_throughput.py --base-width {' '.join(map(str, args.base_width))} "
        f"--depth {args.depth} --crop {args.crop} --batch {args.batch} --steps {args.steps}"
    )
    print(f"device {device}, {torch.get_num_threads()} threads, {len(samples)} training tiles")
    print(
        f"{'width':>5} {'params M':>8} {'crop':>4} {'batch':>5} {'crops s/step':>12} {'net s/step':>10} "
        f"{'crops/s':>7} {'24x40 steps min':>15}"
    )
    for width in args.base_width:
        cfg = train.TrainConfig(
            sheet=SHEET,
            out_dir="",
            depth=args.depth,
            base_width=width,
            crop=args.crop,
            batch_size=args.batch,
            dropout=0.1,
        )
        rng = np.random.default_rng(0)
        torch.manual_seed(0)
        sampler = train.CropSampler(samples, cfg, rng)
        model = UNet(n_classes=3, depth=args.depth, base_width=width, dropout=0.1).to(device).train()
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        t_crop = t_net = 0.0
        for i in range(args.steps + 1):
            t0 = time.perf_counter()
            batch = sampler.batch()
            t1 = time.perf_counter()
            train.train_step(model, opt, batch, cfg, device)  # float(loss) waits for the GPU
            if device.type == "cuda":
                torch.cuda.synchronize()
            t2 = time.perf_counter()
            if i:  # the first step warms up (allocations, cuDNN autotuning)
                t_crop += t1 - t0
                t_net += t2 - t1
        n = args.steps
        per_step = (t_crop + t_net) / n
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(
            f"{width:5d} {params:8.2f} {args.crop:4d} {args.batch:5d} {t_crop / n:12.2f} {t_net / n:10.2f} "
            f"{args.batch / per_step:7.1f} {SHIPPED_STEPS * per_step / 60:15.1f}"
        )


if __name__ == "__main__":
    main()
