"""The project's U-Net (Ronneberger et al. 2015) and model loading.

Contract for every model the workflow runs (ours or a user's TorchScript):
input float32 RGB in [0, 1], shape N x 3 x H x W; output per-class logits
N x K x H' x W' with H' = H ('same') or H' = H - 2*border ('valid'). Any further
normalisation lives inside the model; ours carries mean/std buffers.
"""

from __future__ import annotations

import hashlib
import math
import zipfile
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

CHECKPOINT_FORMAT = "wsiseg-unet/1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int, pad: int, batch_norm: bool, dropout: float = 0.0):
        layers = []
        for i, (a, b) in enumerate(((cin, cout), (cout, cout))):
            layers.append(nn.Conv2d(a, b, 3, padding=pad, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(b))
            layers.append(nn.ReLU(inplace=True))
            if dropout and i == 0:
                layers.append(nn.Dropout2d(dropout))
        super().__init__(*layers)


def center_crop(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    dy, dx = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
    return x[..., dy : dy + h, dx : dx + w]


class UpBlock(nn.Module):
    """2x2 up-convolution halving the channels, concatenation with the cropped skip, double conv."""

    def __init__(self, width: int, pad: int, batch_norm: bool):
        super().__init__()
        self.up = nn.ConvTranspose2d(width * 2, width, 2, stride=2)
        self.conv = DoubleConv(width * 2, width, pad, batch_norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        x = torch.cat([center_crop(skip, x.shape[-2], x.shape[-1]), x], dim=1)
        return self.conv(x)


class UNet(nn.Module):
    """Contracting path of ``depth`` blocks (2 x conv3x3 + ReLU [+BN], 2x2 max-pool,
    channels doubling), bottleneck, expansive path of 2x2 up-convolutions halving the
    channels, concatenated with the (cropped) skip features, and a 1x1 head.

    padding='valid' is the original network: every 3x3 convolution shrinks its
    input by 2 px; padding='same' keeps sizes (inputs must be multiples of 2**depth).
    """

    def __init__(
        self,
        n_classes: int = 2,
        depth: int = 4,
        base_width: int = 64,
        padding: str = "same",
        batch_norm: bool = True,
        dropout: float = 0.0,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    ):
        super().__init__()
        if padding not in ("same", "valid"):
            raise ConfigError(f"model padding must be 'same' or 'valid', not {padding!r}")
        self.config = dict(
            n_classes=n_classes, depth=depth, base_width=base_width, padding=padding,
            batch_norm=batch_norm, dropout=dropout, mean=list(mean), std=list(std),
        )
        pad = 1 if padding == "same" else 0
        self.padding = padding
        self.depth = depth
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        widths = [base_width * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList()
        cin = 3
        for w in widths[:-1]:
            self.down.append(DoubleConv(cin, w, pad, batch_norm))
            cin = w
        self.bottleneck = DoubleConv(widths[-2], widths[-1], pad, batch_norm, dropout)
        self.up = nn.ModuleList([UpBlock(w, pad, batch_norm) for w in reversed(widths[:-1])])
        self.head = nn.Conv2d(widths[0], n_classes, 1)
        for m in self.modules():  # He initialisation, as in the paper
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        skips: list[torch.Tensor] = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottleneck(x)
        for i, up in enumerate(self.up):
            x = up(x, skips[len(skips) - 1 - i])
        return self.head(x)

    # ---- geometry of the valid network, computed analytically
    def output_size(self, n: int) -> int | None:
        """Output side for input side ``n`` (None if ``n`` is not a legal input)."""
        if self.padding == "same":
            return n if n % 2**self.depth == 0 else None
        for _ in range(self.depth):
            n -= 4
            if n <= 0 or n % 2:
                return None
            n //= 2
        n -= 4
        for _ in range(self.depth):
            n = 2 * n - 4
        return n if n > 0 else None


# ----------------------------------------------------- test-time augmentation
# the 8 flips/rotations of a square (dihedral group D4): (quarter turns, mirror)
DIHEDRAL = [(k, f) for k in range(4) for f in (False, True)]


def softmax_tta(module: nn.Module, x: torch.Tensor, tta: bool = True) -> torch.Tensor:
    """Class probabilities (B, K, h, w) of ``module`` on ``x`` (B, C, H, W).

    With ``tta`` the input is flipped/rotated 8 ways, each output turned back
    exactly and the probabilities averaged; otherwise one softmax. For a 'valid'
    network the output stays centred on the input, so every transform maps the
    output grid onto itself.
    """
    views = DIHEDRAL if tta else [(0, False)]
    total = None
    for k, f in views:  # a running sum: one view's probabilities in memory at a time
        xi = torch.rot90(x, k, (2, 3))
        if f:
            xi = torch.flip(xi, (3,))
        p = torch.softmax(module(xi).float(), 1)
        if f:
            p = torch.flip(p, (3,))
        p = torch.rot90(p, -k, (2, 3))
        total = p if total is None else total + p
    return total / len(views)


# ----------------------------------------------------------------- model spec
@dataclass
class ModelSpec:
    """A loaded model plus what the tiler needs to know about it."""

    module: nn.Module
    classes: list
    mpp: float
    name: str
    checksum: str  # sha256 of the weights file
    kind: str  # 'unet', 'torchscript' or 'classical'
    align: int  # tile origins must be multiples of this (2**depth)
    border: int | None  # px lost per side ('valid' networks), 0 for 'same' (None: not measured)
    halo: int | None  # receptive-field radius, px (None: not measured)
    postprocess: dict | None = None  # instance post-processing of a background/object/boundary model

    @property
    def mask_classes(self) -> list:
        """Classes of the written mask: a boundary class is resolved into separated objects."""
        return self.classes[:-1] if self.postprocess else list(self.classes)

    def legal_input(self, n_min: int) -> int:
        """Smallest legal input side >= n_min."""
        for n in range(n_min, n_min + 4 * self.align + 1):
            if self._out(n) is not None:
                return n
        raise ConfigError(f"no legal input size for model '{self.name}' near {n_min}")

    def _out(self, n: int):
        if self.kind == "classical":
            return n
        if isinstance(self.module, UNet):
            return self.module.output_size(n)
        out = _probe(self.module, n)
        return out if out == n - 2 * self.border else None


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_torchscript(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())


def save_checkpoint(path: str, model: UNet, classes, mpp: float, name: str, extra: dict | None = None) -> None:
    """Checkpoint that embeds what inference needs (architecture, classes, mpp)."""
    ckpt = dict(
        format=CHECKPOINT_FORMAT, name=name, classes=list(classes), mpp=float(mpp),
        config=model.config, state_dict=model.state_dict(), extra=extra or {},
    )
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    import os

    os.replace(tmp, path)


def load_model(cfg: dict, device: str = "cpu", geometry: bool = True) -> ModelSpec:
    """Load the model described by the config's ``model:`` block, in eval mode.

    ``geometry=False`` skips measuring border and halo (the segment stage reads
    them from the tile plan, which measured them once).

    Checkpoints are read with ``torch.load(weights_only=True)``: data, never code.
    The checkpoint's embedded architecture, classes and mpp are used unless the
    config gives them; a conflict is an error.
    """
    if cfg.get("format") == "classical":  # the haematoxylin baseline: no weights, CPU only
        from . import classical

        params = classical.params_from_cfg(cfg)
        mpp = float(cfg["mpp"])
        module = classical.ClassicalNuclei(mpp, params)
        return ModelSpec(module, list(classical.CLASSES), mpp, cfg["name"], classical.checksum(params), "classical",
                         1, 0, classical.halo_px(params, mpp))
    path = cfg["weights"]
    checksum = sha256(path)
    if cfg.get("format", "auto") == "torchscript" or (cfg.get("format", "auto") == "auto" and is_torchscript(path)):
        module = torch.jit.load(path, map_location=device).eval()
        classes = list(cfg["classes"])
        depth = int(cfg.get("depth", 4))
        align = 2**depth
        border = _measure_border(module, align) if geometry else None
        halo = measure_halo(module, align, border) if geometry else None
        return ModelSpec(module, classes, float(cfg["mpp"]), cfg["name"], checksum, "torchscript", align, border, halo)
    ckpt = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ConfigError(
            f"model weights {path} are neither a wsiseg checkpoint nor TorchScript; "
            "save with wsiseg.unet.save_checkpoint or torch.jit.save"
        )
    arch = dict(ckpt.get("config", {}))
    for key in ("depth", "base_width", "padding", "batch_norm"):
        if key in cfg and cfg[key] is not None and key in arch and cfg[key] != arch[key]:
            raise ConfigError(
                f"model.{key}={cfg[key]!r} in the config but the checkpoint {path} was trained with "
                f"{key}={arch[key]!r}; remove model.{key} from the config or use matching weights"
            )
        if key in cfg and cfg[key] is not None:
            arch.setdefault(key, cfg[key])
    classes = list(cfg.get("classes") or ckpt.get("classes"))
    if ckpt.get("classes") and len(ckpt["classes"]) != len(classes):
        raise ConfigError(
            f"model.classes lists {len(classes)} classes but the checkpoint {path} has "
            f"{len(ckpt['classes'])} ({ckpt['classes']})"
        )
    arch["n_classes"] = len(classes)
    module = UNet(**arch)
    module.load_state_dict(ckpt["state_dict"])
    module.to(device).eval()
    mpp = float(cfg.get("mpp") or ckpt["mpp"])
    if ckpt.get("mpp") and abs(mpp / float(ckpt["mpp"]) - 1) > 0.01:
        raise ConfigError(
            f"model.mpp={mpp} in the config but the checkpoint {path} was trained at {ckpt['mpp']} µm/px; "
            f"set model.mpp: {ckpt['mpp']} (a model applied at another resolution segments poorly)"
        )
    align = 2**module.depth
    first = _first_legal(module)
    border = 0 if module.padding == "same" else (first - module.output_size(first)) // 2
    halo = border if module.padding == "valid" else (unet_same_halo(module.depth) if geometry else None)
    post = None
    if len(classes) == 3 and classes[-1] == "boundary":  # background / object / boundary model
        from .postprocess import InstanceParams

        post = (ckpt.get("extra") or {}).get("postprocess") or InstanceParams().as_dict()
    return ModelSpec(module, classes, mpp, cfg["name"], checksum, "unet", align, border, halo, post)


def _first_legal(module: UNet) -> int:
    n = 1
    while module.output_size(n) is None:
        n += 1
    return n


def unet_same_halo(depth: int) -> int:
    """Receptive-field radius (px) of a 'same' U-Net of this depth, measured exactly.

    Measured once on a structural copy with positive weights, so no ReLU is dead
    and every pixel that *can* influence the centre does.
    """
    probe = UNet(n_classes=1, depth=depth, base_width=2, padding="same", batch_norm=False)
    with torch.no_grad():
        for p in probe.parameters():
            p.fill_(0.1)
    return measure_halo(probe, 2**depth, 0, positive=False)


def _probe(module: nn.Module, n: int):
    try:
        with torch.inference_mode():
            dev = next(module.parameters()).device if any(True for _ in module.parameters()) else "cpu"
            out = module(torch.zeros(1, 3, n, n, device=dev))
        return int(out.shape[-1])
    except Exception:
        return None


def _measure_border(module: nn.Module, align: int) -> int:
    for n in range(8 * align, 8 * align + 4 * align):
        out = _probe(module, n)
        if out is not None:
            if (n - out) % 2:
                raise ConfigError("TorchScript model output is not centred on its input")
            return (n - out) // 2
    raise ConfigError("could not run the TorchScript model on a 3-channel test input")


def measure_halo(module: nn.Module, align: int, border: int, positive: bool = True) -> int:
    """Receptive-field radius from the input-gradient support of one output px.

    Probes ``align`` phases of the output px so pooling offsets are covered. With
    ``positive`` the weights of a copy are made positive first (dead ReLUs would
    otherwise hide part of the field); TorchScript copies are re-loaded by caller.
    """
    import copy

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


def plan_margin(spec: ModelSpec, margin, allow_small: bool, log=print) -> int:
    """Context per side (target px). ``margin`` 'auto' covers the halo."""
    step = max(1, spec.align // 2)  # keeps T + 2m a multiple of 2**depth
    if margin in (None, "auto"):
        return max(spec.border, int(math.ceil(spec.halo / step) * step))
    margin = int(margin)
    if margin < spec.border:
        raise ConfigError(
            f"tiling.margin={margin} is smaller than the {spec.border} px that the 'valid' model "
            f"'{spec.name}' loses per side; set tiling.margin to at least {spec.border} (or 'auto')"
        )
    if margin < spec.halo:
        if not allow_small:
            raise ConfigError(
                f"tiling.margin={margin} px is below the receptive-field halo ({spec.halo} px) of model "
                f"'{spec.name}': tiles would disagree at their borders (seams). Set tiling.margin to "
                f"'auto' or >= {spec.halo}, or set tiling.allow_small_margin: true to accept that "
                "(the effective receptive field is often smaller than the theoretical one)"
            )
        log(
            f"WARNING: tiling.margin={margin} px is below the theoretical halo of {spec.halo} px "
            "(allowed by tiling.allow_small_margin); the mask may differ slightly from a one-pass result near tile borders"
        )
    return margin
