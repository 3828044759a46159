"""Megalodon's attention block: TimestepNorm -> CEMA -> normalized, gated chunk-wise attention."""
from __future__ import annotations

import math
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .cache import MegalodonCache
from .complex_exponential_moving_average import MultiHeadComplexEMA
from .config import ModelArgs
from .layer_norm import RMSNorm
from .rotary_positional_embedding import apply_rope, rope_periods
from .timestep_norm import TimestepNorm


def chunk_attention(q, k, v, chunk_size: int, periods: mx.array):
    """Causal attention inside each chunk of ``chunk_size`` steps, none across chunks.

    q, k: B x H x L x dz (before RoPE), v: B x H x L x dv. Positions restart at 0 in every chunk;
    softmax(q kᵀ) has no 1/sqrt(d) scale (q and k are already normalized and scaled).
    Returns (output B x H x L x dv, rotated k).
    """
    B, H, L, _ = q.shape
    if L <= chunk_size:
        q, k = apply_rope(q, periods), apply_rope(k, periods)
        mask = "causal" if L > 1 else None
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=mask), k
    nc = -(-L // chunk_size)
    pad = nc * chunk_size - L
    if pad:  # padding sits after every real query, so the causal mask hides it
        q, k, v = (mx.pad(t, [(0, 0), (0, 0), (0, pad), (0, 0)]) for t in (q, k, v))

    def split(t):  # B,H,nc*C,d -> B*nc,H,C,d
        t = t.reshape(B, H, nc, chunk_size, t.shape[-1])
        return mx.swapaxes(t, 1, 2).reshape(B * nc, H, chunk_size, t.shape[-1])

    def merge(t):
        t = t.reshape(B, nc, H, chunk_size, t.shape[-1])
        return mx.swapaxes(t, 1, 2).reshape(B, H, nc * chunk_size, t.shape[-1])[:, :, :L]

    qc, kc = apply_rope(split(q), periods), apply_rope(split(k), periods)
    out = mx.fast.scaled_dot_product_attention(qc, kc, split(v), scale=1.0, mask="causal")
    return merge(out), merge(kc)


class MovingAverageGatedAttention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        D, Z, E = args.model_dim, args.z_dim, args.value_dim
        self.num_heads = args.num_heads
        self.z_head_dim = args.z_head_dim
        self.v_head_dim = args.v_head_dim
        self.chunk_size = args.chunk_size
        self.eps = args.norm_eps
        self.timenorm = TimestepNorm(D, args.norm_num_groups, eps=args.norm_eps)
        self.cema = MultiHeadComplexEMA(D, args.cema_ndim)
        self.rmsnorm = RMSNorm(D, eps=args.norm_eps)
        self.wv = nn.Linear(D, E)
        self.wz = nn.Linear(D, Z)
        self.wr = nn.Linear(D, E)
        self.wh1 = nn.Linear(D, D)
        self.wh2 = nn.Linear(E, D, bias=False)
        self.gamma = mx.zeros((2, Z))
        self.beta = mx.zeros((2, Z))
        self._periods = rope_periods(self.z_head_dim, args.rope_theta)

    def _heads(self, t, head_dim):  # B,L,H*d -> B,H,L,d
        B, L, _ = t.shape
        return mx.swapaxes(t.reshape(B, L, self.num_heads, head_dim), 1, 2)

    def _attend(self, q, k, v, cache: Optional[MegalodonCache]):
        if cache is None:
            return chunk_attention(q, k, v, self.chunk_size, self._periods)[0]
        C, L, fill = self.chunk_size, q.shape[2], cache.chunk_fill
        if fill == 0:
            out, k_rot = chunk_attention(q, k, v, C, self._periods)
            keep = L % C
            if keep:
                cache.write_chunk(k_rot[:, :, L - keep:], v[:, :, L - keep:], 0, C)
            return out
        # First finish the chunk in progress against its cached keys/values ...
        n = min(L, C - fill)
        q1 = apply_rope(q[:, :, :n], self._periods, offset=fill)
        k1 = apply_rope(k[:, :, :n], self._periods, offset=fill)
        cache.write_chunk(k1, v[:, :, :n], fill, C)
        keys, values = cache.keys[:, :, :fill + n], cache.values[:, :, :fill + n]
        out = mx.fast.scaled_dot_product_attention(q1, keys, values, scale=1.0, mask="causal" if n > 1 else None)
        if n == L:
            return out
        # ... then the rest starts fresh chunks.
        cache.offset += n            # the rest's chunk position is derived from the offset
        rest = self._attend(q[:, :, n:], k[:, :, n:], v[:, :, n:], cache)
        cache.offset -= n
        return mx.concatenate([out, rest], axis=2)

    def _attend_step(self, q, k, v, keys, values, pos):
        """One token at chunk position ``pos`` (an array, so a compiled step serves every position):
        write its key/value into the fixed-size chunk buffers and attend to positions <= pos."""
        q = apply_rope(q, self._periods, offset=pos)
        k = apply_rope(k, self._periods, offset=pos)
        slot = (mx.arange(self.chunk_size) == pos)[:, None]
        keys, values = mx.where(slot, k, keys), mx.where(slot, v, values)
        visible = mx.arange(self.chunk_size) <= pos
        out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=1.0, mask=visible)
        return out, keys, values

    def _gates(self, x, norm_state, cema_state, need_state):
        B, L, _ = x.shape
        dtype = x.dtype
        xn, norm_state = self.timenorm(x, norm_state)
        c, cema_state = self.cema(xn, cema_state, return_state=need_state)
        mx_ = self.rmsnorm(c.astype(dtype))
        z = self.wz(mx_).reshape(B, L, self.num_heads, self.z_head_dim)
        z = mx.fast.rms_norm(z, None, self.eps).reshape(B, L, -1)
        scale = (self.gamma + 1.0) / math.sqrt(self.z_head_dim)
        q = z * scale[0].astype(dtype) + self.beta[0].astype(dtype)
        k = z * scale[1].astype(dtype) + self.beta[1].astype(dtype)
        v = nn.silu(self.wv(xn))
        r = nn.silu(self.wr(mx_))
        heads = (self._heads(q, self.z_head_dim), self._heads(k, self.z_head_dim), self._heads(v, self.v_head_dim))
        return heads, r, mx_, norm_state, cema_state

    def _output(self, x, attn, r, mx_):
        B, L, _ = x.shape
        attn = mx.swapaxes(attn, 1, 2).reshape(B, L, -1)
        return self.wh1(mx_) + self.wh2(attn * r) + x

    def __call__(self, x: mx.array, cache: Optional[MegalodonCache] = None) -> mx.array:
        (q, k, v), r, mx_, norm_state, cema_state = self._gates(
            x, None if cache is None else cache.norm, None if cache is None else cache.cema, cache is not None)
        attn = self._attend(q, k, v, cache)
        if cache is not None:
            cache.norm, cache.cema = norm_state, cema_state
            cache.offset += x.shape[1]
        return self._output(x, attn, r, mx_)

    def step(self, x, norm_state, cema_state, keys, values, pos):
        """Decode one token from explicit state arrays (the compiled decoding path)."""
        (q, k, v), r, mx_, norm_state, cema_state = self._gates(x, norm_state, cema_state, True)
        attn, keys, values = self._attend_step(q, k, v, keys, values, pos)
        return self._output(x, attn, r, mx_), norm_state, cema_state, keys, values
