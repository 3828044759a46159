"""Packed rows: ``model(inputs, segment_ids=...)`` processes every document of a row exactly as if it
were its own sequence (CEMA and TimestepNorm restart, chunks and RoPE positions count from the
document's start, attention stays inside it), forward and backward, eager and compiled."""
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

import mlx_megalodon.complex_exponential_moving_average as cema_module
from mlx_megalodon import kernels
from mlx_megalodon.complex_exponential_moving_average import cema_scan, cema_segmented
from mlx_megalodon.data import PackedDataset, TokenStream
from mlx_megalodon.mega import document_starts
from mlx_megalodon.moving_average_gated_attention import packed_chunk_attention
from mlx_megalodon.rotary_positional_embedding import rope_periods
from mlx_megalodon.timestep_norm import TimestepNorm
from test_mlx_ops import naive_cema, naive_chunk_attention, naive_timestep_norm, random_cema
from test_parity import CONFIGS, assert_logits_close, build_pair

# Document lengths per row (chunk size 8): shorter than, equal to and longer than a chunk, length 1,
# documents starting mid-chunk, several per row, different boundaries in each row.
LAYOUTS = {
    "mixed": [[3, 8, 13, 1, 5], [20, 10]],
    "singletons": [[1, 1, 9, 1, 16, 1, 1], [7, 9, 8, 6]],
    # longer than the CEMA scan block (64): the across-block carry and its resets
    "long": [[70, 3, 77], [1, 64, 85]],
}


def segments_of(layout):
    return np.stack([np.repeat(np.arange(len(row)), row) for row in layout]).astype(np.int32)


def doc_slices(layout):
    for b, row in enumerate(layout):
        s = 0
        for n in row:
            yield b, s, s + n
            s += n


def starts_of(seg):
    """Reference document starts, by a plain loop."""
    out = np.zeros_like(seg)
    for b in range(seg.shape[0]):
        for t in range(1, seg.shape[1]):
            out[b, t] = t if seg[b, t] != seg[b, t - 1] else out[b, t - 1]
    return out


def packed_vs_alone(model, toks, layout):
    """Max abs error of each document's packed logits against the same document run alone."""
    got = np.array(model(mx.array(toks), segment_ids=mx.array(segments_of(layout))))
    alone = [np.array(model(mx.array(toks[b:b + 1, s:e])))[0] for b, s, e in doc_slices(layout)]
    return got, alone


# --------------------------------------------------------------------------- the whole model
@pytest.mark.parametrize("name", ["plain", "swiglu_shared_scaled", "rescale_one_head_rope", "ndim16_heads4"])
@pytest.mark.parametrize("layout", ["mixed", "singletons", "long"])
def test_packed_documents_equal_separate_runs(name, layout):
    args, ref, model = build_pair(CONFIGS[name])
    rows = LAYOUTS[layout]
    L = sum(rows[0])
    toks = np.random.default_rng(L).integers(0, args.vocab_size, size=(2, L))
    got, alone = packed_vs_alone(model, toks, rows)
    assert got.shape == (2, L, args.vocab_size)
    for (b, s, e), expected in zip(doc_slices(rows), alone):
        assert_logits_close(got[b, s:e], expected, f"{name} {layout} row {b} doc [{s}, {e})")
        if layout != "long":   # and against the independent PyTorch port
            with torch.no_grad():
                r = ref(torch.from_numpy(toks[b:b + 1, s:e])).numpy()[0]
            assert_logits_close(got[b, s:e], r, f"{name} {layout} row {b} doc [{s}, {e}) vs torch_ref")


def test_small_scan_blocks(monkeypatch):
    """Blocks of 4 steps: many blocks, document starts inside blocks and on their edges."""
    monkeypatch.setattr(cema_module, "SEGMENT_BLOCK", 4)
    args, _, model = build_pair(CONFIGS["ndim16_heads4"])
    for rows in (LAYOUTS["mixed"], LAYOUTS["singletons"]):
        toks = np.random.default_rng(1).integers(0, args.vocab_size, size=(2, sum(rows[0])))
        got, alone = packed_vs_alone(model, toks, rows)
        for (b, s, e), expected in zip(doc_slices(rows), alone):
            assert_logits_close(got[b, s:e], expected, f"block 4 row {b} doc [{s}, {e})")


@pytest.mark.parametrize("L", [5, 29, 150])
def test_all_zero_segments_equal_plain_call(L):
    args, _, model = build_pair(CONFIGS["plain"])
    toks = mx.array(np.random.default_rng(L).integers(0, args.vocab_size, size=(2, L)))
    plain = np.array(model(toks))
    assert_logits_close(np.array(model(toks, segment_ids=mx.zeros((2, L), dtype=mx.int32))), plain, "zeros")


def test_rows_from_packed_dataset():
    """segment_ids exactly as PackedDataset.rows() emits them (a row may open mid-document)."""
    args, _, model = build_pair(CONFIGS["plain"])
    rng = np.random.default_rng(3)
    lengths = [5, 17, 2, 11, 30, 9, 4]
    tokens = rng.integers(0, args.vocab_size, size=sum(lengths)).astype(np.int32)
    stream = TokenStream(tokens, np.concatenate([[0], np.cumsum(lengths)[:-1]]), args.vocab_size)
    batch = PackedDataset(stream, 24).rows([0, 2])
    got = np.array(model(mx.array(batch.inputs), segment_ids=mx.array(batch.segment_ids)))
    starts = starts_of(batch.segment_ids)
    for b in range(2):
        for s in np.unique(starts[b]):
            e = s + int((starts[b] == s).sum())
            alone = np.array(model(mx.array(batch.inputs[b:b + 1, s:e])))[0]
            assert_logits_close(got[b, s:e], alone, f"dataset row {b} doc [{s}, {e})")


def _doc_loss_fns(layout, toks, targets):
    seg = mx.array(segments_of(layout))

    def packed(m):
        out = m(mx.array(toks), segment_ids=seg)
        return nn.losses.cross_entropy(out, mx.array(targets), reduction="sum")

    def alone(m):
        total = mx.array(0.0)
        for b, s, e in doc_slices(layout):
            out = m(mx.array(toks[b:b + 1, s:e]))
            total = total + nn.losses.cross_entropy(out, mx.array(targets[b:b + 1, s:e]), reduction="sum")
        return total
    return packed, alone


@pytest.mark.parametrize("name", ["plain", "swiglu_shared_scaled"])
def test_gradients_equal_sum_over_separate_documents(name):
    args, _, model = build_pair(CONFIGS[name])
    model.train()
    rows = LAYOUTS["mixed"]
    L = sum(rows[0])
    toks = np.random.default_rng(7).integers(0, args.vocab_size, size=(2, L + 1))
    packed, alone = _doc_loss_fns(rows, toks[:, :-1], toks[:, 1:])
    loss_p, grads_p = nn.value_and_grad(model, packed)(model)
    loss_a, grads_a = nn.value_and_grad(model, alone)(model)
    assert abs(loss_p.item() - loss_a.item()) <= 1e-5 * abs(loss_a.item())
    grads_p, grads_a = dict(tree_flatten(grads_p)), dict(tree_flatten(grads_a))
    assert set(grads_p) == set(grads_a)
    for key in sorted(grads_a):
        g, r = np.array(grads_p[key]), np.array(grads_a[key])
        scale = float(np.abs(r).max())
        assert scale > 0, f"{key}: zero gradient"
        assert np.isfinite(g).all(), key
        assert float(np.abs(g - r).max()) <= 1e-4 * scale + 1e-7, f"{key}: packed gradient differs"


def test_compiled_forward_and_gradient():
    args, _, model = build_pair(CONFIGS["ndim16_heads4"])
    rows = LAYOUTS["mixed"]
    L = sum(rows[0])
    toks = np.random.default_rng(11).integers(0, args.vocab_size, size=(2, L + 1))
    inputs, targets, seg = mx.array(toks[:, :-1]), mx.array(toks[:, 1:]), mx.array(segments_of(rows))

    eager = np.array(model(inputs, segment_ids=seg))
    compiled = mx.compile(lambda x, s: model(x, segment_ids=s))
    assert_logits_close(np.array(compiled(inputs, seg)), eager, "compiled forward")
    # another layout, same shapes: the compiled graph takes the boundaries as data
    other = mx.array(segments_of(LAYOUTS["singletons"])[:, :L])
    assert_logits_close(np.array(compiled(inputs, other)), np.array(model(inputs, segment_ids=other)),
                        "compiled forward, other boundaries")

    model.train()

    def loss_fn(m, x, y, s):
        return nn.losses.cross_entropy(m(x, segment_ids=s), y, reduction="mean")
    loss_e, grads_e = nn.value_and_grad(model, loss_fn)(model, inputs, targets, seg)
    grads_e = dict(tree_flatten(grads_e))

    @partial(mx.compile, inputs=model.state, outputs=model.state)
    def step(x, y, s):
        return nn.value_and_grad(model, loss_fn)(model, x, y, s)
    loss_c, grads_c = step(inputs, targets, seg)
    assert abs(loss_c.item() - loss_e.item()) <= 1e-6 * max(1.0, abs(loss_e.item()))
    for key, g in tree_flatten(grads_c):
        r = np.array(grads_e[key])
        assert float(np.abs(np.array(g) - r).max()) <= 1e-4 * float(np.abs(r).max()) + 1e-7, key


def test_segment_ids_errors():
    args, _, model = build_pair(CONFIGS["plain"])
    toks = mx.zeros((2, 6), dtype=mx.int32)
    with pytest.raises(ValueError, match="cache"):
        model(toks, cache=model.make_cache(), segment_ids=mx.zeros((2, 6), dtype=mx.int32))
    with pytest.raises(ValueError, match="shape"):
        model(toks, segment_ids=mx.zeros((2, 5), dtype=mx.int32))


# --------------------------------------------------------------------------- the building blocks
def random_segments(rng, B, L, p):
    seg = np.cumsum(rng.random((B, L)) < p, axis=1)
    return (seg - seg[:, :1]).astype(np.int32)


def test_document_starts():
    rng = np.random.default_rng(0)
    seg = random_segments(rng, 3, 50, 0.2)
    np.testing.assert_array_equal(np.array(document_starts(mx.array(seg))), starts_of(seg))


@pytest.mark.parametrize("L", [1, 9, 40, 130])
@pytest.mark.parametrize("block", [1, 4, 7, 64])
def test_cema_segmented_matches_per_document_recurrence(L, block):
    cema = random_cema()
    rng = np.random.default_rng(L + block)
    x = rng.normal(size=(2, L, 6)).astype(np.float32)
    seg = random_segments(rng, 2, L, 0.1)
    starts = starts_of(seg)
    ref = np.zeros(x.shape)
    for b in range(2):
        for s in np.unique(starts[b]):
            e = s + int((starts[b] == s).sum())
            ref[b, s:e] = naive_cema(cema, x[b:b + 1, s:e])[0][0]
    y = cema_segmented(mx.array(x), cema.coefficients(), mx.array(starts), block=block)
    assert np.abs(np.array(y) - ref).max() <= 2e-5 * np.abs(ref).max() + 1e-6


def test_packed_cema_takes_ops_under_kernels_off(monkeypatch):
    """MEGALODON_KERNELS=0: with doc_starts, cema_scan takes the ops path (cema_segmented) even where
    the kernel is available (a launcher that refuses every launch stands in for the GPU). With the
    kernels on, packed rows take the kernel's reset variant: tests/test_kernels.py."""
    class Refuse:
        max_split = 1

        def __call__(self, *args, **kwargs):
            raise AssertionError("the custom kernel was launched under MEGALODON_KERNELS=0")
    monkeypatch.setenv("MEGALODON_KERNELS", "0")
    kernels.set_launcher(Refuse())
    try:
        assert not kernels.cema_kernel_available(20)
        cema = random_cema()
        x = mx.array(np.random.default_rng(0).normal(size=(1, 20, 6)).astype(np.float32))
        starts = mx.array(starts_of(np.repeat([[0, 1]], 10, axis=1).astype(np.int32)))
        y, state = cema_scan(x, cema.coefficients(), doc_starts=starts)
        assert state is None and y.shape == (1, 20, 6)
        with pytest.raises(ValueError):
            cema_scan(x, cema.coefficients(), return_state=True, doc_starts=starts)
    finally:
        kernels.set_launcher(None)


@pytest.mark.parametrize("L", [1, 9, 1500])
def test_timestep_norm_restarts_per_document(L):
    rng = np.random.default_rng(L)
    D, G = 12, 3
    norm = TimestepNorm(D, G)
    norm.weight = mx.array(rng.normal(size=D).astype(np.float32))
    norm.bias = mx.array(rng.normal(size=D).astype(np.float32))
    x = (rng.normal(size=(2, L, D)) * 2 + 3).astype(np.float32)
    seg = random_segments(rng, 2, L, 0.01 if L > 100 else 0.2)
    starts = starts_of(seg)
    y, _ = norm(mx.array(x), doc_starts=mx.array(starts))
    for b in range(2):
        for s in np.unique(starts[b]):
            e = s + int((starts[b] == s).sum())
            ref, *_ = naive_timestep_norm(x[b:b + 1, s:e], np.array(norm.weight), np.array(norm.bias), G, 1e-5)
            assert np.abs(np.array(y[b:b + 1, s:e]) - ref).max() < 1e-4, (b, s, e)


@pytest.mark.parametrize("L", [1, 8, 29, 41])
def test_packed_attention_is_per_document_chunk_attention(L):
    rng = np.random.default_rng(L)
    q, k = (rng.normal(size=(2, 2, L, 6)).astype(np.float32) for _ in range(2))
    v = rng.normal(size=(2, 2, L, 5)).astype(np.float32)
    seg = random_segments(rng, 2, L, 0.1)
    starts = starts_of(seg)
    got = np.array(packed_chunk_attention(mx.array(q), mx.array(k), mx.array(v), 8, rope_periods(6, 10000.0),
                                          mx.array(starts)))
    for b in range(2):
        for s in np.unique(starts[b]):
            e = s + int((starts[b] == s).sum())
            ref = naive_chunk_attention(*(a[b:b + 1, :, s:e].astype(np.float64) for a in (q, k, v)), 8, 10000.0)
            assert np.abs(got[b:b + 1, :, s:e] - ref).max() < 1e-5, (b, s, e)
