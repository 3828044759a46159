"""The Megalodon language model in MLX, keyed like upstream's ``Mega`` state_dict.

Follows mlx-lm's model contract: ``Model(args)``, ``model(inputs, cache=None)`` -> logits,
``make_cache()``, ``layers`` and ``sanitize(weights)``.
"""
from __future__ import annotations

import math
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn

from .cache import MegalodonCache, TimestepNormCache
from .config import ModelArgs
from .moving_average_gated_attention import MovingAverageGatedAttention
from .normalized_feedforward_network import NormalizedFeedForwardNetwork
from .timestep_norm import TimestepNorm


class MegaBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.mega = MovingAverageGatedAttention(args)
        self.nffn = NormalizedFeedForwardNetwork(args, layer_id)

    def __call__(self, x: mx.array, cache: Optional[MegalodonCache] = None) -> mx.array:
        return self.nffn(self.mega(x, cache), x)


class MegaOutputLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.final_norm = TimestepNorm(args.model_dim, args.norm_num_groups, eps=args.norm_eps)
        if not args.share_emb:
            self.output = nn.Linear(args.model_dim, args.output_dim, bias=False)

    def __call__(self, x, embed: nn.Embedding, cache: Optional[TimestepNormCache] = None):
        x, state = self.final_norm(x, None if cache is None else cache.norm)
        if cache is not None:
            cache.norm = state
            cache.offset += x.shape[1]
        return self.output(x) if "output" in self else embed.as_linear(x)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.embed = nn.Embedding(args.vocab_size, args.model_dim)
        self.layers = [MegaBlock(args, i) for i in range(args.num_layers)]
        self.output = MegaOutputLayer(args)

    def __call__(self, inputs: mx.array, cache: Optional[List] = None) -> mx.array:
        """inputs: B x L token ids -> B x L x vocab logits (float32)."""
        if inputs.ndim != 2:
            raise ValueError(f"inputs must be a 2-D array of token ids (batch x length), got shape {inputs.shape}")
        if cache is not None and len(cache) != len(self.layers) + 1:
            raise ValueError(f"cache has {len(cache)} entries; this model needs {len(self.layers) + 1} "
                             f"(use model.make_cache())")
        h = self.embed(inputs)
        if self.args.scale_emb:
            h = h * math.sqrt(self.args.model_dim)
        for i, layer in enumerate(self.layers):
            h = layer(h, None if cache is None else cache[i])
        logits = self.output(h, self.embed, None if cache is None else cache[-1])
        return logits.astype(mx.float32)

    def make_cache(self) -> List:
        return [MegalodonCache() for _ in self.layers] + [TimestepNormCache()]

    def sanitize(self, weights: dict) -> dict:
        """Upstream keys -> this model: ``rope.freqs`` is derived from the config and a shared
        output matrix lives only in ``embed``."""
        weights = {k: v for k, v in weights.items() if k != "rope.freqs"}
        if self.args.share_emb:
            weights.pop("output.output.weight", None)
        return weights

    @property
    def head_dim(self) -> int:
        return self.args.z_head_dim
