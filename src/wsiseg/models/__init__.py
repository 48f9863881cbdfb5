"""Models: one loader turns the config's ``model:`` block into a :class:`ModelSpec`.

A :class:`ModelSpec` carries what the stages need to know about a model, as data and
methods: classes, mpp, alignment, border, halo, whether it wants a GPU, its per-tile
post-processing, its optional per-slide calibration and how it predicts a labeled
image. The plan, segment and evaluate stages and the Snakemake rules use only that,
never which kind of model it is.

Formats (``model.format``), one module each in this package:

=============  =================================================================
``checkpoint``  the project's U-Net checkpoint (``snakemake train``): :mod:`.checkpoint`
``torchscript`` any TorchScript segmentation network: :mod:`.torchscript`
``classical``   the haematoxylin threshold + watershed model, no weights: :mod:`.classical`
``auto``        ``torchscript`` if the weights file is TorchScript, else ``checkpoint``
=============  =================================================================

Adding a format: a module here with ``load(cfg, device, geometry, network) -> ModelSpec`` (a
subclass of :class:`wsiseg.models.spec.ModelSpec` where the defaults do not fit), one
:class:`Format` entry in :data:`FORMATS`, the name in the schema's ``model.format``
enum (a test checks they agree), and its tests.

This module imports no torch: the Snakefile asks it which files a model reads and
whether it wants a GPU while it builds the DAG.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import zipfile
from dataclasses import dataclass

from ..errors import ConfigError
from ..postparams import instance_settings


@dataclass(frozen=True)
class Format:
    name: str
    module: str  # wsiseg.models.<module>, with load(cfg, device, geometry, network) -> ModelSpec
    weights: bool  # reads the file model.weights (a rule input: new weights rerun plans and masks)
    gpu: bool  # worth a GPU (the classical model runs numpy on the CPU)


STAIN_METHODS = ("none", "reinhard")  # model.stain_normalise (wsiseg.stain)
STAIN_MAX_SCALE = 2.0  # model.stain_max_scale's default: each channel's stretch clamped to [1/2, 2]


FORMATS = {
    "checkpoint": Format("checkpoint", "checkpoint", weights=True, gpu=True),
    "torchscript": Format("torchscript", "torchscript", weights=True, gpu=True),
    "classical": Format("classical", "classical", weights=False, gpu=False),
}


def is_torchscript(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())


def _declared(cfg: dict) -> str:
    name = cfg.get("format", "auto") or "auto"
    if name != "auto" and name not in FORMATS:
        raise ConfigError(f"model.format={name!r} is not a known model format; use one of {['auto', *FORMATS]}")
    return name


def format_of(cfg: dict) -> Format:
    """The model's format; 'auto' looks at the weights file."""
    name = _declared(cfg)
    if name == "auto":
        name = "torchscript" if is_torchscript(cfg["weights"]) else "checkpoint"
    return FORMATS[name]


def weights_of(cfg: dict) -> list:
    """The files the model reads (rule inputs); none for a model without weights."""
    name = _declared(cfg)
    return [cfg["weights"]] if name == "auto" or FORMATS[name].weights else []


def wants_gpu(cfg: dict) -> bool:
    """Whether the model's jobs are worth a GPU (every weights-based format is)."""
    name = _declared(cfg)
    return name == "auto" or FORMATS[name].gpu


def check_weights(cfg: dict) -> None:
    """Refuse weights that no stage could load, in words that name the file and the fix:
    asked once when the workflow starts, before any job runs. The file is not unpickled for
    this: its pickle's opcodes are read, then its metadata without its tensors, and checked
    against the config (:mod:`.weights`; no torch imported where Snakemake runs: it costs
    seconds at every start, and with --use-conda it is not there). Only a file that is not
    a zip archive is handed to torch.load, where torch is installed. A TorchScript file is
    code and is not run here."""
    if not weights_of(cfg):
        return
    path = cfg["weights"]
    fix = "correct model.weights (relative to the folder you run snakemake from, or absolute)"
    if not os.path.exists(path):
        raise ConfigError(f"model.weights {path}: file not found. Fix: {fix}")
    if os.path.isdir(path):
        raise ConfigError(f"model.weights {path} is a folder, not a weights file. Fix: {fix}")
    if format_of(cfg).name != "checkpoint":
        return
    from .weights import check_checkpoint

    if check_checkpoint(cfg):  # read without torch
        return
    if importlib.util.find_spec("torch") is None:  # no torch in Snakemake's environment: the plan stage says it
        return
    from .checkpoint import check

    check(cfg)  # not a zip archive: only torch.load can say what it is


def load_model(cfg: dict, device: str = "cpu", geometry: bool = True, network: bool = True):
    """Load the model described by the config's ``model:`` block, in eval mode.

    ``geometry=False`` skips measuring border and halo (the segment stage reads them
    from the tile plan, which measured them once). ``network=False`` (the plan stage)
    asks for everything but the network: a format that knows its geometry without it
    (a checkpoint: from its metadata, without torch) leaves ``module`` None; the others
    load it as before.
    """
    fmt = format_of(cfg)
    stain = check_stain(cfg)
    loader = importlib.import_module(f"{__name__}.{fmt.module}")
    spec = loader.load(cfg, device=device, geometry=geometry, network=network)
    spec.stain = stain
    spec.postprocess = postprocess_settings(cfg, fmt, spec.classes, spec.postprocess)
    return spec


def postprocess_settings(cfg: dict, fmt: Format, classes, stored: dict | None) -> dict | None:
    """The loaded model's instance post-processing (:func:`wsiseg.postparams.instance_settings`):
    what its file stores (``stored``), else the defaults for a ``[background, <object>, boundary]``
    model of any format, with ``model.postprocess`` over it; refused for a model that is not a
    network (the classical model's settings are ``model.classical``)."""
    value = cfg.get("postprocess")
    if value is not None and not fmt.gpu:
        raise ConfigError(
            f"model.postprocess is for network models; the {fmt.name} model has its own settings "
            f"(model.{fmt.name}). Fix: remove model.postprocess"
        )
    return instance_settings(value, classes, stored)


def check_postprocess(cfg: dict) -> None:
    """``model.postprocess`` checked where Snakemake starts: its values, and against the model's
    classes where they are known without loading it (the config's, or a checkpoint's metadata,
    read without torch). The plan stage checks it again on the loaded model."""
    value = cfg.get("postprocess")
    if value is None:
        return
    name = _declared(cfg)
    if name != "auto" and not FORMATS[name].gpu:
        postprocess_settings(cfg, FORMATS[name], None, None)  # refused: not a network
    classes = cfg.get("classes")
    path = cfg.get("weights")
    if not classes and name in ("auto", "checkpoint") and path and os.path.isfile(path):
        from .weights import read_without_tensors

        try:
            classes = (read_without_tensors(path) or {}).get("classes")
        except ConfigError:
            classes = None  # a file check_weights refuses in its own words
    instance_settings(value, list(classes) if classes else None)


def stain_reference(cfg: dict) -> dict:
    """``model.stain_reference`` checked: {'mean': [L, a, b], 'std': [L, a, b]}."""
    ref = cfg.get("stain_reference")
    fix = (
        "set model.stain_reference: {mean: [L, a, b], std: [L, a, b]}, the CIE-Lab statistics of the "
        "tissue the model was trained on (`python -m wsiseg.stain <training sheet> --mpp <model mpp>` "
        "prints them), or set model.stain_normalise: none"
    )
    if not isinstance(ref, dict) or not all(
        isinstance(ref.get(k), (list, tuple)) and len(ref[k]) == 3 for k in ("mean", "std")
    ):
        raise ConfigError(f"model.stain_normalise: reinhard needs a stain reference. Fix: {fix}")
    if min(float(v) for v in ref["std"]) <= 0:
        raise ConfigError(f"model.stain_reference.std must be positive, got {ref['std']}. Fix: {fix}")
    return dict(mean=[float(v) for v in ref["mean"]], std=[float(v) for v in ref["std"]])


def stain_max_scale(cfg: dict) -> float:
    """``model.stain_max_scale`` checked: a number >= 1 (:data:`STAIN_MAX_SCALE` when absent; 1: the
    tissue's mean is moved to the reference's and its spread kept, a shift without stretch)."""
    v = cfg.get("stain_max_scale", STAIN_MAX_SCALE)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 1:
        raise ConfigError(
            f"model.stain_max_scale must be a number of at least 1 (each channel's stretch is clamped to "
            f"[1/it, it]; 1 moves the colour's mean only), got {v!r}. Fix: set it to {STAIN_MAX_SCALE:g} "
            "or 1, or leave it out"
        )
    return float(v)


def stain_settings(cfg: dict) -> dict | None:
    """The model block's stain normalisation: None (off) or {'method', 'reference', 'max_scale'}."""
    method = cfg.get("stain_normalise") or "none"
    if method not in STAIN_METHODS:
        raise ConfigError(f"model.stain_normalise={method!r}; use one of {list(STAIN_METHODS)}")
    if method == "none":
        return None
    return dict(method=method, reference=stain_reference(cfg), max_scale=stain_max_scale(cfg))


def check_stain(cfg: dict) -> dict | None:
    """``model.stain_normalise`` / ``model.stain_reference`` checked (None: off); refused for a
    model that is not a network (the classical model sets its threshold per slide already)."""
    stain = stain_settings(cfg)
    if stain is not None and not FORMATS[format_of(cfg).name].gpu:
        raise ConfigError(
            "model.stain_normalise is for network models; the classical model measures its haematoxylin "
            "threshold per slide already. Fix: set model.stain_normalise: none"
        )
    return stain
