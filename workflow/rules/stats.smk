rule stats:
    input:
        mask=f"{RESULTS}/{{slide}}/mask.ome.tif",
        slide=get_slide_input,  # the example slide only: others are read by params.path (the objects' colour)
        slide_json=f"{RESULTS}/{{slide}}/slide.json",
        tissue_json=f"{RESULTS}/{{slide}}/work/tissue.json",
        plan_json=f"{RESULTS}/{{slide}}/plan.json",
        timings=[f"{RESULTS}/{{slide}}/work/segment.json", f"{RESULTS}/{{slide}}/work/stitch.json"],
    output:
        **stats_outputs(),
    log:
        slide_log("stats"),
    benchmark:
        slide_benchmark("stats")
    group:
        "post"
    conda:
        "../../envs/wsi.yaml"
    resources:
        mem_mb=lambda wildcards, attempt: 2000 * attempt,
        runtime=stats_runtime,  # minutes, from the mask's size (the outlines' worst case)
    params:
        classes=config["model"].get("classes", []),
        path=get_slide_path,
        mpp=get_slide_mpp,
    script:
        "../../scripts/stats.py"


rule aggregate:
    input:
        stats=get_stats,
        slides=get_slide_jsons(),
    output:
        report(f"{RESULTS}/summary.csv", caption="../report/summary.rst", category="Summary"),
    log:
        f"{LOGS}/aggregate.log",
    conda:
        "../../envs/wsi.yaml"
    script:
        "../../scripts/aggregate.py"
