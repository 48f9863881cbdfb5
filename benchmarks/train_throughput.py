"""Training throughput of `snakemake train`: seconds per optimizer step, split into
building the augmented crops (CPU) and the network's forward/backward/Adam step.

Uses the training code itself (wsiseg.train.CropDataset, train_step, UNet) on the
training tiles of the shipped model's sheet (MICCAI 2015 + MoNuSeg 2018 train), for a
list of U-Net widths, and projects the time of the shipped model's schedule (24 epochs
of 40 steps). Validation and threshold search are not included (a few seconds per
epoch and a few minutes at the end on 2 CPU cores).

``crops s/step`` is the time to make one batch in this process; ``fed s/step`` is
the time per step when ``--workers`` DataLoader workers make the crops while the
network trains (what `snakemake train` does with `train.workers`): the crops are
not the bottleneck when it is close to ``net s/step``. A second table gives the crops
per second the DataLoader alone delivers (no network) with ``--loader-workers``
workers: the ceiling of steps per second that a GPU could be fed.

    python benchmarks/train_throughput.py [--base-width 16 32] [--crop 256] [--batch 8] [--steps 6] [--workers 2]
                                          [--loader-workers 0 1 2]
"""

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

import torch  # noqa: E402

from wsiseg import labels as L  # noqa: E402
from wsiseg import train  # noqa: E402
from wsiseg.segment import pick_device  # noqa: E402
from wsiseg.unet import UNet  # noqa: E402

SHEET = os.path.join(HERE, "..", "config", "labeled", "nuclei-train.tsv")
SHIPPED_STEPS = 24 * 40  # config/config.yaml train: max_epochs x steps_per_epoch


def step(model, opt, batch, cfg, device) -> None:
    train.train_step(model, opt, batch, cfg, device)  # float(loss) waits for the GPU
    if device.type == "cuda":
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-width", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per width (after one warm-up step)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers for the fed run (train.workers)")
    ap.add_argument("--loader-workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader alone, no network")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = pick_device(args.device, lambda m: None)
    samples = [s for s in L.load_set(SHEET, 0.5) if s.split != "val"]
    print(
        f"command: python benchmarks/train_throughput.py --base-width {' '.join(map(str, args.base_width))} "
        f"--depth {args.depth} --crop {args.crop} --batch {args.batch} --steps {args.steps} --workers {args.workers} "
        f"--loader-workers {' '.join(map(str, args.loader_workers))}"
    )
    print(f"device {device}, {torch.get_num_threads()} threads, {len(samples)} training tiles")
    print(
        f"{'width':>5} {'params M':>8} {'crop':>4} {'batch':>5} {'crops s/step':>12} {'net s/step':>10} "
        f"{'fed s/step':>10} {'crops/s':>7} {'24x40 steps min':>15}"
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
        torch.manual_seed(0)
        crops = train.CropDataset(samples, cfg)
        model = UNet(n_classes=3, depth=args.depth, base_width=width, dropout=0.1)
        model = model.to(device, memory_format=torch.channels_last).train()  # NHWC, as wsiseg.train.run
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        t_crop = t_net = 0.0
        batches = crops.batches(0, args.steps + 1, workers=0)
        for i in range(args.steps + 1):
            t0 = time.perf_counter()
            batch = next(batches)
            t1 = time.perf_counter()
            step(model, opt, batch, cfg, device)
            t2 = time.perf_counter()
            if i:  # the first step warms up (allocations, cuDNN autotuning)
                t_crop += t1 - t0
                t_net += t2 - t1
        # the same number of steps with the crops made by DataLoader workers meanwhile
        batches = crops.batches(args.steps + 1, 2 * args.steps + 2, workers=args.workers)
        step(model, opt, next(batches), cfg, device)  # workers started, first batch waited for
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step(model, opt, next(batches), cfg, device)
        t_fed = time.perf_counter() - t0
        batches.close()
        n = args.steps
        per_step = t_fed / n
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(
            f"{width:5d} {params:8.2f} {args.crop:4d} {args.batch:5d} {t_crop / n:12.2f} {t_net / n:10.2f} "
            f"{per_step:10.2f} {args.batch / per_step:7.1f} {SHIPPED_STEPS * per_step / 60:15.1f}"
        )

    cfg = train.TrainConfig(sheet=SHEET, out_dir="", crop=args.crop, batch_size=args.batch)
    crops = train.CropDataset(samples, cfg)
    print(f"\n{'loader workers':>14} {'crops/s':>8} {'batches/s':>9}")
    for workers in args.loader_workers:
        n = max(4, 2 * workers) * args.steps  # batches timed, after the first (workers starting)
        batches = crops.batches(0, n + 1, workers=workers)
        next(batches)
        t0 = time.perf_counter()
        for _ in range(n):
            next(batches)
        dt = time.perf_counter() - t0
        batches.close()
        print(f"{workers:14d} {n * args.batch / dt:8.1f} {n / dt:9.2f}")


if __name__ == "__main__":
    main()
