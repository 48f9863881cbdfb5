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
    log:
        f"{LOGS}/{{slide}}/tissue.log",
    benchmark:
        f"{BENCH}/{{slide}}/tissue.tsv"
    group:
        "prep"  # one cluster job per slide for tissue + plan (see README, "On a SLURM cluster")
    conda:
        "../../envs/wsi.yaml"
    resources:
        mem_mb=tissue_mem_mb,
        runtime=lambda wildcards, attempt: 10 * attempt,
    params:
        mpp=get_slide_mpp,
        cfg=config["tissue"],
    script:
        "../../scripts/tissue.py"
