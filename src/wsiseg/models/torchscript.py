"""Format 'torchscript': any segmentation network saved with ``torch.jit.save``.

TorchScript is code: loading one runs it (its ``forward`` is executed to measure its
border and halo). Use only TorchScript files from a source you trust. The model's
classes and mpp come from the config (``model.classes``, ``model.mpp``); ``model.depth``
(default 4) sets the tile alignment 2**depth.
"""

from __future__ import annotations

import torch

from .checkpoint import sha256
from .probe import measure_border, measure_halo
from .spec import ModelSpec


def load(cfg: dict, device: str = "cpu", geometry: bool = True) -> ModelSpec:
    path = cfg["weights"]
    checksum = sha256(path)
    module = torch.jit.load(path, map_location=device).eval()
    align = 2 ** int(cfg.get("depth", 4))
    border = measure_border(module, align) if geometry else None
    halo = measure_halo(module, align, border) if geometry else None
    return ModelSpec(module, list(cfg["classes"]), float(cfg["mpp"]), cfg["name"], checksum, "torchscript",
                     align, border, halo)
