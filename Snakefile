# wsiseg: U-Net segmentation of whole-slide images, slide archive in, masks and statistics out.
# Run:  snakemake --cores 16 --use-conda         (see README.md)
from snakemake.utils import min_version

min_version("8.0")


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/example.smk"
include: "workflow/rules/triage.smk"
include: "workflow/rules/tissue.smk"
include: "workflow/rules/plan.smk"
include: "workflow/rules/segment.smk"
include: "workflow/rules/stitch.smk"
include: "workflow/rules/stats.smk"
include: "workflow/rules/provenance.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/train.smk"


localrules:
    all,
    example_slide,
    inspect,
    triage,
    aggregate,
    report_plots,
    evaluate,


rule all:
    input:
        get_final_outputs,
