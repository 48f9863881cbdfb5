import atexit
import json
import os
import sys

import pandas as pd
import yaml
from snakemake.utils import validate

sys.path.insert(0, os.path.join(workflow.basedir, "src"))
from wsiseg.config_values import command_line_booleans  # noqa: E402

with open(os.path.join(workflow.basedir, "workflow", "schemas", "config.schema.yaml")) as fh:
    command_line_booleans(config, yaml.safe_load(fh))  # --config block='{key: true}'
validate(config, schema="../schemas/config.schema.yaml")

from wsiseg.content import KeyCache  # noqa: E402  (no torch: cheap at DAG time)
from wsiseg.errors import ConfigError  # noqa: E402
from wsiseg.models import (
    check_postprocess,
    check_stain,
    check_weights,
    stain_settings,
    wants_gpu,
    weights_of,
)  # noqa: E402
from wsiseg.sheet import SheetError, check_sheet, read_sheet, slides_from_dir  # noqa: E402

MODEL = config["model"]["name"]
RESULTS = f"{config['results']}/{MODEL}"
LOGS = f"{RESULTS}/logs"  # archive-level logs; a slide's are in its own folder (slide_log)


def slide_log(rule):
    """A per-slide rule's log, in the slide's folder: runs with another `results:` never share it."""
    return f"{RESULTS}/{{slide}}/logs/{rule}.log"


def slide_benchmark(rule):
    return f"{RESULTS}/{{slide}}/benchmarks/{rule}.tsv"


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


# ------------------------------------------------------------ content keys
# Reruns follow content, not modification times (README, "Rerunning"): slide and weights
# files from outside are not rule inputs (their mtimes, even ones in the future, decide
# nothing and fail nothing); what they hold enters as params (the slide's fingerprint
# and path at inspect, the weights' sha256 at plan and segment), which Snakemake compares
# with what it recorded. Files a rule of this workflow makes (the example slide, a model
# trained by `snakemake train`) are inputs as usual, so that rule runs first.
EXAMPLE_SLIDE = "resources/example/synthetic_he.tif"
TRAIN = config.get("train", {})
TRAIN_DIR = f"{config['results']}/training/{TRAIN.get('name', 'unet')}"
MADE_HERE = {EXAMPLE_SLIDE: "example_slide", f"{TRAIN_DIR}/best.pt": "train"}
# per file state, so a later run only stats; absolute: Snakemake leaves --directory before atexit
KEYS = KeyCache(os.path.abspath(".snakemake/wsiseg/content-keys.tsv"))
if workflow.is_main_process:
    atexit.register(KEYS.save)  # jobs read it; only the process that builds the DAG writes it


def made_by(path):
    """The rule of this workflow that makes ``path``, or None for a file from outside."""
    return MADE_HERE.get(os.path.normpath(path))


def made_here(path):
    """``path`` as a rule input when a rule of this workflow makes it; none for a file from
    outside (the rule reads it by the path in its params)."""
    return [path] if made_by(path) else []


def content_key(path, kind):
    """The content key of an input file (rule param), keyed by file state in KEYS."""
    if made_by(path):
        return f"made by rule {made_by(path)}"
    try:
        return KEYS.slide_fingerprint(path) if kind == "fingerprint" else KEYS.sha256(path)
    except OSError as exc:
        return f"unreadable: {exc.strerror}"  # inspect records why; a later fix changes the key


# Weights that no stage could load are refused here, once, before any job runs
# (a pickle that would run code, an empty or truncated file, a config it contradicts).
if workflow.is_main_process and not all(made_by(w) for w in weights_of(config["model"])):
    try:
        check_weights(config["model"])
    except ConfigError as exc:
        raise WorkflowError(str(exc))
if workflow.is_main_process:  # model.stain_normalise without a reference, or on the classical model
    try:  # check_stain looks at the weights file's format, which 'auto' cannot before `train` made it
        (check_stain if config["model"].get("format") == "classical" else stain_settings)(config["model"])
    except ConfigError as exc:
        raise WorkflowError(str(exc))
if workflow.is_main_process:  # model.postprocess on a model without a boundary class, or not a network
    try:
        check_postprocess(config["model"])
    except ConfigError as exc:
        raise WorkflowError(str(exc))


# ------------------------------------------------------------ input functions
def get_slide_path(wildcards):
    return SLIDES.loc[wildcards.slide, "path"]


def get_slide_input(wildcards):
    return made_here(get_slide_path(wildcards))


def get_slide_fingerprint(wildcards):
    """The slide's content key (wsiseg.content.fingerprint): a replaced slide reruns, a touched one does not."""
    return content_key(get_slide_path(wildcards), "fingerprint")


def get_slide_mpp(wildcards):
    mpp = SLIDES.loc[wildcards.slide, "mpp"]
    return None if pd.isna(mpp) else float(mpp)


OUTLINES = config.get("stats", {}).get("outlines", True)


def stats_outputs():
    """The stats rule's named outputs; outlines.geojson.gz only with stats.outlines."""
    out = {"stats": f"{RESULTS}/{{slide}}/stats.csv", "objects": f"{RESULTS}/{{slide}}/objects.csv.gz"}
    if OUTLINES:
        out["outlines"] = f"{RESULTS}/{{slide}}/outlines.geojson.gz"
    out["record"] = f"{RESULTS}/{{slide}}/work/stats.json"  # the stage's run (times, software): provenance.json
    return out


def get_model_weights(wildcards=None):
    """The weights file as a rule input when `snakemake train` makes it; the model reads it
    by the path in its params, and its content is the weights_sha256 param."""
    return [f for w in weights_of(config["model"]) for f in made_here(w)]


def weights_sha256(wildcards=None):
    """The weights' content key, a param: new weights rerun plans and masks, a touched
    or copied file with the same bytes does not."""
    return [content_key(w, "sha256") for w in weights_of(config["model"])]


#: settings that change a stage's outputs: its params (a change reruns it and what follows).
#: The others (batch size, workers, amp, cpu_bf16, device, max_unreadable_fraction) are read by the
#: scripts from the config and rerun nothing (config/README.md says which is which).
TISSUE_KEYS = ("method", "mpp", "min_area_um2")
PLAN_TILING_KEYS = ("tile_size", "margin", "allow_small_margin")


def settings(block, keys):
    return {k: config[block][k] for k in keys if k in config[block]}


def model_cfg(tta=True):
    """The model block as rule params. `tta` only where it matters (segment) and only
    while it is on, so that switching it reruns segmentation, not tile plans, and
    configs written before it existed keep their params: nothing reruns. The same for
    stain normalisation: its keys only while it is on."""
    cfg = dict(config["model"])
    if not (tta and cfg.get("tta")):
        cfg.pop("tta", None)
    if (cfg.get("stain_normalise") or "none") == "none":  # off: params as before the switch existed
        for key in ("stain_normalise", "stain_reference", "stain_max_scale"):
            cfg.pop(key, None)
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


#: CPUs a segment job asks for while tiling.workers is 'auto' (Snakemake threads, SLURM
#: cpus_per_task): on a GPU node the stage splits them into 4 reading workers, 3
#: post-processing workers and the network's loop, about 20 output Mpx/s of feed at the CPU
#: costs measured on 2 cores; half of a 16-CPU GPU node, so that the node's other CPUs serve
#: the other slides' CPU jobs (--set-threads segment=16 gives the segment job all of them).
#: A local run lowers it to --cores (on a 2-core machine 2, as the fixed default got).
SEGMENT_AUTO_CPUS = 8


def segment_threads():
    """The segment job's CPUs. Numbers: reading workers + the network's process +
    post-processing workers ('auto' adds none). tiling.workers 'auto' (the default):
    SEGMENT_AUTO_CPUS, plus the post-processing workers when they are a number; the stage
    then splits what the job was given (wsiseg.segment.resolve_tiling: on a GPU between the
    loop and the workers, on the CPU one network stream per CPU). Either way, raise them with
    --set-threads segment=N (SLURM: cpus_per_task follows) and 'auto' uses them."""
    t = config["tiling"]
    post = t.get("postprocess_workers", "auto")
    post = 0 if post in (None, "auto") else int(post)
    workers = t.get("workers", "auto")
    if workers in (None, "auto"):
        return SEGMENT_AUTO_CPUS + post
    return max(1, int(workers) + 1 + post)


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


#: segment: MB per CPU of a segment job. On the CPU each CPU runs a network stream (a process
#: that holds, beyond the torch and model pages it shares with the others, about 400 MB for the
#: shipped U-Net over a 736-px window: its activations, a window's reads and post-processing;
#: benchmarks/README.md, "Network streams"); on a GPU each runs a reading or post-processing
#: worker (less). Scaled by the window's area.
SEGMENT_MB_PER_CPU = 500


def segment_mem_mb(wildcards, threads, attempt):
    """8 GB, or more for a job of many CPUs or large tiles (an estimate: the window as the
    shipped model's margin, 112 px a side, makes it)."""
    window = int(config["tiling"]["tile_size"]) + 2 * 112
    per_cpu = SEGMENT_MB_PER_CPU * max(1.0, (window / 736) ** 2)
    return int(max(8000, 2000 + threads * per_cpu)) * attempt


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


def get_slide_jsons(wildcards=None):
    """Every slide's inspection record: the refused slides' errors and the others' warnings."""
    return [f"{RESULTS}/{s}/slide.json" for s in SLIDES.index]


def get_object_histograms(wildcards):
    return expand(f"{RESULTS}/{{slide}}/work/object_histograms.json", slide=ok_slides())


def get_final_outputs(wildcards):
    ok = ok_slides()
    per_slide = ["mask.ome.tif", "tissue.png", "overlay.png", "stats.csv", "objects.csv.gz", "provenance.json"]
    if OUTLINES:
        per_slide.append("outlines.geojson.gz")
    plots = [f"{RESULTS}/report/{f}.svg" for f in ("slides", "object_sizes", "object_shapes", "failed_slides")]
    return [f"{RESULTS}/summary.csv"] + plots + [f"{RESULTS}/{s}/{f}" for s in ok for f in per_slide]


def provenance_records(wildcards):
    """{stage: record} of one slide: the JSON each stage writes with its run block."""
    d = f"{RESULTS}/{wildcards.slide}"
    return {
        "inspect": f"{d}/slide.json",
        "tissue": f"{d}/work/tissue.json",
        "plan": f"{d}/plan.json",
        "segment": f"{d}/work/segment.json",
        "stitch": f"{d}/work/stitch.json",
        "stats": f"{d}/work/stats.json",
        "report_histograms": f"{d}/work/object_histograms.json",  # last in the post group: provenance runs after it
    }


# ------------------------------------------- training and evaluation targets
# Training and evaluation targets (not part of `all`):
#   snakemake train --cores 2        -> results/training/<train.name>/best.pt, metrics.csv, validation.csv (work/: last.pt)
#   snakemake evaluate --cores 2     -> results/evaluation/<set>/<method>/metrics.csv + overlays, comparison.csv
EVAL = config.get("evaluate", {})
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


# ------------------------------------------------- the end of a run: every slide explained
SLIDE_RULES = ("inspect", "tissue", "plan", "segment", "stitch", "stats")  # a slide's steps, in order


def archive_in_run():
    """Whether this run builds the archive's summary (not, e.g., `snakemake train`)."""
    return any(j.rule.name in ("aggregate", "triage") for j in workflow.dag.jobs)


def say(line):
    print(f"wsiseg: {line}", file=sys.stderr)


def unfinished_slides():
    """{slide: (rule, failed, batch)} for the slides this run did not finish: the first step
    of each that failed or never ran; ``batch``: the other slides of the cluster job (a
    group job: tissue + plan of several slides) it failed in."""
    failed, batch = set(), {}
    for j in getattr(workflow.scheduler, "failed", ()):
        members = list(getattr(j, "jobs", [j]))
        failed.update(members)
        slides = {dict(m.wildcards).get("slide") for m in members} - {None}
        for m in members:
            batch[m] = sorted(slides - {dict(m.wildcards).get("slide")})
    out = {}
    for j in list(workflow.dag.needrun_jobs()) + list(failed):
        slide = dict(j.wildcards).get("slide")
        if j.rule.name in SLIDE_RULES and slide in SLIDES.index:
            step = (j.rule.name, j in failed, batch.get(j, []))
            if slide not in out or SLIDE_RULES.index(step[0]) < SLIDE_RULES.index(out[slide][0]):
                out[slide] = step
    return out


def summarise_failed_run():
    """summary.csv after failed jobs (onerror): the finished slides' rows, and for every other
    slide the stage, reason and fix (its failure record, or what Snakemake saw), with the
    same code as the aggregate rule. Its mtime is set before its inputs' and Snakemake's
    record of it dropped, so the next run writes it again whatever happens meanwhile."""
    from wsiseg import aggregate
    from wsiseg.failure import FailureRecord, not_finished, record_path

    agg = [j for j in workflow.dag.jobs if j.rule.name == "aggregate"]
    pending = unfinished_slides()
    triage_pending = any(j.rule.name == "triage" for j in workflow.dag.needrun_jobs())
    if triage_pending or "inspect" in {step for step, _, _ in pending.values()}:
        say(f"{RESULTS}/summary.csv not written: the run stopped before every slide was inspected (see above)")
        return
    if not agg:
        return  # a run for other targets
    failures, stats = [], []
    for s in SLIDES.index:
        if s in pending:
            step, failed, batch = pending[s]
            rec = FailureRecord.find(record_path(f"{RESULTS}/{s}"))
            if rec is None:
                culprits = [m for m in batch if FailureRecord.find(record_path(f"{RESULTS}/{m}"))]
                log = slide_log(step).format(slide=s)
                rec = not_finished(slide=s, stage=step, log=log, failed=failed, batch=culprits)
            failures.append(rec)
        elif os.path.exists(f"{RESULTS}/{s}/stats.csv"):
            stats.append(f"{RESULTS}/{s}/stats.csv")
    jsons = [p for p in get_slide_jsons() if os.path.exists(p)]
    out = f"{RESULTS}/summary.csv"
    aggregate.run(stats_csvs=stats, slide_jsons=jsons, failures=failures, out_csv=out, log=say)
    oldest = min((os.path.getmtime(p) for p in stats + jsons), default=0)
    os.utime(out, (oldest - 1, oldest - 1))
    workflow.persistence.cleanup_metadata(agg[0].output[0])
    say(f"summary written for the slides above: {out}; the same command again retries the others")


onsuccess:
    from wsiseg.runner import end_rescheduling_timers

    end_rescheduling_timers()  # Snakemake's last one kept the process a second longer
    if any(j.rule.name == "aggregate" for j in workflow.dag.finished_jobs):
        from wsiseg.aggregate import outcome

        try:
            lines = outcome(pd.read_csv(f"{RESULTS}/summary.csv", keep_default_na=False))
        except (OSError, ValueError) as exc:  # e.g. --touch over a summary.csv that is not one
            lines = [f"{RESULTS}/summary.csv could not be read: {exc}"]
        for line in lines:
            say(line)


onerror:
    from wsiseg.runner import end_rescheduling_timers

    end_rescheduling_timers()
    if archive_in_run():
        try:
            summarise_failed_run()
        except OSError as exc:
            say(f"{RESULTS}/summary.csv could not be written: {exc}")
