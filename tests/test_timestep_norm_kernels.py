"""The fused TimestepNorm kernels (mlx_megalodon/timestep_norm_kernels.py, metal/timestep_norm.body).

On every machine (CPU): the generated metal/timestep_norm.{metal,cu} are up to date (the Metal
syntax check in test_kernels.py parses every metal/*.metal), the kernel bodies run one lane per
(b, group) on the CPU (g++ + ctypes) and match the ops path (timestep_norm.timestep_norm) and a
float64 step-by-step Welford reference (torch autograd) in y, the final state and the gradients of
x, weight, bias and the incoming mean / var; with and without an incoming state, with document
resets (starts at 0, on chunk boundaries, mid-chunk, 1-token documents, different per row),
L = 1, odd L, one chunk, many chunks; the dispatch switch.
On a GPU backend: the real kernels (fp32 and bf16 x, 32 lanes and 8 lanes per group) against the
ops path and the float64 reference. Tolerances are relative Frobenius errors, in each assert.
"""
from __future__ import annotations

import shutil

import mlx.core as mx
import numpy as np
import pytest

import factory
from factory import PACKED_LAYOUTS, starts_from_lengths
from mlx_megalodon import kernels as K
from mlx_megalodon import timestep_norm_kernels as TK
from mlx_megalodon.timestep_norm import TimestepNorm, TimestepNormState, timestep_norm

ON_GPU = K.gpu_backend() is not None
EPS = 1e-5
GRAD_NAMES = ["x", "weight", "bias", "mean0", "var0"]


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def make_case(B, L, D, G, seed, with_state, offset=0.0, dtype=mx.float32):
    """x (rows with their own scale and an offset), affine parameters, an incoming state (count 0,
    mean 0, var 1: the prior; or a random one) and loss weights for y and the final mean / var."""
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(B, L, D)) * rng.uniform(0.5, 2.0, size=(B, 1, 1)) + offset
         + rng.normal(size=(1, 1, D)) * 0.3).astype(np.float32)
    x = np.array(mx.array(x).astype(dtype).astype(mx.float32))   # exactly representable in dtype
    weight = (rng.normal(size=D) * 0.2).astype(np.float32)
    bias = (rng.normal(size=D) * 0.2).astype(np.float32)
    if with_state:
        count = rng.integers(1, 50, size=B).astype(np.int64)
        mean = (rng.normal(size=(B, G)) + offset).astype(np.float32)
        var = rng.uniform(0.3, 3.0, size=(B, G)).astype(np.float32)
    else:
        count, mean, var = np.zeros(B, np.int64), np.zeros((B, G), np.float32), np.ones((B, G), np.float32)
    w = [rng.normal(size=(B, L, D)).astype(np.float32), rng.normal(size=(B, G)).astype(np.float32),
         rng.normal(size=(B, G)).astype(np.float32)]
    return x, weight, bias, (count, mean, var), w


def value_and_grads(fn, x, weight, bias, state, w, G, starts=None, dtype=mx.float32):
    """(y, count, mean, var) and d(sum y*w0 + mean*w1 + var*w2)/d(x, weight, bias, mean0, var0)
    through fn = timestep_norm (whatever path it dispatches to)."""
    count = mx.array(state[0])
    wy, wm, wv = (mx.array(a) for a in w)
    ds = None if starts is None else mx.array(starts)

    def loss(x, weight, bias, m0, v0):
        y, st = fn(x, weight, bias, TimestepNormState(count, m0, v0), G, EPS, ds)
        return (y.astype(mx.float32) * wy).sum() + (st.mean * wm).sum() + (st.var * wv).sum(), (y, st)

    args = (mx.array(x).astype(dtype), mx.array(weight), mx.array(bias), mx.array(state[1]), mx.array(state[2]))
    (_, (y, st)), g = mx.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))(*args)
    mx.eval(y, st, g)
    assert y.dtype == dtype and g[0].dtype == dtype
    out = (np.array(y.astype(mx.float32)), np.array(st.count), np.array(st.mean), np.array(st.var))
    return out, [np.array(a.astype(mx.float32)) for a in g]


def torch_reference(x, weight, bias, state, w, G, starts=None):
    """float64 upstream semantics, one step at a time: each step's group mean / biased variance
    Welford-merged (count weights) into the running statistics, which restart from the incoming
    state at every document start. Returns (y, count, mean, var) and the gradients by autograd."""
    torch = pytest.importorskip("torch")
    B, L, D = x.shape
    t = lambda a: torch.tensor(np.asarray(a, np.float64), requires_grad=True)
    xt, wt, bt, m0, v0 = t(x), t(weight), t(bias), t(state[1]), t(state[2])
    c0 = torch.tensor(state[0], dtype=torch.float64)[:, None]
    if starts is None:
        starts = np.zeros((B, L), np.int64)
    xs = xt.reshape(B, L, G, D // G)
    mu = xs.mean(-1)
    s = (xs - mu[..., None]).square().mean(-1)
    ys, n, m, v = [], None, None, None
    for i in range(L):
        restart = torch.tensor(starts[:, i] == i)[:, None]
        if i == 0:
            n, m, v = c0, m0, v0
        else:
            n = torch.where(restart, c0, n)
            m = torch.where(restart, m0, m)
            v = torch.where(restart, v0, v)
        n1 = n + 1
        d = mu[:, i] - m
        m_new = m + d / n1
        v = (n * v + s[:, i] + d * (mu[:, i] - m_new)) / n1
        n, m = n1, m_new
        yi = (xs[:, i] - m[..., None]) * torch.rsqrt(v[..., None] + EPS)
        ys.append(yi.reshape(B, D) * (wt + 1) + bt)
    y = torch.stack(ys, 1)
    wy, wm, wv = (torch.tensor(a, dtype=torch.float64) for a in w)
    loss = (y * wy).sum() + (m * wm).sum() + (v * wv).sum()
    grads = torch.autograd.grad(loss, [xt, wt, bt, m0, v0])
    count = state[0] + (L - np.asarray(starts)[:, -1])
    return (y.detach().numpy(), count, m.detach().numpy(), v.detach().numpy()), [g.numpy() for g in grads]


def ops_path(x, weight, bias, state, G, eps, doc_starts):
    """timestep_norm with the kernels switched off (the reference implementation)."""
    import os
    old = os.environ.get("MEGALODON_TNORM_KERNEL")
    os.environ["MEGALODON_TNORM_KERNEL"] = "0"
    try:
        return timestep_norm(x, weight, bias, state, G, eps, doc_starts)
    finally:
        if old is None:
            del os.environ["MEGALODON_TNORM_KERNEL"]
        else:
            os.environ["MEGALODON_TNORM_KERNEL"] = old


def check_against_references(x, weight, bias, state, w, G, starts=None, dtype=mx.float32,
                             tol_y=2e-5, tol_g=5e-5, tol_vs_ops=5e-5):
    launched = []
    record_launches(launched)
    (y, cnt, mean, var), g = value_and_grads(timestep_norm, x, weight, bias, state, w, G, starts, dtype)
    assert launched, "the kernel path did not run"
    assert any(n.startswith("tnorm_bwd") for n in launched), "the kernel backward did not run"
    (ry, rcnt, rmean, rvar), rg = torch_reference(x, weight, bias, state, w, G, starts)
    assert np.array_equal(cnt, rcnt)
    assert rel(y, ry) < tol_y, rel(y, ry)
    assert rel(mean, rmean) < tol_y and rel(var, rvar) < tol_y, (rel(mean, rmean), rel(var, rvar))
    for name, a, b in zip(GRAD_NAMES, g, rg):
        if not np.any(b):   # no incoming state: its gradient is exactly zero
            assert not np.any(a), name
            continue
        assert rel(a, b) < tol_g, (name, rel(a, b))
    (oy, ocnt, omean, ovar), og = value_and_grads(ops_path, x, weight, bias, state, w, G, starts, dtype)
    assert np.array_equal(cnt, ocnt)
    assert rel(y, oy) < tol_vs_ops and rel(mean, omean) < tol_vs_ops and rel(var, ovar) < tol_vs_ops
    for name, a, b in zip(GRAD_NAMES, g, og):
        if np.any(b):
            assert rel(a, b) < tol_vs_ops, (name, rel(a, b))


def record_launches(launched: list) -> None:
    """Route the TimestepNorm kernel launches through the current launcher, noting their names."""
    factory.record_launches(TK, launched, lanes=TK.GPU_LANES, max_group=TK.MAX_NPT)


# ------------------------------------------------------------------------------------------------
# CPU: sources, emulated kernels, dispatch


def test_generated_sources_are_up_to_date():
    d = K.source_dir()
    assert (d / "timestep_norm.metal").read_text() == TK.generate_metal(), "run: python -m mlx_megalodon.kernels"
    assert (d / "timestep_norm.cu").read_text() == TK.generate_cuda(), "run: python -m mlx_megalodon.kernels"


@pytest.fixture
def cpu_kernels(tmp_path, monkeypatch):
    if shutil.which("g++") is None:
        pytest.skip("needs g++")
    TK.set_launcher(TK.CpuLauncher(str(tmp_path)))
    monkeypatch.setenv("MEGALODON_KERNELS", "1")
    monkeypatch.setenv("MEGALODON_TNORM_KERNEL", "1")
    try:
        yield
    finally:
        TK.set_launcher(None)


# (L, chunk, with_state): one step; odd length over 8-step chunks (short last chunk); one chunk;
# 25 chunks; chunks of 1 step; the automatic plan.
@pytest.mark.parametrize("L,chunk,with_state", [
    (1, None, False), (1, None, True), (37, 8, False), (37, 8, True), (37, 64, True), (200, 8, True),
    (13, 1, True), (45, None, False)])
def test_cpu_emulated_kernels_match_references(cpu_kernels, monkeypatch, L, chunk, with_state):
    monkeypatch.setattr(TK, "CHUNK_OVERRIDE", chunk)
    x, weight, bias, state, w = make_case(2, L, 12, 3, seed=L + 7 * with_state, with_state=with_state)
    check_against_references(x, weight, bias, state, w, 3)


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("layout,chunk", PACKED_LAYOUTS)
def test_cpu_emulated_reset_kernels_match_references(cpu_kernels, monkeypatch, layout, chunk, with_state):
    monkeypatch.setattr(TK, "CHUNK_OVERRIDE", chunk)
    starts = starts_from_lengths(layout)
    B, L = starts.shape
    x, weight, bias, state, w = make_case(B, L, 8, 2, seed=L + B, with_state=with_state)
    check_against_references(x, weight, bias, state, w, 2, starts)


def test_cpu_emulated_large_mean_is_robust(cpu_kernels, monkeypatch):
    """x = 300 + O(1) noise in float32: the shifted Welford merges and the reference-mean carries
    keep the statistics and gradients at float32 accuracy (raw sums of squares would not)."""
    monkeypatch.setattr(TK, "CHUNK_OVERRIDE", 8)
    x, weight, bias, state, w = make_case(2, 64, 8, 2, seed=3, with_state=True, offset=300.0)
    check_against_references(x, weight, bias, state, w, 2, tol_y=1e-4, tol_g=1e-3, tol_vs_ops=1e-3)
    starts = starts_from_lengths([[20, 1, 43], [5, 59]])
    check_against_references(x, weight, bias, state, w, 2, starts, tol_y=1e-4, tol_g=1e-3, tol_vs_ops=1e-3)


def test_cpu_emulated_documents_with_far_apart_means(cpu_kernels, monkeypatch):
    """Packed documents whose means differ by hundreds of stds (each restarts from the prior): y,
    the final state and the gradients still agree with float64 to float32 accuracy."""
    monkeypatch.setattr(TK, "CHUNK_OVERRIDE", 16)
    layout = [[9, 14, 25, 16], [30, 3, 31]]
    starts = starts_from_lengths(layout)
    x, weight, bias, state, w = make_case(2, 64, 8, 2, seed=4, with_state=False)
    for b, lengths in enumerate(layout):
        for i, (first, n) in enumerate(zip(np.cumsum([0, *lengths[:-1]]), lengths)):
            x[b, first:first + n] += 250.0 * (-1) ** i
    check_against_references(x, weight, bias, state, w, 2, starts, tol_y=1e-4, tol_g=1e-3, tol_vs_ops=2e-2)


def module_grads_kernel_vs_ops(compile_: bool):
    """TimestepNorm (the module, prior state, packed rows): weight / bias / x gradients through the
    kernels (optionally under mx.compile) and through the ops path."""
    norm = TimestepNorm(64, 2)
    rng = np.random.default_rng(0)
    norm.weight = mx.array(rng.normal(size=64).astype(np.float32) * 0.1)
    x = mx.array(rng.normal(size=(2, 30, 64)).astype(np.float32))
    starts = mx.array(starts_from_lengths([[10, 20], [1, 29]]))

    def loss(params, x, starts):
        norm.update(params)
        y, _ = norm(x, doc_starts=starts)
        return (y * y * mx.arange(64)).sum()

    params = norm.trainable_parameters()
    grad = mx.grad(loss, argnums=(0, 1))
    g_kernel = (mx.compile(grad) if compile_ else grad)(params, x, starts)
    mx.eval(g_kernel)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEGALODON_TNORM_KERNEL", "0")
        g_ops = grad(params, x, starts)
    for k in ("weight", "bias"):
        assert rel(g_kernel[0][k], g_ops[0][k]) < 5e-5, k
    assert rel(g_kernel[1], g_ops[1]) < 5e-5


def test_cpu_emulated_module_grads(cpu_kernels):
    module_grads_kernel_vs_ops(compile_=False)   # the CPU emulation cannot run under mx.compile


def test_dispatch_policy(cpu_kernels, monkeypatch):
    """Off by default; MEGALODON_TNORM_KERNEL forces it; MEGALODON_KERNELS=0 wins; unsupported
    shapes go to the ops path; bad inputs raise one clear error."""
    launched = []
    record_launches(launched)
    x, weight, bias, state, _ = make_case(1, 9, 8, 2, seed=0, with_state=False)
    args = (mx.array(x), mx.array(weight), mx.array(bias),
            TimestepNormState(*(mx.array(a) for a in state)), 2, EPS)
    monkeypatch.delenv("MEGALODON_TNORM_KERNEL")
    assert not TK.kernel_wanted(x.shape, 2)                    # PREFER_KERNEL is off
    timestep_norm(*args)
    assert not launched
    monkeypatch.setattr(TK, "PREFER_KERNEL", True)
    assert TK.kernel_wanted(x.shape, 2)
    monkeypatch.setenv("MEGALODON_TNORM_KERNEL", "0")
    assert not TK.kernel_wanted(x.shape, 2)
    monkeypatch.setenv("MEGALODON_TNORM_KERNEL", "1")
    y, _ = timestep_norm(*args)
    assert launched
    monkeypatch.setenv("MEGALODON_KERNELS", "0")
    assert not TK.kernel_wanted(x.shape, 2)
    monkeypatch.setenv("MEGALODON_KERNELS", "1")
    assert not TK.kernel_wanted((1, 9, 9), 2)                  # D not divisible by G
    assert not TK.kernel_wanted((1, 0, 8), 2)
    with pytest.raises(ValueError, match="doc_starts must have shape"):
        TK.timestep_norm_kernel(args[0], args[1], args[2], *args[3], 2, EPS, doc_starts=mx.zeros((1, 5), mx.int32))
    with pytest.raises(ValueError, match="divisible by num_groups"):
        TK.timestep_norm_kernel(args[0], args[1], args[2], *args[3], 3, EPS)


def test_no_gpu_means_ops_path(monkeypatch):
    monkeypatch.setenv("MEGALODON_TNORM_KERNEL", "1")
    assert TK.kernel_wanted((2, 8, 64), 2) == ON_GPU
    assert TK.TIMESTEP_NORM_KERNEL_DEFAULT["metal"] is False      # never measured on a Mac
    assert TK.TIMESTEP_NORM_KERNEL_DEFAULT["cuda"] is True        # measured faster on the H200


def test_lanes_and_plan(monkeypatch):
    gpu = type("Gpu", (), {"lanes": 32})()
    # the fewest lanes that leave <= GPU_NPT (4) features each, at most 32 lanes
    assert TK.lanes(32, gpu) == (8, 4) and TK.lanes(64, gpu) == (16, 4) and TK.lanes(24, gpu) == (8, 3)
    assert TK.lanes(256, gpu) == (32, 8) and TK.lanes(6, gpu) == (2, 3) and TK.lanes(7, gpu) == (1, 7)
    assert TK.lanes(17 * 16, gpu) is None                        # 17 features a lane would spill
    assert TK.lanes(5, TK.CpuLauncher()) == (1, 5)
    monkeypatch.setattr(TK, "GPU_NPT", 1)
    assert TK.lanes(32, gpu) == (32, 1) and TK.lanes(64, gpu) == (32, 2)
    C, NC, LAST = TK.plan(8, 4096, 32, 32)
    assert C % TK.UNROLL == 0 and (NC - 1) * C + LAST == 4096 and 0 < LAST <= C
    assert TK.plan(1, 1, 32, 32) == (1, 1, 1)
    assert TK.plan(2, 37, 3, 1, chunk=8) == (8, 5, 5)


# ------------------------------------------------------------------------------------------------
# GPU (skipped without one)

gpu = pytest.mark.skipif(not ON_GPU, reason="needs a GPU backend (CUDA or Metal)")


@pytest.fixture
def gpu_kernels(monkeypatch):
    monkeypatch.setenv("MEGALODON_KERNELS", "1")
    monkeypatch.setenv("MEGALODON_TNORM_KERNEL", "1")
    TK.set_launcher(None)
    yield
    TK.set_launcher(None)


# (B, L, D, G, chunk, lanes, dtype, tolerances y / grads). bf16: y and gx are rounded to bf16
# (relative 2^-9) while the references are exact; the kernel and the ops path round the same
# float32 values, so they agree better than either with float64.
GPU_CASES = [
    (2, 300, 256, 8, None, 32, mx.float32, 2e-5, 1e-4),
    (2, 300, 256, 8, 16, 32, mx.float32, 2e-5, 1e-4),
    (2, 301, 256, 8, 24, 8, mx.float32, 2e-5, 1e-4),
    (2, 300, 256, 8, None, 32, mx.bfloat16, 5e-3, 1e-2),
    (1, 1, 64, 2, None, 32, mx.float32, 2e-5, 1e-4),
]


@gpu
@pytest.mark.parametrize("B,L,D,G,chunk,lanes,dtype,tol_y,tol_g", GPU_CASES)
@pytest.mark.parametrize("packed", [False, True])
def test_gpu_kernels_match_references(gpu_kernels, monkeypatch, B, L, D, G, chunk, lanes, dtype, tol_y, tol_g,
                                      packed):
    monkeypatch.setattr(TK, "CHUNK_OVERRIDE", chunk)
    monkeypatch.setattr(TK, "GPU_LANES", lanes)
    monkeypatch.setattr(TK, "GPU_NPT", max(1, D // G // lanes))  # exactly `lanes` lanes per group
    x, weight, bias, state, w = make_case(B, L, D, G, seed=L, with_state=True, dtype=dtype)
    starts = None
    if packed:
        rng = np.random.default_rng(L)
        layout = []
        for _ in range(B):
            cuts = np.sort(rng.choice(np.arange(1, L), size=min(L - 1, 6), replace=False)) if L > 1 else []
            layout.append(list(np.diff([0, *cuts, L])))
        starts = starts_from_lengths(layout)
    check_against_references(x, weight, bias, state, w, G, starts, dtype=dtype, tol_y=tol_y, tol_g=tol_g,
                             tol_vs_ops=tol_g)


@gpu
def test_gpu_large_mean_bf16_shapes(gpu_kernels):
    """mega200M's group shape (D 1024, G 32) with a large mean, bf16 x, prior state."""
    x, weight, bias, state, w = make_case(2, 512, 1024, 32, seed=11, with_state=False, offset=50.0,
                                          dtype=mx.bfloat16)
    check_against_references(x, weight, bias, state, w, 32, dtype=mx.bfloat16, tol_y=5e-3, tol_g=2e-2,
                             tol_vs_ops=2e-2)


@gpu
def test_gpu_module_grad_under_compile(gpu_kernels):
    module_grads_kernel_vs_ops(compile_=True)
