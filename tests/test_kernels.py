"""The fused CEMA scan kernels (mlx_megalodon/kernels.py, metal/cema_scan.body).

On every machine (CPU, fast): the generated metal/cema_scan.{metal,cu} are up to date, the Metal
source parses as C++ under a shim (g++ -fsyntax-only), the kernel bodies run one thread at a time on
the CPU (g++ + ctypes) and match the pure-ops CEMA forward and gradients, and the dispatch switch.
On a GPU backend (CUDA here; Metal where one exists): the real kernels against a float64 reference
and against cema_recurrence / cema_fft, forward and gradients of every input, fp32 and bf16 x.
Packed rows (document starts, RESET = 1 kernels): against each document run alone in float64 and
against cema_segmented, on the CPU emulation and on the GPU.
Tolerances are relative Frobenius errors, written into each assert.
"""
from __future__ import annotations

import math
import shutil
import subprocess

import mlx.core as mx
import numpy as np
import pytest

from factory import PACKED_LAYOUTS, starts_from_lengths
from mlx.utils import tree_flatten
from mlx_megalodon import kernels as K
from mlx_megalodon.complex_exponential_moving_average import (
    CEMACoefficients, MultiHeadComplexEMA, cema_fft, cema_recurrence, cema_scan, cema_segmented)

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


# Packed rows: x and the coefficients only (no state in or out), loss sum(y * wy).
PACKED_FIELDS = ["x", *CEMACoefficients._fields]


def random_layout(rng, B, L, mean_length):
    """Per row, geometric document lengths (mean `mean_length`, 1-token documents included)."""
    layout = []
    for _ in range(B):
        lengths = []
        while sum(lengths) < L:
            lengths.append(int(rng.geometric(1.0 / mean_length)))
        lengths[-1] -= sum(lengths) - L
        layout.append(lengths)
    return layout


def packed_value_and_grads(fn, x, coeffs, starts, wy, dtype=mx.float32):
    """y and d(sum y*wy)/d(x, every coefficient) through fn(x, coeffs, starts) -> y."""
    def loss(x, cs):
        y = fn(x, CEMACoefficients(*cs), mx.array(starts))
        return (y * mx.array(wy)).sum(), y

    (_, y), g = mx.value_and_grad(loss, argnums=(0, 1))(mx.array(x).astype(dtype), [mx.array(c) for c in coeffs])
    grads = [g[0], *g[1]]
    mx.eval(y, grads)
    assert grads[0].dtype == dtype
    return np.array(y), [np.array(a.astype(mx.float32)) for a in grads]


def per_document_reference(x, coeffs, starts, wy):
    """Every document run alone from a zero state, in float64 (torch_reference): y and the
    gradients of sum(y * wy) in x and in the coefficients (summed over the documents)."""
    B, L, D = x.shape
    N = coeffs[0].shape[-1]
    zeros = [np.zeros((1, D, N), np.float32)] * 2
    y, gx = np.zeros(x.shape), np.zeros(x.shape)
    gc = [np.zeros(c.shape) for c in coeffs]
    for b in range(B):
        for s in np.unique(starts[b]):
            e = s + int((starts[b] == s).sum())
            (yd, _, _), g = torch_reference(x[b:b + 1, s:e], coeffs, zeros, [wy[b:b + 1, s:e], *zeros])
            y[b, s:e], gx[b, s:e] = yd[0], g[0][0]
            for i in range(len(coeffs)):
                gc[i] += g[1 + i]
    return y, [gx, *gc]


def kernel_packed(x, c, starts):
    return K.cema_kernel_scan(x, c, doc_starts=starts)[0]


def ops_packed(x, c, starts):
    return cema_segmented(x, c, starts, block=16)


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


@pytest.mark.parametrize("reset", [False, True])
def test_cpu_emulated_compile_time_stride_is_the_same_scan(tmp_path, monkeypatch, reset):
    """GPU launches compile D into the forward scans (DSTRIDE = D: the block's x / y addresses
    become immediate offsets). Same chunks, same arithmetic: y and the final state are bit-identical
    to the runtime-stride build, across 16-step blocks, a short block tail and a short last chunk,
    with and without document resets."""
    if shutil.which("g++") is None:
        pytest.skip("needs g++")
    monkeypatch.setenv("MEGALODON_KERNELS", "1")
    monkeypatch.setattr(K, "CHUNK_OVERRIDE", 40)   # 2 blocks of 16 + 8 steps; last chunk 20
    x, coeffs, h0, _ = make_case(2, 100, 5, 4, seed=11)
    c = CEMACoefficients(*(mx.array(a) for a in coeffs))
    extra = {"doc_starts": mx.array(starts_from_lengths([[30, 70], [55, 45]]))} if reset else {}
    state = None if reset else (mx.array(h0[0]), mx.array(h0[1]))
    outs = []
    for fixed in (False, True):
        (tmp_path / str(fixed)).mkdir()
        launcher = K.CpuLauncher(str(tmp_path / str(fixed)), compile_time_stride=fixed)
        K.set_launcher(launcher)
        try:
            y, (hr, hi) = K.cema_kernel_scan(mx.array(x), c, state, True, **extra)
            outs.append([np.array(a) for a in (y, hr, hi)])
        finally:
            K.set_launcher(None)
        assert (5 in {k[3] for k in launcher._libs}) == fixed   # a build with DSTRIDE = D ran
    for a, b in zip(*outs):
        assert np.array_equal(a, b)
    ry = cema_recurrence(mx.array(x), c, state)[0] if not reset else None
    if ry is not None:
        assert rel(outs[1][0], np.array(ry)) < 1e-5


@pytest.mark.parametrize("layout,chunk", PACKED_LAYOUTS)
def test_cpu_emulated_reset_kernels_match_per_document_and_segmented(cpu_kernels, monkeypatch, layout, chunk):
    monkeypatch.setattr(K, "CHUNK_OVERRIDE", chunk)
    starts = starts_from_lengths(layout)
    B, L = starts.shape
    x, coeffs, _, w = make_case(B, L, 3, 4, seed=L + B)
    y, g = packed_value_and_grads(kernel_packed, x, coeffs, starts, w[0])
    ry, rg = per_document_reference(x, coeffs, starts, w[0])
    assert rel(y, ry) < 1e-5, rel(y, ry)
    for name, a, b in zip(PACKED_FIELDS, g, rg):
        assert rel(a, b) < 2e-5, (name, rel(a, b))
    oy, og = packed_value_and_grads(ops_packed, x, coeffs, starts, w[0])
    assert rel(y, oy) < 2e-5, rel(y, oy)
    for name, a, b in zip(PACKED_FIELDS, g, og):
        assert rel(a, b) < 2e-5, (name, rel(a, b))


@pytest.mark.parametrize("chunk", [8, None])
def test_cpu_emulated_reset_kernels_with_state(cpu_kernels, monkeypatch, chunk):
    """The kernel's own contract with both: a start at t = 0 drops h0 (its gradient is zero) and the
    final state is the last document's own end state (cema_scan passes no state with doc_starts)."""
    monkeypatch.setattr(K, "CHUNK_OVERRIDE", chunk)
    starts = starts_from_lengths([[9, 1, 27], [20, 16, 1]])
    x, coeffs, h0, w = make_case(2, 37, 3, 4, seed=5)
    fn = lambda x, c, state, ret: K.cema_kernel_scan(x, c, state, ret, doc_starts=mx.array(starts))
    (y, hr, hi), g = mlx_value_and_grads(fn, x, coeffs, h0, w)
    ry, _ = per_document_reference(x, coeffs, starts, w[0])
    assert rel(y, ry) < 1e-5
    c = CEMACoefficients(*(mx.array(a) for a in coeffs))
    for b, first in ((0, 10), (1, 36)):
        _, (er, ei) = cema_recurrence(mx.array(x[b:b + 1, first:]), c, return_state=True)
        assert rel(hr[b], np.array(er)[0]) < 1e-5 and rel(hi[b], np.array(ei)[0]) < 1e-5
    assert np.all(g[-2] == 0) and np.all(g[-1] == 0)


def y_only_value_and_grads(fn, x, coeffs, h0, wy, return_state=False, starts=None, dtype=mx.float32):
    """y and d(sum y*wy)/d(every input, the incoming state included) through
    fn(x, coeffs, state, return_state[, doc_starts]): a loss on y alone, as in training."""
    extra = {} if starts is None else {"doc_starts": mx.array(starts)}

    def loss(x, cs, h0r, h0i):
        y, _ = fn(x, CEMACoefficients(*cs), (h0r, h0i), return_state, **extra)
        return (y * mx.array(wy)).sum(), y

    args = (mx.array(x).astype(dtype), [mx.array(c) for c in coeffs], mx.array(h0[0]), mx.array(h0[1]))
    (_, y), g = mx.value_and_grad(loss, argnums=(0, 1, 2, 3))(*args)
    grads = [g[0], *g[1], g[2], g[3]]
    mx.eval(y, grads)
    assert grads[0].dtype == dtype
    return np.array(y), [np.array(a.astype(mx.float32)) for a in grads]


def ght0_of_backward(fn) -> int:
    """Run fn() with launches recorded; the GHT0 of its backward kernels (one value expected)."""
    saved, inner = K._launcher.override, K._launcher()
    seen = set()

    def recording(name, inputs, templates, *args):
        if name.startswith("cema_bwd") and name != "cema_bwd_combine":
            seen.add(dict(templates)["GHT0"])
        return inner(name, inputs, templates, *args)
    recording.max_split = inner.max_split
    K.set_launcher(recording)
    try:
        out = fn()
    finally:
        K.set_launcher(saved)
    assert len(seen) == 1, seen
    return seen.pop(), out


# (L, chunk): one step; odd length over 8-step chunks (short last chunk); one chunk; 25 chunks;
# every step its own chunk.
@pytest.mark.parametrize("L,chunk,dtype", [(1, None, mx.float32), (37, 8, mx.float32), (37, 64, mx.float32),
                                           (200, 8, mx.float32), (37, 1, mx.float32), (37, 8, mx.bfloat16)])
def test_cpu_emulated_no_final_state_backward(cpu_kernels, monkeypatch, L, chunk, dtype):
    """return_state=False (a loss on y only, as every training step): the backward runs the GHT0 = 1
    (gamma-free) kernels, and every gradient, the nonzero incoming state's included, matches float64
    and the GHT0 = 0 kernels (return_state=True, the state unused) at fp32 rounding."""
    monkeypatch.setattr(K, "CHUNK_OVERRIDE", chunk)
    x, coeffs, h0, w = make_case(2, L, 3, 4, seed=L + 11, dtype=dtype)
    ght0, (y, g) = ght0_of_backward(lambda: y_only_value_and_grads(K.cema_kernel_scan, x, coeffs, h0, w[0],
                                                                   dtype=dtype))
    assert ght0 == 1
    zero = np.zeros_like(w[1])
    (ry, _, _), rg = torch_reference(x, coeffs, h0, [w[0], zero, zero])
    assert rel(y, ry) < 1e-5
    for name, a, b in zip(FIELDS, g, rg):
        tol = 1e-2 if (name == "x" and dtype == mx.bfloat16) else 2e-5   # bf16 gx rounds to bf16
        assert rel(a, b) < tol, (name, rel(a, b))
    ght0, (sy, sg) = ght0_of_backward(lambda: y_only_value_and_grads(K.cema_kernel_scan, x, coeffs, h0, w[0],
                                                                     return_state=True, dtype=dtype))
    assert ght0 == 0
    assert np.array_equal(y, sy)
    for name, a, b in zip(FIELDS, g, sg):
        tol = 1e-2 if (name == "x" and dtype == mx.bfloat16) else 1e-5
        assert rel(a, b) < tol, (name, rel(a, b))


@pytest.mark.parametrize("layout,chunk", [PACKED_LAYOUTS[2], PACKED_LAYOUTS[3], PACKED_LAYOUTS[4]])
def test_cpu_emulated_reset_no_final_state_backward(cpu_kernels, monkeypatch, layout, chunk):
    """Packed rows with a (dropped) incoming state, a loss on y only: GHT0 = 1 with RESET = 1 against
    every document alone in float64 and against GHT0 = 0 (return_state=True); the start at t = 0
    cuts the state off, so its gradient is exactly zero."""
    monkeypatch.setattr(K, "CHUNK_OVERRIDE", chunk)
    starts = starts_from_lengths(layout)
    B, L = starts.shape
    x, coeffs, h0, w = make_case(B, L, 3, 4, seed=L + B + 3)
    ght0, (y, g) = ght0_of_backward(lambda: y_only_value_and_grads(K.cema_kernel_scan, x, coeffs, h0, w[0],
                                                                   starts=starts))
    assert ght0 == 1
    ry, rg = per_document_reference(x, coeffs, starts, w[0])
    assert rel(y, ry) < 1e-5
    for name, a, b in zip(PACKED_FIELDS, g, rg):
        assert rel(a, b) < 2e-5, (name, rel(a, b))
    assert np.all(g[-2] == 0) and np.all(g[-1] == 0)
    ght0, (sy, sg) = ght0_of_backward(lambda: y_only_value_and_grads(K.cema_kernel_scan, x, coeffs, h0, w[0],
                                                                     return_state=True, starts=starts))
    assert ght0 == 0 and np.array_equal(y, sy)
    for name, a, b in zip(FIELDS, g, sg):
        assert rel(a, b) < 1e-5 if name not in ("h0_re", "h0_im") else np.all(b == 0), name


@pytest.mark.parametrize("chunk", [8, None])
def test_cpu_emulated_forward_with_vanishing_p(cpu_kernels, monkeypatch, chunk):
    """cema_fwd_final carries h / p with |p| floored at 1e-30: a p of 0, a subnormal, one below the
    floor and a negative one give the float64 y and final state (the incoming state still decays
    through such a dim), and a NaN p still shows up in y."""
    monkeypatch.setattr(K, "CHUNK_OVERRIDE", chunk)
    x, coeffs, h0, w = make_case(2, 37, 3, 4, seed=9)
    coeffs[0][0, 0], coeffs[0][1, 2], coeffs[0][2, 1], coeffs[0][2, 3] = 0.0, 1e-39, 1e-33, -0.3
    c = CEMACoefficients(*(mx.array(a) for a in coeffs))
    y, (hr, hi) = K.cema_kernel_scan(mx.array(x), c, (mx.array(h0[0]), mx.array(h0[1])), True)
    (ry, rhr, rhi), _ = torch_reference(x, coeffs, h0, w)
    assert rel(y, ry) < 1e-5 and rel(hr, rhr) < 1e-5 and rel(hi, rhi) < 1e-5
    assert rel(hr[:, 0, 0], rhr[:, 0, 0]) < 1e-5 and rel(hi[:, 1, 2], rhi[:, 1, 2]) < 1e-5
    coeffs[0][1, 1] = np.nan
    y, _ = K.cema_kernel_scan(mx.array(x), CEMACoefficients(*(mx.array(a) for a in coeffs)))
    y = np.array(y)
    assert np.isnan(y[:, :, 1]).all() and np.isfinite(y[:, :, [0, 2]]).all()


def test_kernel_check_covers_the_no_final_state_backward(cpu_kernels):
    """kernel_check's "no final state" case (what training runs) takes the GHT0 = 1 backward, passes
    on the emulated kernels, and fails when only that backward's gq / ggamma partial sums are off."""
    from mlx_megalodon import kernel_check as KC
    case = [c for c in KC.CASES if c[0] == "CEMA scan, no final state"]
    ght0, reason = ght0_of_backward(lambda: KC.check(case))
    assert ght0 == 1 and reason is None
    inner = K._launcher()

    def off(name, inputs, templates, *args):
        out = inner(name, inputs, templates, *args)
        if name == "cema_bwd_final" and dict(templates)["GHT0"] == 1:
            out[1] = out[1] * 1.01
        return out
    off.max_split = inner.max_split
    K.set_launcher(off)
    reason = KC.check(case)
    assert reason is not None and "no final state gradient" in reason, reason


def record_launches(launched: list) -> None:
    """Route launches through the current (test) launcher, appending (kernel, RESET) to `launched`."""
    inner = K._launcher()

    def recording(name, inputs, templates, *args):
        launched.append((name, dict(templates)["RESET"]))
        return inner(name, inputs, templates, *args)
    recording.max_split = inner.max_split
    K.set_launcher(recording)


def test_packed_dispatch(cpu_kernels, monkeypatch):
    """cema_scan with doc_starts launches the RESET = 1 kernels where the kernel is available,
    RESET = 0 without doc_starts, nothing under MEGALODON_KERNELS=0; a bad shape is one clear error."""
    launched = []
    record_launches(launched)
    starts = starts_from_lengths([[5, 15], [1, 19]])
    x, coeffs, _, _ = make_case(2, 20, 3, 4, seed=0)
    xa, c = mx.array(x), CEMACoefficients(*(mx.array(a) for a in coeffs))
    y, state = cema_scan(xa, c, doc_starts=mx.array(starts))
    assert state is None and launched and all(r == 1 for _, r in launched)
    assert rel(y, cema_segmented(xa, c, mx.array(starts))) < 1e-5
    launched.clear()
    cema_scan(xa, c)
    assert launched and all(r == 0 for _, r in launched)
    launched.clear()
    monkeypatch.setenv("MEGALODON_KERNELS", "0")
    y0, _ = cema_scan(xa, c, doc_starts=mx.array(starts))
    assert not launched and rel(y0, y) < 1e-5
    monkeypatch.setenv("MEGALODON_KERNELS", "1")
    with pytest.raises(ValueError, match="doc_starts must have shape"):
        K.cema_kernel_scan(xa, c, doc_starts=mx.array(starts[:, :10]))
    with pytest.raises(ValueError, match="takes no state"):
        cema_scan(xa, c, return_state=True, doc_starts=mx.array(starts))


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


# y only (return_state=False, the GHT0 = 1 backward every training step runs): (B, L, D, N, chunk,
# backward state dims per thread, dtype, layout). bwd_npt 16 / 8 / 4 at N = 16: NSPLIT 1 / 2 / 4
# lanes per (b, d). layout None: no resets, a nonzero incoming state; else as GPU_PACKED_CASES.
GPU_NO_FINAL_STATE_CASES = [
    (2, 1, 7, 16, None, 4, mx.float32, None),          # one step
    (2, 37, 7, 16, None, 16, mx.float32, None),        # odd length: two chunks, last of 5 steps
    (2, 37, 7, 16, None, 8, mx.float32, None),
    (2, 37, 7, 16, 37, 4, mx.float32, None),           # one chunk
    (1, 300, 5, 3, 300, 4, mx.float32, None),          # one chunk, odd N (one lane per (b, d))
    (2, 5000, 7, 16, None, 16, mx.float32, None),      # many chunks
    (2, 5000, 7, 16, None, 8, mx.float32, None),
    (2, 5000, 7, 16, None, 4, mx.float32, None),
    (1, 5000, 33, 16, 700, 4, mx.float32, None),       # few long chunks, short last one
    (2, 5000, 7, 16, None, 4, mx.bfloat16, None),
    (2, 37, 7, 16, 8, 4, mx.float32, [[1, 1, 9, 1, 16, 1, 7, 1], [7, 1, 8, 16, 4, 1]]),
    (2, 64, 7, 16, 1, 8, mx.float32, [[64], [1, 31, 32]]),   # every step its own chunk
    (2, 5000, 7, 16, None, 16, mx.float32, 40),
    (2, 5000, 7, 16, None, 4, mx.float32, 300),
    (2, 5000, 7, 16, None, 8, mx.bfloat16, 300),
]


@gpu
@pytest.mark.parametrize("B,L,D,N,chunk,bwd_npt,dtype,layout", GPU_NO_FINAL_STATE_CASES)
def test_gpu_no_final_state_backward(monkeypatch, B, L, D, N, chunk, bwd_npt, dtype, layout):
    """A loss on y alone through return_state=False: the GHT0 = 1 kernels against float64 and against
    the GHT0 = 0 kernels (return_state=True, the state unused), every gradient (the incoming
    state's included)."""
    monkeypatch.setenv("MEGALODON_KERNELS", "1")
    monkeypatch.setattr(K, "CHUNK_OVERRIDE", chunk)
    monkeypatch.setattr(K, "BWD_MAX_NPT", bwd_npt)
    starts = None
    if layout is not None:
        if not isinstance(layout, list):
            layout = random_layout(np.random.default_rng(L + D), B, L, layout)
        starts = starts_from_lengths(layout)
    x, coeffs, h0, w = make_case(B, L, D, N, seed=L + D + 2, dtype=dtype)
    ght0, (y, g) = ght0_of_backward(lambda: y_only_value_and_grads(K.cema_kernel_scan, x, coeffs, h0, w[0],
                                                                   starts=starts, dtype=dtype))
    assert ght0 == 1
    if starts is None:
        zero = np.zeros_like(w[1])
        (ry, _, _), rg = torch_reference(x, coeffs, h0, [w[0], zero, zero])
    else:
        ry, rg = per_document_reference(x, coeffs, starts, w[0])
        assert np.all(g[-2] == 0) and np.all(g[-1] == 0)      # the start at t = 0 drops the state
    assert rel(y, ry) < 1e-5, rel(y, ry)
    for name, a, b in zip(FIELDS, g, rg):
        tol = 1e-2 if (name == "x" and dtype == mx.bfloat16) else 2e-5
        assert rel(a, b) < tol, (name, rel(a, b))
    ght0, (sy, sg) = ght0_of_backward(lambda: y_only_value_and_grads(K.cema_kernel_scan, x, coeffs, h0, w[0], True,
                                                                     starts=starts, dtype=dtype))
    assert ght0 == 0 and np.array_equal(y, sy)
    for name, a, b in zip(FIELDS, g, sg):
        tol = 1e-2 if (name == "x" and dtype == mx.bfloat16) else 1e-5
        assert (rel(a, b) < tol) if np.any(b) else np.all(a == 0), (name, rel(a, b))


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


# Packed rows on the GPU: (B, L, D, N, chunk, forward state dims per thread, dtype, layout). layout:
# document lengths per row, or a mean length for random_layout (geometric lengths, so 1-token
# documents and starts on chunk boundaries and mid-chunk all occur).
GPU_PACKED_CASES = [
    (2, 37, 7, 16, 8, 16, mx.float32, [[1, 1, 9, 1, 16, 1, 7, 1], [7, 1, 8, 16, 4, 1]]),
    (2, 37, 7, 16, 8, 4, mx.float32, [[1, 1, 9, 1, 16, 1, 7, 1], [7, 1, 8, 16, 4, 1]]),
    (2, 64, 7, 16, 1, 16, mx.float32, [[64], [1, 31, 32]]),     # every step its own chunk
    (2, 5000, 7, 16, None, 16, mx.float32, 300),
    (2, 5000, 7, 16, None, 8, mx.float32, 40),
    (2, 5000, 7, 16, None, 4, mx.float32, 40),
    (1, 5000, 33, 16, 700, 16, mx.float32, 1000),               # few long chunks
    (2, 37, 7, 16, 8, 16, mx.bfloat16, [[1, 1, 9, 1, 16, 1, 7, 1], [7, 1, 8, 16, 4, 1]]),
    (2, 5000, 7, 16, None, 8, mx.bfloat16, 300),
]


@gpu
@pytest.mark.parametrize("B,L,D,N,chunk,fwd_npt,dtype,layout", GPU_PACKED_CASES)
def test_gpu_reset_kernels_forward_and_grads(monkeypatch, B, L, D, N, chunk, fwd_npt, dtype, layout):
    monkeypatch.setenv("MEGALODON_KERNELS", "1")
    monkeypatch.setattr(K, "CHUNK_OVERRIDE", chunk)
    monkeypatch.setattr(K, "FWD_MAX_NPT", fwd_npt)
    if not isinstance(layout, list):
        layout = random_layout(np.random.default_rng(L + D), B, L, layout)
    starts = starts_from_lengths(layout)
    x, coeffs, _, w = make_case(B, L, D, N, seed=L + D + 1, dtype=dtype)
    y, g = packed_value_and_grads(kernel_packed, x, coeffs, starts, w[0], dtype)

    # Against every document alone in float64: fp32 accumulation only (x exact in its dtype); the
    # gradient of a bf16 x comes back in bf16.
    ry, rg = per_document_reference(x, coeffs, starts, w[0])
    assert rel(y, ry) < 1e-5, rel(y, ry)
    for name, a, b in zip(PACKED_FIELDS, g, rg):
        tol = 1e-2 if (name == "x" and dtype == mx.bfloat16) else 2e-5
        assert rel(a, b) < tol, (name, rel(a, b))

    # Against cema_segmented (its matmuls run in TF32 on CUDA by default, hence 1e-3).
    oy, og = packed_value_and_grads(ops_packed, x, coeffs, starts, w[0], dtype)
    assert rel(y, oy) < 1e-3, rel(y, oy)
    for name, a, b in zip(PACKED_FIELDS, g, og):
        tol = 1e-2 if (name == "x" and dtype == mx.bfloat16) else 1e-3
        assert rel(a, b) < tol, (name, rel(a, b))


@gpu
def test_gpu_packed_module_grad_under_compile(monkeypatch):
    """mx.compile(mx.value_and_grad(...)) through MultiHeadComplexEMA with doc_starts: the reset
    kernels (MEGALODON_KERNELS=1) and cema_segmented (=0) agree (TF32 matmuls there, hence 2e-3)."""
    cema = MultiHeadComplexEMA(16, 16)
    names = ("alpha", "delta", "theta", "gamma", "omega")
    params = [getattr(cema, k) for k in names]
    x = mx.random.normal((2, 333, 16))
    starts = mx.array(starts_from_lengths(random_layout(np.random.default_rng(1), 2, 333, 50)))

    def loss(x, starts, *ps):
        for k, v in zip(names, ps):
            setattr(cema, k, v)
        y, _ = cema(x, doc_starts=starts)
        return (y * y).mean()

    results = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("MEGALODON_KERNELS", flag)
        fn = mx.compile(mx.value_and_grad(loss, argnums=(0, *range(2, 7))))
        val, grads = fn(x, starts, *params)
        mx.eval(val, grads)
        results[flag] = (float(val), grads)
    for k, v in zip(names, params):
        setattr(cema, k, v)
    assert abs(results["1"][0] - results["0"][0]) < 1e-4 * abs(results["0"][0])
    for k, a, b in zip(("x", *names), results["1"][1], results["0"][1]):
        assert rel(a, b) < 2e-3, k


@pytest.mark.parametrize("grad_checkpoint", [False, True])
def test_cpu_emulated_packed_model_gradients(cpu_kernels, monkeypatch, grad_checkpoint):
    """A tiny model on packed rows (segment_ids), eager loss and gradients, with training's
    gradient checkpointing or without: the CPU-emulated reset kernels agree with the ops path."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_megalodon.train import set_grad_checkpoint
    from test_packed import LAYOUTS, _doc_loss_fns
    from test_parity import CONFIGS, build_pair

    monkeypatch.setattr(K, "CHUNK_OVERRIDE", 8)
    args, _, model = build_pair(CONFIGS["ndim16_heads4"])
    model.train()
    set_grad_checkpoint(model, grad_checkpoint)
    rows = LAYOUTS["mixed"]
    toks = np.random.default_rng(7).integers(0, args.vocab_size, size=(2, sum(rows[0]) + 1))
    packed, _ = _doc_loss_fns(rows, toks[:, :-1], toks[:, 1:])
    launched = []
    record_launches(launched)
    results = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("MEGALODON_KERNELS", flag)
        loss, grads = nn.value_and_grad(model, packed)(model)
        results[flag] = (loss.item(), dict(tree_flatten(grads)))
        if flag == "1":   # forward and backward reset kernels ran
            assert {"cema_fwd_final", "cema_bwd_final"} <= {n for n, r in launched if r == 1}, launched
    (loss_k, grads_k), (loss_o, grads_o) = results["1"], results["0"]
    assert abs(loss_k - loss_o) <= 1e-5 * abs(loss_o)
    assert set(grads_k) == set(grads_o)
    for key in sorted(grads_o):
        g, r = np.array(grads_k[key]), np.array(grads_o[key])
        assert float(np.abs(g - r).max()) <= 1e-4 * float(np.abs(r).max()) + 1e-7, key


@pytest.mark.parametrize("where", ["cpu-emulation", "gpu"])
@pytest.mark.parametrize("packed,return_state", [(False, False), (False, True), (True, False)])
def test_y_in_compute_dtype_is_one_rounding_of_the_float32_y(tmp_path, monkeypatch, where, packed, return_state):
    """y_dtype=bf16 (what the attention block asks for): the kernels write y and read its cotangent
    in bf16, and y, the final state and every gradient are bit-identical to a float32 y cast down
    after the scan (the block's old way). On the GPU this runs the TY = bf16 kernels themselves."""
    if where == "gpu" and not ON_GPU:
        pytest.skip("no GPU backend (custom kernels need Metal or CUDA)")
    if where == "cpu-emulation" and shutil.which("g++") is None:
        pytest.skip("needs g++")
    inner = K.CpuLauncher(str(tmp_path)) if where == "cpu-emulation" else K._gpu_launcher(K.gpu_backend())
    monkeypatch.setenv("MEGALODON_KERNELS", "1")
    monkeypatch.setattr(K, "CHUNK_OVERRIDE", 8)
    x, coeffs, h0, w = make_case(2, 37, 6, 4, seed=5, dtype=mx.bfloat16)
    xb = mx.array(x).astype(mx.bfloat16)
    starts = mx.array([[0] * 20 + [20] * 17, [0] * 37]) if packed else None
    wy, wr, wi = (mx.array(a) for a in w)

    def loss(x, cs, h0r, h0i, y_dtype):
        state = (h0r, h0i) if return_state else None
        y, new = K.cema_kernel_scan(x, CEMACoefficients(*cs), state, return_state, starts, y_dtype=y_dtype)
        out = (y.astype(mx.bfloat16).astype(mx.float32) * wy).sum()
        if return_state:
            out = out + (new[0] * wr).sum() + (new[1] * wi).sum()
        return out, y

    seen = {}

    def recording(name, inputs, templates, threads, output_shapes, output_dtypes):
        if name == "cema_fwd_final":
            seen["y"] = output_dtypes[0]
        elif name in ("cema_bwd_local", "cema_bwd_final"):
            seen[name] = inputs[0 if name == "cema_bwd_local" else 1].dtype   # gy
        return inner(name, inputs, templates, threads, output_shapes, output_dtypes)
    recording.max_split = inner.max_split
    recording.compile_time_stride = inner.compile_time_stride
    K.set_launcher(recording)
    try:
        args = (xb, [mx.array(c) for c in coeffs], mx.array(h0[0]), mx.array(h0[1]))
        grad = lambda y_dtype: mx.value_and_grad(lambda *a: loss(*a, y_dtype), argnums=(0, 1, 2, 3))(*args)
        (_, y), g = grad(mx.bfloat16)
        mx.eval(y, g)
        assert seen == {"y": mx.bfloat16, "cema_bwd_local": mx.bfloat16, "cema_bwd_final": mx.bfloat16}, seen
        assert y.dtype == mx.bfloat16
        seen.clear()
        (_, y32), g32 = grad(None)
        mx.eval(y32, g32)
        assert seen["y"] == mx.float32 and y32.dtype == mx.float32
    finally:
        K.set_launcher(None)
    assert np.array_equal(np.array(y.astype(mx.float32)), np.array(y32.astype(mx.bfloat16).astype(mx.float32)))
    flat = lambda g: [g[0], *g[1], g[2], g[3]]
    for name, a, b in zip(FIELDS, flat(g), flat(g32)):
        assert np.array_equal(np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))), name


def test_y_dtype_must_be_a_float_the_kernels_write(cpu_kernels):
    x, coeffs, _, _ = make_case(1, 5, 3, 4, seed=1)
    with pytest.raises(ValueError, match="y_dtype"):
        K.cema_kernel_scan(mx.array(x), CEMACoefficients(*(mx.array(c) for c in coeffs)), y_dtype=mx.int32)


@pytest.mark.parametrize("packed", [False, True])
def test_cema_module_hands_bf16_to_the_kernels_unconverted(cpu_kernels, packed):
    """MultiHeadComplexEMA passes a bfloat16 x to the kernels as it is (no float32 copy in front):
    the kernels receive bf16, and y and every gradient are bit-identical to converting first."""
    from mlx_megalodon.complex_exponential_moving_average import MultiHeadComplexEMA, cema_scan
    mx.random.seed(3)
    cema = MultiHeadComplexEMA(6, 4)
    x = mx.random.normal((2, 37, 6)).astype(mx.bfloat16)
    starts = mx.array([[0] * 20 + [20] * 17, [0] * 37]) if packed else None
    w = mx.random.normal((2, 37, 6))

    def loss(x, params, pre_cast):
        cema.update(params)
        if pre_cast:   # what the module did before: a float32 copy of x in front of the scan
            y = cema_scan(x.astype(mx.float32), cema.coefficients(), doc_starts=starts)[0]
        else:
            y = cema(x, doc_starts=starts)[0]
        return (y * w).sum()

    saved, inner = K._launcher.override, K._launcher()
    dtypes = []

    def recording(name, inputs, templates, *args):
        if name in ("cema_fwd_local", "cema_fwd_final", "cema_bwd_final"):   # x is their first input
            dtypes.append(inputs[0].dtype)
        return inner(name, inputs, templates, *args)
    recording.max_split = inner.max_split
    K.set_launcher(recording)
    try:
        got = mx.value_and_grad(loss, argnums=(0, 1))(x, cema.parameters(), False)
        assert dtypes and set(dtypes) == {mx.bfloat16}
        assert cema(x, doc_starts=starts)[0].dtype == mx.float32
        dtypes.clear()
        want = mx.value_and_grad(loss, argnums=(0, 1))(x, cema.parameters(), True)
    finally:
        K.set_launcher(saved)
    assert set(dtypes) == {mx.float32}                    # the old way: the kernels saw the copy
    assert got[1][0].dtype == mx.bfloat16
    flat = lambda r: [r[0], r[1][0], *(v for _, v in sorted(tree_flatten(r[1][1])))]
    for a, b in zip(flat(got), flat(want)):
        assert np.array_equal(np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32)))
