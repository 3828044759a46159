"""Megalodon's attention block: TimestepNorm -> CEMA -> normalized, gated chunk-wise attention."""
from __future__ import annotations

import math
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from . import attention_kernels
from .cache import MegalodonCache
from .complex_exponential_moving_average import MultiHeadComplexEMA
from .config import ModelArgs
from .layer_norm import RMSNorm
from .linear import Linear
from .rotary_positional_embedding import apply_rope, rope_periods
from .timestep_norm import TimestepNorm


def chunk_attention(q, k, v, chunk_size: int, periods: mx.array):
    """Causal attention inside each chunk of ``chunk_size`` steps, none across chunks.

    q, k: B x H x L x dz (before RoPE), v: B x H x L x dv. Positions restart at 0 in every chunk;
    softmax(q kᵀ) has no 1/sqrt(d) scale (q and k are already normalized and scaled).
    Returns (output B x H x L x dv, rotated k).

    Runs on the fused kernel (attention_kernels) where ``attention_kernel_wanted`` says it beats
    SDPA, else on ``mx.fast.scaled_dot_product_attention`` over the reshaped chunks.
    """
    B, H, L, _ = q.shape
    if attention_kernel_wanted("chunk", q.shape, v.shape[-1], chunk_size, q.dtype):
        q, k = rope_in_chunks(q, chunk_size, periods), rope_in_chunks(k, chunk_size, periods)
        return attention_kernels.chunk_attention_kernel(q, k, v, chunk_size), k
    if L <= chunk_size:
        q, k = apply_rope(q, periods), apply_rope(k, periods)
        if L == 1:
            return mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0), k
        return causal_sdpa(q, k, v), k
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
    return merge(causal_sdpa(qc, kc, split(v))), merge(kc)


# Query blocks per chunk for causal_sdpa (1: one SDPA call per chunk).
CAUSAL_SPLIT_PARTS = 2
CAUSAL_SPLIT_MIN_BLOCK = 512


def causal_sdpa(q, k, v):
    """Causal SDPA (no scale) of equal-length q and k, with the queries cut into CAUSAL_SPLIT_PARTS
    blocks, block i attending to the keys up to its own end only (MLX aligns a causal mask of
    fewer queries than keys to the last key). MLX has no fused SDPA for q/k and v of different
    head dims (Megalodon's 256 / 2048), so it computes every query-key product and masks half of
    them away; the blocks skip the keys past each block: 3/4 of the products with 2 blocks."""
    L = q.shape[-2]
    parts = CAUSAL_SPLIT_PARTS
    if parts <= 1 or L % parts or L // parts < CAUSAL_SPLIT_MIN_BLOCK:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask="causal")
    step = L // parts
    outs = [mx.fast.scaled_dot_product_attention(q[..., i * step:(i + 1) * step, :], k[..., :(i + 1) * step, :],
                                                 v[..., :(i + 1) * step, :], scale=1.0, mask="causal")
            for i in range(parts)]
    return mx.concatenate(outs, axis=-2)


def attention_kernel_wanted(kind: str, q_shape, v_dim: int, chunk_size: int, dtype) -> bool:
    """The one switch between the attention kernels and SDPA (policy in attention_kernels)."""
    return attention_kernels.attention_kernel_wanted(kind, q_shape, v_dim, chunk_size, dtype)


def rope_in_chunks(x: mx.array, chunk_size: int, periods: mx.array) -> mx.array:
    """RoPE with positions restarting at 0 in every chunk: x B x H x L x d, same shape back."""
    B, H, L, d = x.shape
    if L <= chunk_size:
        return apply_rope(x, periods)
    nc = -(-L // chunk_size)
    pad = nc * chunk_size - L
    if pad:
        x = mx.pad(x, [(0, 0), (0, 0), (0, pad), (0, 0)])
    x = apply_rope(x.reshape(B, H, nc, chunk_size, d), periods).reshape(B, H, nc * chunk_size, d)
    return x[:, :, :L] if pad else x


def rope_at(x: mx.array, periods: mx.array, positions: mx.array) -> mx.array:
    """Interleaved-pair RoPE at per-token positions: x B x H x L x d, positions B x L (ints).
    The same angles as ``apply_rope`` (position · 1/period), computed in float32."""
    B, H, L, d = x.shape
    angle = positions.astype(mx.float32)[:, None, :, None] * mx.reciprocal(periods)   # B,1,L,d/2
    cos, sin = mx.cos(angle), mx.sin(angle)
    pairs = x.astype(mx.float32).reshape(B, H, L, d // 2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = mx.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return out.reshape(B, H, L, d).astype(x.dtype)


def packed_chunk_attention(q, k, v, chunk_size: int, periods: mx.array, doc_starts: mx.array):
    """``chunk_attention`` for rows of packed documents: each document is chunked from its own
    start (doc-relative chunk (t - start) // C, RoPE position (t - start) % C) and attention never
    crosses a document or a doc-relative chunk.

    doc_starts: B x L ints, each token's document start. A doc-relative chunk spans at most two
    global chunks, so the queries of global chunk g attend to the keys of chunks g-1 and g under a
    boolean mask: key j is visible to query t iff t - (t - start_t) % C <= j <= t.
    Returns the output B x H x L x dv.
    """
    B, H, L, _ = q.shape
    C = chunk_size
    t = mx.arange(L, dtype=mx.int32)
    rel = (t - doc_starts.astype(mx.int32)) % C                  # B,L position in its chunk
    q, k = rope_at(q, periods, rel), rope_at(k, periods, rel)
    first = t - rel                                              # B,L first step of t's chunk
    nc = -(-L // C)
    pad = nc * C - L
    if pad:  # padded steps see only themselves and come after every real one
        q, k, v = (mx.pad(a, [(0, 0), (0, 0), (0, pad), (0, 0)]) for a in (q, k, v))
        first = mx.concatenate([first, mx.broadcast_to(mx.arange(L, L + pad, dtype=mx.int32), (B, pad))], axis=1)

    def split(a):  # B,H,nc*C,d -> B,nc,H,C,d
        return mx.swapaxes(a.reshape(B, H, nc, C, a.shape[-1]), 1, 2)

    def with_previous(a):  # B,nc,H,C,d -> B*nc,H,2C,d: chunk g-1 (zeros for g = 0) then chunk g
        prev = mx.pad(a, [(0, 0), (1, 0), (0, 0), (0, 0), (0, 0)])[:, :nc]
        return mx.concatenate([prev, a], axis=3).reshape(B * nc, H, 2 * C, a.shape[-1])

    qc = split(q).reshape(B * nc, H, C, q.shape[-1])
    kc, vc = with_previous(split(k)), with_previous(split(v))
    g = mx.arange(nc, dtype=mx.int32)[:, None, None] * C
    query_pos = g + mx.arange(C, dtype=mx.int32)[None, :, None]            # nc,C,1
    key_pos = g - C + mx.arange(2 * C, dtype=mx.int32)[None, None, :]      # nc,1,2C
    mask = (key_pos <= query_pos) & (key_pos >= first.reshape(B, nc, C, 1))  # B,nc,C,2C
    out = mx.fast.scaled_dot_product_attention(qc, kc, vc, scale=1.0, mask=mask.reshape(B * nc, 1, C, 2 * C))
    out = mx.swapaxes(out.reshape(B, nc, H, C, -1), 1, 2).reshape(B, H, nc * C, -1)
    return out[:, :, :L]


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
        self.wv = Linear(D, E)
        self.wz = Linear(D, Z)
        self.wr = Linear(D, E)
        self.wh1 = Linear(D, D)
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
                cache.write_chunk(k_rot[:, :, L - keep:], v[:, :, L - keep:], 0)
            return out
        # First finish the chunk in progress against its cached keys/values ...
        n = min(L, C - fill)
        q1 = apply_rope(q[:, :, :n], self._periods, offset=fill)
        k1 = apply_rope(k[:, :, :n], self._periods, offset=fill)
        cache.write_chunk(k1, v[:, :, :n], fill)
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
        # Write one row in place of a select over the whole buffer: a select reads and rewrites
        # every cached row each token (per layer 9 MB in bf16 for mega200M), the update one row.
        row = mx.reshape(pos, (1,))
        keys = mx.slice_update(keys, k.astype(keys.dtype), row, axes=(2,))
        values = mx.slice_update(values, v.astype(values.dtype), row, axes=(2,))
        if attention_kernel_wanted("decode", q.shape, values.shape[-1], self.chunk_size, q.dtype):
            return attention_kernels.decode_attention_kernel(q, keys, values, pos), keys, values
        visible = mx.arange(self.chunk_size) <= pos
        out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=1.0, mask=visible)
        return out, keys, values

    def _gates(self, x, norm_state, cema_state, need_state, doc_starts=None, exchange=None):
        B, L, _ = x.shape
        dtype = x.dtype
        if exchange is not None:   # span of a sequence split over ranks: incoming states from the others
            norm_state = exchange.norm_state(self.timenorm, x)
        xn, norm_state = self.timenorm(x, norm_state, doc_starts)
        if exchange is not None:
            cema_state = exchange.cema_state(self.cema, xn)
        # y in the compute dtype straight from the scan (it accumulates in float32 either way)
        c, cema_state = self.cema(xn, cema_state, return_state=need_state, doc_starts=doc_starts, y_dtype=dtype)
        mx_ = self.rmsnorm(c)
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

    def __call__(self, x: mx.array, cache: Optional[MegalodonCache] = None,
                 doc_starts: Optional[mx.array] = None, exchange=None) -> mx.array:
        """``doc_starts`` (B x L ints, the index of each token's document start; full forward only):
        packed documents, each processed as if it were its own sequence.

        ``exchange`` (full forward only; see ``chunk_parallel.SpanExchange``): x is one rank's span
        of a longer sequence; the TimestepNorm and CEMA states entering the span are obtained from
        ``exchange.norm_state(timenorm, x)`` and ``exchange.cema_state(cema, xn)``."""
        if exchange is not None:
            if cache is not None or doc_starts is not None:
                raise ValueError("exchange (chunk-parallel spans) takes neither a cache nor doc_starts")
            (q, k, v), r, mx_, _, _ = self._gates(x, None, None, False, exchange=exchange)
            return self._output(x, chunk_attention(q, k, v, self.chunk_size, self._periods)[0], r, mx_)
        if doc_starts is not None:
            if cache is not None:
                raise ValueError("packed documents (doc_starts) are for full forward passes, not with a cache")
            (q, k, v), r, mx_, _, _ = self._gates(x, None, None, False, doc_starts)
            attn = packed_chunk_attention(q, k, v, self.chunk_size, self._periods, doc_starts)
            return self._output(x, attn, r, mx_)
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
