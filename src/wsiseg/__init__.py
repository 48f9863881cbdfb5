"""wsiseg: whole-slide image segmentation with a U-Net, one module per workflow stage.

Stages (each a module named after its rule, each unit-tested without Snakemake):
    triage    -- inspect each slide (slide.json), one status table for the archive
    tissue    -- tissue mask from a low-resolution level
    plan      -- tile plan at the model's mpp (read window vs write region)
    segment   -- streamed inference over the tile plan into a tile store
    stitch    -- pyramidal OME-TIFF mask and overlay, written streaming
    stats     -- per-slide statistics, objects table and outlines
    aggregate -- archive summary
    evaluate, metrics, train -- the evaluate and train targets
Shared: slide (reading), geometry (coordinate planes, resampled reads), tiling (grid, margin,
the plan artefact), models (model formats -> ModelSpec), unet (the architecture), mask (the
mask artefact), objects (border-aware object counting), store, labels, postprocess.
The layout is in README.md ("Layout"); tests/test_layout.py checks there is no import cycle.
"""

__version__ = "0.1.0"
