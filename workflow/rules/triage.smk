rule inspect:
    """Open the slide, check its mpp and pixels. Bad slides are recorded, not fatal:
    they appear in summary.csv with their error and the rest of the batch goes on."""
    input:
        get_slide_input,  # none but the example slide: a missing or unreadable file is recorded, not fatal
    output:
        f"{RESULTS}/{{slide}}/slide.json",
    log:
        slide_log("inspect"),
    conda:
        "../../envs/wsi.yaml"
    params:
        path=get_slide_path,
        mpp=get_slide_mpp,
        fingerprint=get_slide_fingerprint,  # the slide's content: replaced -> rerun, touched -> not
    script:
        "../../scripts/inspect_slide.py"


checkpoint triage:
    """One table of every slide's status; the DAG past this point has only good slides."""
    input:
        get_slide_jsons(),
    output:
        f"{RESULTS}/slides.tsv",
    log:
        f"{LOGS}/triage.log",
    conda:
        "../../envs/wsi.yaml"
    script:
        "../../scripts/triage.py"
