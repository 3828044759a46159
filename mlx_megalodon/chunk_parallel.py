"""Chunk parallelism (paper §3.5): one long sequence split over ranks, in a parallel form.

Rank r holds the contiguous span [r·Ls, (r+1)·Ls) of every row, Ls a multiple of chunk_size, so
the block-diagonal chunk attention is rank-local. The two recurrent states compose associatively:

* TimestepNorm: a span's Welford summary (count, mean, var per batch x group) is computed from the
  layer's input x alone; the summaries of ranks < r, merged with the norm's prior, are rank r's
  incoming state.
* CEMA: h_r, the span's final state from a zero state, is a matmul over xn (``final_state``); the
  state entering rank r is H_r = Σ_{k<r} q^{Ls·(r-1-k)} h_k.

Each summary is gathered over ranks with one collective (an ``all_sum`` of a zero tensor holding
this rank's slot). In MLX 0.32.4 the VJPs of ``all_sum`` and ``all_gather`` are local (measured:
identity, and this rank's slot of its own cotangent), so the gather is a ``custom_function`` whose
VJP all_sums the cotangent (one collective per exchange in the backward too); the rest of the
backward pass is MLX autodiff. The gradients of each rank are partial sums: all_sum them. Per layer: one exchange for the norm, one for CEMA (CEMA's summary needs
the normalized input); one more for the output layer's norm.

    logits_span = chunk_parallel_logits(model, tokens_span)        # B x Ls x vocab on this rank
    loss = chunk_parallel_loss(model, tokens_span, targets_span)    # this span's CE sum
"""
from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .complex_exponential_moving_average import _powers, final_state
from .timestep_norm import TimestepNormState


class SpanExchange:
    """Turns this rank's span summaries into the states entering its span (the layer hook)."""

    def __init__(self, group: Optional[mx.distributed.Group] = None):
        self.group = group if group is not None else mx.distributed.init()
        self.rank = self.group.rank()
        self.size = self.group.size()
        group, rank, size = self.group, self.rank, self.size

        # MLX 0.32.4's VJPs of all_sum and all_gather are local (identity / own slot): they give
        # each rank only the gradient of its own loss. The loss here is the sum over ranks, so the
        # cotangent of a gathered tensor is summed over ranks before taking this rank's slot.
        @mx.custom_function
        def gather(a):
            slot = (mx.arange(size) == rank).reshape(size, *([1] * a.ndim))
            return mx.distributed.all_sum(mx.where(slot, a[None], mx.zeros_like(a)[None]), group=group)

        @gather.vjp
        def gather_vjp(primals, cotangent, output):
            return (mx.distributed.all_sum(cotangent, group=group)[rank],)

        self._gather = gather

    def gather(self, a: mx.array) -> mx.array:
        """size x a.shape: every rank's ``a``; its VJP sums the cotangents over ranks."""
        return self._gather(a)

    def norm_state(self, norm, x: mx.array) -> TimestepNormState:
        B, L, D = x.shape
        G = norm.num_groups
        prior = norm.initial_state(B)
        xf = x.astype(mx.float32).reshape(B, L, G, D // G)
        step_mean = xf.mean(axis=-1)                                   # B,L,G
        step_var = mx.var(xf, axis=-1)
        span_mean = step_mean.mean(axis=1)                             # B,G: equal weight per step
        span_var = (step_var + mx.square(step_mean - span_mean[:, None])).mean(axis=1)
        both = self.gather(mx.stack([span_mean, span_var]))            # R,2,B,G
        r = self.rank
        if r == 0:   # the result must still be used: every rank takes part in every collective
            return TimestepNormState(prior.count, prior.mean + 0.0 * both.sum(), prior.var)
        means, variances = both[:r, 0], both[:r, 1]                    # ranks before this one
        m_b = means.mean(axis=0)                                       # pooled, r·L steps
        v_b = variances.mean(axis=0) + mx.square(means - m_b).mean(axis=0)
        c_a = prior.count.astype(mx.float32)[:, None]
        c_b = float(r * L)
        n = c_a + c_b
        delta = m_b - prior.mean
        mean = prior.mean + delta * (c_b / n)
        var = (c_a * prior.var + c_b * v_b) / n + c_a * c_b / mx.square(n) * mx.square(delta)
        return TimestepNormState(prior.count + r * L, mean, var)

    def cema_state(self, cema, xn: mx.array):
        coeffs = cema.coefficients()
        L = xn.shape[1]
        h_re, h_im = final_state(mx.swapaxes(xn.astype(mx.float32), 1, 2), coeffs)   # B,D,N
        both = self.gather(mx.stack([h_re, h_im]))                     # R,2,B,D,N
        r = self.rank
        if r == 0:   # zero incoming state, tied to the collective so that it runs here too
            zero = mx.zeros_like(h_re) + 0.0 * both.sum()
            return zero, zero
        exps = L * ((r - 1) - mx.arange(r))                             # q^{L(r-1-k)}, k < r
        p_re, p_im = _powers(coeffs.log_mag, coeffs.phase, exps)       # D,N,r
        p_re, p_im = mx.moveaxis(p_re, -1, 0)[:, None], mx.moveaxis(p_im, -1, 0)[:, None]  # r,1,D,N
        g_re, g_im = both[:r, 0], both[:r, 1]
        return ((p_re * g_re - p_im * g_im).sum(axis=0), (p_re * g_im + p_im * g_re).sum(axis=0))


def chunk_parallel_logits(model, tokens_span: mx.array, group: Optional[mx.distributed.Group] = None) -> mx.array:
    """This rank's B x Ls x vocab logits of a sequence split into equal spans over ``group``'s ranks
    (rank r holds tokens [r·Ls, (r+1)·Ls)); equal to the matching slice of the full forward."""
    Ls = tokens_span.shape[1]
    C = model.args.chunk_size
    if Ls % C:
        raise ValueError(f"span length {Ls} must be a multiple of chunk_size {C}")
    return model(tokens_span, exchange=SpanExchange(group))


def chunk_parallel_loss(model, tokens_span, targets_span, group=None) -> mx.array:
    """Sum of this span's next-token cross-entropies (sum over ranks = the full sequence's sum)."""
    logits = chunk_parallel_logits(model, tokens_span, group)
    return nn.losses.cross_entropy(logits, targets_span, reduction="sum")
