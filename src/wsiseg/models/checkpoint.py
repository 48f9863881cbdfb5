"""Format 'checkpoint': the project's U-Net (:class:`wsiseg.unet.UNet`) as ``snakemake train``
saves it.

A checkpoint is a plain dict read with ``torch.load(weights_only=True)``: data, never
code. It embeds what inference needs (architecture, classes, mpp, and the instance
post-processing chosen on the validation images), so ``model:`` needs only ``weights``.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import os
import pickle
import re
from dataclasses import dataclass

import torch

from .. import unet
from ..content import file_sha256 as sha256
from ..errors import ConfigError
from ..unet import UNet
from .probe import cached, measure_halo
from .spec import ModelSpec
from .weights import CHECKPOINT_FORMAT, WEIGHTS_FIX, check_format, refused_pickle, resolve


def save_checkpoint(path: str, model: UNet, classes, mpp: float, name: str, extra: dict | None = None) -> None:
    """Checkpoint that embeds what inference needs (architecture, classes, mpp); atomic."""
    ckpt = dict(
        format=CHECKPOINT_FORMAT,
        name=name,
        classes=list(classes),
        mpp=float(mpp),
        config=model.config,
        state_dict=model.state_dict(),
        extra=extra or {},
    )
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


@dataclass
class UNetSpec(ModelSpec):
    """The project's U-Net: its input/output sizes are known analytically."""

    def output_size(self, n: int) -> int | None:
        return self.module.output_size(n)


@functools.cache
def unet_same_halo(depth: int) -> int:
    """Receptive-field radius (px) of a 'same' U-Net of this depth, measured exactly.

    Measured on a structural copy with positive weights, so no ReLU is dead and every
    pixel that *can* influence the centre does; once per depth and version of the U-Net's
    code (kept in ``$WSISEG_CACHE``, :func:`wsiseg.models.probe.cached`), as the probe
    takes seconds to minutes of CPU in every plan job otherwise.
    """

    def measure() -> dict:
        probe = UNet(n_classes=1, depth=depth, base_width=2, padding="same", batch_norm=False)
        with torch.no_grad():
            for p in probe.parameters():
                p.fill_(0.1)
        return dict(depth=depth, halo=measure_halo(probe, 2**depth, 0, positive=False))

    try:
        code = hashlib.sha256(inspect.getsource(unet).encode()).hexdigest()[:16]
    except (OSError, TypeError):  # no source to key the cache on: measure
        return int(measure()["halo"])
    return int(cached(f"unet-same-halo-depth{depth}-{code}", measure, ("halo",))["halo"])


def _first_legal(module: UNet) -> int:
    n = 1
    while module.output_size(n) is None:
        n += 1
    return n


def _load_data(path: str, device: str):
    """torch.load as data only, with its failures said in our words (torch's own advice for
    a refused pickle is to load it as code, which is never what to do with weights)."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        m = re.search(r"GLOBAL (\S+)", str(exc))
        what = f"calls {m.group(1)} when unpickled" if m else "holds Python objects other than tensors and numbers"
        raise refused_pickle(path, what) from None
    except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        raise ConfigError(
            f"model.weights {path} cannot be read: {exc.strerror}. Fix: correct model.weights, or let the "
            "user running the workflow read the file"
        ) from None
    except (EOFError, RuntimeError, KeyError, ValueError, IndexError, OSError) as exc:
        size = os.path.getsize(path)
        if size == 0:
            problem = "is empty (0 bytes): an interrupted copy or download?"
        else:
            detail = str(exc).split(". ")[0] or type(exc).__name__
            problem = f"is not a PyTorch checkpoint, or it is damaged or truncated ({size} bytes; {detail})"
        raise ConfigError(
            f"model.weights {path} {problem}. Fix: copy it again from its source, or {WEIGHTS_FIX}"
        ) from None


def read(path: str, device: str = "cpu") -> dict:
    """The checkpoint dict, checked to be one of ours."""
    return check_format(_load_data(path, device), path)


def check(cfg: dict) -> None:
    """What :func:`load` would refuse, by torch.load, for a file that is not a zip archive
    (:func:`wsiseg.models.weights.check_checkpoint` reads the others without torch)."""
    resolve(cfg, read(cfg["weights"]), cfg["weights"])


def load(cfg: dict, device: str = "cpu", geometry: bool = True) -> UNetSpec:
    """The checkpoint's embedded architecture, classes and mpp are used unless the config
    gives them; a conflict is an error."""
    path = cfg["weights"]
    checksum = sha256(path)
    ckpt = read(path, device)
    arch, classes, mpp = resolve(cfg, ckpt, path)
    module = UNet(**arch)
    module.load_state_dict(ckpt["state_dict"])
    module.to(device).eval()
    align = 2**module.depth
    first = _first_legal(module)
    border = 0 if module.padding == "same" else (first - module.output_size(first)) // 2
    halo = border if module.padding == "valid" else (unet_same_halo(module.depth) if geometry else None)
    post = None
    if len(classes) == 3 and classes[-1] == "boundary":  # background / object / boundary model
        from ..postprocess import InstanceParams

        post = (ckpt.get("extra") or {}).get("postprocess") or InstanceParams().as_dict()
    return UNetSpec(module, classes, mpp, cfg["name"], checksum, "unet", align, border, halo, post)
