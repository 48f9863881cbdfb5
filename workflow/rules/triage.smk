rule inspect:
    """Open the slide, check its mpp and pixels. Bad slides are recorded, not fatal:
    they appear in summary.csv with their error and the rest of the batch goes on."""
    input:
        get_inspect_input,
    output:
        f"{RESULTS}/{{slide}}/slide.json",
    log:
        f"{LOGS}/{{slide}}/inspect.log",
    conda:
        "../../envs/wsi.yaml"
    params:
        path=get_slide_path,
        mpp=get_slide_mpp,
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
