"""The fused cross-entropy kernels (mlx_megalodon/cross_entropy_kernels.py, metal/cross_entropy.body).

On every machine (CPU): the generated metal/cross_entropy.{metal,cu} are up to date (the Metal syntax
check in test_kernels.py parses every metal/*.metal); the kernel bodies run one lane per row on the
CPU (g++ + ctypes) and match a float64 numpy softmax cross entropy in the loss and the logits'
gradient, for float32 and bfloat16 logits, vocabularies of 1, 7, 1000 and 32003 entries, logits of
magnitude ~80, rows whose target is the max; the training loss (train.loss_fn) with the kernels
forced gives the ops path's loss and parameter gradients on a tiny model; MEGALODON_KERNELS=0 and
the default policy keep the ops path; an out-of-range target is a ValueError (or, unvalidated, a
NaN loss without an out-of-bounds read); the first-use kernel check covers the kernel when wanted.
On a GPU backend (`python3 -m pytest -q tests/test_cross_entropy_kernels.py -k gpu`): the real
kernels (32 lanes per row) against float64 and the ops path, and loss_fn under mx.compile.

Tolerances (stated in each assert): the loss to rtol = atol = 1e-5 of float64 (float32 accumulation;
the bf16 case compares with float64 on the same bf16-rounded logits, so only the kernel's float32
arithmetic differs); the gradient to rtol 1e-4 + atol 2e-6 x max|cotangent| in float32, and to
rtol 4e-3 (bf16's rounding, 2^-9, with margin) in bfloat16.
"""
from __future__ import annotations

import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import factory
from factory import tiny_args
from mlx_megalodon import cross_entropy_kernels as XK
from mlx_megalodon import kernel_check as KC
from mlx_megalodon import kernels as K
from mlx_megalodon.train import cast_params, loss_fn, new_model

ON_GPU = K.gpu_backend() is not None


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def make_case(shape, V, seed, dtype=mx.float32, scale=3.0, offset=0.0):
    """logits (shape x V, exactly representable in `dtype`), targets (every third row's target is its
    max; the others random) and loss cotangents. Returns numpy float32 logits, int32 targets,
    float32 cotangents."""
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(*shape, V)) * scale + offset).astype(np.float32)
    x = np.array(mx.array(x).astype(dtype).astype(mx.float32))
    t = rng.integers(0, V, size=shape).astype(np.int32)
    flat_t, flat_x = t.reshape(-1), x.reshape(-1, V)
    flat_t[::3] = flat_x[::3].argmax(-1)
    g = rng.normal(size=shape).astype(np.float32)
    return x, t, g


def reference(x, t, g):
    """float64 per-row loss = logsumexp(x) - x[t] and d(sum loss * g)/dx = (softmax - onehot) g."""
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    e = np.exp(x - m)
    lse = m[..., 0] + np.log(e.sum(-1))
    xt = np.take_along_axis(x, t[..., None].astype(np.int64), -1)[..., 0]
    p = e / e.sum(-1, keepdims=True)
    onehot = np.zeros_like(p)
    np.put_along_axis(onehot, t[..., None].astype(np.int64), 1.0, -1)
    return lse - xt, (p - onehot) * np.asarray(g, np.float64)[..., None]


def kernel_value_and_grad(x, t, g, dtype, fn=None):
    """(loss float32, d(sum loss * g)/dlogits in `dtype`) through cross_entropy_kernel (or `fn`)."""
    fn = fn or XK.cross_entropy_kernel
    tt, gg = mx.array(t), mx.array(g)

    def f(logits):
        loss = fn(logits, tt)
        return (loss * gg).sum(), loss
    (_, loss), grad = mx.value_and_grad(f)(mx.array(x).astype(dtype))
    mx.eval(loss, grad)
    assert loss.dtype == mx.float32 and grad.dtype == dtype
    return np.array(loss), np.array(grad.astype(mx.float32))


def assert_matches_reference(x, t, g, dtype):
    loss, grad = kernel_value_and_grad(x, t, g, dtype)
    ref_loss, ref_grad = reference(x, t, g)
    assert np.isfinite(loss).all() and np.isfinite(grad).all()
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-5)
    if dtype == mx.float32:
        np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=2e-6 * np.abs(g).max())
    else:
        np.testing.assert_allclose(grad, ref_grad, rtol=4e-3, atol=1e-7)


def record_launches(launched: list) -> None:
    """Route the cross-entropy launches through the current launcher, noting their names."""
    factory.record_launches(XK, launched, lanes=XK.GPU_LANES)


# ------------------------------------------------------------------------------------------------
# CPU: sources, emulated kernels, dispatch


def test_generated_sources_are_up_to_date():
    d = K.source_dir()
    assert (d / "cross_entropy.metal").read_text() == XK.generate_metal(), "run: python -m mlx_megalodon.kernels"
    assert (d / "cross_entropy.cu").read_text() == XK.generate_cuda(), "run: python -m mlx_megalodon.kernels"


@pytest.fixture
def cpu_kernels(tmp_path, monkeypatch):
    if shutil.which("g++") is None:
        pytest.skip("needs g++")
    XK.set_launcher(XK.CpuLauncher(str(tmp_path)))
    monkeypatch.setenv("MEGALODON_KERNELS", "1")
    monkeypatch.setenv("MEGALODON_CE_KERNEL", "1")
    try:
        yield
    finally:
        XK.set_launcher(None)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("V,shape", [(1, (2, 3)), (7, (2, 5)), (1000, (3, 4)), (32003, (2, 3))])
def test_cpu_emulated_kernels_match_float64(cpu_kernels, V, shape, dtype):
    launched = []
    record_launches(launched)
    x, t, g = make_case(shape, V, seed=V, dtype=dtype)
    assert_matches_reference(x, t, g, dtype)
    assert launched == ["ce_fwd", "ce_bwd"]


def test_cpu_emulated_large_magnitude_logits(cpu_kernels):
    """Logits of magnitude ~80 (exp(80) ~ 5e34, exp(160) overflows float32): no overflow, and the loss
    keeps float32 accuracy, also where the target is the max (loss ~ log of a sum near 1) and in rows
    of equal logits (loss = log V exactly)."""
    V = 1000
    x, t, g = make_case((4, 6), V, seed=1, scale=40.0)
    x = np.clip(x, -80.0, 80.0)
    x[0, 1] = 80.0                                 # a constant row at the top
    x[1, 2] = -80.0                                # and at the bottom
    x[2, 3, :] = -80.0
    x[2, 3, 17] = 80.0                             # one dominant entry: the target's (below)
    t[2, 3] = 17
    t[3] = x[3].argmax(-1)                         # a whole batch row of max targets
    assert_matches_reference(x, t, g, mx.float32)
    loss, _ = kernel_value_and_grad(x, t, g, mx.float32)
    np.testing.assert_allclose(loss[0, 1], np.log(V), rtol=1e-6)
    assert loss[2, 3] == 0.0                       # log(1 + 999 exp(-160)): 0 in float32


def test_cpu_emulated_bf16_matches_ops_path(cpu_kernels):
    """bf16 logits: the kernel's loss and gradient against today's ops path (float32 cast, then
    nn.losses.cross_entropy), both on the same bf16 values."""
    x, t, g = make_case((3, 7), 513, seed=5, dtype=mx.bfloat16)
    loss, grad = kernel_value_and_grad(x, t, g, mx.bfloat16)
    ops_loss, ops_grad = kernel_value_and_grad(x, t, g, mx.bfloat16, fn=XK.cross_entropy_ops)
    np.testing.assert_allclose(loss, ops_loss, rtol=1e-5, atol=1e-5)
    assert rel(grad, ops_grad) < 4e-3


def test_out_of_range_targets(cpu_kernels):
    """A clear ValueError before any launch; unvalidated (inside mx.compile), the row's loss is NaN,
    the other rows are unchanged and nothing outside the row is read."""
    launched = []
    record_launches(launched)
    x, t, g = make_case((2, 3), 7, seed=2)
    for bad in (7, -1, 1000):
        tb = t.copy()
        tb[1, 2] = bad
        with pytest.raises(ValueError, match=r"targets must be token ids in \[0, 7\)"):
            XK.cross_entropy_kernel(mx.array(x), mx.array(tb))
        with pytest.raises(ValueError, match="targets must be token ids"):
            XK.fused_cross_entropy(mx.array(x), mx.array(tb))
    assert not launched
    tb = t.copy()
    tb[1, 2] = 1 << 20
    loss = np.array(XK.cross_entropy_kernel(mx.array(x), mx.array(tb), validate=False))
    assert np.isnan(loss[1, 2])
    good = np.ones(t.shape, bool)
    good[1, 2] = False
    np.testing.assert_allclose(loss[good], reference(x, t, g)[0][good], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="targets must have the logits' shape"):
        XK.cross_entropy_kernel(mx.array(x), mx.array(t[:, :2]))


def loss_and_grads(model, x, y, mask, seg, dtype=mx.float32):
    params = model.trainable_parameters()

    def f(p):
        model.update(cast_params(p, dtype))
        return loss_fn(model, x, y, mask, seg)[0]
    loss, grads = mx.value_and_grad(f)(params)
    model.update(params)
    mx.eval(loss, grads)
    return loss.item(), grads


@pytest.mark.parametrize("share_emb", [False, True])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_loss_fn_kernel_matches_ops_path(cpu_kernels, monkeypatch, share_emb, dtype):
    """train.loss_fn with the kernels forced on (features @ head in the compute dtype, then the
    kernels) against the ops path (model(...) logits cast to float32): the same loss and parameter
    gradients, with a mask and packed rows. float32: to 1e-6 / allclose(1e-4, 1e-6); bf16 compute:
    the logits' gradient is rounded to bf16 from float32 values that differ in the last bits, so
    the parameter gradients agree to 1e-2 (relative Frobenius) and the loss to 1e-5."""
    model = new_model(tiny_args(share_emb=share_emb), seed=3)
    rng = np.random.default_rng(0)
    x = mx.array(rng.integers(0, 64, (2, 37)).astype(np.int32))
    y = mx.array(rng.integers(0, 64, (2, 37)).astype(np.int32))
    mask = mx.array((rng.random((2, 37)) > 0.2).astype(np.float32))
    seg = mx.array(np.repeat([[0] * 20 + [1] * 17], 2, axis=0).astype(np.int32))
    launched = []
    record_launches(launched)
    loss_k, g_k = loss_and_grads(model, x, y, mask, seg, dtype)
    assert launched == ["ce_fwd", "ce_bwd"], "the kernel path did not run"
    monkeypatch.setenv("MEGALODON_CE_KERNEL", "0")
    loss_o, g_o = loss_and_grads(model, x, y, mask, seg, dtype)
    assert launched == ["ce_fwd", "ce_bwd"]
    if dtype == mx.float32:
        assert loss_k == pytest.approx(loss_o, rel=1e-6)
    else:
        assert loss_k == pytest.approx(loss_o, rel=1e-5)
    for (k, a), (_, b) in zip(tree_flatten(g_k), tree_flatten(g_o)):
        if dtype == mx.float32:
            assert np.allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-6), k
        else:
            assert rel(a, b) < 1e-2, (k, rel(a, b))


def test_kernels_off_means_ops_path(cpu_kernels, monkeypatch):
    """MEGALODON_KERNELS=0 wins over MEGALODON_CE_KERNEL=1: the ops path, bit for bit."""
    launched = []
    record_launches(launched)
    monkeypatch.setenv("MEGALODON_KERNELS", "0")
    x, t, _ = make_case((2, 5), 100, seed=4)
    assert not XK.ce_kernel_wanted(x.shape, mx.float32)
    got = XK.fused_cross_entropy(mx.array(x), mx.array(t))
    want = XK.cross_entropy_ops(mx.array(x), mx.array(t))
    assert np.array_equal(np.array(got), np.array(want))
    model = new_model(tiny_args(), seed=1)
    ids = mx.array(np.arange(16, dtype=np.int32).reshape(2, 8))
    loss_fn(model, ids, ids)[0].item()
    assert not launched


def test_dispatch_policy(cpu_kernels, monkeypatch):
    """On by default for CUDA only (measured there); MEGALODON_CE_KERNEL forces it; unsupported inputs
    go to the ops path."""
    monkeypatch.delenv("MEGALODON_CE_KERNEL")
    assert XK.CE_KERNEL_DEFAULT == {"cuda": True, "metal": False}    # Metal: never measured
    assert not XK.ce_kernel_wanted((2, 8, 64), mx.bfloat16)            # PREFER_KERNEL is off
    monkeypatch.setattr(K, "gpu_backend", lambda: "cuda")
    XK.set_launcher(None)
    assert XK._launcher.available() and XK.ce_kernel_wanted((2, 8, 64), mx.bfloat16)
    monkeypatch.setattr(K, "gpu_backend", lambda: "metal")
    assert not XK.ce_kernel_wanted((2, 8, 64), mx.bfloat16)
    XK.set_launcher(XK.CpuLauncher())
    monkeypatch.setattr(XK, "PREFER_KERNEL", True)
    assert XK.ce_kernel_wanted((2, 8, 64), mx.bfloat16)
    monkeypatch.setenv("MEGALODON_CE_KERNEL", "0")
    assert not XK.ce_kernel_wanted((2, 8, 64), mx.bfloat16)
    monkeypatch.setenv("MEGALODON_CE_KERNEL", "1")
    assert XK.ce_kernel_wanted((2, 8, 64), mx.float16) and XK.ce_kernel_wanted((5, 64), mx.float32)
    assert not XK.ce_kernel_wanted((2, 0, 64), mx.bfloat16)
    assert not XK.ce_kernel_wanted((2, 8, XK.MAX_VOCAB + 1), mx.bfloat16)
    assert not XK.ce_kernel_wanted((2, 8, 64), mx.int32)


def test_no_gpu_means_ops_path(monkeypatch):
    monkeypatch.setenv("MEGALODON_CE_KERNEL", "1")
    monkeypatch.delenv("MEGALODON_KERNELS", raising=False)
    assert XK.ce_kernel_wanted((2, 8, 64), mx.bfloat16) == ON_GPU


def test_kernel_check_covers_the_kernel_when_wanted(cpu_kernels, monkeypatch):
    """kernel_check's case runs only where the policy would use the kernel, and passes on the
    emulated kernel; a kernel that is 10% off fails it (the bf16 case allows 3%)."""
    case = KC._cross_entropy_case()
    assert case is not None and KC._compare("cross entropy", *case) is None
    inner = XK._launcher()

    def perturbed(name, *args):
        out = inner(name, *args)
        return [out[0] * 1.1, *out[1:]] if name == "ce_fwd" else out
    perturbed.lanes = 1
    XK.set_launcher(perturbed)
    reason = KC._compare("cross entropy", *KC._cross_entropy_case())
    assert reason is not None and reason.startswith("cross entropy output")
    monkeypatch.setenv("MEGALODON_CE_KERNEL", "0")
    assert KC._cross_entropy_case() is None


# ------------------------------------------------------------------------------------------------
# GPU (skipped without one): python3 -m pytest -q tests/test_cross_entropy_kernels.py -k gpu

gpu = pytest.mark.skipif(not ON_GPU, reason="needs a GPU backend (CUDA or Metal)")


@pytest.fixture
def gpu_kernels(monkeypatch):
    monkeypatch.setenv("MEGALODON_KERNELS", "1")
    monkeypatch.setenv("MEGALODON_CE_KERNEL", "1")
    XK.set_launcher(None)
    yield
    XK.set_launcher(None)


@gpu
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
@pytest.mark.parametrize("V,shape", [(1, (3, 5)), (7, (4, 33)), (1000, (3, 50)), (32003, (2, 40)),
                                     (32000, (1, 64))])
def test_gpu_kernels_match_float64(gpu_kernels, V, shape, dtype):
    launched = []
    record_launches(launched)
    x, t, g = make_case(shape, V, seed=V, dtype=dtype)
    assert_matches_reference(x, t, g, dtype)
    assert launched == ["ce_fwd", "ce_bwd"]


@gpu
def test_gpu_large_magnitude_logits(gpu_kernels):
    x, t, g = make_case((8, 16), 4097, seed=9, scale=40.0)
    x = np.clip(x, -80.0, 80.0)
    x[0, 1] = 80.0
    assert_matches_reference(x, t, g, mx.float32)


@gpu
def test_gpu_bf16_matches_ops_path_at_training_shape(gpu_kernels):
    """One 4K row of mega200M's bf16 training logits (32000 entries): loss and gradient against the
    ops path on the same values."""
    x, t, g = make_case((1, 4096), 32000, seed=11, dtype=mx.bfloat16)
    loss, grad = kernel_value_and_grad(x, t, g, mx.bfloat16)
    ops_loss, ops_grad = kernel_value_and_grad(x, t, g, mx.bfloat16, fn=XK.cross_entropy_ops)
    np.testing.assert_allclose(loss, ops_loss, rtol=1e-5, atol=1e-5)
    assert rel(grad, ops_grad) < 4e-3


@gpu
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_gpu_loss_fn_under_compile_matches_ops_path(gpu_kernels, monkeypatch, dtype):
    """loss_fn's value and gradients under mx.compile (as the Trainer runs it), kernel vs ops path."""
    model = new_model(tiny_args(), seed=3)
    rng = np.random.default_rng(0)
    x = mx.array(rng.integers(0, 64, (2, 37)).astype(np.int32))
    y = mx.array(rng.integers(0, 64, (2, 37)).astype(np.int32))
    mask = mx.array((rng.random((2, 37)) > 0.2).astype(np.float32))
    params = model.trainable_parameters()

    def run():
        def f(p, x, y, mask):
            model.update(cast_params(p, dtype))
            return loss_fn(model, x, y, mask)[0]
        out = mx.compile(mx.value_and_grad(f))(params, x, y, mask)
        model.update(params)
        mx.eval(out)
        return out
    launched = []
    record_launches(launched)
    loss_k, g_k = run()
    assert "ce_fwd" in launched and "ce_bwd" in launched
    monkeypatch.setenv("MEGALODON_CE_KERNEL", "0")
    loss_o, g_o = run()
    tol = 1e-5 if dtype == mx.float32 else 1e-2
    assert loss_k.item() == pytest.approx(loss_o.item(), rel=1e-5)
    for (k, a), (_, b) in zip(tree_flatten(g_k), tree_flatten(g_o)):
        assert rel(a, b) < tol, (k, rel(a, b))
