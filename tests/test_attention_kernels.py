"""The fused chunk attention kernels (mlx_megalodon/attention_kernels.py, metal/chunk_attention.body).

On every machine (CPU): the generated metal/chunk_attention.{metal,cu} are up to date (the Metal
syntax check in test_kernels.py parses every metal/*.metal), the kernel bodies run one lane per row
on the CPU (g++ + ctypes) and match the SDPA ops path and a float64 reference: forward, gradients
of q, k, v (through RoPE, as the model uses them), the decode step at several positions; and the
dispatch policy. On a GPU backend (CUDA here): the real kernels, 32 lanes per row, fp32 and bf16,
against float64 and against the ops path. Tolerances are relative Frobenius errors, in each assert;
the GPU tests print the errors they measured.
"""
from __future__ import annotations

import shutil

import mlx.core as mx
import numpy as np
import pytest

from mlx_megalodon import attention_kernels as A
from mlx_megalodon import kernels as K
from mlx_megalodon.moving_average_gated_attention import MovingAverageGatedAttention, chunk_attention, rope_in_chunks
from mlx_megalodon.rotary_positional_embedding import rope_periods

ON_GPU = K.gpu_backend() is not None


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def reference(q, k, v, C):
    """float64 numpy: softmax(q kᵀ) v, causal inside chunks of C, q/k already rotated."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    L = q.shape[2]
    s = q @ np.swapaxes(k, -1, -2)
    t = np.arange(L)
    visible = (t[None, :] <= t[:, None]) & (t[None, :] // C == t[:, None] // C)
    s = np.where(visible, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def make_qkv(B, H, L, dz, dv, seed, dtype=mx.float32):
    """q, k as the model makes them (rms-normalized rows over sqrt(dz), times ~1, so scores are
    O(1)..O(few)); v silu-like. Exactly representable in dtype."""
    rng = np.random.default_rng(seed)
    q, k = (rng.normal(size=(B, H, L, dz)) * 1.5 for _ in range(2))
    v = rng.normal(size=(B, H, L, dv))
    return [np.array(mx.array(a.astype(np.float32)).astype(dtype).astype(mx.float32)) for a in (q, k, v)]


def attention_value_and_grads(q, k, v, C, use_kernel, monkeypatch, dtype=mx.float32):
    """chunk_attention (RoPE included) and d(sum out*w)/d(q, k, v), on the kernel or on SDPA."""
    monkeypatch.setenv("MEGALODON_ATTN_KERNEL", "1" if use_kernel else "0")
    periods = rope_periods(q.shape[-1], 10000.0)
    w = mx.array(np.random.default_rng(7).normal(size=v.shape).astype(np.float32))

    def loss(q, k, v):
        out, _ = chunk_attention(q, k, v, C, periods)
        return (out.astype(mx.float32) * w).sum(), out

    args = [mx.array(a).astype(dtype) for a in (q, k, v)]
    (_, out), grads = mx.value_and_grad(loss, argnums=(0, 1, 2))(*args)
    mx.eval(out, grads)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    return np.array(out.astype(mx.float32)), [np.array(g.astype(mx.float32)) for g in grads]


# ------------------------------------------------------------------------------------------------
# CPU: sources, emulated kernels, dispatch


def test_generated_sources_are_up_to_date():
    d = K.source_dir()
    assert (d / "chunk_attention.metal").read_text() == A.generate_metal(), "run: python -m mlx_megalodon.kernels"
    assert (d / "chunk_attention.cu").read_text() == A.generate_cuda(), "run: python -m mlx_megalodon.kernels"


@pytest.fixture
def cpu_kernels(tmp_path, monkeypatch):
    if shutil.which("g++") is None:
        pytest.skip("needs g++")
    A.set_launcher(A.CpuLauncher(str(tmp_path)))
    monkeypatch.setenv("MEGALODON_KERNELS", "1")
    try:
        yield
    finally:
        A.set_launcher(None)


# (B, H, L, C): one step; one chunk shorter than C; exactly one chunk; several chunks with a
# short last one (odd L); several full chunks.
CPU_CASES = [(1, 1, 1, 8), (2, 2, 13, 16), (1, 2, 8, 8), (2, 1, 37, 8), (1, 2, 40, 8)]


@pytest.mark.parametrize("B,H,L,C", CPU_CASES)
def test_cpu_emulated_forward_and_grads_match_ops(cpu_kernels, monkeypatch, B, H, L, C):
    q, k, v = make_qkv(B, H, L, 6, 10, seed=L)
    out, grads = attention_value_and_grads(q, k, v, C, True, monkeypatch)
    ref_out, ref_grads = attention_value_and_grads(q, k, v, C, False, monkeypatch)
    assert rel(out, ref_out) < 1e-5
    for name, a, b in zip("qkv", grads, ref_grads):
        assert rel(a, b) < 1e-4, (name, rel(a, b))
    # and the kernel alone (on rotated q, k) against float64
    periods = rope_periods(6, 10000.0)
    qr, kr = (rope_in_chunks(mx.array(a), C, periods) for a in (q, k))
    got = A.chunk_attention_kernel(qr, kr, mx.array(v), C)
    assert rel(got, reference(np.array(qr), np.array(kr), v, C)) < 1e-5


def test_cpu_emulated_lse_is_the_row_normalizer(cpu_kernels):
    q, k, v = make_qkv(1, 1, 11, 4, 3, seed=1)
    o, lse = A._forward(*(mx.array(a) for a in (q, k, v)), 4)
    s = np.asarray(q, np.float64)[0, 0] @ np.asarray(k, np.float64)[0, 0].T
    t = np.arange(11)
    s = np.where((t[None] <= t[:, None]) & (t[None] // 4 == t[:, None] // 4), s, -np.inf)
    want = np.log(np.exp(s).sum(-1))
    assert np.allclose(np.array(lse)[0, 0], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kps,cpl", [(1, None), (3, None), (16, None), (3, 2), (2, 1), (16, 4)])
def test_cpu_emulated_decode_matches_sdpa(cpu_kernels, kps, cpl):
    """Several positions, keys_per_split 1 (every key its own split), 2 and 3 (splits past pos are
    empty and never read: their partials stay NaN), 16 (one split holds everything, more keys than
    a trip); value columns per lane None (one slice of all 5 columns), 1, 2 (a short last slice),
    4 (two slices)."""
    rng = np.random.default_rng(kps)
    B, H, C, dz, dv = 2, 2, 9, 6, 5
    q = mx.array(rng.normal(size=(B, H, 1, dz)).astype(np.float32) * 1.5)
    keys = mx.array(rng.normal(size=(B, H, C, dz)).astype(np.float32) * 1.5)
    values = mx.array(rng.normal(size=(B, H, C, dv)).astype(np.float32))
    for pos in (0, 1, 4, C - 1):
        got = A.decode_attention_kernel(q, keys, values, mx.array(pos, dtype=mx.int32), keys_per_split=kps,
                                        columns_per_lane=cpl)
        visible = mx.arange(C) <= pos
        want = mx.fast.scaled_dot_product_attention(q, keys, values, scale=1.0, mask=visible)
        assert got.shape == (B, H, 1, dv)
        assert rel(got, want) < 1e-5, pos


def test_cpu_emulated_module_prefill_and_step(cpu_kernels, monkeypatch):
    """Through the attention block: full forward (chunk path) and the explicit-state decoding
    step (decode path), kernel vs SDPA."""
    from mlx_megalodon.config import ModelArgs
    args = ModelArgs(model_dim=16, z_dim=8, value_dim=12, num_heads=2, chunk_size=4, cema_ndim=2,
                     norm_num_groups=4, num_layers=1, vocab_size=11, ffn_hidden_dim=8)
    mx.random.seed(0)
    block = MovingAverageGatedAttention(args)
    x = mx.random.normal((2, 11, 16))
    results = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("MEGALODON_ATTN_KERNEL", flag)
        y = block(x)
        keys = mx.random.normal((2, 2, 4, 4), key=mx.random.key(1))
        values = mx.random.normal((2, 2, 4, 6), key=mx.random.key(2))
        steps = []
        for pos in range(4):
            attn, _, _ = block._attend_step(
                mx.random.normal((2, 2, 1, 4), key=mx.random.key(3 + pos)),
                mx.random.normal((2, 2, 1, 4), key=mx.random.key(9 + pos)),
                mx.random.normal((2, 2, 1, 6), key=mx.random.key(15 + pos)), keys, values,
                mx.array(pos, dtype=mx.int32))
            steps.append(attn)
        mx.eval(y, steps)
        results[flag] = (np.array(y), [np.array(s) for s in steps])
    assert rel(results["1"][0], results["0"][0]) < 1e-5
    for a, b in zip(results["1"][1], results["0"][1]):
        assert rel(a, b) < 1e-5


def test_dispatch_policy(monkeypatch, tmp_path):
    shape = (1, 1, 4096, 256)
    monkeypatch.delenv("MEGALODON_ATTN_KERNEL", raising=False)
    monkeypatch.setenv("MEGALODON_KERNELS", "1")
    # the default: what was measured for this backend, on a GPU backend only (CUDA: decode only)
    for kind in ("chunk", "decode"):
        assert A.attention_kernel_wanted(kind, shape, 2048, 2048, mx.bfloat16) == (ON_GPU and A.preferred(kind))
    assert A.PREFER_KERNEL_BY_BACKEND["cuda"] == {"chunk": False, "decode": True}
    assert not any(A.PREFER_KERNEL_BY_BACKEND["metal"].values())   # never measured on a Mac
    monkeypatch.setenv("MEGALODON_ATTN_KERNEL", "1")
    assert A.attention_kernel_wanted("chunk", shape, 2048, 2048, mx.bfloat16) == ON_GPU
    assert not A.attention_kernel_wanted("chunk", shape, 2048, 2048, mx.int32)      # dtype
    assert not A.attention_kernel_wanted("chunk", shape, 32 * 129, 2048, mx.float32)  # too many registers
    monkeypatch.setenv("MEGALODON_KERNELS", "0")
    assert not A.attention_kernel_wanted("chunk", shape, 2048, 2048, mx.bfloat16)
    monkeypatch.setenv("MEGALODON_KERNELS", "1")
    monkeypatch.setenv("MEGALODON_ATTN_KERNEL", "0")
    assert not A.attention_kernel_wanted("decode", shape, 2048, 2048, mx.bfloat16)
    with pytest.raises(ValueError, match="unknown attention kind"):
        A.attention_kernel_wanted("prefill", shape, 2048, 2048, mx.bfloat16)
    # a test launcher counts as a backend; it declines dims past its register arrays
    A.set_launcher(A.CpuLauncher(str(tmp_path)))
    try:
        monkeypatch.setenv("MEGALODON_ATTN_KERNEL", "1")
        assert A.attention_kernel_wanted("chunk", (1, 1, 9, 8), 8, 4, mx.float32)
        assert not A.attention_kernel_wanted("chunk", shape, 2048, 2048, mx.float32)
    finally:
        A.set_launcher(None)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="B x H x L"):
        A.chunk_attention_kernel(mx.zeros((1, 4, 8)), mx.zeros((1, 4, 8)), mx.zeros((1, 4, 8)), 4)
    with pytest.raises(ValueError, match="keys B x H x C"):
        A.decode_attention_kernel(mx.zeros((1, 1, 2, 8)), mx.zeros((1, 1, 4, 8)), mx.zeros((1, 1, 4, 8)), 0)


def test_decode_plan_knobs():
    """Defaults, clipping of the columns per lane, and one-line errors for bad knobs."""
    gpu_like = type("GpuLike", (), {"lanes": 32})()
    W, NZ, NV, kps, NS, VS, SL = A._decode_plan(gpu_like, 2048, 256, 2048, None, None, None)
    assert (W, NZ, NV, kps, NS, VS, SL) == (32, 8, A.DECODE_COLUMNS_PER_LANE, A.DECODE_KEYS_PER_SPLIT,
                                            2048 // A.DECODE_KEYS_PER_SPLIT, 32 * A.DECODE_COLUMNS_PER_LANE,
                                            A.DECODE_COMBINE_LANES)
    assert A._decode_plan(gpu_like, 100, 40, 72, 7, 16, 8)[2:] == (3, 7, 15, 96, 8)   # 72 columns: 3 per lane
    assert A._decode_plan(gpu_like, 8, 40, 72, 64, 1, 1)[3:6] == (8, 1, 32)          # kps clipped to C
    cpu = A.CpuLauncher()
    assert A._decode_plan(cpu, 9, 6, 5, 3, 2, 8)[2:] == (A.CPU_MAX_DIM, 3, 3, 2, 1)  # SL = 1 with one lane
    with pytest.raises(ValueError, match="combine_lanes must be a power of two"):
        A._decode_plan(gpu_like, 2048, 256, 2048, None, None, 3)
    with pytest.raises(ValueError, match="columns_per_lane must be >= 1"):
        A._decode_plan(gpu_like, 2048, 256, 2048, None, -1, None)


# ------------------------------------------------------------------------------------------------
# GPU backend: the real kernels

gpu = pytest.mark.skipif(not ON_GPU, reason="no GPU backend (custom kernels need Metal or CUDA)")

# (B, H, L, C, dz, dv, dtype). dz/dv not multiples of 32 exercise the lanes' column guards; the
# mega200M head dims (256, 2048) with a 2048-step chunk; a short last chunk everywhere L % C != 0.
GPU_CASES = [
    (2, 2, 1, 64, 40, 72, mx.float32),          # one step
    (2, 2, 37, 16, 40, 72, mx.float32),         # odd length, several chunks, short last
    (1, 3, 64, 64, 64, 96, mx.float32),         # exactly one chunk
    (1, 1, 300, 128, 256, 2048, mx.float32),    # model head dims, short last chunk
    (2, 2, 37, 16, 40, 72, mx.bfloat16),
    (1, 1, 300, 128, 256, 2048, mx.bfloat16),
    (1, 1, 2048 + 77, 2048, 256, 2048, mx.bfloat16),   # mega200M chunk, short last chunk
    (1, 2, 200, 64, 128, 256, mx.float16),
]


@gpu
@pytest.mark.parametrize("B,H,L,C,dz,dv,dtype", GPU_CASES)
def test_gpu_kernel_forward_and_grads(monkeypatch, B, H, L, C, dz, dv, dtype):
    monkeypatch.setenv("MEGALODON_KERNELS", "1")
    q, k, v = make_qkv(B, H, L, dz, dv, seed=L + dz, dtype=dtype)
    q, k = q / np.sqrt(dz) * 4, k / np.sqrt(dz) * 4       # scores O(1..10), as after the model's norms
    out, grads = attention_value_and_grads(q, k, v, C, True, monkeypatch, dtype)
    ops_out, ops_grads = attention_value_and_grads(q, k, v, C, False, monkeypatch, dtype)
    # kernel alone (rotated inputs) against float64
    periods = rope_periods(dz, 10000.0)
    qr, kr = (rope_in_chunks(mx.array(a).astype(dtype), C, periods) for a in (q, k))
    got = A.chunk_attention_kernel(qr, kr, mx.array(v).astype(dtype), C)
    ref = reference(np.array(qr.astype(mx.float32)), np.array(kr.astype(mx.float32)), v, C)
    err_ref = rel(got.astype(mx.float32), ref)
    err_ops = rel(out, ops_out)
    # Relative to the largest of the three gradients: with one visible key (L = 1 or a chunk's first
    # row) dq and dk are exactly zero mathematically, and only rounding remains on either side.
    scale = max(float(np.linalg.norm(np.asarray(g, np.float64))) for g in ops_grads)
    err_grads = {n: float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64))) / max(scale, 1e-30)
                 for n, a, b in zip("qkv", grads, ops_grads)}
    print(f"\n[attn gpu] B={B} H={H} L={L} C={C} dz={dz} dv={dv} {dtype}: out vs f64 {err_ref:.2e}, "
          f"out vs ops {err_ops:.2e}, grads vs ops {', '.join(f'{n} {e:.2e}' for n, e in err_grads.items())}")
    # fp32: kernel exact to fp32 accumulation (1e-5 vs f64); the ops path's matmuls run in TF32 on
    # CUDA by default, hence 3e-3 against it. 16-bit: one rounding of the output (bf16 2^-9,
    # fp16 2^-12) plus the ops path's own roundings of scores/probabilities.
    fp32 = dtype == mx.float32
    assert err_ref < (1e-5 if fp32 else 8e-3)
    assert err_ops < (3e-3 if fp32 else 2e-2)
    for n, e in err_grads.items():
        assert e < (3e-3 if fp32 else 3e-2), (n, e)


@gpu
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("H,C,kps,cpl,sl", [(1, 2048, None, None, None), (4, 2048, 64, 16, 8), (2, 100, 7, 3, 1),
                                             (2, 4096, 8, 4, 32)])
def test_gpu_decode_matches_sdpa(monkeypatch, dtype, H, C, kps, cpl, sl):
    rng = np.random.default_rng(C + H)
    dz, dv = 256, 2048
    q = mx.array(rng.normal(size=(1, H, 1, dz)).astype(np.float32) * 4 / np.sqrt(dz)).astype(dtype)
    keys = mx.array(rng.normal(size=(1, H, C, dz)).astype(np.float32) * 4 / np.sqrt(dz)).astype(dtype)
    values = mx.array(rng.normal(size=(1, H, C, dv)).astype(np.float32)).astype(dtype)
    step = mx.compile(lambda q, kk, vv, p: A.decode_attention_kernel(q, kk, vv, p, keys_per_split=kps,
                                                                     columns_per_lane=cpl, combine_lanes=sl))
    for pos in (0, 1, C // 2 + 3, C - 1):
        p = mx.array(pos, dtype=mx.int32)
        got = step(q, keys, values, p)
        want = mx.fast.scaled_dot_product_attention(q.astype(mx.float32), keys.astype(mx.float32),
                                                    values.astype(mx.float32), scale=1.0, mask=mx.arange(C) <= pos)
        err = rel(got.astype(mx.float32), want)
        print(f"\n[attn gpu decode] H={H} C={C} kps={kps} cpl={cpl} sl={sl} {dtype} pos={pos}: vs fp32 SDPA {err:.2e}")
        assert err < (3e-3 if dtype == mx.float32 else 8e-3), (pos, err)


@gpu
def test_gpu_compiled_model_step_and_grad(monkeypatch):
    """The model's compiled decoding step and a compiled training gradient, kernel vs SDPA."""
    from mlx_megalodon.config import ModelArgs
    args = ModelArgs(model_dim=64, z_dim=64, value_dim=128, num_heads=2, chunk_size=16, cema_ndim=4,
                     norm_num_groups=8, num_layers=1, vocab_size=11, ffn_hidden_dim=32)
    mx.random.seed(0)
    block = MovingAverageGatedAttention(args)
    x = mx.random.normal((2, 45, 64))
    keys, values = mx.random.normal((2, 2, 16, 32)), mx.random.normal((2, 2, 16, 64))
    qkv = [mx.random.normal((2, 2, 1, d)) for d in (32, 32, 64)]
    res = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("MEGALODON_ATTN_KERNEL", flag)
        step = mx.compile(lambda q, k, v, kk, vv, p: block._attend_step(q, k, v, kk, vv, p)[0])
        outs = [step(*qkv, keys, values, mx.array(p, dtype=mx.int32)) for p in (0, 7, 15)]
        loss = lambda x: (block(x) ** 2).mean()
        val, g = mx.compile(mx.value_and_grad(loss))(x)
        mx.eval(outs, val, g)
        res[flag] = ([np.array(o) for o in outs], float(val), np.array(g))
    for a, b in zip(res["1"][0], res["0"][0]):
        assert rel(a, b) < 3e-3
    assert abs(res["1"][1] - res["0"][1]) < 1e-3 * abs(res["0"][1])
    assert rel(res["1"][2], res["0"][2]) < 3e-3
