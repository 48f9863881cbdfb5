"""The per-slide Reinhard transform of :mod:`wsiseg.stain` on the network's device (torch).

The segment stage puts :class:`StainNormalised` in front of the network with the statistics
the plan stage measured (:class:`wsiseg.stain.LabStats`, numpy: the plan stage needs no torch).
The CIE-Lab conversions here run on N x 3 x H x W tensors in their own dtype (the transform: float32).
"""

from __future__ import annotations

import torch
from torch import nn

from .stain import MAX_SCALE, WHITE, XYZ_FROM_RGB, scales

_XYZ_FROM_RGB = torch.tensor(XYZ_FROM_RGB, dtype=torch.float64)
_RGB_FROM_XYZ = torch.linalg.inv(_XYZ_FROM_RGB)
_WHITE = torch.tensor(WHITE, dtype=torch.float64)


def _mix(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Matrix ``m`` (3 x 3) applied to the channel axis (1) of ``x`` (N x 3 x H x W)."""
    return torch.einsum("ij,njhw->nihw", m.to(x), x)


def rgb_to_lab(x: torch.Tensor) -> torch.Tensor:
    """N x 3 x H x W sRGB in [0, 1] -> CIE-Lab (L* in [0, 100]).

    The formula of :func:`rgb_to_lab_textbook`, equal to it bit for bit (tested), written with
    in-place operations: a window's conversion is some twenty passes over its pixels, and
    reusing their buffers saves about a fifth of the transform's time on the CPU
    (benchmarks/stain_cost.py)."""
    lin = x.add(0.055).div_(1.055).pow_(2.4)
    torch.where(x > 0.04045, lin, x / 12.92, out=lin)
    xyz = _mix(_XYZ_FROM_RGB, lin).div_(_WHITE.to(x).view(1, 3, 1, 1))
    f = xyz.clamp_min(0).pow_(1 / 3)
    torch.where(xyz > 0.008856, f, xyz.mul_(7.787).add_(16 / 116), out=f)
    lab = torch.empty_like(f)
    torch.mul(f[:, 1], 116, out=lab[:, 0]).sub_(16)
    torch.sub(f[:, 0], f[:, 1], out=lab[:, 1]).mul_(500)
    torch.sub(f[:, 1], f[:, 2], out=lab[:, 2]).mul_(200)
    return lab


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """CIE-Lab -> sRGB in [0, 1] (out-of-gamut colours clipped); in place as :func:`rgb_to_lab`."""
    f = torch.empty_like(lab)
    fy = torch.add(lab[:, 0], 16, out=f[:, 1]).div_(116)
    torch.div(lab[:, 1], 500, out=f[:, 0]).add_(fy)
    torch.sub(fy, torch.div(lab[:, 2], 200, out=f[:, 2]), out=f[:, 2]).clamp_min_(0)
    xyz = f.pow(3)
    torch.where(f > 0.2068966, xyz, f.sub_(16 / 116).div_(7.787), out=xyz)
    lin = _mix(_RGB_FROM_XYZ, xyz.mul_(_WHITE.to(lab).view(1, 3, 1, 1))).clamp_(0, 1)
    rgb = lin.pow(1 / 2.4).mul_(1.055).sub_(0.055)
    torch.where(lin > 0.0031308, rgb, lin.mul_(12.92), out=rgb)
    return rgb.clamp_(0, 1)


def rgb_to_lab_textbook(x: torch.Tensor) -> torch.Tensor:
    """:func:`rgb_to_lab` as the formula is written (a fresh tensor per step): the reference the
    in-place version is tested against, bit for bit, and timed against (benchmarks/stain_cost.py)."""
    lin = torch.where(x > 0.04045, ((x + 0.055) / 1.055) ** 2.4, x / 12.92)
    xyz = _mix(_XYZ_FROM_RGB, lin) / _WHITE.to(x).view(1, 3, 1, 1)
    f = torch.where(xyz > 0.008856, xyz.clamp_min(0) ** (1 / 3), 7.787 * xyz + 16 / 116)
    return torch.stack((116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])), 1)


def lab_to_rgb_textbook(lab: torch.Tensor) -> torch.Tensor:
    """:func:`lab_to_rgb` as the formula is written: the reference, as :func:`rgb_to_lab_textbook`."""
    fy = (lab[:, 0] + 16) / 116
    f = torch.stack((fy + lab[:, 1] / 500, fy, (fy - lab[:, 2] / 200).clamp_min(0)), 1)
    xyz = torch.where(f > 0.2068966, f**3, (f - 16 / 116) / 7.787) * _WHITE.to(lab).view(1, 3, 1, 1)
    lin = _mix(_RGB_FROM_XYZ, xyz).clamp(0, 1)
    return torch.where(lin > 0.0031308, 1.055 * lin ** (1 / 2.4) - 0.055, 12.92 * lin).clamp(0, 1)


class StainNormalised(nn.Module):
    """``net`` with the slide's Reinhard transform in front (input N x 3 x H x W RGB in [0, 1]).

    The transform runs in float32 outside autocast, on the input's device."""

    def __init__(self, net: nn.Module, source: dict, reference: dict, max_scale: float = MAX_SCALE):
        super().__init__()
        self.net = net
        scale = scales(source, reference, max_scale)
        shift = [rm - sm * k for sm, rm, k in zip(source["mean"], reference["mean"], scale)]
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("shift", torch.tensor(shift, dtype=torch.float32).view(1, 3, 1, 1))

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return lab_to_rgb(rgb_to_lab(x.float()).mul_(self.scale).add_(self.shift))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalise(x))
