"""The project's U-Net's input and output sizes, as arithmetic: no torch.

:meth:`wsiseg.unet.UNet.output_size` answers from here, and so does the plan stage,
which reads a checkpoint's depth and padding from its metadata and never builds the
network (:func:`wsiseg.models.checkpoint.load` with ``network=False``).
"""

from __future__ import annotations

from .errors import ConfigError

DEPTH = 4  # UNet's default number of 2x downsamplings
PADDING = "same"  # UNet's default padding
PADDINGS = ("same", "valid")


def check_padding(padding: str) -> None:
    if padding not in PADDINGS:
        raise ConfigError(f"model padding must be 'same' or 'valid', not {padding!r}")


def output_size(n: int, depth: int, padding: str) -> int | None:
    """Output side for input side ``n`` (None if ``n`` is not a legal input).

    'same' keeps sizes (inputs must be multiples of 2**depth); 'valid' loses 4 px in every
    double convolution, halves at every max-pool (which needs an even side) and doubles
    at every up-convolution.
    """
    if padding == "same":
        return n if n % 2**depth == 0 else None
    for _ in range(depth):
        n -= 4
        if n <= 0 or n % 2:
            return None
        n //= 2
    n -= 4
    for _ in range(depth):
        n = 2 * n - 4
    return n if n > 0 else None


def first_legal(depth: int, padding: str) -> int:
    """The smallest legal input side."""
    n = 1
    while output_size(n, depth, padding) is None:
        n += 1
    return n


def border(depth: int, padding: str) -> int:
    """Px lost per side: 0 for 'same'; for 'valid' the same at every legal input size."""
    if padding == "same":
        return 0
    n = first_legal(depth, padding)
    return (n - output_size(n, depth, padding)) // 2
