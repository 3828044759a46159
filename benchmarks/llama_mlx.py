"""The matched Llama-style baseline (``llama_baseline``) in MLX.

Attention is ``mx.fast.scaled_dot_product_attention`` with the causal mask over the whole sequence
(full attention, no chunking); decoding keeps every key and value in a growing KV cache, as mlx-lm's
``KVCache`` does. ``__call__`` takes the keyword arguments the project's ``Trainer`` passes, so the
same training step drives both models.
"""
from __future__ import annotations

import math
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn

from benchmarks.llama_baseline import LlamaArgs


class KVCache:
    """Keys/values [B, H, capacity, head_dim]; capacity grows in multiples of ``step`` tokens."""

    def __init__(self, step: int = 256):
        self.keys = self.values = None
        self.offset = 0
        self.step = step

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        B, H, n, hd = keys.shape
        if self.keys is None or self.offset + n > self.keys.shape[2]:
            grow = ((n + self.step - 1) // self.step) * self.step
            new_k = mx.zeros((B, H, grow, hd), keys.dtype)
            new_v = mx.zeros((B, H, grow, values.shape[-1]), values.dtype)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                self.keys = mx.concatenate([self.keys[..., :self.offset, :], new_k], axis=2)
                self.values = mx.concatenate([self.values[..., :self.offset, :], new_v], axis=2)
        self.keys[..., self.offset:self.offset + n, :] = keys
        self.values[..., self.offset:self.offset + n, :] = values
        self.offset += n
        return self.keys[..., :self.offset, :], self.values[..., :self.offset, :]

    @property
    def state(self):
        return [] if self.keys is None else [self.keys, self.values]


class Attention(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        D = args.model_dim
        self.num_heads, self.head_dim, self.theta = args.num_heads, args.head_dim, args.rope_theta
        self.wq = nn.Linear(D, D, bias=False)
        self.wk = nn.Linear(D, D, bias=False)
        self.wv = nn.Linear(D, D, bias=False)
        self.wo = nn.Linear(D, D, bias=False)

    def __call__(self, x: mx.array, cache: Optional[KVCache] = None) -> mx.array:
        B, L, _ = x.shape
        H, hd = self.num_heads, self.head_dim
        q, k, v = (w(x).reshape(B, L, H, hd).transpose(0, 2, 1, 3) for w in (self.wq, self.wk, self.wv))
        offset = 0 if cache is None else cache.offset
        q = mx.fast.rope(q, hd, traditional=False, base=self.theta, scale=1.0, offset=offset)
        k = mx.fast.rope(k, hd, traditional=False, base=self.theta, scale=1.0, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        # "causal" aligns the queries with the last keys, so chunked prefill with a cache is right too.
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(hd),
                                                   mask="causal" if L > 1 else None)
        return self.wo(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class FeedForward(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.w1 = nn.Linear(args.model_dim, args.ffn_hidden_dim, bias=False)
        self.w3 = nn.Linear(args.model_dim, args.ffn_hidden_dim, bias=False)
        self.w2 = nn.Linear(args.ffn_hidden_dim, args.model_dim, bias=False)

    def __call__(self, x):
        return self.w2(nn.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.attention_norm = nn.RMSNorm(args.model_dim, eps=args.norm_eps)
        self.ffn_norm = nn.RMSNorm(args.model_dim, eps=args.norm_eps)
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)

    def __call__(self, x, cache=None):
        h = x + self.attention(self.attention_norm(x), cache)
        return h + self.feed_forward(self.ffn_norm(h))


class Model(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.model_dim)
        self.layers = [Block(args) for _ in range(args.num_layers)]
        self.norm = nn.RMSNorm(args.model_dim, eps=args.norm_eps)
        self.output = nn.Linear(args.model_dim, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache: Optional[List[KVCache]] = None, *, last_only: bool = False,
                 segment_ids=None) -> mx.array:
        if segment_ids is not None:
            raise ValueError("the Llama baseline trains on unpacked rows only (segment_ids must be None)")
        h = self.embed(inputs)
        for i, layer in enumerate(self.layers):
            h = layer(h, None if cache is None else cache[i])
        if last_only:
            h = h[:, -1:]
        return self.output(self.norm(h)).astype(mx.float32)

    def make_cache(self) -> List[KVCache]:
        return [KVCache() for _ in self.layers]


def flat_to_mlx_names(weights: dict) -> dict:
    """Weight file names -> this module's parameter paths (attention/feed_forward sub-modules)."""
    out = {}
    for key, value in weights.items():
        for short, full in ((".wq.", ".attention.wq."), (".wk.", ".attention.wk."), (".wv.", ".attention.wv."),
                            (".wo.", ".attention.wo."), (".w1.", ".feed_forward.w1."),
                            (".w2.", ".feed_forward.w2."), (".w3.", ".feed_forward.w3.")):
            if short in key:
                key = key.replace(short, full)
                break
        out[key] = value
    return out


def build(args: LlamaArgs, weights: dict, dtype=mx.float32) -> Model:
    """A model holding ``weights`` (numpy arrays keyed as in ``llama_baseline.weight_shapes``)."""
    model = Model(args)
    model.load_weights([(k, mx.array(v).astype(dtype)) for k, v in flat_to_mlx_names(weights).items()],
                       strict=True)
    mx.eval(model.parameters())
    return model
