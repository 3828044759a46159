"""Megalodon's moving-average gated attention block (MEGA with CEMA and TimestepNorm).

    xn = timenorm(x);  c = cema(xn);  mx = rmsnorm(c)
    z  = per-head RMS(wz(mx)) (no affine);  q/k = z * (gamma[0/1] + 1)/sqrt(dz) + beta[0/1]
    v  = silu(wv(xn));  r = silu(wr(mx))
    o  = softmax(rope(q) rope(k)^T) v  -- no extra scaling, causal inside each chunk only
    out = wh1(mx) + wh2(o * r) + x
Attention is block-diagonal over chunks of ``chunk_size`` positions and RoPE positions restart at 0
in every chunk. Any length works: the last chunk may be partial, and with a cache the sequence may
start anywhere inside a chunk (the cached keys/values of that chunk are prepended).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .cache import LayerCache
from .complex_exponential_moving_average import MultiHeadComplexEMA
from .layer_norm import RMSNorm, rms_norm
from .rotary_positional_embedding import RotaryEmbedding
from .timestep_norm import TimestepNorm


def chunked_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int,
                             chunk_size: int) -> torch.Tensor:
    """Block-diagonal causal softmax attention with no score scaling.

    k [B, S, H, dz], v [B, S, H, dv] cover absolute positions 0..S-1, and position 0 is a chunk
    boundary; q [B, L, H, dz] holds the queries at positions start..S-1 (S = start + L).
    A query at position a sees the keys b <= a with b // chunk_size == a // chunk_size.
    Scores are in q's dtype, the softmax is accumulated in float32 (float64 for float64 q).
    Returns [B, L, H, dv]."""
    total = k.shape[1]
    assert total == start + q.shape[1], (total, start, q.shape)
    sm_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    outs = []
    for ks in range(0, total, chunk_size):
        ke = min(ks + chunk_size, total)
        qs = max(ks, start)
        if qs >= ke:
            continue
        qb = q[:, qs - start:ke - start].transpose(1, 2)        # B x H x Lq x dz
        kb = k[:, ks:ke].transpose(1, 2)                         # B x H x Lk x dz
        vb = v[:, ks:ke].transpose(1, 2)                         # B x H x Lk x dv
        scores = torch.matmul(qb, kb.transpose(-1, -2))
        lq, lk = scores.shape[-2], scores.shape[-1]
        allowed = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=qs - ks)
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = F.softmax(scores, dim=-1, dtype=sm_dtype).to(vb.dtype)
        outs.append(torch.matmul(probs, vb).transpose(1, 2))    # B x Lq x H x dv
    return torch.cat(outs, dim=1)


class MovingAverageGatedAttention(nn.Module):
    def __init__(self, mdim: int, zdim: int, hdim: int, ndim: int, num_heads: int,
                 chunk_size: int, norm_num_groups: int, norm_eps: float = 1e-5,
                 norm_affine: bool = True):
        super().__init__()
        assert zdim % num_heads == 0 and hdim % num_heads == 0
        self.mdim, self.zdim, self.hdim, self.ndim = mdim, zdim, hdim, ndim
        self.num_heads = num_heads
        self.z_head_dim = zdim // num_heads
        self.v_head_dim = hdim // num_heads
        self.chunk_size = chunk_size
        self.norm_eps = norm_eps

        self.timenorm = TimestepNorm(mdim, norm_num_groups, eps=norm_eps)
        self.cema = MultiHeadComplexEMA(mdim, ndim)
        self.rmsnorm = RMSNorm(mdim, eps=norm_eps, elementwise_affine=norm_affine)
        self.wv = nn.Linear(mdim, hdim, bias=True)
        self.wz = nn.Linear(mdim, zdim, bias=True)
        self.wr = nn.Linear(mdim, hdim, bias=True)
        self.wh1 = nn.Linear(mdim, mdim, bias=True)
        self.wh2 = nn.Linear(hdim, mdim, bias=False)
        self.gamma = nn.Parameter(torch.zeros(2, zdim))
        self.beta = nn.Parameter(torch.zeros(2, zdim))

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding,
                cache: Optional[LayerCache] = None) -> Tuple[torch.Tensor, Optional[LayerCache]]:
        """x [B, L, D]. With a cache, the sequence continues the cached one and a new LayerCache is
        returned (states detached); without, it starts fresh and None is returned."""
        bsz, seq_len, _ = x.shape
        heads, dz, dv = self.num_heads, self.z_head_dim, self.v_head_dim
        residual = x

        xn, norm_state = self.timenorm(x, None if cache is None else cache.norm)
        c, hx = self.cema(xn.transpose(1, 2), None if cache is None else cache.cema,
                          compute_last_state=cache is not None)
        mx = self.rmsnorm(c.transpose(1, 2))

        z = self.wz(mx).view(bsz, seq_len, heads, dz)
        z = rms_norm(z, None, self.norm_eps).view(bsz, seq_len, self.zdim)
        scale = (self.gamma + 1.0) / math.sqrt(dz)                       # 2 x Z
        qk = z.unsqueeze(2) * scale.to(z.dtype) + self.beta.to(z.dtype)  # B x L x 2 x Z
        q, k = qk.unbind(dim=2)
        q = q.to(x.dtype).reshape(bsz, seq_len, heads, dz)
        k = k.to(x.dtype).reshape(bsz, seq_len, heads, dz)

        v = F.silu(self.wv(xn)).view(bsz, seq_len, heads, dv)
        r = F.silu(self.wr(mx))

        start = 0 if cache is None else cache.pos
        positions = (start + torch.arange(seq_len, device=x.device)) % self.chunk_size
        q = rope(q, positions)
        k = rope(k, positions)
        if cache is not None and start > 0:
            k = torch.cat([cache.k.to(k.dtype), k], dim=1)
            v = torch.cat([cache.v.to(v.dtype), v], dim=1)
        o = chunked_causal_attention(q, k, v, start, self.chunk_size).reshape(bsz, seq_len, self.hdim)

        h = self.wh1(mx) + self.wh2(o * r)
        out = h + residual

        new_cache = None
        if cache is not None:
            total = start + seq_len
            keep = total % self.chunk_size
            new_cache = LayerCache(
                cema=hx.detach(),
                norm=tuple(t.detach() for t in norm_state),
                k=k[:, total - keep:].detach(),
                v=v[:, total - keep:].detach(),
                pos=keep,
            )
        return out, new_cache

    def extra_repr(self) -> str:
        return (f"mdim={self.mdim}, zdim={self.zdim}, hdim={self.hdim}, heads={self.num_heads}, "
                f"ndim={self.ndim}, chunk={self.chunk_size}")
