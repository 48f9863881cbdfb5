rule inspect:
    """Open the slide, check its mpp and pixels. Bad slides are recorded, not fatal:
    they appear in summary.csv with their error and the rest of the batch goes on."""
    input:
        get_inspect_input,
    output:
        f"{RESULTS}/{{slide}}/slide.json",
    params:
        path=get_slide_path,
        mpp=get_slide_mpp,
    log:
        f"{LOGS}/{{slide}}/inspect.log",
    conda:
        "../../envs/wsi.yaml"
    script:
        "../../scripts/inspect_slide.py"


checkpoint triage:
    """One table of every slide's status; the DAG past this point has only good slides."""
    input:
        expand(f"{RESULTS}/{{slide}}/slide.json", slide=SLIDES.index),
    output:
        f"{RESULTS}/slides.tsv",
    log:
        f"{LOGS}/triage.log",
    conda:
        "../../envs/wsi.yaml"
    script:
        "../../scripts/triage.py"


rule tissue:
    input:
        slide=get_slide_path,
        info=f"{RESULTS}/{{slide}}/slide.json",
    output:
        png=report(
            f"{RESULTS}/{{slide}}/tissue.png",
            caption="../report/tissue.rst",
            category="Tissue",
            labels={"slide": "{slide}"},
        ),
        thumb=f"{RESULTS}/{{slide}}/work/thumbnail.png",
        json=f"{RESULTS}/{{slide}}/work/tissue.json",
    params:
        mpp=get_slide_mpp,
        cfg=config["tissue"],
    log:
        f"{LOGS}/{{slide}}/tissue.log",
    benchmark:
        f"{BENCH}/{{slide}}/tissue.tsv"
    group:
        "prep"  # one cluster job per slide for tissue + plan (see README, "On a SLURM cluster")
    resources:
        mem_mb=tissue_mem_mb,
        runtime=lambda wildcards, attempt: 10 * attempt,
    conda:
        "../../envs/wsi.yaml"
    script:
        "../../scripts/tissue.py"
