"""Segment-stage throughput (tiles/s, megapixels/s) for batch sizes and DataLoader workers.

Runs the shipped nuclei U-Net (with its per-tile instance post-processing) over
every tile of a slide (tissue ignored) with the workflow's own splitter/merger,
and prints a table. On a CUDA machine it also runs with autocast (AMP).
``--weights classical`` measures the classical nuclei model instead (CPU).
``--tta`` adds runs with ``model.tta`` (8 flips/rotations per tile).

    python benchmarks/segment_throughput.py [slide] [--tile 512] [--weights classical] [--tta]
    (default slide: the synthetic example, generated if missing)
"""

import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

import torch  # noqa: E402

from wsiseg.geometry import Geometry  # noqa: E402
from wsiseg.models import load_model  # noqa: E402
from wsiseg.segment import StoreMerger, pick_device, run_segmentation  # noqa: E402
from wsiseg.slide import open_slide  # noqa: E402
from wsiseg.tiling import plan_margin, plan_tiles, tile_spec_for  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("slide", nargs="?")
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--weights", default=os.path.join(HERE, "..", "models", "nuclei-unet.pt"))
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--tta", action="store_true", help="also run with model.tta (U-Net only)")
    args = ap.parse_args()
    slide = args.slide
    if slide is None:
        slide = os.path.join(tempfile.gettempdir(), "wsiseg-bench-example.tif")
        if not os.path.exists(slide):
            from wsiseg.synthetic import make_example_slide

            make_example_slide(slide)
    if args.weights == "classical":
        cfg = dict(name="bench", format="classical", mpp=0.5)
    else:
        cfg = dict(name="bench", weights=args.weights)
    model = load_model(cfg)
    dev = pick_device("auto") if model.wants_gpu else torch.device("cpu")
    margin = plan_margin(model, "auto", False)
    spec = tile_spec_for(model, args.tile, margin)
    with open_slide(slide) as s:
        geom = Geometry.for_slide(s, model.mpp)
        plan = plan_tiles(geom, spec, None, 1)
        # the plan stage's per-slide calibration (the classical model's threshold), as the workflow runs it
        model.apply_calibration(
            model.calibrate(lambda: open_slide(slide), geom, spec, plan, lambda m: None), lambda m: None
        )
    rows = []
    amps = [False, True] if dev.type == "cuda" else [False]
    ttas = [False, True] if args.tta and model.supports_tta else [False]
    for tta in ttas:
        for amp in amps:
            for workers in args.workers:
                for batch in args.batch:
                    with tempfile.TemporaryDirectory() as tmp:
                        merger = StoreMerger(os.path.join(tmp, "s"), geom, spec, labels=model.labeler())
                        t0 = time.monotonic()
                        run_segmentation(
                            slide,
                            "bench",
                            None,
                            geom,
                            spec,
                            plan,
                            model.module,
                            merger,
                            dev,
                            batch_size=batch,
                            workers=workers,
                            amp=amp,
                            log_fn=lambda m: None,
                            tta=tta,
                        )
                        dt = time.monotonic() - t0
                        merger.store.close()
                    rows.append((dev.type, amp, tta, workers, batch, len(plan), dt))
    print(f"command: python {' '.join(sys.argv)}")
    shown = (
        "classical nuclei model"
        if model.kind == "classical"
        else os.path.relpath(args.weights, os.path.join(HERE, ".."))
    )
    print(f"model: {shown} ({model.kind})")
    print(
        f"slide {os.path.basename(slide)}: {geom.width}x{geom.height} target px at {model.mpp} µm/px; "
        f"tile {spec.tile_size}, window {spec.window}; torch threads {torch.get_num_threads()}"
    )
    print(
        f"{'device':>6} {'amp':>5} {'tta':>5} {'workers':>7} {'batch':>5} {'tiles':>5} {'seconds':>8} "
        f"{'tiles/s':>8} {'Mpx/s':>7}"
    )
    for d, amp, tta, w, b, n, dt in rows:
        print(
            f"{d:>6} {str(amp):>5} {str(tta):>5} {w:>7} {b:>5} {n:>5} {dt:>8.1f} {n / dt:>8.2f} "
            f"{n * spec.tile_size**2 / dt / 1e6:>7.2f}"
        )


if __name__ == "__main__":
    main()
