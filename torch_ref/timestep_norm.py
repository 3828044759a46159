"""TimestepNorm: a causal group norm whose statistics accumulate over time steps.

At step t each group g contributes its mean mu_t and biased variance s_t over its D/G features, and
the running (count, mean, var) is merged with (1, mu_t, s_t) by the pooled-moments rule upstream
calls WelfordCombine (count weights; a running count of 0 discards the prior). Unrolled, with
n_t = c0 + t + 1:
    M_t = (c0 m0 + sum_{s<=t} mu_s) / n_t
    V_t = (c0 (v0 + m0^2) + sum_{s<=t} (s_s + mu_s^2)) / n_t - M_t^2
which is evaluated here with float64 cumulative sums (shifted by a reference mean to avoid
cancellation), so there is no Python loop over time.
Output: (x - M_t) * rsqrt(V_t + eps) * (weight + 1) + bias, in the input's dtype.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

NormState = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]   # count [B] int64, mean [B,G], var [B,G]


class TimestepNorm(nn.Module):
    def __init__(self, num_features: int, num_groups: int, eps: float = 1e-5):
        super().__init__()
        if num_features % num_groups:
            raise ValueError(f"num_features ({num_features}) must be divisible by num_groups ({num_groups})")
        self.num_features = num_features
        self.num_groups = num_groups
        self.eps = eps
        self.register_buffer("prior_count", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("prior_mean", torch.zeros(num_groups))
        self.register_buffer("prior_logv", torch.zeros(num_groups))
        self.weight = nn.Parameter(torch.zeros(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def initial_state(self, batch_size: int, dtype: torch.dtype = torch.float32) -> NormState:
        count = self.prior_count.detach().expand(batch_size).clone()
        mean = self.prior_mean.detach().to(dtype).expand(batch_size, -1).clone()
        var = self.prior_logv.detach().to(dtype).exp().expand(batch_size, -1).clone()
        return count, mean, var

    def forward(self, x: torch.Tensor, state: Optional[NormState] = None) -> Tuple[torch.Tensor, NormState]:
        """x [B, L, D]; state (count, mean, var) or None for the prior.
        Returns (y [B, L, D], new state). The new state's mean/var are float32 (float64 for a
        float64 input)."""
        bsz, length, dim = x.shape
        groups = self.num_groups
        sd = torch.float64 if x.dtype == torch.float64 else torch.float32   # state / output math dtype
        if state is None:
            count0 = self.prior_count.expand(bsz)
            mean0 = self.prior_mean.expand(bsz, -1)
            var0 = self.prior_logv.exp().expand(bsz, -1)
        else:
            count0, mean0, var0 = state

        xs = x.to(torch.float64).reshape(bsz, length, groups, dim // groups)
        mu = xs.mean(-1)                                               # B x L x G
        s = (xs - mu.unsqueeze(-1)).square().mean(-1)                  # biased variance
        c0 = count0.to(device=x.device, dtype=torch.float64).view(bsz, 1, 1)
        m0 = mean0.to(device=x.device, dtype=torch.float64).unsqueeze(1)    # B x 1 x G
        v0 = var0.to(device=x.device, dtype=torch.float64).unsqueeze(1)
        ref = mu[:, :1].detach()                                       # any shift is exact
        dm0 = m0 - ref
        dmu = mu - ref
        n = c0 + torch.arange(1, length + 1, dtype=torch.float64, device=x.device).view(1, -1, 1)
        s1 = c0 * dm0 + torch.cumsum(dmu, dim=1)
        s2 = c0 * (v0 + dm0.square()) + torch.cumsum(s + dmu.square(), dim=1)
        d_mean = s1 / n
        mean = ref + d_mean                                            # B x L x G
        var = s2 / n - d_mean.square()

        rstd = torch.rsqrt(var + self.eps)
        xw = x.to(sd).reshape(bsz, length, groups, dim // groups)
        y = (xw - mean.to(sd).unsqueeze(-1)) * rstd.to(sd).unsqueeze(-1)
        y = y.reshape(bsz, length, dim) * (self.weight.to(sd) + 1.0) + self.bias.to(sd)

        count = count0.to(device=x.device, dtype=torch.int64) + length
        new_state = (count, mean[:, -1].to(sd), var[:, -1].to(sd))
        return y.to(x.dtype), new_state

    def extra_repr(self) -> str:
        return f"num_features={self.num_features}, num_groups={self.num_groups}, eps={self.eps}"
