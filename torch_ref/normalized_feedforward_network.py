"""Megalodon's normalized feed-forward network (pre-LayerNorm, optional SwiGLU, optional rescale).

Its residual is supplied by the caller: in a Megalodon block it is the BLOCK input, not the
attention output it normalizes (a two-hop residual)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .layer_norm import LayerNorm


class NormalizedFeedForwardNetwork(nn.Module):
    def __init__(self, model_dim: int, ffn_hidden_dim: int, swiglu: bool = False,
                 norm_eps: float = 1e-5, rescale: Optional[float] = None):
        super().__init__()
        self.model_dim = model_dim
        self.hidden_dim = ffn_hidden_dim
        self.swiglu = swiglu
        self.norm = LayerNorm(model_dim, eps=norm_eps)
        self.fc1 = nn.Linear(model_dim, ffn_hidden_dim, bias=False)
        self.fc2 = nn.Linear(ffn_hidden_dim, model_dim, bias=False)
        self.fc3 = nn.Linear(model_dim, ffn_hidden_dim, bias=False) if swiglu else None
        if rescale is None:
            self.register_parameter("alpha", None)
        else:
            self.alpha = nn.Parameter(torch.full((model_dim,), float(rescale)))

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        xn = self.norm(x)
        hidden = F.silu(self.fc1(xn))
        if self.fc3 is not None:
            hidden = hidden * self.fc3(xn)
        out = self.fc2(hidden)
        if self.alpha is not None:
            out = (out * self.alpha.to(out.dtype)).to(x.dtype)
        return out + residual

    def extra_repr(self) -> str:
        return f"dim={self.model_dim}, hidden={self.hidden_dim}, swiglu={self.swiglu}"
