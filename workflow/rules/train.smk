rule train:
    input:
        sheet=get_train_sheet,
        init=lambda w: [TRAIN["init"]] if TRAIN.get("init") else [],  # fine-tuning: new weights retrain
    output:
        best=f"{TRAIN_DIR}/best.pt",
        metrics=report(f"{TRAIN_DIR}/metrics.csv", caption="../report/train.rst", category="Training"),
        validation=report(f"{TRAIN_DIR}/validation.csv", caption="../report/validation.rst", category="Training"),
    log:
        f"{config['results']}/logs/training/{TRAIN.get('name', 'unet')}.log",
    benchmark:
        f"{config['results']}/benchmarks/training/{TRAIN.get('name', 'unet')}.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: max(1, int(TRAIN.get("threads", 0) or 2))
    resources:
        gpu=lambda wildcards: gpu_request(TRAIN.get("device", "auto")),
        mem_mb=8000,
    params:
        cfg={k: v for k, v in TRAIN.items() if k != "sheet"},
        # best.pt, last.pt and metrics.csv are written here while training runs; Snakemake
        # never deletes this folder, so an interrupted run resumes from last.pt
        work_dir=f"{TRAIN_DIR}/work",
        resume=TRAIN.get("resume", True),
    script:
        "../../scripts/train.py"


rule evaluate_set:
    input:
        sheet=get_eval_sheet,
        weights=lambda w: [] if w.method == "classical-baseline" else get_model_weights(),
    output:
        metrics=f"{EVAL_DIR}/{{set}}/{{method}}/metrics.csv",
        overlays=directory(f"{EVAL_DIR}/{{set}}/{{method}}/overlays"),
    log:
        f"{config['results']}/logs/evaluation/{{set}}/{{method}}.log",
    benchmark:
        f"{config['results']}/benchmarks/evaluation/{{set}}/{{method}}.tsv"
    conda:
        "../../envs/torch.yaml"
    resources:
        gpu=lambda w: 0 if w.method == "classical-baseline" else segment_resources_gpu(w),
    params:
        tta=EVAL.get("tta", True),
        device=config.get("device", "auto"),
        model=lambda w: {} if w.method == "classical-baseline" else model_cfg(tta=False),  # evaluate.tta decides
        weights_sha256=lambda w: [] if w.method == "classical-baseline" else weights_sha256(),
    script:
        "../../scripts/evaluate.py"


rule evaluate:
    input:
        lambda w: expand(f"{EVAL_DIR}/{{set}}/{{method}}/metrics.csv", set=eval_sets(), method=eval_methods()),
    output:
        report(f"{EVAL_DIR}/comparison.csv", caption="../report/evaluation.rst", category="Evaluation"),
    log:
        f"{config['results']}/logs/evaluation/comparison.log",
    conda:
        "../../envs/wsi.yaml"
    script:
        "../../scripts/compare.py"
