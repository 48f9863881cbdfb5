"""The network alone on the CPU: memory layout (contiguous NCHW against channels_last NHWC),
BatchNorms folded into the convolutions or not, and window size, side by side in one run.

The shipped nuclei U-Net runs on random windows of tile + 2 x the plan's margin (112 px) for
each ``--tiles`` size, in both layouts, ``--rounds`` rounds one after another (every
configuration once per round, so each sees the same load; the best of each is kept). For
each: seconds per window, input Mpx/s (what the network computes) and output Mpx/s (the
tile's write region, what a slide needs), and the largest absolute difference of the
channels_last logits (and of the folded network's) from the contiguous ones on the same
window. The segment stage runs the network in channels_last with its BatchNorms folded
(wsiseg.unet.fold_batchnorm) on every device (wsiseg.segment.run_segmentation).

    python benchmarks/net_layout.py [--threads 2] [--tiles 256 512 768 1024] [--rounds 2]
"""

import argparse
import copy
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

import torch  # noqa: E402

from wsiseg.models import load_model  # noqa: E402
from wsiseg.unet import fold_batchnorm  # noqa: E402

WEIGHTS = os.path.join(HERE, "..", "models", "nuclei-unet.pt")
MARGIN = 112  # the shipped model's plan margin (halo 107, aligned to 16)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--tiles", type=int, nargs="*", default=[256, 512, 768, 1024])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--calls", type=int, default=2, help="timed calls per configuration and round")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    module = load_model(dict(name="nuclei", weights=WEIGHTS), geometry=False).module.eval()
    nhwc = torch.channels_last
    networks = {  # name -> (network, input layout); the last: what the segment stage runs
        "contiguous": (module, torch.contiguous_format),
        "channels_last": (copy.deepcopy(module).to(memory_format=nhwc), nhwc),
        "nhwc, BN folded": (fold_batchnorm(module).to(memory_format=nhwc), nhwc),
    }
    windows = {t: torch.rand(1, 3, t + 2 * MARGIN, t + 2 * MARGIN) for t in args.tiles}
    best, diff = {}, {}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for tile, x in windows.items():
                outs = {}
                for name, (m, fmt) in networks.items():
                    xi = x.contiguous(memory_format=fmt)
                    outs[name] = m(xi)  # warm-up: oneDNN picks its kernels for this size on the first call
                    t0 = time.perf_counter()
                    for _ in range(args.calls):
                        m(xi)
                    dt = (time.perf_counter() - t0) / args.calls
                    best[tile, name] = min(best.get((tile, name), float("inf")), dt)
                for name in networks:
                    diff[tile, name] = float((outs[name] - outs["contiguous"]).abs().max())
    print(
        f"shipped nuclei U-Net on the CPU, {args.threads} torch threads, best of {args.rounds} rounds x "
        f"{args.calls} calls"
    )
    print(
        f"{'tile':>5} {'window':>6} {'network':>15} {'s/window':>9} {'in Mpx/s':>9} {'out Mpx/s':>9} "
        f"{'vs NCHW':>8} {'max |diff|':>10}"
    )
    for tile in args.tiles:
        n = tile + 2 * MARGIN
        for name in networks:
            dt = best[tile, name]
            speed = best[tile, "contiguous"] / dt
            d = f"{diff[tile, name]:.1e}" if name != "contiguous" else ""
            print(
                f"{tile:>5} {n:>6} {name:>15} {dt:>9.3f} {n * n / dt / 1e6:>9.2f} {tile * tile / dt / 1e6:>9.2f} "
                f"{speed:>7.2f}x {d:>10}"
            )
    print(
        f"\ncommand: python benchmarks/net_layout.py --threads {args.threads} --tiles "
        f"{' '.join(map(str, args.tiles))} --rounds {args.rounds} --calls {args.calls}"
    )


if __name__ == "__main__":
    main()
