rule plan:
    """Tile plan at the model's mpp: a small table, no patch images."""
    input:
        slide=get_slide_input,  # the example slide only: others are read by params.path
        tissue=f"{RESULTS}/{{slide}}/tissue.png",
        tissue_json=f"{RESULTS}/{{slide}}/work/tissue.json",
        weights=get_model_weights,
    output:
        tsv=f"{RESULTS}/{{slide}}/plan.tsv",
        json=f"{RESULTS}/{{slide}}/plan.json",
    log:
        slide_log("plan"),
    group:
        "prep"
    conda:
        "../../envs/torch.yaml"
    resources:
        mem_mb=lambda wildcards, attempt: 2000 * attempt,
        runtime=lambda wildcards, attempt: 10 * attempt,
    params:
        path=get_slide_path,
        mpp=get_slide_mpp,
        model=model_cfg(tta=False),
        tiling=settings("tiling", PLAN_TILING_KEYS),
        weights_sha256=weights_sha256(),
    script:
        "../../scripts/plan.py"
