"""The fused CEMA scan kernels (mlx_megalodon/kernels.py, metal/cema_scan.body).

On every machine (CPU, fast): the generated metal/cema_scan.{metal,cu} are up to date, the Metal
source parses as C++ under a shim (g++ -fsyntax-only), the kernel bodies run one thread at a time on
the CPU (g++ + ctypes) and match the pure-ops CEMA forward and gradients, and the dispatch switch.
On a GPU backend (CUDA here; Metal where one exists): the real kernels against a float64 reference
and against cema_recurrence / cema_fft, forward and gradients of every input, fp32 and bf16 x.
Tolerances are relative Frobenius errors, written into each assert.
"""
from __future__ import annotations

import math
import shutil
import subprocess

import mlx.core as mx
import numpy as np
import pytest

from mlx_megalodon import kernels as K
from mlx_megalodon.complex_exponential_moving_average import (
    CEMACoefficients, MultiHeadComplexEMA, cema_fft, cema_recurrence, cema_scan)

FIELDS = ["x", *CEMACoefficients._fields, "h0_re", "h0_im"]
ON_GPU = K.gpu_backend() is not None


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def make_case(B, L, D, N, seed, dtype=mx.float32):
    """Random coefficients in the model's ranges (|q| < 1, any phase), x, h0 and loss weights."""
    rng = np.random.default_rng(seed)
    sig = lambda v: 1 / (1 + np.exp(-v))
    p = sig(rng.normal(size=(D, N)))
    log_mag = np.log1p(-p * sig(rng.normal(size=(D, N))))
    phase = rng.uniform(0, 2 * math.pi, size=(D, N))
    coeffs = [p, log_mag, phase, rng.normal(size=(D, N)) / math.sqrt(N), rng.normal(size=(D, N)) / math.sqrt(N),
              rng.normal(size=D) * 0.25]
    coeffs = [c.astype(np.float32) for c in coeffs]
    x = rng.normal(size=(B, L, D)).astype(np.float32)
    x = np.array(mx.array(x).astype(dtype).astype(mx.float32))  # exactly representable in dtype
    h0 = [rng.normal(size=(B, D, N)).astype(np.float32) for _ in range(2)]
    w = [rng.normal(size=(B, L, D)).astype(np.float32)] + [rng.normal(size=(B, D, N)).astype(np.float32)
                                                            for _ in range(2)]
    return x, coeffs, h0, w


def mlx_value_and_grads(fn, x, coeffs, h0, w, dtype=mx.float32):
    """y, final state and d(sum y*w0 + h_re*w1 + h_im*w2)/d(every input) through `fn`."""
    wy, wr, wi = (mx.array(a) for a in w)

    def loss(x, cs, h0r, h0i):
        y, (hr, hi) = fn(x, CEMACoefficients(*cs), (h0r, h0i), True)
        return (y * wy).sum() + (hr * wr).sum() + (hi * wi).sum(), (y, hr, hi)

    args = (mx.array(x).astype(dtype), [mx.array(c) for c in coeffs], mx.array(h0[0]), mx.array(h0[1]))
    (_, (y, hr, hi)), g = mx.value_and_grad(loss, argnums=(0, 1, 2, 3))(*args)
    grads = [g[0], *g[1], g[2], g[3]]
    mx.eval(y, hr, hi, grads)
    assert grads[0].dtype == dtype
    return (np.array(y), np.array(hr), np.array(hi)), [np.array(a.astype(mx.float32)) for a in grads]


def torch_reference(x, coeffs, h0, w):
    """(y, h_re, h_im) and the gradients of every input, in float64/complex128 through torch
    autograd: q**j = exp(j log q) for all j at once, y by FFT convolution, the final state by a
    contraction (a different algorithm from the kernels', exact to ~1e-13 here)."""
    torch = pytest.importorskip("torch")
    t = lambda a: torch.tensor(np.asarray(a, np.float64), requires_grad=True)
    leaves = [t(x), *(t(c) for c in coeffs), t(h0[0]), t(h0[1])]
    xt, p, lm, ph, gr, gi, om, h0r, h0i = leaves
    B, L, D = xt.shape
    logq = torch.complex(lm, ph)                                          # D x N
    gamma, h0c = torch.complex(gr, gi), torch.complex(h0r, h0i)
    pw = torch.exp(logq[..., None] * torch.arange(L + 1, dtype=torch.float64))   # q**j, D x N x L+1
    kern = ((p * gamma)[..., None] * pw[..., :L]).sum(1).real             # D x L
    xd = xt.transpose(1, 2)                                               # B x D x L
    n = 2 * L
    y = torch.fft.irfft(torch.fft.rfft(xd, n=n) * torch.fft.rfft(kern, n=n), n=n)[..., :L]
    y = y + ((gamma * h0c)[..., None] * pw[..., 1:]).sum(2).real          # state term
    y = y.transpose(1, 2) + xt * om
    h = p * torch.einsum("bdj,dnj->bdn", xd.to(torch.complex128), pw[..., :L].flip(-1)) + pw[..., L] * h0c
    wt = [torch.tensor(a, dtype=torch.float64) for a in w]
    loss = (y * wt[0]).sum() + (h.real * wt[1]).sum() + (h.imag * wt[2]).sum()
    grads = torch.autograd.grad(loss, leaves)
    return (y.detach().numpy(), h.real.detach().numpy(), h.imag.detach().numpy()), [g.numpy() for g in grads]


# ------------------------------------------------------------------------------------------------
# CPU: sources, syntax, emulated kernels, dispatch


def test_generated_sources_are_up_to_date():
    d = K.source_dir()
    assert (d / "cema_scan.metal").read_text() == K.generate_metal(), "run: python -m mlx_megalodon.kernels"
    assert (d / "cema_scan.cu").read_text() == K.generate_cuda(), "run: python -m mlx_megalodon.kernels"


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_metal_sources_parse_as_cpp_under_shim(tmp_path):
    """No Metal compiler here: parse metal/*.metal (all kernels, instantiated for float, half and
    bfloat16) as C++17 with metal/shim_metal_syntax.h standing in for <metal_stdlib>."""
    d = K.source_dir()
    (tmp_path / "metal_stdlib").write_text(f'#include "{d / "shim_metal_syntax.h"}"\n')
    files = sorted(d.glob("*.metal"))
    assert files
    for f in files:
        r = subprocess.run(["g++", "-std=c++17", "-fsyntax-only", "-Wall", "-Wno-attributes",
                            "-Wno-unknown-pragmas", "-I", str(tmp_path), "-x", "c++", str(f)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-4000:]
        assert "warning" not in r.stderr, r.stderr[-4000:]


@pytest.fixture
def cpu_kernels(tmp_path, monkeypatch):
    if shutil.which("g++") is None:
        pytest.skip("needs g++")
    K.set_launcher(K.CpuLauncher(str(tmp_path)))
    monkeypatch.setenv("MEGALODON_KERNELS", "1")
    try:
        yield
    finally:
        K.set_launcher(None)


# (L, chunk): one step; odd length over 8-step chunks (short last chunk); one chunk; 25 chunks.
@pytest.mark.parametrize("L,chunk", [(1, None), (37, 8), (37, 64), (200, 8)])
def test_cpu_emulated_kernels_match_ops(cpu_kernels, monkeypatch, L, chunk):
    monkeypatch.setattr(K, "CHUNK_OVERRIDE", chunk)
    x, coeffs, h0, w = make_case(2, L, 3, 4, seed=L)
    (y, hr, hi), g = mlx_value_and_grads(K.cema_kernel_scan, x, coeffs, h0, w)
    ref_fn = cema_recurrence if L <= 64 else cema_fft
    (ry, rhr, rhi), rg = mlx_value_and_grads(ref_fn, x, coeffs, h0, w)
    assert rel(y, ry) < 1e-5 and rel(hr, rhr) < 1e-5 and rel(hi, rhi) < 1e-5
    for name, a, b in zip(FIELDS, g, rg):
        assert rel(a, b) < 2e-5, name


def test_dispatch_switch(monkeypatch):
    monkeypatch.setenv("MEGALODON_KERNELS", "0")
    assert not K.cema_kernel_available(100)
    monkeypatch.setenv("MEGALODON_KERNELS", "1")
    assert K.cema_kernel_available(100) == ON_GPU
    assert not K.cema_kernel_available(0)


def test_split_and_plan():
    assert K._split(16, 8, 32) == 2 and K._split(16, 4, 32) == 4 and K._split(3, 4, 32) == 1
    assert K._split(16, 4, 1) == 1
    C, NC, last = K.plan(1, 5000, 1024, 2)
    assert (NC - 1) * C + last == 5000 and 0 < last <= C
    assert K.plan(1, 1, 1024, 2) == (1, 1, 1)


# ------------------------------------------------------------------------------------------------
# GPU backend: the real kernels

gpu = pytest.mark.skipif(not ON_GPU, reason="no GPU backend (custom kernels need Metal or CUDA)")

# (B, L, D, N, chunk, forward state dims per thread, dtype). chunk None: the automatic plan
# (32-step chunks at these sizes). fwd_npt 8 / 4 splits a (b, d) over 2 / 4 lanes in the forward
# too (the backward splits N = 16 over 4 lanes by default). D = 7 puts lane groups of different
# chunks, hence different trip counts, in one warp.
GPU_CASES = [
    (2, 1, 7, 16, None, 16, mx.float32),        # one step
    (2, 37, 7, 16, None, 16, mx.float32),       # odd length: two chunks, last of 5 steps
    (2, 37, 7, 16, None, 4, mx.float32),
    (2, 37, 7, 16, 37, 16, mx.float32),         # one chunk
    (1, 300, 5, 3, 300, 16, mx.float32),        # one chunk, odd N (one lane per (b, d))
    (2, 5000, 7, 16, None, 16, mx.float32),     # many chunks (157)
    (2, 5000, 7, 16, None, 8, mx.float32),
    (1, 5000, 33, 16, 700, 16, mx.float32),     # few long chunks, short last one
    (2, 37, 7, 16, None, 16, mx.bfloat16),
    (2, 5000, 7, 16, None, 8, mx.bfloat16),
]


@gpu
@pytest.mark.parametrize("B,L,D,N,chunk,fwd_npt,dtype", GPU_CASES)
def test_gpu_kernel_forward_and_grads(monkeypatch, B, L, D, N, chunk, fwd_npt, dtype):
    monkeypatch.setenv("MEGALODON_KERNELS", "1")
    monkeypatch.setattr(K, "CHUNK_OVERRIDE", chunk)
    monkeypatch.setattr(K, "FWD_MAX_NPT", fwd_npt)
    x, coeffs, h0, w = make_case(B, L, D, N, seed=L + D, dtype=dtype)
    (y, hr, hi), g = mlx_value_and_grads(K.cema_kernel_scan, x, coeffs, h0, w, dtype)

    # Against float64: fp32 accumulation only (x is exact in its dtype). The gradient of a bf16 x
    # comes back in bf16 (rounding ~2^-9 per element).
    (ry, rhr, rhi), rg = torch_reference(x, coeffs, h0, w)
    assert rel(y, ry) < 1e-5 and rel(hr, rhr) < 1e-5 and rel(hi, rhi) < 1e-5
    for name, a, b in zip(FIELDS, g, rg):
        tol = 1e-2 if (name == "x" and dtype == mx.bfloat16) else 2e-5
        assert rel(a, b) < tol, (name, rel(a, b))

    # Against the pure-ops paths. cema_fft's matmuls run in TF32 on CUDA by default
    # (MLX_ENABLE_TF32=1): seen 2.7e-4 on its final state at L = 5000 on the H200, so 1e-3.
    monkeypatch.setenv("MEGALODON_KERNELS", "0")
    ops = cema_recurrence if L <= 64 else cema_fft
    (oy, ohr, ohi), og = mlx_value_and_grads(ops, x, coeffs, h0, w, dtype)
    tol_ops = 2e-5 if ops is cema_recurrence else 1e-3
    assert rel(y, oy) < tol_ops and rel(hr, ohr) < tol_ops and rel(hi, ohi) < tol_ops
    for name, a, b in zip(FIELDS, g, og):
        tol = max(tol_ops, 1e-2) if (name == "x" and dtype == mx.bfloat16) else tol_ops
        assert rel(a, b) < tol, (name, rel(a, b))


@gpu
def test_gpu_no_state_and_dispatch(monkeypatch):
    """state=None / return_state=False through cema_scan, the one dispatch point; fp16 x too."""
    monkeypatch.setenv("MEGALODON_KERNELS", "1")
    x, coeffs, _, _ = make_case(2, 600, 9, 16, seed=3)
    c = CEMACoefficients(*(mx.array(a) for a in coeffs))
    y, s = cema_scan(mx.array(x), c)
    assert s is None
    ref, _ = cema_fft(mx.array(x), c)
    assert rel(y, ref) < 2e-3
    y16, _ = K.cema_kernel_scan(mx.array(x).astype(mx.float16), c)
    ref16, _ = cema_fft(mx.array(x).astype(mx.float16).astype(mx.float32), c)
    assert y16.dtype == mx.float32 and rel(y16, ref16) < 2e-3


@gpu
def test_gpu_module_grad_under_compile(monkeypatch):
    """mx.compile(mx.value_and_grad(...)) through MultiHeadComplexEMA's parameters: kernel and ops
    paths agree (cema_fft at this length; TF32 matmuls there, hence 2e-3)."""
    cema = MultiHeadComplexEMA(16, 16)
    names = ("alpha", "delta", "theta", "gamma", "omega")
    params = [getattr(cema, k) for k in names]
    x = mx.random.normal((2, 333, 16))

    def loss(x, *ps):
        for k, v in zip(names, ps):
            setattr(cema, k, v)
        y, (hr, hi) = cema(x, return_state=True)
        return (y * y).mean() + (hr * hi).mean()

    results = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("MEGALODON_KERNELS", flag)
        fn = mx.compile(mx.value_and_grad(loss, argnums=tuple(range(1, 6))))
        val, grads = fn(x, *params)
        mx.eval(val, grads)
        results[flag] = (float(val), grads)
    for k, v in zip(names, params):
        setattr(cema, k, v)
    assert abs(results["1"][0] - results["0"][0]) < 1e-4 * abs(results["0"][0])
    for k, a, b in zip(names, results["1"][1], results["0"][1]):
        assert rel(a, b) < 2e-3, k
