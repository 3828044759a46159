"""Timestep normalization: group statistics accumulated along time, as upstream's Welford merge.

At step t, each group's mean/variance over its D/G features is merged with the running
(count, mean, var) with equal weight per step, so after t steps the statistics are those of all
features seen so far. Upstream walks the steps one by one; here the merge is written in closed
form with cumulative sums (shifted by the first step's mean, summed in two levels for long
sequences), which gives the same numbers in parallel. Statistics are float32 whatever x's dtype.
Packed rows (``doc_starts``) restart the statistics at every document start with segmented sums.
On a GPU the fused kernels of timestep_norm_kernels.py can replace this path (one dispatch point
in ``timestep_norm``; on by default on CUDA where it was measured, off on Metal;
MEGALODON_TNORM_KERNEL=1 / 0 forces it).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import mlx.core as mx
import mlx.nn as nn

from . import timestep_norm_kernels

_SCAN_BLOCK = 1024


class TimestepNormState(NamedTuple):
    count: mx.array  # B      int64, steps seen
    mean: mx.array   # B x G  float32
    var: mx.array    # B x G  float32


def cumsum_two_level(a: mx.array, axis: int = 1, block: int = _SCAN_BLOCK) -> mx.array:
    """Inclusive float32 cumsum along ``axis`` (=1) summed within blocks, then across blocks,
    which bounds rounding growth on million-step sequences."""
    L = a.shape[axis]
    if L == 1:        # one decoding step: no scan to launch
        return a
    if L <= block:
        return mx.cumsum(a, axis=axis)
    nb = -(-L // block)
    pad = nb * block - L
    if pad:
        a = mx.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
    blocks = a.reshape(a.shape[0], nb, block, *a.shape[2:])
    inner = mx.cumsum(blocks, axis=2)
    totals = inner[:, :, -1]
    offsets = mx.cumsum(totals, axis=1) - totals
    out = (inner + mx.expand_dims(offsets, 2)).reshape(a.shape[0], nb * block, *a.shape[2:])
    return out[:, :L]


def segmented_cumsum(a: mx.array, is_start: mx.array) -> mx.array:
    """Inclusive cumsum along axis 1 that restarts at every ``is_start`` (B x L bool) step.

    A Hillis-Steele scan (log2(L) shifted adds), so each sum is a tree of its own document's terms
    only: no difference of long running sums, whose rounding would swamp a short late document."""
    B, L = a.shape[:2]
    extra = [(0, 0)] * (a.ndim - 2)
    carry = mx.logical_not(is_start)             # step t adds what came before it
    k = 1
    while k < L:
        prev = mx.pad(a, [(0, 0), (k, 0)] + extra)[:, :L]
        a = a + mx.where(carry.reshape(B, L, *([1] * (a.ndim - 2))), prev, 0.0)
        carry = carry & mx.pad(carry, [(0, 0), (k, 0)], constant_values=False)[:, :L]
        k *= 2
    return a


def timestep_norm(x, weight, bias, state: TimestepNormState, num_groups: int, eps: float,
                  doc_starts: Optional[mx.array] = None):
    """``doc_starts`` (B x L ints: index of each token's document start) restarts the statistics
    from ``state`` at every document start, as if each document were its own sequence; the
    returned state is then the last document's."""
    if timestep_norm_kernels.kernel_wanted(x.shape, num_groups):   # the one dispatch point
        y, count, mean, var = timestep_norm_kernels.timestep_norm_kernel(
            x, weight, bias, state.count, state.mean, state.var, num_groups, eps, doc_starts)
        return y, TimestepNormState(count, mean, var)
    B, L, D = x.shape
    xf = x.astype(mx.float32).reshape(B, L, num_groups, D // num_groups)
    step_mean = xf.mean(axis=-1)                                  # B,L,G
    step_var = mx.var(xf, axis=-1)                                # biased, as upstream
    c0 = state.count.astype(mx.float32)[:, None, None]            # B,1,1
    m0, v0 = state.mean[:, None], state.var[:, None]              # B,1,G
    if doc_starts is None:
        shift = step_mean[:, :1]
        d = step_mean - shift
        s1 = c0 * (m0 - shift) + cumsum_two_level(d)
        s2 = c0 * (v0 + mx.square(m0 - shift)) + cumsum_two_level(step_var + mx.square(d))
        n = c0 + mx.arange(1, L + 1, dtype=mx.float32)[None, :, None]
        count = state.count + L
    else:
        starts = doc_starts.astype(mx.int32)
        t = mx.arange(L, dtype=mx.int32)
        is_start = starts == t
        shift = mx.take_along_axis(step_mean, mx.broadcast_to(starts[..., None], step_mean.shape), axis=1)
        d = step_mean - shift                                     # shift: the document's first step
        s1 = c0 * (m0 - shift) + segmented_cumsum(d, is_start)
        s2 = c0 * (v0 + mx.square(m0 - shift)) + segmented_cumsum(step_var + mx.square(d), is_start)
        n = c0 + (t - starts + 1).astype(mx.float32)[..., None]
        count = state.count + (L - starts[:, -1]).astype(state.count.dtype)
    mean_off = s1 / n
    mean = shift + mean_off
    var = mx.maximum(s2 / n - mx.square(mean_off), 0.0)
    rstd = mx.rsqrt(var + eps)
    y = (xf - mean[..., None]) * rstd[..., None]
    y = y.reshape(B, L, D) * (weight.astype(mx.float32) + 1.0) + bias.astype(mx.float32)
    new_state = TimestepNormState(count, mean[:, -1], var[:, -1])
    return y.astype(x.dtype), new_state


class TimestepNorm(nn.Module):
    def __init__(self, num_features: int, num_groups: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.num_groups = num_groups
        self.eps = eps
        self.weight = mx.zeros((num_features,))
        self.bias = mx.zeros((num_features,))
        # Upstream buffers: the prior the running statistics start from (count 0 ignores it).
        self.prior_count = mx.array(0, dtype=mx.int64)
        self.prior_mean = mx.zeros((num_groups,))
        self.prior_logv = mx.zeros((num_groups,))
        self.freeze(recurse=False, keys=["prior_count", "prior_mean", "prior_logv"])

    def initial_state(self, batch_size: int) -> TimestepNormState:
        count = mx.broadcast_to(self.prior_count.astype(mx.int64), (batch_size,))
        mean = mx.broadcast_to(self.prior_mean.astype(mx.float32), (batch_size, self.num_groups))
        var = mx.broadcast_to(mx.exp(self.prior_logv.astype(mx.float32)), (batch_size, self.num_groups))
        return TimestepNormState(count, mean, var)

    def __call__(self, x: mx.array, state: Optional[TimestepNormState] = None,
                 doc_starts: Optional[mx.array] = None):
        """``doc_starts``: B x L document-start indices of packed documents; every document then
        starts from the prior (``initial_state``) as if alone."""
        if state is None:
            state = self.initial_state(x.shape[0])
        return timestep_norm(x, self.weight, self.bias, state, self.num_groups, self.eps, doc_starts)
