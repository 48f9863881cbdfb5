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


rule train:
    input:
        sheet=get_train_sheet,
        init=lambda w: [TRAIN["init"]] if TRAIN.get("init") else [],  # fine-tuning: new weights retrain
    output:
        best=f"{TRAIN_DIR}/best.pt",
        metrics=report(f"{TRAIN_DIR}/metrics.csv", caption="../report/train.rst", category="Training"),
        validation=report(f"{TRAIN_DIR}/validation.csv", caption="../report/validation.rst", category="Training"),
    params:
        cfg={k: v for k, v in TRAIN.items() if k != "sheet"},
        # best.pt, last.pt and metrics.csv are written here while training runs; Snakemake
        # never deletes this folder, so an interrupted run resumes from last.pt
        work_dir=f"{TRAIN_DIR}/work",
        resume=TRAIN.get("resume", True),
    log:
        f"logs/training/{TRAIN.get('name', 'unet')}.log",
    benchmark:
        f"benchmarks/training/{TRAIN.get('name', 'unet')}.tsv"
    threads: max(1, int(TRAIN.get("threads", 0) or 2))
    resources:
        gpu=lambda wildcards: gpu_request(TRAIN.get("device", "auto")),
        mem_mb=8000,
    conda:
        "../../envs/torch.yaml"
    script:
        "../../scripts/train.py"


rule evaluate_set:
    input:
        sheet=get_eval_sheet,
        weights=lambda w: [] if w.method == "classical-baseline" else get_model_weights(),
    output:
        metrics=f"{EVAL_DIR}/{{set}}/{{method}}/metrics.csv",
        overlays=directory(f"{EVAL_DIR}/{{set}}/{{method}}/overlays"),
    params:
        tta=EVAL.get("tta", True),
        device=config.get("device", "auto"),
        model=lambda w: {} if w.method == "classical-baseline" else model_cfg(tta=False),  # evaluate.tta decides
    resources:
        gpu=lambda w: 0 if w.method == "classical-baseline" else segment_resources_gpu(w),
    log:
        f"logs/evaluation/{{set}}/{{method}}.log",
    benchmark:
        f"benchmarks/evaluation/{{set}}/{{method}}.tsv"
    conda:
        "../../envs/torch.yaml"
    script:
        "../../scripts/evaluate.py"


rule evaluate:
    input:
        lambda w: expand(f"{EVAL_DIR}/{{set}}/{{method}}/metrics.csv", set=list(EVAL.get("sets", {})), method=eval_methods()),
    output:
        report(f"{EVAL_DIR}/comparison.csv", caption="../report/evaluation.rst", category="Evaluation"),
    log:
        "logs/evaluation/comparison.log",
    conda:
        "../../envs/wsi.yaml"
    script:
        "../../scripts/compare.py"
