"""Format 'torchscript': any segmentation network saved with ``torch.jit.save``.

TorchScript is code: loading one runs it (its ``forward`` is executed to measure its
border and halo). Use only TorchScript files from a source you trust. The model's
classes and mpp come from the config (``model.classes``, ``model.mpp``); ``model.depth``
(default 4) sets the tile alignment 2**depth.

Border and halo are measured once per weights file (by its sha256) and kept in
``$WSISEG_CACHE`` (default ``~/.cache/wsiseg``), so the plan stage of every further
slide reads them instead of probing the network by gradients again (14 s on CPU for
a depth-4 U-Net). So is the output side of each window size the tiler asks about: the
plan stage of a further slide (``network=False``) then needs neither the network nor
torch (3 s of every plan job on CPU); only a size not asked about before loads the file
to probe it. A cache that cannot be written is only a cost, never an error.
"""

from __future__ import annotations

from dataclasses import dataclass

from .checkpoint import sha256
from .probe import cached, measure_border, measure_halo, probe
from .spec import ModelSpec


@dataclass
class TorchScriptSpec(ModelSpec):
    """A TorchScript model; with ``network=False`` its file is loaded only when a measurement
    it needs is not in the cache yet."""

    path: str = ""

    def network(self, device: str = "cpu"):
        """The TorchScript module (loaded on ``device``, with torch, the first time it is needed)."""
        if self.module is None:
            import torch

            self.module = torch.jit.load(self.path, map_location=device).eval()
        return self.module

    def output_size(self, n: int) -> int | None:
        """Output side for input side ``n`` (None: not a legal input), probed once per file and size."""
        out = cached(f"torchscript-{self.checksum}-input{n}", lambda: dict(out=probe(self.network(), n)), ("out",))
        return out["out"] if out["out"] == n - 2 * self.border else None


def load(cfg: dict, device: str = "cpu", geometry: bool = True, network: bool = True) -> ModelSpec:
    path = cfg["weights"]
    checksum = sha256(path)
    align = 2 ** int(cfg.get("depth", 4))
    spec = TorchScriptSpec(
        None,
        list(cfg["classes"]),
        float(cfg["mpp"]),
        cfg["name"],
        checksum,
        "torchscript",
        align,
        None,
        None,
        path=path,
    )
    if network:
        spec.network(device)
    if geometry:
        spec.border, spec.halo = measured_geometry(spec)
    return spec


def measured_geometry(spec: TorchScriptSpec) -> tuple[int, int]:
    """(border, halo) of a TorchScript network: from the cache when this file was measured before."""
    checksum, align = spec.checksum, spec.align

    def measure() -> dict:
        module = spec.network()
        border = measure_border(module, align)
        return dict(sha256=checksum, align=align, border=border, halo=measure_halo(module, align, border))

    d = cached(f"torchscript-{checksum}-align{align}", measure, ("border", "halo"))
    return int(d["border"]), int(d["halo"])
