"""Geometry of a network we cannot read analytically (TorchScript): measured by running it,
once (:func:`cached`). torch is imported by the functions that run a network: the plan
stage reads a cached measurement without it."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    from torch import nn


#: what torch says when an allocation fails (CPU: "DefaultCPUAllocator: can't allocate memory";
#: CUDA: "CUDA out of memory"; TorchScript re-raises both as its own RuntimeError)
OUT_OF_MEMORY = ("out of memory", "can't allocate memory")


def probe(module: nn.Module, n: int):
    """Output side of ``module`` on a zero n x n input (None if it does not run on that size).

    Running out of memory says nothing about the size and is raised (as :class:`MemoryError`):
    a size probed as illegal is cached for the weights file, and a machine short of memory once
    would otherwise keep that size from the tiler on every machine after it."""
    import torch

    try:
        with torch.inference_mode():
            dev = next(module.parameters()).device if any(True for _ in module.parameters()) else "cpu"
            out = module(torch.zeros(1, 3, n, n, device=dev))
        return int(out.shape[-1])
    except Exception as exc:
        if out_of_memory(exc):  # as MemoryError: the slide's failure record says "memory" and the fix
            raise MemoryError(f"the network ran out of memory on a {n} x {n} px test input") from exc
        return None


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failing. A TorchScript error's message holds the
    interpreter's traceback, source lines included; its last line is the error itself."""
    import torch

    if isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)):  # = torch.OutOfMemoryError; also in torch 2.2
        return True
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return bool(lines) and any(m in lines[-1] for m in OUT_OF_MEMORY)


def measure_border(module: nn.Module, align: int) -> int:
    """Px lost per side (0 for a 'same' network)."""
    for n in range(8 * align, 8 * align + 4 * align):
        out = probe(module, n)
        if out is not None:
            if (n - out) % 2:
                raise ConfigError("TorchScript model output is not centred on its input")
            return (n - out) // 2
    raise ConfigError("could not run the TorchScript model on a 3-channel test input")


def measure_halo(module: nn.Module, align: int, border: int, positive: bool = True) -> int:
    """Receptive-field radius from the input-gradient support of one output px.

    Probes ``align`` phases of the output px so pooling offsets are covered. With
    ``positive`` the weights of a copy are made positive first (dead ReLUs would
    otherwise hide part of the field).
    """
    import torch

    m = copy.deepcopy(module).float().cpu().eval()
    if positive:
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(p.abs() + 1e-3)
    radius = 0
    n = 16 * align + 2 * border
    while True:
        touched = False
        for phase in range(align):
            x = torch.zeros(1, 3, n, n, requires_grad=True)
            y = m(x + 0.5)
            c = y.shape[-1] // 2 + phase - align // 2
            y[0, :, c, c].sum().backward()
            g = x.grad[0].abs().sum(0)
            nz = torch.nonzero(g > 0)
            if len(nz) == 0:
                continue
            centre = c + (n - y.shape[-1]) // 2
            r = int(max((nz - centre).abs().max().item(), 0))
            radius = max(radius, r)
            if nz.min().item() == 0 or nz.max().item() == n - 1:
                touched = True
        if not touched:
            return radius
        n *= 2
        radius = 0
        if n > 4096:
            raise ConfigError("receptive field larger than 2048 px; set tiling.margin explicitly")


def cache_dir() -> Path:
    return Path(os.environ.get("WSISEG_CACHE") or Path.home() / ".cache" / "wsiseg")


def cached(name: str, compute: Callable[[], dict], keys: tuple) -> dict:
    """``compute()`` (a dict with ``keys``), measured once and kept as ``$WSISEG_CACHE/<name>.json``
    (default ``~/.cache/wsiseg``), so that the plan stage of the next slide reads it instead of
    probing the network again. ``name`` must say everything the result depends on. A cache that
    cannot be read or written is only a cost, never an error."""
    path = cache_dir() / f"{name}.json"
    try:
        with open(path) as fh:
            value = json.load(fh)
        if isinstance(value, dict) and all(k in value for k in keys):
            return value
    except (OSError, ValueError):
        pass
    value = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(value))
        os.replace(tmp, path)
    except OSError:
        pass
    return value
