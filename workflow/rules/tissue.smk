rule tissue:
    input:
        slide=get_slide_input,  # the example slide only: others are read by params.path
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
        slide_log("tissue"),
    benchmark:
        slide_benchmark("tissue")
    group:
        "prep"  # one cluster job per slide for tissue + plan (see README, "On a SLURM cluster")
    conda:
        "../../envs/wsi.yaml"
    resources:
        mem_mb=tissue_mem_mb,
        runtime=lambda wildcards, attempt: 10 * attempt,
    params:
        path=get_slide_path,
        mpp=get_slide_mpp,
        cfg=settings("tissue", TISSUE_KEYS),  # not clip_mask: the segment step applies it
    script:
        "../../scripts/tissue.py"
