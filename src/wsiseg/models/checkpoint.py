"""Format 'checkpoint': the project's U-Net (:class:`wsiseg.unet.UNet`) as ``snakemake train``
saves it.

A checkpoint is a plain dict read with ``torch.load(weights_only=True)``: data, never
code. It embeds what inference needs (architecture, classes, mpp, and the instance
post-processing chosen on the validation images), so ``model:`` needs only ``weights``.

The plan stage needs none of the tensors: ``load(..., network=False)`` reads the
checkpoint's metadata without torch (:mod:`.weights`) and the U-Net's sizes by arithmetic
(:mod:`wsiseg.unet_sizes`); torch is imported by what builds, loads or saves a network.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import pickle
import re
import tokenize
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import unet_sizes
from ..content import file_sha256 as sha256
from ..errors import ConfigError
from ..postparams import InstanceParams, is_instance_model
from .probe import cached, measure_halo
from .spec import ModelSpec
from .weights import (
    CHECKPOINT_FORMAT,
    WEIGHTS_FIX,
    check_format,
    read_without_tensors,
    refused_pickle,
    resolve,
)

if TYPE_CHECKING:
    from ..unet import UNet


def save_checkpoint(path: str, model: UNet, classes, mpp: float, name: str, extra: dict | None = None) -> None:
    """Checkpoint that embeds what inference needs (architecture, classes, mpp); atomic."""
    import torch

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
    """The project's U-Net: its input/output sizes are known analytically, from its depth
    (``align`` is 2**depth) and padding (``border`` 0: 'same'), with or without the network."""

    def output_size(self, n: int) -> int | None:
        padding = "same" if self.border == 0 else "valid"
        return unet_sizes.output_size(n, self.align.bit_length() - 1, padding)


@functools.cache
def unet_same_halo(depth: int) -> int:
    """Receptive-field radius (px) of a 'same' U-Net of this depth, measured exactly.

    Measured on a structural copy with positive weights, so no ReLU is dead and every
    pixel that *can* influence the centre does; once per depth and version of the U-Net's
    code (kept in ``$WSISEG_CACHE``, :func:`wsiseg.models.probe.cached`), as the probe
    takes seconds to minutes of CPU in every plan job otherwise.
    """

    def measure() -> dict:
        import torch

        from ..unet import UNet

        probe = UNet(n_classes=1, depth=depth, base_width=2, padding="same", batch_norm=False)
        with torch.no_grad():
            for p in probe.parameters():
                p.fill_(0.1)
        return dict(depth=depth, halo=measure_halo(probe, 2**depth, 0, positive=False))

    code = unet_code_key()
    if code is None:  # no source to key the cache on: measure
        return int(measure()["halo"])
    return int(cached(f"unet-same-halo-depth{depth}-{code}", measure, ("halo",))["halo"])


def unet_code_key() -> str | None:
    """The version of the U-Net's code that :func:`unet_same_halo` keys its cache on, read off
    wsiseg/unet.py without importing it (and torch): :func:`source_key`."""
    try:
        spec = importlib.util.find_spec("wsiseg.unet")
    except (ImportError, ValueError):
        return None
    return source_key(spec.origin if spec else None)


def source_key(path: str | None) -> str | None:
    """sha256 (16 hex digits) of a module's source as ``inspect.getsource(module)`` gives it
    (decoded as its coding cookie says, universal newlines, a newline after the last line),
    from the file ``path``; None where there is no source to read."""
    if not path or not path.endswith(".py"):
        return None
    try:
        with tokenize.open(path) as fh:
            text = fh.read()
    except (OSError, SyntaxError, ValueError):
        return None
    if not text:
        return None
    if not text.endswith("\n"):
        text += "\n"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _load_data(path: str, device: str):
    """torch.load as data only, with its failures said in our words (torch's own advice for
    a refused pickle is to load it as code, which is never what to do with weights)."""
    import torch

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


def load(cfg: dict, device: str = "cpu", geometry: bool = True, network: bool = True) -> UNetSpec:
    """The checkpoint's embedded architecture, classes and mpp are used unless the config
    gives them; a conflict is an error.

    ``network=False`` (the plan stage): everything but the network (``module`` None), from
    the checkpoint's metadata, without torch unless the file is not a zip archive.
    """
    path = cfg["weights"]
    checksum = sha256(path)
    ckpt = None if network else read_without_tensors(path)  # None: not a zip archive, torch.load reads it
    if ckpt is None:
        ckpt = read(path, device)
    arch, classes, mpp = resolve(cfg, ckpt, path)
    module = None
    if network:
        from ..unet import UNet

        module = UNet(**arch)
        try:
            module.load_state_dict(ckpt["state_dict"])
        except RuntimeError as exc:  # weights of another architecture than the one the file names
            first = next((ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()), str(exc))
            raise ConfigError(
                f"model.weights {path}: its weights do not fit the U-Net it names ({arch}): {first}. Fix: {WEIGHTS_FIX}"
            ) from None
        module.to(device).eval()
    depth, padding = arch.get("depth", unet_sizes.DEPTH), arch.get("padding", unet_sizes.PADDING)
    unet_sizes.check_padding(padding)
    border = unet_sizes.border(depth, padding)
    halo = border if padding == "valid" else (unet_same_halo(depth) if geometry else None)
    post = None
    if is_instance_model(classes):  # background / object / boundary: the thresholds training chose
        post = (ckpt.get("extra") or {}).get("postprocess") or InstanceParams().as_dict()
    return UNetSpec(module, classes, mpp, cfg["name"], checksum, "unet", 2**depth, border, halo, post)
