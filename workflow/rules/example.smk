rule example_slide:
    """The bundled example: a synthetic H&E-like pyramidal slide made by the project."""
    output:
        EXAMPLE_SLIDE,
    log:
        "logs/example_slide.log",
    conda:
        "../../envs/wsi.yaml"
    script:
        "../../scripts/make_example_slide.py"
