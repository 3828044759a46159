"""Rotary position embedding on interleaved pairs (features 2i, 2i+1 form one complex number).

Megalodon restarts positions at 0 in every attention chunk; callers pass within-chunk positions.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def rope_inverse_frequencies(head_dim: int, base: Optional[float] = None) -> torch.Tensor:
    """[head_dim/2] float32: 1 / float32(base ** (j / head_dim)) for j = 0, 2, 4, ...

    The power is taken in Python double precision and rounded to float32 before the reciprocal,
    which is how upstream's ``rope.freqs`` buffer is built."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
    base = 10000.0 if base is None else float(base)
    powers = torch.tensor([base ** (j / head_dim) for j in range(0, head_dim, 2)], dtype=torch.float32)
    return 1.0 / powers


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, base: Optional[float] = None):
        super().__init__()
        self.head_dim = head_dim
        self.base = 10000.0 if base is None else float(base)
        self.register_buffer("freqs", rope_inverse_frequencies(head_dim, base))

    def angles(self, positions: torch.Tensor) -> torch.Tensor:
        """positions [L] (any integer or float tensor) -> angles [L, head_dim/2] float32."""
        return torch.outer(positions.to(torch.float32), self.freqs.to(torch.float32))

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [B, L, H, head_dim]; positions [L] within-chunk positions. Rotation in float32
        (float64 for float64 input), result in x's dtype."""
        return apply_rotary(x, self.angles(positions.to(self.freqs.device)))

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base}"


def apply_rotary(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate each interleaved pair (x[2i], x[2i+1]) of x [B, L, H, dz] by angles [L, dz/2].

    Angles are position * inverse frequency rounded to float32, as upstream builds them; the
    rotation itself runs in float32 (float64 for float64 input)."""
    wd = torch.float64 if x.dtype == torch.float64 else torch.float32
    angles = angles.to(wd)          # float32 angles (as upstream's freqs_cis); cos/sin in wd
    cos = torch.cos(angles)[None, :, None, :]
    sin = torch.sin(angles)[None, :, None, :]
    pairs = x.to(wd).reshape(*x.shape[:-1], -1, 2)
    re, im = pairs[..., 0], pairs[..., 1]
    out = torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)
