"""Normalized feed-forward network; its residual is the block input (Megalodon's two-hop residual)."""
import mlx.core as mx
import mlx.nn as nn

from .config import ModelArgs
from .layer_norm import LayerNorm


class NormalizedFeedForwardNetwork(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        D, F = args.model_dim, args.ffn_hidden_dim
        self.swiglu = args.swiglu
        self.norm = LayerNorm(D, eps=args.norm_eps)
        self.fc1 = nn.Linear(D, F, bias=False)
        self.fc2 = nn.Linear(F, D, bias=False)
        if args.swiglu:
            self.fc3 = nn.Linear(D, F, bias=False)
        if args.rescale_nffn:
            self.alpha = mx.full((D,), 0.1 * (0.5 ** layer_id))

    def __call__(self, x: mx.array, residual: mx.array) -> mx.array:
        h = self.norm(x)
        hidden = nn.silu(self.fc1(h))
        if self.swiglu:
            hidden = hidden * self.fc3(h)
        out = self.fc2(hidden)
        if "alpha" in self:
            out = out * self.alpha.astype(out.dtype)
        return out + residual
