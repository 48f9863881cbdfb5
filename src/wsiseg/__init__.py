"""wsiseg: whole-slide image segmentation with a U-Net, one module per workflow stage.

Stages (each a module, each unit-tested without Snakemake):
    slide    -- open any slide (OpenSlide, tifffile fallback), mpp, region reads
    tissue   -- tissue mask from a low-resolution level
    tiling   -- tile plan at the model's mpp (read window vs write region)
    unet     -- the project's U-Net, model loading, receptive-field halo
    segment  -- streamed inference over the tile plan into a tile store
    store    -- chunked on-disk label store (segment -> stitch)
    stitch   -- pyramidal OME-TIFF mask and overlay, written streaming
    stats    -- per-slide statistics, border-aware object counting
    aggregate-- archive summary
"""

__version__ = "0.1.0"
