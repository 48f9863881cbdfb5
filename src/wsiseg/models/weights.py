"""What a weights file holds, read without torch and without unpickling it: the opcodes of a
PyTorch checkpoint's pickle name every global it would import, so a file that is not
plain tensors and data (what ``torch.load(weights_only=True)`` refuses) is refused when
the workflow starts, also where Snakemake runs without torch (``--use-conda``). Loading
stays ``weights_only=True`` (:mod:`.checkpoint`): this is the early, clear refusal, not
the protection.

Once the opcodes are known to name nothing but tensors and data, the checkpoint's own
metadata (format, classes, mpp, architecture) is read with an unpickler that builds no
tensor and imports nothing (:func:`read_metadata`), so the config is checked against it
when the workflow starts without importing torch (2.4 s of every Snakemake start-up,
also in each cluster job's own Snakemake). The plan stage reads the same metadata for
the model's geometry (:func:`read_without_tensors`).
"""

from __future__ import annotations

import builtins
import codecs
import collections
import io
import os
import pickle
import zipfile

from ..errors import ConfigError

#: what to use instead of weights that are refused
WEIGHTS_FIX = (
    "point model.weights at a checkpoint written by this workflow (snakemake train, or "
    "wsiseg.models.checkpoint.save_checkpoint), or at a TorchScript file (torch.jit.save) from a source you trust"
)
#: what a PyTorch checkpoint's pickle may name besides torch's own (None: any name of the module);
#: torch.load(weights_only=True) refuses the rest, so check_weights can refuse them first, without torch
_DATA_GLOBALS = {"collections": None, "_codecs": {"encode"}}
_BUILTIN_DATA = {"set", "frozenset", "bytearray", "bytes", "slice", "complex", "int", "float", "bool", "str"}
_BUILTIN_DATA |= {"tuple", "list", "dict"}
_STRINGS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}


#: the checkpoint format that snakemake train writes and the stages read
CHECKPOINT_FORMAT = "wsiseg-unet/1"


def refused_pickle(path: str, what: str) -> ConfigError:
    return ConfigError(
        f"model.weights {path} is refused: the file is a pickle that {what}, so loading it could run code "
        f"hidden in it (weights are read as data only). Fix: {WEIGHTS_FIX}"
    )


def pickle_globals(data: bytes) -> list:
    """(module, name) of every global a pickle would import, read off its opcodes without
    unpickling anything. Protocol 4's STACK_GLOBAL takes the two strings pushed just before
    it (directly or from the memo), so those are followed: the memo's string entries, and
    the strings pushed since the last opcode that pushed anything else."""
    import pickletools

    out, recent, memo, n_memo = [], [], {}, 0
    for op, arg, _ in pickletools.genops(data):
        name = op.name
        if name in _STRINGS:
            recent = [*recent, arg][-2:]
        elif name in ("BINGET", "LONG_BINGET", "GET"):
            recent = [*recent, memo[arg]][-2:] if memo.get(arg) is not None else []
        elif name in ("BINPUT", "LONG_BINPUT", "PUT", "MEMOIZE"):
            key = n_memo if name == "MEMOIZE" else arg
            n_memo += name == "MEMOIZE"
            memo[key] = recent[-1] if recent else None  # what is on top of the stack, if a string
        elif name in ("GLOBAL", "INST"):
            out.append(tuple(arg.split(" ", 1)))
            recent = []
        elif name == "STACK_GLOBAL":
            out.append(tuple(recent) if len(recent) == 2 else ("?", "?"))
            recent = []
        else:
            recent = []
    return out


def _not_data(module: str, name: str) -> bool:
    if module == "torch" or module.startswith("torch."):
        return False
    if module in ("builtins", "__builtin__"):
        return name not in _BUILTIN_DATA
    allowed = _DATA_GLOBALS.get(module, set())
    return allowed is not None and name not in allowed


def _data_pkl(path: str) -> bytes | None:
    """A zip checkpoint's pickle (None: not a zip archive), damage said in our words."""
    if not zipfile.is_zipfile(path):
        return None
    size = os.path.getsize(path)
    damaged = f"model.weights {path} is damaged or truncated ({size} bytes"
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n.endswith("data.pkl")]
            data = zf.read(names[0]) if names else None
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ConfigError(f"{damaged}; {exc}). Fix: copy it again from its source, or {WEIGHTS_FIX}") from None
    if data is None:
        raise ConfigError(f"{damaged}; no data.pkl in it). Fix: {WEIGHTS_FIX}")
    return data


def scan_checkpoint(path: str) -> bytes | None:
    """Without torch: an empty, truncated or non-PyTorch file, or a pickle that names anything
    but tensors and plain data (what torch.load(weights_only=True) would refuse). Returns the
    pickle it scanned (None: not a zip archive)."""
    size = os.path.getsize(path)
    if size == 0:
        raise ConfigError(
            f"model.weights {path} is empty (0 bytes): an interrupted copy or download? Fix: copy it again"
        )
    data = _data_pkl(path)
    if data is None:
        return None  # torch's legacy format, or not PyTorch at all: torch.load says which (checkpoint.read)
    try:
        found = pickle_globals(data)
    except Exception as exc:  # pickletools' own complaints about a broken stream
        raise ConfigError(
            f"model.weights {path} is damaged or truncated ({size} bytes; its pickle: {exc}). "
            "Fix: copy it again from its source"
        ) from None
    bad = [f"{m}.{n}" for m, n in found if _not_data(m, n)]
    if bad:
        raise refused_pickle(path, f"calls {bad[0]} when unpickled")
    return data


def _no_tensor(*args, **kwargs):
    """What every torch global becomes in :class:`_MetadataUnpickler`: tensors read as None."""
    return None


class _MetadataUnpickler(pickle.Unpickler):
    """A checkpoint's pickle with every tensor (and storage, dtype, size) as None: the plain
    data around them. Names only what :func:`scan_checkpoint` lets through; imports nothing."""

    def find_class(self, module, name):
        if module == "torch" or module.startswith("torch."):
            return _no_tensor
        if module in ("builtins", "__builtin__") and name in _BUILTIN_DATA:
            return getattr(builtins, name)
        if module == "collections" and isinstance(getattr(collections, name, None), type):
            return getattr(collections, name)
        if module == "_codecs" and name == "encode":
            return codecs.encode
        raise pickle.UnpicklingError(f"global {module}.{name} is not data")

    def persistent_load(self, pid):
        return None  # a tensor's storage: not read


def read_metadata(data: bytes, path: str) -> dict:
    """A zip checkpoint's dict without its tensors (``state_dict`` values are None), read
    without torch from ``data``, the pickle that :func:`scan_checkpoint` scanned and let
    through (only what it lets through may be read here)."""
    try:
        return _MetadataUnpickler(io.BytesIO(data)).load()
    except Exception as exc:  # a broken stream, or a global scan_checkpoint was not asked about
        raise ConfigError(
            f"model.weights {path} is not a PyTorch checkpoint, or it is damaged or truncated "
            f"({os.path.getsize(path)} bytes; {exc}). Fix: copy it again from its source, or {WEIGHTS_FIX}"
        ) from None


def check_format(ckpt, path: str) -> dict:
    """``ckpt`` (a checkpoint dict, or its metadata) checked to be one of ours."""
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ConfigError(
            f"model weights {path} are neither a wsiseg checkpoint nor TorchScript; "
            "save with wsiseg.models.checkpoint.save_checkpoint or torch.jit.save"
        )
    if ckpt.get("format", CHECKPOINT_FORMAT) != CHECKPOINT_FORMAT:
        raise ConfigError(
            f"model weights {path} are a checkpoint of format {ckpt['format']!r}; this version of the "
            f"workflow reads {CHECKPOINT_FORMAT!r}: re-save it with a matching version or retrain"
        )
    return ckpt


def resolve(cfg: dict, ckpt: dict, path: str) -> tuple:
    """(architecture, classes, mpp) from the checkpoint and the config; a conflict is an error."""
    arch = dict(ckpt.get("config", {}))
    for key in ("depth", "base_width", "padding", "batch_norm"):
        if key in cfg and cfg[key] is not None and key in arch and cfg[key] != arch[key]:
            raise ConfigError(
                f"model.{key}={cfg[key]!r} in the config but the checkpoint {path} was trained with "
                f"{key}={arch[key]!r}; remove model.{key} from the config or use matching weights"
            )
        if key in cfg and cfg[key] is not None:
            arch.setdefault(key, cfg[key])
    for key, what in (("classes", "[background, nucleus, ...]"), ("mpp", "the µm/px it was trained at")):
        if not cfg.get(key) and not ckpt.get(key):
            raise ConfigError(
                f"the checkpoint {path} does not say its {key} and the config does not either. "
                f"Fix: set model.{key}: {what}"
            )
    classes = list(cfg.get("classes") or ckpt.get("classes"))
    if ckpt.get("classes") and len(ckpt["classes"]) != len(classes):
        raise ConfigError(
            f"model.classes lists {len(classes)} classes but the checkpoint {path} has "
            f"{len(ckpt['classes'])} ({ckpt['classes']})"
        )
    arch["n_classes"] = len(classes)
    mpp = float(cfg.get("mpp") or ckpt["mpp"])
    if ckpt.get("mpp") and abs(mpp / float(ckpt["mpp"]) - 1) > 0.01:
        raise ConfigError(
            f"model.mpp={mpp} in the config but the checkpoint {path} was trained at {ckpt['mpp']} µm/px; "
            f"set model.mpp: {ckpt['mpp']} (a model applied at another resolution segments poorly)"
        )
    return arch, classes, mpp


def read_without_tensors(path: str) -> dict | None:
    """The checkpoint dict with its tensors as None, read without torch and without unpickling
    anything but plain data (:func:`scan_checkpoint`, then :func:`read_metadata`), checked to be
    one of ours; None for a file that is not a zip archive, which only torch.load can read."""
    data = scan_checkpoint(path)
    return None if data is None else check_format(read_metadata(data, path), path)


def check_checkpoint(cfg: dict) -> bool:
    """Without torch: refuse what the plan stage's checkpoint loader would refuse (a pickle
    that is not data, a file that is not a checkpoint of ours, a config that contradicts
    it). False for a file that is not a zip archive, which only torch can judge."""
    ckpt = read_without_tensors(cfg["weights"])
    if ckpt is None:
        return False
    resolve(cfg, ckpt, cfg["weights"])
    return True
