"""The LayerNorm kernel backward (mlx_megalodon/layer_norm_kernels.py, metal/layer_norm.body).

On every machine (CPU): the generated metal/layer_norm.{metal,cu} are up to date; the kernel body
runs one lane per group of rows on the CPU (g++ + ctypes) and matches a float64 numpy LayerNorm
backward in the input, scale and shift gradients, for rows that do not fill the last group, several
rows per group, partial sums added in one stage and in two, a row of one entry, and bfloat16
inputs; the normalized FFN's gradients through train.loss_fn equal MLX's own vjp's; the dispatch
policy and MEGALODON_KERNELS=0; bad weight shapes are one ValueError; kernel_check's case covers the
kernel when the policy would use it and fails a kernel that is off.
On a GPU backend (`python3 -m pytest -q tests/test_layer_norm_kernels.py -k gpu`): the real kernel
(32 lanes per row) against float64 and MLX's vjp, at the training step's shape, and loss_fn under
mx.compile.

Tolerances: float32 gradients to rtol 1e-4 of float64 (float32 statistics and sums over a few
hundred rows); bf16 / fp16 input gradients to 2e-2 relative Frobenius (one rounding of the result
plus the inputs' rounding in the reference's arithmetic), parameter gradients to 4e-3 (float32 sums,
returned rounded to the input dtype: 2^-9 for bf16).
"""
from __future__ import annotations

import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import factory
from factory import tiny_args
from mlx_megalodon import kernel_check as KC
from mlx_megalodon import kernels as K
from mlx_megalodon import layer_norm_kernels as NK
from mlx_megalodon.train import cast_params, loss_fn, new_model

ON_GPU = K.gpu_backend() is not None
EPS = 1e-5


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def make_case(R, D, seed, dtype=mx.float32):
    """x (offset, so the mean matters), weight, bias, cotangent g: float32 numpy values that `dtype`
    holds exactly."""
    rng = np.random.default_rng(seed)

    def rounded(a):
        return np.array(mx.array(a.astype(np.float32)).astype(dtype).astype(mx.float32))
    return (rounded(rng.normal(size=(R, D)) * 2 + 0.7), rounded(rng.normal(size=(D,)) + 1),
            rounded(rng.normal(size=(D,))), rounded(rng.normal(size=(R, D))))


def reference(x, w, g):
    """float64 (gx, gw, gb) of y = layer_norm(x) * w + b with cotangent g."""
    x, w, g = (np.asarray(a, np.float64) for a in (x, w, g))
    mean = x.mean(-1, keepdims=True)
    rstd = 1.0 / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + EPS)
    xhat = (x - mean) * rstd
    wg = w * g
    gx = rstd * (wg - wg.mean(-1, keepdims=True) - xhat * (wg * xhat).mean(-1, keepdims=True))
    return gx, (g * xhat).sum(0), g.sum(0)


def kernel_grads(x, w, b, g, dtype):
    """(gx, gw, gb) as float32 numpy through layer_norm_kernels.layer_norm's vjp."""
    args = [mx.array(a).astype(dtype) for a in (x, w, b)]
    _, grads = mx.vjp(lambda *a: NK.layer_norm(*a, EPS), args, [mx.array(g).astype(dtype)])
    mx.eval(grads)
    assert all(gr.dtype == dtype for gr in grads)
    return [np.array(gr.astype(mx.float32)) for gr in grads]


def record_launches(launched: list) -> None:
    """Route the LayerNorm kernel launches through the current launcher, noting their names."""
    factory.record_launches(NK, launched, lanes=NK.GPU_LANES)


def assert_matches_reference(x, w, b, g, dtype, param_rtol=1e-4):
    got = kernel_grads(x, w, b, g, dtype)
    want = reference(x, w, g)
    for name, a, c in zip(("gx", "gw", "gb"), got, want):
        assert np.isfinite(a).all(), name
        if dtype == mx.float32:
            np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-5 * np.abs(c).max(), err_msg=name)
        else:
            assert rel(a, c) < (2e-2 if name == "gx" else param_rtol), (name, rel(a, c))


# ------------------------------------------------------------------------------------------------
# CPU: sources, emulated kernel, dispatch


def test_generated_sources_are_up_to_date():
    d = K.source_dir()
    assert (d / "layer_norm.metal").read_text() == NK.generate_metal(), "run: python -m mlx_megalodon.kernels"
    assert (d / "layer_norm.cu").read_text() == NK.generate_cuda(), "run: python -m mlx_megalodon.kernels"


@pytest.fixture
def cpu_kernels(tmp_path, monkeypatch):
    if shutil.which("g++") is None:
        pytest.skip("needs g++")
    NK.set_launcher(NK.CpuLauncher(str(tmp_path)))
    monkeypatch.setenv("MEGALODON_KERNELS", "1")
    monkeypatch.setenv("MEGALODON_LN_KERNEL", "1")
    try:
        yield
    finally:
        NK.set_launcher(None)


@pytest.mark.parametrize("R,D,target_groups", [
    (37, 48, 4096),    # one row per group
    (37, 48, 8),       # 5 rows per group, the last group short
    (1024, 20, 128),   # 8 rows per group, 128 groups: partial sums in two stages
    (5, 1, 4096),      # a row of one entry: xhat = 0
    (3, 300, 4096),
])
def test_cpu_emulated_kernel_matches_float64(cpu_kernels, monkeypatch, R, D, target_groups):
    monkeypatch.setattr(NK, "TARGET_GROUPS", target_groups)
    launched = []
    record_launches(launched)
    assert_matches_reference(*make_case(R, D, seed=R + D), mx.float32)
    assert launched == ["ln_bwd"]


def test_cpu_emulated_bf16(cpu_kernels):
    """bf16 inputs: the kernel reads them exactly and computes in float32, so against float64 on the
    same rounded values only the bf16 rounding of gx and the float32 sums differ."""
    assert_matches_reference(*make_case(64, 96, seed=1, dtype=mx.bfloat16), mx.bfloat16, param_rtol=4e-3)


def test_two_stage_partial_sums_match_one_stage():
    part = mx.array(np.random.default_rng(2).normal(size=(256, 2, 5)).astype(np.float32))
    np.testing.assert_allclose(np.array(NK.sum_partials(part)), np.array(part).sum(0), rtol=1e-5, atol=1e-5)
    assert NK.sum_partials(part[:100]).shape == (2, 5)
    np.testing.assert_allclose(np.array(NK.sum_partials(part[:200])), np.array(part)[:200].sum(0),
                               rtol=1e-5, atol=1e-5)   # padded to 4 blocks of 64


def test_bad_weight_shape_is_one_value_error_and_empty_input_works(cpu_kernels):
    x = mx.zeros((2, 3, 8))
    with pytest.raises(ValueError, match=r"weight and bias must have shape \(8,\)"):
        NK.layer_norm(x, mx.ones((7,)), mx.zeros((8,)), EPS)
    empty = NK.layer_norm(mx.zeros((0, 8)), mx.ones((8,)), mx.zeros((8,)), EPS)
    assert empty.shape == (0, 8)


def loss_and_grads(model, x, y, dtype):
    params = model.trainable_parameters()

    def f(p):
        model.update(cast_params(p, dtype))
        return loss_fn(model, x, y)[0]
    loss, grads = mx.value_and_grad(f)(params)
    model.update(params)
    mx.eval(loss, grads)
    return loss.item(), grads


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_loss_fn_kernel_matches_mlx_vjp(cpu_kernels, monkeypatch, dtype):
    """train.loss_fn with the kernel backward in every FFN's LayerNorm against MLX's own vjp: the
    same loss (the forward is the same op) and parameter gradients (float32 allclose 1e-4 / 1e-6;
    bf16 compute: 1e-2 relative Frobenius, as the gradients are rounded to bf16 on the way)."""
    model = new_model(tiny_args(), seed=3)
    rng = np.random.default_rng(0)
    x = mx.array(rng.integers(0, 64, (2, 37)).astype(np.int32))
    y = mx.array(rng.integers(0, 64, (2, 37)).astype(np.int32))
    launched = []
    record_launches(launched)
    loss_k, g_k = loss_and_grads(model, x, y, dtype)
    assert launched and set(launched) == {"ln_bwd"}, "the kernel path did not run"
    n = len(launched)
    model.eval()                          # eval mode (generation): MLX's op, no kernel
    loss_e, _ = loss_and_grads(model, x, y, dtype)
    assert len(launched) == n and loss_e == loss_k
    model.train()
    monkeypatch.setenv("MEGALODON_LN_KERNEL", "0")
    loss_o, g_o = loss_and_grads(model, x, y, dtype)
    assert len(launched) == n
    assert loss_k == loss_o
    for (k, a), (_, b) in zip(tree_flatten(g_k), tree_flatten(g_o)):
        if dtype == mx.float32:
            assert np.allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-6), k
        else:
            assert rel(a, b) < 1e-2, (k, rel(a, b))


def test_kernels_off_means_mlx_vjp(cpu_kernels, monkeypatch):
    """MEGALODON_KERNELS=0 wins over MEGALODON_LN_KERNEL=1."""
    launched = []
    record_launches(launched)
    monkeypatch.setenv("MEGALODON_KERNELS", "0")
    assert not NK.ln_kernel_wanted((2, 8, 64), mx.float32)
    model = new_model(tiny_args(), seed=1)
    ids = mx.array(np.arange(16, dtype=np.int32).reshape(2, 8))
    mx.eval(mx.grad(lambda p: (model.update(p), loss_fn(model, ids, ids)[0])[1])(model.trainable_parameters()))
    assert not launched


def test_dispatch_policy(cpu_kernels, monkeypatch):
    """On by default for CUDA only (measured there); MEGALODON_LN_KERNEL forces it; unsupported inputs
    keep MLX's vjp."""
    monkeypatch.delenv("MEGALODON_LN_KERNEL")
    assert NK.LN_KERNEL_DEFAULT == {"cuda": True, "metal": False}    # Metal: never measured
    assert not NK.ln_kernel_wanted((2, 8, 64), mx.bfloat16)            # PREFER_KERNEL is off
    monkeypatch.setattr(K, "gpu_backend", lambda: "cuda")
    NK.set_launcher(None)
    assert NK._launcher.available() and NK.ln_kernel_wanted((2, 8, 64), mx.bfloat16)
    assert NK.ln_kernel_wanted((2, 8, 2048), mx.bfloat16)
    assert not NK.ln_kernel_wanted((2, 8, 2049), mx.bfloat16)          # past a lane's registers
    monkeypatch.setattr(K, "gpu_backend", lambda: "metal")
    assert not NK.ln_kernel_wanted((2, 8, 64), mx.bfloat16)
    NK.set_launcher(NK.CpuLauncher())
    monkeypatch.setenv("MEGALODON_LN_KERNEL", "1")
    assert NK.ln_kernel_wanted((2, 8, 64), mx.float16) and NK.ln_kernel_wanted((5, 64), mx.float32)
    assert not NK.ln_kernel_wanted((2, 0, 64), mx.bfloat16)
    assert not NK.ln_kernel_wanted((2, 8, 64), mx.int32)
    monkeypatch.setenv("MEGALODON_LN_KERNEL", "0")
    assert not NK.ln_kernel_wanted((2, 8, 64), mx.bfloat16)


def test_no_gpu_means_mlx_vjp(monkeypatch):
    monkeypatch.setenv("MEGALODON_LN_KERNEL", "1")
    monkeypatch.delenv("MEGALODON_KERNELS", raising=False)
    assert NK.ln_kernel_wanted((2, 8, 64), mx.bfloat16) == ON_GPU


def test_kernel_check_covers_the_kernel_when_wanted(cpu_kernels, monkeypatch):
    """kernel_check's case runs only where the policy would use the kernel and passes on the
    emulated kernel; a kernel whose input gradient is 10% off fails it."""
    case = KC._layer_norm_case()
    assert case is not None and KC._compare("LayerNorm", *case) is None
    inner = NK._launcher()

    def perturbed(name, *args):
        out = inner(name, *args)
        return [out[0] * 1.1, *out[1:]]
    perturbed.lanes = 1
    NK.set_launcher(perturbed)
    reason = KC._compare("LayerNorm", *KC._layer_norm_case())
    assert reason is not None and reason.startswith("LayerNorm")
    monkeypatch.setenv("MEGALODON_LN_KERNEL", "0")
    assert KC._layer_norm_case() is None


# ------------------------------------------------------------------------------------------------
# GPU (skipped without one): python3 -m pytest -q tests/test_layer_norm_kernels.py -k gpu

gpu = pytest.mark.skipif(not ON_GPU, reason="needs a GPU backend (CUDA or Metal)")


@pytest.fixture
def gpu_kernels(monkeypatch):
    monkeypatch.setenv("MEGALODON_KERNELS", "1")
    monkeypatch.setenv("MEGALODON_LN_KERNEL", "1")
    NK.set_launcher(None)
    yield
    NK.set_launcher(None)


@gpu
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
@pytest.mark.parametrize("R,D", [(1, 7), (37, 100), (1000, 1024), (300, 2048), (4096, 1024)])
def test_gpu_kernel_matches_float64(gpu_kernels, dtype, R, D):
    launched = []
    record_launches(launched)
    assert_matches_reference(*make_case(R, D, seed=R + D, dtype=dtype), dtype, param_rtol=4e-3)
    assert launched == ["ln_bwd"]


@gpu
def test_gpu_training_shape(gpu_kernels):
    """8 x 4,096 rows of 1,024 in bf16, as the mega200M step's FFN norm: the input gradient agrees
    with MLX's own vjp, and the scale / shift gradients (float32 sums over 32K rows) with float64 to
    bf16's rounding, at least as closely as MLX's vjp's."""
    x, w, b, g = make_case(32768, 1024, seed=0, dtype=mx.bfloat16)
    got = kernel_grads(x, w, b, g, mx.bfloat16)
    args = [mx.array(a).astype(mx.bfloat16) for a in (x, w, b)]
    _, mlx_vjp = mx.vjp(lambda *a: mx.fast.layer_norm(*a, EPS), args, [mx.array(g).astype(mx.bfloat16)])
    mlx_vjp = [np.array(c.astype(mx.float32)) for c in mlx_vjp]
    want = reference(x, w, g)
    assert rel(got[0], mlx_vjp[0]) < 1e-2
    for i, name in ((1, "gw"), (2, "gb")):
        assert rel(got[i], want[i]) < 4e-3, (name, rel(got[i], want[i]))
        assert rel(got[i], want[i]) <= 1.1 * rel(mlx_vjp[i], want[i]) + 1e-4, name


@gpu
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_gpu_loss_fn_under_compile_matches_mlx_vjp(gpu_kernels, monkeypatch, dtype):
    model = new_model(tiny_args(), seed=3)
    rng = np.random.default_rng(0)
    x = mx.array(rng.integers(0, 64, (2, 37)).astype(np.int32))
    y = mx.array(rng.integers(0, 64, (2, 37)).astype(np.int32))
    params = model.trainable_parameters()

    def run():
        def f(p, x, y):
            model.update(cast_params(p, dtype))
            return loss_fn(model, x, y)[0]
        out = mx.compile(mx.value_and_grad(f))(params, x, y)
        model.update(params)
        mx.eval(out)
        return out
    launched = []
    record_launches(launched)
    loss_k, g_k = run()
    assert "ln_bwd" in launched
    monkeypatch.setenv("MEGALODON_LN_KERNEL", "0")
    loss_o, g_o = run()
    tol = 1e-5 if dtype == mx.float32 else 1e-2
    assert loss_k.item() == pytest.approx(loss_o.item(), rel=1e-6)
    for (k, a), (_, b) in zip(tree_flatten(g_k), tree_flatten(g_o)):
        assert rel(a, b) < tol, (k, rel(a, b))
