"""Format 'torchscript': any segmentation network saved with ``torch.jit.save``.

TorchScript is code: loading one runs it (its ``forward`` is executed to measure its
border and halo). Use only TorchScript files from a source you trust. The model's
classes and mpp come from the config (``model.classes``, ``model.mpp``); ``model.depth``
(default 4) sets the tile alignment 2**depth.

Border and halo are measured once per weights file (by its sha256) and kept in
``$WSISEG_CACHE`` (default ``~/.cache/wsiseg``), so the plan stage of every further
slide reads them instead of probing the network by gradients again (14 s on CPU for
a depth-4 U-Net). A cache that cannot be written is only a cost, never an error.
"""

from __future__ import annotations

import torch

from .checkpoint import sha256
from .probe import cached, measure_border, measure_halo
from .spec import ModelSpec


def load(cfg: dict, device: str = "cpu", geometry: bool = True, network: bool = True) -> ModelSpec:
    path = cfg["weights"]
    checksum = sha256(path)
    module = torch.jit.load(path, map_location=device).eval()
    align = 2 ** int(cfg.get("depth", 4))
    border = halo = None
    if geometry:
        border, halo = measured_geometry(module, checksum, align)
    return ModelSpec(
        module, list(cfg["classes"]), float(cfg["mpp"]), cfg["name"], checksum, "torchscript", align, border, halo
    )


def measured_geometry(module, checksum: str, align: int) -> tuple[int, int]:
    """(border, halo) of a TorchScript network: from the cache when this file was measured before."""

    def measure() -> dict:
        border = measure_border(module, align)
        return dict(sha256=checksum, align=align, border=border, halo=measure_halo(module, align, border))

    d = cached(f"torchscript-{checksum}-align{align}", measure, ("border", "halo"))
    return int(d["border"]), int(d["halo"])
