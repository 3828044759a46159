"""Tests of the PyTorch reference (torch_ref): layout, numerics against naive loops, streaming."""
from __future__ import annotations

import itertools
import math
import sys
import types

import pytest

torch = pytest.importorskip("torch")

import torch_ref  # noqa: E402
from mlx_megalodon.config import ModelArgs, upstream_shapes  # noqa: E402
from torch_ref import complex_exponential_moving_average as cema_mod  # noqa: E402
from torch_ref.complex_exponential_moving_average import MultiHeadComplexEMA  # noqa: E402
from torch_ref.moving_average_gated_attention import chunked_causal_attention  # noqa: E402
from torch_ref.timestep_norm import TimestepNorm  # noqa: E402

VOCAB = 64
CHUNK = 8


def tiny_args(**overrides) -> ModelArgs:
    base = dict(num_layers=2, model_dim=16, z_dim=8, value_dim=24, num_heads=2, ffn_hidden_dim=20,
                cema_ndim=4, chunk_size=CHUNK, norm_num_groups=4, vocab_size=VOCAB)
    base.update(overrides)
    args = ModelArgs(**base)
    args.validate()
    return args


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial weights everywhere: norm scales, gamma/beta, CEMA parameters, all non-zero."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        r = torch.randn(p.shape, generator=g, dtype=torch.float64)
        if name.endswith("embed.weight"):
            p.copy_(r)
        elif p.dim() == 2 and not name.endswith(("mega.gamma", "mega.beta", "cema.omega")):
            p.copy_(r / math.sqrt(p.shape[1]))           # linear weights [out, in]
        elif name.endswith(("cema.alpha", "cema.delta")):
            p.copy_(r * 0.8)
        elif name.endswith("cema.theta"):
            p.copy_(r * 1.5)
        else:
            p.copy_(r * 0.3)                             # norm weights/biases, gamma, beta, alpha, ...
    return model


def make_model(seed: int = 0, dtype=torch.float64, **overrides) -> torch_ref.Mega:
    torch.manual_seed(seed)
    model = torch_ref.Mega(tiny_args(**overrides))
    randomize_(model, seed)
    return model.to(dtype).eval()


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)


# --------------------------------------------------------------------------- state_dict layout
FLAGS = list(itertools.product([False, True], [False, True], [False, True], [False, True], [None, 500.0]))


@pytest.mark.parametrize("swiglu,share_emb,scale_emb,rescale_nffn,rope_base", FLAGS)
def test_state_dict_matches_upstream_layout(swiglu, share_emb, scale_emb, rescale_nffn, rope_base):
    args = tiny_args(swiglu=swiglu, share_emb=share_emb, scale_emb=scale_emb,
                     rescale_nffn=rescale_nffn, rope_base=rope_base, num_heads=1)
    model = torch_ref.Mega(args)
    sd = model.state_dict()
    expected = upstream_shapes(args)
    assert set(sd) == set(expected)
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert sd["layers.0.mega.timenorm.prior_count"].dtype == torch.int64
    assert (model.output.output.weight is model.embed.weight) == share_emb
    dz = args.z_head_dim
    base = 10000.0 if rope_base is None else rope_base
    want = 1.0 / torch.tensor([base ** (j / dz) for j in range(0, dz, 2)], dtype=torch.float32)
    assert torch.equal(sd["rope.freqs"], want)
    if rescale_nffn:
        assert torch.allclose(sd["layers.1.nffn.alpha"], torch.full((args.model_dim,), 0.05))


@pytest.mark.parametrize("share_emb", [False, True])
def test_strict_load_round_trip(share_emb):
    src = make_model(3, dtype=torch.float32, share_emb=share_emb, swiglu=True, rescale_nffn=True)
    dst = torch_ref.Mega(tiny_args(share_emb=share_emb, swiglu=True, rescale_nffn=True))
    dst.load_state_dict(src.state_dict(), strict=True)
    t = tokens(2, 13)
    torch.testing.assert_close(dst(t), src(t), rtol=0, atol=0)


def test_load_from_upstream_shaped_dict():
    """A dict shaped like upstream's consolidated.pth (share_emb: both keys hold the same tensor)."""
    args = tiny_args(share_emb=True, scale_emb=True, swiglu=True)
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, shape in upstream_shapes(args).items():
        if k.endswith("prior_count"):
            sd[k] = torch.tensor(0, dtype=torch.int64)
        else:
            sd[k] = torch.randn(shape, generator=g) * 0.2
    sd["output.output.weight"] = sd["embed.weight"]
    model = torch_ref.Mega(args)
    model.load_state_dict(sd, strict=True)
    assert torch.equal(model.layers[1].mega.cema.gamma, sd["layers.1.mega.cema.gamma"])
    assert torch.isfinite(model(tokens(1, 11))).all()


# --------------------------------------------------------------------------- CEMA
def naive_cema(module: MultiHeadComplexEMA, x: torch.Tensor, h0=None):
    """Step-by-step float64 recurrence from the raw parameters. x [B, D, L]."""
    n = module.ndim
    alpha = torch.sigmoid(module.alpha.detach().double()[..., 0])                 # D x N
    delta = torch.sigmoid(module.delta.detach().double()[..., 0])
    theta = torch.sigmoid(module.theta.detach().double()[:, 0, 0]) * 2 * math.pi / n
    phases = theta[:, None] * torch.arange(1, n + 1, dtype=torch.float64)[None, :]
    q = (1 - alpha * delta) * torch.exp(1j * phases)
    p = alpha.to(torch.complex128)
    gr = module.gamma.detach().double()
    gamma = torch.complex(gr[..., 0], gr[..., 1]) * math.sqrt(1.0 / n)
    omega = module.omega.detach().double()[:, 0]
    bsz, dim, length = x.shape
    h = torch.zeros(bsz, dim, n, dtype=torch.complex128) if h0 is None else h0.to(torch.complex128)
    ys = []
    for t in range(length):
        xt = x[:, :, t].double()
        h = q * h + p * xt[..., None]
        ys.append((gamma * h).sum(-1).real + omega * xt)
    return torch.stack(ys, dim=-1), h


@pytest.mark.parametrize("ndim", [1, 4, 16])
@pytest.mark.parametrize("length", [1, 7, 37])
@pytest.mark.parametrize("with_state", [False, True])
def test_cema_matches_naive_recurrence(ndim, length, with_state):
    torch.manual_seed(ndim * 100 + length)
    dim, bsz = 6, 2
    m = MultiHeadComplexEMA(dim, ndim)
    with torch.no_grad():
        m.gamma.normal_()
        m.alpha.mul_(3)
        m.delta.mul_(3)
    x = torch.randn(bsz, dim, length, dtype=torch.float64)
    h0 = torch.randn(bsz, dim, ndim, dtype=torch.complex128) if with_state else None
    y_ref, h_ref = naive_cema(m, x, h0)
    y, h = m(x, h0, compute_last_state=True)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h, h_ref, rtol=1e-10, atol=1e-10)
    # float32 / complex64 path
    y32, h32 = m(x.float(), None if h0 is None else h0.to(torch.complex64), compute_last_state=True)
    assert y32.dtype == torch.float32 and h32.dtype == torch.complex64
    torch.testing.assert_close(y32.double(), y_ref, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(h32.to(torch.complex128), h_ref, rtol=1e-4, atol=2e-5)


def test_cema_blocked_powers(monkeypatch):
    """The blocked evaluation of q^j (used for long L) gives the same result as one block."""
    torch.manual_seed(5)
    m = MultiHeadComplexEMA(4, 3)
    x = torch.randn(2, 4, 50, dtype=torch.float64)
    h0 = torch.randn(2, 4, 3, dtype=torch.complex128)
    y1, h1 = m(x, h0)
    monkeypatch.setattr(cema_mod, "_POWER_BLOCK_ELEMENTS", 4 * 3 * 7)   # 7 positions per block
    y2, h2 = m(x, h0)
    torch.testing.assert_close(y1, y2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h1, h2, rtol=1e-12, atol=1e-12)
    y_ref, h_ref = naive_cema(m, x, h0)
    torch.testing.assert_close(y2, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h2, h_ref, rtol=1e-10, atol=1e-10)


def test_cema_long_memory_float32():
    """|q| close to 1 (slow decay) over a few thousand steps: the float32 path stays accurate
    (the powers q^j are formed in float64, so j * arg q does not lose phase)."""
    torch.manual_seed(2)
    m = MultiHeadComplexEMA(3, 4)
    with torch.no_grad():
        m.alpha.fill_(-4.0)
        m.delta.fill_(-4.0)
        m.gamma.normal_()
    x = torch.randn(1, 3, 3000, dtype=torch.float64)
    y_ref, h_ref = naive_cema(m, x)
    y, h = m(x.float())
    scale = y_ref.abs().max()
    assert (y.double() - y_ref).abs().max() < 1e-5 * scale
    assert (h.to(torch.complex128) - h_ref).abs().max() < 1e-5 * h_ref.abs().max()


# --------------------------------------------------------------------------- TimestepNorm
def welford_combine(a_n, a_mean, a_var, b_n, b_mean, b_var):
    """Upstream's WelfordCombine (csrc/utils.h), transcribed to Python floats."""
    n = a_n + b_n
    c1 = 0.0 if n == 0 else a_n / n
    c2 = 0.0 if n == 0 else b_n / n
    delta = b_mean - a_mean
    return n, c1 * a_mean + c2 * b_mean, c1 * a_var + c2 * b_var + (c1 * delta) * (c2 * delta)


def naive_timestep_norm(module: TimestepNorm, x: torch.Tensor, state):
    bsz, length, dim = x.shape
    groups = module.num_groups
    gs = dim // groups
    count0, mean0, var0 = state
    w = module.weight.detach().double() + 1
    b = module.bias.detach().double()
    y = torch.zeros(bsz, length, dim, dtype=torch.float64)
    counts, means, vars_ = [], [], []
    for i in range(bsz):
        n_prev = int(count0[i])
        mu_run = [float(v) for v in mean0[i]]
        var_run = [float(v) for v in var0[i]]
        for t in range(length):
            for g in range(groups):
                seg = x[i, t, g * gs:(g + 1) * gs].double()
                gm = float(seg.mean())
                gv = float(((seg - gm) ** 2).mean())
                _, m, v = welford_combine(n_prev, mu_run[g], var_run[g], 1, gm, gv)
                mu_run[g], var_run[g] = m, v
                y[i, t, g * gs:(g + 1) * gs] = (seg - m) / math.sqrt(v + module.eps) * w[g * gs:(g + 1) * gs] \
                    + b[g * gs:(g + 1) * gs]
            n_prev += 1
        counts.append(n_prev)
        means.append(mu_run)
        vars_.append(var_run)
    return y, (torch.tensor(counts), torch.tensor(means, dtype=torch.float64),
               torch.tensor(vars_, dtype=torch.float64))


@pytest.mark.parametrize("prior", ["default", "random_prior_count0", "carried"])
def test_timestep_norm_matches_naive_welford(prior):
    torch.manual_seed(7)
    dim, groups, bsz, length = 12, 3, 2, 19
    m = TimestepNorm(dim, groups, eps=1e-5).double()
    with torch.no_grad():
        m.weight.normal_(0, 0.5)
        m.bias.normal_(0, 0.5)
        if prior != "default":
            m.prior_mean.normal_()
            m.prior_logv.normal_()
    x = torch.randn(bsz, length, dim, dtype=torch.float64) * 2 + 3
    if prior == "carried":
        state = (torch.tensor([5, 1]), torch.randn(bsz, groups, dtype=torch.float64),
                 torch.rand(bsz, groups, dtype=torch.float64) + 0.2)
        y, st = m(x, state)
    else:
        state = m.initial_state(bsz, torch.float64)   # count 0: prior discarded on the first step
        y, st = m(x)
    y_ref, st_ref = naive_timestep_norm(m, x, state)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    assert torch.equal(st[0], st_ref[0])
    torch.testing.assert_close(st[1], st_ref[1], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(st[2], st_ref[2], rtol=1e-10, atol=1e-10)
    # state carry: two pieces == one call
    y1, s1 = m(x[:, :6], None if prior != "carried" else state)
    y2, s2 = m(x[:, 6:], s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s2[2], st[2], rtol=1e-10, atol=1e-10)
    # float32 input: float32 output and state
    y32, s32 = m.float()(x.float())
    assert y32.dtype == torch.float32 and s32[1].dtype == torch.float32
    if prior != "carried":
        torch.testing.assert_close(y32.double(), y_ref, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- attention
def naive_block_attention(q, k, v, start, chunk):
    """Dense attention with an explicitly built block-diagonal causal mask."""
    total = k.shape[1]
    pos_q = torch.arange(start, total)
    pos_k = torch.arange(total)
    allowed = (pos_k[None, :] <= pos_q[:, None]) & (pos_k[None, :] // chunk == pos_q[:, None] // chunk)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k).masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


@pytest.mark.parametrize("start,length", [(0, 5), (0, 8), (0, 21), (3, 2), (3, 5), (5, 22)])
def test_chunked_attention_is_block_diagonal(start, length):
    g = torch.Generator().manual_seed(start * 31 + length)
    q = torch.randn(2, length, 2, 4, generator=g, dtype=torch.float64)
    k = torch.randn(2, start + length, 2, 4, generator=g, dtype=torch.float64)
    v = torch.randn(2, start + length, 2, 3, generator=g, dtype=torch.float64)
    out = chunked_causal_attention(q, k, v, start, CHUNK)
    torch.testing.assert_close(out, naive_block_attention(q, k, v, start, CHUNK), rtol=1e-12, atol=1e-12)


def naive_mega_block(block, freqs, x):
    """The MEGA block written out: chunks handled one at a time, RoPE as complex rotation with
    positions 0..C-1 in every chunk. Reuses timenorm and cema (tested above against naive loops)."""
    bsz, length, _ = x.shape
    heads, dz, dv, chunk = block.num_heads, block.z_head_dim, block.v_head_dim, block.chunk_size
    eps = block.norm_eps
    xn, _ = block.timenorm(x)
    c, _ = block.cema(xn.transpose(1, 2), None, compute_last_state=False)
    c = c.transpose(1, 2)
    mx = c / torch.sqrt((c * c).mean(-1, keepdim=True) + eps) * (block.rmsnorm.weight + 1)
    z = (mx @ block.wz.weight.T + block.wz.bias).view(bsz, length, heads, dz)
    z = z / torch.sqrt((z * z).mean(-1, keepdim=True) + eps)
    z = z.reshape(bsz, length, heads * dz)
    q = z * (block.gamma[0] + 1) / math.sqrt(dz) + block.beta[0]
    k = z * (block.gamma[1] + 1) / math.sqrt(dz) + block.beta[1]
    v = torch.nn.functional.silu(xn @ block.wv.weight.T + block.wv.bias)
    r = torch.nn.functional.silu(mx @ block.wr.weight.T + block.wr.bias)
    outs = []
    for s in range(0, length, chunk):
        e = min(s + chunk, length)
        n = e - s
        # angles rounded to float32 like upstream's freqs_cis; rotation in float64
        ang = (torch.arange(n, dtype=torch.float32)[:, None] * freqs.float()[None, :]).double()
        rot = torch.polar(torch.ones(n, dz // 2, dtype=torch.float64), ang)
        def rope(t):
            tc = torch.view_as_complex(t[:, s:e].reshape(bsz, n, heads, dz // 2, 2).contiguous())
            return torch.view_as_real(tc * rot[None, :, None, :]).reshape(bsz, n, heads, dz)
        qc, kc = rope(q), rope(k)
        vc = v[:, s:e].reshape(bsz, n, heads, dv)
        scores = torch.einsum("bqhd,bkhd->bhqk", qc, kc)
        scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        outs.append(torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), vc).reshape(bsz, n, heads * dv))
    o = torch.cat(outs, 1)
    h = mx @ block.wh1.weight.T + block.wh1.bias + (o * r) @ block.wh2.weight.T
    return h + x


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("length", [5, 8, 27])
def test_mega_block_matches_naive_per_chunk(heads, length):
    model = make_model(11, num_heads=heads)
    block = model.layers[0].mega
    x = torch.randn(2, length, 16, dtype=torch.float64)
    with torch.no_grad():
        out, _ = block(x, model.rope)
        ref = naive_mega_block(block, model.rope.freqs, x)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_earlier_chunks_reach_later_ones_only_through_cema_and_timenorm():
    """With CEMA silenced (gamma = omega = 0 -> c = 0) and TimestepNorm given a huge prior count
    (stats frozen), a chunk's block output must not depend on earlier chunks at all."""
    model = make_model(4)
    block = model.layers[0].mega
    with torch.no_grad():
        block.cema.gamma.zero_()
        block.cema.omega.zero_()
    x = torch.randn(1, 24, 16, dtype=torch.float64)
    x2 = x.clone()
    x2[:, :8] += torch.randn(1, 8, 16, dtype=torch.float64)        # change the first chunk only
    big = (torch.tensor([10 ** 12]), torch.zeros(1, 4, dtype=torch.float64),
           torch.ones(1, 4, dtype=torch.float64))

    def run(inp):
        cache = torch_ref.LayerCache(cema=torch.zeros(1, 16, 4, dtype=torch.complex128), norm=big,
                                     k=torch.zeros(1, 0, 2, 4, dtype=torch.float64),
                                     v=torch.zeros(1, 0, 2, 12, dtype=torch.float64), pos=0)
        return block(inp, model.rope, cache)[0]
    with torch.no_grad():
        a, b = run(x), run(x2)
    torch.testing.assert_close(a[:, 8:], b[:, 8:], rtol=1e-9, atol=1e-9)
    assert (a[:, :8] - b[:, :8]).abs().max() > 1e-3


# --------------------------------------------------------------------------- whole model
def split_points(kind: str, length: int):
    if kind == "whole":
        return [length]
    if kind == "chunks":
        return [min(CHUNK, length - s) for s in range(0, length, CHUNK)]
    if kind == "tokens":
        return [1] * length
    pieces, i, pattern = [], 0, [3, 7, 2, 11, 1, 5]
    while sum(pieces) < length:
        pieces.append(min(pattern[i % len(pattern)], length - sum(pieces)))
        i += 1
    return pieces


def stream(model, toks, pieces):
    cache = model.make_cache(toks.shape[0])
    out, s = [], 0
    for n in pieces:
        out.append(model(toks[:, s:s + n], cache=cache))
        s += n
    assert cache.offset == toks.shape[1]
    assert cache.layers[0].pos == toks.shape[1] % CHUNK == cache.layers[0].k.shape[1]
    return torch.cat(out, 1)


@pytest.mark.parametrize("length", [5, 8, 24, 29])
@pytest.mark.parametrize("kind", ["whole", "chunks", "uneven", "tokens"])
def test_streaming_equals_full_float64(length, kind):
    model = make_model(2, num_heads=2, cema_ndim=16, swiglu=True, scale_emb=True)
    t = tokens(2, length)
    with torch.no_grad():
        full = model(t)
        streamed = stream(model, t, split_points(kind, length))
    assert full.dtype == torch.float32      # logits are float32 (computed in float64 here)
    torch.testing.assert_close(streamed, full, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cfg", [dict(num_heads=1, cema_ndim=1),
                                 dict(num_heads=2, cema_ndim=4, share_emb=True, rescale_nffn=True)])
@pytest.mark.parametrize("kind", ["chunks", "uneven", "tokens"])
def test_streaming_equals_full_float32(cfg, kind):
    model = make_model(6, dtype=torch.float32, **cfg)
    t = tokens(1, 29, seed=3)
    with torch.no_grad():
        full = model(t)
        streamed = stream(model, t, split_points(kind, 29))
    torch.testing.assert_close(streamed, full, rtol=1e-5, atol=1e-5)


def test_any_length_is_causal_prefix():
    """Logits of a prefix don't depend on what follows (internal chunk padding is invisible)."""
    model = make_model(8)
    t = tokens(2, 29)
    with torch.no_grad():
        full = model(t)
        for n in (1, 5, 8, 9, 16, 23):
            torch.testing.assert_close(model(t[:, :n]), full[:, :n], rtol=1e-10, atol=1e-10)


def test_gradients_reach_every_parameter():
    model = make_model(9, dtype=torch.float32, swiglu=True, rescale_nffn=True, scale_emb=True).train()
    t = tokens(2, 19)
    logits = model(t)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), t[:, 1:].reshape(-1))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name


def test_gradcheck_cema_and_timestep_norm():
    torch.manual_seed(0)
    m = MultiHeadComplexEMA(3, 2).double()
    x = torch.randn(1, 3, 6, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(1, 3, 2, dtype=torch.complex128)
    assert torch.autograd.gradcheck(lambda a: m(a, h0)[0], (x,))
    names = ["alpha", "delta", "theta", "gamma", "omega"]
    params = tuple(getattr(m, k).detach().clone().requires_grad_(True) for k in names)

    def by_params(*ps):
        y, h = torch.func.functional_call(m, dict(zip(names, ps)), (x.detach(), h0))
        return y, torch.view_as_real(h)
    assert torch.autograd.gradcheck(by_params, params)
    n = TimestepNorm(6, 2).double()
    y = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: n(a)[0], (y,))


def test_low_precision_compute_dtype_runs():
    model = make_model(10, dtype=torch.float32, swiglu=True)
    t = tokens(1, 12)
    with torch.no_grad():
        ref = model(t)
        model.to_compute_dtype(torch.bfloat16)
        assert model.layers[0].mega.wz.weight.dtype == torch.bfloat16
        assert model.layers[0].mega.cema.alpha.dtype == torch.float32
        assert model.rope.freqs.dtype == torch.float32
        out = model(t)
        cache = model.make_cache(1)
        streamed = torch.cat([model(t[:, :5], cache=cache), model(t[:, 5:], cache=cache)], 1)
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()
    assert torch.isfinite(streamed).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    model = make_model(12, dtype=torch.float32, swiglu=True, share_emb=True, cema_ndim=16)
    t = tokens(2, 29)
    with torch.no_grad():
        cpu = model(t)
        cpu_stream = stream(model, t, split_points("uneven", 29))
        model = model.cuda()
        gpu = model(t.cuda())
        gpu_stream = stream(model, t.cuda(), split_points("uneven", 29))
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gpu_stream.cpu(), cpu_stream, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gpu_stream, gpu, rtol=1e-5, atol=1e-5)
    model.train()
    loss = model(t.cuda()).square().mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


# --------------------------------------------------------------------------- load()
def test_load_uses_checkpoint_and_tokenizer_modules(monkeypatch):
    args = tiny_args(share_emb=True)
    src = make_model(13, dtype=torch.float32, share_emb=True)
    state = {k: v.clone() for k, v in src.state_dict().items()}
    seen = {}

    def load_upstream_state(path):
        seen["path"] = path
        return args, state, "/fake/tokenizer.model"

    class Tokenizer:
        def __init__(self, path):
            seen["tok"] = path

    ckpt = types.ModuleType("mlx_megalodon.checkpoint")
    ckpt.load_upstream_state = load_upstream_state
    tok = types.ModuleType("mlx_megalodon.tokenizer")
    tok.Tokenizer = Tokenizer
    monkeypatch.setitem(sys.modules, "mlx_megalodon.checkpoint", ckpt)
    monkeypatch.setitem(sys.modules, "mlx_megalodon.tokenizer", tok)
    model, tokenizer = torch_ref.load("some/dir")
    assert seen == {"path": "some/dir", "tok": "/fake/tokenizer.model"}
    assert isinstance(tokenizer, Tokenizer) and not model.training
    assert model.output.output.weight is model.embed.weight
    t = tokens(1, 10)
    with torch.no_grad():
        torch.testing.assert_close(model(t), src(t), rtol=0, atol=0)


def test_torch_ref_does_not_import_mlx():
    import os
    import subprocess
    code = ("import sys, torch_ref, torch; m = torch_ref.Mega(torch_ref.ModelArgs(num_layers=1, model_dim=8, "
            "z_dim=4, value_dim=8, ffn_hidden_dim=8, chunk_size=4, norm_num_groups=2, vocab_size=10)); "
            "m(torch.zeros(1, 3, dtype=torch.long)); assert 'mlx' not in sys.modules and "
            "'mlx.core' not in sys.modules, [k for k in sys.modules if k.startswith('mlx.')]")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


@pytest.mark.parametrize("model_parallel_size", [1, 2])
def test_load_real_upstream_checkpoint_dir(tmp_path, model_parallel_size):
    """End to end through mlx_megalodon.checkpoint / tokenizer on a written upstream directory."""
    pytest.importorskip("sentencepiece")
    factory = pytest.importorskip("factory")
    pytest.importorskip("mlx_megalodon.checkpoint")
    args = tiny_args(share_emb=True, swiglu=True)
    sd = factory.random_upstream_state_dict(args, seed=4)
    directory = factory.make_upstream_dir(tmp_path / "ckpt", args, sd, model_parallel_size=model_parallel_size)
    model, tokenizer = torch_ref.load(str(directory))
    ref = torch_ref.Mega(args)
    ref.load_state_dict(sd, strict=True)
    ids = tokenizer.encode("hello world")
    t = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(model(t), ref.eval()(t), rtol=0, atol=0)
    assert model.output.output.weight is model.embed.weight
