"""Settings of the U-Net's instance post-processing (:mod:`wsiseg.postprocess`), without its
dependencies: the plan stage writes a checkpoint's settings, or these defaults, with the
config's ``model.postprocess`` over them, into plan.json without importing scikit-image."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from .errors import ConfigError


@dataclass
class InstanceParams:
    # defaults: typical of models trained by `snakemake train`; training stores its own choice
    fg_threshold: float = 0.7  # object where P(background) < 1 - fg_threshold
    seed_threshold: float = 0.9  # seed where P(interior) > seed_threshold
    min_seed_um2: float = 2.0
    min_object_um2: float = 6.0

    def as_dict(self) -> dict:
        return asdict(self)


#: the last class of an instance model (``snakemake train``'s three_class target): a 1-px inner rim
BOUNDARY = "boundary"


def is_instance_model(classes) -> bool:
    """Whether ``classes`` are ``[background, <object>, boundary]``: a model whose output is
    post-processed into separated objects (the boundary class is not written to the mask)."""
    return len(classes) == 3 and classes[-1] == BOUNDARY


def param_names() -> tuple:
    return tuple(f.name for f in fields(InstanceParams))


THRESHOLDS = ("fg_threshold", "seed_threshold")  # probabilities: in (0, 1); the rest are areas (µm², >= 0)


def instance_settings(value, classes, stored: dict | None = None) -> dict | None:
    """A model's instance post-processing: None (the mask is the class of highest score) or the
    :class:`InstanceParams` as a dict.

    An instance model (:func:`is_instance_model`, whatever its file format) gets ``stored`` (the
    thresholds ``snakemake train`` chose and kept in its checkpoint), else the defaults;
    ``value`` (``model.postprocess``) overrides any of them, or turns the separation off with
    ``'none'`` (the boundary class is then a class of the mask like any other). ``classes`` None:
    not known yet (checked again when the model is loaded), only ``value`` is checked."""
    if value is None:
        if stored is not None:
            return stored
        return InstanceParams().as_dict() if classes is not None and is_instance_model(classes) else None
    if value == "none":
        return None
    names = param_names()
    fix = f"set model.postprocess to none, or to a mapping of some of {list(names)}, or leave it out"
    if not isinstance(value, dict):
        raise ConfigError(f"model.postprocess must be none or a mapping, got {value!r}. Fix: {fix}")
    unknown = sorted(set(value) - set(names))
    if unknown:
        raise ConfigError(f"model.postprocess has unknown keys {unknown}. Fix: {fix}")
    for key, v in value.items():
        ok = not isinstance(v, bool) and isinstance(v, (int, float))
        ok = ok and (0 < v < 1 if key in THRESHOLDS else v >= 0)
        if not ok:
            what = "a probability between 0 and 1 (exclusive)" if key in THRESHOLDS else "an area in µm² (>= 0)"
            raise ConfigError(f"model.postprocess.{key} must be {what}, got {v!r}. Fix: {fix}")
    if classes is not None and not is_instance_model(classes):
        raise ConfigError(
            f"model.postprocess separates the objects of a model whose classes are [background, <object>, "
            f"{BOUNDARY}]; this model's classes are {list(classes)}. Fix: remove model.postprocess (the mask "
            "is then the class of highest score), or set model.classes if they are wrong"
        )
    params = dict(stored) if stored else InstanceParams().as_dict()
    params.update({k: float(v) for k, v in value.items()})
    return params
