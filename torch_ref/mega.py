"""The Megalodon language model (PyTorch reference), laid out like upstream's ``Mega`` so that its
``state_dict`` has exactly upstream's keys and shapes (model-parallel size 1)."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from mlx_megalodon.config import ModelArgs, is_full_precision_key

from .cache import LayerCache, MegaCache
from .moving_average_gated_attention import MovingAverageGatedAttention
from .normalized_feedforward_network import NormalizedFeedForwardNetwork
from .rotary_positional_embedding import RotaryEmbedding
from .timestep_norm import TimestepNorm


class MegaBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.mega = MovingAverageGatedAttention(
            mdim=args.model_dim, zdim=args.z_dim, hdim=args.value_dim, ndim=args.cema_ndim,
            num_heads=args.num_heads, chunk_size=args.chunk_size,
            norm_num_groups=args.norm_num_groups, norm_eps=args.norm_eps,
            norm_affine=args.norm_affine)
        rescale = 0.1 * (0.5 ** layer_id) if args.rescale_nffn else None
        self.nffn = NormalizedFeedForwardNetwork(
            args.model_dim, args.ffn_hidden_dim, swiglu=args.swiglu, norm_eps=args.norm_eps,
            rescale=rescale)

    def forward(self, x, rope, cache: Optional[LayerCache] = None):
        y, cache = self.mega(x, rope, cache)
        return self.nffn(y, x), cache          # the FFN's residual is the block input


class MegaOutputLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.final_norm = TimestepNorm(args.model_dim, args.norm_num_groups, eps=args.norm_eps)
        self.output = nn.Linear(args.model_dim, args.output_dim, bias=False)

    def forward(self, x, state=None):
        x, state = self.final_norm(x, state)
        return self.output(x), state


class Mega(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        args.validate()
        self.args = args
        self.chunk_size = args.chunk_size
        self.emb_scale = math.sqrt(args.model_dim) if args.scale_emb else None
        self.embed = nn.Embedding(args.vocab_size, args.model_dim)
        self.rope = RotaryEmbedding(args.z_head_dim, args.rope_base)
        self.layers = nn.ModuleList(MegaBlock(args, i) for i in range(args.num_layers))
        self.output = MegaOutputLayer(args)
        if args.share_emb:
            self.output.output.weight = self.embed.weight

    # ------------------------------------------------------------------ dtype / device
    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def to_compute_dtype(self, dtype: torch.dtype) -> "Mega":
        """Cast the projection/embedding weights to `dtype`, keeping CEMA, every norm, the Q/K
        affine, nffn.alpha and the buffers in float32 (what upstream keeps in full precision).
        A float64 dtype casts everything."""
        if dtype == torch.float64:
            return self.to(torch.float64)
        for name, param in self.named_parameters():
            target = torch.float32 if is_full_precision_key(name) else dtype
            param.data = param.data.to(target)
        for name, buf in self.named_buffers():
            if buf.is_floating_point():
                buf.data = buf.data.to(torch.float32)
        return self

    # ------------------------------------------------------------------ cache
    def make_cache(self, batch_size: int = 1) -> MegaCache:
        """A fresh streaming state: CEMA states zero, TimestepNorms at their priors, no keys."""
        dev = self.device
        f64 = self.dtype == torch.float64
        sd = torch.float64 if f64 else torch.float32
        cd = torch.complex128 if f64 else torch.complex64
        args = self.args
        layers = []
        for layer in self.layers:
            m = layer.mega
            layers.append(LayerCache(
                cema=torch.zeros(batch_size, args.model_dim, args.cema_ndim, dtype=cd, device=dev),
                norm=m.timenorm.initial_state(batch_size, sd),
                k=torch.zeros(batch_size, 0, args.num_heads, args.z_head_dim, dtype=self.dtype, device=dev),
                v=torch.zeros(batch_size, 0, args.num_heads, args.v_head_dim, dtype=self.dtype, device=dev),
                pos=0))
        return MegaCache(layers=layers, final_norm=self.output.final_norm.initial_state(batch_size, sd),
                         offset=0, batch_size=batch_size)

    # ------------------------------------------------------------------ forward
    def forward(self, tokens: torch.Tensor, cache: Optional[MegaCache] = None) -> torch.Tensor:
        """tokens [B, L] int -> logits [B, L, output_dim] float32. Any L >= 1.

        With `cache` (from make_cache) the tokens continue the cached sequence and the cache is
        updated in place; any split of a sequence gives the logits of one full call."""
        if tokens.dim() != 2 or tokens.shape[1] == 0:
            raise ValueError(f"tokens must be [batch, length >= 1], got {tuple(tokens.shape)}")
        tokens = tokens.to(self.device)
        x = self.embed(tokens)
        if self.emb_scale is not None:
            x = x * self.emb_scale
        for i, layer in enumerate(self.layers):
            x, layer_cache = layer(x, self.rope, None if cache is None else cache.layers[i])
            if cache is not None:
                cache.layers[i] = layer_cache
        logits, final_state = self.output(x, None if cache is None else cache.final_norm)
        if cache is not None:
            cache.final_norm = tuple(t.detach() for t in final_state)
            cache.offset += tokens.shape[1]
        return logits.float()
