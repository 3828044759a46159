"""Multi-head complex exponential moving average (CEMA), upstream's coefficient placement.

    h_t = q ⊙ h_{t-1} + p ⊙ x_t          p = sigmoid(alpha)                      (real, D x N)
    y_t = Re(Σ_n gamma_n h_{t,n}) + omega ⊙ x_t
    q   = (1 - sigmoid(alpha)·sigmoid(delta)) · exp(i·k·sigmoid(theta)·2π/N),  k = 1..N
    gamma = complex(gamma[..., 0], gamma[..., 1]) / sqrt(N)

Everything here runs in float32 with complex numbers carried as (real, imag) pairs, whatever the
input dtype: real arithmetic keeps MLX autodiff on well-trodden ground on every backend. Long
segments use an FFT convolution; short ones (decoding) step the recurrence. The custom-kernel scan
lives in ``kernels.py`` and is picked in ``cema_scan`` below, the single dispatch point. Packed rows
(several documents, the state reset to zero at each start) take the kernel's reset variant where
the kernel is available, else ``cema_segmented``, a blocked scan in pure ops.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

# Segments up to this length step the recurrence; longer ones use the FFT convolution.
RECURRENCE_MAX_LEN = 16
# Block length of the packed-document (reset) scan, cema_segmented.
SEGMENT_BLOCK = 64


class CEMACoefficients(NamedTuple):
    p: mx.array         # D x N   input coefficient
    log_mag: mx.array   # D x N   log |q|
    phase: mx.array     # D x N   arg q
    gamma_re: mx.array  # D x N   output projection (scaled by 1/sqrt(N))
    gamma_im: mx.array  # D x N
    omega: mx.array     # D       skip weight


def _powers(log_mag: mx.array, phase: mx.array, exponents: mx.array) -> Tuple[mx.array, mx.array]:
    """q**e for every exponent e (last axis), as exp(e·log q) rather than repeated products."""
    e = exponents.astype(mx.float32)
    mag = mx.exp(log_mag[..., None] * e)
    angle = phase[..., None] * e
    return mag * mx.cos(angle), mag * mx.sin(angle)


def _block_sizes(length: int) -> Tuple[int, int]:
    inner = max(1, math.isqrt(max(length - 1, 0)) + 1)
    return inner, -(-length // inner)


def power_series(c_re, c_im, coeffs: CEMACoefficients, start: int, length: int) -> mx.array:
    """Re Σ_n c_n q_n^(start + j) for j in [0, length): shape (..., D, length).

    Computed blockwise (j = a·S + b, q^j = q^(aS)·q^b) as one real matmul over 2N, so memory is
    O(D·N·sqrt(L)) instead of O(D·N·L).
    """
    S, A = _block_sizes(length)
    outer_re, outer_im = _powers(coeffs.log_mag, coeffs.phase, start + S * mx.arange(A))  # D,N,A
    outer_re, outer_im = mx.swapaxes(outer_re, -1, -2), mx.swapaxes(outer_im, -1, -2)     # D,A,N
    c_re, c_im = c_re[..., None, :], c_im[..., None, :]                                    # ...,D,1,N
    u_re = c_re * outer_re - c_im * outer_im
    u_im = c_re * outer_im + c_im * outer_re
    inner_re, inner_im = _powers(coeffs.log_mag, coeffs.phase, mx.arange(S))               # D,N,S
    lhs = mx.concatenate([u_re, -u_im], axis=-1)                                           # ...,D,A,2N
    rhs = mx.concatenate([inner_re, inner_im], axis=-2)                                    # D,2N,S
    out = lhs @ rhs                                                                        # ...,D,A,S
    return out.reshape(*out.shape[:-2], A * S)[..., :length]


def final_state(x_t: mx.array, coeffs: CEMACoefficients, h0_re=None, h0_im=None):
    """h_L = p Σ_j q^(L-1-j) x_j + q^L h0 for x_t of shape (B, D, L); returns (re, im) B x D x N."""
    L = x_t.shape[-1]
    S, A = _block_sizes(L)
    pad = A * S - L
    if pad:
        x_t = mx.pad(x_t, [(0, 0), (0, 0), (pad, 0)])                  # leading zeros add nothing
    blocks = x_t.reshape(*x_t.shape[:-1], A, S)                          # B,D,A,S
    w_re, w_im = _powers(coeffs.log_mag, coeffs.phase, (S - 1) - mx.arange(S))  # D,N,S
    w = mx.swapaxes(mx.concatenate([w_re, w_im], axis=-2), -1, -2)      # D,S,2N
    local = blocks @ w                                                   # B,D,A,2N
    N = coeffs.p.shape[-1]
    l_re, l_im = local[..., :N], local[..., N:]
    o_re, o_im = _powers(coeffs.log_mag, coeffs.phase, S * ((A - 1) - mx.arange(A)))  # D,N,A
    o_re, o_im = mx.swapaxes(o_re, -1, -2), mx.swapaxes(o_im, -1, -2)   # D,A,N
    h_re = coeffs.p * (l_re * o_re - l_im * o_im).sum(axis=-2)
    h_im = coeffs.p * (l_re * o_im + l_im * o_re).sum(axis=-2)
    if h0_re is not None:
        qL_re, qL_im = _powers(coeffs.log_mag, coeffs.phase, mx.array([L]))
        qL_re, qL_im = qL_re[..., 0], qL_im[..., 0]
        h_re = h_re + qL_re * h0_re - qL_im * h0_im
        h_im = h_im + qL_re * h0_im + qL_im * h0_re
    return h_re, h_im


def cema_fft(x: mx.array, coeffs: CEMACoefficients, state=None, return_state=False):
    """x: B x L x D float32. state: (re, im) B x D x N or None. Returns (y B x L x D, state)."""
    B, L, D = x.shape
    x_t = mx.swapaxes(x, 1, 2)                                           # B,D,L
    kernel = power_series(coeffs.p * coeffs.gamma_re, coeffs.p * coeffs.gamma_im, coeffs, 0, L)
    n = 1 << (2 * L - 1).bit_length()
    y = mx.fft.irfft(mx.fft.rfft(x_t, n=n) * mx.fft.rfft(kernel, n=n), n=n)[..., :L]
    if state is not None:
        h_re, h_im = state
        c_re = coeffs.gamma_re * h_re - coeffs.gamma_im * h_im
        c_im = coeffs.gamma_re * h_im + coeffs.gamma_im * h_re
        y = y + power_series(c_re, c_im, coeffs, 1, L)
    y = mx.swapaxes(y, 1, 2) + x * coeffs.omega
    new_state = None
    if return_state:
        h0 = (None, None) if state is None else state
        new_state = final_state(x_t, coeffs, *h0)
    return y, new_state


def cema_recurrence(x: mx.array, coeffs: CEMACoefficients, state=None, return_state=False):
    """Step the recurrence; for short segments such as single-token decoding."""
    B, L, D = x.shape
    N = coeffs.p.shape[-1]
    q_re = mx.exp(coeffs.log_mag) * mx.cos(coeffs.phase)
    q_im = mx.exp(coeffs.log_mag) * mx.sin(coeffs.phase)
    if state is None:
        h_re = h_im = mx.zeros((B, D, N), dtype=mx.float32)
    else:
        h_re, h_im = state
    ys = []
    for t in range(L):
        x_t = x[:, t, :, None]
        h_re, h_im = q_re * h_re - q_im * h_im + coeffs.p * x_t, q_re * h_im + q_im * h_re
        ys.append((coeffs.gamma_re * h_re - coeffs.gamma_im * h_im).sum(axis=-1))
    y = mx.stack(ys, axis=1) + x * coeffs.omega
    return y, ((h_re, h_im) if return_state else None)


def _shift_right(a: mx.array, k: int, axis: int, fill=0):
    """a shifted k places towards higher indices along ``axis`` (first k entries ``fill``)."""
    n = a.shape[axis]
    widths = [(0, 0)] * a.ndim
    widths[axis] = (k, 0)
    index = [slice(None)] * a.ndim
    index[axis] = slice(0, n)
    return mx.pad(a, widths, constant_values=fill)[tuple(index)]


def cema_segmented(x: mx.array, coeffs: CEMACoefficients, doc_starts: mx.array, block: Optional[int] = None):
    """CEMA over packed documents: the state restarts from zero at every document start.

    x: B x L x D float32; doc_starts: B x L ints, the index of the first token of each token's
    document (t = doc_starts[t] marks a start). Returns y (B x L x D), each document's output equal
    to running it alone from a zero state. No final state (packed rows are full sequences).

    Blocked two-level scan in pure ops, exact up to float32 rounding (no cancellation between a
    full-sequence and a correction term). Blocks of S = ``block`` steps (``SEGMENT_BLOCK``):
      * near part: the lags 0 <= u <= t - max(doc start, block start), i.e. everything inside the
        block and inside t's document, as a loop over the S lags of masked, shifted x times the
        real kernel K[u] = Re Σ_n gamma_n p_n q_n^u. Each lag is elementwise over B x L x D, so
        nothing of size S x (B x L x D) is materialized or kept for the backward pass;
      * far part: for tokens whose document began before their block, Re Σ_n gamma_n
        q_n^(t-bs+1) H[i-1]_n from H[i-1], the document's state at the end of the previous block.
        Each block's own end state (from its last document start) is one matmul; the states
        carried across blocks, zeroed after a block with a start, come from a segmented
        Hillis-Steele scan over the L/S blocks (log2(L/S) steps on B x D x L/S x N arrays).
    No array is ever of size B x L x D x N or S x B x L x D: the block states are 2N/S of x's size.
    Measured on the CPU backend (B=1, D=256, N=16, L=32K, forward + backward): peak memory about
    30x x's size (cema_fft: 25x); about 3x cema_fft's time, the S-lag loop being most of it.
    """
    B, L, D = x.shape
    N = coeffs.p.shape[-1]
    S = max(1, min(block or SEGMENT_BLOCK, L))
    nb = -(-L // S)
    Lp = nb * S
    starts = doc_starts.astype(mx.int32)
    if Lp != L:   # padded steps come after every real one (each its own document): no effect
        x = mx.pad(x, [(0, 0), (0, Lp - L), (0, 0)])
        tail = mx.broadcast_to(mx.arange(L, Lp, dtype=mx.int32), (B, Lp - L))
        starts = mx.concatenate([starts, tail], axis=1)
    t = mx.arange(Lp, dtype=mx.int32)
    block_start = (t // S) * S

    # near part: lags inside the block and the document
    reach = t - mx.maximum(starts, block_start)                        # B,Lp in [0, S)
    kernel = power_series(coeffs.p * coeffs.gamma_re, coeffs.p * coeffs.gamma_im, coeffs, 0, S)  # D,S
    kernel = mx.swapaxes(kernel, 0, 1)                                 # S,D
    x_pad = mx.pad(x, [(0, 0), (S - 1, 0), (0, 0)])
    y = x * (kernel[0] + coeffs.omega)
    for u in range(1, S):
        shifted = x_pad[:, S - 1 - u: S - 1 - u + Lp]
        y = y + mx.where((reach >= u)[..., None], shifted * kernel[u], 0.0)

    if nb > 1:
        # each block's end state from its last document start (or its first step)
        last_start = starts[:, S - 1::S]                               # B,nb
        in_last_doc = t[None] >= mx.repeat(last_start, S, axis=1)      # B,Lp
        xm = mx.where(in_last_doc[..., None], x, 0.0)
        xb = mx.swapaxes(xm, 1, 2).reshape(B, D, nb, S)
        w_re, w_im = _powers(coeffs.log_mag, coeffs.phase, (S - 1) - mx.arange(S))   # D,N,S
        w = mx.swapaxes(mx.concatenate([w_re, w_im], axis=-2), -1, -2)               # D,S,2N
        local = xb @ w                                                               # B,D,nb,2N
        h_re, h_im = coeffs.p[:, None] * local[..., :N], coeffs.p[:, None] * local[..., N:]
        # carry across blocks: block i takes q^S H[i-1] unless a document starts inside it
        carry = (last_start < mx.arange(nb, dtype=mx.int32) * S)                     # B,nb
        k = 1
        while k < nb:
            qk_re, qk_im = _powers(coeffs.log_mag, coeffs.phase, mx.array([S * k]))
            qk_re, qk_im = qk_re[:, None, :, 0], qk_im[:, None, :, 0]                 # D,1,N
            prev_re, prev_im = _shift_right(h_re, k, 2), _shift_right(h_im, k, 2)
            m = carry[:, None, :, None]
            h_re, h_im = (h_re + mx.where(m, qk_re * prev_re - qk_im * prev_im, 0.0),
                          h_im + mx.where(m, qk_re * prev_im + qk_im * prev_re, 0.0))
            carry = carry & _shift_right(carry, k, 1, False)
            k *= 2
        # far part: Re Σ_n gamma_n q_n^(j+1) H[i-1]_n for step j of block i
        prev_re, prev_im = _shift_right(h_re, 1, 2), _shift_right(h_im, 1, 2)       # B,D,nb,N
        c_re = coeffs.gamma_re[:, None] * prev_re - coeffs.gamma_im[:, None] * prev_im
        c_im = coeffs.gamma_re[:, None] * prev_im + coeffs.gamma_im[:, None] * prev_re
        p_re, p_im = _powers(coeffs.log_mag, coeffs.phase, mx.arange(1, S + 1))      # D,N,S
        far = mx.concatenate([c_re, -c_im], axis=-1) @ mx.concatenate([p_re, p_im], axis=-2)  # B,D,nb,S
        far = mx.swapaxes(far.reshape(B, D, Lp), 1, 2)
        y = y + mx.where((starts < block_start)[..., None], far, 0.0)
    return y[:, :L]


def cema_scan(x, coeffs: CEMACoefficients, state=None, return_state=False, doc_starts=None, y_dtype=None):
    """The one place that picks how CEMA runs: custom kernel where available, else pure ops.

    With ``doc_starts`` (packed documents): the kernel with document resets where available, else
    the pure-ops segmented scan (also under MEGALODON_KERNELS=0). y comes back in ``y_dtype``
    (None: float32); the kernels write it so directly (and read its gradient so), where a float32
    y would be one more full-size copy each way for a caller that casts it down at once."""
    from .kernels import cema_kernel_available, cema_kernel_scan
    # The kernels read a bf16 / fp16 x as it is and convert each element to float32 in registers
    # (the same values as x.astype(float32)); a float32 copy would only add memory traffic, in the
    # forward and again for the gradient. The pure-ops paths compute in float32 throughout.
    use_kernel = cema_kernel_available(x.shape[1])
    if not use_kernel:
        x = x.astype(mx.float32)
    if doc_starts is not None:
        if state is not None or return_state:
            raise ValueError("CEMA over packed documents (doc_starts) takes no state and returns none")
        if use_kernel:
            return cema_kernel_scan(x, coeffs, doc_starts=doc_starts, y_dtype=y_dtype)
        y, new_state = cema_segmented(x, coeffs, doc_starts), None
    elif use_kernel:
        return cema_kernel_scan(x, coeffs, state, return_state, y_dtype=y_dtype)
    elif x.shape[1] <= RECURRENCE_MAX_LEN:
        y, new_state = cema_recurrence(x, coeffs, state, return_state)
    else:
        y, new_state = cema_fft(x, coeffs, state, return_state)
    return (y if y_dtype is None else y.astype(y_dtype)), new_state


class MultiHeadComplexEMA(nn.Module):
    def __init__(self, embed_dim: int, ndim: int = 16):
        super().__init__()
        self.embed_dim = embed_dim
        self.ndim = ndim
        self.alpha = mx.random.normal((embed_dim, ndim, 1)) * 0.2
        self.delta = mx.random.normal((embed_dim, ndim, 1)) * 0.2
        # Upstream's init: decay frequencies exp(-k·log(D)/D), stored as logits.
        freqs = mx.exp(-mx.arange(1, embed_dim + 1) * (math.log(embed_dim) / embed_dim))
        freqs = freqs[mx.random.permutation(embed_dim)]
        self.theta = mx.log(freqs / (1.0 - freqs)).reshape(embed_dim, 1, 1)
        gamma = mx.random.normal((embed_dim, ndim, 1))
        self.gamma = mx.concatenate([gamma, mx.zeros_like(gamma)], axis=-1)
        self.omega = mx.clip(mx.random.normal((embed_dim, 1)) * 0.25, -1.0, 1.0)

    def coefficients(self) -> CEMACoefficients:
        f32 = mx.float32
        alpha = mx.sigmoid(self.alpha.astype(f32))[..., 0]
        delta = mx.sigmoid(self.delta.astype(f32))[..., 0]
        wavelets = mx.arange(1, self.ndim + 1, dtype=f32)
        phase = mx.sigmoid(self.theta.astype(f32))[..., 0] * (2 * math.pi / self.ndim) * wavelets
        scale = math.sqrt(1.0 / self.ndim)
        gamma = self.gamma.astype(f32) * scale
        return CEMACoefficients(alpha, mx.log(1.0 - alpha * delta), phase,
                                gamma[..., 0], gamma[..., 1], self.omega.astype(f32)[:, 0])

    def __call__(self, x: mx.array, state=None, return_state: bool = False, doc_starts=None, y_dtype=None):
        """x: B x L x D (any float dtype) -> (y B x L x D in ``y_dtype``, float32 when None; new
        (re, im) state or None). ``doc_starts`` (B x L ints, each token's document start) restarts
        the state from zero at every document start (packed rows; no state in or out)."""
        return cema_scan(x, self.coefficients(), state, return_state, doc_starts, y_dtype)
