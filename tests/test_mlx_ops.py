"""The MLX building blocks against naive float64 NumPy references written from upstream's maths."""
import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_megalodon.complex_exponential_moving_average import (
    MultiHeadComplexEMA, cema_fft, cema_recurrence, power_series)
from mlx_megalodon import moving_average_gated_attention as MAGA
from mlx_megalodon.moving_average_gated_attention import chunk_attention
from mlx_megalodon.rotary_positional_embedding import rope_periods
from mlx_megalodon.timestep_norm import TimestepNorm, cumsum_two_level


def random_cema(D=6, N=4, seed=0):
    mx.random.seed(seed)
    cema = MultiHeadComplexEMA(D, N)
    rng = np.random.default_rng(seed)
    cema.gamma = mx.array(rng.normal(size=(D, N, 2)).astype(np.float32))   # imaginary part non-zero
    return cema


def naive_cema(cema, x, h0=None):
    """Step-by-step recurrence in complex128 straight from the definition."""
    a = 1 / (1 + np.exp(-np.array(cema.alpha, np.float64)[..., 0]))
    d = 1 / (1 + np.exp(-np.array(cema.delta, np.float64)[..., 0]))
    N = a.shape[1]
    theta = 1 / (1 + np.exp(-np.array(cema.theta, np.float64)[..., 0])) * 2 * math.pi / N
    q = (1 - a * d) * np.exp(1j * theta * np.arange(1, N + 1))
    g = np.array(cema.gamma, np.float64)
    gamma = (g[..., 0] + 1j * g[..., 1]) * math.sqrt(1 / N)
    omega = np.array(cema.omega, np.float64)[:, 0]
    x = np.array(x, np.float64)
    B, L, D = x.shape
    h = np.zeros((B, D, N), complex) if h0 is None else h0
    ys = []
    for t in range(L):
        h = q * h + a * x[:, t, :, None]
        ys.append((gamma * h).sum(-1).real + omega * x[:, t])
    return np.stack(ys, 1), h


@pytest.mark.parametrize("L", [1, 2, 7, 16, 17, 64, 301])
@pytest.mark.parametrize("with_state", [False, True])
def test_cema_paths_match_recurrence(L, with_state):
    cema = random_cema()
    rng = np.random.default_rng(L)
    x = rng.normal(size=(2, L, 6)).astype(np.float32)
    h0 = (rng.normal(size=(2, 6, 4)) + 1j * rng.normal(size=(2, 6, 4))) if with_state else None
    ref_y, ref_h = naive_cema(cema, x, h0)
    state = None if h0 is None else (mx.array(h0.real.astype(np.float32)), mx.array(h0.imag.astype(np.float32)))
    coeffs = cema.coefficients()
    for fn in (cema_fft, cema_recurrence):
        if fn is cema_recurrence and L > 64:
            continue
        y, (h_re, h_im) = fn(mx.array(x), coeffs, state, return_state=True)
        scale = np.abs(ref_y).max()
        assert np.abs(np.array(y) - ref_y).max() <= 2e-5 * scale + 1e-6, fn.__name__
        h = np.array(h_re) + 1j * np.array(h_im)
        assert np.abs(h - ref_h).max() <= 2e-5 * np.abs(ref_h).max() + 1e-6, fn.__name__


def test_cema_keeps_float32_for_bfloat16_input():
    cema = random_cema()
    x = mx.random.normal((1, 40, 6)).astype(mx.bfloat16)
    y, (h_re, h_im) = cema(x, return_state=True)
    assert y.dtype == mx.float32 and h_re.dtype == mx.float32 and h_im.dtype == mx.float32


def test_power_series_blocked_equals_direct():
    cema = random_cema(D=3, N=5)
    c = cema.coefficients()
    rng = np.random.default_rng(1)
    c_re, c_im = rng.normal(size=(2, 3, 5)), rng.normal(size=(2, 3, 5))
    got = np.array(power_series(mx.array(c_re, mx.float32), mx.array(c_im, mx.float32), c, 3, 50))
    q = np.exp(np.array(c.log_mag, np.float64) + 1j * np.array(c.phase, np.float64))
    j = np.arange(3, 53)
    ref = ((c_re + 1j * c_im)[..., None] * q[..., None] ** j).sum(-2).real
    assert np.abs(got - ref).max() < 1e-5


def naive_timestep_norm(x, weight, bias, G, eps, count=0, mean=None, var=None):
    """Upstream's per-step Welford combine (csrc/ops/timestep_norm.cc), in float64."""
    B, L, D = x.shape
    x = x.astype(np.float64).reshape(B, L, G, D // G)
    mean = np.zeros((B, G)) if mean is None else mean.astype(np.float64).copy()
    var = np.ones((B, G)) if var is None else var.astype(np.float64).copy()
    out = np.empty_like(x)
    m0 = count
    for t in range(L):
        gm, gv = x[:, t].mean(-1), x[:, t].var(-1)
        n = m0 + 1
        c2 = 1 / n
        c1 = 1 - c2
        delta = gm - mean
        new_mean = c1 * mean + c2 * gm
        new_var = c1 * var + c2 * gv + (c1 * delta) * (c2 * delta)
        mean, var, m0 = new_mean, new_var, n
        out[:, t] = (x[:, t] - mean[..., None]) / np.sqrt(var[..., None] + eps)
    out = out.reshape(B, L, D) * (weight + 1) + bias
    return out, m0, mean, var


@pytest.mark.parametrize("L", [1, 9, 1500])
def test_timestep_norm_matches_welford_and_carries_state(L):
    rng = np.random.default_rng(L)
    D, G = 12, 3
    norm = TimestepNorm(D, G)
    norm.weight = mx.array(rng.normal(size=D).astype(np.float32))
    norm.bias = mx.array(rng.normal(size=D).astype(np.float32))
    x = (rng.normal(size=(2, L, D)) * 2 + 3).astype(np.float32)
    ref, n, m, v = naive_timestep_norm(x, np.array(norm.weight), np.array(norm.bias), G, 1e-5)
    y, state = norm(mx.array(x))
    assert np.abs(np.array(y) - ref).max() < 1e-4
    assert int(state.count[0]) == L
    assert np.abs(np.array(state.mean) - m).max() < 1e-5
    assert np.abs(np.array(state.var) - v).max() < 1e-4
    # continue from the carried state
    x2 = rng.normal(size=(2, 5, D)).astype(np.float32)
    ref2, *_ = naive_timestep_norm(x2, np.array(norm.weight), np.array(norm.bias), G, 1e-5, n, m, v)
    y2, _ = norm(mx.array(x2), state)
    assert np.abs(np.array(y2) - ref2).max() < 1e-4


def test_two_level_cumsum():
    a = mx.array(np.random.default_rng(0).normal(size=(2, 5000, 3)).astype(np.float32))
    ref = np.cumsum(np.array(a, np.float64), axis=1)
    assert np.abs(np.array(cumsum_two_level(a, block=64)) - ref).max() < 1e-3


def naive_chunk_attention(q, k, v, C, base):
    """Per chunk, interleaved RoPE from position 0, causal softmax without scaling."""
    B, H, L, dz = q.shape
    inv = 1.0 / np.array([base ** (j / dz) for j in range(0, dz, 2)], np.float32).astype(np.float64)

    def rope(t):
        pos = np.arange(t.shape[2])[:, None] * inv
        c = (t[..., 0::2] + 1j * t[..., 1::2]) * np.exp(1j * pos)
        out = np.empty_like(t)
        out[..., 0::2], out[..., 1::2] = c.real, c.imag
        return out
    out = np.zeros((B, H, L, v.shape[-1]))
    for s in range(0, L, C):
        qs, ks, vs = rope(q[:, :, s:s + C]), rope(k[:, :, s:s + C]), v[:, :, s:s + C]
        scores = qs @ np.swapaxes(ks, -1, -2)
        n = scores.shape[-1]
        scores = np.where(np.triu(np.ones((n, n)), 1) > 0, -np.inf, scores)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        out[:, :, s:s + C] = (p / p.sum(-1, keepdims=True)) @ vs
    return out


@pytest.mark.parametrize("L", [1, 5, 8, 24, 29])
def test_chunk_attention_is_block_diagonal(L):
    rng = np.random.default_rng(L)
    q, k = (rng.normal(size=(2, 2, L, 6)).astype(np.float32) for _ in range(2))
    v = rng.normal(size=(2, 2, L, 5)).astype(np.float32)
    got, _ = chunk_attention(mx.array(q), mx.array(k), mx.array(v), 8, rope_periods(6, 10000.0))
    ref = naive_chunk_attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), 8, 10000.0)
    assert np.abs(np.array(got) - ref).max() < 1e-5


@pytest.mark.parametrize("parts", [1, 2, 4])
@pytest.mark.parametrize("L", [8, 12, 29])
def test_chunk_attention_query_blocks_match_naive(monkeypatch, parts, L):
    """causal_sdpa's query blocks (each attending only to keys up to its end) give the plain
    block-diagonal causal attention, forward and gradients, also for a padded last chunk."""
    monkeypatch.setattr(MAGA, "CAUSAL_SPLIT_PARTS", parts)
    monkeypatch.setattr(MAGA, "CAUSAL_SPLIT_MIN_BLOCK", 2)
    rng = np.random.default_rng(L + parts)
    q, k = (rng.normal(size=(2, 2, L, 6)).astype(np.float32) for _ in range(2))
    v = rng.normal(size=(2, 2, L, 5)).astype(np.float32)
    periods = rope_periods(6, 10000.0)
    got, _ = chunk_attention(mx.array(q), mx.array(k), mx.array(v), 8, periods)
    ref = naive_chunk_attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), 8, 10000.0)
    assert np.abs(np.array(got) - ref).max() < 1e-5

    def loss(q, k, v):
        return (chunk_attention(q, k, v, 8, periods)[0] ** 2).sum()
    grads = mx.grad(loss, argnums=(0, 1, 2))(mx.array(q), mx.array(k), mx.array(v))
    monkeypatch.setattr(MAGA, "CAUSAL_SPLIT_PARTS", 1)
    want = mx.grad(loss, argnums=(0, 1, 2))(mx.array(q), mx.array(k), mx.array(v))
    for g, w in zip(grads, want):
        assert float(mx.abs(g - w).max()) <= 1e-5 * max(1.0, float(mx.abs(w).max()))
