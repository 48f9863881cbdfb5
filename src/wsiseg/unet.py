"""The project's U-Net (Ronneberger et al. 2015) and test-time augmentation.

Loading and saving models (this U-Net's checkpoints, TorchScript, the classical
model) is :mod:`wsiseg.models`; this module is the architecture, test-time augmentation
and :func:`fold_batchnorm`, which readies any loaded network for inference.

Contract for every model the workflow runs (ours or a user's TorchScript):
input float32 RGB in [0, 1], shape N x 3 x H x W; output per-class logits
N x K x H' x W' with H' = H ('same') or H' = H - 2*border ('valid'). Any further
normalisation lives inside the model; ours carries mean/std buffers.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from . import unet_sizes

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
        depth: int = unet_sizes.DEPTH,
        base_width: int = 64,
        padding: str = unet_sizes.PADDING,
        batch_norm: bool = True,
        dropout: float = 0.0,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    ):
        super().__init__()
        unet_sizes.check_padding(padding)
        self.config = dict(
            n_classes=n_classes,
            depth=depth,
            base_width=base_width,
            padding=padding,
            batch_norm=batch_norm,
            dropout=dropout,
            mean=list(mean),
            std=list(std),
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

    def output_size(self, n: int) -> int | None:
        """Output side for input side ``n`` (None if ``n`` is not a legal input), computed
        analytically (:func:`wsiseg.unet_sizes.output_size`, which needs no torch)."""
        return unet_sizes.output_size(n, self.depth, self.padding)


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """For inference: ``module`` with each BatchNorm folded into the convolution before it, as a
    copy in eval mode (``module`` itself is left as it is; returned as is where there is nothing
    to fold).

    In eval mode a BatchNorm is a per-channel affine map of the convolution's output, which the
    convolution's weights and bias can carry: one pass over the activations less per
    convolution, 10-17 % of the shipped U-Net's time on the CPU (benchmarks/net_layout.py), the logits
    the same to about 1e-5. An eager network (ours) is folded with
    ``torch.nn.utils.fusion.fuse_conv_bn_eval``; a TorchScript one (the whole model, or a part of
    it, as in front of a stain transform) on the CPU is frozen (``torch.jit.freeze``, which folds
    the same way, to the bit on the shipped U-Net) in the memory layout it has, or kept as it is
    where it cannot be frozen; on a GPU it is kept as it is (how a frozen graph runs under
    autocast is not tested: no GPU here). Not for training: the copy has no BatchNorm left."""
    script = torch.jit.ScriptModule

    def freeze(m: nn.Module) -> nn.Module:
        if any(p.device.type != "cpu" for p in m.parameters()):
            return m  # on a GPU, under autocast: a frozen graph's precision is not checked there (no GPU lent)
        try:
            return torch.jit.freeze(m.eval())
        except Exception:  # e.g. a model with methods freezing cannot keep: run it unfrozen
            return m

    if isinstance(module, script):
        return freeze(module)  # a frozen clone: the module keeps its parameters

    def pairs(m: nn.Module) -> list:
        return [
            (seq, i)
            for seq in m.modules()
            if isinstance(seq, nn.Sequential) and not isinstance(seq, script)
            for i in range(len(seq) - 1)
            if isinstance(seq[i], nn.Conv2d) and isinstance(seq[i + 1], nn.BatchNorm2d)
        ]

    def scripted(m: nn.Module) -> list:  # TorchScript parts of an eager module: (parent, name)
        out = []
        for parent in m.modules():
            if not isinstance(parent, script):
                out += [(parent, name) for name, c in parent.named_children() if isinstance(c, script)]
        return out

    if not pairs(module) and not scripted(module):
        return module
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = copy.deepcopy(module).eval()
    for seq, i in pairs(folded):
        seq[i] = fuse_conv_bn_eval(seq[i], seq[i + 1])
        seq[i + 1] = nn.Identity()
    for parent, name in scripted(folded):
        setattr(parent, name, freeze(getattr(parent, name)))
    return folded


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
