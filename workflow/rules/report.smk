rule report_histograms:
    """Size and shape histograms of one slide's objects (fixed bins, read in chunks), summed by report_plots."""
    input:
        objects=f"{RESULTS}/{{slide}}/objects.csv.gz",
    output:
        json=f"{RESULTS}/{{slide}}/work/object_histograms.json",  # with the step's run block (provenance.json)
    log:
        slide_log("report_histograms"),
    group:
        "post"  # with stitch + stats: no job of its own on a cluster
    conda:
        "../../envs/wsi.yaml"
    resources:
        mem_mb=lambda wildcards, attempt: 1000 * attempt,  # one chunk of the table
        runtime=mask_runtime,  # minutes: as stitch, from the mask's size (objects grow with it)
    script:
        "../../scripts/report_histograms.py"


rule report_plots:
    """The archive's figures for `snakemake --report report.html`."""
    input:
        summary=f"{RESULTS}/summary.csv",
        histograms=get_object_histograms,
    output:
        slides=report(
            f"{RESULTS}/report/slides.svg",
            caption="../report/slides.rst",
            category="Archive plots",
            labels={"figure": "objects per slide"},
        ),
        sizes=report(
            f"{RESULTS}/report/object_sizes.svg",
            caption="../report/object_sizes.rst",
            category="Archive plots",
            labels={"figure": "object sizes"},
        ),
        shapes=report(
            f"{RESULTS}/report/object_shapes.svg",
            caption="../report/object_shapes.rst",
            category="Archive plots",
            labels={"figure": "object shapes"},
        ),
        failed=report(
            f"{RESULTS}/report/failed_slides.svg",
            caption="../report/failed_slides.rst",
            category="Archive plots",
            labels={"figure": "failed slides"},
        ),
    log:
        f"{LOGS}/report_plots.log",
    conda:
        "../../envs/wsi.yaml"
    script:
        "../../scripts/report_plots.py"
