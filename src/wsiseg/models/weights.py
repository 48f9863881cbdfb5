"""What a weights file holds, read without torch and without unpickling it: the opcodes of a
PyTorch checkpoint's pickle name every global it would import, so a file that is not
plain tensors and data (what ``torch.load(weights_only=True)`` refuses) is refused when
the workflow starts, also where Snakemake runs without torch (``--use-conda``). Loading
stays ``weights_only=True`` (:mod:`.checkpoint`): this is the early, clear refusal, not
the protection.
"""

from __future__ import annotations

import os
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


def scan_checkpoint(path: str) -> None:
    """Without torch: an empty, truncated or non-PyTorch file, or a pickle that names anything
    but tensors and plain data (what torch.load(weights_only=True) would refuse)."""
    size = os.path.getsize(path)
    if size == 0:
        raise ConfigError(
            f"model.weights {path} is empty (0 bytes): an interrupted copy or download? Fix: copy it again"
        )
    if not zipfile.is_zipfile(path):
        return  # torch's legacy format, or not PyTorch at all: torch.load says which (checkpoint.read)
    damaged = f"model.weights {path} is damaged or truncated ({size} bytes"
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n.endswith("data.pkl")]
            data = zf.read(names[0]) if names else None
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ConfigError(f"{damaged}; {exc}). Fix: copy it again from its source, or {WEIGHTS_FIX}") from None
    if data is None:
        raise ConfigError(f"{damaged}; no data.pkl in it). Fix: {WEIGHTS_FIX}")
    try:
        found = pickle_globals(data)
    except Exception as exc:  # pickletools' own complaints about a broken stream
        raise ConfigError(f"{damaged}; its pickle: {exc}). Fix: copy it again from its source") from None
    bad = [f"{m}.{n}" for m, n in found if _not_data(m, n)]
    if bad:
        raise refused_pickle(path, f"calls {bad[0]} when unpickled")
