"""Multi-dimensional damped complex EMA (CEMA) of Megalodon.

Per feature d and EMA dimension n (N of them):
    h_t = q * h_{t-1} + p * x_t            (complex state)
    y_t = Re(sum_n gamma_n * h_{t,n}) + omega * x_t
with p = sigmoid(alpha), q = (1 - sigmoid(alpha) * sigmoid(delta)) * exp(i * theta_n),
theta_n = sigmoid(theta) * 2*pi/N * n for n = 1..N, gamma = complex(gamma) * sqrt(1/N).

The sequence is computed as a causal convolution (FFT) with kernel
    k_j = Re sum_n p * gamma * q^j,
plus, when an incoming state h0 is given, b_j = Re sum_n gamma * q^(j+1) * h0, and the final
state h_L = p * sum_j q^(L-1-j) x_j + q^L h0. Powers are exp(j * log q) = |q|^j * e^{i j theta},
evaluated in blocks of j so that no D x N x L tensor is built for long L.

Precision: the coefficients and the powers q^j (kernel, state terms) are evaluated in float64 from
the stored parameters, so j * arg(q) stays exact for long sequences (upstream forms exp(j log q) in
float32, whose phase error grows with j); the convolution and contractions then run in float32
(float64 for float64 input) and the output has the input's dtype; states are complex64
(complex128 for float64 input).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.utils.checkpoint
from torch import nn

# Largest D * N * (block of positions) evaluated at once when building powers of q.
_POWER_BLOCK_ELEMENTS = 1 << 22


class MultiHeadComplexEMA(nn.Module):
    def __init__(self, embed_dim: int, ndim: int = 16):
        super().__init__()
        self.embed_dim = embed_dim
        self.ndim = ndim
        self.scale = math.sqrt(1.0 / ndim)
        self.alpha = nn.Parameter(torch.zeros(embed_dim, ndim, 1))
        self.delta = nn.Parameter(torch.zeros(embed_dim, ndim, 1))
        self.theta = nn.Parameter(torch.zeros(embed_dim, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(embed_dim, ndim, 2))
        self.omega = nn.Parameter(torch.zeros(embed_dim, 1))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A sensible random init (upstream's recipe in spirit; checkpoints overwrite it)."""
        nn.init.normal_(self.alpha, 0.0, 0.2)
        nn.init.normal_(self.delta, 0.0, 0.2)
        d = self.embed_dim
        f = torch.exp(-torch.arange(1, d + 1, dtype=torch.float64) * (math.log(d) / d))
        f = f[torch.randperm(d)].clamp(1e-6, 1 - 1e-6)
        self.theta.copy_(torch.log(f / (1 - f)).view(d, 1, 1))
        nn.init.normal_(self.gamma, 0.0, 1.0)
        self.gamma[:, :, 1] = 0.0
        nn.init.trunc_normal_(self.omega, 0.0, 0.25, -1.0, 1.0)

    # ------------------------------------------------------------------ coefficients
    def coefficients(self, dtype: torch.dtype = torch.float32):
        """Real-valued pieces of (p, q, gamma) in `dtype`, each [D, N]:
        p, log|q|, arg q, Re gamma, Im gamma."""
        n = self.ndim
        alpha = torch.sigmoid(self.alpha.to(dtype)).squeeze(-1)          # D x N
        delta = torch.sigmoid(self.delta.to(dtype)).squeeze(-1)          # D x N
        base = torch.sigmoid(self.theta.to(dtype)).view(-1, 1) * (2 * math.pi / n)   # D x 1
        k = torch.arange(1, n + 1, dtype=dtype, device=base.device).view(1, n)
        phase = base * k                                                  # D x N
        log_mag = torch.log1p(-alpha * delta)                             # log |q|
        g = self.gamma.to(dtype) * self.scale
        return alpha, log_mag, phase, g[..., 0], g[..., 1]

    def q(self, dtype: torch.dtype = torch.complex64) -> torch.Tensor:
        """q as a complex [D, N] tensor (for tests and for naive recurrences)."""
        rd = torch.float64 if dtype == torch.complex128 else torch.float32
        _, log_mag, phase, _, _ = self.coefficients(rd)
        return torch.polar(torch.exp(log_mag), phase)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x: torch.Tensor,
        hx: Optional[torch.Tensor] = None,
        compute_last_state: bool = True,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """x: [B, D, L] (upstream's layout). hx: optional incoming state [B, D, N] complex.
        Returns (y [B, D, L] in x's dtype, h_L [B, D, N] complex64/complex128 or None)."""
        bsz, dim, length = x.shape
        wd = torch.float64 if x.dtype == torch.float64 else torch.float32
        cd = torch.complex128 if wd == torch.float64 else torch.complex64
        xw = x.to(wd)
        p, log_mag, phase, g_re, g_im = self.coefficients(torch.float64)
        blocks = _blocks(length, dim * self.ndim)

        # kernel k_j = Re sum_n (p * gamma)_n q_n^j, j = 0..L-1
        c_re, c_im = p * g_re, p * g_im
        kernel = torch.cat([_recompute(_re_weighted_powers, c_re, c_im, log_mag, phase, j0, j1)
                            for j0, j1 in blocks], dim=-1)                     # D x L
        y = _causal_fft_conv(xw, kernel.to(wd))

        if hx is not None:
            # b_j = Re sum_n gamma_n h0_n q_n^(j+1)
            gh = torch.complex(g_re, g_im).unsqueeze(0) * hx.to(torch.complex128)   # B x D x N
            y = y + torch.cat([_recompute(_re_batched_powers, gh.real, gh.imag, log_mag, phase, j0 + 1, j1 + 1)
                               for j0, j1 in blocks], dim=-1).to(wd)
        y = y + xw * self.omega.to(wd)

        h_last = None
        if compute_last_state:
            h_last = _last_state(xw, p, log_mag, phase, blocks).to(cd)
            if hx is not None:
                q_pow_l = torch.polar(torch.exp(log_mag * length), phase * length)
                h_last = h_last + (q_pow_l.unsqueeze(0) * hx.to(torch.complex128)).to(cd)
        return y.to(x.dtype), h_last

    def extra_repr(self) -> str:
        return f"edim={self.embed_dim}, ndim={self.ndim}"


# ---------------------------------------------------------------------- helpers
def _recompute(fn, *args):
    """fn(*args), recomputed in backward instead of keeping its D x N x block intermediates."""
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def _blocks(length: int, dn: int):
    step = max(1, _POWER_BLOCK_ELEMENTS // max(1, dn))
    return [(j0, min(j0 + step, length)) for j0 in range(0, length, step)]


def _powers(log_mag, phase, exponents):
    """Real and imaginary parts of q^j = exp(j log|q|) e^{i j arg q}: [D, N, J] each (dtype of
    log_mag, float64 in forward)."""
    e = exponents.view(1, 1, -1)
    mag = torch.exp(log_mag.unsqueeze(-1) * e)
    ang = phase.unsqueeze(-1) * e
    return mag * torch.cos(ang), mag * torch.sin(ang)


def _re_weighted_powers(c_re, c_im, log_mag, phase, j0, j1):
    """Re sum_n c_n q_n^j for j in [j0, j1): [D, j1-j0]."""
    j = torch.arange(j0, j1, dtype=log_mag.dtype, device=log_mag.device)
    qr, qi = _powers(log_mag, phase, j)
    return (c_re.unsqueeze(-1) * qr - c_im.unsqueeze(-1) * qi).sum(1)


def _re_batched_powers(c_re, c_im, log_mag, phase, j0, j1):
    """Re sum_n c_{b,n} q_n^j for c [B, D, N], j in [j0, j1): [B, D, j1-j0]."""
    j = torch.arange(j0, j1, dtype=log_mag.dtype, device=log_mag.device)
    qr, qi = _powers(log_mag, phase, j)
    return torch.einsum("bdn,dnj->bdj", c_re, qr) - torch.einsum("bdn,dnj->bdj", c_im, qi)


def _last_state(x, p, log_mag, phase, blocks):
    """p * sum_j q^(L-1-j) x_j for x [B, D, L] (float32 or float64): complex [B, D, N]. The
    powers are built in float64 and contracted in x's dtype."""
    length = x.shape[-1]
    re = im = None
    for j0, j1 in blocks:
        e = (length - 1) - torch.arange(j0, j1, dtype=log_mag.dtype, device=log_mag.device)
        r, i = _recompute(_contract_powers, x[..., j0:j1], log_mag, phase, e)
        re = r if re is None else re + r
        im = i if im is None else im + i
    pw = p.to(x.dtype)
    return torch.complex(re * pw, im * pw)


def _contract_powers(xs, log_mag, phase, e):
    qr, qi = _powers(log_mag, phase, e)
    return (torch.einsum("bdj,dnj->bdn", xs, qr.to(xs.dtype)),
            torch.einsum("bdj,dnj->bdn", xs, qi.to(xs.dtype)))


def _causal_fft_conv(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """y_t = sum_{j<=t} kernel_j x_{t-j} along the last axis; x [B, D, L], kernel [D, L]."""
    length = x.shape[-1]
    n = 2 * (1 << max(0, (length - 1).bit_length()))        # 2 * next power of two >= L
    xf = torch.fft.rfft(x, n=n)
    kf = torch.fft.rfft(kernel, n=n)
    return torch.fft.irfft(xf * kf, n=n)[..., :length]
