"""Whole-image prediction of small labeled images (evaluate target, training validation):
mirror-padded to a legal size, one pass (or the 8 flips/rotations), probabilities resized."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .unet import softmax_tta


def pad_to(x: torch.Tensor, multiple: int, margin: int) -> tuple[torch.Tensor, tuple[int, int]]:
    h, w = x.shape[-2:]
    H = -(-(h + 2 * margin) // multiple) * multiple
    W = -(-(w + 2 * margin) // multiple) * multiple
    top, left = (H - h) // 2, (W - w) // 2
    x = F.pad(x, (left, W - w - left, top, H - h - top), mode="reflect")
    return x, (top, left)


@torch.no_grad()
def predict_probs(
    module, image: np.ndarray, align: int = 16, margin: int = 32, tta: bool = True, device="cpu"
) -> np.ndarray:
    """Softmax probabilities (K, H, W) for a whole (small) RGB image, mirror-padded.

    ``tta`` averages the 8 flips/rotations (dihedral group), undone exactly.
    """
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div(255).unsqueeze(0).to(device)
    h, w = image.shape[:2]
    x, (top, left) = pad_to(x, align, margin)
    p = softmax_tta(module, x, tta)[0, :, top : top + h, left : left + w]
    return p.cpu().numpy()


def resize_probs(prob: np.ndarray, shape) -> np.ndarray:
    if prob.shape[1:] == tuple(shape):
        return prob
    t = torch.from_numpy(prob).unsqueeze(0)
    return F.interpolate(t, size=tuple(shape), mode="bilinear", align_corners=False)[0].numpy()
