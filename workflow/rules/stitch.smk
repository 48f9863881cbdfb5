rule stitch:
    """Pyramidal tiled OME-TIFF mask (streamed) and an overlay thumbnail."""
    input:
        store=f"{RESULTS}/{{slide}}/work/labels.store",
        plan_json=f"{RESULTS}/{{slide}}/plan.json",
        thumb=f"{RESULTS}/{{slide}}/work/thumbnail.png",
        tissue=f"{RESULTS}/{{slide}}/tissue.png",
    output:
        mask=f"{RESULTS}/{{slide}}/mask.ome.tif",
        overlay=report(
            f"{RESULTS}/{{slide}}/overlay.png",
            caption="../report/overlay.rst",
            category="Overlays",
            labels={"slide": "{slide}"},
        ),
        json=f"{RESULTS}/{{slide}}/work/stitch.json",
    log:
        slide_log("stitch"),
    benchmark:
        slide_benchmark("stitch")
    group:
        "post"  # one cluster job per slide for stitch + stats
    conda:
        "../../envs/wsi.yaml"
    resources:
        mem_mb=lambda wildcards, attempt: 2000 * attempt,
        runtime=mask_runtime,  # minutes, from the mask's size
    params:
        cfg=config["stitch"],
    script:
        "../../scripts/stitch.py"
