rule provenance:
    """What made the slide's results: each stage's run record in one provenance.json. Its inputs
    are the records, so a rerun that changes nothing leaves it as it is."""
    input:
        unpack(provenance_records),
    output:
        f"{RESULTS}/{{slide}}/provenance.json",
    log:
        slide_log("provenance"),
    group:
        "post"  # with stitch + stats: no job of its own on a cluster; runs last there (its inputs)
    conda:
        "../../envs/wsi.yaml"
    resources:
        mem_mb=lambda wildcards, attempt: 500 * attempt,
        runtime=lambda wildcards, attempt: 5 * attempt,
    script:
        "../../scripts/provenance.py"
