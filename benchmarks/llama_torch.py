"""The matched Llama-style baseline (``llama_baseline``) in PyTorch, numerically the same model as
``llama_mlx`` (same weight names, RoPE rotating the two halves of each head, RMSNorm in float32).

Attention is ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels
on CUDA): ``is_causal`` for a fresh sequence, the lower-right causal bias when new queries follow
cached keys (chunked prefill), no mask for one decoded token.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.llama_baseline import LlamaArgs


class KVCache:
    """Keys/values [B, H, capacity, head_dim]; capacity grows in multiples of ``step`` tokens."""

    def __init__(self, step: int = 256):
        self.keys = self.values = None
        self.offset = 0
        self.step = step

    def update_and_fetch(self, keys: torch.Tensor, values: torch.Tensor):
        B, H, n, hd = keys.shape
        if self.keys is None or self.offset + n > self.keys.shape[2]:
            grow = ((n + self.step - 1) // self.step) * self.step
            new_k = keys.new_zeros((B, H, grow, hd))
            new_v = values.new_zeros((B, H, grow, values.shape[-1]))
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                self.keys = torch.cat([self.keys[:, :, :self.offset], new_k], dim=2)
                self.values = torch.cat([self.values[:, :, :self.offset], new_v], dim=2)
        self.keys[:, :, self.offset:self.offset + n] = keys
        self.values[:, :, self.offset:self.offset + n] = values
        self.offset += n
        return self.keys[:, :, :self.offset], self.values[:, :, :self.offset]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def rope(x: torch.Tensor, offset: int, theta: float) -> torch.Tensor:
    """x [B, H, L, hd]: rotate (first half, second half) pairs by position * theta^(-2i/hd)."""
    hd, L = x.shape[-1], x.shape[-2]
    inv = theta ** (-torch.arange(0, hd // 2, device=x.device, dtype=torch.float32) * 2.0 / hd)
    angles = (torch.arange(offset, offset + L, device=x.device, dtype=torch.float32)[:, None] * inv[None])
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.float()[..., :hd // 2], x.float()[..., hd // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        D = args.model_dim
        self.num_heads, self.head_dim, self.theta = args.num_heads, args.head_dim, args.rope_theta
        self.wq = nn.Linear(D, D, bias=False)
        self.wk = nn.Linear(D, D, bias=False)
        self.wv = nn.Linear(D, D, bias=False)
        self.wo = nn.Linear(D, D, bias=False)

    def forward(self, x, cache: Optional[KVCache] = None):
        B, L, _ = x.shape
        H, hd = self.num_heads, self.head_dim
        q, k, v = (w(x).view(B, L, H, hd).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        offset = 0 if cache is None else cache.offset
        q, k = rope(q, offset, self.theta), rope(k, offset, self.theta)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        if L == 1:
            out = F.scaled_dot_product_attention(q, k, v)
        elif offset == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            from torch.nn.attention.bias import causal_lower_right
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(L, k.shape[2]))
        return self.wo(out.transpose(1, 2).reshape(B, L, -1))


class FeedForward(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.w1 = nn.Linear(args.model_dim, args.ffn_hidden_dim, bias=False)
        self.w3 = nn.Linear(args.model_dim, args.ffn_hidden_dim, bias=False)
        self.w2 = nn.Linear(args.ffn_hidden_dim, args.model_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.model_dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.model_dim, args.norm_eps)
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)

    def forward(self, x, cache=None):
        h = x + self.attention(self.attention_norm(x), cache)
        return h + self.feed_forward(self.ffn_norm(h))


class Model(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.model_dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.model_dim, args.norm_eps)
        self.output = nn.Linear(args.model_dim, args.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor, cache: Optional[List[KVCache]] = None) -> torch.Tensor:
        h = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            h = layer(h, None if cache is None else cache[i])
        return self.output(self.norm(h)).float()

    def make_cache(self, batch_size: int = 1) -> List[KVCache]:
        return [KVCache() for _ in self.layers]


def _module_name(key: str) -> str:
    for short, full in ((".wq.", ".attention.wq."), (".wk.", ".attention.wk."), (".wv.", ".attention.wv."),
                        (".wo.", ".attention.wo."), (".w1.", ".feed_forward.w1."),
                        (".w2.", ".feed_forward.w2."), (".w3.", ".feed_forward.w3.")):
        if short in key:
            return key.replace(short, full)
    return key


def build(args: LlamaArgs, weights: dict, device="cpu", dtype=torch.float32) -> Model:
    """A model holding ``weights`` (numpy arrays keyed as in ``llama_baseline.weight_shapes``)."""
    model = Model(args)
    model.load_state_dict({_module_name(k): torch.from_numpy(v) for k, v in weights.items()}, strict=True)
    return model.to(device=device, dtype=dtype)
