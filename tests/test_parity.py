"""MLX model vs the PyTorch reference on the same converted weights: logits, streaming, gradients."""
import itertools

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

from factory import random_upstream_state_dict, tiny_args
from mlx_megalodon.checkpoint import upstream_to_mlx
from mlx_megalodon.mega import Model
from torch_ref import Mega

# Every flag at least once, both head counts, both rope bases, cema_ndim 1 and 16.
CONFIGS = {
    "plain": dict(),
    "swiglu_shared_scaled": dict(swiglu=True, share_emb=True, scale_emb=True),
    "rescale_one_head_rope": dict(rescale_nffn=True, num_heads=1, rope_base=1e5),
    "ndim1": dict(cema_ndim=1, swiglu=True),
    "ndim16_heads4": dict(cema_ndim=16, num_heads=4, z_dim=16, rescale_nffn=True, share_emb=True),
}
LENGTHS = [5, 8, 24, 29]  # shorter than, equal to, several times and not a multiple of chunk 8


def build_pair(overrides, seed=0):
    args = tiny_args(**overrides)
    sd = random_upstream_state_dict(args, seed=seed)
    ref = Mega(args)
    ref.load_state_dict(sd, strict=True)
    ref.eval()
    model = Model(args)
    weights = {k: mx.array(v.numpy()) for k, v in upstream_to_mlx(args, sd).items()}
    model.load_weights(list(model.sanitize(weights).items()), strict=True)
    model.eval()   # single-token calls with a cache then take the compiled decoding step
    return args, ref, model


def tokens_for(args, L, batch=2, seed=0):
    return np.random.default_rng(seed + L).integers(0, args.vocab_size, size=(batch, L))


def assert_logits_close(got, ref, what):
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(got - ref).max())
    assert err <= 1e-4 * scale, f"{what}: max abs error {err:.3g} (logit scale {scale:.3g})"


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("L", LENGTHS)
def test_logits_match_torch_ref(name, L):
    args, ref, model = build_pair(CONFIGS[name])
    toks = tokens_for(args, L)
    with torch.no_grad():
        expected = ref(torch.from_numpy(toks)).numpy()
    got = np.array(model(mx.array(toks)))
    assert got.shape == (2, L, args.vocab_size)
    assert_logits_close(got, expected, f"{name} L={L}")


def splits(L, C=8):
    """whole, chunk by chunk, uneven pieces crossing chunk boundaries, token by token"""
    uneven, pos, step = [], 0, itertools.cycle([3, 6, 1, 11])
    while pos < L:
        n = min(next(step), L - pos)
        uneven.append(n)
        pos += n
    chunked = [min(C, L - s) for s in range(0, L, C)]
    return {"whole": [L], "chunked": chunked, "uneven": uneven, "tokens": [1] * L}


@pytest.mark.parametrize("name", ["plain", "swiglu_shared_scaled", "ndim16_heads4"])
@pytest.mark.parametrize("L", LENGTHS)
def test_streaming_equals_full_in_both(name, L):
    args, ref, model = build_pair(CONFIGS[name])
    toks = tokens_for(args, L)
    with torch.no_grad():
        full = ref(torch.from_numpy(toks)).numpy()
    for split_name, pieces in splits(L).items():
        cache, ref_cache = model.make_cache(), ref.make_cache(batch_size=2)
        outs, ref_outs, pos = [], [], 0
        for n in pieces:
            outs.append(np.array(model(mx.array(toks[:, pos:pos + n]), cache=cache)))
            with torch.no_grad():
                ref_outs.append(ref(torch.from_numpy(toks[:, pos:pos + n]), cache=ref_cache).numpy())
            pos += n
        assert_logits_close(np.concatenate(outs, 1), full, f"MLX {split_name}")
        assert_logits_close(np.concatenate(ref_outs, 1), full, f"torch_ref {split_name}")


@pytest.mark.parametrize("name", ["plain", "swiglu_shared_scaled", "rescale_one_head_rope"])
def test_gradients_match_torch_ref(name):
    args, ref, model = build_pair(CONFIGS[name])
    L = 20
    toks = tokens_for(args, L + 1)
    inputs, targets = toks[:, :-1], toks[:, 1:]

    ref.train()
    model.train()
    ref.zero_grad()
    logits = ref(torch.from_numpy(inputs))
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, args.vocab_size),
                                             torch.from_numpy(targets).reshape(-1))
    loss.backward()
    ref_grads = {k: p.grad.numpy() for k, p in ref.named_parameters() if p.grad is not None}

    def loss_fn(m):
        out = m(mx.array(inputs))
        return nn.losses.cross_entropy(out, mx.array(targets), reduction="mean")
    mlx_loss, grads = nn.value_and_grad(model, loss_fn)(model)
    assert abs(mlx_loss.item() - loss.item()) < 1e-5 * max(1.0, loss.item())
    grads = dict(tree_flatten(grads))
    expected_keys = set(ref_grads)
    if args.share_emb:
        expected_keys.discard("output.output.weight")   # same tensor as embed.weight
    assert set(grads) == expected_keys
    for key in sorted(expected_keys):
        g, r = np.array(grads[key]), ref_grads[key]
        scale = float(np.abs(r).max())
        assert scale > 0, f"{key}: reference gradient is zero"
        err = float(np.abs(g - r).max())
        assert err <= 1e-3 * scale + 1e-7, f"{key}: grad error {err:.3g} vs scale {scale:.3g}"
