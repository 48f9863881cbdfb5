import json
import os
import sys

import pandas as pd
from snakemake.utils import validate

validate(config, schema="../schemas/config.schema.yaml")

sys.path.insert(0, os.path.join(workflow.basedir, "src"))
from wsiseg.models import wants_gpu, weights_of  # noqa: E402  (no torch: cheap at DAG time)
from wsiseg.sheet import SheetError, check_sheet, read_sheet, slides_from_dir  # noqa: E402

MODEL = config["model"]["name"]
RESULTS = f"{config['results']}/{MODEL}"
LOGS = f"logs/{MODEL}"
BENCH = f"benchmarks/{MODEL}"


def load_slides():
    try:
        if config.get("slides_dir"):
            sheet = slides_from_dir(config["slides_dir"], config.get("slides_glob", "*"))
        else:
            sheet = read_sheet(config["slides"])
        sheet = check_sheet(sheet)
    except SheetError as exc:
        raise WorkflowError(str(exc))
    validate(sheet, schema="../schemas/slides.schema.yaml")
    return sheet


SLIDES = load_slides()


wildcard_constraints:
    slide="[A-Za-z0-9][A-Za-z0-9._-]*",


# ------------------------------------------------------------ input functions
EXAMPLE_SLIDE = "resources/example/synthetic_he.tif"


def get_slide_path(wildcards):
    return SLIDES.loc[wildcards.slide, "path"]


def get_inspect_input(wildcards):
    """The slide file, if it exists (or a rule makes it). A missing file is not a DAG
    error that stops the archive: inspect records it as a failed slide."""
    path = get_slide_path(wildcards)
    return [path] if os.path.exists(path) or os.path.normpath(path) == EXAMPLE_SLIDE else []


def get_slide_mpp(wildcards):
    mpp = SLIDES.loc[wildcards.slide, "mpp"]
    return None if pd.isna(mpp) else float(mpp)


OUTLINES = config.get("stats", {}).get("outlines", True)


def stats_outputs():
    """The stats rule's named outputs; outlines.geojson.gz only with stats.outlines."""
    out = {"stats": f"{RESULTS}/{{slide}}/stats.csv", "objects": f"{RESULTS}/{{slide}}/objects.csv.gz"}
    if OUTLINES:
        out["outlines"] = f"{RESULTS}/{{slide}}/outlines.geojson.gz"
    return out


def get_model_weights(wildcards=None):
    """The files the model reads (rule inputs, so new weights remake plans and masks); none
    for a model without weights (the classical model). Asked of wsiseg.models."""
    return weights_of(config["model"])


def model_cfg(tta=True):
    """The model block as rule params. `tta` only where it matters (segment) and only
    while it is on, so that switching it reruns segmentation, not tile plans, and
    configs written before it existed keep their params: nothing reruns."""
    cfg = dict(config["model"])
    if not (tta and cfg.get("tta")):
        cfg.pop("tta", None)
    return cfg


def gpu_request(device):
    """The gpu resource (SLURM: sbatch --gpus) of a rule that runs a U-Net on ``device``.

    'cuda' or 'gpu' -> 1; 'cpu' -> 0; 'auto' -> 1 when the jobs go to a cluster executor
    (--executor slurm: the login node cannot tell whether the nodes have GPUs, so the
    job asks for one and 'auto' uses it), 0 on a workstation, where a gpu resource would
    only serialise CPU jobs under the default profile's `resources: gpu: 1`. Evaluated
    per job, once the executor is known (the DAG is built after it is set).
    """
    device = str(device or "auto")
    if device in ("cuda", "gpu"):
        return 1
    if device == "auto":
        return 1 if getattr(workflow, "non_local_exec", False) else 0
    return 0


def segment_threads():
    """Reading workers + the network's process + post-processing workers. 'auto' asks for no
    more (the job's request is as before) and then uses whatever CPUs the job was given:
    raise them with --set-threads segment=N (SLURM: cpus_per_task follows)."""
    t = config["tiling"]
    post = t.get("postprocess_workers", "auto")
    return max(1, int(t["workers"]) + 1 + (0 if post in (None, "auto") else int(post)))


def segment_resources_gpu(wildcards):
    """A model that wants no GPU (the classical model runs numpy on the CPU) gets none, whatever `device` says."""
    return gpu_request(config.get("device", "auto")) if wants_gpu(config["model"]) else 0


# ------------------------------------------------------- cluster job resources
# What each job asks a cluster scheduler for (SLURM: profiles/slurm). Every request
# grows with the retry attempt (--retries), and the ones that depend on the slide grow
# with its size: slide.json (written by the local 'inspect' rule) is always there when
# these jobs are scheduled. Local runs only use mem_mb/gpu if --resources limits them.
# Override any of them per rule with set-resources in a profile.
SEGMENT_S_PER_TILE = 1.0  # wall-clock budget per tile (reading + inference), seconds
SEGMENT_TTA_FACTOR = 8  # model.tta: 8 passes of the network per tile
MASK_MPX_PER_MIN = 100  # stitch/stats budget: mask megapixels per minute
OUTLINES_MPX_PER_MIN = 25  # stats with outlines: its worst case (benchmarks/memory_vs_area.py --speckle) is 30


def _slide_info(wildcards):
    try:
        with open(f"{RESULTS}/{wildcards.slide}/slide.json") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def _slide_mpx(wildcards, mpp_out):
    """Slide area in megapixels at mpp_out µm/px (0 when not known yet)."""
    info = _slide_info(wildcards)
    mpp0 = get_slide_mpp(wildcards) or info.get("mpp")
    if not (info.get("width") and info.get("height") and mpp0):
        return 0.0
    return info["width"] * info["height"] * (float(mpp0) / mpp_out) ** 2 / 1e6


def _n_tiles(wildcards):
    """Tiles in the plan (once it exists), else every tile of the slide: an upper bound."""
    try:
        with open(f"{RESULTS}/{wildcards.slide}/plan.tsv") as fh:
            return max(0, sum(1 for _ in fh) - 1)
    except OSError:
        return int(_slide_mpx(wildcards, config["model"]["mpp"]) * 1e6 / config["tiling"]["tile_size"] ** 2) + 1


def tissue_mem_mb(wildcards, attempt):
    # the thumbnail at tissue.mpp and its float working copies
    return int(2000 + 40 * _slide_mpx(wildcards, config["tissue"]["mpp"])) * attempt


def segment_runtime(wildcards, attempt):
    per_tile = SEGMENT_S_PER_TILE * (SEGMENT_TTA_FACTOR if config["model"].get("tta") else 1)
    return int(15 + _n_tiles(wildcards) * per_tile / 60) * attempt


def mask_runtime(wildcards, attempt):
    return int(10 + _slide_mpx(wildcards, config["model"]["mpp"]) / MASK_MPX_PER_MIN) * attempt


def stats_runtime(wildcards, attempt):
    rate = OUTLINES_MPX_PER_MIN if OUTLINES else MASK_MPX_PER_MIN
    return int(10 + _slide_mpx(wildcards, config["model"]["mpp"]) / rate) * attempt


def triaged():
    """Slide status table from the 'triage' checkpoint (one checkpoint for the whole
    archive, so all slides are inspected in parallel)."""
    path = checkpoints.triage.get().output[0]
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False).set_index("slide_id")


def ok_slides():
    t = triaged()
    return [s for s in SLIDES.index if t.loc[s, "status"] == "ok"]


def get_stats(wildcards):
    return expand(f"{RESULTS}/{{slide}}/stats.csv", slide=ok_slides())


def get_failed(wildcards):
    t = triaged()
    return [f"{RESULTS}/{s}/slide.json" for s in SLIDES.index if t.loc[s, "status"] != "ok"]


def get_final_outputs(wildcards):
    ok = ok_slides()
    per_slide = ["mask.ome.tif", "tissue.png", "overlay.png", "stats.csv", "objects.csv.gz"]
    if OUTLINES:
        per_slide.append("outlines.geojson.gz")
    return [f"{RESULTS}/summary.csv"] + [f"{RESULTS}/{s}/{f}" for s in ok for f in per_slide]


# ------------------------------------------- training and evaluation targets
# Training and evaluation targets (not part of `all`):
#   snakemake train --cores 2        -> results/training/<train.name>/best.pt, metrics.csv, validation.csv (work/: last.pt)
#   snakemake evaluate --cores 2     -> results/evaluation/<set>/<method>/metrics.csv + overlays, comparison.csv
TRAIN = config.get("train", {})
EVAL = config.get("evaluate", {})
TRAIN_DIR = f"{config['results']}/training/{TRAIN.get('name', 'unet')}"
EVAL_DIR = f"{config['results']}/evaluation"


def eval_methods():
    """'<model name>' (the inference model in `model:`) and/or 'classical-baseline'."""
    out = []
    for m in EVAL.get("methods", ["model", "baseline"]):
        out.append(MODEL if m == "model" else "classical-baseline")
    return out


def eval_sets():
    """Names of the evaluate.sets to score: all, or the ones evaluate.only lists. A further
    --configfile merges into the sets mapping (it can add sets, never drop one) but replaces
    the only list, so a run can be narrowed to one set, e.g. validation tiles, without the
    held-out test set coming along."""
    sets = list(EVAL.get("sets", {}))
    only = list(EVAL.get("only") or [])
    unknown = [s for s in only if s not in sets]
    if unknown:
        raise WorkflowError(
            f"evaluate.only names {unknown}, which evaluate.sets does not define (it has {sets}); "
            "name sets of evaluate.sets, or add them there"
        )
    return only or sets


def get_train_sheet(wildcards):
    """train.sheet; asked for only when the train target is in the run."""
    if not TRAIN.get("sheet"):
        raise WorkflowError(
            "the train target needs train.sheet: a labeled-set TSV (image, labels, mpp[, split]); "
            "set it in config.yaml's train: block or with --config, see config/README.md"
        )
    return TRAIN["sheet"]


def get_eval_sheet(wildcards):
    return EVAL["sets"][wildcards.set]


onsuccess:
    failed = []
    for s in SLIDES.index:
        p = f"{RESULTS}/{s}/slide.json"
        if os.path.exists(p):
            with open(p) as fh:
                info = json.load(fh)
            if info.get("status") != "ok":
                failed.append(f"  {s}: {info.get('error')}")
    if failed:
        print(
            f"WARNING: {len(failed)} slide(s) could not be processed (see {RESULTS}/summary.csv):", file=sys.stderr
        )
        print("\n".join(failed), file=sys.stderr)
